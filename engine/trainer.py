"""The GRPO loop: rollouts -> rewards -> group advantages -> log-probs -> updates -> weight sync.

    trainer = GRPOTrainer(config, model_dir, train_examples, eval_examples)
    trainer.fit()

One step, as data flows (GRPO_SPEC.md):
  1. prompts_per_step prompts (each DP replica takes its share), G completions each from the
     rollout engine, with the per-token rollout log-probs;
  2. rule rewards in a worker pool, group-normalised advantages;
  3. packed rows with the RL vectors (engine.batch); reference log-probs (if beta > 0) and old log-probs (only when the
     updates go off-policy: several epochs or mini-batches), both through the fused kernels;
  4. epochs x mini-batches optimizer steps of the fused policy loss over Megatron's schedule;
  5. the new weights streamed into the rollout engine, tensor by tensor (parallel.convert).
Variants: DAPO's dynamic sampling (refill rounds) and truncated-sample masking; on-policy distillation
(algo.teacher: per-token advantages -(logp_student - logp_teacher) replace the reward advantages).
The first rank of each model-parallel group (tp 0, pp 0) owns the rollout engine and the reward
pool; it broadcasts the rollout to the other ranks of its group (the sampling side: engine.draws).
Off-policy (algo.max_staleness K > 0): a rollout worker process generates the next K steps' batches while this
one trains (engine.offpolicy, engine.rollout.worker).
"""
from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Sequence

import torch
import torch.distributed as dist

from r1_engine.engine.advantages import filter_uniform_groups, group_advantages
from r1_engine.engine.batch import ADVANTAGES, OLD_LOGP, ROUTED_EXPERTS, rl_rows, with_logprobs
from r1_engine.engine.checkpoint import latest_checkpoint, load_checkpoint
from r1_engine.engine.config import GRPOConfig, check_ranges, to_dict
from r1_engine.engine.data import (
    PromptDataset,
    PromptSampler,
    check_tokenizer_fits,
    load_tokenizer,
)
from r1_engine.engine.draws import RolloutDraws
from r1_engine.engine.eval import gather_results, sample_questions, summarize
from r1_engine.engine.metrics import MetricsLogger, PhaseTimer
from r1_engine.engine.offpolicy import RolloutsAhead
from r1_engine.engine.objectives import policy_objective
from r1_engine.engine.preflight import check_layout, check_lengths, check_teacher
from r1_engine.engine.profiling import StepProfiler
from r1_engine.engine.rollout import build_rollout_engine, rollout_model_dir
from r1_engine.engine.run import TrainingRun, learning_rate
from r1_engine.engine.rollout.worker import RolloutWorker, WorkerSpec
from r1_engine.engine.sampling import RolloutSampler, build_scorer, plan_scoring
from r1_engine.engine.step_metrics import CollectedStep, step_metrics
from r1_engine.kernels.loss_family import distillation_advantages
from r1_engine.parallel import convert, models
from r1_engine.parallel import state as pstate
from r1_engine.parallel.nvtx import nvtx_range
from r1_engine.parallel.optim import build_optimizer, set_learning_rate, wrap_for_training
from r1_engine.parallel.rows import PackedRows
from r1_engine.parallel.step import logprobs, train_step

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# the curves a person looks at first (curves.png); everything else is in metrics.jsonl and TensorBoard
CURVES = ("accuracy", "format_rate", "eval/pass@1", "eval/format_rate", "reward/mean", "response_length/mean",
          "train/kl", "train/entropy", "train/grad_norm", "train/clip_low", "train/clip_high", "train/mismatch_abs",
          "time/step", "throughput/tokens_per_s")


class GRPOTrainer(RolloutDraws, TrainingRun):
    label = "GRPO"
    curves = CURVES

    def __init__(self, config: GRPOConfig, model_dir: str | Path, train_examples: Sequence, eval_examples: Sequence = ()):
        check_ranges(config)
        self.cfg = cfg = config
        self.model_dir = self.tokenizer_dir = Path(model_dir)
        self.ps = pstate.init_parallel(cfg.model.tensor_parallel, cfg.model.pipeline_parallel, cfg.train.seed,
                                       expert_parallel=cfg.model.expert_parallel)
        self.device = self.ps.device
        self.is_leader = dist.get_rank(self.ps.model_parallel_group) == 0  # tp 0 / pp 0 of this replica
        # config.json first: a directory without it is not a model, whatever its tokenizer files
        info = models.parse_hf_config(self.model_dir / "config.json", cfg.model.tensor_parallel,
                                      cfg.model.expert_parallel)
        # MoE: the rollout records each token's experts and the policy's passes replay them (R3)
        self.replay_routing = info.moe is not None and cfg.model.routing_replay
        aux_loss_coeff = cfg.model.moe_aux_loss_coeff
        if self.replay_routing:
            # Megatron's load-balancing loss is computed from the routing the policy would pick, not the replayed
            # one: with replay on, the checkpoint's own coefficient (Qwen3-MoE: 0.001) is left out, and one set by
            # hand is refused here, before anything is built
            if aux_loss_coeff:
                raise ValueError(f"--model.moe-aux-loss-coeff={aux_loss_coeff}: a load-balancing loss with routing "
                                 f"replay is not supported (it would be computed on the policy's own routing, not the "
                                 f"replayed one); use 0, or --model.no-routing-replay")
            if aux_loss_coeff is None and info.moe.aux_loss_coeff and self.ps.is_main:
                print(f"note: {self.model_dir}'s load-balancing loss (router_aux_loss_coef "
                      f"{info.moe.aux_loss_coeff}) is off under routing replay", flush=True)
            aux_loss_coeff = 0.0
        self.tokenizer = load_tokenizer(self.model_dir)
        check_tokenizer_fits(self.tokenizer, info.vocab_size, self.model_dir)
        dtype = _DTYPES[cfg.model.dtype]

        check_layout(cfg, self.ps.dp_size)
        # everything a config or data mistake can break is checked before the models are built
        scoring = plan_scoring(cfg.reward, [*train_examples, *eval_examples])  # rule weights, reward models, judge
        self.train_set = PromptDataset(train_examples, self.tokenizer, cfg.data.template, cfg.data.max_prompt_tokens)
        self.eval_set = (PromptDataset(eval_examples, self.tokenizer, cfg.data.template, cfg.data.max_prompt_tokens)
                         if len(eval_examples) else None)
        longest = max(len(it.prompt_ids) for ds in (self.train_set, self.eval_set) if ds for it in ds.items)
        check_lengths(cfg, info, longest, self.model_dir)
        teacher_dir = None
        if cfg.algo.teacher is not None:
            teacher_dir = check_teacher(cfg, cfg.algo.teacher, self.tokenizer, self.model_dir, info, longest)
        self.out = Path(cfg.train.out)
        ckpt = latest_checkpoint(self.out)
        if ckpt is not None and not cfg.train.resume:
            raise ValueError(f"{self.out} already holds a run (checkpoint {ckpt.name}); with --train.no-resume "
                             f"nothing is overwritten: choose another --train.out, or drop --train.no-resume to "
                             f"continue it")
        # the loss's own eps / aggregation where unset (what the kernels run is what the run records), and Dr.
        # GRPO's L_max = the generation budget: a constant (the kernels require it), so the loss is split-invariant
        loss = cfg.loss.resolved()
        if loss.aggregation == "seq-mean-token-sum-norm" and loss.max_len is None:
            loss = dataclasses.replace(loss, max_len=cfg.rollout.max_new_tokens)
        ahead = cfg.algo.max_staleness
        if ahead and torch.cuda.is_available():
            raise ValueError(f"--algo.max-staleness={ahead}: off-policy rollouts on GPUs (rollouts on their own "
                             f"devices, weights over NCCL) are not built yet; use 0 on CUDA")
        if ahead and loss.tis_cap is None and loss.token_mask_range is None and loss.seq_mask_range is None:
            loss = dataclasses.replace(loss, tis_cap=2.0)  # the behaviour policy is older: GRPO_SPEC's TIS, C = 2
        self.cfg = cfg = dataclasses.replace(cfg, loss=loss)

        policy = models.build_gpt_model(self.model_dir / "config.json", dtype=dtype, fp8=cfg.model.fp8,
                                        moe_bias_update_rate=cfg.model.moe_bias_update_rate,
                                        moe_aux_loss_coeff=aux_loss_coeff)
        convert.load_hf_checkpoint(policy, self.model_dir)
        self.policy = wrap_for_training(policy)
        self.optimizer = build_optimizer(self.policy, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
                                         betas=tuple(cfg.optim.betas), grad_clip=cfg.optim.grad_clip)
        self.reference = None
        if cfg.loss.beta != 0.0:
            self.reference = models.freeze(models.build_gpt_model(self.model_dir / "config.json", dtype=dtype))
            convert.load_hf_checkpoint(self.reference, self.model_dir)
            if cfg.model.offload_reference:
                models.offload_to_cpu(self.reference)

        self.teacher = None
        if teacher_dir is not None:  # on-policy distillation: frozen, same parallel layout as the policy
            self.teacher = models.freeze(models.build_gpt_model(teacher_dir / "config.json", dtype=dtype))
            convert.load_hf_checkpoint(self.teacher, teacher_dir)

        self.rollout_engine = None
        r = cfg.rollout
        self.ahead = None  # max_staleness > 0: the rollouts of the next steps, from a worker process
        if ahead:
            worker = None
            if self.is_leader:
                worker = RolloutWorker(WorkerSpec(str(self.model_dir), cfg.reward, scoring, cfg.model.dtype,
                                                  r.num_threads, self.replay_routing))
            self.ahead = RolloutsAhead(ahead, worker, self._mp_broadcast)
        elif self.is_leader or r.backend == "vllm":  # vLLM: a colocated part on every rank (engine.rollout.colocate)
            self.rollout_engine = build_rollout_engine(
                r.backend, rollout_model_dir(r.backend, self.model_dir, info.hf_config, self.policy, self.out),
                self.tokenizer, device=self.device, dtype=cfg.model.dtype,
                seed=cfg.train.seed, gpu_memory_utilization=r.gpu_memory_utilization, num_threads=r.num_threads,
                record_routing=self.replay_routing, max_model_len=cfg.data.max_prompt_tokens + r.max_new_tokens)
        self.rollout_sampler = None  # generates and scores on the model-parallel group's first rank
        if self.ahead is not None:
            self.rollout_sampler = self.ahead.worker  # evaluations: a request to the worker, waited for
        elif self.is_leader:
            self.rollout_sampler = RolloutSampler(self.rollout_engine,
                                                  build_scorer(cfg.reward, scoring, device=self.device, dtype=dtype))
        # every rank draws the same global batch; DP replicas take interleaved shares of it
        self.sampler = PromptSampler(self.train_set, cfg.rollout.prompts_per_step, seed=cfg.train.seed)
        self.step = 0
        self.total_steps = cfg.train.steps
        self.warmup_steps = cfg.optim.warmup_steps or math.ceil(cfg.optim.warmup_ratio * cfg.train.steps)
        self._profiler = None
        self.draws = 0  # prompt batches drawn so far (one a step, more with dynamic sampling): seeds the rollouts
        self.logger = MetricsLogger(self.out) if self.ps.is_main else None
        self.timer = PhaseTimer(sync_cuda=torch.cuda.is_available())
        self.stop_strings = tuple(cfg.rollout.stop_strings)
        if ckpt is not None:
            self._resume(ckpt)
            if self.ps.is_main:
                print(f"resumed {self.out} from {ckpt.name} at step {self.step} of {cfg.train.steps}", flush=True)
        if self.logger is not None:  # a crashed run's rows after its checkpoint are redone now: one row per step
            dropped = self.logger.truncate_after(self.step if ckpt is not None else -1)  # no checkpoint: start over
            if dropped:
                print(f"{self.logger.path}: dropped {dropped} line(s) logged after the checkpoint", flush=True)

    # ------------------------------------------------------------------------------------------ one step
    def train_one_step(self) -> dict[str, float]:
        self.timer.reset()
        t0 = time.perf_counter()
        step = self.collect()
        updates, lr = self.update(step.minis)
        self.step += 1
        with self.timer("weight_sync"):
            self.sync_weights()
        return step_metrics(step, updates, lr, time.perf_counter() - t0, timings=self.timer.metrics(prefix="time/"),
                            generated_tokens=self._generated_tokens, ps=self.ps)

    def collect(self) -> "CollectedStep":
        """Rollouts, rewards, advantages and the packed mini-batches (with ref/old log-probs) for this step.
        With dynamic sampling the mini-batches come from the kept groups."""
        cfg, ps, timer = self.cfg, self.ps, self.timer
        G = cfg.rollout.group_size
        self._generated_tokens = 0  # over every sampling round of this step
        with timer("rollout"):
            first = self._draw()
            rollout, _, rewards = first
            extra = {}
            if cfg.algo.dynamic_sampling:
                rollout, rewards, extra = self._dynamic_sampling(rollout, rewards)
        if self.rollout_engine is not None:  # a colocated vLLM frees its KV cache and weights while we train
            self.rollout_engine.sleep()
        with timer("advantages"):
            if cfg.algo.advantage_scale == "batch" and ps.dp_size > 1:
                # the batch std spans every DP rank's rewards (equal shares; groups never straddle ranks)
                # (on the device: NCCL groups take no CPU tensors)
                local = rewards.to(self.device)
                parts = [torch.empty_like(local) for _ in range(ps.dp_size)]
                dist.all_gather(parts, local, group=ps.dp_group)
                n = rewards.numel()
                adv = group_advantages(torch.cat(parts).cpu(), G, scale="batch", estimator=cfg.algo.estimator)
                adv = adv[ps.dp_rank * n:(ps.dp_rank + 1) * n].float()
            else:
                adv = group_advantages(rewards, G, scale=cfg.algo.advantage_scale,
                                       estimator=cfg.algo.estimator).float()
        # groups that teach nothing (all rewards equal); with every group so, the step only moves the KL term
        extra["advantage/zero_groups_frac"] = (~filter_uniform_groups(rewards, G)).double().mean().item()
        train_on = (~rollout.truncated).tolist() if cfg.algo.mask_truncated else None
        if train_on is not None:
            extra["train/masked_truncated_frac"] = 1.0 - sum(train_on) / len(train_on)
        with timer("logprobs"):
            # mini-batches are cut from the sequences before packing (round-robin, so each mixes lengths and
            # groups); every DP rank then runs the same number of optimizer steps
            minis = []
            offload = self.reference is not None and cfg.model.offload_reference
            if offload:  # once per step, not once per mini-batch
                models.onload(self.reference, self.device)
            for k in range(cfg.algo.mini_batches):
                idx = list(range(k, rollout.num_completions, cfg.algo.mini_batches))
                batch = rl_rows(
                    [rollout.prompt_ids[i] for i in idx], [rollout.completion_ids[i] for i in idx],
                    None if self.teacher is not None else adv[idx],
                    rollout_logp=[rollout.rollout_logp[i] for i in idx],
                    routed_experts=([rollout.routed_experts[i] for i in idx]
                                    if self.replay_routing and rollout.routed_experts is not None else None),
                    train_on=None if train_on is None else [train_on[i] for i in idx], pack=True,
                    max_tokens_per_row=cfg.algo.max_tokens_per_row, pad_id=0).to(self.device)
                if self.teacher is not None:
                    batch = self._with_distillation(batch)
                    kl = -(batch.extras[ADVANTAGES] * batch.loss_mask).sum() / batch.loss_mask.sum().clamp(min=1)
                    extra["distill/reverse_kl"] = extra.get("distill/reverse_kl", 0.0) + kl.item() / cfg.algo.mini_batches
                minis.append(self._with_logprobs(batch))
            if offload:
                models.offload_to_cpu(self.reference)
        if self.ahead is not None:
            extra["async/staleness"] = float(self._staleness)
        return CollectedStep(*first, minis, extra)

    def _with_distillation(self, batch: PackedRows) -> PackedRows:
        """The advantages of on-policy distillation: -(logp_student - logp_teacher) per token of the student's
        samples; the student's log-probs double as old_logp (they are the policy's at sampling time)."""
        T, mb = self.cfg.rollout.temperature, self.cfg.algo.num_microbatches
        student = logprobs(self.policy, batch, temperature=T, num_microbatches=mb)
        teacher = logprobs(self.teacher, batch.with_extras(**{ROUTED_EXPERTS: None}), temperature=T,
                           num_microbatches=mb)
        batch = batch.with_extras(**{ADVANTAGES: distillation_advantages(student, teacher, batch.loss_mask)})
        return with_logprobs(batch, old_logp=student)

    def _with_logprobs(self, batch: PackedRows) -> PackedRows:
        """Reference log-probs (beta > 0) and old log-probs (only when the updates go off-policy)."""
        cfg, T, mb = self.cfg, self.cfg.rollout.temperature, self.cfg.algo.num_microbatches
        if self.reference is not None:
            with nvtx_range("ref_logprobs"):  # the reference routes by its own weights (no replay)
                ref_logp = logprobs(self.reference, batch.with_extras(**{ROUTED_EXPERTS: None}), temperature=T,
                                    num_microbatches=mb)
                batch = with_logprobs(batch, ref_logp=ref_logp)
        if cfg.algo.epochs_per_batch * cfg.algo.mini_batches > 1 and OLD_LOGP not in batch.extras:
            with nvtx_range("old_logprobs"):
                old_logp = logprobs(self.policy, batch, temperature=T, num_microbatches=mb)
                batch = with_logprobs(batch, old_logp=old_logp)
        return batch

    def update(self, minis: list[PackedRows]):
        """epochs x mini-batches optimizer steps of the policy loss; returns (their metrics, lr). An MoE expert
        bias (DeepSeek-V3) moves once per rollout, from the load of the steps taken: under routing replay every
        update replays the same routing, so a move per update would push the bias k times one way unchecked."""
        from r1_engine.parallel.moe import update_expert_bias

        cfg = self.cfg
        o = cfg.optim
        lr = learning_rate(self.step, self.total_steps, o.lr, self.warmup_steps, o.schedule, o.min_lr_ratio)
        set_learning_rate(self.optimizer, lr)
        updates = []
        objective = policy_objective(cfg.loss, cfg.rollout.temperature)
        with self.timer("train"):
            for _ in range(cfg.algo.epochs_per_batch):
                for mini in minis:
                    updates.append(train_step(self.policy, self.optimizer, mini, objective,
                                              num_microbatches=cfg.algo.num_microbatches,
                                              fused_lm_head=cfg.algo.fused_lm_head, update_bias=False))
            update_expert_bias(self.policy)  # skipped steps' load was dropped: none taken, no move
        return updates, lr

    def sync_weights(self) -> None:
        """Stream the policy into the rollout engine (every model-parallel rank iterates: it is collective)."""
        stream = convert.export_hf_state(self.policy)
        if self.ahead is not None:  # to the rollout worker, for the draws submitted from now on
            self.ahead.publish(((name, t.detach()) for name, t in stream), version=self.step)
        elif self.rollout_engine is not None:  # the leader, or every rank of a colocated vLLM
            self.rollout_engine.update_weights((name, t.detach()) for name, t in stream)
            self.rollout_engine.wake()  # weights are in; the KV cache comes back for the next rollout
        else:
            for _ in stream:
                pass

    # ------------------------------------------------------------------------------------------ evaluation
    def evaluate(self, limit: int | None = None) -> dict[str, float]:
        """Held-out pass@1 (mean accuracy over k samples a question), pass@k and format rate, by engine.eval (the
        code recipes/eval.py runs; cons@k is left to it: its math-verify grouping would stall training)."""
        if self.eval_set is None:
            return {}
        items = [self.eval_set[i] for i in range(len(self.eval_set))][: limit or self.cfg.train.eval_size]
        params = self.sampling_params(seed=self.cfg.train.seed + 7, eval_mode=True)
        local = sample_questions(self.generate_and_score, items, self.cfg.train.eval_samples, params,
                                 dp_rank=self.ps.dp_rank, dp_size=self.ps.dp_size)  # same samples for any DP
        summary = summarize(gather_results(local, self.ps.dp_group if self.ps.dp_size > 1 else None))
        keys = [k for k in summary if k.startswith("pass@")] + ["format_rate", "truncated_frac", "length/mean"]
        return {f"eval/{k}": summary[k] for k in keys}

    # ------------------------------------------------------------------------------------------ the loop
    # ------------------------------------------------------------------------------------------ the run skeleton's hooks
    def before_step(self) -> None:
        if self._profiler is None:
            self._profiler = StepProfiler.from_config(self.cfg.train, self.ps.rank, self.out)  # --train.profile-steps
        self._profiler.begin(self.step + 1)

    def after_step(self, metrics: dict[str, float]) -> None:
        cfg = self.cfg
        if cfg.train.eval_every and self.step % cfg.train.eval_every == 0 and self.step < cfg.train.steps:
            with nvtx_range("eval"):
                metrics.update(self.evaluate())

    def end_step(self) -> None:
        self._profiler.end(self.step)

    def end_fit(self) -> None:
        if self._profiler is not None:
            self._profiler.close()
            self._profiler = None

    def progress_postfix(self, metrics: dict[str, float]) -> dict[str, str]:
        return {"acc": f"{metrics.get('accuracy', math.nan):.2f}", "fmt": f"{metrics.get('format_rate', math.nan):.2f}",
                "kl": f"{metrics.get('train/kl', 0.0):.1e}"}

    def trainer_state(self) -> dict:
        state = {"step": self.step, "draws": self.draws, "sampler": self.sampler.state_dict(),
                 "config": to_dict(self.cfg)}
        if self.ahead is not None:
            state["pending"] = self.ahead.state()
        return state

    def rank_state(self):
        """Off-policy: the generated batches not yet trained on (this rank's share), waited for."""
        return self.ahead.rank_state() if self.ahead is not None else None

    def save(self) -> Path:
        with nvtx_range("checkpoint"):
            return super().save()

    def _resume(self, path: Path) -> None:
        state = load_checkpoint(path, model=self.policy, optimizer=self.optimizer)
        saved = state.get("config", {})
        for section, key in (("rollout", "prompts_per_step"), ("rollout", "group_size"), ("train", "seed"),
                             ("algo", "max_staleness")):
            then, now = saved.get(section, {}).get(key), getattr(getattr(self.cfg, section), key)
            if then is not None and then != now:
                raise ValueError(f"{path}: checkpoint was written with {section}.{key}={then}, this run has {now}; "
                                 f"resuming would not continue the same run (use a new --train.out)")
        self.step = self._saved_at = int(state["step"])
        self.draws = int(state.get("draws", self.step))
        self.sampler.load_state_dict(state["sampler"])
        if self.ahead is not None:
            self.ahead.load(state.get("pending", []), state.get("rank_state"), str(path))
        self.sync_weights()

    def close(self) -> None:
        if self.rollout_sampler is not None:
            self.rollout_sampler.close()  # off-policy: the worker process (and its reward pool)
        super().close()
