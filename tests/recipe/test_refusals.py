"""Nothing silently ignored: each setting this run cannot apply, and each malformed input, is
refused with one line (exit 2, no traceback) before the model loads, or is applied."""

from __future__ import annotations

import importlib.util
import logging

import pytest
import yaml

from tuner.cli import main

RAW_RECIPE = """\
model:
  path: builtin:tiny-sd15
train:
  steps: 1
train:
  steps: 2
output:
  dir: OUT
"""


@pytest.fixture
def recipe(tmp_path, style_dir):
    raw = {
        "model": {"path": "builtin:tiny-sd15"},
        "adapter": {"rank": 4},
        "data": {
            "datasets": [{"path": str(style_dir)}],
            "resolution": 64,
            "cache_dir": str(tmp_path / "cache"),
        },
        "train": {"steps": 1},
        "sample": {"prompts": []},
        "output": {"dir": str(tmp_path / "out")},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def no_wandb(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )


def wandb_without_key(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))


def duplicate_keys(tmp_path, recipe):
    path = tmp_path / "dup.yaml"
    path.write_text(RAW_RECIPE.replace("OUT", str(tmp_path / "out")))
    return ["train", str(path)]


def not_utf8(tmp_path, recipe):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(recipe.read_bytes() + "# caf\u00e9\n".encode("latin-1"))
    return ["train", str(path)]


def export_pickle(tmp_path, recipe):
    path = tmp_path / "lora.pt"
    path.write_bytes(b"\x80\x04not a safetensors file")
    return ["export", str(path), "--format", "kohya"]


# case, CLI args (overrides, or a function of (tmp_path, recipe) -> argv), environment setup,
# exit code, the one line printed (its start after "error: " or a fragment of it)
CASES = [
    ("lr inf", ["train.lr=inf"], None, 2, "train.lr: expected a finite number, got 'inf'"),
    ("lr nan", ["train.lr=.nan"], None, 2, "train.lr: expected a finite number, got nan"),
    ("eps -inf", ["train.eps=-.inf"], None, 2, "train.eps: expected a finite number, got -inf"),
    (
        "override into a scalar",
        ["train.steps.x=1"],
        None,
        2,
        "override 'train.steps.x=1': train.steps is 1, not a section; use train.steps=VALUE",
    ),
    (
        "quantize on sd15",
        ["model.quantize=nf4"],
        None,
        2,
        "model.quantize: nf4 is supported for transformer families (sd3, flux), not sd15",
    ),
    (
        "fp16 on a CPU",
        ["train.mixed_precision=fp16"],
        None,
        2,
        "train.mixed_precision: fp16 needs a CUDA GPU and this run is on the CPU",
    ),
    (
        "wandb not installed",
        ["log.to=[wandb]"],
        no_wandb,
        2,
        "log.to: wandb is not installed; pip install wandb, or remove wandb from log.to",
    ),
    (
        "wandb online without a key",
        ["log.to=[wandb]"],
        wandb_without_key,
        2,
        "log.to: wandb has no API key (no WANDB_API_KEY, no `wandb login`)",
    ),
    (
        "rank above every targeted layer",
        ["adapter.rank=100000"],
        None,
        2,
        "adapter.rank: 100000 is larger than any targeted layer can use",
    ),
    (
        "rank pattern naming no module",
        ["adapter.rank_pattern={nope: 2}"],
        None,
        2,
        "adapter.rank_pattern: 'nope' matches no LoRA module of the denoiser",
    ),
    (
        "lr pattern naming no module",
        ["train.lr_pattern={to_z: 2}"],
        None,
        2,
        "train.lr_pattern: 'to_z' matches no LoRA module of the denoiser",
    ),
    (
        "optimizer package missing",
        ["train.optimizer=custom", "train.optimizer_class=no_such_pkg.Opt"],
        None,
        2,
        "train.optimizer_class: cannot import 'no_such_pkg.Opt' (ModuleNotFoundError",
    ),
    (
        "duplicate keys",
        duplicate_keys,
        None,
        2,
        "not valid YAML (duplicate key 'train' at line 5 (first at line 3); keep one)",
    ),
    ("recipe not UTF-8", not_utf8, None, 2, "not UTF-8 text (byte 0xe9)"),
    ("export a pickle", export_pickle, None, 2, "not a readable .safetensors file"),
]


@pytest.mark.parametrize("case, args, setup, code, line", CASES, ids=[c[0] for c in CASES])
def test_refused_with_one_line(
    tmp_path, capsys, monkeypatch, recipe, case, args, setup, code, line
):
    if setup is not None:
        setup(monkeypatch, tmp_path)
    argv = args(tmp_path, recipe) if callable(args) else ["train", str(recipe), *args]
    assert main(argv) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and line in last, last
    # Refused before anything was trained or written as a result.
    assert not (tmp_path / "out" / "pytorch_lora_weights.safetensors").exists()


def test_wandb_offline_is_applied(tmp_path, recipe, monkeypatch):
    """Offline wandb needs no key: not refused (it logs into output.dir)."""
    from tuner.recipe import load_recipe
    from tuner.training.run import check_environment

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    check_environment(load_recipe(recipe, ["log.to=[wandb]"]))


def test_symlinked_folder_and_skipped_types_and_bad_captions(tmp_path, style_dir, caplog):
    """A symlinked sub-folder is read; .gif/.tif files are counted by type in one warning; a
    caption that is not UTF-8 is read and named."""
    import shutil

    from tuner.data.sources import list_records

    data = tmp_path / "data"
    data.mkdir()
    pngs = sorted(style_dir.glob("*.png"))
    shutil.copy(pngs[0], data / "a.png")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(pngs[1], elsewhere / "b.png")
    (elsewhere / "b.txt").write_bytes("caf\u00e9 style".encode("cp1252"))
    (data / "linked").symlink_to(elsewhere, target_is_directory=True)
    (data / "loop").symlink_to(data, target_is_directory=True)  # read once, not forever
    for name in ("x.gif", "y.gif", "z.tif"):
        (data / name).write_bytes(b"GIF89a")
    with caplog.at_level(logging.WARNING, logger="tuner"):
        records = list_records(str(data), source=0)
    assert sorted(r.image.rsplit("/", 1)[-1] for r in records) == ["a.png", "b.png"]
    assert [r.caption for r in records if r.image.endswith("b.png")] == ["caf\ufffd style"]
    text = caplog.text
    assert "skipped 3 files of unsupported image types (2 .gif, 1 .tif)" in text
    assert f"caption {elsewhere / 'b.txt'} is not UTF-8" in text or "b.txt is not UTF-8" in text


def test_long_captions_warn_once_with_the_count(make_recipe, style_dir, caplog):
    from tuner.training.run import run_training

    long = " ".join(["stripes"] * 100)
    for txt in sorted(style_dir.glob("*.txt"))[:2]:
        txt.write_text(long)
    with caplog.at_level(logging.WARNING, logger="tuner"):
        run_training(make_recipe("train.steps=1"))
    lines = [r.getMessage() for r in caplog.records if "-token limit" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("data: 2 of 4 captions are longer than the 77")
