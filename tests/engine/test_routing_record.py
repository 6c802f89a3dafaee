"""Rollout routing record (R3, the rollout side): HFRolloutEngine(record_routing=True) on the tiny Qwen3-MoE and
DeepSeek-V3 checkpoints against the routers of a plain full-sequence forward (no cache), through left padding, the
fan-out to n samples, early stops and the compaction of finished rows; rl_rows' placement of the records in packed
rows against a hand-computed reference; the shape checks; and the vLLM output mapping on a stand-in vllm module
(vLLM itself needs a GPU)."""
import sys

import numpy as np
import pytest
import torch

from r1_engine.engine.batch import ROUTED_EXPERTS, rl_rows
from r1_engine.engine.rollout import HFRolloutEngine, RolloutBatch, SamplingParams
from r1_engine.engine.rollout.colocate import concat_batches
from tests.engine import _fake_vllm
from tests.parallel._moe_tiny import write_moe_checkpoint

# Qwen3-MoE with a dense layer between two MoE layers (the record's layer axis skips it); DeepSeek-V3 as written
# (layer 0 dense, 1 and 2 MoE, top-4 of 8 in groups).
CHECKPOINTS = {"qwen3_moe": {"num_hidden_layers": 3, "mlp_only_layers": [1]}, "deepseek_v3": {}}
MOE_LAYERS = {"qwen3_moe": [0, 2], "deepseek_v3": [1, 2, 3]}
TOP_K = {"qwen3_moe": 2, "deepseek_v3": 4}
PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14], [20, 21, 22, 23, 24]]
EOS = list(range(0, 250, 9))  # many EOS ids: some completions stop after a few tokens, others run to the limit


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/engine/conftest.py


@pytest.fixture(scope="module", params=sorted(CHECKPOINTS))
def kind_and_dir(request, tmp_path_factory):
    kind = request.param
    return kind, write_moe_checkpoint(kind, tmp_path_factory.mktemp(kind), **CHECKPOINTS[kind])


def reference_routing(model, kind, sequence: list[int]) -> torch.Tensor:
    """[len - 1, L, k]: the top-k indices of every MoE router in one unpadded forward of sequence[:-1], no cache."""
    found = {}
    hooks = [model.model.layers[layer].mlp.gate.register_forward_hook(
        lambda module, args, out, layer=layer: found.__setitem__(layer, out[2].detach().clone()))
        for layer in MOE_LAYERS[kind]]
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([sequence[:-1]]), use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    return torch.stack([found[layer] for layer in MOE_LAYERS[kind]], dim=1)


def test_hf_record_matches_a_full_forward(kind_and_dir):
    kind, ckpt = kind_and_dir
    engine = HFRolloutEngine(ckpt, record_routing=True, eos_token_id=EOS)
    compactions = []
    new_cache = engine._new_cache

    def counting_cache():
        cache = new_cache()
        select = cache.batch_select_indices
        cache.batch_select_indices = lambda keep: (compactions.append(len(keep)), select(keep))[1]
        return cache

    engine._new_cache = counting_cache
    batch = engine.generate(PROMPTS, 2, SamplingParams(temperature=1.0, max_new_tokens=8, seed=4))
    # the branches this test is about: left padding (prompt lengths differ), early stops, rows dropped mid-way
    assert "stop" in batch.finish_reason and "length" in batch.finish_reason
    assert min(len(c) for c in batch.completion_ids) < 8 and compactions
    assert not [h for r in engine._routing.routers for h in r._forward_hooks.values()]  # hooks gone afterwards
    layers, k = len(MOE_LAYERS[kind]), TOP_K[kind]
    for i, (prompt, completion, routed) in enumerate(zip(batch.prompt_ids, batch.completion_ids,
                                                         batch.routed_experts)):
        assert routed.dtype == torch.int16 and routed.shape == (len(prompt) + len(completion) - 1, layers, k)
        expected = reference_routing(engine.model, kind, prompt + completion)
        if kind == "qwen3_moe":  # sorted by probability: the router's order is deterministic
            assert torch.equal(routed.long(), expected), i
        else:  # DeepSeek's top-k is unsorted: compare the sets
            assert torch.equal(routed.long().sort(-1).values, expected.sort(-1).values), i
    # the n samples of a prompt share its prefill's routing
    for g, prompt in enumerate(PROMPTS):
        assert torch.equal(batch.routed_experts[2 * g][:len(prompt)], batch.routed_experts[2 * g + 1][:len(prompt)])

    # into packed rows: at each sequence's positions its record, the last token repeating the one before
    rows = rl_rows(batch.prompt_ids, batch.completion_ids, torch.ones(batch.num_completions),
                   routed_experts=batch.routed_experts, max_tokens_per_row=32)
    assert rows.num_rows < batch.num_completions  # several sequences a row
    for i, routed in enumerate(batch.routed_experts):
        placed = rows.extras[ROUTED_EXPERTS][rows.seq_ids == i]
        assert torch.equal(placed, torch.cat([routed, routed[-1:]]).int())

    assert HFRolloutEngine(engine.model).generate(PROMPTS[:1], 1, SamplingParams(max_new_tokens=2)).routed_experts \
        is None


def test_record_routing_needs_moe_routers():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    dense = Qwen2ForCausalLM(Qwen2Config(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    with pytest.raises(ValueError, match=r"record_routing=True but Qwen2ForCausalLM has no MoE routers"):
        HFRolloutEngine(dense, record_routing=True)


def hand_records(lengths, layers=2, k=2, dtype=torch.int16):
    """Record i at position t, layer l, slot j = 200 i + 4 t + 2 l + j (distinct everywhere, easy to read)."""
    out = []
    for i, fed in enumerate(lengths):
        t, layer, j = torch.meshgrid(torch.arange(fed), torch.arange(layers), torch.arange(k), indexing="ij")
        out.append((200 * i + 4 * t + 2 * layer + j).to(dtype))
    return out


@pytest.mark.parametrize("pack", [True, False])
def test_rl_rows_places_records_by_hand(pack):
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10], [11, 12]]
    completions = [[21, 22], [23, 24, 25], [26], [], [27, 28, 29, 30]]
    records = hand_records([len(p) + len(c) - 1 for p, c in zip(prompts, completions)])
    rows = rl_rows(prompts, completions, torch.zeros(5), routed_experts=records, pack=pack, max_tokens_per_row=11,
                   pad_to_multiple_of=4)
    routed = rows.extras[ROUTED_EXPERTS]
    assert routed.dtype == torch.int32 and routed.shape == (*rows.tokens.shape, 2, 2)
    assert (rows.seq_ids < 0).any()  # padding is covered
    if pack:
        assert any(len(set(row.tolist()) - {-1}) >= 3 for row in rows.seq_ids)  # several sequences in one row
    for r in range(rows.num_rows):
        for s in range(rows.seq_len):
            sid, pos = int(rows.seq_ids[r, s]), int(rows.position_ids[r, s])
            if sid < 0:
                expected = torch.tensor([[0, 1], [0, 1]])
            else:
                fed = len(prompts[sid]) + len(completions[sid]) - 1
                assert int(rows.tokens[r, s]) == (prompts[sid] + completions[sid])[pos]
                # the final token repeats the position before it; a 1-token sequence has none: 0..k-1
                expected = records[sid][min(pos, fed - 1)].int() if fed > 0 else torch.tensor([[0, 1], [0, 1]])
            assert torch.equal(routed[r, s], expected), (r, s)


def test_rl_rows_refuses_bad_records():
    prompts, completions = [[1, 2], [3, 4, 5]], [[6], [7, 8]]
    good = hand_records([2, 4])
    with pytest.raises(ValueError, match=r"sequence 1 has routed_experts for 5 positions, expected 4 \(its 5 prompt"):
        rl_rows(prompts, completions, None, routed_experts=[good[0], hand_records([5, 5])[1]])
    with pytest.raises(ValueError, match=r"2 sequences but 1 routed_experts records"):
        rl_rows(prompts, completions, None, routed_experts=good[:1])
    with pytest.raises(ValueError, match=r"sequence 1 has routed_experts of \[layers, k\] = \[3, 2\], sequence 0"):
        rl_rows(prompts, completions, None, routed_experts=[good[0], hand_records([4], layers=3)[0]])
    with pytest.raises(ValueError, match=r"sequence 0 has routed_experts of shape \(2, 2, 2\) \(torch.float32\)"):
        rl_rows(prompts, completions, None, routed_experts=[good[0].float(), good[1]])


def small_batch(routed=None, group_size=2):
    prompts, completions = [[1, 2], [1, 2], [3], [3]], [[5, 6, 7], [8], [9, 9], [4]]
    return RolloutBatch(prompt_ids=prompts, completion_ids=completions, completion_text=[""] * 4,
                        rollout_logp=[torch.zeros(len(c)) for c in completions], finish_reason=["stop"] * 4,
                        group_size=group_size, routed_experts=routed)


def test_rollout_batch_checks_and_carries_routed_experts():
    records = hand_records([4, 2, 2, 1])
    batch = small_batch(records)
    with pytest.raises(ValueError, match=r"completion 1 has routed_experts of shape \(3, 2, 2\) \(torch.int16\), "
                                         r"expected an integer tensor \[2, 2, 2\] \(prompt 2 \+ completion 1 - 1"):
        small_batch([records[0], hand_records([3])[0], *records[2:]])
    with pytest.raises(ValueError, match=r"completion 0 has routed_experts of shape \(4, 2, 2\) \(torch.float32\)"):
        small_batch([records[0].float(), *records[1:]])
    with pytest.raises(ValueError, match=r"completion 2 has routed_experts of shape \(2, 3, 2\).*\[2, 2, 2\]"):
        small_batch([*records[:2], hand_records([2], layers=3)[0], records[3]])
    with pytest.raises(ValueError, match=r"completion 0 has routed_experts of list"):
        small_batch([records[0].tolist(), *records[1:]])
    with pytest.raises(ValueError, match=r"RolloutBatch.routed_experts has 3 entries, expected 4"):
        small_batch(records[:3])

    picked = RolloutBatch.from_groups([(batch, 1), (batch, 0)])
    assert [r.tolist() for r in picked.routed_experts] == [r.tolist() for r in records[2:] + records[:2]]
    assert RolloutBatch.from_groups([(small_batch(), 1)]).routed_experts is None
    with pytest.raises(ValueError, match=r"some batches carry routed_experts and others do not"):
        RolloutBatch.from_groups([(batch, 0), (small_batch(), 1)])
    joined = concat_batches([batch, batch], 2)
    assert len(joined.routed_experts) == 8 and joined.routed_experts[5] is records[1]
    assert concat_batches([small_batch(), small_batch()], 2).routed_experts is None


# --- vLLM's documented outputs, on the stand-in module ------------------------------------------------------------

def routed_vllm_engine(monkeypatch, layout: str, prefix_hit: bool = False):
    """A VLLMRolloutEngine whose stand-in LLM attaches routing as vLLM documents it: "split" (vLLM 0.21: the prompt
    on the RequestOutput, one row per generated token on each completion, the last row never fed) or "whole"
    (vllm#28284: [P + C - 1] on each completion). Expert id of position t of prompt p, sample j = code(...)."""
    monkeypatch.setitem(sys.modules, "vllm", _fake_vllm.module())
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    generate = _fake_vllm.LLM.generate

    def with_routing(self, prompts, params, use_tqdm=True):
        outputs = generate(self, prompts, params, use_tqdm)
        for p, (prompt, request) in enumerate(zip(prompts, outputs)):
            plen = len(prompt["prompt_token_ids"])
            prompt_rows = np.stack([vllm_code(p, 0, t) for t in range(plen)])
            if prefix_hit:
                prompt_rows[0] = -1
            if layout == "split":
                request.prompt_routed_experts = prompt_rows
            for c in request.outputs:
                gen = [vllm_code(p, c.index, plen + t) for t in range(len(c.token_ids))]
                c.routed_experts = np.stack(gen) if layout == "split" else np.concatenate([prompt_rows, gen[:-1]])
        return outputs

    monkeypatch.setattr(_fake_vllm.LLM, "generate", with_routing)
    from r1_engine.engine.rollout.vllm import VLLMRolloutEngine

    return VLLMRolloutEngine("some/model", record_routing=True)


def vllm_code(prompt: int, sample: int, position: int) -> np.ndarray:
    """[L=3, k=2] int16 ids; prompt positions do not depend on the sample (shared prefill)."""
    base = 1000 * prompt + 100 * sample + 4 * position
    return (base + np.arange(6).reshape(3, 2)).astype(np.int16)


@pytest.mark.parametrize("layout", ["split", "whole"])
def test_vllm_routed_experts_map_to_the_batch_layout(monkeypatch, layout):
    engine = routed_vllm_engine(monkeypatch, layout)
    assert engine.llm.kwargs["enable_return_routed_experts"] is True
    prompts = [[1, 2, 3], [4, 5]]
    batch = engine.generate(prompts, 2, SamplingParams(temperature=1.0, max_new_tokens=4, seed=0))
    for i, (prompt, completion, routed) in enumerate(zip(batch.prompt_ids, batch.completion_ids,
                                                         batch.routed_experts)):
        p, sample = i // 2, i % 2
        assert routed.dtype == torch.int16 and routed.shape == (len(prompt) + len(completion) - 1, 3, 2)
        for t in range(routed.shape[0]):
            code = vllm_code(p, 0 if t < len(prompt) else sample, t)
            assert routed[t].tolist() == code.tolist(), (i, t)


def test_vllm_prefix_cache_holes_are_refused(monkeypatch):
    engine = routed_vllm_engine(monkeypatch, "split", prefix_hit=True)
    with pytest.raises(RuntimeError, match=r"prompt 0 \(sample 0\): 1 of 5 positions have no routing .*"
                                           r"enable_prefix_caching=False"):
        engine.generate([[1, 2, 3]], 1, SamplingParams(temperature=1.0, max_new_tokens=3, seed=0))


def test_vllm_without_the_option_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", _fake_vllm.module())

    def old_llm(self, **kwargs):
        if "enable_return_routed_experts" in kwargs:
            raise TypeError("EngineArgs.__init__() got an unexpected keyword argument 'enable_return_routed_experts'")

    monkeypatch.setattr(_fake_vllm.LLM, "__init__", old_llm)
    from r1_engine.engine.rollout.vllm import VLLMRolloutEngine

    with pytest.raises(ValueError, match=r"record_routing=True needs a vLLM that returns routed experts"):
        VLLMRolloutEngine("some/model", record_routing=True)
