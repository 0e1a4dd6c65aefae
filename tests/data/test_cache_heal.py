"""Caches that heal: an entry that cannot be used (unreadable, another shape or dtype than the
model makes, non-finite values) is reported once, deleted and made again, and training goes on.
A run in which every step was non-finite publishes no adapter."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tuner.cli import main
from tuner.training.outputs import FINISHED


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:50])


def zero_bytes(path: Path) -> None:
    path.write_bytes(b"")


def garbage_header(path: Path) -> None:
    path.write_bytes(b"\xff" * 8 + b"{not json" + path.read_bytes()[17:])


def wrong_shape(path: Path) -> None:
    tensors = load_file(str(path))
    tensors["latents"] = torch.zeros(4, 4, 4)
    save_file(tensors, str(path))


def wrong_dtype(path: Path) -> None:
    tensors = load_file(str(path))
    tensors["latents"] = tensors["latents"].half()
    save_file(tensors, str(path))


def non_finite(path: Path) -> None:
    tensors = load_file(str(path))
    name = next(k for k, t in tensors.items() if t.is_floating_point())
    tensors[name].view(-1)[0] = float("nan")
    save_file(tensors, str(path))


# how an entry is broken, which cache, the reason the warning names
CASES = [
    ("truncated", truncate, "latents", "unreadable"),
    ("zero bytes", zero_bytes, "latents", "unreadable"),
    ("garbage header", garbage_header, "latents", "unreadable"),
    ("wrong shape", wrong_shape, "latents", "latents has shape (4, 4, 4); the model makes"),
    ("wrong dtype", wrong_dtype, "latents", "latents is torch.float16, not torch.float32"),
    ("non-finite latent", non_finite, "latents", "non-finite values in latents"),
    ("truncated prompt", truncate, "text", "unreadable"),
    ("non-finite prompt", non_finite, "text", "non-finite values in"),
]


@pytest.mark.parametrize("case, damage, kind, reason", CASES, ids=[c[0] for c in CASES])
def test_unusable_entry_is_reported_deleted_and_made_again(
    make_recipe, tmp_path, caplog, case, damage, kind, reason
):
    from tuner.training.run import run_training

    run_training(make_recipe("train.steps=1"))
    entries = sorted((tmp_path / "cache" / kind).rglob("*.safetensors"))
    assert entries
    damage(entries[0])
    with caplog.at_level(logging.WARNING, logger="tuner"):
        result = run_training(make_recipe("train.steps=2"))
    assert result.steps == 2 and (result.output_dir / FINISHED).is_file()
    warnings = [r.getMessage() for r in caplog.records if r.getMessage().startswith("cache: ")]
    assert len(warnings) == 1, warnings
    assert f"could not be used: {entries[0]}: {reason}" in warnings[0]
    assert warnings[0].endswith("deleted, encoding again")
    healed = load_file(str(entries[0]))  # made again: readable and finite
    assert all(torch.isfinite(t).all() for t in healed.values() if t.is_floating_point())


def test_every_step_non_finite_publishes_no_adapter(tmp_path, style_dir, capsys, monkeypatch):
    """train.steps < train.nan_patience and every step NaN: before, the untrained adapter was
    published and marked finished."""
    import yaml

    from tuner.training import loop

    real = loop.compute_loss
    monkeypatch.setattr(loop, "compute_loss", lambda *a: real(*a) * float("nan"))
    raw = {
        "model": {"path": "builtin:tiny-sd15"},
        "adapter": {"rank": 4},
        "data": {
            "datasets": [{"path": str(style_dir)}],
            "resolution": 64,
            "cache_dir": str(tmp_path / "cache"),
        },
        "train": {"steps": 3, "nan_patience": 20},
        "sample": {"prompts": []},
        "output": {"dir": str(tmp_path / "out")},
    }
    path = tmp_path / "nan.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["train", str(path)]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: all 3 steps had non-finite loss/gradients and were skipped")
    assert not (tmp_path / "out" / FINISHED).exists()
    assert not (tmp_path / "out" / "pytorch_lora_weights.safetensors").exists()
