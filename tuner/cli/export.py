"""`tuner export` (diffusers <-> kohya adapter files) and `tuner merge` (adapter fused into a
full diffusers pipeline folder)."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

from tuner.cli.sample import DTYPES, quiet_progress
from tuner.errors import TunerError
from tuner.families import names as family_names


def register(sub) -> None:
    p = sub.add_parser(
        "export", help="convert an adapter: tuner export PATH --format kohya|diffusers [--out FILE]"
    )
    p.add_argument("path", help="adapter .safetensors, or a training output dir")
    p.add_argument("--format", required=True, choices=("kohya", "diffusers"))
    p.add_argument(
        "--out",
        help="file to write (default: beside the input, *_kohya.safetensors or without _kohya)",
    )
    p.add_argument(
        "--model",
        help="base model (kohya -> diffusers reads its layer names; "
        "default: the base model named in the file's metadata)",
    )
    p.add_argument("--family", choices=family_names(), help="model family, if not in the metadata")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.set_defaults(func=cmd_export)

    m = sub.add_parser(
        "merge",
        help="fuse an adapter into the base and save a diffusers "
        "pipeline: tuner merge BASE ADAPTER --scale S --out DIR",
    )
    m.add_argument("base", help="diffusers folder, .safetensors file, hub id or builtin:NAME")
    m.add_argument("adapter", help="adapter .safetensors (diffusers or kohya) or output dir")
    m.add_argument("--scale", type=float, default=1.0)
    m.add_argument("--out", required=True, help="folder for the merged pipeline")
    m.add_argument("--family", choices=family_names())
    m.add_argument(
        "--dtype",
        default="fp32",
        choices=("fp32", "fp16", "bf16"),
        help="dtype of the fused and saved weights (default fp32)",
    )
    m.add_argument("--device", default="cpu", help="where to fuse (default cpu)")
    m.add_argument("--overwrite", action="store_true", help="replace an existing pipeline folder")
    m.set_defaults(func=cmd_merge)


# --- export ----------------------------------------------------------------------------------


def cmd_export(args) -> int:
    quiet_progress(args)
    out = convert(
        Path(args.path),
        args.format,
        Path(args.out) if args.out else None,
        model=args.model,
        family=args.family,
        overwrite=args.overwrite,
    )
    print(f"wrote {out}")
    return 0


def convert(
    path: Path,
    fmt: str,
    out: Path | None = None,
    *,
    model: str | None = None,
    family: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Convert one adapter file to `fmt`; the metadata travels with it."""
    from tuner.adapters import formats

    source = source_file(path, fmt)
    state, metadata = formats.read_adapter(source)
    current = formats.adapter_format(state)
    if current == fmt:
        raise TunerError(f"{source} is already in {fmt} layout; nothing to convert")
    out = out or default_out(source, fmt)
    if out.exists() and not overwrite:
        raise TunerError(f"{out} exists; choose another --out or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    kept = formats.carried_metadata(metadata)
    if fmt == "kohya":
        fam = family_of(metadata, family, model)
        kohya = formats.to_comfy(state, metadata, fam.spec.export)
        return formats.write_safetensors(kohya, out, kept)
    from tuner.adapters.lora import write_diffusers_file

    fam, comps = base_components(metadata, family, model)
    layers, configs = formats.kohya_to_diffusers(state, formats.kohya_names(fam, comps))
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".export-") as tmp:
        write_diffusers_file(Path(tmp), fam, layers, configs, out.name)
        formats.add_metadata(Path(tmp) / out.name, kept)
        (Path(tmp) / out.name).replace(out)
    return out


def source_file(path: Path, fmt: str) -> Path:
    """An output dir stands for its file in the other format."""
    from tuner.adapters.lora import KOHYA_WEIGHT_NAME, WEIGHT_NAME

    if path.is_dir():
        path = path / (WEIGHT_NAME if fmt == "kohya" else KOHYA_WEIGHT_NAME)
    if not path.is_file():
        raise TunerError(f"{path}: adapter file not found; give a .safetensors or an output dir")
    return path


def default_out(source: Path, fmt: str) -> Path:
    if fmt == "kohya":
        return source.with_name(f"{source.stem}_kohya.safetensors")
    stem = source.stem.removesuffix("_kohya")
    return source.with_name(f"{stem if stem != source.stem else stem + '_diffusers'}.safetensors")


def family_of(metadata: dict, family: str | None, model: str | None):
    from tuner import families
    from tuner.recipe import ModelSection

    name = family or metadata.get("tuner_family")
    if name:
        return families.get(name)
    if model:
        return families.for_model(ModelSection(path=model))
    raise TunerError("cannot tell the model family of this adapter; pass --family or --model")


def base_components(metadata: dict, family: str | None, model: str | None):
    """The base model's modules, whose names resolve kohya's underscore-joined names (which
    cannot be split back into module paths without them). Loaded in bf16: only names are read."""
    from tuner import families
    from tuner.recipe import ModelSection

    path = model or metadata.get("tuner_base_model") or metadata.get("ss_sd_model_name")
    if not path:
        raise TunerError(
            "kohya -> diffusers needs the base model's layer names; pass --model "
            "(the model the adapter was trained on)"
        )
    section = ModelSection(path=path, family=family or metadata.get("tuner_family"))
    try:
        fam = families.for_model(section)
    except TunerError as exc:
        raise TunerError(
            f"base model {path!r} from the adapter's metadata: {exc}; pass --model"
        ) from exc
    return fam, fam.load(section, torch.bfloat16)


# --- merge -----------------------------------------------------------------------------------


def cmd_merge(args) -> int:
    quiet_progress(args)
    out = merge(
        args.base,
        args.adapter,
        args.scale,
        Path(args.out),
        family=args.family,
        dtype=args.dtype,
        device=args.device,
        overwrite=args.overwrite,
    )
    print(f"merged pipeline saved to {out}")
    return 0


def merge(
    base: str,
    adapter: str,
    scale: float,
    out: Path,
    *,
    family: str | None = None,
    dtype: str = "fp32",
    device: str = "cpu",
    overwrite: bool = False,
) -> Path:
    """Fuse adapter * scale into the base weights, drop the LoRA layers, save the pipeline.
    Written to a temporary folder first, so a failure leaves `out` as it was."""
    from tuner.inference.pipelines import load_adapters, load_base, lora_specs

    guard_merge_out(out, overwrite)
    spec = lora_specs([adapter])[0]
    fam, pipe = load_base(base, family, DTYPES[dtype])
    pipe.to(device)
    load_adapters(pipe, fam, [spec])
    pipe.fuse_lora(lora_scale=scale * spec.scale, adapter_names=[spec.name])
    pipe.unload_lora_weights()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.to("cpu").save_pretrained(str(tmp), safe_serialization=True)
    info = {
        "base": base,
        "family": fam.spec.name,
        "adapter": str(spec.path),
        "scale": scale * spec.scale,
        "dtype": dtype,
    }
    (tmp / "tuner_merge.json").write_text(json.dumps(info, indent=2))
    if out.exists():
        shutil.rmtree(out)
    tmp.replace(out)
    return out


def guard_merge_out(out: Path, overwrite: bool) -> None:
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    if not overwrite:
        raise TunerError(f"{out} exists; choose another --out or pass --overwrite")
    if not (out / "model_index.json").is_file():
        raise TunerError(
            f"{out} is not a diffusers pipeline folder; --overwrite only replaces "
            "those, so choose another --out"
        )
