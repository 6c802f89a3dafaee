"""The GPU suite's state and bookkeeping: environment, time budget, one record per sub-benchmark, one row per
correctness check, results rewritten after every section. The sections themselves are in sections.py,
correctness.py and tune.py; gpu_suite.py runs them in order."""
from __future__ import annotations

import datetime
import os
import platform
import re
import subprocess
import tempfile
import time
import traceback
from pathlib import Path

import torch

from benchmarks import checks, report, runners
from benchmarks.baselines import Unavailable, liger_status
from benchmarks.cases import GPU_SIZES, LossSettings, Sizes, input_dtype
from benchmarks.roofline import GiB, derive
from benchmarks.timing import free_memory, measure, peak_extra_memory, sync

REPO = Path(__file__).resolve().parents[1]


def error_fields(exc) -> dict:
    return {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}


class Suite:
    def __init__(self, args):
        self.args = args
        self.dry = args.dry_run
        self.device = torch.device("cpu" if self.dry else "cuda")
        self.t0 = time.perf_counter()
        self.dtype = torch.bfloat16
        if args.sizes:
            try:
                self.sizes = Sizes(*(int(x) for x in args.sizes.split(",")))
            except (TypeError, ValueError) as exc:
                raise ValueError(f"--sizes must be B,L,V,H integers, got {args.sizes!r}") from exc
        else:
            self.sizes = Sizes(2, 8, 1000, 64) if self.dry else GPU_SIZES
        self.settings = LossSettings()
        # warm-ups and repetitions of every timed sub-benchmark (a dry run only exercises the code paths)
        self.reps = dict(warmup=1, min_reps=2, max_reps=3) if self.dry else dict(warmup=2, min_reps=5, max_reps=30)
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
        liger = liger_status()
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
            self.errors.append({"section": name} | error_fields(exc))
            self.log(f"   section {name} failed: {type(exc).__name__}: {exc}")
        finally:
            free_memory(self.device)
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
                                "rel_err": None, "tol": None, "passed": False} | error_fields(exc))
            self.log(f"   FAIL {name} [{dtype}]: {type(exc).__name__}: {exc}")
        finally:
            free_memory(self.device)

    def rows(self):
        """Token rows on which dL/dlogits is compared at full size; all of them in the dry run."""
        return None if self.dry else checks.sample_rows(self.sizes.n_tokens, self.device)

    # ---------------------------------------------------------------------------------- one benchmark

    def time_runner(self, rec: dict, runner, op: str, backward: bool, dtype):
        """Time `runner` into `rec`: median and spread, peak extra memory, and the derived rates."""
        t = measure(runner, self.device, **self.reps)
        rec.update(status="ok", median_ms=t.median_ms, min_ms=t.min_ms, max_ms=t.max_ms, reps=t.reps, clock=t.clock)
        rec["peak_extra_bytes"] = peak_extra_memory(runner, self.device)
        derive(rec, op, backward, self.sizes, dtype, self.meta.get("copy_roofline_gbps"))

    def bench(self, op, impl, backward, case, ref, rows, label=None):
        """One sub-benchmark: the first call (JIT included) checked against `ref`, then timed; any failure is
        recorded in its record and the suite goes on."""
        mode = "fwd+bwd" if backward else "fwd"
        rec = {"op": op, "mode": mode, "impl": label or impl, "status": None}
        dtype = input_dtype(case)
        if impl == "liger" and self.args.no_liger:
            rec.update(status="unavailable", reason="--no-liger")
        elif self.left() <= 0:
            rec.update(status="skipped", reason="time budget spent")
        else:
            runner = None
            try:
                # through the module, so a test can plant a failing implementation
                runner = runners.make_runner(op, impl, case, backward, self.settings,
                                             allow_compile_on_cpu=self.args.compile_on_cpu)
                t_first = time.perf_counter()
                runner.setup()
                out = runner.fn()
                sync(self.device)
                rec["first_call_s"] = time.perf_counter() - t_first  # includes JIT / torch.compile
                if runner.checkable and ref is not None:
                    errors = checks.compare(out, ref, rows)
                    rec["rel_err"] = errors
                    rec["tol"] = checks.tolerances(op, dtype)
                    rec["agrees"] = checks.check_passed(errors, rec["tol"])
                del out
                self.time_runner(rec, runner, op, backward, dtype)
            except Unavailable as exc:
                rec.update(status="unavailable", reason=str(exc))
            except Exception as exc:
                rec.update(status="error", **error_fields(exc))
            finally:
                runner = None
                free_memory(self.device)
        self.records.append(rec)
        self._log_record(rec)

    def _log_record(self, rec):
        op, mode = rec["op"], rec["mode"]
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

    # ------------------------------------------------------------------------------------ output

    def results(self) -> dict:
        return {"meta": self.meta | {"elapsed_s": round(self.elapsed(), 1)}, "targets": report.targets(self.records),
                "tuning": self.tuning, "records": self.records, "speedups": report.speedups(self.records),
                "checks": self.checks, "errors": self.errors}

    def write(self):
        report.write(self.out, self.stem, self.results(), self.sizes, self.settings, self.dry)

    def finish(self) -> int:
        """Write the results, print the head of the markdown (the targets table) and return the exit code:
        1 when any check failed, any result disagrees or anything errored."""
        self.write()
        res = self.results()
        self.log(f"results: {self.out / (self.stem + '.json')} and .md")
        # the targets table ends up in the reply's tail
        print("\n".join(report.markdown(res, self.sizes, self.settings, self.dry).splitlines()[:40]))
        failed = [c for c in self.checks if not c["passed"]]
        disagree = [r for r in self.records if r.get("agrees") is False]
        errored = [r for r in self.records if r["status"] == "error"] + [
            e for e in self.errors if not e["error"].startswith("skipped")]
        self.log(f"{len(failed)} failed checks, {len(disagree)} disagreeing benchmarks, {len(errored)} errors")
        return 1 if failed or disagree or errored else 0
