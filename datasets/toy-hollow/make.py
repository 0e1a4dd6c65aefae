"""Writes this folder's paired editing set from the toy world's generator:

    .venv/bin/python datasets/toy-hollow/make.py                 # this folder, 8 pairs
    .venv/bin/python datasets/toy-hollow/make.py 32 datasets/toy-hollow-32   # 32 pairs

controls/NNN.png: a filled shape in one colour on a background; targets/NNN.png: the same shape,
same place and colours, drawn as an outline; targets/NNN.txt: the instruction "make it hollow".
Deterministic: rerunning reproduces the files byte for byte."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np

from tuner.toy import world

SEED, COUNT = 3003, 8
INSTRUCTION = "make it hollow"


def main(count: int = COUNT, root: Path | None = None) -> None:
    """The first `count` pairs of the seed's stream (a larger set starts with this one's)."""
    root = root or Path(__file__).resolve().parent
    rng = np.random.default_rng(SEED)
    for folder in ("controls", "targets"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for index in range(count):
        spec = world.sample_spec(rng, style="solid")
        hollow = dataclasses.replace(spec, style="outline")
        world.render(spec).save(root / "controls" / f"{index:03d}.png", optimize=False)
        world.render(hollow).save(root / "targets" / f"{index:03d}.png", optimize=False)
        (root / "targets" / f"{index:03d}.txt").write_text(INSTRUCTION + "\n", encoding="utf-8")


if __name__ == "__main__":
    main(*(int(sys.argv[1]), Path(sys.argv[2])) if len(sys.argv) > 2 else ())
