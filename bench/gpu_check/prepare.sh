#!/usr/bin/env bash
# Prepare the small folder bench/gpu_check.sh needs on a GPU machine without a package
# registry: the nvidia-ml-py wheel (pure Python, ~50 KiB) in bench/gpu_check/vendor/.
# Run it here, where pip can reach a registry; the check uses the machine's own pynvml first.
#
#   bench/gpu_check/prepare.sh [VERSION]     # default: the version in the project's venv
set -euo pipefail
cd "$(dirname "$0")"
PIP=${PIP:-../../.venv/bin/pip}
[[ -x $PIP ]] || PIP="python3 -m pip"
VERSION=${1:-$($PIP show nvidia-ml-py 2>/dev/null | sed -n 's/^Version: //p')}
VERSION=${VERSION:-13.615.71}
rm -rf vendor
mkdir -p vendor
$PIP download --quiet --no-deps --only-binary=:all: "nvidia-ml-py==$VERSION" -d vendor
ls -l vendor
echo "bench/gpu_check/vendor is ready ($(du -sh vendor | cut -f1)); copy it with the repository."
