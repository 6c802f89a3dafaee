#!/usr/bin/env bash
# Every GPU check and benchmark, one script, one device-tool call per stage (each fits the 600 s limit):
#
#   run(command="bash benchmarks/run_gpu.sh", carry=["benchmarks/wheels"], timeout_s=600)          # kernels
#   run(command="bash benchmarks/run_gpu.sh step", carry=["benchmarks/wheels"], timeout_s=600)     # Megatron
#
# Stage `kernels` (the default; issue 2):
# 1. installs the wheels carried in benchmarks/wheels/ (no network there), then this repo (no deps);
# 2. runs benchmarks/gpu_suite.py (roofline, correctness, benchmarks, launch-config sweep, targets)
#    -> $OUT/<device>-<date>.json/.md;
# 3. runs the kernel tests (slow ones too, multiproc ones not) with CUDA as the default device, so the Triton
#    kernels run on the GPU.
# Time: install ~15 s + suite <= ~400 s (budget 330 s, hard limit 400 s) + tests <= 150 s: inside the 600 s call.
# Stage `step` (issue 3): the same install, then benchmarks/gpu_step.py (bf16 vs fp32 parity through
# parallel.step, and the 0.5B-shaped Qwen2 step time with and without the fused lm_head) -> $OUT/gpu-step-*.
# Stage `setup`: the install alone, then the versions the later stages see (the dry run of
# tests/benchmarks_smoke/test_run_gpu_setup.py; R1_WHEELS and R1_SITE point it at a test's folders).
set -u
OUT="${OUT:-/tmp/r1_gpu_out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
WHEELS="${R1_WHEELS:-benchmarks/wheels}"
# fallback install dir when the image's site-packages is read-only; emptied first so a stale one is never used
SITE="${R1_SITE:-/tmp/site}"
rm -rf "$SITE"

{
  echo "== machine"
  nvidia-smi -L 2>&1 || true
  $PY -c 'import sys, torch, triton; print("python", sys.version.split()[0], "torch", torch.__version__, "triton", triton.__version__, "cuda", torch.cuda.is_available())'

  echo "== carried wheels"
  if compgen -G "$WHEELS/*.whl" >/dev/null; then
    ls "$WHEELS"
    # no network there: --no-index; --no-deps since the image already has torch/triton/numpy
    $PY -m pip install -q --no-index --no-deps --no-cache-dir "$WHEELS"/*.whl \
      || { echo "pip install into the image failed; trying --target $SITE";
           $PY -m pip install -q --no-index --no-deps --no-cache-dir --target "$SITE" "$WHEELS"/*.whl \
             || rm -rf "$SITE"; }
  else
    echo "none ($WHEELS/*.whl): Liger-Kernel is compared only if the image has it"
  fi

  echo "== this repo"
  # --no-build-isolation: the build backend (setuptools) must come from the image, not the network
  $PY -m pip install -q --no-deps --no-build-isolation -e . \
    || echo "editable install failed; continuing with PYTHONPATH=$PWD"
} 2>&1 | tee "$OUT/setup.log"

# The group above runs in a pipeline subshell: its exports die with it, so the fallback dir is exported here,
# and the versions are printed here, as every later stage sees them.
if [ -d "$SITE" ]; then
  export PYTHONPATH="$PYTHONPATH:$SITE"
  echo "carried wheels from $SITE on PYTHONPATH" | tee -a "$OUT/setup.log"
fi
# one name per carried wheel (the file name's first field), then the ones the stages use
NAMES="$(for w in "$WHEELS"/*.whl; do [ -f "$w" ] && basename "$w" | cut -d- -f1; done) liger-kernel megatron-core"
$PY -c 'import importlib.metadata as m, sys
for name in dict.fromkeys(sys.argv[1:]):
    try: print(name, m.version(name))
    except m.PackageNotFoundError: print(name, "not installed")' $NAMES 2>&1 | tee -a "$OUT/setup.log"

STAGE="${1:-kernels}"
if [ "$STAGE" = "setup" ]; then
  exit 0
elif [ "$STAGE" = "step" ]; then
  echo "== gpu_step"
  timeout 540 $PY -m benchmarks.gpu_step --out "$OUT" 2>&1 | tee "$OUT/step.log"
  echo "gpu_step exit code: ${PIPESTATUS[0]}"
  ls -la "$OUT"
  exit 0
elif [ "$STAGE" != "kernels" ]; then
  echo "unknown stage '$STAGE': use 'kernels' (default), 'step' or 'setup'" >&2
  exit 2
fi

echo "== gpu_suite"
timeout 400 $PY -m benchmarks.gpu_suite --out "$OUT" --budget-s 330 2>&1 | tee "$OUT/suite.log"
echo "gpu_suite exit code: ${PIPESTATUS[0]}"

echo "== kernel tests on CUDA"
# slow tests included; the multiproc (gloo, CPU) vocab-parallel tests are left to CI: with CUDA as the default
# device their inputs would be CUDA tensors handed to gloo workers
timeout 150 $PY -m pytest tests/kernels -q -m "(not slow or slow) and not multiproc" -p no:cacheprovider \
  -p benchmarks.cuda_default_device --timeout=120 -rfE 2>&1 | tee "$OUT/pytest-kernels.log" | tail -40
echo "pytest exit code: ${PIPESTATUS[0]}"

echo "== targets"
for md in "$OUT"/*.md; do
  [ -f "$md" ] && sed -n '/^## Targets/,/^## Timings/p' "$md"
done
ls -la "$OUT"
