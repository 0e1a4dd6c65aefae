"""Block swap (`train.offload_blocks`): the same outputs and LoRA gradients as without it, at
most two blocks' weights on the device, and LoRA parameters that never move."""

from __future__ import annotations

import time

import pytest
import torch

from tuner import families
from tuner.adapters import lora
from tuner.errors import TunerError
from tuner.families import fp8
from tuner.recipe import AdapterSection, ModelSection
from tuner.training import block_swap


def lora_model(name: str, quantize: str = "none", checkpointing: bool = False):
    spec = ModelSection(path=f"builtin:{name}", quantize=quantize)
    family = families.for_model(spec)
    comps = fp8.load_components(family, spec, torch.float32)
    torch.manual_seed(0)
    trained = lora.inject(comps, AdapterSection(rank=4), family)
    for param in lora.trainable_parameters(trained[family.spec.denoiser]):
        param.data.normal_(0, 0.05)  # LoRA B is zero at init: give the gradients a path
    if checkpointing:
        comps.denoiser.enable_gradient_checkpointing()
    return family, comps


def step(family, comps):
    """Output and LoRA gradients of one forward + backward on fixed inputs."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        cond = family.encode_prompts(comps, ["a red circle"])
    noisy = torch.randn(1, *family.latent_shape(comps, (32, 32)), generator=gen)
    out = family.predict(comps, noisy, torch.tensor([500.0]), cond, {})
    out.float().square().mean().backward()
    grads = {n: p.grad.clone() for n, p in comps.denoiser.named_parameters() if p.requires_grad}
    return out.detach(), grads


class CountingCopy:
    """A fake device: copies stay on the CPU, counted, with the number held at once."""

    def __init__(self):
        self.copies = 0

    def __call__(self, tensor):
        self.copies += 1
        return tensor.clone()


@pytest.mark.parametrize(
    ("name", "quantize", "checkpointing"),
    [
        ("tiny-qwen-image", "none", False),
        ("tiny-flux", "none", True),
        ("tiny-z-image", "fp8", True),
        ("tiny-hidream", "none", False),
    ],
)
def test_swapped_blocks_give_bitwise_the_same_output_and_lora_gradients(
    name, quantize, checkpointing
):
    family, plain = lora_model(name, quantize, checkpointing)
    expected_out, expected_grads = step(family, plain)

    family, comps = lora_model(name, quantize, checkpointing)
    blocks = family.blocks(comps.denoiser)
    n = len(blocks)
    lora_params = {n_: p for n_, p in comps.denoiser.named_parameters() if p.requires_grad}
    pointers = {k: p.data_ptr() for k, p in lora_params.items()}
    copy = CountingCopy()
    swap = block_swap.install(family, comps.denoiser, n, "cpu", copy=copy)
    held = []
    original_ensure = swap.ensure

    def ensure(index, backward):
        result = original_ensure(index, backward)
        held.append(len(swap.resident))
        return result

    swap.ensure = ensure
    out, grads = step(family, comps)

    assert torch.equal(out, expected_out)
    assert grads.keys() == expected_grads.keys()
    for key, grad in grads.items():
        assert torch.equal(grad, expected_grads[key]), key
    # Every swapped block was copied in forward and again in backward (checkpointing
    # recomputes from the same copies), never more than two at once.
    assert copy.copies >= n + 1 and max(held) <= block_swap.RESIDENT_BLOCKS
    swapped = [layer for layers in swap.layers for layer in layers]
    assert swapped and all("weight" not in layer._parameters for layer in swapped)
    if quantize == "fp8":
        assert all(layer.weight.dtype == torch.float8_e4m3fn for layer in swapped)
    # LoRA parameters never moved and are still what the optimizer holds.
    now = {n_: p for n_, p in comps.denoiser.named_parameters() if p.requires_grad}
    assert now.keys() == lora_params.keys()
    assert all(now[k] is lora_params[k] and now[k].data_ptr() == pointers[k] for k in now)


def test_offload_blocks_refusals(make_recipe):
    family, comps = lora_model("tiny-sd3")
    with pytest.raises(TunerError, match="train.offload_blocks: 3 is more than"):
        block_swap.install(family, comps.denoiser, 3, "cpu")
    recipe = make_recipe("train.offload_blocks=2")  # tiny-sd15: a UNet
    with pytest.raises(TunerError, match="train.offload_blocks: block swap applies to"):
        families.for_model(recipe.model).validate(recipe)
    recipe = make_recipe("train.offload_blocks=2", "model.quantize=nf4", base="builtin:tiny-flux")
    with pytest.raises(TunerError, match="does not combine with model.quantize=nf4"):
        families.for_model(recipe.model).validate(recipe)


@pytest.mark.gpu
def test_block_swap_on_a_gpu_keeps_weights_home_and_reports_cost():
    """Slowdown per swapped block and peak memory for N = 0, 8, 16 on a mid-size Flux arch
    (19 double + 38 single blocks at width 1536); prints one line per N."""
    from diffusers import FluxTransformer2DModel

    from tuner.families.flux import FluxFamily

    def build():
        torch.manual_seed(0)
        model = FluxTransformer2DModel(
            num_layers=19,
            num_single_layers=38,
            attention_head_dim=64,
            num_attention_heads=24,
            joint_attention_dim=4096,
            pooled_projection_dim=768,
            guidance_embeds=True,
        ).to(torch.bfloat16)
        model.requires_grad_(False)
        model.add_adapter(lora.lora_config(AdapterSection(rank=16), ["to_q", "to_k", "to_v"]))
        for name, param in model.named_parameters():
            param.requires_grad_("lora_" in name)
            if "lora_" in name:
                param.data = param.data.float()
        model.enable_gradient_checkpointing()
        return model

    tokens, text = 1024, 256
    inputs = dict(
        hidden_states=torch.randn(1, tokens, 64, device="cuda", dtype=torch.bfloat16),
        encoder_hidden_states=torch.randn(1, text, 4096, device="cuda", dtype=torch.bfloat16),
        pooled_projections=torch.randn(1, 768, device="cuda", dtype=torch.bfloat16),
        timestep=torch.tensor([0.5], device="cuda"),
        guidance=torch.tensor([1.0], device="cuda"),
        img_ids=torch.zeros(tokens, 3, device="cuda"),
        txt_ids=torch.zeros(text, 3, device="cuda"),
    )
    results = {}
    for n in (0, 8, 16):
        model = build()
        swap = block_swap.install(FluxFamily(), model, n, "cuda")
        model.to("cuda")
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(4):
            start = time.perf_counter()
            model(**inputs).sample.float().square().mean().backward()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        if swap is not None:
            homes = [layer.weight.device.type for layers in swap.layers for layer in layers]
            assert set(homes) == {"cpu"} and all(
                layer.weight.is_pinned() for layers in swap.layers for layer in layers
            )
            assert all(p.device.type == "cuda" for p in model.parameters() if p.requires_grad)
        results[n] = (min(times[1:]), torch.cuda.max_memory_allocated() / 2**30)
        print(f"offload_blocks={n}: {results[n][0]:.3f} s/step, peak {results[n][1]:.2f} GiB")
        del model, swap
        torch.cuda.empty_cache()
    for n in (8, 16):
        per_block = (results[n][0] - results[0][0]) / n
        print(f"slowdown per swapped block (N={n}): {per_block * 1000:.1f} ms")
    assert results[16][1] < results[8][1] < results[0][1]
