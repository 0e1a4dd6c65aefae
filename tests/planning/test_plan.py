"""The plan against the real thing: parameter and byte counts against built tiny models, the
LoRA count against a real injection, optimizer state against a real optimizer after one step,
and the traced activations against the CPU allocator's own record of a real step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from tuner import families
from tuner.adapters import lora
from tuner.planning import make_plan, storage
from tuner.planning.build import meta_model
from tuner.planning.estimate import Tracer
from tuner.training.optim import build_optimizer
from tuner.training.run import DTYPES


def real_components(recipe):
    family = families.known_for(recipe.model) or families.for_model(recipe.model)
    comps = family.load(recipe.model, DTYPES[recipe.train.mixed_precision])
    return family, family.configure(comps, recipe)


@pytest.mark.parametrize("base", ["builtin:tiny-sd15", "builtin:tiny-sdxl", "builtin:tiny-flux"])
def test_stored_parameters_and_bytes_equal_the_built_model(make_recipe, base):
    recipe = make_recipe("train.mixed_precision=bf16", base=base)
    _, comps = real_components(recipe)
    planned = meta_model(recipe).comps
    for name, module in comps.modules().items():
        stored = storage.stored(planned.modules()[name])
        tensors = [*module.parameters(), *module.buffers()]
        assert stored.params == sum(p.numel() for p in module.parameters()), name
        assert stored.bytes == sum(t.numel() * t.element_size() for t in tensors), name


def test_lora_count_equals_the_injected_count(make_recipe):
    recipe = make_recipe("adapter.text_encoder=true", "adapter.rank=3", base="builtin:tiny-sdxl")
    family, comps = real_components(recipe)
    trained = lora.inject(comps, recipe.adapter, family)
    real = sum(p.numel() for m in trained.values() for p in lora.trainable_parameters(m))
    planned = Tracer(meta_model(recipe), recipe).lora_params()
    assert sum(p.numel() for p in planned) == real
    assert real > 0


def state_bytes(optimizer) -> int:
    seen, total = set(), 0
    for state in optimizer.state.values():
        for value in state.values():
            if torch.is_tensor(value) and id(value.untyped_storage()) not in seen:
                seen.add(id(value.untyped_storage()))
                total += value.numel() * value.element_size()
    return total


def test_optimizer_state_equals_adamw_after_one_step(make_recipe):
    recipe = make_recipe(base="builtin:tiny-flux")
    family, comps = real_components(recipe)
    params = lora.trainable_parameters(lora.inject(comps, recipe.adapter, family)["transformer"])
    optimizer = build_optimizer([{"params": params}], recipe.train, torch.device("cpu"))
    for p in params:
        p.grad = torch.ones_like(p)
    optimizer.step()
    planned = Tracer(meta_model(recipe), recipe).lora_params()
    assert storage.optimizer_state_bytes(planned, "adamw") == state_bytes(optimizer)
    assert storage.gradient_bytes(planned) == sum(p.grad.nbytes for p in params)


def test_adamw8bit_state_model_equals_bitsandbytes():
    """Sizes on both sides of bitsandbytes' 8-bit threshold (4096 elements)."""
    import bitsandbytes as bnb

    params = [torch.nn.Parameter(torch.zeros(n)) for n in (100, 4096, 70000)]
    optimizer = bnb.optim.AdamW8bit(params, lr=1e-3)
    for p in params:
        p.grad = torch.ones_like(p)
    optimizer.step()
    assert storage.optimizer_state_bytes(params, "adamw8bit") == state_bytes(optimizer)


def allocator_peak(step) -> int:
    """The CPU allocator's peak during step(), from the profiler's memory events."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]"
    )
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize(
    "base, resolution, checkpointing",
    [pytest.param("builtin:tiny-sd15", 64, False, marks=pytest.mark.slow),
     ("builtin:tiny-sd15", 64, True),
     pytest.param("builtin:tiny-flux", 128, True, marks=pytest.mark.slow)],
)  # fmt: skip
def test_traced_activations_match_a_real_cpu_step(make_recipe, base, resolution, checkpointing):
    recipe = make_recipe(
        f"data.resolution={resolution}",
        f"train.gradient_checkpointing={str(checkpointing).lower()}",
        base=base,
    )
    family, comps = real_components(recipe)
    comps.denoiser.requires_grad_(False)
    lora.inject(comps, recipe.adapter, family)
    if checkpointing:
        comps.denoiser.enable_gradient_checkpointing()
    comps.denoiser.train()
    tracer = Tracer(meta_model(recipe), recipe)
    batch, size = recipe.train.batch_size, (resolution, resolution)
    noisy, timesteps, cond, extra = tracer._inputs(batch, size)

    def real(t):
        return torch.full(t.shape, 0.5, dtype=t.dtype)

    noisy, timesteps = real(noisy), real(timesteps) * 1000
    cond = {k: real(v) for k, v in cond.items()}
    extra = {k: real(v) * 128 for k, v in extra.items()}

    def step():
        pred = family.predict(comps, noisy, timesteps, cond, extra)
        ((pred.float() - noisy) ** 2).mean().backward()

    measured = allocator_peak(step)
    traced, _ = tracer.training_step(batch, checkpointing, size)
    # CPU attention kernels differ from the fused kernel the trace assumes (the GPU's).
    assert abs(traced - measured) <= 0.10 * measured, (traced, measured)


def test_plan_of_a_tiny_recipe_adds_up(make_recipe):
    recipe = make_recipe("sample.prompts=[a cat]", base="builtin:tiny-sd15")
    plan = make_plan(recipe, tflops=1.0)
    weights = plan.components["unet"]["bytes"]
    expected = weights + plan.lora_bytes + plan.optimizer_bytes + plan.activation_bytes
    assert plan.phases["training"] == expected
    assert set(plan.phases) == {"caching", "training", "sampling"}
    assert plan.peak_bytes == max(plan.phases.values())
    assert plan.cards["12"] == "fits"
    assert plan.seconds_per_step == pytest.approx(plan.flops_per_step / 1e12)
    assert plan.summary().startswith("plan: peak ")


def test_train_preflight_logs_one_line_and_names_an_unplannable_source(make_recipe, caplog):
    from tuner.cli.plan import train_preflight

    caplog.set_level("INFO", logger="tuner")
    train_preflight(make_recipe(base="builtin:tiny-sd15"))
    assert [r.message for r in caplog.records if r.message.startswith("plan: peak ")]
    caplog.clear()
    train_preflight(make_recipe(base="some-org/some-sd2-model"))  # a hub id, no model.family
    lines = [r.message for r in caplog.records]
    assert len(lines) == 1 and lines[0].startswith("plan: not available for some-org/"), lines


@pytest.mark.parametrize("name", ["lion8bit", "prodigy", "adafactor", "came", "adamw_schedulefree"])
def test_optimizer_state_model_equals_the_optimizer_after_one_step(name):
    """Every named optimizer's state model against its real state: matrices (factored by
    Adafactor / CAME), vectors, and sizes on both sides of bitsandbytes' 8-bit threshold."""
    from tuner.recipe.train_section import TrainSection

    params = [torch.nn.Parameter(torch.randn(shape)) for shape in [(16, 8), (100,), (80, 64)]]
    train = TrainSection(steps=1, optimizer=name, lr=1.0 if name == "prodigy" else 1e-3)
    optimizer = build_optimizer([{"params": params}], train, torch.device("cpu"))
    if hasattr(optimizer, "train"):  # schedule-free: train mode before stepping
        optimizer.train()
    for p in params:
        p.grad = torch.ones_like(p)
    optimizer.step()
    assert storage.optimizer_state_bytes(params, name) == state_bytes(optimizer)


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_loha_lokr_counted_as_the_adapter_not_the_base(make_recipe, kind):
    """The planned adapter parameters are the injected ones; the base count is unchanged."""
    plain = make_recipe(base="builtin:tiny-sd15")
    recipe = make_recipe(f"adapter.type={kind}", base="builtin:tiny-sd15")
    family, comps = real_components(recipe)
    injected = lora.trainable_parameters(lora.inject(comps, recipe.adapter, family)["unet"])
    planned, base = (Tracer(meta_model(r), r) for r in (recipe, plain))
    assert sum(p.numel() for p in planned.lora_params()) == sum(p.numel() for p in injected)
    stored = storage.stored(planned.comps.denoiser, "none")
    assert stored.params == storage.stored(base.comps.denoiser, "none").params


def test_arch_sd2_is_the_published_sd21_architecture():
    """builtin:arch-sd2 (planned in place of stabilityai/stable-diffusion-2-1) on meta: the
    released UNet's parameter count, 768 px v-prediction, OpenCLIP-H's 1024-wide text tower."""
    from tuner.builtins.sd import build_arch_sd2

    with torch.device("meta"):
        parts = build_arch_sd2()
    assert sum(p.numel() for p in parts["unet"].parameters()) == 865_910_724
    assert parts["unet"].config.sample_size * 8 == 768
    assert parts["scheduler"].config.prediction_type == "v_prediction"
    assert parts["text_encoder"].config.hidden_size == parts["unet"].config.cross_attention_dim


SHIPPED = sorted(
    str(p.relative_to(Path(__file__).resolve().parents[2]))
    for p in (Path(__file__).resolve().parents[2] / "recipes").rglob("*.yaml")
    if p.parent.name != "accelerate"  # accelerate configs, not recipes
)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", SHIPPED)
def test_every_shipped_recipe_has_a_plan(recipe, capsys):
    """Meta-device traces of the real architectures: every family, editing ones included."""
    from tuner.cli import main

    root = Path(__file__).resolve().parents[2]
    assert main(["plan", str(root / recipe), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["peak_bytes"] == max(plan["phases"].values()) > 0
