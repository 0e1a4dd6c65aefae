"""The family registry, detection and per-family recipe checks: a family is one file, found by
the registry; every way a model is recognised asks the registered families."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tuner import builtins, families
from tuner.cli import main
from tuner.errors import TunerError
from tuner.families.base import Family, FamilyBase, FamilySpec
from tuner.families.detection import family_from_file, family_from_hub
from tuner.recipe import ModelSection, load_recipe, validate_recipe

REPO = Path(__file__).resolve().parents[2]


def test_registry_is_built_from_the_family_files():
    """Every module of tuner/families/ but the shared ones defines a family, and the registry
    holds exactly those: a new family file needs no other registration."""
    import pkgutil

    files = {m.name for m in pkgutil.iter_modules(families.__path__)} - families.NOT_FAMILIES
    modules = {cls.__module__.rsplit(".", 1)[-1] for cls in families.registry().values()}
    assert modules == files and {"sd", "sdxl", "sd3", "flux"} <= files
    assert {"sd15", "sd2", "sdxl", "sd3", "flux"} <= set(families.names())
    for name in families.names():
        family = families.get(name)
        assert isinstance(family, Family) and isinstance(family, FamilyBase)
        assert isinstance(family.spec, FamilySpec) and family.spec.name == name


def test_every_builtin_names_a_registered_family_and_every_family_has_a_tiny_builtin():
    assert {b.family for b in builtins.all_builtins().values()} <= set(families.names())
    tiny = {builtins.lookup(name).family for name in builtins.tiny_names()}
    assert tiny == set(families.names())


def test_recipe_family_is_validated_against_the_registry():
    raw = {
        "model": {"path": "builtin:tiny-sd15", "family": "sd4"},
        "data": {"datasets": [{"path": "x"}]},
        "train": {"steps": 1},
        "output": {"dir": "out"},
    }
    with pytest.raises(TunerError) as err:
        validate_recipe(raw)
    assert f"expected one of {', '.join(families.names())}" in str(err.value)


def test_configure_returns_new_components_and_leaves_the_family_alone(make_recipe):
    family = families.get("flux")
    spec_before = family.spec
    comps = family.load(ModelSection(path="builtin:tiny-flux"), torch.float32)
    recipe = make_recipe("train.max_sequence_length=24", base="builtin:tiny-flux")
    configured = family.configure(comps, recipe)
    assert configured is not comps and configured.sequence_length == 24
    assert comps.sequence_length == 512  # dev's default, untouched
    assert family.spec is spec_before and vars(family) == {}


@pytest.mark.parametrize(
    ("unet_config", "expected"),
    [({"use_linear_projection": True}, "sd2"), ({"cross_attention_dim": 768}, "sd15")],
)
@pytest.mark.parametrize("repo", ["stabilityai/stable-diffusion-2-1", "someone/my-sd1-model"])
def test_hub_sd_family_comes_from_the_unet_config_not_the_repo_name(
    monkeypatch, repo, unet_config, expected
):
    """The repo name must not decide: SD 2.1 was detected as sd15 from its name."""
    from diffusers import DiffusionPipeline, UNet2DConditionModel

    asked = []
    monkeypatch.setattr(
        DiffusionPipeline,
        "load_config",
        classmethod(lambda cls, r, **kw: {"_class_name": "StableDiffusionPipeline"}),
    )

    def unet_load_config(cls, r, subfolder=None, **kw):
        asked.append((r, subfolder))
        return unet_config

    monkeypatch.setattr(UNet2DConditionModel, "load_config", classmethod(unet_load_config))
    assert family_from_hub(repo) == expected
    assert (repo, "unet") in asked
    version = families.get(expected).spec.export.kohya_base_version
    assert version == ("sd_v2" if expected == "sd2" else "sd_v1")


def test_hub_pipeline_classes_map_to_their_family(monkeypatch):
    from diffusers import DiffusionPipeline

    for name, cls in families.registry().items():
        pipeline = cls.spec.recognize.pipelines[0]
        if pipeline == "StableDiffusionPipeline":
            continue  # needs the UNet config, tested above
        monkeypatch.setattr(
            DiffusionPipeline,
            "load_config",
            classmethod(lambda c, r, p=pipeline, **kw: {"_class_name": p}),
        )
        assert family_from_hub("org/model") == name


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        (["model.diffusion_model.input_blocks.0.0.weight"], "sd15"),
        (
            [
                "model.diffusion_model.input_blocks.0.0.weight",
                "cond_stage_model.model.ln_final.weight",
            ],
            "sd2",
        ),
        (
            [
                "model.diffusion_model.input_blocks.0.0.weight",
                "conditioner.embedders.1.model.ln_final.weight",
            ],
            "sdxl",
        ),
        (["model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight"], "sd3"),
        (["double_blocks.0.img_attn.qkv.weight"], "flux"),
    ],
)
def test_single_file_keys_pick_exactly_one_family(tmp_path, keys, expected):
    file = tmp_path / "model.safetensors"
    save_file({key: torch.zeros(1) for key in keys}, str(file))
    assert family_from_file(file) == expected


def test_single_file_with_unknown_keys_asks_for_the_family(tmp_path):
    file = tmp_path / "odd.safetensors"
    save_file({"something.else": torch.zeros(1)}, str(file))
    with pytest.raises(TunerError, match="set model.family"):
        family_from_file(file)


@pytest.mark.parametrize(
    ("recipe", "override", "line"),
    [
        (
            "recipes/quickstart-flux.yaml",
            "train.min_snr_gamma=5",
            "train.min_snr_gamma: applies to DDPM models only; flux is flow-matching",
        ),
        (
            "recipes/quickstart-sd3.yaml",
            "adapter.text_encoder=true",
            "adapter.text_encoder: text-encoder LoRA is not supported for sd3",
        ),
        (
            "recipes/quickstart.yaml",
            "train.flow.shift=3",
            "train.flow: applies to flow-matching families (sd3, flux); sd15 trains with DDPM",
        ),
        ("recipes/quickstart.yaml", "model.quantize=nf4", "model.quantize: nf4 is supported"),
        ("recipes/quickstart.yaml", "model.vae_path=x", "model.vae_path: does not apply to sd15"),
        ("recipes/quickstart-flux.yaml", "model.drop_t5=true", "model.drop_t5: does not apply"),
        ("recipes/quickstart-sd3.yaml", "train.max_sequence_length=600", "is more than the 512"),
    ],
)
def test_family_checks_refuse_before_anything_is_written(
    recipe, override, line, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(REPO)
    out = tmp_path / "never-written"
    args = [recipe, override, f"output.dir={out}", f"data.cache_dir={tmp_path / 'cache'}"]
    assert main(["check", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and line in err[0]
    assert main(["train", *args]) == 2
    assert capsys.readouterr().err.strip().splitlines() == err
    assert not out.exists() and not (tmp_path / "cache").exists()


def test_flat_flow_keys_still_work_with_a_deprecation_line(tmp_path, caplog):
    path = tmp_path / "old.yaml"
    path.write_text(
        "model: {path: builtin:tiny-flux}\n"
        "data: {datasets: [{path: x}]}\n"
        "train: {steps: 1, shift: 2.5, timestep_sampling: mode}\n"
        "output: {dir: out}\n"
    )
    with caplog.at_level(logging.WARNING, logger="tuner"):
        recipe = load_recipe(path)
    assert recipe.train.flow.shift == 2.5 and recipe.train.flow.timestep_sampling == "mode"
    assert "train.shift is deprecated" in caplog.text and "train.flow.shift" in caplog.text
    assert "shift" not in recipe.model_dump()["train"]  # recipe.yaml is written the new way


def test_a_flow_key_set_twice_is_an_error(tmp_path):
    raw = {
        "model": {"path": "builtin:tiny-flux"},
        "data": {"datasets": [{"path": "x"}]},
        "train": {"steps": 1, "shift": 2.0, "flow": {"shift": 3.0}},
        "output": {"dir": "out"},
    }
    with pytest.raises(TunerError, match="keep train.flow.shift"):
        validate_recipe(raw)


def test_a_model_family_that_disagrees_with_the_builtin_is_one_line():
    """model.family names sdxl for an SD 1.5 builtin: refused before anything loads."""
    model = ModelSection(path="builtin:tiny-sd15", family="sdxl")
    with pytest.raises(TunerError, match=r"^model.family: sdxl but builtin:tiny-sd15 is a sd15"):
        families.for_model(model)
    with pytest.raises(TunerError, match=r"^model.family: sdxl"):
        families.known_for(model)
    assert (
        families.for_model(ModelSection(path="builtin:tiny-sd15", family="sd15")).spec.name
        == "sd15"
    )
