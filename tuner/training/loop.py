"""The step loop: batch -> loss -> backward -> update (training.update: all-reduce, clip, NaN
guard, step) -> log, checkpoint, sample. Everything a step needs travels in one `Run`."""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from tuner.adapters import lora
from tuner.errors import TunerError
from tuner.objectives.common import elementwise_loss, weighted_loss
from tuner.objectives.masks import masked_mean
from tuner.training import checkpoint, update
from tuner.training.optim import eval_weights, train_mode

log = logging.getLogger("tuner")


@dataclass
class Run:
    """One training run's live objects."""

    recipe: object
    accelerator: object
    family: object
    comps: object
    trained: dict
    optimizer: object
    scheduler: object
    objective: object
    batches: object
    output_dir: Path
    count_flops: bool = False  # count the first step's FLOPs (benchmarks' MFU)
    ema: object = None  # training.ema.AdapterEma with train.ema
    validation: object = None  # training.validation.Validation with data.validation
    # applied: steps whose update was applied (not skipped as non-finite)
    state: dict = field(
        default_factory=lambda: {"step": 0, "epoch": 0, "position": 0, "applied": 0}
    )
    record: dict = field(default_factory=dict)  # what each checkpoint records: run id, recipe, data
    stats: dict = field(default_factory=lambda: {"log_times": [], "flops": None})

    # Steps whose NaN-guard flag is still on the device: (step, flag). See guard_on_device.
    pending: list = field(default_factory=list)

    @functools.cached_property
    def params(self) -> list[torch.nn.Parameter]:
        # Built once: walking every module's parameters each step cost ~1 % of a toy step.
        return [p for m in self.trained.values() for p in lora.trainable_parameters(m)]


def compute_loss(recipe, family, comps, objective, batch, generator, accelerator):
    """Loss of one micro-batch: instance mean + prior_loss_weight * prior mean."""
    share = (accelerator.process_index, accelerator.num_processes)
    per_sample = per_sample_loss(
        recipe, family, comps, objective, batch, generator, accelerator, share
    )
    if recipe.dreambooth is None or not recipe.dreambooth.with_prior_preservation:
        return per_sample.mean()  # every sample is an instance
    # Masked means, not per_sample[mask]: boolean indexing waits for the device (a host sync).
    is_prior = batch["is_prior"].to(accelerator.device, non_blocking=True).to(per_sample.dtype)
    instance = (per_sample * (1 - is_prior)).sum() / (1 - is_prior).sum()
    prior = (per_sample * is_prior).sum() / is_prior.sum()
    return instance + recipe.dreambooth.prior_loss_weight * prior


def per_sample_loss(recipe, family, comps, objective, batch, generator, accelerator, share):
    """Each sample's (weighted, masked) loss, shape (batch,); share = (rank, world) of the
    global batch's noise draw."""
    device = accelerator.device
    if "latents" in batch:
        latents = batch["latents"].to(device, non_blocking=True)
    else:
        with torch.no_grad():
            latents = family.encode_images(comps, batch["pixels"].to(device, non_blocking=True))
    if "cond" in batch:
        cond = {k: v.to(device, non_blocking=True) for k, v in batch["cond"].items()}
    else:
        with torch.set_grad_enabled(recipe.adapter.text_encoder):
            # a VL prompt encoder reads the batch's reference images with its captions
            seen = {"references": batch["references"]} if "references" in batch else {}
            cond = family.encode_prompts(comps, batch["captions"], **seen)
    inputs = objective.sample(latents.float(), generator, share)
    with accelerator.autocast():
        pred = family.predict(comps, inputs.noisy, inputs.timesteps, cond, batch)
    if "mask" in batch:  # masked loss (data.datasets[].mask_dir, data.alpha_mask)
        mask = batch["mask"].to(device, non_blocking=True)
        error = elementwise_loss(pred, inputs.target, objective.loss.kind, inputs.huber_c)
        return masked_mean(error, inputs.weight, mask, recipe.data.unmasked_weight)
    return weighted_loss(pred, inputs.target, inputs.weight, objective.loss, inputs.huber_c)


def run_steps(run: Run) -> None:
    train_cfg = run.recipe.train
    stopper = GracefulStop()
    running = torch.zeros((), device=run.accelerator.device)
    started, first = time.perf_counter(), run.state["step"]
    run.stats.setdefault("bad_steps", 0)
    bar = tqdm(
        total=train_cfg.steps,
        initial=run.state["step"],
        desc="training",
        unit="step",
        disable=not run.accelerator.is_main_process,
    )
    for model in run.trained.values():
        model.train()
    if run.state["step"] < train_cfg.steps:
        train_mode(run.optimizer)  # schedule-free: from the evaluation weights checkpoints hold
    try:  # the bar is closed before any error line, so that line is the last one printed
        while run.state["step"] < train_cfg.steps:
            step = run.state["step"] + 1
            run.pending.append((step, train_one_step(run, running)))
            save_now = run.recipe.output.save_every and step % run.recipe.output.save_every == 0
            if update.needs_settling(run, step, save_now):
                update.settle_guard(run)
            run.scheduler.step()
            stop_text_encoder_training(run, step)
            if run.ema is not None:
                run.ema.update(step)
            bar.update(1)
            log_progress(run, step, running, bar)
            if run.validation is not None and step % run.validation.every == 0:
                update.settle_guard(run)  # keep_best writes a checkpoint
                with eval_weights(run.optimizer):  # schedule-free: its evaluation weights
                    run.validation.after_step(run, step, bar)
            stop = stop_everywhere(run, stopper.requested)
            sample_now = sampling_due(run, step)
            if save_now or stop or sample_now:
                # One switch to a schedule-free optimizer's evaluation weights for both: the
                # checkpoint holds them, and a resumed run switches back exactly as this one.
                with eval_weights(run.optimizer, stay=step == train_cfg.steps):
                    if save_now or stop:
                        update.settle_guard(run)  # the checkpoint records how many updates applied
                        checkpoint.save_training_state(run)
                    if sample_now:
                        sample_during_training(run, step)
            if stop:
                raise Stopped(
                    f"stopped by {stopper.signal_name or 'a signal'} at step {step}; resume with: "
                    f"{run.recipe.command('train.resume=latest')}"
                )
        update.settle_guard(run)
    finally:
        bar.close()
    if run.state.get("applied", run.state["step"]) == 0:
        # Nothing trained: an adapter marked finished would be the untrained initialization.
        raise TunerError(
            f"all {run.state['step']} steps had non-finite loss/gradients and were skipped; "
            "no adapter was written. Lower train.lr, or use bf16 instead of fp16"
        )
    done, took = run.state["step"] - first, time.perf_counter() - started
    if first and done > 0:  # resumed: say which steps this run trained
        log.info("trained steps %d-%d in %.1fs", first + 1, run.state["step"], took)
    elif first:
        log.warning(
            "no steps to train: the checkpoint is at step %d and train.steps is %d",
            first,
            train_cfg.steps,
        )
    else:
        log.info("trained %d steps in %.1fs", done, took)


def train_one_step(run: Run, running: torch.Tensor):
    """All micro-batches of one optimizer step. Returns whether the update was applied: a bool,
    or the device flag when the skip was decided on the device (see guarded_step)."""
    train_cfg, accelerator = run.recipe.train, run.accelerator
    step, outcome = run.state["step"], True
    for micro in range(train_cfg.grad_accum):
        batch = next(run.batches)
        generator = step_generator(run, step, micro)
        count = step == 0 and micro == 0 and run.count_flops
        with accelerator.accumulate(), flop_counter(run.stats, count):
            loss = compute_loss(
                run.recipe, run.family, run.comps, run.objective, batch, generator, accelerator
            )
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                outcome = update.guarded_step(run, update.finish_gradients(run, loss))
                update.stepper(run).zero_grad(set_to_none=True)
        running += loss.detach() / train_cfg.grad_accum
    run.state.update(step=step + 1, epoch=batch["epoch"], position=batch["position"])
    return outcome


def step_generator(run: Run, step: int, micro: int) -> torch.Generator:
    # One generator per (seed, step, micro), the same on every process (each keeps its
    # slice of the global draw): resumed and multi-process runs draw the same noise.
    return torch.Generator(run.accelerator.device).manual_seed(
        run.recipe.train.seed * 1_000_003 + step * 101 + micro * 7
    )


def stop_text_encoder_training(run: Run, step: int) -> None:
    if step > math.ceil(run.recipe.adapter.text_encoder_stop * run.recipe.train.steps):
        for group in run.optimizer.param_groups:
            if group.get("name") != "denoiser":
                group["lr"] = 0.0  # text-encoder training is over (adapter.text_encoder_stop)


def log_progress(run: Run, step: int, running: torch.Tensor, bar) -> None:
    every = run.recipe.log.every
    if step % every and step != run.recipe.train.steps:
        return
    logs = {"loss": (running / every).item(), "lr": run.scheduler.get_last_lr()[0]}
    if run.accelerator.device.type == "cuda":
        logs["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    run.stats["log_times"].append((step, time.perf_counter()))
    run.stats["postfix"] = logs
    shown = {**logs, **run.stats.get("shown", {})}  # + the last validation loss
    bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()})
    run.accelerator.log(logs, step=step)
    running.zero_()
    if "at_log" in run.stats:  # `tuner bench --bare` times its bare windows here
        run.stats["at_log"](step)


def sampling_due(run: Run, step: int) -> bool:
    every = run.recipe.sample.every
    # The final grid is made with the outputs.
    return bool(every) and step % every == 0 and step < run.recipe.train.steps


def sample_during_training(run: Run, step: int) -> None:
    if not sampling_due(run, step):
        return
    if run.accelerator.is_main_process:
        from tuner.inference.grids import training_grid

        training_grid(
            run.recipe, run.output_dir, run.family, run.comps, step, run.accelerator, ema=run.ema
        )
    run.accelerator.wait_for_everyone()


@contextlib.contextmanager
def flop_counter(stats: dict, enabled: bool):
    """Count the FLOPs of one forward+backward (benchmarks' MFU); a no-op otherwise."""
    if not enabled:
        yield
        return
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        yield
    stats["flops"] = float(counter.get_total_flops())


def stop_everywhere(run: Run, requested: bool) -> bool:
    """Every process stops after the same step: a signal reaches the processes at different
    moments, and one that saved while another ran on would wait at different collectives."""
    if run.accelerator.num_processes == 1:
        return requested
    flag = torch.tensor(float(requested), device=run.accelerator.device)
    return bool(run.accelerator.reduce(flag, reduction="sum").item() > 0)


class Stopped(TunerError):
    """Stopped by a signal after saving a checkpoint; every process raises it, rank 0 prints."""


class GracefulStop:
    """SIGINT/SIGTERM finish the current step, save a checkpoint, and exit with a resume line."""

    def __init__(self):
        self.requested, self.signal_name = False, ""
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread (e.g. a notebook worker)
                signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt  # a second Ctrl+C means "now"
        self.requested, self.signal_name = True, signal.Signals(signum).name
