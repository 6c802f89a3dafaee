"""A foreign run, played as a user would (issue 26): a model and tokenizer the project did not make (a small
Qwen2-shaped model with a byte-level BPE tokenizer and a chat template, built here), the user's own jsonl files with
other field names (problem / solution, instruction / output), a YAML config typed by hand, and
`torchrun --nproc_per_node=2 recipes/r1.py` through all four stages with a reward model the pipeline trains; killed
in stage 2 and re-run, it resumes from stage 2's checkpoint, and the final table has every row."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# eight fixed sums: a random model memorises them in the cold start, so every later stage has something to keep
SUMS = [(a, b) for a, b in ((1, 2), (2, 3), (3, 4), (4, 1), (2, 2), (3, 1), (1, 4), (2, 1))]
CHAT = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")
GREETINGS = ["Say hello.", "Say hi.", "Greet me.", "Say good morning."]


def _write_jsonl(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _model_dir(path: Path, corpus: list[str]) -> Path:
    """A byte-level BPE tokenizer trained on the corpus (with a chat template and EOS) and a tiny random Qwen2."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    raw.train_from_iterator(corpus, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tok.chat_template = CHAT
    tok.save_pretrained(path)
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id)
    Qwen2ForCausalLM(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def user_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("user")
    answer = lambda a, b: f"<|reasoning|>{a}+{b}={a + b}. check.<|summary|>\\boxed{{{a + b}}}"  # noqa: E731
    files = {
        "cold_start": _write_jsonl(root / "cs.jsonl", [{"question": f"What is {a}+{b}?", "response": answer(a, b)}
                                                       for a, b in SUMS]),
        "reasoning": _write_jsonl(root / "math.jsonl", [{"problem": f"What is {a}+{b}?", "solution": str(a + b)}
                                                        for a, b in SUMS]),
        "eval_reasoning": _write_jsonl(root / "held_out.jsonl",
                                       [{"problem": f"What is {a}+{b}?", "solution": str(a + b)} for a, b in SUMS[:4]]),
        "general_sft": _write_jsonl(root / "chat_sft.jsonl", [{"instruction": g, "output": "<|summary|>Hello!"}
                                                              for g in GREETINGS]),
        "general": _write_jsonl(root / "chat.jsonl", [{"instruction": g} for g in GREETINGS]),
        "eval_general": _write_jsonl(root / "chat_eval.jsonl", [{"instruction": g} for g in GREETINGS[:2]]),
        "preferences": _write_jsonl(root / "prefs.jsonl", [{"prompt": g, "chosen": "Hello!", "rejected": "No."}
                                                           for g in GREETINGS] * 2),
    }
    corpus = [json.dumps(json.loads(line)) for f in files.values() for line in Path(f).read_text().splitlines()]
    model = _model_dir(root / "model", corpus * 4)
    config = root / "run.yaml"  # typed by hand: each stage small, the files' own field names
    config.write_text("""\
language: en
cold_start:
  data: {prompt_key: question, completion_key: response}
  optim: {lr: 0.003, warmup_steps: 2}
  train: {epochs: 60, batch_size: 8, no_progress: true}
sft:
  data: {prompt_key: instruction, completion_key: output}
  optim: {lr: 0.001}
  train: {epochs: 3, batch_size: 8, progress: false}
reasoning_rl:
  data: {prompt_key: problem, answer_key: solution}
  rollout: {prompts_per_step: 4, group_size: 4, max_new_tokens: 28}
  reward: {num_workers: 0}
  optim: {lr: 0.0001}
  train: {steps: 30, save_every: 2, eval_size: null, progress: false}
rejection: {samples_per_prompt: 4, max_per_prompt: 2, temperature: 0.3, max_new_tokens: 28}
reward_model: {epochs: 2, lr: 0.001, progress: false}
all_scenario_rl:
  data: {prompt_key: instruction}
  rollout: {prompts_per_step: 4, group_size: 4, max_new_tokens: 28}
  reward: {num_workers: 0}
  optim: {lr: 0.0001}
  train: {steps: 2, eval_size: null, progress: false}
eval: {samples: 2, max_new_tokens: 28, num_workers: 0}
""".replace("no_progress: true", "progress: false"))
    return model, files, config


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (from /proc), children first found first."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _command(model, files, config, out):
    flags = [x for key, path in files.items() for x in (f"--data.{key.replace('_', '-')}", path)]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            str(ROOT / "recipes" / "r1.py"), "--config", str(config), "--model", str(model), "--out", str(out),
            *flags]


@pytest.mark.multiproc
def test_a_foreign_run_through_four_stages_killed_in_stage_2_resumes(user_files, tmp_path):
    model, files, config = user_files
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("TRITON_INTERPRET", None)
    log = tmp_path / "first.log"
    with open(log, "w") as sink:
        first = subprocess.Popen(_command(model, files, config, out), stdout=sink, stderr=subprocess.STDOUT,
                                 env=env, cwd=tmp_path, start_new_session=True)
        # the first checkpoint of stage 2 (step 2; pruned once two newer ones exist, and a step takes ~0.1 s here:
        # look for any, often)
        checkpoints = out / "stage_2" / "checkpoints"
        deadline = time.monotonic() + 900
        while not any(checkpoints.glob("step_??????")) and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert any(checkpoints.glob("step_??????")), log.read_text()[-4000:]
        for pid in [first.pid, *_descendants(first.pid)]:  # torchrun's workers sit in sessions of their own
            try:
                os.kill(pid, signal.SIGKILL)  # mid-stage: 28 of its 30 steps to go
            except ProcessLookupError:
                pass
        first.wait()
    assert not (out / "stage_2" / "stage.json").exists()  # stage 2 was not finished
    saved = sorted(p.name for p in (out / "stage_2" / "checkpoints").glob("step_*"))
    second = subprocess.run(_command(model, files, config, out), capture_output=True, text=True, env=env,
                            cwd=tmp_path, timeout=900)
    text = second.stdout + second.stderr
    assert second.returncode == 0, text[-6000:]
    assert "stage 1 (cold start SFT): done, skipped" in text
    resumed = re.search(rf"resumed {re.escape(str(out / 'stage_2'))} from (step_\d+) at step (\d+) of 30", text)
    assert resumed and resumed.group(1) == saved[-1] and int(resumed.group(2)) >= 2, \
        "\n".join(line for line in text.splitlines() if "resumed" in line or "stage" in line)  # not from step 0
    table = (out / "results.md").read_text()
    rows = [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| ")][1:]
    assert rows == ["base", "1: cold start SFT", "2: reasoning RL", "3: rejection sampling + SFT",
                    "4: all-scenario RL"], table
    results = json.loads((out / "results.json").read_text())
    assert all("pass@1" in row["summary"] for row in results["rows"]), results["rows"]
    assert any(k.startswith("rm/") for k in results["rows"][-1]["summary"])  # the pipeline's own reward model
