"""The flux-kontext family on builtin:tiny-flux-kontext: predict equals FluxKontextPipeline's own
transformer call with the reference tokens (packing, ids marked 1, the reference encoded as the
pipeline encodes it), the loss sees the target tokens only, and a trained adapter loads through
the pipeline's load_lora_weights with every key placed and changes the edit."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tuner import families
from tuner.adapters.lora import WEIGHT_NAME
from tuner.data.items import pixels_of
from tuner.errors import TunerError
from tuner.families import mmdit
from tuner.inference.render import lora_scale, pipeline_modules
from tuner.recipe import ModelSection, apply_overrides, validate_recipe
from tuner.training.run import run_training

REPO = Path(__file__).resolve().parents[2]
HOLLOW = REPO / "datasets" / "toy-hollow"
BASE = "builtin:tiny-flux-kontext"
PROMPT = "make it hollow"


def load():
    family = families.get("flux-kontext")
    comps = family.load(ModelSection(path=BASE), torch.float32)
    comps.sequence_length = 16
    return family, comps


def reference(width: int, height: int) -> Image.Image:
    return Image.open(HOLLOW / "controls" / "000.png").convert("RGB").resize((width, height))


def render(pipe, width=48, height=32, scale=1.0) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    with lora_scale(pipeline_modules(pipe), scale):
        return pipe(
            image=reference(width, height),
            prompt=PROMPT,
            num_inference_steps=2,
            width=width,
            height=height,
            max_area=width * height,
            _auto_resize=False,
            max_sequence_length=16,
            guidance_scale=2.5,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
        ).images


def test_predict_is_the_pipelines_transformer_call():
    """At a non-square size: the target tokens, then the reference's with ids (1, y, x); the
    reference latents from encode_controls equal the pipeline's own VAE encoding."""
    family, comps = load()
    seen = {}

    def hook(module, args, call_kwargs, output):
        seen.setdefault("kwargs", call_kwargs)
        seen.setdefault("output", output[0])

    pipe = family.build_pipeline(comps)
    handle = pipe.transformer.register_forward_hook(hook, with_kwargs=True)
    try:
        render(pipe)
    finally:
        handle.remove()
    call = seen["kwargs"]
    scale = mmdit.vae_scale(comps)
    h, w = 32 // scale, 48 // scale
    tokens = (h // 2) * (w // 2)
    hidden = call["hidden_states"]
    assert hidden.shape[1] == 2 * tokens  # target + reference, same size
    assert torch.all(call["img_ids"][tokens:, 0] == 1) and torch.all(
        call["img_ids"][:tokens, 0] == 0
    )
    pixels = pixels_of(reference(48, 32))[None]
    control = family.encode_controls(comps, pixels)
    noisy = pipe._unpack_latents(hidden[:, :tokens], 32, 48, pipe.vae_scale_factor)
    cond = {
        "prompt_embeds": call["encoder_hidden_states"],
        "pooled_prompt_embeds": call["pooled_projections"],
    }
    comps.guidance = float(call["guidance"][0])
    with torch.no_grad():
        ours = family.predict(
            comps, noisy, call["timestep"] * 1000, cond, {"control_latents": [control]}
        )
        from_pixels = family.predict(
            comps, noisy, call["timestep"] * 1000, cond, {"control_pixels": [pixels]}
        )
    theirs = pipe._unpack_latents(seen["output"][:, :tokens], 32, 48, pipe.vae_scale_factor)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    torch.testing.assert_close(from_pixels, ours, rtol=0, atol=0)


def test_loss_sees_the_target_tokens_only():
    """Whatever the transformer outputs at the reference positions, predict returns the same."""
    family, comps = load()
    noisy, control = torch.randn(1, 16, 4, 4), torch.randn(1, 16, 4, 4)
    cond = family.encode_prompts(comps, [PROMPT])
    batch = {"control_latents": [control]}
    with torch.no_grad():
        plain = family.predict(comps, noisy, torch.tensor([500.0]), cond, batch)

        def scramble(module, args, kwargs, output):
            out = output[0].clone()
            out[:, 4:] = 1e6  # the 4 target tokens come first
            return (out,)

        handle = comps.denoiser.register_forward_hook(scramble, with_kwargs=True)
        try:
            scrambled = family.predict(comps, noisy, torch.tensor([500.0]), cond, batch)
        finally:
            handle.remove()
        changed = family.predict(
            comps, noisy, torch.tensor([500.0]), cond, {"control_latents": [control + 1]}
        )
    assert plain.shape == noisy.shape
    torch.testing.assert_close(scrambled, plain, rtol=0, atol=0)
    assert (changed - plain).abs().max() > 1e-4  # the reference does condition the target


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("kontext")
    raw = {
        "model": {"path": BASE},
        "adapter": {"rank": 4, "alpha": 2},
        "data": {
            "datasets": [
                {"path": str(HOLLOW / "targets"), "control_dir": str(HOLLOW / "controls")}
            ],
            "resolution": 32,
            "cache_dir": str(tmp / "cache"),
        },
        "train": {"steps": 2, "batch_size": 2, "lr": 1e-2, "max_sequence_length": 16},
        "sample": {"prompts": []},
        "output": {"dir": str(tmp / "out")},
    }
    return run_training(validate_recipe(raw))


def test_load_lora_weights_places_every_key_and_changes_the_edit(trained):
    from diffusers import FluxKontextPipeline

    family, comps = load()
    pipe = family.build_pipeline(comps)
    assert isinstance(pipe, FluxKontextPipeline)
    base = render(pipe)
    pipe.load_lora_weights(str(trained.output_dir), weight_name=WEIGHT_NAME, adapter_name="edit")
    from peft.utils import get_peft_model_state_dict

    placed = get_peft_model_state_dict(pipe.transformer, adapter_name="edit")
    trained_keys = {k for k in get_peft_model_state_dict(trained.comps.denoiser)}
    assert placed.keys() == trained_keys  # nothing missing, nothing unexpected
    np.testing.assert_array_equal(render(pipe, scale=0.0), base)  # scale 0 == base, with a control
    assert np.abs(render(pipe) - base).max() > 1e-3


def test_refusals():
    def recipe(model: str, entry: dict):
        raw = {
            "model": {"path": model},
            "data": {"datasets": [entry], "resolution": 32},
            "train": {"steps": 1},
            "output": {"dir": "unused"},
        }
        return validate_recipe(apply_overrides(raw, []))

    paired = {"path": str(HOLLOW / "targets"), "control_dir": str(HOLLOW / "controls")}
    with pytest.raises(TunerError, match=r"data.datasets.0.control_dir: flux does not take"):
        families.get("flux").validate(recipe("builtin:tiny-flux", paired))
    with pytest.raises(TunerError, match=r"data.datasets.0: flux-kontext trains on"):
        families.get("flux-kontext").validate(recipe(BASE, {"path": str(HOLLOW / "targets")}))


def test_sample_refuses_a_missing_or_stray_control(trained, tmp_path, capsys):
    from tuner.cli import main

    file = str(trained.output_dir / WEIGHT_NAME)
    argv = ["sample", "--lora", file, "--prompt", PROMPT, "--steps", "1", "--out", str(tmp_path)]
    assert main([*argv, "--device", "cpu"]) != 0
    assert "flux-kontext edits a reference image; give --control" in capsys.readouterr().err
    control = str(HOLLOW / "controls" / "000.png")
    assert main(["sample", "builtin:tiny-flux", "--prompt", PROMPT, "--control", control,
                 "--steps", "1", "--out", str(tmp_path), "--device", "cpu"]) != 0  # fmt: skip
    assert "--control: flux does not take reference images" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.png"))


@pytest.mark.slow
def test_quickstart_trains_and_samples_each_file_with_a_control(tmp_path, monkeypatch):
    """The shipped quickstart (its grid: reference | base edit | LoRA edit), then `tuner
    sample --control` with the diffusers and the kohya file: the same edit from both."""
    from tuner.adapters.lora import KOHYA_WEIGHT_NAME
    from tuner.cli import main
    from tuner.recipe import load_recipe

    monkeypatch.chdir(REPO)
    overrides = [
        "train.steps=4",
        f"output.dir={tmp_path / 'out'}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "sample.steps=2",
    ]
    result = run_training(load_recipe("recipes/quickstart-flux-kontext.yaml", overrides))
    grid = json.loads((result.output_dir / "samples" / "step-000004.json").read_text())
    assert [cell["lines"][-1] for cell in grid["cells"][:3]] == [
        "reference",
        "base edit",
        "LoRA edit x1",
    ]
    control = str(HOLLOW / "controls" / "003.png")
    images = {}
    for file in (WEIGHT_NAME, KOHYA_WEIGHT_NAME):
        out = tmp_path / file
        argv = ["sample", "--lora", str(result.output_dir / file), "--prompt", PROMPT]
        argv += ["--control", control, "--width", "64", "--height", "64", "--steps", "2"]
        assert main([*argv, "--out", str(out), "--device", "cpu"]) == 0
        (png,) = out.glob("*.png")
        with Image.open(png) as image:
            assert json.loads(image.info["tuner"])["control"] == control
            images[file] = np.asarray(image.convert("RGB"))
    np.testing.assert_array_equal(images[WEIGHT_NAME], images[KOHYA_WEIGHT_NAME])
