"""Every adapter file training writes loads back at the trained strength, for every family and
target set: the kohya file through tuner's loader (every module matched, the diffusers file's
images), `tuner sample` and `tuner grid` on it, and the file the model card names for ComfyUI
applied the way ComfyUI applies LoRA (an independent re-implementation of its rule, below)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file

from tuner.adapters import lora
from tuner.cli import main
from tuner.errors import TunerError
from tuner.inference.pipelines import count_lora_layers, load_adapters, load_base, lora_specs
from tuner.recipe import apply_overrides, validate_recipe
from tuner.training.run import run_training

REPO = Path(__file__).resolve().parents[2]
UNET_CONV = "adapter.targets=[to_q,to_k,to_v,to_out.0,conv1,conv2,conv_shortcut]"
TARGETS = {
    "attention": (),
    "conv": (UNET_CONV,),
    "text_encoder": ("adapter.text_encoder=true",),
}
CASES = [
    ("toy", "conv"),  # the quickstart's model and targets
    *[(f, t) for f in ("tiny-sd15", "tiny-sd2", "tiny-sdxl") for t in TARGETS],
    ("tiny-sd3", "attention"),
    ("tiny-flux", "attention"),
]
FLOW = ("tiny-sd3", "tiny-flux")
PROMPT = "a red circle on a blue background"


def render_settings(base: str) -> dict:
    if base in FLOW:
        return {"width": 32, "height": 32, "max_sequence_length": 16, "guidance_scale": 1.0}
    return {"width": 64, "height": 64}


def render(pipe, base: str) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        PROMPT,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
        **render_settings(base),
    ).images


@pytest.fixture(scope="module", params=CASES, ids=[f"{b}-{t}" for b, t in CASES])
def trained(request, tmp_path_factory):
    """A 3-step run (rank 4, alpha 2: a lost alpha shows as twice the strength)."""
    base, targets = request.param
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp(f"{base}-{targets}")
    style = root / "style"
    style.mkdir()
    for png in sorted((REPO / "datasets" / "toy-stripes").glob("*.png"))[:4]:
        shutil.copy(png, style / png.name)
        shutil.copy(png.with_suffix(".txt"), style / png.with_suffix(".txt").name)
    raw = {
        "model": {"path": f"builtin:{base}"},
        "adapter": {"rank": 4, "alpha": 2},
        "data": {
            "datasets": [{"path": str(style)}],
            "resolution": 32 if base in FLOW else 64,
            "cache_dir": str(root / "cache"),
        },
        "train": {"steps": 3, "batch_size": 2, "lr": 1e-2, "seed": 0},
        "sample": {"prompts": []},
        "output": {"dir": str(root / "out"), "overwrite": True},
        "log": {"every": 1},
    }
    extra = list(TARGETS[targets])
    if base in FLOW:
        extra.append("train.max_sequence_length=16")
    result = run_training(validate_recipe(apply_overrides(raw, extra)))
    return base, result


# --- ComfyUI's rule, re-implemented from its documented behaviour ---------------------------
# comfy/lora.py load_lora: a module prefix X gets ("lora", up, down, alpha) from X.lora_up/
# lora_down, X.lora_B/lora_A, X.lora.up/lora.down (alpha: the X.alpha tensor, else None);
# comfy/weight_adapter/lora.py: weight += strength * (alpha / rank if alpha else 1.0) * up @ down.
UP_DOWN = (
    (".lora_up.weight", ".lora_down.weight"),
    (".lora_B.weight", ".lora_A.weight"),
    (".lora.up.weight", ".lora.down.weight"),
)


def comfy_deltas(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Module prefix (as named in the file) -> the delta ComfyUI adds at strength 1."""
    deltas = {}
    for key, up in state.items():
        for up_end, down_end in UP_DOWN:
            if key.endswith(up_end):
                prefix = key[: -len(up_end)]
                down = state[prefix + down_end]
                alpha = state.get(prefix + ".alpha")
                scale = alpha.item() / down.shape[0] if alpha is not None else 1.0
                deltas[prefix] = scale * (up.flatten(1).double() @ down.flatten(1).double())
    return deltas


def comfy_name(file_kind: str, family, component: str, module: str) -> str:
    """What ComfyUI's key map calls a layer in each file layout (comfy/lora.py
    model_lora_keys_unet / model_lora_keys_clip)."""
    if file_kind == "diffusers":
        return f"{component}.{module}"
    prefix = family.spec.export.kohya_prefixes[component]
    if component.startswith("text_encoder") and not module.startswith("text_model."):
        module = "text_model." + module
    return f"{prefix}_{module.replace('.', '_')}"


def trained_deltas(result) -> dict[tuple[str, str], torch.Tensor]:
    """(component, module) -> the delta the trained in-memory model applies."""
    deltas = {}
    for component, model in result.comps.modules().items():
        for name, layer in model.named_modules():
            if isinstance(layer, LoraLayer) and "default" in layer.lora_A:
                up = layer.lora_B["default"].weight.detach().flatten(1).double()
                down = layer.lora_A["default"].weight.detach().flatten(1).double()
                deltas[(component, name)] = layer.scaling["default"] * (up @ down)
    return deltas


# --- the tests ------------------------------------------------------------------------------


def test_kohya_file_loads_every_module_with_the_diffusers_files_images(trained):
    base, result = trained
    out = result.output_dir
    kohya = load_file(str(out / lora.KOHYA_WEIGHT_NAME))
    modules = {key.split(".", 1)[0] for key in kohya}
    assert {float(v) for k, v in kohya.items() if k.endswith(".alpha")} == {2.0}  # as trained
    expected = render(result.family.build_pipeline(result.comps), base)  # the trained model
    images = {}
    for name in (lora.WEIGHT_NAME, lora.KOHYA_WEIGHT_NAME):
        family, pipe = load_base(f"builtin:{base}")
        load_adapters(pipe, family, lora_specs([str(out / name)]))
        assert count_lora_layers(pipe, "adapter0") == len(modules), name
        images[name] = render(pipe, base)
    torch.testing.assert_close(images[lora.KOHYA_WEIGHT_NAME], images[lora.WEIGHT_NAME])
    torch.testing.assert_close(images[lora.WEIGHT_NAME], expected)
    _, plain = load_base(f"builtin:{base}")
    assert (render(plain, base) - expected).abs().max() > 1e-4  # the adapter does something


def test_tuner_sample_and_grid_run_on_the_kohya_file(trained, tmp_path):
    base, result = trained
    file = str(result.output_dir / lora.KOHYA_WEIGHT_NAME)
    size = str(render_settings(base)["width"])
    common = ["--steps", "2", "--width", size, "--height", size, "--device", "cpu"]
    assert (
        main(["sample", "--lora", file, "--prompt", PROMPT, "--out", str(tmp_path / "s")] + common)
        == 0
    )
    assert len(list((tmp_path / "s").glob("*.png"))) == 1
    grid = ["grid", "--lora", file, "--prompt", PROMPT, "--scales", "0,1"]
    assert main([*grid, "--out", str(tmp_path / "g.png"), *common]) == 0


def comfy_files(family) -> list[tuple[str, str]]:
    """(kind, file name) of every file we write that ComfyUI maps: the kohya layout for every
    family; the diffusers layout for SD3 and Flux (`transformer.` keys), not for the UNet
    families (ComfyUI maps only the old `processor.to_q` names of UNet attention)."""
    files = [("kohya", lora.KOHYA_WEIGHT_NAME)]
    if family.spec.denoiser == "transformer":
        files.append(("diffusers", lora.WEIGHT_NAME))
    return files


def test_comfyui_applies_the_trained_delta_from_every_file_it_reads(trained):
    """Applied by ComfyUI's rule, each file adds exactly the trained model's delta to every
    trained layer (none missing, none at the wrong strength)."""
    base, result = trained
    family = result.family
    want = trained_deltas(result)
    for kind, name in comfy_files(family):
        deltas = comfy_deltas(load_file(str(result.output_dir / name)))
        named = {comfy_name(kind, family, c, m): delta for (c, m), delta in want.items()}
        assert sorted(deltas) == sorted(named), name
        for prefix, delta in named.items():
            torch.testing.assert_close(deltas[prefix], delta, rtol=1e-5, atol=1e-8, msg=prefix)


def test_model_card_names_the_comfyui_file(trained):
    base, result = trained
    family = result.family
    kind = family.spec.export.comfy_file
    assert (kind, lora.WEIGHT_NAME if kind == "diffusers" else lora.KOHYA_WEIGHT_NAME) in (
        comfy_files(family)
    )
    name = lora.KOHYA_WEIGHT_NAME if kind == "kohya" else lora.WEIGHT_NAME
    card = (result.output_dir / "README.md").read_text()
    line = next(line for line in card.splitlines() if line.startswith("ComfyUI"))
    assert f"`{name}`" in line


NOT_SD3 = [case for case in CASES if case[0] != "tiny-sd3"]


# SD3 is left out: diffusers' SD3 loader reads no kohya layout at all (so its model card names
# the diffusers file for ComfyUI; test_model_card_names_the_comfyui_file checks that).
@pytest.mark.parametrize("trained", NOT_SD3, indirect=True, ids=[f"{b}-{t}" for b, t in NOT_SD3])
def test_diffusers_own_loader_reads_the_kohya_file(trained):
    """diffusers' `load_lora_weights` on the kohya file, without tuner's converter: the same
    images as the diffusers file."""
    base, result = trained
    images = []
    for name in (lora.WEIGHT_NAME, lora.KOHYA_WEIGHT_NAME):
        _, pipe = load_base(f"builtin:{base}")
        pipe.load_lora_weights(str(result.output_dir), weight_name=name, adapter_name="a")
        images.append(render(pipe, base))
    torch.testing.assert_close(images[0], images[1])


def test_exported_diffusers_file_loads_like_the_trained_one(trained, tmp_path):
    """`tuner export` kohya -> diffusers writes the family's layout too: every module loads in
    diffusers with the trained file's images, and ComfyUI (where it reads that layout) applies
    the trained delta."""
    base, result = trained
    out = tmp_path / "exported.safetensors"
    kohya = str(result.output_dir / lora.KOHYA_WEIGHT_NAME)
    assert main(["export", kohya, "--format", "diffusers", "--out", str(out)]) == 0
    images = []
    moved = sum(bool(d.any()) for d in trained_deltas(result).values())  # some get no gradient
    for file in (result.output_dir / lora.WEIGHT_NAME, out):
        family, pipe = load_base(f"builtin:{base}")
        pipe.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name="a")
        assert count_lora_layers(pipe, "a", nonzero=True) == moved, file.name
        images.append(render(pipe, base))
    torch.testing.assert_close(images[0], images[1])
    if result.family.spec.denoiser == "transformer":
        deltas = comfy_deltas(load_file(str(out)))
        for (c, m), delta in trained_deltas(result).items():
            torch.testing.assert_close(deltas[f"{c}.{m}"], delta, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize(
    "trained", [("tiny-sd15", "attention")], indirect=True, ids=["tiny-sd15-attention"]
)
def test_debug_shows_the_library_error_under_ours(trained, tmp_path, capsys):
    """A broken adapter (LoRA shapes that fit no layer): one line normally; with --debug the
    diffusers/torch error that caused it is chained under ours."""
    base, result = trained
    state = load_file(str(result.output_dir / lora.WEIGHT_NAME))
    first = next(k for k in state if k.endswith(("lora.down.weight", "lora_A.weight")))
    state[first] = torch.zeros(state[first].shape[0], state[first].shape[1] + 3)
    bad = tmp_path / "bad.safetensors"
    from safetensors import safe_open

    with safe_open(str(result.output_dir / lora.WEIGHT_NAME), "pt") as handle:
        save_file(state, str(bad), metadata=handle.metadata())
    args = ["sample", "--lora", str(bad), "--prompt", PROMPT, "--out", str(tmp_path / "o")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0]
    with pytest.raises(TunerError) as info:
        main(["--debug", *args])
    assert info.value.__cause__ is not None
    assert not isinstance(info.value.__cause__, TunerError)
