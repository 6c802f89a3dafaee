"""On-policy distillation with a teacher outside the student's parallel layout.

The trainer's own teacher (algo.teacher, engine.trainer) is a frozen Megatron model built with the policy's
tensor/pipeline layout: the teacher's heads must split over the student's TP size and it stays resident. This
module scores the student's samples with an unsharded transformers model instead, on the first rank of each
model-parallel group (the rank that owns the rollout engine), and broadcasts the log-probs to the group:

    trainer = HFTeacherTrainer(config, student_dir, prompts, teacher_dir="runs/r1z/hf", offload=True)
    trainer.fit()

so a student at any TP/PP size distils from a teacher of any shape that fits one device (offload: on the CPU
between uses). A teacher sharded over its own TP group is not built here.

Memory: the teacher never holds full-vocabulary logits for its batch. The decoder's last hidden states of a batch of
sequences are projected by the LM head `chunk_tokens` real tokens at a time (default: LOGIT_BUDGET fp32 elements,
at most 2**27 / vocabulary tokens, ~512 MB), and each chunk's target log-probs, logit[target] / T - logsumexp(
logits / T), are picked on the device; only [batch, width] floats reach the CPU. A model whose logits are not the
LM head of the last hidden state (a softcap or a logit scale in its config) runs one sequence at a time instead,
its log-softmax still taken in token chunks on the device.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist

from r1_engine.engine.batch import ADVANTAGES, with_logprobs
from r1_engine.engine.config import GRPOConfig
from r1_engine.engine.preflight import check_teacher
from r1_engine.engine.trainer import GRPOTrainer
from r1_engine.kernels.loss_family import distillation_advantages
from r1_engine.parallel import models
from r1_engine.parallel.rows import PackedRows
from r1_engine.parallel.step import logprobs

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
LOGIT_BUDGET = 2**27  # fp32 logits alive at once in the teacher's log-prob pass (elements: tokens x vocabulary)
# config fields that put something between the LM head and the logits (Gemma's softcap, Cohere's and Granite's scales)
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def sequence_spans(rows: PackedRows) -> list[tuple[int, int, int]]:
    """(row, start, end) of every packed sequence: the contiguous positions holding one seq id."""
    spans = []
    seq_ids = rows.seq_ids.cpu()
    for r in range(rows.num_rows):
        ids = seq_ids[r]
        cut = torch.nonzero(ids[1:] != ids[:-1]).flatten().add(1).tolist()
        for start, end in zip([0, *cut], [*cut, ids.numel()]):
            if int(ids[start]) >= 0:
                spans.append((r, start, end))
    return spans


class HFTeacher:
    """A frozen transformers causal LM that scores packed rows: log p(targets[t]) / T at the loss positions."""

    def __init__(self, model_dir: str | Path, device: torch.device | str, dtype: str = "float32",
                 offload: bool = False, batch_size: int = 32, chunk_tokens: int | None = None):
        from transformers import AutoModelForCausalLM

        self.device, self.offload, self.batch_size = torch.device(device), offload, batch_size
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=_DTYPES[dtype])
        self.model = model.to("cpu" if offload else self.device).eval().requires_grad_(False)
        if chunk_tokens is not None and chunk_tokens < 1:
            raise ValueError(f"HFTeacher: chunk_tokens must be >= 1, got {chunk_tokens}")
        vocab = model.get_output_embeddings().weight.shape[0]
        self.chunk_tokens = chunk_tokens or max(1, LOGIT_BUDGET // vocab)  # tokens whose logits exist at once
        config = model.config.get_text_config()
        self.head_only = not any(getattr(config, name, None) not in (None, 1, 1.0) for name in _LOGIT_TRANSFORMS)

    def _pick(self, logits_of, num_tokens: int, targets: torch.Tensor, temperature: float) -> torch.Tensor:
        """[num_tokens] fp32 log p(targets) / T, `chunk_tokens` at a time: logits_of(a, b) gives tokens a..b's
        logits; the full-vocabulary fp32 tensor of a chunk is the largest one made."""
        out = torch.empty(num_tokens, dtype=torch.float32, device=self.device)
        for a in range(0, num_tokens, self.chunk_tokens):
            b = min(a + self.chunk_tokens, num_tokens)
            logits = logits_of(a, b).float() / temperature
            out[a:b] = logits.gather(1, targets[a:b, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)
        return out

    @torch.no_grad()
    def logprobs(self, rows: PackedRows, temperature: float = 1.0) -> torch.Tensor:
        """fp32 [B, S] like parallel.step.logprobs: each packed sequence runs on its own (positions from 0),
        batch_size sequences at a time, right-padded; 0 off the loss positions."""
        if self.offload:
            self.model.to(self.device)
        try:
            out = torch.zeros(rows.tokens.shape, dtype=torch.float32)
            tokens, targets = rows.tokens.cpu(), rows.targets.cpu()
            spans = sequence_spans(rows)
            for first in range(0, len(spans), self.batch_size):
                chunk = spans[first:first + self.batch_size]
                width = max(end - start for _, start, end in chunk)
                ids = torch.zeros(len(chunk), width, dtype=torch.long)
                mask = torch.zeros(len(chunk), width, dtype=torch.long)
                for i, (r, start, end) in enumerate(chunk):
                    ids[i, :end - start], mask[i, :end - start] = tokens[r, start:end], 1
                picked = self._chunk_logprobs(chunk, ids, mask, targets, width, temperature).cpu()  # [n, width]
                for i, (r, start, end) in enumerate(chunk):
                    out[r, start:end] = picked[i, :end - start]
            return torch.where(rows.loss_mask.cpu() > 0, out, torch.zeros_like(out)).to(rows.device)
        finally:
            if self.offload:
                self.model.to("cpu")

    def _chunk_logprobs(self, chunk, ids: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor, width: int,
                        temperature: float) -> torch.Tensor:
        """[len(chunk), width] log p(target) / T of a right-padded batch of sequences (0 on padding), on the
        device; no full-vocabulary tensor for more than `chunk_tokens` tokens."""
        goal = torch.zeros(len(chunk), width, dtype=torch.long)
        for i, (r, start, end) in enumerate(chunk):
            goal[i, :end - start] = targets[r, start:end]
        ids, mask, goal = ids.to(self.device), mask.to(self.device), goal.to(self.device)
        real = mask.bool()
        picked = torch.zeros(len(chunk), width, dtype=torch.float32, device=self.device)
        if self.head_only:
            hidden = self.model.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state[real]  # [N, H]
            head = self.model.get_output_embeddings()
            picked[real] = self._pick(lambda a, b: head(hidden[a:b]), hidden.shape[0], goal[real], temperature)
            return picked
        for i in range(len(chunk)):  # the model's own logits, one sequence at a time
            n = int(real[i].sum())
            logits = self.model(input_ids=ids[i:i + 1, :n]).logits[0]  # [n, V] in the model's dtype
            picked[i, :n] = self._pick(lambda a, b: logits[a:b], n, goal[i, :n], temperature)
        return picked


class HFTeacherTrainer(GRPOTrainer):
    """GRPOTrainer with on-policy distillation from an HFTeacher (see the module docstring); config.algo.teacher
    must be None (the trainer would build a Megatron teacher too): the teacher is `teacher_dir`."""

    def __init__(self, config: GRPOConfig, model_dir: str | Path, train_examples: Sequence,
                 eval_examples: Sequence = (), *, teacher_dir: str | Path, offload: bool = False):
        if config.algo.teacher is not None:
            raise ValueError("HFTeacherTrainer: leave algo.teacher unset; the teacher is teacher_dir")
        super().__init__(config, model_dir, train_examples, eval_examples)
        # the trainer's checks (tokenizer, vocabulary, positions) with the teacher unsharded
        longest = max(len(it.prompt_ids) for ds in (self.train_set, self.eval_set) if ds for it in ds.items)
        unsharded = dataclasses.replace(self.cfg, model=dataclasses.replace(self.cfg.model, tensor_parallel=1))
        student = models.parse_hf_config(self.model_dir / "config.json", self.cfg.model.tensor_parallel)
        try:
            check_teacher(unsharded, str(teacher_dir), self.tokenizer, self.model_dir, student, longest)
        except ValueError:
            self.close()
            raise
        # every rank takes the distillation path (collect() asks `teacher is not None`); the leader scores
        self.teacher = HFTeacher(teacher_dir, self.device, self.cfg.model.dtype, offload) if self.is_leader else True

    def _with_distillation(self, batch: PackedRows) -> PackedRows:
        """As GRPOTrainer's, with the teacher's log-probs from the leader, broadcast over the model-parallel group."""
        T, mb = self.cfg.rollout.temperature, self.cfg.algo.num_microbatches
        student = logprobs(self.policy, batch, temperature=T, num_microbatches=mb)
        teacher = self.teacher.logprobs(batch, T) if self.is_leader else torch.empty_like(student)
        group = self.ps.model_parallel_group
        if dist.get_world_size(group) > 1:
            teacher = teacher.to(self.device)
            dist.broadcast(teacher, src=dist.get_global_rank(group, 0), group=group)
        batch = batch.with_extras(**{ADVANTAGES: distillation_advantages(student, teacher.to(student.device),
                                                                         batch.loss_mask)})
        return with_logprobs(batch, old_logp=student)
