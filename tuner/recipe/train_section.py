"""The recipe's `train` section: steps, optimizer, schedule, precision, loss, and the flow-matching
and EMA subsections; settings the chosen optimizer or loss cannot use are refused."""

from __future__ import annotations

import logging
from typing import Literal

from pydantic import Field, field_validator, model_validator

from tuner.recipe.section import Section, check_regex


class FlowSection(Section):
    """Flow-matching families (sd3, flux): how sigmas are drawn, shifted and weighted."""

    timestep_sampling: Literal["uniform", "logit_normal", "mode", "sigmoid"] = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = Field(1.0, gt=0)
    mode_scale: float = 1.29
    shift: float | None = Field(None, gt=0)
    resolution_shift: bool | None = None
    loss_weighting: Literal["none", "sigma_sqrt", "cosmap"] = "none"


class EmaSection(Section):
    """An exponential moving average of the adapter weights (fp32), saved as a second file."""

    decay: float = Field(0.999, gt=0, lt=1)
    every: int = Field(1, ge=1)  # update every N optimizer steps
    start_step: int = Field(0, ge=0)  # before it, the average just copies the weights
    on_cpu: bool = False  # keep the copy in host memory (one device->host copy per update)


# train.<key> spellings of train.flow.<key>, read for one release with a deprecation line.
FLAT_FLOW_KEYS = tuple(FlowSection.model_fields)


# Which of train.betas / train.eps each named optimizer takes (custom: neither, pass them in
# train.optimizer_args). Adafactor and CAME have tuple eps of another meaning.
OPTIMIZER_TAKES = {
    "adamw": ("betas", "eps"),
    "adamw8bit": ("betas", "eps"),
    "prodigy": ("betas", "eps"),
    "adamw_schedulefree": ("betas", "eps"),
    "lion8bit": ("betas",),
    "adafactor": (),
    "came": (),
    "custom": (),
}


class TrainSection(Section):
    steps: int = Field(ge=1)
    batch_size: int = Field(1, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(1e-4, gt=0)
    optimizer: Literal[
        "adamw",
        "adamw8bit",
        "prodigy",
        "adafactor",
        "came",
        "adamw_schedulefree",
        "lion8bit",
        "custom",
    ] = "adamw"
    optimizer_class: str | None = None  # module.Class, with optimizer=custom
    optimizer_args: dict = Field(default_factory=dict)  # extra keyword arguments, any optimizer
    weight_decay: float = Field(1e-2, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    lr_scheduler: Literal[
        "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"
    ] = "constant"
    warmup_steps: int = Field(0, ge=0)
    seed: int = 0
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_checkpointing: bool = False
    offload_blocks: int = Field(0, ge=0)  # block swap: the first N blocks' weights in host RAM
    max_grad_norm: float | None = Field(1.0, gt=0)
    noise_offset: float = Field(0.0, ge=0)
    min_snr_gamma: float | None = Field(None, gt=0)
    loss: Literal["mse", "huber", "smooth_l1", "l1"] = "mse"
    huber_c: float = Field(0.1, gt=0)
    huber_schedule: Literal["constant", "exponential", "snr"] = "snr"
    lr_pattern: dict[str, float] = Field(default_factory=dict)  # denoiser module regex -> lr x
    flow: FlowSection = Field(default_factory=FlowSection)
    guidance: float = 1.0  # the value a guidance-distilled denoiser (Flux dev) embeds
    max_sequence_length: int | None = Field(None, ge=1)  # T5 tokens (sd3, flux)
    resume: str | None = None
    nan_patience: int = Field(20, ge=1)
    compile: bool = False
    ema: EmaSection | None = None
    validate_every: int = Field(0, ge=0)  # steps between validation losses (data.validation)
    fused_adamw: bool | None = None  # None: fused where torch has the kernel (CUDA, CPU)
    channels_last: bool = False
    sdpa_backend: Literal["auto", "flash", "efficient", "math", "cudnn"] = "auto"

    @field_validator("lr_pattern")
    @classmethod
    def _lr_multipliers(cls, value: dict) -> dict:
        for key, factor in value.items():
            check_regex(key, "train.lr_pattern")
            if factor < 0:
                raise ValueError(f"train.lr_pattern: {key!r}: multiplier {factor} must be >= 0")
        return value

    @model_validator(mode="after")
    def _options_apply(self) -> TrainSection:
        """Settings the chosen optimizer or loss cannot use are refused, never ignored."""
        if self.optimizer == "prodigy" and "lr" not in self.model_fields_set:
            self.__dict__["lr"] = 1.0  # Prodigy's lr is a multiplier on its own estimate
        if self.optimizer == "custom" and not self.optimizer_class:
            raise ValueError(
                "optimizer: custom needs train.optimizer_class (module.Class, e.g. torch.optim.SGD)"
            )
        if self.optimizer != "custom" and self.optimizer_class:
            raise ValueError(
                f"optimizer_class: only read with train.optimizer=custom (it is "
                f"{self.optimizer}); set train.optimizer=custom or remove optimizer_class"
            )
        if self.optimizer == "adamw_schedulefree" and self.lr_scheduler != "constant":
            raise ValueError(
                f"lr_scheduler: adamw_schedulefree needs lr_scheduler=constant (it is "
                f"{self.lr_scheduler}); its schedule is built in, warmup via train.warmup_steps"
            )
        takes = OPTIMIZER_TAKES.get(self.optimizer, ("betas", "eps"))
        for key in ("betas", "eps"):
            if key not in takes and self.changed(key):
                raise ValueError(
                    f"{key}: {self.optimizer} has no such setting; remove train.{key} "
                    "(or pass the optimizer's own argument in train.optimizer_args)"
                )
        if self.loss not in ("huber", "smooth_l1"):
            for key in ("huber_c", "huber_schedule"):
                if self.changed(key):
                    raise ValueError(
                        f"{key}: only read with train.loss=huber or smooth_l1 (it is "
                        f"{self.loss}); remove train.{key}"
                    )
        return self

    @model_validator(mode="before")
    @classmethod
    def _flat_flow_keys(cls, raw):
        """Old recipes wrote the flow keys flat in train; move them, with a line saying how."""
        if not isinstance(raw, dict) or not any(key in raw for key in FLAT_FLOW_KEYS):
            return raw
        raw = dict(raw)
        flow = raw.get("flow")
        flow = dict(flow) if isinstance(flow, dict) else {}
        for key in [k for k in FLAT_FLOW_KEYS if k in raw]:
            if key in flow:
                raise ValueError(
                    f"{key} is set both flat and under train.flow; keep train.flow.{key}"
                )
            flow[key] = raw.pop(key)
            logging.getLogger("tuner").warning(
                "train.%s is deprecated and will be removed in the next release; "
                "write it as train.flow.%s",
                key,
                key,
            )
        raw["flow"] = flow
        return raw
