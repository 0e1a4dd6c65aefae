"""Model sources: builtin, a local diffusers folder, a single-file checkpoint."""

from __future__ import annotations

import torch
from ldm_export import save_sd15_single_file

from tuner import families, load_pipeline
from tuner.recipe import ModelSection


def weights(pipe) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{k}": v
        for name in ("unet", "vae", "text_encoder")
        for k, v in getattr(pipe, name).state_dict().items()
    }


def test_builtin_is_the_same_every_time():
    a, b = weights(load_pipeline("builtin:tiny-sd15")), weights(load_pipeline("builtin:tiny-sd15"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_local_folder_and_single_file_load_the_same_weights(tmp_path):
    base = load_pipeline("builtin:tiny-sd15")
    folder = tmp_path / "tiny-sd15"
    base.save_pretrained(folder)
    single = save_sd15_single_file(base, tmp_path / "tiny-sd15.safetensors")

    assert families.for_model(ModelSection(path=str(folder))).spec.name == "sd15"
    assert families.for_model(ModelSection(path=str(single))).spec.name == "sd15"
    expected = weights(base)
    from_folder = weights(load_pipeline(str(folder)))
    family = families.for_model(ModelSection(path=str(single)))
    comps = family.load(ModelSection(path=str(single), config=str(folder)), torch.float32)
    from_file = weights(family.build_pipeline(comps))
    for loaded in (from_folder, from_file):
        assert loaded.keys() == expected.keys()
        assert all(torch.equal(loaded[k], expected[k]) for k in expected)


def test_folder_family_detection_tells_sd2_from_sd15(tmp_path):
    load_pipeline("builtin:tiny-sd2").save_pretrained(tmp_path / "sd2")
    assert families.for_model(ModelSection(path=str(tmp_path / "sd2"))).spec.name == "sd2"


def test_training_from_a_local_folder(make_recipe, tmp_path):
    from tuner.training.run import run_training

    load_pipeline("builtin:tiny-sd15").save_pretrained(tmp_path / "base")
    result = run_training(make_recipe(f"model.path={tmp_path / 'base'}", "train.steps=1"))
    assert (result.output_dir / "pytorch_lora_weights.safetensors").is_file()
