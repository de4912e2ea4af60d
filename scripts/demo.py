"""`make demo`: the simulator and the gateway on localhost, with a fresh demo key.

Prints the key, a curl line and an OpenAI SDK line, sends one request through to show it
works, and stops both processes cleanly on Ctrl-C (or SIGTERM).
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

BIN = Path(sys.executable).parent


def port(preferred: int) -> int:
    """`preferred` when free, else any free port."""
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", preferred))
        except OSError:
            sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"demo: {proc.args[0]} exited with status {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    sys.exit(f"demo: {url} did not become ready")


def main() -> None:
    sim_port = port(int(os.environ.get("DEMO_SIM_PORT", 8000)))
    gw_port = port(int(os.environ.get("DEMO_GATEWAY_PORT", 8080)))
    key = "sk-demo-" + secrets.token_urlsafe(24)
    # Children get sessions of their own: a terminal's Ctrl-C reaches only this script,
    # which then stops them in order (the gateway drains first).
    sim = subprocess.Popen(
        [str(BIN / "tollgate-sim"), "--port", str(sim_port), "--itl-ms", "30"],
        stdout=subprocess.DEVNULL,
        start_new_session=True,
    )
    env = {
        **os.environ,
        "VLLM_URL": f"http://127.0.0.1:{sim_port}",
        "GATEWAY_HOST": "127.0.0.1",
        "GATEWAY_PORT": str(gw_port),
        "GATEWAY_API_KEYS": f"demo:{key}",
        "GATEWAY_DRAIN_SECONDS": "5",
    }
    log_path = Path(os.environ.get("DEMO_LOG", "demo-gateway.log"))
    with log_path.open("wb") as log:
        gateway = subprocess.Popen(
            [str(BIN / "tollgate-gateway")],
            env=env,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
    stop = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        base = f"http://127.0.0.1:{gw_port}"
        wait_ready(base + "/ready", gateway)
        request = urllib.request.Request(
            base + "/v1/chat/completions",
            data=b'{"model":"sim-llama","messages":[{"role":"user","content":"hi"}],"max_tokens":8}',
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as r:
            answer = r.read().decode()
        print(
            f"""
tollgate is running: gateway {base} -> simulated vLLM on 127.0.0.1:{sim_port}
gateway log (JSON lines): {log_path}

demo key:  {key}

one request went through:
  {answer[:160]}...

try it:
  curl -N {base}/v1/chat/completions \\
    -H 'Authorization: Bearer {key}' -H 'Content-Type: application/json' \\
    -d '{{"model": "sim-llama", "stream": true, "messages": [{{"role": "user", "content": "hi"}}]}}'

  {sys.executable} - <<'PY'
import openai
client = openai.OpenAI(base_url="{base}/v1", api_key="{key}")
reply = client.chat.completions.create(
    model="sim-llama", messages=[{{"role": "user", "content": "hi"}}]
)
print(reply.choices[0].message.content)
PY

press Ctrl-C to stop
""",
            flush=True,
        )
        while not stop and gateway.poll() is None and sim.poll() is None:
            time.sleep(0.2)
    finally:
        for proc in (gateway, sim):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        codes = [proc.wait(15) for proc in (gateway, sim)]
        print(f"stopped (gateway exit {codes[0]}, simulator exit {codes[1]})", flush=True)
    sys.exit(0 if codes == [0, 0] else 1)


if __name__ == "__main__":
    main()
