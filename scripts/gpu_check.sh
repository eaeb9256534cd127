#!/usr/bin/env bash
# First run on a new GPU node: does megatron_tfree work here, and how fast does it train?
#
#   bash scripts/gpu_check.sh --json gpu_check.json [--quick] [--steps N] [--time-budget SECONDS]
#        [--skip-build] [--skip-tests] [--skip-sanitizer] [--skip-kernels] [--skip-train]
#
# Run from anywhere (it changes to the repository root) with the package's dependencies importable by
# $PYTHON (default python3). Nothing is installed or downloaded. Parts, in order, each under its own
# `timeout` (a part that fails or times out is recorded and the next one runs):
#   build      load the CUDA extension: the prebuilt megatron_tfree._tfree_ops_cuda if it matches csrc/,
#              else a JIT build of csrc/*_kernels.cu (MEGATRON_TFREE_CUDA_JIT=1 forces that); says which,
#              and runs one embedding-bag call against the reference. Also loads/builds the C++ CPU module
#              (the `cpp` ops backend needs it).
#   tests      python -m pytest -m cuda -q tests/ops            (the `cuda`-marked kernel tests)
#   sanitizer  compute-sanitizer --tool memcheck on a subset of tests/ops/test_cuda_ops.py (every kernel
#              once), when compute-sanitizer is on PATH, in $CUDA_HOME/bin or /usr/local/cuda/bin
#   kernels    python benchmarks/kernels.py --json ...          (--quick with --quick)
#   train      python benchmarks/train_mfu.py --json ...        (~1B T-Free vs BPE-64k: words/s, tokens/s,
#              TFLOP/s, MFU, peak memory vs the planner; --steps N, --quick = 10 steps)
# One JSON (--json, default gpu_check.json) holds: ok, exit_code, not_ok (parts that failed or timed
# out), device, mfu (the T-Free model's), mfu_classic, tfree_vs_classic_words_per_s, seconds,
# time_budget_s, args, logs and parts.{build,tests,sanitizer,kernels,train} = {status: ok|failed|
# timeout|skipped, reason, exit_code, seconds, timeout_s, log, log_tail, result}; result = build: the
# loader's report, tests/sanitizer: junit counts (+ memcheck's ERROR SUMMARY), kernels/train: their JSON.
# Full logs and the parts' own JSON files go to <json without .json>_logs/.
#
# Time: --time-budget (default 480 s, i.e. ~8 min) bounds the parts together: each part's timeout is
# its share of the budget, cut so the parts after it keep their minimum share; a part left with under
# 20 s is skipped ("no time left"). The JIT builds land in $TORCH_EXTENSIONS_DIR (default: the pytest
# cache dir that tests/ops/test_cuda_ops.py builds into), so one build serves every part.
#
# Exit: 0 every part that ran is ok; 1 a part failed or timed out; 2 no CUDA device (one line saying
# so, before anything heavy; the JSON then records the reason); 64 bad arguments.

set -u

usage() { sed -n '2,/^$/p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

JSON="gpu_check.json"
QUICK=0
STEPS=""
BUDGET=480
declare -A SKIP=([build]=0 [tests]=0 [sanitizer]=0 [kernels]=0 [train]=0)
ARGS=("$@")
while [ "$#" -gt 0 ]; do
    case "$1" in
        --json) JSON="${2:?--json needs a path}"; shift 2 ;;
        --json=*) JSON="${1#*=}"; shift ;;
        --quick) QUICK=1; shift ;;
        --steps) STEPS="${2:?--steps needs a number}"; shift 2 ;;
        --steps=*) STEPS="${1#*=}"; shift ;;
        --time-budget) BUDGET="${2:?--time-budget needs seconds}"; shift 2 ;;
        --time-budget=*) BUDGET="${1#*=}"; shift ;;
        --skip-build|--skip-tests|--skip-sanitizer|--skip-kernels|--skip-train)
            SKIP[${1#--skip-}]=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "gpu_check: unknown argument '$1' (see --help)" >&2; exit 64 ;;
    esac
done
case "$BUDGET" in ''|*[!0-9]*) echo "gpu_check: --time-budget must be whole seconds, got '$BUDGET'" >&2; exit 64 ;; esac
case "$STEPS" in *[!0-9]*) echo "gpu_check: --steps must be a number, got '$STEPS'" >&2; exit 64 ;; esac

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
case "$JSON" in /*) ;; *) JSON="$PWD/$JSON" ;; esac
cd "$ROOT" || exit 1
PY="${PYTHON:-python3}"
if ! command -v "$PY" >/dev/null 2>&1; then
    echo "gpu_check: '$PY' not found; set \$PYTHON to the interpreter that has torch and megatron_tfree" >&2
    exit 1
fi
LOGDIR="${JSON%.json}_logs"
mkdir -p "$LOGDIR" || exit 1
rm -f "$LOGDIR"/*.status "$LOGDIR"/*.reason "$LOGDIR"/*.log "$LOGDIR"/*.json "$LOGDIR"/*.xml
export PYTHONUNBUFFERED=1
export TOKENIZERS_PARALLELISM=false
# where tests/ops/test_cuda_ops.py JIT-builds (pytest's config.cache.mkdir("torch_extensions")): shared
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$ROOT/.pytest_cache/d/torch_extensions}"
T0=$(date +%s)

# ---------------------------------------------------------------------------------------- device
# benchmarks/train_mfu.py --device-info: exit 2 with one "no CUDA device: ..." line without CUDA
if ! "$PY" benchmarks/train_mfu.py --device-info --json "$LOGDIR/device.json" >/dev/null 2>"$LOGDIR/device.log"; then
    REASON="$(grep -m1 '^no CUDA device' "$LOGDIR/device.log")"
    [ -n "$REASON" ] || REASON="no CUDA device: the probe '$PY benchmarks/train_mfu.py --device-info' failed: $(tail -n 1 "$LOGDIR/device.log")"
    echo "$REASON" >&2
    "$PY" - "$JSON" "$REASON" <<'NO_DEVICE' 2>/dev/null
import json, sys
json.dump({"ok": False, "exit_code": 2, "device": None, "mfu": None, "error": sys.argv[2], "parts": {}},
          open(sys.argv[1], "w"), indent=1)
NO_DEVICE
    exit 2
fi
echo "gpu_check: $(cat "$LOGDIR/device.json")"

# ---------------------------------------------------------------------------------------- budget
PARTS=(build tests sanitizer kernels train)
declare -A CAP=([build]=35 [tests]=25 [sanitizer]=20 [kernels]=20 [train]=60)     # % of the budget, at most
declare -A RESERVE=([build]=10 [tests]=10 [sanitizer]=8 [kernels]=8 [train]=35)  # % kept for a later part

SANITIZER=""
for c in "$(command -v compute-sanitizer 2>/dev/null)" "${CUDA_HOME:-/nonexistent}/bin/compute-sanitizer" \
         /usr/local/cuda/bin/compute-sanitizer; do
    if [ -n "$c" ] && [ -x "$c" ]; then SANITIZER="$c"; break; fi
done
if [ "${SKIP[sanitizer]}" = 0 ] && [ -z "$SANITIZER" ]; then
    SKIP[sanitizer]=1
    echo "compute-sanitizer not found (PATH, \$CUDA_HOME/bin, /usr/local/cuda/bin)" >"$LOGDIR/sanitizer.reason"
fi

skip_part() {  # name reason
    echo "skipped 0 0 0" >"$LOGDIR/$1.status"
    [ -f "$LOGDIR/$1.reason" ] || echo "$2" >"$LOGDIR/$1.reason"
    echo "== $1: skipped ($(cat "$LOGDIR/$1.reason"))" >&2
}

limit_for() {  # name -> seconds this part may take (0: no time left)
    local name="$1" later=0 seen=0 p remaining cap limit
    for p in "${PARTS[@]}"; do
        if [ "$seen" = 1 ] && [ "${SKIP[$p]}" = 0 ]; then later=$((later + BUDGET * ${RESERVE[$p]} / 100)); fi
        [ "$p" = "$name" ] && seen=1
    done
    remaining=$((BUDGET - ($(date +%s) - T0)))
    cap=$((BUDGET * ${CAP[$name]} / 100))
    limit=$((remaining - later))
    [ "$limit" -gt "$cap" ] && limit=$cap
    [ "$limit" -lt 20 ] && limit=0
    echo "$limit"
}

run_part() {  # name limit command... (stdin passes through)
    local name="$1" limit="$2" start rc status
    shift 2
    echo "== $name (timeout ${limit}s): $*"
    start=$(date +%s)
    timeout --kill-after=15 "$limit" "$@" 2>&1 | tee "$LOGDIR/$name.log"
    rc=${PIPESTATUS[0]}
    case "$rc" in
        0) status=ok ;;
        124|137) status=timeout ;;
        *) status=failed ;;
    esac
    echo "$status $rc $(($(date +%s) - start)) $limit" >"$LOGDIR/$name.status"
    echo "== $name: $status (exit $rc, $(($(date +%s) - start)) s)"
}

begin() {  # name -> prints the limit, or records a skip and prints nothing
    local name="$1" limit
    if [ "${SKIP[$name]}" = 1 ]; then skip_part "$name" "--skip-$name"; return 1; fi
    limit="$(limit_for "$name")"
    if [ "$limit" = 0 ]; then skip_part "$name" "no time left in --time-budget $BUDGET"; return 1; fi
    echo "$limit"
}

# ------------------------------------------------------------------------------------ (a) build
if LIMIT="$(begin build)"; then
    run_part build "$LIMIT" "$PY" - "$LOGDIR/build.json" <<'BUILD'
import json, os, sys, time

import torch

from megatron_tfree.ops import cuda, extension, reference

out = {"jit_forced": os.environ.get(cuda.JIT_ENV) == "1", "torch_extensions_dir": os.environ.get("TORCH_EXTENSIONS_DIR")}
t = time.time()
try:
    extension.load(build=True)
    out["cpu_extension"] = extension.describe()
except Exception as e:  # the cpp backend (and so the kernels in training) needs it; the kernel tests do not
    out["cpu_extension_error"] = str(e).splitlines()[0]
out["cpu_seconds"] = round(time.time() - t, 1)
t = time.time()
mod = None if out["jit_forced"] else cuda.load(jit=False)
out["how"] = "prebuilt"
if mod is None:
    out["how"] = "JIT build"
    try:
        mod = cuda.load(jit=True)
    except cuda.CudaBuildError as e:  # the message names the fix
        out.update(error=str(e), cuda_seconds=round(time.time() - t, 1), smoke_ok=False)
        json.dump(out, open(sys.argv[1], "w"), indent=1)
        print(f"CUDA extension: the JIT build failed: {e}")
        sys.exit(1)
out["cuda_seconds"] = round(time.time() - t, 1)
out["cuda_extension"] = cuda.describe()
g = torch.Generator().manual_seed(0)
w = torch.randn(50, 64, generator=g)
off, ids = torch.tensor([0, 3, 3, 9]), torch.randint(0, 50, (9,), generator=g)
got = mod.embedding_bag_forward(w.cuda(), off.cuda(), ids.cuda(), 0).cpu()
out["smoke_max_abs_diff"] = float((got - reference.embedding_bag(w, off, ids)).abs().max())
out["smoke_ok"] = out["smoke_max_abs_diff"] < 1e-4
json.dump(out, open(sys.argv[1], "w"), indent=1)
print(f"CUDA extension: {out['how']} ({out['cuda_extension']}), {out['cuda_seconds']} s; "
      f"CPU extension: {out.get('cpu_extension') or out.get('cpu_extension_error')}; smoke test ok: {out['smoke_ok']}")
sys.exit(0 if out["smoke_ok"] else 1)
BUILD
fi

# ------------------------------------------------------------------------------------ (b) tests
if LIMIT="$(begin tests)"; then
    run_part tests "$LIMIT" "$PY" -m pytest -m cuda -q tests/ops --junitxml "$LOGDIR/tests.xml"
fi

# -------------------------------------------------------------------------------- (c) sanitizer
# every kernel at least once, small shapes (memcheck runs them 10-100x slower); no caching allocator,
# so an out-of-bounds access cannot land in a cached block unnoticed
SAN_K="embedding_bag_edge_cases or bitwise_repeatable or (embedding_bag_forward_backward and 40-30-97-37)"
SAN_K="$SAN_K or (bce_loss_matches_reference and dtype1) or bce_loss_wider or head_loss_chunking"
SAN_K="$SAN_K or (head_loss_matches_reference and 120-80-200-7) or decode_scores_match_dictionary"
SAN_K="$SAN_K or decode_scores_reject_bad_ids"
if LIMIT="$(begin sanitizer)"; then
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 run_part sanitizer "$LIMIT" "$SANITIZER" --tool memcheck --error-exitcode 3 \
        "$PY" -m pytest -m cuda -q tests/ops/test_cuda_ops.py -k "$SAN_K" --junitxml "$LOGDIR/sanitizer.xml"
fi

# ---------------------------------------------------------------------------------- (d) kernels
if LIMIT="$(begin kernels)"; then
    KARGS=(--json "$LOGDIR/kernels.json")
    [ "$QUICK" = 1 ] && KARGS+=(--quick)
    run_part kernels "$LIMIT" "$PY" benchmarks/kernels.py "${KARGS[@]}"
fi

# ------------------------------------------------------------------------------------ (e) train
if LIMIT="$(begin train)"; then
    TARGS=(--json "$LOGDIR/train_mfu.json" --max-seconds "$((LIMIT * 3 / 5))")
    if [ -n "$STEPS" ]; then TARGS+=(--steps "$STEPS"); elif [ "$QUICK" = 1 ]; then TARGS+=(--steps 10); fi
    [ "$QUICK" = 1 ] && TARGS+=(--warmup 2)
    run_part train "$LIMIT" "$PY" benchmarks/train_mfu.py "${TARGS[@]}"
fi

# ---------------------------------------------------------------------------------- (f) the JSON
"$PY" - "$JSON" "$LOGDIR" "$(($(date +%s) - T0))" "$BUDGET" ${ARGS[@]+"${ARGS[@]}"} <<'ASSEMBLE_JSON'
import json, sys, xml.etree.ElementTree as ET
from pathlib import Path

PARTS = ("build", "tests", "sanitizer", "kernels", "train")
out_path, logdir, seconds, budget, args = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5:]


def load(path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def junit(path):
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    n = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    n["passed"] = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
    return n


def part(name):
    status_file = logdir / f"{name}.status"  # "status exit_code seconds timeout_s", written by run_part/skip_part
    fields = status_file.read_text().split() if status_file.is_file() else []
    status, rc, secs, limit = fields[:4] if len(fields) >= 4 else ("missing", "0", "0", "0")
    log = logdir / f"{name}.log"
    text = log.read_text(errors="replace") if log.is_file() else ""
    reason = (logdir / f"{name}.reason").read_text().strip() if (logdir / f"{name}.reason").is_file() else None
    ran, result = status != "skipped", None
    if not ran:
        pass
    elif name == "build":
        result = load(logdir / "build.json")
    elif name in ("tests", "sanitizer"):
        result = junit(logdir / f"{name}.xml")
        if result and result["tests"] and result["skipped"] == result["tests"]:
            result["note"] = "every test was skipped (pytest saw no CUDA device?)"
        if name == "sanitizer":
            summary = [ln for ln in text.splitlines() if "ERROR SUMMARY" in ln]
            result = dict(result or {}, error_summary=summary[-1].strip() if summary else None)
    elif name == "kernels":
        result = load(logdir / "kernels.json")
    elif name == "train":
        result = load(logdir / "train_mfu.json")
    return {"status": status, "reason": reason, "exit_code": int(rc) if ran else None, "seconds": int(secs),
            "timeout_s": int(limit) if ran else None,
            "log": str(log) if log.is_file() else None, "log_tail": text[-3000:] if text else None, "result": result}


parts = {name: part(name) for name in PARTS}
train = parts["train"]["result"] or {}
kinds = train.get("kinds") or {}
bad = [n for n, p in parts.items() if p["status"] not in ("ok", "skipped")]
report = {
    "ok": not bad, "exit_code": 1 if bad else 0, "not_ok": bad,
    "device": load(logdir / "device.json"),
    "mfu": train.get("mfu"),
    "mfu_classic": (kinds.get("classic") or {}).get("mfu"),
    "tfree_vs_classic_words_per_s": train.get("tfree_vs_classic_words_per_s"),
    "seconds": seconds, "time_budget_s": budget, "args": args, "logs": str(logdir), "parts": parts,
}
out_path.parent.mkdir(parents=True, exist_ok=True)
out_path.write_text(json.dumps(report, indent=1, default=str))
line = ", ".join(f"{n} {p['status']}" for n, p in parts.items())
print(f"gpu_check: {line}; T-Free MFU {report['mfu']}; {seconds} s; wrote {out_path}")
sys.exit(report["exit_code"])
ASSEMBLE_JSON
exit $?
