"""The base of every recipe section: unknown keys forbidden, so a typo is an error rather than a
silently ignored setting."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    # inf/nan are never a meaningful setting (train.lr=inf trains nothing but NaNs).
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    def changed(self, key: str) -> bool:
        """Whether `key` differs from its default. Not model_fields_set: a recipe dumped to
        YAML (the run folder's recipe.yaml) sets every key."""
        return getattr(self, key) != type(self).model_fields[key].default


def check_regex(pattern: str, where: str) -> None:
    import re

    try:
        re.compile(pattern)
    except re.error as exc:
        raise ValueError(
            f"{pattern!r} is not a valid regex ({exc}); {where} keys are regexes"
        ) from exc
