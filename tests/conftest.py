"""Test-wide setup. Triton kernels run in the interpreter on CPU-only machines: the variable must be
set before triton is first imported, which is why it lives here and not in a fixture."""
import os
import sys
from pathlib import Path

import pytest
import torch

# Tests import their helpers as `tests.*` (spawned gloo workers too, which inherit sys.path). The repository root is
# appended, never put first: the project itself is imported as the installed `r1_engine`, and the folders engine/,
# kernels/, ... must not shadow an installed package (Hugging Face's `kernels`, which transformers imports).
_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.append(_ROOT)

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _interpreter_loop_bounds_work() -> bool:
    """Triton 3.6's interpreter (seen; 3.9's squeezes first) turns a runtime loop bound into an int with
    int(ndarray of shape (1,)), which NumPy >= 2.4 refuses: every kernel test would fail inside the interpreter."""
    import triton
    import triton.language as tl

    @triton.jit
    def _probe(out_ptr, n):
        acc = 0
        for _ in range(0, n):
            acc += 1
        tl.store(out_ptr, acc)

    out = torch.zeros(1, dtype=torch.int32)
    try:
        _probe[(1,)](out, 3)
    except Exception:  # noqa: BLE001 - any failure here is the incompatibility
        return False
    return int(out) == 3


def pytest_configure(config):
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    try:
        import triton  # noqa: F401
    except ImportError:
        return  # the kernels fall back to torch; their tests say so
    if not _interpreter_loop_bounds_work():
        import numpy

        pytest.exit(f"triton {triton.__version__}'s interpreter (TRITON_INTERPRET=1, how the kernel tests run on CPU) "
                    f"cannot run loops with runtime bounds under numpy {numpy.__version__}: install numpy<2.4 or a "
                    f"newer triton (3.9 was seen working)", returncode=4)
