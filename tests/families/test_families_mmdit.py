"""The flow-matching families (flux, sd3) on their tiny builtins: the denoiser call equals the
pipeline's own, only LoRA moves, save -> load round trip, sampling with the adapter, the
ComfyUI export, DreamBooth, and the shipped quickstarts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import FluxPipeline

from tuner import adapters, export, families
from tuner.errors import TunerError
from tuner.recipe import AdapterSection, ModelSection, load_recipe
from tuner.sample import lora_scale, pipeline_modules
from tuner.train import run_training

REPO = Path(__file__).resolve().parents[2]
TINY = ["tiny-flux", "tiny-sd3"]
FAST = ("data.resolution=32", "train.max_sequence_length=16", "train.steps=3", "train.lr=1e-2")
PROMPT = "a red circle on a blue background"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # One thread: the CPU is shared, and fixed reduction order makes renders compare exactly.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def load(name: str, **model):
    spec = ModelSection(path=f"builtin:{name}", **model)
    family = families.for_model(spec)
    return family, family.load(spec, torch.float32)


def render(pipe, **kwargs) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    return pipe(PROMPT, num_inference_steps=2, width=32, height=32, max_sequence_length=16,
                generator=torch.Generator().manual_seed(0), output_type="pt", **kwargs).images


def capture_denoiser_call(pipe, **kwargs) -> dict:
    seen = {}

    def hook(module, args, call_kwargs, output):
        seen.setdefault("kwargs", call_kwargs)
        seen.setdefault("output", output[0])

    handle = pipe.transformer.register_forward_hook(hook, with_kwargs=True)
    try:
        render(pipe, **kwargs)
    finally:
        handle.remove()
    return seen


def test_flux_predict_is_the_pipelines_transformer_call():
    """Packing, image/text ids, guidance and the timestep/1000 convention all as FluxPipeline."""
    family, comps = load("tiny-flux")
    comps.extra.update(max_sequence_length=16, guidance=2.5)
    seen = capture_denoiser_call(family.build_pipeline(comps), guidance_scale=2.5)
    call = seen["kwargs"]
    side = 32 // family.vae_scale(comps)
    noisy = FluxPipeline._unpack_latents(call["hidden_states"], side, side, 1)
    cond = family.encode_prompts(comps, [PROMPT])
    torch.testing.assert_close(cond["prompt_embeds"], call["encoder_hidden_states"])
    with torch.no_grad():
        pred = family.predict(comps, noisy, call["timestep"] * 1000, cond, {})
    torch.testing.assert_close(pred, FluxPipeline._unpack_latents(seen["output"], side, side, 1))


def test_sd3_predict_is_the_pipelines_transformer_call():
    family, comps = load("tiny-sd3")
    comps.extra["max_sequence_length"] = 16
    seen = capture_denoiser_call(family.build_pipeline(comps), guidance_scale=1.0)
    call = seen["kwargs"]
    cond = family.encode_prompts(comps, [PROMPT])
    torch.testing.assert_close(cond["prompt_embeds"], call["encoder_hidden_states"])
    torch.testing.assert_close(cond["pooled_prompt_embeds"], call["pooled_projections"])
    with torch.no_grad():
        pred = family.predict(comps, call["hidden_states"], call["timestep"], cond, {})
    torch.testing.assert_close(pred, seen["output"])


def test_sd3_without_t5_encodes_zeros_in_its_place():
    family, full = load("tiny-sd3")
    _, dropped = load("tiny-sd3", drop_t5=True)
    assert "text_encoder_3" not in dropped.text_encoders
    for comps in (full, dropped):
        comps.extra["max_sequence_length"] = 16
    with_t5 = family.encode_prompts(full, [PROMPT])["prompt_embeds"]
    without = family.encode_prompts(dropped, [PROMPT])["prompt_embeds"]
    assert with_t5.shape == without.shape
    clip_tokens = with_t5.shape[1] - 16
    torch.testing.assert_close(without[:, :clip_tokens], with_t5[:, :clip_tokens])
    assert torch.count_nonzero(without[:, clip_tokens:]) == 0
    assert torch.count_nonzero(with_t5[:, clip_tokens:]) > 0
    assert dropped.identity != full.identity  # separate text caches
    render(family.build_pipeline(dropped), guidance_scale=1.0)  # the pipeline runs without it


@pytest.mark.parametrize("name", TINY)
def test_trains_only_lora_and_round_trips_through_diffusers(name, make_recipe, tmp_path):
    pristine = {k: v.clone() for k, v in load(name)[1].denoiser.state_dict().items()}
    result = run_training(make_recipe(*FAST, base=f"builtin:{name}"))
    trained = result.comps.denoiser
    for key, value in trained.state_dict().items():
        if "lora_" not in key:
            assert torch.equal(value, pristine[key.replace(".base_layer", "")]), key
    assert any(v.abs().sum() > 0 for k, v in trained.state_dict().items() if "lora_B" in k)

    in_memory = result.family.build_pipeline(result.comps)
    family, fresh = load(name)
    loaded = family.build_pipeline(fresh)
    loaded.load_lora_weights(str(result.output_dir / adapters.WEIGHT_NAME))
    after_load = render(loaded, guidance_scale=1.0)
    torch.testing.assert_close(render(in_memory, guidance_scale=1.0), after_load)
    with lora_scale(pipeline_modules(loaded), 0.0):
        base = render(loaded, guidance_scale=1.0)
    torch.testing.assert_close(base, render(family.build_pipeline(load(name)[1]),
                                            guidance_scale=1.0))
    assert (after_load - base).abs().max() > 1e-3  # the adapter changes what is sampled


def test_flux_comfy_export_loads_like_the_diffusers_file(make_recipe):
    """The kohya-named file (OneTrainer's `lora_transformer_` layout, which ComfyUI maps for
    Flux) carries alpha and gives the same images as the diffusers file."""
    result = run_training(make_recipe(*FAST, "adapter.rank=4", "adapter.alpha=2",
                                      base="builtin:tiny-flux"))
    state, metadata = export.read_adapter(result.output_dir / adapters.WEIGHT_NAME)
    kohya = export.to_kohya(state, metadata, result.family.kohya_prefixes)
    assert all(k.startswith("lora_transformer_transformer_blocks_") or
               k.startswith("lora_transformer_single_transformer_blocks_") for k in kohya)
    assert {float(v) for k, v in kohya.items() if k.endswith(".alpha")} == {2.0}
    pipes = []
    for weights in (state, kohya):
        family, comps = load("tiny-flux")
        pipes.append(family.build_pipeline(comps))
        pipes[-1].load_lora_weights(dict(weights))
    torch.testing.assert_close(render(pipes[0]), render(pipes[1]))


@pytest.mark.parametrize("name", TINY)
def test_dreambooth_with_prior_preservation(name, make_recipe, tmp_path):
    class_dir = tmp_path / "class"
    recipe = make_recipe(
        *FAST, "~data.datasets", f"dreambooth.instance_dir={REPO / 'datasets' / 'toy-subject'}",
        "dreambooth.instance_prompt=a sks circle", "dreambooth.class_prompt=a circle",
        "dreambooth.num_class_images=2", f"dreambooth.class_dir={class_dir}",
        "dreambooth.class_generation_steps=2", "sample.guidance=1.0", base=f"builtin:{name}")
    result = run_training(recipe)
    assert sorted(p.name for p in class_dir.glob("*.png")) == ["class-00000.png",
                                                               "class-00001.png"]
    family, comps = load(name)
    pipe = family.build_pipeline(comps)
    base = render(pipe, guidance_scale=1.0)
    pipe.load_lora_weights(str(result.output_dir / adapters.WEIGHT_NAME))
    assert (render(pipe, guidance_scale=1.0) - base).abs().max() > 1e-3


@pytest.mark.parametrize("recipe", ["quickstart-flux.yaml", "quickstart-sd3.yaml"])
def test_quickstart_recipes_train(recipe, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    loaded = load_recipe(f"recipes/{recipe}", ["train.steps=2", "sample.prompts=[]",
                                               f"output.dir={tmp_path / 'out'}",
                                               f"data.cache_dir={tmp_path / 'cache'}"])
    result = run_training(loaded)
    assert (result.output_dir / adapters.WEIGHT_NAME).is_file()
    assert (result.output_dir / adapters.KOHYA_WEIGHT_NAME).is_file()


@pytest.mark.parametrize("name", TINY)
def test_lora_targets_default_feed_forward_and_block_choice(name):
    family, comps = load(name)
    names = [n for n, _ in comps.denoiser.named_modules()]
    assert adapters.denoiser_targets(AdapterSection(), family,
                                     comps.denoiser) == list(family.default_targets)
    for target in ("add_q_proj", "to_add_out", "ff.net.2", "ff_context.net.0.proj"):
        assert any(n.endswith("." + target) for n in names), target
    # The recipes' block-choice example: the joint attention of double/joint block 0 only.
    regex = r"transformer_blocks\.0\.attn\.(to_q|to_k|to_v|to_out\.0|add_[qkv]_proj|to_add_out)"
    adapter = AdapterSection(rank=2, target_regex=regex)
    targets = adapters.denoiser_targets(adapter, family, comps.denoiser)
    comps.denoiser.add_adapter(adapters.lora_config(adapter, targets))
    wrapped = {n.rsplit(".lora_A", 1)[0] for n, _ in comps.denoiser.named_modules()
               if n.endswith(".lora_A")}
    assert wrapped and all(n.startswith("transformer_blocks.0.attn.") for n in wrapped)


@pytest.mark.parametrize("override, message", [
    ("adapter.text_encoder=true", "adapter.text_encoder"),
    ("train.min_snr_gamma=5", "train.min_snr_gamma"),
    ("data.resolution=40", "data.resolution"),
    ("train.max_sequence_length=600", "train.max_sequence_length"),
])
def test_configure_rejects_what_flow_families_cannot_do(override, message, make_recipe):
    recipe = make_recipe(*FAST, override, base="builtin:tiny-flux")
    family, comps = load("tiny-flux")
    with pytest.raises(TunerError, match=message):
        family.configure(comps, recipe)


def test_sequence_length_is_part_of_the_cache_identity(make_recipe):
    family, comps = load("tiny-flux")
    family.configure(comps, make_recipe(*FAST, base="builtin:tiny-flux"))
    _, other = load("tiny-flux")
    family.configure(other, make_recipe(*FAST, "train.max_sequence_length=32",
                                        base="builtin:tiny-flux"))
    assert comps.identity != other.identity
    assert comps.extra["max_sequence_length"] == 16
    assert family.encode_prompts(other, [PROMPT])["prompt_embeds"].shape[1] == 32
