"""Character-level corpora built from text already on every machine.

Two loaders, both reading the running Python's standard library
(``sysconfig.get_paths()["stdlib"]``); nothing is downloaded. The exact text
depends on the Python version, but is deterministic on a given installation.

- :func:`load_text_corpus`: the top-level ``*.py`` files in sorted order up to a
  character budget, split contiguously into train / test windows, with the
  vocabulary read off the text (small, quick; for tests and toy runs).
- :func:`load_stdlib_corpus`: the language-modelling corpus. Every ``*.py`` file
  of the standard library and its subpackages (10.7 MB on CPython 3.11,
  test suites and codec tables excluded), split **by file** into train /
  validation / test (a file's split is a hash of its relative path, so it never
  moves when other files are added), encoded with the fixed vocabulary
  :data:`FIXED_VOCAB` (printable ASCII, tab and newline, and one unknown symbol),
  returned as a :class:`TextCorpus` of id streams that cuts windows, samples
  batches and counts bits per character.
"""

from __future__ import annotations

import os
import sysconfig
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
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


# ----------------------------------------------------------------------------- the LM corpus

#: The fixed vocabulary of :func:`load_stdlib_corpus`: tab, newline, the 95 printable ASCII
#: characters and, last, ``UNKNOWN`` for every other character (98 symbols, sorted).
UNKNOWN = "\ufffd"
FIXED_VOCAB: tuple[str, ...] = ("\t", "\n", *(chr(c) for c in range(32, 127)), UNKNOWN)

#: Directory names skipped by :func:`load_stdlib_corpus` by default: test suites (a third of
#: the library, much of it generated data), installed packages, caches and codec tables.
DEFAULT_EXCLUDE: tuple[str, ...] = ("site-packages", "test", "tests", "idle_test", "__pycache__", "encodings")

SPLITS: tuple[str, ...] = ("train", "validation", "test")


@dataclass(frozen=True, eq=False, repr=False)
class TextCorpus:
    """A character corpus split by file into train / validation / test id streams.

    Attributes:
      train: uint8 ids of the training text (the training files concatenated).
      validation: uint8 ids of the validation text.
      test: uint8 ids of the test text.
      vocab: the characters indexed by the ids (:data:`FIXED_VOCAB` for
        :func:`load_stdlib_corpus`).
      files: split name -> the relative paths of the files it holds, in reading order.
      name: short identifier, e.g. ``"stdlib_py"``.
      unknown_fraction: fraction of all characters read that were mapped to the unknown id.

    Example:
      >>> corpus = load_stdlib_corpus(max_train_chars=20_000, max_eval_chars=5_000)
      >>> corpus.vocab_size, len(corpus.train)
      (98, 20000)
      >>> set(corpus.files["train"]) & set(corpus.files["test"])
      set()
    """

    train: np.ndarray
    validation: np.ndarray
    test: np.ndarray
    vocab: tuple[str, ...]
    files: dict
    name: str
    unknown_fraction: float = 0.0

    @property
    def vocab_size(self) -> int:
        """The number of symbols, ``len(vocab)``."""
        return len(self.vocab)

    def __repr__(self) -> str:
        sizes = ", ".join(f"{s}={len(self.split(s)):,} chars / {len(self.files[s])} files" for s in SPLITS)
        return f"TextCorpus(name={self.name!r}, {sizes}, vocab_size={self.vocab_size})"

    def split(self, name: str) -> np.ndarray:
        """The id stream of split ``name`` (``"train"``, ``"validation"`` or ``"test"``).

        Args:
          name: the split.

        Returns:
          The uint8 ids.

        Example:
          >>> corpus = load_stdlib_corpus(max_train_chars=1000, max_eval_chars=500)
          >>> corpus.split("validation").dtype
          dtype('uint8')
        """
        if name not in SPLITS:
            raise ValueError(
                f"split must be one of {SPLITS}, got {name!r}. Fix: pass e.g. split='validation'."
            )
        return getattr(self, name)

    def windows(self, split: str, seq_len: int, *, max_windows: int | None = None,
                seed: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Consecutive non-overlapping next-character windows of a split.

        Window ``i`` reads ids ``[i * seq_len, (i + 1) * seq_len]``: ``x`` the first
        ``seq_len``, ``y`` the same shifted by one, so every character of the split (but
        the first) is a target exactly once. Evaluating on all windows gives the split's
        bits per character.

        Args:
          split: ``"train"``, ``"validation"`` or ``"test"``.
          seq_len: tokens per window (>= 1).
          max_windows: keep only the first this many windows of that order (None: all): with
            a seed, a random subset spread over the whole split.
          seed: shuffle the window order with this seed (None: text order).

        Returns:
          ``(x, y)`` int32 arrays of shape ``(N, seq_len)``.

        Example:
          >>> corpus = load_stdlib_corpus(max_train_chars=1000, max_eval_chars=500)
          >>> x, y = corpus.windows("train", 32)
          >>> x.shape, bool((x[:, 1:] == y[:, :-1]).all())
          ((31, 32), True)
        """
        ids = self.split(split)
        seq_len = check_int("seq_len", seq_len, minimum=1)
        count = max(len(ids) - 1, 0) // seq_len
        keep = count if max_windows is None else min(count, check_int("max_windows", max_windows, minimum=1))
        if count == 0:
            raise ValueError(
                f"the {split} split holds {len(ids)} characters, fewer than seq_len + 1 = {seq_len + 1}. "
                f"Fix: lower seq_len, or raise the character budget of that split."
            )
        starts = np.arange(count) * seq_len
        if seed is not None:
            starts = np.random.default_rng(check_seed("seed", seed)).permutation(starts)
        return _cut(ids, starts[:keep], seq_len)

    def sample_batch(self, rng: np.random.Generator, batch_size: int, seq_len: int,
                     split: str = "train") -> tuple[np.ndarray, np.ndarray]:
        """``batch_size`` windows at uniformly random offsets of a split (for training).

        Args:
          rng: a ``numpy.random.Generator`` (advanced in place).
          batch_size: windows per batch (>= 1).
          seq_len: tokens per window (>= 1).
          split: the split to sample.

        Returns:
          ``(x, y)`` int32 arrays of shape ``(batch_size, seq_len)``, ``y`` shifted by one.

        Example:
          >>> corpus = load_stdlib_corpus(max_train_chars=1000, max_eval_chars=500)
          >>> x, y = corpus.sample_batch(np.random.default_rng(0), 4, 16)
          >>> x.shape, x.dtype
          ((4, 16), dtype('int32'))
        """
        if not isinstance(rng, np.random.Generator):
            raise TypeError(
                f"rng must be a numpy.random.Generator, got {type(rng).__name__}. "
                f"Fix: pass rng=np.random.default_rng(seed)."
            )
        ids = self.split(split)
        batch_size = check_int("batch_size", batch_size, minimum=1)
        seq_len = check_int("seq_len", seq_len, minimum=1)
        if len(ids) < seq_len + 1:
            raise ValueError(
                f"the {split} split holds {len(ids)} characters, fewer than seq_len + 1 = {seq_len + 1}. "
                f"Fix: lower seq_len, or raise the character budget of that split."
            )
        starts = rng.integers(0, len(ids) - seq_len, size=batch_size)
        return _cut(ids, starts, seq_len)

    def dataset(self, seq_len: int, *, eval_split: str = "validation", max_train_windows: int | None = None,
                max_eval_windows: int | None = None, seed: int = 0, eval_seed: int | None = None) -> Dataset:
        """The corpus as a :class:`Dataset` of windows for ``deq.train.fit``.

        Args:
          seq_len: tokens per window.
          eval_split: the split placed in ``x_test`` / ``y_test`` (``"validation"`` while
            tuning; ``"test"`` once, for the final number).
          max_train_windows: cap on training windows (None: all).
          max_eval_windows: cap on evaluation windows (None: all), taken from the start of
            the split, or at random over it with ``eval_seed``.
          seed: shuffle of the training windows.
          eval_seed: draw the capped evaluation windows at random over the whole split with
            this seed (None: the first ones, which may all come from one file).

        Returns:
          A :class:`Dataset` named ``"<name>/<eval_split>"`` with the fixed vocabulary.

        Example:
          >>> corpus = load_stdlib_corpus(max_train_chars=2000, max_eval_chars=500)
          >>> ds = corpus.dataset(16, max_eval_windows=8)
          >>> ds.x_train.shape[1], ds.x_test.shape, ds.num_classes
          (16, (8, 16), 98)
        """
        if eval_split not in ("validation", "test"):
            raise ValueError(
                f"eval_split must be 'validation' or 'test', got {eval_split!r}. "
                f"Fix: pass eval_split='validation' (or 'test' for the final evaluation)."
            )
        x_train, y_train = self.windows("train", seq_len, seed=check_seed("seed", seed))
        if max_train_windows is not None:
            keep = check_int("max_train_windows", max_train_windows, minimum=1)
            x_train, y_train = x_train[:keep], y_train[:keep]
        x_test, y_test = self.windows(eval_split, seq_len, max_windows=max_eval_windows, seed=eval_seed)
        return Dataset(x_train, y_train, x_test, y_test, self.vocab_size, f"{self.name}/{eval_split}",
                       (seq_len,), self.vocab)


def load_stdlib_corpus(
    *,
    root: str | os.PathLike[str] | None = None,
    validation_fraction: float = 0.05,
    test_fraction: float = 0.05,
    max_train_chars: int | None = None,
    max_eval_chars: int | None = None,
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
) -> TextCorpus:
    """The standard library's Python source as a character corpus split by file.

    Every ``*.py`` file under ``root`` (recursively, skipping directories named in
    ``exclude``) is assigned to a split by the CRC-32 of its relative path:
    ``h = crc32(path) % 10_000 / 10_000``; validation if ``h < validation_fraction``,
    test if ``h < validation_fraction + test_fraction``, train otherwise. Whole files
    therefore never straddle two splits (no leakage through a file's repeated
    identifiers), and a file keeps its split when other files come and go. Files are
    read in sorted path order, newlines normalized to ``"\\n"``, and encoded with
    :data:`FIXED_VOCAB`: characters outside it map to :data:`UNKNOWN` (under 0.01% of
    the characters on CPython 3.11, see ``unknown_fraction``).

    Args:
      root: directory to read; None means ``sysconfig.get_paths()["stdlib"]``.
      validation_fraction: expected fraction of files in the validation split.
      test_fraction: expected fraction of files in the test split (the two add to < 1).
      max_train_chars: keep the first this many training characters (None: all, 9.4 MB
        in 556 files with the defaults on CPython 3.11).
      max_eval_chars: keep the first this many characters of validation and of test
        (None: all; 0.73 MB in 29 files and 0.56 MB in 27 files on CPython 3.11).
      exclude: directory names skipped at any depth.

    Returns:
      A :class:`TextCorpus` named ``"stdlib_py"``.

    Raises:
      FileNotFoundError: ``root`` holds no ``*.py`` files.
      ValueError: a split with a positive fraction received no file.

    Example:
      >>> corpus = load_stdlib_corpus(max_train_chars=5000, max_eval_chars=1000)
      >>> len(corpus.train), len(corpus.validation), len(corpus.test)
      (5000, 1000, 1000)
      >>> corpus.vocab == FIXED_VOCAB, corpus.vocab_size
      (True, 98)
    """
    validation_fraction = check_fraction("validation_fraction", validation_fraction)
    test_fraction = check_fraction("test_fraction", test_fraction)
    if validation_fraction + test_fraction >= 1.0:
        raise ValueError(
            f"validation_fraction + test_fraction must be < 1 (some files must train), got "
            f"{validation_fraction} + {test_fraction}. Fix: lower them, e.g. 0.05 each."
        )
    if max_train_chars is not None:
        max_train_chars = check_int("max_train_chars", max_train_chars, minimum=1)
    if max_eval_chars is not None:
        max_eval_chars = check_int("max_eval_chars", max_eval_chars, minimum=1)
    if isinstance(exclude, str):
        raise TypeError(
            f"exclude must be a sequence of directory names, got the string {exclude!r}. "
            f"Fix: pass exclude=({exclude!r},)."
        )
    directory = Path(sysconfig.get_paths()["stdlib"] if root is None else root)
    if not directory.is_dir():
        raise FileNotFoundError(
            f"root must be a directory of *.py files, got {str(directory)!r}, which is not a directory. "
            f"Fix: pass root=<a directory containing .py files>."
        )
    skip = set(exclude)
    files = sorted(
        p.relative_to(directory).as_posix() for p in directory.rglob("*.py")
        if p.is_file() and not skip.intersection(p.relative_to(directory).parts[:-1])
    )
    if not files:
        raise FileNotFoundError(
            f"no *.py files found under {str(directory)!r} (excluding directories named {sorted(skip)}) "
            f"to build the corpus. Fix: pass root=<a directory containing .py files>."
        )
    by_split: dict[str, list[str]] = {s: [] for s in SPLITS}
    for rel in files:
        h = (zlib.crc32(rel.encode("utf-8")) % 10_000) / 10_000
        split = "validation" if h < validation_fraction else "test" if h < validation_fraction + test_fraction else "train"
        by_split[split].append(rel)
    for split, fraction in (("train", 1.0), ("validation", validation_fraction), ("test", test_fraction)):
        if fraction > 0 and not by_split[split]:
            raise ValueError(
                f"no file of the {len(files)} under {str(directory)!r} fell in the {split} split "
                f"(fraction {fraction}). Fix: use a directory with more files, or raise the fraction."
            )
    budgets = {"train": max_train_chars, "validation": max_eval_chars, "test": max_eval_chars}
    streams, kept, unknown, total = {}, {}, 0, 0
    for split in SPLITS:
        parts, used, remaining = [], [], budgets[split]
        for rel in by_split[split]:
            if remaining is not None and remaining <= 0:
                break
            text = (directory / rel).read_text(encoding="utf-8", errors="replace")
            if remaining is not None:
                text = text[:remaining]
                remaining -= len(text)
            parts.append(text)
            used.append(rel)
        ids, unk = _encode_fixed("".join(parts))
        streams[split], kept[split] = ids, tuple(used)
        unknown, total = unknown + unk, total + len(ids)
    return TextCorpus(streams["train"], streams["validation"], streams["test"], FIXED_VOCAB, kept,
                      "stdlib_py", unknown / max(total, 1))


def _encode_fixed(text: str) -> tuple[np.ndarray, int]:
    """``text`` as uint8 ids of :data:`FIXED_VOCAB`, and how many characters were unknown."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    table = np.full(128, len(FIXED_VOCAB) - 1, dtype=np.uint8)
    for i, ch in enumerate(FIXED_VOCAB[:-1]):
        table[ord(ch)] = i
    ids = np.where(codes < 128, table[np.minimum(codes, 127)], len(FIXED_VOCAB) - 1).astype(np.uint8)
    return ids, int(np.count_nonzero(ids == len(FIXED_VOCAB) - 1))


def _cut(ids: np.ndarray, starts: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.arange(seq_len)
    x = ids[starts[:, None] + offsets].astype(np.int32)
    y = ids[starts[:, None] + offsets + 1].astype(np.int32)
    return x, y
