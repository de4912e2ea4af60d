"""OpenAI's Responses API as vLLM serves it: POST /v1/responses (JSON or SSE),
GET /v1/responses/{id}, POST /v1/responses/{id}/cancel.

Sources: `vllm/entrypoints/openai/responses/serving.py` (`responses_stream_generator`,
`_process_simple_streaming_events`, `retrieve_responses`, `cancel_responses`),
`responses/streaming_events.py` (`emit_text_delta_events`, `emit_text_output_done_events`),
`responses/protocol.py` (ResponsesResponse, ResponseUsage) and `responses/api_router.py`
(`event: <type>\\ndata: <model_dump_json>\\n\\n`, every field, nulls included). Events:
response.created, response.in_progress, response.output_item.added,
response.content_part.added, response.output_text.delta (one per token),
response.output_text.done, response.content_part.done, response.output_item.done,
response.completed (with usage); sequence_number counts from 0. Stored responses
(store true, the default, with the responses_store knob on as VLLM_ENABLE_RESPONSES_API_STORE)
stay in memory; background requires store and answers `queued` at once.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from tollgate_sim.errors import ApiError
from tollgate_sim.exchange import Exchange
from tollgate_sim.generation import Plan, Renderer, generate
from tollgate_sim.http import dumps
from tollgate_sim.state import State
from tollgate_sim.tokens import count, message_text, output_text, token
from tollgate_sim.wire import max_tokens_of

_TASKS: dict[str, asyncio.Task[None]] = {}


def _input_text(data: dict[str, Any]) -> str:
    value = data.get("input")
    if isinstance(value, str):
        text = value
    elif isinstance(value, list) and value:
        # Input items: messages whose content is a string or input_text parts.
        text = message_text(value)
    else:
        raise ApiError("Field required: input", param="input")
    instructions = data.get("instructions")
    return f"{instructions} {text}" if isinstance(instructions, str) else text


def usage(plan: Plan) -> dict[str, Any]:
    return {
        "input_tokens": plan.prompt_tokens,
        "input_tokens_details": {"cached_tokens": plan.cached_tokens},
        "output_tokens": plan.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": plan.total_tokens,
    }


def text_part(text: str, logprobs: list[Any] | None) -> dict[str, Any]:
    return {"annotations": [], "text": text, "type": "output_text", "logprobs": logprobs}


def message_item(item_id: str, text: str | None) -> dict[str, Any]:
    content = [] if text is None else [text_part(text, None)]
    status = "in_progress" if text is None else "completed"
    return {
        "id": item_id,
        "content": content,
        "role": "assistant",
        "status": status,
        "type": "message",
    }


class Response:
    """The ResponsesResponse of one request, in vLLM's field order."""

    def __init__(self, data: dict[str, Any], plan: Plan) -> None:
        self.data = data
        self.plan = plan
        self.item_id = "msg_" + uuid.uuid4().hex

    def render(self, status: str, output: list[Any], with_usage: bool) -> dict[str, Any]:
        data = self.data
        plan = self.plan
        return {
            "id": plan.request_id,
            "created_at": plan.created,
            "incomplete_details": None,
            "instructions": data.get("instructions"),
            "metadata": data.get("metadata"),
            "model": plan.model,
            "object": "response",
            "output": output,
            "parallel_tool_calls": data.get("parallel_tool_calls", True),
            "temperature": data.get("temperature", 1.0),
            "tool_choice": data.get("tool_choice", "auto"),
            "tools": data.get("tools") or [],
            "top_p": data.get("top_p", 1.0),
            "background": bool(data.get("background")),
            "max_output_tokens": plan.max_tokens,
            "max_tool_calls": data.get("max_tool_calls"),
            "previous_response_id": data.get("previous_response_id"),
            "prompt": None,
            "reasoning": data.get("reasoning"),
            "service_tier": data.get("service_tier") or "auto",
            "status": status,
            "text": data.get("text"),
            "top_logprobs": data.get("top_logprobs"),
            "truncation": data.get("truncation") or "disabled",
            "usage": usage(plan) if with_usage else None,
            "user": data.get("user"),
            "input_messages": None,
            "output_messages": None,
        }

    def final(self) -> dict[str, Any]:
        text = output_text(self.plan.max_tokens)
        return self.render("completed", [message_item(self.item_id, text)], True)


class ResponsesRenderer(Renderer):
    def __init__(self, plan: Plan, response: Response, state: State, store: bool) -> None:
        super().__init__(plan)
        self.response = response
        self.state = state
        self.store = store
        self.seq = -1

    def _event(self, kind: str, fields: dict[str, Any]) -> bytes:
        self.seq += 1
        data = {**fields, "sequence_number": self.seq, "type": kind}
        return b"event: " + kind.encode() + b"\ndata: " + dumps(data) + b"\n\n"

    def _ids(self) -> dict[str, Any]:
        return {"item_id": self.response.item_id, "output_index": 0}

    def head(self) -> list[bytes]:
        initial = self.response.render("in_progress", [], False)
        return [
            self._event("response.created", {"response": initial}),
            self._event("response.in_progress", {"response": initial}),
            self._event(
                "response.output_item.added",
                {"item": message_item(self.response.item_id, None), "output_index": 0},
            ),
            self._event(
                "response.content_part.added",
                {"content_index": 0, **self._ids(), "part": text_part("", [])},
            ),
        ]

    def token(self, step: int, choice: int) -> bytes:
        return self._event(
            "response.output_text.delta",
            {
                "content_index": 0,
                "delta": token(step),
                "item_id": self.response.item_id,
                "logprobs": [],
                "output_index": 0,
            },
        )

    def tail(self) -> list[bytes]:
        text = output_text(self.plan.max_tokens)
        final = self._finish()
        return [
            self._event(
                "response.output_text.done",
                {
                    "content_index": 0,
                    "item_id": self.response.item_id,
                    "logprobs": [],
                    "output_index": 0,
                    "text": text,
                },
            ),
            self._event(
                "response.content_part.done",
                {"content_index": 0, **self._ids(), "part": text_part(text, None)},
            ),
            self._event(
                "response.output_item.done",
                {"item": message_item(self.response.item_id, text), "output_index": 0},
            ),
            self._event("response.completed", {"response": final}),
        ]

    def _finish(self) -> dict[str, Any]:
        final = self.response.final()
        if self.store:
            stored = self.state.responses.get(self.plan.request_id)
            if stored is not None and stored["status"] == "cancelled":
                return stored
            self.state.responses[self.plan.request_id] = final
        return final

    def body(self) -> bytes:
        return dumps(self._finish())


async def create(ex: Exchange) -> None:
    data = ex.json()
    model, lora = ex.model(data)
    store = data.get("store", True) is not False and ex.knobs.responses_store
    background = bool(data.get("background"))
    if background and not store:
        raise ApiError("background can only be used when `store` is true", param="background")
    if background and data.get("stream"):
        raise ApiError("Streaming with background is not supported by the simulator.")
    text = _input_text(data)
    prompt_tokens = count(text)
    previous = data.get("previous_response_id")
    if previous is not None:
        earlier = ex.state.responses.get(previous)
        if earlier is None:
            raise _not_found(str(previous))
        if earlier.get("usage"):
            prompt_tokens += earlier["usage"]["total_tokens"]
    data["max_tokens"] = data.get("max_output_tokens")
    plan = Plan(
        model=model,
        lora=lora,
        prompt_tokens=prompt_tokens,
        max_tokens=max_tokens_of(data, ex, prompt_tokens, False),
        stream=bool(data.get("stream")),
        request_id="resp_" + (ex.request_id() or uuid.uuid4().hex),
        words=text.split() if ex.state.knobs.prefix_cache_blocks else None,
    )
    response = Response(data, plan)
    render = ResponsesRenderer(plan, response, ex.state, store)
    if not background:
        await generate(ex, plan, render)
        return
    queued = response.render("queued", [], False)
    ex.state.responses[plan.request_id] = queued
    ex.send(200, dumps(queued))
    quiet = Exchange(
        ex.state, _Discard(), ex.method, ex.path, ex.query, ex.headers, b"", True, ex.knobs
    )
    task = asyncio.get_running_loop().create_task(generate(quiet, plan, render))
    _TASKS[plan.request_id] = task
    task.add_done_callback(lambda _: _TASKS.pop(plan.request_id, None))


class _Discard:
    """Where a background response's answer goes: it is stored, not sent."""

    closed = False

    def write(self, data: bytes) -> None:
        pass

    def finish(self, keep_alive: bool) -> None:
        pass

    def abort(self) -> None:
        pass


def _not_found(response_id: str) -> ApiError:
    return ApiError(
        f"Response with id '{response_id}' not found.", 404, "response_id", "invalid_request_error"
    )


async def retrieve(ex: Exchange) -> None:
    response_id = ex.params["id"]
    stored = ex.state.responses.get(response_id)
    if stored is None:
        raise _not_found(response_id)
    ex.send(200, dumps(stored))


async def cancel(ex: Exchange) -> None:
    response_id = ex.params["id"]
    stored = ex.state.responses.get(response_id)
    if stored is None:
        raise _not_found(response_id)
    if stored["status"] not in ("queued", "in_progress"):
        raise ApiError(
            "Cannot cancel a synchronous response.", 400, "response_id", "invalid_request_error"
        )
    stored["status"] = "cancelled"
    task = _TASKS.get(response_id)
    if task is not None:
        task.cancel()
    ex.send(200, dumps(stored))
