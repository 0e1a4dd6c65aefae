"""The flow-matching families (flux, sd3) on their tiny builtins: the denoiser call equals the
pipeline's own, drop_t5, targets, the checks flow families add, folder loading and the shipped
quickstarts. The shared contract (only LoRA moves, round trip, the kohya/ComfyUI export,
DreamBooth, resume, tuner sample) is test_contract.py."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml
from diffusers import FluxPipeline, FluxTransformer2DModel, SD3Transformer2DModel

from tuner import families
from tuner.adapters import formats, lora
from tuner.builtins.flux import flux_transformer_config
from tuner.builtins.sd3 import sd35_large_transformer_config
from tuner.errors import TunerError
from tuner.families import mmdit
from tuner.inference.render import lora_scale, pipeline_modules
from tuner.recipe import AdapterSection, ModelSection, load_recipe
from tuner.training.run import run_training

REPO = Path(__file__).resolve().parents[2]
TINY = ["tiny-flux", "tiny-sd3"]
FAST = ("data.resolution=32", "train.max_sequence_length=16", "train.steps=3", "train.lr=1e-2")
PROMPT = "a red circle on a blue background"


def load(name: str, **model):
    spec = ModelSection(path=f"builtin:{name}", **model)
    family = families.for_model(spec)
    return family, family.load(spec, torch.float32)


def render(pipe, **kwargs) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        PROMPT,
        num_inference_steps=2,
        width=32,
        height=32,
        max_sequence_length=16,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
        **kwargs,
    ).images


def capture_denoiser_call(pipe, **kwargs) -> dict:
    seen = {}

    def hook(module, args, call_kwargs, output):
        seen.setdefault("kwargs", call_kwargs)
        seen.setdefault("output", output[0])

    handle = pipe.transformer.register_forward_hook(hook, with_kwargs=True)
    try:
        render(pipe, **kwargs)
    finally:
        handle.remove()
    return seen


def test_flux_predict_is_the_pipelines_transformer_call():
    """Packing, image/text ids, guidance and the timestep/1000 convention all as FluxPipeline."""
    family, comps = load("tiny-flux")
    comps.sequence_length, comps.guidance = 16, 2.5
    seen = capture_denoiser_call(family.build_pipeline(comps), guidance_scale=2.5)
    call = seen["kwargs"]
    side = 32 // mmdit.vae_scale(comps)
    noisy = FluxPipeline._unpack_latents(call["hidden_states"], side, side, 1)
    cond = family.encode_prompts(comps, [PROMPT])
    torch.testing.assert_close(cond["prompt_embeds"], call["encoder_hidden_states"])
    with torch.no_grad():
        pred = family.predict(comps, noisy, call["timestep"] * 1000, cond, {})
    torch.testing.assert_close(pred, FluxPipeline._unpack_latents(seen["output"], side, side, 1))


def test_sd3_predict_is_the_pipelines_transformer_call():
    family, comps = load("tiny-sd3")
    comps.sequence_length = 16
    seen = capture_denoiser_call(family.build_pipeline(comps), guidance_scale=1.0)
    call = seen["kwargs"]
    cond = family.encode_prompts(comps, [PROMPT])
    torch.testing.assert_close(cond["prompt_embeds"], call["encoder_hidden_states"])
    torch.testing.assert_close(cond["pooled_prompt_embeds"], call["pooled_projections"])
    with torch.no_grad():
        pred = family.predict(comps, call["hidden_states"], call["timestep"], cond, {})
    torch.testing.assert_close(pred, seen["output"])


def test_sd3_without_t5_encodes_zeros_in_its_place():
    family, full = load("tiny-sd3")
    _, dropped = load("tiny-sd3", drop_t5=True)
    assert "text_encoder_3" not in dropped.text_encoders
    for comps in (full, dropped):
        comps.sequence_length = 16
    with_t5 = family.encode_prompts(full, [PROMPT])["prompt_embeds"]
    without = family.encode_prompts(dropped, [PROMPT])["prompt_embeds"]
    assert with_t5.shape == without.shape
    clip_tokens = with_t5.shape[1] - 16
    torch.testing.assert_close(without[:, :clip_tokens], with_t5[:, :clip_tokens])
    assert torch.count_nonzero(without[:, clip_tokens:]) == 0
    assert torch.count_nonzero(with_t5[:, clip_tokens:]) > 0
    assert dropped.identity != full.identity  # separate text caches
    render(family.build_pipeline(dropped), guidance_scale=1.0)  # the pipeline runs without it


def test_flux_comfy_export_loads_like_the_diffusers_file(make_recipe):
    """The kohya-named file (OneTrainer's `lora_transformer_` layout, which ComfyUI maps for
    Flux) carries alpha and gives the same images as the diffusers file."""
    result = run_training(
        make_recipe(*FAST, "adapter.rank=4", "adapter.alpha=2", base="builtin:tiny-flux")
    )
    state, metadata = formats.read_adapter(result.output_dir / lora.WEIGHT_NAME)
    kohya = formats.to_kohya(state, metadata, result.family.spec.export.kohya_prefixes)
    assert all(
        k.startswith("lora_transformer_transformer_blocks_")
        or k.startswith("lora_transformer_single_transformer_blocks_")
        for k in kohya
    )
    assert {float(v) for k, v in kohya.items() if k.endswith(".alpha")} == {2.0}
    pipes = []
    # Both carry alpha as `.alpha` tensors (Flux's diffusers file: see ExportNaming).
    for weights in (str(result.output_dir / lora.WEIGHT_NAME), kohya):
        family, comps = load("tiny-flux")
        pipes.append(family.build_pipeline(comps))
        pipes[-1].load_lora_weights(weights)
    torch.testing.assert_close(render(pipes[0]), render(pipes[1]))
    with lora_scale(pipeline_modules(pipes[1]), 0.0):
        assert (render(pipes[1]) - render(pipes[0])).abs().max() > 1e-3


@pytest.mark.parametrize("recipe", ["quickstart-flux.yaml", "quickstart-sd3.yaml"])
def test_quickstart_recipes_train(recipe, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    loaded = load_recipe(
        f"recipes/{recipe}",
        [
            "train.steps=2",
            "sample.prompts=[]",
            f"output.dir={tmp_path / 'out'}",
            f"data.cache_dir={tmp_path / 'cache'}",
        ],
    )
    result = run_training(loaded)
    assert (result.output_dir / lora.WEIGHT_NAME).is_file()
    assert (result.output_dir / lora.KOHYA_WEIGHT_NAME).is_file()


@pytest.mark.parametrize("name", TINY)
def test_lora_targets_default_feed_forward_and_block_choice(name):
    family, comps = load(name)
    names = [n for n, _ in comps.denoiser.named_modules()]
    assert lora.denoiser_targets(AdapterSection(), family, comps.denoiser) == list(
        family.spec.default_targets
    )
    for target in ("add_q_proj", "to_add_out", "ff.net.2", "ff_context.net.0.proj"):
        assert any(n.endswith("." + target) for n in names), target
    # The recipes' block-choice example: the joint attention of double/joint block 0 only.
    regex = r"transformer_blocks\.0\.attn\.(to_q|to_k|to_v|to_out\.0|add_[qkv]_proj|to_add_out)"
    adapter = AdapterSection(rank=2, target_regex=regex)
    targets = lora.denoiser_targets(adapter, family, comps.denoiser)
    comps.denoiser.add_adapter(lora.lora_config(adapter, targets))
    wrapped = {
        n.rsplit(".lora_A", 1)[0]
        for n, _ in comps.denoiser.named_modules()
        if n.endswith(".lora_A")
    }
    assert wrapped and all(n.startswith("transformer_blocks.0.attn.") for n in wrapped)


@pytest.mark.parametrize(
    "override, message",
    [
        ("adapter.text_encoder=true", "adapter.text_encoder"),
        ("train.min_snr_gamma=5", "train.min_snr_gamma"),
        ("data.datasets.0.resolution=34", "data.datasets.0.resolution"),
        ("train.max_sequence_length=600", "train.max_sequence_length"),
    ],
)
def test_configure_rejects_what_flow_families_cannot_do(override, message, make_recipe):
    recipe = make_recipe(*FAST, override, base="builtin:tiny-flux")
    family, comps = load("tiny-flux")
    with pytest.raises(TunerError, match=message):
        family.validate(recipe)  # the checks that need no weights
        family.configure(comps, recipe)  # those that read the loaded model (VAE scale)


def test_sequence_length_is_part_of_the_cache_identity(make_recipe):
    family, comps = load("tiny-flux")
    comps = family.configure(comps, make_recipe(*FAST, base="builtin:tiny-flux"))
    _, other = load("tiny-flux")
    other = family.configure(
        other, make_recipe(*FAST, "train.max_sequence_length=32", base="builtin:tiny-flux")
    )
    assert comps.identity != other.identity
    assert comps.sequence_length == 16
    assert family.encode_prompts(other, [PROMPT])["prompt_embeds"].shape[1] == 32


def commented_target_examples(recipe: Path) -> list[dict]:
    """The `# targets:` / `# target_regex:` examples in a recipe's comments, parsed as YAML."""
    examples, lines = [], recipe.read_text().splitlines()
    for i, line in enumerate(lines):
        found = re.match(r"^(\s*)# (targets|target_regex): ", line)
        if not found:
            continue
        text = line.replace("# ", "", 1)
        for more in lines[i + 1 :]:  # a flow list continues on deeper-indented comment lines
            if not re.match(rf"^{found[1]}#\s{{3,}}\S", more):
                break
            text += " " + more.split("#", 1)[1].strip()
        examples.append(yaml.safe_load(text))
    return examples


@pytest.mark.parametrize(
    "recipe, builder",
    [
        ("flux/style-qlora.yaml", lambda: FluxTransformer2DModel(**flux_transformer_config("dev"))),
        (
            "flux/dreambooth-qlora.yaml",
            lambda: FluxTransformer2DModel(**flux_transformer_config("dev")),
        ),
        ("sd35/style-lora.yaml", lambda: SD3Transformer2DModel(**sd35_large_transformer_config())),
    ],
)
def test_recipe_target_examples_name_real_modules(recipe, builder):
    """Every target example in the recipes' comments matches modules of the full-size model."""
    with torch.device("meta"):
        model = builder()
    names = [n for n, _ in model.named_modules()]
    examples = commented_target_examples(REPO / "recipes" / recipe)
    assert examples
    family = families.get("flux" if recipe.startswith("flux") else "sd3")
    for example in examples:
        adapter = AdapterSection(rank=4, **example)
        targets = lora.denoiser_targets(adapter, family, model)  # raises if one misses
        if adapter.target_regex:  # a block choice: some attention layers, not all of them
            chosen = [n for n in names if re.fullmatch(targets, n)]
            every = [n for n in names if n.endswith(family.spec.default_targets)]
            assert 0 < len(chosen) < len(every)


@pytest.mark.parametrize("name", TINY)
def test_loads_from_a_diffusers_folder(name, tmp_path):
    drop_t5 = name == "tiny-sd3"
    family, comps = load(name)
    family.build_pipeline(comps).save_pretrained(tmp_path / "model")  # with T5
    comps = load(name, drop_t5=drop_t5)[1]
    spec = ModelSection(path=str(tmp_path / "model"), drop_t5=drop_t5)
    assert families.for_model(spec).spec.name == family.spec.name  # detected from model_index.json
    loaded = family.load(spec, torch.float32)
    if drop_t5:  # from_pretrained never loads the left-out T5
        assert set(loaded.text_encoders) == {"text_encoder", "text_encoder_2"}
    torch.testing.assert_close(
        render(family.build_pipeline(loaded), guidance_scale=1.0),
        render(family.build_pipeline(comps), guidance_scale=1.0),
    )


def test_arch_builders_have_the_published_sizes():
    """builtin:arch-flux-dev / arch-sd35 (built on the meta device: no memory, no time) have the
    released models' parameter counts: FLUX.1-dev 11.9B, SD3.5 Large 8.1B, T5-XXL encoder 4.8B,
    CLIP-L 0.12B, OpenCLIP bigG text 0.69B."""
    from tuner.builtins.flux import build_arch_flux
    from tuner.builtins.sd3 import build_arch_sd35

    with torch.device("meta"):
        flux, sd35 = build_arch_flux("dev"), build_arch_sd35()

    def billions(module) -> float:
        return round(sum(p.numel() for p in module.parameters()) / 1e9, 2)

    assert billions(flux["transformer"]) == 11.90 and flux["transformer"].config.guidance_embeds
    assert billions(sd35["transformer"]) == 8.06
    assert billions(flux["text_encoder_2"]) == billions(sd35["text_encoder_3"]) == 4.76
    assert billions(flux["text_encoder"]) == 0.12 and billions(sd35["text_encoder_2"]) == 0.69
