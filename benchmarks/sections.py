"""The suite's timed sections: roofline, the logits ops, the lm_head-fused op, the loss family, torch.compile.
Each takes the Suite (suite.py) and adds records to it; gpu_suite.py runs them in order."""
from __future__ import annotations

import torch

from benchmarks.cases import make_linear_case, make_loss_case
from benchmarks.checks import reference_outputs
from benchmarks.roofline import measure_ceilings
from benchmarks.runners import Outputs, Runner
from benchmarks.suite import Suite, error_fields
from benchmarks.timing import free_memory


def roofline(suite: Suite):
    """Measured ceilings: device-to-device copy bandwidth (bytes read + written) and the matmul rate."""
    measure_ceilings(suite.meta, suite.device, suite.dry, suite.log)


def logits_op(suite: Suite, op: str, impls=("ours", "ours-inplace", "eager", "liger")):
    """`op` on logits, forward then forward + backward, each implementation against one shared reference."""
    case = make_loss_case(suite.sizes, suite.dtype, suite.device, seed=10)
    rows = suite.rows()
    for backward in (False, True):
        if suite.left() <= 0:
            break
        ref = reference_outputs(op, case, backward, suite.settings, float64=suite.dry, rows=rows)
        for impl in impls:
            if impl == "ours-inplace" and not backward:
                continue  # in-place changes only the backward
            suite.bench(op, impl, backward, case, ref, rows)
        del ref
        free_memory(suite.device)


def linear_op(suite: Suite, impls=("ours", "eager", "liger", "matmul")):
    case = make_linear_case(suite.sizes, suite.dtype, suite.device, seed=11)
    ref = reference_outputs("linear_grpo_loss", case, True, suite.settings, float64=suite.dry)
    for impl in impls:
        suite.bench("linear_grpo_loss", impl, True, case, ref, None)


def variants(suite: Suite):
    """The loss family fwd+bwd on the same logits (ours, in-place backward). Each variant is a function on
    [N] vectors between the same statistics and gradient passes (GRPO_SPEC.md's split), so the times should
    agree within noise; GSPO's sequence coupling costs nothing extra on logits (only the fused-lm_head
    form needs a second sweep). Correctness of each variant is the kernel tests' job (float64 references)."""
    from r1_engine.kernels.loss_family import PolicyLossConfig
    from r1_engine.kernels.logits_loss import policy_loss

    case = make_loss_case(suite.sizes, suite.dtype, suite.device, seed=12)
    configs = {
        "grpo": PolicyLossConfig(eps_low=0.2, eps_high=0.28, beta=0.04),
        "gspo": PolicyLossConfig(name="gspo", eps_low=3e-4, eps_high=4e-4),
        "gspo-token": PolicyLossConfig(name="gspo-token", eps_low=3e-4, eps_high=4e-4),
        "cispo": PolicyLossConfig(name="cispo", aggregation="token-mean"),
        "grpo+tis+entropy": PolicyLossConfig(eps_low=0.2, eps_high=0.28, beta=0.04, tis_cap=2.0,
                                             entropy_coef=0.01),
    }
    backup = case.logits.clone()  # the in-place backward overwrites the logits: restored outside the timing
    rollout_logp = case.old_logp + 0.01
    for name, cfg in configs.items():
        rec = {"op": "policy_loss", "mode": "fwd+bwd", "impl": f"ours-inplace [{name}]", "status": None}
        if suite.left() <= 0:
            rec.update(status="skipped", reason="time budget spent")
            suite.records.append(rec)
            continue

        def fn(cfg=cfg):
            x = case.logits.detach().requires_grad_(True)
            # [B, L] inputs: every sequence-level aggregation reads one sequence a row, no seq_ids needed
            loss, _ = policy_loss(x, case.targets, old_logp=case.old_logp, ref_logp=case.ref_logp,
                                  advantages=case.adv_tokens, mask=case.mask, config=cfg,
                                  temperature=suite.settings.temperature, inplace_backward=True,
                                  rollout_logp=rollout_logp if cfg.tis_cap else None)
            (grad,) = torch.autograd.grad(loss, x)
            return Outputs(loss.detach(), (grad,))

        try:
            runner = Runner(fn=fn, setup=lambda: case.logits.copy_(backup))
            # the same bytes as grpo_loss fwd+bwd
            suite.time_runner(rec, runner, "grpo_loss", True, suite.dtype)
        except Exception as exc:
            rec.update(status="error", **error_fields(exc))
        suite.records.append(rec)
        suite.log(f"   policy_loss {name:18s} " + (f"{rec['median_ms']:9.3f} ms" if rec["status"] == "ok"
                                                   else f"{rec['status']}: {rec.get('error')}"))
        free_memory(suite.device)


def compiled(suite: Suite):
    """torch.compile of the eager path (last: its compile time is the least predictable)."""
    args = suite.args
    if args.no_compile or (suite.dry and not args.compile_on_cpu):
        suite.errors.append({"section": "compiled", "error": "skipped: " + (
            "--no-compile" if args.no_compile else "dry run (use --compile-on-cpu)")})
        return
    for op in ("token_logprobs", "grpo_loss"):
        if suite.left() < 90:  # a compile can take a minute; leave the rest of the budget to the results
            suite.errors.append({"section": "compiled", "error": f"{op}: skipped, under 90 s of budget left"})
            continue
        logits_op(suite, op, impls=("compiled",))
