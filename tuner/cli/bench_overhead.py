"""What each piece of the training loop costs per step, timed one at a time on a loaded run.

    OMP_NUM_THREADS=1 python -m tuner.cli.bench_overhead recipes/quickstart.yaml [k=v ...]
    OMP_NUM_THREADS=1 python -m tuner.cli.bench_overhead recipes/quickstart.yaml --ladder

Loads the recipe's run as `tuner train` does (cached latents and text), then times, each in
isolation and as a median of repeats, the loop's own work around the model: the next batch from
the DataLoader, the per-step generator, accelerate's accumulate/autocast contexts, gradient
clipping, the NaN guard, the progress bar, logging and checkpoint checks. Shares are of the
bare step (tuner.cli.bench_bare). A measurement tool: it prints a table, it asserts nothing.

--ladder times the pieces in place instead: steps that add the loop's work to the bare step one
piece at a time, up to the loop's own `train_one_step`, in shuffled order each round. A piece
can cost more inside a step than alone (on tiny models the step's weights and the loop's
Python share the caches), and only the ladder sees that.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch


def timed(fn, repeats: int) -> float:
    """Median seconds of one call over `repeats` rounds of 5 calls."""
    rounds = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(5):
            fn()
        rounds.append((time.perf_counter() - start) / 5)
    return statistics.median(rounds)


def loop_sources(run) -> dict:
    """name -> a callable doing that piece of one step's loop work, as the loop does it."""
    from tqdm.auto import tqdm

    from tuner.training import loop, update

    params = run.params
    loss = torch.ones((), device=run.accelerator.device, requires_grad=False)
    bar = tqdm(total=10**9, disable=True)  # a disabled bar costs what a non-main process pays
    live_bar = tqdm(total=10**9, desc="training", leave=False, mininterval=0.1)
    running = torch.zeros((), device=run.accelerator.device)
    max_norm = run.recipe.train.max_grad_norm or 1.0
    every = run.recipe.log.every

    def accumulate_contexts():
        with run.accelerator.accumulate(), run.accelerator.autocast():
            pass

    sources = {
        "next batch (DataLoader + collate)": lambda: next(run.batches),
        "step generator": lambda: loop.step_generator(run, 7, 0),
        "accelerate accumulate+autocast": accumulate_contexts,
        "run.params list": lambda: run.params,
        "grad clip": lambda: update.clip_gradients(run, params, max_norm),
        "NaN guard (flag + read)": lambda: bool(update.nan_guard_flag(loss, None)),
        "tqdm update (shown)": lambda: live_bar.update(1),
        "tqdm update (hidden)": lambda: bar.update(1),
        "running loss": lambda: running.add_(loss.detach()),
        "log check (not a log step)": lambda: loop.log_progress(run, 2, running, bar),
        "checkpoint/stop/sample checks": lambda: (
            loop.stop_everywhere(run, False),
            loop.sample_during_training(run, 1),
        ),
        "scheduler.step": run.scheduler.step,
        # A log step's sync and tracker write, spread over the log.every steps it covers.
        "log step / log.every": lambda: loop.log_progress(run, every, running, bar),
    }
    return sources, live_bar


def measure(run, repeats: int) -> dict:
    from tuner.cli import bench_bare

    step = bench_bare.bare_step(run)
    for _ in range(3):
        step()
    for param in run.params:  # gradients present, as at clipping time
        param.grad = torch.randn_like(param)
    sources, live_bar = loop_sources(run)
    results = {name: timed(fn, repeats) for name, fn in sources.items()}
    results["log step / log.every"] /= run.recipe.log.every
    live_bar.close()
    windows = bench_bare.time_windows(step, repeats, 3, run.accelerator.device)
    results["bare step"] = statistics.median(wall for wall, _ in windows)
    return results


def ladder_steps(run) -> dict:
    """name -> one training step; each adds one piece of the loop's work to the one before."""
    import contextlib

    from tuner.cli import bench_bare
    from tuner.training import loop, update

    accelerator, device = run.accelerator, run.accelerator.device
    optimizer = update.raw_optimizer(run)
    held = [bench_bare.device_batch(next(run.batches), device) for _ in range(8)]
    turn = iter(range(10**12))
    generator = torch.Generator(device).manual_seed(0)
    running = torch.zeros((), device=device)

    def step_with(level: int):
        def step() -> None:
            if level >= 1:
                batch = bench_bare.device_batch(next(run.batches), device)
            else:
                batch = held[next(turn) % len(held)]
            noise = loop.step_generator(run, 1, 0) if level >= 2 else generator
            with accelerator.accumulate() if level >= 3 else contextlib.nullcontext():
                if level >= 4:
                    loss = loop.compute_loss(
                        run.recipe, run.family, run.comps, run.objective, batch, noise, accelerator
                    )
                else:
                    loss = bench_bare.bare_loss(run, batch, noise)
                accelerator.backward(loss) if level >= 3 else loss.backward()
                if level >= 5:
                    update.guarded_step(run, update.finish_gradients(run, loss))
                else:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)

        return step

    def loop_step() -> None:
        loop.train_one_step(run, running)
        run.state["step"] = 0  # the same noise seed every time, as the rungs above

    names = [
        "bare step (held batches)",
        "+ a fresh batch from the stream",
        "+ the per-step generator",
        "+ accelerate accumulate, backward",
        "+ compute_loss (autocast, loss path)",
        "+ clipping, NaN flag, guarded step",
    ]
    return {**{name: step_with(i) for i, name in enumerate(names)}, "train_one_step": loop_step}


def measure_ladder(run, rounds: int) -> dict:
    """Median process CPU time per step of each rung, over rounds of 10 steps per rung."""
    import random

    steps = ladder_steps(run)
    for step in steps.values():
        for _ in range(3):
            step()
    times: dict = {name: [] for name in steps}
    for _ in range(rounds):
        order = list(steps.items())
        random.shuffle(order)  # no rung always follows the same one
        for name, step in order:
            start = time.process_time()
            for _ in range(10):
                step()
            times[name].append((time.process_time() - start) / 10)
    return {name: statistics.median(values) for name, values in times.items()}


def print_ladder(results: dict) -> None:
    bare = next(iter(results.values()))
    print(f"{'step':40s} {'ms/step':>10s} {'x bare':>8s}")
    for name, seconds in results.items():
        print(f"{name:40s} {seconds * 1e3:10.3f} {seconds / bare:8.3f}")


def print_table(results: dict) -> None:
    bare = results["bare step"]
    print(f"{'source':40s} {'us/step':>10s} {'% of bare':>10s}")
    for name, seconds in results.items():
        print(f"{name:40s} {seconds * 1e6:10.1f} {100 * seconds / bare:9.2f}%")


def main(argv=None) -> dict:
    import contextlib

    from tuner.recipe import load_recipe
    from tuner.training.run import run_training

    parser = argparse.ArgumentParser(prog="python -m tuner.cli.bench_overhead")
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--ladder", action="store_true", help="time the pieces inside the step")
    parser.add_argument("--rounds", type=int, default=100, help="--ladder: rounds of 10 steps")
    args = parser.parse_args(argv)
    results: dict = {}

    @contextlib.contextmanager
    def around(run):
        if args.ladder:
            results.update(measure_ladder(run, args.rounds))
        else:
            results.update(measure(run, args.repeats))
        yield

    with tempfile.TemporaryDirectory(prefix="tuner-overhead-") as tmp:
        overrides = [*args.overrides, "data.cache=true", "train.steps=1", "sample.prompts=[]"]
        recipe = load_recipe(args.recipe, [*overrides, f"output.dir={tmp}/run", "log.to=[]"])
        run_training(recipe, around_steps=around)
    (print_ladder if args.ladder else print_table)(results)
    return results


if __name__ == "__main__":
    main()
