"""QLoRA: LoRA on a bitsandbytes-quantized transformer, saved with the keys of a bf16 base.

diffusers' BitsAndBytesConfig loading needs a CUDA GPU, so on CPU the transformer's linear layers
are quantized by bitsandbytes directly (NF4 Params4bit, as its loader does on the GPU) and marked
as diffusers marks a 4-bit model; PEFT then wraps them with its bitsandbytes LoRA layers, the same
ones it uses after a real quantized load. The GPU tests run the real path end to end.
"""

from __future__ import annotations

import pytest
import torch
from peft.utils import get_peft_model_state_dict

from tuner import families
from tuner.adapters import lora
from tuner.errors import TunerError
from tuner.families import quantize
from tuner.recipe import AdapterSection, ModelSection, TrainSection
from tuner.training.run import run_training

bnb = pytest.importorskip("bitsandbytes")
FAST = ("data.resolution=32", "train.max_sequence_length=16", "train.steps=3", "train.lr=1e-2")


def load(name: str, dtype=torch.float32, **model):
    spec = ModelSection(path=f"builtin:{name}", **model)
    family = families.for_model(spec)
    return family, family.load(spec, dtype)


def quantize_linears_nf4(model: torch.nn.Module) -> torch.nn.Module:
    """Every nn.Linear -> bitsandbytes Linear4bit holding its weights in NF4 (on CPU)."""
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if type(child) is not torch.nn.Linear:
                continue
            layer = bnb.nn.Linear4bit(
                child.in_features,
                child.out_features,
                bias=child.bias is not None,
                compute_dtype=torch.bfloat16,
                quant_type="nf4",
                compress_statistics=True,
            )
            layer.weight = bnb.nn.Params4bit(
                child.weight.data, requires_grad=False, quant_type="nf4", compress_statistics=True
            )
            if child.bias is not None:
                layer.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
            setattr(parent, child_name, layer.to("cpu"))  # .to() quantizes
    model.is_loaded_in_4bit = True  # what diffusers sets; PEFT reads it to pick its bnb layers
    return model


def loaded_lora(model) -> dict[str, torch.Tensor]:
    """The LoRA load_lora_weights put in (its adapter is named default_0, not default)."""
    (name,) = model.peft_config
    return get_peft_model_state_dict(model, adapter_name=name)


def train_a_few_steps(family, comps, trained, steps: int = 3) -> None:
    comps.sequence_length, comps.guidance = 16, 1.0
    with torch.no_grad():  # cached embeddings in a real run
        cond = family.encode_prompts(comps, ["a red circle", "a blue square"])
    objective = family.objective(comps, TrainSection(steps=steps))
    params = lora.trainable_parameters(trained[family.spec.denoiser])
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    latents = torch.randn(2, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    for step in range(steps):
        inputs = objective.sample(latents, torch.Generator().manual_seed(step))
        pred = family.predict(comps, inputs.noisy, inputs.timesteps, cond, {})
        (pred.float() - inputs.target).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()


def test_nf4_lora_has_the_keys_of_a_bf16_lora_and_loads_into_a_bf16_base(tmp_path):
    family, plain = load("tiny-flux", torch.bfloat16)
    plain_keys = {
        k: v.shape
        for k, v in lora.peft_state(
            lora.inject(plain, AdapterSection(rank=4), family)["transformer"]
        ).items()
    }

    family, comps = load("tiny-flux", torch.bfloat16)
    quantize_linears_nf4(comps.denoiser)
    trained = lora.inject(comps, AdapterSection(rank=4), family)
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit  # exists when bnb does

    assert isinstance(comps.denoiser.transformer_blocks[0].attn.to_q, LoraLinear4bit)
    trained_state = lora.peft_state(trained["transformer"])
    assert {k: v.shape for k, v in trained_state.items()} == plain_keys

    train_a_few_steps(family, comps, trained)
    trained_state = {
        k: v.detach().clone() for k, v in lora.peft_state(trained["transformer"]).items()
    }
    assert any(v.abs().sum() > 0 for k, v in trained_state.items() if "lora_B" in k)
    lora.save_adapter(tmp_path, family, trained)

    family, bf16 = load("tiny-flux", torch.bfloat16)
    pipe = family.build_pipeline(bf16)
    pipe.load_lora_weights(str(tmp_path / lora.WEIGHT_NAME))
    loaded = loaded_lora(pipe.transformer)
    assert loaded.keys() == trained_state.keys()
    for key, value in trained_state.items():  # fp32 LoRA, held in the base's bf16 once loaded
        torch.testing.assert_close(loaded[key], value.to(loaded[key].dtype), rtol=0, atol=0)


def test_quantize_settings_are_the_qlora_ones():
    nf4 = quantize.bnb_config("nf4", torch.bfloat16)
    assert nf4.load_in_4bit and nf4.bnb_4bit_quant_type == "nf4"
    assert nf4.bnb_4bit_use_double_quant and nf4.bnb_4bit_compute_dtype == torch.bfloat16
    assert quantize.bnb_config("nf4", torch.float32).bnb_4bit_compute_dtype == torch.bfloat16
    assert quantize.bnb_config("int8", torch.bfloat16).load_in_8bit


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_quantize_without_a_gpu_is_one_clear_error():
    with pytest.raises(TunerError, match="model.quantize: nf4 needs a CUDA GPU"):
        load("tiny-flux", torch.bfloat16, quantize="nf4")


# --- the real path: diffusers BitsAndBytesConfig on a GPU ------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_quantized_load_parks_on_cpu_and_runs_on_gpu(kind):
    family, comps = load("tiny-flux", torch.bfloat16, quantize=kind)
    assert quantize.is_quantized(comps.denoiser)
    expected = "cpu" if kind == "nf4" else "cuda"
    assert next(comps.denoiser.parameters()).device.type == expected
    comps.denoiser.to("cuda")
    comps.sequence_length, comps.guidance = 16, 1.0
    for module in comps.text_encoders.values():
        module.to("cuda")
    cond = family.encode_prompts(comps, ["a red circle"])
    noisy = torch.randn(1, 16, 16, 16, device="cuda")
    with torch.no_grad():
        out = family.predict(comps, noisy, torch.tensor([500.0], device="cuda"), cond, {})
    assert out.shape == noisy.shape and torch.isfinite(out).all()


@pytest.mark.gpu
def test_qlora_run_on_tiny_flux_loads_into_a_bf16_base(make_recipe):
    result = run_training(
        make_recipe(
            *FAST,
            "model.quantize=nf4",
            "train.mixed_precision=bf16",
            "train.optimizer=adamw8bit",
            "train.gradient_checkpointing=true",
            base="builtin:tiny-flux",
        )
    )
    assert quantize.is_quantized(result.comps.denoiser)
    trained = {
        k: v.detach().float().cpu()
        for k, v in lora.peft_state(result.trained["transformer"]).items()
    }
    assert any(v.abs().sum() > 0 for k, v in trained.items() if "lora_B" in k)

    family, bf16 = load("tiny-flux", torch.bfloat16)
    pipe = family.build_pipeline(bf16).to("cuda")
    pipe.set_progress_bar_config(disable=True)

    def render():
        return pipe(
            "a red circle",
            num_inference_steps=2,
            width=32,
            height=32,
            max_sequence_length=16,
            generator=torch.Generator("cuda").manual_seed(0),
            output_type="pt",
        ).images

    base = render()
    pipe.load_lora_weights(str(result.output_dir / lora.WEIGHT_NAME))
    loaded = loaded_lora(pipe.transformer)
    assert loaded.keys() == trained.keys()
    for key, value in trained.items():  # fp32 LoRA, held in the base's bf16 once loaded
        torch.testing.assert_close(loaded[key].cpu(), value.to(loaded[key].dtype), rtol=0, atol=0)
    assert (render() - base).abs().max() > 1e-3
