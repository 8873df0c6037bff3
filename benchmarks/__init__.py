"""Benchmarks of lightning_chaos: accuracy of the per-step estimates and their cost (see README.md).

Entry point: ``python benchmarks/run.py`` (``--smoke`` for the tiny CI configuration).
"""
