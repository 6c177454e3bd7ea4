"""A character-level corpus built from text already on every machine.

By default the corpus is the concatenation of the top-level ``*.py`` files of
the running Python's standard library (``sysconfig.get_paths()["stdlib"]``),
read in sorted file-name order up to a character budget. The exact text
therefore depends on the Python version, but is deterministic on a given
installation. Nothing is downloaded.
"""

from __future__ import annotations

import os
import sysconfig
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from deq.data._checks import check_fraction, check_int, check_seed
from deq.data.dataset import Dataset


def load_text_corpus(
    *,
    max_chars: int = 200_000,
    seq_len: int = 64,
    test_fraction: float = 0.1,
    seed: int = 0,
    root: str | os.PathLike[str] | None = None,
) -> Dataset:
    """Character-level next-token dataset from the standard library's source code.

    The text is split contiguously (the last ``test_fraction`` of the characters
    is the test split, so test windows never overlap training text), each split
    is cut into consecutive input windows of ``seq_len`` ids (stride ``seq_len``)
    whose targets are the same window shifted by one character, and the window
    order within each split is shuffled by ``seed``.

    Args:
      max_chars: character budget (>= 2 * (seq_len + 1)); files are read in sorted
        order and the last one is truncated to fit.
      seq_len: tokens per input sequence (>= 1).
      test_fraction: fraction in ``[0, 1)`` of the characters used for the test split.
      seed: non-negative integer seed of the window order.
      root: directory whose top-level ``*.py`` files form the corpus; None means
        the standard library directory.

    Returns:
      A :class:`Dataset` with ``x`` int32 ``(N, seq_len)`` input ids, ``y`` int32
      ``(N, seq_len)`` next-character ids (``y[:, t]`` is the character after
      ``x[:, t]``, so ``y[:, :-1] == x[:, 1:]``), ``vocab`` the sorted tuple of
      distinct characters (id ``i`` is ``vocab[i]``), ``num_classes=len(vocab)``,
      ``input_shape=(seq_len,)`` and ``name="stdlib_text"``.

    Example:
      >>> ds = load_text_corpus(max_chars=5000, seq_len=32, seed=0)
      >>> ds.x_train.shape[1], ds.num_classes == len(ds.vocab)
      (32, True)
      >>> bool((ds.y_train[:, :-1] == ds.x_train[:, 1:]).all())
      True
    """
    seq_len = check_int("seq_len", seq_len, minimum=1)
    max_chars = check_int("max_chars", max_chars, minimum=2 * (seq_len + 1))
    test_fraction = check_fraction("test_fraction", test_fraction)
    seed = check_seed("seed", seed)
    text = read_source_text(max_chars=max_chars, root=root)
    vocab = tuple(sorted(set(text)))
    ids = encode_text(text, vocab)
    split = len(ids) - int(round(len(ids) * test_fraction))
    if split < seq_len + 1:
        raise ValueError(
            f"the training text must hold at least seq_len + 1 = {seq_len + 1} characters, "
            f"got {split} (corpus of {len(ids)} characters, test_fraction={test_fraction}). "
            f"Fix: raise max_chars, lower seq_len or lower test_fraction."
        )
    rng = np.random.default_rng(seed)
    x_train, y_train = _windows(ids[:split], seq_len, rng)
    x_test, y_test = _windows(ids[split:], seq_len, rng)
    return Dataset(x_train, y_train, x_test, y_test, len(vocab), "stdlib_text", (seq_len,), vocab)


def read_source_text(*, max_chars: int, root: str | os.PathLike[str] | None = None) -> str:
    """Concatenate the sorted top-level ``*.py`` files of ``root`` up to ``max_chars``.

    Args:
      max_chars: maximum number of characters returned (>= 1).
      root: directory to read; None means ``sysconfig.get_paths()["stdlib"]``.

    Returns:
      The text (newlines normalized to ``"\\n"``, undecodable bytes replaced).

    Raises:
      FileNotFoundError: ``root`` holds no ``*.py`` files.

    Example:
      >>> len(read_source_text(max_chars=1000))
      1000
    """
    max_chars = check_int("max_chars", max_chars, minimum=1)
    directory = Path(sysconfig.get_paths()["stdlib"] if root is None else root)
    if directory.exists() and not directory.is_dir():
        raise ValueError(
            f"root must be a directory of *.py files, got the file {str(directory)!r}. "
            f"Fix: pass root=<the directory containing it>."
        )
    files = sorted(p for p in directory.glob("*.py") if p.is_file())
    if not files:
        raise FileNotFoundError(
            f"no *.py files found in {str(directory)!r} to build the text corpus. "
            f"Fix: pass root=<a directory containing .py files>."
        )
    parts: list[str] = []
    remaining = max_chars
    for path in files:
        if remaining <= 0:
            break
        chunk = path.read_text(encoding="utf-8", errors="replace")[:remaining]
        parts.append(chunk)
        remaining -= len(chunk)
    return "".join(parts)


def encode_text(text: str, vocab: Sequence[str]) -> np.ndarray:
    """Map each character of ``text`` to its index in ``vocab``.

    Args:
      text: the string to encode.
      vocab: sequence of distinct single characters, e.g. ``Dataset.vocab``.

    Returns:
      int32 array of shape ``(len(text),)``.

    Example:
      >>> encode_text("aba", ("a", "b")).tolist()
      [0, 1, 0]
    """
    index = {ch: i for i, ch in enumerate(vocab)}
    unknown = sorted(set(text) - index.keys())
    if unknown:
        raise ValueError(
            f"text must only contain characters of vocab, got {len(unknown)} unknown "
            f"character(s) {unknown[:10]!r}. Fix: filter the text or rebuild the vocab."
        )
    return np.fromiter((index[ch] for ch in text), dtype=np.int32, count=len(text))


def decode_text(ids: Sequence[int] | np.ndarray, vocab: Sequence[str]) -> str:
    """Map ids back to a string (inverse of :func:`encode_text`).

    Args:
      ids: integer ids in ``[0, len(vocab))``.
      vocab: the vocabulary used for encoding.

    Returns:
      The decoded string.

    Example:
      >>> decode_text([0, 1, 0], ("a", "b"))
      'aba'
    """
    ids = np.asarray(ids).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() >= len(vocab)):
        raise ValueError(
            f"ids must lie in [0, len(vocab)={len(vocab)}), got range "
            f"[{int(ids.min())}, {int(ids.max())}]. Fix: decode with the vocab used to encode."
        )
    return "".join(vocab[int(i)] for i in ids)


def _windows(ids: np.ndarray, seq_len: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    count = max(len(ids) - 1, 0) // seq_len
    starts = rng.permutation(count) * seq_len
    offsets = np.arange(seq_len)
    x = ids[starts[:, None] + offsets]
    y = ids[starts[:, None] + offsets + 1]
    return x, y
