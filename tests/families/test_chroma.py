"""The chroma family on builtin:tiny-chroma: prompt encoding and the denoiser call equal
ChromaPipeline's own (T5 attention mask included), gradient checkpointing keeps the mask,
an odd aspect ratio trains, the adapter files load through ChromaPipeline.load_lora_weights,
detection tells Chroma from Flux, and the shipped recipes."""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

import pytest
import torch
import yaml
from diffusers import ChromaPipeline, ChromaTransformer2DModel
from PIL import Image
from safetensors.torch import save_file

from tuner import families
from tuner.adapters import formats, lora
from tuner.builtins.chroma import chroma_transformer_config
from tuner.errors import TunerError
from tuner.families import chroma, mmdit
from tuner.families.detection import family_from_file
from tuner.inference.render import lora_scale, pipeline_modules
from tuner.recipe import AdapterSection, ModelSection, load_recipe
from tuner.training.run import run_training

REPO = Path(__file__).resolve().parents[2]
BASE = "builtin:tiny-chroma"
FAST = ("data.resolution=32", "train.max_sequence_length=16", "train.steps=3", "train.lr=1e-2")
PROMPT = "a red circle"  # shorter than 16 T5 tokens: the mask has padding to hide


def load(**model):
    spec = ModelSection(path=BASE, **model)
    family = families.for_model(spec)
    comps = family.load(spec, torch.float32)
    comps.sequence_length = 16
    return family, comps


def render(pipe, width=32, height=32, **kwargs) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    options = {"guidance_scale": 1.0, **kwargs}
    return pipe(
        PROMPT,
        num_inference_steps=2,
        width=width,
        height=height,
        max_sequence_length=16,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
        **options,
    ).images


def lora_modules(transformer) -> set[str]:
    return {n.rsplit(".lora_A", 1)[0] for n, _ in transformer.named_modules() if ".lora_A" in n}


def test_predict_is_the_pipelines_transformer_call():
    """Packing, ids, the T5 mask (extended over the image tokens) and timestep/1000, as
    ChromaPipeline passes them, at a non-square size and with classifier-free guidance on."""
    family, comps = load()
    seen = {}

    def hook(module, args, call_kwargs, output):
        seen.setdefault("kwargs", call_kwargs)  # the first call: the positive prompt
        seen.setdefault("output", output[0])

    pipe = family.build_pipeline(comps)
    handle = pipe.transformer.register_forward_hook(hook, with_kwargs=True)
    try:
        render(pipe, width=48, height=32, guidance_scale=4.0)
    finally:
        handle.remove()
    call = seen["kwargs"]
    h, w = 32 // mmdit.vae_scale(comps), 48 // mmdit.vae_scale(comps)
    cond = family.encode_prompts(comps, [PROMPT])
    assert set(cond) == {"prompt_embeds", "prompt_attention_mask"}
    torch.testing.assert_close(cond["prompt_embeds"], call["encoder_hidden_states"])
    text_mask = cond["prompt_attention_mask"]
    assert text_mask.shape == (1, 16)
    torch.testing.assert_close(call["attention_mask"][:, :16], text_mask)
    # All padding but the first token is masked out (Chroma's masking).
    tokens = len(comps.tokenizers["tokenizer"](PROMPT).input_ids)
    assert tokens < 16 and int(text_mask.sum()) == tokens + 1
    noisy = ChromaPipeline._unpack_latents(call["hidden_states"], h, w, 1)
    with torch.no_grad():
        pred = family.predict(comps, noisy, call["timestep"] * 1000, cond, {})
    torch.testing.assert_close(pred, ChromaPipeline._unpack_latents(seen["output"], h, w, 1))


def test_gradient_checkpointing_keeps_the_attention_mask(monkeypatch):
    """diffusers' checkpointed forward drops the mask in the single blocks; predict puts it
    back, so a checkpointed step equals a plain one (outputs and gradients)."""
    family, comps = load()
    with torch.no_grad():
        cond = family.encode_prompts(comps, [PROMPT])
    comps.denoiser.requires_grad_(False)  # frozen as in training: gradients reach the input
    noisy = torch.randn(1, 16, 16, 24, generator=torch.Generator().manual_seed(1))
    timesteps = torch.tensor([600.0])

    def step(checkpointing: bool):
        if checkpointing:
            comps.denoiser.enable_gradient_checkpointing()
        else:
            comps.denoiser.disable_gradient_checkpointing()
        x = noisy.clone().requires_grad_()
        pred = family.predict(comps, x, timesteps, cond, {})
        pred.square().sum().backward()
        return pred.detach(), x.grad

    plain, checkpointed = step(False), step(True)
    torch.testing.assert_close(checkpointed[0], plain[0])
    torch.testing.assert_close(checkpointed[1], plain[1])
    # Without the fix the single blocks attend to padding: the workaround still matters (if
    # this fails, diffusers passes the mask itself and single_blocks_get_the_mask can go).
    monkeypatch.setattr(chroma, "single_blocks_get_the_mask", lambda *_: contextlib.nullcontext())
    unmasked = family.predict(comps, noisy, timesteps, cond, {})
    assert (unmasked.detach() - plain[0]).abs().max() > 1e-6
    comps.denoiser.disable_gradient_checkpointing()


def odd_aspect_dataset(folder: Path) -> Path:
    folder.mkdir()
    for i in range(4):
        pixels = torch.zeros(40, 72, 3, dtype=torch.uint8)
        pixels[:, i * 16 : i * 16 + 8] = 255  # vertical stripes in a 72x40 frame
        Image.fromarray(pixels.numpy()).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"stripes number {i}")
    return folder


def test_odd_aspect_ratio_trains_and_files_load_in_chroma_pipeline(
    make_recipe, tmp_path, monkeypatch
):
    shapes = []
    predict = chroma.ChromaFamily.predict

    def spy(self, comps, noisy, *args):
        shapes.append(tuple(noisy.shape[2:]))
        return predict(self, comps, noisy, *args)

    monkeypatch.setattr(chroma.ChromaFamily, "predict", spy)
    data = odd_aspect_dataset(tmp_path / "wide")
    recipe = make_recipe(
        *FAST,
        f"data.datasets.0.path={data}",
        "data.resolution=48",
        "data.buckets.step=16",
        "data.buckets.min_side=16",
        "data.buckets.max_side=96",
        base=BASE,
    )
    pristine = {k: v.clone() for k, v in load()[1].denoiser.state_dict().items()}
    result = run_training(recipe)
    assert shapes and all(h != w for h, w in shapes)  # a wide bucket, e.g. 64x32 pixels
    trained = result.comps.denoiser
    for key, value in trained.state_dict().items():
        if "lora_" not in key:
            assert torch.equal(value, pristine[key.replace(".base_layer", "")]), key

    in_memory = render(result.family.build_pipeline(result.comps))
    base = render(load()[0].build_pipeline(load()[1]))
    for name in (lora.WEIGHT_NAME, lora.KOHYA_WEIGHT_NAME):
        family, comps = load()
        pipe = family.build_pipeline(comps)
        pipe.load_lora_weights(str(result.output_dir / name))
        assert lora_modules(pipe.transformer) == lora_modules(trained), name  # every module
        after = render(pipe)
        torch.testing.assert_close(after, in_memory)
        assert (after - base).abs().max() > 1e-3  # the adapter changes the image
        with lora_scale(pipeline_modules(pipe), 0.0):
            torch.testing.assert_close(render(pipe), base)  # scale 0 is the base model


def test_kohya_file_uses_the_layout_comfyui_maps_for_chroma(make_recipe):
    result = run_training(make_recipe(*FAST, "adapter.rank=4", "adapter.alpha=2", base=BASE))
    state, metadata = formats.read_adapter(result.output_dir / lora.KOHYA_WEIGHT_NAME)
    assert all(
        k.startswith(("lora_transformer_transformer_blocks_", "lora_transformer_single_"))
        for k in state
    )
    assert {float(v) for k, v in state.items() if k.endswith(".alpha")} == {2.0}
    assert metadata["ss_base_model_version"] == "chroma"
    assert metadata["modelspec.architecture"] == "chroma/lora"


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        (
            ["double_blocks.0.img_attn.qkv.weight", "distilled_guidance_layer.in_proj.bias"],
            "chroma",
        ),
        (
            [
                "model.diffusion_model.double_blocks.0.img_attn.qkv.weight",
                "model.diffusion_model.distilled_guidance_layer.in_proj.bias",
            ],
            "chroma",
        ),
        (["double_blocks.0.img_attn.qkv.weight", "double_blocks.0.img_mod.lin.weight"], "flux"),
        (["double_blocks.0.img_attn.qkv.weight", "guidance_in.in_layer.bias"], "flux"),
    ],
)
def test_single_files_tell_chroma_from_flux(tmp_path, keys, expected):
    file = tmp_path / "model.safetensors"
    save_file({key: torch.zeros(1) for key in keys}, str(file))
    assert family_from_file(file) == expected


def test_loads_from_a_diffusers_folder(tmp_path):
    family, comps = load()
    family.build_pipeline(comps).save_pretrained(tmp_path / "model")
    spec = ModelSection(path=str(tmp_path / "model"))
    assert families.for_model(spec).spec.name == "chroma"  # model_index.json: ChromaPipeline
    loaded = family.load(spec, torch.float32)
    torch.testing.assert_close(
        render(family.build_pipeline(loaded)), render(family.build_pipeline(comps))
    )


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.guidance=3.5", "train.guidance: chroma has no guidance embedding"),
        ("adapter.text_encoder=true", "adapter.text_encoder"),
        ("train.min_snr_gamma=5", "train.min_snr_gamma"),
        ("train.max_sequence_length=600", "train.max_sequence_length"),
        ("data.datasets.0.resolution=34", "data.datasets.0.resolution: 34 is not a multiple of 4"),
    ],
)
def test_refuses_what_chroma_cannot_do(override, message, make_recipe):
    recipe = make_recipe(*FAST, override, base=BASE)
    family, comps = load()
    with pytest.raises(TunerError, match=message):
        family.validate(recipe)
        family.configure(comps, recipe)


def test_sequence_length_and_default_targets(make_recipe):
    family, comps = load()
    comps = family.configure(comps, make_recipe(*FAST, base=BASE))
    assert comps.sequence_length == 16 and comps.identity.endswith(":t5-16")
    assert family.load(ModelSection(path=BASE), torch.float32).sequence_length == 512
    targets = lora.denoiser_targets(AdapterSection(), family, comps.denoiser)
    assert targets == list(mmdit.JOINT_ATTENTION)
    assert not family.spec.text_encoder_lora


def test_arch_chroma_has_the_published_size():
    """builtin:arch-chroma on the meta device: Chroma1-HD's 8.9B transformer (bf16) and the
    4.76B T5-XXL encoder."""
    from tuner.builtins.chroma import build_arch_chroma

    with torch.device("meta"):
        modules = build_arch_chroma()

    def billions(module) -> float:
        return round(sum(p.numel() for p in module.parameters()) / 1e9, 2)

    assert billions(modules["transformer"]) == 8.90
    assert modules["transformer"].dtype == torch.bfloat16
    assert billions(modules["text_encoder"]) == 4.76
    assert set(modules) == {"transformer", "vae", "text_encoder", "tokenizer", "scheduler"}


@pytest.mark.parametrize("recipe", ["chroma/style-lora.yaml", "chroma/dreambooth-lora.yaml"])
def test_recipe_target_examples_name_real_modules(recipe):
    with torch.device("meta"):
        model = ChromaTransformer2DModel(**chroma_transformer_config())
    text = (REPO / "recipes" / recipe).read_text()
    examples = [
        yaml.safe_load(m[1])
        for m in re.finditer(r"^\s*# ((?:targets|target_regex): .+)$", text, re.M)
    ]
    assert examples
    for example in examples:
        lora.denoiser_targets(AdapterSection(rank=4, **example), families.get("chroma"), model)


@pytest.mark.parametrize("recipe", ["chroma/style-lora.yaml", "chroma/dreambooth-lora.yaml"])
def test_shipped_recipes_pass_the_family_checks(recipe, monkeypatch):
    monkeypatch.chdir(REPO)
    loaded = load_recipe(f"recipes/{recipe}", [])
    assert loaded.model.family == "chroma" and loaded.model.quantize == "nf4"
    families.get("chroma").validate(loaded)


def test_quickstart_recipe_trains(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    loaded = load_recipe(
        "recipes/quickstart-chroma.yaml",
        [
            "train.steps=2",
            "sample.prompts=[]",
            f"output.dir={tmp_path / 'out'}",
            f"data.cache_dir={tmp_path / 'cache'}",
        ],
    )
    result = run_training(loaded)
    assert (result.output_dir / lora.WEIGHT_NAME).is_file()
    assert (result.output_dir / lora.KOHYA_WEIGHT_NAME).is_file()


def test_a_bfl_single_file_loads_like_the_folder(tmp_path):
    """model.path=<ComfyUI/BFL-layout file> with model.config=<diffusers folder>: detected as
    chroma, every transformer weight as in the folder, and the same images."""
    from chroma_export import save_chroma_single_file

    family, comps = load()
    family.build_pipeline(comps).save_pretrained(tmp_path / "model")
    file = save_chroma_single_file(comps.denoiser, tmp_path / "chroma.safetensors")
    assert family_from_file(file) == "chroma"
    spec = ModelSection(path=str(file), config=str(tmp_path / "model"))
    loaded = families.for_model(spec).load(spec, torch.float32)
    expected = comps.denoiser.state_dict()
    got = loaded.denoiser.state_dict()
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    torch.testing.assert_close(
        render(family.build_pipeline(loaded)), render(family.build_pipeline(comps)), rtol=0, atol=0
    )


def test_single_file_conversion_matches_diffusers_own_at_full_width():
    """diffusers' converter reads only full-width Chroma files (it splits linear1 at 3072 and
    12288): on a file of that width (one block each, narrow inputs) ours gives the same state."""
    from chroma_export import chroma_to_bfl
    from diffusers.loaders.single_file_utils import (
        convert_chroma_transformer_checkpoint_to_diffusers,
    )

    from tuner.families.chroma_file import to_diffusers

    config = {
        "num_layers": 1,
        "num_single_layers": 1,
        "num_attention_heads": 24,
        "attention_head_dim": 128,
    }
    generator = torch.Generator().manual_seed(0)
    _, comps = load()
    config["approximator_layers"] = comps.denoiser.config.approximator_layers
    state = {}
    for key, tensor in comps.denoiser.state_dict().items():
        parts = key.split(".")
        if parts[0] in ("transformer_blocks", "single_transformer_blocks") and parts[1] != "0":
            continue
        shape = list(tensor.shape)
        single = parts[0] == "single_transformer_blocks"
        if single and "proj_out" not in key and "norm" not in key:
            shape[0] = 3072 * 4 if "proj_mlp" in key else 3072
        state[key] = torch.randn(shape, generator=generator)
    bfl = {f"model.diffusion_model.{k}": v for k, v in chroma_to_bfl(state, config).items()}
    ours = to_diffusers(dict(bfl), config)
    theirs = convert_chroma_transformer_checkpoint_to_diffusers(dict(bfl))
    assert ours.keys() == theirs.keys() == state.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
