import io

import numpy as np
import pytest
from PIL import Image

from tuner.data.images import IMAGE_EXTS, BadImage, load_image


def test_exif_orientation_6_rotates(tmp_path):
    path = tmp_path / "rotated.jpg"
    img = Image.new("RGB", (32, 16), (200, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    img.save(path, exif=exif.tobytes())

    out = load_image(str(path))
    assert out.mode == "RGB"
    assert out.size == (16, 32)


def test_rgba_transparent_becomes_white(tmp_path):
    img = Image.new("RGBA", (16, 16), (0, 0, 0, 0))
    img.putpixel((3, 3), (255, 0, 0, 255))
    path = tmp_path / "alpha.png"
    img.save(path)

    out = load_image(path)
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((3, 3)) == (255, 0, 0)


def test_la_half_transparent_blends_on_white():
    img = Image.new("LA", (16, 16), (0, 128))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    r, g, b = load_image(buf.getvalue()).getpixel((0, 0))
    assert r == g == b and 120 <= r <= 135


def test_grayscale_converts(tmp_path):
    path = tmp_path / "gray.png"
    Image.new("L", (24, 16), 77).save(path)
    out = load_image(path)
    assert out.mode == "RGB" and out.size == (24, 16)
    assert out.getpixel((0, 0)) == (77, 77, 77)


def test_palette_converts_and_palette_transparency_is_white(tmp_path):
    plain = tmp_path / "p.png"
    rgb = Image.new("RGB", (16, 16), (10, 200, 30))
    rgb.convert("P", palette=Image.Palette.ADAPTIVE).save(plain)
    assert load_image(plain).getpixel((5, 5)) == (10, 200, 30)

    transparent = tmp_path / "pt.gif"
    img = Image.new("P", (16, 16), 0)
    img.putpalette([0, 0, 0] + [255, 0, 0] * 255)
    img.putpixel((1, 1), 1)
    img.save(transparent, transparency=0)
    out = load_image(transparent)
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((1, 1)) == (255, 0, 0)


def test_16bit_gray_scales_instead_of_clipping(tmp_path):
    arr = np.full((16, 16), 32768, dtype=np.uint16)
    path = tmp_path / "g16.png"
    Image.fromarray(arr).save(path)
    r, _, _ = load_image(path).getpixel((0, 0))
    assert 120 <= r <= 135


def test_bytes_input(tmp_path):
    buf = io.BytesIO()
    Image.new("RGB", (20, 12), (1, 2, 3)).save(buf, format="WEBP", lossless=True)
    out = load_image(buf.getvalue())
    assert out.size == (20, 12) and out.getpixel((0, 0)) == (1, 2, 3)


def test_truncated_png_is_bad_image(tmp_path):
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, format="PNG")
    path = tmp_path / "cut.png"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])

    with pytest.raises(BadImage) as info:
        load_image(path)
    assert str(info.value).startswith(f"{path}: unreadable image (")


def test_zero_byte_and_garbage_are_bad_image(tmp_path):
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(BadImage, match=r"empty file"):
        load_image(empty)
    with pytest.raises(BadImage, match=r"empty file"):
        load_image(b"")

    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"not an image at all")
    with pytest.raises(BadImage):
        load_image(garbage)
    with pytest.raises(BadImage):
        load_image(tmp_path / "missing.png")


def test_bad_image_is_not_tuner_error():
    from tuner.errors import TunerError

    assert not issubclass(BadImage, TunerError)
    assert ".png" in IMAGE_EXTS and ".jpeg" in IMAGE_EXTS
