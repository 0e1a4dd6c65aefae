"""`tuner bench RECIPE --bare`: the full training step beside a bare one on the same loaded
model, adapter, batch, dtype and optimizer, and their ratio (`loop_overhead`).

The bare step is what the model costs: cached latents and text already in device memory, the
objective's noise, one `family.predict`, the loss, backward, the optimizer's own step and
zero_grad. Everything else the real step does (data loading, the NaN guard, clipping,
accelerate's wrappers, the progress bar, logging, checkpoint checks) is loop overhead.
"""

from __future__ import annotations

import contextlib
import statistics
import time

import torch

from tuner.objectives.common import weighted_loss


def device_sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clocks() -> tuple[float, float]:
    """Wall time and this process's CPU time (all its threads). On a shared CPU the CPU time
    is the steadier measure of the work a step does; on a GPU only wall time means anything."""
    return time.perf_counter(), time.process_time()


def per_step(start: tuple, end: tuple, steps: int) -> tuple[float, float]:
    return ((end[0] - start[0]) / steps, (end[1] - start[1]) / steps)


class BareSteps:
    """Alternates windows: the real loop runs `window` steps between two log points, then a
    window of bare steps runs at the log point (outside the full window's clock). Alternating
    at the seconds scale keeps load that comes and goes on a shared machine out of the ratio."""

    def __init__(self, warmup: int, window: int):
        self.warmup, self.window = warmup, window
        self.full: list[tuple] = []  # per-step (wall, cpu) seconds of each window
        self.bare: list[tuple] = []
        self.step = None
        self.mark = (0, clocks())  # (step, clocks) where the running full window started

    @contextlib.contextmanager
    def around(self, run):
        self.step = bare_step(run)
        self.device = run.accelerator.device
        for _ in range(self.warmup):
            self.step()
        run.stats["at_log"] = self.at_log
        yield

    def at_log(self, step: int) -> None:
        """Called by the loop at each log point, after its own sync."""
        now = clocks()
        start_step, start = self.mark
        if start_step >= self.warmup and step > start_step:
            self.full.append(per_step(start, now, step - start_step))
        if step >= self.warmup:
            self.bare += time_windows(self.step, 1, self.window, self.device)
        self.mark = (step, clocks())


BARE_BATCHES = 8  # the bare step cycles through these (see bare_step)


def bare_step(run, batches: int = BARE_BATCHES):
    """A closure doing one bare step. It cycles through the stream's next `batches` batches,
    held in device memory: families whose work depends on the batch's content (prompt masks
    trimmed to the captions' real lengths: Z-Image, Qwen-Image) would otherwise time one
    batch's captions against the stream's mix, and the ratio would say more about that batch
    than about the loop."""
    device = run.accelerator.device
    held = [device_batch(next(run.batches), device) for _ in range(batches)]
    generator = torch.Generator(device).manual_seed(run.recipe.train.seed)
    optimizer = getattr(run.optimizer, "optimizer", run.optimizer)  # not accelerate's wrapper
    turn = iter(range(10**12))

    def step() -> None:
        bare_loss(run, held[next(turn) % len(held)], generator).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def bare_loss(run, batch: dict, generator: torch.Generator) -> torch.Tensor:
    """The bare step's loss: the objective's noise, one family.predict under the recipe's
    autocast, the weighted loss; none of the loop's own work."""
    share = (run.accelerator.process_index, run.accelerator.num_processes)
    inputs = run.objective.sample(batch["latents"], generator, share)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(run.recipe.train.mixed_precision)
    autocast = torch.autocast(run.accelerator.device.type, dtype=dtype) if dtype else None
    with autocast or contextlib.nullcontext():
        pred = run.family.predict(run.comps, inputs.noisy, inputs.timesteps, batch["cond"], batch)
    return weighted_loss(
        pred, inputs.target, inputs.weight, run.objective.loss, inputs.huber_c
    ).mean()


def device_batch(batch: dict, device: torch.device) -> dict:
    if "latents" not in batch or "cond" not in batch:
        raise ValueError("--bare needs cached latents and text (data.cache=true)")
    latents = batch["latents"].to(device).float()
    cond = {k: v.to(device) for k, v in batch["cond"].items()}
    return {**batch, "latents": latents, "cond": cond}


def time_windows(step, windows: int, window: int, device: torch.device) -> list[float]:
    seconds = []
    for _ in range(windows):
        device_sync(device)
        start = clocks()
        for _ in range(window):
            step()
        device_sync(device)
        seconds.append(per_step(start, clocks(), window))
    return seconds


def compare(full: list[tuple], bare: list[tuple]) -> dict:
    """Medians over the windows; loop_overhead from wall time, loop_overhead_cpu from CPU time."""
    wall = [statistics.median(w for w, _ in runs) for runs in (full, bare)]
    cpu = [statistics.median(c for _, c in runs) for runs in (full, bare)]
    return {
        "full_ms_per_step": round(wall[0] * 1e3, 2),
        "bare_ms_per_step": round(wall[1] * 1e3, 2),
        "loop_overhead": round(wall[0] / wall[1], 3),
        "full_cpu_ms_per_step": round(cpu[0] * 1e3, 2),
        "bare_cpu_ms_per_step": round(cpu[1] * 1e3, 2),
        "loop_overhead_cpu": round(cpu[0] / cpu[1], 3),
        "windows": {"full": len(full), "bare": len(bare)},
    }


def summary_line(result: dict) -> str:
    return (
        f"full step {result['full_ms_per_step']:.2f} ms, bare step "
        f"{result['bare_ms_per_step']:.2f} ms (median of {result['windows']['full']} and "
        f"{result['windows']['bare']} windows), loop_overhead={result['loop_overhead']:.3f}x "
        f"(CPU time: {result['full_cpu_ms_per_step']:.2f} vs {result['bare_cpu_ms_per_step']:.2f}"
        f" ms, loop_overhead_cpu={result['loop_overhead_cpu']:.3f}x)"
    )
