"""Test-wide setup. Triton kernels run in the interpreter on CPU-only machines: the variable must be
set before triton is first imported, which is why it lives here and not in a fixture."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
