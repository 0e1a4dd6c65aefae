"""What is specific to hidream, on builtin:tiny-hidream: prompt encoding equals the pipeline's
own encode_prompt (also one encoder at a time on a caching device), predict is the pipeline's
transformer call (train-mode MoE and patch layout included, odd aspect ratios), the router
stays frozen while expert LoRA trains, the diffusers file through the pipeline's own
load_lora_weights, the ComfyUI file's keys, buckets, detection of family and variant, single
files, refusals, the full-size parameter count and the shipped recipes. The contract battery
(tests/families/test_contract.py) adds the checks every family passes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml
from diffusers import HiDreamImageTransformer2DModel
from PIL import Image
from safetensors.torch import save_file

from tuner import families
from tuner.adapters import formats, lora
from tuner.builtins.hidream import hidream_scheduler, hidream_transformer_config
from tuner.errors import TunerError
from tuner.families import hidream
from tuner.families.hidream import HiDreamFamily, detect_variant
from tuner.recipe import AdapterSection, ModelSection, load_recipe
from tuner.training.run import run_training

REPO = Path(__file__).resolve().parents[2]
BASE = "builtin:tiny-hidream"
FAST = ("data.resolution=32", "train.max_sequence_length=16", "train.steps=3", "train.lr=1e-2")
PROMPTS = ["a red circle on a blue background", "a star"]


def load(**model):
    spec = ModelSection(path=BASE, **model)
    family = families.for_model(spec)
    comps = family.load(spec, torch.float32)
    comps.sequence_length = 16
    return family, comps


def render(pipe, width=32, height=32, **kwargs) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    options = {"guidance_scale": 1.0, **kwargs}
    return pipe(
        PROMPTS[0],
        num_inference_steps=2,
        width=width,
        height=height,
        max_sequence_length=16,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
        **options,
    ).images


def test_prompt_encoding_is_the_pipelines_encode_prompt():
    family, comps = load()
    t5, _, llama, _, pooled, _ = family.build_pipeline(comps).encode_prompt(
        prompt=PROMPTS, do_classifier_free_guidance=False, max_sequence_length=16
    )
    assert llama.shape[:2] == (2, 2)  # (Llama layers, batch, tokens, width)
    for phase in (None, "cpu"):  # plain, and inside the caching phase (one encoder at a time)
        if phase is None:
            cond = family.encode_prompts(comps, PROMPTS)
        else:
            with family.text_encoding_phase(comps, phase):
                cond = family.encode_prompts(comps, PROMPTS)
        assert torch.equal(cond["pooled_prompt_embeds"], pooled)
        assert torch.equal(cond["prompt_embeds_t5"], t5)
        assert torch.equal(cond["prompt_embeds_llama3"], llama.transpose(0, 1))  # batch first
    alone = family.encode_prompts(comps, PROMPTS[1:])  # rows do not depend on the batch
    torch.testing.assert_close(alone["prompt_embeds_llama3"][0], cond["prompt_embeds_llama3"][1])


def test_caching_places_one_encoder_at_a_time(tiny, monkeypatch):
    """All four bf16 encoders are 27 GB: the caching phase moves none of them, encode_prompts
    puts the CLIP pair, then T5, then Llama on the phase's device."""
    family, comps = tiny
    placed = []
    real = hidream.on_device

    def recording(modules, device):
        modules = list(modules)
        names = [n for n, m in comps.text_encoders.items() if any(m is x for x in modules)]
        placed.append((names, str(device)))
        return real(modules, device)

    monkeypatch.setattr(hidream, "on_device", recording)
    with family.text_encoding_phase(comps, "cpu"):
        assert placed == []
        family.encode_prompts(comps, PROMPTS)
    assert placed == [
        (["text_encoder", "text_encoder_2"], "cpu"),
        (["text_encoder_3"], "cpu"),
        (["text_encoder_4"], "cpu"),
    ]


@pytest.mark.parametrize("size", [(32, 32), (48, 24)], ids=["square", "2:1"])
def test_predict_is_the_pipelines_transformer_call(size):
    """The pipeline's call (eval path) negated, and the same values from the train-mode path
    predict takes under gradients (differentiable MoE, patch layout padded to max_seq)."""
    family, comps = load()
    seen = {}

    def hook(module, args, kwargs, output):
        seen.setdefault("kwargs", kwargs)
        seen.setdefault("output", output[0])

    handle = comps.denoiser.register_forward_hook(hook, with_kwargs=True)
    try:
        render(family.build_pipeline(comps), *size)
    finally:
        handle.remove()
    call = seen["kwargs"]
    noisy = call["hidden_states"]
    cond = family.encode_prompts(comps, PROMPTS[:1])
    torch.testing.assert_close(cond["prompt_embeds_t5"], call["encoder_hidden_states_t5"])
    with torch.no_grad():
        pred = family.predict(comps, noisy, call["timesteps"], cond, {})
    torch.testing.assert_close(pred, -seen["output"])
    comps.denoiser.eval()  # the flag does not matter: gradients on means the training path
    with torch.enable_grad():
        trained_path = family.predict(comps, noisy, call["timesteps"], cond, {})
    assert trained_path.requires_grad and not comps.denoiser.training
    torch.testing.assert_close(trained_path.detach(), pred, rtol=1e-4, atol=1e-5)


def test_gradient_checkpointing_gives_the_same_expert_lora_gradients():
    """The recomputed blocks take the same (train-mode, differentiable MoE) path as the
    forward: checkpointed gradients equal plain ones, for attention and expert LoRA."""
    from tuner.recipe import AdapterSection

    grads = []
    for checkpointing in (False, True):
        family, comps = load()
        targets = ["to_q", "to_out", "ff_i.experts.0.w1", "ff_i.shared_experts.w2"]
        lora.inject(comps, AdapterSection(rank=4, targets=targets, init="gaussian"), family)
        if checkpointing:
            comps.denoiser.enable_gradient_checkpointing()
        comps.denoiser.train()
        cond = family.encode_prompts(comps, PROMPTS)
        noisy = torch.randn(2, 16, 16, 16, generator=torch.Generator().manual_seed(0))
        family.predict(
            comps, noisy, torch.tensor([300.0, 700.0]), cond, {}
        ).square().mean().backward()
        grads.append(
            {n: p.grad for n, p in comps.denoiser.named_parameters() if p.grad is not None}
        )
    assert grads[0].keys() == grads[1].keys() and any("experts.0.w1" in n for n in grads[0])
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad)


def test_flow_objective_uses_each_variants_shift(make_recipe):
    family, comps = load()
    train = make_recipe(*FAST, base=BASE).train
    for variant, shift in (("full", 3.0), ("dev", 6.0), ("fast", 3.0)):
        variant_comps = hidream.replace(comps, scheduler=hidream_scheduler(variant))
        objective = family.objective(variant_comps, train)
        assert (objective.shift, objective.resolution_shift) == (shift, False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Attention plus the shared and routed experts' FFNs, alpha != rank."""
    from tuner.recipe import apply_overrides, validate_recipe

    tmp = tmp_path_factory.mktemp("hidream")
    targets = ["to_q", "to_k", "to_v", "to_out", "ff_i.shared_experts.w1", "ff_i.experts.1.w2"]
    raw = {
        "model": {"path": BASE},
        "adapter": {"rank": 4, "alpha": 2, "targets": targets},
        "data": {
            "datasets": [{"path": str(REPO / "datasets" / "toy-stripes")}],
            "resolution": 32,
            "cache_dir": str(tmp / "cache"),
        },
        "train": {"steps": 3, "batch_size": 2, "lr": 1e-2, "seed": 0, "max_sequence_length": 16},
        "sample": {"prompts": []},
        "output": {"dir": str(tmp / "out"), "overwrite": True},
        "log": {"every": 1},
    }
    return run_training(validate_recipe(apply_overrides(raw, ())))


def test_router_stays_frozen_while_expert_lora_trains(trained):
    fresh = load()[1].denoiser.state_dict()
    state = trained.comps.denoiser.state_dict()
    gates = [k for k in fresh if ".ff_i.gate." in k]
    assert gates and all(torch.equal(state[k], fresh[k]) for k in gates)
    assert not any("gate" in k and "lora" in k for k in state)
    moved = {k.rsplit(".lora_B", 1)[0] for k, v in state.items() if "lora_B" in k and v.any()}
    assert any("experts.1.w2" in m for m in moved) and any("shared_experts.w1" in m for m in moved)


def test_diffusers_file_loads_in_the_pipelines_own_loader(trained):
    """HiDreamImagePipeline.load_lora_weights: every tensor of the file lands in its layer
    (none missing, none unexpected), the image changes, and scale 0 is the base."""
    state, metadata = formats.read_adapter(trained.output_dir / lora.WEIGHT_NAME)
    family, comps = load()
    pipe = family.build_pipeline(comps)
    base = render(pipe)
    pipe.load_lora_weights(str(trained.output_dir / lora.WEIGHT_NAME), adapter_name="a")
    loaded = {
        f"transformer.{name.replace('.a.weight', '.weight')}": tensor
        for name, tensor in pipe.transformer.state_dict().items()
        if ".lora_A.a." in name or ".lora_B.a." in name
    }
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[key], state[key]) for key in state)
    assert (render(pipe) - base).abs().max() > 1e-3
    pipe.set_adapters(["a"], [0.0])
    torch.testing.assert_close(render(pipe), base)
    assert metadata["ss_base_model_version"] == "hidream"
    assert metadata["modelspec.architecture"] == "hidream-i1-full/lora"


def comfy_hidream_keys(transformer) -> set[str]:
    """The LoRA names ComfyUI maps for a HiDream model (comfy/lora.py model_lora_keys_unet):
    for every `diffusion_model.<name>.weight`, `lora_unet_<name, . -> _>` and
    `diffusion_model.<name>` (all models), `transformer.<name>` and `lycoris_<name, . -> _>`
    (its comfy.model_base.HiDream branch). ComfyUI's HiDream modules (comfy/ldm/hidream/model.py:
    attn1.to_q ... to_out_t, ff_i.experts.N.w1, ff_i.shared_experts, ff_i.gate) carry the released
    checkpoint's names, which are diffusers' (its single-file mapping only strips a prefix)."""
    names = set()
    for key in transformer.state_dict():
        if key.endswith(".weight"):
            name = key.removesuffix(".weight")
            flat = name.replace(".", "_")
            names |= {f"lora_unet_{flat}", f"diffusion_model.{name}", f"transformer.{name}"}
            names.add(f"lycoris_{flat}")
    return names


def test_comfy_file_uses_names_comfyui_maps_and_loads_like_the_diffusers_file(trained):
    comfy_file = trained.output_dir / lora.KOHYA_WEIGHT_NAME
    comfy, metadata = formats.read_adapter(comfy_file)
    accepted = comfy_hidream_keys(load()[1].denoiser)
    modules = {key.rsplit(".lora_", 1)[0] for key in comfy}
    assert modules and modules <= accepted
    assert all(m.startswith("diffusion_model.") for m in modules)
    assert {key.rsplit(".", 2)[-2] for key in comfy} == {"lora_A", "lora_B"}  # no .alpha
    assert metadata["ss_base_model_version"] == "hidream"
    images = []
    for file in (lora.WEIGHT_NAME, lora.KOHYA_WEIGHT_NAME):  # diffusers' own loader, both
        family, comps = load()
        pipe = family.build_pipeline(comps)
        pipe.load_lora_weights(str(trained.output_dir / file))
        images.append(render(pipe))
    torch.testing.assert_close(images[0], images[1])


def test_an_odd_aspect_ratio_trains(make_recipe, tmp_path, monkeypatch):
    """Buckets step by 4 px here (VAE x2, 2x2 patches; 16 for the real model): a 2:1 image
    trains at 40x20 (padded to max_seq patches inside the transformer)."""
    folder = tmp_path / "wide"
    folder.mkdir()
    source = sorted((REPO / "datasets" / "toy-stripes").glob("*.png"))[0]
    Image.open(source).convert("RGB").resize((80, 40)).save(folder / "wide.png")
    (folder / "wide.txt").write_text("a wide stripe")
    shapes = []
    predict = HiDreamFamily.predict

    def recording(self, comps, noisy, *args):
        shapes.append(tuple(noisy.shape[-2:]))
        return predict(self, comps, noisy, *args)

    monkeypatch.setattr(HiDreamFamily, "predict", recording)
    phases = []  # the cache encodes prompts through the family's one-encoder-at-a-time phase
    phase = HiDreamFamily.text_encoding_phase

    def phase_recording(self, comps, device):
        phases.append(str(device))
        return phase(self, comps, device)

    monkeypatch.setattr(HiDreamFamily, "text_encoding_phase", phase_recording)
    recipe = make_recipe(
        *FAST,
        f"data.datasets.0.path={folder}",
        "data.buckets.step=8",
        "data.buckets.min_side=8",
        "train.batch_size=1",
        "train.steps=2",
        base=BASE,
    )
    run_training(recipe)
    assert shapes and set(shapes) == {(24 // 2, 40 // 2)}  # (h, w) latents of 40x24
    assert phases == ["cpu"]


@pytest.fixture(scope="module")
def tiny():
    """One loaded model for the checks that only read it (configure returns new Components)."""
    return load()


@pytest.mark.parametrize(
    "override, message",
    [
        ("adapter.text_encoder=true", "adapter.text_encoder"),
        ("train.guidance=3.5", "train.guidance"),
        ("train.max_sequence_length=300", "train.max_sequence_length"),
        ("train.min_snr_gamma=5", "train.min_snr_gamma"),
        ("data.buckets.step=10", "data.buckets.step"),
        ("data.resolution=48", "data.resolution"),  # more than the transformer's max_seq
        ("adapter.targets=[to_q,ff_i.gate]", "router"),
        ("adapter.target_regex=.*ff_i\\..*", "router"),
        ("model.drop_t5=true", "model.drop_t5"),
    ],
)
def test_refuses_what_hidream_cannot_do(override, message, make_recipe, tiny):
    recipe = make_recipe(*FAST, override, base=BASE)
    family, comps = tiny
    with pytest.raises(TunerError, match=message):
        family.validate(recipe)
        family.configure(comps, recipe)


def test_expert_regex_without_the_router_is_accepted(make_recipe, tiny):
    regex = r".*ff_i\.(experts\.\d+|shared_experts)\.(w1|w2|w3)"
    recipe = make_recipe(*FAST, f"adapter.target_regex={regex}", base=BASE)
    family, comps = tiny
    family.validate(recipe)
    assert lora.denoiser_targets(recipe.adapter, family, comps.denoiser) == regex


@pytest.mark.slow
def test_detects_family_and_variant_and_loads_single_files(tmp_path):
    family, comps = load()
    family.build_pipeline(comps).save_pretrained(tmp_path / "HiDream-tiny")
    expected = render(family.build_pipeline(comps))
    folder = ModelSection(path=str(tmp_path / "HiDream-tiny"))
    assert families.for_model(folder).spec.name == "hidream"  # model_index.json
    loaded = family.load(folder, torch.float32)
    assert loaded.architecture == "hidream-i1-full"  # UniPC scheduler
    torch.testing.assert_close(render(family.build_pipeline(loaded)), expected)

    # A ComfyUI-style transformer file (`model.diffusion_model.` names).
    file = tmp_path / "hidream_i1_dev_tiny.safetensors"
    state = {f"model.diffusion_model.{k}": v for k, v in comps.denoiser.state_dict().items()}
    save_file(state, str(file))
    assert families.for_model(ModelSection(path=str(file))).spec.name == "hidream"
    with pytest.raises(TunerError, match="model.config"):
        family.load(ModelSection(path=str(file)), torch.float32)
    single = family.load(
        ModelSection(path=str(file), config=str(tmp_path / "HiDream-tiny")), torch.float32
    )
    assert single.architecture == "hidream-i1-dev"  # named in the file
    torch.testing.assert_close(render(family.build_pipeline(single)), expected)


def test_variant_from_name_else_scheduler():
    assert detect_variant("HiDream-ai/HiDream-I1-Fast", hidream_scheduler("full")) == "fast"
    assert detect_variant("/models/hidream", hidream_scheduler("full")) == "full"
    assert detect_variant("/models/hidream", hidream_scheduler("dev")) == "dev"
    assert detect_variant("/models/hidream", hidream_scheduler("fast")) == "fast"
    spec = HiDreamFamily.spec.recognize
    assert spec.matches_keys({"double_stream_blocks.0.block.adaLN_modulation.1.bias"})
    assert not spec.matches_keys({"double_blocks.0.img_mod.lin.weight"})  # Flux


def test_arch_builder_has_the_published_sizes():
    """builtin:arch-hidream on the meta device: the 17.1B MoE transformer, Llama-3.1-8B,
    T5-XXL's encoder, CLIP-G and CLIP-L (248 positions)."""
    from tuner.builtins.hidream import build_arch_hidream

    with torch.device("meta"):
        parts = build_arch_hidream()

    def billions(module) -> float:
        return round(sum(p.numel() for p in module.parameters()) / 1e9, 2)

    assert billions(parts["transformer"]) == 17.11
    assert billions(parts["text_encoder_4"]) == 8.03
    assert billions(parts["text_encoder_3"]) == 4.76
    assert billions(parts["text_encoder_2"]) == 0.69
    assert billions(parts["text_encoder"]) == 0.12
    assert parts["transformer"].dtype == torch.bfloat16


RECIPES = ["hidream/style-lora.yaml", "hidream/dreambooth-lora.yaml"]


@pytest.mark.parametrize("recipe", RECIPES)
def test_shipped_recipes_pass_the_family_checks_and_name_real_modules(recipe, monkeypatch):
    monkeypatch.chdir(REPO)
    loaded = load_recipe(f"recipes/{recipe}", [])
    family = families.for_model(loaded.model)
    assert family.spec.name == "hidream"
    family.validate(loaded)
    with torch.device("meta"):
        model = HiDreamImageTransformer2DModel(**hidream_transformer_config())
    examples = commented_target_examples(REPO / "recipes" / recipe)
    assert examples
    for example in examples + [{}]:
        adapter = AdapterSection(rank=4, **example)
        hidream.check_router_untouched(adapter)
        lora.denoiser_targets(adapter, family, model)  # raises on a miss
    assert "GiB" in (REPO / "recipes" / recipe).read_text()  # the memory estimate is stated


def commented_target_examples(recipe: Path) -> list[dict]:
    examples, lines = [], recipe.read_text().splitlines()
    for i, line in enumerate(lines):
        found = re.match(r"^(\s*)# (targets|target_regex): ", line)
        if not found:
            continue
        text = line.replace("# ", "", 1)
        for more in lines[i + 1 :]:
            if not re.match(rf"^{found[1]}#\s{{3,}}\S", more):
                break
            text += " " + more.split("#", 1)[1].strip()
        examples.append(yaml.safe_load(text))
    return examples


@pytest.mark.slow
def test_quickstart_trains_and_writes_both_files(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    loaded = load_recipe(
        "recipes/quickstart-hidream.yaml",
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
