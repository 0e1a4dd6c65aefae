"""Recipes: YAML files validated into typed objects, with command-line overrides.

Every section forbids unknown keys, so a typo is an error rather than a silently ignored setting.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from tuner.errors import TunerError
from tuner.overrides import apply_overrides

FAMILY_NAMES = ("sd15", "sd2", "sdxl", "sd3", "flux")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSection(Section):
    path: str
    family: str | None = None
    revision: str | None = None
    variant: str | None = None
    vae_path: str | None = None
    config: str | None = None  # diffusers folder/hub id whose configs a single file uses
    prediction_type: Literal["epsilon", "v_prediction"] | None = None
    quantize: Literal["none", "nf4", "int8"] = "none"
    drop_t5: bool = False  # sd3: leave T5-XXL out (zeros in its place), as diffusers allows
    allow_pickle: bool = False

    @field_validator("family")
    @classmethod
    def _known_family(cls, value: str | None) -> str | None:
        if value is not None and value not in FAMILY_NAMES:
            raise ValueError(f"unknown family {value!r}; expected one of {', '.join(FAMILY_NAMES)}")
        return value


class AdapterSection(Section):
    rank: int = Field(16, ge=1)
    alpha: float | None = Field(None, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    init: Literal["default", "gaussian", "pissa", "olora"] = "default"
    dora: bool = False
    targets: list[str] | None = None
    target_regex: str | None = None
    text_encoder: bool = False
    text_encoder_lr: float | None = Field(None, gt=0)
    text_encoder_stop: float = Field(1.0, gt=0, le=1)

    @property
    def lora_alpha(self) -> float:
        return self.alpha if self.alpha is not None else float(self.rank)


class BucketSection(Section):
    enabled: bool = True
    area: int | None = Field(None, ge=64 * 64)
    step: int = Field(64, ge=8)
    min_side: int = Field(256, ge=8)
    max_side: int = Field(2048, ge=8)
    max_ratio: float = Field(2.0, ge=1.0)
    no_upscale: bool = False


class DatasetEntry(Section):
    path: str
    caption_ext: str = ".txt"
    caption_column: str | None = None
    image_column: str | None = None
    split: str = "train"
    repeats: int = Field(1, ge=1)
    prefix: str = ""
    suffix: str = ""
    default_caption: str = ""
    resolution: int | None = Field(None, ge=8)


class DataSection(Section):
    datasets: list[DatasetEntry] = Field(default_factory=list)
    resolution: int = Field(512, ge=8)
    buckets: bool | BucketSection = False
    crop: Literal["center", "random"] = "center"
    flip: bool = False
    caption_dropout: float = Field(0.0, ge=0, le=1)
    shuffle_tags: bool = False
    keep_tokens: int = Field(0, ge=0)
    cache: bool = True
    cache_dir: str | None = None
    num_workers: int = Field(0, ge=0)

    @field_validator("resolution")
    @classmethod
    def _multiple_of_8(cls, value: int) -> int:
        if value % 8:
            raise ValueError(
                f"resolution {value} is not a multiple of 8; use e.g. {value // 8 * 8}"
            )
        if value > 4096:
            raise ValueError(f"resolution {value} is absurd for these models; use at most 4096")
        return value

    @property
    def bucket_options(self) -> BucketSection | None:
        if isinstance(self.buckets, BucketSection):
            return self.buckets if self.buckets.enabled else None
        return BucketSection() if self.buckets else None


class DreamBoothSection(Section):
    instance_dir: str
    instance_prompt: str
    class_prompt: str | None = None
    class_dir: str | None = None
    num_class_images: int = Field(100, ge=1)
    prior_loss_weight: float = Field(1.0, ge=0)
    with_prior_preservation: bool = True
    class_generation_batch: int = Field(4, ge=1)
    class_generation_steps: int = Field(25, ge=1)

    @model_validator(mode="after")
    def _class_prompt_needed(self) -> DreamBoothSection:
        if self.with_prior_preservation and not self.class_prompt:
            raise ValueError(
                "with_prior_preservation is on but class_prompt is empty; set "
                "dreambooth.class_prompt (e.g. 'a photo of a dog') or turn prior preservation off"
            )
        return self


class TrainSection(Section):
    steps: int = Field(ge=1)
    batch_size: int = Field(1, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(1e-4, gt=0)
    optimizer: Literal["adamw", "adamw8bit"] = "adamw"
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
    max_grad_norm: float | None = Field(1.0, gt=0)
    noise_offset: float = Field(0.0, ge=0)
    min_snr_gamma: float | None = Field(None, gt=0)
    # Flow-matching families (sd3, flux): how sigmas are drawn and weighted.
    timestep_sampling: Literal["uniform", "logit_normal", "mode", "sigmoid"] = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = Field(1.0, gt=0)
    mode_scale: float = 1.29
    shift: float | None = Field(None, gt=0)
    resolution_shift: bool | None = None
    loss_weighting: Literal["none", "sigma_sqrt", "cosmap"] = "none"
    guidance: float = 1.0
    max_sequence_length: int | None = Field(None, ge=1)
    resume: str | None = None
    nan_patience: int = Field(20, ge=1)
    compile: bool = False
    count_flops: bool = False  # count the first step's FLOPs (for `tuner bench` MFU)


class SampleSection(Section):
    prompts: list[str] = Field(default_factory=list)
    seeds: list[int] = Field(default_factory=lambda: [0])
    scales: list[float] = Field(default_factory=lambda: [0.0, 1.0])
    every: int = Field(0, ge=0)
    steps: int = Field(25, ge=1)
    guidance: float = Field(7.5, ge=0)
    negative_prompt: str = ""
    width: int | None = Field(None, ge=8)
    height: int | None = Field(None, ge=8)
    scheduler: Literal["default", "euler", "euler_a", "dpm++2m", "ddim"] = "default"


class OutputSection(Section):
    dir: str
    save_every: int = Field(0, ge=0)
    keep: int = Field(3, ge=1)
    overwrite: bool = False
    formats: list[Literal["diffusers", "kohya"]] = Field(
        default_factory=lambda: ["diffusers", "kohya"]
    )
    name: str | None = None


class LogSection(Section):
    to: list[Literal["tensorboard", "wandb"]] = Field(default_factory=list)
    every: int = Field(10, ge=1)
    project: str = "tuner"
    run_name: str | None = None


class Recipe(Section):
    model: ModelSection
    adapter: AdapterSection = Field(default_factory=AdapterSection)
    data: DataSection = Field(default_factory=DataSection)
    train: TrainSection
    sample: SampleSection = Field(default_factory=SampleSection)
    output: OutputSection
    log: LogSection = Field(default_factory=LogSection)
    dreambooth: DreamBoothSection | None = None
    # Where it came from, so messages can print a command that reproduces or resumes the run.
    _source: str | None = PrivateAttr(default=None)
    _overrides: tuple[str, ...] = PrivateAttr(default=())

    def command(self, *extra: str) -> str:
        """The launch command for this recipe (its file, its overrides, plus `extra`)."""
        import shlex

        parts = [self._source or "RECIPE", *self._overrides, *extra]
        return "./launch.sh " + " ".join(shlex.quote(p) for p in parts)

    @model_validator(mode="after")
    def _has_data(self) -> Recipe:
        if not self.data.datasets and self.dreambooth is None:
            raise ValueError("no training data; add data.datasets (a list) or a dreambooth section")
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# --- loading, overrides, and readable errors ------------------------------------------------


def load_recipe(path: str | Path, overrides: tuple[str, ...] | list[str] = ()) -> Recipe:
    """Read a YAML recipe, apply `key=value` / `~key` overrides, validate, return a Recipe."""
    path = Path(path)
    if not path.is_file():
        raise TunerError(f"{path}: recipe file not found; check the path")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise TunerError(f"{path}: not valid YAML ({_first_line(exc)})") from None
    if not isinstance(raw, dict):
        raise TunerError(
            f"{path}: a recipe must be a mapping of sections, got {type(raw).__name__}"
        )
    raw = apply_overrides(raw, overrides, source=str(path))
    recipe = validate_recipe(raw, source=str(path))
    recipe._source, recipe._overrides = (
        str(path),
        tuple(o for o in overrides if not o.startswith("train.resume=")),
    )
    return recipe


def validate_recipe(raw: dict, source: str = "<recipe>") -> Recipe:
    try:
        return Recipe.model_validate(raw)
    except ValidationError as exc:
        raise TunerError(f"{source}: {describe_error(exc.errors()[0])}") from None


_EXPECTED = {
    "float_type": "a number",
    "float_parsing": "a number",
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "string_type": "a string",
    "list_type": "a list",
    "tuple_type": "a list",
    "model_type": "a mapping",
    "dict_type": "a mapping",
    "model_attributes_type": "a mapping",
}


def describe_error(err: dict) -> str:
    """Turn one pydantic error into `dotted.key: expected X, got Y`."""
    loc = [str(p) for p in err["loc"] if not _is_union_tag(p)]
    dotted = ".".join(loc) or "<top level>"
    kind, value = err["type"], err.get("input")
    if kind == "extra_forbidden":
        return f"{dotted}: unknown key{_did_you_mean(loc)}"
    if kind == "missing":
        return f"{dotted}: required key is missing"
    if kind in _EXPECTED:
        return f"{dotted}: expected {_EXPECTED[kind]}, got {_show(value)}"
    if kind == "literal_error":
        return f"{dotted}: expected one of {err['ctx']['expected']}, got {_show(value)}"
    if kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        op = {
            "greater_than_equal": ">=",
            "greater_than": ">",
            "less_than_equal": "<=",
            "less_than": "<",
        }[kind]
        bound = next(iter(err["ctx"].values()))
        return f"{dotted}: expected a value {op} {bound}, got {_show(value)}"
    if kind == "value_error":
        return f"{dotted}: {str(err['ctx']['error'])}"
    return f"{dotted}: {err['msg']}, got {_show(value)}"


def _is_union_tag(part) -> bool:
    # pydantic adds the union member's type name to the location; users never wrote it.
    return isinstance(part, str) and (part in ("bool", "BucketSection") or "[" in part)


def _show(value) -> str:
    return repr(value) if not isinstance(value, dict) else "a mapping"


def _did_you_mean(loc: list[str]) -> str:
    section_cls = _section_class(loc[:-1])
    if section_cls is None:
        return ""
    close = difflib.get_close_matches(loc[-1], list(section_cls.model_fields), n=1, cutoff=0.6)
    return f"; did you mean {'.'.join(loc[:-1] + close)!r}?" if close else ""


def _section_class(loc: list[str]) -> type[BaseModel] | None:
    cls: type[BaseModel] = Recipe
    for part in loc:
        if part.isdigit():
            continue
        field = cls.model_fields.get(part)
        if field is None:
            return None
        cls = _model_in(field.annotation)
        if cls is None:
            return None
    return cls


def _model_in(annotation) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0]
