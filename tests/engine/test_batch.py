"""engine/batch.py and parallel/rows.py: packing token lists into rows (hand-computed layouts), the RL vectors
in the rows' extras, and the rows' splitting, sharding and per-sequence views."""
from __future__ import annotations

import pytest
import torch

from r1_engine.engine.batch import pack_sequences, rl_rows, with_logprobs
from r1_engine.parallel.rows import PackedRows

PAD = 0


def _small_batch(**kwargs) -> PackedRows:
    # lengths 5, 3, 4; with capacity 8 first-fit-decreasing gives rows [seq0, seq1] and [seq2]
    return rl_rows(
        [[1, 2], [3], [4, 5, 6]],
        [[7, 8, 9], [10, 11], [12]],
        kwargs.pop("advantages", torch.tensor([0.5, -1.0, 2.0])),
        max_tokens_per_row=8,
        pad_id=PAD,
        **kwargs,
    )


def test_packed_layout_by_hand():
    b = _small_batch(rollout_logp=[[-0.1, -0.2, -0.3], [-1.0, -1.1], [-2.0]])
    assert b.tokens.tolist() == [[1, 2, 7, 8, 9, 3, 10, 11], [4, 5, 6, 12, 0, 0, 0, 0]]
    assert b.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2], [0, 1, 2, 3, 0, 0, 0, 0]]
    assert b.targets.tolist() == [[2, 7, 8, 9, PAD, 10, 11, PAD], [5, 6, 12, PAD, PAD, PAD, PAD, PAD]]
    assert b.loss_mask.tolist() == [[0, 1, 1, 1, 0, 1, 1, 0], [0, 0, 1, 0, 0, 0, 0, 0]]
    assert b.seq_ids.tolist() == [[0, 0, 0, 0, 0, 1, 1, 1], [2, 2, 2, 2, -1, -1, -1, -1]]
    assert b.extras["advantages"].tolist() == [[0, 0.5, 0.5, 0.5, 0, -1, -1, 0], [0, 0, 2, 0, 0, 0, 0, 0]]
    torch.testing.assert_close(
        b.extras["rollout_logp"],
        torch.tensor([[0, -0.1, -0.2, -0.3, 0, -1.0, -1.1, 0], [0, 0, -2.0, 0, 0, 0, 0, 0]]),
    )
    assert b.num_sequences == 3 and set(b.extras) == {"advantages", "rollout_logp"}


def test_padded_layout_and_per_token_advantages():
    b = rl_rows(
        [[1, 2], [3]], [[7, 8, 9], []], [[0.1, 0.2, 0.3], []], pack=False,
        pad_to_multiple_of=4, pad_id=5,
    )
    assert b.tokens.tolist() == [[1, 2, 7, 8, 9, 5, 5, 5], [3, 5, 5, 5, 5, 5, 5, 5]]
    assert b.loss_mask.tolist() == [[0, 1, 1, 1, 0, 0, 0, 0], [0] * 8]  # empty completion: no loss
    torch.testing.assert_close(b.extras["advantages"][0], torch.tensor([0, 0.1, 0.2, 0.3, 0, 0, 0, 0]))
    assert b.seq_ids.tolist() == [[0] * 5 + [-1] * 3, [1] + [-1] * 7]


def test_attention_mask_is_block_diagonal_causal():
    b = _small_batch()
    mask = b.attention_mask()
    assert mask.shape == (2, 1, 8, 8) and mask.dtype == torch.bool
    for r in range(2):
        seg = b.seq_ids[r].tolist()
        for i in range(8):
            for j in range(8):
                visible = j <= i and seg[i] == seg[j]
                assert bool(mask[r, 0, i, j]) == (not visible), (r, i, j)


def test_cu_seqlens_cover_sequences_and_padding_blocks():
    cu, longest = _small_batch().cu_seqlens()
    assert cu.tolist() == [0, 5, 8, 12, 16] and cu.dtype == torch.int32 and longest == 5


def test_completion_values_round_trip():
    b = _small_batch()
    values = [[0.1, 0.2, 0.3], [1.1, 1.2], [2.1]]
    placed = b.scatter_completion_values(values)
    assert placed[0].tolist() == pytest.approx([0, 0.1, 0.2, 0.3, 0, 1.1, 1.2, 0])
    back = b.completion_values(placed)
    assert sorted(back) == [0, 1, 2]
    for i, row in enumerate(values):
        assert back[i].tolist() == pytest.approx(row)
    with pytest.raises(ValueError, match="sequence 1 has 2 completion tokens but 3 values"):
        b.scatter_completion_values([[0.1, 0.2, 0.3], [1, 2, 3], [4]])


def test_split_shard_pad_and_logprob_setting():
    b = _small_batch()
    with pytest.raises(ValueError, match="do not divide"):
        b.split(3)
    p = b.pad_rows(3)
    assert p.num_rows == 3 and p.loss_mask[2].sum() == 0 and (p.seq_ids[2] == -1).all()
    parts = p.split(3)
    assert [m.num_rows for m in parts] == [1, 1, 1]
    assert torch.equal(PackedRows.cat(parts).tokens, p.tokens)
    assert p.extras["advantages"][2].abs().sum() == 0 and set(p.extras) == set(b.extras)
    s0, s1 = b.shard(0, 2), b.shard(1, 2)
    assert s0.tokens.tolist() == b.tokens[:1].tolist() and s1.tokens.tolist() == b.tokens[1:].tolist()
    s3 = b.shard(2, 3)  # a rank with only padding rows
    assert s3.num_rows == 1 and s3.loss_mask.sum() == 0
    logp = torch.full(b.tokens.shape, -0.5)
    with_lp = with_logprobs(b, old_logp=logp, ref_logp=2 * logp)
    assert torch.equal(with_lp.extras["old_logp"], -0.5 * b.loss_mask)
    assert torch.equal(with_lp.extras["ref_logp"], -b.loss_mask)
    assert with_lp.shard(1, 2).extras["old_logp"].tolist() == [[0, 0, -0.5, 0, 0, 0, 0, 0]]


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        pack_sequences([[1], []], [[2], [3]])
    with pytest.raises(ValueError, match="sequence 0 has 2 completion tokens but 1 advantages"):
        rl_rows([[1]], [[2, 3]], [[1.0]])
    with pytest.raises(ValueError, match="sequence 0 has 3 tokens, more than max_tokens_per_row=2"):
        rl_rows([[1]], [[2, 3]], [1.0], max_tokens_per_row=2)
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        rl_rows([[1], [2]], [[3]], [1.0, 1.0])
    with pytest.raises(ValueError, match="rollout_logp"):
        rl_rows([[1]], [[2, 3]], [1.0], rollout_logp=[[0.0]])
    b = _small_batch()
    with pytest.raises(ValueError, match="PackedRows.loss_mask has shape"):
        PackedRows(b.tokens, b.position_ids, b.targets, b.loss_mask[:, :3], b.seq_ids)
    with pytest.raises(ValueError, match="extras\\['advantages'\\] has shape"):
        b.with_extras(advantages=b.loss_mask[:, :3])
    with pytest.raises(ValueError, match="unknown vector 'advantage'"):
        with_logprobs(b, advantage=b.loss_mask)


