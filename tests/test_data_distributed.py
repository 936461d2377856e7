"""The distributed batch sampler: shares of the global batch, coverage per epoch, resume and resharding."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cabs.data import BatchSampler, DistributedBatchSampler, shard_bounds

# Sizes around the data-set size and the world size: smaller than the world (some workers get
# nothing), not divisible by it, and larger than the data set (a batch spans several epochs).
SIZES = (5, 1, 2, 7, 13, 3, 29, 4, 11)


def size_sequence(sizes):
    """A batch-size callable returning ``sizes`` in turn, forever."""
    position = [0]

    def next_size():
        size = sizes[position[0] % len(sizes)]
        position[0] += 1
        return size

    return next_size


def workers(num_examples, sizes, world_size, **options):
    return [
        DistributedBatchSampler(num_examples, size_sequence(sizes), rank=rank, world_size=world_size, **options)
        for rank in range(world_size)
    ]


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_union_of_workers_uses_every_example_exactly_once_per_epoch(world_size):
    num_examples = 23
    samplers = workers(num_examples, SIZES, world_size, seed=3, epochs=3)
    stream = []
    for shares in zip(*samplers, strict=True):
        stream += [index for share in shares for index in share]
    assert len(stream) == 3 * num_examples
    for epoch in range(3):
        counts = Counter(stream[epoch * num_examples : (epoch + 1) * num_examples])
        assert counts == Counter(range(num_examples)), f"epoch {epoch}"
    assert all(sampler.exhausted for sampler in samplers)


@pytest.mark.parametrize("world_size", [2, 3, 5])
def test_shares_concatenate_to_the_single_process_batch(world_size):
    single = BatchSampler(17, size_sequence(SIZES), seed=11, epochs=6)
    samplers = workers(17, SIZES, world_size, seed=11, epochs=6)
    steps = 0
    for expected, *shares in zip(single, *samplers, strict=True):
        assert [index for share in shares for index in share] == expected
        sizes = [len(share) for share in shares]
        assert max(sizes) - min(sizes) <= 1
        assert all(sampler.last_global_batch_size == len(expected) for sampler in samplers)
        steps += 1
    assert steps > len(SIZES)


def test_a_global_batch_smaller_than_the_world_leaves_workers_empty():
    samplers = workers(10, [2], 4, shuffle=False)
    assert [next(sampler) for sampler in samplers] == [[0], [1], [], []]


def test_follows_a_controller_like_object():
    class Source:
        batch_size = 5

    samplers = [DistributedBatchSampler(10, Source(), rank=rank, world_size=2, shuffle=False) for rank in (0, 1)]
    assert [next(sampler) for sampler in samplers] == [[0, 1, 2], [3, 4]]


@given(
    global_batch_size=st.integers(min_value=0, max_value=200),
    world_size=st.integers(min_value=1, max_value=17),
)
@settings(max_examples=200, deadline=None)
def test_shard_bounds_tile_the_batch_evenly(global_batch_size, world_size):
    bounds = [shard_bounds(global_batch_size, rank, world_size) for rank in range(world_size)]
    assert bounds[0][0] == 0 and bounds[-1][1] == global_batch_size
    assert all(previous[1] == following[0] for previous, following in zip(bounds[:-1], bounds[1:], strict=True))
    sizes = [stop - start for start, stop in bounds]
    assert max(sizes) - min(sizes) <= 1
    assert sizes == sorted(sizes, reverse=True)


def test_state_is_global_and_resume_continues_the_same_shares():
    original = workers(19, SIZES, 3, seed=5)
    for _ in range(6):
        for sampler in original:
            next(sampler)
    states = [json.loads(json.dumps(sampler.state_dict())) for sampler in original]
    assert states[0] == states[1] == states[2]
    restored = workers(19, SIZES[6:] + SIZES[:6], 3, seed=5)
    for sampler in restored:
        sampler.load_state_dict(states[0])
    for _ in range(12):
        assert [next(sampler) for sampler in restored] == [next(sampler) for sampler in original]


@pytest.mark.parametrize("saved_world, loaded_world", [(3, 2), (2, 4), (1, 3)])
def test_loading_reshards_across_another_world_size(saved_world, loaded_world):
    saved = workers(31, SIZES, saved_world, seed=2)
    for _ in range(5):
        for sampler in saved:
            next(sampler)
    state = saved[0].state_dict()
    reference = BatchSampler(31, size_sequence(SIZES[5:] + SIZES[:5]), seed=2)
    reference.load_state_dict(state)
    resumed = workers(31, SIZES[5:] + SIZES[:5], loaded_world, seed=2)
    for sampler in resumed:
        sampler.load_state_dict(state)
    for _ in range(10):
        expected = next(reference)
        assert [index for sampler in resumed for index in next(sampler)] == expected


def test_loads_a_single_process_state_and_refuses_another_seed():
    single = BatchSampler(13, 4, seed=1)
    next(single)
    distributed = DistributedBatchSampler(13, 4, rank=1, world_size=2, seed=1)
    distributed.load_state_dict(single.state_dict())
    assert distributed.examples_seen == 4
    other = DistributedBatchSampler(13, 4, rank=1, world_size=2, seed=2)
    with pytest.raises(ValueError, match="seed: saved 1, here 2"):
        other.load_state_dict(single.state_dict())


@pytest.mark.parametrize(
    "options, error, text",
    [
        ({"rank": 2, "world_size": 2}, ValueError, "`rank` must be smaller than world_size=2, got rank=2"),
        ({"rank": -1, "world_size": 2}, ValueError, "`rank` must be an int >= 0, got rank=-1"),
        ({"rank": 0, "world_size": 0}, ValueError, "`world_size` must be an int >= 1, got world_size=0"),
        ({"rank": 0, "world_size": 2.0}, TypeError, "`world_size` must be an int >= 1, got world_size=2.0"),
        ({"rank": True, "world_size": 2}, TypeError, "`rank` must be an int >= 0, got rank=True"),
    ],
)
def test_bad_rank_or_world_size_is_refused(options, error, text):
    with pytest.raises(error, match=text.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        DistributedBatchSampler(10, 4, **options)


def test_rank_and_world_size_are_required_keywords():
    with pytest.raises(TypeError, match="rank"):
        DistributedBatchSampler(10, 4)  # type: ignore[call-arg]
