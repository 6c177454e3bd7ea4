"""Benchmarks for the ``deq`` library.

Each module is runnable as ``python -m benchmarks.<name> --profile smoke|quick|full``
and writes ``<name>.json`` (``<name>-gpu.json`` on a GPU) plus PNG figures to
``./deq-results/<name>/`` (ignored by git); ``--out benchmarks/results`` rewrites the
committed results instead. Shared helpers live in :mod:`benchmarks._common`.
"""
