import pytest

from data.sampler import ViewBatchSampler


def _sampler(n=23, views=2, batch=4, seed=0, **kw):
    landscape = [[i % 3 != 0] * views for i in range(n)]
    return ViewBatchSampler(landscape, batch, seed, **kw)


def test_each_image_once_per_epoch_with_a_valid_view():
    s = _sampler()
    keys = [k for b in s.global_batches(0) for k in b]
    assert sorted(i for i, _ in keys) == list(range(23))  # a permutation: every image exactly once
    assert {v for _, v in keys} == {0, 1}  # both views drawn somewhere (23 draws)
    assert len(s.global_batches(0)) == s.batches_per_epoch() == 6  # ceil(23 / 4)


def test_deterministic_in_seed_and_epoch():
    assert _sampler().global_batches(3) == _sampler().global_batches(3)
    assert _sampler().global_batches(3) != _sampler().global_batches(4)  # reshuffled each epoch
    assert _sampler().global_batches(3) != _sampler(seed=1).global_batches(3)


def test_full_batches_share_orientation():
    s = _sampler(n=40)
    full = [b for b in s.global_batches(0) if len(b) == 4]
    mixed = [b for b in full if len({s.groups[i][v] for i, v in b}) > 1]
    assert len(mixed) <= 1  # only the leftover batch may mix orientations


def test_groups_may_differ_between_views_of_an_image():
    # e.g. canvas grouping with two scales: view 0 and view 1 of an image land in different groups.
    groups = [[("small", i % 2), ("large", i % 2)] for i in range(30)]
    s = ViewBatchSampler(groups, 5, seed=3)
    batches = s.global_batches(0)
    assert sum(len(b) == 5 and len({groups[i][v] for i, v in b}) == 1 for b in batches) >= 3
    assert sorted(i for b in batches for i, _ in b) == list(range(30))


def test_resume_skips_exactly_the_seen_batches():
    s = _sampler()
    s.set_epoch(2)
    everything = list(s)
    s.set_epoch(2, start_batch=4)
    assert list(s) == everything[4:]
    assert len(s) == len(everything) - 4


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_split_the_global_batch(world):
    single = _sampler(batch=2 * world).global_batches(1)
    shards = []
    for rank in range(world):
        s = _sampler(batch=2, rank=rank, world_size=world)
        s.set_epoch(1)
        shards.append(list(s))
    # Batch k of one process with the global batch = concatenation of batch k of every rank.
    for k, global_batch in enumerate(single[:-1]):
        assert [key for shard in shards for key in shard[k]] == global_batch
    assert all(len(b) == 2 for shard in shards for b in shard)  # every rank gets a full share
