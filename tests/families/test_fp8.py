"""`model.quantize: fp8`: float8 storage of the frozen denoiser's Linear weights, LoRA in fp32 on
top, the adapter loaded into a full-precision base unchanged."""

from __future__ import annotations

import pytest
import torch
from peft.tuners.lora import Linear as LoraLinear

from tuner import builtins, families
from tuner.adapters import lora
from tuner.errors import TunerError
from tuner.families import fp8
from tuner.recipe import AdapterSection, ModelSection
from tuner.training.run import run_training

FAST = ("data.resolution=32", "train.max_sequence_length=16", "train.steps=3", "train.lr=1e-2")


def load(name: str, dtype=torch.bfloat16, **model):
    spec = ModelSection(path=f"builtin:{name}", **model)
    family = families.for_model(spec)
    return family, fp8.load_components(family, spec, dtype)


def encode(family, comps, prompt: str) -> dict:
    """The prompt's conditioning; a VL encoder that reads references reads a gray one."""
    if not family.spec.prompt_reads_references:
        return family.encode_prompts(comps, [prompt])
    from PIL import Image

    return family.encode_prompts(comps, [prompt], references=[[Image.new("RGB", (32, 32))]])


def predict(family, comps, seed: int = 0) -> torch.Tensor:
    """The denoiser's output on fixed inputs (prompt embeddings from the frozen encoders)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        cond = encode(family, comps, "a red circle")
        latents = torch.randn(1, *family.latent_shape(comps, (32, 32)), generator=gen)
        noisy = latents.to(comps.dtype)
        t = torch.tensor([500.0])
        return family.predict(comps, noisy, t, cond, size_batch(family, latents)).float()


def size_batch(family, latents) -> dict:
    """The size conditioning SDXL reads from a batch (the other families ignore it), and for
    an editing family a cached reference latent (the target's own)."""
    sizes = torch.tensor([[32, 32]])
    batch = {"original_size": sizes, "crop_top_left": torch.tensor([[0, 0]]), "target_size": sizes}
    if family.spec.controls:
        batch["control_latents"] = [latents.float().clone()]
    return batch


def test_fp8_training_changes_only_lora_and_the_adapter_applies_on_a_bf16_base(make_recipe):
    result = run_training(
        make_recipe(*FAST, "model.quantize=fp8", "train.steps=6", base="builtin:tiny-flux")
    )
    family, comps, model = result.family, result.comps, result.comps.denoiser
    # The frozen Linear weights really are float8 codes, and unchanged by training.
    fresh = load("tiny-flux", torch.float32, quantize="fp8")[1].denoiser.state_dict()
    bases = [m.base_layer for m in model.modules() if isinstance(m, LoraLinear)]
    assert bases and all(isinstance(b, fp8.Fp8Linear) for b in bases)
    for name, tensor in model.state_dict().items():
        if "lora_" in name:
            assert tensor.dtype == torch.float32, name
            continue
        plain = name.replace(".base_layer", "")
        assert tensor.dtype == fresh[plain].dtype, name
        assert torch.equal(
            tensor.view(torch.uint8) if tensor.dtype == fp8.STORAGE_DTYPE else tensor,
            fresh[plain].view(torch.uint8) if tensor.dtype == fp8.STORAGE_DTYPE else fresh[plain],
        ), name
    assert all(b.weight.dtype == torch.float8_e4m3fn for b in bases)
    # LoRA trained.
    trained_state = {k: v.detach().clone() for k, v in lora.peft_state(model).items()}
    assert any(v.abs().sum() > 0 for k, v in trained_state.items() if "lora_B" in k)

    # The LoRA-induced change on the fp8 base ...
    comps.sequence_length = comps.sequence_length or 16
    with_lora = predict(family, comps)
    model.disable_adapters()
    fp8_base = predict(family, comps)
    model.enable_adapters()
    fp8_delta = with_lora - fp8_base

    # ... is the change the saved file makes on the full-precision base (fp32 compute on both:
    # bf16 output rounding would swamp a 6-step adapter's change).
    family, bf16 = load("tiny-flux", torch.float32)
    bf16 = family.configure(bf16, result_recipe(result))
    plain_base = predict(family, bf16)
    pipe = family.build_pipeline(bf16)
    pipe.load_lora_weights(str(result.output_dir / lora.WEIGHT_NAME))
    (adapter,) = pipe.transformer.peft_config
    from peft.utils import get_peft_model_state_dict

    loaded = get_peft_model_state_dict(pipe.transformer, adapter_name=adapter)
    assert loaded.keys() == trained_state.keys()
    bf16_delta = predict(family, bf16) - plain_base
    assert fp8_delta.abs().max() > 1e-2  # the adapter does something ...
    error = (bf16_delta - fp8_delta).norm() / bf16_delta.norm()
    print(f"fp8 vs full-precision LoRA delta: relative error {error:.4f}")
    assert error < 0.1  # ... and the same thing, up to float8 rounding of the base


def result_recipe(result):
    from tuner.recipe import load_recipe

    return load_recipe(str(result.output_dir / "recipe.yaml"))


@pytest.mark.parametrize("name", builtins.tiny_names())
def test_every_family_stores_fp8_halves_the_bytes_and_trains_lora_only(name):
    family, bf16 = load(name)
    bf16_bytes = fp8.linear_bytes(bf16.denoiser)
    reference = predict(family, bf16)
    family, comps = load(name, quantize="fp8")
    linears = [m for m in comps.denoiser.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(isinstance(m, fp8.Fp8Linear) for m in linears)
    assert all(m.weight.dtype == torch.float8_e4m3fn for m in linears)
    # 1 byte per weight (half of bf16) + one fp32 scale per output row, nothing more.
    scales = sum(4 * m.out_features for m in linears)
    assert fp8.linear_bytes(comps.denoiser) == bf16_bytes // 2 + scales
    out = predict(family, comps)  # float8 rounding: close to the bf16 output, not equal
    assert (out - reference).abs().mean() < 0.1 * reference.abs().mean() + 1e-3
    # One LoRA backward: gradients reach the fp32 LoRA params and nothing else.
    trained = lora.inject(comps, AdapterSection(rank=4), family)
    model = trained[family.spec.denoiser]
    for param in lora.trainable_parameters(model):
        param.data.normal_(0, 0.01)
    cond = encode(family, comps, "a blue square")
    latents = torch.randn(1, *family.latent_shape(comps, (32, 32))).to(comps.dtype)
    batch = size_batch(family, latents)
    pred = family.predict(comps, latents, torch.tensor([500.0]), cond, batch)
    pred.float().square().mean().backward()
    for pname, param in model.named_parameters():
        if "lora_" in pname:
            assert param.dtype == torch.float32 and param.grad is not None, pname
        else:
            assert param.grad is None, pname
    assert all(
        m.base_layer.weight.dtype == torch.float8_e4m3fn
        for m in model.modules()
        if isinstance(m, LoraLinear)
    )


def test_fp8_keeps_its_codes_through_a_module_wide_cast():
    layer = fp8.Fp8Linear(torch.nn.Linear(8, 4), torch.bfloat16)
    codes = layer.weight.detach().view(torch.uint8).clone()
    layer.to(torch.float32)
    assert layer.weight.dtype == fp8.STORAGE_DTYPE and layer.weight_scale.dtype == torch.float32
    assert torch.equal(layer.weight.view(torch.uint8), codes)


def test_fp8_without_linear_layers_is_one_clear_error():
    with pytest.raises(TunerError, match="model.quantize: fp8 found no Linear"):
        fp8.store_in_fp8(torch.nn.Sequential(torch.nn.Conv2d(1, 1, 1)), torch.bfloat16)
