"""LoHa and LoKr: the LyCORIS file (kohya names, what ComfyUI / A1111 read) and the PEFT file
mean the same weights; both render in `tuner sample` (scale 0 = the base model); the files
round-trip exactly; resume continues a LoHa/LoKr run bit-identically."""

from __future__ import annotations

import re
import shutil

import pytest
import torch
from peft.utils import get_peft_model_state_dict
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tuner.adapters import lora
from tuner.adapters.formats import kohya_module_name
from tuner.cli import main
from tuner.inference.pipelines import load_adapters, load_base, lora_specs
from tuner.training.run import run_training

UNET_CONV = "adapter.targets=[to_q,to_k,to_v,to_out.0,conv1,conv2,conv_shortcut]"
FILES = (lora.WEIGHT_NAME, lora.KOHYA_WEIGHT_NAME)
# (base, settings): conv layers with tucker cores for LoHa; for LoKr both full-factor modules
# (the scale special case) and rank-decomposed ones (rank 1 with decompose_both).
CASES = [
    pytest.param(("tiny-flux", ["adapter.type=lokr"]), id="flux-lokr-full"),
    pytest.param(
        ("tiny-sd15", ["adapter.type=lokr", UNET_CONV]), id="sd15-lokr", marks=pytest.mark.slow
    ),
    pytest.param(
        ("tiny-sd15", ["adapter.type=loha", UNET_CONV, "adapter.effective_conv=true"]),
        id="sd15-loha",
        marks=pytest.mark.slow,
    ),
    pytest.param(
        (
            "tiny-flux",
            [
                "adapter.type=lokr",
                "adapter.rank=1",
                "adapter.alpha=0.5",
                "adapter.decompose_both=true",
            ],
        ),
        id="flux-lokr",
    ),
    pytest.param(("tiny-flux", ["adapter.type=loha"]), id="flux-loha"),
]
FLOW = ("tiny-flux",)


@pytest.fixture(scope="module", params=CASES)
def trained(request, tmp_path_factory):
    """A 2-step run, rank 4 alpha 2 (scale 0.5: exact in float, so the LyCORIS file's folded
    full-factor modules round-trip bit for bit)."""
    from tuner.recipe import apply_overrides, validate_recipe

    base, settings = request.param
    root = tmp_path_factory.mktemp(base)
    style = root / "style"
    style.mkdir()
    for png in sorted((lora_repo() / "datasets" / "toy-stripes").glob("*.png"))[:2]:
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
        "train": {"steps": 2, "batch_size": 2, "lr": 5e-2, "seed": 0},
        "sample": {"prompts": []},
        "output": {"dir": str(root / "out"), "overwrite": True},
        "log": {"every": 1},
    }
    extra = ["train.max_sequence_length=16"] if base in FLOW else []
    return base, run_training(validate_recipe(apply_overrides(raw, [*settings, *extra])))


def lora_repo():
    from pathlib import Path

    return Path(__file__).resolve().parents[2]


# --- ComfyUI's rule, re-implemented from comfy/weight_adapter/loha.py and lokr.py ----------
# LoHa: delta = (w1a @ w1b) * (w2a @ w2b) (tucker: each factor rebuilt from t, a, b) times
# alpha / rank(w1b). LoKr: delta = kron(w1, w2), each factor full or a @ b (w2 with tucker
# core t2), times alpha / rank of the last decomposed factor, or 1 when both are full.


def tucker(t, a, b):
    return torch.einsum("i j k l, j r, i p -> p r k l", t, b, a)


def comfy_delta(parts: dict[str, torch.Tensor], shape) -> torch.Tensor:
    p = {k: v.double() for k, v in parts.items()}
    alpha = p.get("alpha")
    if "hada_w1_a" in p:
        if "hada_t1" in p:
            m1 = tucker(p["hada_t1"], p["hada_w1_a"], p["hada_w1_b"])
            m2 = tucker(p["hada_t2"], p["hada_w2_a"], p["hada_w2_b"])
        else:
            m1, m2 = p["hada_w1_a"] @ p["hada_w1_b"], p["hada_w2_a"] @ p["hada_w2_b"]
        scale = alpha.item() / p["hada_w1_b"].shape[0] if alpha is not None else 1.0
        return (m1 * m2).reshape(shape) * scale
    dim = None
    w1 = p.get("lokr_w1")
    if w1 is None:
        dim, w1 = p["lokr_w1_b"].shape[0], p["lokr_w1_a"] @ p["lokr_w1_b"]
    w2 = p.get("lokr_w2")
    if w2 is None:
        dim = p["lokr_w2_b"].shape[0]
        if "lokr_t2" in p:
            w2 = tucker(p["lokr_t2"], p["lokr_w2_a"], p["lokr_w2_b"])
        else:
            w2 = p["lokr_w2_a"] @ p["lokr_w2_b"]
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    scale = alpha.item() / dim if alpha is not None and dim is not None else 1.0
    return torch.kron(w1, w2).reshape(shape) * scale


COMFY_KEY = re.compile(
    r"^lora_(unet|te|te1|te2|transformer)_[A-Za-z0-9_]+\."
    r"(hada_w1_a|hada_w1_b|hada_w2_a|hada_w2_b|hada_t1|hada_t2|lokr_w1|lokr_w1_a|lokr_w1_b|"
    r"lokr_w2|lokr_w2_a|lokr_w2_b|lokr_t2|alpha)$"
)


def lycoris_modules(path) -> dict[str, dict[str, torch.Tensor]]:
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(str(path)).items():
        module, _, kind = key.partition(".")
        modules.setdefault(module, {})[kind] = tensor
    return modules


def base_weights(base: str) -> dict[str, torch.Tensor]:
    family, pipe = load_base(f"builtin:{base}")
    return {k: v.clone() for k, v in getattr(pipe, family.spec.denoiser).state_dict().items()}


def fused_weights(base: str, file) -> dict[str, torch.Tensor]:
    """peft's merge (what `tuner merge` does): the file loaded, fused, the adapter removed."""
    family, pipe = load_base(f"builtin:{base}")
    load_adapters(pipe, family, lora_specs([str(file)]))
    pipe.fuse_lora(adapter_names=["adapter0"])
    pipe.unload_lora_weights()
    return getattr(pipe, family.spec.denoiser).state_dict()


# --- the tests ------------------------------------------------------------------------------


def test_lycoris_file_has_the_names_comfyui_reads(trained):
    base, result = trained
    out, family = result.output_dir, result.family
    kind = lora.adapter_kind({"denoiser": result.comps.denoiser})
    keys = list(load_file(str(out / lora.KOHYA_WEIGHT_NAME)))
    assert keys and all(COMFY_KEY.match(k) for k in keys), [
        k for k in keys if not COMFY_KEY.match(k)
    ]
    modules = lycoris_modules(out / lora.KOHYA_WEIGHT_NAME)
    trained_names = {
        kohya_module_name(c, m, family.spec.export.kohya_prefixes)
        for c, model in result.comps.modules().items()
        for m, layer in model.named_modules()
        if hasattr(layer, "_available_adapters") and "default" in layer._available_adapters
    }
    assert set(modules) == trained_names
    for name, parts in modules.items():
        assert "alpha" in parts, name
        if kind == "loha":
            assert {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"} <= set(parts), name
        else:
            assert ("lokr_w1" in parts) != ({"lokr_w1_a", "lokr_w1_b"} <= set(parts)), name
            assert ("lokr_w2" in parts) != ({"lokr_w2_a", "lokr_w2_b"} <= set(parts)), name
            if "lokr_w1" in parts and "lokr_w2" in parts:  # ComfyUI applies no alpha here
                assert parts["alpha"].item() == result.comps.denoiser.peft_config["default"].r
    with safe_open(str(out / lora.KOHYA_WEIGHT_NAME), "pt") as handle:
        meta = handle.metadata()
    assert meta["ss_network_module"] == "lycoris.kohya"
    assert f'"algo": "{kind}"' in meta["ss_network_args"]
    assert meta["tuner_adapter_type"] == kind


def test_lycoris_and_peft_files_merge_to_the_same_weights(trained, tmp_path):
    """base + ComfyUI's delta from the LyCORIS file == peft's merge of the PEFT file == peft's
    merge of the LyCORIS file loaded by tuner, with and without our peft config in its
    metadata (as from other LyCORIS trainers); and the adapter changes the weights."""
    base, result = trained
    out, family = result.output_dir, result.family
    original = base_weights(base)
    by_peft = fused_weights(base, out / lora.WEIGHT_NAME)
    by_peft_from_lycoris = fused_weights(base, out / lora.KOHYA_WEIGHT_NAME)
    foreign = tmp_path / "foreign.safetensors"
    save_file(load_file(str(out / lora.KOHYA_WEIGHT_NAME)), str(foreign), {"format": "pt"})
    by_peft_from_foreign = fused_weights(base, foreign)
    names = {
        kohya_module_name(family.spec.denoiser, m, family.spec.export.kohya_prefixes): m
        for m, _ in result.comps.denoiser.named_modules()
    }
    by_comfy = dict(original)
    modules = lycoris_modules(out / lora.KOHYA_WEIGHT_NAME)
    for name, parts in modules.items():
        key = f"{names[name]}.weight"
        by_comfy[key] = (original[key].double() + comfy_delta(parts, original[key].shape)).float()
    changed = 0
    for key, weight in by_peft.items():
        torch.testing.assert_close(weight, by_comfy[key], rtol=1e-5, atol=1e-6, msg=key)
        torch.testing.assert_close(weight, by_peft_from_lycoris[key], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(weight, by_peft_from_foreign[key], rtol=1e-5, atol=1e-6)
        changed += not torch.equal(weight, original[key])
    assert changed >= len(modules) // 2  # trained modules moved (some may get no gradient)


def test_files_round_trip_exactly(trained):
    """Each file loaded by tuner holds the trained tensors bit for bit; the LyCORIS file
    converts back to the PEFT file exactly."""
    base, result = trained
    out, family = result.output_dir, result.family
    expected = load_file(str(out / lora.WEIGHT_NAME))
    trained_state = {
        f"{family.spec.denoiser}.{k}": v for k, v in lora.peft_state(result.comps.denoiser).items()
    }
    assert sorted(expected) == sorted(trained_state)
    for key, tensor in trained_state.items():
        assert torch.equal(expected[key], tensor.float()), key
    for name in FILES:
        fam, pipe = load_base(f"builtin:{base}")
        load_adapters(pipe, fam, lora_specs([str(out / name)]))
        denoiser = getattr(pipe, fam.spec.denoiser)
        got = get_peft_model_state_dict(denoiser, adapter_name="adapter0")
        got = {f"{fam.spec.denoiser}.{k}": v for k, v in got.items()}
        assert sorted(got) == sorted(expected), name
        for key in expected:
            assert torch.equal(got[key], expected[key]), (name, key)


def test_tuner_sample_renders_each_file_and_scale_0_is_the_base(trained, tmp_path):
    base, result = trained
    size = "32" if base in FLOW else "64"
    common = ["--prompt", "a red circle", "--steps", "2", "--width", size, "--height", size]

    def sample(*lora_args: str):
        out = tmp_path / f"s{len(list(tmp_path.iterdir()))}"
        assert main(["sample", f"builtin:{base}", *lora_args, *common, "--out", str(out)]) == 0
        (png,) = out.glob("*.png")
        return torch.tensor(list(Image.open(png).convert("RGB").getdata()))

    plain = sample()
    images = {}
    for name in FILES:
        file = str(result.output_dir / name)
        assert torch.equal(sample("--lora", f"{file}:0"), plain), name
        images[name] = sample("--lora", file)
    assert torch.equal(images[lora.WEIGHT_NAME], images[lora.KOHYA_WEIGHT_NAME])


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_resume_continues_a_lycoris_run_bit_identically(kind, make_recipe, tmp_path):
    settings = [
        f"adapter.type={kind}",
        "adapter.rank_dropout=0.2",  # random: the restored RNG state matters
        "output.save_every=2",
        "train.steps=4",
        "data.resolution=32",
        "train.max_sequence_length=16",
    ]
    flux = "builtin:tiny-flux"  # the cheapest family to train
    run_training(make_recipe(*settings, f"output.dir={tmp_path / 'full'}", base=flux))
    part = make_recipe(
        *settings, "train.resume=latest", f"output.dir={tmp_path / 'part'}", base=flux
    )
    saved = tmp_path / "full" / "checkpoints" / "step-000002"
    (tmp_path / "part" / "checkpoints").mkdir(parents=True)
    shutil.copytree(saved, tmp_path / "part" / "checkpoints" / saved.name)
    run_training(part)
    want = load_file(str(tmp_path / "full" / lora.WEIGHT_NAME))
    got = load_file(str(tmp_path / "part" / lora.WEIGHT_NAME))
    marker = "hada_" if kind == "loha" else "lokr_"
    assert sorted(want) == sorted(got) and all(marker in key for key in want)
    for key in want:
        assert torch.equal(want[key], got[key]), key


REFUSED = [
    (
        ["adapter.type=loha", "adapter.dora=true"],
        "adapter.dora: does not apply to adapter.type loha",
    ),
    (
        ["adapter.type=lokr", "adapter.init=pissa"],
        "adapter.init: does not apply to adapter.type lokr",
    ),
    (
        ["adapter.type=loha", "adapter.dropout=0.1"],
        "use adapter.rank_dropout or adapter.module_dropout",
    ),
    (
        ["adapter.type=loha", "adapter.decompose_both=true"],
        "adapter.decompose_both: applies to adapter.type lokr only",
    ),
    (["adapter.rank_dropout=0.1"], "adapter.rank_dropout: applies to adapter.type loha or lokr"),
    (["adapter.type=lokr", "adapter.text_encoder=true"], "adapter.text_encoder: does not apply"),
]


@pytest.mark.parametrize("overrides, line", REFUSED, ids=[r[1][:30] for r in REFUSED])
def test_options_that_do_not_apply_are_refused_by_check(
    overrides, line, tmp_path, make_recipe, capsys
):
    recipe = make_recipe()
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe.to_yaml())
    assert main(["check", str(path), *overrides]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and line in err[-1], err


def test_resume_refuses_another_adapter_type(make_recipe, tmp_path):
    from tuner.errors import TunerError
    from tuner.training.changes import check_resume

    saved = make_recipe("adapter.type=loha").model_dump(mode="json")
    with pytest.raises(TunerError, match="adapter.type=loha, this recipe has adapter.type=lokr"):
        check_resume(make_recipe("adapter.type=lokr"), {"recipe": saved}, tmp_path)
