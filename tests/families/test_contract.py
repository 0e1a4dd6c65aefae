"""The family contract: one battery that every `builtin:tiny-*` family passes.

Parametrized over `tuner.builtins.tiny_names()`, so a new family's tiny builtin joins by being
in the builtin table. Each family trains a few steps at toy size (module-scoped, shared by the
tests below) and must show:

- only LoRA weights move (every other tensor equals a fresh load, bit for bit), and they do move;
- the adapter at scale 0 renders exactly the base pipeline's image;
- the diffusers file, loaded into a fresh base by `inference.pipelines.load_adapters`, renders
  exactly what the trained in-memory model renders;
- the kohya file and the file ComfyUI is pointed at (`spec.export.comfy_file`) render what the
  diffusers file renders: for attention targets, with text-encoder LoRA where the family's
  loader reads it back (`spec.text_encoder_lora`), and with conv targets on UNet families;
- DreamBooth with prior preservation runs (class images made, each step doubled);
- resume is bitwise: resumed from the half-way checkpoint, the adapter equals the
  uninterrupted run's;
- `tuner sample` loads the diffusers file and the kohya file and writes PNGs.

Editing families (`spec.controls`) train on the paired set datasets/toy-hollow and render
with a reference image; DreamBooth folders have no references, so they refuse it instead.

Family-specific behaviour (SDXL time_ids, pooled embeddings, predict == the pipeline's call,
drop_t5, VAE dtypes, ...) stays in the per-family test files.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from tuner import builtins, families
from tuner.adapters.lora import KOHYA_WEIGHT_NAME, WEIGHT_NAME
from tuner.cli import main
from tuner.inference.pipelines import load_adapters, load_base, lora_specs
from tuner.inference.render import lora_scale, pipeline_modules
from tuner.recipe import ModelSection, apply_overrides, validate_recipe
from tuner.training.run import run_training

REPO = Path(__file__).resolve().parents[2]
PROMPT = "a red circle on a blue background, zebrastyle"
STEPS = 4  # with a checkpoint at STEPS // 2, which the resume test starts from
CONV_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"]
FILES = {"diffusers": WEIGHT_NAME, "kohya": KOHYA_WEIGHT_NAME}


def spec_of(name: str):
    return families.get(builtins.lookup(name).family).spec


# Builtins that share every code path with another one but one pipeline switch run the
# battery in the slow tier (Edit Plus: tiny-qwen-image-edit's modules under its Plus pipeline,
# whose own behaviour, several references, is tested in test_qwen_image_edit.py).
SLOW_BATTERY = {"tiny-qwen-image-edit-plus"}


def battery(names) -> list:
    return [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_BATTERY else n for n in names]


NAMES = builtins.tiny_names()


@dataclass(frozen=True)
class Variant:
    """What a training run puts LoRA on."""

    label: str
    overrides: tuple[str, ...]


def variants(name: str) -> list[Variant]:
    spec = spec_of(name)
    found = [Variant("attention", ())]
    if spec.text_encoder_lora:
        found.append(Variant("text-encoder", ("adapter.text_encoder=true",)))
    if spec.denoiser == "unet":
        found.append(Variant("conv", (f"adapter.targets=[{', '.join(CONV_TARGETS)}]",)))
    return found


CASES = [
    pytest.param(
        name,
        v,
        id=f"{name}-{v.label}",
        marks=[pytest.mark.slow] if name in SLOW_BATTERY else [],
    )
    for name in NAMES
    for v in variants(name)
]


def size(name: str) -> int:
    # Flow families need multiples of VAE x8 times 2x2 patches (families/mmdit.check_sizes);
    # the tiny UNets want 64 px for their down blocks.
    return 32 if spec_of(name).objective == "flow" else 64


HOLLOW = REPO / "datasets" / "toy-hollow"
CONTROL = HOLLOW / "controls" / "000.png"


def render_settings(name: str) -> dict:
    settings = {"num_inference_steps": 2, "width": size(name), "height": size(name)}
    if spec_of(name).reference_area:  # the pipeline resizes the reference by its own rule
        settings.update(image=[Image.open(CONTROL).convert("RGB")])
    elif spec_of(name).controls:  # the reference at the output size, as tuner sample gives it
        reference = Image.open(CONTROL).convert("RGB").resize((size(name), size(name)))
        settings.update(image=[reference], _auto_resize=False, max_area=size(name) ** 2)
    if spec_of(name).objective == "flow":
        return {**settings, "guidance_scale": 1.0, "max_sequence_length": 16}
    return {**settings, "guidance_scale": 5.0}


def dataset_of(name: str, tmp: Path) -> dict:
    if spec_of(name).reference_area:
        # Qwen-Image-Edit encodes each reference at ~1024^2 whatever the output size: 2 of the
        # pairs keep the battery's run short.
        for folder, pattern in (("targets", "00[01].*"), ("controls", "00[01].png")):
            (tmp / "pairs" / folder).mkdir(parents=True, exist_ok=True)
            for file in (HOLLOW / folder).glob(pattern):
                shutil.copy(file, tmp / "pairs" / folder)
        return {
            "path": str(tmp / "pairs" / "targets"),
            "control_dir": str(tmp / "pairs" / "controls"),
        }
    if spec_of(name).controls:
        return {"path": str(HOLLOW / "targets"), "control_dir": str(HOLLOW / "controls")}
    return {"path": str(REPO / "datasets" / "toy-stripes")}


def recipe_for(name: str, tmp: Path, *overrides: str):
    raw = {
        "model": {"path": f"builtin:{name}"},
        # alpha != rank: the LoRA scale must survive every file format
        "adapter": {"rank": 4, "alpha": 2},
        "data": {
            "datasets": [dataset_of(name, tmp)],
            "resolution": size(name),
            "cache_dir": str(tmp / "cache"),
        },
        "train": {"steps": STEPS, "batch_size": 2, "lr": 1e-2, "seed": 0},
        "sample": {"prompts": []},
        "output": {"dir": str(tmp / "out"), "save_every": STEPS // 2, "keep": 10},
        "log": {"every": 1},
    }
    if spec_of(name).objective == "flow" and not spec_of(name).prompt_reads_references:
        raw["train"]["max_sequence_length"] = 16  # (VL prompts with a reference are not cut)
    return validate_recipe(apply_overrides(raw, list(overrides)))


class Runs:
    """Training runs made on first use, one per (family, variant), kept for the module."""

    def __init__(self, factory):
        self.factory, self.done = factory, {}

    def get(self, name: str, variant: Variant):
        key = (name, variant.label)
        if key not in self.done:
            tmp = self.factory.mktemp(f"{name}-{variant.label}")
            recipe = recipe_for(name, tmp, *variant.overrides)
            self.done[key] = (recipe, run_training(recipe))
        return self.done[key]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    return Runs(tmp_path_factory)


def attention(name: str) -> Variant:
    return variants(name)[0]


def fresh(name: str):
    family, pipe = load_base(f"builtin:{name}")
    return pipe


def with_files(name: str, *files: Path):
    family, pipe = load_base(f"builtin:{name}")
    load_adapters(pipe, family, lora_specs([str(f) for f in files]))
    return pipe


@torch.no_grad()
def render(name: str, pipe, scale: float = 1.0) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    with lora_scale(pipeline_modules(pipe), scale):
        return pipe(
            prompt=[PROMPT],
            generator=torch.Generator().manual_seed(0),
            output_type="np",
            **render_settings(name),
        ).images


def in_memory(result):
    pipe = result.family.build_pipeline(result.comps)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def base_weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Non-LoRA tensors under their pre-injection names."""
    return {
        key.replace(".base_layer", ""): value
        for key, value in module.state_dict().items()
        if "lora_" not in key
    }


# --- training touches LoRA only ----------------------------------------------------------


@pytest.mark.parametrize("name, variant", CASES)
def test_only_lora_weights_change(name, variant, runs):
    _, result = runs.get(name, variant)
    comps = result.comps
    reference = result.family.load(ModelSection(path=f"builtin:{name}"), torch.float32)
    trained, frozen = comps.modules(), reference.modules()
    assert trained.keys() == frozen.keys()
    for part, module in trained.items():
        expected, actual = frozen[part].state_dict(), base_weights(module)
        assert actual.keys() == expected.keys(), part
        moved = [k for k in expected if not torch.equal(actual[k], expected[k])]
        assert not moved, f"{part}: base weights moved: {moved[:3]}"
    assert set(result.trained) == (
        {spec_of(name).denoiser, *comps.text_encoders}
        if "adapter.text_encoder=true" in variant.overrides
        else {spec_of(name).denoiser}
    )
    for part, module in result.trained.items():
        lora_b = [v for k, v in module.state_dict().items() if "lora_B" in k]
        assert lora_b and any(v.abs().max() > 0 for v in lora_b), f"{part}: LoRA did not train"


# --- rendering: scale 0, save -> load, other file formats ------------------------------------


@pytest.mark.parametrize("name", battery(NAMES))
def test_scale_zero_renders_the_base_model(name, runs):
    _, result = runs.get(name, attention(name))
    pipe = in_memory(result)
    base = render(name, fresh(name))
    np.testing.assert_array_equal(render(name, pipe, scale=0.0), base)
    assert np.abs(render(name, pipe) - base).max() > 1e-3  # and the adapter does matter


@pytest.mark.parametrize("name, variant", CASES)
def test_diffusers_file_renders_the_trained_model(name, variant, runs):
    _, result = runs.get(name, variant)
    loaded = render(name, with_files(name, result.output_dir / WEIGHT_NAME))
    np.testing.assert_array_equal(loaded, render(name, in_memory(result)))


@pytest.mark.parametrize("name, variant", CASES)
def test_kohya_and_comfy_files_render_like_the_diffusers_file(name, variant, runs):
    _, result = runs.get(name, variant)
    spec, out = spec_of(name), result.output_dir
    architecture = f"{result.comps.architecture or spec.export.modelspec_architecture}/lora"
    for file in FILES.values():  # both files say what they are and which base they need
        with safe_open(str(out / file), framework="pt") as handle:
            meta = handle.metadata()
        assert meta["modelspec.architecture"] == architecture, file
        assert (meta["tuner_family"], meta["tuner_base_model"]) == (spec.name, f"builtin:{name}")
    kohya = load_file(str(out / KOHYA_WEIGHT_NAME))
    if spec.export.comfy_layout is None:  # kohya names (a family's own layout: its own tests)
        prefixes = {spec.export.kohya_prefixes[part] + "_" for part in result.trained}
        assert all(key.startswith(tuple(prefixes)) for key in kohya)
        assert all(any(key.startswith(p) for key in kohya) for p in prefixes)  # every part
        assert {float(v) for k, v in kohya.items() if k.endswith(".alpha")} == {2.0}  # alpha
    expected = render(name, with_files(name, out / WEIGHT_NAME))
    comfy = FILES[spec.export.comfy_file]
    for file in dict.fromkeys([KOHYA_WEIGHT_NAME, comfy]):
        np.testing.assert_array_equal(render(name, with_files(name, out / file)), expected, file)


# --- DreamBooth, resume, tuner sample --------------------------------------------------------


@pytest.mark.parametrize("name", battery(n for n in NAMES if not spec_of(n).controls))
def test_dreambooth_with_prior_preservation(name, tmp_path, monkeypatch):
    recipe = recipe_for(
        name,
        tmp_path,
        "~data.datasets",
        f"dreambooth.instance_dir={REPO / 'datasets' / 'toy-subject'}",
        "dreambooth.instance_prompt=a sks circle",
        "dreambooth.class_prompt=a circle",
        f"dreambooth.class_dir={tmp_path / 'class'}",
        "dreambooth.num_class_images=2",
        "dreambooth.class_generation_steps=2",
        "dreambooth.with_prior_preservation=true",
        "train.steps=3",
        "train.batch_size=1",
        "output.save_every=0",
    )
    batch_sizes = []

    def spy(module, args, kwargs):
        if torch.is_grad_enabled():  # training steps, not class-image rendering
            latents = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
            # Z-Image's transformer takes a list of per-sample latents.
            batch_sizes.append(len(latents) if isinstance(latents, list) else latents.shape[0])

    family_class = type(families.get(spec_of(name).name))
    original = family_class.load

    def load(self, model, dtype):
        comps = original(self, model, dtype)
        comps.denoiser.register_forward_pre_hook(spy, with_kwargs=True)
        return comps

    monkeypatch.setattr(family_class, "load", load)
    result = run_training(recipe)
    monkeypatch.undo()
    class_images = sorted((tmp_path / "class").glob("class-*.png"))
    assert [p.name for p in class_images] == ["class-00000.png", "class-00001.png"]
    assert all(p.with_suffix(".txt").read_text() == "a circle" for p in class_images)
    assert batch_sizes == [2, 2, 2]  # each step: the instance image and its prior partner
    base = render(name, fresh(name))
    tuned = render(name, with_files(name, result.output_dir / WEIGHT_NAME))
    assert np.abs(tuned - base).max() > 1e-3


@pytest.mark.parametrize("name", battery(NAMES))
def test_resume_from_the_halfway_checkpoint_is_bitwise(name, runs, tmp_path):
    recipe, result = runs.get(name, attention(name))
    halfway = result.output_dir / "checkpoints" / f"step-{STEPS // 2:06d}"
    assert halfway.is_dir()
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(halfway, resumed_dir / "checkpoints" / halfway.name)
    output = recipe.output.model_copy(update={"dir": str(resumed_dir)})
    train = recipe.train.model_copy(update={"resume": "latest"})
    resumed = run_training(recipe.model_copy(update={"output": output, "train": train}))
    assert resumed.steps == STEPS
    expected = load_file(str(result.output_dir / WEIGHT_NAME))
    got = load_file(str(resumed_dir / WEIGHT_NAME))
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    at_halfway = load_file(str(halfway / WEIGHT_NAME))
    assert any(not torch.equal(at_halfway[k], expected[k]) for k in expected)  # steps were run


@pytest.mark.parametrize("name", battery(NAMES))
def test_tuner_sample_loads_both_files_and_writes_pngs(name, runs, tmp_path):
    _, result = runs.get(name, attention(name))
    side = size(name)
    written = {}
    for label, file in FILES.items():
        out = tmp_path / label
        argv = ["sample", f"builtin:{name}", "--lora", str(result.output_dir / file)]
        argv += ["--prompt", PROMPT, "--seed", "0", "--steps", "2", "--out", str(out)]
        argv += ["--width", str(side), "--height", str(side), "--device", "cpu"]
        if spec_of(name).controls:
            argv += ["--control", str(CONTROL)]
        assert main(argv) == 0, label
        pngs = sorted(out.glob("*.png"))
        assert len(pngs) == 1, label
        with Image.open(pngs[0]) as image:
            assert image.size == (side, side)
            assert "tuner" in image.info  # the settings travel inside the PNG
            written[label] = np.asarray(image.convert("RGB"))
    np.testing.assert_array_equal(written["kohya"], written["diffusers"])


@pytest.mark.parametrize("name", battery(n for n in NAMES if spec_of(n).controls))
def test_editing_families_refuse_dreambooth_folders(name, tmp_path):
    from tuner.errors import TunerError

    recipe = recipe_for(
        name,
        tmp_path,
        f"dreambooth.instance_dir={REPO / 'datasets' / 'toy-subject'}",
        "dreambooth.instance_prompt=a sks circle",
        "dreambooth.with_prior_preservation=false",
    )
    with pytest.raises(TunerError, match="dreambooth: .* pairs"):
        families.get(spec_of(name).name).validate(recipe)
