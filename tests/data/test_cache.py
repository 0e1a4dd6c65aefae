"""Latent/prompt cache: hits never run the encoders, changes invalidate exactly their entries,
and a mixed-aspect set with a corrupt file trains in single-bucket batches."""

from __future__ import annotations

import hashlib
import logging

from PIL import Image

from tuner.training.run import run_training


def cache_files(root) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*.safetensors"))
    }


def spy_vae_encode(monkeypatch) -> list[int]:
    from diffusers import AutoencoderKL

    calls = []
    real = AutoencoderKL.encode

    def counting(self, *args, **kwargs):
        calls.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(AutoencoderKL, "encode", counting)
    return calls


def test_second_run_hits_and_never_encodes(make_recipe, tmp_path, monkeypatch):
    calls = spy_vae_encode(monkeypatch)
    run_training(make_recipe("train.steps=1"))
    first_files = cache_files(tmp_path / "cache")
    assert calls and first_files
    calls.clear()
    run_training(make_recipe("train.steps=1", f"output.dir={tmp_path / 'again'}"))
    assert calls == []  # no VAE encode at all
    assert cache_files(tmp_path / "cache") == first_files  # byte-identical, nothing rewritten


def test_changed_image_invalidates_only_its_entry(make_recipe, tmp_path, style_dir, monkeypatch):
    run_training(make_recipe("train.steps=1"))
    before = set(cache_files(tmp_path / "cache"))
    first = sorted(style_dir.glob("*.png"))[0]
    Image.open(first).transpose(Image.Transpose.ROTATE_90).save(first)
    calls = spy_vae_encode(monkeypatch)
    run_training(make_recipe("train.steps=1"))
    after = set(cache_files(tmp_path / "cache"))
    new_latents = [k for k in after - before if k.startswith("latents/")]
    assert len(new_latents) == 1 and len(calls) == 1
    assert before <= after  # the other entries are kept as they were


def test_flip_caches_both_variants_and_text_cache_has_empty_prompt(make_recipe, tmp_path):
    run_training(make_recipe("train.steps=1", "data.flip=true", "data.caption_dropout=0.5"))
    files = cache_files(tmp_path / "cache")
    latents = [k for k in files if k.startswith("latents/")]
    texts = [k for k in files if k.startswith("text/")]
    assert len(latents) == 2 * 4  # 4 images x (plain, flipped)
    assert len(texts) == 4 + 1  # 4 captions + the empty (dropped) caption


def test_shuffle_disables_text_cache_with_a_warning(make_recipe, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="tuner"):
        run_training(make_recipe("train.steps=1", "data.shuffle_tags=true"))
    assert any("shuffle_tags" in r.getMessage() for r in caplog.records)
    assert not (tmp_path / "cache" / "text").exists()


def test_mixed_aspect_set_with_corrupt_file_trains(make_recipe, tmp_path, caplog):
    folder = tmp_path / "mixed"
    folder.mkdir()
    colors = ["red", "blue", "green"]
    for i, (w, h) in enumerate([(64, 64), (96, 64), (64, 96)] * 2):
        Image.new("RGB", (w, h), colors[i % 3]).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a {colors[i % 3]} image")
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    seen_shapes = []
    from tuner.training import loop

    real = loop.compute_loss

    def spy(recipe, family, comps, objective, batch, *rest):
        seen_shapes.append(tuple(batch["latents"].shape))
        return real(recipe, family, comps, objective, batch, *rest)

    loop.compute_loss = spy
    try:
        with caplog.at_level(logging.INFO, logger="tuner"):
            run_training(
                make_recipe(
                    f"data.datasets.0.path={folder}",
                    "train.steps=6",
                    "data.buckets={area: 6144, step: 32, min_side: 32}",
                )
            )
    finally:
        loop.compute_loss = real
    messages = [r.getMessage() for r in caplog.records]
    assert any("corrupt.png" in m and "unreadable" in m for m in messages)
    histogram = next(m for m in messages if "buckets:" in m)
    assert histogram.count(": 2 images") == 3  # three buckets, two images each
    # Every batch stacked into one tensor (so it is single-bucket), and all 3 sizes trained.
    assert {s[2:] for s in seen_shapes} == {(32, 32), (32, 48), (48, 32)}


def test_changed_local_weights_invalidate_the_cache(make_recipe, tmp_path, monkeypatch):
    import os

    from tuner import load_pipeline

    folder = tmp_path / "base"
    load_pipeline("builtin:tiny-sd15").save_pretrained(folder)
    run_training(make_recipe(f"model.path={folder}", "train.steps=1"))
    calls = spy_vae_encode(monkeypatch)
    run_training(make_recipe(f"model.path={folder}", "train.steps=1"))
    assert calls == []  # same weights: all hits
    vae_file = next((folder / "vae").glob("*.safetensors"))
    os.utime(vae_file, ns=(0, vae_file.stat().st_mtime_ns + 10**9))  # "retrained" in place
    run_training(make_recipe(f"model.path={folder}", "train.steps=1"))
    assert len(calls) >= 1  # re-encoded with the new weights
