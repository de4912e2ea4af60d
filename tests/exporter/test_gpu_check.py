"""bench/gpu_check.sh end to end over the stand-in library: it must run where it will run for
real (a machine's own Python, the repository's files) and say what it could not check."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from conftest import Scenario, h100

REPO = Path(__file__).resolve().parents[2]


def test_gpu_check_runs_end_to_end_on_the_stand_in(fake_nvml_dir: Path, tmp_path: Path) -> None:
    scenario = Scenario(tmp_path / "gpus.ini", gpus=[h100(0, util_gpu=2, gpm_sm_util=1.0)])
    scenario.write()
    out = tmp_path / "out"
    env = {
        **{k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "OUT")},
        "LD_LIBRARY_PATH": str(fake_nvml_dir),
        "FAKE_NVML_SCENARIO": str(scenario.path),
        "PYTHON": sys.executable,
        "PATH": "/usr/bin:/bin",  # no nvidia-smi, as on a bare machine
    }
    proc = subprocess.Popen(
        [str(REPO / "bench" / "gpu_check.sh"), str(out)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        stdout, _ = proc.communicate(timeout=280)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = stdout.decode(errors="replace")
    assert proc.returncode == 0, text
    lines = text.splitlines()
    assert all(line.split(" ", 1)[0] in ("PASS", "FAIL", "SKIP", "INFO") for line in lines), text
    assert "PASS  NVML up in the exporter: 1.0 GPU(s)" in lines, text
    assert any(
        line.startswith("PASS  GPU 0 NVIDIA H100 80GB HBM3 (as uid") and "families present" in line
        for line in lines
    ), text
    assert "SKIP  idle: comparison with nvidia-smi: no nvidia-smi here" in lines, text
    assert any(line.startswith("SKIP  load checks") for line in lines), text
    assert any(line.startswith("PASS  20 concurrent scrapers") for line in lines), text
    assert any("NVML time per collect" in line for line in lines), text
    runtime = json.loads((out / "runtime.json").read_text())
    assert runtime["uid"] == os.getuid() and runtime["pynvml_version"]
    for name in ("idle.prom", "idle-dcgm.prom", "nvml-timing.json", "report.txt"):
        assert (out / name).stat().st_size > 0, name
    results = json.loads((out / "results.json").read_text())
    assert results["summary"]["FAIL"] == 0
    assert "gpu_utilization_percent{" in (out / "idle.prom").read_text()
