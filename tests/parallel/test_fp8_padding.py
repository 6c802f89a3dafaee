"""FP8 packing (parallel.step._token_multiple / _micro_batches, PackedRows.pad_columns): with FP8 on, every
micro-batch's token count (rows x row length, what TE's FP8 GEMMs see flattened) is padded to the multiple TE
needs. The padding arithmetic is checked exhaustively on small shapes, and on the tiny Megatron model (local spec,
CPU) padded positions carry no loss and change neither the log-probs nor the step."""
from math import gcd
from types import SimpleNamespace

import pytest
import torch

from r1_engine.engine.batch import pack_sequences
from r1_engine.parallel.rows import PackedRows
from r1_engine.parallel.step import _micro_batches, _token_multiple


def _rows(num_rows: int, seq_len: int) -> PackedRows:
    """Rows of one sequence each, the last position of each row padding, with one extra."""
    g = torch.Generator().manual_seed(num_rows * 100 + seq_len)
    shape = (num_rows, seq_len)
    seq_ids = torch.arange(num_rows).unsqueeze(1).expand(shape).clone()
    seq_ids[:, -1] = -1
    rows = PackedRows(tokens=torch.randint(1, 50, shape, generator=g), position_ids=torch.arange(seq_len).expand(shape),
                      targets=torch.randint(1, 50, shape, generator=g), loss_mask=(seq_ids >= 0).float(),
                      seq_ids=seq_ids, pad_id=0)
    return rows.with_extras(weight=torch.rand(shape, generator=g) + 0.5)


def test_token_multiple_from_the_config():
    assert _token_multiple(SimpleNamespace(fp8=None)) == 1
    assert _token_multiple(SimpleNamespace(fp8="e4m3", fp8_recipe="delayed")) == 16
    assert _token_multiple(SimpleNamespace(fp8="hybrid", fp8_recipe="tensorwise")) == 16
    assert _token_multiple(SimpleNamespace(fp8="e4m3", fp8_recipe="mxfp8")) == 32
    assert _token_multiple(SimpleNamespace(fp8="e4m3", fp8_recipe="delayed", sequence_parallel=True,
                                           tensor_model_parallel_size=4)) == 64


@pytest.mark.parametrize("multiple", [1, 16, 32, 64])
def test_micro_batch_token_counts_divide_the_multiple(multiple):
    for num_rows in range(1, 7):
        for seq_len in range(1, 35):
            rows = _rows(num_rows, seq_len)
            for num_micro in range(1, num_rows + 1):
                micro, real = _micro_batches(rows, num_micro, None, multiple)
                assert real == num_rows
                b, s = micro[0].num_rows, micro[0].seq_len
                assert all((m.num_rows, m.seq_len) == (b, s) for m in micro)
                assert (b * s) % multiple == 0
                # the fewest positions: no shorter row length at or above seq_len works
                assert s >= seq_len and all((b * t) % multiple for t in range(seq_len, s))
                assert s - seq_len < multiple // gcd(b, multiple)
                whole = PackedRows.cat(micro)
                # the real positions are untouched, the added ones are padding: no loss, seq id -1, extras 0
                for name in ("tokens", "targets", "loss_mask", "seq_ids", "position_ids"):
                    torch.testing.assert_close(getattr(whole, name)[:num_rows, :seq_len], getattr(rows, name))
                torch.testing.assert_close(whole.extras["weight"][:num_rows, :seq_len], rows.extras["weight"])
                tail = whole.rows(slice(0, num_rows))
                assert (tail.loss_mask[:, seq_len:] == 0).all() and (tail.seq_ids[:, seq_len:] == -1).all()
                assert (tail.tokens[:, seq_len:] == 0).all() and (tail.extras["weight"][:, seq_len:] == 0).all()
                assert whole.loss_mask.sum() == rows.loss_mask.sum()


def test_pad_columns_keeps_the_sequence_blocks():
    """thd attention: the added positions join each row's trailing padding block (or form one), real blocks keep
    their bounds in the flattened layout shifted by the added positions of the rows before."""
    rows = pack_sequences([[5, 6], [7], [8, 9, 10]], [[11, 12, 13], [14, 15], [16]], max_tokens_per_row=5)
    padded = rows.pad_columns(8)
    assert padded.seq_len == 8 and rows.seq_len == 5
    bounds, _ = rows.cu_seqlens()
    padded_bounds, _ = padded.cu_seqlens()

    def real_blocks(row_bounds, ids, width):
        out = []
        for start, end in zip(row_bounds[:-1].tolist(), row_bounds[1:].tolist()):
            sid = int(ids.reshape(-1)[start])
            if sid >= 0:
                out.append((sid, start // width, start % width, end - start))
        return out

    assert real_blocks(bounds, rows.seq_ids, 5) == real_blocks(padded_bounds, padded.seq_ids, 8)


def _loss_fn(mb, out):
    """Token-mean NLL of the loss positions (plain torch, TP=1)."""
    logp = torch.log_softmax(out.logits.float(), dim=-1).gather(-1, mb.targets.unsqueeze(-1)).squeeze(-1)
    loss = -(logp * mb.loss_mask).sum() / out.num_tokens
    return loss, {"nll": -logp[mb.loss_mask > 0]}


def test_padding_changes_neither_logprobs_nor_the_step(single_process_parallel, tiny_qwen2_dir, monkeypatch):
    from r1_engine.parallel.models import build_gpt_model
    from r1_engine.parallel import step
    from r1_engine.parallel.convert import load_hf_checkpoint
    from r1_engine.parallel.optim import build_optimizer, wrap_for_training

    g = torch.Generator().manual_seed(3)
    lengths = [(4, 5), (2, 5), (4, 2), (1, 3), (2, 2)]  # rows of 9 tokens at most: padding is needed
    prompts = [torch.randint(1, 200, (p,), generator=g).tolist() for p, _ in lengths]
    completions = [torch.randint(1, 200, (c,), generator=g).tolist() for _, c in lengths]
    rows = pack_sequences(prompts, completions, max_tokens_per_row=9)

    seen = []
    forward = step._model_forward
    monkeypatch.setattr(step, "_model_forward", lambda model, mb, use_thd, moe: seen.append(mb.tokens.shape)
                        or forward(model, mb, use_thd, moe))

    def run(multiple):
        monkeypatch.setattr(step, "_token_multiple", lambda config: multiple)
        torch.manual_seed(0)
        model = build_gpt_model(tiny_qwen2_dir)
        load_hf_checkpoint(model, tiny_qwen2_dir)
        logp = step.logprobs(model, rows, temperature=0.7, num_microbatches=2)
        ddp = wrap_for_training(model)
        optimizer = build_optimizer(ddp, lr=1e-2, grad_clip=0.0)
        metrics = step.train_step(ddp, optimizer, rows, _loss_fn, num_microbatches=2)
        # the gradients (Megatron DDP's main_grad buffers), not Adam's update, which amplifies rounding of tiny grads
        return logp, metrics, {n: p.main_grad.detach().clone() for n, p in model.named_parameters()}

    logp, metrics, grads = run(1)
    assert rows.seq_len == 9 and {s[1] for s in seen} == {9}
    seen.clear()
    logp16, metrics16, grads16 = run(16)
    assert {s[1] for s in seen} != {rows.seq_len} and all((b * s) % 16 == 0 for b, s in seen)  # padding was added
    assert logp16.shape == logp.shape == rows.tokens.shape
    torch.testing.assert_close(logp16, logp, rtol=1e-6, atol=1e-5)  # fp32 GEMMs of other shapes round apart
    assert metrics16["num_tokens"] == metrics["num_tokens"] == rows.loss_mask.sum().item()
    for key in ("loss", "nll", "grad_norm"):
        assert metrics16[key] == pytest.approx(metrics[key], rel=1e-5), key
    assert any(g.abs().max() > 0 for g in grads.values())
    for name in grads:
        torch.testing.assert_close(grads16[name], grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_mxfp8_is_refused_before_blackwell(monkeypatch, tiny_qwen2_dir):
    """TE's MXFP8 recipe needs sm_100+: on an H100 (9.0) it is one clear error at build time, not a TE failure."""
    from r1_engine.parallel.models import hf_config_to_transformer_config

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    with pytest.raises(ValueError, match=r"^fp8_recipe='mxfp8' needs compute capability >= 10.0 \(Blackwell\); "
                                         r"NVIDIA H100 80GB HBM3 has 9.0"):
        hf_config_to_transformer_config(tiny_qwen2_dir / "config.json", fp8="e4m3", fp8_recipe="mxfp8",
                                        tensor_parallel=1, pipeline_parallel=1)
