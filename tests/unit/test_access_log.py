"""The request log line: valid JSON whatever the client named, every field as the log
pipelines (docs/observability.md) read it."""

from __future__ import annotations

import asyncio
import io
import json

from tollgate_contract.usage import Usage
from tollgate_gateway.logs import AccessLog
from tollgate_gateway.record import Phase, RequestRecord


def _lines(*records: tuple[RequestRecord, float], worker: int | None = None) -> list[dict]:
    stream = io.StringIO()

    async def write() -> None:
        log = AccessLog(stream=stream, worker=worker)
        log.enabled = True
        for record, latency in records:
            log.write(record, latency)
        log.flush()

    asyncio.run(write())
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_a_served_request_has_every_field() -> None:
    record = RequestRecord(route="/v1/chat/completions", operation="chat", started=0.0)
    record.request_id, record.key_name, record.model = "req-1", "team-a", "llama"
    record.stream, record.status, record.upstream_status = True, 200, 200
    record.usage = Usage(prompt_tokens=12, completion_tokens=34)
    record.ttft_seconds, record.upstream_seconds = 0.0123456, 0.05
    record.phase = Phase.RESPONDED
    (line,) = _lines((record, 0.0612345))
    timestamp = line.pop("ts")
    assert timestamp.endswith("Z") and len(timestamp) == len("2026-12-02T18:43:41.123Z")
    assert line == {
        "level": "info",
        "logger": "tollgate.access",
        "msg": "request",
        "event": "request",
        "request_id": "req-1",
        "key": "team-a",
        "model": "llama",
        "route": "/v1/chat/completions",
        "operation": "chat",
        "stream": True,
        "status": 200,
        "upstream_status": 200,
        "error": None,
        "prompt_tokens": 12,
        "completion_tokens": 34,
        "usage_exact": True,
        "latency_ms": 61.234,
        "ttft_ms": 12.346,
        "overhead_ms": 11.234,
        "client_disconnected": False,
    }


def test_what_the_client_sent_cannot_break_the_line() -> None:
    """A model name is the client's text: quotes, backslashes, line breaks and non-ASCII
    arrive as they were, in one line of JSON."""
    record = RequestRecord(route="/v1/completions", operation="text_completion", started=0.0)
    record.model = 'x","key":"admin"\n\\ é 模型 \u2028'
    record.status, record.error = 400, "invalid_json"
    record.phase = Phase.ABANDONED
    (line,) = _lines((record, 0.001), worker=3)
    assert line["model"] == record.model
    assert line["key"] is None and line["upstream_status"] is None
    assert line["usage_exact"] is None and line["ttft_ms"] is None
    assert line["error"] == "invalid_json" and line["client_disconnected"] is True
    assert line["worker"] == 3
