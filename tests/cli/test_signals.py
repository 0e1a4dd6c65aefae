"""Signals and processes through ./launch.sh: SIGTERM (kill, timeout, docker stop) and SIGINT
reach the trainer, which saves a checkpoint and prints one line; in a 2-process run the line is
printed once, and a worker that dies ends the run with one line naming its rank."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tuner.training import checkpoint

REPO = Path(__file__).resolve().parents[2]


def recipe_file(tmp_path: Path, style_dir: Path, steps: int = 400) -> Path:
    raw = {
        "model": {"path": "builtin:tiny-sd15"},
        "adapter": {"rank": 4},
        "data": {
            "datasets": [{"path": str(style_dir)}],
            "resolution": 64,
            "cache_dir": str(tmp_path / "cache"),
        },
        "train": {"steps": steps, "batch_size": 2, "lr": 1e-3},
        "sample": {"prompts": []},
        "output": {"dir": str(tmp_path / "out"), "save_every": 2, "keep": 2},
        "log": {"every": 1},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}


def start(tmp_path, style_dir, *launch_args) -> subprocess.Popen:
    return subprocess.Popen(
        [str(REPO / "launch.sh"), *launch_args, str(recipe_file(tmp_path, style_dir))],
        env=env(),
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def wait_for_checkpoint(tmp_path, proc, timeout=300) -> None:
    deadline = time.time() + timeout
    while not checkpoint.complete_checkpoints(tmp_path / "out"):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.1)


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        found += [int(c) for c in text]
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    return state != "Z"


# signal -> exit code -> how the one line starts
SINGLE = [
    ("SIGTERM", signal.SIGTERM, 2, "error: stopped by SIGTERM at step "),
    ("SIGINT", signal.SIGINT, 2, "error: stopped by SIGINT at step "),
]


@pytest.mark.slow  # two ./launch.sh subprocess runs; the in-process signal tests stay fast
@pytest.mark.parametrize("case, sig, code, line", SINGLE, ids=[c[0] for c in SINGLE])
def test_signal_to_launch_sh_reaches_the_trainer(tmp_path, style_dir, case, sig, code, line):
    """Before: SIGTERM killed accelerate's launcher (exit 143) and the trainer ran on as an
    orphan; SIGINT ended in accelerate's CalledProcessError traceback."""
    proc = start(tmp_path, style_dir)
    wait_for_checkpoint(tmp_path, proc)
    below = children(proc.pid)  # exec: the PID of ./launch.sh is the trainer itself
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == code, err[-3000:]
    assert "Traceback" not in err and "CalledProcessError" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(line) and last.endswith("train.resume=latest"), last
    step = int(last[len(line) :].split(";")[0])
    assert (
        checkpoint.read_state(checkpoint.complete_checkpoints(tmp_path / "out")[-1])["step"] == step
    )
    assert not any(alive(pid) for pid in below)


@pytest.mark.slow
def test_two_processes_sigterm_prints_one_line(tmp_path, style_dir):
    proc = start(tmp_path, style_dir, "--num-processes", "2")
    wait_for_checkpoint(tmp_path, proc)
    workers = children(proc.pid)
    assert len(workers) == 2
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: stopped by SIGTERM at step "), err
    assert "Traceback" not in err
    assert not any(alive(pid) for pid in workers)


@pytest.mark.slow
def test_a_dead_worker_ends_the_run_with_one_line(tmp_path, style_dir):
    """Before: the survivor hung or printed ~100 lines of elastic tracebacks."""
    proc = start(tmp_path, style_dir, "--num-processes", "2")
    wait_for_checkpoint(tmp_path, proc)
    workers = children(proc.pid)
    os.kill(workers[1], signal.SIGKILL)  # rank 1
    killed = time.time()
    _, err = proc.communicate(timeout=120)
    assert time.time() - killed < 15
    assert proc.returncode == 2
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err[-3000:]
    assert errors[0].startswith("error: process rank 1 of 2 died (killed by SIGKILL)")
    last = checkpoint.complete_checkpoints(tmp_path / "out")[-1]
    assert f"the last complete checkpoint is {last}" in errors[0]
    assert errors[0].endswith("train.resume=latest")
    assert "Traceback" not in err
    assert not any(alive(pid) for pid in workers)
