"""HFRolloutEngine on a tiny random Qwen2: log-probs against an independent full forward, padding
invariance, stopping, reproducibility and weight streaming. No tokenizer files: prompts are ids, and a
character tokenizer defined here decodes them where text is needed."""
import time

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from r1_engine.engine.rollout import HFRolloutEngine, RolloutBatch, SamplingParams

VOCAB = 100


def tiny_model(seed: int, tie: bool = True) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=tie, eos_token_id=None, bos_token_id=None)
    model = Qwen2ForCausalLM(config)
    # Random init is near-uniform over the vocabulary; sharpen it so sampling settings matter.
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    return model.eval()


class CharTokenizer:
    """Token k decodes to `chars_per_token` letters of a 5-letter alphabet (so short stop strings occur often)."""

    def __init__(self, chars_per_token: int = 1):
        self.chars_per_token = chars_per_token
        self.eos_token_id = None
        self.pad_token_id = None

    def token_text(self, k: int) -> str:
        letters = "abcde"
        return "".join(letters[(k // 5 ** j) % 5] for j in range(self.chars_per_token))

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.token_text(k) for k in ids)


def random_prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lengths]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/engine/conftest.py


@pytest.fixture(scope="module")
def model():
    return tiny_model(0)


def recompute_logp(model, prompt, completion, temperature):
    """Independent reference: one unpadded forward of prompt+completion, log_softmax(logits / T) in float64."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    scores = logits[len(prompt) - 1:-1] / temperature
    return torch.log_softmax(scores, dim=-1), scores


def test_rollout_logp_matches_full_forward_and_respects_top_k_top_p(model):
    engine = HFRolloutEngine(model, eos_token_id=[])
    params = SamplingParams(temperature=0.7, top_p=0.8, top_k=10, max_new_tokens=12, seed=3)
    prompts = random_prompts([3, 7, 11])
    batch = engine.generate(prompts, 4, params)
    assert batch.num_completions == 12 and batch.num_groups == 3 and batch.group_size == 4
    for i in range(batch.num_completions):
        assert batch.prompt_ids[i] == prompts[i // 4]
        completion = batch.completion_ids[i]
        assert len(completion) == 12 and batch.finish_reason[i] == "length"
        logp, scores = recompute_logp(model, batch.prompt_ids[i], completion, 0.7)
        target = torch.tensor(completion)
        reference = logp.gather(-1, target[:, None]).squeeze(-1)
        assert batch.rollout_logp[i].dtype == torch.float32
        torch.testing.assert_close(batch.rollout_logp[i].double(), reference, atol=2e-5, rtol=0)
        # Sampling truncation: each token is among the top-k and inside the top-p nucleus.
        rank = (scores > scores.gather(-1, target[:, None])).sum(-1)
        assert (rank < 10).all()
        probs = logp.exp()
        mass_before = (probs * (scores > scores.gather(-1, target[:, None]))).sum(-1)
        assert (mass_before < 0.8 + 1e-6).all()


def tiny_gpt2(seed: int):
    """Learned absolute positions: unlike RoPE, wrong position ids under left padding change the numbers."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                        bos_token_id=None, eos_token_id=None)
    return GPT2LMHeadModel(config).eval()


@pytest.mark.parametrize("kind", ["qwen2", "gpt2"])
def test_greedy_is_padding_invariant_and_groups_are_fanned_out(model, kind):
    if kind == "gpt2":
        model = tiny_gpt2(0)
    engine = HFRolloutEngine(model, eos_token_id=[])
    params = SamplingParams(temperature=0.0, max_new_tokens=10)
    short, long1, long2 = random_prompts([4, 15, 23], seed=1)
    alone = engine.generate([short], 2, params)
    mixed = engine.generate([long1, short, long2], 2, params)
    assert alone.completion_ids[0] == alone.completion_ids[1]
    assert mixed.completion_ids[2] == alone.completion_ids[0] == mixed.completion_ids[3]
    torch.testing.assert_close(mixed.rollout_logp[2], alone.rollout_logp[0], atol=1e-5, rtol=0)
    # Greedy log-probs are under T = 1 and agree with the unpadded forward; the token is the argmax.
    logp, _ = recompute_logp(model, short, alone.completion_ids[0], 1.0)
    assert logp.argmax(-1).tolist() == alone.completion_ids[0]
    torch.testing.assert_close(alone.rollout_logp[0].double(), logp.max(-1).values, atol=2e-5, rtol=0)
    # The long prompt's row is unaffected by being batched too.
    long_alone = engine.generate([long2], 1, params)
    torch.testing.assert_close(mixed.rollout_logp[4], long_alone.rollout_logp[0], atol=1e-5, rtol=0)


def test_seeded_sampling_is_reproducible(model):
    engine = HFRolloutEngine(model, eos_token_id=[])
    prompts = random_prompts([5, 6])
    first = engine.generate(prompts, 3, SamplingParams(max_new_tokens=8, seed=11))
    again = engine.generate(prompts, 3, SamplingParams(max_new_tokens=8, seed=11))
    other = engine.generate(prompts, 3, SamplingParams(max_new_tokens=8, seed=12))
    assert first.completion_ids == again.completion_ids
    assert first.completion_ids != other.completion_ids
    # Samples within a group differ (they are not copies of one draw).
    assert len({tuple(c) for c in first.completion_ids[:3]}) > 1


def test_eos_stops_and_is_kept(model):
    eos = set(range(0, VOCAB, 3))  # a third of the vocabulary ends the completion
    engine = HFRolloutEngine(model, eos_token_id=eos)
    batch = engine.generate(random_prompts([5, 9, 2]), 8, SamplingParams(max_new_tokens=30, seed=0))
    assert "stop" in batch.finish_reason and len(set(batch.lengths.tolist())) > 3
    for prompt, ids, reason, logp in zip(batch.prompt_ids, batch.completion_ids, batch.finish_reason,
                                         batch.rollout_logp):
        assert not any(t in eos for t in ids[:-1])
        assert (ids[-1] in eos) == (reason == "stop")
        if reason == "length":
            assert len(ids) == 30
        # Rows leave the running batch as they finish; the survivors' numbers must not change.
        reference, _ = recompute_logp(model, prompt, ids, 1.0)
        torch.testing.assert_close(logp.double(), reference.gather(-1, torch.tensor(ids)[:, None]).squeeze(-1),
                                   atol=2e-5, rtol=0)
    assert batch.truncated.tolist() == [r == "length" for r in batch.finish_reason]
    assert batch.lengths.tolist() == [len(c) for c in batch.completion_ids]


def test_length_finish_without_eos(model):
    engine = HFRolloutEngine(model, eos_token_id=[])
    batch = engine.generate(random_prompts([4]), 3, SamplingParams(max_new_tokens=5, seed=0))
    assert batch.finish_reason == ["length"] * 3 and batch.lengths.tolist() == [5, 5, 5]
    assert batch.truncated.all()


@pytest.mark.parametrize("chars_per_token", [1, 2])
def test_stop_strings_cut_text_after_the_stop_string(model, chars_per_token):
    tokenizer = CharTokenizer(chars_per_token)
    engine = HFRolloutEngine(model, tokenizer, eos_token_id=[])
    stops = ("ab", "eee")
    batch = engine.generate(random_prompts([3, 8]), 16, SamplingParams(max_new_tokens=25, stop_strings=stops, seed=5))
    assert "stop" in batch.finish_reason and "length" in batch.finish_reason
    for ids, text, reason in zip(batch.completion_ids, batch.completion_text, batch.finish_reason):
        full = tokenizer.decode(ids)
        before_last = tokenizer.decode(ids[:-1])
        assert not any(s in before_last for s in stops)  # stopped at the first token completing a stop string
        if reason == "stop":
            end = min(full.find(s) + len(s) for s in stops if s in full)
            assert text == full[:end] and text.endswith(stops)
        else:
            assert len(ids) == 25 and text == full and not any(s in full for s in stops)


def test_stop_strings_need_a_tokenizer(model):
    engine = HFRolloutEngine(model, eos_token_id=[])
    with pytest.raises(ValueError, match="tokenizer"):
        engine.generate(random_prompts([3]), 1, SamplingParams(max_new_tokens=3, stop_strings=("a",)))


def test_bad_prompts_and_params_are_refused(model):
    engine = HFRolloutEngine(model, eos_token_id=[])
    with pytest.raises(ValueError, match="prompt 1"):
        engine.generate([[1, 2], [3, VOCAB]], 1, SamplingParams(max_new_tokens=2))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        engine.generate([[1] * 500], 1, SamplingParams(max_new_tokens=20))
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        engine.generate([[]], 1, SamplingParams(max_new_tokens=2))
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="stop_strings"):
        SamplingParams(stop_strings="</answer>")


def test_rollout_batch_validates_its_fields():
    with pytest.raises(ValueError, match="rollout_logp"):
        RolloutBatch(prompt_ids=[[1]], completion_ids=[[2, 3]], completion_text=[""],
                     rollout_logp=[torch.zeros(1)], finish_reason=["stop"], group_size=1)
    with pytest.raises(ValueError, match="groups"):
        RolloutBatch(prompt_ids=[[1]] * 3, completion_ids=[[2]] * 3, completion_text=[""] * 3,
                     rollout_logp=[torch.zeros(1)] * 3, finish_reason=["stop"] * 3, group_size=2)


@pytest.mark.parametrize("tie", [True, False])
def test_update_weights_streams_another_models_weights(tie):
    engine = HFRolloutEngine(tiny_model(0, tie), eos_token_id=[])
    target = tiny_model(1, tie)
    ids = torch.tensor([random_prompts([9])[0]])
    with torch.no_grad():
        expected = target(input_ids=ids).logits
        before = engine.model(input_ids=ids).logits
    assert not torch.allclose(before, expected)
    never = engine.update_weights(((name, tensor.clone()) for name, tensor in target.state_dict().items()),
                                  check_all_updated=True)
    assert never == []
    with torch.no_grad():
        after = engine.model(input_ids=ids).logits
    torch.testing.assert_close(after, expected, atol=0, rtol=0)


def test_update_weights_errors_name_the_parameter():
    engine = HFRolloutEngine(tiny_model(0), eos_token_id=[])
    with pytest.raises(ValueError, match="model.layers.9.mlp.up_proj.weight"):
        engine.update_weights([("model.layers.9.mlp.up_proj.weight", torch.zeros(64, 32))])
    with pytest.raises(ValueError, match="model.norm.weight.*shape"):
        engine.update_weights([("model.norm.weight", torch.zeros(31))])
    partial = [("model.norm.weight", torch.ones(32))]
    assert "model.embed_tokens.weight" in engine.update_weights(partial)
    with pytest.raises(ValueError, match="never updated.*model.embed_tokens.weight"):
        engine.update_weights(partial, check_all_updated=True)
    # Tied embeddings: lm_head.weight alone updates the embedding; disagreeing copies are refused.
    weight = torch.randn(VOCAB, 32)
    engine.update_weights([("lm_head.weight", weight)])
    torch.testing.assert_close(engine.model.get_input_embeddings().weight, weight, atol=0, rtol=0)
    with pytest.raises(ValueError, match="tied"):
        engine.update_weights([("lm_head.weight", weight), ("model.embed_tokens.weight", weight + 1)])


def test_engine_loads_a_model_directory(tmp_path):
    source = tiny_model(2)
    source.save_pretrained(tmp_path)
    engine = HFRolloutEngine(tmp_path, eos_token_id=[])
    for (name, a), (_, b) in zip(sorted(engine.model.state_dict().items()), sorted(source.state_dict().items())):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=name)
    with pytest.raises(FileNotFoundError, match="config.json"):
        HFRolloutEngine(tmp_path / "missing")


def test_throughput_128_completions(model):
    torch.set_num_threads(2)
    engine = HFRolloutEngine(model, eos_token_id=[], num_threads=1)
    prompts = random_prompts([20] * 16)
    engine.generate(prompts[:2], 2, SamplingParams(max_new_tokens=4, seed=0))  # warm-up
    start = time.perf_counter()
    batch = engine.generate(prompts, 8, SamplingParams(max_new_tokens=40, seed=0))
    elapsed = time.perf_counter() - start
    assert torch.get_num_threads() == 2  # restored after generate
    torch.set_num_threads(1)
    assert batch.num_completions == 128 and batch.lengths.sum() == 128 * 40
    # ~0.2-0.5 s on a 2-core machine; the bound only catches pathological slowdowns on a shared one.
    assert elapsed < 10, f"128 x 40 tokens took {elapsed:.1f} s"


def test_vllm_engine_import_guard():
    try:
        import vllm  # noqa: F401
        pytest.skip("vLLM is installed; the guard only matters without it")
    except ImportError:
        pass
    from r1_engine.engine.rollout.vllm import (
        VLLMRolloutEngine,  # importing the module itself must not need vLLM
    )

    with pytest.raises(ImportError, match=r"needs vLLM.*install the gpu extra.*HFRolloutEngine"):
        VLLMRolloutEngine("some/model")


def test_rollout_batch_from_groups_picks_whole_groups_in_order():
    def batch(tag, groups, n=2):
        k = groups * n
        return RolloutBatch(prompt_ids=[[tag, i // n] for i in range(k)], completion_ids=[[tag, i] for i in range(k)],
                            completion_text=[f"{tag}:{i}" for i in range(k)],
                            rollout_logp=[torch.full((2,), float(tag * 100 + i)) for i in range(k)],
                            finish_reason=["stop" if i % 2 else "length" for i in range(k)], group_size=n)

    a, b = batch(1, 3), batch(2, 2)
    merged = RolloutBatch.from_groups([(b, 1), (a, 0), (a, 2)])
    assert merged.group_size == 2 and merged.num_groups == 3
    assert merged.completion_text == ["2:2", "2:3", "1:0", "1:1", "1:4", "1:5"]
    assert merged.prompt_ids == [[2, 1], [2, 1], [1, 0], [1, 0], [1, 2], [1, 2]]
    assert [t[0].item() for t in merged.rollout_logp] == [202, 203, 100, 101, 104, 105]
    assert merged.finish_reason == ["length", "stop"] * 3
    with pytest.raises(ValueError, match="group sizes differ"):
        RolloutBatch.from_groups([(a, 0), (batch(3, 1, n=3), 0)])
    with pytest.raises(ValueError, match="group 3 of a batch with 3 groups"):
        RolloutBatch.from_groups([(a, 3)])
    with pytest.raises(ValueError, match="no groups"):
        RolloutBatch.from_groups([])
