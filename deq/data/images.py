"""Image datasets: scikit-learn digits (bundled) and MNIST / CIFAR-10 from local ``.npz`` files.

All image inputs are float32, channels-last ``(N, H, W, C)``; targets are int32.
Nothing here touches the network.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from deq.data._checks import check_finite, check_int, check_labels, check_same_length, read_npz
from deq.data.dataset import Dataset, split_train_test

NPZ_KEYS: tuple[str, ...] = ("x_train", "y_train", "x_test", "y_test")


def load_digits(*, test_fraction: float = 0.2, seed: int = 0, normalize: bool = True) -> Dataset:
    """Load scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes).

    The data ships inside scikit-learn, so this never downloads anything.

    Args:
      test_fraction: fraction in ``[0, 1)`` of the images used for the test split.
      seed: non-negative integer seed of the shuffled train/test split.
      normalize: if True, pixels (integers 0..16) are divided by 16 into ``[0, 1]``;
        otherwise they keep their raw 0..16 values (still float32).

    Returns:
      A :class:`Dataset` with ``x`` float32 ``(N, 8, 8, 1)``, ``y`` int32 in ``[0, 10)``,
      ``input_shape=(8, 8, 1)`` and ``name="digits"``.

    Example:
      >>> ds = load_digits(test_fraction=0.2, seed=0)
      >>> ds.x_train.shape, ds.x_test.shape, ds.x_train.dtype
      ((1438, 8, 8, 1), (359, 8, 8, 1), dtype('float32'))
    """
    from sklearn.datasets import load_digits as sklearn_load_digits

    bunch = sklearn_load_digits()
    x = bunch.images.astype(np.float32)[..., None]
    if normalize:
        x /= 16.0
    y = bunch.target.astype(np.int32)
    x_train, y_train, x_test, y_test = split_train_test(x, y, test_fraction=test_fraction, seed=seed)
    return Dataset(x_train, y_train, x_test, y_test, 10, "digits", (8, 8, 1))


def load_npz(path: str | os.PathLike[str], *, name: str, num_classes: int | None = None) -> Dataset:
    """Load an image classification dataset from a local ``.npz`` file.

    Expected file layout (e.g. written with ``numpy.savez(path, x_train=...,
    y_train=..., x_test=..., y_test=...)``):

    * ``x_train``, ``x_test``: images, ``(N, H, W)`` (grayscale), ``(N, H, W, C)``
      (channels-last) or ``(N, C, H, W)`` with ``C`` in {1, 3} (channels-first,
      transposed to channels-last). Integer pixels (uint8, 0..255) are divided by
      255; float pixels are only cast to float32.
    * ``y_train``, ``y_test``: integer labels, ``(N,)`` or ``(N, 1)``.

    Args:
      path: path to the ``.npz`` file.
      name: identifier stored in ``Dataset.name``, e.g. ``"mnist"``.
      num_classes: number of classes; if None, ``max label + 1``.

    Returns:
      A :class:`Dataset` with float32 ``(N, H, W, C)`` inputs and int32 ``(N,)`` labels.

    Raises:
      FileNotFoundError: ``path`` does not exist or is a directory (the message says how to
        create it).
      ValueError: the file is empty, truncated, corrupt or not an ``.npz`` archive; a key is
        missing; shapes or sample counts disagree; pixels are NaN/inf, not real numbers, or
        integers outside 0..255; labels are not integers, negative or ``>= num_classes``;
        ``x_train`` is empty. Each message names the path and the array.

    Example:
      >>> import os, tempfile, numpy as np
      >>> tmp = tempfile.TemporaryDirectory()
      >>> path = os.path.join(tmp.name, "tiny.npz")
      >>> np.savez(path, x_train=np.zeros((4, 5, 5), np.uint8), y_train=np.array([0, 1, 2, 1]),
      ...          x_test=np.zeros((2, 5, 5), np.uint8), y_test=np.array([2, 0]))
      >>> ds = load_npz(path, name="tiny")
      >>> ds.x_train.shape, ds.num_classes, ds.input_shape
      ((4, 5, 5, 1), 3, (5, 5, 1))
      >>> tmp.cleanup()
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a non-empty str, got {name!r}. Fix: pass e.g. name='mnist'.")
    if num_classes is not None:
        num_classes = check_int("num_classes", num_classes, minimum=1)
    path = Path(path)
    where = f" in {str(path)!r}"
    arrays = _read_npz(path, name)
    x_train, x_test = (_to_images(arrays[k], k, where) for k in ("x_train", "x_test"))
    y_train, y_test = (_to_labels(arrays[k], k, where, num_classes) for k in ("y_train", "y_test"))
    check_same_length("x_train", x_train, "y_train", y_train, where)
    check_same_length("x_test", x_test, "y_test", y_test, where)
    if not len(x_train):
        raise ValueError(
            f"x_train{where} holds no samples (shape {arrays['x_train'].shape}): a training split "
            "needs at least one image. Fix: re-save the file with the training images."
        )
    if x_train.shape[1:] != x_test.shape[1:]:
        raise ValueError(
            f"x_train and x_test{where} must have the same image shape, got "
            f"{x_train.shape[1:]} and {x_test.shape[1:]}. Fix: re-save the file with matching images."
        )
    if num_classes is None:
        num_classes = max(int(y.max()) + 1 if y.size else 1 for y in (y_train, y_test))
    return Dataset(x_train, y_train, x_test, y_test, num_classes, name, x_train.shape[1:])


def load_mnist(path: str | os.PathLike[str]) -> Dataset:
    """Load MNIST from a local ``.npz`` file (no download).

    The file must hold ``x_train`` ``(60000, 28, 28)`` uint8, ``y_train`` ``(60000,)``,
    ``x_test`` ``(10000, 28, 28)`` uint8 and ``y_test`` ``(10000,)`` (any sample
    counts are accepted). Create it once on a machine with network access, e.g.
    ``(xtr, ytr), (xte, yte) = keras.datasets.mnist.load_data()`` then
    ``numpy.savez(path, x_train=xtr, y_train=ytr, x_test=xte, y_test=yte)``.

    Args:
      path: path to the ``.npz`` file.

    Returns:
      A :class:`Dataset` with ``x`` float32 ``(N, 28, 28, 1)`` in ``[0, 1]``,
      ``y`` int32 in ``[0, 10)``, ``name="mnist"``.

    Example:
      >>> import os, tempfile, numpy as np
      >>> tmp = tempfile.TemporaryDirectory()
      >>> path = os.path.join(tmp.name, "mnist.npz")
      >>> np.savez(path, x_train=np.zeros((3, 28, 28), np.uint8), y_train=np.array([0, 9, 4]),
      ...          x_test=np.zeros((1, 28, 28), np.uint8), y_test=np.array([7]))
      >>> load_mnist(path).x_train.shape
      (3, 28, 28, 1)
      >>> tmp.cleanup()
    """
    return _load_fixed_shape(path, "mnist", (28, 28, 1), "(N, 28, 28) uint8")


def load_cifar10(path: str | os.PathLike[str]) -> Dataset:
    """Load CIFAR-10 from a local ``.npz`` file (no download).

    The file must hold ``x_train`` ``(50000, 32, 32, 3)`` uint8, ``y_train``
    ``(50000,)`` or ``(50000, 1)``, ``x_test`` ``(10000, 32, 32, 3)`` uint8 and
    ``y_test`` likewise (any sample counts are accepted; channels-first
    ``(N, 3, 32, 32)`` is transposed). Create it once on a machine with network
    access, e.g. ``(xtr, ytr), (xte, yte) = keras.datasets.cifar10.load_data()`` then
    ``numpy.savez(path, x_train=xtr, y_train=ytr, x_test=xte, y_test=yte)``.

    Args:
      path: path to the ``.npz`` file.

    Returns:
      A :class:`Dataset` with ``x`` float32 ``(N, 32, 32, 3)`` in ``[0, 1]``,
      ``y`` int32 in ``[0, 10)``, ``name="cifar10"``.

    Example:
      >>> import os, tempfile, numpy as np
      >>> tmp = tempfile.TemporaryDirectory()
      >>> path = os.path.join(tmp.name, "cifar10.npz")
      >>> np.savez(path, x_train=np.zeros((2, 32, 32, 3), np.uint8), y_train=np.array([[1], [3]]),
      ...          x_test=np.zeros((1, 32, 32, 3), np.uint8), y_test=np.array([[9]]))
      >>> ds = load_cifar10(path)
      >>> ds.x_train.shape, ds.y_train.tolist()
      ((2, 32, 32, 3), [1, 3])
      >>> tmp.cleanup()
    """
    return _load_fixed_shape(path, "cifar10", (32, 32, 3), "(N, 32, 32, 3) uint8")


def _load_fixed_shape(
    path: str | os.PathLike[str], name: str, image_shape: tuple[int, ...], layout: str
) -> Dataset:
    ds = load_npz(path, name=name, num_classes=10)
    if ds.input_shape != image_shape:
        raise ValueError(
            f"{name} images in {path} must be {layout} (loaded as {image_shape} "
            f"channels-last), got per-image shape {ds.input_shape}. Fix: re-save "
            f"x_train/x_test with layout {layout}, or use load_npz for other shapes."
        )
    return ds


def _read_npz(path: Path, name: str) -> dict[str, np.ndarray]:
    fix = (
        f"Fix: re-create it once on a machine with network access, e.g. numpy.savez({str(path)!r}, "
        "x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test) with images "
        "(N, H, W[, C]) uint8 and integer labels (N,), then copy it here."
    )
    if not path.is_file():
        kind = "is a directory, not a file" if path.is_dir() else "not found"
        raise FileNotFoundError(
            f"{name} data file {kind}: expected an .npz file at {str(path)!r} with keys "
            f"{list(NPZ_KEYS)}. {fix}"
        )
    return read_npz(path, NPZ_KEYS, what=f"{name} data", fix=fix)


def _to_images(x: np.ndarray, key: str, where: str) -> np.ndarray:
    if x.ndim == 3:
        x = x[..., None]
    elif x.ndim == 4 and x.shape[1] in (1, 3) and x.shape[-1] not in (1, 3):
        x = np.transpose(x, (0, 2, 3, 1))
    elif x.ndim != 4:
        raise ValueError(
            f"{key}{where} must be images shaped (N, H, W) or (N, H, W, C), got shape {x.shape}. "
            f"Fix: reshape the images before saving the .npz."
        )
    if np.issubdtype(x.dtype, np.integer):
        if x.size and (x.min() < 0 or x.max() > 255):
            raise ValueError(
                f"{key}{where} holds integer pixels in [{x.min()}, {x.max()}], expected uint8 values "
                "in 0..255 (they are divided by 255). Fix: save uint8 pixels, or float pixels already "
                "scaled as the model should see them."
            )
        return x.astype(np.float32) / np.float32(255.0)
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(
            f"{key}{where} must hold real-valued pixels (uint8 0..255 or float), got dtype {x.dtype}. "
            "Fix: save the images as uint8 or float32."
        )
    check_finite(key, x, where)
    return x.astype(np.float32)


def _to_labels(y: np.ndarray, key: str, where: str, num_classes: int | None) -> np.ndarray:
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(
            f"{key}{where} must be integer labels shaped (N,) or (N, 1), got shape {y.shape} "
            f"dtype {y.dtype}. Fix: save class indices (not one-hot) as integers."
        )
    check_labels(key, y, where, num_classes)
    return y.astype(np.int32)
