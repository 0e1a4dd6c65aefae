"""The qwen-image-edit family on builtin:tiny-qwen-image-edit(-plus): predict and the cached
prompt equal QwenImageEdit(Plus)Pipeline's own transformer call (the reference resized by the
pipeline's rule and encoded as it encodes it, the VL prompt that read the reference), several
references for Edit Plus, the loss on the target tokens only, prompts cached per (caption,
references), and a trained adapter loads through the pipeline's load_lora_weights with every
key placed and changes the edit."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit as edit
from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as edit_plus
from PIL import Image

from tuner import families
from tuner.adapters.lora import WEIGHT_NAME
from tuner.data.items import pixels_of
from tuner.data.pairs import Partner, prepare_reference, reference_size
from tuner.errors import TunerError
from tuner.inference.render import lora_scale, pipeline_modules
from tuner.recipe import ModelSection, apply_overrides, validate_recipe
from tuner.training.run import run_training

REPO = Path(__file__).resolve().parents[2]
HOLLOW = REPO / "datasets" / "toy-hollow"
EDIT, PLUS = "builtin:tiny-qwen-image-edit", "builtin:tiny-qwen-image-edit-plus"
PROMPT = "make it hollow"


def load(path: str = EDIT):
    family = families.get("qwen-image-edit")
    return family, family.load(ModelSection(path=path), torch.float32)


def control(index: int = 0, size: tuple[int, int] | None = None) -> Image.Image:
    image = Image.open(HOLLOW / "controls" / f"{index:03d}.png").convert("RGB")
    return image.resize(size) if size else image


def partner(image: Image.Image) -> Partner:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return Partner(buffer.getvalue(), "test", image.size)


def render(pipe, images, width=32, height=32, scale=1.0) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    with lora_scale(pipeline_modules(pipe), scale):
        return pipe(
            image=images,
            prompt=PROMPT,
            num_inference_steps=2,
            width=width,
            height=height,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
        ).images


def test_reference_size_is_the_pipelines_rule():
    for size in [(64, 64), (48, 32), (1000, 333), (333, 1000), (1920, 1080)]:
        ratio = size[0] / size[1]
        assert reference_size(1024 * 1024, size) == edit.calculate_dimensions(1024**2, ratio)[:2]
        assert reference_size(384 * 384, size) == edit_plus.calculate_dimensions(384**2, ratio)


def first_transformer_call(pipe, images) -> dict:
    seen = {}

    def hook(module, args, call_kwargs, output):
        seen.setdefault("kwargs", call_kwargs)
        seen.setdefault("output", output[0])

    handle = pipe.transformer.register_forward_hook(hook, with_kwargs=True)
    try:
        render(pipe, images, width=48, height=32)
    finally:
        handle.remove()
    return seen


@pytest.mark.parametrize(
    "path, count",
    [(EDIT, 1), pytest.param(PLUS, 2, marks=pytest.mark.slow)],  # Plus: two ~1024^2 references
)
def test_predict_and_prompt_are_the_pipelines_transformer_call(path, count):
    """Output 48x32 from non-square references: the target tokens, then each reference's at
    its ~1024^2 size; our reference latents, cached prompt and predict equal the pipeline's."""
    family, comps = load(path)
    pipe = family.build_pipeline(comps)
    references = [control(0, (48, 32)), control(1, (40, 56))][:count]
    seen = first_transformer_call(pipe, references if count > 1 else references[0])
    call = seen["kwargs"]
    shapes = [(1, 2, 3)]  # 32x48 px / VAE x8 / 2x2 patches
    latents = []
    for image in references:
        pixels = pixels_of(prepare_reference(partner(image), 1024 * 1024, flip=False))[None]
        latents.append(family.encode_controls(comps, pixels))
        shapes.append((1, pixels.shape[-2] // 16, pixels.shape[-1] // 16))
    assert call["img_shapes"] == [shapes]
    tokens = 6
    hidden = call["hidden_states"]
    for index, latent in enumerate(latents):  # each reference's tokens, as the pipeline packs
        start = tokens + sum(h * w for _, h, w in shapes[1 : index + 1])
        packed = pipe._pack_latents(latent, 1, 16, *latent.shape[-2:])
        torch.testing.assert_close(
            hidden[:, start : start + packed.shape[1]], packed, atol=1e-5, rtol=0
        )
    cond = family.encode_prompts(comps, [PROMPT], references=[references])
    torch.testing.assert_close(cond["prompt_embeds"], call["encoder_hidden_states"], atol=0, rtol=0)
    assert call["encoder_hidden_states_mask"] is None and bool(cond["prompt_embeds_mask"].all())
    noisy = pipe._unpack_latents(hidden[:, :tokens], 32, 48, pipe.vae_scale_factor)[:, :, 0]
    with torch.no_grad():
        ours = family.predict(
            comps, noisy, call["timestep"] * 1000, cond, {"control_latents": latents}
        )
    theirs = pipe._unpack_latents(seen["output"][:, :tokens], 32, 48, pipe.vae_scale_factor)
    torch.testing.assert_close(ours, theirs[:, :, 0], rtol=0, atol=1e-5)


def test_prompts_read_the_reference_and_the_loss_sees_the_target_tokens_only():
    family, comps = load()
    one, other = control(0), control(5)
    first = family.encode_prompts(comps, [PROMPT, PROMPT], references=[[one], [other]])
    alone = family.encode_prompts(comps, [PROMPT], references=[[other]])
    assert (first["prompt_embeds"][0] - first["prompt_embeds"][1]).abs().max() > 1e-4
    torch.testing.assert_close(first["prompt_embeds"][1:], alone["prompt_embeds"], atol=0, rtol=0)
    noisy, reference = torch.randn(1, 16, 4, 4), torch.randn(1, 16, 8, 8)
    cond = {k: v[:1] for k, v in first.items()}
    batch = {"control_latents": [reference]}
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
            comps, noisy, torch.tensor([500.0]), cond, {"control_latents": [reference + 1]}
        )
    torch.testing.assert_close(scrambled, plain, rtol=0, atol=0)
    assert (changed - plain).abs().max() > 1e-4  # the reference does condition the target


def pairs(tmp_path: Path, count: int = 2) -> tuple[Path, Path]:
    targets, controls = tmp_path / "targets", tmp_path / "controls"
    targets.mkdir(parents=True)
    controls.mkdir(parents=True)
    for i in range(count):
        for ext in ("png", "txt"):
            shutil.copy(HOLLOW / "targets" / f"{i:03d}.{ext}", targets)
        shutil.copy(HOLLOW / "controls" / f"{i:03d}.png", controls)
    return targets, controls


def raw_recipe(tmp: Path, model: str = EDIT, entry: dict | None = None) -> dict:
    if entry is None:
        targets, controls = pairs(tmp)
        entry = {"path": str(targets), "control_dir": str(controls)}
    return {
        "model": {"path": model},
        "adapter": {"rank": 4, "alpha": 2},
        "data": {"datasets": [entry], "resolution": 32, "cache_dir": str(tmp / "cache")},
        "train": {"steps": 2, "batch_size": 2, "lr": 1e-2},
        "sample": {"prompts": []},
        "output": {"dir": str(tmp / "out")},
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    recipe = validate_recipe(raw_recipe(tmp_path_factory.mktemp("edit")))
    result = run_training(recipe)
    result.recipe = recipe  # for the cache test
    return result


def test_cached_prompt_is_the_prompt_with_its_reference(trained):
    """The training batch's conditioning is the prompt encoded with that pair's reference."""
    from tuner.data.dataset import TrainDataset
    from tuner.data.items import collect_items
    from tuner.training.run import cache_plan

    recipe = trained.recipe
    family, comps = trained.family, trained.comps

    items, _ = collect_items(recipe.data)
    sample = TrainDataset(items, recipe.data, cache_plan(recipe, comps), seed=0)[(1, 0, 0)][0]
    expected = family.encode_prompts(comps, [items[1].caption], references=[[control(1)]])
    torch.testing.assert_close(sample["cond"]["prompt_embeds"], expected["prompt_embeds"][0])


def test_load_lora_weights_places_every_key_and_changes_the_edit(trained):
    from diffusers import QwenImageEditPipeline
    from peft.utils import get_peft_model_state_dict

    family, comps = load()
    pipe = family.build_pipeline(comps)
    assert isinstance(pipe, QwenImageEditPipeline)
    base = render(pipe, control(0))
    pipe.load_lora_weights(str(trained.output_dir), weight_name=WEIGHT_NAME, adapter_name="edit")
    placed = get_peft_model_state_dict(pipe.transformer, adapter_name="edit")
    assert placed.keys() == set(get_peft_model_state_dict(trained.comps.denoiser))
    np.testing.assert_array_equal(render(pipe, control(0), scale=0.0), base)  # scale 0 == base
    assert np.abs(render(pipe, control(0)) - base).max() > 1e-3


def test_refusals(tmp_path):
    family = families.get("qwen-image-edit")
    for override, message in [
        ("train.max_sequence_length=64", "train.max_sequence_length: the Qwen-Image-Edit"),
        ("train.guidance=3.5", "train.guidance: Qwen-Image-Edit embeds no guidance"),
        ("~data.datasets.0.control_dir", "data.datasets.0: qwen-image-edit trains on"),
    ]:
        recipe = validate_recipe(apply_overrides(raw_recipe(tmp_path / override), [override]))
        with pytest.raises(TunerError, match=message):
            family.validate(recipe)


def two_reference_set(tmp_path: Path) -> dict:
    folder, refs = pairs(tmp_path)
    rows = [
        {"file_name": f"{i:03d}.png", "text": PROMPT, "refs": [f"../controls/{i:03d}.png"] * 2}
        for i in range(2)
    ]
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return {"path": str(folder), "control_column": "refs"}


def test_edit_refuses_two_references(tmp_path):
    entry = two_reference_set(tmp_path)
    with pytest.raises(TunerError, match=r"2 reference images, but qwen-image-edit reads 1"):
        run_training(validate_recipe(raw_recipe(tmp_path / "edit", EDIT, entry)))
    out = tmp_path / "edit" / "out"
    assert not out.exists() or not any(out.iterdir())  # refused before anything was written


@pytest.mark.slow  # two steps with two ~1024^2 references each
def test_edit_plus_trains_on_two_references(tmp_path):
    entry = two_reference_set(tmp_path)
    seen = []

    family_class = type(families.get("qwen-image-edit"))
    original = family_class.predict

    def spy(self, comps, noisy, timesteps, cond, batch):
        seen.append(len(batch["control_latents"]))
        return original(self, comps, noisy, timesteps, cond, batch)

    family_class.predict = spy
    try:
        result = run_training(validate_recipe(raw_recipe(tmp_path / "plus", PLUS, entry)))
    finally:
        family_class.predict = original
    assert result.comps.architecture == "qwen-image-edit-plus" and seen == [2, 2]


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
    result = run_training(load_recipe("recipes/quickstart-qwen-image-edit.yaml", overrides))
    grid = json.loads((result.output_dir / "samples" / "step-000004.json").read_text())
    assert [cell["lines"][-1] for cell in grid["cells"][:3]] == [
        "reference",
        "base edit",
        "LoRA edit x1",
    ]
    reference = str(HOLLOW / "controls" / "003.png")
    images = {}
    for file in (WEIGHT_NAME, KOHYA_WEIGHT_NAME):
        out = tmp_path / file
        argv = ["sample", "--lora", str(result.output_dir / file), "--prompt", PROMPT]
        argv += ["--control", reference, "--width", "64", "--height", "64", "--steps", "2"]
        assert main([*argv, "--out", str(out), "--device", "cpu"]) == 0
        (png,) = out.glob("*.png")
        with Image.open(png) as image:
            assert json.loads(image.info["tuner"])["control"] == reference
            images[file] = np.asarray(image.convert("RGB"))
    np.testing.assert_array_equal(images[WEIGHT_NAME], images[KOHYA_WEIGHT_NAME])


@pytest.mark.slow  # two grids of 1024^2-reference edits
def test_grid_prompts_with_their_references_are_pre_encoded(tmp_path):
    """With the VL encoder off the device (text_encoder_offload), the grid's encode_prompt
    calls, which carry the reference images, are found again by the images' content: the
    grid renders with no encoder forward, the same pixels as with the encoder live."""
    from dataclasses import replace

    from tuner.families import text_encoders
    from tuner.inference import grids

    raw = raw_recipe(tmp_path)
    raw["model"]["text_encoder_offload"] = True
    raw["sample"] = {
        "prompts": [PROMPT, PROMPT],
        "controls": [str(HOLLOW / "controls" / "000.png"), str(HOLLOW / "controls" / "001.png")],
        "steps": 2,
    }
    recipe = validate_recipe(raw)
    family, comps = load()
    comps = text_encoders.mark(family.configure(comps, recipe), recipe.model)
    grids.pre_encode_sample_prompts(recipe, family, comps, "cpu")
    assert len(comps.encoded_prompts) >= 2  # one per (prompt, reference)
    calls = []
    handles = [
        e.register_forward_hook(lambda *_: calls.append(1) and None)
        for e in comps.text_encoders.values()
    ]

    class Cpu:
        device = torch.device("cpu")
        trackers = ()

    out = recipe.output.dir
    path = grids.training_grid(recipe, out, family, comps, 1, Cpu())
    for handle in handles:
        handle.remove()
    assert calls == []
    kept = np.asarray(Image.open(path))
    live = replace(comps, text_encoder_offload=False, encoded_prompts={})
    grids.training_grid(recipe, out, family, live, 1, Cpu())
    assert np.array_equal(kept, np.asarray(Image.open(path)))
