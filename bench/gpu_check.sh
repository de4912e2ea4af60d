#!/usr/bin/env bash
# One-command check of the GPU exporter on a machine with a real NVIDIA GPU and driver.
#
#   bench/gpu_check.sh            # uses .venv/bin/python if present, else python3
#
# Starts tollgate-gpu-exporter against the real libnvidia-ml (no stand-in, no fake GPUs),
# scrapes it twice, and prints every metric with its value, the scrape and collect durations,
# RSS, and what NVML answered NOT_SUPPORTED. Exits non-zero unless NVML came up with >= 1 GPU
# and both scrapes returned GPU series. Needs nothing but the repo's Python dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-}
if [[ -z "$PY" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONPATH="services/gpu-exporter${PYTHONPATH:+:$PYTHONPATH}"
unset FAKE_NVML_SCENARIO

command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=index,name,driver_version,uuid \
  --format=csv,noheader || echo "(nvidia-smi not found; relying on NVML alone)"

exec "$PY" - <<'PY'
import os, re, signal, socket, subprocess, sys, time, urllib.request

with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
log = open("/tmp/gpu_check_exporter.log", "wb")
proc = subprocess.Popen(
    [sys.executable, "-m", "tollgate_exporter.main", "--host", "127.0.0.1", "--port", str(port),
     "--interval", "1", "--pod-resources-socket", os.environ.get("POD_RESOURCES_SOCKET", "")],
    stdout=log, stderr=subprocess.STDOUT,
)

def scrape():
    t = time.perf_counter()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        body = r.read().decode()
    return body, (time.perf_counter() - t) * 1e3

def value(body, name):
    m = re.search(rf"^{name} (\S+)$", body, re.M)
    return float(m.group(1)) if m else float("nan")

ok = False
try:
    deadline = time.monotonic() + 30
    body = ""
    while time.monotonic() < deadline:
        try:
            body, _ = scrape()
            if value(body, "gpu_exporter_collects_total") >= 2:
                break
        except OSError:
            pass
        time.sleep(0.2)
    first, ms1 = scrape()
    time.sleep(1.5)  # at least one more collect, so counters and GPM ratios have moved
    second, ms2 = scrape()
    series = [l for l in second.splitlines() if l and not l.startswith("#")]
    print(f"\n=== {len(series)} series from the second scrape ===")
    for line in series:
        print(line)
    rss = next(l for l in open(f"/proc/{proc.pid}/status") if l.startswith("VmRSS")).split()[1]
    gpus = value(second, "gpu_exporter_gpus")
    up = value(second, "gpu_exporter_nvml_up")
    unsupported = sorted(set(re.findall(r'gpu_exporter_unsupported_metric\{.*call="([^"]+)"', second)))
    print("\n=== summary ===")
    print(f"nvml_up {up:.0f}, GPUs {gpus:.0f}")
    print(f"scrape durations: {ms1:.2f} ms, {ms2:.2f} ms")
    print(f"collect duration: {value(second, 'gpu_exporter_collect_duration_seconds') * 1e3:.2f} ms")
    print(f"RSS: {int(rss) / 1024:.1f} MiB")
    print(f"NOT_SUPPORTED calls: {', '.join(unsupported) or 'none'}")
    ok = up == 1 and gpus >= 1 and "gpu_utilization_percent{" in first + second
finally:
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=10)
    log.close()
    print("\n=== exporter log ===")
    print(open("/tmp/gpu_check_exporter.log").read())
print("GPU CHECK:", "PASS" if ok else "FAIL")
sys.exit(0 if ok else 1)
PY
