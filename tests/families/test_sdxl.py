"""The SDXL family on builtin:tiny-sdxl: its own conditioning (time_ids from the real bucket and
crop, the pooled embedding from encoder 2) and its VAE handling. What every family must do (only
LoRA moves, round trip, scale 0 = base, kohya = diffusers, DreamBooth, resume) is the contract
battery in test_contract.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from tuner import families
from tuner.builtins import sd as sd_builtins
from tuner.builtins import sdxl as sdxl_builtins
from tuner.builtins.sdxl import OPENCLIP_BIGG_TEXT, build_tiny_sdxl
from tuner.errors import TunerError
from tuner.families.sdxl import SDXLFamily
from tuner.recipe import ModelSection, load_recipe, validate_recipe
from tuner.training.run import run_training

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "recipes" / "quickstart-sdxl.yaml"
PROMPT = "a white star on a black background, zebrastyle"


def fresh_pipeline() -> StableDiffusionXLPipeline:
    pipe = StableDiffusionXLPipeline(**build_tiny_sdxl(), add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def images(pipe) -> np.ndarray:
    return pipe(
        [PROMPT],
        num_inference_steps=2,
        guidance_scale=5.0,
        width=64,
        height=64,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images


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
