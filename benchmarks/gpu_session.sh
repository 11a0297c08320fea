#!/usr/bin/env bash
# One prepared GPU session (issue 16): everything a scarce GPU slot should run, each step time-capped,
# in one command that goes on when a step fails and writes at most 8 files under $OUT.
#
#   COMMIT=$(git rev-parse --short HEAD) bash benchmarks/gpu_session.sh     # on the GPU machine (carry .whl/)
#   bash benchmarks/gpu_session.sh --dry                                    # anywhere: every step on CPU, ~1 min
#
# Steps, in order (caps in seconds; their sum, 535, keeps the session under 9 minutes):
#   env       60  install the carried wheels (.whl/, from ../shared/device/pack-wheels.sh) and qtrain
#                 editable; GPU, driver and package versions, commit
#   pytest    90  pytest -m gpu
#   probe     75  benchmarks/probe.py: every NF4+LoRA path under bf16 autocast at Llama-3-8B shapes
#   kernels   100 benchmarks/kernel_speed.py --quick
#   dequant   30  benchmarks/dequant.py --quick
#   e2e       125 benchmarks/e2e.py --quick (baseline and qtrain workers, 60 s each at most)
#   int32     55  benchmarks/int32_probe.py, LAST: an illegal address poisons the CUDA context
# Files under $OUT (default: a new temp dir): summary.md (one line per step: name, status, seconds),
# session.log (everything printed), probe.json, kernels.json, dequant.json, e2e.json, e2e.md, int32.json.
# A step's status: ok, FAIL (exit N) or TIMEOUT (cap N s); the session goes on after either. Exit
# status 0 when every step is ok, else 1.
# --dry: no install and no GPU; pytest -m gpu collects and skips, each script runs with --dry (CPU,
# the Triton interpreter; e2e.py: both stacks on a tiny Llama).
# Environment: OUT, COMMIT (else git's HEAD, else "unknown"), PYTHON (default python3).
set -uo pipefail

DRY=0
case "${1:-}" in
  --dry) DRY=1 ;;
  "") ;;
  *) echo "usage: bash benchmarks/gpu_session.sh [--dry]" >&2; exit 2 ;;
esac

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
OUT=${OUT:-$(mktemp -d -t qtrain-gpu-session.XXXXXX)}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LOG=$OUT/session.log
SUMMARY=$OUT/summary.md
PY=${PYTHON:-python3}
# Never put the repo root first on sys.path (`python -m pytest` would): its kernels/ folder would shadow
# the top-level name `kernels` that bitsandbytes and transformers probe (Python >= 3.11).
export PYTHONSAFEPATH=1 PYTHONUNBUFFERED=1
COMMIT=${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
export COMMIT
DRYFLAG=""
[[ $DRY == 1 ]] && DRYFLAG="--dry"
FAILED=0
TMP=$(mktemp -d)  # step outputs read back for the summary's notes; not under $OUT
trap 'rm -rf "$TMP"' EXIT

: >"$LOG"
{
  echo "# GPU session: commit $COMMIT, $(date -u +%Y-%m-%dT%H:%M:%SZ)$([[ $DRY == 1 ]] && echo ', --dry')"
  echo
  echo "| step | status | seconds | cap | note |"
  echo "|---|---|---|---|---|"
} >"$SUMMARY"

status_of() {  # exit code -> status text; marks the session failed
  case $1 in
    0) echo ok ;;
    124 | 137) echo "TIMEOUT (cap $2 s)" ;;
    *) echo "FAIL (exit $1)" ;;
  esac
}

# step NAME CAP NOTE_CMD COMMAND...: COMMAND under `timeout CAP`, its output appended to the log, one
# summary line; NOTE_CMD (may be empty) prints a short note for that line afterwards.
step() {
  local name=$1 cap=$2 note_cmd=$3 start=$SECONDS rc note=""
  shift 3
  echo -e "\n===== $name (cap ${cap} s): $* =====" >>"$LOG"
  timeout -k 10 "$cap" "$@" >>"$LOG" 2>&1
  rc=$?
  [[ $rc != 0 ]] && FAILED=1
  [[ -n $note_cmd ]] && note=$(bash -c "$note_cmd" 2>/dev/null | tr '|\n' '/ ' | cut -c1-200)
  echo "===== $name: $(status_of $rc "$cap") after $((SECONDS - start)) s =====" >>"$LOG"
  echo "| $name | $(status_of $rc "$cap") | $((SECONDS - start)) | $cap | $note |" >>"$SUMMARY"
}

facts() {
  timeout 5 nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || echo "no nvidia-smi"
  timeout -k 5 20 "$PY" -c '
import importlib.metadata as md, platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| device", torch.cuda.get_device_name() if torch.cuda.is_available() else "none (CPU)")
for name in ("triton", "bitsandbytes", "transformers", "peft", "accelerate", "datasets", "pytest", "qtrain"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "MISSING")
'
}

# Step 0 runs in this shell, each command capped: the install's PYTHONPATH must reach every later step.
start=$SECONDS
rc=0
echo -e "\n===== env (cap 60 s) =====" >>"$LOG"
if [[ $DRY == 0 ]] && compgen -G ".whl/*.whl" >/dev/null; then
  timeout -k 5 25 "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl >>"$LOG" 2>&1 || rc=$?
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  timeout -k 5 20 "$PY" -m pip install -q --no-deps --no-build-isolation -e . >>"$LOG" 2>&1 || rc=$?
fi
facts >>"$LOG" 2>&1 || rc=$?
[[ $rc != 0 ]] && FAILED=1
device=$(grep -m1 -E "^python .*[|] device" "$LOG" | sed 's/.*| device //')
echo "| env | $(status_of $rc 60) | $((SECONDS - start)) | 60 | $device; commit $COMMIT |" >>"$SUMMARY"

step pytest 90 "grep -E '(passed|failed|skipped|error|deselected|no tests ran)' '$LOG' | tail -1" \
  "$PY" -m pytest -m gpu -q -p no:cacheprovider tests
step probe 75 "grep -m1 '^summary:' '$TMP/probe.txt'" \
  bash -o pipefail -c "'$PY' benchmarks/probe.py $DRYFLAG --json '$OUT/probe.json' | tee '$TMP/probe.txt'"
step kernels 100 "grep -m1 '^summary:' '$TMP/kernels.txt' | cut -c1-110" \
  bash -o pipefail -c "'$PY' benchmarks/kernel_speed.py --quick $DRYFLAG --json '$OUT/kernels.json' | tee '$TMP/kernels.txt'"
step dequant 30 "" "$PY" benchmarks/dequant.py --quick $DRYFLAG --json "$OUT/dequant.json"
step e2e 125 "ls '$TMP/e2e' 2>/dev/null || echo 'no result files'" \
  "$PY" benchmarks/e2e.py --quick $DRYFLAG --worker-timeout 60 --search-seconds 15 --out "$TMP/e2e"
for f in "$TMP"/e2e/e2e-*.json "$TMP"/e2e/e2e-*.md; do  # the .png stays behind: 8 files at most come back
  [[ -f $f ]] && cp "$f" "$OUT/e2e.${f##*.}"
done
step int32 55 "" "$PY" benchmarks/int32_probe.py $DRYFLAG --json "$OUT/int32.json"

echo "$OUT"
cat "$SUMMARY"
exit $FAILED
