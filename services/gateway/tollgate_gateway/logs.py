"""JSON logs on stdout: one object per line, for log pipelines rather than eyes.

Every line has `ts`, `level`, `logger` and `msg`; structured fields come from a log
call's `extra` (merged in). Requests get exactly one line each (`AccessLog`). No key,
prompt or completion is ever passed to a logger, so none can appear here.
"""

from __future__ import annotations

import asyncio
import json
import logging
import select
import sys
import time
from json.encoder import encode_basestring_ascii
from typing import Any, TextIO

from tollgate_gateway.record import Phase, RequestRecord

# Attributes every LogRecord has; anything else on a record came from `extra`.
# (uvicorn adds `color_message`, for terminals.)
_STANDARD = set(logging.makeLogRecord({}).__dict__) | {
    "message",
    "asctime",
    "taskName",
    "color_message",
}


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
    # uvicorn's own loggers propagate to ours; its access log is replaced by AccessLog.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True
    logging.getLogger("uvicorn.access").disabled = True


# The request line's fields, in order; a template rather than `json.dumps` of a dict,
# which cost 2.5 times as much on every request. Strings go through the json module's
# own escaping; numbers are Python's repr, as `json.dumps` writes them.
_REQUEST_LINE = (
    '{"ts":"%s","level":"info","logger":"tollgate.access","msg":"request","event":"request",'
    '"request_id":%s,"key":%s,"model":%s,"route":%s,"operation":%s,"stream":%s,"status":%d,'
    '"upstream_status":%s,"error":%s,"prompt_tokens":%d,"completion_tokens":%d,'
    '"usage_exact":%s,"latency_ms":%r,"ttft_ms":%s,"overhead_ms":%r,'
    '"client_disconnected":%s}'
)
_NULL = "null"
_BOOL = {True: "true", False: "false"}


def _text(value: str | None) -> str:
    return _NULL if value is None else encode_basestring_ascii(value)


class AccessLog:
    """The one line per request, written in batches.

    It runs on every request, so it skips the logging module (record objects, handler
    locks, a write and flush per line): a line is one template filled and appended, and
    the lines leave together at most `interval` seconds later (or every `max_lines`).
    `flush` runs at shutdown; a crash loses at most `interval` of log lines, never usage.
    The workers of a pod share stdout, a pipe: each write holds whole lines and at most
    `PIPE_BUF` bytes, the most a pipe writes without interleaving another writer's bytes.
    """

    def __init__(
        self,
        stream: TextIO | None = None,
        interval: float = 0.2,
        max_lines: int = 256,
        worker: int | None = None,
    ):
        """`worker`: this process's index among the pod's workers, named on each line."""
        self.stream = stream or sys.stdout
        self.interval = interval
        self.max_lines = max_lines
        self.worker = worker
        self.enabled = logging.getLogger("tollgate.access").isEnabledFor(logging.INFO)
        self._lines: list[str] = []
        self._timer: asyncio.TimerHandle | None = None
        self._second = 0
        self._second_text = ""

    def write(self, ex: RequestRecord, latency_seconds: float) -> None:
        if not self.enabled:
            return
        usage = ex.usage
        ttft = ex.ttft_seconds
        line = _REQUEST_LINE % (
            self._timestamp(),
            _text(ex.request_id),
            _text(ex.key_name),
            _text(ex.model),
            _text(ex.route),
            _text(ex.operation),
            _BOOL[ex.stream],
            ex.status,
            _NULL if ex.upstream_status is None else ex.upstream_status,
            _text(ex.error),
            usage.prompt_tokens if usage else 0,
            usage.completion_tokens if usage else 0,
            _BOOL[ex.usage_exact] if usage else _NULL,
            round(latency_seconds * 1000, 3),
            _NULL if ttft is None else round(ttft * 1000, 3),
            round((latency_seconds - ex.upstream_seconds) * 1000, 3),
            _BOOL[ex.phase is Phase.ABANDONED],
        )
        if self.worker is not None:
            line = f'{line[:-1]},"worker":{self.worker}}}'
        self._lines.append(line)
        if len(self._lines) >= self.max_lines:
            self.flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.interval, self.flush)

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        chunk: list[str] = []
        size = 0
        for line in self._lines:
            if chunk and size + len(line) + 1 > select.PIPE_BUF:
                self._write(chunk)
                chunk, size = [], 0
            chunk.append(line)
            size += len(line) + 1  # JSON with ensure_ascii: one byte a character
        if chunk:
            self._write(chunk)
        self._lines.clear()

    def _write(self, lines: list[str]) -> None:
        self.stream.write("\n".join(lines) + "\n")
        self.stream.flush()

    def _timestamp(self) -> str:
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._second_text}.{int((now - second) * 1000):03d}Z"
