#!/usr/bin/env bash
# Every GPU check and benchmark in ONE device-tool call (~480 s in all, kernel targets first):
#
#   run(command="bash benchmarks/run_gpu.sh", carry=["benchmarks/wheels"], timeout_s=600)
#
# 1. installs the wheels carried in benchmarks/wheels/ (no network there; fetch them on a machine with the registry:
#    `bash benchmarks/fetch_wheels.sh`), then this repo (editable, no deps; without a build backend its folders are
#    linked as the r1_engine namespace);
# 2. runs benchmarks/gpu_check.py: the parts kernels (gpu_suite), kernel-tests (tests/kernels on CUDA) and step
#    (gpu_step, needs megatron-core), each with its own budget, results rewritten after every part to
#    $OUT/summary.md/.json (+ each part's own files and log). Exit code: non-zero when a part failed.
# Stages: `all` (default), `kernels`, `kernel-tests`, `step` (one part), `setup` (the install alone, then the
# versions the parts see; the dry run of tests/benchmarks_smoke/test_run_gpu_setup.py uses it). R1_WHEELS and
# R1_SITE point it at a test's folders; R1_GPU_CHECK_ARGS adds arguments (the CPU dry run passes --dry-run).
set -u
OUT="${OUT:-/tmp/r1_gpu_out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
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
  # fallback without a build backend: the folders linked as the r1_engine namespace (what package-dir maps)
  $PY -m pip install -q --no-deps --no-build-isolation -e . \
    || { echo "editable install failed; linking the folders as r1_engine.* under $SITE";
         mkdir -p "$SITE/r1_engine";
         for d in engine kernels parallel recipes native; do ln -sfn "$PWD/$d" "$SITE/r1_engine/$d"; done; }
} 2>&1 | tee "$OUT/setup.log"

# The group above runs in a pipeline subshell: its exports die with it, so the fallback dir is exported here,
# and the versions are printed here, as every later stage sees them.
if [ -d "$SITE" ]; then
  export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$SITE"
  echo "carried wheels from $SITE on PYTHONPATH" | tee -a "$OUT/setup.log"
fi
# one name per carried wheel (the file name's first field), then the ones the stages use
NAMES="$(for w in "$WHEELS"/*.whl; do [ -f "$w" ] && basename "$w" | cut -d- -f1; done) liger-kernel megatron-core"
$PY -c 'import importlib.metadata as m, sys
for name in dict.fromkeys(sys.argv[1:]):
    try: print(name, m.version(name))
    except m.PackageNotFoundError: print(name, "not installed")' $NAMES 2>&1 | tee -a "$OUT/setup.log"

STAGE="${1:-all}"
case "$STAGE" in
  setup) exit 0 ;;
  all) PARTS="" ;;
  kernels|kernel-tests|step) PARTS="--parts $STAGE" ;;
  *) echo "unknown stage '$STAGE': use 'all' (default), 'kernels', 'kernel-tests', 'step' or 'setup'" >&2; exit 2 ;;
esac

echo "== gpu_check"
# shellcheck disable=SC2086 - PARTS and R1_GPU_CHECK_ARGS are word lists
$PY -m benchmarks.gpu_check --out "$OUT" $PARTS ${R1_GPU_CHECK_ARGS:-} 2>&1 | tee "$OUT/gpu_check.log"
code=${PIPESTATUS[0]}
cat "$OUT/summary.md" 2>/dev/null
for md in "$OUT"/*.md; do
  [ -f "$md" ] && sed -n '/^## Targets/,/^## Timings/p' "$md"
done
exit "$code"
