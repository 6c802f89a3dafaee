"""The HF teacher's log-prob pass (engine.teacher.HFTeacher): equal to the full-logits computation it replaces,
with no full-vocabulary tensor larger than its token chunk."""
from pathlib import Path

import pytest
import torch

from r1_engine.engine.teacher import LOGIT_BUDGET, HFTeacher
from r1_engine.parallel.rows import PackedRows
from tests.engine._trainer_common import write_tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("teacher"), seed=3)


def packed_rows(vocab: int) -> PackedRows:
    """Two rows of packed sequences (lengths 7 + 5 + padding, and 9 + 3), loss on some positions."""
    g = torch.Generator().manual_seed(0)
    B, S = 2, 12
    seq_ids = torch.tensor([[0] * 7 + [1] * 5, [2] * 9 + [3] * 3])
    seq_ids[0, 10:] = -1  # padding at the end of row 0
    tokens = torch.randint(1, vocab, (B, S), generator=g)
    targets = torch.randint(1, vocab, (B, S), generator=g)
    tokens[seq_ids < 0], targets[seq_ids < 0] = 0, 0
    positions = torch.zeros(B, S, dtype=torch.long)
    for r in range(B):
        for s in range(S):
            positions[r, s] = 0 if s == 0 or seq_ids[r, s] != seq_ids[r, s - 1] else positions[r, s - 1] + 1
    loss_mask = (torch.rand(B, S, generator=g) > 0.3).float() * (seq_ids >= 0)
    return PackedRows(tokens=tokens, position_ids=positions, targets=targets, loss_mask=loss_mask, seq_ids=seq_ids)


def full_logits_reference(teacher: HFTeacher, rows: PackedRows, temperature: float) -> torch.Tensor:
    """The computation HFTeacher.logprobs did before: [n, width, V] fp32 logits of each batch of sequences, their
    log_softmax, then the targets picked."""
    from r1_engine.engine.teacher import sequence_spans

    out = torch.zeros(rows.tokens.shape)
    for r, start, end in sequence_spans(rows):
        ids = rows.tokens[r:r + 1, start:end]
        with torch.no_grad():
            logits = teacher.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        logp = torch.log_softmax(logits.float() / temperature, dim=-1)[0]
        out[r, start:end] = logp.gather(1, rows.targets[r, start:end, None]).squeeze(1)
    return torch.where(rows.loss_mask > 0, out, torch.zeros_like(out))


@pytest.mark.parametrize("chunk_tokens, batch_size", [(None, 32), (3, 2), (1, 4)])
def test_teacher_logprobs_equal_the_full_logits_path(model_dir, chunk_tokens, batch_size):
    teacher = HFTeacher(model_dir, "cpu", batch_size=batch_size, chunk_tokens=chunk_tokens)
    assert teacher.head_only
    vocab = teacher.model.config.vocab_size
    rows = packed_rows(vocab)
    for temperature in (1.0, 0.7):
        got = teacher.logprobs(rows, temperature)
        want = full_logits_reference(teacher, rows, temperature)
        assert got.dtype == torch.float32 and got.shape == rows.tokens.shape
        assert torch.allclose(got, want, atol=1e-6, rtol=0), (got - want).abs().max()
        assert (got[rows.loss_mask == 0] == 0).all() and (got[rows.loss_mask > 0] < 0).all()
    # the model's own logits one sequence at a time (a config with a softcap or scale) gives the same numbers
    teacher.head_only = False
    assert torch.allclose(teacher.logprobs(rows, 0.7), full_logits_reference(teacher, rows, 0.7), atol=1e-6, rtol=0)


def test_teacher_never_holds_full_vocabulary_logits_beyond_a_chunk(model_dir, monkeypatch):
    """Every full-vocabulary tensor the pass makes has at most chunk_tokens rows; the default chunk keeps
    chunk x V under LOGIT_BUDGET elements (at V = 152k: 882 tokens, not [32, 2048, V])."""
    teacher = HFTeacher(model_dir, "cpu", chunk_tokens=4)
    vocab = teacher.model.config.vocab_size
    head = teacher.model.get_output_embeddings()
    shapes = []
    hook = head.register_forward_hook(lambda module, args, out: shapes.append(tuple(out.shape)))
    rows = packed_rows(vocab)
    teacher.logprobs(rows)
    hook.remove()
    real = int((rows.seq_ids >= 0).sum())  # 22 real tokens: ceil(22 / 4) head calls of at most 4 tokens
    assert shapes and all(len(s) == 2 and s[0] <= 4 and s[1] == vocab for s in shapes)
    assert sum(s[0] for s in shapes) == real and len(shapes) == -(-real // 4)
    default = HFTeacher(model_dir, "cpu")
    assert default.chunk_tokens == LOGIT_BUDGET // vocab
    assert max(1, LOGIT_BUDGET // 151_936) * 151_936 <= LOGIT_BUDGET  # Qwen2.5's vocabulary: ~512 MB of fp32
    with pytest.raises(ValueError, match="chunk_tokens must be >= 1"):
        HFTeacher(model_dir, "cpu", chunk_tokens=0)
