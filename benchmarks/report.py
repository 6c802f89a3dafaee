"""The suite's scoring (speedups, the issue's targets) and its results files (<stem>.json and <stem>.md)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from benchmarks.cases import Sizes
from benchmarks.roofline import GiB, counted_bytes

_ONE_TOKEN = Sizes(batch=1, seq_len=1, vocab=1, hidden=1)

# ------------------------------------------------------------------------------------------------ scoring


def _ok(records, op, mode, impl):
    for r in records:
        if (r["op"], r["mode"], r["impl"]) == (op, mode, impl) and r["status"] == "ok":
            return r
    return None


def speedups(records) -> list[dict]:
    out = []
    for op in ("token_logprobs", "grpo_loss"):
        for mode in ("fwd", "fwd+bwd"):
            for ours in ("ours", "ours-inplace", "ours-tuned", "ours-tuned-inplace"):
                base = _ok(records, op, mode, ours)
                for other in ("eager", "compiled", "liger"):
                    r = _ok(records, op, mode, other)
                    if base and r:
                        out.append({"op": op, "mode": mode, "ours": ours, "versus": other,
                                    "speedup": r["median_ms"] / base["median_ms"]})
    return out


def _missing(records, *keys) -> str:
    notes = []
    for op, mode, impl in keys:
        for r in records:
            if (r["op"], r["mode"], r["impl"]) == (op, mode, impl) and r["status"] != "ok":
                notes.append(f"{impl}: {r['status']} ({r.get('reason') or r.get('error', '')[:120]})")
        if not any((r["op"], r["mode"], r["impl"]) == (op, mode, impl) for r in records):
            notes.append(f"{op} {mode} {impl}: not run")
    return "; ".join(notes)


def targets(records) -> list[dict]:
    """The issue's targets: grpo_loss fwd+bwd >= 85% of the copy roofline, >= 1.2x Liger, >= 10x eager;
    linear_grpo_loss <= 1/8 of eager's peak extra memory and <= 1.15x the bare matmul's time."""
    rows = []

    def add(target, required, value, met, unit, missing_keys):
        note = ""
        if value is None:
            note = _missing(records, *missing_keys) or ("peak memory is measured on CUDA only"
                                                        if unit == "ratio" else "not measured")
        rows.append({"target": target, "required": required, "value": value, "unit": unit,
                     "met": met if value is not None else None, "note": note})

    g = ("grpo_loss", "fwd+bwd")
    for ours in ("ours", "ours-inplace"):
        label = "grpo_loss fwd+bwd" + (" (inplace_backward)" if ours == "ours-inplace" else "")
        r = _ok(records, *g, ours)
        pct = r.get("pct_roofline") if r else None
        add(f"{label}: bandwidth, 3 passes counted", ">= 85% of copy roofline", pct,
            pct is not None and pct >= 85, "%", [(*g, ours)])
        for other, need in (("liger", 1.2), ("eager", 10.0)):
            o = _ok(records, *g, other)
            val = o["median_ms"] / r["median_ms"] if (r and o) else None
            add(f"{label}: speedup vs {other}", f">= {need:g}x", val, val is not None and val >= need, "x",
                [(*g, ours), (*g, other)])
    lin = ("linear_grpo_loss", "fwd+bwd")
    ours, eager, mm = (_ok(records, *lin, impl) for impl in ("ours", "eager", "matmul"))
    mem = (ours["peak_extra_bytes"] / eager["peak_extra_bytes"]
           if ours and eager and ours.get("peak_extra_bytes") and eager.get("peak_extra_bytes") else None)
    add("linear_grpo_loss fwd+bwd: peak extra memory vs eager", "<= 1/8 (0.125)", mem,
        mem is not None and mem <= 0.125, "ratio", [(*lin, "ours"), (*lin, "eager")])
    tm = ours["median_ms"] / mm["median_ms"] if ours and mm else None
    add("linear_grpo_loss fwd+bwd: time vs bare lm_head matmul fwd+bwd", "<= 1.15x", tm,
        tm is not None and tm <= 1.15, "x", [(*lin, "ours"), (*lin, "matmul")])
    return rows


# ------------------------------------------------------------------------------------------------ writing


def write(out: Path, stem: str, res: dict, sizes, settings, dry: bool):
    (out / f"{stem}.json").write_text(json.dumps(res, indent=1, default=str))
    (out / f"{stem}.md").write_text(markdown(res, sizes, settings, dry))


def _fmt(x, spec=",.1f", none="–"):
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return none if x is None else str(x)
    return format(x, spec)


def _header(m, s, settings, dry) -> list[str]:
    lines = [f"# GRPO kernels on {m['device']}, {m['date'][:10]}", ""]
    env = [f"torch {m['torch']}" + (f" (CUDA {m['torch_cuda']})" if m.get("torch_cuda") else ""),
           f"triton {m['triton']}", f"liger-kernel {m['liger'] or '–'} ({m['liger_status']})",
           f"Python {m['python']}"]
    if "capability" in m:
        env.insert(0, f"compute capability {m['capability']}, {m['multiprocessors']} SMs, {m['memory_gib']} GiB")
    return lines + [
        "- " + "; ".join(env),
        f"- sizes: N = {s.n_tokens:,} tokens (B = {s.batch} x L = {s.seq_len:,}), V = {s.vocab:,}, "
        f"H = {s.hidden:,}, {m['dtype']}; GRPO eps {settings.eps_low}/{settings.eps_high}, "
        f"beta {settings.beta} (k3), T = {settings.temperature}, seq-mean-token-mean, full mask",
        f"- copy roofline (measured): {_fmt(m.get('copy_roofline_gbps'), ',.0f')} GB/s "
        f"({m.get('copy_roofline_detail', 'not measured')})",
        f"- matmul ceiling (measured): {_fmt(m.get('matmul_tflops'), ',.0f')} TFLOP/s "
        f"({m.get('matmul_detail', 'not measured')})",
        "- timing: " + ("wall clock (dry run: numbers mean nothing)" if dry else
                        "CUDA events around each call after 2 warm-ups, median of 5-30 calls; inputs "
                        "that an in-place backward overwrites are restored outside the timed region"),
        f"- git commit {m.get('git_commit') or 'unknown'}; suite wall time {m['elapsed_s']} s", ""]


def _targets_table(res) -> list[str]:
    lines = ["## Targets (from the issue)", "", "| target | required | measured | met |", "|---|---|---|---|"]
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
    return lines


def _timings_table(res) -> list[str]:
    lines = ["", "## Timings", "",
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
    return lines


def _tuning_table(tuning) -> list[str]:
    if not (tuning and tuning.get("best")):
        return []
    lines = ["", "## Launch configuration sweep (section `tune`)", "",
             f"Committed defaults (kernels/logprobs.py DEFAULT_LAUNCH): {tuning['defaults']}. Best here: "
             f"`R1_KERNEL_LAUNCH={tuning['env']}`; grpo_loss rerun with it as `ours-tuned` above.", "",
             "| pass | BLOCK_V | num_warps | median ms | GB/s | % roofline |", "|---|---:|---:|---:|---:|---:|"]
    for r in sorted(tuning["sweep"], key=lambda r: (r["pass"], r["median_ms"])):
        best = tuning["best"][r["pass"]]
        star = " (best)" if (r["block_v"], r["num_warps"]) == (best["block_v"], best["num_warps"]) else ""
        lines.append(f"| {r['pass']}{star} | {r['block_v']} | {r['num_warps']} | {r['median_ms']:.3f} | "
                     f"{r['gbps']:,.0f} | {_fmt(r['pct_roofline'], '.1f')} |")
    return lines + ["", "Stats pass: one read of the logits; grad pass: one read + one write (bytes counted so)."]


def _checks_table(res) -> list[str]:
    lines = ["", "## Correctness on this device (float64 references)", "",
             "| check | dtype | quantity | rel. error | tolerance | pass |", "|---|---|---|---:|---:|---|"]
    for c in res["checks"]:
        err = c.get("error")
        lines.append(f"| {c['check']} | {c['dtype']} | {c['quantity']} | "
                     f"{err if err else format(c['rel_err'], '.2e')} | "
                     f"{'–' if c['tol'] is None else format(c['tol'], '.0e')} | "
                     f"{'yes' if c['passed'] else '**NO**'} |")
    return lines


def _notes() -> list[str]:
    # the per-token byte counts come from roofline.counted_bytes, so this text cannot drift from the numbers
    def per_token(op):
        return counted_bytes(op, True, _ONE_TOKEN, torch.bfloat16)[1].split(" + ")[1]

    return ["", "## Byte counts and derived numbers", "",
            "- token_logprobs fwd: N*V*b (read the logits once) + N*12 (targets int64, logp fp32).",
            "- grpo_loss fwd: N*V*b + N*24 (targets, old_logp, ref_logp, advantages, mask).",
            "- fwd+bwd: 3*N*V*b (forward read; backward read + write of dL/dlogits) + the per-token vectors "
            f"of both passes ({per_token('token_logprobs')} token_logprobs, {per_token('grpo_loss')} grpo_loss). "
            "b = 2 for bf16.",
            "- % roofline = (counted bytes / median time) / measured copy bandwidth. At 100% under the "
            "3-pass count a kernel does exactly three passes over the logits; a single fused pass that "
            "writes the gradient in forward would need 2*N*V*b.",
            "- pass-equivalents = median time x copy bandwidth / (N*V*b): full passes over the logits the "
            "measured time would allow at the roofline (1.0 for a forward, 3.0 for forward + backward at 100% "
            "of the roofline under the count).",
            "- peak extra = torch.cuda.max_memory_allocated during one call minus the allocation before it "
            "(inputs excluded, outputs and gradients included).",
            "- linear TFLOP/s counts 6*N*V*H (lm_head forward + the two backward GEMMs).",
            "- agreement: ||out - ref|| / ||ref|| against the eager fp32 path (float64 kernels/reference.py "
            "in the dry run), dL/dlogits on 1,024 sampled token rows at full size.",
            "- first call s: the first call's wall time, JIT compilation (Triton, torch.compile) included."]


def markdown(res: dict, sizes, settings, dry: bool) -> str:
    lines = _header(res["meta"], sizes, settings, dry)
    lines += _targets_table(res) + _timings_table(res) + _tuning_table(res.get("tuning"))
    lines += _checks_table(res) + _notes()
    if res["errors"]:
        lines += ["", "## Section errors and skips", ""]
        lines += [f"- {e['section']}: {e['error']}" for e in res["errors"]]
    return "\n".join(lines) + "\n"
