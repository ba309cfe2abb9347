"""An infinite, seeded, rank-sharded sampler whose position survives a restart.

The sampler defines one global stream of dataset indices: the concatenation of pass 0, pass 1,
... where pass ``e`` is a pseudo-random permutation of ``range(size)`` keyed by ``(seed, e)``.
Rank ``r`` of ``W`` reads the stream positions ``start + r, start + r + W, start + r + 2W, ...``
(DINOv2's ``SHARDED_INFINITE`` layout), so the ranks draw disjoint samples and, together, every
position of the stream exactly once.

Resuming: all ranks consume samples in lockstep (same batch size, same number of steps), so after
``k`` samples per rank the first ``start + W * k`` positions of the stream are used up.
:meth:`InfiniteShardedSampler.state_dict` stores that global position; loading it makes the next
iteration start exactly where the uninterrupted run would have continued, even with another
number of ranks. (DINOv2 instead reseeds with the start iteration, so a resumed run sees a
different stream.)

The permutation is a keyed Feistel network on ``2h`` bits with cycle walking into
``[0, size)``: a bijection computed in blocks, O(1) memory and random access by position, so
a corpus of hundreds of millions of tiles needs no per-pass index array.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from napari_gpfm.errors import ConfigError, ParameterError

_ROUNDS = 6
_BLOCK = 1024
_U64 = np.uint64


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a fast, well-mixing 64-bit hash (numpy wraps on overflow)."""
    x = x + _U64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> _U64(27))) * _U64(0x94D049BB133111EB)
    return x ^ (x >> _U64(31))


class KeyedPermutation:
    """A pseudo-random bijection of ``range(size)`` determined by ``keys``.

    Args:
        size: the number of elements (at least 1).
        keys: one 64-bit round key per Feistel round.
    """

    def __init__(self, size: int, keys: np.ndarray) -> None:
        if size < 1:
            raise ParameterError(f"permutation size={size} must be at least 1")
        self.size = int(size)
        bits = max(2, int(self.size - 1).bit_length())
        self._half = (bits + 1) // 2
        self._mask = _U64((1 << self._half) - 1)
        self._keys = np.asarray(keys, dtype=np.uint64)

    def _feistel(self, x: np.ndarray) -> np.ndarray:
        shift = _U64(self._half)
        left, right = x >> shift, x & self._mask
        with np.errstate(over="ignore"):
            for key in self._keys:
                left, right = right, left ^ (_mix64(right ^ key) & self._mask)
        return (left << shift) | right

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        """The images of ``positions`` (each in ``[0, size)``) as int64."""
        out = self._feistel(np.asarray(positions, dtype=np.uint64))
        # Cycle walking: the domain 2^(2h) is < 4 * size, so few elements need more than a step.
        outside = out >= _U64(self.size)
        while outside.any():
            out[outside] = self._feistel(out[outside])
            outside = out >= _U64(self.size)
        return out.astype(np.int64)


def pass_permutation(size: int, seed: int, pass_index: int) -> KeyedPermutation:
    """The permutation used for pass ``pass_index`` of the stream of ``(size, seed)``."""
    keys = np.random.SeedSequence([int(seed), int(pass_index)]).generate_state(
        _ROUNDS, dtype=np.uint64
    )
    return KeyedPermutation(size, keys)


def stream_indices(size: int, seed: int, positions: np.ndarray) -> np.ndarray:
    """Dataset indices at global stream ``positions`` (any non-negative ints, any order)."""
    positions = np.asarray(positions, dtype=np.int64)
    out = np.empty(positions.shape, dtype=np.int64)
    passes = positions // size
    for p in np.unique(passes):
        sel = passes == p
        out[sel] = pass_permutation(size, seed, int(p))(positions[sel] % size)
    return out


class InfiniteShardedSampler:
    """Infinite seeded sampler; each rank reads a disjoint shard of one global stream.

    Use one per rank with ``shuffle=True`` (the default) and hand it to a ``DataLoader`` (any
    number of workers: the sampler lives in the main process). ``with_positions=True`` yields
    ``(index, position)`` pairs instead of plain indices, where ``position`` is the global stream
    position; :class:`gpfm_train.data.datasets.MultiCropDataset` seeds each sample's
    augmentation from it, so a resumed run also sees the same crops.

    Args:
        size: number of samples in the dataset.
        seed: stream seed (the same on every rank).
        rank: this process's rank in ``[0, world_size)``.
        world_size: number of ranks.
        shuffle: ``False`` gives the plain stream ``0, 1, ..., size-1, 0, 1, ...``.
        with_positions: yield ``(index, position)`` tuples.
    """

    def __init__(
        self,
        size: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        with_positions: bool = False,
    ) -> None:
        if size < 1:
            raise ParameterError(f"sampler size={size} must be at least 1 (the dataset is empty)")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ParameterError(
                f"rank={rank}, world_size={world_size}: need world_size >= 1 and "
                "0 <= rank < world_size"
            )
        if seed < 0:
            raise ParameterError(f"sampler seed={seed} must be non-negative")
        self.size = int(size)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.shuffle = bool(shuffle)
        self.with_positions = bool(with_positions)
        self._start = 0  # global stream position at which this rank's count starts
        self._yielded = 0  # samples handed out since ``_start``

    # ------------------------------------------------------------------ positions
    def position_of(self, local_count: int) -> int:
        """Global stream position of this rank's ``local_count``-th sample since the start."""
        return self._start + self.rank + self.world_size * int(local_count)

    def indices_at(self, positions: np.ndarray) -> np.ndarray:
        """Dataset indices at global stream ``positions``."""
        positions = np.asarray(positions, dtype=np.int64)
        if not self.shuffle:
            return positions % self.size
        return stream_indices(self.size, self.seed, positions)

    def __iter__(self) -> Iterator[Any]:
        # Continues where the previous iteration stopped (an "epoch" of an infinite stream is
        # only a logging boundary); load_state_dict() repositions it exactly.
        # Blocks of about one pass per rank: a tiny dataset does not map 1024 passes at once.
        block = max(16, min(_BLOCK, self.size // self.world_size))
        while True:
            local = np.arange(self._yielded, self._yielded + block, dtype=np.int64)
            positions = self._start + self.rank + self.world_size * local
            indices = self.indices_at(positions)
            for index, position in zip(indices.tolist(), positions.tolist(), strict=True):
                self._yielded += 1
                yield (index, position) if self.with_positions else index

    # ------------------------------------------------------------------ state
    def state_dict(self, samples_consumed: int | None = None) -> dict[str, int | bool]:
        """The stream position to resume from.

        Args:
            samples_consumed: samples this rank has *trained on* since the start (or the last
                :meth:`load_state_dict`), e.g. ``steps * batch_size_per_rank``. A DataLoader
                with workers pre-fetches ahead of training, so the count of indices already
                yielded overshoots; it is used only when this is ``None``.
        """
        consumed = self._yielded if samples_consumed is None else int(samples_consumed)
        if consumed < 0:
            raise ParameterError(f"samples_consumed={consumed} must be non-negative")
        return {
            "size": self.size,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "position": self._start + self.world_size * consumed,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at ``state["position"]``; the dataset size and seed must match."""
        missing = {"size", "seed", "shuffle", "position"} - set(state)
        if missing:
            raise ConfigError(
                f"sampler state is missing {sorted(missing)}; it is not a sampler state"
            )
        if int(state["size"]) != self.size or int(state["seed"]) != self.seed:
            raise ConfigError(
                f"sampler state was saved for size={state['size']}, seed={state['seed']} but "
                f"this run has size={self.size}, seed={self.seed}; resume with the same "
                "manifest and seed"
            )
        if bool(state["shuffle"]) != self.shuffle:
            raise ConfigError(
                f"sampler state has shuffle={state['shuffle']}, this run shuffle={self.shuffle}"
            )
        position = int(state["position"])
        if position < 0:
            raise ConfigError(f"sampler state position={position} is negative")
        self._start = position
        self._yielded = 0
