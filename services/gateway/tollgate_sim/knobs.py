"""The simulator's knobs: what it answers, how slowly, and how it fails.

Set at start from the command line, changed at run time with `POST /sim/config` (a JSON
object with any of these fields), and overridable per request with `x-sim-<field>` headers
(underscores as dashes), so one simulator serves tests that need different behaviour.
Connection-level knobs (`keepalive_timeout_s`) and engine-level ones (`max_num_seqs`,
`prefix_cache_blocks`, `block_size`, `kv_cache_tokens`) are read from the global knobs only:
a header cannot change a replica's shape.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

FAULTS = ("none", "error", "stall", "reset", "cut")
JSON_STYLES = ("compact", "spaced")
BODY_MODES = ("length", "chunked")
SSE_NEWLINES = ("lf", "crlf")
BEST_OF_MODES = ("ignore", "bill")
_TRUE = {"1", "true", "yes", "on"}


def _bool(raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    return str(raw).strip().lower() in _TRUE


_KINDS: dict[str, Callable[[Any], Any]] = {"str": str, "int": int, "float": float, "bool": _bool}


@dataclass
class Knobs:
    model: str = "sim-llama"
    # More served names for the same model (comma-separated), as vLLM's repeated
    # --served-model-name: all are accepted and listed, the first names the answers.
    aliases: str = ""
    # LoRA adapters served as extra models (comma-separated), as `--lora-modules name=…`.
    loras: str = ""
    # vLLM's --max-loras: how many adapters may run at once (the metric's max_lora label).
    max_loras: int = 1
    max_model_len: int = 4096
    # Output tokens when the request has no max_tokens.
    default_tokens: int = 16
    # Delay before the first token, and between tokens, in milliseconds.
    ttft_ms: float = 0.0
    itl_ms: float = 0.0
    # Prefill: more delay before the first token per 1000 prompt tokens the prefix cache
    # did not hold, as vLLM's prefill time grows with the tokens it computes (0: none).
    prefill_ms_per_1k_tokens: float = 0.0
    # none | error (answer `error_status`) | stall (never answer) | reset (drop the
    # connection before answering) | cut (a stream ends abruptly after `cut_after` tokens).
    fault: str = "none"
    fault_rate: float = 1.0
    error_status: int = 500
    cut_after: int = 4
    # compact: vLLM's separators (",", ":"); spaced: json.dumps' default (", ", ": "),
    # as LiteLLM Proxy and other OpenAI-compatible servers write JSON.
    json_style: str = "compact"
    # SSE line ends: "lf" as vLLM writes them, or "crlf" (the SSE spec allows both; some
    # servers and proxies in front of them write \r\n).
    sse_newline: str = "lf"
    # Non-stream bodies: "length" (Content-Length, as uvicorn sends JSONResponse) or
    # "chunked" (Transfer-Encoding: chunked), to conformance-test an HTTP client.
    body_mode: str = "length"
    # Close a keep-alive connection idle this long after a response (uvicorn's
    # timeout_keep_alive; vLLM runs it at 5 s). 0 keeps idle connections open.
    keepalive_timeout_s: float = 0.0
    # best_of on /v1/completions: "ignore" (current vLLM drops the field, usage counts n
    # choices) or "bill" (as OpenAI: usage counts max(n, best_of) generated sequences).
    best_of: str = "ignore"
    # Engine shape. max_num_seqs: sequences running at once, more wait (0: unlimited).
    max_num_seqs: int = 0
    # Prefix cache: LRU of this many blocks of `block_size` prompt tokens (0: off). A hit
    # shortens ttft_ms in proportion to the cached share of the prompt, and the cached
    # tokens cost no prefill_ms_per_1k_tokens.
    prefix_cache_blocks: int = 0
    block_size: int = 16
    # KV cache size in tokens, for vllm:kv_cache_usage_perc.
    kv_cache_tokens: int = 65536
    # Keep /v1/responses objects in memory (vLLM's VLLM_ENABLE_RESPONSES_API_STORE=1).
    responses_store: bool = True

    def validate(self) -> None:
        if self.fault not in FAULTS:
            raise ValueError(f"fault must be one of {', '.join(FAULTS)}")
        if self.json_style not in JSON_STYLES:
            raise ValueError(f"json_style must be one of {', '.join(JSON_STYLES)}")
        if self.sse_newline not in SSE_NEWLINES:
            raise ValueError(f"sse_newline must be one of {', '.join(SSE_NEWLINES)}")
        if self.body_mode not in BODY_MODES:
            raise ValueError(f"body_mode must be one of {', '.join(BODY_MODES)}")
        if self.best_of not in BEST_OF_MODES:
            raise ValueError(f"best_of must be one of {', '.join(BEST_OF_MODES)}")
        if self.default_tokens < 0 or self.cut_after < 0:
            raise ValueError("token counts must be >= 0")
        delays = (self.ttft_ms, self.itl_ms, self.prefill_ms_per_1k_tokens)
        if min(*delays, self.keepalive_timeout_s) < 0:
            raise ValueError("delays must be >= 0")
        if not 0.0 <= self.fault_rate <= 1.0:
            raise ValueError("fault_rate must be within [0, 1]")
        if not 100 <= self.error_status <= 599:
            raise ValueError("error_status must be an HTTP status")
        if min(self.max_num_seqs, self.prefix_cache_blocks, self.max_loras) < 0:
            raise ValueError("engine sizes must be >= 0")
        if self.block_size < 1 or self.kv_cache_tokens < 1 or self.max_model_len < 1:
            raise ValueError("block_size, kv_cache_tokens and max_model_len must be >= 1")

    @property
    def served_names(self) -> list[str]:
        """The base model's names, the first first (it names answers and metrics)."""
        return [self.model, *(a for a in self.aliases.split(",") if a)]

    @property
    def lora_names(self) -> list[str]:
        return [name for name in self.loras.split(",") if name]

    def updated(self, changes: dict[str, Any]) -> Knobs:
        """A copy with `changes` applied, coerced to each field's type, validated."""
        fields = {f.name: f for f in dataclasses.fields(self)}
        values: dict[str, Any] = {}
        for name, raw in changes.items():
            field = fields.get(name)
            if field is None:
                raise ValueError(f"unknown knob {name!r}")
            kind = _KINDS[str(field.type)]
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
