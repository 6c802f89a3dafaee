"""Rollouts with a colocated vLLM engine (same process and GPU as the trainer), the fast path on GPUs.

UNVERIFIED: written against vLLM's source (V1 engine, 2025-2026: `LLM(logprobs_mode=...)`,
`LLM.sleep(level)`, `LLM.wake_up(tags)`, `LLM.collective_rpc`, `RequestOutput.outputs[*].token_ids /
.logprobs / .finish_reason`, `distributed_executor_backend="external_launcher"`), each call checked against the
source of vLLM 0.10.0-0.12.0, but never run: the machine this was written on has no GPU and no vLLM. Needs
vLLM >= 0.10.2: before it, "processed_logprobs" were taken before temperature and top-k/top-p. Its CPU
tests run it against a stand-in vllm module (tests/engine/test_rollout_vllm_fake.py). Run it once on a GPU
against HFRolloutEngine (same prompts, temperature, top_p=1: rollout_logp should agree to bf16
precision) before trusting it.

How it maps our contract onto vLLM:
- rollout_logp: vLLM's `logprobs_mode="processed_logprobs"` returns log_softmax of the logits after
  temperature AND top-k/top-p. With top_p=1 and top_k=-1 (the RL setting) that is exactly our
  definition, log_softmax(logits / T). With truncation on, the values are the renormalised
  (truncated) log-probs; a warning says so. ("raw_logprobs", vLLM's default, ignores temperature.)
- stop strings: include_stop_str_in_output=True, the same convention as HFRolloutEngine.
- weights: streamed (HF name, full tensor) pairs go one at a time into the vLLM model's own
  `load_weights`, which knows how to fuse q/k/v and gate/up; then the prefix cache is reset, since
  its KV entries were computed with the old weights.
- memory: with enable_sleep_mode, sleep() frees the KV cache and the weights (level 2: the weights are
  discarded, not copied to CPU, since the trainer pushes new ones anyway; level 1 would copy them out and
  back for nothing); update_weights() wakes only the weight memory and fills it, and wake() then restores
  the KV cache, so the peak memory never holds both the trainer's activations and vLLM's cache. After a
  level-2 sleep generate() refuses to run until update_weights() has filled the weights again.
  vLLM V1 refuses to start when the free memory is below gpu_memory_utilization x total; colocated, the policy,
  its optimizer and the reference are already on the device, so the share asked for is capped by what is free
  at start (`memory_share`, less a reserve for the trainer's activations), and an engine that would get too little
  is one clear error. wake() empties PyTorch's cache first (the trainer's freed blocks are otherwise still held),
  and max_model_len is the run's generation budget (prompt + new tokens), not the model's whole context.
- seeds: one seed a generate() call (SamplingParams.seed), set on the worker's torch generators just
  before generating; requests carry no seed of their own (a per-request seed sends vLLM's sampler down a
  per-request Python loop). The same seed, prompts and engine give the same samples; the trainer's own
  torch RNG state is restored afterwards. Greedy decoding (temperature 0) with n > 1 is refused (vLLM
  rejects it; every sample would be the same).
- several GPUs: engine.rollout.colocate runs one of these on every training rank with vLLM's
  external_launcher executor (tensor_parallel_size = the trainer's TP).
- routed experts (record_routing=True, MoE routing replay), UNVERIFIED, never run: coded from vLLM's
  documentation (docs/training/routed_experts_replay.md of vLLM 0.21, the "Routed Experts Return" page of later
  versions) and the R3 pull request vllm#28284 (CompletionOutput.routed_experts, filled by the scheduler for
  request.num_tokens - 1 positions); the output layout of the newest versions (aux output connector) was not
  documented where it could be read. `LLM(enable_return_routed_experts=True)`;
  two output layouts are documented and both are mapped to RolloutBatch.routed_experts [P + C - 1, L, k]:
  vLLM 0.21 puts the prompt's [P, L, k] on the RequestOutput (`prompt_routed_experts`, shared by the n
  samples) and [C (or fewer), L, k] on each CompletionOutput (`routed_experts`, the routing of each generated
  token when it was fed: the last one never is, so only C - 1 rows are used); the first version (vllm#28284)
  has no prompt field and gives the whole sequence, [P + C - 1, L, k], on the CompletionOutput. vLLM 0.21
  marks prefix-cache hits with -1 (no routing recorded), and the G samples of a prompt share its cached blocks:
  recording routing therefore turns prefix caching off (on by default in V1), and refuses an explicit
  enable_prefix_caching=True. Later versions require prefix caching and async scheduling off (vLLM sets that itself), and
  Model Runner V2 (VLLM_USE_V2_MODEL_RUNNER=1).
"""
from __future__ import annotations

import gc
import os
import warnings
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import Tensor

from r1_engine.engine.rollout.base import (
    RolloutBatch,
    RolloutEngine,
    SamplingParams,
    check_prompts,
)


def _import_vllm():
    try:
        import vllm
    except ImportError as err:
        raise ImportError(
            "VLLMRolloutEngine needs vLLM, which is not installed. On a CUDA machine install the gpu extra "
            "(pip install -e '.[gpu]'), or use HFRolloutEngine (engine.rollout.hf) instead.") from err
    return vllm


# Spaces, newlines, digits, tags and non-ASCII: what a tokenizer rebuilt from the model type gets wrong first.
_PROBE = "Q: 82+57\nA:  <think> 8+5 = 13, carry 1 </think>\n<answer> 139 </answer>\tÜber 東京"


def check_same_tokenizer(engine_tokenizer: Any, tokenizer: Any, model_dir: str | Path) -> None:
    """vLLM loads its tokenizer from the model directory by its own rules: it must give the trainer's ids (its stop
    strings are matched on its own detokenisation), or the run stops here with one line."""
    ours = list(tokenizer.encode(_PROBE, add_special_tokens=False))
    theirs = list(engine_tokenizer.encode(_PROBE, add_special_tokens=False))
    if ours != theirs:
        raise ValueError(f"{model_dir}: vLLM's tokenizer ({type(engine_tokenizer).__name__}) gives other ids than the "
                         f"model's own tokenizer files ({type(tokenizer).__name__}) for {_PROBE!r}: {theirs[:12]} "
                         f"vs {ours[:12]}; pass vLLM the tokenizer explicitly (tokenizer_mode / tokenizer)")


def _text_ids(ids: list[int], completion: Any, tokenizer: Any) -> list[int]:
    """The ids whose text the rewards read: the EOS that ended the completion (finish_reason "stop" with no stop
    string or stop token as stop_reason) and the tokenizer's EOS / padding ids dropped, other special tokens kept,
    as HFRolloutEngine decodes."""
    if ids and completion.finish_reason == "stop" and getattr(completion, "stop_reason", None) is None:
        ids = ids[:-1]
    dropped = {t for t in (getattr(tokenizer, "eos_token_id", None), getattr(tokenizer, "pad_token_id", None))
               if isinstance(t, int)}
    return [t for t in ids if t not in dropped]


def _as_expert_ids(value: Any) -> Tensor:
    """A numpy array (offline LLM) or nested lists (JSON) of expert ids as an int32 [rows, L, k] tensor."""
    import numpy as np

    return torch.from_numpy(np.asarray(value).astype(np.int32, copy=False))


def routed_experts_of(request: Any, completion: Any, prompt_len: int, completion_len: int, prompt_index: int
                      ) -> Tensor:
    """One completion's routed experts in RolloutBatch's layout, [P + C - 1, L, k] (int16 when it fits), from
    either documented vLLM layout (module docstring). UNVERIFIED: vLLM never ran here."""
    where = f"vLLM routed experts of prompt {prompt_index} (sample {getattr(completion, 'index', '?')})"
    fed = prompt_len + completion_len - 1
    generated = getattr(completion, "routed_experts", None)
    if generated is None:
        raise RuntimeError(f"{where}: none returned (a request preempted and re-prefilled loses them in vLLM "
                           f"0.21; was the engine built with enable_return_routed_experts?)")
    generated = _as_expert_ids(generated)
    if hasattr(request, "prompt_routed_experts"):  # vLLM 0.21: the prompt's rows on the request, shared by n
        if request.prompt_routed_experts is None:
            raise RuntimeError(f"{where}: the request carries no prompt_routed_experts")
        prompt = _as_expert_ids(request.prompt_routed_experts)
        if prompt.shape[0] != prompt_len or generated.shape[0] < completion_len - 1:
            raise RuntimeError(f"{where}: {prompt.shape[0]} prompt rows and {generated.shape[0]} generated rows for "
                               f"a {prompt_len}-token prompt and {completion_len} generated tokens")
        out = torch.cat([prompt, generated[:max(completion_len - 1, 0)]])
    else:  # vllm#28284: the whole sequence on the completion
        if generated.shape[0] < fed:
            raise RuntimeError(f"{where}: {generated.shape[0]} rows for a sequence of {prompt_len} + "
                               f"{completion_len} tokens (expected {fed})")
        out = generated[:fed]
    if out.dim() != 3:
        raise RuntimeError(f"{where}: shape {tuple(out.shape)}, expected [tokens, layers, k]")
    missing = int((out < 0).any(dim=(1, 2)).sum())
    if missing:
        raise RuntimeError(f"{where}: {missing} of {fed} positions have no routing (-1: vLLM 0.21 records none for "
                           f"prefix-cache hits); pass enable_prefix_caching=False to VLLMRolloutEngine or use a "
                           f"vLLM whose routing return covers cached blocks")
    fits_int16 = out.numel() == 0 or int(out.max()) <= torch.iinfo(torch.int16).max
    return out.to(torch.int16) if fits_int16 else out


MIN_SHARE = 0.05  # below this vLLM has no room for a useful KV cache


def memory_share(requested: float, free_bytes: int, total_bytes: int, reserve_bytes: int = 2 << 30) -> float:
    """The share of the device vLLM may take: what was asked for, capped by the memory free right now less a
    reserve for the trainer (vLLM V1 refuses to start when free < share x total). Raises ValueError when that
    leaves less than MIN_SHARE."""
    share = min(requested, (free_bytes - reserve_bytes) / total_bytes)
    if share < MIN_SHARE:
        gib = 1 << 30
        raise ValueError(
            f"rollout.gpu_memory_utilization: vLLM would get {max(share, 0.0):.2f} of the device: {free_bytes / gib:.1f} "
            f"of {total_bytes / gib:.1f} GiB are free after the trainer's models and optimizer were placed (and "
            f"{reserve_bytes / gib:.0f} GiB are kept for its activations); offload the reference "
            f"(--model.offload-reference), raise the tensor/pipeline parallel size, or use a smaller model")
    return round(share, 4)


def _load_weights_on_worker(worker: Any, weights: list[tuple[str, Tensor]]) -> None:
    """Runs inside a vLLM worker (collective_rpc passes the worker first)."""
    worker.model_runner.model.load_weights(weights=weights)


def _seed_worker(worker: Any, seed: int) -> None:
    """Runs inside a vLLM worker: its sampler draws from the default torch generators (requests without a seed)."""
    torch.manual_seed(seed)


def _empty_cuda_cache() -> None:
    if torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()


def _rng_devices() -> list[int]:
    return [torch.cuda.current_device()] if torch.cuda.is_available() else []


class VLLMRolloutEngine(RolloutEngine):
    """A colocated vllm.LLM. UNVERIFIED (see the module docstring).

    model_dir: a Hugging Face model directory (config, weights, tokenizer). Extra keyword arguments go
    to vllm.LLM unchanged (tensor_parallel_size, enable_prefix_caching, ...).
    record_routing: return each completion's routed experts (RolloutBatch.routed_experts) through vLLM's
    enable_return_routed_experts (MoE models only; see the module docstring).
    """

    def __init__(
        self, model_dir: str | Path, *, dtype: str = "bfloat16", gpu_memory_utilization: float = 0.5,
        enable_sleep_mode: bool = True, sleep_level: int = 2, max_model_len: int | None = None,
        enforce_eager: bool = False, seed: int = 0, tokenizer: Any = None, record_routing: bool = False,
        **llm_kwargs: Any,
    ):
        if sleep_level not in (1, 2):
            raise ValueError(f"VLLMRolloutEngine: sleep_level must be 1 or 2, got {sleep_level}")
        vllm = _import_vllm()
        self._vllm = vllm
        # Keep the engine core and its worker in this process, so weights pass by reference (no
        # serialisation) and the model object is reachable; TRL's colocate mode does the same. The
        # external_launcher executor asserts it (its engines must schedule deterministically).
        if llm_kwargs.get("distributed_executor_backend") == "external_launcher":
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        self.record_routing = record_routing
        if record_routing:
            llm_kwargs["enable_return_routed_experts"] = True
            # siblings of one prompt would hit each other's cached blocks, whose routing vLLM does not record
            if llm_kwargs.get("enable_prefix_caching"):
                raise ValueError("record_routing=True needs vLLM's prefix caching off (cached positions carry no "
                                 "routing); do not pass enable_prefix_caching=True")
            llm_kwargs["enable_prefix_caching"] = False
        if torch.cuda.is_available():
            free, total = torch.cuda.mem_get_info()
            asked, gpu_memory_utilization = gpu_memory_utilization, memory_share(gpu_memory_utilization, free, total)
            if gpu_memory_utilization < asked:
                warnings.warn(f"vLLM gets {gpu_memory_utilization:.2f} of the device instead of {asked:.2f}: only "
                              f"{free / (1 << 30):.1f} GiB were free at start", stacklevel=2)
        try:
            self.llm = vllm.LLM(
                model=str(model_dir), dtype=dtype, gpu_memory_utilization=gpu_memory_utilization,
                enable_sleep_mode=enable_sleep_mode, max_model_len=max_model_len, enforce_eager=enforce_eager,
                seed=seed, logprobs_mode="processed_logprobs", **llm_kwargs)
        except TypeError as err:
            if record_routing and "enable_return_routed_experts" in str(err):
                raise ValueError("record_routing=True needs a vLLM that returns routed experts "
                                 "(LLM(enable_return_routed_experts=True), vllm#28284, about 0.14 on); this "
                                 "one does not know the option") from err
            raise
        self.enable_sleep_mode = enable_sleep_mode
        self.sleep_level = sleep_level
        self._asleep = False
        self._weights_awake = True
        self._kv_cache_awake = True
        self._weights_valid = True  # False after a level-2 sleep until update_weights() has run
        self._warned_truncation = False
        self.tokenizer = tokenizer
        if tokenizer is not None:
            check_same_tokenizer(self.llm.get_tokenizer(), tokenizer, model_dir)

    # ------------------------------------------------------------------------------------------------

    def _vllm_params(self, params: SamplingParams, n: int):
        return self._vllm.SamplingParams(
            n=n, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
            max_tokens=params.max_new_tokens, stop=list(params.stop_strings) or None,
            include_stop_str_in_output=True, logprobs=0,
            # keep special tokens other than EOS in the text (the readable format's markers, engine/readable.py)
            skip_special_tokens=False, spaces_between_special_tokens=False)

    def generate(self, prompt_ids: list[list[int]], n: int, params: SamplingParams) -> RolloutBatch:
        check_prompts(prompt_ids, n)
        if params.temperature == 0 and n > 1:
            raise ValueError(f"VLLMRolloutEngine.generate: greedy decoding (temperature 0) with n={n} samples a "
                             f"prompt; vLLM refuses it (every sample would be the same): use n=1 or temperature > 0")
        if self._asleep:
            raise RuntimeError("VLLMRolloutEngine.generate called while asleep; call wake() first")
        if not self._weights_valid:
            raise RuntimeError("VLLMRolloutEngine.generate: the weights were discarded by a level-2 sleep; "
                               "call update_weights() before generating")
        truncated_sampling = params.temperature > 0 and (params.top_p < 1.0 or params.top_k > 0)
        if truncated_sampling and not self._warned_truncation:
            warnings.warn("VLLMRolloutEngine: with top_p < 1 or top_k > 0, vLLM's processed log-probs are those "
                          "of the truncated distribution, not log_softmax(logits / T); rollout_logp-based "
                          "corrections (TIS, mismatch metrics) are then biased", stacklevel=2)
            self._warned_truncation = True
        # One request per prompt, none with a seed of its own: the call's seed goes to the worker's generators
        # once, and duplicated prompts still get distinct samples (one stream for the whole batch).
        request_params = self._vllm_params(params, n)
        prompts = [{"prompt_token_ids": list(ids)} for ids in prompt_ids]
        with torch.random.fork_rng(devices=_rng_devices(), enabled=params.seed is not None):
            if params.seed is not None:
                self.llm.collective_rpc(_seed_worker, args=(int(params.seed),))
            outputs = self.llm.generate(prompts, request_params, use_tqdm=False)
        if len(outputs) != len(prompt_ids):
            raise RuntimeError(f"vLLM returned {len(outputs)} results for {len(prompt_ids)} prompts")

        batch_prompts, completion_ids, texts, logps, reasons = [], [], [], [], []
        routed: list[Tensor] | None = [] if self.record_routing else None
        for i, request in enumerate(outputs):
            completions = sorted(request.outputs, key=lambda c: c.index)
            if len(completions) != n:
                raise RuntimeError(f"vLLM returned {len(completions)} completions for prompt {i}, expected {n}")
            for completion in completions:
                ids = [int(t) for t in completion.token_ids]
                if completion.finish_reason not in ("stop", "length"):
                    raise RuntimeError(f"vLLM finished prompt {i} with reason {completion.finish_reason!r}")
                if completion.logprobs is None or len(completion.logprobs) != len(ids):
                    raise RuntimeError(f"vLLM returned no per-token logprobs for prompt {i}")
                logp = [position[token].logprob for position, token in zip(completion.logprobs, ids)]
                batch_prompts.append(list(prompt_ids[i]))
                completion_ids.append(ids)
                # the text the rewards read comes from the trainer's tokenizer (the user's files, checked at
                # load), whatever tokenizer class vLLM built for itself
                texts.append(completion.text if self.tokenizer is None else
                             self.tokenizer.decode(_text_ids(ids, completion, self.tokenizer), skip_special_tokens=False))
                logps.append(torch.tensor(logp, dtype=torch.float32))
                reasons.append(completion.finish_reason)
                if routed is not None:
                    routed.append(routed_experts_of(request, completion, len(prompt_ids[i]), len(ids), i))
        return RolloutBatch(prompt_ids=batch_prompts, completion_ids=completion_ids, completion_text=texts,
                            rollout_logp=logps, finish_reason=reasons, group_size=n, routed_experts=routed)

    # ------------------------------------------------------------------------------------------------

    def _local_model(self) -> Any | None:
        """The vLLM nn.Module when the worker lives in this process (V1 without multiprocessing)."""
        try:
            return self.llm.llm_engine.model_executor.driver_worker.worker.model_runner.model
        except AttributeError:
            return None

    def update_weights(self, named_tensors: Iterable[tuple[str, Tensor]]) -> None:
        if not self._weights_awake:
            self._wake_up(["weights"])
        model = self._local_model()
        for name, tensor in named_tensors:
            if model is not None:
                model.load_weights(weights=[(name, tensor)])
            else:
                self.llm.collective_rpc(_load_weights_on_worker, args=([(name, tensor)],))
        self.llm.reset_prefix_cache()
        self._weights_valid = True

    def _wake_up(self, tags: list[str]) -> None:
        _empty_cuda_cache()  # the trainer's freed blocks (activations, gradients) go back to the device first
        try:
            self.llm.wake_up(tags=tags)
        except TypeError:  # vLLM without staged wake-up: everything comes back at once
            self.llm.wake_up()
            self._weights_awake = self._kv_cache_awake = True
            return
        self._weights_awake |= "weights" in tags
        self._kv_cache_awake |= "kv_cache" in tags

    def sleep(self) -> None:
        if self.enable_sleep_mode and not self._asleep:
            self.llm.sleep(level=self.sleep_level)
            self._weights_awake = self._kv_cache_awake = False
            self._weights_valid = self.sleep_level == 1
        self._asleep = True

    def wake(self) -> None:
        missing = [tag for tag, awake in (("weights", self._weights_awake), ("kv_cache", self._kv_cache_awake))
                   if not awake]
        if missing:
            self._wake_up(missing)
        self._asleep = False
