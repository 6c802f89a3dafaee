"""A tiny random Qwen2 with the tiny world's tokenizer, and small trainer configs, for trainer tests."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from r1_engine.engine.config import GRPOConfig
from r1_engine.kernels.loss_family import PolicyLossConfig

DATA = Path(__file__).resolve().parents[2] / "recipes" / "tiny" / "data"


def write_tiny_model(out: Path, seed: int = 0) -> Path:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from r1_engine.recipes.tiny.tokenizer import build_tokenizer

    tok = build_tokenizer(out)
    torch.manual_seed(seed)
    vocab = (len(tok) + 63) // 64 * 64
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                      max_position_embeddings=256, eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id)
    Qwen2ForCausalLM(cfg).save_pretrained(out)
    return out


def tiny_config(out: Path, **train) -> GRPOConfig:
    base = GRPOConfig()
    return dataclasses.replace(
        base,
        rollout=dataclasses.replace(base.rollout, prompts_per_step=4, group_size=4, max_new_tokens=12),
        reward=dataclasses.replace(base.reward, num_workers=0),
        # a random model earns no reward: the entropy bonus keeps gradients (and the KL) non-zero
        loss=PolicyLossConfig(beta=0.01, eps_high=0.28, entropy_coef=0.01),
        optim=dataclasses.replace(base.optim, lr=3e-3),
        algo=dataclasses.replace(base.algo, epochs_per_batch=2),
        train=dataclasses.replace(base.train, out=str(out), progress=False, eval_size=4, **train),
    )


def run_trainer(model_dir: str, out: str, steps: int, tensor_parallel: int = 1, resume: bool = False,
                algo: dict | None = None):
    """Train `steps` steps (resuming from `out` if asked); returns the per-step metrics without timings."""
    from r1_engine.engine.data import load_prompts
    from r1_engine.engine.trainer import GRPOTrainer

    cfg = tiny_config(Path(out), steps=steps, resume=resume)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, tensor_parallel=tensor_parallel),
                              algo=dataclasses.replace(cfg.algo, **(algo or {})))
    trainer = GRPOTrainer(cfg, model_dir, load_prompts(DATA / "train.jsonl"), load_prompts(DATA / "eval.jsonl"))
    history = trainer.fit()  # the run skeleton saves the last step
    trainer.finish(export=False)
    return [{k: v for k, v in m.items() if not k.startswith(("time/", "throughput/"))} for m in history]


def dynamic_sampling_rank_worker(model_dir: str, out: str):
    """DP rank r of 2 with scripted rewards: rank 0's first round is all informative, rank 1's is uniform and
    its second informative. Returns (rounds, filler groups, draws, sampler state) as this rank saw them."""
    import torch.distributed as dist

    from r1_engine.engine.data import load_prompts
    from r1_engine.engine.trainer import GRPOTrainer

    cfg = tiny_config(Path(out), steps=1)
    cfg = dataclasses.replace(cfg, algo=dataclasses.replace(cfg.algo, dynamic_sampling=True, max_sampling_rounds=3))
    t = GRPOTrainer(cfg, model_dir, load_prompts(DATA / "train.jsonl"))
    rank = dist.get_rank()
    informative, uniform = [1.0, 0.0, 0.0, 1.0], [0.0] * 4
    script = iter({0: [informative * 2, uniform * 2, uniform * 2],
                   1: [uniform * 2, informative * 2, uniform * 2]}[rank])
    real = t.rollout_sampler.scorer.score

    def score(kinds, prompts, completions, refs, **kwargs):
        return dataclasses.replace(real(kinds, prompts, completions, refs, **kwargs), total=next(script))

    t.rollout_sampler.scorer.score = score
    try:
        extra = t.collect().metrics
        return extra["dynamic_sampling/rounds"], extra["dynamic_sampling/filler_groups"], t.draws, \
            t.sampler.state_dict()
    finally:
        t.close()
