"""Anthropic's Messages API as vLLM serves it: POST /v1/messages, /v1/messages/count_tokens.

Source: `vllm/entrypoints/anthropic/serving.py` (`messages_full_converter`,
`message_stream_converter`), `anthropic/protocol.py` and `anthropic/api_router.py`. vLLM
converts the request to a chat completion and the chat stream back: the role chunk becomes
`message_start` (dumped with exclude_unset, so its message has no `type`/`role`), the
first content token opens `content_block_start` index 0, every token is a
`content_block_delta` text_delta, the usage chunk closes the block (`content_block_stop`)
and yields `message_delta` with stop_reason and usage, `[DONE]` becomes `message_stop`.
There is no `ping`. The answer's id is the chat completion's (`chatcmpl-…`).
Errors from serving are Anthropic-shaped; a body that fails validation (say, no
max_tokens) is answered by vLLM's global handler, in the OpenAI shape.
"""

from __future__ import annotations

import uuid
from typing import Any

from tollgate_sim.errors import ApiError
from tollgate_sim.exchange import Exchange
from tollgate_sim.generation import Plan, Renderer, generate
from tollgate_sim.http import dumps
from tollgate_sim.tokens import count, message_text, output_text, token

STOP_REASON = "max_tokens"  # the simulator always stops at max_tokens ("length")


def _prompt_text(data: dict[str, Any]) -> str:
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError("Field required: messages", param="messages")
    system = data.get("system")
    parts = []
    if isinstance(system, str):
        parts.append(system)
    elif isinstance(system, list):
        parts.append(message_text([{"content": system}]))
    parts.append(message_text(messages))
    return " ".join(p for p in parts if p)


async def create(ex: Exchange) -> None:
    data = ex.json()
    if not data.get("model"):
        raise ApiError("Field required: model", param="model")
    text = _prompt_text(data)
    max_tokens = data.get("max_tokens")
    if type(max_tokens) is not int:
        raise ApiError("Field required: max_tokens", param="max_tokens")
    if max_tokens <= 0:
        raise ApiError("Value error, max_tokens must be positive", param="max_tokens")
    ex.flavor = "anthropic"
    model, lora = ex.model(data)
    plan = Plan(
        model=model,
        lora=lora,
        prompt_tokens=count(text),
        max_tokens=max_tokens,
        stream=bool(data.get("stream")),
        request_id="chatcmpl-" + (ex.request_id() or uuid.uuid4().hex),
        words=text.split() if ex.state.knobs.prefix_cache_blocks else None,
    )
    await generate(ex, plan, MessagesRenderer(plan))


async def count_tokens(ex: Exchange) -> None:
    data = ex.json()
    if not data.get("model"):
        raise ApiError("Field required: model", param="model")
    text = _prompt_text(data)
    ex.flavor = "anthropic"
    ex.model(data)
    ex.send(200, dumps({"input_tokens": count(text)}))


def _event(name: str, data: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + dumps(data) + b"\n\n"


class MessagesRenderer(Renderer):
    def head(self) -> list[bytes]:
        plan = self.plan
        message: dict[str, Any] = {
            "id": plan.request_id,
            "content": [],
            "model": plan.model,
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": plan.prompt_tokens, "output_tokens": 0},
        }
        return [_event("message_start", {"type": "message_start", "message": message})]

    def token(self, step: int, choice: int) -> bytes:
        delta = _event(
            "content_block_delta",
            {
                "type": "content_block_delta",
                "delta": {"type": "text_delta", "text": token(step)},
                "index": 0,
            },
        )
        if step:
            return delta
        start = {"type": "content_block_start", "content_block": {"type": "text", "text": ""}}
        return _event("content_block_start", {**start, "index": 0}) + delta

    def tail(self) -> list[bytes]:
        plan = self.plan
        usage = {"input_tokens": plan.prompt_tokens, "output_tokens": plan.completion_tokens}
        return [
            _event("content_block_stop", {"type": "content_block_stop", "index": 0}),
            _event(
                "message_delta",
                {"type": "message_delta", "delta": {"stop_reason": STOP_REASON}, "usage": usage},
            ),
            _event("message_stop", {"type": "message_stop"}),
        ]

    def body(self) -> bytes:
        plan = self.plan
        return dumps(
            {
                "id": plan.request_id,
                "type": "message",
                "role": "assistant",
                "content": [{"type": "text", "text": output_text(plan.max_tokens)}],
                "model": plan.model,
                "stop_reason": STOP_REASON,
                "usage": {
                    "input_tokens": plan.prompt_tokens,
                    "output_tokens": plan.completion_tokens,
                },
            }
        )
