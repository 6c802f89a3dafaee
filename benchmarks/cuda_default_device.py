"""pytest plugin for the GPU machine: `python -m pytest -p benchmarks.cuda_default_device tests/kernels`.

The kernel tests build their inputs with plain `torch.randn(...)` (CPU tensors, which CI runs through Triton's
interpreter). On a CUDA machine without TRITON_INTERPRET those CPU tensors would take the kernels' torch
fallback, so the Triton kernels would go untested. Making CUDA the default device runs the same tests, with
the same float64 references, on the GPU's Triton kernels."""
import torch


def pytest_configure(config):
    if torch.cuda.is_available():
        torch.set_default_device("cuda")
