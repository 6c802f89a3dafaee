"""Recipe runs use the kernels' torch backend on CPU, as a user's run does: the Triton interpreter
(tests/conftest.py turns it on for the kernel tests) is far too slow for minutes of training."""
import pytest


@pytest.fixture(autouse=True)
def _no_triton_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch):
    """The one-line error path is what users see; R1_DEBUG=1 in the environment would turn it into tracebacks."""
    monkeypatch.delenv("R1_DEBUG", raising=False)

