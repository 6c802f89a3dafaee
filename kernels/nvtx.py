"""NVTX ranges for the kernels' passes, free without CUDA (kernels/ imports nothing of ours, so the switch lives here).

    with nvtx_range("statistics"): ...

Ranges go to torch.cuda.nvtx, looked up at each call so a test can stand a recorder in for it; `set_enabled`
turns them on without CUDA (tests) or off with it. The names the kernels push, and where they nest under the
trainer's, are listed in parallel/nvtx.py.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

_ENABLED: bool | None = None  # None: decided on first use (CUDA present)


def enabled() -> bool:
    global _ENABLED
    if _ENABLED is None:
        _ENABLED = torch.cuda.is_available()
    return _ENABLED


def set_enabled(on: bool | None) -> None:
    """Force the ranges on or off (None: back to "on when CUDA is available")."""
    global _ENABLED
    _ENABLED = on


@contextlib.contextmanager
def nvtx_range(name: str) -> Iterator[None]:
    if not enabled():
        yield
        return
    torch.cuda.nvtx.range_push(name)
    try:
        yield
    finally:
        torch.cuda.nvtx.range_pop()
