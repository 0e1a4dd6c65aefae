"""The step loop: batch -> loss -> backward -> (all-reduce, clip, NaN guard) -> step -> log,
checkpoint, sample. Everything a step needs travels in one `Run`."""

from __future__ import annotations

import contextlib
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
from tuner.objectives.common import weighted_mse
from tuner.training import checkpoint, sharding

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
    # applied: steps whose update was applied (not skipped as non-finite)
    state: dict = field(
        default_factory=lambda: {"step": 0, "epoch": 0, "position": 0, "applied": 0}
    )
    record: dict = field(default_factory=dict)  # what each checkpoint records: run id, recipe, data
    stats: dict = field(default_factory=lambda: {"log_times": [], "flops": None})

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return [p for m in self.trained.values() for p in lora.trainable_parameters(m)]


def compute_loss(recipe, family, comps, objective, batch, generator, accelerator):
    """Loss of one micro-batch: instance mean + prior_loss_weight * prior mean."""
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
            cond = family.encode_prompts(comps, batch["captions"])
    share = (accelerator.process_index, accelerator.num_processes)
    inputs = objective.sample(latents.float(), generator, share)
    with accelerator.autocast():
        pred = family.predict(comps, inputs.noisy, inputs.timesteps, cond, batch)
    per_sample = weighted_mse(pred, inputs.target, inputs.weight)
    is_prior = batch["is_prior"].to(device, non_blocking=True)
    instance = per_sample[~is_prior].mean()
    if recipe.dreambooth is None or not recipe.dreambooth.with_prior_preservation:
        return instance
    return instance + recipe.dreambooth.prior_loss_weight * per_sample[is_prior].mean()


def run_steps(run: Run) -> None:
    train_cfg = run.recipe.train
    stopper = GracefulStop()
    running = torch.zeros((), device=run.accelerator.device)
    bad_steps, started, first = 0, time.perf_counter(), run.state["step"]
    bar = tqdm(
        total=train_cfg.steps,
        initial=run.state["step"],
        desc="training",
        unit="step",
        disable=not run.accelerator.is_main_process,
    )
    for model in run.trained.values():
        model.train()
    try:  # the bar is closed before any error line, so that line is the last one printed
        while run.state["step"] < train_cfg.steps:
            step = run.state["step"] + 1
            finite = train_one_step(run, running)
            bad_steps = 0 if finite else bad_steps + 1
            if finite:
                run.state["applied"] = run.state.get("applied", step - 1) + 1
            else:
                check_non_finite(run, step, bad_steps)
            run.scheduler.step()
            stop_text_encoder_training(run, step)
            bar.update(1)
            log_progress(run, step, running, bar)
            save_now = run.recipe.output.save_every and step % run.recipe.output.save_every == 0
            stop = stop_everywhere(run, stopper.requested)
            if save_now or stop:
                checkpoint.save_training_state(run)
            sample_during_training(run, step)
            if stop:
                raise Stopped(
                    f"stopped by {stopper.signal_name or 'a signal'} at step {step}; resume with: "
                    f"{run.recipe.command('train.resume=latest')}"
                )
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


def train_one_step(run: Run, running: torch.Tensor) -> bool:
    """All micro-batches of one optimizer step. Returns False if the step was skipped."""
    train_cfg, accelerator = run.recipe.train, run.accelerator
    step, finite = run.state["step"], True
    for micro in range(train_cfg.grad_accum):
        batch = next(run.batches)
        # One generator per (seed, step, micro), the same on every process (each keeps its
        # slice of the global draw): resumed and multi-process runs draw the same noise.
        generator = torch.Generator(accelerator.device).manual_seed(
            train_cfg.seed * 1_000_003 + step * 101 + micro * 7
        )
        count = step == 0 and micro == 0 and run.count_flops
        with accelerator.accumulate(), flop_counter(run.stats, count):
            loss = compute_loss(
                run.recipe, run.family, run.comps, run.objective, batch, generator, accelerator
            )
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                finite = finish_gradients(run, loss)
                if finite:
                    run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)
        running += loss.detach() / train_cfg.grad_accum
    run.state.update(step=step + 1, epoch=batch["epoch"], position=batch["position"])
    return finite


def finish_gradients(run: Run, loss: torch.Tensor) -> bool:
    """Average across processes, clip, and check that loss and gradients are finite."""
    params = run.params
    replicated = sharding.unsharded(params)  # FSDP reduced its own in backward
    if run.accelerator.num_processes > 1 and replicated:
        average_gradients(replicated, run.accelerator)
    grad_norm = None
    if run.recipe.train.max_grad_norm:
        grad_norm = sharding.clip_grad_norm(run.accelerator, params, run.recipe.train.max_grad_norm)
    return nan_guard_ok(loss, grad_norm)


def average_gradients(params: list[torch.nn.Parameter], accelerator) -> None:
    """Mean of the LoRA gradients over processes, in one flat all-reduce. The models are not
    wrapped in DDP: only LoRA weights train, so this is all DDP would do for them, and frozen
    or unused parameters can never trip DDP's unused-parameter check."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = accelerator.reduce(torch.cat([g.flatten() for g in grads]), reduction="mean")
    offset = 0
    for param, grad in zip(params, grads):
        param.grad = flat[offset : offset + grad.numel()].view_as(param).to(grad.dtype)
        offset += grad.numel()


def nan_guard_ok(loss, grad_norm) -> bool:
    # The one host sync per optimizer step: the same cost as fp16's GradScaler check.
    flag = torch.isfinite(loss)
    if grad_norm is not None:
        flag = flag & torch.isfinite(torch.as_tensor(grad_norm))
    return bool(flag.item())


def check_non_finite(run: Run, step: int, bad_steps: int) -> None:
    log.warning("step %d: non-finite loss or gradient; step skipped", step)
    if bad_steps >= run.recipe.train.nan_patience:
        raise TunerError(
            f"{bad_steps} steps in a row had non-finite loss/gradients; stopped. "
            "Lower train.lr, or use bf16 instead of fp16; the last good checkpoint "
            f"is in {run.output_dir / 'checkpoints'}"
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
    bar.set_postfix({k: f"{v:.4g}" for k, v in logs.items()})
    run.accelerator.log(logs, step=step)
    running.zero_()


def sample_during_training(run: Run, step: int) -> None:
    every = run.recipe.sample.every
    if not every or step % every or step >= run.recipe.train.steps:
        return  # the final grid is made with the outputs
    if run.accelerator.is_main_process:
        from tuner.inference.grids import training_grid

        training_grid(run.recipe, run.output_dir, run.family, run.comps, step, run.accelerator)
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
