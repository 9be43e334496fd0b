#!/usr/bin/env bash
# One unattended check of sdmp_fast.kernels on a GPU machine (issue 4): build, CUDA tests, compute-sanitizer,
# benches, and a short table of the issue's targets at the end.
#
#   OUT=/some/dir bash bench/gpu_kernels.sh          # run from the repository root
#
# Every step has its own time limit and the whole script keeps to $BUDGET_S seconds (default 480): a step that
# would not fit is skipped and said so. Order: build, smoke, tests, memcheck, benches, then racecheck, synccheck
# and initcheck while time is left. Logs, JUnit XML and bench JSON go to $OUT; on a GPU the bench JSON also goes to
# bench/results/. Knobs: PYTHON (default python3), BUDGET_S, SKIP_INSTALL=1 (sdmp_fast already importable),
# SKIP_TESTS=1, SKIP_BENCH=1, SKIP_SANITIZER=1, SKIP_CLUSTER=1 (no cluster DINO step), SDMP_KERNELS_ARCHS (default "80;90", as the JIT build),
# DINO_VARIANTS / MIX_VARIANTS (bench rows, see `bench losses --dino-variants`, `bench mixing --mix-variants`),
# PROFILE=1 (per-kernel DINO times), SELFCHECK_CONFIGS (launch configurations to selfcheck, below), PACK_TO (tar
# everything there at the end).
set -u -o pipefail

OUT=${OUT:-bench/results/gpu_kernels-$(date +%Y%m%d-%H%M%S)}
PY=${PYTHON:-python3}
BUDGET_S=${BUDGET_S:-480}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT" bench/results
. "$(dirname "$0")/steps.sh"

# ------------------------------------------------------------------------------------------- environment
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
  "$PY" -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda, '|', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'NO GPU')"
  command -v nvcc && nvcc --version | tail -2
  command -v compute-sanitizer && compute-sanitizer --version | head -2
  command -v ninja && ninja --version
} > "$OUT/env.txt" 2>&1
log "env: $(grep -m1 python "$OUT/env.txt")"

# ------------------------------------------------------------------------------------------- install
if [ "${SKIP_INSTALL:-0}" = 1 ]; then
  "$PY" -c "import sdmp_fast.kernels" 2>/dev/null || SKIP_INSTALL=shim
fi
if [ "${SKIP_INSTALL:-0}" = shim ] || { [ "${SKIP_INSTALL:-0}" != 1 ] &&
    # SDMP_KERNELS_AOT=0: the kernels are compiled by the timed build step below, with its log
    ! step install 120 env SDMP_KERNELS_AOT=0 "$PY" -m pip install -e . --no-deps --no-build-isolation -q; }; then
  use_shim "$OUT/pyshim"
fi
"$PY" -c "import sdmp_fast.kernels" 2>> "$SUMMARY" || { log "FATAL: sdmp_fast.kernels does not import"; exit 1; }

# ------------------------------------------------------------------------------------------- build
BUILD_OK=1
step build 300 "$PY" -m sdmp_fast.kernels.build --build --verbose || BUILD_OK=0
if [ $BUILD_OK -eq 0 ]; then
  log "BUILD FAILED -- last lines:"
  tail -30 "$OUT/build.log" | tee -a "$SUMMARY"
fi

# ------------------------------------------------------------------------------------------- smoke
if [ $BUILD_OK -eq 1 ]; then
  step smoke 90 "$PY" -m sdmp_fast.kernels.selfcheck --quick --cluster skip
  grep -E "^(ok|FAIL)" "$OUT/smoke.log" | sed 's/^/      /' | tee -a "$SUMMARY"
fi

# The thread-block-cluster DINO forward (sm_90) has not run on a GPU yet: its checks go first, alone and
# briefly, in their own process. If they fail or hang (a cluster barrier that never completes), every later
# cluster step is left out (tests, sanitizer cases, bench rows), so the rest of the run still reports.
CLUSTER_OK=0
if [ $BUILD_OK -eq 1 ] && [ "${SKIP_CLUSTER:-0}" != 1 ]; then
  step smoke_cluster 45 "$PY" -m sdmp_fast.kernels.selfcheck --quick --cluster only && CLUSTER_OK=1
  grep -E "^(ok|FAIL)" "$OUT/smoke_cluster.log" | sed 's/^/      /' | tee -a "$SUMMARY"
  [ $CLUSTER_OK -eq 1 ] || log "cluster path left out of the rest of this run"
fi
NO_CLUSTER_OPT=$([ $CLUSTER_OK -eq 1 ] || echo "--cluster skip")

# ------------------------------------------------------------------------------------------- CUDA tests
if [ "${SKIP_TESTS:-0}" != 1 ] && [ $BUILD_OK -eq 1 ]; then
  if "$PY" -c "import pytest" 2>/dev/null; then
    TIMEOUT_OPT=""
    "$PY" -c "import pytest_timeout" 2>/dev/null && TIMEOUT_OPT="--timeout=120"
    # the cluster tests in a second process: a hang or sticky CUDA error there cannot take the others along
    for part in tests tests_cluster; do
      [ $part = tests_cluster ] && [ $CLUSTER_OK -ne 1 ] && continue
      if [ $part = tests ]; then limit=200 select="not cluster"; else limit=90 select=cluster; fi
      step $part $limit "$PY" -m pytest -m cuda tests/test_kernels.py -q -rfE -p no:cacheprovider $TIMEOUT_OPT \
        -k "$select" --junitxml="$OUT/$part.xml"
      tail -3 "$OUT/$part.log" | sed 's/^/      /' | tee -a "$SUMMARY"
      grep -E "^(FAILED|ERROR)" "$OUT/$part.log" | head -20 | sed 's/^/      /' | tee -a "$SUMMARY"
    done
  else
    log "pytest missing: running the full selfcheck instead"
    # shellcheck disable=SC2086 # an optional option
    step tests_selfcheck 200 "$PY" -m sdmp_fast.kernels.selfcheck $NO_CLUSTER_OPT
  fi
fi

# ------------------------------------------------------------------------------------------- tuning configs
# SELFCHECK_CONFIGS="A=1 B=2;C=3": the quick selfcheck again under each launch configuration (the DINO knobs
# SDMP_DINO_FUSED / _GROUP_PAIRS / _BLOCK_COLS / _PAIR_WARPS), so a configuration the benches favour is known correct.
if [ $BUILD_OK -eq 1 ] && [ -n "${SELFCHECK_CONFIGS:-}" ]; then
  IFS=';' read -ra CFGS <<< "$SELFCHECK_CONFIGS"
  for k in "${!CFGS[@]}"; do
    # shellcheck disable=SC2086 # the configuration is a list of NAME=VALUE words
    step "selfcheck_cfg$k" 60 env ${CFGS[$k]} "$PY" -m sdmp_fast.kernels.selfcheck --quick $NO_CLUSTER_OPT
    log "      [${CFGS[$k]}] $(grep -m1 '^selfcheck:' "$OUT/selfcheck_cfg$k.log")"
  done
fi

# ------------------------------------------------------------------------------------------- sanitizer, benches
# No caching allocator under the sanitizer: every buffer is its own allocation, so out-of-bounds accesses and
# (initcheck) reads of never-written memory are seen.
sanitize() {
  local tool=$1 extra=""
  # shellcheck disable=SC2086 # $extra and $NO_CLUSTER_OPT are optional options
  [ "${SKIP_SANITIZER:-0}" = 1 ] && return 0
  if [ $BUILD_OK -ne 1 ] || ! command -v compute-sanitizer > /dev/null; then
    log "SKIP  sanitizer_$tool (build failed or compute-sanitizer missing)"
    return 0
  fi
  [ "$tool" = initcheck ] && extra="--no-poison"
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 step "sanitizer_$tool" 75 compute-sanitizer --tool "$tool" --error-exitcode 9 \
    --print-limit 20 "$PY" -m sdmp_fast.kernels.selfcheck --quick $extra $NO_CLUSTER_OPT
  grep -m3 -E "ERROR SUMMARY|RACECHECK SUMMARY|selfcheck:" "$OUT/sanitizer_$tool.log" | sed 's/^/      /' | tee -a "$SUMMARY"
}

sanitize memcheck
if [ "${SKIP_BENCH:-0}" != 1 ]; then
  # DINO rows: the variants without "cluster" with the other ops; the cluster ones afterwards in their own
  # process (--merge-into adds its rows to losses.json, speed-ups against that run's eager / compile rows).
  VARIANTS=${DINO_VARIANTS:-cluster,cluster+tfold,cluster+cpipe,cluster+tfold+cpipe,ch8,ch16,ch32}
  PLAIN_VARIANTS=$(tr ',' '\n' <<< "$VARIANTS" | grep -v cluster | paste -sd, -)
  CLUSTER_VARIANTS=$(tr ',' '\n' <<< "$VARIANTS" | grep cluster | paste -sd, -)
  PROFILE_OPT=$([ "${PROFILE:-0}" = 1 ] && echo --profile)
  # shellcheck disable=SC2086 # an optional option
  step bench_losses 200 "$PY" -m sdmp_fast.cli bench losses --iters 10 --warmup 3 --dino-variants "$PLAIN_VARIANTS" \
    $PROFILE_OPT --profile-configs default,fused --json "$OUT/losses.json"
  if [ -n "$CLUSTER_VARIANTS" ] && [ $CLUSTER_OK -eq 1 ]; then
    # shellcheck disable=SC2086 # an optional option
    step bench_losses_cluster 100 "$PY" -m sdmp_fast.cli bench losses --iters 10 --warmup 3 --ops dino --no-compile \
      --dino-variants "$CLUSTER_VARIANTS" $PROFILE_OPT --profile-configs cluster,cluster+tfold+cpipe \
      --json "$OUT/losses_cluster.json" --merge-into "$OUT/losses.json"
  elif [ -n "$CLUSTER_VARIANTS" ]; then
    log "SKIP  bench_losses_cluster (cluster smoke check did not pass)"
  fi
  # the issue's anchor shape above has 2 teacher crops; SDMP-DINO training also feeds the 2 mixed-teacher crops
  step bench_losses_tmixed 40 "$PY" -m sdmp_fast.cli bench losses --iters 10 --warmup 3 --ops dino --no-compile \
    --teacher-mixed --json "$OUT/losses_tmixed.json"
  step bench_mixing 120 "$PY" -m sdmp_fast.cli bench mixing --iters 10 --warmup 3 \
    --mix-variants "${MIX_VARIANTS:-p2,p4,staged}" --json "$OUT/mixing.json"
  TAG=$("$PY" -c "import torch; from sdmp_fast.benchmarks.loaders import device_tag; print(device_tag(torch.device('cuda' if torch.cuda.is_available() else 'cpu')))" 2>/dev/null || echo gpu)
  # same names as the benches' defaults: bench/results/<name>-<device>-<date>.json; not from a CPU dry run
  # (its GPU rows are all "unavailable"): those JSON stay under $OUT
  for f in losses mixing; do
    [ -f "$OUT/$f.json" ] && [ "${TAG#cpu}" = "$TAG" ] && cp "$OUT/$f.json" "bench/results/$f-$TAG-$(date +%Y%m%d).json"
  done
fi
sanitize racecheck
sanitize synccheck
sanitize initcheck

# ------------------------------------------------------------------------------------------- table
"$PY" - "$OUT" <<'EOF' 2>&1 | tee -a "$SUMMARY"
import json, os, sys
out = sys.argv[1]
def load(name):
    path = os.path.join(out, f"{name}.json")
    return json.load(open(path)) if os.path.exists(path) else None
rows, targets = [], []
losses, mixing = load("losses"), load("mixing")
for doc in (losses, mixing):
    if doc:
        print(f"device: {doc['device']}  date: {doc['date']}")
        break
def fmt(v, spec=".3f"):
    return "-" if v is None else format(v, spec)
print(f"{'op':<14}{'impl':<34}{'ms':>9}{'GB/s':>9}{'%copy':>7}{'x eager':>9}{'x compile':>10}{'x dense':>9}{'x copy':>8}"
      f"{'MiB':>8}{'mem/eager':>10}")
for doc in (losses, mixing):
    for r in (doc or {}).get("records", []):
        print(f"{r['op']:<14}{r['impl']:<34}{fmt(r['ms']):>9}{fmt(r.get('gb_per_s'), '.0f'):>9}"
              f"{fmt(r.get('pct_of_copy'), '.0f'):>7}{fmt(r.get('speedup_vs_eager'), '.1f'):>9}"
              f"{fmt(r.get('speedup_vs_compile'), '.1f'):>10}{fmt(r.get('speedup_vs_eager_dense'), '.1f'):>9}"
              f"{fmt(r.get('vs_copy'), '.2f'):>8}{fmt(r.get('peak_mb'), '.0f'):>8}{fmt(r.get('mem_vs_eager'), '.2f'):>10}"
              f"  {r['status'] if r['status'] != 'ok' else ''}")
def rec(doc, op, impl):
    for r in (doc or {}).get("records", []):
        if r["op"] == op and r["impl"] == impl and r["ms"]:
            return r
print("targets (issue 4):")
dino_graph = [r for r in (losses or {}).get("records", []) if r["op"] == "dino" and r["impl"].startswith("kernel_graph")
              and r["ms"]]
best = min(dino_graph, key=lambda r: r["ms"])["impl"] if dino_graph else None
for impl in dict.fromkeys(i for i in ("kernel", "kernel_graph", best) if i):
    d = rec(losses, "dino", impl)
    if d:
        print(f"  DINO fwd+bwd ({impl}) {d['ms']:.3f} ms <= 0.35 ms: {'PASS' if d['ms'] <= 0.35 else 'MISS'}; "
              f"{fmt(d.get('pct_of_copy'), '.0f')}% of copy bandwidth (>= 70%); "
              f"x{fmt(d.get('speedup_vs_compile'), '.1f')} vs compile (>= 8): "
              f"{'PASS' if (d.get('speedup_vs_compile') or 0) >= 8 else 'MISS'}")
for op in ("dino", "two_hot_ce", "moco_terms"):
    k, e, c = rec(losses, op, "kernel"), rec(losses, op, "eager"), rec(losses, op, "compile")
    if k and e and k.get("peak_mb") is not None and e.get("peak_mb"):
        print(f"  {op} peak memory fwd+bwd: kernel {k['peak_mb']:.0f} MiB, eager {e['peak_mb']:.0f} MiB"
              + (f", compile {c['peak_mb']:.0f} MiB" if c and c.get("peak_mb") is not None else "")
              + f" (kernel / eager {k['peak_mb'] / e['peak_mb']:.2f})")
for impl in ("kernel", "kernel_graph"):
    m = rec(losses, "two_hot_ce", impl)
    if m:
        s = m.get("speedup_vs_eager_dense") or 0
        sg = m.get("speedup_vs_eager_dense_graph")
        print(f"  two-hot MoCo CE ({impl}) x{s:.1f} vs eager dense-label CE (>= 5): {'PASS' if s >= 5 else 'MISS'}"
              + (f"; x{sg:.1f} vs the dense CE graph-captured too" if sg else ""))
mix_impls = sorted({r["impl"] for r in (mixing or {}).get("records", []) if r["impl"].startswith("kernel")})
for case in ("uniform", "mixup", "resizemix"):
    for impl in mix_impls:
        base = "a graph-captured copy" if "_graph" in impl else "a copy"
        k = rec(mixing, f"mix_{case}", impl)
        if k and k.get("vs_copy"):
            print(f"  mixing ({case}, {impl}) {k['vs_copy']:.2f}x {base} of the same bytes (<= 1.5): "
                  f"{'PASS' if k['vs_copy'] <= 1.5 else 'MISS'}")
EOF
log "total $((SECONDS - T0))s; everything under $OUT"
pack_results kernels
