"""Fixtures for tests/parallel: tiny HF checkpoints on disk, and the Megatron state of this
(single) pytest process. Multi-process tests use `dist_utils.run_distributed`."""
from __future__ import annotations

import pytest

from tests.parallel._models_tiny import write_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory):
    """Qwen2, tied embeddings, QKV bias, sharded safetensors + index."""
    return write_tiny_checkpoint("qwen2", tmp_path_factory.mktemp("tiny_qwen2"))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """Llama 3 with llama3 RoPE scaling, untied lm_head, one model.safetensors."""
    return write_tiny_checkpoint("llama", tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="module")
def single_process_parallel():
    """TP=1, PP=1 on a one-process gloo group for the module's tests; torn down afterwards."""
    from r1_engine.parallel.state import destroy_parallel, init_parallel

    state = init_parallel(1, 1)
    yield state
    destroy_parallel()
