"""Resuming with a changed recipe: changes to the adapter or the base model are refused with one
line and nothing rewritten; the rest is applied (a new train.lr really reaches the optimizer) with
one notice naming what changed; a changed dataset is a notice; the printed resume command
reproduces the launch (--num-processes, --config-file)."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tuner.cli import main
from tuner.training import checkpoint

REPO = Path(__file__).resolve().parents[2]


def tree_digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def base_raw(root: str = "") -> dict:
    """Paths relative to the run's folder (tests chdir there), so a copied run records the
    same recipe as the original; `root` makes them absolute."""
    at = (root.rstrip("/") + "/") if root else ""
    return {
        "model": {"path": "builtin:tiny-sd15"},
        "adapter": {"rank": 4, "targets": ["to_q", "to_k", "to_v", "to_out.0"]},
        "data": {
            "datasets": [{"path": f"{at}style"}],
            "resolution": 64,
            "cache_dir": f"{at}cache",
        },
        "train": {
            "steps": 4,
            "batch_size": 2,
            "lr": 1e-3,
            "lr_scheduler": "cosine",
            "warmup_steps": 2,
        },
        "sample": {"prompts": []},
        "output": {"dir": f"{at}out", "save_every": 2, "keep": 5},
        "log": {"every": 1},
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """One finished 4-step run with checkpoints at steps 2 and 4 (trained once per module)."""
    root = tmp_path_factory.mktemp("trained")
    data = root / "style"
    data.mkdir()
    for png in sorted((REPO / "datasets" / "toy-stripes").glob("*.png"))[:4]:
        shutil.copy(png, data / png.name)
        shutil.copy(png.with_suffix(".txt"), data / png.with_suffix(".txt").name)
    (root / "recipe.yaml").write_text(yaml.safe_dump(base_raw()))
    here = os.getcwd()
    os.chdir(root)
    try:
        assert main(["train", "recipe.yaml"]) == 0
    finally:
        os.chdir(here)
    return root


@pytest.fixture
def run_dir(trained, tmp_path, monkeypatch) -> Path:
    """A private copy of the trained run (data, cache, output, recipe), the working folder."""
    for name in ("style", "cache", "out", "recipe.yaml"):
        copy = shutil.copytree if (trained / name).is_dir() else shutil.copy
        copy(trained / name, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run_cli(folder: Path, capsys, *overrides: str) -> tuple[int, str]:
    code = main(["train", "recipe.yaml", *overrides])
    err = capsys.readouterr().err.strip().splitlines()
    return code, err[-1] if err else ""


# input -> exit code -> the one line; nothing in output.dir rewritten.
@pytest.mark.parametrize(
    "overrides, line",
    [
        (["adapter.rank=8"], "adapter.rank=4, this recipe has adapter.rank=8"),
        (["adapter.alpha=16"], "adapter.alpha=4.0, this recipe has adapter.alpha=16.0"),
        (
            ["adapter.targets=[to_q]"],
            "adapter.targets=[to_q, to_k, to_v, to_out.0], this recipe has adapter.targets=[to_q]",
        ),
        (
            ["adapter.target_regex=.*attn1.*"],
            "adapter.target_regex=unset, this recipe has adapter.target_regex=.*attn1.*",
        ),
        (["adapter.dora=true"], "adapter.dora=false, this recipe has adapter.dora=true"),
        (
            ["adapter.text_encoder=true"],
            "adapter.text_encoder=false, this recipe has adapter.text_encoder=true",
        ),
        (
            ["model.path=builtin:tiny-sd2"],
            "model.path=builtin:tiny-sd15, this recipe has model.path=builtin:tiny-sd2",
        ),
        (["model.family=sd15"], "model.family=unset, this recipe has model.family=sd15"),
        (
            ["train.optimizer=adamw8bit"],
            "train.optimizer=adamw, this recipe has train.optimizer=adamw8bit",
        ),
        (
            ["adapter.rank=8", "adapter.dora=true"],
            "adapter.rank=4 and adapter.dora=false, this recipe has adapter.rank=8 and "
            "adapter.dora=true",
        ),
    ],
    ids=lambda v: "+".join(v) if isinstance(v, list) else "",
)
def test_changing_the_adapter_or_model_on_resume_is_refused(run_dir, capsys, overrides, line):
    before = tree_digest(run_dir / "out")
    code, got = run_cli(run_dir, capsys, "train.resume=latest", "train.steps=6", *overrides)
    assert code == 2
    assert got == (
        "error: train.resume: out/checkpoints/step-000004 was trained "
        f"with {line}; a resumed run keeps its adapter, base model and optimizer: set it back, or "
        "start a new run in another output.dir"
    ), got
    assert tree_digest(run_dir / "out") == before


def _stop_before_training(monkeypatch, seen: dict):
    """Replace the step loop: record the optimizer and schedule as resumed, then stop."""
    import tuner.training.run as run_module

    class Stop(Exception):
        pass

    def fake_run_steps(run):
        seen["lrs"] = [group["lr"] for group in run.optimizer.param_groups]
        seen["last_lr"] = run.scheduler.get_last_lr()
        seen["weight_decay"] = [group["weight_decay"] for group in run.optimizer.param_groups]
        seen["step"] = run.state["step"]
        raise Stop

    monkeypatch.setattr(run_module, "run_steps", fake_run_steps)
    return Stop


def expected_lr(lr: float, steps: int, warmup: int, at: int) -> float:
    """What the recipe's schedule gives after `at` steps, computed from scratch."""
    from diffusers.optimization import get_scheduler

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = get_scheduler("cosine", opt, num_warmup_steps=warmup, num_training_steps=steps)
    for _ in range(at):
        opt.step()
        sched.step()
    return opt.param_groups[0]["lr"]


@pytest.mark.parametrize(
    "overrides, lr, steps, warmup, weight_decay",
    [
        ([], 1e-3, 4, 2, 1e-2),
        (["train.lr=5e-3"], 5e-3, 4, 2, 1e-2),
        (["train.lr=5e-3", "train.steps=10"], 5e-3, 10, 2, 1e-2),
        (["train.steps=10", "train.warmup_steps=4"], 1e-3, 10, 4, 1e-2),
        (["train.weight_decay=0.1"], 1e-3, 4, 2, 0.1),
    ],
    ids=["unchanged", "lr", "lr+steps", "steps+warmup", "weight_decay"],
)
def test_changed_schedule_takes_effect_at_the_resumed_step(
    run_dir, monkeypatch, overrides, lr, steps, warmup, weight_decay
):
    """The new recipe's schedule, continued at the checkpoint's step: the optimizer's lr is what
    that schedule gives there (before: the checkpoint's old lr and base_lrs came back)."""
    from tuner.recipe import load_recipe
    from tuner.training.run import run_training

    seen = {}
    stop = _stop_before_training(monkeypatch, seen)
    resume = "out/checkpoints/step-000002"
    recipe = load_recipe("recipe.yaml", [f"train.resume={resume}", *overrides])
    with pytest.raises(stop):
        run_training(recipe)
    want = expected_lr(lr, steps, warmup, at=2)
    assert seen["step"] == 2
    assert seen["lrs"] == pytest.approx([want], rel=1e-12)
    assert seen["last_lr"] == pytest.approx([want], rel=1e-12)
    assert seen["weight_decay"] == [weight_decay]


@pytest.mark.parametrize(
    "overrides, notice",
    [
        (
            ["train.lr=5e-3", "train.steps=6"],
            "resuming run {run_id} at step 4 with changed settings: train.steps 4 -> 6, "
            "train.lr 0.001 -> 0.005",
        ),
        (
            ["train.steps=6", "output.keep=3", "log.every=2"],
            "resuming run {run_id} at step 4 with changed settings: train.steps 4 -> 6, "
            "output.keep 5 -> 3, log.every 1 -> 2",
        ),
    ],
    ids=["lr+steps", "steps+keep+log"],
)
def test_legal_changes_are_applied_with_one_notice(run_dir, capsys, caplog, overrides, notice):
    caplog.set_level(logging.INFO, logger="tuner")
    run_id = checkpoint.read_state(run_dir / "out" / "checkpoints" / "step-000004")["run_id"]
    code, _ = run_cli(run_dir, capsys, "train.resume=latest", *overrides)
    assert code == 0
    notices = [r.getMessage() for r in caplog.records if "changed settings" in r.getMessage()]
    assert notices == [notice.format(run_id=run_id)]
    saved = yaml.safe_load((run_dir / "out" / "recipe.yaml").read_text())
    assert saved["train"]["steps"] == 6
    last = checkpoint.complete_checkpoints(run_dir / "out")[-1]
    assert checkpoint.read_state(last)["recipe"]["train"]["steps"] == 6


@pytest.mark.parametrize(
    "change, notice",
    [
        ("caption", "data changed since {ckpt} (4 images then, 4 now); training continues"),
        ("add", "data changed since {ckpt} (4 images then, 5 now); training continues"),
    ],
)
def test_changed_dataset_is_a_notice(run_dir, capsys, caplog, change, notice):
    caplog.set_level(logging.INFO, logger="tuner")
    data = run_dir / "style"
    first = sorted(data.glob("*.txt"))[0]
    if change == "caption":
        first.write_text("an entirely different caption")
    else:
        png = sorted((REPO / "datasets" / "toy-stripes").glob("*.png"))[5]
        shutil.copy(png, data / png.name)
        shutil.copy(png.with_suffix(".txt"), data / png.with_suffix(".txt").name)
    code, _ = run_cli(run_dir, capsys, "train.resume=latest", "train.steps=5")
    assert code == 0
    ckpt = "out/checkpoints/step-000004"
    messages = [r.getMessage() for r in caplog.records if "data changed" in r.getMessage()]
    assert [m.split(" on the ")[0] for m in messages] == [
        notice.format(ckpt=ckpt).split(" on the ")[0]
    ]


def test_unchanged_resume_prints_no_notice(run_dir, capsys, caplog):
    caplog.set_level(logging.INFO, logger="tuner")
    # train.steps must grow to resume a finished run; nothing else changes.
    code, _ = run_cli(run_dir, capsys, "train.resume=latest", "train.steps=5")
    assert code == 0
    text = [r.getMessage() for r in caplog.records]
    assert not [m for m in text if "data changed" in m]
    assert [m for m in text if "changed settings" in m][0].endswith("train.steps 4 -> 5")


# launch.sh flags in the environment -> the printed resume command.
@pytest.mark.parametrize(
    "environment, command",
    [
        ({}, "./launch.sh r.yaml train.seed=3 train.resume=latest"),
        (
            {"TUNER_NUM_PROCESSES": "2"},
            "./launch.sh --num-processes 2 r.yaml train.seed=3 train.resume=latest",
        ),
        (
            {"TUNER_NUM_PROCESSES": "2", "TUNER_CONFIG_FILE": "my config.yaml"},
            "./launch.sh --num-processes 2 --config-file 'my config.yaml' r.yaml train.seed=3 "
            "train.resume=latest",
        ),
        (
            {"WORLD_SIZE": "4"},
            "./launch.sh --num-processes 4 r.yaml train.seed=3 train.resume=latest",
        ),
        ({"WORLD_SIZE": "1"}, "./launch.sh r.yaml train.seed=3 train.resume=latest"),
    ],
    ids=["plain", "num-processes", "config-file", "accelerate-world-size", "world-size-1"],
)
def test_resume_command_reproduces_the_launch(tmp_path, monkeypatch, environment, command):
    from tuner.recipe import load_recipe

    for name in ("TUNER_NUM_PROCESSES", "TUNER_CONFIG_FILE", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)
    Path("r.yaml").write_text(yaml.safe_dump(base_raw()))
    recipe = load_recipe("r.yaml", ["train.seed=3", "train.resume=latest"])
    assert recipe.command("train.resume=latest") == command


@pytest.mark.slow
def test_launch_sh_passes_its_flags_to_the_resume_line(run_dir):
    """Through launch.sh and accelerate launch: a fresh run into the unfinished run's folder is
    refused with a resume command that carries --num-processes and --config-file."""
    (run_dir / "out" / "tuner_finished.json").unlink()  # now an unfinished run
    config = run_dir / "accelerate.yaml"
    config.write_text(
        "compute_environment: LOCAL_MACHINE\ndistributed_type: 'NO'\nnum_machines: 1\n"
        "num_processes: 1\nmixed_precision: 'no'\nuse_cpu: true\n"
    )
    recipe = run_dir / "absolute.yaml"  # launch.sh runs from the repository root
    recipe.write_text(yaml.safe_dump(base_raw(str(run_dir))))
    env = {k: v for k, v in os.environ.items() if k not in ("TUNER_NUM_PROCESSES", "WORLD_SIZE")}
    result = subprocess.run(
        [
            str(REPO / "launch.sh"),
            "--num-processes",
            "1",
            "--config-file",
            str(config),
            str(recipe),
        ],
        env={
            **env,
            "OMP_NUM_THREADS": "1",
            "PATH": f"{Path(sys.executable).parent}:" + env.get("PATH", ""),
        },
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: output.dir")]
    assert len(lines) == 1, result.stderr[-3000:]
    assert (
        f"resume it with: ./launch.sh --num-processes 1 --config-file {config} {recipe} "
        "train.resume=latest;" in lines[0]
    )
