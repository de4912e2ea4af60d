"""JSON logs on stdout: one object per line, for log pipelines rather than eyes.

Every line has `ts`, `level`, `logger` and `msg`; structured fields come from a log
call's `extra` (merged in). Requests get exactly one line each (`request_log`). No key,
prompt or completion is ever passed to a logger, so none can appear here.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from tollgate_gateway.exchange import Exchange

# Attributes every LogRecord has; anything else on a record came from `extra`.
# (uvicorn adds `color_message`, for terminals.)
_STANDARD = set(logging.makeLogRecord({}).__dict__) | {
    "message",
    "asctime",
    "taskName",
    "color_message",
}

access = logging.getLogger("tollgate.access")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for name, value in record.__dict__.items():
            if name not in _STANDARD:
                entry[name] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, separators=(",", ":"))


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # uvicorn's own loggers propagate to ours; its access log is replaced by request_log.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True
    logging.getLogger("uvicorn.access").disabled = True


def request_log(ex: Exchange, latency_seconds: float) -> None:
    if not access.isEnabledFor(logging.INFO):
        return
    usage = ex.usage
    access.info(
        "request",
        extra={
            "event": "request",
            "request_id": ex.request_id,
            "key": ex.key_name,
            "model": ex.model,
            "route": ex.route,
            "stream": ex.stream,
            "status": ex.status,
            "upstream_status": ex.upstream_status,
            "error": ex.error,
            "prompt_tokens": usage.prompt_tokens if usage else 0,
            "completion_tokens": usage.completion_tokens if usage else 0,
            "usage_exact": usage.exact if usage else None,
            "latency_ms": round(latency_seconds * 1000, 3),
            "ttft_ms": round(ex.ttft_seconds * 1000, 3) if ex.ttft_seconds is not None else None,
            "overhead_ms": round((latency_seconds - ex.upstream_seconds) * 1000, 3),
            "client_disconnected": ex.client_gone,
        },
    )
