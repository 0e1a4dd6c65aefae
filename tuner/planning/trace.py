"""Memory and FLOPs of one step, traced on the meta device (shapes only, no weights, no math).

How the activation figure is measured: the real-size model is built on the meta device and one
training micro-step (forward, loss, backward) runs under three modes:

- `LiveBytes`, a dispatch mode that adds the storage size of every tensor an op creates and
  subtracts it when that storage is freed (a weak reference on the storage), keeping the
  maximum: the step's peak above the weights, as the CUDA caching allocator's
  `max_memory_allocated` counts it (autograd's saved tensors, LoRA gradients, temporaries).
- `Autocast`, a function mode that applies CUDA bf16/fp16 autocast's casting rules (matmuls
  and convolutions in the compute dtype, normalisations, softmax, reductions and losses in
  fp32), which real autocast does not do for meta tensors: the saved tensors get the dtypes a
  GPU run gives them.
- torch's `FlopCounterMode` for the FLOPs of the step (gradient-checkpoint recomputation
  included).

Attention runs as the fused (memory-efficient) kernel a GPU uses; on meta tensors torch would
otherwise decompose it into an explicit L x L matrix that no GPU run holds.
"""

from __future__ import annotations

import contextlib
import weakref

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

# CUDA autocast's op lists (torch.amp docs): run in the compute dtype / in float32.
LOW_PRECISION_OPS = {
    "linear", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d",
    "matmul", "__matmul__", "mm", "bmm", "baddbmm", "addmm", "addbmm", "addmv", "mv",
    "prelu", "einsum",
}  # fmt: skip
FLOAT32_OPS = {
    "group_norm", "layer_norm", "softmax", "log_softmax", "softmin", "softplus", "exp",
    "expm1", "log", "log1p", "log2", "log10", "pow", "__pow__", "rsqrt", "reciprocal",
    "sum", "prod", "cumsum", "cumprod", "norm", "normalize", "mse_loss", "l1_loss",
    "cross_entropy", "nll_loss", "cosine_similarity", "erfinv", "sinh", "cosh", "tan",
    "acos", "asin", "rms_norm",
}  # fmt: skip


class LiveBytes(TorchDispatchMode):
    """Bytes of tensor storage created inside the mode and still alive; `peak` is the most."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._refs: dict[int, weakref.ref] = {}

    def _freed(self, key: int, nbytes: int) -> None:
        self.live -= nbytes
        self._refs.pop(key, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # A view or in-place result shares an input's storage (a weight's transpose): no new
        # memory. Storage objects are unique per storage while it lives, so ids compare.
        inputs = {
            id(t.untyped_storage())
            for t in tree_flatten((args, kwargs))[0]
            if isinstance(t, torch.Tensor)
        }
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key = id(storage)
            if key in self._refs or key in inputs:
                continue
            nbytes = storage.nbytes()
            self._refs[key] = weakref.ref(storage, lambda _, k=key, n=nbytes: self._freed(k, n))
            self.live += nbytes
            self.peak = max(self.peak, self.live)
        return out


class Autocast(TorchFunctionMode):
    """CUDA autocast's casts, for tensors (meta) that real autocast leaves alone."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in LOW_PRECISION_OPS:
            args, kwargs = self._cast(args, kwargs, lambda t: t.dtype == torch.float32, self.dtype)
        elif name in FLOAT32_OPS:
            low = (torch.float16, torch.bfloat16)
            args, kwargs = self._cast(args, kwargs, lambda t: t.dtype in low, torch.float32)
        return func(*args, **kwargs)

    @staticmethod
    def _cast(args, kwargs, needs, dtype):
        def cast(value):
            if isinstance(value, torch.Tensor) and value.is_floating_point() and needs(value):
                return value.to(dtype)
            return value

        return tree_map(cast, args), tree_map(cast, kwargs)


def _fused_attention(autocast_dtype):
    def attention(
        query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **_
    ):
        if autocast_dtype is not None:
            query, key, value = (t.to(autocast_dtype) for t in (query, key, value))
        if key.shape[-3] != query.shape[-3]:  # grouped-query attention: heads shared
            repeat = query.shape[-3] // key.shape[-3]
            key, value = (t.repeat_interleave(repeat, dim=-3) for t in (key, value))
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            attn_mask = torch.zeros(attn_mask.shape, dtype=query.dtype, device=query.device)
        if attn_mask is not None:
            attn_mask = attn_mask.to(query.dtype).expand(
                query.shape[0], query.shape[-3], query.shape[-2], key.shape[-2]
            )
        out = torch.ops.aten._scaled_dot_product_efficient_attention(
            query, key, value, attn_mask, True, dropout_p, is_causal, scale=scale
        )
        return out[0]

    return attention


@contextlib.contextmanager
def traced(compute_dtype: torch.dtype | None, count_flops: bool = True):
    """Inside: (live-bytes mode, flop counter or None). compute_dtype: the autocast dtype
    (None: no autocast, fp32 training)."""
    from torch.utils.flop_counter import FlopCounterMode

    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _fused_attention(compute_dtype)
    counter = FlopCounterMode(display=False) if count_flops else contextlib.nullcontext()
    live = LiveBytes()
    cast = Autocast(compute_dtype) if compute_dtype is not None else contextlib.nullcontext()
    try:
        with counter, cast, live:
            yield live, counter if count_flops else None
    finally:
        F.scaled_dot_product_attention = original


@contextlib.contextmanager
def meta_truth_tests():
    """`bool(meta_tensor.all())` and friends: text encoders test whether a padding mask is all
    ones to skip it; a meta tensor has no values, so such tests answer True (no padding, the
    longest sequence: the upper bound). Boolean-mask indexing and `nonzero` (HiDream's,
    Qwen-Image's and Z-Image's masks) likewise assume every element is nonzero, torch's own
    meta rule under its config switch: every token kept, again the upper bound. Any other
    value read from a meta tensor still fails."""
    from torch.fx.experimental import _config as fx_config

    original_item, original_bool = torch.Tensor.item, torch.Tensor.__bool__
    original_nonzero = fx_config.meta_nonzero_assume_all_nonzero
    fx_config.meta_nonzero_assume_all_nonzero = True

    def item(self):
        if self.device.type == "meta" and self.dtype == torch.bool:
            return True
        return original_item(self)

    def truth(self):
        if self.device.type == "meta" and self.dtype == torch.bool:
            return True
        return original_bool(self)

    torch.Tensor.item, torch.Tensor.__bool__ = item, truth
    try:
        yield
    finally:
        torch.Tensor.item, torch.Tensor.__bool__ = original_item, original_bool
        fx_config.meta_nonzero_assume_all_nonzero = original_nonzero


def max_linear_bytes(module: torch.nn.Module, bytes_per_param: float) -> int:
    """The largest Linear weight at a storage size: what a quantized layer dequantizes at once."""
    sizes = [m.weight.numel() for m in module.modules() if isinstance(m, torch.nn.Linear)]
    return int(max(sizes, default=0) * bytes_per_param)


def checkpointing(compute_dtype: torch.dtype | None):
    """diffusers' default checkpoint function (non-reentrant), with the autocast emulation
    replayed while a block is recomputed (autograd runs backward without function modes)."""
    from torch.utils.checkpoint import checkpoint

    def recompute_contexts():
        cast = Autocast(compute_dtype) if compute_dtype is not None else contextlib.nullcontext()
        return contextlib.nullcontext(), cast

    def checkpointed(module, *args):
        return checkpoint(
            module.__call__, *args, use_reentrant=False, context_fn=recompute_contexts
        )

    return checkpointed
