"""`model.quantize: fp8`: the frozen denoiser's Linear weights stored as float8 (e4m3fn) with a
per-output-channel fp32 scale, upcast per layer to the compute dtype for the matmul.

Why our own module on torch's float8 dtype, not the alternatives:
- diffusers' `enable_layerwise_casting` casts a module's weights in place around its forward;
  PEFT then casts the LoRA layers to float8 too (it follows the base weight's dtype), and
  autograd keeps the leaf weight it saved, which is float8 again by backward.
- torchao is not installable here (no wheel in this environment's index) and adds a dependency
  for what is one upcast.
`Fp8Linear.forward` upcasts inside an autograd Function that saves the float8 weight and
upcasts again in backward, so no compute-dtype copy of any weight outlives its layer: memory is
1 byte per Linear parameter (+ 4 bytes per output channel). It runs on any device (CPU, GPUs
without fp8 matmul); it is a subclass of nn.Linear with a `compute_dtype`, so PEFT wraps it
like any Linear and creates its LoRA layers in the compute dtype (then cast to fp32), and the
adapter's keys are those of a full-precision base.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tuner.errors import TunerError

STORAGE_DTYPE = torch.float8_e4m3fn
BYTES_PER_PARAM = 1  # float8 storage of a Linear weight (`tuner plan` reads this)
SCALE_BYTES_PER_OUTPUT = 4  # the fp32 per-channel scale
E4M3_MAX = torch.finfo(STORAGE_DTYPE).max  # 448


class _Fp8Matmul(torch.autograd.Function):
    """x @ (w8 * scale).T + b, saving only the float8 weight for backward."""

    @staticmethod
    def forward(ctx, x, weight, scale, bias, compute_dtype):
        ctx.save_for_backward(weight, scale)
        ctx.compute_dtype, ctx.input_dtype = compute_dtype, x.dtype
        return F.linear(x.to(compute_dtype), upcast(weight, scale, compute_dtype), bias)

    @staticmethod
    def backward(ctx, grad_out):
        weight, scale = ctx.saved_tensors
        grad_x = grad_out.to(ctx.compute_dtype) @ upcast(weight, scale, ctx.compute_dtype)
        return grad_x.to(ctx.input_dtype), None, None, None, None


def upcast(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return weight.to(dtype) * scale.to(dtype)


class Fp8Linear(nn.Linear):
    """A frozen Linear whose weight is float8 with a per-output-channel scale."""

    def __init__(self, linear: nn.Linear, compute_dtype: torch.dtype):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.compute_dtype = compute_dtype  # PEFT creates LoRA layers in this dtype
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / E4M3_MAX
        stored = (weight / scale).to(STORAGE_DTYPE)
        self.weight = nn.Parameter(stored, requires_grad=False)
        self.register_buffer("weight_scale", scale)
        bias = linear.bias
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(compute_dtype), False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Fp8Matmul.apply(x, self.weight, self.weight_scale, self.bias, self.compute_dtype)

    def _apply(self, fn, recurse=True):
        # A module-wide .to(dtype) must not cast the float8 codes or their fp32 scales (the
        # codes only mean something with their scale): keep both dtypes, follow device moves.
        codes, scale = self.weight.data, self.weight_scale
        super()._apply(fn, recurse)
        device = self.weight.device
        if self.weight.dtype != STORAGE_DTYPE:
            self.weight.data = codes.to(device)
        if self.weight_scale.dtype != torch.float32:
            self.weight_scale = scale.to(device)
        if self.bias is not None and self.bias.dtype != self.compute_dtype:
            self.bias.data = self.bias.data.to(self.compute_dtype)
        return self


def store_in_fp8(denoiser: nn.Module, compute_dtype: torch.dtype) -> int:
    """Replace every plain nn.Linear of the (not yet LoRA-wrapped) denoiser by an Fp8Linear,
    in place. Returns the number of Linear parameters now stored in float8."""
    if compute_dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TunerError(f"model.quantize: fp8 cannot compute in {compute_dtype}")
    stored = 0
    for parent in list(denoiser.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:  # exactly Linear: no LoRA, no bitsandbytes layers
                setattr(parent, name, Fp8Linear(child, compute_dtype))
                stored += child.weight.numel()
    if stored == 0:
        raise TunerError(
            "model.quantize: fp8 found no Linear layer to store in float8 in this model; "
            "set model.quantize=none"
        )
    return stored


def load_components(family, model, dtype: torch.dtype):
    """family.load, with the denoiser's Linear weights in float8 when model.quantize is fp8
    (the family loads the full-precision base; bitsandbytes is not involved)."""
    if model.quantize != "fp8":
        return family.load(model, dtype)
    comps = family.load(model.model_copy(update={"quantize": "none"}), dtype)
    store_in_fp8(comps.denoiser, dtype)
    return comps


def linear_bytes(module: nn.Module) -> int:
    """Bytes of the Linear weights (Fp8Linear: codes + scales), for tests and reports."""
    total = 0
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            total += layer.weight.numel() * layer.weight.element_size()
            if isinstance(layer, Fp8Linear):
                total += layer.weight_scale.numel() * layer.weight_scale.element_size()
    return total
