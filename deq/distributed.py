"""Several processes, one program: JAX's distributed runtime for `deq.train.fit`.

A run over several processes (one per machine, or several on one machine) is the same program
started once per process, each calling `initialize()` before anything else touches JAX. After
that `jax.devices()` lists the devices of every process, `deq.train.make_mesh()` spans them all,
and `deq.train.fit` trains data-parallel over them unchanged: every process holds the same
dataset and config, takes the same global batches, and feeds only the rows that its own devices
hold (`deq.train.shard_batch`); metrics are global, logs are written by process 0 only, and
orbax checkpoints are written and read by all processes together.

`initialize()` takes its settings from arguments or from these environment variables, which
`python -m deq.launch` sets for local runs (on a cluster, set them per process, e.g. from the
scheduler's rank variables; with none of them set the process runs alone):

- `DEQ_COORDINATOR_ADDRESS`: `host:port` of process 0 (JAX itself reads `JAX_COORDINATOR_ADDRESS`).
- `DEQ_NUM_PROCESSES`, `DEQ_PROCESS_ID`: the number of processes and this one's index.
- `DEQ_CPU_DEVICES`: host (CPU) devices per process, for CPU-only runs and tests.
- `DEQ_INIT_TIMEOUT`: seconds to wait for every process to join (default 300).

Cross-process collectives on CPU use gloo (`jax_cpu_collectives_implementation`, JAX's default
in the versions tested); GPUs and TPUs use their own.

Example:
  >>> import deq.distributed as dd
  >>> dd.is_primary(), dd.process_count() >= 1
  (True, True)
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import jax
import numpy as np

__all__ = ["check_same", "initialize", "is_primary", "process_count", "process_index"]

_ENV = ("DEQ_COORDINATOR_ADDRESS", "DEQ_NUM_PROCESSES", "DEQ_PROCESS_ID", "DEQ_CPU_DEVICES", "DEQ_INIT_TIMEOUT")


def _env_int(name: str, value: int | None) -> int | None:
    if value is not None:
        return value
    text = os.environ.get(name)
    if text is None or text == "":
        return None
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"deq.distributed.initialize: environment variable {name} must be an integer, "
                         f"got {text!r}. Set e.g. {name}=2.") from None


def initialize(
    *, coordinator_address: str | None = None, num_processes: int | None = None,
    process_id: int | None = None, cpu_devices: int | None = None, timeout: int | None = None,
) -> None:
    """Join the distributed runtime (`jax.distributed.initialize`), with a clear error on timeout.

    Call it first, before any other use of JAX in the process. Unset arguments are read from the
    `DEQ_*` environment variables (see the module docstring). A single process
    (`num_processes=1`, or no coordinator and no process count given) does nothing.

    Args:
      coordinator_address: `host:port` of process 0.
      num_processes: number of processes in the run.
      process_id: this process's index in `[0, num_processes)`.
      cpu_devices: host devices per process (`jax_num_cpu_devices`), for CPU runs.
      timeout: seconds to wait for all processes to join; past it, a `TimeoutError` names
        the processes expected and the coordinator.

    Raises:
      TimeoutError: not every process joined within `timeout` seconds.
      ValueError: inconsistent settings (`process_id` outside `[0, num_processes)`, ...).

    Example:
      >>> import deq.distributed as dd
      >>> dd.initialize(num_processes=1)  # one process: nothing to join
    """
    address = coordinator_address or os.environ.get("DEQ_COORDINATOR_ADDRESS") or None
    n = _env_int("DEQ_NUM_PROCESSES", num_processes)
    pid = _env_int("DEQ_PROCESS_ID", process_id)
    devices = _env_int("DEQ_CPU_DEVICES", cpu_devices)
    wait = _env_int("DEQ_INIT_TIMEOUT", timeout)
    wait = 300 if wait is None else wait
    if devices is not None:
        if devices < 1:
            raise ValueError(f"deq.distributed.initialize: cpu_devices must be >= 1, got {devices}.")
        jax.config.update("jax_num_cpu_devices", devices)
    if n is not None and n < 1:
        raise ValueError(f"deq.distributed.initialize: num_processes must be >= 1, got {n}.")
    if n == 1 or (n is None and address is None):  # one process: nothing to join
        return
    if n is not None and (pid is None or not 0 <= pid < n):
        raise ValueError(
            f"deq.distributed.initialize: process_id must lie in [0, num_processes) = [0, {n}), got "
            f"{pid!r}. Pass process_id=... (or set DEQ_PROCESS_ID) to a distinct index in every process.")
    if n is not None and address is None:
        raise ValueError(
            f"deq.distributed.initialize: num_processes={n} needs coordinator_address='host:port' of "
            "process 0 (or DEQ_COORDINATOR_ADDRESS). For a local run use python -m deq.launch.")
    try:
        jax.distributed.initialize(address, n, pid, initialization_timeout=int(wait))
    except Exception as e:  # noqa: BLE001 - the runtime reports a missing peer in several types
        text = str(e)
        if "DEADLINE_EXCEEDED" in text or "timed out" in text.lower() or "deadline" in text.lower():
            raise TimeoutError(
                f"deq.distributed.initialize: process {pid} of {n} waited {wait} s for all processes to "
                f"join at the coordinator {address}, and some never did. Start every process (process ids "
                f"0..{(n or 1) - 1}) with the same coordinator address, or use python -m deq.launch; raise "
                f"timeout= if they start slowly. (JAX: {text.splitlines()[0][:200]})") from e
        raise


def process_count() -> int:
    """Number of processes in the run (1 without `initialize`)."""
    return jax.process_count()


def process_index() -> int:
    """This process's index (0 without `initialize`)."""
    return jax.process_index()


def is_primary() -> bool:
    """Whether this is process 0, the one that writes logs and reports."""
    return jax.process_index() == 0


def _digest(value: Any) -> str:
    """A stable digest of a JSON-able value (arrays by shape, dtype and bytes)."""
    def default(o):
        if isinstance(o, (np.ndarray, np.generic)) or hasattr(o, "__array__"):
            a = np.asarray(o)
            return {"shape": list(a.shape), "dtype": str(a.dtype), "sha1": hashlib.sha1(a.tobytes()).hexdigest()}
        return repr(o)

    return hashlib.sha1(json.dumps(value, sort_keys=True, default=default).encode()).hexdigest()


def check_same(what: str, values: dict[str, Any]) -> None:
    """Raise a `ValueError` in every process unless all processes pass equal `values`.

    Each entry is digested (arrays by their bytes) and the digests of all processes are
    compared; the message names the entries that differ and the processes concerned. One
    process: nothing to compare.

    Args:
      what: who checks, for the message (e.g. `"fit"`).
      values: the settings every process must share, by name.

    Example:
      >>> from deq.distributed import check_same
      >>> check_same("fit", {"seed": 0})  # one process: nothing to compare
    """
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    names = sorted(values)
    # 28 bits of each digest: int32 survives JAX's default 32-bit mode.
    mine = np.array([[int(_digest(values[k])[:7], 16) for k in names]], np.int32)
    every = np.asarray(multihost_utils.process_allgather(mine)).reshape(jax.process_count(), len(names))
    bad = [k for j, k in enumerate(names) if len(set(every[:, j].tolist())) > 1]
    if bad:
        me = jax.process_index()
        others = sorted({p for j, k in enumerate(names) if k in bad
                         for p in range(len(every)) if every[p, j] != every[me, j]})
        raise ValueError(
            f"{what}: the {jax.process_count()} processes disagree on {', '.join(bad)} (process {me} differs "
            f"from process(es) {others}). Every process of a distributed run must pass the same config, "
            "data and initial model (build them from the same seed); fix the launch so all processes run "
            "the same command.")
