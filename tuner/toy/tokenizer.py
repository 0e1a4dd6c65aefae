"""An offline CLIP tokenizer for the toy world (no download, no pretrained vocabulary).

The vocabulary holds every byte-level character (GPT-2's bytes_to_unicode map), each also
with the `</w>` end-of-word suffix, so any text tokenizes (character by character). The
merges file is empty (just its header), so BPE alone can never reach a whole word; the
world's words (world.VOCABULARY) are therefore also registered as single-word added tokens
whose ids are their own vocabulary entries: "a red circle" -> [bos, a, red, circle, eos].
Other words, e.g. a new trigger, still tokenize as characters.
"""

from __future__ import annotations

import json
import os
import tempfile

from tokenizers import AddedToken
from transformers import CLIPTokenizer

from tuner.toy import world

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# Captions are a dozen words; 32 positions leave room for spelled-out new words and cost
# less than CLIP's 77 in every text-encoder and cross-attention call.
MAX_LENGTH = 32


def bytes_to_unicode() -> list[str]:
    """GPT-2's reversible map from the 256 byte values to printable characters."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return [chr(c) for c in chars]


def vocabulary(words=world.VOCABULARY) -> dict[str, int]:
    """Token -> id: characters, characters + '</w>', whole words, then bos/eos."""
    chars = bytes_to_unicode()
    tokens = chars + [c + "</w>" for c in chars]
    seen = set(tokens)
    for word in words:
        if word not in seen:  # one-letter words ("a") already exist as characters
            tokens.append(word)
            seen.add(word)
    tokens += [BOS, EOS]
    return {token: i for i, token in enumerate(tokens)}


def write_tokenizer_files(folder: str | os.PathLike, words=world.VOCABULARY) -> None:
    """vocab.json and an empty merges.txt, as a slow CLIP tokenizer would ship them."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocabulary(words), f, ensure_ascii=False, indent=0)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")


def build_tokenizer(words=world.VOCABULARY) -> CLIPTokenizer:
    """A CLIPTokenizer over the toy vocabulary, built offline and deterministically."""
    with tempfile.TemporaryDirectory() as folder:
        write_tokenizer_files(folder, words)
        tokenizer = CLIPTokenizer.from_pretrained(
            folder,
            model_max_length=MAX_LENGTH,
            bos_token=BOS,
            eos_token=EOS,
            pad_token=EOS,
            unk_token=EOS,
        )
    # Multi-letter words become added tokens; they reuse their vocabulary ids.
    whole = [AddedToken(w, single_word=True, normalized=True) for w in words if len(w) > 1]
    tokenizer.add_tokens(whole)
    return tokenizer
