"""engine.rollout.vllm against a stand-in vllm module (tests/engine/_fake_vllm.py; vLLM itself needs a GPU): one
seed a call on the worker and none on the requests, reproducible samples, the caller's RNG left alone, greedy
n > 1 refused, sleep level 2 (weights discarded, refilled before the next generate), the external_launcher
arguments; and the config-time refusal of greedy evaluation with several samples."""
import dataclasses
import sys

import pytest
import torch

from r1_engine.engine.rollout.base import SamplingParams
from tests.engine import _fake_vllm


@pytest.fixture()
def engine(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", _fake_vllm.module())
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    from r1_engine.engine.rollout.vllm import VLLMRolloutEngine

    return VLLMRolloutEngine("some/model", seed=5)


PROMPTS = [[1, 2, 3], [4, 5], [1, 2, 3]]
PARAMS = SamplingParams(temperature=0.8, max_new_tokens=6, seed=11)


def test_one_seed_a_call_and_none_on_the_requests(engine):
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = engine.generate(PROMPTS, 2, PARAMS)
    assert torch.equal(torch.get_rng_state(), before)  # the trainer's generator is restored
    llm = engine.llm
    rpcs = [c for c in llm.calls if c[0] == "rpc"]
    assert rpcs == [("rpc", "_seed_worker", (11,))]
    (_, _, request_params), = [c for c in llm.calls if c[0] == "generate"]
    assert "seed" not in request_params.kwargs and request_params.n == 2  # one params object, no per-request seed
    # reproducible with the same seed, different with another; duplicated prompts differ within a call
    again = engine.generate(PROMPTS, 2, PARAMS)
    other = engine.generate(PROMPTS, 2, dataclasses.replace(PARAMS, seed=12))
    assert first.completion_ids == again.completion_ids != other.completion_ids
    assert first.completion_ids[0] != first.completion_ids[4]
    assert first.prompt_ids == [PROMPTS[0]] * 2 + [PROMPTS[1]] * 2 + [PROMPTS[2]] * 2
    assert first.rollout_logp[0].tolist() == pytest.approx([-1.0 - 0.01 * t for t in first.completion_ids[0]])


def test_no_seed_means_no_reseeding(engine):
    engine.generate(PROMPTS, 1, dataclasses.replace(PARAMS, seed=None))
    assert not [c for c in engine.llm.calls if c[0] == "rpc"]


def test_greedy_with_several_samples_is_refused(engine):
    with pytest.raises(ValueError, match=r"greedy decoding \(temperature 0\) with n=4 .* use n=1 or temperature > 0"):
        engine.generate(PROMPTS, 4, dataclasses.replace(PARAMS, temperature=0.0))
    engine.generate(PROMPTS, 1, dataclasses.replace(PARAMS, temperature=0.0))  # one greedy answer is fine


def test_sleep_level_two_needs_new_weights_before_generating(engine):
    engine.sleep()
    assert ("sleep", 2) in engine.llm.calls
    engine.wake()
    with pytest.raises(RuntimeError, match="discarded by a level-2 sleep; call update_weights"):
        engine.generate(PROMPTS, 1, PARAMS)
    engine.sleep()
    engine.update_weights([("a.weight", torch.zeros(2)), ("b.weight", torch.ones(2))])
    engine.wake()
    wakes = [c for c in engine.llm.calls if c[0] == "wake_up"]
    assert wakes[-2:] == [("wake_up", ("weights",)), ("wake_up", ("kv_cache",))]
    assert engine.llm.model.loaded == ["a.weight", "b.weight"]
    engine.generate(PROMPTS, 1, PARAMS)


def test_sleep_level_is_checked(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", _fake_vllm.module())
    from r1_engine.engine.rollout.vllm import VLLMRolloutEngine

    with pytest.raises(ValueError, match="sleep_level must be 1 or 2, got 3"):
        VLLMRolloutEngine("some/model", sleep_level=3)


def test_external_launcher_arguments(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", _fake_vllm.module())
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    from r1_engine.engine.rollout.vllm import VLLMRolloutEngine

    engine = VLLMRolloutEngine("m", seed=3, tensor_parallel_size=2, distributed_executor_backend="external_launcher")
    import os

    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"  # the executor asserts it
    kwargs = engine.llm.kwargs
    assert (kwargs["tensor_parallel_size"], kwargs["distributed_executor_backend"], kwargs["seed"]) == \
        (2, "external_launcher", 3)
    assert kwargs["enable_sleep_mode"] and kwargs["logprobs_mode"] == "processed_logprobs"


def test_greedy_evaluation_with_several_samples_is_a_config_error():
    from r1_engine.engine.config import GRPOConfig, check_ranges

    cfg = GRPOConfig()
    greedy = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, eval_temperature=0.0, eval_samples=4))
    with pytest.raises(ValueError) as err:
        check_ranges(greedy)
    message = str(err.value)
    assert message.startswith("--train.eval-samples=4: must be 1 with --train.eval-temperature 0")
    assert "\n" not in message
    check_ranges(dataclasses.replace(greedy, train=dataclasses.replace(greedy.train, eval_samples=1)))
    check_ranges(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, eval_samples=4)))


def test_eval_recipe_refuses_greedy_with_several_samples(capsys, tmp_path):
    from r1_engine.recipes.eval import main
    from tests.recipes.helpers import one_error_line

    line = one_error_line(capsys, main, ["--k", "4", "--rollout.temperature", "0", "--out", str(tmp_path)])
    assert line.startswith("error: --k=4: must be 1 with --rollout.temperature 0")


GIB = 1 << 30


def test_memory_share_is_capped_by_free_memory():
    """vLLM V1 refuses to start when free memory < share x total: the share is capped at (free - reserve) / total."""
    from r1_engine.engine.rollout.vllm import memory_share

    assert memory_share(0.5, 30 * GIB, 80 * GIB) == pytest.approx(28 / 80)  # colocated: the trainer holds 50 GiB
    assert memory_share(0.3, 79 * GIB, 80 * GIB) == 0.3  # room enough: what was asked
    with pytest.raises(ValueError, match=r"^rollout.gpu_memory_utilization: vLLM would get 0.04 of the device: "
                                         r"5.0 of 80.0 GiB are free"):
        memory_share(0.5, 5 * GIB, 80 * GIB)


@pytest.fixture()
def fake_cuda(monkeypatch):
    """A CUDA device as VLLMRolloutEngine sees it at construction and wake-up: 30 of 80 GiB free; empty_cache
    calls are recorded into the fake LLM's call log."""
    monkeypatch.setitem(sys.modules, "vllm", _fake_vllm.module())
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (30 * GIB, 80 * GIB))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: _fake_vllm.LLM.instances[-1].calls.append(("empty_cache",)))


def test_share_from_free_memory_and_cache_emptied_before_waking(fake_cuda):
    from r1_engine.engine.rollout.vllm import VLLMRolloutEngine

    with pytest.warns(UserWarning, match="vLLM gets 0.35 of the device instead of 0.50"):
        engine = VLLMRolloutEngine("some/model", gpu_memory_utilization=0.5, max_model_len=640)
    llm = _fake_vllm.LLM.instances[-1]
    assert llm.kwargs["gpu_memory_utilization"] == pytest.approx(0.35) and llm.kwargs["max_model_len"] == 640
    engine.sleep()
    engine.update_weights([("a.weight", torch.zeros(2))])
    engine.wake()
    wakes = [c for c in llm.calls if c[0] in ("empty_cache", "wake_up")]
    assert wakes == [("empty_cache",), ("wake_up", ("weights",)), ("empty_cache",), ("wake_up", ("kv_cache",))]


def test_max_model_len_is_the_generation_budget(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", _fake_vllm.module())
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    from r1_engine.engine.rollout import build_rollout_engine

    build_rollout_engine("vllm", "some/model", None, device=torch.device("cpu"), dtype="bfloat16", seed=0,
                         gpu_memory_utilization=0.5, num_threads=None, max_model_len=512 + 1024)
    assert _fake_vllm.LLM.instances[-1].kwargs["max_model_len"] == 1536


def test_routing_records_turn_prefix_caching_off(monkeypatch):
    """Siblings of one prompt hit each other's cached blocks, which vLLM records no routing for."""
    monkeypatch.setitem(sys.modules, "vllm", _fake_vllm.module())
    from r1_engine.engine.rollout.vllm import VLLMRolloutEngine

    VLLMRolloutEngine("some/model", record_routing=True)
    kwargs = _fake_vllm.LLM.instances[-1].kwargs
    assert kwargs["enable_prefix_caching"] is False and kwargs["enable_return_routed_experts"] is True
    VLLMRolloutEngine("some/model")
    assert "enable_prefix_caching" not in _fake_vllm.LLM.instances[-1].kwargs  # vLLM's default otherwise
    with pytest.raises(ValueError, match="prefix caching off"):
        VLLMRolloutEngine("some/model", record_routing=True, enable_prefix_caching=True)


@pytest.fixture()
def single_process_parallel():
    from r1_engine.parallel.state import destroy_parallel, init_parallel

    yield init_parallel(1, 1)
    destroy_parallel()


def test_quantized_checkpoint_starts_vllm_from_the_unquantized_export(tmp_path, single_process_parallel):
    """A checkpoint with a quantization_config (DeepSeek-V3's FP8) under vLLM: the engine starts from the policy's
    bf16/fp32 export, whose config has no quantization_config; the HF engine and plain checkpoints start as they are."""
    import json

    from r1_engine.engine.rollout import rollout_model_dir
    from r1_engine.parallel.convert import load_hf_checkpoint
    from r1_engine.parallel.models import build_gpt_model
    from tests.engine._trainer_common import write_tiny_model

    model_dir = write_tiny_model(tmp_path / "base")
    policy = build_gpt_model(model_dir / "config.json")
    load_hf_checkpoint(policy, model_dir)
    plain = json.loads((model_dir / "config.json").read_text())
    quantized = {**plain, "quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}}
    assert rollout_model_dir("vllm", model_dir, plain, policy, tmp_path / "out") == model_dir
    assert rollout_model_dir("hf", model_dir, quantized, policy, tmp_path / "out") == model_dir
    target = rollout_model_dir("vllm", model_dir, quantized, policy, tmp_path / "out")
    assert target == tmp_path / "out" / "rollout_model"
    assert "quantization_config" not in json.loads((target / "config.json").read_text())
    assert (target / "tokenizer.json").is_file() and (target / "model.safetensors").is_file()
