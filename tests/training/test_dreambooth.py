"""DreamBooth: prior-preservation loss, class-image generation, text-encoder LoRA."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tuner import load_pipeline
from tuner.adapters.lora import WEIGHT_NAME
from tuner.cli import main
from tuner.training.run import run_training

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def subject_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "subject"
    folder.mkdir()
    for png in sorted((REPO / "datasets" / "toy-subject").glob("*.png"))[:3]:
        shutil.copy(png, folder / png.name)  # no captions: instance_prompt is the fallback
    return folder


@pytest.fixture
def db_raw(tmp_path, subject_dir) -> dict:
    return {
        "model": {"path": "builtin:tiny-sd15"},
        "adapter": {"rank": 4},
        "dreambooth": {
            "instance_dir": str(subject_dir),
            "instance_prompt": "a sks circle",
            "class_prompt": "a circle",
            "class_dir": str(tmp_path / "class"),
            "num_class_images": 3,
            "class_generation_steps": 2,
            "class_generation_batch": 2,
        },
        "data": {"resolution": 64, "cache_dir": str(tmp_path / "cache")},
        "train": {"steps": 3, "batch_size": 2, "lr": 1e-2, "seed": 0},
        "sample": {"prompts": []},
        "output": {"dir": str(tmp_path / "out"), "overwrite": True},
    }


def recipe_of(raw: dict, *overrides: str):
    from tuner.recipe import apply_overrides, validate_recipe

    return validate_recipe(apply_overrides(raw, overrides))


def test_prior_loss_is_instance_plus_weighted_class(db_raw):
    from accelerate import Accelerator

    from tuner.training.loop import compute_loss

    recipe = recipe_of(db_raw, "dreambooth.prior_loss_weight=0.7", "train.steps=1")
    result = run_training(recipe)
    family, comps = result.family, result.comps
    objective = family.objective(comps, recipe.train)
    generator_seed = 42
    latents = torch.randn(4, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    embeds = torch.randn(4, 77, 32, generator=torch.Generator().manual_seed(1))
    batch = {
        "latents": latents,
        "cond": {"prompt_embeds": embeds},
        "is_prior": torch.tensor([False, False, True, True]),
    }
    with torch.no_grad():
        loss = compute_loss(
            recipe,
            family,
            comps,
            objective,
            batch,
            torch.Generator().manual_seed(generator_seed),
            Accelerator(),
        )
        inputs = objective.sample(latents, torch.Generator().manual_seed(generator_seed))
        pred = comps.denoiser(inputs.noisy, inputs.timesteps, encoder_hidden_states=embeds).sample
    per_sample = ((pred - inputs.target) ** 2).mean(dim=(1, 2, 3))
    expected = per_sample[:2].mean() + 0.7 * per_sample[2:].mean()
    assert torch.allclose(loss, expected, rtol=1e-5), (loss, expected)


def test_class_generation_makes_the_missing_count_and_resumes(db_raw, tmp_path, monkeypatch):
    from tuner import families
    from tuner.inference import render as sample
    from tuner.recipe import ModelSection
    from tuner.training import dreambooth

    recipe = recipe_of(db_raw, "dreambooth.num_class_images=5")
    family = families.for_model(ModelSection(path="builtin:tiny-sd15"))
    comps = family.load(recipe.model, torch.float32)
    folder = tmp_path / "class"
    folder.mkdir()
    shutil.copy(REPO / "datasets" / "toy-subject" / "000.png", folder / "class-00001.png")

    real_render = sample.render_batch
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the user hits Ctrl+C during the second batch
        return real_render(*args, **kwargs)

    monkeypatch.setattr(sample, "render_batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        dreambooth.generate_class_images(recipe, family, comps, folder, torch.device("cpu"))
    made = sorted(p.name for p in folder.glob("class-*.png"))
    assert made == ["class-00000.png", "class-00001.png", "class-00002.png"]  # batch of 2 done
    assert not list(folder.glob(".*.tmp"))  # nothing half-written

    monkeypatch.setattr(sample, "render_batch", real_render)
    assert dreambooth.generate_class_images(recipe, family, comps, folder, torch.device("cpu")) == 2
    assert len(list(folder.glob("class-*.png"))) == 5
    assert (folder / "class-00004.txt").read_text() == "a circle"
    assert dreambooth.generate_class_images(recipe, family, comps, folder, torch.device("cpu")) == 0


def test_text_encoder_lora_is_saved_and_changes_embeddings(db_raw):
    result = run_training(
        recipe_of(db_raw, "adapter.text_encoder=true", "dreambooth.with_prior_preservation=false")
    )
    saved = load_file(str(result.output_dir / WEIGHT_NAME))
    assert any(k.startswith("text_encoder.") for k in saved)
    assert any(k.startswith("unet.") for k in saved)
    pipe = load_pipeline("builtin:tiny-sd15")
    ids = pipe.tokenizer(
        ["a sks circle"], padding="max_length", max_length=77, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        before = pipe.text_encoder(ids)[0]
        pipe.load_lora_weights(str(result.output_dir))  # one call loads UNet and text encoder
        after = pipe.text_encoder(ids)[0]
    assert (after - before).abs().max() > 1e-4


@pytest.mark.slow  # two training runs
def test_prior_weight_zero_equals_instance_only(db_raw, tmp_path):
    with_prior = run_training(
        recipe_of(db_raw, "dreambooth.prior_loss_weight=0", f"output.dir={tmp_path / 'a'}")
    )
    alone = run_training(
        recipe_of(
            db_raw, "dreambooth.with_prior_preservation=false", f"output.dir={tmp_path / 'b'}"
        )
    )
    a = load_file(str(with_prior.output_dir / WEIGHT_NAME))
    b = load_file(str(alone.output_dir / WEIGHT_NAME))
    assert a.keys() == b.keys()
    # A batch of 4 (instances + class) and a batch of 2 round differently in the last bits.
    diff_zero = max((a[k] - b[k]).abs().max().item() for k in a)
    weighted = run_training(recipe_of(db_raw, f"output.dir={tmp_path / 'c'}"))
    c = load_file(str(weighted.output_dir / WEIGHT_NAME))
    diff_one = max((a[k] - c[k]).abs().max().item() for k in a)
    assert diff_zero < 1e-4
    assert diff_one > 100 * max(diff_zero, 1e-7)  # the class term, when weighted, does matter


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (
            ["dreambooth.instance_dir=/no/such/dir"],
            "dreambooth.instance_dir: /no/such/dir not found",
        ),
        (["dreambooth.instance_dir=EMPTY"], "has no images"),
        (["~dreambooth.class_prompt"], "with_prior_preservation is on but class_prompt is empty"),
        (["dreambooth.num_class_images=0"], "dreambooth.num_class_images: expected a value >= 1"),
    ],
)
def test_bad_dreambooth_input(db_raw, tmp_path, capsys, overrides, expected):
    empty = tmp_path / "empty"
    empty.mkdir()
    overrides = [o.replace("EMPTY", str(empty)) for o in overrides]
    path = tmp_path / "db.yaml"
    path.write_text(yaml.safe_dump(db_raw))
    assert main(["train", str(path), *overrides]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert expected in line and "Traceback" not in line
