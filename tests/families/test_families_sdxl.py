"""The SDXL family on builtin:tiny-sdxl: the shared SD battery (only LoRA moves, round trip,
scale 0 = base, kohya = diffusers, DreamBooth) plus SDXL's own conditioning (time_ids from the
real bucket and crop, the pooled embedding from encoder 2) and its VAE handling."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
from PIL import Image
from safetensors import safe_open
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from tuner import families
from tuner.adapters.lora import KOHYA_WEIGHT_NAME, WEIGHT_NAME
from tuner.builtins import sd as sd_builtins
from tuner.builtins import sdxl as sdxl_builtins
from tuner.builtins.sdxl import OPENCLIP_BIGG_TEXT, build_tiny_sdxl
from tuner.errors import TunerError
from tuner.families.sdxl import SDXLFamily
from tuner.inference.render import lora_scale, pipeline_modules
from tuner.recipe import ModelSection, load_recipe, validate_recipe
from tuner.training.run import run_training

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "recipes" / "quickstart-sdxl.yaml"
PROMPT = "a white star on a black background, zebrastyle"


def fresh_pipeline() -> StableDiffusionXLPipeline:
    pipe = StableDiffusionXLPipeline(**build_tiny_sdxl(), add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def images(pipe, scale: float = 1.0) -> np.ndarray:
    generator = torch.Generator().manual_seed(0)
    with lora_scale(pipeline_modules(pipe), scale):
        return pipe(
            [PROMPT],
            num_inference_steps=2,
            guidance_scale=5.0,
            width=64,
            height=64,
            generator=generator,
            output_type="np",
        ).images


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The quickstart recipe, shortened, with LoRA on both text encoders too, and an alpha that
    is not the rank (so the LoRA scale must survive both file formats)."""
    tmp = tmp_path_factory.mktemp("sdxl")
    recipe = load_recipe(
        QUICKSTART,
        [
            f"output.dir={tmp / 'out'}",
            f"data.cache_dir={tmp / 'cache'}",
            "sample.prompts=[]",
            "train.steps=3",
            "train.lr=1e-2",
            "adapter.text_encoder=true",
            "adapter.alpha=2",
            f"data.datasets.0.path={REPO / 'datasets' / 'toy-stripes'}",
        ],
    )
    result = run_training(recipe)
    pipe = result.family.build_pipeline(result.comps)
    pipe.set_progress_bar_config(disable=True)
    return result.output_dir, result.comps, pipe


@pytest.fixture(scope="module")
def loaded_images(trained):
    out = trained[0]
    by_format = {}
    for weight_name in (WEIGHT_NAME, KOHYA_WEIGHT_NAME):
        pipe = fresh_pipeline()
        pipe.load_lora_weights(str(out), weight_name=weight_name)
        by_format[weight_name] = images(pipe)
    return by_format


def base_weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Non-LoRA weights under their pre-injection names."""
    return {
        name.replace(".base_layer", ""): value
        for name, value in module.state_dict().items()
        if "lora_" not in name
    }


# --- the shared battery ----------------------------------------------------------------------


def test_only_lora_weights_change(trained):
    _, comps, _ = trained
    reference = build_tiny_sdxl()
    modules = {"unet": comps.denoiser, "vae": comps.vae, **comps.text_encoders}
    assert set(modules) == {"unet", "vae", "text_encoder", "text_encoder_2"}
    for name, module in modules.items():
        expected, actual = reference[name].state_dict(), base_weights(module)
        assert actual.keys() == expected.keys(), name
        changed = [k for k in expected if not torch.equal(actual[k], expected[k])]
        assert not changed, f"{name}: base weights moved: {changed[:3]}"
    for name in ("unet", "text_encoder", "text_encoder_2"):
        lora_up = [v for k, v in modules[name].state_dict().items() if "lora_B" in k]
        assert lora_up and any(v.abs().max() > 0 for v in lora_up), f"{name}: LoRA did not train"


def test_diffusers_file_round_trip(trained, loaded_images):
    _, _, pipe = trained
    in_memory = images(pipe)
    np.testing.assert_array_equal(loaded_images[WEIGHT_NAME], in_memory)
    assert np.abs(in_memory - images(fresh_pipeline())).max() > 1e-3  # the adapter matters


def test_scale_zero_is_the_base_model(trained):
    _, _, pipe = trained
    np.testing.assert_array_equal(images(pipe, scale=0.0), images(fresh_pipeline()))


def test_kohya_file_matches_diffusers_file(trained, loaded_images):
    out = trained[0]
    with safe_open(str(out / KOHYA_WEIGHT_NAME), framework="pt") as handle:
        keys, metadata = list(handle.keys()), handle.metadata()
    prefixes = ("lora_unet_", "lora_te1_", "lora_te2_")
    assert all(key.startswith(prefixes) for key in keys)
    assert all(any(key.startswith(p) for key in keys) for p in prefixes)
    with safe_open(str(out / WEIGHT_NAME), framework="pt") as handle:
        diffusers_metadata = handle.metadata()
    for meta in (metadata, diffusers_metadata):
        assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
        assert meta["tuner_family"] == "sdxl"
    np.testing.assert_array_equal(loaded_images[KOHYA_WEIGHT_NAME], loaded_images[WEIGHT_NAME])


def test_tiny_dreambooth_with_prior_preservation(tmp_path, monkeypatch):
    instance = tmp_path / "instance"
    instance.mkdir()
    for name in ("000.png", "001.png"):
        shutil.copy(REPO / "datasets" / "toy-subject" / name, instance / name)
    recipe = validate_recipe(
        {
            "model": {"path": "builtin:tiny-sdxl"},
            "adapter": {"rank": 4},
            "data": {"resolution": 64, "cache_dir": str(tmp_path / "cache")},
            "dreambooth": {
                "instance_dir": str(instance),
                "instance_prompt": "a sks circle",
                "class_prompt": "a circle",
                "class_dir": str(tmp_path / "class"),
                "num_class_images": 2,
                "with_prior_preservation": True,
                "class_generation_steps": 2,
            },
            "train": {"steps": 2, "lr": 1e-2},
            "output": {"dir": str(tmp_path / "out")},
        }
    )
    batch_sizes = []
    original = UNet2DConditionModel.forward

    def forward(self, sample, *args, **kwargs):
        if torch.is_grad_enabled():  # training steps, not class-image rendering
            batch_sizes.append(sample.shape[0])
        return original(self, sample, *args, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "forward", forward)
    out = run_training(recipe).output_dir
    class_images = sorted((tmp_path / "class").glob("class-*.png"))
    assert [p.name for p in class_images] == ["class-00000.png", "class-00001.png"]
    assert all(p.with_suffix(".txt").read_text() == "a circle" for p in class_images)
    assert batch_sizes == [2, 2]  # each step: the instance image and its prior partner
    monkeypatch.undo()
    pipe = fresh_pipeline()
    base = images(pipe)
    pipe.load_lora_weights(str(out))
    assert np.abs(images(pipe) - base).max() > 1e-3


# --- SDXL conditioning ----------------------------------------------------------------------


@pytest.mark.parametrize("cache", [True, False])
def test_time_ids_follow_the_bucket_and_crop(tmp_path, monkeypatch, cache):
    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (96, 64), (200, 30, 30)).save(data / "wide.png")  # width 96, height 64
    (data / "wide.txt").write_text("a red rectangle")
    recipe = validate_recipe(
        {
            "model": {"path": "builtin:tiny-sdxl"},
            "data": {
                "datasets": [{"path": str(data)}],
                "resolution": 64,
                "cache": cache,
                "buckets": {"step": 8, "min_side": 32},
                "cache_dir": str(tmp_path / "cache"),
            },
            "train": {"steps": 1},
            "output": {"dir": str(tmp_path / "out"), "formats": ["diffusers"]},
        }
    )
    seen = []

    def spy(module, args, kwargs):
        seen.append(kwargs["added_cond_kwargs"]["time_ids"].clone())

    original = SDXLFamily.load

    def load(self, model, dtype):
        comps = original(self, model, dtype)
        comps.denoiser.register_forward_pre_hook(spy, with_kwargs=True)
        return comps

    monkeypatch.setattr(SDXLFamily, "load", load)
    run_training(recipe)
    # By hand, from the rules in tuner/data/buckets.py: the 64x64-area buckets in steps of 8
    # within 2:1 are 48x80, 56x72, 64x64, 72x56, 80x48; the closest to 3:2 (in log ratio) is
    # 80x48. Cover-resize by max(80/96, 48/64) = 5/6 gives 80 x ceil(53.3) = 80x54; the center
    # crop drops 6 rows: top 3, left 0.
    original_hw, crop_top_left, target_hw = (64, 96), (3, 0), (48, 80)
    expected = torch.tensor([[*original_hw, *crop_top_left, *target_hw]], dtype=torch.float32)
    assert len(seen) == 1
    torch.testing.assert_close(seen[0], expected, rtol=0, atol=0)


def test_pooled_embedding_comes_from_encoder_2():
    family = families.get("sdxl")
    comps = family.load(ModelSection(path="builtin:tiny-sdxl"), torch.float32)
    prompts = ["a red circle", "a blue square"]
    before = family.encode_prompts(comps, prompts)
    pipe = family.build_pipeline(comps)
    embeds, _, pooled, _ = pipe.encode_prompt(
        prompts, device="cpu", do_classifier_free_guidance=False
    )
    torch.testing.assert_close(before["prompt_embeds"], embeds, rtol=0, atol=0)
    torch.testing.assert_close(before["pooled_prompt_embeds"], pooled, rtol=0, atol=0)

    width_1 = comps.text_encoders["text_encoder"].config.hidden_size
    perturb(comps.text_encoders["text_encoder"])
    after_1 = family.encode_prompts(comps, prompts)
    assert torch.equal(after_1["pooled_prompt_embeds"], before["pooled_prompt_embeds"])
    assert not torch.equal(
        after_1["prompt_embeds"][..., :width_1], before["prompt_embeds"][..., :width_1]
    )
    assert torch.equal(
        after_1["prompt_embeds"][..., width_1:], before["prompt_embeds"][..., width_1:]
    )
    perturb(comps.text_encoders["text_encoder_2"])
    after_2 = family.encode_prompts(comps, prompts)
    assert not torch.equal(after_2["pooled_prompt_embeds"], before["pooled_prompt_embeds"])


@torch.no_grad()
def perturb(module: torch.nn.Module) -> None:
    generator = torch.Generator().manual_seed(7)
    for param in module.parameters():
        param.add_(0.1 * torch.randn(param.shape, generator=generator))


# --- loading, VAE, prediction type --------------------------------------------------------


@pytest.mark.parametrize("prediction_type", [None, "v_prediction"])
def test_prediction_type_reaches_the_training_objective(prediction_type):
    family = families.get("sdxl")
    comps = family.load(
        ModelSection(path="builtin:tiny-sdxl", prediction_type=prediction_type), torch.float32
    )
    train = load_recipe(QUICKSTART, ["output.dir=unused"]).train
    objective = family.objective(comps, train)
    expected = prediction_type or "epsilon"
    assert objective.prediction_type == expected
    assert comps.scheduler.config.prediction_type == expected  # the sampler agrees


def test_vae_fp32_by_default_and_bf16_pipeline_still_renders():
    family = families.get("sdxl")
    comps = family.load(ModelSection(path="builtin:tiny-sdxl"), torch.bfloat16)
    assert comps.vae.dtype == torch.float32
    assert comps.denoiser.dtype == torch.bfloat16
    assert {e.dtype for e in comps.text_encoders.values()} == {torch.bfloat16}
    pipe = family.build_pipeline(comps)
    pipe.set_progress_bar_config(disable=True)
    assert np.isfinite(images(pipe)).all()  # bf16 latents decode through the fp32 VAE


def test_folder_load_keeps_exact_fp32_vae(tmp_path):
    fresh_pipeline().save_pretrained(tmp_path / "pipe")
    family = families.for_model(ModelSection(path=str(tmp_path / "pipe")))
    assert isinstance(family, SDXLFamily)
    comps = family.load(ModelSection(path=str(tmp_path / "pipe")), torch.bfloat16)
    assert comps.denoiser.dtype == torch.bfloat16
    reference = build_tiny_sdxl()["vae"].state_dict()
    for name, value in comps.vae.state_dict().items():
        assert torch.equal(value, reference[name]), name  # not rounded through bf16


def test_vae_path_replaces_the_vae_in_the_compute_dtype(tmp_path):
    torch.manual_seed(123)
    other = AutoencoderKL(**{**dict(build_tiny_sdxl()["vae"].config), "force_upcast": False})
    other.save_pretrained(tmp_path / "vae")
    family = families.get("sdxl")
    plain = family.load(ModelSection(path="builtin:tiny-sdxl"), torch.bfloat16)
    comps = family.load(
        ModelSection(path="builtin:tiny-sdxl", vae_path=str(tmp_path / "vae")), torch.bfloat16
    )
    assert comps.vae.dtype == torch.bfloat16
    for name, value in comps.vae.state_dict().items():
        assert torch.equal(value, other.state_dict()[name].to(torch.bfloat16)), name
    assert comps.identity != plain.identity  # latents made by another VAE are cached apart
    with pytest.raises(TunerError, match="model.vae_path"):
        family.load(
            ModelSection(path="builtin:tiny-sdxl", vae_path=str(tmp_path / "missing")),
            torch.float32,
        )


# --- real architectures (counted on the meta device, never built) -------------------------


def parameters_on_meta(build) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in build().parameters())


@pytest.mark.parametrize(
    ("build", "published"),
    [
        (lambda: UNet2DConditionModel(**sd_builtins.SD15_UNET), 859.52e6),
        (lambda: UNet2DConditionModel(**sdxl_builtins.SDXL_UNET), 2567.46e6),
        (lambda: AutoencoderKL(**sdxl_builtins.SDXL_VAE), 83.65e6),
        (lambda: CLIPTextModel(CLIPTextConfig(**sd_builtins.CLIP_L_TEXT)), 123.06e6),
        (
            lambda: CLIPTextModelWithProjection(CLIPTextConfig(**OPENCLIP_BIGG_TEXT)),
            694.66e6,
        ),
    ],
    ids=["sd15-unet", "sdxl-unet", "sdxl-vae", "clip-l", "openclip-bigg"],
)
def test_arch_configs_match_published_sizes(build, published):
    assert parameters_on_meta(build) == pytest.approx(published, rel=1e-4)


def test_arch_sdxl_modules_fit_together_at_1024():
    """The full-size builder, run on the meta device: shapes flow from both text encoders
    through the UNet's added conditioning at 1024x1024 (128x128 latents), with no memory."""
    family = SDXLFamily()
    with torch.device("meta"):
        modules = sdxl_builtins.build_arch_sdxl()
    pipe = StableDiffusionXLPipeline(**modules, **family.pipeline_extras)
    comps = family.components_from_pipeline(pipe, identity="arch-sdxl")
    vae_scale = 2 ** (len(comps.vae.config.block_out_channels) - 1)
    assert comps.denoiser.config.sample_size * vae_scale == 1024  # native 1024x1024
    cond = family.encode_prompts(comps, ["a photo of a dog"])
    assert cond["prompt_embeds"].shape == (1, 77, 2048)
    assert cond["pooled_prompt_embeds"].shape == (1, 1280)
    sizes = torch.tensor([[1024, 1024]])
    batch = {"original_size": sizes, "crop_top_left": torch.tensor([[0, 0]]), "target_size": sizes}
    noisy = torch.zeros(1, 4, 128, 128, device="meta")
    out = family.predict(comps, noisy, torch.tensor([500], device="meta"), cond, batch)
    assert out.shape == noisy.shape


# --- recipes ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["style-lora.yaml", "dreambooth-lora.yaml"])
def test_24gb_recipes_use_the_memory_settings(name):
    path = REPO / "recipes" / "sdxl" / name
    recipe = load_recipe(path)
    assert recipe.train.mixed_precision == "bf16"
    assert recipe.train.gradient_checkpointing
    assert recipe.train.optimizer == "adamw8bit"
    assert recipe.data.cache and not recipe.adapter.text_encoder  # latents and embeddings cached
    assert recipe.data.resolution == 1024 and recipe.data.bucket_options is not None
    assert "peak GPU memory" in path.read_text()
