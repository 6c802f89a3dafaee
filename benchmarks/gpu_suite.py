"""Every GPU check and benchmark of the kernels in one call (< 10 minutes on an H100), results to JSON + markdown.

    python -m benchmarks.gpu_suite --out DIR            # on a CUDA machine: realistic sizes
    python -m benchmarks.gpu_suite --dry-run            # anywhere: tiny sizes on CPU, wall clock, temp dir

Sections, in order (each failing sub-benchmark is recorded as an error and the suite goes on; results are
rewritten after every section, so a run cut short still leaves its numbers):
  roofline      measured ceilings: device-to-device copy bandwidth (bytes read + written) and bf16 matmul rate
  correctness   the kernels against float64 references on this device: a few rows at the full vocabulary and a
                >65,535-row case (N=70,000, small V), bf16 and fp32; token_logprobs (logp, entropy), grpo_loss
                (loss and dL/dlogits, with and without inplace_backward, zero gradient on masked tokens),
                grpo_loss with entropy bonus + dual clip vs kernels/reference.py, linear_grpo_loss (3 chunks)
  token_logprobs, grpo_loss   forward and forward + backward at N=16,384, V=151,936, bf16: ours, ours with
                inplace_backward, the eager fp32 trainer path, Liger; time (CUDA events, warm-up, median),
                achieved bandwidth on counted bytes (roofline.counted_bytes), % of the copy roofline,
                pass-equivalents, peak extra memory, and agreement with the eager reference
  linear_grpo_loss   forward + backward at H=3,584: ours, eager, Liger, the bare lm_head matmul fwd + bwd
  variants      the loss family (GRPO, GSPO, GSPO-token, CISPO, GRPO + TIS + entropy) fwd+bwd on the same logits:
                the same two passes around a different [N]-vector function, so the times should agree
  tune          (BLOCK_V, num_warps) sweep of the statistics and gradient passes alone, then grpo_loss fwd+bwd
                again with the best pair of each (`ours-tuned`); prints the pairs as an R1_KERNEL_LAUNCH value
  compiled      torch.compile of the eager path (last: its compile time is the least predictable)
The targets from the issue are evaluated at the end: grpo_loss fwd+bwd >= 85% of the copy roofline with 3
passes counted, >= 1.2x Liger, >= 10x eager; linear_grpo_loss <= 1/8 of eager's peak extra memory and
<= 1.15x the bare matmul's time. Output: <out>/<device-name-slug>-<date>.json and .md.

This file is the entry point and the run order; the sections live in sections.py, correctness.py and tune.py,
the bookkeeping in suite.py, the scoring and the results files in report.py.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ("roofline", "correctness", "token_logprobs", "grpo_loss", "linear_grpo_loss", "variants", "tune",
            "compiled")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=None,
                   help="folder for the .json/.md results (default: benchmarks/results; a temp dir for --dry-run)")
    p.add_argument("--dry-run", action="store_true", help="tiny sizes on CPU (Triton interpreter), wall clock")
    p.add_argument("--budget-s", type=float, default=400.0,
                   help="stop starting new sub-benchmarks after this many seconds (default 400)")
    p.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset of the sections to run")
    p.add_argument("--sizes", default=None, help="override B,L,V,H of the performance sections")
    p.add_argument("--no-liger", action="store_true", help="skip Liger-Kernel even if importable")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile section")
    p.add_argument("--compile-on-cpu", action="store_true", help="with --dry-run, also exercise torch.compile")
    return p.parse_args(argv)


def run(args) -> int:
    """The sections in their order; each is skipped unless --sections names it."""
    from benchmarks import sections
    from benchmarks.correctness import correctness
    from benchmarks.suite import Suite
    from benchmarks.tune import tune

    suite = Suite(args)
    suite.log(f"device {suite.meta['device']}; sizes {vars(suite.sizes)}; out {suite.out}")
    order = {
        "roofline": lambda: sections.roofline(suite),
        "correctness": lambda: correctness(suite),
        "token_logprobs": lambda: sections.logits_op(suite, "token_logprobs"),
        "grpo_loss": lambda: sections.logits_op(suite, "grpo_loss"),
        "linear_grpo_loss": lambda: sections.linear_op(suite),
        "variants": lambda: sections.variants(suite),
        "tune": lambda: tune(suite),
        "compiled": lambda: sections.compiled(suite),
    }
    for name in SECTIONS:
        suite.section(name, order[name])
    return suite.finish()


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_suite: no CUDA device; run with --dry-run for the CPU code-path check", file=sys.stderr)
        return 2
    if args.dry_run:
        # the kernels run in Triton's interpreter; must be set before triton is imported (by the imports in run)
        os.environ.setdefault("TRITON_INTERPRET", "1")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
