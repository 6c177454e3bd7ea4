"""The :class:`Dataset` container shared by every loader."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from deq.data._checks import check_fraction, check_same_length, check_seed


@dataclass(frozen=True, eq=False, repr=False)
class Dataset:
    """An immutable train/test split of numpy arrays.

    Attributes:
      x_train: training inputs, leading axis = samples.
      y_train: integer training targets, leading axis = samples.
      x_test: test inputs, leading axis = samples.
      y_test: integer test targets, leading axis = samples.
      num_classes: number of target classes (targets lie in ``[0, num_classes)``).
      name: short identifier, e.g. ``"digits"``.
      input_shape: shape of one input without the sample axis; ``None`` marks a
        variable-length axis (the algorithmic tasks test on longer sequences).
      vocab: for text data, the characters indexed by the ids; otherwise ``None``.

    Example:
      >>> import numpy as np
      >>> ds = Dataset(x_train=np.zeros((4, 2), np.float32), y_train=np.zeros(4, np.int32),
      ...              x_test=np.zeros((1, 2), np.float32), y_test=np.zeros(1, np.int32),
      ...              num_classes=2, name="toy", input_shape=(2,))
      >>> ds
      Dataset(name='toy', x_train=(4, 2) float32, x_test=(1, 2) float32, num_classes=2)
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    name: str
    input_shape: tuple[int | None, ...]
    vocab: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        check_same_length("x_train", self.x_train, "y_train", self.y_train)
        check_same_length("x_test", self.x_test, "y_test", self.y_test)

    def __repr__(self) -> str:
        def describe(a: np.ndarray) -> str:
            return f"{a.shape} {a.dtype}"

        return (
            f"Dataset(name={self.name!r}, x_train={describe(self.x_train)}, "
            f"x_test={describe(self.x_test)}, num_classes={self.num_classes})"
        )


def split_train_test(
    x: np.ndarray, y: np.ndarray, *, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Shuffle ``(x, y)`` with ``seed`` and split off the last ``test_fraction``.

    Args:
      x: inputs, leading axis = samples.
      y: targets, same leading length as ``x``.
      test_fraction: fraction in ``[0, 1)`` of samples for the test split
        (rounded to the nearest integer; at least one sample stays in train).
      seed: non-negative integer seed for ``numpy.random.default_rng``.

    Returns:
      ``(x_train, y_train, x_test, y_test)``, fresh arrays (never views of the input).

    Example:
      >>> import numpy as np
      >>> parts = split_train_test(np.arange(10), np.arange(10), test_fraction=0.3, seed=0)
      >>> [len(p) for p in parts]
      [7, 7, 3, 3]
    """
    x, y = np.asarray(x), np.asarray(y)
    check_same_length("x", x, "y", y)
    test_fraction = check_fraction("test_fraction", test_fraction)
    seed = check_seed("seed", seed)
    n = len(x)
    num_test = min(int(round(n * test_fraction)), n - 1)
    perm = np.random.default_rng(seed).permutation(n)
    train, test = perm[: n - num_test], perm[n - num_test :]
    return x[train], y[train], x[test], y[test]
