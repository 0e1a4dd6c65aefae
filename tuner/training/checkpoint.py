"""Checkpoints: atomic folders `checkpoints/step-NNNNNN/`, retention, and finding `latest`.

A checkpoint is written into a hidden temporary folder and renamed into place only when complete,
so `latest` never picks a half-written one, and an interrupted save loses nothing older.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from tuner import files
from tuner.errors import TunerError

STEP_DIR = re.compile(r"^step-(\d{6,})$")
STATE_FILE = "tuner_state.json"
# The loop state in tuner_state.json; the rest of it is the run id, recipe and data record.
LOOP_KEYS = ("step", "epoch", "position", "applied")


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """Finished checkpoints, oldest first."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [
        p
        for p in root.iterdir()
        if p.is_dir() and STEP_DIR.match(p.name) and (p / STATE_FILE).is_file()
    ]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def resolve_resume(resume: str | None, output_dir: Path) -> Path | None:
    if not resume:
        return None
    if resume == "latest":
        found = complete_checkpoints(output_dir)
        if not found:
            return None  # nothing saved yet: start fresh, which is what the user meant
        return found[-1]
    path = Path(resume).expanduser()
    if not (path / STATE_FILE).is_file():
        raise TunerError(
            f"train.resume: {resume} is not a complete tuner checkpoint folder; "
            "use 'latest' or a checkpoints/step-NNNNNN folder"
        )
    return path


def read_state(checkpoint: Path) -> dict:
    return json.loads((checkpoint / STATE_FILE).read_text())


class CheckpointError(TunerError):
    """A checkpoint could not be written; earlier ones are intact."""


def write_checkpoint(
    output_dir: Path, step: int, save_contents, state: dict, is_main: bool, keep: int
) -> Path:
    """save_contents(tmp_dir) writes everything; then the folder is published atomically
    (tuner.files.write_folder: a failed write leaves no `.tmp-step-*` folder behind)."""
    root = Path(output_dir) / "checkpoints"
    final = root / step_dir_name(step)
    try:
        if is_main:
            with files.write_folder(final) as tmp:
                save_contents(tmp)
                files.write_json(tmp / STATE_FILE, state)
            prune(output_dir, keep, state.get("run_id"))
        else:
            save_contents(root / f".tmp-{final.name}")
    except files.WriteError as exc:  # disk full, quota, permissions: earlier checkpoints stay
        previous = complete_checkpoints(output_dir)
        kept = f"the last complete checkpoint is {previous[-1]}" if previous else "none saved yet"
        error = CheckpointError(
            f"could not save checkpoint {final.name} ({exc.reason}); "
            f"{kept}; free space and resume with train.resume=latest"
        )
        error.reason, error.previous = exc.reason, previous[-1] if previous else None
        raise error from exc
    return final


def prune(output_dir: Path, keep: int, run_id: str | None = None) -> None:
    """Keep the run's newest `keep` checkpoints. Only the checkpoints of the run that writes
    (same run id; None: those that record none) are ever deleted."""
    own = [p for p in complete_checkpoints(output_dir) if _run_id_of(p) == run_id]
    for old in own[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def _run_id_of(folder: Path) -> str | None:
    try:
        return read_state(folder).get("run_id")
    except (OSError, ValueError):
        return "<unreadable>"  # never ours: left alone


# --- what a checkpoint holds --------------------------------------------------------------


def save_training_state(run) -> Path | None:
    """LoRA weights (PEFT names, for resuming, and a diffusers-format adapter, for using),
    optimizer (8-bit states included), LR schedule, grad scaler and RNG states. Written by the
    main process (every process joins the barrier); a checkpoint that cannot be written to
    output.dir is written to the rescue folder instead (see save_or_rescue)."""
    from tuner.training.sharding import gathered

    accelerator, final, error = run.accelerator, None, None
    with gathered(run):  # FSDP: every process gathers, the main one writes
        if accelerator.is_main_process:
            try:
                final = save_or_rescue(run)
            except TunerError as exc:
                error = exc
    accelerator.wait_for_everyone()
    if error is not None:
        raise error
    return final


def write_training_state(run, output_dir: Path) -> Path:
    """One checkpoint of the run's current state under output_dir/checkpoints (main process)."""
    return write_checkpoint(
        output_dir,
        run.state["step"],
        lambda folder: write_state_files(run, folder),
        {**run.state, **run.record},
        True,
        run.recipe.output.keep,
    )


def write_state_files(run, folder: Path) -> None:
    """Everything a checkpoint holds but its tuner_state.json."""
    from tuner.adapters import lora
    from tuner.training import ema

    lora.save_adapter(folder, run.family, run.trained)
    weights = {
        f"{name}::{k}": v.detach().cpu().contiguous()
        for name, module in run.trained.items()
        for k, v in lora.peft_state(module).items()
    }
    files.save_safetensors(weights, folder / "lora_state.safetensors")
    scaler = run.accelerator.scaler.state_dict() if run.accelerator.scaler else None
    files.torch_save(
        {
            "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(),
            "rng": rng_state(),
            "scaler": scaler,
        },
        folder / "training_state.pt",
    )
    ema.save_state(run.ema, folder)


def rescue_dir(output_dir: Path) -> Path:
    """Where a checkpoint goes when output.dir cannot take it: $TUNER_RESCUE_DIR, else the
    system temp folder (usually another filesystem than a full data disk)."""
    import hashlib
    import tempfile

    base = os.environ.get("TUNER_RESCUE_DIR") or tempfile.gettempdir()
    tag = hashlib.sha256(str(Path(output_dir).resolve()).encode()).hexdigest()[:8]
    return Path(base) / "tuner-rescue" / f"{Path(output_dir).name}-{tag}"


def save_or_rescue(run) -> Path:
    """The checkpoint in output.dir; failing that, in rescue_dir, and the error line says where
    the weights are and how to resume from them. The trained state is never just dropped."""
    try:
        return write_training_state(run, run.output_dir)
    except CheckpointError as exc:
        failed = exc
    rescue = rescue_dir(run.output_dir)
    try:
        saved = write_training_state(run, rescue)
    except CheckpointError as again:
        raise CheckpointError(
            f"{failed}; a copy in {rescue} failed too ({again.reason}), so step "
            f"{run.state['step']} is lost"
        ) from again
    step = step_dir_name(run.state["step"])
    raise CheckpointError(
        f"could not save checkpoint {step} ({failed.reason}) in {run.output_dir}; the trained "
        f"weights were saved to {saved} instead: free space and resume with: "
        f"{run.recipe.command(f'train.resume={saved}')}"
    ) from failed


def keep_final_weights(run, exc: Exception) -> TunerError:
    """The final outputs could not be written: make sure a checkpoint of the final step exists
    (writing one, or a rescue copy, if needed) and return the line that says where it is."""
    step = run.state["step"]
    done = [p for p in complete_checkpoints(run.output_dir) if read_state(p)["step"] == step]
    what = f"final outputs not complete: {exc}"
    if not done:
        try:
            done = [save_or_rescue(run)]
        except CheckpointError as rescued:
            return TunerError(f"{what}; {rescued}")
    return TunerError(
        f"{what}; checkpoint {done[-1].name} holds the trained weights: free space and resume "
        f"with: {run.recipe.command('train.resume=latest')} (it only writes the outputs)"
    )


def load_training_state(folder: Path, run) -> dict:
    """Restore a checkpoint into the run's already-injected adapters; returns the loop state.

    The optimizer's hyperparameters come from the run's recipe, not the checkpoint: a resumed
    recipe's new lr, weight decay, betas or schedule take effect. The schedule is the new
    recipe's, continued at the checkpoint's step: lr = new base lr x schedule(step)."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    from tuner.training import sharding

    lora = load_file(str(folder / "lora_state.safetensors"))
    for name, module in run.trained.items():
        prefix = f"{name}::"
        weights = {k[len(prefix) :]: v for k, v in lora.items() if k.startswith(prefix)}
        # Loads into the adapter already injected: resuming never adds a second adapter.
        set_peft_model_state_dict(module, sharding.cut_lora_state(module, weights))
    # weights_only: a checkpoint path comes from the user, so nothing in it may run code.
    saved = torch.load(folder / "training_state.pt", map_location="cpu", weights_only=True)
    recipe_groups = [
        {k: group[k] for k in ("initial_lr", "betas", "eps", "weight_decay") if k in group}
        for group in run.optimizer.param_groups
    ]
    run.optimizer.load_state_dict(saved["optimizer"])
    sharding.cut_optimizer_state(run.optimizer)
    run.scheduler.load_state_dict(saved["scheduler"])
    apply_recipe_schedule(run.optimizer, run.scheduler, recipe_groups)
    restore_rng_state(saved["rng"])
    from tuner.training import ema

    ema.load_state(run.ema, folder)
    if saved.get("scaler") and run.accelerator.scaler:
        run.accelerator.scaler.load_state_dict(saved["scaler"])
    state = read_state(folder)
    state.setdefault("applied", state["step"])  # checkpoints from before the count
    return {key: state[key] for key in LOOP_KEYS}


def apply_recipe_schedule(optimizer, scheduler, recipe_groups: list[dict]) -> None:
    """Put the recipe's hyperparameters back after loading a checkpoint (which restored its
    own): base lrs, betas, eps, weight decay; then the lr the schedule gives at the restored
    step (the lambdas are the new recipe's: load_state_dict keeps function lambdas)."""
    for group, values in zip(optimizer.param_groups, recipe_groups):
        group.update(values)
    if "initial_lr" not in recipe_groups[0] or not hasattr(scheduler, "lr_lambdas"):
        return  # not a LambdaLR (every diffusers schedule is one)
    scheduler.base_lrs = [values["initial_lr"] for values in recipe_groups]
    step = scheduler.last_epoch
    lrs = [base * fn(step) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs


def rng_state() -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    # Plain types and tensors only, so the file loads with torch.load(weights_only=True).
    state = {
        "python": random.getstate(),
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
