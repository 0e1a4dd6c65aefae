"""Quantized and offloaded text encoders for the caching phase (model.text_encoder_quantize,
model.text_encoder_offload), on the tiny builtins: the prompts a quantized encoder caches are
close to the full-precision ones and come from bitsandbytes layers, training runs with the grids'
prompts encoded in the caching phase (no grid brings an encoder to the device, and the grid is
the one live encoders render), offloaded encoding streams every block and equals plain encoding,
and settings that cannot apply are refused."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from bitsandbytes.nn import Linear4bit, Linear8bitLt
from PIL import Image

from tuner import families
from tuner.errors import TunerError
from tuner.families import text_encoders
from tuner.families.base import replace
from tuner.families.loading import model_identity
from tuner.inference import grids
from tuner.recipe import ModelSection
from tuner.training.run import run_training

PROMPTS = ["a red circle on a blue background", "a star"]
BNB_LAYERS = {"nf4": Linear4bit, "int8": Linear8bitLt}
# nf4 keeps 4 bits a weight: on toy-size random encoders (32-wide layers, errors compounding
# through every block) a third of the signal; int8 keeps it to about a percent.
BOUNDS = {"nf4": (0.5, 0.9), "int8": (0.03, 0.999)}  # relative error below, correlation above


def load(base: str, **model):
    spec = ModelSection(path=base, **model)
    family = families.for_model(spec)
    comps = family.load(spec, torch.float32)
    return family, replace(comps, sequence_length=16)


def linears_called(encoder, run) -> dict[str, type]:
    """Name -> class of the Linear layers that ran during `run()`."""
    called: dict[str, type] = {}

    def record(name: str, module, *_) -> None:  # a hook returning a value replaces the output
        called[name] = type(module)

    handles = [
        m.register_forward_hook(functools.partial(record, name))
        for name, m in encoder.named_modules()
        if isinstance(m, torch.nn.Linear)
    ]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return called


@pytest.mark.parametrize(
    ("base", "kind"),
    [
        ("builtin:tiny-qwen-image", "nf4"),
        ("builtin:tiny-qwen-image", "int8"),
        ("builtin:tiny-chroma", "nf4"),
    ],
)
def test_quantized_encoder_caches_prompts_close_to_full_precision(base, kind):
    family, full = load(base)
    _, quantized = load(base, text_encoder_quantize=kind)
    with torch.no_grad():
        reference = family.encode_prompts(full, PROMPTS)["prompt_embeds"]
        encoded = {}
        encoder = quantized.text_encoders["text_encoder"]
        called = linears_called(
            encoder, lambda: encoded.update(family.encode_prompts(quantized, PROMPTS))
        )
    # Every Linear that ran is a bitsandbytes layer, but those transformers keeps in full
    # precision by design (the LM head; T5's `wo`, its _keep_in_fp32_modules).
    kept = encoder.hf_quantizer.modules_to_not_convert
    plain = {name for name, cls in called.items() if cls is not BNB_LAYERS[kind]}
    assert all(any(name.split(".")[-1] == k or name == k for k in kept) for name in plain)
    assert sum(cls is BNB_LAYERS[kind] for cls in called.values()) > len(plain)
    embeds = encoded["prompt_embeds"]
    assert embeds.shape == reference.shape and not torch.equal(embeds, reference)
    relative = ((embeds - reference).norm() / reference.norm()).item()
    correlation = torch.corrcoef(torch.stack([embeds.flatten(), reference.flatten()]))[0, 1]
    most_error, least_correlation = BOUNDS[kind]
    assert relative < most_error and correlation > least_correlation
    # A quantized encoder's prompts are cached under their own keys.
    assert model_identity(family.spec.name, ModelSection(path=base)) != model_identity(
        family.spec.name, ModelSection(path=base, text_encoder_quantize=kind)
    )


def test_training_with_an_nf4_encoder_never_brings_it_to_the_device_for_grids(
    make_recipe, monkeypatch
):
    recipe = make_recipe(
        "model.text_encoder_quantize=nf4",
        "data.resolution=32",
        "train.max_sequence_length=16",
        "train.steps=2",
        "sample.prompts=[a red circle, a star]",
        "sample.steps=2",
        "sample.every=1",
        "sample.negative_prompt=blurry",  # true CFG: the negative prompt is encoded too
        base="builtin:tiny-qwen-image",
    )
    visits, encoder_calls = [], []
    on_device = grids.on_device
    training_grid = grids.training_grid

    def recording_on_device(modules, device):
        modules = list(modules)
        visits.append(modules)
        return on_device(modules, device)

    def counting_grid(recipe, output_dir, family, comps, step, accelerator, **kwargs):
        encoder = comps.text_encoders["text_encoder"]
        handle = encoder.register_forward_hook(lambda *_: encoder_calls.append(step) and None)
        try:
            return training_grid(recipe, output_dir, family, comps, step, accelerator, **kwargs)
        finally:
            handle.remove()

    monkeypatch.setattr(grids, "on_device", recording_on_device)
    monkeypatch.setattr(grids, "training_grid", counting_grid)
    result = run_training(recipe)

    comps = result.comps
    encoder = comps.text_encoders["text_encoder"]
    assert any(isinstance(m, Linear4bit) for m in encoder.modules())
    assert next(encoder.parameters()).device.type == "cpu"  # left the device after caching
    assert len(visits) == 2  # the grid at step 1 and the final one (step 2)
    assert all(not any(m is encoder for m in modules) for modules in visits)
    assert encoder_calls == []  # every grid prompt was encoded in the caching phase
    assert len(comps.encoded_prompts) == 2  # the prompts and the negative prompt

    # The same grid with the encoder live (encoding in the pipeline call) is pixel-identical.
    final = result.output_dir / "samples" / "step-000002.png"
    kept = np.asarray(Image.open(final))
    live = replace(comps, text_encoder_quantize="none", encoded_prompts={})
    monkeypatch.setattr(grids, "on_device", on_device)

    class Cpu:
        device = torch.device("cpu")
        trackers = ()

    training_grid(recipe, result.output_dir, result.family, live, 2, Cpu())
    assert np.array_equal(kept, np.asarray(Image.open(final)))


def test_offloaded_encoding_streams_every_block_and_equals_plain_encoding(monkeypatch):
    family, comps = load("builtin:tiny-z-image", text_encoder_offload=True)
    comps = text_encoders.mark(
        comps, ModelSection(path="builtin:tiny-z-image", text_encoder_offload=True)
    )
    encoder = comps.text_encoders["text_encoder"]
    blocks = [block for ml in text_encoders.layer_lists(encoder) for block in ml]
    assert len(blocks) >= 2
    moved = []
    to = text_encoders._to

    def fetch(device, block, args) -> None:
        moved.append(block)
        to(device, block, args)

    monkeypatch.setattr(text_encoders, "_to", fetch)
    with torch.no_grad():
        plain = family.encode_prompts(comps, PROMPTS)["prompt_embeds"]
        # (transformers adds its own output-recording hooks at the first forward)
        hooks = [(len(b._forward_pre_hooks), len(b._forward_hooks)) for b in blocks]
        with text_encoders.encoding_phase(comps, "cpu"):
            streamed = family.encode_prompts(comps, PROMPTS)["prompt_embeds"]
    assert torch.equal(plain, streamed)
    # One forward in the phase: every block fetched to the device once, for its own forward.
    assert sorted(map(id, moved)) == sorted(map(id, blocks))
    assert hooks == [(len(b._forward_pre_hooks), len(b._forward_hooks)) for b in blocks]
    assert {p.device.type for p in encoder.parameters()} == {"cpu"}


@pytest.mark.parametrize(
    ("base", "overrides", "message"),
    [
        ("builtin:tiny-sd15", ["model.text_encoder_quantize=nf4"], "CLIP encoders are small"),
        ("builtin:tiny-sdxl", ["model.text_encoder_offload=true"], "CLIP encoders are small"),
        (
            "builtin:tiny-qwen-image",
            ["model.text_encoder_offload=true", "data.cache=false"],
            r"encoded every step \(data.cache: false\)",
        ),
        (
            "builtin:tiny-flux",
            ["model.text_encoder_offload=true", "model.text_encoder_quantize=int8"],
            "choose one of the two",
        ),
    ],
)
def test_settings_that_cannot_apply_are_refused_in_one_line(make_recipe, base, overrides, message):
    recipe = make_recipe(*overrides, base=base)
    with pytest.raises(TunerError, match=message) as caught:
        families.known_for(recipe.model).validate(recipe)
    assert "\n" not in str(caught.value)


def test_class_images_render_without_the_quantized_encoder_on_the_device(
    make_recipe, tmp_path, monkeypatch
):
    """DreamBooth class generation: the class prompt is encoded first, then the images render
    with only the denoiser and VAE on the device, the same images the live encoder gives."""
    from tuner.training import dreambooth

    recipe = make_recipe(
        "model.text_encoder_quantize=nf4",
        "data.resolution=32",
        f"dreambooth.instance_dir={tmp_path / 'unused'}",
        "dreambooth.instance_prompt=a sks circle",
        "dreambooth.class_prompt=a circle",
        "dreambooth.num_class_images=2",
        "dreambooth.class_generation_steps=2",
        "dreambooth.with_prior_preservation=true",
        base="builtin:tiny-qwen-image",
    )
    family, comps = load(recipe.model.path, text_encoder_quantize="nf4")
    comps = text_encoders.mark(comps, recipe.model)
    encoder = comps.text_encoders["text_encoder"]
    visits = []
    on_device = dreambooth.on_device

    def recording_on_device(modules, device):
        modules = list(modules)
        visits.append(modules)
        return on_device(modules, device)

    monkeypatch.setattr(dreambooth, "on_device", recording_on_device)
    kept = tmp_path / "kept"
    assert dreambooth.generate_class_images(recipe, family, comps, kept, "cpu") == 2
    assert visits and not any(m is encoder for modules in visits for m in modules)
    assert len(comps.encoded_prompts) == 1

    live = tmp_path / "live"
    plain = replace(comps, text_encoder_quantize="none", encoded_prompts={})
    dreambooth.generate_class_images(recipe, family, plain, live, "cpu")
    assert any(m is encoder for m in visits[-1])  # the live path brings it
    for index in range(2):
        name = dreambooth.class_image_path(kept, index).name
        a, b = Image.open(kept / name), Image.open(live / name)
        assert np.array_equal(np.asarray(a), np.asarray(b))


# --- flux2 (Mistral Small 3.1 / Qwen3) and hidream (CLIP-L, CLIP-G, T5, Llama-3.1) -------------

LARGE_ENCODER_FAMILIES = [
    "builtin:tiny-flux2-dev",
    "builtin:tiny-flux2-klein",
    "builtin:tiny-hidream",
]


def record_into(called: dict, name: str, encoder, run) -> None:
    called[name] = (encoder, linears_called(encoder, run))


@pytest.mark.parametrize(
    ("base", "kind"),
    [
        ("builtin:tiny-flux2-dev", "nf4"),
        ("builtin:tiny-flux2-klein", "nf4"),
        # int8 here: nf4 on hidream's 32-wide toy T5 falls just under the correlation bound.
        ("builtin:tiny-hidream", "int8"),
    ],
)
def test_quantized_large_encoders_give_every_output_close_to_full_precision(base, kind):
    family, full = load(base)
    _, quantized = load(base, text_encoder_quantize=kind)
    assert set(quantized.text_encoders) == set(full.text_encoders)
    with torch.no_grad():
        reference = family.encode_prompts(full, PROMPTS)
        encoded = {}
        run = lambda: encoded.update(family.encode_prompts(quantized, PROMPTS))  # noqa: E731
        called = {}
        for name, encoder in quantized.text_encoders.items():  # each encoder's hooks, one run
            run = functools.partial(record_into, called, name, encoder, run)
        run()
    assert set(called) == set(quantized.text_encoders)
    for name, (encoder, ran) in called.items():
        kept = encoder.hf_quantizer.modules_to_not_convert
        plain = {n for n, cls in ran.items() if cls is not BNB_LAYERS[kind]}
        assert all(any(n.split(".")[-1] == k or n == k for k in kept) for n in plain), name
        assert sum(cls is BNB_LAYERS[kind] for cls in ran.values()) > len(plain), name
    most_error, least_correlation = BOUNDS[kind]
    assert set(encoded) == set(reference)
    for key, ref in reference.items():
        got = encoded[key]
        assert got.shape == ref.shape and not torch.equal(got, ref), key
        relative = ((got - ref).norm() / ref.norm()).item()
        correlation = torch.corrcoef(torch.stack([got.flatten(), ref.flatten()]))[0, 1]
        assert relative < most_error and correlation > least_correlation, key


@pytest.mark.parametrize("base", ["builtin:tiny-flux2-dev", "builtin:tiny-hidream"])
def test_offloaded_large_encoders_stream_each_block_and_equal_plain_encoding(base, monkeypatch):
    from tuner.families import hidream

    family, comps = load(base, text_encoder_offload=True)
    plain_comps = comps
    comps = text_encoders.mark(comps, ModelSection(path=base, text_encoder_offload=True))
    moved, ran, whole = [], [], []
    to, on_device = text_encoders._to, hidream.on_device

    def fetch(device, block, args) -> None:
        moved.append(block)
        to(device, block, args)

    def whole_on_device(modules, device):  # hidream's one-encoder-at-a-time placement
        modules = list(modules)
        whole.append(modules)
        return on_device(modules, device)

    monkeypatch.setattr(text_encoders, "_to", fetch)
    monkeypatch.setattr(hidream, "on_device", whole_on_device)
    blocks = [
        block
        for encoder in comps.text_encoders.values()
        for ml in text_encoders.layer_lists(encoder)
        for block in ml
    ]
    with torch.no_grad():
        plain = family.encode_prompts(plain_comps, PROMPTS)
        whole.clear()
        handles = [b.register_forward_hook(lambda m, *_: ran.append(m) and None) for b in blocks]
        with family.text_encoding_phase(comps, "cpu"):
            streamed = family.encode_prompts(comps, PROMPTS)
        for handle in handles:
            handle.remove()
    assert set(streamed) == set(plain)
    assert all(torch.equal(streamed[k], plain[k]) for k in plain)
    # Every block that ran was fetched for its own forward, once; no encoder went whole.
    assert ran and sorted(map(id, moved)) == sorted(map(id, ran))
    assert whole == []
    for encoder in comps.text_encoders.values():  # each encoder's main stack ran entirely
        stack = max(text_encoders.layer_lists(encoder), key=len)
        assert all(any(b is r for r in ran) for b in stack)


@pytest.mark.parametrize("base", LARGE_ENCODER_FAMILIES)
def test_grid_prompts_of_large_encoder_families_are_pre_encoded(make_recipe, base, monkeypatch):
    """The grid's encode_prompt calls are what pre-encoding intercepts: rendered with no
    encoder forward, the same pixels as with the encoders live."""
    recipe = make_recipe(
        "model.text_encoder_quantize=nf4",
        "data.resolution=32",
        "train.max_sequence_length=16",
        "sample.prompts=[a red circle]",
        "sample.steps=2",
        base=base,
    )
    family, comps = load(base, text_encoder_quantize="nf4")
    comps = text_encoders.mark(family.configure(comps, recipe), recipe.model)
    grids.pre_encode_sample_prompts(recipe, family, comps, "cpu")
    assert len(comps.encoded_prompts) >= 1
    calls = []
    handles = [
        e.register_forward_hook(lambda *_: calls.append(1) and None)
        for e in comps.text_encoders.values()
    ]

    class Cpu:
        device = torch.device("cpu")
        trackers = ()

    out = recipe.output.dir
    path = grids.training_grid(recipe, out, family, comps, 1, Cpu())
    for handle in handles:
        handle.remove()
    assert calls == []
    kept = np.asarray(Image.open(path))
    live = replace(comps, text_encoder_quantize="none", encoded_prompts={})
    grids.training_grid(recipe, out, family, live, 1, Cpu())
    assert np.array_equal(kept, np.asarray(Image.open(path)))


def test_nf4_flux2_klein_trains_with_its_encoder_off_the_device_after_caching(make_recipe):
    recipe = make_recipe(
        "model.text_encoder_quantize=nf4",
        "data.resolution=32",
        "train.max_sequence_length=16",
        "train.steps=2",
        "sample.prompts=[a star]",
        "sample.steps=2",
        "sample.every=1",
        base="builtin:tiny-flux2-klein",
    )
    result = run_training(recipe)
    encoder = result.comps.text_encoders["text_encoder"]
    assert any(isinstance(m, Linear4bit) for m in encoder.modules())
    assert {p.device.type for p in encoder.parameters()} == {"cpu"}
    assert len(result.comps.encoded_prompts) >= 1
    assert (result.output_dir / "samples" / "step-000002.png").is_file()


def single_transformer_file(base: str, comps, folder) -> str:
    """The transformer alone as users download it (BFL names for flux2, ComfyUI's for hidream)."""
    from safetensors.torch import save_file

    state = comps.denoiser.state_dict()
    if "flux2" in base:
        from test_flux2 import bfl_checkpoint

        state, name = bfl_checkpoint(state), "flux2-dev.safetensors"
    else:
        state = {f"model.diffusion_model.{k}": v.contiguous() for k, v in state.items()}
        name = "hidream_i1_full_tiny.safetensors"
    save_file(state, str(folder / name))
    return str(folder / name)


@pytest.mark.parametrize("base", ["builtin:tiny-flux2-dev", "builtin:tiny-hidream"])
def test_folder_and_single_file_encoders_load_quantized_like_the_builtin(base, tmp_path):
    family, comps = load(base)
    folder = tmp_path / ("FLUX.2-dev-tiny" if "flux2" in base else "HiDream-I1-Full-tiny")
    family.build_pipeline(comps).save_pretrained(folder)
    file = single_transformer_file(base, comps, tmp_path)
    with torch.no_grad():
        encoded = {}
        for source, config in ((base, None), (str(folder), None), (file, str(folder))):
            _, loaded = load(source, config=config, text_encoder_quantize="nf4")
            assert set(loaded.text_encoders) == set(comps.text_encoders)
            assert all(text_encoders.is_quantized(e) for e in loaded.text_encoders.values())
            encoded[source] = family.encode_prompts(loaded, PROMPTS)
    built = encoded.pop(base)
    for other in encoded.values():  # the same weights quantized the same way
        assert all(torch.equal(other[k], built[k]) for k in built)
