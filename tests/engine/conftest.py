"""Fixtures shared by tests/engine."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Microsecond-sized ops on a shared 2-core machine: one intra-op thread is 10-50x faster."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
