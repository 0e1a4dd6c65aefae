import pytest

from tuner.data.sampler import BucketBatchSampler

# 23 items over 3 buckets of uneven size: 10, 8 and 5.
BUCKETS = [(512, 512)] * 10 + [(384, 640)] * 8 + [(640, 384)] * 5
BUCKETS = [BUCKETS[(i * 7) % 23] for i in range(23)]  # interleave bucket membership


def make(**kw):
    kw = {"batch_size": 4, "seed": 123, **kw}
    return BucketBatchSampler(BUCKETS, **kw)


def test_batches_single_bucket_and_cover_every_index_once():
    sampler = make()
    batches = list(sampler)
    assert len(batches) == len(sampler) == 3 + 2 + 2
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(23))
    for b in batches:
        assert len({BUCKETS[i] for i in b}) == 1
        assert 1 <= len(b) <= 4


def test_drop_last_drops_partial_batches():
    sampler = make(drop_last=True)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 2 + 2 + 1
    assert all(len(b) == 4 for b in batches)


def test_deterministic_per_seed_and_varies_by_epoch_and_seed():
    a, b = make(), make()
    assert a.batches_for_epoch(0) == b.batches_for_epoch(0)
    assert list(a) == list(b)
    assert make().batches_for_epoch(0) != make().batches_for_epoch(1)
    assert make().batches_for_epoch(0) != make(seed=124).batches_for_epoch(0)


def test_full_pass_advances_epoch_and_set_epoch():
    sampler = make()
    first = list(sampler)
    assert sampler.state_dict() == {"epoch": 1, "position": 0}
    second = list(sampler)
    assert first != second and second == make().batches_for_epoch(1)
    sampler.set_epoch(0)
    assert list(sampler) == first


def test_unshuffled_order_is_stable():
    sampler = make(shuffle=False)
    assert list(sampler) == make(shuffle=False).batches_for_epoch(5)


def test_resume_equals_uninterrupted():
    reference = make()
    expected = list(reference) + list(reference)

    run = make()
    got = []
    for batch in run:
        got.append(batch)
        if len(got) == 3:
            break
    state = run.state_dict()
    assert state == {"epoch": 0, "position": 3}

    resumed = make()
    resumed.load_state_dict(state)
    resumed.set_epoch(0)  # a trainer re-announcing the same epoch must not reset
    got += list(resumed)
    got += list(resumed)
    assert got == expected


def test_distributed_shards_are_disjoint_and_equal_length():
    full = make().batches_for_epoch(2)  # 7 batches -> 6 usable on 2 ranks
    ranks = [make(num_replicas=2, rank=r) for r in range(2)]
    shards = [s.batches_for_epoch(2) for s in ranks]
    assert len(shards[0]) == len(shards[1]) == len(ranks[0]) == 3
    assert shards[0] == full[0:6:2] and shards[1] == full[1:6:2]
    seen = [i for shard in shards for b in shard for i in b]
    assert len(seen) == len(set(seen))


def test_invalid_arguments():
    with pytest.raises(ValueError):
        make(batch_size=0)
    with pytest.raises(ValueError):
        make(num_replicas=2, rank=2)
