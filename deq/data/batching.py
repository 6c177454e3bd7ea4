"""Minibatch iteration over in-memory numpy arrays."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from deq.data._checks import check_int, check_same_length, check_seed


def num_batches(n: int, batch_size: int, drop_last: bool = True) -> int:
    """Number of batches one epoch over ``n`` samples produces.

    Args:
      n: number of samples (>= 0).
      batch_size: samples per batch (>= 1).
      drop_last: if True, a final incomplete batch is dropped (floor division);
        otherwise it is kept (ceiling division).

    Returns:
      The number of batches per epoch.

    Example:
      >>> num_batches(10, 4), num_batches(10, 4, drop_last=False)
      (2, 3)
    """
    n = check_int("n", n, minimum=0)
    batch_size = check_int("batch_size", batch_size, minimum=1)
    return n // batch_size if drop_last else -(-n // batch_size)


def iterate_batches(
    x: np.ndarray,
    y: np.ndarray,
    batch_size: int,
    *,
    seed: int | None = None,
    shuffle: bool = True,
    drop_last: bool = True,
    epochs: int = 1,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``(xb, yb)`` numpy minibatches for ``epochs`` passes over the data.

    Arguments are validated when this function is called, not on the first
    ``next()``. Each epoch draws a fresh permutation from a single
    ``numpy.random.default_rng(seed)`` stream, so the whole sequence of batches
    is reproducible for a fixed integer ``seed``; ``seed=None`` uses fresh OS
    entropy (not reproducible).

    Args:
      x: inputs, leading axis = samples.
      y: targets, same leading length as ``x``.
      batch_size: samples per batch (>= 1).
      seed: non-negative integer seed for the shuffling, or None.
      shuffle: if False, samples are visited in order and ``seed`` is unused.
      drop_last: if True, each epoch's final incomplete batch is skipped; if
        False, every sample appears exactly once per epoch.
      epochs: number of passes over the data (>= 1).

    Returns:
      An iterator of ``(xb, yb)`` tuples of numpy arrays (copies, safe to mutate).

    Example:
      >>> import numpy as np
      >>> x, y = np.arange(10).reshape(5, 2), np.arange(5)
      >>> [yb.tolist() for _, yb in iterate_batches(x, y, 2, shuffle=False, drop_last=False)]
      [[0, 1], [2, 3], [4]]
    """
    x, y = np.asarray(x), np.asarray(y)
    check_same_length("x", x, "y", y)
    batch_size = check_int("batch_size", batch_size, minimum=1)
    epochs = check_int("epochs", epochs, minimum=1)
    if seed is not None:
        seed = check_seed("seed", seed)
    if drop_last and len(x) < batch_size:
        raise ValueError(
            f"batch_size must be <= the number of samples when drop_last=True, got "
            f"batch_size={batch_size} for {len(x)} samples, so no batch would be "
            f"produced. Fix: pass batch_size<={max(len(x), 1)} or drop_last=False."
        )
    return _batches(x, y, batch_size, seed, shuffle, drop_last, epochs)


def _batches(
    x: np.ndarray,
    y: np.ndarray,
    batch_size: int,
    seed: int | None,
    shuffle: bool,
    drop_last: bool,
    epochs: int,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    n = len(x)
    stop = num_batches(n, batch_size, drop_last) * batch_size
    for _ in range(epochs):
        order = rng.permutation(n) if shuffle else np.arange(n)
        for start in range(0, stop, batch_size):
            idx = order[start : start + batch_size]
            yield x[idx], y[idx]
