"""Recipe files: YAML read, `key=value` / `~key` overrides applied, validated into a Recipe, with
pydantic's errors turned into one line naming the dotted key."""

from __future__ import annotations

import difflib
from pathlib import Path

import yaml
from pydantic import BaseModel, ValidationError

from tuner.errors import TunerError
from tuner.recipe.overrides import apply_overrides
from tuner.recipe.schema import Recipe


def load_recipe(path: str | Path, overrides: tuple[str, ...] | list[str] = ()) -> Recipe:
    """Read a YAML recipe, apply `key=value` / `~key` overrides, validate, return a Recipe."""
    path = Path(path)
    if not path.is_file():
        raise TunerError(f"{path}: recipe file not found; check the path")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise TunerError(
            f"{path}:{line}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x}); save the "
            "recipe as UTF-8"
        ) from None
    try:
        raw = yaml.load(text, Loader=UniqueKeyLoader) or {}
    except yaml.YAMLError as exc:
        raise TunerError(f"{path}: not valid YAML ({_first_line(exc)})") from exc
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


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load, except that a key given twice in one mapping is an error: plain YAML
    lets the second `train:` block silently replace the first."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                first = seen.setdefault(key, key_node.start_mark.line + 1)
            except TypeError:  # an unhashable key: the base class reports it
                continue
            if first != key_node.start_mark.line + 1:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"duplicate key {key!r} at line {key_node.start_mark.line + 1} "
                    f"(first at line {first}); keep one",
                    key_node.start_mark,
                )
        return super().construct_mapping(node, deep=deep)


def validate_recipe(raw: dict, source: str = "<recipe>") -> Recipe:
    try:
        return Recipe.model_validate(raw)
    except ValidationError as exc:
        raise TunerError(f"{source}: {describe_error(exc.errors()[0])}") from exc


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
    "finite_number": "a finite number",
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
