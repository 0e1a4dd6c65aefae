import math
import random

import pytest
from PIL import Image

from tuner.data.buckets import (
    bucket_histogram,
    make_buckets,
    pick_bucket,
    resize_and_crop,
    square_size,
)

AREAS = [512 * 512, 768 * 768, 1024 * 1024, 1000 * 1000]


@pytest.mark.parametrize("area", AREAS)
def test_bucket_properties(area):
    buckets = make_buckets(area)
    assert buckets == sorted(set(buckets))
    for w, h in buckets:
        assert w % 64 == 0 and h % 64 == 0
        assert w * h <= area
        assert 256 <= w <= 2048 and 256 <= h <= 2048
        assert max(w / h, h / w) <= 2.0
    side = math.isqrt(area) // 64 * 64
    assert (side, side) in buckets
    # Both orientations exist, and buckets use most of the area budget.
    assert any(w > h for w, h in buckets) and any(h > w for w, h in buckets)
    assert all(w * h >= 0.8 * area for w, h in buckets)
    assert {(h, w) for w, h in buckets} == set(buckets)  # portrait mirrors landscape


def test_known_sdxl_buckets_present():
    buckets = make_buckets(1024 * 1024)
    for b in [(1024, 1024), (1152, 896), (896, 1152), (1344, 768), (768, 1344)]:
        assert b in buckets


def test_step_and_ratio_options():
    buckets = make_buckets(512 * 512, step=32, max_ratio=1.5)
    assert all(w % 32 == 0 and h % 32 == 0 for w, h in buckets)
    assert all(max(w / h, h / w) <= 1.5 for w, h in buckets)
    assert any(w % 64 for w, h in buckets)


@pytest.mark.parametrize("ratio", [(1, 1), (2, 3), (3, 2), (16, 9), (9, 16), (4, 5)])
@pytest.mark.parametrize("area", [512 * 512, 1024 * 1024])
def test_pick_bucket_aspect_close(ratio, area):
    buckets = make_buckets(area)
    w, h = ratio[0] * 120, ratio[1] * 120
    bw, bh = pick_bucket(w, h, buckets)
    assert (bw, bh) in buckets
    assert abs(math.log((bw / bh) / (w / h))) < 0.12
    if ratio == (1, 1):
        assert bw == bh


def test_pick_bucket_extreme_ratio_gets_most_extreme_bucket():
    buckets = make_buckets(512 * 512)
    bw, bh = pick_bucket(4000, 500, buckets)
    assert bw / bh == max(w / h for w, h in buckets)


def test_pick_bucket_no_upscale_uses_own_size():
    buckets = make_buckets(1024 * 1024)
    assert pick_bucket(300, 200, buckets, no_upscale=True) == (256, 192)
    assert pick_bucket(40, 30, buckets, no_upscale=True) == (64, 64)
    # Large images still use the regular buckets.
    big = pick_bucket(3000, 2000, buckets, no_upscale=True)
    assert big in buckets
    assert pick_bucket(300, 200, buckets) in buckets


def test_pick_bucket_no_upscale_extreme_ratio_never_enlarges_nor_exceeds_area():
    buckets = make_buckets(512 * 512)
    # Larger in area than its bucket (704x320-ish) but shorter than it: would upscale.
    bw, bh = pick_bucket(2400, 200, buckets, no_upscale=True)
    assert bw <= 2400 and bh <= 200
    assert bw * bh <= 512 * 512 and bw % 64 == 0 and bh % 64 == 0
    assert abs(math.log((bw / bh) / 12)) < 0.5


def test_small_area_still_has_square_bucket():
    assert make_buckets(128 * 128) == [(128, 128)]
    assert (64, 64) in make_buckets(64 * 64, step=32)


def test_resize_and_crop_center():
    img = Image.new("RGB", (96, 64))
    out, (top, left), original = resize_and_crop(img, (64, 64), rng=random.Random(0))
    assert out.size == (64, 64)
    assert original == (64, 96)
    # Height already matches, the width (96) is cropped evenly.
    assert (top, left) == (0, 16)


def test_resize_and_crop_covers_and_keeps_content():
    # Left half red, right half blue: a center crop of a wide image keeps both halves.
    img = Image.new("RGB", (96, 48), (255, 0, 0))
    img.paste((0, 0, 255), (48, 0, 96, 48))
    out, crop, original = resize_and_crop(img, (64, 64), crop="center", rng=random.Random(0))
    assert out.size == (64, 64) and original == (48, 96)
    assert crop == (0, 32)  # resized to 128x64, then 32px off the left
    assert out.getpixel((2, 32))[0] > 200 and out.getpixel((61, 32))[2] > 200


def test_resize_and_crop_random_is_seeded_and_in_range():
    img = Image.new("RGB", (64, 96))
    crops = set()
    for seed in range(20):
        a = resize_and_crop(img, (32, 32), crop="random", rng=random.Random(seed))
        b = resize_and_crop(img, (32, 32), crop="random", rng=random.Random(seed))
        assert a[1] == b[1]
        top, left = a[1]
        assert left == 0 and 0 <= top <= 16
        assert a[0].size == (32, 32)
        crops.add(a[1])
    assert len(crops) > 1


def test_resize_and_crop_rejects_unknown_mode():
    with pytest.raises(ValueError):
        resize_and_crop(Image.new("RGB", (8, 8)), (8, 8), crop="top", rng=random.Random(0))


def test_square_size_and_histogram():
    assert square_size(512) == (512, 512)
    text = bucket_histogram([(512, 768)] * 3 + [(512, 512)] + [(768, 512)] * 2)
    assert text.splitlines() == [
        "  512x768: 3 images",
        "  768x512: 2 images",
        "  512x512: 1 image",
    ]
