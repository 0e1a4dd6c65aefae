"""kohya <-> diffusers export, per-module alphas, and merge, checked by loading the files through
diffusers' own `load_lora_weights` on builtin:tiny-sd15 and comparing the images."""

import json

import numpy as np
import pytest
import torch
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tuner import families
from tuner.adapters import formats
from tuner.cli import main
from tuner.errors import TunerError
from tuner.inference.pipelines import count_lora_layers, load_adapters, load_base, lora_specs
from tuner.recipe import ModelSection

MODEL = "builtin:tiny-sd15"
RANK, ALPHA = 4, 2.0  # alpha != rank, so a lost alpha changes the images


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    """A diffusers-format adapter on the UNet and the text encoder, random non-zero up weights."""
    torch.set_num_threads(1)
    family = families.get("sd15")
    comps = family.load(ModelSection(path=MODEL), torch.float32)
    torch.manual_seed(1)
    layers, configs = {}, {}
    parts = {
        "unet": (comps.denoiser, family.spec.default_targets),
        "text_encoder": (comps.text_encoders["text_encoder"], family.spec.text_encoder_targets),
    }
    for name, (module, targets) in parts.items():
        config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(targets))
        inject_adapter_in_model(config, module)
        with torch.no_grad():
            for pname, param in module.named_parameters():
                if "lora_B" in pname:
                    param.normal_(0, 0.1)
        layers[name] = convert_state_dict_to_diffusers(get_peft_model_state_dict(module))
        configs[name] = config.to_dict()
    folder = tmp_path_factory.mktemp("adapter")
    family.save_lora(folder, layers, configs, "pytorch_lora_weights.safetensors")
    formats.add_metadata(
        folder / "pytorch_lora_weights.safetensors",
        {"tuner_family": "sd15", "tuner_base_model": MODEL, "ss_network_dim": "4"},
    )
    assert main(["export", str(folder), "--format", "kohya"]) == 0
    return folder


def images(adapter_files=(), weights=None, prompt="a red circle"):
    """Images from a fresh base pipeline with the files loaded by diffusers."""
    _, pipe = load_base(MODEL)
    names = [f"a{i}" for i in range(len(adapter_files))]
    for name, file in zip(names, adapter_files, strict=True):
        pipe.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name=name)
    if names:
        pipe.set_adapters(names, adapter_weights=weights or [1.0] * len(names))
    out = pipe(
        [prompt, "a blue star"],
        num_inference_steps=2,
        output_type="np",
        generator=[torch.Generator().manual_seed(s) for s in (0, 1)],
    ).images
    return out, pipe


def test_kohya_keys_use_webui_names_with_alpha(adapter_dir):
    kohya = load_file(str(adapter_dir / "pytorch_lora_weights_kohya.safetensors"))
    modules = {key.split(".")[0] for key in kohya}
    assert {m.split("_")[1] for m in modules} == {"unet", "te"}
    assert all(m.startswith(("lora_unet_", "lora_te_text_model_encoder_layers_")) for m in modules)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in modules
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in modules
    for module in modules:
        assert kohya[f"{module}.alpha"].item() == ALPHA
        assert kohya[f"{module}.lora_down.weight"].shape[0] == RANK
        assert f"{module}.lora_up.weight" in kohya
    with safe_open(str(adapter_dir / "pytorch_lora_weights_kohya.safetensors"), "pt") as f:
        metadata = f.metadata()
    # diffusers refuses a kohya file that also carries lora_adapter_metadata
    assert "lora_adapter_metadata" not in metadata
    assert metadata["tuner_base_model"] == MODEL and metadata["ss_network_dim"] == "4"


def test_kohya_file_gives_the_same_images_as_the_diffusers_file(adapter_dir):
    base, _ = images()
    from_diffusers, pipe_d = images([adapter_dir / "pytorch_lora_weights.safetensors"])
    from_kohya, pipe_k = images([adapter_dir / "pytorch_lora_weights_kohya.safetensors"])
    modules = len(load_file(str(adapter_dir / "pytorch_lora_weights_kohya.safetensors"))) // 3
    assert count_lora_layers(pipe_k, "a0") == count_lora_layers(pipe_d, "a0") == modules
    assert np.abs(from_diffusers - base).max() > 1e-3  # the adapter does change the images
    assert np.abs(from_kohya - from_diffusers).max() < 1e-5


def test_diffusers_kohya_diffusers_round_trip_is_exact(adapter_dir, tmp_path):
    out = tmp_path / "back.safetensors"
    assert (
        main(
            [
                "export",
                str(adapter_dir / "pytorch_lora_weights_kohya.safetensors"),
                "--format",
                "diffusers",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    original, _ = formats.read_adapter(adapter_dir)
    back, metadata = formats.read_adapter(out)
    assert sorted(back) == sorted(original)
    assert all(torch.equal(back[k], original[k]) for k in back)
    configs = formats.lora_configs(metadata)
    assert {c: (cfg["r"], cfg["lora_alpha"]) for c, cfg in configs.items()} == {
        "unet": (RANK, ALPHA),
        "text_encoder": (RANK, ALPHA),
    }
    assert metadata["tuner_base_model"] == MODEL and metadata["ss_network_dim"] == "4"


def test_per_module_alphas_survive_kohya_to_diffusers(adapter_dir, tmp_path):
    kohya = load_file(str(adapter_dir / "pytorch_lora_weights_kohya.safetensors"))
    modules = sorted(k.removesuffix(".alpha") for k in kohya if k.endswith(".alpha"))
    for i, module in enumerate(modules):
        kohya[f"{module}.alpha"] = torch.tensor(float(1 + i % 5))  # alphas differ by module
    mixed = tmp_path / "mixed_kohya.safetensors"
    save_file(kohya, str(mixed), metadata={"tuner_family": "sd15"})
    assert main(["export", str(mixed), "--format", "diffusers", "--model", MODEL]) == 0
    converted = tmp_path / "mixed.safetensors"
    _, metadata = formats.read_adapter(converted)
    assert formats.lora_configs(metadata)["unet"]["lora_alpha"] == RANK  # folded into up weights

    # Ground truth without our converter: each layer's effective up weight (peft's runtime
    # scaling included) must be the kohya up weight times that module's alpha / rank.
    from_converted, pipe = images([converted])
    names = {
        (c, m): k
        for k, (c, m) in formats.kohya_names(
            families.get("sd15"), families.get("sd15").components_from_pipeline(pipe, "")
        ).items()
        if k.startswith(("lora_unet_", "lora_te_text_model_"))
    }
    for component in ("unet", "text_encoder"):
        for name, layer in getattr(pipe, component).named_modules():
            if hasattr(layer, "lora_B") and "a0" in layer.lora_B:
                module = names[(component, name)]
                expected = kohya[f"{module}.lora_up.weight"] * kohya[f"{module}.alpha"] / RANK
                actual = layer.lora_B["a0"].weight * layer.scaling["a0"]
                assert torch.allclose(actual, expected, atol=1e-7)
    # Same images from a kohya file meaning the same thing with one alpha (= rank) everywhere.
    # (diffusers' own loader ignores per-module kohya alphas for SD, so `tuner sample` converts
    # such files itself; the uniform file is the case diffusers loads right.)
    for module in modules:
        kohya[f"{module}.lora_up.weight"] *= kohya[f"{module}.alpha"] / RANK
        kohya[f"{module}.alpha"] = torch.tensor(float(RANK))
    save_file(kohya, str(tmp_path / "uniform_kohya.safetensors"))
    from_uniform, _ = images([tmp_path / "uniform_kohya.safetensors"])
    original, _ = images([adapter_dir / "pytorch_lora_weights_kohya.safetensors"])
    assert np.abs(from_uniform - original).max() > 1e-4  # the changed alphas matter
    assert np.abs(from_converted - from_uniform).max() < 1e-5
    # and the loader behind `tuner sample` / `tuner grid` gets the mixed file right too
    _, pipe = load_base(MODEL)
    load_adapters(pipe, families.get("sd15"), lora_specs([str(mixed)]))
    through_cli_loader = pipe(
        ["a red circle", "a blue star"],
        num_inference_steps=2,
        output_type="np",
        generator=[torch.Generator().manual_seed(s) for s in (0, 1)],
    ).images
    assert np.abs(through_cli_loader - from_uniform).max() < 1e-5


def test_export_refuses_to_clobber_or_reconvert(adapter_dir):
    kohya = adapter_dir / "pytorch_lora_weights_kohya.safetensors"
    with pytest.raises(TunerError, match="already in kohya"):
        export_cmd().convert(kohya, "kohya")
    with pytest.raises(TunerError, match="exists"):
        export_cmd().convert(adapter_dir, "kohya")  # the kohya file is already there


def export_cmd():
    from tuner.cli import export as export_cmd

    return export_cmd


def test_merged_pipeline_matches_unmerged_adapter_at_the_same_scale(adapter_dir, tmp_path):
    scale = 0.6
    assert (
        main(
            [
                "merge",
                MODEL,
                str(adapter_dir),
                "--scale",
                str(scale),
                "--out",
                str(tmp_path / "merged"),
            ]
        )
        == 0
    )
    info = json.loads((tmp_path / "merged" / "tuner_merge.json").read_text())
    assert info["scale"] == scale and info["family"] == "sd15"
    unmerged, _ = images([adapter_dir / "pytorch_lora_weights.safetensors"], [scale])
    base, _ = images()
    _, merged_pipe = load_base(str(tmp_path / "merged"))
    assert count_lora_layers(merged_pipe, "a0") == 0  # fused: no LoRA layers left
    merged = merged_pipe(
        ["a red circle", "a blue star"],
        num_inference_steps=2,
        output_type="np",
        generator=[torch.Generator().manual_seed(s) for s in (0, 1)],
    ).images
    assert np.abs(unmerged - base).max() > 1e-3
    assert np.abs(merged - unmerged).max() < 1e-4
