"""Issue #15: every route vLLM's OpenAI-compatible server serves, through real SDK clients
where one exists (openai, anthropic), and their bytes where the shape matters."""

from __future__ import annotations

import base64
import struct
from collections.abc import Callable

import anthropic
import httpx
import openai
import pytest
from audio import wav
from servers import Sim, wait_until
from sim_helpers import sse


def _client(sim: Sim) -> openai.OpenAI:
    return openai.OpenAI(base_url=sim.url + "/v1", api_key="x", max_retries=0)


def test_models_lists_served_names_and_loras(start: Callable[..., Sim]) -> None:
    sim = start("--model", "base", "--model", "alias", "--lora", "ad1")
    cards = httpx.get(sim.url + "/v1/models").json()["data"]
    assert [(c["id"], c["parent"]) for c in cards] == [
        ("base", None),
        ("alias", None),
        ("ad1", "base"),
    ]
    client = _client(sim)
    # vLLM names an alias's answer by the first served name, an adapter's by the adapter
    alias = client.completions.create(model="alias", prompt="x", max_tokens=1)
    assert alias.model == "base"
    assert client.completions.create(model="ad1", prompt="x", max_tokens=1).model == "ad1"


def test_embeddings_float_base64_and_token_ids(start: Callable[..., Sim]) -> None:
    sim = start()
    client = _client(sim)
    # the SDK asks for base64 by default and decodes it
    decoded = client.embeddings.create(model="sim-llama", input=["a b", "c"])
    floats = client.embeddings.create(
        model="sim-llama", input=["a b", "c"], encoding_format="float"
    )
    assert [e.index for e in decoded.data] == [0, 1]
    for a, b in zip(decoded.data, floats.data, strict=True):
        assert a.embedding == pytest.approx(b.embedding, rel=1e-6)
        assert sum(x * x for x in b.embedding) == pytest.approx(1.0)
    assert floats.usage.prompt_tokens == 3 and floats.usage.total_tokens == 3
    raw = httpx.post(
        sim.url + "/v1/embeddings",
        json={"model": "sim-llama", "input": [5, 6, 7, 8], "encoding_format": "base64"},
    ).json()
    vector = base64.b64decode(raw["data"][0]["embedding"])
    assert len(struct.unpack(f"<{len(vector) // 4}f", vector)) == 16
    assert raw["usage"] == {
        "prompt_tokens": 4,
        "total_tokens": 4,
        "completion_tokens": 0,
        "prompt_tokens_details": None,
    }
    assert raw["id"].startswith("embd-") and raw["object"] == "list"
    cohere = httpx.post(
        sim.url + "/v2/embed",
        json={"model": "sim-llama", "texts": ["a b c"], "embedding_types": ["float", "base64"]},
    ).json()
    assert len(cohere["embeddings"]["float"][0]) == 16 and cohere["embeddings"]["base64"]
    assert cohere["meta"]["tokens"] == {"input_tokens": 3}


def test_responses_json_stream_retrieve_and_cancel(start: Callable[..., Sim]) -> None:
    sim = start()
    client = _client(sim)
    answer = client.responses.create(model="sim-llama", input="one two", max_output_tokens=3)
    assert answer.output_text == "Hello from the" and answer.status == "completed"
    assert answer.usage is not None
    assert (answer.usage.input_tokens, answer.usage.output_tokens) == (2, 3)
    assert client.responses.retrieve(answer.id).id == answer.id
    with pytest.raises(openai.BadRequestError, match="Cannot cancel a synchronous response"):
        client.responses.cancel(answer.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve("resp_nope")
    events = list(
        client.responses.create(model="sim-llama", input="x", max_output_tokens=2, stream=True)
    )
    assert [e.type for e in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e.sequence_number for e in events] == list(range(10))
    completed = events[-1].response  # type: ignore[union-attr]
    assert completed.usage is not None and completed.usage.output_tokens == 2
    # background: answered queued at once, cancellable while it runs
    sim.configure(ttft_ms=5000)
    queued = client.responses.create(model="sim-llama", input="x", background=True)
    assert queued.status == "queued"
    assert client.responses.cancel(queued.id).status == "cancelled"
    assert client.responses.retrieve(queued.id).status == "cancelled"


def test_messages_with_the_anthropic_sdk(start: Callable[..., Sim]) -> None:
    sim = start()
    client = anthropic.Anthropic(base_url=sim.url, api_key="x", max_retries=0)
    message = client.messages.create(
        model="sim-llama",
        max_tokens=3,
        system="be brief",
        messages=[{"role": "user", "content": "one two three"}],
    )
    assert message.content[0].type == "text" and message.content[0].text == "Hello from the"
    assert message.stop_reason == "max_tokens"
    assert (message.usage.input_tokens, message.usage.output_tokens) == (5, 3)
    with client.messages.stream(
        model="sim-llama", max_tokens=2, messages=[{"role": "user", "content": "hi"}]
    ) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    assert "message_start" in kinds and kinds[-1] == "message_stop"
    assert final.usage.output_tokens == 2 and final.content[0].text == "Hello from"  # type: ignore[union-attr]
    count = client.messages.count_tokens(
        model="sim-llama", messages=[{"role": "user", "content": "a b c d"}]
    )
    assert count.input_tokens == 4
    with pytest.raises(anthropic.NotFoundError) as info:
        client.messages.create(
            model="nope", max_tokens=1, messages=[{"role": "user", "content": "hi"}]
        )
    assert info.value.body == {
        "type": "error",
        "error": {"type": "NotFoundError", "message": "The model `nope` does not exist."},
    }


def test_messages_stream_events_in_vllm_order(start: Callable[..., Sim]) -> None:
    sim = start()
    body = {
        "model": "sim-llama",
        "max_tokens": 2,
        "stream": True,
        "messages": [{"role": "user", "content": "hi"}],
    }
    events = sse(httpx.post(sim.url + "/v1/messages", json=body).text)
    assert [name for name, _ in events] == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert events[5][1] == {
        "type": "message_delta",
        "delta": {"stop_reason": "max_tokens"},
        "usage": {"input_tokens": 1, "output_tokens": 2},
    }


def test_rerank_score_tokenize_detokenize(start: Callable[..., Sim]) -> None:
    sim = start()
    docs = ["the cat sat", "dogs run", "a cat"]
    for path in ("/rerank", "/v1/rerank", "/v2/rerank"):
        ranked = httpx.post(
            sim.url + path,
            json={"model": "sim-llama", "query": "cat", "documents": docs, "top_n": 2},
        ).json()
        assert [r["index"] for r in ranked["results"]] == [2, 0]
        assert ranked["usage"] == {"total_tokens": 10}  # 3 times "cat", plus 7
        assert ranked["id"].startswith("rerank-")
    for path in ("/score", "/v1/score"):
        scored = httpx.post(
            sim.url + path, json={"model": "sim-llama", "text_1": "cat", "text_2": docs}
        ).json()
        assert [d["index"] for d in scored["data"]] == [0, 1, 2]
        assert scored["data"][2]["score"] == 0.5
        assert scored["usage"]["prompt_tokens"] == 10
    tokens = httpx.post(
        sim.url + "/tokenize", json={"model": "sim-llama", "prompt": "hello big world"}
    ).json()
    assert tokens["count"] == 3 and tokens["max_model_len"] == 4096
    text = httpx.post(
        sim.url + "/detokenize", json={"model": "sim-llama", "tokens": tokens["tokens"]}
    )
    assert text.json() == {"prompt": "hello big world"}
    assert sim.stats()["requests"] == 5  # rerank and score; tokenize computes nothing


def test_audio_transcriptions_and_translations(start: Callable[..., Sim]) -> None:
    sim = start("--default-tokens", "3")
    client = _client(sim)
    audio = wav(2.2)
    text = client.audio.transcriptions.create(model="sim-llama", file=("a.wav", audio))
    assert text.text == "Hello from the"
    raw = httpx.post(
        sim.url + "/v1/audio/transcriptions",
        files={"file": ("a.wav", audio, "audio/wav")},
        data={"model": "sim-llama"},
    ).json()
    assert raw == {"text": "Hello from the", "usage": {"type": "duration", "seconds": 3}}
    translated = httpx.post(
        sim.url + "/v1/audio/translations",
        files={"file": ("a.wav", audio, "audio/wav")},
        data={"model": "sim-llama"},
    ).json()
    assert translated == {"text": "Hello from the"}
    plain = httpx.post(
        sim.url + "/v1/audio/transcriptions",
        files={"file": ("a.wav", audio)},
        data={"model": "sim-llama", "response_format": "text"},
    )
    assert plain.text == "Hello from the" and plain.headers["content-type"].startswith("text/plain")
    stream = httpx.post(
        sim.url + "/v1/audio/transcriptions",
        files={"file": ("a.wav", audio)},
        data={"model": "sim-llama", "stream": "true", "stream_include_usage": "true"},
    )
    events = sse(stream.text)
    assert [e[1]["object"] for e in events[:-1]] == ["transcription.chunk"] * 4
    assert events[-2][1]["usage"] == {"prompt_tokens": 3, "total_tokens": 6, "completion_tokens": 3}
    missing = httpx.post(
        sim.url + "/v1/audio/transcriptions", files={"x": ("a", b"")}, data={"model": "sim-llama"}
    )
    assert missing.status_code == 400


def test_faults_apply_to_the_new_routes(start: Callable[..., Sim]) -> None:
    sim = start()
    body = {"model": "sim-llama", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
    failed = httpx.post(sim.url + "/v1/messages", json=body, headers={"x-sim-fault": "error"})
    assert failed.status_code == 500
    assert failed.json() == {
        "type": "error",
        "error": {"type": "InternalServerError", "message": "simulated failure"},
    }
    cut = {"x-sim-fault": "cut", "x-sim-cut-after": "3"}
    with pytest.raises(httpx.TransportError):  # a reset after 3 text deltas
        httpx.post(
            sim.url + "/v1/responses",
            json={"model": "sim-llama", "input": "x", "stream": True},
            headers=cut,
        )
    assert sim.stats()["tokens_sent"] == 3
    embed = httpx.post(
        sim.url + "/v1/embeddings",
        json={"input": "x"},
        headers={"x-sim-fault": "error", "x-sim-error-status": "503"},
    )
    assert embed.status_code == 503 and embed.json()["error"]["type"] == "ServiceUnavailable"
    assert wait_until(lambda: sim.stats()["faults"] == 3)
