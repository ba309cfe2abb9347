"""The infinite sharded sampler: permutations, rank shards, exact resume (also with workers)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from gpfm_train.data.sampler import InfiniteShardedSampler, pass_permutation, stream_indices
from napari_gpfm.errors import ConfigError, ParameterError


def take(sampler, n):
    return list(itertools.islice(iter(sampler), n))


@pytest.mark.parametrize("size", [1, 2, 3, 7, 64, 1000, 4097])
def test_each_pass_is_a_permutation(size):
    for p in range(3):
        perm = pass_permutation(size, seed=11, pass_index=p)(np.arange(size))
        assert sorted(perm.tolist()) == list(range(size))


def test_passes_and_seeds_shuffle_differently():
    a = pass_permutation(500, 1, 0)(np.arange(500))
    b = pass_permutation(500, 1, 1)(np.arange(500))
    c = pass_permutation(500, 2, 0)(np.arange(500))
    assert not np.array_equal(a, b) and not np.array_equal(a, c)
    assert not np.array_equal(a, np.arange(500))
    # No visible order left: position and value are uncorrelated.
    assert abs(np.corrcoef(np.arange(500), a)[0, 1]) < 0.15


def test_single_rank_stream_covers_every_index_once_per_pass():
    size = 37
    got = take(InfiniteShardedSampler(size, seed=5), 3 * size)
    for p in range(3):
        assert sorted(got[p * size : (p + 1) * size]) == list(range(size))
    assert got[:size] != got[size : 2 * size]


def test_ranks_are_disjoint_and_together_cover_the_stream():
    size, world, per_rank = 50, 3, 40
    shards = [
        take(
            InfiniteShardedSampler(size, seed=9, rank=r, world_size=world, with_positions=True),
            per_rank,
        )
        for r in range(world)
    ]
    positions = [p for shard in shards for _, p in shard]
    assert len(set(positions)) == len(positions) == world * per_rank
    assert sorted(positions) == list(range(world * per_rank))
    reference = stream_indices(size, 9, np.arange(world * per_rank))
    for shard in shards:
        for index, position in shard:
            assert index == reference[position]
    # The first pass (positions 0..49) is split over the ranks without repeats.
    first_pass = [i for shard in shards for i, p in shard if p < size]
    assert sorted(first_pass) == list(range(size))


def test_resume_continues_exactly_where_the_run_stopped():
    size, k, m = 23, 31, 40
    uninterrupted = take(InfiniteShardedSampler(size, seed=3, rank=1, world_size=2), k + m)
    run = InfiniteShardedSampler(size, seed=3, rank=1, world_size=2)
    take(run, k + 5)  # pre-fetched beyond what was trained on
    state = run.state_dict(samples_consumed=k)
    resumed = InfiniteShardedSampler(size, seed=3, rank=1, world_size=2)
    resumed.load_state_dict(state)
    assert take(resumed, m) == uninterrupted[k:]
    # Resuming twice in a row composes.
    again = InfiniteShardedSampler(size, seed=3, rank=1, world_size=2)
    again.load_state_dict(resumed.state_dict(samples_consumed=10))
    assert take(again, 5) == uninterrupted[k + 10 : k + 15]


def test_resume_with_another_number_of_ranks_uses_the_remaining_stream():
    size, k = 40, 12
    ranks = [InfiniteShardedSampler(size, seed=4, rank=r, world_size=2) for r in range(2)]
    for s in ranks:
        take(s, k)
    state = ranks[0].state_dict(samples_consumed=k)
    assert state == ranks[1].state_dict(samples_consumed=k)
    single = InfiniteShardedSampler(size, seed=4)
    single.load_state_dict(state)
    expected = stream_indices(size, 4, np.arange(2 * k, 2 * k + 30)).tolist()
    assert take(single, 30) == expected


def test_unshuffled_stream_and_iteration_continues():
    s = InfiniteShardedSampler(5, shuffle=False, rank=1, world_size=2)
    assert take(s, 6) == [1, 3, 0, 2, 4, 1]
    # A second iter() (a new "epoch") continues instead of restarting.
    assert take(s, 2) == [3, 0]


def test_state_checks():
    s = InfiniteShardedSampler(10, seed=1)
    with pytest.raises(ConfigError, match="size=10, seed=1"):
        InfiniteShardedSampler(11, seed=1).load_state_dict(s.state_dict())
    with pytest.raises(ConfigError, match="missing"):
        s.load_state_dict({"size": 10})
    with pytest.raises(ParameterError, match="empty"):
        InfiniteShardedSampler(0)
    with pytest.raises(ParameterError, match="rank=2"):
        InfiniteShardedSampler(5, rank=2, world_size=2)


class _Echo:
    """A dataset whose samples are their keys (to see what the loader was asked for)."""

    def __len__(self):
        return 17

    def __getitem__(self, key):
        return np.asarray(key, dtype=np.int64)


def test_resume_through_a_dataloader_with_workers():
    torch = pytest.importorskip("torch")
    batch, steps, more = 4, 3, 3

    def loader(sampler):
        return torch.utils.data.DataLoader(
            _Echo(), batch_size=batch, sampler=sampler, num_workers=2, prefetch_factor=2
        )

    full = InfiniteShardedSampler(17, seed=8, rank=0, world_size=2, with_positions=True)
    it = iter(loader(full))
    uninterrupted = [next(it).tolist() for _ in range(steps + more)]
    del it

    first = InfiniteShardedSampler(17, seed=8, rank=0, world_size=2, with_positions=True)
    it = iter(loader(first))
    assert [next(it).tolist() for _ in range(steps)] == uninterrupted[:steps]
    assert first._yielded > steps * batch  # the workers fetched ahead
    state = first.state_dict(samples_consumed=steps * batch)
    del it

    second = InfiniteShardedSampler(17, seed=8, rank=0, world_size=2, with_positions=True)
    second.load_state_dict(state)
    it = iter(loader(second))
    assert [next(it).tolist() for _ in range(more)] == uninterrupted[steps:]
