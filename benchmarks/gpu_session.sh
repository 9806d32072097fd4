#!/usr/bin/env bash
# One GPU session in under 8 minutes: the GPU tests, the speed benchmark on W1-W5 with every
# contestant, and W2's peak memory, on CUDA. Run from the repository root on the GPU machine:
#
#     OUT=/some/dir bash benchmarks/gpu_session.sh
#
# Needs python3 with torch (CUDA), pytorch-lightning, psutil and optree importable (optree may
# come from PYTHONPATH, e.g. /tmp/site: this script leaves PYTHONPATH as it finds it). Writes at
# most 5 files under "$OUT": session.log (everything printed), pytest.log, speed.json (all
# workloads), memory.json, summary.md; prints the summary table last.
#
# Every stage has its own time limit (a stage that runs out is reported and the session goes on),
# all of them together 455 s; the speed benchmark runs one process per workload so that a slow
# compile costs only its own workload. Override the limits with the environment variables
# below, e.g. REPEATS=5 SPEED_LIMIT=120. A dry run of the plumbing on a CPU machine (the GPU tests
# skip, the CUDA-graph rows say skipped): DEVICE=cpu REPEATS=1 OUT=/tmp/gs bash benchmarks/gpu_session.sh

set -u
OUT="${OUT:?set OUT to the folder the results go to}"
PY="${PYTHON:-python3}"
DEVICE="${DEVICE:-cuda}"            # DEVICE=cpu: a dry run of the plumbing on a CPU machine
REPEATS="${REPEATS:-3}"
TEST_LIMIT="${TEST_LIMIT:-100}"     # seconds for tests/test_gpu.py
SPEED_LIMIT="${SPEED_LIMIT:-60}"    # seconds per workload of bench_speed.py (W4: 40)
MEMORY_LIMIT="${MEMORY_LIMIT:-75}"  # seconds for bench_memory.py
CONTESTANTS="hand,lightning,looplib_loop,looplib,looplib_donated,looplib_compiled,looplib_cudagraphs"
MEMORY_CONTESTANTS="hand,looplib,looplib_donated,looplib_fold,looplib_compiled,looplib_cudagraphs"

mkdir -p "$OUT"
WORK="$(mktemp -d)"                 # per-workload JSON, merged into $OUT/speed.json at the end
LOG="$OUT/session.log"
: >"$LOG"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-$WORK/inductor}"  # shared by all runs

say() { echo "$*" | tee -a "$LOG"; }

# run LIMIT NAME CMD...: the command under a time limit, its output into the session log.
run() {
    local limit="$1" name="$2" rc
    shift 2
    say ""
    say "=== $name (limit ${limit} s): $*"
    local t0=$SECONDS
    timeout --signal=TERM --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
        say "=== $name: TIMED OUT after $((SECONDS - t0)) s (rc $rc)"
    else
        say "=== $name: rc $rc in $((SECONDS - t0)) s"
    fi
    STATUS+=("$name: rc $rc, $((SECONDS - t0)) s")
}
STATUS=()

say "# gpu_session.sh $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
"$PY" - <<'EOF' 2>&1 | tee -a "$LOG"
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda,
      "device", torch.cuda.get_device_name() if torch.cuda.is_available() else "NONE")
for mod in ("optree", "pytorch_lightning", "psutil"):
    try:
        print(mod, __import__(mod).__version__)
    except Exception as e:  # report, do not stop
        print(mod, "MISSING:", e)
EOF

# 1. The GPU tests.
run "$TEST_LIMIT" "tests/test_gpu.py" \
    bash -c "$PY -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee '$OUT/pytest.log'; exit \${PIPESTATUS[0]}"

# 2. Speed, one workload per process (equivalence check, sync count, interleaved repeats).
for W in W1 W2 W3 W4 W5; do
    limit="$SPEED_LIMIT"
    [ "$W" = W4 ] && limit=$((SPEED_LIMIT * 2 / 3))
    run "$limit" "bench_speed $W" "$PY" benchmarks/bench_speed.py --device "$DEVICE" --workloads "$W" \
        --contestants "$CONTESTANTS" --repeats "$REPEATS" --no-memory --json "$WORK/speed_$W.json"
done

# 3. Peak memory of W2 (a fresh process per contestant).
run "$MEMORY_LIMIT" "bench_memory W2" "$PY" benchmarks/bench_memory.py --device "$DEVICE" \
    --workloads W2 --contestants "$MEMORY_CONTESTANTS" --json "$OUT/memory.json"

# 4. Merge and summarize (the summary is the last thing printed).
say ""
for s in "${STATUS[@]}"; do say "  $s"; done
"$PY" - "$WORK" "$OUT" <<'EOF' 2>&1 | tee "$OUT/summary.md" | tee -a "$LOG"
import json, statistics, sys
from pathlib import Path

work, out = Path(sys.argv[1]), Path(sys.argv[2])
runs = [json.loads(p.read_text()) for p in sorted(work.glob("speed_*.json"))]
merged = {"machine": runs[0]["machine"] if runs else {}, "settings": {}, "rows": []}
for r in runs:
    merged["settings"].update(r["settings"])
    merged["rows"] += r["rows"]
(out / "speed.json").write_text(json.dumps(merged, indent=2))

m = merged["machine"]
print(f"\n## Summary: {m.get('gpu', '?')}, torch {m.get('torch', '?')}, {m.get('date', '')}\n")
print("| workload | contestant | ms / unit | ratio to hand (IQR) | syncs / unit | diff vs hand | note |")
print("|---|---|---|---|---|---|---|")
for row in merged["rows"]:
    if row["unit_s"]:
        ms = f"{statistics.median(row['unit_s']) * 1e3:.3f}"
        rs = sorted(row["ratios"])
        ratio = f"{statistics.median(rs):.2f}x ({rs[0]:.2f}..{rs[-1]:.2f})" if rs else "-"
    else:
        ms = ratio = "-"
    diff = "-" if row["diff"] is None else f"{row['diff']:.1e}" + ("" if row["close"] else " MISMATCH")
    syncs = "-" if row.get("syncs") is None else str(row["syncs"])
    print(f"| {row['workload']} | {row['contestant']} | {ms} | {ratio} | {syncs} | {diff} | {row['note'][:70]} |")
done = {r["workload"] for r in merged["rows"]}
missing = [w for w in ("W1", "W2", "W3", "W4", "W5") if w not in done]
if missing:
    print(f"\nno speed results for {', '.join(missing)} (timed out or failed: see session.log)")
w5 = {r["contestant"]: r for r in merged["rows"] if r["workload"] == "W5" and r["ratios"]}
for name in ("looplib", "looplib_compiled", "looplib_cudagraphs"):
    if name in w5:
        med = statistics.median(w5[name]["ratios"])
        print(f"W5 {name}: {med:.2f}x of the 8 hand loops (target <= 0.25x: {'met' if med <= 0.25 else 'not met'})")
mem = out / "memory.json"
if mem.exists():
    rows = json.loads(mem.read_text())["rows"]
    hand = next((r["peak_bytes"] for r in rows if r["contestant"] == "hand"), None)
    print("\n| W2 peak memory | MiB | ratio to hand |\n|---|---|---|")
    for r in rows:
        b = r["peak_bytes"]
        mib = "-" if b is None else f"{b / 2**20:.1f}"
        ratio = f"{b / hand:.2f}x" if b is not None and hand else "-"
        print(f"| {r['contestant']} | {mib} | {ratio} |")
EOF
rm -rf "$WORK"
