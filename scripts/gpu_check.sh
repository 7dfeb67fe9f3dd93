#!/usr/bin/env bash
# The prepared GPU check: one command for a GPU machine with about 15 minutes in all and no network.
#
#   bash scripts/gpu_check.sh [DIR]                # on a CUDA machine; DIR defaults to $OUT, else ./gpu_check_out
#   bash scripts/gpu_check.sh --dry-run DIR        # on any machine: check the script itself, write its plan
#   options: --budget SECONDS (whole run, default 420), --only STAGE[,STAGE] (rerun some stages)
#
# Stages, in order: env (nvidia-smi, versions), install (mita into the python that holds a CUDA torch,
# never reinstalling torch), smoke (one tiny fwd+bwd through the compiled kernels vs the reference),
# pytest_gpu (`pytest -m gpu`, fail-fast, per-test timeout), grid (timing grid vs SDPA flash and the
# torch backend, scripts/gpu_grid.py), causal (the causal op, when mita_attention has `causal`) and
# summary (stages.json, summary.md with the GPU speed targets). Each stage runs under its own `timeout`
# (capped by what is left of the budget), a failing stage does not stop the later ones, and every stage
# appends to log.txt. At most 8 files land in DIR (the device tool brings back 8): log.txt, env.txt,
# junit-gpu.xml, grid.json, causal.json, stages.json, summary.md and, in a dry run, plan.md.
#
# The dry run executes nothing heavy: it lists the stages with their resolved commands and timeouts,
# checks that the tools and modules they need resolve, lists the grid and causal cases (so the bench
# accepts them), and runs the interpreter-sized kernel check (TRITON_INTERPRET=1) against the reference.
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DRY=0
BUDGET=420
ONLY=""
DIR=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --budget) BUDGET=$2; shift ;;
    --only) ONLY=$2; shift ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    -*) echo "gpu_check: unknown option $1" >&2; exit 2 ;;
    *) DIR=$1 ;;
  esac
  shift
done
if [ -z "$DIR" ]; then
  if [ "$DRY" = 1 ]; then echo "gpu_check: --dry-run needs a directory" >&2; exit 2; fi
  DIR=${OUT:-$REPO/gpu_check_out}
fi
mkdir -p "$DIR" && DIR=$(cd "$DIR" && pwd)
cd "$REPO" || exit 2

PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
export PYTHONPATH="$REPO/src${PYTHONPATH:+:$PYTHONPATH}"  # mita imports even if the install stage fails
LOG=$DIR/log.txt
WORK=$(mktemp -d)  # stage table; kept out of DIR so DIR holds 8 files at most
trap 'rm -rf "$WORK"' EXIT
: >"$LOG"
: >"$WORK/stages.tsv"
GPU_FILES=$(grep -rl --include='test_*.py' 'pytest.mark.gpu' tests | sort | tr '\n' ' ')
XDIST=""
if $PY -c "import xdist" 2>/dev/null; then XDIST="-n 8"; fi  # kernel compiles dominate: spread them over cores
PTIMEOUT=""
if $PY -c "import pytest_timeout" 2>/dev/null; then PTIMEOUT="--timeout=120"; fi
export REPO DIR PY

# Install mita into the python that holds torch. With torch, triton and pytest already there (the lent
# GPU machine has no network), install mita alone, offline: --no-deps never touches torch. Otherwise ask
# pip for the extras; an already-installed CUDA torch satisfies torch>=2.4 and is kept. PYTHONPATH
# points at src/ anyway, so a failed pip step leaves mita importable.
install_mita() {
  local cuda
  cuda=$($PY -c "import torch; print(torch.version.cuda or '')" 2>/dev/null)
  echo "torch CUDA build: ${cuda:-none}"
  if $PY -c "import torch, triton, pytest, numpy, tqdm" 2>/dev/null; then
    $PY -m pip install -q --no-deps --no-build-isolation --no-index -e "$REPO" \
      || echo "pip could not install mita offline; using PYTHONPATH=$REPO/src"
  else
    [ -n "$cuda" ] || echo "warning: no CUDA torch here; pip may fetch a CPU or CUDA torch"
    $PY -m pip install -q --retries 1 --timeout 20 -e "$REPO[dev,triton]" || echo "pip install failed"
  fi
  $PY -c "import mita, torch, triton; print('mita', mita.__file__, 'torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available())"
}
export -f install_mita

ENV_CMD="nvidia-smi; $PY scripts/gpu_grid.py versions; $PY -m pip list 2>/dev/null | grep -iE '^(torch|triton|numpy|pytest|pytest-xdist|pytest-timeout|mita) '"
# name|cap (s)|command, run by bash -c in the repo root; \$STAGE_BUDGET is the stage's own time limit.
STAGES=(
  "env|30|($ENV_CMD) >\"$DIR/env.txt\" 2>&1; status=\$?; cat \"$DIR/env.txt\"; exit \$status"
  "install|90|install_mita"
  "smoke|60|$PY scripts/gpu_grid.py kernel-check --device cuda"
  "pytest_gpu|150|$PY -m pytest -m gpu -x -q -p no:cacheprovider $XDIST $PTIMEOUT --junitxml=\"$DIR/junit-gpu.xml\" $GPU_FILES"
  "grid|240|$PY scripts/gpu_grid.py grid --out \"$DIR\" --device cuda --budget \$((STAGE_BUDGET - 15))"
  "causal|60|$PY scripts/gpu_grid.py causal --out \"$DIR\" --device cuda --budget \$((STAGE_BUDGET - 15))"
)
RESERVE=20  # seconds kept for the summary

record() {  # name status rc seconds timeout command
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" "$6" >>"$WORK/stages.tsv"
  echo "== gpu_check: stage $1: $2 (rc $3, $4 s of $5 s)" | tee -a "$LOG"
}

wanted() { [ -z "$ONLY" ] || [[ ",$ONLY," == *",$1,"* ]]; }

run_stage() {  # name cap command
  local name=$1 cap=$2 cmd=$3 left t start rc status
  left=$((BUDGET - SECONDS - RESERVE))
  if [ "$left" -lt 15 ]; then record "$name" "skipped (no time left)" 0 0 0 "$cmd"; return; fi
  t=$((cap < left ? cap : left))
  echo "== gpu_check: stage $name (timeout $t s): $cmd" | tee -a "$LOG"
  start=$SECONDS
  # SIGINT first: pytest then still writes its JUnit XML and the grid has written every finished case.
  STAGE_BUDGET=$t timeout -s INT -k 15 "$t" bash -c "$cmd" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  case $rc in
    0) status=ok ;;
    124|137) status=timeout ;;
    *) status=failed ;;
  esac
  record "$name" "$status" "$rc" $((SECONDS - start)) "$t" "$cmd"
}

summarise() {
  local flag=$1
  timeout 60 $PY scripts/gpu_grid.py summary --out "$DIR" --stages "$WORK/stages.tsv" $flag 2>&1 | tee -a "$LOG" \
    || { echo "gpu_check: the summary failed; stage table:"; cat "$WORK/stages.tsv"; } | tee -a "$LOG"
}

if [ "$DRY" = 1 ]; then
  PLAN=$DIR/plan.md
  {
    echo "# gpu_check plan (dry run on $(hostname), $(date -u '+%Y-%m-%d %H:%M UTC'))"
    echo
    echo "Output directory: DIR (\$OUT on the device machine); budget ${BUDGET} s in all, ${RESERVE} s kept for the summary."
    echo
    echo "| stage | timeout cap (s) | command |"
    echo "|---|---:|---|"
    for spec in "${STAGES[@]}"; do
      IFS='|' read -r name cap cmd <<<"$spec"
      printf '| %s | %s | `%s` |\n' "$name" "$cap" "${cmd//|/\\|}"
    done
    echo "| summary | 60 | \`$PY scripts/gpu_grid.py summary --out DIR --stages STAGES.tsv\` |"
  } >"$PLAN"
  start=$SECONDS
  {
    echo
    echo "## Resolved"
    echo
    ok=1
    for tool in "$PY" timeout grep tee; do
      if path=$(command -v "$tool"); then echo "- \`$tool\`: $path"; else echo "- \`$tool\`: MISSING"; ok=0; fi
    done
    echo "- \`nvidia-smi\`: $(command -v nvidia-smi || echo 'absent (no GPU here)')"
    echo "- \`$PY\`: $($PY --version 2>&1); pip: $($PY -m pip --version 2>&1 | cut -d' ' -f1-2)"
    # One interpreter for every module (each start imports torch: seconds on a busy CPU).
    $PY - <<'PYEOF' || ok=0
import importlib
missing = []
for name in ("torch", "triton", "pytest", "numpy", "tqdm", "mita"):
    try:
        print(f"- module `{name}`: {getattr(importlib.import_module(name), '__version__', 'ok')}")
    except ImportError as err:
        print(f"- module `{name}`: MISSING ({err})")
        missing.append(name)
raise SystemExit(1 if missing else 0)
PYEOF
    echo "- optional: xdist ${XDIST:-absent (pytest runs serially)}; pytest-timeout ${PTIMEOUT:-absent}"
    echo "- gpu-marked test files: ${GPU_FILES:-NONE}"
    [ -n "$GPU_FILES" ] || ok=0
    # The selection collects (here every gpu test is then skipped for want of CUDA).
    collected=$($PY -m pytest -m gpu --collect-only -q -p no:cacheprovider $GPU_FILES 2>&1) || ok=0
    echo "- \`pytest -m gpu --collect-only\`: $(echo "$collected" | tail -1)"
    echo
    echo '```'
    $PY scripts/gpu_grid.py plan || ok=0
    echo '```'
    echo "resolve: $([ $ok = 1 ] && echo ok || echo FAILED)"
  } >>"$PLAN" 2>&1
  if grep -q '^resolve: ok' "$PLAN"; then st=ok; rc=0; else st=failed; rc=1; fi
  record resolve "$st" "$rc" $((SECONDS - start)) 0 "tools, modules, test files, grid and causal cases"
  for spec in "${STAGES[@]}"; do
    IFS='|' read -r name cap cmd <<<"$spec"
    record "$name" planned 0 0 "$cap" "$cmd"
  done
  # The interpreter-sized kernels, once: tiny fwd+bwd under TRITON_INTERPRET=1 against the reference.
  start=$SECONDS
  cmd="TRITON_INTERPRET=1 $PY scripts/gpu_grid.py kernel-check --device cpu"
  echo "== gpu_check: kernel check: $cmd" | tee -a "$LOG"
  TRITON_INTERPRET=1 timeout -s INT -k 15 300 $PY scripts/gpu_grid.py kernel-check --device cpu 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  record kernel_check "$([ "$rc" = 0 ] && echo ok || echo failed)" "$rc" $((SECONDS - start)) 300 "$cmd"
  { echo; echo "## Kernel check (interpreter)"; echo; echo '```'; grep '"kernel_check"' "$LOG"; echo '```'; } >>"$PLAN"
  cat "$PLAN"
  summarise --dry-run >/dev/null
  grep -q $'^kernel_check\tok' "$WORK/stages.tsv" && grep -q $'^resolve\tok' "$WORK/stages.tsv"
  exit $?
fi

echo "== gpu_check: $(date -u '+%Y-%m-%d %H:%M:%S UTC'), budget $BUDGET s, output in $DIR" | tee -a "$LOG"
for spec in "${STAGES[@]}"; do
  IFS='|' read -r name cap cmd <<<"$spec"
  if wanted "$name"; then run_stage "$name" "$cap" "$cmd"; fi
done
summarise ""
! grep -qv $'\tok\t' "$WORK/stages.tsv"
