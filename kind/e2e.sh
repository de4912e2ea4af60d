#!/usr/bin/env bash
# End to end on a throwaway kind cluster, as a platform engineer's first hour:
#   1. create the cluster (kind/cluster.yaml), build the three images and load them;
#   2. deploy the upstream simulator as the stand-in vLLM (kind/vllm-sim.yaml);
#   3. helm install the chart with its default values, wait for the gateway, `helm test`;
#   4. create an ApiKey, read its generated key, call the gateway through a Service with curl
#      and with the OpenAI SDK (chat, stream), check /v1/usage and `kubectl get apikeys`;
#   5. run the tests marked `cluster` (tests/operator, tests/chart) against it;
#   6. what only a real cluster shows: a deleted gateway Deployment comes back (drift
#      repair), Postgres refuses a pod that is not a gateway (NetworkPolicy, enforced by
#      kindnet), and `helm uninstall` then `kubectl delete namespace` end (no finalizers);
#   7. delete the cluster (KEEP_CLUSTER=1 keeps it, and reuses it on the next run).
#
# Needs: docker (running), kind, and the repository's .venv (make test creates it); helm
# and kubectl from PATH or else from scripts/chart-tools.sh. Without Docker or kind (as on
# CI) it stops at once and says so; the chart is then checked by `pytest tests/chart`.
#
# Environment: KIND_CLUSTER (tollgate-e2e), TOLLGATE_NAMESPACE (tollgate), KEEP_CLUSTER,
# KIND_NODE_IMAGE (kind's default), DOCKER and KIND (the binaries to use).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
cluster="${KIND_CLUSTER:-tollgate-e2e}"
ns="${TOLLGATE_NAMESPACE:-tollgate}"
release=tollgate
docker="${DOCKER:-docker}"
kind="${KIND:-kind}"
python="$root/.venv/bin/python"
port=30080
base="http://127.0.0.1:$port"

say() { printf '\n== e2e: %s\n' "$*" >&2; }
die() {
  printf 'e2e: %s\n' "$*" >&2
  exit 1
}

# ---- 0. prerequisites, all checked before anything is created --------------------------
missing=()
if ! command -v "$docker" >/dev/null 2>&1; then
  missing+=("docker is not installed (kind runs its nodes as Docker containers, and the images are built with it): install Docker Engine or Docker Desktop")
elif ! "$docker" info >/dev/null 2>&1; then
  missing+=("docker is installed but its daemon does not answer ('$docker info' failed): start Docker, or check your permission on its socket")
fi
if ! command -v "$kind" >/dev/null 2>&1; then
  missing+=("kind is not installed: see https://kind.sigs.k8s.io/docs/user/quick-start/#installation (e.g. 'go install sigs.k8s.io/kind@latest')")
else
  # kind before 0.22 boots Kubernetes older than the chart's kubeVersion (>=1.29).
  kind_version="$("$kind" version 2>/dev/null | sed -n 's/^kind v\([0-9]*\)\.\([0-9]*\).*/\1 \2/p')"
  read -r kind_major kind_minor <<<"${kind_version:-0 0}"
  if [ "$kind_major" -eq 0 ] && [ "$kind_minor" -lt 22 ]; then
    missing+=("kind ${kind_major}.${kind_minor} is too old: 0.22 or newer is needed (older ones boot Kubernetes below the chart's kubeVersion >=1.29); upgrade kind")
  fi
fi
if [ ! -x "$python" ] || ! "$python" -c 'import openai' 2>/dev/null; then
  missing+=("$python with the openai package is missing: run 'make test' (or 'python3 -m venv .venv && .venv/bin/pip install -e .[dev]') first")
fi
command -v curl >/dev/null 2>&1 || missing+=("curl is not installed")
if ((${#missing[@]})); then
  printf 'e2e: cannot run the kind end-to-end test here:\n' >&2
  printf '  - %s\n' "${missing[@]}" >&2
  printf 'Without a cluster, the chart is checked by: .venv/bin/python -m pytest tests/chart\n' >&2
  exit 2
fi
if ! command -v helm >/dev/null 2>&1 || ! command -v kubectl >/dev/null 2>&1; then
  scripts/chart-tools.sh
  PATH="$(scripts/chart-tools.sh --print-bin):$PATH"
fi
helm version --short | grep -q '^v[34]\.' || die "helm v3 or v4 is needed (found $(helm version --short))"

tag="$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' charts/tollgate/Chart.yaml)"
[ -n "$tag" ] || die "could not read appVersion from charts/tollgate/Chart.yaml"
pg_image="$(sed -n '/^    image:$/,/tag:/p' charts/tollgate/values.yaml | awk '/repository:/ {r=$2} /tag:/ {gsub(/"/, "", $2); t=$2} END {print r ":" t}')"

work="$(mktemp -d)"
export KUBECONFIG="$work/kubeconfig"

# ---- cleanup and diagnostics ----------------------------------------------------------
created=0
finish() {
  local status=$?
  if [ "$status" -ne 0 ] && [ -s "$KUBECONFIG" ]; then
    say "FAILED (exit $status): cluster state"
    kubectl get all,inferencegateways,apikeys,quotapolicies,secrets -n "$ns" -o wide >&2 || true
    kubectl get events -n "$ns" --sort-by=.lastTimestamp 2>&1 | tail -40 >&2 || true
    kubectl logs -n "$ns" "deployment/$release-operator" --tail=100 >&2 || true
    kubectl logs -n "$ns" "deployment/$release-gateway" --tail=50 >&2 || true
  fi
  if [ "$created" = 1 ] && [ "${KEEP_CLUSTER:-0}" != 1 ]; then
    say "deleting cluster $cluster"
    "$kind" delete cluster --name "$cluster" >&2 || true
  elif [ "$created" = 1 ]; then
    say "kept cluster $cluster: export KUBECONFIG=\$(mktemp) && $kind get kubeconfig --name $cluster > \$KUBECONFIG"
  fi
  rm -rf "$work"
  exit "$status"
}
trap finish EXIT

# Poll `$@` until it succeeds, for at most $1 seconds.
retry() {
  local timeout=$1 what=$2
  shift 2
  local deadline=$((SECONDS + timeout))
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || die "not within ${timeout}s: $what"
    sleep 2
  done
}

# ---- 1. cluster and images ------------------------------------------------------------
if "$kind" get clusters 2>/dev/null | grep -qx "$cluster"; then
  say "reusing cluster $cluster"
else
  say "creating cluster $cluster"
  "$kind" create cluster --name "$cluster" --config kind/cluster.yaml --wait 180s \
    ${KIND_NODE_IMAGE:+--image "$KIND_NODE_IMAGE"}
fi
created=1
"$kind" get kubeconfig --name "$cluster" >"$KUBECONFIG"
kubectl version >&2

say "building images (tag $tag)"
for image in gateway operator gpu-exporter; do
  "$docker" build -f "docker/Dockerfile.$image" -t "tollgate/$image:$tag" .
done
# One platform, the nodes': with Docker's containerd image store (default in Docker 29) a
# pulled image is a multi-platform index whose other platforms are not on disk, and
# `kind load docker-image` fails on it. `docker save --platform | kind load image-archive`
# works with either image store.
platform="linux/$("$docker" version --format '{{.Server.Arch}}')"
"$docker" image inspect "$pg_image" >/dev/null 2>&1 || "$docker" pull --platform "$platform" "$pg_image"
save_flags=()
if "$docker" save --help 2>/dev/null | grep -q -- '--platform'; then
  save_flags=(--platform "$platform")
fi
say "loading images into the cluster ($platform)"
for image in "tollgate/gateway:$tag" "tollgate/operator:$tag" "tollgate/gpu-exporter:$tag" "$pg_image"; do
  "$docker" save "${save_flags[@]}" -o "$work/image.tar" "$image" ||
    die "docker save $image failed (pull it again with --platform $platform)"
  "$kind" load image-archive --name "$cluster" "$work/image.tar" ||
    die "kind load image-archive failed for $image"
done
rm -f "$work/image.tar"

# ---- 2. the stand-in vLLM -------------------------------------------------------------
say "deploying the upstream simulator as vllm:8000"
kubectl create namespace "$ns" --dry-run=client -o yaml | kubectl apply -f -
# Every pod of the chart (and of the operator's gateways) meets Pod Security "restricted":
# let the API server enforce it, so a regression fails here.
kubectl label namespace "$ns" pod-security.kubernetes.io/enforce=restricted --overwrite
kubectl -n "$ns" apply -f kind/vllm-sim.yaml
kubectl -n "$ns" rollout status deployment/vllm --timeout=120s

# ---- 3. helm install ------------------------------------------------------------------
say "helm install $release (default values)"
helm upgrade --install "$release" charts/tollgate -n "$ns" --wait --timeout 5m
retry 120 "the operator to create deployment/$release-gateway" \
  kubectl -n "$ns" get "deployment/$release-gateway"
kubectl -n "$ns" rollout status "deployment/$release-gateway" --timeout=300s
kubectl -n "$ns" get inferencegateways,quotapolicies >&2
say "helm test"
helm test "$release" -n "$ns" --logs

# ---- 4. a key, and calls through a Service ----------------------------------------------
kubectl -n "$ns" apply -f kind/gateway-nodeport.yaml
say "creating ApiKey e2e-key"
kubectl -n "$ns" apply -f - <<YAML
apiVersion: tollgate.dev/v1alpha1
kind: ApiKey
metadata:
  name: e2e-key
spec:
  gateway: $release
YAML
retry 60 "the generated key Secret e2e-key-key" kubectl -n "$ns" get secret e2e-key-key
key="$(kubectl -n "$ns" get secret e2e-key-key -o jsonpath='{.data.key}' | base64 -d)"
[[ "$key" == sk-tg-* ]] || die "unexpected generated key format"

models_ok() {
  [ "$(curl -s -o /dev/null -w '%{http_code}' "$base/v1/models" -H "Authorization: Bearer $key")" = 200 ]
}
retry 90 "the key to be accepted at $base (operator -> config Secret -> gateways)" models_ok

say "curl: chat completion through the NodePort Service"
answer="$(curl -sS --fail-with-body "$base/v1/chat/completions" \
  -H "Authorization: Bearer $key" -H 'Content-Type: application/json' \
  -d '{"model": "sim-llama", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8}')"
echo "$answer" >&2
"$python" -c 'import json, sys; a = json.loads(sys.argv[1]); assert a["choices"] and a["usage"]["completion_tokens"] > 0, a' "$answer"
status="$(curl -s -o /dev/null -w '%{http_code}' "$base/v1/models" -H 'Authorization: Bearer sk-wrong-key-0123456789')"
[ "$status" = 401 ] || die "a wrong key got HTTP $status, not 401"

say "OpenAI SDK: models, chat, stream"
TOLLGATE_KEY="$key" TOLLGATE_URL="$base/v1" "$python" - <<'PY'
import os

import openai

client = openai.OpenAI(base_url=os.environ["TOLLGATE_URL"], api_key=os.environ["TOLLGATE_KEY"])
models = [m.id for m in client.models.list()]
assert "sim-llama" in models, models
reply = client.chat.completions.create(
    model="sim-llama", messages=[{"role": "user", "content": "hi"}], max_tokens=8
)
assert reply.choices[0].message.content, reply
chunks = list(
    client.chat.completions.create(
        model="sim-llama", messages=[{"role": "user", "content": "hi"}], max_tokens=16, stream=True
    )
)
text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
assert text, chunks
try:
    openai.OpenAI(base_url=os.environ["TOLLGATE_URL"], api_key="sk-not-a-key-000000").models.list()
except openai.AuthenticationError:
    pass
else:
    raise AssertionError("a wrong key was accepted")
print(f"SDK ok: {len(chunks)} stream chunks, {len(text)} characters")
PY

say "/v1/usage and kubectl get apikeys"
usage="$(curl -sS --fail-with-body "$base/v1/usage" -H "Authorization: Bearer $key")"
echo "$usage" >&2
"$python" -c 'import json, sys; u = json.loads(sys.argv[1]); assert u["tokens_used"] > 0 and u["requests"] >= 3, u' "$usage"
kubectl -n "$ns" get apikeys -o wide >&2
ready() {
  [ "$(kubectl -n "$ns" get apikey e2e-key -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}')" = True ]
}
retry 60 "ApiKey e2e-key to report Ready=True" ready

# ---- 5. the cluster-marked tests ------------------------------------------------------
say "pytest -m cluster"
TOLLGATE_NAMESPACE="$ns" "$python" -m pytest -m cluster -q tests/operator tests/chart

# ---- 6. what only a real cluster shows ------------------------------------------------
say "drift repair: deleting deployment/$release-gateway"
kubectl -n "$ns" delete "deployment/$release-gateway" --wait=true
retry 60 "the operator to restore deployment/$release-gateway" \
  kubectl -n "$ns" get "deployment/$release-gateway"
kubectl -n "$ns" rollout status "deployment/$release-gateway" --timeout=300s

say "NetworkPolicy: Postgres refuses a pod that is not a gateway"
kubectl create namespace e2e-outsider --dry-run=client -o yaml | kubectl apply -f -
if kubectl -n e2e-outsider run probe --rm -i --restart=Never --image="$pg_image" \
  --command -- pg_isready -t 5 -h "$release-postgres.$ns.svc" -p 5432 >&2; then
  die "a pod outside the release reached Postgres: the NetworkPolicy is not enforced"
fi
kubectl delete namespace e2e-outsider --wait=false >&2

say "uninstall ends: helm uninstall, then the namespace"
helm uninstall "$release" -n "$ns" --wait --timeout 2m
timeout 120 kubectl delete namespace "$ns" --wait=true ||
  die "namespace $ns stuck Terminating after helm uninstall (a finalizer without its operator?)"

say "all good"
