from tuner.toy import judge


def test_committed_judge_reads_fresh_images():
    # The weights are committed; a missing file is a failure, not a skip.
    assert judge.DEFAULT_WEIGHTS.exists(), (
        f"{judge.DEFAULT_WEIGHTS} missing: python -m tuner.toy.judge train"
    )
    assert judge.DEFAULT_WEIGHTS.stat().st_size < 2_000_000
    accuracy = judge.evaluate(judge.load_judge(), n=200, seed=judge.EVAL_SEED + 1)
    for head, acc in accuracy.items():
        assert acc >= 0.98, f"{head}: {acc:.1%}"


def test_predict_returns_one_label_per_head():
    from tuner.toy import world

    images = [image for image, _ in world.generate(0, 3)]
    predictions = judge.load_judge().predict(images)
    assert len(predictions) == 3
    for p in predictions:
        assert set(p) == set(judge.HEADS)
        assert all(p[h] in judge.HEADS[h] for h in judge.HEADS)
