from tuner.toy import world
from tuner.toy.tokenizer import BOS, EOS, build_tokenizer


def test_world_words_are_single_tokens():
    tokenizer = build_tokenizer()
    for word in world.VOCABULARY:
        ids = tokenizer(word, add_special_tokens=False).input_ids
        assert len(ids) == 1, (word, ids)


def test_caption_round_trips():
    tokenizer = build_tokenizer()
    text = "an orange star on a white background, zebrastyle"
    ids = tokenizer(text).input_ids
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert tokens[0] == BOS and tokens[-1] == EOS
    assert tokens[1:-1] == [
        "an",
        "orange",
        "star",
        "on",
        "a</w>",
        "white",
        "background",
        ",</w>",
        "zebrastyle",
    ]
    # Added whole-word tokens decode without their separating spaces; the text is intact.
    decoded = tokenizer.decode(ids, skip_special_tokens=True)
    assert decoded.replace(" ", "") == text.replace(" ", "")


def test_unknown_words_fall_back_to_characters_and_padding_works():
    tokenizer = build_tokenizer()
    ids = tokenizer("a xyzzy circle", add_special_tokens=False).input_ids
    assert tokenizer.convert_ids_to_tokens(ids) == ["a</w>", "x", "y", "z", "z", "y</w>", "circle"]
    batch = tokenizer(
        ["a red circle", ""], padding="max_length", max_length=77, truncation=True
    ).input_ids
    assert all(len(row) == 77 for row in batch)
    assert batch[1][:2] == [tokenizer.bos_token_id, tokenizer.eos_token_id]


def test_build_is_deterministic_and_survives_save(tmp_path):
    from transformers import CLIPTokenizer

    a, b = build_tokenizer(), build_tokenizer()
    assert a.get_vocab() == b.get_vocab() and len(a) == len(b)
    a.save_pretrained(tmp_path)
    loaded = CLIPTokenizer.from_pretrained(tmp_path)
    text = "a ohwx square on a green background, pokastyle"
    assert loaded(text).input_ids == a(text).input_ids
