"""A stand-in `vllm` module for CPU tests of engine.rollout.vllm: the calls VLLMRolloutEngine makes (LLM(...),
SamplingParams(...), generate, collective_rpc, sleep, wake_up, reset_prefix_cache), recorded. Its sampler draws
from torch's default generator, as vLLM's does for requests without a seed of their own."""
from __future__ import annotations

import types
from dataclasses import dataclass, field
from typing import ClassVar

import torch

VOCAB = 50


class SamplingParams:
    def __init__(self, **kwargs):
        self.kwargs = kwargs
        for key, value in kwargs.items():
            setattr(self, key, value)


@dataclass
class Logprob:
    logprob: float


@dataclass
class Completion:
    index: int
    token_ids: list[int]
    logprobs: list[dict[int, Logprob]]
    finish_reason: str = "length"
    stop_reason: object = None
    text: str = ""


@dataclass
class RequestOutput:
    outputs: list[Completion]


@dataclass
class FakeModel:
    loaded: list[str] = field(default_factory=list)

    def load_weights(self, weights):
        self.loaded += [name for name, _ in weights]


class LLM:
    instances: ClassVar[list[LLM]] = []

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.calls: list[tuple] = []
        self.model = FakeModel()
        self.worker = types.SimpleNamespace(model_runner=types.SimpleNamespace(model=self.model))
        LLM.instances.append(self)

    def generate(self, prompts, params, use_tqdm=True):
        assert not isinstance(params, list) or len(params) == len(prompts)
        self.calls.append(("generate", [p["prompt_token_ids"] for p in prompts], params))
        per_request = params if isinstance(params, list) else [params] * len(prompts)
        out = []
        for p in per_request:
            if p.kwargs.get("seed") is not None:
                raise AssertionError("a request carried its own seed")
            completions = []
            for j in range(p.n):
                ids = torch.randint(0, VOCAB, (p.max_tokens,)).tolist()  # the default generator
                completions.append(Completion(j, ids, [{t: Logprob(-1.0 - 0.01 * t)} for t in ids]))
            out.append(RequestOutput(completions[::-1]))  # unordered, as vLLM may return them
        return out

    def collective_rpc(self, fn, args=()):
        self.calls.append(("rpc", fn.__name__, args))
        return [fn(self.worker, *args)]

    def sleep(self, level=1):
        self.calls.append(("sleep", level))

    def wake_up(self, tags=None):
        self.calls.append(("wake_up", tuple(tags) if tags else None))

    def reset_prefix_cache(self):
        self.calls.append(("reset_prefix_cache",))


def module() -> types.ModuleType:
    LLM.instances = []
    return types.SimpleNamespace(LLM=LLM, SamplingParams=SamplingParams)
