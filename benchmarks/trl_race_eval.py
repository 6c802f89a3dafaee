"""The learning race's held-out evaluation, as a user would run it: an exported HF directory loaded with
`AutoModelForCausalLM.from_pretrained` / `AutoTokenizer.from_pretrained`, sampled with plain `model.generate`
(no stop strings: a completion ends at the EOS the model samples, or at the token budget), scored with our rule
rewards (engine.sampling.EVAL_WEIGHTS: accuracy, format at weight 0) and summarised by engine.eval.summarize
(pass@1 = mean correctness over the k samples a question, format rate, lengths, truncation).

EOS check: `eos_rate` is the share of samples that ended with an EOS token within the budget (the rest ran to
max_new_tokens), `answer_then_no_eos` the share that closed their </answer> but did not stop there (a user would see
the model ramble on past its answer).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from r1_engine.engine.data import PromptExample, apply_template
from r1_engine.engine.eval import QuestionResult, Sample, final_answer, summarize
from r1_engine.engine.rewards import build_reward_composer
from r1_engine.engine.sampling import EVAL_WEIGHTS
from r1_engine.engine.scoring import RolloutScorer, row_correct

QUESTIONS_PER_CALL = 32  # questions a generate() call (x k samples each)


def eos_ids(model, tokenizer) -> set[int]:
    """Every id that ends a completion for `generate`: the generation config's EOS (int or list) and the tokenizer's."""
    ids = model.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, (list, tuple)) else [] if ids is None else [ids])
    return ids | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())


def evaluate_hf(model_dir: str | Path, examples: Sequence[PromptExample], *, k: int, temperature: float, top_p: float,
                max_new_tokens: int, seed: int, template: str = "r1-zero") -> dict[str, float]:
    """Held-out numbers of one exported model: pass@1, format_rate, eos_rate, answer_then_no_eos, length/mean, ..."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    tokenizer.padding_side = "left"  # decoder-only batches: prompts right-aligned
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    stop = eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(stop)
    scorer = RolloutScorer(build_reward_composer(dict(EVAL_WEIGHTS), num_workers=0))
    torch.manual_seed(seed)
    results, rambling = [], 0
    for start in range(0, len(examples), QUESTIONS_PER_CALL):
        chunk = examples[start:start + QUESTIONS_PER_CALL]
        prompts = [apply_template(e.prompt, template) for e in chunk]
        batch = tokenizer(prompts, return_tensors="pt", padding=True)
        with torch.no_grad():
            out = model.generate(**batch, do_sample=True, temperature=temperature, top_p=top_p, top_k=0,
                                 max_new_tokens=max_new_tokens, num_return_sequences=k, pad_token_id=pad)
        texts, lengths, ended = [], [], []
        for row in out[:, batch["input_ids"].shape[1]:].tolist():
            end = next((i for i, t in enumerate(row) if t in stop), None)  # generate pads finished rows with pad
            body = row if end is None else row[:end]
            texts.append(tokenizer.decode(body, skip_special_tokens=True))
            lengths.append(len(body) + (end is not None))
            ended.append(end is not None)
        refs = [e.answer for e in chunk for _ in range(k)]
        scores = scorer.score(["reasoning"] * len(texts), [p for p in prompts for _ in range(k)], texts, refs)
        for q, example in enumerate(chunk):
            samples = []
            for i in range(q * k, (q + 1) * k):
                rambling += ("</answer>" in texts[i]) and not ended[i]
                samples.append(Sample(correct=row_correct(scores, i), answer=final_answer(texts[i]), length=lengths[i],
                                      truncated=not ended[i], format=scores.components["format"][i]))
            results.append(QuestionResult(index=start + q, source=example.source, reference=example.answer,
                                          samples=samples))
    scorer.close()
    summary = summarize(results)
    n = len(results) * k
    keep = ("questions", "k", "pass@1", "se/pass@1", f"pass@{k}", "format_rate", "answer_rate", "length/mean",
            "truncated_frac")
    report = {key: summary[key] for key in keep if key in summary}
    report.update(eos_rate=1.0 - summary["truncated_frac"], answer_then_no_eos=rambling / n)
    return report
