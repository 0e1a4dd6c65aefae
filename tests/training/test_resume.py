"""Crash safety: SIGKILL + resume is bit-identical; SIGINT saves and says how to resume;
half-written checkpoints are never picked; 2 processes equal 1 process with the same batch."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tuner.adapters.lora import WEIGHT_NAME
from tuner.errors import TunerError
from tuner.training import checkpoint

REPO = Path(__file__).resolve().parents[2]


def recipe_file(tmp_path: Path, style_dir: Path, out: str, **train) -> Path:
    raw = {
        "model": {"path": "builtin:tiny-sd15"},
        "adapter": {"rank": 4, "dropout": 0.1},
        "data": {
            "datasets": [{"path": str(style_dir), "repeats": 2}],
            "resolution": 64,
            "cache_dir": str(tmp_path / "cache"),
            "caption_dropout": 0.2,
            "flip": True,
        },
        "train": {
            "steps": 8,
            "batch_size": 2,
            "grad_accum": 2,
            "lr": 5e-3,
            "seed": 3,
            "lr_scheduler": "cosine",
            "warmup_steps": 2,
            **train,
        },
        "sample": {"prompts": []},
        "output": {"dir": str(tmp_path / out), "save_every": 2, "keep": 10},
        "log": {"every": 1},
    }
    path = tmp_path / f"{out}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def tuner_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "tuner", *args]


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / WEIGHT_NAME))


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, "training ended before the checkpoint appeared"
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.05)


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_identical(tmp_path, style_dir):
    # 4 images x 2 repeats = 4 batches per epoch of batch 2; grad_accum 2 -> an epoch is 2
    # steps, so step 3 is inside the second epoch.
    full = recipe_file(tmp_path, style_dir, "full")
    subprocess.run(
        tuner_cmd("train", str(full)), check=True, env=env(), capture_output=True, timeout=600
    )

    crashed = recipe_file(tmp_path, style_dir, "crashed")
    proc = subprocess.Popen(
        tuner_cmd("train", str(crashed), "output.save_every=3"),
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for(tmp_path / "crashed" / "checkpoints" / "step-000003", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "crashed" / WEIGHT_NAME).exists()
    resumed_from = checkpoint.complete_checkpoints(tmp_path / "crashed")[-1]
    assert resumed_from.name in ("step-000003", "step-000006")

    subprocess.run(
        tuner_cmd("train", str(crashed), "output.save_every=3", "train.resume=latest"),
        check=True,
        env=env(),
        capture_output=True,
        timeout=600,
    )
    expected, got = adapter(tmp_path / "full"), adapter(tmp_path / "crashed")
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    # One adapter, not two: the resumed file has exactly the keys of a fresh run.
    assert len(got) == len(expected)


@pytest.mark.slow  # a 400-step subprocess run
def test_sigint_saves_a_checkpoint_and_prints_how_to_resume(tmp_path, style_dir):
    path = recipe_file(tmp_path, style_dir, "interrupted", steps=400)
    proc = subprocess.Popen(
        tuner_cmd("train", str(path)),
        env=env(),
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    wait_for(tmp_path / "interrupted" / "checkpoints" / "step-000002", proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2
    last = err.strip().splitlines()[-1]
    assert last.endswith(f"resume with: ./launch.sh {path} train.resume=latest")
    saved = checkpoint.complete_checkpoints(tmp_path / "interrupted")[-1]
    step = checkpoint.read_state(saved)["step"]
    assert f"at step {step}" in last and step >= 2


def test_half_written_checkpoint_is_never_latest(tmp_path):
    out = tmp_path / "run"
    good = out / "checkpoints" / "step-000004"
    good.mkdir(parents=True)
    (good / checkpoint.STATE_FILE).write_text('{"step": 4}')
    (out / "checkpoints" / ".tmp-step-000006").mkdir()  # interrupted during write
    (out / "checkpoints" / "step-000008").mkdir()  # no state file: not complete
    assert checkpoint.resolve_resume("latest", out) == good
    assert checkpoint.resolve_resume("latest", tmp_path / "nothing-yet") is None


def test_retention_keeps_the_newest(tmp_path):
    out = tmp_path / "run"
    for step in (2, 4, 6, 8):
        checkpoint.write_checkpoint(out, step, lambda folder: None, {"step": step}, True, keep=2)
    assert [p.name for p in checkpoint.complete_checkpoints(out)] == ["step-000006", "step-000008"]


def test_disk_full_during_save_keeps_the_previous_checkpoint(tmp_path):
    out = tmp_path / "run"
    checkpoint.write_checkpoint(out, 2, lambda f: (f / "a").write_text("x"), {"step": 2}, True, 3)

    def fail(folder: Path) -> None:
        raise OSError(28, "No space left on device")

    with pytest.raises(TunerError) as info:
        checkpoint.write_checkpoint(out, 4, fail, {"step": 4}, True, 3)
    assert str(info.value).startswith("could not save checkpoint step-000004 (No space left")
    assert "last complete checkpoint is" in str(info.value) and "step-000002" in str(info.value)
    latest = checkpoint.resolve_resume("latest", out)
    assert latest.name == "step-000002" and (latest / "a").read_text() == "x"
    assert not (out / "checkpoints" / ".tmp-step-000004").exists()


def test_disk_full_during_training_is_one_line(tmp_path, style_dir, capsys, monkeypatch):
    """Through the CLI: the second checkpoint hits ENOSPC; one line, exit 2, first one kept."""
    from tuner.cli import main

    path = recipe_file(tmp_path, style_dir, "full-disk")
    real_save, calls = torch.save, []

    def flaky_save(obj, target, *args, **kwargs):
        calls.append(target)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real_save(obj, target, *args, **kwargs)

    monkeypatch.setattr(torch, "save", flaky_save)
    assert main(["train", str(path)]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("error: could not save checkpoint step-000004 (No space left")
    latest = checkpoint.resolve_resume("latest", tmp_path / "full-disk")
    assert latest.name == "step-000002"
    assert load_file(str(latest / WEIGHT_NAME))


@pytest.mark.slow
def test_two_processes_equal_one_process_with_the_same_global_batch(tmp_path, style_dir):
    # Gradient checkpointing on: it must work across processes too.
    one = recipe_file(
        tmp_path, style_dir, "one", batch_size=2, grad_accum=1, steps=4, gradient_checkpointing=True
    )
    two = recipe_file(
        tmp_path, style_dir, "two", batch_size=1, grad_accum=1, steps=4, gradient_checkpointing=True
    )
    for path in (one, two):
        text = path.read_text().replace("caption_dropout: 0.2", "caption_dropout: 0.0")
        path.write_text(text.replace("dropout: 0.1", "dropout: 0.0"))
    subprocess.run(
        tuner_cmd("train", str(one)), check=True, env=env(), capture_output=True, timeout=600
    )
    result = subprocess.run(
        [str(REPO / "launch.sh"), "--num-processes", "2", str(two)],
        env=env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    errors = [line for line in result.stderr.splitlines() if "Error" in line or "error:" in line]
    assert result.returncode == 0, "\n".join(errors[-20:])
    a, b = adapter(tmp_path / "one"), adapter(tmp_path / "two")
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6, rtol=1e-4), key
    # Only rank 0 wrote: one recipe copy, one set of checkpoints.
    assert (tmp_path / "two" / "recipe.yaml").is_file()


def test_resume_restores_8bit_optimizer_state(tmp_path, style_dir):
    """In-process resume with adamw8bit (its quantized states round-trip through the
    checkpoint) ends with the same adapter as the uninterrupted run."""
    import shutil

    from tuner.recipe import load_recipe
    from tuner.training.run import run_training

    settings = ["train.optimizer=adamw8bit", "adapter.rank=64", "adapter.dropout=0.0"]
    full = load_recipe(recipe_file(tmp_path, style_dir, "full8", steps=4), settings)
    run_training(full)
    part = load_recipe(recipe_file(tmp_path, style_dir, "part8", steps=4), settings)
    saved = tmp_path / "full8" / "checkpoints" / "step-000002"
    state = torch.load(saved / "training_state.pt", weights_only=True)

    def tensors(value):
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, dict):
            for inner in value.values():
                yield from tensors(inner)

    assert any(t.dtype == torch.uint8 for t in tensors(state["optimizer"]))  # real 8-bit states
    (tmp_path / "part8" / "checkpoints").mkdir(parents=True)
    shutil.copytree(saved, tmp_path / "part8" / "checkpoints" / "step-000002")
    run_training(
        part.model_copy(update={"train": part.train.model_copy(update={"resume": "latest"})})
    )
    expected, got = adapter(tmp_path / "full8"), adapter(tmp_path / "part8")
    for key in expected:
        assert torch.equal(expected[key], got[key]), key


# Schedule-free (train/eval switching around every save) runs in the fast tier, the rest slow.
OPTIMIZERS = [
    pytest.param("adamw", marks=pytest.mark.slow),
    pytest.param("prodigy", marks=pytest.mark.slow),  # its d estimate is in the param groups
    pytest.param("adafactor", marks=pytest.mark.slow),
    pytest.param("came", marks=pytest.mark.slow),
    "adamw_schedulefree",  # z, the step count and the train/eval mode
    pytest.param("lion8bit", marks=pytest.mark.slow),
    pytest.param("custom", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_resume_is_bitwise_for_every_optimizer(optimizer, tmp_path, style_dir):
    """Uninterrupted vs resumed from the step-2 checkpoint: the same final adapter, bit for bit,
    and the optimizer state saved (Prodigy's d estimate in its groups, schedule-free's z and
    step count) is what the resumed run reloads. adamw8bit has its own test above."""
    import shutil

    from tuner.recipe import load_recipe
    from tuner.training.run import run_training

    settings = [f"train.optimizer={optimizer}", "adapter.dropout=0.0", "data.caption_dropout=0"]
    settings += {
        "prodigy": ["train.lr=1.0"],
        "adamw_schedulefree": ["train.lr_scheduler=constant", "sample.every=1"],
        "custom": ["train.optimizer_class=torch.optim.SGD", "train.optimizer_args.momentum=0.9"],
    }.get(optimizer, [])
    short = {"steps": 4, "batch_size": 1, "grad_accum": 1, "warmup_steps": 0}
    full = load_recipe(recipe_file(tmp_path, style_dir, "full", **short), settings)
    if optimizer == "adamw_schedulefree":  # samples during training: each an eval/train switch
        full = full.model_copy(update={"sample": full.sample.model_copy(update={"steps": 1})})
    run_training(full)
    saved = tmp_path / "full" / "checkpoints" / "step-000002"
    state = torch.load(saved / "training_state.pt", weights_only=True)["optimizer"]
    if optimizer == "prodigy":
        assert state["param_groups"][0]["d_numerator"] > 0  # its estimate is in the state
    if optimizer == "adamw_schedulefree":
        assert state["param_groups"][0]["train_mode"] is False  # saved in eval mode
        assert all("z" in s for s in state["state"].values())
    part_dir = tmp_path / "part"
    shutil.copytree(saved, part_dir / "checkpoints" / saved.name)
    part = full.model_copy(
        update={
            "output": full.output.model_copy(update={"dir": str(part_dir)}),
            "train": full.train.model_copy(update={"resume": "latest"}),
        }
    )
    run_training(part)
    expected, got = adapter(tmp_path / "full"), adapter(part_dir)
    at_two = load_file(str(saved / WEIGHT_NAME))
    assert any(not torch.equal(at_two[k], expected[k]) for k in expected)  # steps 3-4 trained
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
