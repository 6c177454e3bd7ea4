"""Tests for the offline data loaders in ``deq.data``."""

from __future__ import annotations

import dataclasses
import doctest
import random
import socket

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import deq.data as data
from deq.data import algorithmic, batching, dataset, images, mnist1d_data, text

# ----------------------------------------------------------------------------- helpers


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any attempt to open a network connection fail loudly."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("network access attempted during an offline load")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def write_npz(path, x_train, y_train, x_test, y_test) -> None:
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)


def assert_same_dataset(a: data.Dataset, b: data.Dataset) -> None:
    for field in ("x_train", "y_train", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))


def assert_classification(ds: data.Dataset, input_shape: tuple[int, ...], num_classes: int) -> None:
    assert ds.num_classes == num_classes
    assert ds.input_shape == input_shape
    for x, y in ((ds.x_train, ds.y_train), (ds.x_test, ds.y_test)):
        assert x.dtype == np.float32 and x.shape[1:] == input_shape
        assert y.dtype == np.int32 and y.shape == (len(x),)
        assert y.min() >= 0 and y.max() < num_classes


# ----------------------------------------------------------------------------- offline


def test_all_loaders_work_without_network(no_network: None, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(AssertionError, match="network"):  # the guard itself works
        socket.create_connection(("example.com", 80))
    import mnist1d.data

    def no_download(*args: object, **kwargs: object) -> None:
        raise AssertionError("mnist1d.get_dataset (which may download) was called")

    monkeypatch.setattr(mnist1d.data, "get_dataset", no_download)
    mnist1d_data._generate.cache_clear()  # force a real generation under the guard
    assert len(data.load_digits().x_train) > 0
    assert len(data.load_mnist1d(num_samples=200, seed=123).x_train) == 160
    assert len(data.load_text_corpus(max_chars=2000, seq_len=16).x_train) > 0
    assert len(data.load_algorithmic("parity", num_train=8, num_test=8).x_train) == 8
    path = tmp_path / "mnist.npz"
    write_npz(path, np.zeros((2, 28, 28), np.uint8), [0, 1], np.zeros((1, 28, 28), np.uint8), [2])
    assert len(data.load_mnist(path).x_train) == 2


# ----------------------------------------------------------------------------- digits


def test_digits_shapes_dtypes_and_range() -> None:
    ds = data.load_digits(test_fraction=0.25, seed=0)
    assert_classification(ds, (8, 8, 1), 10)
    assert len(ds.x_train) + len(ds.x_test) == 1797
    assert len(ds.x_test) == round(1797 * 0.25)
    assert ds.x_train.min() >= 0.0 and ds.x_train.max() == 1.0
    assert set(np.unique(ds.y_train)) == set(range(10))
    assert ds.name == "digits"


def test_digits_unnormalized_keeps_raw_pixels() -> None:
    ds = data.load_digits(normalize=False)
    assert ds.x_train.dtype == np.float32 and ds.x_train.max() == 16.0


def test_digits_split_is_deterministic_by_seed() -> None:
    assert_same_dataset(data.load_digits(seed=3), data.load_digits(seed=3))
    assert not np.array_equal(data.load_digits(seed=3).y_train, data.load_digits(seed=4).y_train)


@pytest.mark.parametrize("bad", [1.0, -0.1, 2])
def test_bad_test_fraction_is_rejected(bad: float) -> None:
    with pytest.raises(ValueError, match="test_fraction"):
        data.load_digits(test_fraction=bad)


def test_bad_seed_type_is_rejected() -> None:
    with pytest.raises(TypeError, match="seed"):
        data.load_digits(seed=1.5)


# ----------------------------------------------------------------------------- mnist1d


def test_mnist1d_shapes_dtypes_and_labels() -> None:
    ds = data.load_mnist1d(num_samples=300, test_fraction=0.2, seed=0)
    assert_classification(ds, (40,), 10)
    assert (len(ds.x_train), len(ds.x_test)) == (240, 60)
    assert np.isfinite(ds.x_train).all()
    assert set(np.unique(np.concatenate([ds.y_train, ds.y_test]))) == set(range(10))


def test_mnist1d_is_deterministic_and_seed_dependent() -> None:
    a = data.load_mnist1d(num_samples=300, seed=0)
    assert_same_dataset(a, data.load_mnist1d(num_samples=300, seed=0))
    assert not np.allclose(a.x_train, data.load_mnist1d(num_samples=300, seed=1).x_train)


def test_mnist1d_leaves_global_rngs_untouched() -> None:
    np.random.seed(7)
    random.seed(7)
    expected = (np.random.rand(), random.random())
    np.random.seed(7)
    random.seed(7)
    mnist1d_data._generate.cache_clear()
    data.load_mnist1d(num_samples=100, seed=5)
    assert (np.random.rand(), random.random()) == expected


def test_mnist1d_cache_cannot_be_corrupted_by_callers() -> None:
    a = data.load_mnist1d(num_samples=100, seed=0)
    a.x_train[:] = 0.0
    assert data.load_mnist1d(num_samples=100, seed=0).x_train.any()


def test_mnist1d_disk_cache_round_trip(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = data.load_mnist1d(num_samples=100, seed=2, cache_dir=tmp_path / "cache")
    assert (tmp_path / "cache" / "mnist1d_n100_seed2.npz").is_file()

    def fail(*args: object) -> None:
        raise AssertionError("should have been read from the disk cache")

    monkeypatch.setattr(mnist1d_data, "_generate", fail)
    assert_same_dataset(first, data.load_mnist1d(num_samples=100, seed=2, cache_dir=tmp_path / "cache"))


@pytest.mark.parametrize("bad, error", [(105, ValueError), (0, ValueError), (100.0, TypeError)])
def test_mnist1d_bad_num_samples(bad: object, error: type[Exception]) -> None:
    with pytest.raises(error, match="num_samples"):
        data.load_mnist1d(num_samples=bad)


# ----------------------------------------------------------------------------- algorithmic


def test_prefix_parity_labels_match_direct_computation() -> None:
    x, y = data.make_prefix_parity(5, 12, seed=0)
    assert x.shape == (5, 12, 1) and x.dtype == np.float32
    assert y.shape == (5, 12) and y.dtype == np.int32
    assert set(np.unique(x)) <= {0.0, 1.0}
    for bits, labels in zip(x[..., 0].astype(int), y):
        running = [sum(bits[: t + 1]) % 2 for t in range(len(bits))]
        assert labels.tolist() == running


def test_parity_labels_match_direct_computation() -> None:
    x, y = data.make_parity(6, 9, seed=1)
    assert x.shape == (6, 9, 1) and y.shape == (6,) and y.dtype == np.int32
    assert y.tolist() == [int(b.sum()) % 2 for b in x[..., 0]]


def test_algorithmic_is_deterministic_by_seed() -> None:
    np.testing.assert_array_equal(data.make_parity(4, 8, seed=3)[0], data.make_parity(4, 8, seed=3)[0])
    assert not np.array_equal(data.make_parity(4, 32, seed=3)[0], data.make_parity(4, 32, seed=4)[0])


def test_load_algorithmic_tests_on_longer_strings() -> None:
    ds = data.load_algorithmic("prefix_parity", train_length=4, test_length=10, num_train=32, num_test=8, seed=0)
    assert ds.x_train.shape == (32, 4, 1) and ds.y_train.shape == (32, 4)
    assert ds.x_test.shape == (8, 10, 1) and ds.y_test.shape == (8, 10)
    assert ds.input_shape == (None, 1) and ds.num_classes == 2 and ds.name == "prefix_parity"
    np.testing.assert_array_equal(ds.y_test, np.cumsum(ds.x_test[..., 0], axis=1).astype(int) % 2)


def test_algorithmic_misuse_names_the_argument() -> None:
    with pytest.raises(ValueError, match="length"):
        data.make_prefix_parity(4, 0)
    with pytest.raises(ValueError, match="num_samples"):
        data.make_parity(0, 4)
    with pytest.raises(ValueError, match="task.*'parity'.*'parityy'"):
        data.load_algorithmic("parityy")
    with pytest.raises(ValueError, match="test_length"):
        data.load_algorithmic("parity", test_length=0)


# ----------------------------------------------------------------------------- text


def test_text_targets_are_inputs_shifted_by_one() -> None:
    ds = data.load_text_corpus(max_chars=20_000, seq_len=32, seed=0)
    corpus = data.read_source_text(max_chars=20_000)
    assert ds.x_train.shape[1:] == (32,) and ds.x_train.dtype == np.int32
    assert ds.y_train.shape == ds.x_train.shape and ds.y_test.shape == ds.x_test.shape
    np.testing.assert_array_equal(ds.y_train[:, :-1], ds.x_train[:, 1:])
    for x, y in [(ds.x_train[0], ds.y_train[0]), (ds.x_test[-1], ds.y_test[-1])]:
        window = data.decode_text(x, ds.vocab) + data.decode_text(y[-1:], ds.vocab)
        assert window in corpus
    assert len(ds.x_test) > 0


def test_text_vocab_and_ranges() -> None:
    ds = data.load_text_corpus(max_chars=5000, seq_len=16)
    assert list(ds.vocab) == sorted(set(ds.vocab)) and all(len(ch) == 1 for ch in ds.vocab)
    assert ds.num_classes == len(ds.vocab) and ds.input_shape == (16,)
    assert ds.x_train.max() < ds.num_classes and ds.y_test.min() >= 0
    assert data.decode_text(data.encode_text("def ", ds.vocab), ds.vocab) == "def "


def test_text_is_deterministic_and_respects_budget() -> None:
    assert_same_dataset(data.load_text_corpus(max_chars=5000, seed=1), data.load_text_corpus(max_chars=5000, seed=1))
    assert len(data.read_source_text(max_chars=1234)) == 1234


def test_text_from_custom_root(tmp_path) -> None:
    (tmp_path / "b.py").write_text("bbbb\n")
    (tmp_path / "a.py").write_text("aaaa\n")
    (tmp_path / "c.txt").write_text("ignored")
    assert data.read_source_text(max_chars=100, root=tmp_path) == "aaaa\nbbbb\n"
    ds = data.load_text_corpus(max_chars=100, seq_len=2, test_fraction=0.0, root=tmp_path)
    assert ds.vocab == ("\n", "a", "b") and ds.x_test.shape == (0, 2)


def test_text_errors(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="root"):
        data.read_source_text(max_chars=10, root=tmp_path)
    with pytest.raises(ValueError, match="max_chars"):
        data.load_text_corpus(max_chars=10, seq_len=64)
    with pytest.raises(ValueError, match="unknown"):
        data.encode_text("xyz", ("x",))


# ----------------------------------------------------------------------------- npz


def test_missing_npz_gives_clear_error(tmp_path) -> None:
    path = tmp_path / "nowhere" / "mnist.npz"
    with pytest.raises(FileNotFoundError) as info:
        data.load_mnist(path)
    message = str(info.value)
    assert str(path) in message
    for key in data.NPZ_KEYS:
        assert key in message
    assert "numpy.savez" in message


def test_npz_missing_keys_is_reported(tmp_path) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, x_train=np.zeros((2, 28, 28), np.uint8), y_train=np.zeros(2, int))
    with pytest.raises(ValueError, match=r"missing \['x_test', 'y_test'\]"):
        data.load_mnist(path)


def test_mnist_npz_loads_and_normalizes(tmp_path) -> None:
    rng = np.random.default_rng(0)
    x_train = rng.integers(0, 256, (6, 28, 28), dtype=np.uint8)
    path = tmp_path / "mnist.npz"
    write_npz(path, x_train, np.arange(6), rng.integers(0, 256, (3, 28, 28), dtype=np.uint8), [9, 0, 1])
    ds = data.load_mnist(path)
    assert_classification(ds, (28, 28, 1), 10)
    assert ds.name == "mnist"
    np.testing.assert_allclose(ds.x_train[..., 0], x_train / 255.0, rtol=1e-6)
    assert ds.y_test.tolist() == [9, 0, 1]


@pytest.mark.parametrize("layout", ["channels_last", "channels_first"])
def test_cifar10_npz_loads_channels_last(tmp_path, layout: str) -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    saved = x if layout == "channels_last" else x.transpose(0, 3, 1, 2)
    path = tmp_path / "cifar10.npz"
    write_npz(path, saved, np.array([[0], [1], [2], [3]]), saved[:2], np.array([[5], [6]]))
    ds = data.load_cifar10(path)
    assert_classification(ds, (32, 32, 3), 10)
    np.testing.assert_allclose(ds.x_train, x / 255.0, rtol=1e-6)
    assert ds.y_train.tolist() == [0, 1, 2, 3]


def test_npz_wrong_shape_or_labels_rejected(tmp_path) -> None:
    path = tmp_path / "wrong.npz"
    write_npz(path, np.zeros((2, 32, 32, 3), np.uint8), [0, 1], np.zeros((1, 32, 32, 3), np.uint8), [1])
    with pytest.raises(ValueError, match=r"\(N, 28, 28\)"):
        data.load_mnist(path)
    write_npz(path, np.zeros((2, 8, 8), np.uint8), [0, 12], np.zeros((1, 8, 8), np.uint8), [1])
    with pytest.raises(ValueError, match="num_classes"):
        data.load_npz(path, name="x", num_classes=10)
    assert data.load_npz(path, name="x").num_classes == 13


# ----------------------------------------------------------------------------- batching


def test_batches_cover_every_sample_once_per_epoch() -> None:
    x, y = np.arange(23)[:, None] * 10, np.arange(23)
    batches = list(data.iterate_batches(x, y, 5, seed=0, drop_last=False, epochs=3))
    assert len(batches) == 3 * data.num_batches(23, 5, drop_last=False) == 15
    for epoch in range(3):
        seen = np.concatenate([yb for _, yb in batches[epoch * 5 : (epoch + 1) * 5]])
        assert sorted(seen.tolist()) == list(range(23))
    for xb, yb in batches:
        np.testing.assert_array_equal(xb[:, 0], yb * 10)  # x and y stay aligned


def test_batches_drop_last_and_determinism() -> None:
    x, y = np.arange(23, dtype=np.float32), np.arange(23)
    batches = list(data.iterate_batches(x, y, 5, seed=1, epochs=2))
    assert len(batches) == 2 * data.num_batches(23, 5) == 8
    assert all(xb.shape == (5,) and yb.shape == (5,) for xb, yb in batches)
    again = list(data.iterate_batches(x, y, 5, seed=1, epochs=2))
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(batches, again))
    assert not np.array_equal(batches[0][1], batches[4][1])  # fresh order per epoch
    in_order = [yb.tolist() for _, yb in data.iterate_batches(x, y, 10, shuffle=False)]
    assert in_order == [list(range(10)), list(range(10, 20))]


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 40), batch_size=st.integers(1, 12), seed=st.integers(0, 2**32 - 1))
def test_batches_property(n: int, batch_size: int, seed: int) -> None:
    y = np.arange(n)
    seen = np.concatenate([yb for _, yb in data.iterate_batches(y, y, batch_size, seed=seed, drop_last=False)])
    assert np.array_equal(np.sort(seen), y)
    if n >= batch_size:
        kept = [yb for _, yb in data.iterate_batches(y, y, batch_size, seed=seed)]
        assert len(kept) == n // batch_size and all(len(b) == batch_size for b in kept)


def test_batching_misuse_is_rejected_eagerly() -> None:
    x = np.zeros(4)
    with pytest.raises(ValueError, match="batch_size"):
        data.iterate_batches(x, x, 0)
    with pytest.raises(TypeError, match="batch_size"):
        data.iterate_batches(x, x, 2.0)
    with pytest.raises(ValueError, match="batch_size.*drop_last=False"):
        data.iterate_batches(x, x, 8)
    with pytest.raises(ValueError, match="same number of samples"):
        data.iterate_batches(x, np.zeros(3), 2)
    with pytest.raises(ValueError, match="epochs"):
        data.iterate_batches(x, x, 2, epochs=0)
    with pytest.raises(ValueError, match="batch_size"):
        data.num_batches(4, 0, drop_last=True)


# ----------------------------------------------------------------------------- misc


def test_dataset_is_frozen_and_validated() -> None:
    ds = data.load_algorithmic("parity", num_train=4, num_test=2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        ds.name = "other"  # type: ignore[misc]
    with pytest.raises(ValueError, match="x_train and y_train"):
        dataclasses.replace(ds, y_train=ds.y_train[:2])
    assert "parity" in repr(ds)


@pytest.mark.parametrize("module", [algorithmic, batching, dataset, images, mnist1d_data, text])
def test_docstring_examples_run(module) -> None:
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0 and result.attempted > 0


def test_public_functions_have_documented_sections() -> None:
    for name in data.__all__:
        obj = getattr(data, name)
        if callable(obj) and not isinstance(obj, type):
            doc = obj.__doc__ or ""
            assert "Args:" in doc and "Returns:" in doc and "Example:" in doc, name
