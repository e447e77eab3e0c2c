#!/usr/bin/env bash
# Paired VNN-COMP run: two versions of certorch side by side, one torch thread each, so that the
# VM's speed (which drifts by tens of percent between runs) hits both alike.
#
#   benchmarks/vnncomp_pair.sh A B BENCHMARKS OUT [benchmarks/vnncomp.py args, e.g. --limit 10]
#
# A, B: a git revision of this repository, optionally with verifier stages: REV or REV@STAGES
# (e.g. HEAD@pgd,ibp,crown,alpha-crown,bab:branch_candidates=3,milp). Each side runs from its own
# clone (PYTHONPATH), with this checkout's .venv; results: OUT_a.json / OUT_b.json (+ .log).
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 4 ] || { echo "usage: $0 A B BENCHMARKS OUT [vnncomp.py args]" >&2; exit 2; }
A=$1; B=$2; BENCH=$3; OUT=$4; shift 4
DATA=$(cd .. && pwd)/shared/vnncomp
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
side() {  # side NAME SPEC [vnncomp.py args]
  local name=$1 spec=$2 stages=""
  shift 2
  local rev=${spec%%@*}
  [[ $spec == *@* ]] && stages=${spec#*@}
  git clone -q . "$TMP/$name" && git -C "$TMP/$name" checkout -q "$(git rev-parse "$rev")"
  OMP_NUM_THREADS=1 PYTHONPATH="$TMP/$name" .venv/bin/python "$TMP/$name/benchmarks/vnncomp.py" --data "$DATA" \
    --benchmarks "$BENCH" ${stages:+--stages "$stages"} "$@" --json "${OUT}_$name.json" > "${OUT}_$name.log" 2>&1
}
mkdir -p "$(dirname "$OUT")"
side a "$A" "$@" &
side b "$B" "$@" &
wait
tail -n 12 "${OUT}_a.log" "${OUT}_b.log"
