"""The rollout contract: sampling settings in, a RolloutBatch out, weights streamed in between steps.

Layout of a RolloutBatch: completions are flattened prompt-major, [num_prompts * n]; completion i
answers prompt i // n (its group). rollout_logp[i][t] is the fp32 log-prob of token t under
softmax(logits / temperature) WITHOUT top-p/top-k truncation, the quantity the trainer recomputes as
old_logp, so that the two differ only by numerics (GRPO_SPEC.md, "Rollout/trainer mismatch").
routed_experts[i] (MoE rollouts with routing recorded, for routing replay in the trainer): integer
[P + C - 1, num MoE layers, k], the experts the rollout's routers chose for every token fed to the model
(prompt positions 0..P-1, then completion tokens 0..C-2; the last completion token is never fed), layers in
model order, each position's k experts in the router's own order.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from torch import Tensor

FINISH_REASONS = ("stop", "length")


@dataclass(frozen=True)
class SamplingParams:
    """temperature: > 0 samples from softmax(logits / T); 0 means greedy (then rollout_logp uses T = 1).
    top_p in (0, 1]; top_k = -1 disables it. Stop strings are kept at the end of the completion text
    (like vLLM's include_stop_str_in_output=True): the format reward needs the closing </answer>.
    seed: None draws a fresh seed; an int makes a call reproducible on the same engine and device."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 256
    stop_strings: tuple[str, ...] = ()
    seed: int | None = None

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"SamplingParams.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k != -1 and self.top_k < 1:
            raise ValueError(f"SamplingParams.top_k must be -1 (off) or >= 1, got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"SamplingParams.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if isinstance(self.stop_strings, str):
            raise ValueError("SamplingParams.stop_strings must be a tuple of strings, not one string")
        if any(not isinstance(s, str) or not s for s in self.stop_strings):
            raise ValueError(f"SamplingParams.stop_strings must be non-empty strings, got {self.stop_strings!r}")

    @property
    def logp_temperature(self) -> float:
        """The temperature rollout_logp (and the trainer's old_logp) divide logits by."""
        return self.temperature if self.temperature > 0 else 1.0


@dataclass
class RolloutBatch:
    """Completions of one generate() call, prompt-major: completion i belongs to prompt/group i // group_size.
    routed_experts: None unless the engine recorded routing (see the module docstring)."""

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    completion_text: list[str]
    rollout_logp: list[Tensor]
    finish_reason: list[str]
    group_size: int
    routed_experts: list[Tensor] | None = None

    def __post_init__(self):
        n = len(self.completion_ids)
        for name in ("prompt_ids", "completion_text", "rollout_logp", "finish_reason"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"RolloutBatch.{name} has {len(getattr(self, name))} entries, expected {n}")
        if self.group_size < 1 or n % self.group_size != 0:
            raise ValueError(f"RolloutBatch: {n} completions are not a whole number of groups of {self.group_size}")
        for i, (ids, logp, reason) in enumerate(zip(self.completion_ids, self.rollout_logp, self.finish_reason)):
            if logp.shape != (len(ids),):
                raise ValueError(f"RolloutBatch: completion {i} has {len(ids)} tokens but rollout_logp of shape "
                                 f"{tuple(logp.shape)}")
            if reason not in FINISH_REASONS:
                raise ValueError(f"RolloutBatch: completion {i} has finish_reason {reason!r}, "
                                 f"expected one of {FINISH_REASONS}")
        if self.routed_experts is not None:
            self._check_routed_experts()

    def _check_routed_experts(self) -> None:
        n = len(self.completion_ids)
        if len(self.routed_experts) != n:
            raise ValueError(f"RolloutBatch.routed_experts has {len(self.routed_experts)} entries, expected {n}")
        per_token = None  # (layers, k) of completion 0: every completion must agree
        for i, (prompt, ids, routed) in enumerate(zip(self.prompt_ids, self.completion_ids, self.routed_experts)):
            fed = len(prompt) + len(ids) - 1
            ok = torch.is_tensor(routed) and routed.dim() == 3 and routed.shape[0] == fed \
                and not routed.is_floating_point() and not routed.is_complex() and routed.dtype != torch.bool \
                and (per_token is None or tuple(routed.shape[1:]) == per_token)
            if not ok:
                got = (f"shape {tuple(routed.shape)} ({routed.dtype})" if torch.is_tensor(routed)
                       else type(routed).__name__)
                layers_k = "layers, k" if per_token is None else f"{per_token[0]}, {per_token[1]}"
                raise ValueError(f"RolloutBatch: completion {i} has routed_experts of {got}, expected an integer "
                                 f"tensor [{fed}, {layers_k}] (prompt {len(prompt)} + completion {len(ids)} - 1 "
                                 f"tokens fed to the model)")
            per_token = tuple(routed.shape[1:])

    @staticmethod
    def from_groups(groups: "Sequence[tuple[RolloutBatch, int]]") -> "RolloutBatch":
        """A batch of whole groups picked from other batches (same group size), in the order given:
        `groups` holds (batch, group index) pairs (DAPO's dynamic sampling assembles its step this way)."""
        if not groups:
            raise ValueError("RolloutBatch.from_groups: no groups")
        size = groups[0][0].group_size
        fields = {name: [] for name in ("prompt_ids", "completion_ids", "completion_text", "rollout_logp",
                                        "finish_reason")}
        routed = [batch.routed_experts is not None for batch, _ in groups]
        if any(routed) and not all(routed):
            raise ValueError("RolloutBatch.from_groups: some batches carry routed_experts and others do not")
        if all(routed):
            fields["routed_experts"] = []
        for batch, g in groups:
            if batch.group_size != size:
                raise ValueError(f"RolloutBatch.from_groups: group sizes differ ({batch.group_size} vs {size})")
            if not 0 <= g < batch.num_groups:
                raise ValueError(f"RolloutBatch.from_groups: group {g} of a batch with {batch.num_groups} groups")
            for name, values in fields.items():
                values.extend(getattr(batch, name)[g * size:(g + 1) * size])
        return RolloutBatch(**fields, group_size=size)

    @property
    def num_completions(self) -> int:
        return len(self.completion_ids)

    @property
    def num_groups(self) -> int:
        return self.num_completions // self.group_size

    def group_index(self, i: int) -> int:
        return i // self.group_size

    @property
    def lengths(self) -> Tensor:
        """Completion lengths in tokens, int64 [num_completions]."""
        return torch.tensor([len(ids) for ids in self.completion_ids], dtype=torch.long)

    @property
    def truncated(self) -> Tensor:
        """bool [num_completions]: True where the completion hit max_new_tokens (finish_reason "length")."""
        return torch.tensor([reason == "length" for reason in self.finish_reason], dtype=torch.bool)


class RolloutEngine(abc.ABC):
    """What the trainer needs from a generator."""

    @abc.abstractmethod
    def generate(self, prompt_ids: list[list[int]], n: int, params: SamplingParams) -> RolloutBatch:
        """n completions per prompt, flattened prompt-major."""

    @abc.abstractmethod
    def update_weights(self, named_tensors: Iterable[tuple[str, Tensor]]) -> None:
        """Load new policy weights, streamed one full tensor at a time under Hugging Face parameter names."""

    def sleep(self) -> None:
        """Free the engine's memory (weights/KV cache) while the trainer runs; a no-op where meaningless."""

    def wake(self) -> None:
        """Undo sleep() before the next generate(); a no-op where meaningless."""


def check_prompts(prompt_ids: list[list[int]], n: int, vocab_size: int | None = None) -> None:
    """Shared argument checks for generate()."""
    if n < 1:
        raise ValueError(f"generate: n must be >= 1, got {n}")
    if not prompt_ids:
        raise ValueError("generate: no prompts")
    for i, ids in enumerate(prompt_ids):
        if len(ids) == 0:
            raise ValueError(f"generate: prompt {i} is empty")
        if vocab_size is not None and (min(ids) < 0 or max(ids) >= vocab_size):
            raise ValueError(f"generate: prompt {i} has token ids outside [0, {vocab_size})")
