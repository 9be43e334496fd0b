# Shared by the bench/gpu_*.sh scripts (sourced): budgeted steps and a sdmp_fast that imports on a bare box.
# Needs OUT, PY, BUDGET_S set; sets SUMMARY and T0.
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
T0=$SECONDS

log() { echo "[$(date +%T) +$((SECONDS - T0))s] $*" | tee -a "$SUMMARY"; }

# Refused before any device time is spent: `OUT=/tmp/x PACK_TO=$OUT cmd` sets PACK_TO to /tmp/x (bash expands
# prefix assignments left to right), and packing OUT into itself brings nothing back.
if [ -n "${PACK_TO:-}" ] && [ -d "$PACK_TO" ] && [ "$(cd "$PACK_TO" && pwd -P)" = "$(cd "$OUT" && pwd -P)" ]; then
  log "ERROR: PACK_TO is OUT ($OUT): write PACK_TO=\$OUT OUT=/tmp/x (PACK_TO first)"
  exit 2
fi

# step NAME LIMIT_S CMD...: runs CMD with a time limit (capped by what is left of the budget), output to
# $OUT/NAME.log; returns the command's status (124 = timed out, 125 = skipped for lack of budget).
step() {
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET_S - (SECONDS - T0) - 15))
  if [ "$left" -lt 20 ]; then
    log "SKIP  $name (budget spent)"
    return 125
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  log "run   $name (limit ${limit}s)"
  local start=$SECONDS
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  local status="ok"
  [ $rc -ne 0 ] && status="FAILED rc=$rc"
  [ $rc -eq 124 ] && status="TIMED OUT"
  log "done  $name: $status in $((SECONDS - start))s  (log: $OUT/$name.log)"
  [ $rc -ne 0 ] && tail -5 "$OUT/$name.log" | sed 's/^/      /' | tee -a "$SUMMARY"
  return $rc
}

# inner_budget CAP: the budget to give a nested budgeted script (at most CAP s) so that it ends within what is
# left of ours; 0 (and a SKIP line) when under 40 s are left. A nested script cut off by our step's timeout would
# leave its own running step (in its own process group) on the GPU, and write no summary.
inner_budget() {
  local left=$((BUDGET_S - (SECONDS - T0) - 35))
  [ "$left" -gt "$1" ] && left=$1
  if [ "$left" -lt 40 ]; then
    log "SKIP  nested script (budget spent)" >&2
    echo 0
  else
    echo "$left"
  fi
}

# Without `pip install -e .` working (no build backend on the box): a sdmp_fast package assembled from
# symlinks, as pyproject's package-dir maps it (kernels/ and pipelines/ are its subpackages).
use_shim() {
  local shim="$1"
  rm -rf "$shim" && mkdir -p "$shim/sdmp_fast"
  for f in sdmp_fast/*; do ln -s "$PWD/$f" "$shim/sdmp_fast/$(basename "$f")"; done
  ln -s "$PWD/kernels" "$shim/sdmp_fast/kernels"
  ln -s "$PWD/pipelines" "$shim/sdmp_fast/pipelines"
  export PYTHONPATH="$shim${PYTHONPATH:+:$PYTHONPATH}"
  # `python -c` / `-m` put the current folder first on sys.path, and there the repository's own sdmp_fast/ (no
  # kernels/, no pipelines/ inside) shadowed the shim: "No module named sdmp_fast.pipelines". Python >= 3.11
  # leaves it out with PYTHONSAFEPATH (the GPU machines run 3.12).
  export PYTHONSAFEPATH=1
  log "pip install failed: using PYTHONPATH=$shim (PYTHONSAFEPATH=1)"
}

# With PACK_TO set (the device tool's $OUT: at most 8 files come back from it), everything under $OUT goes to
# PACK_TO/<name>.tgz and the summary to PACK_TO/<name>-summary.txt.
pack_results() {
  local name=$1
  [ -n "${PACK_TO:-}" ] || return 0
  mkdir -p "$PACK_TO"
  cp "$SUMMARY" "$PACK_TO/$name-summary.txt"
  tar czf "$PACK_TO/$name.tgz" -C "$OUT" . && log "packed $OUT into $PACK_TO/$name.tgz"
}
