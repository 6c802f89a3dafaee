"""The GRPO trainer on a tiny random Qwen2: the update direction, weight sync, TP=2 == TP=1, config and layout
errors, dynamic sampling, distillation (resume: test_trainer_resume.py)."""
import math

import pytest
import torch

from tests.engine._trainer_common import DATA, run_trainer, tiny_config, write_tiny_model
from tests.parallel.dist_utils import run_distributed


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture(scope="module")
def trainer(model_dir, tmp_path_factory):
    from r1_engine.engine.data import load_prompts
    from r1_engine.engine.trainer import GRPOTrainer

    cfg = tiny_config(tmp_path_factory.mktemp("run"), steps=1)
    t = GRPOTrainer(cfg, model_dir, load_prompts(DATA / "train.jsonl"), load_prompts(DATA / "eval.jsonl"))
    yield t
    t.close()


def test_one_update_moves_the_surrogate_the_right_way(trainer):
    import dataclasses

    from r1_engine.engine.rewards import accuracy_reward, format_reward
    from r1_engine.parallel.step import logprobs

    # scripted reward totals (a random model earns ~nothing), so the advantages checked below are not all 0
    script = [1.0, 0.0, 0.0, 0.0] + [0.5] * 4 + [2.0, 1.0, 0.0, -1.0] + [0.0, 0.0, 1.0, 1.0]
    real, scored = trainer.rollout_sampler.scorer.score, []

    def score(kinds, prompts, completions, refs, **kwargs):
        scored.append(real(kinds, prompts, completions, refs, **kwargs))
        return dataclasses.replace(scored[-1], total=list(script))

    trainer.rollout_sampler.scorer.score = score
    try:
        step = trainer.collect()
        rollout, rewards, (batch,) = step.rollout, step.rewards, step.minis
    finally:
        trainer.rollout_sampler.scorer.score = real
    # the composer's real total is 1 * accuracy + 0.5 * format (language weight 0), scored here independently
    answers = {tuple(it.prompt_ids): it.example.answer for it in trainer.train_set.items}
    expected = [accuracy_reward(c, answers[tuple(p)]) + 0.5 * format_reward(c)
                for c, p in zip(rollout.completion_text, rollout.prompt_ids)]
    assert scored[0].total == pytest.approx(expected, abs=1e-12)
    assert rewards.tolist() == script
    # GRPO advantages by hand: (r - group mean) / (unbiased group std + 1e-6); the uniform group gets 0
    hand = ([x / (0.5 + 1e-6) for x in (0.75, -0.25, -0.25, -0.25)] + [0.0] * 4
            + [x / (math.sqrt(5 / 3) + 1e-6) for x in (1.5, 0.5, -0.5, -1.5)]
            + [x / (math.sqrt(1 / 3) + 1e-6) for x in (-0.5, -0.5, 0.5, 0.5)])
    for i, h in enumerate(hand):  # sequence i of the packed batch is completion i
        got = batch.extras["advantages"][(batch.seq_ids == i) & (batch.loss_mask > 0)].double()
        assert got.numel() > 0
        torch.testing.assert_close(got, torch.full_like(got, h), rtol=1e-6, atol=1e-6)
    # make the advantages informative even if the random model earns no reward: +1 / -1 per sequence
    sign = torch.where(batch.seq_ids % 2 == 0, 1.0, -1.0) * batch.loss_mask
    batch = batch.with_extras(advantages=sign)
    before = logprobs(trainer.policy, batch, temperature=trainer.cfg.rollout.temperature)
    trainer.update([batch])
    after = logprobs(trainer.policy, batch, temperature=trainer.cfg.rollout.temperature)
    m = batch.loss_mask
    # the surrogate sum A * ratio over tokens must rise from its on-policy value sum A
    gain = ((torch.exp(after - before) - 1) * sign * m).sum()
    assert gain > 0, f"the update lowered the surrogate by {gain.item():.3e}"
    assert ((after - before) * (sign > 0) * m).sum() > 0  # positive-advantage tokens became likelier
    assert ((after - before) * (sign < 0) * m).sum() < 0


def test_weight_sync_hf_logits_equal_megatron(trainer):
    from r1_engine.parallel.models import unwrap_model

    trainer.sync_weights()
    ids = torch.tensor([trainer.train_set[0].prompt_ids + [5, 9, 11]])
    hf = trainer.rollout_engine.model
    with torch.no_grad():
        hf_logits = hf(ids).logits[0].double()
        mg_logits = unwrap_model(trainer.policy)(ids, torch.arange(ids.shape[1])[None], None)[0].double()
    v = hf_logits.shape[-1]
    torch.testing.assert_close(mg_logits[:, :v], hf_logits, rtol=1e-5, atol=1e-5)


@pytest.mark.multiproc
def test_tensor_parallel_2_matches_1(model_dir, tmp_path):
    one = run_distributed(run_trainer, 1, str(model_dir), str(tmp_path / "tp1"), 2, 1)[0]
    two = run_distributed(run_trainer, 2, str(model_dir), str(tmp_path / "tp2"), 2, 2)
    for rank_history in two:
        for a, b in zip(one, rank_history):
            for k in ("reward/mean", "response_length/mean", "train/loss", "train/grad_norm", "train/kl",
                      "train/entropy", "train/ratio"):
                assert math.isclose(a[k], b[k], rel_tol=1e-4, abs_tol=1e-6), (k, a[k], b[k])


def test_bad_model_dirs_name_the_problem(model_dir, tmp_path):
    import json
    import shutil

    from r1_engine.engine.data import load_prompts
    from r1_engine.engine.trainer import GRPOTrainer

    cfg = tiny_config(tmp_path / "run", steps=1)
    prompts = load_prompts(DATA / "eval.jsonl")
    no_config = tmp_path / "no_config"
    shutil.copytree(model_dir, no_config)
    (no_config / "config.json").unlink()
    with pytest.raises(ValueError, match="config.json"):
        GRPOTrainer(cfg, no_config, prompts)
    no_tokenizer = tmp_path / "no_tokenizer"
    shutil.copytree(model_dir, no_tokenizer)
    for f in no_tokenizer.glob("tokenizer*"):
        f.unlink()
    with pytest.raises((ValueError, FileNotFoundError), match="tokenizer"):
        GRPOTrainer(cfg, no_tokenizer, prompts)
    small_vocab = tmp_path / "small_vocab"
    shutil.copytree(model_dir, small_vocab)
    config = json.loads((small_vocab / "config.json").read_text())
    config["vocab_size"] = 64
    (small_vocab / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="vocab"):
        GRPOTrainer(cfg, small_vocab, prompts)


def test_mini_batches_and_epochs_go_off_policy(model_dir, tmp_path):
    import dataclasses

    from r1_engine.engine.data import load_prompts
    from r1_engine.engine.trainer import GRPOTrainer

    cfg = tiny_config(tmp_path / "run", steps=1)
    cfg = dataclasses.replace(cfg, algo=dataclasses.replace(cfg.algo, mini_batches=3, epochs_per_batch=2))
    t = GRPOTrainer(cfg, model_dir, load_prompts(DATA / "train.jsonl"))
    try:
        minis = t.collect().minis
        assert len(minis) == 3  # 16 completions cut round-robin before packing: 6 + 5 + 5
        assert sorted(int(m.num_sequences) for m in minis) == [5, 5, 6]
        assert all({"old_logp", "ref_logp"} <= set(m.extras) for m in minis)
        updates, _ = t.update(minis)
        assert len(updates) == 6
        # the first update of each epoch-1 mini-batch is on-policy; later ones see moved weights
        assert updates[0]["ratio"] == pytest.approx(1.0, abs=1e-6)
        assert any(abs(u["ratio"] - 1.0) > 1e-6 for u in updates[3:])
    finally:
        t.close()


def test_layout_errors_are_raised_before_any_collective(model_dir, tmp_path):
    import dataclasses

    from r1_engine.engine.data import load_prompts
    from r1_engine.engine.trainer import GRPOTrainer

    cfg = tiny_config(tmp_path / "run", steps=1)
    too_many = dataclasses.replace(cfg, algo=dataclasses.replace(cfg.algo, mini_batches=17))
    with pytest.raises(ValueError, match="mini_batches=17"):
        GRPOTrainer(too_many, model_dir, load_prompts(DATA / "eval.jsonl"))
    short_rows = dataclasses.replace(cfg, algo=dataclasses.replace(cfg.algo, max_tokens_per_row=64))
    with pytest.raises(ValueError, match="max_tokens_per_row=64"):
        GRPOTrainer(short_rows, model_dir, load_prompts(DATA / "eval.jsonl"))


def test_overlong_shaping_and_leader_errors_reach_every_rank(model_dir, tmp_path):
    import dataclasses

    from r1_engine.engine.advantages import overlong_penalty
    from r1_engine.engine.data import load_prompts
    from r1_engine.engine.trainer import GRPOTrainer

    cfg = tiny_config(tmp_path / "run", steps=1)
    cfg = dataclasses.replace(cfg, reward=dataclasses.replace(cfg.reward, overlong_buffer=4))
    t = GRPOTrainer(cfg, model_dir, load_prompts(DATA / "train.jsonl"))
    try:
        step = t.collect()
        rollout, scores, rewards = step.rollout, step.scores, step.rewards
        # the random model runs to the 12-token budget: every completion is inside the 4-token ramp or at -1
        shaped = torch.tensor(scores.total, dtype=torch.float64) + overlong_penalty(rollout.lengths, 12, 4).double()
        torch.testing.assert_close(rewards, shaped)
        assert (rewards < torch.tensor(scores.total, dtype=torch.float64)).any()

        def broken(*args, **kwargs):
            raise OSError("disk full")

        t.rollout_engine.generate = broken
        with pytest.raises(RuntimeError, match="disk full"):
            t.collect()
    finally:
        t.close()


def _scripted_rewards(t, script):
    """Replace the reward totals of successive sampling rounds: script[k][g] = the rewards of group g in
    round k (a list of G numbers); returns the list of prompt-id lists each round generated."""
    import dataclasses

    real, rounds, seen = t.rollout_sampler.scorer.score, iter(script), []

    def score(kinds, prompts, completions, refs, **kwargs):
        out = real(kinds, prompts, completions, refs, **kwargs)
        totals = [float(x) for group in next(rounds) for x in group]
        assert len(totals) == len(completions)
        return dataclasses.replace(out, total=totals)

    t.rollout_sampler.scorer.score = score
    generate = t.rollout_engine.generate

    def recording(prompt_ids, n, params):
        seen.append([list(p) for p in prompt_ids])
        return generate(prompt_ids, n, params)

    t.rollout_engine.generate = recording
    return seen


@pytest.mark.parametrize("max_rounds", [3, 2])
def test_dynamic_sampling_keeps_informative_groups_and_refills(model_dir, tmp_path, max_rounds):
    import dataclasses

    from r1_engine.engine.data import load_prompts
    from r1_engine.engine.trainer import GRPOTrainer

    cfg = tiny_config(tmp_path / "run", steps=1)
    cfg = dataclasses.replace(cfg, algo=dataclasses.replace(cfg.algo, dynamic_sampling=True,
                                                            max_sampling_rounds=max_rounds))
    t = GRPOTrainer(cfg, model_dir, load_prompts(DATA / "train.jsonl"))
    try:
        u, v = [0, 0, 0, 0], [1, 0, 0, 1]  # uniform (dropped) and informative (kept) groups of G=4
        seen = _scripted_rewards(t, [[v, u, [0, 1, 1, 1], u], [u, [1, 1, 0, 0], u, u], [v, v, v, v]])
        step = t.collect()
        rewards, minis, extra = step.rewards, step.minis, step.metrics
        assert len(seen) == max_rounds and t.draws == max_rounds
        assert extra["dynamic_sampling/rounds"] == max_rounds
        # the metrics describe the first round as sampled: two of its four groups were uniform
        assert rewards.tolist() == [float(x) for x in v + u + [0, 1, 1, 1] + u]
        (batch,) = minis
        if max_rounds == 3:  # kept: round 0 groups 0 and 2, round 1 group 1, round 2 group 0
            picked = [seen[0][0], seen[0][2], seen[1][1], seen[2][0]]
            assert extra["dynamic_sampling/filler_groups"] == 0 and extra["advantage/zero_groups_frac"] == 0
        else:  # two rounds keep three groups; the first dropped group (round 0, group 1) fills the step
            picked = [seen[0][0], seen[0][2], seen[1][1], seen[0][1]]
            assert extra["dynamic_sampling/filler_groups"] == 1 and extra["advantage/zero_groups_frac"] == 0.25
        # each sequence of the packed batch starts with its group's prompt: group k holds sequences 4k..4k+3
        rows = [batch.tokens[batch.seq_ids == i].tolist() for i in range(16)]
        for k, prompt in enumerate(picked):
            for i in range(4 * k, 4 * k + 4):
                assert rows[i][:len(prompt)] == prompt, (k, i)
        # advantages: informative groups carry non-zero advantages, a filler group none
        adv = [batch.extras["advantages"][(batch.seq_ids == i) & (batch.loss_mask > 0)] for i in range(16)]
        nonzero = [bool(a.abs().sum() > 0) for a in adv if a.numel()]
        assert any(nonzero)
        if max_rounds == 2:
            assert all(a.abs().sum() == 0 for a in adv[12:])
    finally:
        t.close()


def test_mask_truncated_gives_cut_completions_no_loss(model_dir, tmp_path):
    import dataclasses

    from r1_engine.engine.data import load_prompts
    from r1_engine.engine.trainer import GRPOTrainer

    cfg = tiny_config(tmp_path / "run", steps=1)
    cfg = dataclasses.replace(cfg, algo=dataclasses.replace(cfg.algo, mask_truncated=True))
    t = GRPOTrainer(cfg, model_dir, load_prompts(DATA / "train.jsonl"))
    try:
        # the random model rarely stops by itself: make half the completions stop early ("stop")
        generate = t.rollout_engine.generate

        def half_stopped(prompt_ids, n, params):
            out = generate(prompt_ids, n, params)
            out.finish_reason = ["stop" if i % 2 else r for i, r in enumerate(out.finish_reason)]
            return out

        t.rollout_engine.generate = half_stopped
        step = t.collect()
        rollout, (batch,), extra = step.rollout, step.minis, step.metrics
        truncated = rollout.truncated.tolist()
        assert any(truncated) and not all(truncated)
        for i, cut in enumerate(truncated):
            tokens = int(batch.loss_mask[batch.seq_ids == i].sum())
            assert (tokens == 0) if cut else (tokens == len(rollout.completion_ids[i])), (i, cut, tokens)
        assert extra["train/masked_truncated_frac"] == pytest.approx(sum(truncated) / len(truncated))
        assert batch.num_sequences == len(truncated) - sum(truncated)  # masked sequences count for nothing
        updates, _ = t.update([batch])
        assert updates[0]["num_sequences"] == batch.num_sequences
    finally:
        t.close()


def test_a_step_without_loss_tokens_does_not_move_the_weights(model_dir, tmp_path):
    """Every completion truncated and masked: no loss token anywhere, so no optimizer step (Adam's momentum and
    weight decay would otherwise move the weights with no signal)."""
    import dataclasses

    from r1_engine.engine.data import load_prompts
    from r1_engine.engine.trainer import GRPOTrainer

    cfg = tiny_config(tmp_path / "run", steps=1)
    cfg = dataclasses.replace(cfg, algo=dataclasses.replace(cfg.algo, mask_truncated=True, epochs_per_batch=1),
                              optim=dataclasses.replace(cfg.optim, weight_decay=0.1))
    t = GRPOTrainer(cfg, model_dir, load_prompts(DATA / "train.jsonl"))
    try:
        generate, cut = t.rollout_engine.generate, {"all": False}

        def scripted(prompt_ids, n, params):  # half the completions stop by themselves, then none does
            out = generate(prompt_ids, n, params)
            out.finish_reason = ["length" if cut["all"] or i % 2 else "stop" for i in range(len(out.finish_reason))]
            return out

        t.rollout_engine.generate = scripted
        first = t.train_one_step()  # a real step: Adam now has momentum (and the rollout engine is awake again)
        assert first["train/update_successful"] == 1.0 and first["train/grad_norm"] > 0
        cut["all"] = True
        step = t.collect()
        minis, extra = step.minis, step.metrics
        assert extra["train/masked_truncated_frac"] == 1.0 and int(minis[0].loss_mask.sum()) == 0
        before = [p.detach().clone() for p in t.policy.parameters()]
        updates, _ = t.update(minis)
        assert updates[0]["update_successful"] == 0.0 and updates[0]["grad_norm"] == 0.0
        assert all(torch.equal(a, b.detach()) for a, b in zip(before, t.policy.parameters()))
    finally:
        t.close()


def test_no_resume_refuses_to_overwrite_and_lengths_are_checked_early(model_dir, tmp_path):
    import dataclasses

    from r1_engine.engine.data import load_prompts
    from r1_engine.engine.trainer import GRPOTrainer

    run_trainer(str(model_dir), str(tmp_path / "run"), steps=1)
    cfg = tiny_config(tmp_path / "run", steps=2, resume=False)
    with pytest.raises(ValueError, match="already holds a run"):
        GRPOTrainer(cfg, model_dir, load_prompts(DATA / "eval.jsonl"))
    long = tiny_config(tmp_path / "other", steps=1)
    long = dataclasses.replace(long, rollout=dataclasses.replace(long.rollout, max_new_tokens=250))
    with pytest.raises(ValueError, match=r"max_position_embeddings \(256"):
        GRPOTrainer(long, model_dir, load_prompts(DATA / "eval.jsonl"))
    typo = tiny_config(tmp_path / "other", steps=1)
    typo = dataclasses.replace(typo, reward=dataclasses.replace(typo.reward, weights={"acuracy": 1.0}))
    with pytest.raises(ValueError, match=r"reward.weights: unknown reward\(s\) \['acuracy'\]"):
        GRPOTrainer(typo, model_dir, load_prompts(DATA / "eval.jsonl"))


def test_on_policy_distillation_advantages_are_teacher_minus_student(model_dir, tmp_path):
    """The per-token advantages equal logp_teacher - logp_student computed independently with transformers
    in float64 on the sampled sequences."""
    import dataclasses

    from transformers import AutoModelForCausalLM

    from r1_engine.engine.data import load_prompts
    from r1_engine.engine.trainer import GRPOTrainer

    teacher_dir = write_tiny_model(tmp_path / "teacher", seed=1)
    cfg = tiny_config(tmp_path / "run", steps=1)
    cfg = dataclasses.replace(cfg, algo=dataclasses.replace(cfg.algo, teacher=str(teacher_dir)),
                              rollout=dataclasses.replace(cfg.rollout, temperature=0.7))
    t = GRPOTrainer(cfg, model_dir, load_prompts(DATA / "train.jsonl"))
    try:
        step = t.collect()
        rollout, (batch,), extra = step.rollout, step.minis, step.metrics
        assert "old_logp" in batch.extras
        got = batch.completion_values(batch.extras["advantages"])

        def logp(path, i):
            model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float64)
            ids = torch.tensor([rollout.prompt_ids[i] + rollout.completion_ids[i]])
            with torch.no_grad():
                lp = torch.log_softmax(model(ids).logits[0] / 0.7, dim=-1)
            p = len(rollout.prompt_ids[i])
            return lp[p - 1:-1].gather(1, ids[0, p:, None]).squeeze(1)

        for i in (0, 5, 11):
            expected = logp(teacher_dir, i) - logp(model_dir, i)
            torch.testing.assert_close(got[i].double(), expected, rtol=1e-4, atol=1e-4)
        assert extra["distill/reverse_kl"] > 0  # two different random models disagree
        updates, _ = t.update([batch])
        assert updates[0]["grad_norm"] > 0
    finally:
        t.close()


def test_distillation_teacher_needs_the_same_tokenizer(model_dir, tmp_path):
    import dataclasses
    import shutil

    from transformers import AutoTokenizer

    from r1_engine.engine.data import load_prompts
    from r1_engine.engine.trainer import GRPOTrainer

    other = tmp_path / "other_tok"
    shutil.copytree(model_dir, other)
    tok = AutoTokenizer.from_pretrained(other)
    tok.add_tokens(["<extra_token>"])
    tok.save_pretrained(other)
    cfg = tiny_config(tmp_path / "run", steps=1)
    for teacher, match in ((other, "tokenizer of .* differs"), (tmp_path / "nowhere", "has no config.json")):
        bad = dataclasses.replace(cfg, algo=dataclasses.replace(cfg.algo, teacher=str(teacher)))
        with pytest.raises(ValueError, match=match):
            GRPOTrainer(bad, model_dir, load_prompts(DATA / "eval.jsonl"))


def test_rollout_engine_sleeps_while_training_and_wakes_for_generation(model_dir, tmp_path):
    """The order a colocated vLLM needs: generate, sleep (KV cache freed) for log-probs and updates, weights
    in, wake; never a generation while asleep."""
    from r1_engine.engine.data import load_prompts
    from r1_engine.engine.trainer import GRPOTrainer

    cfg = tiny_config(tmp_path / "run", steps=1)
    t = GRPOTrainer(cfg, model_dir, load_prompts(DATA / "train.jsonl"), load_prompts(DATA / "eval.jsonl"))
    try:
        engine, calls, asleep = t.rollout_engine, [], [False]
        generate, update = engine.generate, engine.update_weights

        def record(name, fn=None):
            def wrapped(*args, **kwargs):
                if name == "generate":
                    assert not asleep[0], "generate called while the rollout engine sleeps"
                calls.append(name)
                asleep[0] = {"sleep": True, "wake": False}.get(name, asleep[0])
                return fn(*args, **kwargs) if fn is not None else None
            return wrapped

        engine.generate, engine.update_weights = record("generate", generate), record("update_weights", update)
        engine.sleep, engine.wake = record("sleep"), record("wake")
        t.train_one_step()
        t.evaluate()
        assert calls == ["generate", "sleep", "update_weights", "wake", "generate"]
    finally:
        t.close()


@pytest.mark.multiproc
def test_dynamic_sampling_with_two_data_parallel_ranks(model_dir, tmp_path):
    """Rank 0 is full after one round, rank 1 only after two: both must draw two rounds (the sampler and the
    seeds stay in step across DP ranks), and neither needs filler groups."""
    from tests.engine._trainer_common import dynamic_sampling_rank_worker

    (r0, f0, d0, s0), (r1, f1, d1, s1) = run_distributed(dynamic_sampling_rank_worker, 2, str(model_dir),
                                                         str(tmp_path / "dp2"))
    assert (r0, r1) == (2.0, 2.0) and (f0, f1) == (0.0, 0.0)
    assert d0 == d1 == 2 and s0 == s1


def test_default_rollouts_end_with_the_eos_and_train_it(tmp_path):
    """No stop strings by default: a completion ends with the EOS the policy sampled, and that EOS is a trained
    token, so the exported model learns to stop as a user sampling it with plain `generate` needs. (With the old
    default stop string "</answer>" the trained sequence ended at the tag and the EOS was never trained.)"""
    import dataclasses

    from r1_engine.engine.data import load_prompts
    from r1_engine.engine.trainer import GRPOTrainer
    from r1_engine.recipes.tiny.pretrain import BASE_DIR
    from r1_engine.recipes.tiny.settings import TINY_DEFAULT

    base = TINY_DEFAULT
    assert base.rollout.stop_strings == ()
    cfg = dataclasses.replace(
        base, rollout=dataclasses.replace(base.rollout, prompts_per_step=4, group_size=4),
        reward=dataclasses.replace(base.reward, num_workers=0),
        train=dataclasses.replace(base.train, out=str(tmp_path / "run"), steps=1, progress=False, eval_size=None))
    t = GRPOTrainer(cfg, BASE_DIR, load_prompts(DATA / "train.jsonl"))
    try:
        step = t.collect()
        rollout, (batch,) = step.rollout, step.minis
        eos = t.tokenizer.eos_token_id
        stopped = [i for i, reason in enumerate(rollout.finish_reason) if reason == "stop"]
        assert len(stopped) >= 12, rollout.finish_reason  # the tiny base ends its answers with EOS
        for i in stopped:
            assert rollout.completion_ids[i][-1] == eos
            rows = batch.seq_ids == i
            trained = batch.targets[rows][batch.loss_mask[rows].bool()]
            assert trained[-1].item() == eos, i  # the EOS is the last trained target of the completion
    finally:
        t.close()
