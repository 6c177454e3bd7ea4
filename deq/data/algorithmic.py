"""Synthetic algorithmic tasks with a difficulty knob (the sequence length).

Used for test-time-compute experiments: train on short bit strings, test on
longer ones, and give the equilibrium solver more iterations at test time.

Inputs are float32 bits in {0, 1} shaped ``(N, length, 1)`` (sequence axis,
then a feature axis of size 1); targets are int32 in {0, 1}.
"""

from __future__ import annotations

import numpy as np

from deq.data._checks import check_choice, check_int, check_seed
from deq.data.dataset import Dataset

TASKS: tuple[str, ...] = ("prefix_parity", "parity")


def make_prefix_parity(num_samples: int, length: int, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random bit strings and their running parity (prefix sums mod 2).

    Args:
      num_samples: number of strings (>= 1).
      length: bits per string (>= 1); the difficulty knob.
      seed: non-negative integer seed for ``numpy.random.default_rng``.

    Returns:
      ``(x, y)``: ``x`` float32 ``(num_samples, length, 1)`` with bits in {0, 1};
      ``y`` int32 ``(num_samples, length)`` with ``y[:, t] = sum(x[:, :t+1]) % 2``.

    Example:
      >>> x, y = make_prefix_parity(2, 5, seed=0)
      >>> x.shape, y.shape
      ((2, 5, 1), (2, 5))
      >>> bool((y == np.cumsum(x[..., 0], axis=1) % 2).all())
      True
    """
    bits = _random_bits(num_samples, length, seed)
    return bits[..., None].astype(np.float32), np.cumsum(bits, axis=1, dtype=np.int32) % 2


def make_parity(num_samples: int, length: int, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random bit strings and their parity (one label per string).

    Args:
      num_samples: number of strings (>= 1).
      length: bits per string (>= 1); the difficulty knob.
      seed: non-negative integer seed for ``numpy.random.default_rng``.

    Returns:
      ``(x, y)``: ``x`` float32 ``(num_samples, length, 1)`` with bits in {0, 1};
      ``y`` int32 ``(num_samples,)`` equal to ``sum(x) % 2``.

    Example:
      >>> x, y = make_parity(3, 4, seed=0)
      >>> x.shape, y.shape, bool((y == x.sum(axis=(1, 2)) % 2).all())
      ((3, 4, 1), (3,), True)
    """
    bits = _random_bits(num_samples, length, seed)
    return bits[..., None].astype(np.float32), bits.sum(axis=1, dtype=np.int32) % 2


def load_algorithmic(
    task: str,
    *,
    train_length: int = 8,
    test_length: int = 16,
    num_train: int = 4096,
    num_test: int = 1024,
    seed: int = 0,
) -> Dataset:
    """Train/test split of an algorithmic task with longer strings at test time.

    Train and test strings come from independent streams derived from ``seed``.

    Args:
      task: ``"prefix_parity"`` (one label per position) or ``"parity"`` (one label).
      train_length: bits per training string (>= 1).
      test_length: bits per test string (>= 1), usually larger than ``train_length``.
      num_train: number of training strings (>= 1).
      num_test: number of test strings (>= 1).
      seed: non-negative integer seed.

    Returns:
      A :class:`Dataset` with ``num_classes=2``, ``name=task`` and
      ``input_shape=(None, 1)`` (the length differs between train and test).

    Example:
      >>> ds = load_algorithmic("prefix_parity", train_length=4, test_length=8, num_train=16, num_test=4)
      >>> ds.x_train.shape, ds.y_train.shape, ds.x_test.shape, ds.y_test.shape
      ((16, 4, 1), (16, 4), (4, 8, 1), (4, 8))
    """
    make = {"prefix_parity": make_prefix_parity, "parity": make_parity}[check_choice("task", task, TASKS)]
    for name, value in [("train_length", train_length), ("test_length", test_length),
                        ("num_train", num_train), ("num_test", num_test)]:
        check_int(name, value, minimum=1)
    seed = check_seed("seed", seed)
    train_seed, test_seed = np.random.SeedSequence(seed).generate_state(2)
    x_train, y_train = make(num_train, train_length, seed=int(train_seed))
    x_test, y_test = make(num_test, test_length, seed=int(test_seed))
    return Dataset(x_train, y_train, x_test, y_test, 2, task, (None, 1))


def _random_bits(num_samples: int, length: int, seed: int) -> np.ndarray:
    num_samples = check_int("num_samples", num_samples, minimum=1)
    length = check_int("length", length, minimum=1)
    seed = check_seed("seed", seed)
    return np.random.default_rng(seed).integers(0, 2, size=(num_samples, length), dtype=np.int32)
