"""Rollouts with a plain transformers causal LM: the reference engine, and the default on CPU.

Our own sampling loop over model(...) with a KV cache (not model.generate), because we need the
untruncated log-prob of every sampled token and exact control of stopping:

1. prefill each distinct prompt once (left-padded, attention mask, position ids counted from the
   first real token, so padding does not change a row's numbers), then repeat its cache n times;
2. per step: the sampled token's logp = z_t / T - logsumexp(z / T) for rollout_logp, sample from logits / T
   after top-k and top-p, stop a row at an EOS token or when its text contains a stop string;
3. rows that finished are dropped from the batch (and the cache) so long tails do not pay for short
   completions.

Stopping conventions (the same as vLLM with include_stop_str_in_output=True): an EOS token is kept in
completion_ids (the policy must learn to emit it) and left out of completion_text (EOS and padding ids
are dropped, other special tokens kept); a stop string ends the completion at the token that completes
it, and the text is cut right after the stop string (kept: the format reward needs the closing
</answer>). The last token may carry a few characters past the stop string; the ids keep that token,
the text does not.

Routing record (record_routing=True, MoE models): forward hooks on every router collect each forward's top-k
indices; the prefill's rows are cut to each prompt's real (right-aligned) positions and shared by its n samples,
each decode step's rows are mapped to completions through `rows` (compaction) and kept only for rows still
generating, so a completion gets exactly P + C - 1 positions (its last token is never fed).
"""
from __future__ import annotations

import contextlib
import inspect
import re
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

_WEIGHT_FILES = ("*.safetensors", "pytorch_model*.bin")


def _build_model(model_dir_or_config: Any, attn_implementation: str) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

    if isinstance(model_dir_or_config, torch.nn.Module):
        return model_dir_or_config
    if isinstance(model_dir_or_config, PretrainedConfig):
        return AutoModelForCausalLM.from_config(model_dir_or_config, attn_implementation=attn_implementation)
    model_dir = Path(model_dir_or_config)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir}: no config.json (expected a Hugging Face model directory)")
    has_weights = any(any(model_dir.glob(pattern)) for pattern in _WEIGHT_FILES)
    if has_weights:
        from transformers.utils import logging as hf_logging

        # the rollout copy is loaded once per run; its per-tensor progress bar is noise beside ours
        bar = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            return AutoModelForCausalLM.from_pretrained(
                str(model_dir), local_files_only=True, attn_implementation=attn_implementation)
        finally:
            if bar:
                hf_logging.enable_progress_bar()
    config = AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)


def _as_id_set(value: Any) -> set[int]:
    if value is None:
        return set()
    if isinstance(value, int):
        return {value}
    return {int(v) for v in value}


def _routes_per_completion(prefill: Tensor, prompt_lengths: list[int], n: int, step_completions: list[Tensor],
                           step_routes: list[Tensor], lengths: list[int]) -> list[Tensor]:
    """[P + C - 1, L, k] per completion: its prompt's real positions of the left-padded prefill, then the decode
    steps that fed it, in step order (a stable sort by completion keeps the chronological order within one)."""
    batch, per_token = len(lengths), prefill.shape[2:]
    if step_completions:
        owners = torch.cat(step_completions)
        order = torch.argsort(owners, stable=True)
        decoded = torch.cat(step_routes)[order].split(torch.bincount(owners, minlength=batch).tolist())
    else:
        decoded = [prefill.new_empty((0, *per_token))] * batch
    padded_len = prefill.shape[1]
    out = []
    for i in range(batch):
        if decoded[i].shape[0] != lengths[i] - 1:
            raise RuntimeError(f"record_routing: completion {i} has {lengths[i]} tokens but {decoded[i].shape[0]} "
                               f"decode steps were recorded")
        prompt = prefill[i // n, padded_len - prompt_lengths[i // n]:]
        out.append(torch.cat([prompt, decoded[i]]))
    return out


def sample_next_token(logits: Tensor, params: SamplingParams, generator: torch.Generator) -> Tensor:
    """One token per row from fp32 logits [B, V] with temperature, top-k and top-p (nucleus)."""
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    scores = logits / params.temperature
    vocab = scores.shape[-1]
    if 0 < params.top_k < vocab:
        kth_best = torch.topk(scores, params.top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth_best, float("-inf"))
    if params.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, dim=-1, descending=True)
        sorted_probs = sorted_scores.softmax(dim=-1)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        # Keep the smallest prefix whose mass reaches top_p (the most likely token always stays).
        sorted_scores = sorted_scores.masked_fill(mass_before >= params.top_p, float("-inf"))
        scores = torch.full_like(scores, float("-inf")).scatter(-1, order, sorted_scores)
    probs = scores.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def moe_routers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The router of every MoE layer in layer order: `model.model.layers[l].mlp.gate` where it is a top-k router
    (transformers 5.x Qwen3-MoE / DeepSeek-V3: forward returns (logits, weights, indices)); dense layers have none."""
    layers = getattr(getattr(model, "model", None), "layers", None) or []
    routers = []
    for layer in layers:
        gate = getattr(getattr(layer, "mlp", None), "gate", None)
        if isinstance(gate, torch.nn.Module) and hasattr(gate, "top_k"):
            routers.append(gate)
    return routers


class _RoutingRecorder:
    """Forward hooks on the routers that keep each call's top-k indices (on the model's device until `take`)."""

    def __init__(self, model: torch.nn.Module):
        self.routers = moe_routers(model)
        if not self.routers:
            raise ValueError(f"record_routing=True but {type(model).__name__} has no MoE routers "
                             f"(model.model.layers[*].mlp.gate with top_k): only MoE models route tokens")
        self.top_k = int(self.routers[0].top_k)
        num_experts = max(int(getattr(r, "num_experts", r.weight.shape[0])) for r in self.routers)
        self.dtype = torch.int16 if num_experts <= torch.iinfo(torch.int16).max else torch.int32
        self._calls: list[Tensor | None] = [None] * len(self.routers)

    @contextlib.contextmanager
    def hooks(self):
        handles = [router.register_forward_hook(self._hook(layer)) for layer, router in enumerate(self.routers)]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()
            self._calls = [None] * len(self.routers)

    def _hook(self, layer: int):
        def hook(module, args, output):
            indices = output[2] if isinstance(output, tuple) and len(output) == 3 else None
            if indices is None or indices.is_floating_point() or indices.shape[-1] != self.top_k:
                raise RuntimeError(f"record_routing: the router of MoE layer {layer} ({type(module).__name__}) does "
                                   f"not return (logits, weights, top-k indices); this transformers version's "
                                   f"routers are not supported")
            self._calls[layer] = indices.detach()

        return hook

    def take(self, rows: int, seq: int) -> Tensor:
        """The last forward's experts as [rows, seq, layers, k] on the CPU (one copy for all layers)."""
        if any(c is None for c in self._calls):
            raise RuntimeError("record_routing: a forward did not call every MoE router")
        stacked = torch.stack(self._calls, dim=1).to(self.dtype)  # [rows * seq, layers, k]
        self._calls = [None] * len(self.routers)
        return stacked.view(rows, seq, len(self.routers), self.top_k).cpu()


_EXPERT_NAME = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight$")


def _fused_expert_slice(params: dict, name: str):
    """(fused name, the view of one expert's gate/up/down weight in it) for a checkpoint's per-expert name, when
    the model holds its experts fused (transformers 5: gate_up_proj [E, 2I, H] with gate rows first, down_proj
    [E, H, I]); None otherwise."""
    match = _EXPERT_NAME.match(name)
    if match is None:
        return None
    base, e, which = match.group(1), int(match.group(2)), match.group(3)
    fused_name = f"{base}.gate_up_proj" if which in ("gate", "up") else f"{base}.down_proj"
    fused = params.get(fused_name)
    if fused is None or fused.dim() != 3 or e >= fused.shape[0]:
        return None
    if which == "down":
        return fused_name, fused.data[e]
    inter = fused.shape[1] // 2
    return fused_name, fused.data[e, :inter] if which == "gate" else fused.data[e, inter:]


def _slices_of(fused: torch.Tensor, fused_name: str) -> int:
    """Per-expert tensors that make up a fused expert tensor (gate and up: two per expert)."""
    return fused.shape[0] * (2 if fused_name.endswith("gate_up_proj") else 1)


class HFRolloutEngine(RolloutEngine):
    """Rollout engine over a transformers AutoModelForCausalLM.

    model_dir_or_config: a model directory (config.json; weights loaded when *.safetensors/*.bin are
    present, else random init), a transformers config, or an already built model (used in place: it is
    moved to device/dtype and frozen).
    tokenizer: decodes completions and checks stop strings; may be None when only ids are needed
    (completion_text is then empty and stop strings are refused).
    eos_token_id: the ids that end a completion; by default the tokenizer's EOS plus the model's
    generation/config EOS.
    num_threads: torch intra-op threads while generating (restored afterwards). Tiny models on a small,
    busy CPU run many times faster with 1 (thread synchronisation dominates their microsecond ops);
    None leaves torch's setting alone.
    record_routing: also return each completion's routed experts (RolloutBatch.routed_experts, for routing
    replay in the trainer); a ValueError on a model without MoE routers.
    """

    def __init__(
        self, model_dir_or_config: Any, tokenizer: Any = None, device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32, eos_token_id: int | Iterable[int] | None = None,
        attn_implementation: str = "sdpa", num_threads: int | None = None, record_routing: bool = False,
    ):
        self.device = torch.device(device)
        self.dtype = dtype
        self.tokenizer = tokenizer
        self.model = _build_model(model_dir_or_config, attn_implementation).to(device=self.device, dtype=dtype)
        self.model.eval()
        self.model.requires_grad_(False)
        config = self.model.config
        self.vocab_size = int(config.vocab_size)

        if eos_token_id is not None:
            self.eos_token_ids = _as_id_set(eos_token_id)
        else:
            generation_config = getattr(self.model, "generation_config", None)
            self.eos_token_ids = (_as_id_set(getattr(tokenizer, "eos_token_id", None))
                                  | _as_id_set(getattr(generation_config, "eos_token_id", None))
                                  | _as_id_set(getattr(config, "eos_token_id", None)))
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_token_id = pad if isinstance(pad, int) else (min(self.eos_token_ids) if self.eos_token_ids else 0)

        # transformers renamed past_key_values -> cache and num_logits_to_keep -> logits_to_keep over versions.
        forward_args = inspect.signature(self.model.forward).parameters
        self._cache_arg = "cache" if "cache" in forward_args else "past_key_values"
        self._keep_arg = next((a for a in ("logits_to_keep", "num_logits_to_keep") if a in forward_args), None)
        self._asleep = False
        if num_threads is not None and num_threads < 1:
            raise ValueError(f"num_threads must be >= 1 or None, got {num_threads}")
        self.num_threads = num_threads
        self._routing = _RoutingRecorder(self.model) if record_routing else None
        self.record_routing = record_routing

    # ------------------------------------------------------------------------------------------------
    # Generation

    def _new_cache(self):
        from transformers import DynamicCache

        try:
            return DynamicCache(config=self.model.config)
        except TypeError:  # older transformers: no config argument
            return DynamicCache()

    def _forward_last_logits(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor, cache) -> Tensor:
        kwargs = {self._cache_arg: cache}
        if self._keep_arg is not None:
            kwargs[self._keep_arg] = 1
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=True, **kwargs)
        return out.logits[:, -1].float()

    def _decode(self, ids: list[int]) -> str:
        """Completion text: EOS and padding ids dropped, every other special token kept (the readable format's
        markers, engine/readable.py, are special tokens the rewards must see)."""
        dropped = self.eos_token_ids | _as_id_set(getattr(self.tokenizer, "eos_token_id", None)) \
            | _as_id_set(getattr(self.tokenizer, "pad_token_id", None))
        return self.tokenizer.decode([t for t in ids if t not in dropped], skip_special_tokens=False)

    def generate(self, prompt_ids: list[list[int]], n: int, params: SamplingParams) -> RolloutBatch:
        with contextlib.ExitStack() as stack:
            if self.num_threads is not None:
                stack.callback(torch.set_num_threads, torch.get_num_threads())
                torch.set_num_threads(self.num_threads)
            if self._routing is not None:
                stack.enter_context(self._routing.hooks())
            return self._generate(prompt_ids, n, params)

    @torch.inference_mode()
    def _generate(self, prompt_ids: list[list[int]], n: int, params: SamplingParams) -> RolloutBatch:
        check_prompts(prompt_ids, n, self.vocab_size)
        if self._asleep:
            raise RuntimeError("HFRolloutEngine.generate called while asleep; call wake() first")
        stop_strings = tuple(params.stop_strings)
        if stop_strings and self.tokenizer is None:
            raise ValueError("stop_strings need a tokenizer; HFRolloutEngine was built with tokenizer=None")
        device, num_prompts = self.device, len(prompt_ids)
        batch = num_prompts * n
        max_new = params.max_new_tokens
        max_positions = getattr(self.model.config, "max_position_embeddings", None)
        longest = max(len(ids) for ids in prompt_ids)
        if max_positions is not None and longest + max_new > max_positions:
            raise ValueError(f"generate: longest prompt ({longest} tokens) + max_new_tokens ({max_new}) exceeds the "
                             f"model's max_position_embeddings ({max_positions})")
        temperature = params.logp_temperature

        # Prefill the distinct prompts, left-padded.
        prompt_len = longest
        input_ids = torch.full((num_prompts, prompt_len), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((num_prompts, prompt_len), dtype=torch.long)
        for row, ids in enumerate(prompt_ids):
            input_ids[row, prompt_len - len(ids):] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, prompt_len - len(ids):] = 1
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        position_ids = (attention_mask.cumsum(dim=-1) - 1).clamp(min=0)
        cache = self._new_cache()
        logits = self._forward_last_logits(input_ids, attention_mask, position_ids, cache)
        routing = self._routing
        if routing is not None:
            prefill_routes = routing.take(num_prompts, prompt_len)  # [num_prompts, prompt_len, L, k], left-padded
            step_completions: list[Tensor] = []  # per decode forward: the completions fed (rows still generating)
            step_routes: list[Tensor] = []  # ... and their experts [rows, L, k]

        # Fan out to n samples per prompt (prompt-major).
        cache.batch_repeat_interleave(n)
        logits = logits.repeat_interleave(n, dim=0)
        attention_mask = attention_mask.repeat_interleave(n, dim=0)
        next_position = position_ids[:, -1:].repeat_interleave(n, dim=0) + 1

        generator = torch.Generator(device=device)
        if params.seed is None:
            generator.seed()
        else:
            generator.manual_seed(params.seed)
        eos_ids = torch.tensor(sorted(self.eos_token_ids), dtype=torch.long)
        stop_window = 4 * max((len(s) for s in stop_strings), default=0) + 4  # tokens; >= 1 byte per token

        tokens = torch.zeros((batch, max_new), dtype=torch.long)
        token_logp = torch.zeros((batch, max_new), dtype=torch.float32)
        lengths_t = torch.zeros(batch, dtype=torch.long)
        stopped = torch.zeros(batch, dtype=torch.bool)  # finish reason "stop" (else "length")
        rows = torch.arange(batch)  # completion index of each row of the running batch
        alive = torch.ones(batch, dtype=torch.bool)  # rows still generating (finished rows ride along until compaction)

        for step in range(max_new):
            scaled = logits / temperature
            next_token = sample_next_token(logits, params, generator)
            # the sampled token's log-prob only: no [rows, V] log-softmax written out
            chosen_logp = scaled.gather(-1, next_token[:, None]).squeeze(-1) - torch.logsumexp(scaled, dim=-1)
            next_cpu = next_token.cpu()
            live_rows = rows[alive]
            tokens[live_rows, step] = next_cpu[alive]
            token_logp[live_rows, step] = chosen_logp.cpu()[alive]
            lengths_t[live_rows] = step + 1

            done = torch.isin(next_cpu, eos_ids) & alive if eos_ids.numel() else torch.zeros_like(alive)
            if stop_strings:
                for live in (alive & ~done).nonzero().flatten().tolist():
                    completion = int(rows[live])
                    tail = self._decode(tokens[completion, max(0, step + 1 - stop_window):step + 1].tolist())
                    if any(s in tail for s in stop_strings):
                        done[live] = True
            stopped[rows[done]] = True
            alive &= ~done
            if step == max_new - 1 or not bool(alive.any()):
                break

            # Drop finished rows from the batch and the KV cache once they are a quarter of it: fewer
            # rows to run, without copying the whole cache every time a single row finishes.
            if int((~alive).sum()) * 4 >= len(rows):
                keep = alive.nonzero().flatten()
                rows, alive = rows[keep], alive[keep]
                keep = keep.to(device)
                cache.batch_select_indices(keep)
                next_token, attention_mask, next_position = next_token[keep], attention_mask[keep], next_position[keep]
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones((len(rows), 1))], dim=-1)
            logits = self._forward_last_logits(next_token[:, None], attention_mask, next_position, cache)
            next_position = next_position + 1
            if routing is not None:  # completion token `step` of every row still generating was fed
                step_completions.append(rows[alive])
                step_routes.append(routing.take(len(rows), 1)[:, 0][alive])

        lengths = lengths_t.tolist()
        finish_reason = ["stop" if s else "length" for s in stopped.tolist()]
        completion_ids = [tokens[i, :lengths[i]].tolist() for i in range(batch)]
        rollout_logp = [token_logp[i, :lengths[i]].clone() for i in range(batch)]
        completion_text = []
        for i, ids in enumerate(completion_ids):
            text = self._decode(ids) if self.tokenizer is not None else ""
            if finish_reason[i] == "stop" and stop_strings:
                ends = [text.find(s) + len(s) for s in stop_strings if s in text]
                if ends:
                    text = text[:min(ends)]
            completion_text.append(text)
        routed_experts = None
        if routing is not None:
            routed_experts = _routes_per_completion(prefill_routes, [len(ids) for ids in prompt_ids], n,
                                                    step_completions, step_routes, lengths)
        return RolloutBatch(
            prompt_ids=[list(prompt_ids[i // n]) for i in range(batch)], completion_ids=completion_ids,
            completion_text=completion_text, rollout_logp=rollout_logp, finish_reason=finish_reason, group_size=n,
            routed_experts=routed_experts)

    # ------------------------------------------------------------------------------------------------
    # Weights and memory

    @torch.no_grad()
    def update_weights(self, named_tensors: Iterable[tuple[str, Tensor]], check_all_updated: bool = False) -> list[str]:
        """Copy streamed (HF name, full tensor) pairs into the model's parameters.

        Strict: an unknown name or a wrong shape is a ValueError naming it. Tied parameters (lm_head.weight
        and model.embed_tokens.weight) share storage, so either name updates both; if both arrive they
        must agree. Returns the names never updated by this stream; with check_all_updated=True a
        non-empty list is a ValueError instead.
        """
        params = dict(self.model.named_parameters(remove_duplicate=False))
        # MoE: the router's expert bias is a buffer, and transformers 5 holds the experts fused in memory
        params.update((n, b) for n, b in self.model.named_buffers() if n.endswith("e_score_correction_bias"))
        written_by: dict[int, str] = {}  # id(parameter) -> the streamed name that wrote it
        expert_slices: dict[str, int] = {}  # fused expert tensor -> slices written
        for name, tensor in named_tensors:
            param = params.get(name)
            if param is None:
                fused = _fused_expert_slice(params, name)
                if fused is not None:
                    fused_name, view = fused
                    if tuple(tensor.shape) != tuple(view.shape):
                        raise ValueError(f"update_weights: expert {name!r} has shape {tuple(view.shape)} in "
                                         f"{fused_name} but the streamed tensor has shape {tuple(tensor.shape)}")
                    view.copy_(tensor.detach().to(device=view.device, dtype=view.dtype))
                    expert_slices[fused_name] = expert_slices.get(fused_name, 0) + 1
                    if expert_slices[fused_name] == _slices_of(params[fused_name], fused_name):
                        written_by[id(params[fused_name])] = name
                    continue
                raise ValueError(f"update_weights: unknown parameter {name!r} (not in the rollout model)")
            if tuple(tensor.shape) != tuple(param.shape):
                raise ValueError(f"update_weights: parameter {name!r} has shape {tuple(param.shape)} but the "
                                 f"streamed tensor has shape {tuple(tensor.shape)}")
            value = tensor.detach().to(device=param.device, dtype=param.dtype)
            if id(param) in written_by:
                if not torch.equal(param, value):
                    raise ValueError(f"update_weights: {name!r} is tied to {written_by[id(param)]!r} in the "
                                     f"rollout model but the streamed tensors differ")
                continue
            param.copy_(value)
            written_by[id(param)] = name
        never_updated = [name for name, param in params.items() if id(param) not in written_by]
        if check_all_updated and never_updated:
            raise ValueError(f"update_weights: parameters never updated: {never_updated}")
        return never_updated

    def sleep(self) -> None:
        """On CUDA, move the weights to host memory so the trainer gets the GPU; a no-op on CPU."""
        if self.device.type == "cuda":
            self.model.to("cpu")
            torch.cuda.empty_cache()
        self._asleep = True

    def wake(self) -> None:
        if self.device.type == "cuda":
            self.model.to(self.device)
        self._asleep = False
