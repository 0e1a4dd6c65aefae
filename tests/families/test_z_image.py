"""Z-Image on its tiny builtin: the transformer call and text encoding equal ZImagePipeline's,
the diffusers and ComfyUI files load and agree, ComfyUI maps every name we write, buckets,
detection, the full-size parameter counts and the shipped recipes."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from tuner import families
from tuner.adapters import formats, lora
from tuner.builtins.z_image import (
    build_arch_z_image,
    build_tiny_z_image,
    z_image_transformer_config,
)
from tuner.errors import TunerError
from tuner.families.detection import family_from_file
from tuner.families.z_image import comfy_lora
from tuner.inference.pipelines import count_lora_layers, load_adapters, lora_specs
from tuner.inference.render import lora_scale, pipeline_modules
from tuner.recipe import AdapterSection, ModelSection, load_recipe
from tuner.training.run import run_training

REPO = Path(__file__).resolve().parents[2]
NAME = "builtin:tiny-z-image"
FAST = ("data.resolution=32", "train.max_sequence_length=64", "train.steps=3", "train.lr=1e-2")
PROMPT = "a red circle on a blue background"


def load(**model):
    spec = ModelSection(path=NAME, **model)
    family = families.for_model(spec)
    return family, family.load(spec, torch.float32)


def render(pipe, **kwargs) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    settings = {"guidance_scale": 0.0, "width": 32, "height": 32, **kwargs}
    return pipe(
        PROMPT,
        num_inference_steps=2,
        max_sequence_length=64,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
        **settings,
    ).images


def test_family_is_registered_with_its_builtins():
    assert "z-image" in families.names()
    family, comps = load()
    assert family.spec.name == "z-image" and family.spec.pipeline == "ZImagePipeline"
    assert comps.architecture == "z-image" and comps.sequence_length == 512


def test_predict_is_the_pipelines_transformer_call():
    """Lists of (C, 1, h, w) latents and unpadded captions, the 1 - sigma timestep and the
    negated output, all as ZImagePipeline calls its transformer."""
    family, comps = load()
    comps.sequence_length = 64
    seen = {}

    def hook(module, args, kwargs, output):
        seen.setdefault("args", args)
        seen.setdefault("output", output[0])

    handle = comps.denoiser.register_forward_hook(hook, with_kwargs=True)
    try:
        render(family.build_pipeline(comps))
    finally:
        handle.remove()
    latents, t, captions = seen["args"]
    cond = family.encode_prompts(comps, [PROMPT])
    n = int(cond["prompt_mask"].sum())
    assert len(captions) == 1 and captions[0].shape[0] == n  # no padding reaches the model
    torch.testing.assert_close(cond["prompt_embeds"][0, :n], captions[0])
    assert not cond["prompt_embeds"][0, n:].any()
    noisy = torch.stack(latents).squeeze(2)
    with torch.no_grad():
        pred = family.predict(comps, noisy, 1000 * (1 - t), cond, {})
    torch.testing.assert_close(pred, -torch.stack(seen["output"]).squeeze(2))


def test_prompts_are_encoded_by_the_pipeline_with_its_chat_template():
    family, comps = load()
    comps.sequence_length = 80
    prompts = ["a red circle", "a much longer prompt about a blue square"]
    asked = list(prompts)
    cond = family.encode_prompts(comps, asked)
    assert asked == prompts  # encode_prompt rewrites its list in place: ours is a copy
    tokenizer = comps.tokenizers["tokenizer"]
    templated = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompts[0]}],
        tokenize=False,
        add_generation_prompt=True,
        enable_thinking=True,
    )
    assert templated == "<|im_start|>user\na red circle<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer(templated, return_tensors="pt").input_ids
    lengths = cond["prompt_mask"].sum(dim=1).tolist()
    assert lengths[0] == ids.shape[1] and lengths[1] > lengths[0]
    with torch.no_grad():  # the second-to-last hidden states, as the pipeline reads them
        hidden = comps.text_encoders["text_encoder"](input_ids=ids, output_hidden_states=True)
    torch.testing.assert_close(cond["prompt_embeds"][0, : lengths[0]], hidden.hidden_states[-2][0])
    embeds, _ = family.build_pipeline(comps).encode_prompt(
        list(prompts), do_classifier_free_guidance=False, max_sequence_length=80
    )
    for row, embed in enumerate(embeds):
        torch.testing.assert_close(cond["prompt_embeds"][row, : lengths[row]], embed)


def test_trains_and_both_files_load_like_the_trained_model(make_recipe):
    """The diffusers file through ZImagePipeline.load_lora_weights (every module lands, the
    image changes, scale 0 is the base) and the ComfyUI file (alpha folded) give the same
    images as the model in memory."""
    pristine = {k: v.clone() for k, v in load()[1].denoiser.state_dict().items()}
    result = run_training(make_recipe(*FAST, "adapter.rank=4", "adapter.alpha=2", base=NAME))
    for key, value in result.comps.denoiser.state_dict().items():
        if "lora_" not in key:
            assert torch.equal(value, pristine[key.replace(".base_layer", "")]), key
    trained = render(result.family.build_pipeline(result.comps))
    targets = [
        n
        for n, _ in result.comps.denoiser.named_modules()
        if n.endswith(("to_q", "to_k", "to_v", "to_out.0"))
    ]
    assert any(n.startswith("noise_refiner.") for n in targets)
    assert any(n.startswith("context_refiner.") for n in targets)
    images = {}
    for name in (lora.WEIGHT_NAME, lora.KOHYA_WEIGHT_NAME):
        family, comps = load()
        pipe = family.build_pipeline(comps)
        specs = lora_specs([str(result.output_dir / name)])
        load_adapters(pipe, family, specs)
        assert count_lora_layers(pipe, specs[0].name) == len(targets)
        images[name] = render(pipe)
        with lora_scale(pipeline_modules(pipe), 0.0):
            base = render(pipe)
    torch.testing.assert_close(images[lora.WEIGHT_NAME], trained)
    torch.testing.assert_close(images[lora.KOHYA_WEIGHT_NAME], trained)
    torch.testing.assert_close(base, render(family.build_pipeline(load()[1])))
    assert (trained - base).abs().max() > 1e-3
    comfy, _ = formats.read_adapter(result.output_dir / lora.KOHYA_WEIGHT_NAME)
    assert comfy and all(k.startswith("diffusion_model.") for k in comfy)


def comfyui_z_image_names(config) -> set[str]:
    """The LoRA names ComfyUI maps for a Z-Image model, rebuilt by hand from ComfyUI's
    comfy/utils.py `z_image_to_diffusers` (the diffusers-side keys ending in `.weight`: per
    block of `layers`, `context_refiner` and `noise_refiner` the attention projections and
    norms, the feed-forward, its norms and adaLN_modulation.0; the final layer, x/cap/t
    embedders) and comfy/lora.py `model_lora_keys_unet`, whose Lumina2 branch accepts each as
    `diffusion_model.<name>` (mapping to_q/to_k/to_v onto slices of the fused qkv)."""
    per_block = (
        "attention.to_q",
        "attention.to_k",
        "attention.to_v",
        "attention.to_out.0",
        "attention.norm_q",
        "attention.norm_k",
        "attention_norm1",
        "attention_norm2",
        "feed_forward.w1",
        "feed_forward.w2",
        "feed_forward.w3",
        "ffn_norm1",
        "ffn_norm2",
        "adaLN_modulation.0",
    )
    blocks = [f"layers.{i}" for i in range(config["n_layers"])]
    for i in range(config["n_refiner_layers"]):
        blocks += [f"context_refiner.{i}", f"noise_refiner.{i}"]
    names = {f"{block}.{part}" for block in blocks for part in per_block}
    names |= {
        "all_final_layer.2-1.linear",
        "all_final_layer.2-1.adaLN_modulation.1",
        "all_x_embedder.2-1",
        "cap_embedder.0",
        "cap_embedder.1",
        "t_embedder.mlp.0",
        "t_embedder.mlp.2",
    }
    return {f"diffusion_model.{name}" for name in names}


def test_every_comfy_name_is_one_comfyui_maps():
    """A LoRA on every linear layer of the transformer (the widest choice) -> the ComfyUI file:
    each module name is in ComfyUI's Z-Image mapping, and the scale is folded into lora_B."""
    transformer = build_tiny_z_image()["transformer"]
    linears = [n for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)]
    state = {}
    for name in linears:
        state[f"transformer.{name}.lora_A.weight"] = torch.ones(4, 2)
        state[f"transformer.{name}.lora_B.weight"] = torch.ones(2, 4)
    metadata = {"lora_adapter_metadata": '{"transformer.r": 4, "transformer.lora_alpha": 2}'}
    comfy = comfy_lora(state, metadata)
    modules = {re.sub(r"\.lora_[AB]\.weight$", "", k) for k in comfy}
    assert len(modules) == len(linears)
    assert modules <= comfyui_z_image_names(transformer.config)
    assert all(torch.equal(v, torch.full((2, 4), 0.5)) for k, v in comfy.items() if "lora_B" in k)
    # The full-size model's names are covered too (meta device: no memory).
    with torch.device("meta"):
        full = type(transformer)(**z_image_transformer_config())
    names = comfyui_z_image_names(full.config)
    for name, module in full.named_modules():
        if isinstance(module, torch.nn.Linear):
            assert f"diffusion_model.{name}" in names, name
    with pytest.raises(TunerError, match="ComfyUI"):
        comfy_lora({"text_encoder.x.lora_A.weight": torch.ones(1, 1)}, {})


def test_odd_aspect_ratio_trains_in_its_bucket(tmp_path, make_recipe):
    """Bucket sides step by VAE scale x patch size (8 x 2, for the tiny model as the real one):
    a 3:2 image trains at a non-square latent; a step that is no such multiple is refused."""
    data = tmp_path / "wide"
    data.mkdir()
    Image.new("RGB", (96, 64), (200, 30, 30)).save(data / "wide.png")
    (data / "wide.txt").write_text("a red rectangle")
    seen = []
    recipe = make_recipe(
        *FAST,
        f"data.datasets.0.path={data}",
        "train.batch_size=1",
        "data.resolution=64",
        "data.buckets={step: 16, min_side: 16}",
        base=NAME,
    )
    family, comps = load()
    original = type(family).predict

    def spy(self, comps, noisy, *rest):
        seen.append(tuple(noisy.shape[-2:]))
        return original(self, comps, noisy, *rest)

    type(family).predict = spy
    try:
        run_training(recipe)
    finally:
        type(family).predict = original
    ((h, w),) = set(seen)
    assert (8 * h, 8 * w) == (48, 80)  # latent x VAE scale 8: the 3:2 bucket of area 64^2
    with pytest.raises(TunerError, match="data.buckets.step"):
        family.configure(comps, make_recipe(*FAST, "data.buckets={step: 24}", base=NAME))


def test_loads_from_a_diffusers_folder(tmp_path):
    family, comps = load()
    family.build_pipeline(comps).save_pretrained(tmp_path / "model")
    spec = ModelSection(path=str(tmp_path / "model"))
    assert families.for_model(spec).spec.name == "z-image"  # from model_index.json
    loaded = family.load(spec, torch.float32)
    torch.testing.assert_close(
        render(family.build_pipeline(loaded)), render(family.build_pipeline(comps))
    )


def test_single_file_is_recognised_by_its_keys(tmp_path):
    """The released single file (original names: fused attention.qkv, adaLN_modulation.0) and
    its ComfyUI-prefixed variant are Z-Image; a Z-Image ControlNet and Flux/SD3 files are not."""
    one = torch.zeros(1)
    cases = {
        "z.safetensors": ["layers.0.adaLN_modulation.0.weight", "layers.0.attention.qkv.weight"],
        "comfy.safetensors": ["model.diffusion_model.layers.0.adaLN_modulation.0.weight"],
    }
    for name, keys in cases.items():
        save_file({k: torch.zeros(1) for k in keys}, tmp_path / name)
        assert family_from_file(tmp_path / name) == "z-image"
    save_file({"double_blocks.0.img_attn.qkv.weight": one}, tmp_path / "flux.safetensors")
    recognise = families.get("z-image").spec.recognize
    control = {"control_layers.0.adaLN_modulation.0.weight", "control_all_x_embedder.2-1.weight"}
    assert not recognise.matches_keys(control)
    assert family_from_file(tmp_path / "flux.safetensors") == "flux"


def test_turbo_is_warned_about_and_guidance_refused(make_recipe, caplog):
    family, comps = load()
    recipe = make_recipe(*FAST, "model.path=Tongyi-MAI/Z-Image-Turbo", "model.family=z-image")
    with caplog.at_level(logging.WARNING, logger="tuner"):
        configured = family.configure(comps, recipe)
    assert any("distill" in r.getMessage() for r in caplog.records)
    assert configured.sequence_length == 64 and configured.identity.endswith(":qwen-64")
    for override, message in [
        ("train.guidance=3.5", "train.guidance"),
        ("train.max_sequence_length=2048", "train.max_sequence_length"),
        ("adapter.text_encoder=true", "adapter.text_encoder"),
        ("train.min_snr_gamma=5", "train.min_snr_gamma"),
    ]:
        with pytest.raises(TunerError, match=message):
            family.validate(make_recipe(*FAST, override, base=NAME))


def test_arch_builder_has_the_released_sizes():
    """builtin:arch-z-image on the meta device: the 6.15B Z-Image transformer, Qwen3-4B without
    its LM head (4.02B), the Flux VAE (84M)."""
    with torch.device("meta"):
        arch = build_arch_z_image()

    def billions(module) -> float:
        return round(sum(p.numel() for p in module.parameters()) / 1e9, 2)

    assert billions(arch["transformer"]) == 6.15
    assert billions(arch["text_encoder"]) == 4.02
    assert arch["transformer"].dtype == torch.bfloat16
    assert 0.08 <= billions(arch["vae"]) <= 0.09


def commented_targets(recipe: Path) -> list[dict]:
    import yaml

    return [
        yaml.safe_load(line.strip().removeprefix("# "))
        for line in recipe.read_text().splitlines()
        if re.match(r"^\s*# (targets|target_regex): ", line)
    ]


@pytest.mark.parametrize("recipe", ["z-image/style-lora.yaml", "z-image/dreambooth-lora.yaml"])
def test_recipes_check_and_their_target_examples_name_real_modules(recipe, monkeypatch):
    monkeypatch.chdir(REPO)
    loaded = load_recipe(f"recipes/{recipe}", [])
    family = families.get("z-image")
    assert loaded.model.family == "z-image"
    family.validate(loaded)
    with torch.device("meta"):
        model = type(build_tiny_z_image()["transformer"])(**z_image_transformer_config())
    for example in commented_targets(REPO / "recipes" / recipe):
        lora.denoiser_targets(AdapterSection(rank=4, **example), family, model)


def test_quickstart_recipe_trains(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    loaded = load_recipe(
        "recipes/quickstart-z-image.yaml",
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


def test_dreambooth_with_prior_preservation(make_recipe, tmp_path):
    """Class images rendered by the base pipeline (no CFG, as Turbo samples), then instance and
    class prompts of different token counts trained in one batch."""
    class_dir = tmp_path / "class"
    recipe = make_recipe(
        *FAST,
        "~data.datasets",
        f"dreambooth.instance_dir={REPO / 'datasets' / 'toy-subject'}",
        "dreambooth.instance_prompt=a sks circle",
        "dreambooth.class_prompt=a circle drawn on paper",
        "dreambooth.num_class_images=2",
        f"dreambooth.class_dir={class_dir}",
        "dreambooth.class_generation_steps=2",
        "sample.guidance=0.0",
        base=NAME,
    )
    result = run_training(recipe)
    assert sorted(p.name for p in class_dir.glob("*.png")) == ["class-00000.png", "class-00001.png"]
    family, comps = load()
    pipe = family.build_pipeline(comps)
    base = render(pipe)
    load_adapters(pipe, family, lora_specs([str(result.output_dir)]))
    assert (render(pipe) - base).abs().max() > 1e-3


def original_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers Z-Image transformer state dict in the released single file's names (fused
    attention.qkv, attention.out, q_norm/k_norm, final_layer, x_embedder)."""
    renames = {
        ".attention.to_out.0.": ".attention.out.",
        ".attention.norm_q.": ".attention.q_norm.",
        ".attention.norm_k.": ".attention.k_norm.",
        "all_final_layer.2-1.": "final_layer.",
        "all_x_embedder.2-1.": "x_embedder.",
    }
    out = {}
    for key, value in state.items():
        if ".attention.to_k." in key or ".attention.to_v." in key:
            continue
        if ".attention.to_q." in key:
            parts = [state[key.replace("to_q", name)] for name in ("to_q", "to_k", "to_v")]
            out[key.replace(".to_q.", ".qkv.")] = torch.cat(parts)
            continue
        for old, new in renames.items():
            key = key.replace(old, new)
        out[key] = value.clone()
    return out


def test_loads_a_single_file_transformer(tmp_path):
    """The released single file is the transformer alone, in original names: it is detected,
    converted by diffusers, and the rest of the pipeline comes from model.config."""
    family, comps = load()
    family.build_pipeline(comps).save_pretrained(tmp_path / "model")
    file = tmp_path / "z_image_turbo_bf16.safetensors"
    save_file(original_names(comps.denoiser.state_dict()), file)
    spec = ModelSection(path=str(file), config=str(tmp_path / "model"))
    assert families.for_model(spec).spec.name == "z-image"
    loaded = family.load(spec, torch.float32)
    assert loaded.architecture == "z-image-turbo"  # named so: training warns
    expected = comps.denoiser.state_dict()
    for key, value in loaded.denoiser.state_dict().items():
        assert torch.equal(value, expected[key]), key
    torch.testing.assert_close(
        render(family.build_pipeline(loaded)), render(family.build_pipeline(comps))
    )
