"""Recipes: the typed schema, YAML loading with overrides, and readable errors."""

from tuner.recipe.load import describe_error, load_recipe, validate_recipe
from tuner.recipe.overrides import apply_overrides
from tuner.recipe.schema import (
    AdapterSection,
    BucketSection,
    DataSection,
    DatasetEntry,
    DreamBoothSection,
    LogSection,
    ModelSection,
    OutputSection,
    Recipe,
    SampleSection,
)
from tuner.recipe.train_section import FlowSection, TrainSection

__all__ = [
    "AdapterSection",
    "BucketSection",
    "DataSection",
    "DatasetEntry",
    "DreamBoothSection",
    "FlowSection",
    "LogSection",
    "ModelSection",
    "OutputSection",
    "Recipe",
    "SampleSection",
    "TrainSection",
    "apply_overrides",
    "describe_error",
    "load_recipe",
    "validate_recipe",
]
