#!/usr/bin/env bash
# The real-GPU check of the GPU exporter, in one command (under 5 minutes on one GPU):
#
#   bench/gpu_check.sh [OUT_DIR]        # default: $OUT, else a new temporary folder
#
# Needs the machine's NVIDIA driver and a Python >= 3.10 (PYTHON=... to choose one) and the
# repository's files; no venv, no registry. pynvml comes from that Python if it has one, else
# from bench/gpu_check/vendor/ (made by bench/gpu_check/prepare.sh, ~50 KiB). Prints one
# PASS/FAIL/SKIP/INFO line per check and writes everything it saw to OUT_DIR (see
# bench/gpu_check/check.py). Only reads GPU state and puts load on it: no settings changed.
set -uo pipefail
cd "$(dirname "$0")/.."
# The first Python >= 3.10 (the exporter's dataclasses need it), unless PYTHON names one.
PY=${PYTHON:-}
if [[ -z $PY ]]; then
  for candidate in python3 python3.13 python3.12 python3.11 python3.10; do
    if command -v "$candidate" >/dev/null &&
      "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
      PY=$candidate
      break
    fi
  done
fi
if [[ -z $PY ]]; then
  echo "FAIL  a Python >= 3.10: none found (set PYTHON=...)"
  exit 2
fi
OUT_DIR=${1:-${OUT:-}}
exec timeout -k 10 290 "$PY" bench/gpu_check/check.py ${OUT_DIR:+--out "$OUT_DIR"}
