"""`tuner bench RECIPE`: data-pipeline images/s and training step rate, with and without the
latent/prompt cache, plus peak GPU memory and MFU. A benchmark, not a test: it prints numbers.
"""

from __future__ import annotations

import json
import statistics
import time

import torch

# Dense bf16 peak of the GPUs we measure on (FLOP/s); MFU is reported against these.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "4090": 165e12}


def register(sub) -> None:
    p = sub.add_parser("bench", help="measure data and training throughput for a recipe")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--steps", type=int, default=40, help="timed training steps")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    p.add_argument("--samples", type=int, default=32, help="samples for the data benchmark")
    p.add_argument(
        "--no-uncached",
        action="store_true",
        help="skip the run without cache (slow for big models)",
    )
    p.add_argument("--no-data", action="store_true", help="skip the data-pipeline benchmark")
    p.add_argument(
        "--count-flops",
        action="store_true",
        help="count the first step's FLOPs (torch's flop counter) to report TFLOP/step and MFU",
    )
    p.add_argument(
        "--bare",
        action="store_true",
        help="only the cached training step, beside a bare forward/backward/optimizer step on "
        "the same model and batch; prints loop_overhead=<full/bare>x",
    )
    p.add_argument("--window", type=int, default=5, help="steps per timed window (median)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args) -> int:
    from tuner.recipe import load_recipe

    base = load_recipe(args.recipe, args.overrides)
    report = {"recipe": args.recipe, "device": device_name()}
    if args.bare:
        from tuner.cli.bench_bare import summary_line

        report["train_cached"] = train_throughput(args, ["data.cache=true"])
        print(json.dumps(report, indent=None if args.json else 2))
        print(summary_line(report["train_cached"]["bare"]))
        return 0
    if not args.no_data:
        report["data"] = data_throughput(base, args.samples)
    modes = [("cached", ["data.cache=true"])]
    if not args.no_uncached:
        modes.append(("uncached", ["data.cache=false"]))
    for name, extra in modes:
        report[f"train_{name}"] = train_throughput(args, extra)
    print(json.dumps(report, indent=None if args.json else 2))
    return 0


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def peak_flops() -> float | None:
    name = device_name()
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def data_throughput(recipe, samples: int) -> dict:
    """Samples/s the loader delivers from the cache vs. decoding + encoding them."""
    from tuner import families
    from tuner.data.cache import build_cache
    from tuner.data.dataset import TrainDataset, collate
    from tuner.data.items import collect_items, prepare_image
    from tuner.data.pairs import partner_image
    from tuner.devices import on_device
    from tuner.training.run import DTYPES, cache_plan

    items, _ = collect_items(recipe.data)
    family = families.for_model(recipe.model)
    from tuner.families.fp8 import load_components

    comps = load_components(family, recipe.model, DTYPES[recipe.train.mixed_precision])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    plan = cache_plan(
        recipe.model_copy(update={"data": recipe.data.model_copy(update={"cache": True})}), comps
    )
    build_cache(items, recipe.data, plan, family, comps, device)
    picks = [i % len(items) for i in range(samples)]

    dataset = TrainDataset(items, recipe.data, plan, recipe.train.seed)
    start = time.perf_counter()
    for i in picks:
        collate([dataset[(i, 0, 0)]])
    cached = samples / (time.perf_counter() - start)

    start = time.perf_counter()
    with torch.no_grad(), on_device(comps.frozen_modules().values(), device):
        for i in picks:
            pixels = prepare_image(items[i], "center", False, None)[0][None].to(device)
            family.encode_images(comps, pixels)
            seen = {}
            if family.spec.prompt_reads_references and items[i].controls:
                seen["references"] = [[partner_image(p, False) for p in items[i].controls]]
            family.encode_prompts(comps, [items[i].caption], **seen)
    if device.type == "cuda":
        torch.cuda.synchronize()
    uncached = samples / (time.perf_counter() - start)
    return {"cached_samples_per_s": round(cached, 2), "uncached_samples_per_s": round(uncached, 2)}


def train_throughput(args, extra: list[str]) -> dict:
    import tempfile

    from tuner.cli import bench_bare
    from tuner.recipe import load_recipe
    from tuner.training.run import run_training

    window = args.window if args.bare else args.warmup
    warmup = -(-args.warmup // window) * window  # log points fall on window boundaries
    windows = max(args.steps // window, 1)
    bare = bench_bare.BareSteps(warmup, window) if args.bare else None
    with tempfile.TemporaryDirectory(prefix="tuner-bench-") as tmp:
        overrides = [
            *args.overrides,
            *extra,
            f"train.steps={warmup + windows * window}",
            f"log.every={window}",
            "sample.prompts=[]",
            "output.save_every=0",
            f"output.dir={tmp}/run",  # never over the recipe's own outputs
        ]
        recipe = load_recipe(args.recipe, overrides)
        result = run_training(
            recipe, count_flops=args.count_flops, around_steps=bare.around if bare else None
        )
    if bare is not None:  # the log times also span the bare windows
        steps_per_s = 1 / statistics.median(wall for wall, _ in bare.full)
    else:
        (s0, t0), (s1, t1) = result.log_times[0], result.log_times[-1]
        steps_per_s = (s1 - s0) / (t1 - t0)
    batch = recipe.train.batch_size * recipe.train.grad_accum
    out = {
        "steps_per_s": round(steps_per_s, 3),
        "images_per_s": round(steps_per_s * batch, 2),
        "s_per_step": round(1 / steps_per_s, 3),
        "batch": batch,
    }
    if torch.cuda.is_available():
        out["peak_mem_gib"] = round(result.peak_memory / 2**30, 2)
    if bare is not None:
        out["bare"] = bench_bare.compare(bare.full, bare.bare)
    flops = result.flops_per_step
    if flops:
        out["tflop_per_step"] = round(flops / 1e12, 3)
        peak = peak_flops()
        if peak:
            out["mfu"] = round(flops * steps_per_s / peak, 3)
    return out
