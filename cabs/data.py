"""A variable-size batch sampler: every example exactly once per epoch, resumable.

CABS changes the batch size at every step, so the usual samplers (a fixed batch
size, the last short batch dropped or padded) do not fit. :class:`BatchSampler`
treats the shuffled epochs as one continuous stream of indices and cuts the next
``batch_size`` indices off it at each step: a batch may span an epoch boundary
(its tail comes from the next epoch's permutation), and no example is dropped
or repeated within an epoch whatever the sequence of batch sizes.
:class:`DistributedBatchSampler` draws the same global batches on every worker of a
data-parallel job and keeps each worker's share of them.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

__all__ = ["BatchSampler", "BatchSizeSource", "DistributedBatchSampler", "shard_bounds"]

BatchSizeSource = int | Callable[[], int] | Any
"""An int, a callable returning the next batch size, or an object with a ``batch_size`` int attribute."""

_STATE_KEYS = ("seed", "num_examples", "shuffle", "epoch", "position", "examples_seen")
_CONFIG_KEYS = ("num_examples", "seed", "shuffle")


def _check_count(name: str, value: Any, *, minimum: int, fix: str) -> int:
    """Return ``value`` as an int >= ``minimum``; bools and non-integers are refused."""
    if isinstance(value, bool):
        raise TypeError(f"`{name}` must be an int >= {minimum}, got {name}={value!r}. {fix}")
    try:
        number = operator.index(value)
    except TypeError:
        raise TypeError(
            f"`{name}` must be an int >= {minimum}, got {name}={value!r} ({type(value).__name__}). {fix}"
        ) from None
    if number < minimum:
        raise ValueError(f"`{name}` must be an int >= {minimum}, got {name}={number}. {fix}")
    return number


class BatchSampler:
    """Yields batches of example indices whose size may change at every step.

    The batch size is read when each batch is drawn, from ``batch_size``:

    * an ``int``: a fixed size;
    * an object with a ``batch_size`` attribute, such as a :class:`cabs.Controller`:
      the attribute is read at every step, so the sampler follows the controller;
    * a callable with no arguments returning the size of the next batch.

    Each epoch visits the examples in a permutation derived from ``(seed, epoch)``
    only (a NumPy ``Generator`` seeded with both), so the order does not depend on
    the batch sizes and a restored sampler reproduces it. The epochs form one
    stream of indices; each batch is the next ``batch_size`` indices of that
    stream, so every example is used exactly once per epoch: a batch may end in the
    next epoch, and a batch larger than the data set spans several epochs.

    The sampler is its own iterator: iterating continues from the current position
    (also after :meth:`load_state_dict`), and ``for batch in sampler`` runs forever
    when ``epochs`` is None. With ``epochs`` set it stops after the last example
    of the last epoch; the final batch may be shorter than the batch size.

    Use it with PyTorch as ``DataLoader(dataset, batch_sampler=sampler)``. Keep
    ``num_workers=0`` there: worker processes fetch batches ahead of the training
    step, so the batch sizes would follow the controller with a lag and
    :meth:`state_dict` would count the batches fetched ahead as used.

    Args:
        num_examples: the size of the data set (>= 1).
        batch_size: an int, a callable, or an object with a ``batch_size`` attribute.
        seed: a non-negative int that fixes the permutations.
        shuffle: when False each epoch visits ``0, 1, ..., num_examples - 1`` in order.
        epochs: how many epochs to yield; ``None`` (default) never stops.

    Attributes:
        epoch: the epoch of the next index to be drawn (0-based).
        position: how many indices of the current epoch are drawn already.
        examples_seen: all indices drawn so far, ``epoch * num_examples + position``.

    Example:
        >>> sampler = BatchSampler(5, batch_size=3, seed=0, epochs=2)
        >>> [len(batch) for batch in sampler]
        [3, 3, 3, 1]
        >>> sampler.examples_seen, sampler.epoch, sampler.position
        (10, 2, 0)
    """

    def __init__(
        self,
        num_examples: int,
        batch_size: BatchSizeSource,
        *,
        seed: int = 0,
        shuffle: bool = True,
        epochs: int | None = None,
    ) -> None:
        self._num_examples = _check_count(
            "num_examples", num_examples, minimum=1, fix="Pass the number of examples in the data set."
        )
        self._seed = _check_count("seed", seed, minimum=0, fix="Pass a non-negative int seed.")
        if not isinstance(shuffle, (bool, np.bool_)):
            raise TypeError(f"`shuffle` must be True or False, got shuffle={shuffle!r}.")
        self._shuffle = bool(shuffle)
        self._epochs = (
            None
            if epochs is None
            else _check_count("epochs", epochs, minimum=1, fix="Pass epochs=None to iterate without end.")
        )
        self._batch_size_source = self._check_batch_size_source(batch_size)
        self._epoch = 0
        self._position = 0
        # The current and next epoch's permutations: a batch spans at most two
        # epochs unless it is larger than the data set.
        self._permutations: dict[int, np.ndarray] = {}

    @staticmethod
    def _check_batch_size_source(batch_size: BatchSizeSource) -> BatchSizeSource:
        if hasattr(batch_size, "batch_size") or (callable(batch_size) and not isinstance(batch_size, type)):
            return batch_size
        return _check_count(
            "batch_size",
            batch_size,
            minimum=1,
            fix="Pass an int, a callable returning the next batch size, or a cabs.Controller.",
        )

    # Read-only configuration and position.

    @property
    def num_examples(self) -> int:
        """The size of the data set."""
        return self._num_examples

    @property
    def seed(self) -> int:
        """The seed of the permutations."""
        return self._seed

    @property
    def shuffle(self) -> bool:
        """Whether each epoch is shuffled."""
        return self._shuffle

    @property
    def epochs(self) -> int | None:
        """How many epochs the sampler yields (None: without end)."""
        return self._epochs

    @property
    def epoch(self) -> int:
        """The epoch of the next index to be drawn (0-based)."""
        return self._epoch

    @property
    def position(self) -> int:
        """How many indices of the current epoch have been drawn."""
        return self._position

    @property
    def examples_seen(self) -> int:
        """How many indices have been drawn in all epochs together."""
        return self._epoch * self._num_examples + self._position

    @property
    def exhausted(self) -> bool:
        """True when ``epochs`` is set and all of them have been drawn."""
        return self._epochs is not None and self._epoch >= self._epochs

    # Drawing.

    def permutation(self, epoch: int) -> np.ndarray:
        """The order in which ``epoch`` visits the examples (int64 array)."""
        if epoch not in self._permutations:
            if self._shuffle:
                order = np.random.default_rng([self._seed, epoch]).permutation(self._num_examples)
            else:
                order = np.arange(self._num_examples)
            self._permutations = {
                kept: value for kept, value in self._permutations.items() if kept in (epoch - 1, epoch)
            }
            self._permutations[epoch] = order.astype(np.int64, copy=False)
        return self._permutations[epoch]

    def next_batch_size(self) -> int:
        """Read the size of the next batch from the source and check it."""
        source = self._batch_size_source
        if isinstance(source, int):
            return source
        if hasattr(source, "batch_size"):
            value, name = source.batch_size, f"{type(source).__name__}.batch_size"
        else:
            value, name = source(), f"the batch_size callable {getattr(source, '__name__', repr(source))}"
        if isinstance(value, bool):
            raise TypeError(f"{name} must give an int >= 1, got {value!r}.")
        try:
            number = operator.index(value)
        except TypeError:
            raise TypeError(
                f"{name} must give an int >= 1, got {value!r} ({type(value).__name__}). Return a Python int."
            ) from None
        if number < 1:
            raise ValueError(f"{name} must give an int >= 1, got batch_size={number}. Every batch needs an example.")
        return number

    def draw(self, count: int) -> np.ndarray:
        """Take the next ``count`` indices of the stream and advance the position.

        This is the one place that generates global indices: a distributed
        sampler draws the global batch here and keeps its worker's share.
        Fewer than ``count`` indices come back only at the end of the last epoch.

        Returns:
            An int64 array of example indices.
        """
        count = _check_count("count", count, minimum=0, fix="Pass the number of indices to draw.")
        if self._epochs is not None:
            count = min(count, self._epochs * self._num_examples - self.examples_seen)
        pieces = []
        while count > 0:
            order = self.permutation(self._epoch)
            taken = min(count, self._num_examples - self._position)
            pieces.append(order[self._position : self._position + taken])
            self._position += taken
            count -= taken
            if self._position == self._num_examples:
                self._epoch += 1
                self._position = 0
        return np.concatenate(pieces) if pieces else np.empty(0, dtype=np.int64)

    def __iter__(self) -> Iterator[list[int]]:
        return self

    def __next__(self) -> list[int]:
        if self.exhausted:
            raise StopIteration
        return self.draw(self.next_batch_size()).tolist()

    # Saving and restoring.

    def state_dict(self) -> dict[str, Any]:
        """The configuration and position as a JSON-able dict of plain values."""
        return {
            "seed": self._seed,
            "num_examples": self._num_examples,
            "shuffle": self._shuffle,
            "epoch": self._epoch,
            "position": self._position,
            "examples_seen": self.examples_seen,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue from a saved position; the next batches repeat the saved run's.

        Raises:
            ValueError: if ``state_dict`` is not a sampler state or comes from a
                sampler with another ``num_examples``, ``seed`` or ``shuffle``.
        """
        if not isinstance(state_dict, dict) or not set(_STATE_KEYS) <= set(state_dict):
            found = sorted(state_dict) if isinstance(state_dict, dict) else type(state_dict).__name__
            raise ValueError(
                f"`state_dict` must be a dict from BatchSampler.state_dict() with keys {list(_STATE_KEYS)}, got {found}."
            )
        here = {"num_examples": self._num_examples, "seed": self._seed, "shuffle": self._shuffle}
        differ = [key for key in _CONFIG_KEYS if state_dict[key] != here[key]]
        if differ:
            text = ", ".join(f"{key}: saved {state_dict[key]!r}, here {here[key]!r}" for key in differ)
            raise ValueError(
                f"the saved sampler has a different configuration ({text}). Create the BatchSampler with the saved options."
            )
        epoch = _check_count("state_dict['epoch']", state_dict["epoch"], minimum=0, fix="The state is damaged.")
        position = _check_count(
            "state_dict['position']", state_dict["position"], minimum=0, fix="The state is damaged."
        )
        seen = state_dict["examples_seen"]
        if position >= self._num_examples or seen != epoch * self._num_examples + position:
            raise ValueError(
                f"the saved sampler position is inconsistent: epoch={epoch}, position={position}, "
                f"examples_seen={seen!r} with num_examples={self._num_examples} "
                f"(expected 0 <= position < num_examples and examples_seen = epoch * num_examples + position). "
                f"The state is damaged."
            )
        self._epoch = epoch
        self._position = position

    def __repr__(self) -> str:
        return (
            f"BatchSampler(num_examples={self._num_examples}, seed={self._seed}, shuffle={self._shuffle}, "
            f"epochs={self._epochs}, epoch={self._epoch}, position={self._position})"
        )


def shard_bounds(global_batch_size: int, rank: int, world_size: int) -> tuple[int, int]:
    """Where worker ``rank`` of ``world_size`` cuts its share out of a global batch.

    The shares are contiguous and in rank order, so concatenating them gives the
    global batch; their sizes differ by at most one (the first
    ``global_batch_size % world_size`` workers take one more), and a worker's share
    is empty when the global batch is smaller than the number of workers.

    Returns:
        ``(start, stop)`` such that the worker's share is ``batch[start:stop]``.

    Example:
        >>> [shard_bounds(7, rank, 3) for rank in range(3)]
        [(0, 3), (3, 5), (5, 7)]
    """
    base, extra = divmod(global_batch_size, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


class DistributedBatchSampler(BatchSampler):
    """The batches of :class:`BatchSampler`, each split across data-parallel workers.

    Every worker creates the sampler with the same ``num_examples``, ``seed``,
    ``shuffle`` and ``epochs`` and its own ``rank``, and reads the batch size from
    its own controller; the controllers agree because they are fed the same
    all-reduced statistics (check it with ``agree_batch_size`` of the distributed
    backend while debugging). Each worker then draws the same global batch, the
    next ``batch_size`` indices of the shared stream of shuffled epochs, and keeps
    its contiguous share (:func:`shard_bounds`): sizes differ by at most one, and a
    worker gets an empty list when the global batch is smaller than the number of
    workers. Concatenated in rank order the shares are exactly the batch a
    single-process :class:`BatchSampler` with the same seed yields, so every
    example is used exactly once per epoch by all workers together.

    The state is global: :meth:`state_dict` is the same on every rank and the same
    as the single-process sampler's (save it from rank 0 only). Loading it
    *reshards*: a state saved with any number of workers, or by a
    :class:`BatchSampler`, continues the same global batches split across the
    workers of the new job, because rank and world size only decide the split.

    Args:
        num_examples: the size of the data set (>= 1).
        batch_size: the *global* batch size: an int, a callable, or an object with a
            ``batch_size`` attribute such as a :class:`cabs.Controller`.
        rank: this worker's index, ``0 <= rank < world_size`` (``torch.distributed.get_rank()``).
        world_size: the number of workers (``torch.distributed.get_world_size()``).
        seed: a non-negative int that fixes the permutations; the same on every worker.
        shuffle: when False each epoch visits ``0, 1, ..., num_examples - 1`` in order.
        epochs: how many epochs to yield; ``None`` (default) never stops.

    Example:
        >>> shares = [DistributedBatchSampler(10, 5, rank=rank, world_size=2, shuffle=False) for rank in (0, 1)]
        >>> [next(sampler) for sampler in shares]
        [[0, 1, 2], [3, 4]]
    """

    def __init__(
        self,
        num_examples: int,
        batch_size: BatchSizeSource,
        *,
        rank: int,
        world_size: int,
        seed: int = 0,
        shuffle: bool = True,
        epochs: int | None = None,
    ) -> None:
        super().__init__(num_examples, batch_size, seed=seed, shuffle=shuffle, epochs=epochs)
        self._world_size = _check_count(
            "world_size", world_size, minimum=1, fix="Pass the number of data-parallel workers."
        )
        self._rank = _check_count("rank", rank, minimum=0, fix="Pass this worker's rank.")
        if self._rank >= self._world_size:
            raise ValueError(
                f"`rank` must be smaller than world_size={self._world_size}, got rank={self._rank}. "
                f"Pass torch.distributed.get_rank() and get_world_size() (or the launcher's RANK and WORLD_SIZE)."
            )
        self.last_global_batch_size = 0
        """The size of the global batch the last draw was cut from (0 before the first)."""

    @property
    def rank(self) -> int:
        """This worker's index."""
        return self._rank

    @property
    def world_size(self) -> int:
        """The number of workers."""
        return self._world_size

    def __next__(self) -> list[int]:
        if self.exhausted:
            raise StopIteration
        global_batch = self.draw(self.next_batch_size())
        self.last_global_batch_size = len(global_batch)
        start, stop = shard_bounds(len(global_batch), self._rank, self._world_size)
        return global_batch[start:stop].tolist()

    def __repr__(self) -> str:
        return (
            f"DistributedBatchSampler(num_examples={self._num_examples}, rank={self._rank}, "
            f"world_size={self._world_size}, seed={self._seed}, shuffle={self._shuffle}, "
            f"epochs={self._epochs}, epoch={self._epoch}, position={self._position})"
        )
