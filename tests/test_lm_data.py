"""The language-modelling corpus: split by file, fixed vocabulary, windows, errors."""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from deq import data
from deq.data import text


def _tree(tmp_path, count=60):
    for i in range(count):
        sub = tmp_path / ("pkg" if i % 3 else "") / ("test" if i % 7 == 0 else "")
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"m{i:03d}.py").write_text(f"# file {i}\nx = {i}\n\u00e9\n")
    return tmp_path


def test_split_is_by_file_and_follows_the_path_hash(tmp_path) -> None:
    root = _tree(tmp_path)
    corpus = data.load_stdlib_corpus(root=root, validation_fraction=0.2, test_fraction=0.2)
    files = corpus.files
    assert all(set(files[a]).isdisjoint(files[b]) for a, b in [("train", "validation"), ("train", "test"),
                                                                  ("validation", "test")])
    every = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.py") if "test" not in p.parts)
    assert sorted(files["train"] + files["validation"] + files["test"]) == every  # test dirs excluded
    for split, rel in [(s, r) for s in text.SPLITS for r in files[s]]:
        h = (zlib.crc32(rel.encode()) % 10_000) / 10_000  # independent recomputation of the rule
        assert split == ("validation" if h < 0.2 else "test" if h < 0.4 else "train")
    # each split's stream is its files' text, in order, through the fixed vocabulary
    for split in text.SPLITS:
        expected = "".join((root / rel).read_text() for rel in files[split]).replace("\u00e9", text.UNKNOWN)
        assert data.decode_text(corpus.split(split), corpus.vocab) == expected
    assert corpus.unknown_fraction == pytest.approx(len(every) / sum(len((root / r).read_text()) for r in every))


def test_fixed_vocabulary_and_real_corpus_size() -> None:
    assert len(data.FIXED_VOCAB) == 98 and list(data.FIXED_VOCAB) == sorted(set(data.FIXED_VOCAB))
    corpus = data.load_stdlib_corpus(max_eval_chars=1000)
    assert corpus.vocab == data.FIXED_VOCAB and corpus.train.dtype == np.uint8
    assert len(corpus.train) > 3_000_000  # "at least a few MB of training text"
    assert len(corpus.validation) == len(corpus.test) == 1000
    assert corpus.unknown_fraction < 0.01


def test_windows_batches_and_dataset() -> None:
    corpus = data.load_stdlib_corpus(max_train_chars=4000, max_eval_chars=1000)
    x, y = corpus.windows("validation", 10)
    assert x.shape == (99, 10) and x.dtype == np.int32
    np.testing.assert_array_equal(np.concatenate([x[:, :1], y], axis=1).ravel()[: 11],
                                  corpus.validation[:11])
    np.testing.assert_array_equal(y.ravel(), corpus.validation[1: 1 + y.size])  # every target once
    xs, ys = corpus.windows("train", 10, max_windows=5, seed=3)
    assert xs.shape == (5, 10) and (xs[:, 1:] == ys[:, :-1]).all()
    aligned = {tuple(w): i for i, w in reversed(list(enumerate(corpus.windows("train", 10)[0])))}
    index = [aligned[tuple(w)] for w in xs]  # every one is an aligned window ...
    assert max(index) > 50  # ... from all over the split, not the first five
    xb, yb = corpus.sample_batch(np.random.default_rng(0), 7, 12)
    assert xb.shape == yb.shape == (7, 12) and (xb[:, 1:] == yb[:, :-1]).all()
    ds = corpus.dataset(16, eval_split="test", max_train_windows=20, max_eval_windows=4)
    assert ds.x_train.shape == (20, 16) and ds.x_test.shape == (4, 16) and ds.num_classes == 98
    assert ds.name == "stdlib_py/test" and "stdlib_py" in repr(corpus)


def test_misuse_messages(tmp_path) -> None:
    corpus = data.load_stdlib_corpus(max_train_chars=100, max_eval_chars=50)
    with pytest.raises(ValueError, match="split must be one of"):
        corpus.split("valid")
    with pytest.raises(ValueError, match="fewer than seq_len"):
        corpus.windows("test", 64)
    with pytest.raises(ValueError, match="fewer than seq_len"):
        corpus.sample_batch(np.random.default_rng(0), 2, 500)
    with pytest.raises(TypeError, match="numpy.random.Generator"):
        corpus.sample_batch(0, 2, 5)
    with pytest.raises(ValueError, match="eval_split"):
        corpus.dataset(8, eval_split="train")
    with pytest.raises(ValueError, match="validation_fraction \\+ test_fraction"):
        data.load_stdlib_corpus(validation_fraction=0.5, test_fraction=0.5)
    with pytest.raises(TypeError, match="exclude"):
        data.load_stdlib_corpus(exclude="test")
    with pytest.raises(FileNotFoundError, match="no \\*.py files"):
        data.load_stdlib_corpus(root=tmp_path)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        data.load_stdlib_corpus(root=tmp_path / "missing")
    (tmp_path / "a.py").write_text("a\n")
    with pytest.raises(ValueError, match="fell in the"):
        data.load_stdlib_corpus(root=tmp_path)

