#!/usr/bin/env bash
# The one script to run on the GPU machine (H200; Python 3.12, torch 2.11+cu130, nvcc 13.0, no
# network), from the repository root:
#   1. build dsa_ext._C from source for sm_90 only, in place (build/ is reused when it is kept)
#   2. run every CUDA test (pytest -m cuda tests)
#   3. run the CUDA benchmarks (python/bench_cuda_attention.py, one shape per run; the indexer;
#      the decoding shapes, python/bench_cuda_decode.py)
#   4. compute-sanitizer memcheck over one small case per kernel (empty slots, out-of-range input)
#   5. print a short summary table, last.
# Every stage runs under `timeout`; the tests get the time the build leaves, within one deadline
# that keeps the whole script under 8 minutes. Logs, junit XML and benchmark JSON go to $OUT (or
# ./device_check_out when OUT is not set).
set -u
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-$PWD/device_check_out}"
mkdir -p "$OUT_DIR"
# the GPU machine has python3 and no `python`; PYTHON=... overrides
PY="${PYTHON:-$(command -v python3 || command -v python)}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# torch guesses CUDA_HOME from the nvcc on PATH, which can be a symlink outside the toolkit
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
DEADLINE=450  # seconds after start by which every stage has ended (+5 s kill grace per stage)
BENCH_LIMIT=50
DECODE_LIMIT=30
SANITIZER_LIMIT=60
declare -A STATUS SECONDS_USED

stage() {  # stage NAME LIMIT_SECONDS COMMAND...: runs COMMAND under `timeout`, logs to $OUT_DIR/NAME.log
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  echo "== $name (limit ${limit}s): $*"
  timeout --kill-after=5 "$limit" "$@" >"$OUT_DIR/$name.log" 2>&1
  local rc=$?
  SECONDS_USED[$name]=$((SECONDS - start))
  case $rc in
    0) STATUS[$name]=ok ;;
    124 | 137) STATUS[$name]="TIMEOUT after ${limit}s" ;;
    *) STATUS[$name]="FAILED (exit $rc)" ;;
  esac
  echo "   ${STATUS[$name]} in ${SECONDS_USED[$name]}s; last lines of $OUT_DIR/$name.log:"
  tail -n 5 "$OUT_DIR/$name.log" | sed 's/^/   | /'
  return $rc
}

{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  "$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)'
  nvcc --version | tail -n 1
} >"$OUT_DIR/env.log" 2>&1
cat "$OUT_DIR/env.log"

if stage build 190 env TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 DSA_EXT_CUDA=1 "$PY" setup.py build_ext --inplace; then
  stage tests $((DEADLINE - SECONDS - 3 * BENCH_LIMIT - 30 - DECODE_LIMIT - SANITIZER_LIMIT)) "$PY" -m pytest -q -m cuda tests -p no:cacheprovider --durations=8 \
    --junitxml="$OUT_DIR/tests.xml"
  stage bench_mla $BENCH_LIMIT "$PY" python/bench_cuda_attention.py --shapes mla --json "$OUT_DIR/bench_mla.json"
  stage bench_gqa $BENCH_LIMIT "$PY" python/bench_cuda_attention.py --shapes gqa --json "$OUT_DIR/bench_gqa.json"
  # the same shape with one-warp blocks (the default splits small groups' columns over 4 warps)
  stage bench_gqa1w 30 env DSA_EXT_CUDA_MIN_WARPS=1 "$PY" python/bench_cuda_attention.py --shapes gqa \
    --indices local --no-dense --tag /1warp --json "$OUT_DIR/bench_gqa_1warp.json"
  # its JSON is not named bench_*.json: the summary below parses those as attention rows
  stage bench_indexer $BENCH_LIMIT "$PY" python/bench_cuda_indexer.py --max-t 4096 --max-seconds 35 \
    --per-op-seconds 0.3 --json "$OUT_DIR/indexer_bench.json"
  # T = 1: indexer top-k at 32K/128K and sparse attention MLA/GQA, B = 1 and 64 (not bench_*.json either)
  stage bench_decode $DECODE_LIMIT "$PY" python/bench_cuda_decode.py --reps 10 --json "$OUT_DIR/decode_bench.json"
  # memcheck over one small case per kernel family: -1 slots, empty rows, out-of-range indices and
  # ranges with the checks off (the kernels must treat them as empty, never read them)
  stage sanitizer $SANITIZER_LIMIT compute-sanitizer --tool memcheck --error-exitcode 1 --print-limit 20 \
    "$PY" -m pytest -q -x -m cuda -p no:cacheprovider \
    "tests/test_sparse_attention_cuda.py::test_out_of_range_indices_are_empty_slots_unless_checked" \
    "tests/test_sparse_attention_cuda.py::test_all_rows_empty_and_empty_shapes" \
    "tests/test_sparse_attention_cuda.py::test_long_rows_with_empty_tiles" \
    "tests/test_indexer_cuda.py::test_ranges_are_clamped_unless_checked" \
    "tests/test_indexer_cuda.py::test_empty_shapes" \
    "tests/test_indexer_cuda.py::test_topk_causal_rows_are_dense" \
    "tests/test_indexer_kl_loss_cuda.py::test_matches_cpu_operator"
fi

echo
echo "================================ device check summary ================================"
for name in build tests bench_mla bench_gqa bench_gqa1w bench_indexer bench_decode sanitizer; do
  printf '%-10s %-24s %5ss\n' "$name" "${STATUS[$name]:-not run}" "${SECONDS_USED[$name]:--}"
done
"$PY" - "$OUT_DIR" <<'EOF'
import glob, json, os, sys
import xml.etree.ElementTree as ET

out = sys.argv[1]
xml = os.path.join(out, "tests.xml")
if os.path.exists(xml):
    root = ET.parse(xml).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    n = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    print(f"tests: {n['tests']} run, {n['failures']} failed, {n['errors']} errors, {n['skipped']} skipped")
    for s in suites:
        for case in s.iter("testcase"):
            bad = case.find("failure") if case.find("failure") is not None else case.find("error")
            if bad is not None:
                print(f"  FAIL {case.get('classname')}::{case.get('name')}: {(bad.get('message') or '')[:150]}")
rows = []
for path in sorted(glob.glob(os.path.join(out, "bench_*.json"))):
    rows += json.load(open(path))["rows"]
if rows:
    print(f"{'shape':<10} {'indices':<7} {'pass':<4} {'ms':>9} {'TFLOP/s':>8} {'%peak':>6} {'TB/s':>5} {'dense ms':>9} "
          f"{'vs dense':>8}")
    for r in rows:
        dense = f"{r['dense_ms']:>9.2f} {r['speedup_vs_dense']:>7.2f}x" if "dense_ms" in r else f"{'n/a':>9} {'':>8}"
        print(f"{r['shape']:<10} {r['indices']:<7} {r['pass_']:<4} {r['ms']:>9.2f} {r['tflops']:>8.1f} "
              f"{r['pct_of_peak']:>5.1f}% {r['tbps']:>5.2f} {dense}")
    for f, b in zip(rows[::2], rows[1::2]):
        if "dense_ms" in f:
            print(f"  {f['shape']} {f['indices']}: fwd+bwd {(f['dense_ms'] + b['dense_ms']) / (f['ms'] + b['ms']):.2f}x "
                  "faster than dense")
decode = os.path.join(out, "decode_bench.json")
if os.path.exists(decode):
    print(f"decode (T=1, bf16, k=2048) {'shape':<13} {'ms':>8} {'GB/s':>7} {'1 block/row':>11} {'agree':>5}")
    for r in json.load(open(decode))["rows"]:
        print(f"  {r['op']:<24} {r['shape']:<13} {r['ms']:>8.3f} {r['gbps']:>7.0f} {r['single_ms']:>9.3f}ms "
              f"{str(r['same']):>5}")
EOF
