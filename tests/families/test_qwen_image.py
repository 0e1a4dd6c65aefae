"""What is specific to qwen-image, on builtin:tiny-qwen-image: predict is the pipeline's own
transformer call (packing, sigma timestep, mask, img_shapes), the prompt template drops exactly
the system prefix, the scheduler's dynamic shift, the diffusers and ComfyUI files, odd aspect
ratios, loading from a folder and a single file, the full-size parameter count and the recipes.
The contract battery (tests/families/test_contract.py) adds the checks every family passes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml
from diffusers import QwenImagePipeline, QwenImageTransformer2DModel
from PIL import Image
from safetensors.torch import save_file

from tuner import families
from tuner.adapters import formats, lora
from tuner.builtins.qwen_image import qwen_image_transformer_config
from tuner.errors import TunerError
from tuner.families.qwen_image import QwenImageFamily, vae_scale
from tuner.inference.pipelines import count_lora_layers, load_adapters, lora_specs
from tuner.inference.render import lora_scale, pipeline_modules
from tuner.recipe import AdapterSection, ModelSection, load_recipe
from tuner.training.run import run_training

REPO = Path(__file__).resolve().parents[2]
BASE = "builtin:tiny-qwen-image"
FAST = ("data.resolution=32", "train.max_sequence_length=16", "train.steps=3", "train.lr=1e-2")
PROMPT = "a red circle on a blue background"
OTHER = "a star"
# `<|im_end|>`, `\n`, `<|im_start|>`, `assistant`, `\n`: the template's tail after the prompt.
TEMPLATE_TAIL = 5


def load(**model):
    spec = ModelSection(path=BASE, **model)
    family = families.for_model(spec)
    return family, family.load(spec, torch.float32)


def render(pipe, prompt=PROMPT, **kwargs) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    count = len(prompt) if isinstance(prompt, list) else 1
    return pipe(
        prompt,
        num_inference_steps=2,
        width=32,
        height=32,
        max_sequence_length=16,
        generator=[torch.Generator().manual_seed(i) for i in range(count)],
        output_type="pt",
        **kwargs,
    ).images


def capture_denoiser_call(pipe, prompt) -> dict:
    seen = {}

    def hook(module, args, call_kwargs, output):
        seen.setdefault("kwargs", call_kwargs)
        seen.setdefault("output", output[0])

    handle = pipe.transformer.register_forward_hook(hook, with_kwargs=True)
    try:
        render(pipe, prompt)
    finally:
        handle.remove()
    return seen


@pytest.mark.parametrize("prompts", [[PROMPT], [PROMPT, OTHER]], ids=["one", "two-lengths"])
def test_predict_is_the_pipelines_transformer_call(prompts):
    """Packing, the sigma timestep, img_shapes, and the batch's embeddings and mask (None when
    every prompt is the longest) exactly as QwenImagePipeline passes them."""
    family, comps = load()
    comps.sequence_length = 16
    seen = capture_denoiser_call(family.build_pipeline(comps), prompts)
    call = seen["kwargs"]
    side = 32 // vae_scale(comps.vae)
    noisy = QwenImagePipeline._unpack_latents(call["hidden_states"], side, side, 1)[:, :, 0]
    cond = family.encode_prompts(comps, prompts)
    assert cond["prompt_embeds"].shape[1] == 16  # padded to the sequence length for the cache
    captured = {}

    def spy(module, args, call_kwargs):
        captured.update(call_kwargs)

    handle = comps.denoiser.register_forward_pre_hook(spy, with_kwargs=True)
    with torch.no_grad():
        pred = family.predict(comps, noisy, call["timestep"] * 1000, cond, {"cond": cond})
    handle.remove()
    torch.testing.assert_close(captured["encoder_hidden_states"], call["encoder_hidden_states"])
    if len(prompts) == 1:
        assert call["encoder_hidden_states_mask"] is None
        assert captured["encoder_hidden_states_mask"] is None
    else:
        assert torch.equal(
            captured["encoder_hidden_states_mask"], call["encoder_hidden_states_mask"]
        )
    assert captured["img_shapes"] == call["img_shapes"]
    torch.testing.assert_close(captured["timestep"], call["timestep"])
    expected = QwenImagePipeline._unpack_latents(seen["output"], side, side, 1)[:, :, 0]
    torch.testing.assert_close(pred, expected)


def test_prompt_template_drops_exactly_the_system_prefix():
    family, comps = load()
    comps.sequence_length = 40
    pipe = family.build_pipeline(comps)
    tokenizer = comps.tokenizers["tokenizer"]
    prefix = pipe.prompt_template_encode.split("{}")[0]
    assert len(tokenizer(prefix).input_ids) == pipe.prompt_template_encode_start_idx == 34
    cond = family.encode_prompts(comps, [PROMPT, OTHER])
    kept = cond["prompt_embeds_mask"].sum(dim=1).tolist()
    assert kept == [len(tokenizer(p).input_ids) + TEMPLATE_TAIL for p in (PROMPT, OTHER)]
    embeds = cond["prompt_embeds"]
    assert embeds.shape == (
        2,
        40,
        comps.text_encoders["text_encoder"].config.text_config.hidden_size,
    )
    assert torch.count_nonzero(embeds[1, kept[1] :]) == 0  # zero padding, as the pipeline pads
    alone = family.encode_prompts(comps, [OTHER])  # batch-independent: the cache stores rows
    torch.testing.assert_close(alone["prompt_embeds"][0], embeds[1])


def test_flow_objective_uses_the_pipelines_dynamic_shift(make_recipe):
    """mu from the image sequence length with Qwen-Image's scheduler config, through the
    scheduler's exponential time shift: the sigmas sampling walks for that size."""
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

    family, comps = load()
    objective = family.objective(comps, make_recipe(*FAST, base=BASE).train)
    config = comps.scheduler.config
    assert objective.resolution_shift and config.max_image_seq_len == 8192
    shape = (1, 16, 128, 96)  # a 1024x768 image's latents: 64 x 48 packed tokens
    mu = calculate_shift(
        64 * 48,
        config.base_image_seq_len,
        config.max_image_seq_len,
        config.base_shift,
        config.max_shift,
    )
    assert objective.mu(shape) == pytest.approx(mu)
    u = torch.tensor([0.1, 0.5, 0.9])
    expected = comps.scheduler.time_shift(mu, 1.0, u)
    torch.testing.assert_close(objective.shift_sigmas(u, shape), expected)


def test_encode_images_is_what_the_pipeline_decodes():
    """Normalised latents, de-normalised as QwenImagePipeline does before vae.decode, are the
    VAE's own latents."""
    family, comps = load()
    pixels = torch.rand(1, 3, 32, 48) * 2 - 1
    latents = family.encode_images(comps, pixels, torch.Generator().manual_seed(0))
    assert latents.shape == (1, 16, 4, 6)
    vae = comps.vae
    raw = vae.encode(pixels.unsqueeze(2)).latent_dist.sample(torch.Generator().manual_seed(0))
    mean = torch.tensor(vae.config.latents_mean).view(1, 16, 1, 1, 1)
    std_inv = 1.0 / torch.tensor(vae.config.latents_std).view(1, 16, 1, 1, 1)
    torch.testing.assert_close(latents.unsqueeze(2) / std_inv + mean, raw)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One short run with alpha != rank (the ComfyUI file must carry alpha)."""
    from tuner.recipe import apply_overrides, validate_recipe

    tmp = tmp_path_factory.mktemp("qwen")
    raw = {
        "model": {"path": BASE},
        "adapter": {"rank": 4, "alpha": 2},
        "data": {
            "datasets": [{"path": str(REPO / "datasets" / "toy-stripes")}],
            "resolution": 32,
            "cache_dir": str(tmp / "cache"),
        },
        "train": {"steps": 3, "batch_size": 2, "lr": 1e-2, "seed": 0, "max_sequence_length": 16},
        "sample": {"prompts": []},
        "output": {"dir": str(tmp / "out"), "overwrite": True},
        "log": {"every": 1},
    }
    return run_training(validate_recipe(apply_overrides(raw, ())))


def test_diffusers_file_loads_every_module_and_changes_the_image(trained):
    state, metadata = formats.read_adapter(trained.output_dir / lora.WEIGHT_NAME)
    modules = {k.rsplit(".lora_", 1)[0].removeprefix("transformer.") for k in state}
    assert all(k.startswith("transformer.") for k in state)
    family, comps = load()
    pipe = family.build_pipeline(comps)
    base = render(pipe)
    pipe.load_lora_weights(str(trained.output_dir / lora.WEIGHT_NAME), adapter_name="a")
    landed = {
        name.rsplit(".lora_A", 1)[0]
        for name, _ in pipe.transformer.named_modules()
        if name.endswith(".lora_A")
    }
    assert landed == modules and count_lora_layers(pipe, "a") == len(modules)
    every = {n for n, _ in comps.denoiser.named_modules() if n.endswith(("to_q", "to_k", "to_v"))}
    assert every <= modules  # the default targets: every block's image-stream attention
    assert (render(pipe) - base).abs().max() > 1e-3
    with lora_scale(pipeline_modules(pipe), 0.0):
        torch.testing.assert_close(render(pipe), base)
    assert metadata["ss_base_model_version"] == "qwen_image"
    assert metadata["modelspec.architecture"] == "qwen-image/lora"


def comfy_qwen_image_keys(transformer) -> set[str]:
    """The LoRA names ComfyUI maps for a QwenImage model (comfy/lora.py model_lora_keys_unet):
    for every `diffusion_model.<name>.weight` of its state dict, `lora_unet_<name, . -> _>` and
    `diffusion_model.<name>` (all models), and `<name>`, `transformer.<name>`, `lycoris_...`
    (its QwenImage branch). ComfyUI's Qwen-Image module names are the diffusers ones
    (comfy/ldm/qwen_image/model.py), so the diffusers transformer's state dict stands in."""
    names = set()
    for key in transformer.state_dict():
        if key.endswith(".weight"):
            name = key.removesuffix(".weight")
            flat = name.replace(".", "_")
            names |= {f"lora_unet_{flat}", f"diffusion_model.{name}", name, f"transformer.{name}"}
            names.add(f"lycoris_{flat}")
    return names


def test_comfy_file_uses_names_comfyui_maps_and_loads_like_the_diffusers_file(trained):
    kohya_file = trained.output_dir / lora.KOHYA_WEIGHT_NAME
    kohya, metadata = formats.read_adapter(kohya_file)
    assert QwenImageFamily.spec.export.comfy_file == "kohya"
    accepted = comfy_qwen_image_keys(load()[1].denoiser)
    modules = {key.split(".", 1)[0] for key in kohya}
    assert modules and modules <= accepted
    suffixes = {key.split(".", 1)[1] for key in kohya}
    assert suffixes == {"lora_down.weight", "lora_up.weight", "alpha"}  # ComfyUI's regular LoRA
    assert {float(v) for k, v in kohya.items() if k.endswith(".alpha")} == {2.0}
    assert metadata["ss_base_model_version"] == "qwen_image"

    images = []
    # The diffusers file, the ComfyUI file through tuner's loader, and the ComfyUI file through
    # diffusers' own Qwen converter (`lora_unet_` names, alpha folded into the weights).
    for how in ("diffusers", "tuner", "diffusers-converter"):
        family, comps = load()
        pipe = family.build_pipeline(comps)
        if how == "diffusers":
            pipe.load_lora_weights(str(trained.output_dir / lora.WEIGHT_NAME))
        elif how == "tuner":
            load_adapters(pipe, family, lora_specs([str(kohya_file)]))
            pipe.set_adapters(["adapter0"], [1.0])
        else:
            pipe.load_lora_weights(str(kohya_file))
            assert count_lora_layers(pipe, "default_0") == len(modules)
        images.append(render(pipe))
    torch.testing.assert_close(images[0], images[1])
    torch.testing.assert_close(images[0], images[2])


def test_an_odd_aspect_ratio_trains(make_recipe, tmp_path, monkeypatch):
    """Buckets step by 16 px (VAE x8, 2x2 patches): a 2:1 image trains at 64x32."""
    folder = tmp_path / "wide"
    folder.mkdir()
    source = sorted((REPO / "datasets" / "toy-stripes").glob("*.png"))[0]
    Image.open(source).convert("RGB").resize((96, 48)).save(folder / "wide.png")
    (folder / "wide.txt").write_text("a wide stripe")
    shapes = []
    predict = QwenImageFamily.predict

    def recording(self, comps, noisy, *args):
        shapes.append(tuple(noisy.shape[-2:]))
        return predict(self, comps, noisy, *args)

    monkeypatch.setattr(QwenImageFamily, "predict", recording)
    recipe = make_recipe(
        *FAST,
        f"data.datasets.0.path={folder}",
        "data.resolution=48",
        "data.buckets.step=16",
        "data.buckets.min_side=16",
        "train.batch_size=1",
        "train.steps=2",
        base=BASE,
    )
    run_training(recipe)
    assert shapes and set(shapes) == {(32 // 8, 64 // 8)}  # (h, w) latents of 64x32


@pytest.mark.parametrize(
    "override, message",
    [
        ("adapter.text_encoder=true", "adapter.text_encoder"),
        ("train.guidance=3.5", "train.guidance"),
        ("train.max_sequence_length=2000", "train.max_sequence_length"),
        ("train.min_snr_gamma=5", "train.min_snr_gamma"),
        ("data.resolution=40", "data.resolution"),
        ("data.buckets.step=24", "data.buckets.step"),
        ("model.drop_t5=true", "model.drop_t5"),
    ],
)
def test_refuses_what_qwen_image_cannot_do(override, message, make_recipe):
    recipe = make_recipe(*FAST, override, base=BASE)
    family, comps = load()
    with pytest.raises(TunerError, match=message):
        family.validate(recipe)
        family.configure(comps, recipe)


def test_sequence_length_is_part_of_the_cache_identity(make_recipe):
    family, comps = load()
    short = family.configure(comps, make_recipe(*FAST, base=BASE))
    _, other = load()
    longer = family.configure(other, make_recipe(*FAST, "~train.max_sequence_length", base=BASE))
    assert short.sequence_length == 16 and longer.sequence_length == 512
    assert short.identity != longer.identity


def test_loads_from_a_folder_and_from_a_single_transformer_file(tmp_path):
    family, comps = load()
    family.build_pipeline(comps).save_pretrained(tmp_path / "model")
    expected = render(family.build_pipeline(comps))
    folder = ModelSection(path=str(tmp_path / "model"))
    assert families.for_model(folder).spec.name == "qwen-image"  # model_index.json
    torch.testing.assert_close(
        render(family.build_pipeline(family.load(folder, torch.float32))), expected
    )

    # A ComfyUI-style transformer file: `model.diffusion_model.` names, nothing else in it.
    file = tmp_path / "qwen_image_tiny.safetensors"
    state = {f"model.diffusion_model.{k}": v for k, v in comps.denoiser.state_dict().items()}
    save_file(state, str(file))
    assert families.for_model(ModelSection(path=str(file))).spec.name == "qwen-image"
    with pytest.raises(TunerError, match="model.config"):
        family.load(ModelSection(path=str(file)), torch.float32)
    single = ModelSection(path=str(file), config=str(tmp_path / "model"))
    torch.testing.assert_close(
        render(family.build_pipeline(family.load(single, torch.float32))), expected
    )


def test_other_families_checkpoints_are_not_taken_for_qwen_image():
    spec = QwenImageFamily.spec.recognize
    assert spec.matches_keys({"transformer_blocks.0.img_mod.1.weight", "txt_in.weight"})
    assert not spec.matches_keys({"double_blocks.0.img_mod.lin.weight"})  # Flux / Chroma
    assert not spec.matches_keys({"double_blocks.0.img_mod.linear.weight"})  # HunyuanVideo
    assert not spec.matches_keys(
        {"transformer_blocks.0.img_mod.1.weight", "txt_in.text_norm.weight"}  # Qwen-Image 2.1
    )


def test_arch_builder_has_the_published_sizes():
    """builtin:arch-qwen-image on the meta device: the 20.4B transformer, Qwen2.5-VL-7B (8.29B
    with its vision tower) and the 127M VAE."""
    from tuner.builtins.qwen_image import build_arch_qwen_image

    with torch.device("meta"):
        parts = build_arch_qwen_image()

    def billions(module) -> float:
        return round(sum(p.numel() for p in module.parameters()) / 1e9, 2)

    assert billions(parts["transformer"]) == 20.43
    assert billions(parts["text_encoder"]) == 8.29
    assert billions(parts["vae"]) == 0.13
    assert parts["transformer"].dtype == torch.bfloat16


RECIPES = ["qwen-image/style-lora.yaml", "qwen-image/dreambooth-lora.yaml"]


@pytest.mark.parametrize("recipe", RECIPES)
def test_shipped_recipes_pass_the_family_checks_and_name_real_modules(recipe, monkeypatch):
    monkeypatch.chdir(REPO)
    loaded = load_recipe(f"recipes/{recipe}", [])
    family = families.for_model(loaded.model)
    assert family.spec.name == "qwen-image"
    family.validate(loaded)
    with torch.device("meta"):
        model = QwenImageTransformer2DModel(**qwen_image_transformer_config())
    examples = commented_target_examples(REPO / "recipes" / recipe)
    for example in examples + [{}]:
        lora.denoiser_targets(AdapterSection(rank=4, **example), family, model)  # raises on a miss
    assert "GiB" in (REPO / "recipes" / recipe).read_text()  # the memory estimate is stated


def commented_target_examples(recipe: Path) -> list[dict]:
    examples, lines = [], recipe.read_text().splitlines()
    for i, line in enumerate(lines):
        found = re.match(r"^(\s*)# (targets|target_regex): ", line)
        if not found:
            continue
        text = line.replace("# ", "", 1)
        for more in lines[i + 1 :]:
            if not re.match(rf"^{found[1]}#\s{{3,}}\S", more):
                break
            text += " " + more.split("#", 1)[1].strip()
        examples.append(yaml.safe_load(text))
    return examples


def test_quickstart_trains_and_writes_both_files(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    loaded = load_recipe(
        "recipes/quickstart-qwen-image.yaml",
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
