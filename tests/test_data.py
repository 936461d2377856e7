"""The variable-size batch sampler: coverage per epoch, determinism, resume, DataLoader use."""

from __future__ import annotations

import importlib.util
import itertools
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import cabs
from cabs.data import BatchSampler

PRIMES = (2, 3, 5, 7, 11, 13, 29, 31, 1, 17)


def cycling(sizes):
    """A batch-size callable that returns ``sizes`` in turn and records what it returned."""
    cycle = itertools.cycle(sizes)
    returned = []

    def next_size():
        returned.append(next(cycle))
        return returned[-1]

    next_size.returned = returned
    return next_size


def split_into_epochs(batches, num_examples):
    stream = [index for batch in batches for index in batch]
    assert len(stream) % num_examples == 0
    return [stream[start : start + num_examples] for start in range(0, len(stream), num_examples)]


def test_every_index_exactly_once_per_epoch_with_changing_batch_sizes():
    num_examples = 23  # smaller than some batch sizes, so batches span several epochs
    source = cycling(PRIMES)
    sampler = BatchSampler(num_examples, source, seed=7, epochs=5)
    batches = list(sampler)

    epochs = split_into_epochs(batches, num_examples)
    assert len(epochs) == 5
    for order in epochs:
        assert sorted(order) == list(range(num_examples))
    # Every batch but the last has exactly the size the callable gave; the last is the remainder.
    sizes = [len(batch) for batch in batches]
    assert sizes[:-1] == source.returned[: len(sizes) - 1]
    assert 1 <= sizes[-1] <= source.returned[len(sizes) - 1]
    assert sum(sizes) == 5 * num_examples
    assert all(isinstance(index, int) for batch in batches for index in batch)
    # The epochs are shuffled differently.
    assert len({tuple(order) for order in epochs}) == 5
    assert (sampler.epoch, sampler.position, sampler.examples_seen, sampler.exhausted) == (5, 0, 115, True)
    assert next(sampler, None) is None


def test_order_does_not_depend_on_batch_sizes():
    stream_by_primes = [i for batch in BatchSampler(31, cycling(PRIMES), seed=3, epochs=3) for i in batch]
    stream_by_ones = [i for batch in BatchSampler(31, 1, seed=3, epochs=3) for i in batch]
    assert stream_by_primes == stream_by_ones


def test_batch_larger_than_the_data_set_spans_several_epochs():
    sampler = BatchSampler(4, 10, seed=1)
    first = next(sampler)
    assert len(first) == 10
    assert (sampler.epoch, sampler.position) == (2, 2)
    assert sorted(first[0:4]) == sorted(first[4:8]) == [0, 1, 2, 3]


def test_follows_a_controller_read_at_every_step():
    controller = cabs.Controller(learning_rate=0.1, min_batch_size=2, max_batch_size=40)
    sampler = BatchSampler(50, controller, seed=0)
    sizes = []
    for step in range(12):
        expected = controller.batch_size
        batch = next(sampler)
        sizes.append(len(batch))
        assert len(batch) == expected
        # A large variance makes the batch grow; a large loss late makes it shrink again.
        loss = 0.5 if step < 8 else 50.0
        controller.step(cabs.GradStats(count=len(batch), loss=loss, grad_sq_norm=0.0, sq_norm_sum=4e3 * len(batch)))
    assert len(set(sizes)) > 2


def test_same_seed_same_sequence_other_seed_other_sequence():
    def stream(seed):
        return list(itertools.islice(BatchSampler(40, cycling(PRIMES), seed=seed), 30))

    assert stream(5) == stream(5)
    assert stream(5) != stream(6)


def test_no_shuffle_visits_in_order():
    batches = list(BatchSampler(7, 3, shuffle=False, epochs=2))
    assert batches == [[0, 1, 2], [3, 4, 5], [6, 0, 1], [2, 3, 4], [5, 6]]


def test_infinite_by_default():
    sampler = BatchSampler(3, 2)
    batches = list(itertools.islice(sampler, 100))
    assert len(batches) == 100 and sampler.examples_seen == 200 and not sampler.exhausted


@pytest.mark.parametrize("steps_before_save", [0, 1, 3, 4, 5, 6, 7, 9])
def test_restore_continues_with_the_identical_sequence(steps_before_save):
    # 17 examples, sizes 2, 3, 5, 7, 11, 13, 29, ...: after 4 steps the sampler is exactly at the end of
    # epoch 0, after 5 inside epoch 1, the 6th batch spans epochs 1 and 2, the 7th three epochs.
    source = cycling(PRIMES)
    original = BatchSampler(17, source, seed=11, epochs=10)
    for _ in range(steps_before_save):
        next(original)
    saved = json.loads(json.dumps(original.state_dict()))
    rest_of_original = list(original)

    # The restored run's controller is restored too: it gives the sizes the original gave after the save.
    restored = BatchSampler(17, cycling(source.returned[steps_before_save:]), seed=11, epochs=10)
    restored.load_state_dict(saved)
    assert restored.state_dict() == saved
    assert list(restored) == rest_of_original
    assert restored.state_dict() == original.state_dict()


def test_restore_across_an_epoch_boundary_keeps_each_example_once_per_epoch():
    num_examples = 10
    first = BatchSampler(num_examples, 4, seed=2, epochs=3)
    before = [next(first), next(first), next(first)]  # the third batch spans epochs 0 and 1
    assert (first.epoch, first.position) == (1, 2)
    second = BatchSampler(num_examples, 4, seed=2, epochs=3)
    second.load_state_dict(first.state_dict())
    after = list(second)
    for order in split_into_epochs(before + after, num_examples):
        assert sorted(order) == list(range(num_examples))


def test_state_dict_is_plain_json():
    sampler = BatchSampler(9, 4, seed=3)
    next(sampler), next(sampler), next(sampler)
    state = sampler.state_dict()
    assert json.loads(json.dumps(state)) == state
    assert state == {"seed": 3, "num_examples": 9, "shuffle": True, "epoch": 1, "position": 3, "examples_seen": 12}


@pytest.mark.parametrize(
    ("key", "value"), [("num_examples", 10), ("seed", 4), ("shuffle", False)], ids=["num_examples", "seed", "shuffle"]
)
def test_load_refuses_another_configuration(key, value):
    saved = BatchSampler(9, 4, seed=3).state_dict()
    options = {"num_examples": 9, "seed": 3, "shuffle": True, key: value}
    sampler = BatchSampler(options.pop("num_examples"), 4, **options)
    with pytest.raises(ValueError, match=rf"{key}: saved {saved[key]!r}, here {value!r}"):
        sampler.load_state_dict(saved)


@pytest.mark.parametrize(
    "damage",
    [{"position": 9}, {"examples_seen": 5}, {"epoch": -1, "examples_seen": -6}, {"position": 1.5}],
    ids=["position-past-end", "seen-inconsistent", "negative-epoch", "float-position"],
)
def test_load_refuses_a_damaged_state(damage):
    sampler = BatchSampler(9, 4, seed=3)
    state = {**sampler.state_dict(), "epoch": 0, "position": 3, "examples_seen": 3, **damage}
    with pytest.raises((ValueError, TypeError), match="position|epoch"):
        sampler.load_state_dict(state)
    assert sampler.examples_seen == 0


def test_load_refuses_something_else():
    with pytest.raises(ValueError, match="BatchSampler.state_dict"):
        BatchSampler(9, 4).load_state_dict({"seed": 0})


@pytest.mark.parametrize(
    ("arguments", "error", "match"),
    [
        ((0, 4), ValueError, "num_examples=0"),
        ((5.0, 4), TypeError, "num_examples=5.0"),
        ((5, 0), ValueError, "batch_size=0"),
        ((5, -3), ValueError, "batch_size=-3"),
        ((5, 2.5), TypeError, "batch_size=2.5"),
        ((5, True), TypeError, "batch_size=True"),
    ],
)
def test_bad_arguments(arguments, error, match):
    with pytest.raises(error, match=match):
        BatchSampler(*arguments)


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"seed": -1}, ValueError, "seed=-1"),
        ({"epochs": 0}, ValueError, "epochs=0"),
        ({"shuffle": "yes"}, TypeError, "shuffle"),
    ],
)
def test_bad_options(options, error, match):
    with pytest.raises(error, match=match):
        BatchSampler(5, 2, **options)


@pytest.mark.parametrize(
    ("returned", "error"), [(0, ValueError), (-2, ValueError), (3.0, TypeError), (None, TypeError)]
)
def test_bad_batch_size_from_a_callable_names_the_value(returned, error):
    sampler = BatchSampler(5, lambda: returned)
    with pytest.raises(error, match=rf"got (batch_size=)?{returned}"):
        next(sampler)
    assert sampler.examples_seen == 0


def test_numpy_integers_are_accepted():
    sampler = BatchSampler(np.int64(6), lambda: np.int32(4), seed=np.uint8(2), epochs=np.int16(1))
    assert [len(batch) for batch in sampler] == [4, 2]


@settings(max_examples=60, deadline=None)
@given(
    num_examples=st.integers(1, 40),
    sizes=st.lists(st.integers(1, 90), min_size=1, max_size=20),
    epochs=st.integers(1, 4),
    seed=st.integers(0, 2**32),
)
def test_each_index_once_per_epoch_for_any_batch_sizes(num_examples, sizes, epochs, seed):
    batches = list(BatchSampler(num_examples, cycling(sizes), seed=seed, epochs=epochs))
    assert all(batches)
    orders = split_into_epochs(batches, num_examples)
    assert len(orders) == epochs
    for order in orders:
        assert sorted(order) == list(range(num_examples))


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch is not installed")
def test_torch_dataloader_with_a_batch_size_that_changes_every_step():
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    num_examples = 37
    values = torch.arange(num_examples, dtype=torch.float64) * 10.0
    dataset = TensorDataset(values, torch.arange(num_examples))

    class Schedule:
        """Stands in for a controller: the training loop changes batch_size after each step."""

        batch_size = 3

    schedule = Schedule()
    sampler = BatchSampler(num_examples, schedule, seed=4, epochs=3)
    loader = DataLoader(dataset, batch_sampler=sampler)
    seen = []
    for step, (inputs, indices) in enumerate(loader):
        assert len(indices) == min(schedule.batch_size, 3 * num_examples - sum(map(len, seen)))
        torch.testing.assert_close(inputs, indices.to(torch.float64) * 10.0)
        seen.append(indices.tolist())
        schedule.batch_size = PRIMES[step % len(PRIMES)] + 3
    assert len({len(batch) for batch in seen}) > 5
    for order in split_into_epochs(seen, num_examples):
        assert sorted(order) == list(range(num_examples))
    sizes = [3] + [PRIMES[step % len(PRIMES)] + 3 for step in range(len(seen))]
    reference = BatchSampler(num_examples, cycling(sizes), seed=4, epochs=3)
    assert seen == list(reference)
