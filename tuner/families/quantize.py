"""A bitsandbytes-quantized transformer (`model.quantize: nf4 | int8`), for QLoRA.

The transformer is loaded through diffusers' `BitsAndBytesConfig` (4-bit NF4 with double
quantization and a bf16 compute dtype, or LLM.int8), so what we train on is exactly what
diffusers users load. LoRA layers sit on top in fp32 (PEFT wraps bitsandbytes layers with the
same module names, so the adapter's keys are those of a bf16 base and it loads into one).

Placement: bitsandbytes quantizes while loading onto the GPU. An NF4 transformer is then parked
on the CPU (bitsandbytes >= 0.43.2 moves 4-bit weights losslessly) so that caching text
embeddings never holds T5-XXL and the transformer on the GPU together; the training loop moves
it back after caching. int8 weights stay where bitsandbytes put them.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import torch

from tuner.errors import TunerError
from tuner.families.loading import load_pipeline_modules, source_kind

log = logging.getLogger("tuner")


def bnb_config(kind: str, dtype: torch.dtype):
    from diffusers import BitsAndBytesConfig

    if kind == "nf4":
        # fp32 training still computes the 4-bit matmuls in bf16: NF4 weights are the error floor.
        compute = dtype if dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=compute,
            bnb_4bit_use_double_quant=True,
        )
    if kind == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise TunerError(f"model.quantize: unknown kind {kind!r}; use none, nf4 or int8")


def require_quantizable(kind: str) -> None:
    if not torch.cuda.is_available():
        raise TunerError(
            f"model.quantize: {kind} needs a CUDA GPU (bitsandbytes quantizes while "
            "loading onto it); set model.quantize=none on this machine"
        )
    try:
        import bitsandbytes  # noqa: F401
    except Exception as exc:  # ImportError, or a broken CUDA setup raising at import
        raise TunerError(
            f"model.quantize: bitsandbytes failed to load ({type(exc).__name__}); "
            "pip install bitsandbytes, or set model.quantize=none"
        ) from exc


def load_pipeline(family, model, dtype: torch.dtype, transformer_cls, leave_out=()):
    """The family's pipeline from any source, with `leave_out` components set to None and the
    transformer quantized when model.quantize asks for it."""
    from tuner.families import text_encoders

    components = {name: None for name in leave_out}
    kind = model.quantize
    builtin = source_kind(model.path) == "builtin"
    if kind != "none":
        require_quantizable(kind)
    if kind != "none" and not builtin:
        # Parked before quantized encoders load onto the GPU: never both there (FLUX.2 dev's
        # NF4 transformer and Mistral are 15.5 + 14 GiB).
        components["transformer"] = load_quantized(transformer_cls, model, kind, dtype)
        park(components["transformer"], kind)
    components.update(text_encoders.quantized_components(model, dtype, skip=leave_out))
    pipe = load_pipeline_modules(family, model, dtype, components)
    if kind != "none" and builtin:
        # Built from config: quantize the built weights through the same diffusers loader.
        pipe.register_modules(transformer=quantize_module(pipe.transformer, kind, dtype))
        park(pipe.transformer, kind)
    text_encoders.quantize_loaded(pipe, model, dtype)
    return pipe


def load_quantized(transformer_cls, model, kind: str, dtype: torch.dtype):
    """The transformer alone, quantized, from a diffusers folder, hub id or single file."""
    config = bnb_config(kind, dtype)
    source = source_kind(model.path)
    path = str(Path(model.path).expanduser()) if source != "hub" else model.path
    try:
        if source == "file":
            kwargs = {"config": model.config, "subfolder": "transformer"} if model.config else {}
            return transformer_cls.from_single_file(
                path, quantization_config=config, torch_dtype=dtype, **kwargs
            )
        return transformer_cls.from_pretrained(
            path,
            subfolder="transformer",
            quantization_config=config,
            torch_dtype=dtype,
            revision=model.revision,
            variant=model.variant,
        )
    except (OSError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise TunerError(
            f"model.path: could not load the transformer of {model.path} "
            f"quantized to {kind} ({first}); try model.quantize=none"
        ) from exc


def quantize_module(module, kind: str, dtype: torch.dtype, workdir: str | None = None):
    """A built (not downloaded) transformer, quantized: written to a temporary folder and read
    back through from_pretrained, the one code path bitsandbytes supports for diffusers.
    `workdir`: where the temporary copy goes (e.g. /dev/shm for a 24 GB model)."""
    with tempfile.TemporaryDirectory(prefix="tuner-quantize-", dir=workdir) as tmp:
        module.save_pretrained(tmp, safe_serialization=True)
        return load_quantized_folder(type(module), tmp, kind, dtype)


def load_quantized_folder(cls, folder: str, kind: str, dtype: torch.dtype):
    return cls.from_pretrained(
        folder, quantization_config=bnb_config(kind, dtype), torch_dtype=dtype
    )


def park(transformer, kind: str) -> None:
    if kind == "nf4":
        transformer.to("cpu")
        torch.cuda.empty_cache()


def is_quantized(module) -> bool:
    return bool(
        getattr(module, "is_loaded_in_4bit", False) or getattr(module, "is_loaded_in_8bit", False)
    )
