"""Text encoders for the caching phase: bitsandbytes-quantized (`model.text_encoder_quantize:
nf4 | int8`) or streamed from the CPU layer by layer (`model.text_encoder_offload`).

Quantized encoders are loaded through transformers' own BitsAndBytesConfig (each encoder's class
as the pipeline's model_index.json names it), so what encodes the prompts is what transformers
users load; built (`builtin:`) or single-file encoders are written to a temporary folder and read
back through the same loader. bitsandbytes quantizes where it loads: on the GPU when there is
one (the transformer is parked on the CPU until caching is done; NF4 encoders are parked there
too until their encoding phase, int8 ones stay where bitsandbytes put them), else on the CPU.

Prompts are encoded once into the data cache; the encoders then leave the GPU for good. Sample
prompts (the in-training and final grids) are encoded in the same phase: the grid's pipeline
calls are run up to the denoiser's first forward and every `encode_prompt` result is kept on
the CPU (`Components.encoded_prompts`), so a grid never brings an encoder to the GPU beside the
denoiser. A prompt that was not pre-encoded is encoded where the encoder is: on the CPU
(quantized) or streamed to the device (offloaded).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import json
import logging
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
from torch import nn

from tuner.errors import TunerError

log = logging.getLogger("tuner")

# text_encoder_4: HiDream's Llama-3.1-8B.
ENCODER_NAMES = ("text_encoder", "text_encoder_2", "text_encoder_3", "text_encoder_4")


def bnb_config(kind: str, dtype: torch.dtype):
    from transformers import BitsAndBytesConfig

    if kind == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_use_double_quant=True,
        )
    if kind == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise TunerError(f"model.text_encoder_quantize: unknown kind {kind!r}; use none, nf4 or int8")


def require_bitsandbytes(kind: str) -> None:
    try:
        import bitsandbytes  # noqa: F401
    except Exception as exc:  # ImportError, or a broken native library raising at import
        raise TunerError(
            f"model.text_encoder_quantize: {kind} needs bitsandbytes, which failed to load "
            f"({type(exc).__name__}); pip install bitsandbytes, or set "
            "model.text_encoder_quantize=none"
        ) from exc


def load_device() -> torch.device:
    """Where bitsandbytes quantizes the encoders: this process's GPU, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def is_quantized(module: nn.Module) -> bool:
    return getattr(module, "hf_quantizer", None) is not None


def load_quantized(cls, path: str, kind: str, dtype: torch.dtype, **kwargs) -> nn.Module:
    encoder = cls.from_pretrained(
        path,
        quantization_config=bnb_config(kind, dtype),
        dtype=dtype,
        device_map={"": load_device()},
        **kwargs,
    )
    keep_cpu_kernels_working(encoder)
    if kind == "nf4" and encoder.device.type == "cuda":
        # Parked (4-bit weights move losslessly) until the encoding phase brings it back, so
        # it never sits beside the denoiser for DreamBooth's class images before caching.
        encoder.to("cpu")
        torch.cuda.empty_cache()
    return encoder


def keep_cpu_kernels_working(encoder: nn.Module) -> None:
    """bitsandbytes' packed AVX512 CPU path for 4-bit layers reshapes by whole quantization
    blocks and fails on layers with fewer inputs than a block (toy-size models): those use the
    plain 4-bit CPU kernel."""
    from bitsandbytes.nn import Linear4bit

    for module in encoder.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if isinstance(module, Linear4bit) and state and module.in_features % state.blocksize:
            module.support_avx512bf16_for_cpu = False


def quantized_components(model, dtype: torch.dtype, skip: Iterable[str] = ()) -> dict:
    """For a diffusers folder or hub id: each text encoder the pipeline names, loaded quantized
    (pipeline components, so the full-precision weights are never loaded). {} otherwise."""
    from tuner.families.loading import source_kind

    kind = model.text_encoder_quantize
    source = source_kind(model.path)
    if source == "file" and model.config:  # a single file's encoders come from its config
        model = model.model_copy(update={"path": model.config})
        source = source_kind(model.path)
    if kind == "none" or source not in ("folder", "hub"):
        return {}
    require_bitsandbytes(kind)
    import transformers

    path = str(Path(model.path).expanduser()) if source == "folder" else model.path
    index = read_index(path, source, model.revision)
    found = {}
    for name in ENCODER_NAMES:
        entry = index.get(name)
        if name in skip or not isinstance(entry, list) or entry[1] is None:
            continue
        cls = getattr(transformers, entry[1])
        try:
            found[name] = load_quantized(
                cls, path, kind, dtype, subfolder=name, revision=model.revision
            )
        except (OSError, ValueError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
            raise TunerError(
                f"model.text_encoder_quantize: could not load {name} of {model.path} "
                f"quantized to {kind} ({first}); try model.text_encoder_quantize=none"
            ) from exc
    return found


def read_index(path: str, source: str, revision: str | None) -> dict:
    if source == "folder":
        return json.loads((Path(path) / "model_index.json").read_text())
    from diffusers import DiffusionPipeline

    return dict(DiffusionPipeline.load_config(path, revision=revision))


def quantize_loaded(pipe, model, dtype: torch.dtype) -> None:
    """The pipeline's full-precision encoders (built, or a single file's), quantized through
    the same loader: written to a temporary folder and read back."""
    kind = model.text_encoder_quantize
    if kind == "none":
        return
    require_bitsandbytes(kind)
    for name in ENCODER_NAMES:
        encoder = getattr(pipe, name, None)
        if encoder is None or is_quantized(encoder):
            continue
        with tempfile.TemporaryDirectory(prefix="tuner-text-encoder-") as tmp:
            encoder.save_pretrained(tmp, safe_serialization=True)
            pipe.register_modules(**{name: load_quantized(type(encoder), tmp, kind, dtype)})
        del encoder


# --- streaming (offload) ------------------------------------------------------------------------


def layer_lists(encoder: nn.Module) -> list[nn.ModuleList]:
    """The outermost ModuleLists of an encoder: its repeated blocks (T5 `block`, Qwen `layers`,
    CLIP `layers`), which are streamed one at a time."""
    found: list[tuple[str, nn.ModuleList]] = []
    for name, module in encoder.named_modules():
        inside = any(name.startswith(f"{outer}.") for outer, _ in found)
        if isinstance(module, nn.ModuleList) and len(module) > 1 and not inside:
            found.append((name, module))
    return [module for _, module in found]


def move_all_but_layers(encoder: nn.Module, lists: list[nn.ModuleList], device) -> None:
    held = [dict(ml._modules) for ml in lists]
    for ml in lists:
        ml._modules.clear()
    try:
        encoder.to(device)
    finally:
        for ml, modules in zip(lists, held, strict=True):
            ml._modules.update(modules)


def _to(device, block, _args) -> None:  # hooks return None: a value would replace the args
    block.to(device)


def _back_to_cpu(block, _args, _output) -> None:
    block.to("cpu")


@contextlib.contextmanager
def streamed(encoders: Iterable[nn.Module], device) -> Iterator[None]:
    """Run a phase with each encoder's blocks kept on the CPU and copied to `device` just for
    their own forward (the rest, embeddings and norms, visits the device for the phase), so a
    large encoder never sits whole on the GPU."""
    device = torch.device(device)
    handles, placed = [], []
    try:
        for encoder in encoders:
            lists = layer_lists(encoder)
            move_all_but_layers(encoder, lists, device)
            placed.append((encoder, lists))
            for block in (block for ml in lists for block in ml):
                handles.append(block.register_forward_pre_hook(functools.partial(_to, device)))
                handles.append(block.register_forward_hook(_back_to_cpu))
        yield
    finally:
        for handle in handles:
            handle.remove()
        for encoder, lists in placed:
            move_all_but_layers(encoder, lists, "cpu")
            for ml in lists:
                ml.to("cpu")  # after an exception mid-forward
        if device.type == "cuda":
            torch.cuda.empty_cache()


@contextlib.contextmanager
def encoding_phase(comps, device) -> Iterator[None]:
    """The text encoders on `device` for a phase: whole, or streamed when offloaded."""
    from tuner.devices import on_device

    encoders = list(comps.text_encoders.values())
    if comps.text_encoder_offload:
        with streamed(encoders, device):
            yield
    else:
        with on_device(encoders, device):
            yield


# --- sample prompts -----------------------------------------------------------------------------


class _Encoded(Exception):
    """Raised at the denoiser's first forward: the pipeline call has encoded its prompts."""


def prompt_key(arguments: dict) -> str | None:
    """What an encode_prompt call is keyed by (None when it is given tensors: nothing to keep)."""
    values = {k: v for k, v in arguments.items() if k != "device"}
    if any(isinstance(v, torch.Tensor) for v in values.values()):
        return None
    return repr(sorted((k, by_content(v)) for k, v in values.items()))


def by_content(value):
    """Images (the references a VL prompt encoder reads) by their pixels, not their id."""
    if isinstance(value, (list, tuple)):
        return [by_content(v) for v in value]
    if hasattr(value, "tobytes") and hasattr(value, "size") and hasattr(value, "mode"):
        import hashlib

        return f"image:{value.mode}:{value.size}:{hashlib.sha256(value.tobytes()).hexdigest()}"
    return value


def tree_to(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (list, tuple)):
        return type(value)(tree_to(v, device) for v in value)
    return value


def use_encoded_prompts(pipe, comps, device, in_phase: bool = False) -> None:
    """Replace the pipeline's encode_prompt by a lookup in comps.encoded_prompts; a call not
    seen before is encoded where the encoders are (CPU, or streamed to `device`; in_phase:
    they are on `device` already) and kept."""
    original = pipe.encode_prompt
    signature = inspect.signature(original)
    kept = comps.encoded_prompts

    def encode_prompt(*args, **kwargs):
        arguments = signature.bind(*args, **kwargs).arguments
        wanted = arguments.get("device") or device
        key = prompt_key(arguments)
        if key is None:
            return original(*args, **kwargs)
        if key not in kept:
            # encode_prompt may rewrite the prompt list it is given (Z-Image does).
            call = copy.deepcopy({k: v for k, v in arguments.items() if k != "device"})
            stream = comps.text_encoder_offload and not in_phase
            on = device if stream or in_phase else encoder_device(comps)
            phase = streamed(comps.text_encoders.values(), device)
            with phase if stream else contextlib.nullcontext():
                kept[key] = tree_to(original(**call, device=on), "cpu")
        return tree_to(kept[key], wanted)

    pipe.encode_prompt = encode_prompt


def encoder_device(comps) -> torch.device:
    encoder = next(iter(comps.text_encoders.values()))
    return next(encoder.parameters()).device


def pre_encode(comps, pipe, device, calls: Iterable[Callable[[], object]]) -> int:
    """Run each pipeline call up to the denoiser's first forward with the encoders on the
    device (the denoiser stays where it is), keeping every encode_prompt result. Returns how
    many prompt encodings are kept."""

    def stop(*_):
        raise _Encoded

    use_encoded_prompts(pipe, comps, device, in_phase=True)
    handle = comps.denoiser.register_forward_pre_hook(stop)
    try:
        with encoding_phase(comps, device):
            for call in calls:
                with contextlib.suppress(_Encoded):
                    call()
    finally:
        handle.remove()
        del pipe.encode_prompt  # the pipeline's own method again
    return len(comps.encoded_prompts)


def mark(comps, model):
    """Components that know how their encoders are kept (read by caching and sampling)."""
    from tuner.families.base import replace

    return replace(
        comps,
        text_encoder_quantize=model.text_encoder_quantize,
        text_encoder_offload=model.text_encoder_offload,
    )


def keep_off_device(comps) -> bool:
    """Whether sampling must not bring the encoders to the device (quantized or offloaded)."""
    return comps.text_encoder_quantize != "none" or comps.text_encoder_offload
