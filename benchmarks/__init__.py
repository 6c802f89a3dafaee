"""Kernel microbenchmarks (`bench_kernels.py`, pytest-benchmark) and the one-call GPU suite (`gpu_suite.py`)."""
