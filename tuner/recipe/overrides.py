"""Command-line overrides of recipe keys: `section.key=value` (value parsed as YAML; numeric
parts index lists) and `~section.key` (remove)."""

from __future__ import annotations

import copy
from typing import Any

import yaml

from tuner.errors import TunerError


def apply_overrides(raw: dict, overrides, source: str = "<recipe>") -> dict:
    """`a.b=value` sets (value parsed as YAML); `~a.b` removes. Numeric parts index lists."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        if item.startswith("~"):
            parent, last = _walk(raw, item[1:], create=False, item=item)
            _delete(parent, last, item)
            continue
        if "=" not in item:
            raise TunerError(f"override {item!r}: expected section.key=value or ~section.key")
        key, text = item.split("=", 1)
        try:
            value = yaml.safe_load(text) if text != "" else ""
        except yaml.YAMLError:
            value = text
        parent, last = _walk(raw, key, create=True, item=item)
        if isinstance(parent, list):
            parent[int(last)] = value
        else:
            parent[last] = value
    return raw


def _walk(raw: dict, dotted: str, *, create: bool, item: str):
    parts = dotted.split(".")
    if not all(parts):
        raise TunerError(f"override {item!r}: empty key part in {dotted!r}")
    node: Any = raw
    for part in parts[:-1]:
        if isinstance(node, list):
            node = node[_list_index(node, part, item)]
        elif isinstance(node, dict):
            if part not in node or node[part] is None:
                if not create:
                    raise TunerError(f"override {item!r}: {part!r} is not set in the recipe")
                node[part] = {}
            node = node[part]
        else:
            raise TunerError(f"override {item!r}: {part!r} is not a section")
    if isinstance(node, list):
        _list_index(node, parts[-1], item)
    elif not isinstance(node, dict):
        where = ".".join(parts[:-1])
        fix = f"~{where}" if item.startswith("~") else f"{where}=VALUE"
        raise TunerError(f"override {item!r}: {where} is {node!r}, not a section; use {fix}")
    return node, parts[-1]


def _list_index(node: list, part: str, item: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise TunerError(f"override {item!r}: {part!r} is not an index of a {len(node)}-item list")
    return int(part)


def _delete(parent, last: str, item: str) -> None:
    if isinstance(parent, list):
        del parent[int(last)]
    elif last in parent:
        del parent[last]
    else:
        raise TunerError(f"override {item!r}: {last!r} is not set in the recipe")
