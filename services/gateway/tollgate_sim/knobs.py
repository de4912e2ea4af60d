"""The simulator's knobs: what it answers, how slowly, and how it fails.

Set at start from the command line, changed at run time with `POST /sim/config` (a JSON
object with any of these fields), and overridable per request with `x-sim-<field>` headers
(underscores as dashes), so one simulator serves tests that need different behaviour.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

FAULTS = ("none", "error", "stall", "reset", "cut")


@dataclass
class Knobs:
    model: str = "sim-llama"
    # Output tokens when the request has no max_tokens.
    default_tokens: int = 16
    # Delay before the first token, and between tokens, in milliseconds.
    ttft_ms: float = 0.0
    itl_ms: float = 0.0
    # none | error (answer `error_status`) | stall (never answer) | reset (drop the
    # connection before answering) | cut (a stream ends abruptly after `cut_after` tokens).
    fault: str = "none"
    fault_rate: float = 1.0
    error_status: int = 500
    cut_after: int = 4

    def validate(self) -> None:
        if self.fault not in FAULTS:
            raise ValueError(f"fault must be one of {', '.join(FAULTS)}")
        if self.default_tokens < 0 or self.cut_after < 0:
            raise ValueError("token counts must be >= 0")
        if self.ttft_ms < 0 or self.itl_ms < 0:
            raise ValueError("delays must be >= 0")
        if not 0.0 <= self.fault_rate <= 1.0:
            raise ValueError("fault_rate must be within [0, 1]")
        if not 100 <= self.error_status <= 599:
            raise ValueError("error_status must be an HTTP status")

    def updated(self, changes: dict[str, Any]) -> Knobs:
        """A copy with `changes` applied, coerced to each field's type, validated."""
        fields = {f.name: f for f in dataclasses.fields(self)}
        values: dict[str, Any] = {}
        for name, raw in changes.items():
            field = fields.get(name)
            if field is None:
                raise ValueError(f"unknown knob {name!r}")
            kind = {"str": str, "int": int, "float": float}[str(field.type)]
            values[name] = kind(raw)
        knobs = dataclasses.replace(self, **values)
        knobs.validate()
        return knobs

    def with_headers(self, headers: dict[bytes, bytes]) -> Knobs:
        """Apply `x-sim-*` request headers; the common case (none) costs one scan."""
        changes = {
            name[6:].decode().replace("-", "_"): value.decode()
            for name, value in headers.items()
            if name.startswith(b"x-sim-")
        }
        return self.updated(changes) if changes else self
