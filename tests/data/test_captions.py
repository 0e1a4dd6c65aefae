import random

from tuner.data.captions import process_caption, tag_frequency

CAPTION = "sks dog, on grass, sunny, red collar, photo"


def test_dropout_one_gives_empty_and_zero_keeps():
    rng = random.Random(0)
    for _ in range(20):
        assert process_caption(CAPTION, prefix="sks", dropout=1.0, rng=rng) == ""
        assert process_caption(CAPTION, dropout=0.0, rng=rng) == CAPTION


def test_dropout_rate_is_roughly_respected():
    rng = random.Random(1)
    empties = sum(process_caption("a, b", dropout=0.3, rng=rng) == "" for _ in range(2000))
    assert 500 < empties < 700


def test_shuffle_is_permutation_and_keeps_leading_tokens():
    tags = [t.strip() for t in CAPTION.split(",")]
    rng = random.Random(3)
    seen = set()
    for _ in range(50):
        out = process_caption(CAPTION, shuffle_tags=True, keep_tokens=2, rng=rng)
        parts = out.split(", ")
        assert parts[:2] == tags[:2]
        assert sorted(parts) == sorted(tags)
        seen.add(out)
    assert len(seen) > 1  # it actually shuffles


def test_shuffle_is_seeded():
    a = [process_caption(CAPTION, shuffle_tags=True, rng=random.Random(7)) for _ in range(3)]
    assert len(set(a)) == 1


def test_prefix_suffix_joining():
    rng = random.Random(0)
    assert process_caption("a dog", prefix="sks", rng=rng) == "sks, a dog"
    assert process_caption("a dog", suffix="hq", rng=rng) == "a dog, hq"
    assert process_caption("a dog", prefix="sks", suffix="hq", rng=rng) == "sks, a dog, hq"
    assert process_caption("", prefix="sks", rng=rng) == "sks"
    assert process_caption("", suffix="hq", rng=rng) == "hq"
    assert process_caption("", rng=rng) == ""


def test_no_stray_commas_or_double_spaces():
    rng = random.Random(0)
    out = process_caption(
        " a,  b ,,c, ", prefix="sks, ", suffix=" ,hq", shuffle_tags=True, keep_tokens=3, rng=rng
    )
    assert out == "sks, a, b, c, hq"
    out = process_caption("a  dog\n on grass,", prefix="sks", rng=rng)
    assert out == "sks, a dog on grass"
    assert "  " not in out and not out.endswith(",")


def test_tag_frequency():
    freq = tag_frequency(["a, b, c", "b, c", "c", "", " c ,d"])
    assert freq == {"c": 4, "b": 2, "a": 1, "d": 1}
    assert next(iter(freq)) == "c"
