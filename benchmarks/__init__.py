"""Benchmarks for the ``deq`` library.

Each module is runnable as ``python -m benchmarks.<name> --profile smoke|quick|full``
and writes ``benchmarks/results/<name>.json`` (``<name>-gpu.json`` on a GPU) plus
PNG figures.  Shared helpers live in :mod:`benchmarks._common`.
"""
