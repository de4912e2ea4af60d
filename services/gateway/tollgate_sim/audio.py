"""POST /v1/audio/transcriptions and /v1/audio/translations (multipart/form-data) in
vLLM's shapes (`vllm/entrypoints/openai/speech_to_text/` in current vLLM, earlier
`serving_transcription.py` / `speech_to_text.py`; protocol TranscriptionResponse,
TranscriptionUsageAudio, TranscriptionResponseStream).

A transcription's JSON usage is the audio's duration: {"type": "duration", "seconds":
ceil(duration)}; a translation has no usage. A stream is `transcription.chunk` /
`translation.chunk` objects, a usage chunk (choices []) when `stream_include_usage`, then
`[DONE]`. The duration comes from a WAV header, else 32,000 bytes a second (16 kHz,
16-bit mono). The simulator's audio prompt costs 1 token per started second plus the
`prompt` field's words; the text is default_tokens tokens.
"""

from __future__ import annotations

import math
import struct
import uuid
from typing import Any

from tollgate_sim.errors import ApiError
from tollgate_sim.exchange import Exchange
from tollgate_sim.generation import Plan, Renderer, generate
from tollgate_sim.http import dumps
from tollgate_sim.tokens import output_text, token
from tollgate_sim.wire import usage_fields

FORMATS = ("json", "text", "srt", "verbose_json", "vtt")
TEXT = b"text/plain; charset=utf-8"


def parse_form(content_type: bytes, body: bytes) -> dict[str, bytes]:
    """multipart/form-data fields by name (the file's bytes under its field name)."""
    media, _, params = content_type.partition(b";")
    if media.strip().lower() != b"multipart/form-data":
        raise ApiError("Expected a multipart/form-data body")
    boundary = b""
    for param in params.split(b";"):
        key, _, value = param.strip().partition(b"=")
        if key.lower() == b"boundary":
            boundary = value.strip(b'"')
    if not boundary:
        raise ApiError("multipart/form-data without a boundary")
    fields: dict[str, bytes] = {}
    for part in body.split(b"--" + boundary)[1:]:
        if part.startswith(b"--"):
            break
        head, _, value = part.partition(b"\r\n\r\n")
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-disposition:"):
                for item in line.split(b";"):
                    key, _, name = item.strip().partition(b"=")
                    if key == b"name":
                        fields[name.strip(b'"').decode()] = value.removesuffix(b"\r\n")
    return fields


def duration(audio: bytes) -> float:
    if audio[:4] == b"RIFF" and audio[8:12] == b"WAVE":
        pos, rate = 12, 0
        while pos + 8 <= len(audio):
            kind = audio[pos : pos + 4]
            size: int = struct.unpack("<I", audio[pos + 4 : pos + 8])[0]
            if kind == b"fmt " and size >= 12:
                rate = int(struct.unpack("<I", audio[pos + 16 : pos + 20])[0])
            elif kind == b"data" and rate:
                return min(size, len(audio) - pos - 8) / rate
            pos += 8 + size + (size & 1)
    return len(audio) / 32000


def _flag(fields: dict[str, bytes], name: str) -> bool:
    return fields.get(name, b"false").strip().lower() in (b"true", b"1")


async def transcriptions(ex: Exchange) -> None:
    await _speech(ex, "transcription")


async def translations(ex: Exchange) -> None:
    await _speech(ex, "translation")


async def _speech(ex: Exchange, task: str) -> None:
    fields = parse_form(ex.headers.get(b"content-type", b""), ex.body)
    if "file" not in fields:
        raise ApiError("Field required: file", param="file")
    model, lora = ex.model({"model": fields.get("model", b"").decode()})
    fmt = fields.get("response_format", b"json").decode()
    if fmt not in FORMATS:
        raise ApiError(f"Input should be {', '.join(FORMATS)}", param="response_format")
    stream = _flag(fields, "stream")
    include_usage = _flag(fields, "stream_include_usage")
    if (include_usage or _flag(fields, "stream_continuous_usage_stats")) and not stream:
        raise ApiError("Stream options can only be defined when `stream=True`.")
    seconds = duration(fields["file"])
    prompt = fields.get("prompt", b"").decode()
    prefix = "trsc-" if task == "transcription" else "trsl-"
    plan = Plan(
        model=model,
        lora=lora,
        prompt_tokens=max(1, math.ceil(seconds)) + len(prompt.split()),
        max_tokens=max(1, ex.knobs.default_tokens),
        stream=stream,
        request_id=prefix + (ex.request_id() or uuid.uuid4().hex),
    )
    render = SpeechRenderer(plan, task, fmt, seconds, include_usage)
    await generate(ex, plan, render)


class SpeechRenderer(Renderer):
    usage_in_body = False

    def __init__(self, plan: Plan, task: str, fmt: str, seconds: float, usage: bool) -> None:
        super().__init__(plan)
        self.task = task
        self.fmt = fmt
        self.seconds = seconds
        self.usage_in_stream = usage
        self.prefix = {
            "id": plan.request_id,
            "object": f"{task}.chunk",
            "created": plan.created,
            "model": plan.model,
        }
        if fmt not in ("json", "verbose_json"):
            self.body_type = TEXT

    def token(self, step: int, choice: int) -> bytes:
        last = step == self.plan.max_tokens - 1
        choice_data = {
            "delta": {"content": token(step)},
            "finish_reason": "length" if last else None,
            "stop_reason": None,
        }
        return b"data: " + dumps({**self.prefix, "choices": [choice_data]}) + b"\n\n"

    def tail(self) -> list[bytes]:
        events = []
        if self.usage_in_stream:
            plan = self.plan
            usage = usage_fields(plan.prompt_tokens, plan.completion_tokens) + "}"
            head = dumps({**self.prefix, "choices": []})[:-1]
            events.append(b"data: " + head + b',"usage":' + usage.encode() + b"}\n\n")
        events.append(b"data: [DONE]\n\n")
        return events

    def body(self) -> bytes:
        text = output_text(self.plan.max_tokens)
        end = round(self.seconds, 3)
        if self.fmt == "text":
            return text.encode()
        if self.fmt in ("srt", "vtt"):
            stamp = _stamp(end, "," if self.fmt == "srt" else ".")
            cue = f"00:00:00{',' if self.fmt == 'srt' else '.'}000 --> {stamp}\n{text}\n"
            return (f"1\n{cue}" if self.fmt == "srt" else f"WEBVTT\n\n{cue}").encode()
        out: dict[str, Any] = {"text": text}
        if self.fmt == "verbose_json":
            segment = {"id": 0, "seek": 0, "start": 0.0, "end": end, "text": text}
            out = {"duration": end, "language": "en", "text": text, "segments": [segment]}
            out["words"] = None
        if self.task == "transcription":
            out["usage"] = {"type": "duration", "seconds": math.ceil(self.seconds)}
        return dumps(out)


def _stamp(seconds: float, sep: str) -> str:
    whole = int(seconds)
    ms = round((seconds - whole) * 1000)
    return f"{whole // 3600:02d}:{whole % 3600 // 60:02d}:{whole % 60:02d}{sep}{ms:03d}"
