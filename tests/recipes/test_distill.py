"""recipes/distill.py: offline and on-policy distillation and the GRPO baseline end to end (cut down), the teacher at
another TP size than the student (engine.teacher), and bad input as one line."""
import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from r1_engine.recipes.distill import main
from tests.recipes.helpers import one_error_line

ROOT = Path(__file__).resolve().parents[2]
BASE = ROOT / "recipes" / "tiny" / "base"  # the teacher here: larger than the student, same tokenizer
DATA = ROOT / "recipes" / "tiny" / "data"
NO_PROGRESS = ["--sft.train.no-progress", "--onpolicy.train.no-progress", "--rl.train.no-progress"]


@pytest.fixture(scope="module")
def student():
    from r1_engine.recipes.tiny.pretrain import ensure_student_model

    return ensure_student_model()


@pytest.fixture(scope="module")
def settings(tmp_path_factory):
    """The embedded default's settings as a YAML file (the at-scale defaults would sample 256 tokens at lr 1e-6)."""
    from r1_engine.engine.config import to_dict
    from r1_engine.recipes.tiny.settings import tiny_distill

    path = tmp_path_factory.mktemp("distill_cfg") / "tiny.yaml"
    path.write_text(yaml.safe_dump(to_dict(tiny_distill())))
    return path


def args(settings, out, teacher, student, *extra):
    """A cut-down run: 24 teacher prompts x 2 (SFT at a lower lr: a handful of steps), 2 on-policy steps, 16
    held-out questions x 2 samples."""
    return ["--config", str(settings), "--teacher", str(teacher), "--student", str(student),
            "--data", str(DATA / "train.jsonl"), "--eval-data", str(DATA / "eval.jsonl"), "--out", str(out),
            "--offline-prompts", "24", "--rejection.samples-per-prompt", "2", "--sft.train.batch-size", "8",
            "--sft.train.epochs", "3", "--sft.optim.lr", "3e-4", "--onpolicy.train.steps", "2",
            "--onpolicy.rollout.prompts-per-step", "4", "--rl.rollout.prompts-per-step", "4", "--eval.size", "16",
            "--eval.samples", "2", "--eval.num-workers", "0", "--onpolicy.reward.num-workers", "0",
            "--rl.reward.num-workers", "0", *NO_PROGRESS, *extra]


@pytest.fixture(scope="module")
def run(tmp_path_factory, settings, student):
    out = tmp_path_factory.mktemp("distill") / "run"
    with pytest.MonkeyPatch.context() as mp:  # module scope: conftest's function-scoped autouse fixtures come later
        mp.delenv("TRITON_INTERPRET", raising=False)
        return out, main(args(settings, out, BASE, student))


def test_student_is_a_smaller_tiny_qwen2_with_the_teachers_tokenizer(student):
    from safetensors.torch import load_file

    from r1_engine.recipes.tiny.pretrain import STUDENT_CONFIG, STUDENT_DIR, is_valid_base_model

    assert student == STUDENT_DIR and is_valid_base_model(STUDENT_DIR, STUDENT_CONFIG)

    def parameters(model_dir):  # tied embeddings: stored once
        return sum(t.numel() for t in load_file(model_dir / "model.safetensors").values())

    assert 200_000 < parameters(student) < 500_000 and parameters(BASE) > 2 * parameters(student)
    assert (student / "tokenizer.json").read_bytes() == (BASE / "tokenizer.json").read_bytes()


def test_offline_set_holds_only_accepted_samples_with_provenance(run):
    from r1_engine.engine.rewards import accuracy_reward, format_reward

    out, _ = run
    rows = [json.loads(x) for x in (out / "offline" / "rejection.jsonl").read_text().splitlines()]
    prompts = (DATA / "train.jsonl").read_text().splitlines()
    assert rows
    for row in rows:
        # rescored here with the rule rewards: correct and in the R1-Zero format
        assert accuracy_reward(row["completion"], row["answer"]) == 1.0 and format_reward(row["completion"]) == 1.0
        source, line = row["prompt_id"].rsplit(":", 1)
        assert Path(source) == DATA / "train.jsonl" and row["checkpoint"] == str(BASE)
        assert json.loads(prompts[int(line) - 1]) == {"prompt": row["prompt"], "answer": row["answer"]}
    # the student's loss on the set falls: evaluated before and after SFT, and along the run
    cost = json.loads((out / "offline" / "phase.json").read_text())["cost"]
    assert cost["sft_loss_after"] < cost["sft_loss_before"], cost
    losses = [json.loads(x)["train/loss"] for x in (out / "offline" / "metrics.jsonl").read_text().splitlines()]
    assert cost["examples"] == len(rows) and len(losses) == cost["steps"] == -(-len(rows) // 8) * 3
    assert cost["teacher_tokens_generated"] > 0 and cost["student_tokens_trained"] > 0


def test_table_rows_and_cost(run):
    out, report = run
    assert [row.get("phase", row["name"]) for row in report["rows"]] == ["student (before)", "offline", "onpolicy",
                                                                          "rl", "teacher"]
    by_phase = {row.get("phase"): row for row in report["rows"]}
    on, rl = by_phase["onpolicy"]["cost"], by_phase["rl"]["cost"]
    # every completion token the student sampled is scored by the teacher and trained on (no masking, one update)
    assert on["teacher_tokens_scored"] == on["student_tokens_generated"] == on["student_tokens_trained"] > 0
    assert on["steps"] == 2 and rl["teacher_tokens_scored"] == 0 and rl["student_tokens_generated"] > 0
    # the baseline's budget is the longest distillation phase's CPU time (the tiny settings' clock), and it ran
    # its logged steps
    assert rl["budget_clock"] == "cpu" and rl["budget_s"] == max(by_phase[p]["cost"]["cpu_s"]
                                                                 for p in ("offline", "onpolicy"))
    logged = [x for x in (out / "rl" / "metrics.jsonl").read_text().splitlines() if "reward/mean" in x]
    assert rl["steps"] == len(logged) >= 1
    for row in report["rows"]:
        assert {"pass@1", "cons@2", "format_rate"} <= set(row["summary"]), row
    table = (out / "results.md").read_text()
    assert "| GRPO, same CPU time |" in table and "teacher tokens generated" in table and ">= GRPO at" in table
    assert (out / "results.png").stat().st_size > 10_000


def test_baseline_budget_on_either_clock(tmp_path, settings):
    from r1_engine.recipes.distill import resolve_config
    from r1_engine.recipes.distill_phases import Distillation, _write_json

    cfg, _ = resolve_config(["--config", str(settings), "--out", str(tmp_path)])
    run = Distillation(cfg, BASE, BASE, None)
    with pytest.raises(ValueError, match="no distillation phase has run in --out: give --baseline-seconds"):
        run.rl_budget()
    for phase, wall, cpu in (("offline", 30.0, 20.0), ("onpolicy", 25.0, 24.0)):
        _write_json(tmp_path / phase / "phase.json", {"phase": phase, "cost": {"wall_s": wall, "cpu_s": cpu}})
    assert run.rl_budget() == 24.0  # the tiny settings count CPU seconds
    assert Distillation(dataclasses.replace(cfg, baseline_clock="wall"), BASE, BASE, None).rl_budget() == 30.0
    assert Distillation(dataclasses.replace(cfg, baseline_seconds=7.5), BASE, BASE, None).rl_budget() == 7.5


def test_rerun_skips_finished_phases(run, settings, student, capsys):
    out, _ = run
    threads = torch.get_num_threads()
    main(args(settings, out, BASE, student))  # the tiny settings run torch on one thread: restored after
    assert torch.get_num_threads() == threads
    printed = capsys.readouterr().out
    assert all(f"{phase} (" in printed for phase in ("offline", "onpolicy", "rl")) and "done, skipped" in printed
    assert "===" not in printed


def test_onpolicy_teacher_equal_to_student_moves_nothing(tmp_path, settings, student):
    """Teacher == student: every advantage -(logp_s - logp_t) is 0, so (no reference KL) the gradient is exactly 0
    and the exported weights are the student's, bit for bit."""
    from safetensors.torch import load_file

    out = tmp_path / "same"
    main(args(settings, out, student, student, "--mode", "onpolicy", "--no-baseline"))
    steps = [json.loads(x) for x in (out / "onpolicy" / "metrics.jsonl").read_text().splitlines()]
    assert len(steps) == 2 and all(s["distill/reverse_kl"] == 0.0 and s["train/grad_norm"] == 0.0 for s in steps)
    before, after = load_file(student / "model.safetensors"), load_file(out / "onpolicy" / "hf" / "model.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def _hf_teacher_worker(student: str, teacher: str, out: str):
    """TP=2 student, unsharded HF teacher on the leader: one step's advantages (rank-local view) and the rollout."""
    from r1_engine.engine.data import load_prompts
    from r1_engine.engine.teacher import HFTeacherTrainer
    from r1_engine.recipes.tiny.settings import tiny_distill

    cfg = tiny_distill().onpolicy
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, tensor_parallel=2),
                              rollout=dataclasses.replace(cfg.rollout, prompts_per_step=2, group_size=2),
                              reward=dataclasses.replace(cfg.reward, num_workers=0),
                              train=dataclasses.replace(cfg.train, out=out, progress=False))
    trainer = HFTeacherTrainer(cfg, student, load_prompts(DATA / "train.jsonl"), teacher_dir=teacher, offload=True)
    try:
        step = trainer.collect()
        (batch,) = step.minis
        updates, _ = trainer.update(step.minis)
        return {"adv": batch.completion_values(batch.extras["advantages"].cpu()),
                "prompts": step.rollout.prompt_ids, "completions": step.rollout.completion_ids,
                "grad_norm": updates[0]["grad_norm"], "tp": trainer.ps.tp_size}
    finally:
        trainer.close()


@pytest.mark.multiproc
def test_teacher_at_another_tp_size_than_the_student(tmp_path, student):
    """The student split over TP=2, the teacher an unsharded transformers model (engine.teacher): both ranks get
    the advantages logp_teacher - logp_student of an independent float64 transformers computation."""
    from transformers import AutoModelForCausalLM

    from tests.parallel.dist_utils import run_distributed

    r0, r1 = run_distributed(_hf_teacher_worker, 2, str(student), str(BASE), str(tmp_path / "run"))
    assert r0["tp"] == 2 and r0["prompts"] == r1["prompts"] and r0["completions"] == r1["completions"]
    models = {d: AutoModelForCausalLM.from_pretrained(d, dtype=torch.float64) for d in (student, BASE)}

    def logp(model_dir, i):
        ids = torch.tensor([r0["prompts"][i] + r0["completions"][i]])
        with torch.no_grad():
            lp = torch.log_softmax(models[model_dir](ids).logits[0], dim=-1)  # rollout temperature 1.0
        p = len(r0["prompts"][i])
        return lp[p - 1:-1].gather(1, ids[0, p:, None]).squeeze(1)

    for i in range(len(r0["completions"])):
        expected = logp(BASE, i) - logp(student, i)
        torch.testing.assert_close(r0["adv"][i].double(), expected, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(r1["adv"][i], r0["adv"][i], rtol=0, atol=0)
    assert r0["grad_norm"] > 0 and r0["grad_norm"] == r1["grad_norm"]


# ------------------------------------------------------------------------------------------ bad input
def test_missing_teacher(capsys, tmp_path, settings, student):
    line = one_error_line(capsys, main, args(settings, tmp_path / "run", tmp_path / "nowhere", student))
    assert line.startswith(f"error: --teacher {tmp_path / 'nowhere'}: does not exist")
    assert not (tmp_path / "run").exists()


def test_teacher_or_student_alone_and_flags_that_do_not_go_together(capsys, tmp_path):
    line = one_error_line(capsys, main, ["--teacher", str(BASE), "--out", str(tmp_path / "run")])
    assert line.startswith("error: --student and --data and --eval-data required")
    line = one_error_line(capsys, main, ["--teacher-offload", "--out", str(tmp_path / "run")])
    assert line.startswith("error: --teacher-offload needs --teacher-backend hf")
    line = one_error_line(capsys, main, ["--rl.optim.lr", "0", "--out", str(tmp_path / "run")])
    assert line.startswith("error: --rl.optim.lr=0.0: must be > 0")


def test_vocabularies_that_differ(capsys, tmp_path, settings, student):
    """On-policy (and both): one line before anything is built; offline: runs (the student learns the text)."""
    from transformers import AutoTokenizer

    from r1_engine.recipes.distill import check_inputs, resolve_config

    teacher = tmp_path / "other_tok"
    shutil.copytree(BASE, teacher)
    tok = AutoTokenizer.from_pretrained(teacher)
    tok.add_tokens(["<extra_token>"])
    tok.save_pretrained(teacher)
    for mode in ("onpolicy", "both"):
        line = one_error_line(capsys, main, args(settings, tmp_path / "run", teacher, student, "--mode", mode))
        assert line.startswith(f"error: --teacher {teacher}: its tokenizer differs from the student's"), line
    assert not (tmp_path / "run").exists()
    cfg, _ = resolve_config(args(settings, tmp_path / "run", teacher, student, "--mode", "offline"))
    check_inputs(cfg)
    report = main(args(settings, tmp_path / "run", teacher, student, "--mode", "offline", "--no-baseline"))
    assert [row.get("phase") for row in report["rows"]] == [None, "offline", None]


def test_megatron_teacher_that_does_not_split_over_the_students_tp(capsys, tmp_path, settings, student):
    """The trainer's teacher takes the student's layout; one that cannot is named, with the way out."""
    config = json.loads((BASE / "config.json").read_text())
    teacher = tmp_path / "three_heads"
    shutil.copytree(BASE, teacher)
    (teacher / "config.json").write_text(json.dumps(dict(config, num_attention_heads=3, num_key_value_heads=3)))
    line = one_error_line(capsys, main, args(settings, tmp_path / "run", teacher, student, "--mode", "onpolicy",
                                             "--model.tensor-parallel", "2"))
    assert line.startswith(f"error: --teacher {teacher}: ") and "--teacher-backend hf" in line, line


def test_teacher_without_a_correct_sample(capsys, tmp_path, settings, student):
    """One new token a sample: every sample is cut at the budget (and none correct), so nothing is kept and nothing
    trained."""
    out = tmp_path / "run"
    line = one_error_line(capsys, main, args(settings, out, BASE, student, "--rejection.max-new-tokens", "1"))
    assert line.startswith(f"error: --teacher {BASE} gave no sample to distil, nothing trained") and "truncated" in line
    assert not (out / "offline" / "rejection.jsonl").exists() and not (out / "offline" / "checkpoints").exists()
    assert not any((out / p).exists() for p in ("onpolicy", "rl"))


def test_verdict_says_within_noise_unless_the_difference_clears_two_standard_errors():
    """One seed's point estimates: a strict >= used to say "holds" for a 0.002 lead with a 0.02 spread."""
    from r1_engine.recipes.distill_report import compare, verdict

    assert compare(0.90, 0.88, 0.02, 0.02).startswith("within noise: |difference| 0.020 <= 2 SE 0.057")
    assert compare(0.99, 0.80, 0.01, 0.02) == "holds: |difference| > 2 SE 0.045"
    assert compare(0.70, 0.90, 0.02, 0.02) == "does not hold: |difference| > 2 SE 0.057"
    assert compare(0.9, 0.8, None, 0.1) == "holds, no spread known"
    rows = [{"phase": "offline", "name": "offline", "summary": {"pass@1": 0.95, "se/pass@1": 0.01}, "cost": {}},
            {"phase": "rl", "name": "rl", "summary": {"pass@1": 0.94, "se/pass@1": 0.01},
             "cost": {"budget_s": 60, "budget_clock": "cpu"}}]
    [line] = verdict(rows)
    assert line.startswith("offline distillation >= GRPO at 60 CPU s: pass@1 0.950 vs 0.940 (within noise"), line


def test_data_key_options_are_used_and_recipe_owned_ones_refused(tmp_path, capsys):
    """--data / --eval-data with other field names: every phase reads them with --onpolicy.data's keys (shown by
    --help and ignored before); the GRPO baseline's keys must agree, and the offline SFT's are the recipe's."""
    from r1_engine.recipes.distill import resolve_config
    from r1_engine.recipes.distill_phases import Distillation

    rows = tmp_path / "math.jsonl"
    rows.write_text(json.dumps({"problem": "2+2?", "solution": "4"}) + "\n")
    common = ["--teacher", str(BASE), "--student", str(BASE), "--data", str(rows), "--eval-data", str(rows),
              "--out", str(tmp_path / "run")]
    cfg, embedded = resolve_config([*common, "--onpolicy.data.prompt-key", "problem",
                                    "--onpolicy.data.answer-key", "solution"])
    run = Distillation(cfg, BASE, BASE, ps=None)
    [train] = run.prompts()
    [held_out] = run.prompts(cfg.eval_data)
    assert (train.prompt, train.answer, held_out.answer) == ("2+2?", "4", "4")
    line = one_error_line(capsys, main, [*common, "--rl.data.prompt-key", "question"])
    assert line.startswith("error: --rl.data.prompt-key='question': every phase reads --data with "
                           "--onpolicy.data.prompt-key"), line
    line = one_error_line(capsys, main, [*common, "--sft.data.prompt-key", "question"])
    assert line.startswith("error: --sft.data.prompt-key='question': set by the recipe"), line
