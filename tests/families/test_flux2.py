"""What is specific to flux2, on builtin:tiny-flux2-dev and builtin:tiny-flux2-klein: predict is
the pipelines' own transformer call (tokens, position ids, sigma timestep, dev's guidance), the
prompts are the pipelines' own encode_prompt (template, stacked hidden-state layers), latents are
the pipelines' image encoding, the empirical timestep shift, the ComfyUI file's every name is one
ComfyUI maps (BFL names) and diffusers' own loaders read both files, buckets, detection,
refusals, the full-size parameter counts and the recipes. The contract battery
(tests/families/test_contract.py) adds the checks every family passes."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
import torch
from diffusers import Flux2Pipeline as DiffusersFlux2Pipeline
from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers
from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu
from PIL import Image
from safetensors.torch import save_file

from tuner import families
from tuner.adapters import formats, lora
from tuner.builtins.flux2 import build_arch_flux2, build_tiny_flux2_dev, flux2_transformer_config
from tuner.errors import TunerError
from tuner.families.detection import family_from_file
from tuner.families.flux2 import file_variant
from tuner.families.flux2_export import comfy_lora
from tuner.recipe import AdapterSection, ModelSection, load_recipe
from tuner.training.run import run_training

REPO = Path(__file__).resolve().parents[2]
DEV, KLEIN = "builtin:tiny-flux2-dev", "builtin:tiny-flux2-klein"
FAST = ("data.resolution=32", "train.max_sequence_length=16", "train.steps=2", "train.lr=1e-2")
PROMPT = "a red circle on a blue background"


def load(path=DEV, **model):
    spec = ModelSection(path=path, **model)
    family = families.for_model(spec)
    comps = family.load(spec, torch.float32)
    comps.sequence_length = 16
    return family, comps


def render(pipe, prompt=PROMPT, **kwargs) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    settings = {"width": 32, "height": 32, "guidance_scale": 1.0, **kwargs}
    return pipe(
        prompt,
        num_inference_steps=2,
        max_sequence_length=16,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
        **settings,
    ).images


def test_variants_are_told_apart():
    _, dev = load(DEV)
    _, klein = load(KLEIN)
    assert (dev.architecture, klein.architecture) == ("flux-2-dev", "flux-2-klein-base")
    assert type(families.get("flux2").build_pipeline(klein)).__name__ == "Flux2KleinPipeline"


@pytest.mark.parametrize("path, guidance", [(DEV, 3.0), (KLEIN, 1.0)], ids=["dev", "klein"])
def test_predict_is_the_pipelines_transformer_call(path, guidance):
    family, comps = load(path)
    comps.guidance = guidance if path == DEV else None
    seen = {}

    def hook(module, args, kwargs, output):
        seen.setdefault("kwargs", kwargs)
        seen.setdefault("output", output[0])

    handle = comps.denoiser.register_forward_hook(hook, with_kwargs=True)
    try:
        render(family.build_pipeline(comps), guidance_scale=guidance)
    finally:
        handle.remove()
    call = seen["kwargs"]
    b, n, c = call["hidden_states"].shape
    side = int(n**0.5)
    noisy = call["hidden_states"].transpose(1, 2).reshape(b, c, side, side)
    cond = family.encode_prompts(comps, [PROMPT])
    torch.testing.assert_close(cond["prompt_embeds"], call["encoder_hidden_states"])
    captured = {}

    def spy(module, args, kwargs):
        captured.update(kwargs)

    handle = comps.denoiser.register_forward_pre_hook(spy, with_kwargs=True)
    with torch.no_grad():
        pred = family.predict(comps, noisy, call["timestep"] * 1000, cond, {})
    handle.remove()
    for key in ("img_ids", "txt_ids"):
        assert torch.equal(captured[key].cpu(), call[key].cpu()), key
    if path == DEV:
        torch.testing.assert_close(captured["guidance"], call["guidance"])
    else:
        assert captured["guidance"] is None and call["guidance"] is None
    expected = seen["output"].transpose(1, 2).reshape(b, c, side, side)
    torch.testing.assert_close(pred, expected)


def test_klein_prompts_are_three_qwen3_layers_over_the_chat_template():
    family, comps = load(KLEIN)
    prompts = [PROMPT, "a star"]
    cond = family.encode_prompts(comps, prompts)
    tokenizer = comps.tokenizers["tokenizer"]
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "a star"}],
        tokenize=False,
        add_generation_prompt=True,
        enable_thinking=False,
    )
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    inputs = tokenizer(
        text, padding="max_length", truncation=True, max_length=16, return_tensors="pt"
    )
    with torch.no_grad():
        out = comps.text_encoders["text_encoder"](**inputs, output_hidden_states=True)
    stacked = torch.cat([out.hidden_states[k] for k in (9, 18, 27)], dim=-1)
    torch.testing.assert_close(cond["prompt_embeds"][1], stacked[0])
    alone = family.encode_prompts(comps, ["a star"])  # batch-independent: the cache stores rows
    torch.testing.assert_close(alone["prompt_embeds"][0], cond["prompt_embeds"][1])


def test_dev_prompts_are_mistral_layers_under_bfls_system_prompt():
    family, comps = load(DEV)
    pipe = family.build_pipeline(comps)
    cond = family.encode_prompts(comps, [PROMPT])
    embeds, text_ids = pipe.encode_prompt(PROMPT, max_sequence_length=16)
    torch.testing.assert_close(cond["prompt_embeds"], embeds)
    assert cond["prompt_embeds"].shape == (1, 16, 3 * 8) and text_ids[0, :, 3].tolist() == list(
        range(16)
    )
    from diffusers.pipelines.flux2.pipeline_flux2 import format_input

    text = comps.tokenizers["tokenizer"].apply_chat_template(format_input([PROMPT]), tokenize=False)
    assert text[0].startswith("<s>[SYSTEM_PROMPT]You are an AI that reasons")


def test_latents_are_the_pipelines_image_encoding():
    family, comps = load(DEV)
    pixels = torch.rand(1, 3, 48, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    pipe = family.build_pipeline(comps)
    with torch.no_grad():
        ours = family.encode_images(comps, pixels)
        theirs = pipe._encode_vae_image(pixels, generator=None)
    assert ours.shape == (1, *family.latent_shape(comps, (32, 48))) == (1, 32, 3, 2)
    torch.testing.assert_close(ours, theirs)


def test_objective_shifts_as_the_pipelines_do(make_recipe):
    family, comps = load(DEV)
    objective = family.objective(comps, make_recipe(*FAST, base=DEV).train)
    shape = (1, 128, 64, 48)  # a 1024x768 image: 64 x 48 tokens after patchifying
    assert objective.resolution_shift
    assert objective.mu(shape) == pytest.approx(compute_empirical_mu(64 * 48, 50))
    u = torch.tensor([0.1, 0.5, 0.9])
    mu = compute_empirical_mu(64 * 48, 50)
    torch.testing.assert_close(
        objective.shift_sigmas(u, shape), comps.scheduler.time_shift(mu, 1.0, u)
    )


def bfl_names(config) -> set[str]:
    """The weights of BFL's FLUX.2 checkpoint (what ComfyUI's Flux model holds), from the
    model's config; test_bfl_names_are_the_checkpoints proves them against diffusers."""
    names = {"img_in", "txt_in", "time_in.in_layer", "time_in.out_layer", "final_layer.linear"}
    names |= {"final_layer.adaLN_modulation.1", "single_stream_modulation.lin"}
    names |= {"double_stream_modulation_img.lin", "double_stream_modulation_txt.lin"}
    if config["guidance_embeds"]:
        names |= {"guidance_in.in_layer", "guidance_in.out_layer"}
    for i in range(config["num_layers"]):
        for stream in ("img", "txt"):
            for part in ("attn.qkv", "attn.proj", "mlp.0", "mlp.2"):
                names.add(f"double_blocks.{i}.{stream}_{part}")
            names |= {f"double_blocks.{i}.{stream}_attn.norm.{n}_norm" for n in ("query", "key")}
    for i in range(config["num_single_layers"]):
        names |= {f"single_blocks.{i}.{p}" for p in ("linear1", "linear2")}
        names |= {f"single_blocks.{i}.norm.{n}_norm" for n in ("query", "key")}
    return names


def test_bfl_names_are_the_checkpoints():
    """A checkpoint with exactly these names (norms as `.scale`) converts through diffusers'
    Flux.2 single-file converter onto every weight of the model: they are BFL's names."""
    transformer = build_tiny_flux2_dev()["transformer"]
    shapes = {}
    model = transformer.state_dict()
    for name in bfl_names(transformer.config):
        suffix = ".scale" if name.endswith("_norm") else ".weight"
        shapes[name + suffix] = torch.zeros(6, 2)  # fused layers are split in 3 and 2
    converted = convert_flux2_transformer_checkpoint_to_diffusers(dict(shapes))
    assert set(converted) == set(model)


def test_every_comfy_name_is_one_comfyui_maps():
    """LoRA on every layer the ComfyUI file can hold -> each module is `lora_unet_` + a BFL
    weight name (what comfy/lora.py model_lora_keys_unet maps for any model), alpha = rank,
    and the fused qkv holds the three products stacked."""
    transformer = build_tiny_flux2_dev()["transformer"]
    skip = ("modulation", "norm_out", "guidance_embedder")
    linears = [
        n
        for n, m in transformer.named_modules()
        if isinstance(m, torch.nn.Linear) and not any(s in n for s in skip)
    ]
    generator = torch.Generator().manual_seed(0)
    state = {}
    for name in linears:
        layer = transformer.get_submodule(name)
        state[f"transformer.{name}.lora_A.weight"] = torch.randn(
            4, layer.in_features, generator=generator
        )
        state[f"transformer.{name}.lora_B.weight"] = torch.randn(
            layer.out_features, 4, generator=generator
        )
    metadata = {"lora_adapter_metadata": '{"transformer.r": 4, "transformer.lora_alpha": 2}'}
    comfy = comfy_lora(state, metadata)
    modules = {re.sub(r"\.(lora_down\.weight|lora_up\.weight|alpha)$", "", k) for k in comfy}
    mapped = {"lora_unet_" + n.replace(".", "_") for n in bfl_names(transformer.config)}
    assert modules <= mapped and len(modules) == len(linears) - 4  # q, k, v fused (x2 streams)
    stem = "lora_unet_double_blocks_0_img_attn_qkv"
    product = comfy[f"{stem}.lora_up.weight"] @ comfy[f"{stem}.lora_down.weight"]
    parts = [
        0.5
        * state[f"transformer.transformer_blocks.0.attn.{p}.lora_B.weight"]
        @ state[f"transformer.transformer_blocks.0.attn.{p}.lora_A.weight"]
        for p in ("to_q", "to_k", "to_v")
    ]
    torch.testing.assert_close(product, torch.cat(parts) * float(comfy[f"{stem}.alpha"]) / 12)
    # The full-size dev model's names are covered too (meta device: no memory).
    with torch.device("meta"):
        full = type(transformer)(**flux2_transformer_config("dev"))
    names = bfl_names(full.config)
    assert "double_blocks.7.img_attn.qkv" in names and "single_blocks.47.linear2" in names
    for bad in (
        {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.ones(1, 1)},
        {"transformer.single_stream_modulation.linear.lora_A.weight": torch.ones(1, 1)},
        {"text_encoder.x.lora_A.weight": torch.ones(1, 1)},
    ):
        with pytest.raises(TunerError):
            comfy_lora({**bad, **{k.replace("lora_A", "lora_B"): v for k, v in bad.items()}}, {})


def test_the_pipelines_own_loader_reads_both_files(make_recipe):
    """Flux2Pipeline.load_lora_weights on the trained files: every targeted layer gets its
    weights (nothing missing, nothing unexpected), the image changes, scale 0 is the base,
    and the ComfyUI file loads to the same image as the diffusers file."""
    result = run_training(make_recipe(*FAST, "adapter.rank=4", "adapter.alpha=2", base=DEV))
    targets = families.get("flux2").default_targets(result.comps.denoiser)
    family, comps = load(DEV)
    base = render(family.build_pipeline(comps))
    images = {}
    for name in (lora.WEIGHT_NAME, lora.KOHYA_WEIGHT_NAME):
        family, comps = load(DEV)
        pipe = family.build_pipeline(comps)
        pipe.load_lora_weights(str(result.output_dir), weight_name=name, adapter_name="a")
        state = pipe.transformer.state_dict()
        ups = [k for k in state if ".lora_B.a." in k]
        # to_q, to_k, to_v, to_out.0 (1 double block), to_qkv_mlp_proj and to_out (1 single)
        assert len(ups) == len(targets) == 6, name
        if name == lora.WEIGHT_NAME:  # every module of the file is one layer: none unexpected
            saved, _ = formats.read_adapter(result.output_dir / name)
            assert sum(k.endswith("lora_A.weight") for k in saved) == len(ups)
        assert all(state[k].abs().max() > 0 for k in ups), name
        images[name] = render(pipe)
        pipe.set_adapters(["a"], adapter_weights=[0.0])
        torch.testing.assert_close(render(pipe), base)
    assert (images[lora.WEIGHT_NAME] - base).abs().max() > 1e-3
    torch.testing.assert_close(images[lora.KOHYA_WEIGHT_NAME], images[lora.WEIGHT_NAME])


@pytest.mark.slow
def test_odd_aspect_ratio_trains_in_its_bucket(tmp_path, make_recipe):
    """Bucket sides step by VAE scale x patch size (8 x 2): a 3:2 image trains at a non-square
    token grid; a step that is no such multiple is refused."""
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
        base=KLEIN,
    )
    family, comps = load(KLEIN)
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
    assert (16 * h, 16 * w) == (48, 80)  # tokens x 16 px: the 3:2 bucket of area 64^2
    with pytest.raises(TunerError, match="data.buckets.step"):
        family.configure(comps, make_recipe(*FAST, "data.buckets={step: 24}", base=KLEIN))


def test_detection_from_folder_and_single_file(tmp_path):
    family, comps = load(KLEIN)
    family.build_pipeline(comps).save_pretrained(tmp_path / "klein")
    spec = ModelSection(path=str(tmp_path / "klein"))
    assert families.for_model(spec).spec.name == "flux2"  # model_index.json: Flux2KleinPipeline
    loaded = family.load(spec, torch.float32)
    assert loaded.architecture == "flux-2-klein-base"  # is_distilled: false read back
    torch.testing.assert_close(
        render(family.build_pipeline(loaded)), render(family.build_pipeline(comps))
    )
    one = torch.zeros(1, 12288)
    klein = {"single_stream_modulation.lin.weight": one, "txt_in.weight": one.clone()}
    save_file(klein, tmp_path / "k.safetensors")
    assert family_from_file(tmp_path / "k.safetensors") == "flux2"
    assert file_variant(tmp_path / "k.safetensors") == (
        "Flux2KleinPipeline",
        "black-forest-labs/FLUX.2-klein-9B",
    )
    dev = {"model.diffusion_model.single_stream_modulation.lin.weight": one}
    dev["model.diffusion_model.guidance_in.in_layer.weight"] = one.clone()
    save_file(dev, tmp_path / "dev.safetensors")
    assert family_from_file(tmp_path / "dev.safetensors") == "flux2"
    assert file_variant(tmp_path / "dev.safetensors")[0] == "Flux2Pipeline"
    save_file({"double_blocks.0.img_mod.lin.weight": one}, tmp_path / "flux1.safetensors")
    assert family_from_file(tmp_path / "flux1.safetensors") == "flux"


def test_refusals_and_the_distilled_warning(make_recipe, caplog):
    family, comps = load(KLEIN)
    comps.architecture = "flux-2-klein-4b"  # the released, step-distilled klein
    with caplog.at_level(logging.WARNING, logger="tuner"):
        family.configure(comps, make_recipe(*FAST, base=KLEIN))
    assert any("distill" in r.getMessage() for r in caplog.records)
    with pytest.raises(TunerError, match="train.guidance"):
        family.configure(comps, make_recipe(*FAST, "train.guidance=3.5", base=KLEIN))
    for override, message in [
        ("model.path=black-forest-labs/FLUX.2-klein-9B", "train.guidance"),
        ("adapter.targets=[to_q, to_k]", "adapter.targets"),
        ("adapter.targets=[to_q, to_k, to_v, single_stream_modulation.linear]", "modulation"),
        ("train.max_sequence_length=1024", "train.max_sequence_length"),
        ("adapter.text_encoder=true", "adapter.text_encoder"),
        ("adapter.type=loha", "adapter.type"),
    ]:
        extra = ("model.family=flux2", "train.guidance=3.5") if "klein-9B" in override else ()
        with pytest.raises(TunerError, match=message):
            family.validate(make_recipe(*FAST, override, *extra, base=DEV))


@pytest.mark.slow
def test_arch_builders_have_the_released_sizes():
    """On the meta device: dev 32.2B + Mistral Small 3.1 24.0B; klein 3.9B + Qwen3-4B 4.0B and
    9.1B + Qwen3-8B 8.2B; the 32-channel VAE 84M."""

    def billions(module) -> float:
        return round(sum(p.numel() for p in module.parameters()) / 1e9, 1)

    expected = {"dev": (32.2, 24.0), "klein-4b": (3.9, 4.0), "klein-9b": (9.1, 8.2)}
    for variant, (transformer, encoder) in expected.items():
        with torch.device("meta"):
            arch = build_arch_flux2(variant)
        assert (billions(arch["transformer"]), billions(arch["text_encoder"])) == (
            transformer,
            encoder,
        )
        assert arch["transformer"].dtype == torch.bfloat16
        assert arch["transformer"].config.guidance_embeds == (variant == "dev")
    assert 0.08 <= billions(arch["vae"]) * 1.0 <= 0.1


def commented_targets(recipe: Path) -> list[dict]:
    import yaml

    return [
        yaml.safe_load(line.strip().removeprefix("# "))
        for line in recipe.read_text().splitlines()
        if re.match(r"^\s*# (targets|target_regex): ", line)
    ]


RECIPES = ["style-lora.yaml", "style-lora-dev.yaml", "dreambooth-lora.yaml"]


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipes_check_and_their_target_examples_name_real_modules(recipe, monkeypatch):
    monkeypatch.chdir(REPO)
    loaded = load_recipe(f"recipes/flux2/{recipe}", [])
    family = families.get("flux2")
    assert loaded.model.family == "flux2"
    family.validate(loaded)
    variant = "dev" if "dev" in loaded.model.path.lower() else "klein-9b"
    with torch.device("meta"):
        model = type(build_tiny_flux2_dev()["transformer"])(**flux2_transformer_config(variant))
    for example in commented_targets(REPO / "recipes" / "flux2" / recipe):
        lora.denoiser_targets(AdapterSection(rank=4, **example), family, model)


@pytest.mark.parametrize("recipe", ["quickstart-flux2.yaml", "quickstart-flux2-klein.yaml"])
def test_quickstart_recipes_train(recipe, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    loaded = load_recipe(
        f"recipes/{recipe}",
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


def test_pipeline_takes_the_prompt_first():
    """tuner renders with pipe(prompts, ...): its Flux2Pipeline puts the prompt first (diffusers'
    own takes a conditioning image first) and keeps the defaults `tuner sample` reads."""
    from tuner.inference.render import pipeline_default

    family, comps = load(DEV)
    pipe = family.build_pipeline(comps)
    assert isinstance(pipe, DiffusersFlux2Pipeline)
    assert pipeline_default(pipe, "guidance_scale") == 4.0
    torch.testing.assert_close(render(pipe), render(pipe, prompt=[PROMPT]))


def test_dev_class_images_that_cannot_fit_are_refused_before_loading(make_recipe, monkeypatch):
    """On a 24 GiB card FLUX.2-dev cannot render DreamBooth class images: validate (recipe
    only, before any download) says so; klein, or class images already rendered, pass."""
    from types import SimpleNamespace

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    card = SimpleNamespace(total_memory=24 * 2**30)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: card)
    family = families.get("flux2")
    dreambooth = (
        "model.family=flux2",
        "model.quantize=nf4",
        f"dreambooth.instance_dir={REPO / 'datasets' / 'toy-subject'}",
        "dreambooth.instance_prompt=a sks dog",
        "dreambooth.class_prompt=a dog",
        "dreambooth.with_prior_preservation=true",
    )
    dev = make_recipe(*FAST, *dreambooth, base="black-forest-labs/FLUX.2-dev")
    with pytest.raises(TunerError, match="class images with FLUX.2-dev needs ~63 GiB"):
        family.validate(dev)
    family.validate(make_recipe(*FAST, *dreambooth, base="black-forest-labs/FLUX.2-klein-9B"))
    card.total_memory = 80 * 2**30
    family.validate(dev)


def bfl_checkpoint(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers Flux.2 transformer state dict in BFL's single-file names (fused qkv, `.scale`
    norms, (shift, scale) order of the final modulation): what flux2-dev.safetensors holds."""
    renames = {
        "x_embedder.": "img_in.",
        "context_embedder.": "txt_in.",
        "time_guidance_embed.timestep_embedder.linear_1.": "time_in.in_layer.",
        "time_guidance_embed.timestep_embedder.linear_2.": "time_in.out_layer.",
        "time_guidance_embed.guidance_embedder.linear_1.": "guidance_in.in_layer.",
        "time_guidance_embed.guidance_embedder.linear_2.": "guidance_in.out_layer.",
        "_modulation_img.linear.": "_modulation_img.lin.",
        "_modulation_txt.linear.": "_modulation_txt.lin.",
        "single_stream_modulation.linear.": "single_stream_modulation.lin.",
        "proj_out.": "final_layer.linear.",
        "attn.to_out.0.": "img_attn.proj.",
        "attn.to_add_out.": "txt_attn.proj.",
        "ff.linear_in.": "img_mlp.0.",
        "ff.linear_out.": "img_mlp.2.",
        "ff_context.linear_in.": "txt_mlp.0.",
        "ff_context.linear_out.": "txt_mlp.2.",
        "attn.to_qkv_mlp_proj.": "linear1.",
        "single_transformer_blocks.": "single_blocks.",
        "transformer_blocks.": "double_blocks.",
    }
    norms = {
        "attn.norm_q.weight": "img_attn.norm.query_norm.scale",
        "attn.norm_k.weight": "img_attn.norm.key_norm.scale",
        "attn.norm_added_q.weight": "txt_attn.norm.query_norm.scale",
        "attn.norm_added_k.weight": "txt_attn.norm.key_norm.scale",
    }
    out = {}
    for key, value in state.items():
        if key.startswith("norm_out.linear."):
            shift_scale = torch.cat(value.chunk(2)[::-1])  # diffusers keeps (scale, shift)
            out[key.replace("norm_out.linear.", "final_layer.adaLN_modulation.1.")] = shift_scale
            continue
        if re.search(r"attn\.(to_[kv]|add_[kv]_proj)\.", key):
            continue
        if ".attn.to_q." in key or ".attn.add_q_proj." in key:
            parts = [state[key.replace("_q", f"_{p}")] for p in "qkv"]
            stream = "img_attn" if ".to_q." in key else "txt_attn"
            key = re.sub(r"attn\.(to_q|add_q_proj)\.", f"{stream}.qkv.", key)
            value = torch.cat(parts)
        if key.startswith("single_transformer_blocks."):
            key = key.replace("attn.norm_q.weight", "norm.query_norm.scale")
            key = key.replace("attn.norm_k.weight", "norm.key_norm.scale")
            key = key.replace("attn.to_out.", "linear2.")
        for old, new in norms.items():
            key = key.replace(old, new)
        for old, new in renames.items():
            key = key.replace(old, new)
        out[key] = value.clone()
    return out


def test_loads_a_bfl_single_file_transformer(tmp_path):
    """flux2-dev.safetensors-style files: detected, converted by diffusers' from_single_file,
    the rest of the pipeline from model.config: the same weights and images as the builtin."""
    family, comps = load(DEV)
    family.build_pipeline(comps).save_pretrained(tmp_path / "model")
    file = tmp_path / "flux2-dev.safetensors"
    save_file(bfl_checkpoint(comps.denoiser.state_dict()), file)
    spec = ModelSection(path=str(file), config=str(tmp_path / "model"))
    assert families.for_model(spec).spec.name == "flux2"
    loaded = family.load(spec, torch.float32)
    assert loaded.architecture == "flux-2-dev"
    expected = comps.denoiser.state_dict()
    for key, value in loaded.denoiser.state_dict().items():
        assert torch.equal(value, expected[key]), key
    loaded.sequence_length = 16
    # Equal weights and prompt embeddings; the single-file transformer's image differs in the
    # last bits on some CPUs (1.07e-5 in one of 3072 values seen), so compare at 1e-4.
    torch.testing.assert_close(
        render(family.build_pipeline(loaded)),
        render(family.build_pipeline(comps)),
        atol=1e-4,
        rtol=0,
    )
