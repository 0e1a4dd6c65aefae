"""End-to-end training on the tiny SD1.5/SD2 builtins, pinned by comparisons."""

from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from tuner import load_pipeline
from tuner.adapters.lora import WEIGHT_NAME
from tuner.inference.render import lora_scale
from tuner.training.run import run_training


def images(pipe, prompt="a red circle on a blue background", **kwargs):
    generator = torch.Generator().manual_seed(0)
    return pipe(
        prompt,
        num_inference_steps=3,
        guidance_scale=3.0,
        height=64,
        width=64,
        generator=generator,
        output_type="np",
        **kwargs,
    ).images


def fixed_eval_loss(result, latents, prompt_embeds, scale: float) -> float:
    """Denoising loss on fixed noise/timesteps, at a given adapter scale (0 = base)."""
    objective = result.family.objective(
        result.comps, type("T", (), {"noise_offset": 0.0, "min_snr_gamma": None})
    )
    generator = torch.Generator().manual_seed(123)
    losses = []
    with torch.no_grad(), lora_scale([result.comps.denoiser], scale):
        for _ in range(8):
            inputs = objective.sample(latents, generator)
            pred = result.comps.denoiser(
                inputs.noisy, inputs.timesteps, encoder_hidden_states=prompt_embeds
            ).sample
            losses.append(torch.mean((pred - inputs.target) ** 2).item())
    return sum(losses) / len(losses)


@pytest.mark.slow  # 50 steps of learning: a quality check (the fast tier trains in most tests)
def test_loss_falls_when_memorizing_two_images(make_recipe, style_dir):
    for extra in sorted(style_dir.iterdir())[4:]:
        extra.unlink()  # keep 2 images (png + txt each)
    result = run_training(
        make_recipe("train.steps=50", "train.batch_size=2", "train.lr=1e-2", "adapter.rank=8")
    )
    fam, comps = result.family, result.comps
    from tuner.data.images import load_image
    from tuner.data.items import pixels_of

    pngs = sorted(style_dir.glob("*.png"))
    pixels = torch.stack([pixels_of(load_image(str(p))) for p in pngs])
    with torch.no_grad():
        latents = fam.encode_images(comps, pixels).float()
        embeds = fam.encode_prompts(comps, [p.with_suffix(".txt").read_text() for p in pngs])
    before = fixed_eval_loss(result, latents, embeds["prompt_embeds"], 0.0)
    after = fixed_eval_loss(result, latents, embeds["prompt_embeds"], 1.0)
    assert after < 0.85 * before, (before, after)


def test_same_seed_same_adapter_and_other_seed_differs(make_recipe, tmp_path):
    def adapter(name: str, *overrides: str) -> dict[str, torch.Tensor]:
        # One output dir per run: each file read here was written by that run alone.
        out = tmp_path / name
        recipe = make_recipe(f"output.dir={out}", *overrides)
        assert run_training(recipe).output_dir == out
        return load_file(str(out / WEIGHT_NAME))

    first, again, other = adapter("first"), adapter("again"), adapter("other", "train.seed=1")
    assert first and first.keys() == again.keys() == other.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)


def test_adapter_loads_in_diffusers_changes_images_and_scale_zero_is_base(make_recipe):
    result = run_training(
        make_recipe("train.steps=4", "train.lr=2e-2", "adapter.rank=4", "adapter.alpha=16")
    )
    pipe = load_pipeline("builtin:tiny-sd15")
    assert isinstance(pipe, StableDiffusionPipeline)
    base = images(pipe)
    pipe.load_lora_weights(str(result.output_dir))
    saved = load_file(str(result.output_dir / WEIGHT_NAME))
    loaded = {k: v for k, v in pipe.unet.state_dict().items() if "lora_" in k}
    assert len(loaded) == len(saved)  # every saved tensor found a home, none left over
    tuned = images(pipe)
    assert abs(tuned - base).max() > 1e-3
    pipe.set_adapters(pipe.get_active_adapters(), adapter_weights=[0.0])
    assert abs(images(pipe) - base).max() == 0.0
    pipe.set_adapters(pipe.get_active_adapters(), adapter_weights=[1.0])
    assert abs(images(pipe, cross_attention_kwargs={"scale": 0.0}) - base).max() == 0.0

    # alpha (16) != rank (4): the loaded adapter must reproduce the in-memory trained model.
    memory = load_pipeline("builtin:tiny-sd15")
    memory.unet = result.comps.denoiser
    assert abs(images(memory) - tuned).max() < 1e-5


def test_v_prediction_family_reads_scheduler_and_matches_get_velocity():
    from tuner import families
    from tuner.recipe import ModelSection

    family = families.for_model(ModelSection(path="builtin:tiny-sd2"))
    comps = family.load(ModelSection(path="builtin:tiny-sd2"), torch.float32)
    objective = family.objective(comps, type("T", (), {"noise_offset": 0.0, "min_snr_gamma": None}))
    assert family.spec.name == "sd2" and objective.prediction_type == "v_prediction"
    latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    from tuner.objectives.common import streams

    inputs = objective.sample(latents, torch.Generator().manual_seed(5))
    noise_gen, time_gen, _ = streams(torch.Generator().manual_seed(5), 3)
    noise = torch.randn(latents.shape, generator=noise_gen)
    timesteps = torch.randint(0, 1000, (3,), generator=time_gen)
    assert torch.equal(inputs.timesteps, timesteps)
    assert torch.allclose(inputs.target, comps.scheduler.get_velocity(latents, noise, timesteps))
    assert torch.allclose(inputs.noisy, comps.scheduler.add_noise(latents, noise, timesteps))


def test_min_snr_weight_matches_formula():
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    from tuner.objectives.ddpm import DDPMObjective

    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    timesteps = torch.tensor([1, 100, 500, 999])
    weight = DDPMObjective(scheduler, min_snr_gamma=5.0).weight(timesteps)
    snr = compute_snr(scheduler, timesteps)
    assert torch.allclose(weight, torch.minimum(snr, torch.full_like(snr, 5.0)) / snr)
    assert weight[0] < 1 and weight[-1] == 1.0  # clipped at low noise, untouched at high noise


def test_8bit_optimizer_runs_on_cpu(make_recipe, monkeypatch):
    import bitsandbytes as bnb

    made = []

    class Spy(bnb.optim.AdamW8bit):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(bnb.optim, "AdamW8bit", Spy)
    result = run_training(
        make_recipe("train.optimizer=adamw8bit", "adapter.rank=64", "train.steps=2")
    )
    saved = load_file(str(result.output_dir / WEIGHT_NAME))
    assert any(v.abs().sum() > 0 for k, v in saved.items() if ".up." in k or "lora_B" in k)
    assert len(made) == 1  # the recipe's optimizer is bitsandbytes' 8-bit AdamW ...
    states = [t for state in made[0].state.values() for t in state.values()]
    assert any(isinstance(t, torch.Tensor) and t.dtype == torch.uint8 for t in states)  # ... 8-bit


def test_trackers_write_real_files(make_recipe, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("WANDB_MODE", "offline")
    result = run_training(make_recipe("log.to=[tensorboard, wandb]", "train.steps=2"))
    out = result.output_dir
    events = list(out.rglob("events.out.tfevents.*"))
    assert events
    logged = {}
    for path in events:
        accumulator = EventAccumulator(str(path))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            logged[tag] = [event.step for event in accumulator.Scalars(tag)]
    assert logged.get("loss") == [1, 2] and logged.get("lr") == [1, 2]  # every step's values
    import wandb

    wandb.teardown()  # the wandb service writes the run file; wait until it has
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    records = [p.read_bytes() for p in runs[0].glob("*.wandb")]
    assert records and any(b"loss" in data for data in records)  # the history, not just a header


def test_dora_trains_and_loads_without_a_kohya_file(make_recipe):
    result = run_training(make_recipe("adapter.dora=true", "train.steps=2", "train.lr=1e-2"))
    saved = load_file(str(result.output_dir / WEIGHT_NAME))
    assert any("magnitude" in k for k in saved)
    assert not (result.output_dir / "pytorch_lora_weights_kohya.safetensors").exists()
    pipe = load_pipeline("builtin:tiny-sd15")
    base = images(pipe)
    pipe.load_lora_weights(str(result.output_dir))
    assert any("lora_magnitude_vector" in k for k in pipe.unet.state_dict())
    assert abs(images(pipe) - base).max() > 1e-4
