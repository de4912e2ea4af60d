"""`make demo`'s script: it starts, prints a key that works, and stops cleanly on Ctrl-C."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import openai
from servers import free_port

ROOT = Path(__file__).resolve().parents[2]


def test_demo_runs_end_to_end_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "DEMO_SIM_PORT": str(free_port()),
        "DEMO_GATEWAY_PORT": str(free_port()),
        "DEMO_LOG": str(tmp_path / "gw.log"),
    }
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "demo.py")],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, like a terminal's foreground job
    )
    assert proc.stdout is not None
    out = ""
    for line in proc.stdout:
        out += line
        if "press Ctrl-C" in line:
            break
    key = re.search(r"demo key:\s+(\S+)", out).group(1)
    base = re.search(r"gateway (http://\S+)", out).group(1)
    assert "chat.completion" in out  # the demo's own request went through
    client = openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0)
    reply = client.chat.completions.create(
        model="sim-llama", messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )
    assert reply.choices[0].message.content == "Hello from"
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the whole foreground group gets it
    rest, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out + rest
    assert "gateway exit 0, simulator exit 0" in rest
    # The key is printed for the user, never logged by the gateway.
    assert key not in (tmp_path / "gw.log").read_text()
