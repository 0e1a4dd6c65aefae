"""The GPU benchmark the first session with a GPU runs: one command, under 10 minutes on an H200.

    python -m tuner.cli.bench_gpu                 # everything; writes bench-gpu/results.{json,md}
    python -m tuner.cli.bench_gpu --tiny          # the same runs on builtin:tiny-* (CPU-runnable)

Each run is `tuner bench RECIPE --bare --count-flops` in its own process (a crash, e.g. cuDNN
attention's backward, costs that row only): SD 1.5 (builtin:arch-sd15, 512², batch 4, bf16)
before and after each speed switch (train.fused_adamw, train.channels_last, train.sdpa_backend,
train.compile, a larger batch), SDXL 1024² without and with the switches, and the FLUX.1
transformer via tuner.cli.bench_flux. Rows record images/s, MFU, peak memory and the --bare
loop_overhead. Runs that would pass the time budget are skipped and say so. At the end it
prints the commands for the diffusers example scripts on the same models and data.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from tuner import files

DATA = [
    "data.datasets.0.path=datasets/toy-stripes",
    "data.buckets=false",
    "data.flip=false",
]
SD15 = ["model.path=builtin:arch-sd15", "data.resolution=512", "train.batch_size=4"]
BF16 = ["train.mixed_precision=bf16", "train.optimizer=adamw", "adapter.rank=16"]
SWITCHES = ["train.fused_adamw=true", "train.channels_last=true", "train.compile=true"]


def runs(tiny: bool) -> list[dict]:
    """name, recipe, overrides, bench args. The baseline is the loop with every switch off."""
    sd15 = "recipes/sd15/style-lora.yaml"
    sdxl = "recipes/sdxl/style-lora.yaml"
    base = [*DATA, *SD15, *BF16, "train.fused_adamw=false"]
    steps = ["--steps", "20", "--warmup", "5", "--window", "5"]
    table = [
        ("sd15 baseline", sd15, base, steps),
        ("sd15 +fused_adamw", sd15, [*base, "train.fused_adamw=true"], steps),
        ("sd15 +channels_last", sd15, [*base, *SWITCHES[:2]], steps),
        ("sd15 +sdpa flash", sd15, [*base, *SWITCHES[:2], "train.sdpa_backend=flash"], steps),
        ("sd15 +sdpa cudnn", sd15, [*base, *SWITCHES[:2], "train.sdpa_backend=cudnn"], steps),
        ("sd15 +compile", sd15, [*base, *SWITCHES], steps),
        ("sd15 +compile batch 8", sd15, [*base, *SWITCHES, "train.batch_size=8"], steps),
        ("sd15 +compile batch 16", sd15, [*base, *SWITCHES, "train.batch_size=16"], steps),
    ]
    xl = [*DATA, "model.path=builtin:arch-sdxl", "data.resolution=1024", "train.batch_size=1"]
    xl += [*BF16, "train.gradient_checkpointing=true"]
    few = ["--steps", "8", "--warmup", "3", "--window", "4"]
    table += [
        ("sdxl 1024 baseline", sdxl, [*xl, "train.fused_adamw=false"], few),
        ("sdxl 1024 +switches", sdxl, [*xl, *SWITCHES], few),
    ]
    rows = [
        {"name": n, "kind": "bench", "recipe": r, "overrides": o, "args": a} for n, r, o, a in table
    ]
    flux = ["--quantize", "none", "--optimizer", "adamw", "--no-cudnn-attention"]
    rows.append({"name": "flux-dev 1024 bf16", "kind": "flux", "args": flux})
    rows.append({"name": "flux-dev 1024 nf4", "kind": "flux", "args": ["--no-cudnn-attention"]})
    if tiny:  # the same rows on toy-size builtins at 64²: the CPU path of this script
        for row in rows:
            row["overrides"] = [tiny_override(o) for o in row.get("overrides", [])]
            row["overrides"] += ["train.mixed_precision='no'", "train.sdpa_backend=auto"]
            row["overrides"] = [o for o in row["overrides"] if "compile" not in o]
            row["args"] = tiny_args(row)
    return rows


def tiny_override(override: str) -> str:
    swaps = {
        "model.path=builtin:arch-sd15": "model.path=builtin:tiny-sd15",
        "model.path=builtin:arch-sdxl": "model.path=builtin:tiny-sdxl",
        "data.resolution=512": "data.resolution=64",
        "data.resolution=1024": "data.resolution=64",
    }
    if override.startswith("train.sdpa_backend="):
        return "train.sdpa_backend=auto"
    return swaps.get(override, override)


def tiny_args(row: dict) -> list[str]:
    if row["kind"] == "flux":
        return ["--tiny", "--quantize", "none", "--optimizer", "adamw", "--steps", "2"]
    return ["--steps", "2", "--warmup", "1", "--window", "1"]


def command(row: dict) -> list[str]:
    if row["kind"] == "flux":
        return [sys.executable, "-m", "tuner.cli.bench_flux", *row["args"]]
    bench = ["bench", row["recipe"], *row["overrides"], "--bare", "--count-flops", "--json"]
    return [sys.executable, "-m", "tuner", *bench, *row["args"]]


def run_one(row: dict, timeout: float) -> dict:
    result, outcome = run_json(command(row), timeout)
    outcome = {"name": row["name"], **outcome}
    return outcome if result is None else {**outcome, **flatten(row, result)}


def run_json(command: list[str], timeout: float) -> tuple[dict | None, dict]:
    """Run one benchmark process: (the JSON object it printed last, {"wall_s"} or {"error"})."""
    started = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=max(timeout, 1))
    except subprocess.TimeoutExpired:
        return None, {"error": f"timed out after {timeout:.0f}s"}
    seconds = round(time.perf_counter() - started, 1)
    result = last_json(done.stdout)
    if done.returncode != 0 or result is None:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1][:200]
        return None, {"error": f"exit {done.returncode}: {tail}", "wall_s": seconds}
    return result, {"wall_s": seconds}


def last_json(stdout: str) -> dict | None:
    """The last JSON object printed: one line or indented over several, text may follow it."""
    lines = stdout.strip().splitlines()
    for index in range(len(lines) - 1, -1, -1):
        if lines[index].startswith("{"):
            try:
                return json.JSONDecoder().raw_decode("\n".join(lines[index:]))[0]
            except json.JSONDecodeError:
                return None
    return None


def flatten(row: dict, result: dict) -> dict:
    if row["kind"] == "flux":
        keep = ("images_per_s", "s_per_step", "peak_allocated_gib", "device")
        return {k: result.get(k) for k in keep}
    train = result["train_cached"]
    bare = train.get("bare", {})
    return {
        "device": result.get("device"),
        "images_per_s": train.get("images_per_s"),
        "s_per_step": train.get("s_per_step"),
        "mfu": train.get("mfu"),
        "peak_mem_gib": train.get("peak_mem_gib"),
        "loop_overhead": bare.get("loop_overhead"),
        "bare_ms_per_step": bare.get("bare_ms_per_step"),
    }


COLUMNS = ["images_per_s", "s_per_step", "mfu", "peak_mem_gib", "loop_overhead", "wall_s"]


def markdown(results: list[dict], cols: list[str] = COLUMNS) -> str:
    lines = ["| run | " + " | ".join(cols) + " | note |", "|" + " --- |" * (len(cols) + 2)]
    for r in results:
        cells = ["" if r.get(c) is None else str(r.get(c)) for c in cols]
        lines.append(f"| {r['name']} | " + " | ".join(cells) + f" | {r.get('error', '')} |")
    return "\n".join(lines) + "\n"


def diffusers_commands() -> str:
    """The diffusers example scripts on the same random-init models and data (fetched where run,
    never committed to tuner)."""
    save = (
        'python -c "import torch, tuner; '
        "tuner.load_pipeline('builtin:arch-{m}', dtype=torch.float32)"
        ".save_pretrained('/tmp/arch-{m}')\""
    )
    # The example reads captions from metadata.jsonl (an imagefolder), tuner from .txt files.
    imagefolder = (
        "python -c \"import json, pathlib, shutil; s = pathlib.Path('datasets/toy-stripes'); "
        "d = pathlib.Path('/tmp/toy-stripes-hf'); d.mkdir(exist_ok=True); "
        "rows = [shutil.copy(p, d) and {'file_name': p.name, 'text': "
        "p.with_suffix('.txt').read_text().strip()} for p in sorted(s.glob('*.png'))]; "
        "(d / 'metadata.jsonl').write_text(''.join(json.dumps(r) + chr(10) for r in rows))\""
    )
    common = (
        "--train_data_dir=/tmp/toy-stripes-hf --caption_column=text --rank=16 "
        "--mixed_precision=bf16 --max_train_steps=60 --checkpointing_steps=100000 "
        "--learning_rate=1e-4 --dataloader_num_workers=2 --seed=0"
    )
    return "\n".join(
        [
            "# diffusers example scripts, same GPU, models and data (not committed here):",
            "git clone --depth 1 https://github.com/huggingface/diffusers /tmp/diffusers",
            "pip install -r /tmp/diffusers/examples/text_to_image/requirements.txt",
            imagefolder,
            save.format(m="sd15"),
            save.format(m="sdxl"),
            "accelerate launch /tmp/diffusers/examples/text_to_image/train_text_to_image_lora.py "
            f"--pretrained_model_name_or_path=/tmp/arch-sd15 --resolution=512 "
            f"--train_batch_size=4 {common} --output_dir=/tmp/diffusers-sd15",
            "accelerate launch "
            "/tmp/diffusers/examples/text_to_image/train_text_to_image_lora_sdxl.py "
            "--pretrained_model_name_or_path=/tmp/arch-sdxl --resolution=1024 "
            f"--train_batch_size=1 --gradient_checkpointing --use_8bit_adam {common} "
            "--output_dir=/tmp/diffusers-sdxl",
            "# images/s = train_batch_size x the it/s tqdm shows after warm-up; peak memory:",
            "# nvidia-smi --query-gpu=memory.used --format=csv -lms 500 in a second shell",
        ]
    )


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(
        prog="python -m tuner.cli.bench_gpu", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--tiny", action="store_true", help="toy-size builtins (runs on CPU)")
    parser.add_argument("--budget", type=float, default=540, help="seconds for all runs")
    parser.add_argument("--only", default="", help="run only rows whose name contains this")
    parser.add_argument("--out", default="bench-gpu", help="folder for results.json/.md")
    args = parser.parse_args(argv)
    deadline = time.perf_counter() + args.budget
    results = []
    for row in runs(args.tiny):
        if args.only and args.only not in row["name"]:
            continue
        left = deadline - time.perf_counter()
        if left < 30:
            results.append({"name": row["name"], "error": "skipped: time budget spent"})
            continue
        results.append(run_one(row, left))
        print(json.dumps(results[-1]), flush=True)
    out = Path(args.out)
    files.write_json(out / "results.json", results)
    files.write_text(out / "results.md", markdown(results))
    print(markdown(results))
    print(diffusers_commands())
    return results


if __name__ == "__main__":
    main()
