"""The memory kit measured on a GPU, beside `tuner plan`'s prediction: one command.

    python -m tuner.cli.bench_memory          # < 10 min on an H200; bench-memory/results.{json,md}
    python -m tuner.cli.bench_memory --tiny   # the same rows on the tiny builtins (CPU-runnable)

Rows: FLUX.1-dev (NF4, the measured anchor; fp8 with train.offload_blocks N = 0, 8, 16) through
tuner.cli.bench_flux, and Z-Image (bf16; fp8 with N = 0, 8, 16) through tuner.cli.bench_z_image,
each at 1024², batch 1, LoRA r16, adamw8bit, gradient checkpointing, in its own process (a crash
costs that row only). Beside each: `tuner plan RECIPE model.quantize=Q train.offload_blocks=N`'s
training-phase peak (no weights loaded; the plans run on the CPU while the GPU rows run), the
prediction's error against the measured max_memory_allocated, s/step, and the slowdown per
swapped block against the same row at N = 0.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from tuner import files
from tuner.cli.bench_gpu import last_json, markdown, run_json

FLUX_PLAN = ("recipes/flux/style-qlora.yaml", ["model.path=builtin:arch-flux-dev"])
Z_IMAGE_PLAN = ("recipes/z-image/style-lora.yaml", [])
FLUX_ARGS = ["--no-cudnn-attention", "--steps", "5", "--warmup", "2"]
Z_IMAGE_ARGS = ["--resolution", "1024", "--caption", "128", "--steps", "3", "--warmup", "1"]


def rows(tiny: bool) -> list[dict]:
    """name, bench module and args, the plan's recipe and overrides, the N = 0 row it slows."""
    table = [("flux-dev nf4 N=0", "flux", "nf4", 0)]
    table += [(f"flux-dev fp8 N={n}", "flux", "fp8", n) for n in (0, 8, 16)]
    table += [("z-image bf16 N=0", "z_image", "none", 0)]
    table += [(f"z-image fp8 N={n}", "z_image", "fp8", n) for n in (0, 8, 16)]
    out = []
    for name, kind, quantize, blocks in table:
        recipe, plan_over = FLUX_PLAN if kind == "flux" else Z_IMAGE_PLAN
        baseline = f"{name.rsplit(' N=', 1)[0]} N=0" if blocks else None
        args = [*(FLUX_ARGS if kind == "flux" else Z_IMAGE_ARGS)]
        args += ["--quantize", quantize, "--offload-blocks", str(blocks)]
        if tiny:  # the tiny transformers have 2 blocks: swap 1 of them where the row swaps any
            blocks = min(blocks, 1)
            args = ["--tiny", "--quantize", quantize, "--offload-blocks", str(blocks)]
            args += ["--optimizer", "adamw", "--resolution", "64", "--steps", "2"]
            args += ["--seq", "8"] if kind == "flux" else ["--caption", "8"]
            recipe = f"recipes/quickstart-{kind.replace('_', '-')}.yaml"
            plan_over = []
            if quantize == "nf4":  # bitsandbytes needs CUDA: the tiny row runs unquantized
                args[args.index("nf4")] = quantize = "none"
        plan = [*plan_over, f"model.quantize={quantize}", f"train.offload_blocks={blocks}"]
        out.append(
            {
                "name": name,
                "module": f"tuner.cli.bench_{kind}",
                "args": args,
                "plan": [recipe, *plan],
                "baseline": baseline,
                "blocks": blocks,
            }
        )
    return out


def start_plans(table: list[dict]) -> dict:
    """One `tuner plan --json` process per distinct plan, all started now (CPU only)."""
    started = {}
    for row in table:
        key = tuple(row["plan"])
        if key not in started:
            command = [sys.executable, "-m", "tuner", "plan", *key, "--json"]
            started[key] = subprocess.Popen(
                command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
    return started


def plan_training_gib(process) -> float | None:
    stdout, _ = process.communicate()
    report = last_json(stdout)
    if process.returncode != 0 or report is None:
        return None
    return round(report["phases"]["training"] / 2**30, 2)


def run_row(row: dict, timeout: float) -> dict:
    result, outcome = run_json([sys.executable, "-m", row["module"], *row["args"]], timeout)
    if result is None:
        return outcome
    peak = result.get("peak_allocated_gib", result.get("peak_gib"))
    if result.get("device") == "cpu":
        peak = None  # a CPU run has no allocator peak to set beside the plan
    return {
        "device": result.get("device"),
        "measured_gib": peak,
        "s_per_step": result.get("s_per_step", result.get("s_per_step_median")),
        "block_copies_per_step": result.get("block_copies_per_step"),
        **outcome,
    }


def compare(results: list[dict]) -> None:
    """Plan error against the measured peak; ms per swapped block against the N = 0 row."""
    by_name = {r["name"]: r for r in results}
    for r in results:
        measured, planned = r.get("measured_gib"), r.get("plan_training_gib")
        if measured and planned:
            r["plan_error_pct"] = round(100 * (planned - measured) / measured, 1)
        base = by_name.get(r.get("baseline") or "")
        if base and r.get("s_per_step") and base.get("s_per_step"):
            slower = r["s_per_step"] - base["s_per_step"]
            r["ms_per_swapped_block"] = round(1000 * slower / r["blocks"], 1)


COLUMNS = [
    "measured_gib",
    "plan_training_gib",
    "plan_error_pct",
    "s_per_step",
    "ms_per_swapped_block",
    "block_copies_per_step",
    "wall_s",
]


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(
        prog="python -m tuner.cli.bench_memory", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--tiny", action="store_true", help="tiny builtins (runs on CPU)")
    parser.add_argument("--budget", type=float, default=540, help="seconds for all runs")
    parser.add_argument("--only", default="", help="run only rows whose name contains this")
    parser.add_argument("--out", default="bench-memory", help="folder for results.json/.md")
    args = parser.parse_args(argv)
    deadline = time.perf_counter() + args.budget
    table = [row for row in rows(args.tiny) if args.only in row["name"]]
    plans = start_plans(table)
    results = []
    for row in table:
        left = deadline - time.perf_counter()
        outcome = run_row(row, left) if left >= 30 else {"error": "skipped: time budget spent"}
        results.append({"name": row["name"], "blocks": row["blocks"], **outcome})
        results[-1]["baseline"] = row["baseline"]
        print(json.dumps(results[-1]), flush=True)
    for row, result in zip(table, results):
        result["plan_training_gib"] = plan_training_gib(plans[tuple(row["plan"])])
    compare(results)
    out = Path(args.out)
    files.write_json(out / "results.json", results)
    files.write_text(out / "results.md", markdown(results, COLUMNS))
    print(markdown(results, COLUMNS))
    return results


if __name__ == "__main__":
    main()
