"""Every GPU check and benchmark of the kernels in one call (< 10 minutes on an H100), results to JSON + markdown.

    python benchmarks/gpu_suite.py --out DIR            # on a CUDA machine: realistic sizes
    python benchmarks/gpu_suite.py --dry-run            # anywhere: tiny sizes on CPU, wall clock, temp dir

Sections, in order (each failing sub-benchmark is recorded as an error and the suite goes on; results are
rewritten after every section, so a run cut short still leaves its numbers):
  roofline      measured ceilings: device-to-device copy bandwidth (bytes read + written) and bf16 matmul rate
  correctness   the kernels against float64 references on this device: a few rows at the full vocabulary and a
                >65,535-row case (N=70,000, small V), bf16 and fp32; token_logprobs (logp, entropy), grpo_loss
                (loss and dL/dlogits, with and without inplace_backward, zero gradient on masked tokens),
                grpo_loss with entropy bonus + dual clip vs kernels/reference.py, linear_grpo_loss (3 chunks)
  token_logprobs, grpo_loss   forward and forward + backward at N=16,384, V=151,936, bf16: ours, ours with
                inplace_backward, the eager fp32 trainer path, Liger; time (CUDA events, warm-up, median),
                achieved bandwidth on counted bytes (harness.counted_bytes), % of the copy roofline,
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
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GiB = 1024 ** 3


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=None,
                   help="folder for the .json/.md results (default: benchmarks/results; a temp dir for --dry-run)")
    p.add_argument("--dry-run", action="store_true", help="tiny sizes on CPU (Triton interpreter), wall clock")
    p.add_argument("--budget-s", type=float, default=400.0,
                   help="stop starting new sub-benchmarks after this many seconds (default 400)")
    p.add_argument("--sections",
                   default="roofline,correctness,token_logprobs,grpo_loss,linear_grpo_loss,variants,tune,compiled",
                   help="comma-separated subset of the sections to run")
    p.add_argument("--sizes", default=None, help="override B,L,V,H of the performance sections")
    p.add_argument("--no-liger", action="store_true", help="skip Liger-Kernel even if importable")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile section")
    p.add_argument("--compile-on-cpu", action="store_true", help="with --dry-run, also exercise torch.compile")
    return p.parse_args(argv)


def _fmt(x, spec=",.1f", none="–"):
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return none if x is None else str(x)
    return format(x, spec)


class Suite:
    def __init__(self, args, torch, harness):
        self.args, self.torch, self.h = args, torch, harness
        self.dry = args.dry_run
        self.device = torch.device("cpu" if self.dry else "cuda")
        self.t0 = time.perf_counter()
        self.dtype = torch.bfloat16
        if args.sizes:
            try:
                self.sizes = harness.Sizes(*(int(x) for x in args.sizes.split(",")))
            except (TypeError, ValueError) as exc:
                raise ValueError(f"--sizes must be B,L,V,H integers, got {args.sizes!r}") from exc
        else:
            self.sizes = harness.Sizes(2, 8, 1000, 64) if self.dry else harness.GPU_SIZES
        self.settings = harness.LossSettings()
        self.records: list[dict] = []  # performance sub-benchmarks
        self.tuning: dict | None = None  # the launch-configuration sweep (section `tune`)
        self.checks: list[dict] = []  # correctness checks
        self.errors: list[dict] = []  # whole-section failures
        self.meta = self._environment()
        name = "cpu-dry-run" if self.dry else re.sub(r"[^a-z0-9]+", "-", self.meta["device"].lower()).strip("-")
        self.stem = f"{name}-{datetime.date.today().isoformat()}"
        out = args.out if args.out is not None else (Path(tempfile.mkdtemp(prefix="gpu_suite_dry_"))
                                                     if self.dry else REPO / "benchmarks" / "results")
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------------------------ bookkeeping

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.args.budget_s - self.elapsed()

    def log(self, msg: str):
        print(f"[{self.elapsed():6.1f}s] {msg}", flush=True)

    def _environment(self) -> dict:
        torch = self.torch
        meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "dry_run": self.dry, "python": platform.python_version(), "torch": torch.__version__,
                "torch_cuda": torch.version.cuda, "sizes": vars(self.sizes) | {"n_tokens": self.sizes.n_tokens},
                "dtype": str(self.dtype).replace("torch.", ""), "settings": vars(self.settings),
                "tf32_matmul": torch.backends.cuda.matmul.allow_tf32}
        try:
            import triton
            meta["triton"] = triton.__version__
        except ImportError:
            meta["triton"] = None
        liger = self.h.liger_status()
        meta["liger"] = liger.version if liger.ok else None
        meta["liger_status"] = "importable" if liger.ok else liger.reason
        if self.args.no_liger:
            meta["liger_status"] = "skipped (--no-liger)"
        if self.device.type == "cuda":
            props = torch.cuda.get_device_properties(self.device)
            meta.update(device=torch.cuda.get_device_name(self.device), capability=f"{props.major}.{props.minor}",
                        multiprocessors=props.multi_processor_count, memory_gib=round(props.total_memory / GiB, 1))
        else:
            meta.update(device="cpu (dry run)", triton_interpret=os.environ.get("TRITON_INTERPRET"))
        try:
            meta["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                                                text=True, timeout=10).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            meta["git_commit"] = None
        return meta

    def sync(self):
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)

    def section(self, name: str, fn):
        if name not in self.args.sections.split(","):
            return
        if self.left() <= 0:
            self.errors.append({"section": name, "error": "skipped: time budget spent"})
            self.log(f"== {name}: skipped (time budget)")
            return
        self.log(f"== {name}")
        try:
            fn()
        except Exception as exc:  # a broken section is a result, not the end of the suite
            self.errors.append({"section": name, "error": f"{type(exc).__name__}: {exc}",
                                "traceback": traceback.format_exc()[-3000:]})
            self.log(f"   section {name} failed: {type(exc).__name__}: {exc}")
        finally:
            self.h.free_memory(self.device)
            self.write()

    def check(self, name: str, dtype, quantity: str, error: float, tol: float):
        passed = bool(error <= tol)
        self.checks.append({"check": name, "dtype": str(dtype).replace("torch.", ""), "quantity": quantity,
                            "rel_err": error, "tol": tol, "passed": passed})
        self.log(f"   {'ok  ' if passed else 'FAIL'} {name} [{dtype}] {quantity}: {error:.2e} (tol {tol:.0e})")

    def guarded(self, name: str, dtype, fn):
        """Run one correctness check; an exception is recorded as a failed check."""
        try:
            fn()
        except Exception as exc:
            self.checks.append({"check": name, "dtype": str(dtype).replace("torch.", ""), "quantity": "error",
                                "rel_err": None, "tol": None, "passed": False,
                                "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]})
            self.log(f"   FAIL {name} [{dtype}]: {type(exc).__name__}: {exc}")
        finally:
            self.h.free_memory(self.device)

    # -------------------------------------------------------------------------------------- sections

    def roofline(self):
        torch, h = self.torch, self.h
        n_bytes = 64 * 2 ** 20 if self.dry else 4 * GiB
        if self.device.type == "cuda":
            n_bytes = min(n_bytes, torch.cuda.mem_get_info(self.device)[0] // 4)
        src = torch.rand(n_bytes // 4, device=self.device)
        dst = torch.empty_like(src)
        t = h.measure(h.Runner(fn=lambda: dst.copy_(src)), self.device, warmup=3, min_reps=20, max_reps=50)
        bw = 2 * n_bytes / (t.median_ms / 1e3)
        self.meta["copy_roofline_gbps"] = bw / 1e9
        self.meta["copy_roofline_detail"] = (f"device-to-device copy of {n_bytes / 1e9:.2f} GB, read + written "
                                             f"counted, median of {t.reps} ({t.clock})")
        self.log(f"   copy roofline: {bw / 1e9:,.0f} GB/s")
        src = dst = None  # free the 8 GB before the matmul (the lambda above is done with them)
        m = 512 if self.dry else 8192
        dt = torch.float32 if self.dry else torch.bfloat16
        a, b = (torch.randn(m, m, device=self.device, dtype=dt) for _ in range(2))
        t = h.measure(h.Runner(fn=lambda: a @ b), self.device, warmup=3, min_reps=10, max_reps=30)
        self.meta["matmul_tflops"] = 2 * m ** 3 / (t.median_ms / 1e3) / 1e12
        self.meta["matmul_detail"] = f"{m}x{m}x{m} {str(dt).replace('torch.', '')} on random data, median of {t.reps}"
        self.log(f"   matmul: {self.meta['matmul_tflops']:,.0f} TFLOP/s")

    def correctness(self):
        h, torch = self.h, self.torch
        from kernels import grpo_loss, linear_grpo_loss, token_logprobs
        from kernels.reference import grpo_loss_ref, token_logprobs_ref

        v, hid = self.sizes.vocab, self.sizes.hidden
        cases = [(f"few rows, V={v:,}", h.Sizes(2, 8, v, hid), False)]
        if self.dry:
            cases.append(("many rows (dry run: 60 instead of 70,000)", h.Sizes(2, 30, 50, hid), True))
        else:
            cases.append((">65,535 rows (N=70,000, V=2,000)", h.Sizes(70, 1000, 2000, hid), True))
        settings = h.LossSettings(temperature=0.7)
        for label, sizes, many in cases:
            for dtype in (torch.bfloat16, torch.float32):
                if self.left() <= 0:
                    return
                tol = h.tolerances("grpo_loss", dtype)
                case = h.make_loss_case(sizes, dtype, self.device, seed=20, full_mask=False, temperature=0.7)

                def logprobs():
                    with torch.no_grad():
                        logp, ent = token_logprobs(case.logits, case.targets, 0.7, return_entropy=True)
                        ref_logp, ref_ent = token_logprobs_ref(case.logits.double(), case.targets, 0.7)
                    self.check(f"token_logprobs, {label}", dtype, "logp", h.rel_error(logp, ref_logp), tol["value"])
                    self.check(f"token_logprobs, {label}", dtype, "entropy", h.rel_error(ent, ref_ent), tol["value"])

                def grpo():
                    ref = h.reference_outputs("grpo_loss", case, True, settings, float64=True)
                    for impl in ("ours", "ours-inplace"):
                        runner = h.make_runner("grpo_loss", impl, case, True, settings)
                        runner.setup()
                        out = runner.fn()
                        errors = h.compare(out, ref)
                        name = f"grpo_loss {impl}, {label}"
                        self.check(name, dtype, "loss", errors["value"], tol["value"])
                        self.check(name, dtype, "dL/dlogits", errors["grad0"], tol["grad"])
                        masked = out.grads[0].detach()[case.mask == 0]
                        self.check(name, dtype, "max abs dL/dlogits on masked tokens",
                                   float(masked.abs().max()) if masked.numel() else 0.0, 0.0)
                        del out, runner

                def grpo_variants():
                    # entropy bonus (the gradient pass's entropy term), dual clip and token-mean vs the spec reference
                    kw = dict(eps_low=0.2, eps_high=0.28, dual_clip_c=3.0, beta=0.04, kl="k3", temperature=0.7,
                              entropy_coef=0.01, aggregation="token-mean")
                    x = case.logits.detach().requires_grad_(True)
                    loss, _ = grpo_loss(x, case.targets, case.old_logp, case.ref_logp, case.adv_tokens, case.mask, **kw)
                    (grad,) = torch.autograd.grad(loss, x)
                    x64 = case.logits.detach().double().requires_grad_(True)
                    ref = grpo_loss_ref(x64, case.targets, case.old_logp.double(), case.ref_logp.double(),
                                        case.adv_tokens.double(), case.mask.double(), **kw)
                    (grad64,) = torch.autograd.grad(ref, x64)
                    name = f"grpo_loss entropy bonus + dual clip + token-mean, {label}"
                    self.check(name, dtype, "loss", h.rel_error(loss, ref), tol["value"])
                    self.check(name, dtype, "dL/dlogits", h.rel_error(grad, grad64), tol["grad"])

                self.guarded(f"token_logprobs, {label}", dtype, logprobs)
                self.guarded(f"grpo_loss, {label}", dtype, grpo)
                if not many:
                    self.guarded(f"grpo_loss variants, {label}", dtype, grpo_variants)
                case = None  # free it before the next case (the closures above are done with it)
                h.free_memory(self.device)

        lin_sizes, chunk = (h.Sizes(2, 20, v, hid), 16) if self.dry else (h.Sizes(2, 300, v, hid), 256)
        for dtype in (torch.bfloat16, torch.float32):
            if self.left() <= 0:
                return

            def linear():
                case = h.make_linear_case(lin_sizes, dtype, self.device, seed=21, full_mask=False)
                s = self.settings
                ref = h.reference_outputs("linear_grpo_loss", case, True, s, float64=True)
                hh = case.hidden.detach().requires_grad_(True)
                ww = case.weight.detach().requires_grad_(True)
                loss, _ = linear_grpo_loss(hh, ww, case.targets, case.old_logp, case.ref_logp, case.adv_tokens,
                                           case.mask, eps_low=s.eps_low, eps_high=s.eps_high, beta=s.beta, kl="k3",
                                           temperature=s.temperature, chunk_size=chunk)
                errors = h.compare(h.Outputs(loss.detach(), torch.autograd.grad(loss, (hh, ww))), ref)
                tol = h.tolerances("linear_grpo_loss", dtype)
                name = f"linear_grpo_loss, N={lin_sizes.n_tokens} in chunks of {chunk}, V={v:,}, H={hid:,}"
                self.check(name, dtype, "loss", errors["value"], tol["value"])
                self.check(name, dtype, "dL/dhidden", errors["grad0"], tol["grad"])
                self.check(name, dtype, "dL/dweight", errors["grad1"], tol["grad"])

            self.guarded("linear_grpo_loss", dtype, linear)

    def _rows(self):
        """Token rows on which dL/dlogits is compared at full size (the [N, V] fp32 reference is ~10 GB)."""
        if self.dry:
            return None
        g = self.torch.Generator(device="cpu").manual_seed(2)
        n = self.sizes.n_tokens
        return self.torch.randperm(n, generator=g)[:1024].sort().values.to(self.device)

    def logits_op(self, op: str, impls=("ours", "ours-inplace", "eager", "liger")):
        h = self.h
        case = h.make_loss_case(self.sizes, self.dtype, self.device, seed=10)
        rows = self._rows()
        for backward in (False, True):
            if self.left() <= 0:
                break
            ref = h.reference_outputs(op, case, backward, self.settings, float64=self.dry, rows=rows)
            for impl in impls:
                if impl == "ours-inplace" and not backward:
                    continue  # in-place changes only the backward
                self.bench(op, impl, backward, case, ref, rows)
            del ref
            h.free_memory(self.device)

    def linear_op(self, impls=("ours", "eager", "liger", "matmul")):
        h = self.h
        case = h.make_linear_case(self.sizes, self.dtype, self.device, seed=11)
        ref = h.reference_outputs("linear_grpo_loss", case, True, self.settings, float64=self.dry)
        for impl in impls:
            self.bench("linear_grpo_loss", impl, True, case, ref, None)

    def variants(self):
        """The loss family fwd+bwd on the same logits (ours, in-place backward). Each variant is a function on
        [N] vectors between the same statistics and gradient passes (GRPO_SPEC.md's split), so the times should
        agree within noise; GSPO's sequence coupling costs nothing extra on logits (only the fused-lm_head
        form needs a second sweep). Correctness of each variant is the kernel tests' job (float64 references)."""
        torch, h = self.torch, self.h
        from kernels import PolicyLossConfig, policy_loss

        case = h.make_loss_case(self.sizes, self.dtype, self.device, seed=12)
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
            if self.left() <= 0:
                rec.update(status="skipped", reason="time budget spent")
                self.records.append(rec)
                continue

            def fn(cfg=cfg):
                x = case.logits.detach().requires_grad_(True)
                loss, _ = policy_loss(x, case.targets, old_logp=case.old_logp, ref_logp=case.ref_logp,
                                      advantages=case.adv_tokens, mask=case.mask, config=cfg,
                                      temperature=self.settings.temperature, inplace_backward=True,
                                      rollout_logp=rollout_logp if cfg.tis_cap else None)
                (grad,) = torch.autograd.grad(loss, x)
                return h.Outputs(loss.detach(), (grad,))

            try:
                runner = h.Runner(fn=fn, setup=lambda: case.logits.copy_(backup))
                t = h.measure(runner, self.device, warmup=2 if not self.dry else 1, min_reps=5 if not self.dry else 2,
                              max_reps=30 if not self.dry else 3)
                rec.update(status="ok", median_ms=t.median_ms, min_ms=t.min_ms, max_ms=t.max_ms, reps=t.reps,
                           clock=t.clock, peak_extra_bytes=h.peak_extra_memory(runner, self.device))
                self._derive(rec, "grpo_loss", True, self.dtype)  # the same bytes as grpo_loss fwd+bwd
            except Exception as exc:
                rec.update(status="error", error=f"{type(exc).__name__}: {exc}",
                           traceback=traceback.format_exc()[-3000:])
            self.records.append(rec)
            self.log(f"   policy_loss {name:18s} " + (f"{rec['median_ms']:9.3f} ms" if rec["status"] == "ok"
                                                      else f"{rec['status']}: {rec.get('error')}"))
            h.free_memory(self.device)

    def tune(self):
        """Sweep (BLOCK_V, num_warps) of the statistics and the gradient pass at the benchmark size, each pass
        timed alone on the same bf16 logits, then rerun grpo_loss fwd+bwd with the best pair of each pass
        (impl `ours-tuned`). The defaults in kernels/logprobs.py stay as committed: the best pairs are printed
        as an R1_KERNEL_LAUNCH value and go into DEFAULT_LAUNCH in a later commit."""
        torch, h = self.torch, self.h
        from kernels import logprobs as lp

        if not lp.HAS_TRITON:
            raise RuntimeError("triton is not importable")
        n, v = self.sizes.n_tokens, self.sizes.vocab
        g = torch.Generator(device=self.device).manual_seed(30)
        logits = torch.randn(n, v, generator=g, device=self.device, dtype=self.dtype).mul_(3.0)
        targets = torch.randint(0, v, (n,), generator=g, device=self.device)
        grad = torch.empty_like(logits)
        _, entropy, lse_parts = lp.combine_stats(lp._stats_triton(logits, targets, 0, 1.0))
        g_vec = torch.randn(n, generator=g, device=self.device)  # every row has a gradient: full work
        passes = {"stats": (lambda: lp._stats_triton(logits, targets, 0, 1.0), 1),
                  "grad": (lambda: lp._grad_triton(logits, grad, targets, lse_parts, entropy, g_vec, None, 0, 1.0), 2)}
        blocks, warps = ((256, 1024), (4,)) if self.dry else ((1024, 2048, 4096, 8192, 16384), (4, 8, 16, 32))
        logits_bytes = n * v * (torch.finfo(self.dtype).bits // 8)
        roof = self.meta.get("copy_roofline_gbps")
        self.tuning = {"defaults": {k: list(x) for k, x in lp.DEFAULT_LAUNCH.items()}, "sweep": [], "best": {}}
        for name, (call, n_passes) in passes.items():
            for block in blocks:
                for w in warps:
                    per_thread = block // (32 * w)
                    if not 1 <= per_thread <= 64:  # idle lanes, or register spills
                        continue
                    if self.left() <= 0:
                        raise RuntimeError("time budget spent during the sweep")
                    previous = lp.set_launch(name, block, w)
                    try:
                        t = h.measure(h.Runner(fn=call), self.device, warmup=1, min_reps=5, max_reps=20,
                                      target_s=0.15)
                    finally:
                        lp.set_launch(name, *previous)
                    gbps = n_passes * logits_bytes / (t.median_ms / 1e3) / 1e9
                    row = {"pass": name, "block_v": block, "num_warps": w, "median_ms": t.median_ms,
                           "gbps": gbps, "pct_roofline": 100 * gbps / roof if roof else None}
                    self.tuning["sweep"].append(row)
                    self.log(f"   {name:5s} BLOCK_V={block:6d} num_warps={w:2d} {t.median_ms:8.3f} ms "
                             f"{gbps:8,.0f} GB/s")
            rows = [r for r in self.tuning["sweep"] if r["pass"] == name]
            best = min(rows, key=lambda r: r["median_ms"])
            default = next((r for r in rows if [r["block_v"], r["num_warps"]] == self.tuning["defaults"][name]),
                           None)
            self.tuning["best"][name] = best | {
                "speedup_vs_default": default["median_ms"] / best["median_ms"] if default else None}
        env = ",".join(f"{k}={b['block_v']}x{b['num_warps']}" for k, b in self.tuning["best"].items())
        self.tuning["env"] = env
        self.log(f"   best: R1_KERNEL_LAUNCH={env}")
        logits = grad = targets = entropy = lse_parts = g_vec = None  # free 10 GB before the rerun
        h.free_memory(self.device)

        saved = {k: lp.set_launch(k, b["block_v"], b["num_warps"]) for k, b in self.tuning["best"].items()}
        try:
            case = h.make_loss_case(self.sizes, self.dtype, self.device, seed=10)
            rows = self._rows()
            ref = h.reference_outputs("grpo_loss", case, True, self.settings, float64=self.dry, rows=rows)
            for impl in ("ours", "ours-inplace"):
                self.bench("grpo_loss", impl, True, case, ref, rows, label=impl.replace("ours", "ours-tuned"))
        finally:
            for k, pair in saved.items():
                lp.set_launch(k, *pair)

    def compiled(self):
        if self.args.no_compile or (self.dry and not self.args.compile_on_cpu):
            self.errors.append({"section": "compiled", "error": "skipped: " + (
                "--no-compile" if self.args.no_compile else "dry run (use --compile-on-cpu)")})
            return
        for op in ("token_logprobs", "grpo_loss"):
            if self.left() < 90:  # a compile can take a minute; leave the rest of the budget to the results
                self.errors.append({"section": "compiled", "error": f"{op}: skipped, under 90 s of budget left"})
                continue
            self.logits_op(op, impls=("compiled",))

    # ------------------------------------------------------------------------------------ one bench

    def bench(self, op, impl, backward, case, ref, rows, label=None):
        h = self.h
        mode = "fwd+bwd" if backward else "fwd"
        rec = {"op": op, "mode": mode, "impl": label or impl, "status": None}
        dtype = case.hidden.dtype if op == "linear_grpo_loss" else case.logits.dtype
        if impl == "liger" and self.args.no_liger:
            rec.update(status="unavailable", reason="--no-liger")
        elif self.left() <= 0:
            rec.update(status="skipped", reason="time budget spent")
        else:
            runner = None
            try:
                runner = h.make_runner(op, impl, case, backward, self.settings,
                                       allow_compile_on_cpu=self.args.compile_on_cpu)
                t_first = time.perf_counter()
                runner.setup()
                out = runner.fn()
                self.sync()
                rec["first_call_s"] = time.perf_counter() - t_first  # includes JIT / torch.compile
                if runner.checkable and ref is not None:
                    errors = h.compare(out, ref, rows)
                    rec["rel_err"] = errors
                    rec["tol"] = h.tolerances(op, dtype)
                    rec["agrees"] = h.check_passed(errors, rec["tol"])
                del out
                timing = h.measure(runner, self.device, warmup=2 if not self.dry else 1,
                                   min_reps=5 if not self.dry else 2, max_reps=30 if not self.dry else 3)
                rec.update(status="ok", median_ms=timing.median_ms, min_ms=timing.min_ms, max_ms=timing.max_ms,
                           reps=timing.reps, clock=timing.clock)
                rec["peak_extra_bytes"] = h.peak_extra_memory(runner, self.device)
                self._derive(rec, op, backward, dtype)
            except h.Unavailable as exc:
                rec.update(status="unavailable", reason=str(exc))
            except Exception as exc:
                rec.update(status="error", error=f"{type(exc).__name__}: {exc}",
                           traceback=traceback.format_exc()[-3000:])
            finally:
                runner = None
                h.free_memory(self.device)
        self.records.append(rec)
        if rec["status"] == "ok":
            extra = (f"{rec['pct_roofline']:5.1f}% of copy roofline" if "pct_roofline" in rec
                     else f"{rec.get('tflops', 0):.0f} TFLOP/s")
            agree = {True: "agrees", False: "DISAGREES", None: ""}[rec.get("agrees")]
            peak = rec["peak_extra_bytes"]
            self.log(f"   {op:16s} {mode:7s} {rec['impl']:17s} {rec['median_ms']:9.3f} ms  {extra}  "
                     f"peak {'-' if peak is None else f'{peak / GiB:.2f} GiB'}  {agree}")
        else:
            self.log(f"   {op:16s} {mode:7s} {rec['impl']:17s} {rec['status']}: "
                     f"{rec.get('reason') or rec.get('error')}")

    def _derive(self, rec, op, backward, dtype):
        seconds = rec["median_ms"] / 1e3
        if op == "linear_grpo_loss":
            rec["flops"] = self.h.linear_flops(self.sizes)
            rec["tflops"] = rec["flops"] / seconds / 1e12
            return
        n_bytes, formula = self.h.counted_bytes(op, backward, self.sizes, dtype)
        rec.update(counted_bytes=n_bytes, bytes_formula=formula, gbps=n_bytes / seconds / 1e9)
        roof = self.meta.get("copy_roofline_gbps")
        if roof:
            rec["pct_roofline"] = 100 * rec["gbps"] / roof
            # how many full passes over the logits the measured time would allow at the copy roofline
            logits_bytes = self.sizes.n_tokens * self.sizes.vocab * (self.torch.finfo(dtype).bits // 8)
            rec["pass_equivalents"] = seconds * roof * 1e9 / logits_bytes

    # ------------------------------------------------------------------------------------ summary

    def _ok(self, op, mode, impl):
        for r in self.records:
            if (r["op"], r["mode"], r["impl"]) == (op, mode, impl) and r["status"] == "ok":
                return r
        return None

    def speedups(self) -> list[dict]:
        out = []
        for op in ("token_logprobs", "grpo_loss"):
            for mode in ("fwd", "fwd+bwd"):
                for ours in ("ours", "ours-inplace", "ours-tuned", "ours-tuned-inplace"):
                    base = self._ok(op, mode, ours)
                    for other in ("eager", "compiled", "liger"):
                        r = self._ok(op, mode, other)
                        if base and r:
                            out.append({"op": op, "mode": mode, "ours": ours, "versus": other,
                                        "speedup": r["median_ms"] / base["median_ms"]})
        return out

    def _missing(self, *keys) -> str:
        notes = []
        for op, mode, impl in keys:
            for r in self.records:
                if (r["op"], r["mode"], r["impl"]) == (op, mode, impl) and r["status"] != "ok":
                    notes.append(f"{impl}: {r['status']} ({r.get('reason') or r.get('error', '')[:120]})")
            if not any((r["op"], r["mode"], r["impl"]) == (op, mode, impl) for r in self.records):
                notes.append(f"{op} {mode} {impl}: not run")
        return "; ".join(notes)

    def targets(self) -> list[dict]:
        rows = []

        def add(target, required, value, met, unit, missing_keys):
            note = ""
            if value is None:
                note = self._missing(*missing_keys) or ("peak memory is measured on CUDA only"
                                                        if unit == "ratio" else "not measured")
            rows.append({"target": target, "required": required, "value": value, "unit": unit,
                         "met": met if value is not None else None, "note": note})

        g = ("grpo_loss", "fwd+bwd")
        for ours in ("ours", "ours-inplace"):
            label = "grpo_loss fwd+bwd" + (" (inplace_backward)" if ours == "ours-inplace" else "")
            r = self._ok(*g, ours)
            pct = r.get("pct_roofline") if r else None
            add(f"{label}: bandwidth, 3 passes counted", ">= 85% of copy roofline", pct,
                pct is not None and pct >= 85, "%", [(*g, ours)])
            for other, need in (("liger", 1.2), ("eager", 10.0)):
                o = self._ok(*g, other)
                val = o["median_ms"] / r["median_ms"] if (r and o) else None
                add(f"{label}: speedup vs {other}", f">= {need:g}x", val, val is not None and val >= need, "x",
                    [(*g, ours), (*g, other)])
        lin = ("linear_grpo_loss", "fwd+bwd")
        ours, eager, mm = self._ok(*lin, "ours"), self._ok(*lin, "eager"), self._ok(*lin, "matmul")
        mem = (ours["peak_extra_bytes"] / eager["peak_extra_bytes"]
               if ours and eager and ours.get("peak_extra_bytes") and eager.get("peak_extra_bytes") else None)
        add("linear_grpo_loss fwd+bwd: peak extra memory vs eager", "<= 1/8 (0.125)", mem,
            mem is not None and mem <= 0.125, "ratio", [(*lin, "ours"), (*lin, "eager")])
        tm = ours["median_ms"] / mm["median_ms"] if ours and mm else None
        add("linear_grpo_loss fwd+bwd: time vs bare lm_head matmul fwd+bwd", "<= 1.15x", tm,
            tm is not None and tm <= 1.15, "x", [(*lin, "ours"), (*lin, "matmul")])
        return rows

    # ------------------------------------------------------------------------------------ output

    def results(self) -> dict:
        return {"meta": self.meta | {"elapsed_s": round(self.elapsed(), 1)}, "targets": self.targets(),
                "tuning": self.tuning,
                "records": self.records, "speedups": self.speedups(), "checks": self.checks, "errors": self.errors}

    def write(self):
        res = self.results()
        (self.out / f"{self.stem}.json").write_text(json.dumps(res, indent=1, default=str))
        (self.out / f"{self.stem}.md").write_text(self.markdown(res))

    def markdown(self, res) -> str:
        m, s = res["meta"], self.sizes
        lines = [f"# GRPO kernels on {m['device']}, {m['date'][:10]}", ""]
        env = [f"torch {m['torch']}" + (f" (CUDA {m['torch_cuda']})" if m.get("torch_cuda") else ""),
               f"triton {m['triton']}", f"liger-kernel {m['liger'] or '–'} ({m['liger_status']})",
               f"Python {m['python']}"]
        if "capability" in m:
            env.insert(0, f"compute capability {m['capability']}, {m['multiprocessors']} SMs, {m['memory_gib']} GiB")
        lines += ["- " + "; ".join(env),
                  f"- sizes: N = {s.n_tokens:,} tokens (B = {s.batch} x L = {s.seq_len:,}), V = {s.vocab:,}, "
                  f"H = {s.hidden:,}, {m['dtype']}; GRPO eps {self.settings.eps_low}/{self.settings.eps_high}, "
                  f"beta {self.settings.beta} (k3), T = {self.settings.temperature}, seq-mean-token-mean, full mask",
                  f"- copy roofline (measured): {_fmt(m.get('copy_roofline_gbps'), ',.0f')} GB/s "
                  f"({m.get('copy_roofline_detail', 'not measured')})",
                  f"- matmul ceiling (measured): {_fmt(m.get('matmul_tflops'), ',.0f')} TFLOP/s "
                  f"({m.get('matmul_detail', 'not measured')})",
                  "- timing: " + ("wall clock (dry run: numbers mean nothing)" if self.dry else
                                  "CUDA events around each call after 2 warm-ups, median of 5-30 calls; inputs "
                                  "that an in-place backward overwrites are restored outside the timed region"),
                  f"- git commit {m.get('git_commit') or 'unknown'}; suite wall time {m['elapsed_s']} s", ""]

        lines += ["## Targets (from the issue)", "", "| target | required | measured | met |", "|---|---|---|---|"]
        for t in res["targets"]:
            if t["value"] is None:
                val = "not measured: " + (t["note"] or "?")
            elif t["unit"] == "%":
                val = f"{t['value']:.1f}%"
            elif t["unit"] == "x":
                val = f"{t['value']:.2f}x"
            else:
                val = f"{t['value']:.3f}"
            met = {True: "yes", False: "**no**", None: "–"}[t["met"]]
            lines.append(f"| {t['target']} | {t['required']} | {val} | {met} |")

        lines += ["", "## Timings", "",
                  "| op | mode | impl | median ms | min–max ms | GB/s (counted) | % roofline | pass-equiv. | "
                  "TFLOP/s | peak extra GiB | rel. err value / grads | agrees | first call s |",
                  "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|---:|"]
        for r in res["records"]:
            if r["status"] != "ok":
                continue
            err = r.get("rel_err") or {}
            errs = " / ".join(f"{v:.1e}" for v in err.values()) if err else "–"
            peak = r.get("peak_extra_bytes")
            agrees = {True: "yes", False: "**NO**", None: "–"}[r.get("agrees")]
            lines.append(
                f"| {r['op']} | {r['mode']} | {r['impl']} | {r['median_ms']:.3f} | "
                f"{r['min_ms']:.2f}–{r['max_ms']:.2f} | {_fmt(r.get('gbps'), ',.0f')} | "
                f"{_fmt(r.get('pct_roofline'), '.1f')} | "
                f"{_fmt(r.get('pass_equivalents'), '.2f')} | {_fmt(r.get('tflops'), ',.0f')} | "
                f"{_fmt(None if peak is None else peak / GiB, '.2f')} | {errs} | {agrees} | "
                f"{_fmt(r.get('first_call_s'), '.1f')} |")
        others = [r for r in res["records"] if r["status"] != "ok"]
        if others:
            lines += ["", "Not measured:", ""]
            lines += [f"- {r['op']} {r['mode']} {r['impl']}: {r['status']}: {r.get('reason') or r.get('error')}"
                      for r in others]

        if res["speedups"]:
            lines += ["", "## Speedups (time of the other / time of ours)", "",
                      "| op | mode | ours | versus | speedup |", "|---|---|---|---|---:|"]
            lines += [f"| {x['op']} | {x['mode']} | {x['ours']} | {x['versus']} | {x['speedup']:.2f}x |"
                      for x in res["speedups"]]

        tuning = res.get("tuning")
        if tuning and tuning.get("best"):
            lines += ["", "## Launch configuration sweep (section `tune`)", "",
                      f"Committed defaults (kernels/logprobs.py DEFAULT_LAUNCH): {tuning['defaults']}. Best here: "
                      f"`R1_KERNEL_LAUNCH={tuning['env']}`; grpo_loss rerun with it as `ours-tuned` above.", "",
                      "| pass | BLOCK_V | num_warps | median ms | GB/s | % roofline |", "|---|---:|---:|---:|---:|---:|"]
            for r in sorted(tuning["sweep"], key=lambda r: (r["pass"], r["median_ms"])):
                best = tuning["best"][r["pass"]]
                star = " (best)" if (r["block_v"], r["num_warps"]) == (best["block_v"], best["num_warps"]) else ""
                lines.append(f"| {r['pass']}{star} | {r['block_v']} | {r['num_warps']} | {r['median_ms']:.3f} | "
                             f"{r['gbps']:,.0f} | {_fmt(r['pct_roofline'], '.1f')} |")
            lines += ["", "Stats pass: one read of the logits; grad pass: one read + one write (bytes counted so)."]

        lines += ["", "## Correctness on this device (float64 references)", "",
                  "| check | dtype | quantity | rel. error | tolerance | pass |", "|---|---|---|---:|---:|---|"]
        for c in res["checks"]:
            err = c.get("error")
            lines.append(f"| {c['check']} | {c['dtype']} | {c['quantity']} | "
                         f"{err if err else format(c['rel_err'], '.2e')} | "
                         f"{'–' if c['tol'] is None else format(c['tol'], '.0e')} | "
                         f"{'yes' if c['passed'] else '**NO**'} |")

        lines += ["", "## Byte counts and derived numbers", "",
                  "- token_logprobs fwd: N*V*b (read the logits once) + N*12 (targets int64, logp fp32).",
                  "- grpo_loss fwd: N*V*b + N*24 (targets, old_logp, ref_logp, advantages, mask).",
                  "- fwd+bwd: 3*N*V*b (forward read; backward read + write of dL/dlogits) + the per-token vectors "
                  "of both passes (N*32 token_logprobs, N*44 grpo_loss). b = 2 for bf16.",
                  "- % roofline = (counted bytes / median time) / measured copy bandwidth. At 100% under the "
                  "3-pass count a kernel does exactly three passes over the logits; a single fused pass that "
                  "writes the gradient in forward would need 2*N*V*b.",
                  "- pass-equivalents = median time x copy bandwidth / (N*V*b): full passes over the logits the "
                  "measured time would allow at the roofline (1.0 for a forward, 3.0 for forward + backward at 100% "
                  "of the roofline under the count).",
                  "- peak extra = torch.cuda.max_memory_allocated during one call minus the allocation before it "
                  "(inputs excluded, outputs and gradients included).",
                  "- linear TFLOP/s counts 6*N*V*H (lm_head forward + the two backward GEMMs).",
                  "- agreement: ||out - ref|| / ||ref|| against the eager fp32 path (float64 in the dry run), "
                  "dL/dlogits on 1,024 sampled token rows at full size.",
                  "- first call s: the first call's wall time, JIT compilation (Triton, torch.compile) included."]
        if res["errors"]:
            lines += ["", "## Section errors and skips", ""]
            lines += [f"- {e['section']}: {e['error']}" for e in res["errors"]]
        return "\n".join(lines) + "\n"

    def run(self) -> int:
        self.log(f"device {self.meta['device']}; sizes {vars(self.sizes)}; out {self.out}")
        self.section("roofline", self.roofline)
        self.section("correctness", self.correctness)
        self.section("token_logprobs", lambda: self.logits_op("token_logprobs"))
        self.section("grpo_loss", lambda: self.logits_op("grpo_loss"))
        self.section("linear_grpo_loss", self.linear_op)
        self.section("variants", self.variants)
        self.section("tune", self.tune)
        self.section("compiled", self.compiled)
        self.write()
        res = self.results()
        self.log(f"results: {self.out / (self.stem + '.json')} and .md")
        print("\n".join(self.markdown(res).splitlines()[:40]))  # the targets table ends up in the reply's tail
        failed = [c for c in self.checks if not c["passed"]]
        disagree = [r for r in self.records if r.get("agrees") is False]
        errored = [r for r in self.records if r["status"] == "error"] + [
            e for e in self.errors if not e["error"].startswith("skipped")]
        self.log(f"{len(failed)} failed checks, {len(disagree)} disagreeing benchmarks, {len(errored)} errors")
        return 1 if failed or disagree or errored else 0


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_suite: no CUDA device; run with --dry-run for the CPU code-path check", file=sys.stderr)
        return 2
    if args.dry_run:
        # the kernels run in Triton's interpreter; must be set before triton is imported
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from benchmarks import harness

    return Suite(args, torch, harness).run()


if __name__ == "__main__":
    sys.exit(main())
