"""MNIST-1D, generated locally with the ``mnist1d`` package (never downloaded).

``mnist1d.get_dataset`` may fetch a pickle over HTTP, so it is never called
here. Instead :func:`load_mnist1d` calls ``mnist1d.data.make_dataset`` (the
package's pure-numpy/scipy generator) with the default arguments of
``mnist1d.data.get_dataset_args``, overriding only ``num_samples``, ``seed``
and ``train_split`` (the split is redone here, by ``seed``).

The generator seeds numpy's and Python's *global* RNGs; their states are
saved and restored around the call (under a lock), so loading has no effect
on other code's random streams.
"""

from __future__ import annotations

import functools
import os
import random
import threading
import warnings
from pathlib import Path

import numpy as np

from deq.data._checks import check_finite, check_int, check_labels, check_seed, read_npz
from deq.data.dataset import Dataset, split_train_test

SEQ_LEN: int = 40
_GLOBAL_RNG_LOCK = threading.Lock()


def load_mnist1d(
    *,
    num_samples: int = 4000,
    test_fraction: float = 0.2,
    seed: int = 0,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Dataset:
    """Generate the MNIST-1D dataset locally (10 classes, 1-D signals of length 40).

    Generation takes roughly 0.5 ms per sample on one CPU core (plus ~1.5 s to
    import ``mnist1d`` the first time); results are cached in memory per
    ``(num_samples, seed)`` and, if ``cache_dir`` is given, on disk as
    ``cache_dir/mnist1d_n{num_samples}_seed{seed}.npz``.

    Args:
      num_samples: total number of signals, a positive multiple of 10 (the
        generator makes ``num_samples // 10`` per class).
      test_fraction: fraction in ``[0, 1)`` of the samples used for the test split.
      seed: non-negative integer seed of both the generator and the split.
      cache_dir: optional directory for an on-disk cache (created if missing). A cache file
        that cannot be read or does not hold the expected arrays (truncated, wrong shape,
        non-finite signals, labels outside ``[0, 10)``) is regenerated, with a
        ``RuntimeWarning`` naming it.

    Returns:
      A :class:`Dataset` with ``x`` float32 ``(N, 40)`` (the generator's
      standardized signals: zero mean, unit std over the whole set), ``y`` int32
      in ``[0, 10)``, ``input_shape=(40,)`` and ``name="mnist1d"``. Add a
      trailing axis (``x[..., None]``) for sequence models.

    Example:
      >>> ds = load_mnist1d(num_samples=100, test_fraction=0.2, seed=0)
      >>> ds.x_train.shape, ds.x_test.shape, ds.x_train.dtype
      ((80, 40), (20, 40), dtype('float32'))
    """
    num_samples = check_int("num_samples", num_samples, minimum=10)
    if num_samples % 10:
        raise ValueError(
            f"num_samples must be a multiple of 10 (equal samples per class), got "
            f"{num_samples}. Fix: pass num_samples={num_samples - num_samples % 10}."
        )
    seed = check_seed("seed", seed)
    if cache_dir is None:
        x, y = _generate(num_samples, seed)
    else:
        x, y = _load_or_generate(Path(cache_dir), num_samples, seed)
    x_train, y_train, x_test, y_test = split_train_test(x, y, test_fraction=test_fraction, seed=seed)
    return Dataset(x_train, y_train, x_test, y_test, 10, "mnist1d", (SEQ_LEN,))


@functools.lru_cache(maxsize=8)
def _generate(num_samples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Run the mnist1d generator; returns read-only ``(x, y)`` so the cache cannot be mutated."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples, args.seed, args.train_split = num_samples, seed, 1.0
    with _GLOBAL_RNG_LOCK:
        np_state, py_state = np.random.get_state(), random.getstate()
        try:
            data = make_dataset(args)
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)
    return _freeze(data["x"].astype(np.float32)), _freeze(data["y"].astype(np.int32))


def _load_or_generate(cache_dir: Path, num_samples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    if cache_dir.exists() and not cache_dir.is_dir():
        raise ValueError(
            f"cache_dir {str(cache_dir)!r} exists and is not a directory: expected a directory for "
            f"the MNIST-1D cache files. Fix: pass another cache_dir, or cache_dir=None for no disk cache."
        )
    path = cache_dir / f"mnist1d_n{num_samples}_seed{seed}.npz"
    if path.is_file():
        try:
            return _read_cache(path, num_samples)
        except ValueError as e:
            warnings.warn(
                f"load_mnist1d: the cache file {str(path)!r} is unusable and is regenerated: {e}",
                RuntimeWarning, stacklevel=3,
            )
    x, y = _generate(num_samples, seed)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
    np.savez(tmp, x=x, y=y)
    os.replace(tmp, path)
    return x, y


def _read_cache(path: Path, num_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """The cached ``(x, y)``, or a ValueError saying why the file does not hold them."""
    fix = "It is regenerated from the seed."
    arrays = read_npz(path, ("x", "y"), what="MNIST-1D cache", fix=fix)
    x, y = arrays["x"], arrays["y"]
    where = f" in {str(path)!r}"
    if x.shape != (num_samples, SEQ_LEN) or x.dtype != np.float32:
        raise ValueError(f"x{where} must be float32 {(num_samples, SEQ_LEN)}, got {x.dtype} {x.shape}.")
    if y.shape != (num_samples,) or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"y{where} must be integer labels of shape {(num_samples,)}, got {y.dtype} {y.shape}.")
    check_finite("x", x, where)
    check_labels("y", y, where, 10)
    return x, y.astype(np.int32)


def _freeze(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a
