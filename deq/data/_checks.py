"""Argument validation shared by the data loaders (private).

Every error names the argument, what was expected, what was received and
how to fix it, so that misuse is diagnosable from the message alone.
"""

from __future__ import annotations

import numbers
import zipfile
import zlib
from pathlib import Path

import numpy as np


def check_int(name: str, value: object, *, minimum: int) -> int:
    """Return ``value`` as an ``int`` after checking it is an integer >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(
            f"{name} must be an integer >= {minimum}, got {value!r} "
            f"of type {type(value).__name__}. Fix: pass an int, e.g. {name}={max(minimum, 1)}."
        )
    if value < minimum:
        raise ValueError(
            f"{name} must be an integer >= {minimum}, got {value}. "
            f"Fix: pass {name}={minimum} or larger."
        )
    return int(value)


def check_seed(name: str, value: object) -> int:
    """Return a seed after checking it is an integer in [0, 2**32)."""
    seed = check_int(name, value, minimum=0)
    if seed >= 2**32:
        raise ValueError(
            f"{name} must be an integer in [0, 2**32), got {seed}. "
            f"Fix: pass a smaller seed, e.g. {name}={seed % 2**32}."
        )
    return seed


def check_fraction(name: str, value: object) -> float:
    """Return ``value`` as a float after checking 0 <= value < 1."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"{name} must be a float in [0, 1), got {value!r} of type "
            f"{type(value).__name__}. Fix: pass e.g. {name}=0.2."
        )
    if not 0.0 <= float(value) < 1.0:
        raise ValueError(
            f"{name} must be in [0, 1), got {value}. Fix: pass e.g. {name}=0.2."
        )
    return float(value)


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    """Return ``value`` after checking it is one of ``choices``."""
    if value not in choices:
        raise ValueError(
            f"{name} must be one of {list(choices)}, got {value!r}. "
            f"Fix: pass {name}={choices[0]!r} (or another listed value)."
        )
    return str(value)


def check_same_length(x_name: str, x: np.ndarray, y_name: str, y: np.ndarray, where: str = "") -> None:
    """Raise ValueError unless ``x`` and ``y`` have the same leading dimension.

    ``where`` (e.g. ``" in 'mnist.npz'"``) is inserted after the names in the message.
    """
    if x.ndim == 0 or y.ndim == 0 or len(x) != len(y):
        raise ValueError(
            f"{x_name} and {y_name}{where} must have the same number of samples "
            f"(leading dimension), got {x_name}.shape={x.shape} and "
            f"{y_name}.shape={y.shape}. Fix: pass arrays with matching first axes."
        )


def read_npz(path: Path, keys: tuple[str, ...], *, what: str, fix: str) -> dict[str, np.ndarray]:
    """Read ``keys`` from the ``.npz`` archive at ``path``, every failure a ValueError naming it.

    Args:
      path: an existing file.
      keys: the arrays to read; all must be present.
      what: what the file is, for the message (e.g. ``"mnist data"``).
      fix: how to re-create the file, appended to every message.

    Returns:
      ``{key: array}`` read fully into memory (the file is closed on return).

    Raises:
      ValueError: the file is empty, truncated, not an ``.npz`` archive (e.g. a single ``.npy``
        array or a text file), holds object arrays, lacks a key, or an array in it is corrupt.
    """
    expected = f"a zip archive written by numpy.savez with keys {list(keys)}"
    where = f"{what} file {str(path)!r}"
    size = path.stat().st_size
    if size == 0:
        raise ValueError(f"{where} is empty (0 bytes): expected {expected}. {fix}")
    with open(path, "rb") as fh:
        try:
            npz = np.load(fh, allow_pickle=False)
        except (zipfile.BadZipFile, EOFError, ValueError, OSError) as e:
            raise ValueError(
                f"{where} ({size} bytes) is not a readable .npz archive (truncated, corrupt, or "
                f"another format): expected {expected}. {fix}\nOriginal error: {type(e).__name__}: {e}"
            ) from e
        if not isinstance(npz, np.lib.npyio.NpzFile):
            raise ValueError(
                f"{where} holds a single .npy array ({getattr(npz, 'dtype', '?')}"
                f"{list(getattr(npz, 'shape', ()))}), not an .npz archive: expected {expected}. {fix}"
            )
        with npz:
            missing = [key for key in keys if key not in npz.files]
            if missing:
                raise ValueError(
                    f"{where} must contain keys {list(keys)}, missing {missing} (found "
                    f"{sorted(npz.files)}). {fix}"
                )
            arrays = {}
            for key in keys:
                try:
                    arrays[key] = np.asarray(npz[key])
                except (zipfile.BadZipFile, EOFError, ValueError, OSError, zlib.error) as e:
                    raise ValueError(
                        f"{where}: the array {key!r} cannot be read (corrupt, truncated or an object "
                        f"array): expected {expected} holding numeric arrays. {fix}\n"
                        f"Original error: {type(e).__name__}: {e}"
                    ) from e
    return arrays


def check_finite(name: str, x: np.ndarray, where: str) -> None:
    """Raise ValueError if the float array ``x`` holds NaN or inf, naming the first bad sample."""
    if np.issubdtype(x.dtype, np.floating):
        bad = ~np.isfinite(x.reshape(len(x), -1)).all(axis=1) if x.ndim and len(x) else np.zeros(0, bool)
        if bad.any():
            first = int(np.argmax(bad))
            raise ValueError(
                f"{name}{where} must hold finite values, got NaN or inf in {int(bad.sum())} sample(s), "
                f"first at index {first}. Fix: drop or repair those samples before saving."
            )


def check_labels(name: str, y: np.ndarray, where: str, num_classes: int | None) -> None:
    """Raise ValueError unless integer labels ``y`` lie in ``[0, num_classes)`` (``>= 0`` if None)."""
    if not y.size:
        return
    negative = np.flatnonzero(y < 0)
    if negative.size:
        i = int(negative[0])
        raise ValueError(
            f"{name}{where} must hold labels >= 0, got {int(y.reshape(-1)[i])} at index {i} "
            f"({negative.size} negative). Fix: remap labels to 0..K-1."
        )
    limit = num_classes if num_classes is not None else 2**31 - 1
    high = np.flatnonzero(y >= limit)
    if high.size:
        i = int(high[0])
        bound = f"num_classes={num_classes}" if num_classes is not None else "2**31 - 1"
        fix = "remap the labels"
        if num_classes is not None:
            fix = f"pass num_classes={int(y.max()) + 1} or {fix}"
        raise ValueError(
            f"{name}{where} must hold labels in [0, {bound}), got {int(y.reshape(-1)[i])} at index {i} "
            f"({high.size} out of range, maximum {int(y.max())}). Fix: {fix}."
        )
