"""Supervised fine-tuning: engine.objectives.sft_objective against Hugging Face's float64 cross-entropy (TP=1 in this
process, TP=2 and DP=2 spawned; fused lm_head and logits path; packed = padded; micro-batch split), the example file
and config checks, the learning-rate schedule, and engine.sft.SFTTrainer on the tiny world (the loss falls,
metrics, curves, an HF export transformers loads, exact resume)."""
from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from tests.engine._trainer_common import write_tiny_model

# ---------------------------------------------------------------------------------------------
# The objective against HF transformers in float64
# ---------------------------------------------------------------------------------------------

LR, ADAM_EPS = 0.5, 0.5  # Adam's first step: delta = -lr * g / (|g| + eps), smooth in the gradient
WEIGHT_ATOL = 5e-7  # fp32 weights ~0.7 carry a few ulps of round-off; the updates themselves are ~1e-2
PROMPT_LENGTHS = [5, 3, 6, 2, 4, 3, 2]
COMPLETION_LENGTHS = [7, 4, 2, 6, 1, 5, 3]
MAX_TOKENS_PER_ROW = 16  # packs the 7 sequences into 4 rows, several starting mid-row

# (tp, pack, num_microbatches, fused_lm_head)
REFERENCE = (1, True, 1, True)
UNPACKED, MICRO3, LOGITS = (1, False, 1, True), (1, True, 3, True), (1, True, 1, False)
TP2_FUSED, TP2_LOGITS, DP2 = (2, True, 2, True), (2, True, 1, False), (1, True, 2, True)


@pytest.fixture(scope="module")
def problem(tmp_path_factory):
    """Random prompts and completions, and HF's causal-LM cross-entropy in float64: labels -100 on the prompt and
    the padding, summed over the batch and divided by the number of completion tokens; its gradient."""
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from tests.parallel._models_tiny import VOCAB, write_tiny_checkpoint

    hf_dir = write_tiny_checkpoint("qwen2", tmp_path_factory.mktemp("tiny_qwen2"))
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float64, attn_implementation="eager")
    gen = torch.Generator().manual_seed(4321)
    prompts = [torch.randint(1, VOCAB, (n,), generator=gen).tolist() for n in PROMPT_LENGTHS]
    completions = [torch.randint(1, VOCAB, (n,), generator=gen).tolist() for n in COMPLETION_LENGTHS]
    width = max(p + c for p, c in zip(PROMPT_LENGTHS, COMPLETION_LENGTHS))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    attention = torch.zeros_like(ids)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        ids[i, :len(p) + len(c)] = torch.tensor(p + c)
        labels[i, len(p):len(p) + len(c)] = torch.tensor(c)
        attention[i, :len(p) + len(c)] = 1
    logits = hf(input_ids=ids, attention_mask=attention).logits  # right padding: causal, so no effect before it
    shifted = labels[:, 1:].reshape(-1)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), shifted, ignore_index=-100,
                           reduction="sum") / (shifted != -100).sum()
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in hf.named_parameters()}
    spec = dict(prompts=prompts, completions=completions, max_tokens_per_row=MAX_TOKENS_PER_ROW, lr=LR,
                adam_eps=ADAM_EPS)
    norm = torch.sqrt(sum((g ** 2).sum() for g in grads.values())).item()
    return dict(hf_dir=str(hf_dir), spec=spec, loss=loss.item(), grads=grads, grad_norm=norm)


@pytest.fixture(scope="module")
def world1(problem):
    from tests.parallel._sft_workers import sft_layouts_worker

    layouts = [REFERENCE, UNPACKED, MICRO3, LOGITS]
    return dict(zip(layouts, sft_layouts_worker(problem["hf_dir"], problem["spec"], layouts)))


@pytest.fixture(scope="module")
def world2(problem, tiny):
    """Two processes: the objective at TP=2 and DP=2, then an SFTTrainer run at DP=2 (in one spawn)."""
    from tests.parallel._sft_workers import sft_layouts_and_trainer_worker
    from tests.parallel.dist_utils import run_distributed

    layouts = [TP2_FUSED, TP2_LOGITS, DP2]
    trainer_args = (_config(tiny["root"] / "dp2"), str(tiny["model_dir"]), tiny["train"], tiny["held_out"])
    per_rank = run_distributed(sft_layouts_and_trainer_worker, 2, problem["hf_dir"], problem["spec"], layouts,
                               trainer_args)
    for mine, first in zip(per_rank[1]["layouts"], per_rank[0]["layouts"]):  # every rank: same metrics, weights
        assert mine["metrics"] == pytest.approx(first["metrics"], rel=1e-12), mine["layout"]
        for name, delta in first["delta"].items():
            torch.testing.assert_close(mine["delta"][name], delta, rtol=0, atol=0)
    return {**dict(zip(layouts, per_rank[0]["layouts"])), "trainer": [r["trainer"] for r in per_rank]}


def _named(what: str):
    """assert_close message: what failed, then torch's own account of the mismatch."""
    return lambda default: f"{what}: {default}"


def _assert_matches_hf(result, problem):
    metrics = result["metrics"]
    assert metrics["loss"] == pytest.approx(problem["loss"], rel=1e-5)
    assert metrics["grad_norm"] == pytest.approx(problem["grad_norm"], rel=1e-5)
    assert metrics["num_tokens"] == sum(COMPLETION_LENGTHS)
    assert metrics["num_sequences"] == len(COMPLETION_LENGTHS)
    assert set(result["delta"]) == set(problem["grads"])
    for name, grad in problem["grads"].items():
        want = -LR * grad / (grad.abs() + ADAM_EPS)
        torch.testing.assert_close(result["delta"][name], want, rtol=1e-4, atol=WEIGHT_ATOL, msg=_named(name))


def _assert_same_step(got, want):
    for key in ("loss", "grad_norm", "num_tokens", "num_sequences", "entropy"):
        assert got["metrics"][key] == pytest.approx(want["metrics"][key], rel=1e-5), key
    for name, delta in want["delta"].items():
        torch.testing.assert_close(got["delta"][name], delta, rtol=1e-5, atol=WEIGHT_ATOL, msg=_named(name))


@pytest.mark.parametrize("layout", [REFERENCE, LOGITS], ids=["fused", "logits"])
def test_sft_loss_and_gradient_match_hf_cross_entropy_tp1(world1, problem, layout):
    _assert_matches_hf(world1[layout], problem)
    assert world1[layout]["metrics"]["update_successful"] == 1.0


def test_packing_and_microbatches_change_nothing(world1):
    reference = world1[REFERENCE]
    assert reference["rows"] == 4 and max(reference["sequences_per_row"]) > 1  # packing did pack
    assert world1[UNPACKED]["rows"] == len(PROMPT_LENGTHS) and max(world1[UNPACKED]["sequences_per_row"]) == 1
    for layout in (UNPACKED, MICRO3):  # 4 rows in 3 micro-batches: one padded with an empty row
        _assert_same_step(world1[layout], reference)


@pytest.mark.multiproc
@pytest.mark.parametrize("layout", [TP2_FUSED, TP2_LOGITS, DP2], ids=["tp2-fused", "tp2-logits", "dp2"])
def test_sft_loss_and_gradient_match_hf_two_processes(world1, world2, problem, layout):
    result = world2[layout]
    assert result["layout"]["dp"] == (2 if layout == DP2 else 1)
    _assert_matches_hf(result, problem)
    _assert_same_step(result, world1[REFERENCE])


# ---------------------------------------------------------------------------------------------
# Examples file, config checks, schedule
# ---------------------------------------------------------------------------------------------


def test_load_sft_examples(tmp_path):
    from r1_engine.engine.sft import load_sft_examples

    path = tmp_path / "sft.jsonl"
    path.write_text('{"q": "What is 1?", "a": " <answer>1</answer>", "x": 3}\n\n{"q": "b", "a": "c"}\n')
    examples = load_sft_examples(path, prompt_key="q", completion_key="a")
    assert [(e.prompt, e.completion, e.source) for e in examples] == [
        ("What is 1?", " <answer>1</answer>", f"{path}:1"), ("b", "c", f"{path}:3")]


@pytest.mark.parametrize("second_line, why", [
    ('{"prompt": "p"}', "line 2: missing field 'completion'"),
    ('{"prompt": "p", "completion": 5}', "line 2: field 'completion' must be a string, got int"),
    ('{"prompt": "  ", "completion": "c"}', "line 2: field 'prompt' is empty"),
    ('{"prompt": "p", "completion": "c"', "line 2: invalid JSON"),
    ('["p", "c"]', "line 2: expected a JSON object per row"),
])
def test_load_sft_examples_names_file_line_and_field(tmp_path, second_line, why):
    from r1_engine.engine.sft import load_sft_examples

    path = tmp_path / "sft.jsonl"
    path.write_text('{"prompt": "p", "completion": "c"}\n' + second_line + "\n")
    with pytest.raises(ValueError) as err:
        load_sft_examples(path)
    assert str(err.value).startswith(f"{path}, {why}")


def test_load_sft_examples_refuses_empty_and_missing_files(tmp_path):
    from r1_engine.engine.sft import load_sft_examples

    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="empty.jsonl: no examples"):
        load_sft_examples(tmp_path / "empty.jsonl")
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_sft_examples(tmp_path / "nope.jsonl")
    (tmp_path / "x.csv").write_text("p,c\n")
    with pytest.raises(ValueError, match="unsupported"):
        load_sft_examples(tmp_path / "x.csv")


@pytest.mark.parametrize("section, changes, flag", [
    ("optim", dict(lr=0.0), "--optim.lr=0.0"),
    ("optim", dict(warmup_steps=2, warmup_ratio=0.1), "--optim.warmup-ratio=0.1"),
    ("optim", dict(min_lr_ratio=1.5), "--optim.min-lr-ratio=1.5"),
    ("train", dict(batch_size=0), "--train.batch-size=0"),
    ("train", dict(epochs=0), "--train.epochs=0"),
    ("data", dict(max_tokens=1), "--data.max-tokens=1"),
])
def test_check_sft_ranges_names_the_flag(section, changes, flag):
    from r1_engine.engine.sft import SFTConfig, check_sft_ranges

    cfg = SFTConfig()
    check_sft_ranges(cfg)
    bad = dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **changes)})
    with pytest.raises(ValueError, match=f"^{flag}: must be"):
        check_sft_ranges(bad)


def test_sft_config_from_yaml_and_command_line(tmp_path):
    from r1_engine.engine.config import load_config
    from r1_engine.engine.sft import SFTConfig

    path = tmp_path / "sft.yaml"
    path.write_text("optim: {lr: 2e-5, warmup_ratio: 0.05}\ndata: {completion_key: response}\n")
    cfg = load_config(SFTConfig, ["--config", str(path), "--train.batch-size", "8", "--train.no-fused-lm-head"])
    assert (cfg.optim.lr, cfg.optim.warmup_ratio, cfg.data.completion_key) == (2e-5, 0.05, "response")
    assert (cfg.train.batch_size, cfg.train.fused_lm_head, cfg.train.epochs) == (8, False, 2)
    path.write_text("train: {batch: 8}\n")
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['batch'\].*did you mean 'batch_size'"):
        load_config(SFTConfig, ["--config", str(path)])


def test_learning_rate_schedule_by_hand():
    """The one schedule (engine.run.learning_rate) every trainer uses: warm-up, then cosine or constant."""
    from r1_engine.engine.run import learning_rate

    lrs = [learning_rate(s, 7, 1.0, warmup_steps=2, min_lr_ratio=0.2) for s in range(7)]
    # warm-up 0.5, 1; then 0.2 + 0.4 * (1 + cos(pi * k / 4)) for k = 0..4
    want = [0.5, 1.0] + [0.2 + 0.4 * (1 + math.cos(math.pi * k / 4)) for k in range(5)]
    assert lrs == pytest.approx(want, abs=1e-12)
    assert lrs[-1] == pytest.approx(0.2) and learning_rate(0, 1, 3.0) == 3.0
    # GRPO's default: a warm-up to a constant (what its trainer always did: lr * min(1, (step + 1) / warmup))
    constant = [learning_rate(s, 7, 1.0, warmup_steps=3, schedule="constant") for s in range(7)]
    assert constant == [min(1.0, (s + 1) / 3) for s in range(7)]
    with pytest.raises(ValueError, match="schedule 'linear'"):
        learning_rate(5, 7, 1.0, schedule="linear")


# ---------------------------------------------------------------------------------------------
# SFTTrainer on the tiny world
# ---------------------------------------------------------------------------------------------

NUM_EXAMPLES, BATCH_SIZE = 7, 3  # 3 steps an epoch: 3, 3 and a partial batch of 1 (none for DP rank 1 of 2)


def _write_examples(path, start: int, n: int, long_one: bool = False):
    from r1_engine.recipes.tiny.corpus import completion, question

    rows = [{"prompt": question(10 + (start + 7 * i) % 90, 10 + (start + 13 * i) % 90),
             "completion": completion(10 + (start + 7 * i) % 90, 10 + (start + 13 * i) % 90)} for i in range(n)]
    if long_one:  # longer than data.max_tokens: skipped and counted
        rows.insert(3, {"prompt": question(12, 34), "completion": completion(12, 34) * 12})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from r1_engine.engine.sft import load_sft_examples

    root = tmp_path_factory.mktemp("sft")
    model_dir = write_tiny_model(root / "model")
    train = load_sft_examples(_write_examples(root / "train.jsonl", 0, NUM_EXAMPLES, long_one=True))
    held_out = load_sft_examples(_write_examples(root / "eval.jsonl", 5, 4))
    return dict(root=root, model_dir=model_dir, train=train, held_out=held_out)


def _config(out, **train):
    from r1_engine.engine.sft import SFTConfig

    base = SFTConfig()
    return dataclasses.replace(
        base, data=dataclasses.replace(base.data, max_tokens=96),
        optim=dataclasses.replace(base.optim, lr=1e-2, warmup_steps=1, min_lr_ratio=0.5),
        train=dataclasses.replace(base.train, **{"epochs": 2, "batch_size": BATCH_SIZE, "max_tokens_per_row": 128,
                                                 "out": str(out), "progress": False, **train}))


def _weights(trainer):
    from r1_engine.parallel.convert import export_hf_state

    return {k: v.detach().clone() for k, v in export_hf_state(trainer.policy)}


@pytest.fixture(scope="module")
def full_run(tiny):
    from r1_engine.engine.sft import SFTTrainer

    trainer = SFTTrainer(_config(tiny["root"] / "full"), tiny["model_dir"], tiny["train"])
    before = trainer.evaluate_loss(tiny["held_out"])
    history = trainer.fit()
    result = dict(trainer=trainer, before=before, after=trainer.evaluate_loss(tiny["held_out"]), history=history,
                  weights=_weights(trainer), hf=trainer.export_hf())
    trainer.close()
    return result


def test_tokenized_examples_are_prompt_then_completion_and_eos(tiny):
    from r1_engine.engine.data import R1_ZERO_TEMPLATE, encode_text, load_tokenizer
    from r1_engine.engine.sft import tokenize_sft_examples

    tok = load_tokenizer(tiny["model_dir"])
    items, skipped = tokenize_sft_examples(tiny["train"], tok, "r1-zero", max_tokens=96)
    assert skipped == 1 and len(items) == NUM_EXAMPLES
    first = items[0]
    assert first.prompt_ids == encode_text(tok, R1_ZERO_TEMPLATE.replace("{prompt}", tiny["train"][0].prompt))
    assert first.completion_ids == encode_text(tok, tiny["train"][0].completion, add_special_tokens=False) + [
        tok.eos_token_id]
    assert tok.decode(first.prompt_ids + first.completion_ids).endswith("</answer>" + tok.eos_token)


def test_training_lowers_the_loss_and_writes_metrics_curves_and_hf(full_run, tiny):
    from r1_engine.engine.data import load_tokenizer
    from r1_engine.engine.run import learning_rate

    trainer, history = full_run["trainer"], full_run["history"]
    assert trainer.num_skipped_too_long == 1 and len(trainer.items) == NUM_EXAMPLES
    assert trainer.total_steps == trainer.step == 6 and len(history) == 6
    assert [m["train/num_sequences"] for m in history] == [3, 3, 1] * 2  # the partial batch is kept
    assert full_run["after"] < full_run["before"] - 1.0  # held-out mean NLL, nats a token
    assert history[-1]["train/loss"] < history[0]["train/loss"] - 1.0
    assert [m["optim/lr"] for m in history] == pytest.approx([learning_rate(s, 6, 1e-2, 1, "cosine", 0.5) for s in range(6)])
    out = tiny["root"] / "full"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6] and "train/grad_norm" in rows[0]
    assert (out / "curves.png").stat().st_size > 0
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_000006"

    # the export: transformers loads it, and its float64 NLL of held-out examples is what the trainer measured
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(full_run["hf"], dtype=torch.float64)
    tok = load_tokenizer(full_run["hf"])
    total, count = 0.0, 0
    for item in trainer.tokenize(tiny["held_out"])[0]:
        ids = torch.tensor([item.prompt_ids + item.completion_ids])
        with torch.no_grad():
            logp = torch.log_softmax(hf(input_ids=ids).logits[0], dim=-1)
        p, c = len(item.prompt_ids), len(item.completion_ids)
        total -= logp[p - 1:p - 1 + c].gather(1, torch.tensor(item.completion_ids)[:, None]).sum().item()
        count += c
    assert full_run["after"] == pytest.approx(total / count, rel=1e-5)
    assert tok.get_vocab() == trainer.tokenizer.get_vocab()


def test_stop_and_resume_continue_the_same_run(full_run, tiny):
    from r1_engine.engine.sft import SFTTrainer

    out = tiny["root"] / "split"
    first = SFTTrainer(_config(out), tiny["model_dir"], tiny["train"])
    head = first.fit(stop_after=2)  # mid-epoch; the resumed run crosses the epoch boundary
    first.close()
    second = SFTTrainer(_config(out), tiny["model_dir"], tiny["train"])
    assert second.step == 2
    tail = second.fit()
    weights = _weights(second)
    second.close()
    for got, want in zip(head + tail, full_run["history"]):
        for key in ("train/loss", "train/grad_norm", "optim/lr", "train/num_tokens"):
            assert got[key] == pytest.approx(want[key], rel=1e-6), key
    for name, tensor in full_run["weights"].items():
        torch.testing.assert_close(weights[name], tensor, rtol=1e-6, atol=1e-7, msg=_named(name))
    rows = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows == [1, 2, 3, 4, 5, 6]

    with pytest.raises(ValueError, match=r"train\.batch_size=3, this run has 4"):
        SFTTrainer(_config(out, batch_size=4), tiny["model_dir"], tiny["train"])
    with pytest.raises(ValueError, match="trained on 7 examples, this run has 6"):
        SFTTrainer(_config(out), tiny["model_dir"], tiny["train"][:-1])
    with pytest.raises(ValueError, match="already holds a run"):
        SFTTrainer(_config(out, resume=False), tiny["model_dir"], tiny["train"])


@pytest.mark.multiproc
def test_data_parallel_run_equals_one_process(world2, full_run):
    """DP=2 (ranks take every other sequence of each batch; rank 1 has none in the 1-sequence batches) trains
    exactly as one process does."""
    ranks = world2["trainer"]
    assert [r["dp"] for r in ranks] == [2, 2]
    assert [r["held_out_loss"] for r in ranks] == pytest.approx([full_run["after"]] * 2, rel=1e-5)
    for rank in ranks:
        assert len(rank["history"]) == len(full_run["history"]) == 6
        for got, want in zip(rank["history"], full_run["history"]):
            for key in ("train/loss", "train/grad_norm", "optim/lr", "train/num_tokens", "train/num_sequences"):
                assert got[key] == pytest.approx(want[key], rel=1e-5), key
        for name, tensor in full_run["weights"].items():
            # Adam turns the round-off of a summation order into ~1e-6 where a gradient component is ~0; a
            # missing or doubled sequence would move the metrics above, a wrong gradient the weights by ~1e-2
            torch.testing.assert_close(rank["weights"][name], tensor, rtol=1e-5, atol=1e-5, msg=_named(name))
