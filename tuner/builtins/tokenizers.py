"""Offline tokenizers: a byte-level CLIP tokenizer and a character-level T5 tokenizer.

No tokenizer files can be downloaded here, so the builtin models use a vocabulary of the 256
byte symbols (plain and end-of-word) with no merges: every character is a token. It behaves like
a real CLIP tokenizer (same class, same special tokens, 77 positions) at a tiny vocabulary size.
"""

from __future__ import annotations

import json
import string
import tempfile
from functools import lru_cache
from pathlib import Path

from transformers import CLIPTokenizer, T5TokenizerFast


def _byte_symbols() -> list[str]:
    # The GPT-2/CLIP reversible byte->unicode table: printable bytes map to themselves, the rest
    # are shifted past 255 so that every byte has a visible symbol.
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    symbols, extra = {}, 0
    for b in range(256):
        if b in printable:
            symbols[b] = chr(b)
        else:
            symbols[b] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


def write_tokenizer_files(directory: Path, extra_words: tuple[str, ...] = ()) -> Path:
    """Write vocab.json + merges.txt for a byte-level CLIP tokenizer into directory."""
    directory.mkdir(parents=True, exist_ok=True)
    symbols = _byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + [w + "</w>" for w in extra_words]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    return directory


@lru_cache(maxsize=4)
def offline_clip_tokenizer(pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    with tempfile.TemporaryDirectory() as tmp:
        write_tokenizer_files(Path(tmp))
        # from_pretrained reads vocab.json/merges.txt under transformers 4.x and 5.x alike.
        return CLIPTokenizer.from_pretrained(tmp, model_max_length=77, pad_token=pad_token)


def vocab_size() -> int:
    return len(offline_clip_tokenizer().get_vocab())


@lru_cache(maxsize=1)
def offline_t5_tokenizer() -> T5TokenizerFast:
    """A real T5TokenizerFast (Unigram, `▁` word starts, </s> appended, <pad> = 0) over a tiny
    character vocabulary: no tokenizer file can be downloaded here."""
    specials = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    chars = [c for c in string.printable if not c.isspace()]
    pieces = specials + [(c, -3.0) for c in chars] + [("▁" + c, -2.5) for c in chars]
    return T5TokenizerFast(vocab=pieces, extra_ids=0)
