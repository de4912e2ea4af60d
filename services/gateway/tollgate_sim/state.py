"""What one simulator process holds: the knobs, what it saw (stats), the engine model and
the stored /v1/responses objects."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from tollgate_sim.engine import Engine
from tollgate_sim.knobs import Knobs

RECENT = 32


@dataclass
class Stats:
    """What the simulator saw, for tests and benchmarks (`GET /sim/stats`)."""

    # Inference requests (generation, pooling, audio), not /v1/models polls or /health.
    requests: int = 0
    completed: int = 0
    # Streams or responses the client abandoned before the simulator finished them.
    cancelled: int = 0
    faults: int = 0
    # Usage the simulator reported in `usage` objects (what a gateway should account).
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # Tokens actually written, also those of cut or cancelled streams.
    tokens_sent: int = 0
    active: int = 0
    # The last POST's (or /v1/responses/{id}'s) headers, read as "last_headers".
    last_raw: dict[bytes, bytes] = field(default_factory=dict)
    # Prompt tokens the engine processed (prefill started), also of requests the client
    # abandoned before the first token or while a non-stream answer was pending.
    prompt_tokens_processed: int = 0
    # (method, path) -> requests, every route (also /v1/models, /metrics; not /sim/*);
    # read as "routes": {"METHOD /path": n}. Recorded raw, decoded when read.
    routes_raw: dict[tuple[bytes, bytes], int] = field(default_factory=dict)
    # The last RECENT requests' method, path and headers; read as "recent".
    recent: deque[tuple[bytes, bytes, dict[bytes, bytes]]] = field(
        default_factory=lambda: deque(maxlen=RECENT)
    )
    max_n: int = 0
    max_best_of: int = 0
    max_max_tokens: int = 0
    body_bytes: int = 0
    connections: int = 0
    # Keep-alive connections the simulator closed for idling (keepalive_timeout_s).
    idle_closed: int = 0

    def as_json(self, engine: Engine) -> dict[str, Any]:
        raw = ("last_raw", "routes_raw", "recent")
        out = {k: v for k, v in vars(self).items() if k not in raw}
        out["last_headers"] = _decode(self.last_raw)
        out["routes"] = {
            f"{m.decode()} {p.decode('latin-1')}": n for (m, p), n in self.routes_raw.items()
        }
        out["recent"] = [
            {"method": m.decode(), "path": p.decode("latin-1"), "headers": _decode(h)}
            for m, p, h in self.recent
        ]
        out["running"] = engine.running
        out["waiting"] = engine.waiting
        return out


def _decode(headers: dict[bytes, bytes]) -> dict[str, str]:
    return {k.decode("latin-1"): v.decode("latin-1") for k, v in headers.items()}


@dataclass
class State:
    knobs: Knobs
    stats: Stats = field(default_factory=Stats)
    engine: Engine = field(default_factory=Engine)
    # response id -> the stored ResponsesResponse dict (store=true), as vLLM keeps them.
    responses: dict[str, dict[str, Any]] = field(default_factory=dict)

    def reset(self) -> None:
        """Stats and counters to zero; requests in flight keep their engine places."""
        self.stats = Stats()
        engine = self.engine
        engine.prompt_tokens = engine.generation_tokens = 0
        engine.prefix_queries = engine.prefix_hits = engine.preemptions = 0
        engine.success.clear()
        engine.reset_cache()
        self.responses.clear()


def resolve_model(knobs: Knobs, requested: Any) -> tuple[str, str | None] | None:
    """(the name answers carry, the LoRA adapter) for a requested model, None if not
    served. vLLM names answers by the first served name (`OpenAIServingModels.model_name`),
    or by the adapter; a missing model means the first."""
    if requested is None or requested == "":
        return knobs.model, None
    if requested in knobs.lora_names:
        return str(requested), str(requested)
    if requested in knobs.served_names:
        return knobs.model, None
    return None
