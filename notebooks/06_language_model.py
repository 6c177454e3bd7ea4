# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 06 · A character-level DEQ-Transformer language model
#
# The flagship results of deep equilibrium models are sequence models: the DEQ-Transformer
# (Bai, Kolter & Koltun, *Deep Equilibrium Models*, NeurIPS 2019) finds the fixed point
# `z* = f(z*, u)` of **one** causal Transformer block, with `u` the token and position
# embeddings, and matched an 18-layer Transformer-XL on WikiText-103. Here we train a tiny one
# on the Python standard library's source code, read its solver statistics, and sample text
# from it.
#
# Everything is small enough to run on a laptop CPU in well under a minute; the last cell says
# how to scale it up.

# %%
import time
import warnings

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from flax import nnx

import deq
import deq.train
from deq.data import decode_text, load_stdlib_corpus

# %% [markdown]
# ## The corpus: the standard library, split by file
#
# `load_stdlib_corpus` reads every `*.py` file of the running Python's standard library (9.4 MB
# of training text on CPython 3.11; nothing is downloaded), assigns whole files to train,
# validation or test by a hash of their path, and encodes them with a fixed 98-symbol
# vocabulary (printable ASCII, tab, newline, one unknown symbol). We keep the first 300 kB of
# training text.

# %%
corpus = load_stdlib_corpus(max_train_chars=300_000, max_eval_chars=20_000)
print(corpus)
print(repr(decode_text(corpus.train[:160], corpus.vocab)))
SEQ = 32
ds = corpus.dataset(SEQ, eval_split="validation", max_eval_windows=64)
print("training windows", ds.x_train.shape, "validation windows", ds.x_test.shape)

# %% [markdown]
# ## The model
#
# `deq.nn.TransformerDEQLM` embeds the characters, solves for the fixed point of one causal
# pre-LN Transformer block (`deq.nn.TransformerCell`) with Anderson acceleration, and reads
# next-character logits at every position. Its gradient is the implicit one (IFT), so training
# memory does not grow with the number of solver steps. The same block applied `K` times with
# tied weights is `deq.nn.UnrolledTransformerLM`; `K` untied blocks at the same parameter count
# is `deq.nn.TransformerLM.matched` (the benchmark `benchmarks/language_model.py` trains all
# three side by side).

# %%
model = deq.nn.TransformerDEQLM(
    corpus.vocab_size, 32, 2, max_len=SEQ, rngs=nnx.Rngs(0),
    solver=deq.Anderson(rtol=1e-3, atol=1e-5, max_steps=20),
    backward=deq.IFT(solver=deq.Anderson(rtol=1e-3, atol=1e-6, max_steps=20)),
)
print("parameters:", deq.nn.count_params(model))

# %% [markdown]
# ## Training with `deq.train.fit`
#
# AdamW with linear warm-up and cosine decay, gradient clipping at 1. `fit` records the
# forward solver's steps (`forward_steps`) and the adjoint's (`backward_steps`) at every step,
# and evaluates on the validation split every 20 steps. A few adjoint solves stop at their 20-step
# budget (`backward_converged_frac` below 1): we silence the warning and read the record instead. The cross-entropy in nats divided by
# `ln 2` is the bits per character (bpc); a uniform guess over 98 symbols is `log2 98 = 6.6`.

# %%
warnings.simplefilter("ignore", deq.NonConvergenceWarning)  # a few adjoint solves stop at 20 steps; fit records it
config = deq.train.TrainConfig(learning_rate=3e-3, weight_decay=0.01, warmup_steps=10, total_steps=60,
                               batch_size=16, eval_every=20, progress=False)
t0 = time.perf_counter()
history = deq.train.fit(model, ds, config)
print(f"trained {config.total_steps} steps in {time.perf_counter() - t0:.0f} s")
val_bpc = [r["loss"] / np.log(2) for r in history.eval]
print("validation bpc:", [round(float(b), 2) for b in val_bpc])
print("adjoint converged (last step):", history.train[-1]["backward_converged_frac"])

fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
axes[0].plot(history.metric("loss") / np.log(2), label="train (batch)")
axes[0].plot([r["step"] for r in history.eval], val_bpc, "o-", label="validation")
axes[0].set(xlabel="step", ylabel="bits per character", title="learning curve")
axes[0].legend()
axes[1].plot(history.metric("forward_steps"), label="forward (Anderson)")
axes[1].plot(history.metric("backward_steps"), label="backward (IFT adjoint)")
axes[1].set(xlabel="step", ylabel="solver steps (batch mean)", title="solver steps during training")
axes[1].legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# The solver needs more steps as the block learns a less contractive map: watch
# `forward_steps` approach `max_steps`. Jacobian regularization
# (Bai, Koltun & Kolter, *Stabilizing Equilibrium Models by Jacobian Regularization*,
# ICML 2021), applied every `k` steps with `deq.regularize.JacobianSchedule` in
# `TrainConfig(jacobian_reg=...)`, is the paper's remedy; variational dropout inside the cell
# is `TransformerDEQLM(..., dropout=p)` (`deq.nn.VariationalDropout`: one mask per forward
# pass, the same at every solver step).
#
# ## Sampling text
#
# The model is causal: position `t` sees characters `<= t` only, so the logits at the last
# position of a window predict the next character. We keep a window of the last 32 characters
# (one compiled function for every step) and sample with temperature 0.8.

# %%
model.eval()


@nnx.jit
def next_logits(m, window):
    logits, _ = m(window[None])
    return logits[0, -1]


def sample(prompt: str, length: int, temperature: float = 0.8, seed: int = 0) -> str:
    ids = [corpus.vocab.index(ch) for ch in prompt]
    key = jax.random.key(seed)
    for _ in range(length):
        window = ([corpus.vocab.index(" ")] * SEQ + ids)[-SEQ:]
        key, sub = jax.random.split(key)
        logits = next_logits(model, jnp.asarray(window, jnp.int32))
        ids.append(int(jax.random.categorical(sub, logits / temperature)))
    return decode_text(ids, corpus.vocab)


print(sample("def __init__(self", 120))

# %% [markdown]
# After 60 steps on 300 kB (about 30 s on a laptop CPU) the model has learned little more than
# the frequencies of characters, spaces and line breaks. To scale up:
#
# * train longer on the whole corpus (`load_stdlib_corpus()` without limits), with a wider
#   model and longer windows (`TransformerDEQLM(98, 128, 4, max_len=128)`), as
#   `python -m benchmarks.language_model --profile full` does, on a GPU if you have one;
# * compare against the tied twin and the explicit Transformer at matched parameters
#   (`deq.nn.UnrolledTransformerLM`, `deq.nn.TransformerLM.matched`), and report validation
#   and test bits per character on the held-out files;
# * at test time, give the solver more or fewer steps with the runtime budget
#   `model.deq(u, max_steps=k)`.
