"""Validation loss (`data.validation`, `train.validate_every`) and the best checkpoint
(`output.keep_best`).

Held-out images are either their own dataset entries or a `split` fraction of the training
images, chosen by a seeded hash of each image's content (so the choice does not depend on
order, folder layout or repeats). Every evaluation uses the same noise and the same timesteps
for each image (drawn from generators seeded by the image's hash and VALIDATION_DRAWS fixed
draw numbers), no flip, no caption dropout, the adapter in eval mode: the curve is comparable
across evaluations, runs with the same validation set, and resumes.

The best evaluation's state is written to `best/` in output.dir (a complete checkpoint:
adapter, optimizer and loop state, its validation loss in tuner_state.json). Retention
(output.keep) never deletes it; it is replaced only by a lower validation loss.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
from pathlib import Path

import torch

from tuner import files
from tuner.data.dataset import TrainDataset, collate
from tuner.data.items import collect_items
from tuner.errors import TunerError
from tuner.training import checkpoint

log = logging.getLogger("tuner")
BEST_DIR = "best"
CURVE_FILE = "validation.json"  # [{"step": N, "loss": L}, ...] of this run
VALIDATION_DRAWS = 4  # (noise, timestep) draws per image: fixed, averaged
BEST_KEY = "best_validation_loss"  # in each checkpoint's state, so a resume knows the best


def held_out(recipe, items: list, skip_dirs: dict) -> tuple[list, list]:
    """(training items, validation items). Validation items are distinct images (no repeats)."""
    validation = recipe.data.validation
    if validation is None:
        return items, []
    if isinstance(validation, list):
        data = recipe.data.model_copy(update={"datasets": validation})
        held, _ = collect_items(data, skip_dirs=skip_dirs)
        return items, distinct(held)
    picked = {
        item.image_hash
        for item in items
        if item.role == "instance" and in_split(item.image_hash, validation)
    }
    train = [item for item in items if item.image_hash not in picked]
    held = distinct([item for item in items if item.image_hash in picked])
    images = len({item.image_hash for item in items})
    if not held or not train:
        raise TunerError(
            f"data.validation.split {validation.split} of {images} training images holds out "
            f"{len(held)}, leaving {images - len(held)} to train on; change split (or seed), "
            "or list held-out data.validation entries"
        )
    return train, held


def in_split(image_hash: str, validation) -> bool:
    value = hashlib.sha256(f"{validation.seed}/{image_hash}".encode()).digest()
    return int.from_bytes(value[:8], "big") / 2**64 < validation.split


def distinct(items: list) -> list:
    seen, out = set(), []
    for item in items:
        key = (item.image_hash, item.size, item.caption, item.mask_hash)
        if key not in seen:
            seen.add(key)
            out.append(item)
    return out


class Validation:
    """Evaluates the held-out loss every train.validate_every steps; keeps the best state."""

    def __init__(self, run, items: list, plan, resume_from: Path | None):
        data = run.recipe.data.model_copy(
            update={"flip": False, "caption_dropout": 0.0, "shuffle_tags": False}
        )
        self.items, self.every = items, run.recipe.train.validate_every
        self.dataset = TrainDataset(items, data, plan, run.recipe.train.seed)
        self.best = math.inf
        if resume_from is not None:
            self.best = checkpoint.read_state(resume_from).get(BEST_KEY, math.inf)
        run.record.pop(BEST_KEY, None)
        if math.isfinite(self.best):
            run.record[BEST_KEY] = self.best

    def after_step(self, run, step: int, bar) -> None:
        if step % self.every:
            return
        if run.accelerator.is_main_process:
            loss = self.evaluate(run)
            log.info("step %d: validation loss %.6g (%d images)", step, loss, len(self.items))
            run.stats["shown"] = {"val_loss": loss}  # log_progress shows it from now on
            shown = {**run.stats.get("postfix", {}), "val_loss": loss}
            bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()})
            run.accelerator.log({"val_loss": loss}, step=step)
            record_curve(run.output_dir, step, loss)
            if loss < self.best:
                self.best = loss
                run.record[BEST_KEY] = loss
                if run.recipe.output.keep_best:
                    write_best(run, loss)
        run.accelerator.wait_for_everyone()

    @torch.no_grad()
    def evaluate(self, run) -> float:
        """Mean loss over the held-out images and VALIDATION_DRAWS fixed draws each."""
        from tuner.training.loop import per_sample_loss

        device = run.accelerator.device
        modes = {name: module.training for name, module in run.trained.items()}
        for module in run.trained.values():
            module.eval()  # no adapter dropout: the loss is a function of the weights
        total = torch.zeros((), device=device, dtype=torch.float64)
        try:
            for item in self.items:
                batch = collate([[self.dataset.sample(item, random.Random(0), is_prior=False)]])
                for draw in range(VALIDATION_DRAWS):
                    generator = fixed_generator(item, draw, device)
                    if "latents" not in batch:  # uncached: the VAE's draw is fixed too
                        pixels = batch["pixels"].to(device)
                        batch["latents"] = run.family.encode_images(run.comps, pixels, generator)
                    loss = per_sample_loss(
                        run.recipe,
                        run.family,
                        run.comps,
                        run.objective,
                        batch,
                        generator,
                        run.accelerator,
                        (0, 1),
                    )
                    total += loss.double().sum()
        finally:
            for name, module in run.trained.items():
                module.train(modes[name])
        return float(total.item() / (len(self.items) * VALIDATION_DRAWS))


def fixed_generator(item, draw: int, device) -> torch.Generator:
    seed = int(
        hashlib.sha256(f"{item.image_hash}/{item.size}/{draw}".encode()).hexdigest()[:10], 16
    )  # small: streams() multiplies it
    return torch.Generator(device).manual_seed(seed)


def record_curve(output_dir: Path, step: int, loss: float) -> None:
    """validation.json: this run's curve (a resumed run drops the points past its restart)."""
    path = Path(output_dir) / CURVE_FILE
    try:
        points = json.loads(path.read_text())
    except (OSError, ValueError):
        points = []
    points = [p for p in points if isinstance(p, dict) and p.get("step", 0) < step]
    files.write_json(path, points + [{"step": step, "loss": loss}])


def write_best(run, loss: float) -> Path:
    """best/: a complete checkpoint of this step, replacing the previous best atomically."""
    final = Path(run.output_dir) / BEST_DIR
    state = {**run.state, **run.record, "validation_loss": loss}
    try:
        with files.write_folder(final) as tmp:
            checkpoint.write_state_files(run, tmp)
            files.write_json(tmp / checkpoint.STATE_FILE, state)
    except files.WriteError as exc:
        raise checkpoint.CheckpointError(
            f"could not save the best checkpoint ({exc.reason}); free space and resume with "
            f"{run.recipe.command('train.resume=latest')}"
        ) from exc
    log.info("step %d: best validation loss so far; saved to %s", run.state["step"], final)
    return final
