"""Masked loss: the weighting is the documented formula, black regions get unmasked_weight,
masks are cached with the latents and cropped/flipped with their images, bad masks are named
and skipped like bad images, and mask settings that cannot apply are refused."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tuner.data import masks
from tuner.data.cache import item_latent_key, latent_key
from tuner.data.items import collect_items, prepare_image
from tuner.objectives.common import weighted_mse
from tuner.objectives.masks import element_weights, masked_mse


def left_quarter_masks(style_dir, folder, width=64):
    """White over each image's left quarter: asymmetric, so a flip shows."""
    folder.mkdir()
    for png in sorted(style_dir.glob("*.png")):
        w, h = Image.open(png).size
        array = np.zeros((h, w), dtype=np.uint8)
        array[:, : w // 4] = 255
        Image.fromarray(array, "L").save(folder / png.name)
    return folder


def test_masked_loss_is_the_weighted_mean_formula():
    gen = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 3, 4, 4, generator=gen), torch.randn(2, 3, 4, 4, generator=gen)
    pixel_mask = torch.rand(2, 1, 8, 8, generator=gen)
    weight = torch.tensor([2.0, 0.5])  # e.g. min-SNR
    got = masked_mse(pred, target, weight, pixel_mask, unmasked_weight=0.25)
    for b in range(2):
        # By hand: 2x2 area average, w = u + (1 - u) m, sum(w * err) / sum(w) over C*h*w.
        grid = pixel_mask[b, 0].reshape(4, 2, 4, 2).mean(dim=(1, 3))
        w = 0.25 + 0.75 * grid
        err = (pred[b] - target[b]) ** 2
        expected = weight[b] * (w * err).sum() / (3 * w.sum())
        assert torch.allclose(got[b], expected, rtol=1e-6), (got[b], expected)
    # An all-white mask is the plain (weighted) MSE.
    ones = torch.ones(2, 1, 8, 8)
    assert torch.allclose(
        masked_mse(pred, target, weight, ones, 0.0), weighted_mse(pred, target, weight)
    )


def test_unmasked_region_gets_unmasked_weight():
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., :, :8] = 1.0  # left half white, aligned with the 8x8 latent grid's cells
    like = torch.zeros(1, 4, 8, 8)
    w = element_weights(mask, like, unmasked_weight=0.1)
    assert torch.equal(w[0, 0, :, :4], torch.ones(8, 4))
    assert torch.allclose(w[0, 0, :, 4:], torch.full((8, 4), 0.1))
    # The black half's error counts with weight 0.1 only: with 0 it does not count at all.
    pred = torch.zeros(1, 4, 8, 8)
    target = torch.zeros(1, 4, 8, 8)
    target[..., 4:] = 5.0  # wrong only where the mask is black
    assert masked_mse(pred, target, None, mask, 0.0).item() == 0.0
    assert masked_mse(pred, target, None, mask, 0.1).item() == pytest.approx(25 * 0.1 / 1.1)
    # Frames (qwen-image's 5-D latents) broadcast the same way.
    w5 = element_weights(mask, torch.zeros(1, 4, 1, 8, 8), 0.1)
    assert w5.shape == (1, 1, 1, 8, 8) and torch.equal(w5[:, :, 0], w)


def test_mask_is_cached_and_flipped_with_the_image(make_recipe, style_dir, tmp_path):
    from tuner import families
    from tuner.data.cache import build_cache
    from tuner.training.run import cache_plan

    mask_dir = left_quarter_masks(style_dir, tmp_path / "masks")
    recipe = make_recipe(f"data.datasets.0.mask_dir={mask_dir}", "data.flip=true")
    items, _ = collect_items(recipe.data)
    assert all(item.mask and item.mask_hash for item in items)
    family = families.for_model(recipe.model)
    comps = family.configure(family.load(recipe.model, torch.float32), recipe)
    plan = cache_plan(recipe, comps)
    build_cache(items, recipe.data, plan, family, comps, torch.device("cpu"))
    for item in items:
        plain = plan.latents.load(item_latent_key(item, plan, False))
        flipped = plan.latents.load(item_latent_key(item, plan, True))
        pixels, _, _, mask = prepare_image(item, "center", False, None)
        assert (
            mask.shape == (1, 64, 64) and mask[0, :, :16].min() == 1 and mask[0, :, 16:].max() == 0
        )
        grid = masks.mask_to_grid(mask, plain["latents"].shape[-2:])
        assert torch.equal(plain["mask"], grid)  # cached on the latent grid (area average)
        assert torch.equal(flipped["mask"], torch.flip(grid, [-1]))
        f_pixels, _, _, f_mask = prepare_image(item, "center", True, None)
        assert torch.equal(f_pixels, torch.flip(pixels, [-1]))
        assert torch.equal(f_mask, torch.flip(mask, [-1]))
    # The mask is part of the key: the same image without a mask is another entry.
    item = items[0]
    plain_key = latent_key(item.image_hash, item.size, plan.crop, False, plan.identity)
    assert plain_key != item_latent_key(item, plan, False)


def test_random_crop_crops_mask_and_image_alike(make_recipe, style_dir, tmp_path):
    import random

    mask_dir = tmp_path / "masks"
    mask_dir.mkdir()
    for png in sorted(style_dir.glob("*.png")):  # the mask is the image's own red channel
        Image.open(png).convert("RGB").getchannel("R").save(mask_dir / png.name)
    recipe = make_recipe(f"data.datasets.0.mask_dir={mask_dir}", "data.resolution=48")
    item = collect_items(recipe.data)[0][0]
    pixels, _, _, mask = prepare_image(item, "random", True, random.Random(5))
    red = (pixels[0] + 1) * 127.5 / 255.0
    assert (red - mask[0]).abs().max() < 2 / 255  # same offsets, same flip


def test_alpha_channel_is_the_mask(make_recipe, tmp_path):
    folder = tmp_path / "rgba"
    folder.mkdir()
    alpha = np.zeros((64, 64), dtype=np.uint8)
    alpha[8:40, 8:40] = 255
    rgba = np.dstack([np.full((64, 64, 3), 90, dtype=np.uint8), alpha])
    Image.fromarray(rgba, "RGBA").save(folder / "a.png")
    Image.new("RGB", (64, 64), "red").save(folder / "no_alpha.png")
    recipe = make_recipe(f"data.datasets.0.path={folder}", "data.alpha_mask=true")
    items, report = collect_items(recipe.data)
    assert [item.record.image.endswith("a.png") for item in items] == [True]
    assert report.skipped == [str(folder / "no_alpha.png")]
    mask = prepare_image(items[0], "center", False, None)[3]
    assert torch.equal(mask[0], torch.from_numpy(alpha / 255.0).float())


def test_bad_masks_are_named_and_their_images_skipped(make_recipe, style_dir, tmp_path, caplog):
    mask_dir = left_quarter_masks(style_dir, tmp_path / "masks")
    pngs = sorted(mask_dir.glob("*.png"))
    pngs[0].unlink()  # missing partner
    pngs[1].write_bytes(b"not a png")  # unreadable
    Image.new("L", (32, 32), 255).save(pngs[2])  # another size than its image
    recipe = make_recipe(f"data.datasets.0.mask_dir={mask_dir}")
    with caplog.at_level(logging.WARNING, logger="tuner"):
        items, report = collect_items(recipe.data)
    assert len(items) == 1 and len(report.skipped) == 3
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert f"no mask {mask_dir / pngs[0].stem}.png" in text
    assert f"unreadable mask {pngs[1]}" in text
    assert f"mask {pngs[2]} is 32x32, its image" in text


def test_masks_inside_the_dataset_folder_are_not_training_images(make_recipe, style_dir):
    mask_dir = left_quarter_masks(style_dir, style_dir / "masks")
    items, _ = collect_items(make_recipe(f"data.datasets.0.mask_dir={mask_dir}").data)
    assert len(items) == 4 and all(Path(item.record.image).parent == style_dir for item in items)


@pytest.mark.parametrize(
    "overrides, words",
    [
        (["data.unmasked_weight=0.2"], "data.unmasked_weight applies to masked loss only"),
        (["data.alpha_mask=true", "data.datasets.0.mask_dir=/x"], "use one of them"),
    ],
)
def test_mask_settings_that_cannot_apply_are_refused(make_recipe, overrides, words):
    with pytest.raises(Exception, match=words):
        make_recipe(*overrides)


@pytest.mark.slow
def test_white_masks_train_as_no_masks(make_recipe, style_dir, tmp_path):
    from safetensors.torch import load_file

    from tuner.adapters.lora import WEIGHT_NAME
    from tuner.training.run import run_training

    white = tmp_path / "white"
    white.mkdir()
    for png in style_dir.glob("*.png"):
        Image.new("L", Image.open(png).size, 255).save(white / png.name)
    # Uncached (a cached latent's VAE draw is seeded by its key, which holds the mask hash):
    # the pixel-size mask is area-averaged in the loss.
    plain = run_training(
        make_recipe(f"output.dir={tmp_path / 'plain'}", "data.cache=false")
    ).output_dir
    masked = run_training(
        make_recipe(
            f"output.dir={tmp_path / 'masked'}",
            "data.cache=false",
            f"data.datasets.0.mask_dir={white}",
        )
    ).output_dir
    a, b = load_file(str(plain / WEIGHT_NAME)), load_file(str(masked / WEIGHT_NAME))
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)


def test_a_missing_mask_dir_is_one_line(make_recipe, tmp_path):
    from tuner.errors import TunerError

    recipe = make_recipe(f"data.datasets.0.mask_dir={tmp_path / 'nowhere'}")
    with pytest.raises(TunerError, match="mask_dir .*nowhere is not a folder"):
        collect_items(recipe.data)
