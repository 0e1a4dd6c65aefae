"""Per-block settings: adapter.rank_pattern / alpha_pattern reach peft and the saved files (the
diffusers file read by diffusers' load_lora_weights gives the trained model's output; the kohya
file's `.alpha` gives each module's scale), and train.lr_pattern splits the LoRA parameters
into groups, each parameter in exactly one."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from safetensors.torch import load_file

from tuner.adapters import patterns
from tuner.adapters.lora import KOHYA_WEIGHT_NAME, WEIGHT_NAME
from tuner.errors import TunerError


class Blocks(torch.nn.Module):
    """down.0.to_q, down.0.to_k, up.0.to_q, up.0.to_k, mid.proj."""

    def __init__(self):
        super().__init__()

        def block():
            return torch.nn.ModuleDict(
                {"to_q": torch.nn.Linear(8, 8), "to_k": torch.nn.Linear(8, 8)}
            )

        self.down = torch.nn.ModuleList([block()])
        self.up = torch.nn.ModuleList([block()])
        self.mid = torch.nn.ModuleDict({"proj": torch.nn.Linear(8, 8)})


def with_lora() -> torch.nn.Module:
    model = inject_adapter_in_model(
        LoraConfig(r=2, target_modules=["to_q", "to_k", "proj"]), Blocks()
    )
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name)
    return model


def test_lr_pattern_groups_cover_every_lora_parameter_once_first_match_wins():
    model = with_lora()
    lr_pattern = {r"up\.0\.to_q": 0.5, "to_q": 2.0, "proj": 0.0}
    groups = patterns.lr_groups(model, 1e-3, lr_pattern)
    by_id = {id(p): g for g in groups for p in g["params"]}
    lora = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert len(by_id) == sum(len(g["params"]) for g in groups) == len(lora)  # once each
    where = {n: by_id[id(p)]["pattern"] for n, p in lora.items()}
    assert where["up.0.to_q.lora_A.default.weight"] == r"up\.0\.to_q"  # first match wins
    assert where["down.0.to_q.lora_B.default.weight"] == "to_q"
    assert where["mid.proj.lora_A.default.weight"] == "proj"
    assert where["down.0.to_k.lora_A.default.weight"] is None  # the rest, at train.lr
    lrs = {g["pattern"]: g["lr"] for g in groups}
    assert lrs == {r"up\.0\.to_q": 5e-4, "to_q": 2e-3, "proj": 0.0, None: 1e-3}
    assert patterns.lr_groups(model, 1e-3, {}) == [
        {"params": list(lora.values()), "lr": 1e-3, "pattern": None}
    ]


def test_a_pattern_matching_no_module_is_refused():
    with pytest.raises(TunerError, match=r"train.lr_pattern: 'to_v' matches no LoRA module"):
        patterns.lr_groups(with_lora(), 1e-3, {"to_v": 2.0})
    with pytest.raises(TunerError, match="adapter.rank_pattern: 'wn_0' matches no"):
        patterns.check_patterns({"wn_0": 4}, ["down.0.to_q"], "adapter.rank_pattern")
    # A match is at the end of a name at a dot: "o_q" is not "to_q".
    with pytest.raises(TunerError, match="'o_q' matches no"):
        patterns.check_patterns({"o_q": 4}, ["down.0.to_q"], "adapter.rank_pattern")


PATTERNS = [
    "adapter.rank=4",
    "adapter.alpha=4",
    "adapter.rank_pattern={to_q: 2, 'up_blocks.*to_v': 8}",
    "adapter.alpha_pattern={to_k: 16}",
    "train.lr_pattern={to_q: 3.0}",
    "train.steps=2",
    "train.lr=1e-2",
]


def test_pattern_ranks_and_alphas_load_through_diffusers_as_trained(make_recipe):
    from diffusers import StableDiffusionPipeline

    from tuner.inference.pipelines import load_base
    from tuner.training.run import parameter_groups, run_training

    recipe = make_recipe(*PATTERNS)
    result = run_training(recipe)
    trained = result.comps.denoiser
    groups = parameter_groups(result.trained, result.family, recipe)
    assert [(g["pattern"], g["lr"], g["name"]) for g in groups] == [
        ("to_q", 3e-2, "denoiser"),
        (None, 1e-2, "denoiser"),
    ]
    layers = {n: m for n, m in trained.named_modules() if hasattr(m, "lora_A")}
    q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    k = q.replace("to_q", "to_k")
    v_up = next(n for n in layers if n.startswith("up_blocks") and n.endswith("to_v"))
    assert layers[q].r["default"] == 2 and layers[q].scaling["default"] == 4 / 2
    assert layers[k].r["default"] == 4 and layers[k].scaling["default"] == 16 / 4
    assert layers[v_up].r["default"] == 8 and layers[v_up].scaling["default"] == 4 / 8

    _, pipe = load_base("builtin:tiny-sd15")
    assert isinstance(pipe, StableDiffusionPipeline)
    pipe.load_lora_weights(str(result.output_dir), weight_name=WEIGHT_NAME)
    loaded = {n: m for n, m in pipe.unet.named_modules() if hasattr(m, "lora_A")}
    assert loaded.keys() == layers.keys()
    for name, layer in layers.items():
        (adapter,) = loaded[name].r  # diffusers names its adapter default_0
        assert loaded[name].r[adapter] == layer.r["default"], name
        assert loaded[name].scaling[adapter] == pytest.approx(layer.scaling["default"]), name

    gen = torch.Generator().manual_seed(0)
    noisy = torch.randn(1, 4, 8, 8, generator=gen)
    cond = torch.randn(1, 77, trained.config.cross_attention_dim, generator=gen)
    t = torch.tensor([500])
    with torch.no_grad():
        expected = trained(noisy, t, encoder_hidden_states=cond).sample
        got = pipe.unet(noisy, t, encoder_hidden_states=cond).sample
        pipe.unet.disable_adapters()
        base = pipe.unet(noisy, t, encoder_hidden_states=cond).sample
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (expected - base).abs().max() > 1e-4  # the adapter matters

    kohya = load_file(str(result.output_dir / KOHYA_WEIGHT_NAME))
    for name, layer in layers.items():
        key = "lora_unet_" + name.replace(".", "_")
        rank = kohya[f"{key}.lora_down.weight"].shape[0]
        assert rank == layer.r["default"], name
        assert float(kohya[f"{key}.alpha"]) / rank == pytest.approx(layer.scaling["default"])
