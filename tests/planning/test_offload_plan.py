"""`tuner plan` and the memory kit's offloading: block swap's bytes are the real swapper's,
a streamed encoder's resident bytes are what streaming really holds, grids whose prompts were
encoded beforehand hold no encoder, and the switch search finds the fewest swapped blocks."""

from __future__ import annotations

import pytest
import torch

from tuner import families
from tuner.adapters import lora
from tuner.families import fp8
from tuner.families.text_encoders import layer_lists, streamed
from tuner.planning import make_plan, offload, plan
from tuner.planning.build import meta_model
from tuner.planning.estimate import Tracer
from tuner.recipe import AdapterSection, ModelSection
from tuner.training import block_swap


def real_swapped_bytes(quantize: str, n: int) -> int:
    """Bytes the real BlockSwap moved to host memory on tiny-flux."""
    spec = ModelSection(path="builtin:tiny-flux", quantize=quantize)
    family = families.for_model(spec)
    comps = fp8.load_components(family, spec, torch.bfloat16)
    lora.inject(comps, AdapterSection(rank=4), family)
    swap = block_swap.install(family, comps.denoiser, n, "cpu")
    return sum(
        layer.weight.numel() * layer.weight.element_size()
        for layers in swap.layers
        for layer in layers
    )


@pytest.mark.parametrize("quantize", ["none", "fp8"])
def test_swapped_bytes_equal_what_the_real_block_swap_moves(make_recipe, quantize):
    recipe = make_recipe(
        f"model.quantize={quantize}", "train.mixed_precision=bf16", base="builtin:tiny-flux"
    )
    tracer = Tracer(meta_model(recipe), recipe)
    away, visiting = offload.swapped_blocks(tracer.family, tracer.comps.denoiser, 2, quantize)
    assert away == real_swapped_bytes(quantize, 2) > 0
    assert 0 < visiting <= away  # two blocks of the two swapped


# The real FLUX.1-dev architecture on the meta device (57 blocks; tiny-flux has 2, and with at
# most two blocks visiting, swapping 2 saves nothing).
ARCH = "builtin:arch-flux-dev"


@pytest.mark.slow  # ~30 s: traces of the real-size architecture
def test_offloaded_blocks_leave_training_and_sampling_and_the_search_finds_the_fewest(
    make_recipe, monkeypatch
):
    recipe = make_recipe("sample.prompts=[a cat]", "train.mixed_precision=bf16", base=ARCH)
    swapped = make_recipe(
        "sample.prompts=[a cat]", "train.mixed_precision=bf16", "train.offload_blocks=8", base=ARCH
    )
    tracer = Tracer(meta_model(recipe), recipe)  # one tracer: each trace runs once
    away, visiting = offload.swapped_blocks(tracer.family, tracer.comps.denoiser, 8, "none")
    assert away == 4 * visiting > 0  # 8 blocks leave, 2 of the same size visit
    settings = plan.Settings.of(recipe)
    before = plan.predict(tracer, recipe, settings)["phases"]
    after = plan.predict(tracer, swapped, plan.Settings.of(swapped))["phases"]
    for phase in ("training", "sampling"):
        assert before[phase] - after[phase] == away - visiting
    assert after["caching"] == before["caching"]  # the denoiser waits on the CPU

    total = offload.block_count(tracer.family, tracer.comps.denoiser)
    half = total // 2

    def peak(n):
        s = plan.Settings(**{**plan.asdict(settings), "offload_blocks": n})
        return max(plan.predict(tracer, recipe, s)["phases"].values())

    assert peak(0) > peak(half - 1) > peak(half) > peak(total)
    # A "card" of exactly that peak (bytes, not GB): the fewest blocks that fit are `half`.
    monkeypatch.setattr(plan, "fits", lambda phases, budget: max(phases.values()) <= budget)
    assert plan.fewest_offloaded_blocks(tracer, recipe, settings, peak(half), False) == half
    assert plan.fewest_offloaded_blocks(tracer, recipe, settings, peak(total) - 1, False) is None


def test_streamed_encoder_holds_its_non_layer_part_and_one_layer(monkeypatch):
    """Stream a real tiny T5 through `streamed` and record which layers are on the device
    (its hooks' moves) at every moment: the plan's figure is the rest plus the largest one."""
    from tuner.families import text_encoders

    family = families.for_model(ModelSection(path="builtin:tiny-flux"))
    comps = family.load(ModelSection(path="builtin:tiny-flux"), torch.float32)
    encoder = comps.text_encoders["text_encoder_2"]

    def size(module):
        return sum(p.numel() * p.element_size() for p in module.parameters())

    visiting, peaks = set(), []

    def arrive(device, block, args):
        visiting.add(block)
        peaks.append(sum(size(b) for b in visiting))

    monkeypatch.setattr(text_encoders, "_to", arrive)
    monkeypatch.setattr(text_encoders, "_back_to_cpu", lambda block, a, o: visiting.discard(block))
    with streamed([encoder], "cpu"):
        encoder(input_ids=torch.zeros(1, 8, dtype=torch.long))
    layers = [layer for ml in layer_lists(encoder) for layer in ml]
    stay, largest = offload.streamed_encoder_parts(encoder, "none")
    assert len(peaks) == len(layers) > 1  # every layer visited, one at a time
    assert max(peaks) == largest == max(size(layer) for layer in layers)
    assert stay == size(encoder) - sum(size(layer) for layer in layers) > 0


def test_grids_hold_no_encoder_when_prompts_were_encoded_beforehand(make_recipe):
    base = ("sample.prompts=[a cat]", "train.mixed_precision=bf16")
    whole = make_plan(make_recipe(*base, base="builtin:tiny-flux"), flops=False)
    streamed_plan = make_plan(
        make_recipe(*base, "model.text_encoder_offload=true", base="builtin:tiny-flux"),
        flops=False,
    )
    encoders = sum(v["bytes"] for k, v in whole.components.items() if k.startswith("text_encoder"))
    assert whole.phases["sampling"] - streamed_plan.phases["sampling"] == encoders > 0
    assert streamed_plan.phases["caching"] < whole.phases["caching"]
