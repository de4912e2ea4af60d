"""/v1/chat/completions and /v1/completions in vLLM's OpenAI wire format, byte for byte.

The shapes follow vLLM's OpenAI server as of v0.10.2 to v0.17
(`vllm/entrypoints/openai/serving_chat.py`, `serving_completion.py`, later
`chat_completion/serving.py`, `completion/serving.py`): pydantic field order, compact
separators, `exclude_unset` on chat chunks (so nulls appear only where vLLM sets them
explicitly), `"usage":null` on completion chunks, the usage chunk with `choices: []`, and
`data: [DONE]`. The field order of `usage` is vLLM's: prompt, total, completion. With
n > 1 every choice gets its role chunk first, then each engine step yields one chunk per
choice; usage counts every choice's tokens (`sum(previous_num_tokens)`). These renderers
build strings, not dicts, because they are the benchmarks' hot path.
"""

from __future__ import annotations

import functools
import json
import uuid
from typing import Any

from tollgate_sim.errors import ApiError
from tollgate_sim.exchange import Exchange
from tollgate_sim.generation import Plan, Renderer, generate
from tollgate_sim.tokens import count, count_input, is_token_ids, message_text, output_text, token

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
# Each output word as a JSON string, computed once.
_WORDS = [_dumps(token(i)) for i in range(8)]


def usage_fields(prompt: int, completion: int) -> str:
    """vLLM's UsageInfo, without its closing brace (callers add details or close it)."""
    return (
        f'{{"prompt_tokens":{prompt},"total_tokens":{prompt + completion},'
        f'"completion_tokens":{completion}'
    )


def max_tokens_of(data: dict[str, Any], ex: Exchange, prompt_tokens: int, chat: bool) -> int:
    value = data.get("max_completion_tokens") if chat else None
    if value is None:
        value = data.get("max_tokens")
    if value is None:
        return ex.knobs.default_tokens
    if type(value) is not int or value < 1:
        raise ApiError(f"max_tokens must be at least 1, got {value}.", param="max_tokens")
    limit = ex.knobs.max_model_len
    if prompt_tokens + value > limit:
        raise ApiError(
            f"This model's maximum context length is {limit} tokens. However, you requested "
            f"{prompt_tokens + value} tokens ({prompt_tokens} in the messages, {value} in "
            "the completion). Please reduce the length of the messages or completion.",
            param="max_tokens",
        )
    return value


def n_of(data: dict[str, Any], key: str = "n") -> int:
    value = data.get(key)
    if value is None:
        return 1
    if type(value) is not int or value < 1:
        raise ApiError(f"{key} must be at least 1, got {value}.", param=key)
    return value


def stream_flags(data: dict[str, Any]) -> tuple[bool, bool, bool]:
    """(stream, include_usage, continuous_usage_stats), validated as vLLM does."""
    stream = bool(data.get("stream"))
    options = data.get("stream_options")
    if options and not stream:
        raise ApiError("Stream options can only be defined when `stream=True`.")
    if not isinstance(options, dict):
        return stream, False, False
    return (
        stream,
        bool(options.get("include_usage", True)),
        bool(options.get("continuous_usage_stats", False)),
    )


async def chat(ex: Exchange) -> None:
    data = ex.json()
    model, lora = ex.model(data)
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError("Field required: messages", param="messages")
    text = message_text(messages)
    prompt_tokens = count(text)
    n = n_of(data)
    stats = ex.state.stats
    stats.max_n = max(stats.max_n, n)
    stream, include_usage, continuous = stream_flags(data)
    plan = Plan(
        model=model,
        lora=lora,
        prompt_tokens=prompt_tokens,
        max_tokens=max_tokens_of(data, ex, prompt_tokens, True),
        stream=stream,
        request_id="chatcmpl-" + (ex.request_id() or uuid.uuid4().hex),
        choices=n,
        words=text.split() if ex.state.knobs.prefix_cache_blocks else None,
    )
    await generate(ex, plan, ChatRenderer(plan, include_usage, continuous))


async def completions(ex: Exchange) -> None:
    data = ex.json()
    model, lora = ex.model(data)
    prompt = data.get("prompt")
    if prompt is None or prompt == [] or prompt == "":
        raise ApiError("Either prompt or prompt_embeds must be provided and non-empty.")
    # A list of strings, or a list of token-id lists, is a batch: one prompt each.
    batch = isinstance(prompt, list) and not is_token_ids(prompt)
    prompts: list[Any] = prompt if batch else [prompt]
    prompt_tokens = sum(count_input(p) for p in prompts)
    n = n_of(data)
    best_of = data.get("best_of")
    stats = ex.state.stats
    stats.max_n = max(stats.max_n, n)
    billed = n
    if type(best_of) is int:
        stats.max_best_of = max(stats.max_best_of, best_of)
        if ex.knobs.best_of == "bill":
            billed = max(n, best_of)
    stream, include_usage, continuous = stream_flags(data)
    words = None
    if ex.state.knobs.prefix_cache_blocks and len(prompts) == 1 and isinstance(prompt, str):
        words = prompt.split()
    plan = Plan(
        model=model,
        lora=lora,
        prompt_tokens=prompt_tokens,
        max_tokens=max_tokens_of(data, ex, prompt_tokens // len(prompts), False),
        stream=stream,
        request_id="cmpl-" + (ex.request_id() or uuid.uuid4().hex),
        choices=n * len(prompts),
        billed=billed * len(prompts),
        words=words,
    )
    await generate(ex, plan, CompletionRenderer(plan, include_usage, continuous))


class _ChoicesRenderer(Renderer):
    """Chat and completions: a usage chunk only when asked (`include_usage`), usage on
    every chunk with `continuous_usage_stats`, `finish_reason` on the last step."""

    def __init__(self, plan: Plan, include_usage: bool, continuous: bool) -> None:
        super().__init__(plan)
        self.usage_in_stream = include_usage
        self.continuous = continuous
        self.last = plan.max_tokens - 1


class ChatRenderer(_ChoicesRenderer):
    @functools.cached_property
    def prefix(self) -> str:
        """What every chunk starts with (only streams need it)."""
        plan = self.plan
        return (
            f'{{"id":"{plan.request_id}","object":"chat.completion.chunk",'
            f'"created":{plan.created},"model":{_dumps(plan.model)},"choices":['
        )

    def _usage(self, completion: int) -> str:
        if not self.continuous:
            return ""
        return ',"usage":' + usage_fields(self.plan.prompt_tokens, completion) + "}"

    def head(self) -> list[bytes]:
        return [
            _event(
                f'{self.prefix}{{"index":{i},"delta":{{"role":"assistant","content":""}},'
                f'"logprobs":null,"finish_reason":null}}]{self._usage(0)}'
                ',"prompt_token_ids":null}'
            )
            for i in range(self.plan.choices)
        ]

    def token(self, step: int, choice: int) -> bytes:
        delta = f'{{"index":{choice},"delta":{{"content":{_WORDS[step % 8]}}},"logprobs":null,'
        end = (
            '"finish_reason":"length","stop_reason":null,"token_ids":null}]'
            if step == self.last
            else '"finish_reason":null,"token_ids":null}]'
        )
        usage = self._usage(step + 1) if self.continuous else ""
        return _event(self.prefix + delta + end + usage + "}")

    def tail(self) -> list[bytes]:
        events = []
        if self.usage_in_stream:
            usage = usage_fields(self.plan.prompt_tokens, self.plan.completion_tokens)
            events.append(_event(self.prefix + '],"usage":' + usage + "}}"))
        events.append(DONE)
        return events

    def body(self) -> bytes:
        plan = self.plan
        text = _dumps(output_text(plan.max_tokens))
        choices = ",".join(
            f'{{"index":{i},"message":{{"role":"assistant","content":{text},"refusal":null,'
            '"annotations":null,"audio":null,"function_call":null,"tool_calls":[],'
            '"reasoning_content":null},"logprobs":null,"finish_reason":"length",'
            '"stop_reason":null,"token_ids":null}'
            for i in range(plan.choices)
        )
        usage = usage_fields(plan.prompt_tokens, plan.completion_tokens)
        return (
            f'{{"id":"{plan.request_id}","object":"chat.completion","created":{plan.created},'
            f'"model":{_dumps(plan.model)},"choices":[{choices}],"service_tier":null,'
            f'"system_fingerprint":null,"usage":{usage},"prompt_tokens_details":null}}'
            ',"prompt_logprobs":null,"prompt_token_ids":null,"kv_transfer_params":null}'
        ).encode()


class CompletionRenderer(_ChoicesRenderer):
    @functools.cached_property
    def prefix(self) -> str:
        plan = self.plan
        return (
            f'{{"id":"{plan.request_id}","object":"text_completion",'
            f'"created":{plan.created},"model":{_dumps(plan.model)},"choices":['
        )

    def token(self, step: int, choice: int) -> bytes:
        text = f'{{"index":{choice},"text":{_WORDS[step % 8]},"logprobs":null,'
        end = (
            '"finish_reason":"length","stop_reason":null,'
            if step == self.last
            else '"finish_reason":null,"stop_reason":null,'
        )
        usage = "null"
        if self.continuous:
            usage = usage_fields(self.plan.prompt_tokens, step + 1) + "}"
        return _event(
            self.prefix + text + end + '"prompt_token_ids":null,"token_ids":null}],"usage":'
            f"{usage}}}"
        )

    def tail(self) -> list[bytes]:
        events = []
        if self.usage_in_stream:
            usage = usage_fields(self.plan.prompt_tokens, self.plan.completion_tokens)
            events.append(_event(self.prefix + '],"usage":' + usage + "}}"))
        events.append(DONE)
        return events

    def body(self) -> bytes:
        plan = self.plan
        text = _dumps(output_text(plan.max_tokens))
        choices = ",".join(
            f'{{"index":{i},"text":{text},"logprobs":null,"finish_reason":"length",'
            '"stop_reason":null,"token_ids":null,"prompt_logprobs":null,"prompt_token_ids":null}'
            for i in range(plan.choices)
        )
        usage = usage_fields(plan.prompt_tokens, plan.completion_tokens)
        return (
            f'{{"id":"{plan.request_id}","object":"text_completion","created":{plan.created},'
            f'"model":{_dumps(plan.model)},"choices":[{choices}],"service_tier":null,'
            f'"system_fingerprint":null,"usage":{usage},"prompt_tokens_details":null}}'
            ',"kv_transfer_params":null}'
        ).encode()


DONE = b"data: [DONE]\n\n"


def _event(data: str) -> bytes:
    return b"data: " + data.encode() + b"\n\n"
