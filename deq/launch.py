"""Start a program as several local processes of one distributed JAX run.

    python -m deq.launch --processes 2 --cpu-devices 2 -- train.py --epochs 3

starts `python train.py --epochs 3` twice, with `DEQ_COORDINATOR_ADDRESS` (a free local port),
`DEQ_NUM_PROCESSES`, `DEQ_PROCESS_ID`, `DEQ_CPU_DEVICES` and `DEQ_INIT_TIMEOUT` set for each, so
that the program's `deq.distributed.initialize()` joins them (see `deq.distributed`). The output
of process `i` is prefixed `[i]`. When one process fails, the others are stopped (a process left
alone would wait in its next collective); the launcher exits with the first non-zero status,
and with status 124 when `--timeout` seconds pass first.

On several machines, run the program once per machine with those variables set by hand (or by
the cluster's scheduler), the same `DEQ_COORDINATOR_ADDRESS` everywhere.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence


def free_port() -> int:
    """A TCP port on localhost that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(i: int, processes: int, address: str, *, cpu_devices: int | None, timeout: int,
                base: dict | None = None) -> dict[str, str]:
    """The environment of process `i` of a local run."""
    env = dict(os.environ if base is None else base)
    env.update(DEQ_COORDINATOR_ADDRESS=address, DEQ_NUM_PROCESSES=str(processes), DEQ_PROCESS_ID=str(i),
               DEQ_INIT_TIMEOUT=str(timeout))
    if cpu_devices is not None:
        env["DEQ_CPU_DEVICES"] = str(cpu_devices)
        env.setdefault("JAX_PLATFORMS", "cpu")
    return env


def _pump(i: int, stream, out) -> None:
    for line in iter(stream.readline, ""):
        out.write(f"[{i}] {line}")
        out.flush()


def launch(argv: Sequence[str], *, processes: int, cpu_devices: int | None = None, port: int | None = None,
           init_timeout: int = 60, timeout: float | None = None) -> int:
    """Run `python *argv` as `processes` processes of one run; return the exit status.

    Args:
      argv: the program and its arguments (`["train.py", "--epochs", "3"]`, or `["-m", "pkg.mod"]`).
      processes: number of processes (>= 1).
      cpu_devices: host devices per process (CPU runs), or None for the default devices.
      port: the coordinator's port on localhost (default: a free one).
      init_timeout: seconds each process waits for the others to join.
      timeout: stop every process after this many seconds (status 124); None waits forever.

    Returns:
      0 when every process succeeded, else the first non-zero status (124 on timeout).
    """
    if isinstance(processes, bool) or not isinstance(processes, int) or processes < 1:
        raise ValueError(f"deq.launch: processes must be an integer >= 1, got {processes!r}. Pass e.g. --processes 2.")
    if not argv:
        raise ValueError("deq.launch: no program given. Pass it after '--', e.g. python -m deq.launch "
                         "--processes 2 -- train.py.")
    address = f"127.0.0.1:{port or free_port()}"
    procs = [subprocess.Popen([sys.executable, *argv], text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              env=process_env(i, processes, address, cpu_devices=cpu_devices, timeout=init_timeout),
                              start_new_session=True)
             for i in range(processes)]
    pumps = [threading.Thread(target=_pump, args=(i, p.stdout, sys.stdout), daemon=True) for i, p in enumerate(procs)]
    for t in pumps:
        t.start()
    deadline = None if timeout is None else time.monotonic() + timeout
    status = 0
    try:
        while any(p.poll() is None for p in procs):
            failed = [(i, p.returncode) for i, p in enumerate(procs) if p.returncode not in (None, 0)]
            if failed:
                i, status = failed[0]
                why = (" (aborted: JAX's runtime ends a process whose peers did not join within "
                       f"--init-timeout={init_timeout} s, or died)" if status == -signal.SIGABRT else "")
                sys.stderr.write(f"deq.launch: process {i} exited with status {status}{why}; stopping the others.\n")
                break
            if deadline is not None and time.monotonic() > deadline:
                status = 124
                sys.stderr.write(f"deq.launch: stopped after {timeout} s (--timeout).\n")
                break
            time.sleep(0.05)
        else:
            status = next((p.returncode for p in procs if p.returncode), 0)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        for p in procs:
            p.wait()
        for t in pumps:
            t.join(timeout=5)
    return status


def main(args: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deq.launch", description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, required=True, help="number of processes")
    parser.add_argument("--cpu-devices", type=int, default=None, help="host devices per process (CPU runs)")
    parser.add_argument("--port", type=int, default=None, help="coordinator port on localhost (default: a free one)")
    parser.add_argument("--init-timeout", type=int, default=60, help="seconds to wait for all processes to join")
    parser.add_argument("--timeout", type=float, default=None, help="stop all processes after this many seconds")
    parser.add_argument("program", nargs=argparse.REMAINDER, help="-- program.py [args...]")
    ns = parser.parse_args(args)
    program = ns.program[1:] if ns.program[:1] == ["--"] else ns.program
    return launch(program, processes=ns.processes, cpu_devices=ns.cpu_devices, port=ns.port,
                  init_timeout=ns.init_timeout, timeout=ns.timeout)


if __name__ == "__main__":
    sys.exit(main())
