"""Offline data loaders for deep equilibrium model experiments.

Every loader returns numpy arrays in a :class:`Dataset` and never touches the
network: scikit-learn's bundled digits, MNIST-1D generated locally, synthetic
algorithmic tasks (parity, prefix parity) with a length knob, a character-level
corpus made of the Python standard library's source (and a larger one split by
file into train / validation / test for language modelling), and MNIST / CIFAR-10 read
from local ``.npz`` files. :func:`iterate_batches` turns arrays into minibatches.
"""

from deq.data.algorithmic import TASKS, load_algorithmic, make_parity, make_prefix_parity
from deq.data.batching import iterate_batches, num_batches
from deq.data.dataset import Dataset, split_train_test
from deq.data.images import NPZ_KEYS, load_cifar10, load_digits, load_mnist, load_npz
from deq.data.mnist1d_data import load_mnist1d
from deq.data.text import (
    FIXED_VOCAB,
    TextCorpus,
    decode_text,
    encode_text,
    load_stdlib_corpus,
    load_text_corpus,
    read_source_text,
)

__all__ = [
    "FIXED_VOCAB",
    "NPZ_KEYS",
    "TASKS",
    "Dataset",
    "TextCorpus",
    "decode_text",
    "encode_text",
    "iterate_batches",
    "load_algorithmic",
    "load_cifar10",
    "load_digits",
    "load_mnist",
    "load_mnist1d",
    "load_npz",
    "load_stdlib_corpus",
    "load_text_corpus",
    "make_parity",
    "make_prefix_parity",
    "num_batches",
    "read_source_text",
    "split_train_test",
]
