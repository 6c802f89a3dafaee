"""On CPU-only machines the Triton kernels run in the interpreter; the variable must be set before triton is
first imported (tests/conftest.py does the same for tests/, but is not loaded by `pytest benchmarks`)."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
