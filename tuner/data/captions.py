"""Per-step caption augmentation (kohya-style): dropout, tag shuffling with pinned
leading tags, and trigger-word prefix/suffix."""

from __future__ import annotations

import functools
import random
from collections import Counter


def split_tags(caption: str) -> list[str]:
    """Comma-separated tags, stripped, empties removed."""
    return [t.strip() for t in caption.split(",") if t.strip()]


def process_caption(
    caption: str,
    *,
    prefix: str = "",
    suffix: str = "",
    shuffle_tags: bool = False,
    keep_tokens: int = 0,
    dropout: float = 0.0,
    rng: random.Random,
) -> str:
    """Return the caption to train on for this step.

    Dropout happens first and returns "" (the unconditional prompt), so the prefix
    is dropped too: the model must also learn the empty prompt for CFG."""
    # Draw even when dropout == 0 so the rng sequence doesn't depend on the setting.
    if rng.random() < dropout:
        return ""

    text = caption or ""
    if shuffle_tags:
        tags = split_tags(text)
        keep = max(0, keep_tokens)
        head, tail = tags[:keep], tags[keep:]
        rng.shuffle(tail)
        text = ", ".join(head + tail)
    return _compose(prefix, text, suffix)


# Pure and called for every sample of every step with the dataset's few captions: memoized,
# since on the CPU a batch is loaded inside the step. _join collapses whitespace and newlines.
@functools.lru_cache(maxsize=1 << 16)
def _compose(prefix: str, text: str, suffix: str) -> str:
    return _join(_join(prefix, text), suffix)


def _join(left: str, right: str) -> str:
    """Join with ", " only when both sides have content; strip stray commas."""
    left = _trim(left)
    right = _trim(right)
    if left and right:
        return f"{left}, {right}"
    return left or right


def _trim(text: str) -> str:
    return " ".join(text.split()).strip(", ")


def tag_frequency(captions: list[str]) -> dict[str, int]:
    """Count each comma-separated tag across captions (most frequent first)."""
    counts: Counter[str] = Counter()
    for caption in captions:
        if caption:
            counts.update(split_tags(caption))
    return dict(counts.most_common())
