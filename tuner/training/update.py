"""One optimizer update after backward: LoRA gradients averaged over processes, clipped, checked
for non-finite values (the NaN guard, on the host or the device), then the step; and the guard's
bookkeeping of applied and skipped steps. `run` is a training.loop.Run."""

from __future__ import annotations

import logging

import torch

from tuner.errors import TunerError
from tuner.training import sharding

log = logging.getLogger("tuner")


def finish_gradients(run, loss: torch.Tensor) -> torch.Tensor:
    """Average across processes, clip; returns the device flag 'loss and gradients finite'."""
    params = run.params
    replicated = sharding.unsharded(params)  # FSDP reduced its own in backward
    if run.accelerator.num_processes > 1 and replicated:
        average_gradients(replicated, run.accelerator)
    grad_norm = None
    if run.recipe.train.max_grad_norm:
        max_norm = run.recipe.train.max_grad_norm
        if len(replicated) < len(params):  # FSDP: the norm over every shard
            grad_norm = sharding.clip_grad_norm(run.accelerator, params, max_norm)
        else:
            grad_norm = clip_gradients(run, params, max_norm)
    return nan_guard_flag(loss, grad_norm)


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


def clip_gradients(run, params, max_norm: float) -> torch.Tensor:
    """Scale the gradients to a total norm of at most max_norm; returns the norm before. With
    fused AdamW the scale is its `grad_scale` input (the kernel divides each gradient by it),
    so clipping adds one norm pass and no pass of its own; otherwise torch's clipping, with
    foreach kernels also on the CPU (where torch's default is one kernel per tensor)."""
    if run.accelerator.scaler is not None:
        run.accelerator.unscale_gradients()  # fp16: clip the true gradients
    foreach = True if run.accelerator.device.type in ("cpu", "cuda") else None
    grads = [p.grad for p in params if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads, foreach=foreach)
    fused = fused_adamw(run)
    if fused is not None:  # the same coefficient as torch's clip_grads_with_norm_
        fused.grad_scale = ((total + 1e-6) / max_norm).clamp(min=1.0)
    else:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total, foreach=foreach)
    return total


def nan_guard_flag(loss, grad_norm) -> torch.Tensor:
    flag = torch.isfinite(loss)
    if grad_norm is not None:
        flag = flag & torch.isfinite(torch.as_tensor(grad_norm))
    return flag


def raw_optimizer(run):
    return getattr(run.optimizer, "optimizer", run.optimizer)  # inside accelerate's wrapper


def stepper(run):
    """The optimizer to call step/zero_grad on. Without fp16's GradScaler, accelerate's wrapper
    adds only its own checks (~0.25 ms a step: a package lookup per call, a signature
    inspection), so the loop calls torch's optimizer; with the scaler, the wrapper drives it."""
    return run.optimizer if run.accelerator.scaler is not None else raw_optimizer(run)


def fused_adamw(run):
    """torch's fused AdamW when the loop may drive its grad_scale/found_inf inputs itself (not
    with fp16, whose GradScaler owns them), else None."""
    optimizer = raw_optimizer(run)
    if run.accelerator.scaler is not None or type(optimizer) is not torch.optim.AdamW:
        return None
    return optimizer if optimizer.defaults.get("fused") else None


def guard_on_device(run) -> bool:
    """Skip a bad step without waiting for the GPU: fused AdamW takes a `found_inf` tensor and
    then leaves parameters and state untouched (GradScaler's mechanism). On the CPU reading the
    flag costs nothing (the step is already computed), so the CPU decides on the host."""
    return run.accelerator.device.type == "cuda" and fused_adamw(run) is not None


def guarded_step(run, flag: torch.Tensor):
    """The optimizer step unless `flag` says loss or gradients were non-finite."""
    fused = fused_adamw(run)
    try:
        if guard_on_device(run):
            fused.found_inf = (~flag).float()
            stepper(run).step()
            return flag  # read at the next settle_guard
        finite = bool(flag.item())
        if finite:
            stepper(run).step()
        return finite
    finally:
        if fused is not None:  # the inputs are this step's only
            fused.grad_scale = fused.found_inf = None


def needs_settling(run, step: int, save_now: bool) -> bool:
    """Flags left on the device are read at log points (which sync for the loss anyway), before
    checkpoints, and often enough that nan_patience still stops a run in time."""
    pending = run.pending
    if all(isinstance(outcome, bool) for _, outcome in pending):
        return True
    every = run.recipe.log.every
    return (
        save_now
        or step % every == 0
        or step == run.recipe.train.steps
        or len(pending) >= run.recipe.train.nan_patience
    )


def settle_guard(run) -> None:
    """Count the applied and skipped steps of the pending flags, in step order (one read)."""
    if not run.pending:
        return
    steps = [step for step, _ in run.pending]
    outcomes = [outcome for _, outcome in run.pending]
    run.pending.clear()
    if not all(isinstance(outcome, bool) for outcome in outcomes):
        outcomes = torch.stack([torch.as_tensor(o).reshape(()) for o in outcomes]).tolist()
    for step, finite in zip(steps, outcomes):
        if finite:
            run.stats["bad_steps"] = 0
            run.state["applied"] = run.state.get("applied", step - 1) + 1
        else:
            run.stats["bad_steps"] += 1
            check_non_finite(run, step, run.stats["bad_steps"])


def check_non_finite(run, step: int, bad_steps: int) -> None:
    log.warning("step %d: non-finite loss or gradient; step skipped", step)
    if bad_steps >= run.recipe.train.nan_patience:
        raise TunerError(
            f"{bad_steps} steps in a row had non-finite loss/gradients; stopped. "
            "Lower train.lr, or use bf16 instead of fp16; the last good checkpoint "
            f"is in {run.output_dir / 'checkpoints'}"
        )
