"""TRL's side of the learning race (benchmarks/trl_race.py runs it in its own process): GRPOTrainer on the embedded
R1-Zero task with the embedded default's settings mapped onto TRL's arguments, rewarded by our rule rewards.

    python -m benchmarks.trl_race_trl --out DIR --steps N --seed S --threads T

Writes DIR/log.jsonl (one row a step: wall seconds since training began, reward, accuracy, format), DIR/hf (the
trained model and tokenizer, as `save_model` writes them) and DIR/summary.json (train seconds, TRL version, the
settings used). The prompts are the ones our trainer draws, in its order (engine.data.PromptSampler with the same
seed, 16 a step), rendered with the same template, and TRL takes them in that order (shuffle_dataset=False): both
methods see the same prompts at every step. The learning rate follows our schedule exactly (engine.run.learning_rate,
a LambdaLR handed to the trainer): transformers' constant_with_warmup would give the first step lr 0.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from r1_engine.engine.data import PromptDataset, PromptSampler, load_prompts, load_tokenizer
from r1_engine.engine.rewards import build_reward_composer
from r1_engine.engine.run import learning_rate
from r1_engine.recipes.tiny.settings import TINY_DEFAULT, TINY_GRPO_EPS_HIGH

D = TINY_DEFAULT
REWARD_WEIGHTS = {name: w for name, w in D.reward.weights.items() if w}  # {"accuracy": 1.0, "format": 0.5}
LOSS_TYPE = "grpo"  # per-sequence token mean, then the mean over sequences: our GRPO's seq-mean-token-mean


def trl_settings(steps: int, seed: int) -> dict:
    """The embedded default as GRPOConfig arguments (TRL 1.16 names, read from trl/trainer/grpo_config.py)."""
    r, loss, o = D.rollout, D.loss, D.optim
    return dict(
        num_generations=r.group_size,                                       # G = 8
        per_device_train_batch_size=r.prompts_per_step * r.group_size,      # 128 completions = 16 prompts a step
        gradient_accumulation_steps=D.algo.num_microbatches,                # 1: one optimizer step a rollout batch
        num_iterations=D.algo.epochs_per_batch,                             # 1: on-policy
        max_completion_length=r.max_new_tokens,                             # 40
        temperature=r.temperature, top_p=r.top_p, top_k=0,                  # 1.0, 1.0, no top-k (ours: -1)
        learning_rate=o.lr, warmup_steps=o.warmup_steps,                    # 1e-4, 3 (schedule: see the module doc)
        lr_scheduler_type="constant_with_warmup",
        weight_decay=o.weight_decay, max_grad_norm=o.grad_clip,             # 0.0, 1.0
        adam_beta1=o.betas[0], adam_beta2=o.betas[1], adam_epsilon=1e-8,    # ours: Megatron's AdamW, eps 1e-8
        beta=loss.beta, epsilon=0.2, epsilon_high=TINY_GRPO_EPS_HIGH,       # 0.001 (k3 KL), 0.2 / 0.28
        loss_type=LOSS_TYPE, scale_rewards="group",                         # (r - mean) / std within the group
        reward_weights=list(REWARD_WEIGHTS.values()),                       # accuracy 1.0 + format 0.5
        mask_truncated_completions=D.algo.mask_truncated,                   # False
        max_steps=steps, seed=seed, shuffle_dataset=False,
        use_cpu=True, bf16=False, fp16=False,                                # fp32 on the CPU, no vLLM
        gradient_checkpointing=False,                                        # TRL's default True only costs time here
        logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, dataloader_num_workers=0,
    )


def race_prompts(train_path: Path, tokenizer, steps: int, seed: int) -> list[dict]:
    """The rows our trainer samples in its first `steps` steps, in order, rendered with its template."""
    dataset = PromptDataset(load_prompts(train_path), tokenizer, D.data.template, D.data.max_prompt_tokens)
    sampler = PromptSampler(dataset, D.rollout.prompts_per_step, seed=seed)
    return [{"prompt": it.text, "answer": it.example.answer} for _ in range(steps) for it in sampler.next_batch()]


def rule_reward(name: str):
    """A TRL reward function (completions + dataset columns -> one float each) that is our rule reward `name`."""
    composer = build_reward_composer({name: 1.0}, num_workers=0)

    def reward(completions, answer, **_):
        return composer.score(list(completions), list(answer)).components[name]

    reward.__name__ = name  # TRL logs rewards/<name>/mean
    return reward


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--seed", type=int, default=D.train.seed)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    start = time.perf_counter()

    import torch
    torch.set_num_threads(args.threads)
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback

    from r1_engine.recipes.tiny.corpus import DATA_DIR
    from r1_engine.recipes.tiny.pretrain import ensure_base_model

    base = ensure_base_model()
    # our loader reads exactly the directory's tokenizer.json (engine.data.load_tokenizer); TRL tokenizes the
    # rendered prompts with it as ours does (special tokens added: this tokenizer has no BOS)
    tokenizer = load_tokenizer(base)
    rows = race_prompts(DATA_DIR / "train.jsonl", tokenizer, args.steps, args.seed)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    opt_args = trl_settings(args.steps, args.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=D.optim.lr, betas=D.optim.betas, eps=opt_args["adam_epsilon"],
                                  weight_decay=D.optim.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: learning_rate(
        s, args.steps, 1.0, D.optim.warmup_steps, D.optim.schedule))
    log: list[dict] = []
    clock = {}

    class Curve(TrainerCallback):
        def on_train_begin(self, *a, **k):
            clock["t0"] = time.perf_counter()

        def on_log(self, a, state, control, logs=None, **k):
            if logs and "reward" in logs:
                log.append({"step": state.global_step, "time_s": time.perf_counter() - clock["t0"],
                            "reward": logs["reward"], "accuracy": logs.get("rewards/accuracy/mean"),
                            "format": logs.get("rewards/format/mean"), "kl": logs.get("kl"),
                            "length": logs.get("completions/mean_length"),
                            "truncated_frac": logs.get("completions/clipped_ratio"),
                            "lr": logs.get("learning_rate")})

    config = trl.GRPOConfig(output_dir=str(args.out / "run"), **opt_args)
    trainer = trl.GRPOTrainer(model=model, reward_funcs=[rule_reward(n) for n in REWARD_WEIGHTS], args=config,
                              train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                              callbacks=[Curve()], optimizers=(optimizer, schedule))
    trainer.train()
    train_s = time.perf_counter() - clock["t0"]
    trainer.save_model(str(args.out / "hf"))
    tokenizer.save_pretrained(str(args.out / "hf"))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    summary = {"trl_version": trl.__version__, "loss_type": LOSS_TYPE, "train_s": train_s,
               "process_s_before_exit": time.perf_counter() - start, "steps": trainer.state.global_step,
               "threads": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
               "settings": opt_args}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"TRL {trl.__version__}: {summary['steps']} steps in {train_s:.1f} s -> {args.out / 'hf'}")


if __name__ == "__main__":
    main()
