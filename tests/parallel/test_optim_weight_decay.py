"""Weight decay per Megatron param group (parallel.optim.build_optimizer): Megatron marks biases and other 1-D
parameters `wd_mult=0.0`; only 2-D weights decay. Checked through the real Megatron optimizer path on CPU
(DDP wrapper, get_megatron_optimizer's param groups, FP32Optimizer around torch AdamW, optimizer_step)."""
import pytest
import torch

LR, WEIGHT_DECAY = 0.1, 0.5


@pytest.fixture()
def stepped(single_process_parallel, tiny_qwen2_dir):
    """One optimizer step with all-zero gradients: Adam's update is then exactly 0, so what moves a weight is
    the decoupled decay alone, w <- w * (1 - lr * weight_decay)."""
    from r1_engine.parallel.models import build_gpt_model
    from r1_engine.parallel.convert import load_hf_checkpoint
    from r1_engine.parallel.optim import build_optimizer, optimizer_step, wrap_for_training

    model = build_gpt_model(tiny_qwen2_dir)
    load_hf_checkpoint(model, tiny_qwen2_dir)
    ddp = wrap_for_training(model)
    optimizer = build_optimizer(ddp, lr=LR, weight_decay=WEIGHT_DECAY, grad_clip=0.0)
    before = {name: p.detach().clone().double() for name, p in model.named_parameters()}
    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    ok, norm = optimizer_step(optimizer)
    assert ok and norm == 0.0
    after = {name: p.detach().clone().double() for name, p in model.named_parameters()}
    return model, ddp, optimizer, before, after


def test_only_matrices_decay(stepped):
    model, _, _, before, after = stepped
    one_d = [name for name, p in model.named_parameters() if p.dim() == 1]
    two_d = [name for name, p in model.named_parameters() if p.dim() >= 2]
    # the tiny Qwen2 has QKV biases and RMSNorm weights (1-D), so both branches are exercised
    assert any(name.endswith(".bias") for name in one_d) and any("layernorm" in name for name in one_d)
    assert two_d
    for name in one_d:
        torch.testing.assert_close(after[name], before[name], rtol=0, atol=0, msg=f"{name} decayed")
    for name in two_d:
        torch.testing.assert_close(after[name], before[name] * (1 - LR * WEIGHT_DECAY), rtol=1e-6, atol=1e-7,
                                   msg=f"{name} did not decay by lr * weight_decay")


def test_groups_carry_their_own_decay(stepped):
    _, _, optimizer, _, _ = stepped
    decays = {(group["wd_mult"], group["weight_decay"]) for group in optimizer.param_groups if group["params"]}
    assert decays == {(0.0, 0.0), (1.0, WEIGHT_DECAY)}


def test_resume_rederives_the_decay(stepped, tmp_path):
    """A checkpoint written before the per-group decay (every group at the default) is loaded with the right decay."""
    from r1_engine.parallel.optim import load_training_state, training_state

    _, ddp, optimizer, _, _ = stepped
    state = training_state(ddp, optimizer)
    for group in state["optimizer"]["param_groups"]:  # FP32Optimizer: the torch AdamW state dict
        group["weight_decay"] = WEIGHT_DECAY
    load_training_state(ddp, optimizer, state, tmp_path)
    for group in optimizer.param_groups:
        assert group["weight_decay"] == WEIGHT_DECAY * group["wd_mult"]
