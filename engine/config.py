"""The GRPO trainer's typed configuration (dataclasses) and its range checks naming the flag.

    torchrun recipes/r1_zero.py --config my.yaml --rollout.group-size 16 --loss.beta 0.001

`load_config(GRPOConfig)` (engine/cli.py, re-exported here) reads `--config FILE.yaml` into the dataclass, then the
command line on top; `check_ranges` checks every ranged field before anything is built.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

# re-exported: the recipes and tests import the config machinery from here
from r1_engine.engine.cli import (  # noqa: F401
    CONFIG_HELP,
    USER_ERRORS,
    from_dict,
    load_config,
    load_yaml,
    pop_config_arg,
    read_yaml,
    run_cli,
    to_dict,
)
from r1_engine.kernels.loss_family import PolicyLossConfig


# The at-scale defaults a named model gets (the embedded presets set their own): a generation budget that fits
# reasoning (the paper's runs used 32,768 tokens; 8,192 is what one 8-GPU node trains a 7B model with at a useful
# pace, raise it with --rollout.max-new-tokens), and bf16 wherever there is a GPU.
GENERATION_BUDGET = 8192


def device_dtype() -> str:
    """bfloat16 where CUDA is present, float32 on a CPU (bf16 matmuls there are slow and the tests compare fp32)."""
    import torch

    return "bfloat16" if torch.cuda.is_available() else "float32"


@dataclass
class ModelConfig:
    path: str | None = None
    """HF model directory (config.json, safetensors, tokenizer). None: the recipe's embedded default."""
    dtype: Literal["float32", "bfloat16"] = field(default_factory=lambda: device_dtype())
    """Weights and activations: bfloat16 where CUDA is present, else float32 (the optimizer keeps fp32 master
    weights)."""
    tensor_parallel: int = 1
    """Megatron tensor-parallel size (vocab-parallel loss included); WORLD_SIZE = TP x PP x DP."""
    pipeline_parallel: int = 1
    """Megatron pipeline-parallel size."""
    fp8: Literal["e4m3", "hybrid"] | None = None
    """FP8 through Transformer Engine (H100 only; unverified without TE)."""
    offload_reference: bool = False
    """Keep the frozen reference model on CPU between its uses."""
    expert_parallel: int = 1
    """MoE models: Megatron expert-parallel size (experts split over this many data-parallel ranks)."""
    routing_replay: bool = True
    """MoE models: the rollout engine records each token's experts and the policy's log-prob passes and train
    step replay them (R3), so the trainer scores the tokens through the experts that sampled them."""
    moe_bias_update_rate: float = 1e-3
    """MoE with an expert bias (DeepSeek-V3): aux-loss-free balancing step, once per rollout from the load of its
    updates (not per mini-batch / epoch, and not on a skipped step); 0 freezes the bias."""
    moe_aux_loss_coeff: float | None = None
    """MoE: load-balancing loss coefficient (None: the checkpoint's own, e.g. Qwen3-MoE's router_aux_loss_coef).
    Refused with routing replay (Megatron computes it from the policy's own top-k and over padding): set 0."""
    preset: Literal["tiny", "tiny-moe"] = "tiny"
    """Without --model: the embedded base model, dense (tiny) or DeepSeek-V3-shaped mixture of experts (tiny-moe)."""


@dataclass
class DataFiles:
    """The data section every trainer shares: the file, the field holding the question, the prompt template."""

    path: str | None = None
    """The training file (.jsonl or .parquet)."""
    prompt_key: str = "prompt"
    """Field of each row holding the question."""
    template: str = "r1-zero"
    """r1-zero | chat | none | a custom string with {prompt} (engine.data.apply_template)."""


@dataclass
class DataConfig(DataFiles):
    """GRPO's data section: the shared one (DataFiles), the reference answers, held-out prompts and a length cap."""

    eval_path: str | None = None
    """Held-out prompts (same format) for pass@1 before, during (train.eval_every) and after training."""
    answer_key: str = "answer"
    """Field of each row holding the reference answer."""
    max_prompt_tokens: int = 512
    """Longer prompts are skipped (counted and warned about), never truncated."""


@dataclass
class RolloutConfig:
    backend: Literal["hf", "vllm"] = "hf"
    """hf: built-in batched sampling on the training device (any machine); vllm: production rollouts."""
    prompts_per_step: int = 16
    """Prompts a step over all data-parallel ranks (a multiple of the DP size)."""
    group_size: int = 8
    """G: completions sampled per prompt."""
    temperature: float = 1.0
    """Sampling temperature; the trainer's log-probs use the same temperature."""
    top_p: float = 1.0
    top_k: int = -1
    """-1: no top-k cut."""
    max_new_tokens: int = GENERATION_BUDGET
    """Generation budget per completion (a reasoning-length default; the paper used 32,768); prompt + budget must
    fit the model's max_position_embeddings."""
    stop_strings: tuple[str, ...] = ()
    """Generation also stops after any of these strings (the stop string is kept). Default none: a completion ends
    with the EOS the policy samples, so training teaches the model to stop, as a user sampling the exported model
    with plain `generate` needs. A completion cut at a stop string is trained without an EOS: the policy never
    learns to end there (use stop strings only for a model that already ends its answers with EOS)."""
    gpu_memory_utilization: float = 0.5
    """vLLM only: the share of the device's memory for its weights and KV cache, capped by what is free at start."""
    num_threads: int | None = 1
    """CPU threads for the HF backend's generation (1 is fastest for tiny models on busy CPUs)."""


@dataclass
class RewardConfig:
    weights: dict[str, float] = field(default_factory=lambda: {"accuracy": 1.0, "format": 0.5, "language": 0.0})
    """Component -> weight; components: accuracy, format, language (all three are always scored and logged)."""
    language: str = "en"
    """Target language of the language-consistency reward (script-based): en, zh, ..."""
    overlong_buffer: int | None = None
    """DAPO soft overlong punishment: the last L_c tokens of rollout.max_new_tokens ramp the reward to -1
    (None or 0: off)."""
    num_workers: int = 2
    """Reward worker processes (math-verify is CPU-bound; 0: score in the trainer's process)."""
    timeout_s: float = 10.0
    """Per-completion reward timeout; a timed-out completion scores 0 and is counted."""
    models: dict[str, str] = field(default_factory=dict)
    """Reward models for general prompts (R1's all-scenario RL): name -> HF AutoModelForSequenceClassification
    dir, run on the rollout device. Weight: reward.weights[name] (default 1). Reasoning prompts keep the rules."""
    model_scope: dict[str, Literal["summary", "response"]] = field(default_factory=dict)
    """name -> what the reward model reads after the prompt: summary (helpfulness, the default: the text after
    the readable format's summary marker) or response (harmlessness: the whole response). A reward model trained
    here records its scope (engine.reward_model.RECORD_FILE) and is scored on it; a setting that contradicts it is
    an error."""
    model_normalization: Literal["group", "none"] = "group"
    """How reward-model scores enter a general row's total: group (the default) z-scores each model's scores
    within the prompt's group of completions, (s - mean) / (std + 1e-6), population std, so a reward model's raw
    logit scale cannot outweigh the rule rewards under --algo.advantage-scale none|batch; none: raw scores. The
    logged rm components are the raw scores either way."""
    code_test_timeout_s: float = 2.0
    """Code prompts: wall-clock limit of one test run of the program (its CPU limit: the same, rounded up)."""
    code_timeout_s: float = 60.0
    """Code prompts: the most judging one completion may take (compile + every test); tests it cuts off fail."""
    code_memory_mb: int = 512
    """Code prompts: the program's address-space limit."""
    code_workers: int | None = None
    """Reward workers when the data has code prompts (at least reward.num_workers; None: the cores)."""
    allow_unsandboxed_code: bool = False
    """Judge code prompts even where only the pure-Python rlimits fallback runs (no C compiler, or no isolation the
    launcher can get here): NOT a sandbox, a hostile program can read and write your files and use the network."""


@dataclass
class OptimConfig:
    """The optimiser section of every trainer (GRPO, SFT): Adam with a linear warm-up, then a constant or cosine
    learning rate (engine.run.learning_rate)."""

    lr: float = 1e-6
    """Peak Adam learning rate (after the warm-up)."""
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    """Global gradient-norm clip (over every TP/PP/DP shard; 0: none)."""
    warmup_steps: int = 0
    """Linear warm-up over this many optimizer steps (lr * (s + 1) / warmup_steps)."""
    warmup_ratio: float = 0.0
    """Warm-up as a share of all optimizer steps (rounded up), instead of warmup_steps (set at most one)."""
    schedule: Literal["constant", "cosine"] = "constant"
    """After the warm-up: constant (GRPO's default), or a cosine decay to lr * min_lr_ratio at the last step."""
    min_lr_ratio: float = 0.1
    """Where the cosine ends (a share of lr)."""
    betas: tuple[float, float] = (0.9, 0.999)


def optim_checks(o: OptimConfig) -> list[tuple[str, bool, str]]:
    """The optimiser section's ranges, as check_ranges and check_sft_ranges list them."""
    def at_least(x, low):
        return x is not None and not isinstance(x, bool) and math.isfinite(x) and x >= low

    return [
        ("optim.lr", at_least(o.lr, 0) and o.lr > 0, "> 0"),
        ("optim.weight_decay", at_least(o.weight_decay, 0), ">= 0"),
        ("optim.grad_clip", at_least(o.grad_clip, 0), ">= 0 (0: no clipping)"),
        ("optim.warmup_steps", o.warmup_steps >= 0, ">= 0"),
        ("optim.warmup_ratio", at_least(o.warmup_ratio, 0) and o.warmup_ratio <= 1, "in [0, 1]"),
        ("optim.warmup_ratio", o.warmup_ratio == 0 or o.warmup_steps == 0,
         f"0 when --optim.warmup-steps is set ({o.warmup_steps}): give one of the two"),
        ("optim.min_lr_ratio", at_least(o.min_lr_ratio, 0) and o.min_lr_ratio <= 1, "in [0, 1]"),
        ("optim.betas", len(o.betas) == 2 and all(at_least(b, 0) and b < 1 for b in o.betas),
         "two numbers in [0, 1) (Adam's moment decay rates)"),
    ]


def fail_first(cfg, checks: list[tuple[str, bool, str]]) -> None:
    """The one validation helper: a ValueError naming the first failed check as its command-line flag (YAML: the same
    section.key), e.g. "--optim.lr=0.0: must be > 0"."""
    for key, ok, rule in checks:
        if not ok:
            section, name = key.split(".")
            value = getattr(getattr(cfg, section), name)
            raise ValueError(f"{_flag(key)}={value!r}: must be {rule}")


@dataclass
class AlgoConfig:
    advantage_scale: Literal["group", "none", "batch"] | None = None
    """None: "group" (std of the group) for GRPO, "none" for RLOO."""
    estimator: Literal["grpo", "rloo"] = "grpo"
    epochs_per_batch: int = 1
    """PPO epochs over each rollout batch; > 1 (or mini_batches > 1) makes the updates off-policy."""
    mini_batches: int = 1
    """Optimizer steps per epoch."""
    num_microbatches: int = 1
    """Gradient-accumulation micro-batches per optimizer step."""
    fused_lm_head: bool = True
    """Run the lm_head matmul fused with the loss (chunked over tokens): the logits never exist in training."""
    max_tokens_per_row: int | None = None
    """Sequence-packing row length (None: the longest sequence)."""
    dynamic_sampling: bool = False
    """DAPO dynamic sampling: drop groups whose rewards are all equal (zero advantage) and sample more prompts
    until the step has prompts_per_step groups or max_sampling_rounds is reached."""
    max_sampling_rounds: int = 3
    """Dynamic sampling's bound on generation rounds a step; a step still short then fills up with dropped
    groups (zero advantage) so every rank keeps its batch shape, and logs how many."""
    teacher: str | None = None
    """On-policy distillation: an HF model dir sharing the student's tokenizer. The student samples, the teacher
    scores the same tokens, and the per-token advantage is -(logp_student - logp_teacher) (reverse KL, sample
    based) in place of the reward advantages; rewards are still scored and logged."""
    mask_truncated: bool = False
    """DAPO overlong filtering: completions cut by max_new_tokens get no loss (their rewards still count in
    their group's advantages)."""
    max_staleness: int = 0
    """K > 0: one-step (K-step) off-policy rollouts. The rollouts of steps n+1..n+K are generated by a rollout
    process with the weights of step n while step n trains (engine.offpolicy); the loss treats the rollout policy
    as the behaviour policy (TIS against the rollout log-probs, --loss.tis-cap 2 unless a rollout correction is
    set). 0: the synchronous loop (generate, then train). CPU with the hf backend for now."""


@dataclass
class RunConfig:
    """The run section every trainer shares (engine.run.TrainingRun reads it): where the run lives, its seed,
    checkpoints, resume, the HF export and the progress bar."""

    seed: int = 1234
    out: str = "outputs/run"
    """Run directory: checkpoints, metrics.jsonl, tensorboard/, curves.png, hf/."""
    save_every: int = 50
    """Checkpoint every k steps (0: only at the end), so an interrupted run resumes near where it stopped."""
    keep_checkpoints: int = 2
    """Checkpoints kept in out/checkpoints: after each successful save the older ones beyond the newest k are
    deleted (never the one `latest` names)."""
    resume: bool = True
    """Continue from the latest checkpoint in `out` when there is one (with --train.no-resume an `out` that
    holds a checkpoint is an error: nothing is overwritten)."""
    export_hf: bool = True
    """Write an HF checkpoint (safetensors + config + tokenizer) to out/hf at the end."""
    progress: bool = True
    """Show a progress bar."""


@dataclass
class TrainConfig(RunConfig):
    """GRPO's run section: the shared one (RunConfig) and its steps, held-out evaluation and profiling."""

    out: str = "outputs/r1_zero"
    steps: int = 100
    """GRPO steps in total (each: one rollout batch, then epochs_per_batch x mini_batches optimizer steps);
    a resumed run counts from its checkpoint."""
    eval_every: int = 0
    """Held-out pass@1 every k steps (0: before and after only)."""
    eval_samples: int = 1
    """Completions per held-out question for pass@1."""
    eval_temperature: float = 0.6
    eval_top_p: float = 0.95
    eval_size: int | None = None
    """Held-out questions used (None: all)."""
    profile_steps: str | None = None
    """A:B: capture steps A..B (inclusive, numbered as in metrics.jsonl): the CUDA profiler API starts before step A
    and stops after step B, for `nsys profile --capture-range=cudaProfilerApi` (docs/profiling.md)."""
    profile_ranks: tuple[int, ...] = ()
    """Global ranks that start the profiler for --train.profile-steps (empty: every rank)."""
    torch_profiler: bool = False
    """With --train.profile-steps: also run the PyTorch profiler over those steps, a Chrome trace per rank in
    <out>/profile/."""


@dataclass
class GRPOConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    loss: PolicyLossConfig = field(default_factory=PolicyLossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def _flag(key: str) -> str:
    section, name = key.split(".")
    return f"--{section}.{name.replace('_', '-')}"


def parse_profile_steps(text: str | None) -> tuple[int, int] | None:
    """--train.profile-steps 'A:B' -> (A, B); None or '' -> None; anything else but 1 <= A <= B: ValueError."""
    if text is None or text == "":
        return None
    parts = str(text).split(":")
    if len(parts) == 2 and all(p.strip().isdigit() for p in parts):
        first, last = int(parts[0]), int(parts[1])
        if 1 <= first <= last:
            return first, last
    raise ValueError(f"{_flag('train.profile_steps')}={text!r}: must be A:B with 1 <= A <= B (steps as "
                     f"metrics.jsonl numbers them, e.g. 3:4)")


def _parses(parse, value) -> bool:
    try:
        parse(value)
    except ValueError:
        return False
    return True


def check_ranges(cfg: GRPOConfig) -> None:
    """Every field with a valid range, checked before anything is built: a ValueError naming the first bad one as
    its command-line flag (YAML: the same section.key), e.g. "--loss.beta=-0.5: must be >= 0 (...)".

    loss.entropy_coef may be negative on purpose: loss -= entropy_coef * H, so a negative coefficient is an
    entropy penalty (entropy minimisation is a published way to sharpen a policy); only finiteness is checked.
    eval_temperature 0 is greedy decoding (evaluation computes no log-probs), rollout.temperature must be > 0
    (the trainer divides logits by it)."""
    m, d, r, rw, o, a, lo, t = (cfg.model, cfg.data, cfg.rollout, cfg.reward, cfg.optim, cfg.algo, cfg.loss,
                                cfg.train)
    fin = math.isfinite

    def at_least(x, low):  # an int/float field >= low (NaN and inf fail)
        return x is not None and fin(x) and x >= low

    def opt(x, low):  # None (off) or >= low
        return x is None or at_least(x, low)

    def mask_range(rng):  # exp(old - rollout) is ~1 on-policy: a range without 1 would drop every token
        return rng is None or (len(rng) == 2 and all(map(fin, rng)) and 0 <= rng[0] <= 1 <= rng[1])

    checks = [
        ("model.tensor_parallel", m.tensor_parallel >= 1, ">= 1"),
        ("model.pipeline_parallel", m.pipeline_parallel >= 1, ">= 1"),
        ("model.expert_parallel", m.expert_parallel >= 1, ">= 1"),
        ("model.moe_bias_update_rate", fin(m.moe_bias_update_rate) and m.moe_bias_update_rate >= 0, ">= 0"),
        ("model.moe_aux_loss_coeff", m.moe_aux_loss_coeff is None or (fin(m.moe_aux_loss_coeff)
                                                                      and m.moe_aux_loss_coeff >= 0), ">= 0"),
        ("data.max_prompt_tokens", d.max_prompt_tokens >= 1, ">= 1"),
        ("rollout.prompts_per_step", r.prompts_per_step >= 1, ">= 1"),
        ("rollout.group_size", r.group_size >= 1, ">= 1 (completions sampled per prompt)"),
        ("rollout.group_size", a.estimator != "rloo" or r.group_size >= 2,
         ">= 2 with --algo.estimator rloo (its baseline is the mean of the other samples)"),
        ("rollout.temperature", at_least(r.temperature, 0) and r.temperature > 0,
         "> 0 (the trainer's log-probs divide the logits by it)"),
        ("rollout.top_p", at_least(r.top_p, 0) and 0 < r.top_p <= 1, "in (0, 1]"),
        ("rollout.top_k", r.top_k == -1 or r.top_k >= 1, "-1 (off) or >= 1"),
        ("rollout.max_new_tokens", r.max_new_tokens >= 1, ">= 1"),
        ("rollout.stop_strings", all(isinstance(x, str) and x for x in r.stop_strings), "non-empty strings"),
        ("rollout.gpu_memory_utilization", at_least(r.gpu_memory_utilization, 0) and 0 < r.gpu_memory_utilization <= 1,
         "in (0, 1]"),
        ("rollout.num_threads", opt(r.num_threads, 1), ">= 1 (or None: torch's default)"),
        ("reward.weights", all(isinstance(v, (int, float)) and fin(v) for v in rw.weights.values()), "finite numbers"),
        ("reward.overlong_buffer", rw.overlong_buffer is None or 0 <= rw.overlong_buffer <= r.max_new_tokens,
         f"None/0 (off) or 1..--rollout.max-new-tokens ({r.max_new_tokens}): the last L_c tokens of the budget"),
        ("reward.num_workers", rw.num_workers >= 0, ">= 0 (0: score in this process)"),
        ("reward.timeout_s", at_least(rw.timeout_s, 0) and rw.timeout_s > 0, "> 0 seconds"),
        ("reward.code_test_timeout_s", at_least(rw.code_test_timeout_s, 0) and rw.code_test_timeout_s > 0, "> 0"),
        ("reward.code_timeout_s", at_least(rw.code_timeout_s, rw.code_test_timeout_s),
         ">= --reward.code-test-timeout-s (one completion's budget holds at least one test)"),
        ("reward.code_memory_mb", rw.code_memory_mb >= 64, ">= 64 (an interpreter alone maps tens of MB)"),
        ("reward.code_workers", opt(rw.code_workers, 1), ">= 1 (or None: the cores)"),
        ("reward.model_scope", set(rw.model_scope) <= set(rw.models)
         and set(rw.model_scope.values()) <= {"summary", "response"},
         "name -> summary|response for names given in --reward.models"),
        *optim_checks(o),
        ("algo.epochs_per_batch", a.epochs_per_batch >= 1, ">= 1"),
        ("algo.mini_batches", a.mini_batches >= 1, ">= 1"),
        ("algo.num_microbatches", a.num_microbatches >= 1, ">= 1"),
        ("algo.max_sampling_rounds", a.max_sampling_rounds >= 1, ">= 1"),
        # the teacher's per-token advantages replace the rewards': a filter or a shaping of rewards would act on
        # numbers the loss never sees
        ("algo.dynamic_sampling", a.teacher is None or not a.dynamic_sampling,
         "off with --algo.teacher (on-policy distillation trains on the teacher's advantages, not the rewards)"),
        ("reward.overlong_buffer", a.teacher is None or not rw.overlong_buffer,
         "None/0 with --algo.teacher (on-policy distillation trains on the teacher's advantages, not the rewards)"),
        ("algo.max_tokens_per_row", opt(a.max_tokens_per_row, 1), ">= 1 (or None: the longest sequence)"),
        ("algo.max_staleness", a.max_staleness >= 0, ">= 0 (0: synchronous rollouts)"),
        ("algo.max_staleness", a.max_staleness == 0 or r.backend == "hf",
         "0 with --rollout.backend vllm (off-policy rollouts run the hf backend in a process of their own so far)"),
        ("algo.max_staleness", a.max_staleness == 0 or not a.dynamic_sampling,
         "0 with --algo.dynamic-sampling (its refill rounds sample with the weights of the step itself)"),
        ("algo.max_staleness", a.max_staleness == 0 or a.teacher is None,
         "0 with --algo.teacher (on-policy distillation scores the student's own current samples)"),
        ("loss.eps_low", lo.eps_low is None or (at_least(lo.eps_low, 0) and lo.eps_low < 1),
         "in [0, 1) (the lower clip 1 - eps_low stays > 0; None: the loss's own)"),
        ("loss.eps_high", opt(lo.eps_high, 0), ">= 0 (None: the loss's own)"),
        ("loss.dual_clip_c", lo.dual_clip_c is None or (fin(lo.dual_clip_c) and lo.dual_clip_c > 1),
         "> 1 (or None: off)"),
        ("loss.beta", at_least(lo.beta, 0),
         ">= 0 (a negative KL coefficient rewards moving away from the reference policy)"),
        ("loss.entropy_coef", fin(lo.entropy_coef), "finite (negative: an entropy penalty)"),
        ("loss.max_len", opt(lo.max_len, 1), ">= 1 (or None: --rollout.max-new-tokens)"),
        ("loss.cispo_eps_max", at_least(lo.cispo_eps_max, 0) and lo.cispo_eps_max > 0, "> 0"),
        ("loss.tis_cap", lo.tis_cap is None or (at_least(lo.tis_cap, 0) and lo.tis_cap > 0), "> 0 (or None: off)"),
        ("loss.token_mask_range", mask_range(lo.token_mask_range), "(lo, hi) with 0 <= lo <= 1 <= hi"),
        ("loss.seq_mask_range", mask_range(lo.seq_mask_range), "(lo, hi) with 0 <= lo <= 1 <= hi"),
        ("train.steps", t.steps >= 0, ">= 0"),
        ("train.seed", 0 <= t.seed < 2**31, "in [0, 2**31) (per-sample sampling seeds are derived from it)"),
        ("train.save_every", t.save_every >= 0, ">= 0 (0: only at the end)"),
        ("train.eval_every", t.eval_every >= 0, ">= 0 (0: before and after only)"),
        ("train.eval_samples", t.eval_samples >= 1, ">= 1"),
        ("train.eval_temperature", at_least(t.eval_temperature, 0), ">= 0 (0: greedy)"),
        ("train.eval_samples", t.eval_temperature != 0 or t.eval_samples == 1,
         "1 with --train.eval-temperature 0 (greedy decoding has one answer; vLLM refuses n > 1 without sampling)"),
        ("train.eval_top_p", at_least(t.eval_top_p, 0) and 0 < t.eval_top_p <= 1, "in (0, 1]"),
        ("train.eval_size", opt(t.eval_size, 1), ">= 1 (or None: every held-out question)"),
        ("train.keep_checkpoints", t.keep_checkpoints >= 1, ">= 1"),
        ("train.profile_steps", _parses(parse_profile_steps, t.profile_steps),
         "A:B with 1 <= A <= B (steps as metrics.jsonl numbers them, e.g. 3:4)"),
        ("train.profile_ranks", all(isinstance(r, int) and r >= 0 for r in t.profile_ranks),
         "global ranks >= 0 (empty: every rank)"),
    ]
    fail_first(cfg, checks)
