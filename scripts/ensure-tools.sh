#!/usr/bin/env bash
# System tools the tests need besides Python packages: promtool (checks real scrapes and
# alert rules) and a C compiler (builds the stand-in libnvidia-ml for the exporter tests).
# Installed with apt-get when missing, so `make test` works on a fresh Debian machine.
set -euo pipefail
missing=()
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
command -v gcc >/dev/null 2>&1 || missing+=(gcc libc6-dev)
((${#missing[@]})) || exit 0
if ! command -v apt-get >/dev/null 2>&1; then
  echo "ensure-tools: please install: ${missing[*]} (promtool, gcc)" >&2
  exit 1
fi
sudo=""
[ "$(id -u)" = 0 ] || sudo="sudo"
echo "ensure-tools: installing ${missing[*]}" >&2
# The prometheus package would start a server; only its promtool binary is wanted.
export DEBIAN_FRONTEND=noninteractive RUNLEVEL=1
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null 2>&1 || {
  $sudo apt-get update -qq >/dev/null
  $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}
