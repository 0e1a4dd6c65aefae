"""What a trained adapter says about itself: kohya `ss_*` keys (which webui front ends read),
modelspec keys, and our own `tuner_*` keys."""

from __future__ import annotations

import json
import time
from pathlib import Path


def training_metadata(recipe, comps, steps: int, tag_counts: dict[str, int]) -> dict[str, str]:
    """kohya `ss_*` keys where kohya has them, modelspec keys, and our own `tuner_*` keys."""
    adapter, data, train = recipe.adapter, recipe.data, recipe.train
    family, naming = comps.family, comps.family.spec.export
    architecture = comps.architecture or naming.modelspec_architecture
    trigger = sorted(
        {e.prefix.strip(" ,") for e in data.datasets if e.prefix.strip(" ,")}
        | ({recipe.dreambooth.instance_prompt} if recipe.dreambooth else set())
    )
    title = recipe.output.name or Path(recipe.output.dir).name
    resolution = f"{data.resolution}x{data.resolution}"
    prediction = recipe.model.prediction_type
    meta = {
        "ss_base_model_version": naming.kohya_base_version,
        "ss_sd_model_name": recipe.model.path,
        "ss_v2": str(naming.kohya_base_version == "sd_v2"),
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(adapter.rank),
        "ss_network_alpha": str(adapter.lora_alpha),
        "ss_network_dropout": str(adapter.dropout),
        "ss_resolution": str((data.resolution, data.resolution)),
        "ss_steps": str(steps),
        "ss_max_train_steps": str(train.steps),
        "ss_learning_rate": str(train.lr),
        "ss_text_encoder_lr": str(adapter.text_encoder_lr or train.lr),
        "ss_lr_scheduler": train.lr_scheduler,
        "ss_optimizer": train.optimizer,
        "ss_batch_size_per_device": str(train.batch_size),
        "ss_gradient_accumulation_steps": str(train.grad_accum),
        "ss_mixed_precision": train.mixed_precision,
        "ss_noise_offset": str(train.noise_offset),
        "ss_min_snr_gamma": str(train.min_snr_gamma),
        "ss_caption_dropout_rate": str(data.caption_dropout),
        "ss_seed": str(train.seed),
        "ss_output_name": title,
        "ss_tag_frequency": json.dumps({"tuner": tag_counts}),
        "ss_training_comment": "trained with tuner",
        "tuner_base_model": recipe.model.path,
        "tuner_family": family.spec.name,
        "tuner_rank": str(adapter.rank),
        "tuner_alpha": str(adapter.lora_alpha),
        "tuner_resolution": str(data.resolution),
        "tuner_steps": str(steps),
        "tuner_trigger_words": json.dumps(trigger),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{architecture}/lora",
        "modelspec.implementation": "diffusers",
        "modelspec.title": title,
        "modelspec.resolution": resolution,
        "modelspec.date": time.strftime("%Y-%m-%d"),
        "modelspec.trigger_phrase": ", ".join(trigger),
    }
    if prediction:
        meta["modelspec.prediction_type"] = prediction
    meta["tuner_adapter_type"] = adapter.type
    if adapter.type != "lora":
        from tuner.adapters.lycoris import network_args

        # What LyCORIS' kohya network writes; webui front ends show and sort by these.
        meta["ss_network_module"] = "lycoris.kohya"
        meta["ss_network_args"] = json.dumps(network_args(adapter))
    return meta
