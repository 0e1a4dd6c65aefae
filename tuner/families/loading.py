"""Where a model comes from: builtin, local folder, single file, or hub id."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from tuner import builtins
from tuner.errors import TunerError

HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")


def source_kind(path: str) -> str:
    """'builtin' | 'folder' | 'file' | 'hub'; raises a one-line error for a missing path."""
    name = builtins.builtin_name(path)
    if name is not None:
        if builtins.lookup(name) is None:
            known = ", ".join(f"builtin:{n}" for n in builtins.all_builtins())
            raise TunerError(f"model.path: unknown builtin {path!r}; choose one of {known}")
        return "builtin"
    local = Path(path).expanduser()
    if local.is_dir():
        if not (local / "model_index.json").is_file():
            raise TunerError(
                f"model.path: {path} has no model_index.json; point it at a diffusers "
                "pipeline folder (save_pretrained output) or a .safetensors file"
            )
        return "folder"
    if local.is_file():
        return "file"
    if HUB_ID.match(path) and not path.startswith((".", "/", "~")):
        return "hub"
    raise TunerError(
        f"model.path: {path} not found; give a diffusers folder, a .safetensors "
        "file, a hub id (org/name) or a builtin such as builtin:tiny-sd15"
    )


def model_identity(family_name: str, model) -> str:
    """What the cache keys on for this model: family, source, revision/variant, and for local
    weights their files' sizes and modification times (a retrained folder at the same path must
    not reuse old latents; stat is cheap where hashing gigabytes is not)."""
    parts = [family_name, model.path, model.revision or "", model.variant or ""]
    for extra in (model.vae_path,):
        if extra:
            parts.append(f"vae:{extra}")
    if model.text_encoder_quantize != "none":  # a quantized encoder's prompts differ a little
        parts.append(f"text-encoder:{model.text_encoder_quantize}")
    for source in (model.path, model.vae_path):
        local = Path(source).expanduser() if source else None
        if local is not None and local.exists():
            files = [local] if local.is_file() else sorted(local.rglob("*.safetensors"))
            parts += [f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files]
    return "|".join(parts)


def load_pipeline_modules(family, model, dtype: torch.dtype, components: dict | None = None):
    """Load a diffusers pipeline for `family` from any supported source. `components` replace
    pipeline modules: a ready-made module, or None to leave one out (SD3 without T5)."""
    kind = source_kind(model.path)
    extras = {**family.pipeline_extras, **(components or {})}
    pipeline_class = family.spec.pipeline_class
    if kind == "builtin":
        modules = builtins.lookup(builtins.builtin_name(model.path)).build()
        pipe = pipeline_class(**{**modules, **extras})
        # Builtins are built in fp32; cast only what was built here (not supplied components).
        for name, module in modules.items():
            if dtype != torch.float32 and name not in extras and hasattr(module, "to"):
                module.to(dtype=dtype)
            if name not in extras and isinstance(module, torch.nn.Module):
                # eval mode, as from_pretrained returns modules (and as the trainer holds the
                # frozen ones: an editing pipeline's VAE encode differs in its last bits)
                module.eval()
        return pipe
    if kind == "file":
        return _from_single_file(family, model, dtype, extras)
    try:
        return pipeline_class.from_pretrained(
            str(Path(model.path).expanduser()) if kind == "folder" else model.path,
            torch_dtype=dtype,
            revision=model.revision,
            variant=model.variant,
            use_safetensors=None if model.allow_pickle else True,
            **extras,
        )
    except OSError as exc:
        raise TunerError(
            f"model.path: could not load {model.path} ({_short(exc)}); if the files "
            "are .bin/.ckpt pickles, convert them or set model.allow_pickle: true"
        ) from exc


def _from_single_file(family, model, dtype, extras):
    path = Path(model.path).expanduser()
    if path.suffix in PICKLE_SUFFIXES and not model.allow_pickle:
        raise TunerError(
            f"model.path: {path.name} is a pickle file, which can run code when "
            "loaded; use a .safetensors file or set model.allow_pickle: true"
        )
    kwargs = {"torch_dtype": dtype, **extras}
    if model.config:
        kwargs["config"] = model.config
    try:
        return family.spec.pipeline_class.from_single_file(str(path), **kwargs)
    except (OSError, ValueError) as exc:
        raise TunerError(
            f"model.path: could not load single file {path.name} ({_short(exc)}); "
            "set model.config to a local diffusers folder of the same architecture"
        ) from exc


def index_pipeline(model) -> str | None:
    """The `_class_name` of a folder's or hub repo's model_index.json, before loading it (None
    for builtins, single files, and hub repos that cannot be reached)."""
    import json

    kind = source_kind(model.path)
    if kind == "folder":
        index = json.loads((Path(model.path).expanduser() / "model_index.json").read_text())
        return index.get("_class_name")
    if kind == "hub":
        import diffusers

        try:
            return diffusers.DiffusionPipeline.load_config(model.path, revision=model.revision).get(
                "_class_name"
            )
        except Exception:  # offline: the caller falls back to the release's name
            return None
    return None


def with_pipeline_class(family, pipeline_class):
    """The family as the loaders see it, with the pipeline class this source holds (a family
    that serves several pipelines: FLUX.2 dev / klein, Qwen-Image-Edit / Edit Plus)."""
    from types import SimpleNamespace

    spec = SimpleNamespace(pipeline_class=pipeline_class, name=family.spec.name)
    return SimpleNamespace(spec=spec, pipeline_extras={})


def _short(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:160]
