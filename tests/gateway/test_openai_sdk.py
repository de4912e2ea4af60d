"""The official OpenAI SDK against the gateway: what application developers do."""

from __future__ import annotations

import httpx
import openai
import pytest
from servers import KEY_A, Gateway, Sim

MESSAGES = [{"role": "user", "content": "say hello to the gateway"}]


def test_chat_completion(client: openai.OpenAI, gateway: Gateway) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="sim-llama", messages=MESSAGES, max_tokens=5
    )
    completion = raw.parse()
    assert completion.choices[0].message.content == "Hello from the tollgate simulator"
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == 5
    assert completion.usage.completion_tokens == 5
    assert float(raw.headers["x-tollgate-overhead-ms"]) >= 0
    entry = gateway.request_log(raw.headers["x-request-id"])
    assert entry["key"] == "team-a"
    assert entry["model"] == "sim-llama"
    assert (entry["prompt_tokens"], entry["completion_tokens"]) == (5, 5)
    assert entry["usage_exact"] is True


def test_chat_stream(client: openai.OpenAI, gateway: Gateway) -> None:
    stream = client.chat.completions.create(
        model="sim-llama", messages=MESSAGES, max_tokens=6, stream=True
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello from the tollgate simulator."
    # The client did not ask for usage: the chunk the gateway asked for is not shown...
    assert all(c.usage is None for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "length"
    # ...but it was counted.
    entry = gateway.request_log(stream.response.headers["x-request-id"])
    assert (entry["prompt_tokens"], entry["completion_tokens"]) == (5, 6)
    assert entry["stream"] is True and entry["usage_exact"] is True


def test_chat_stream_with_usage_requested(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model="sim-llama",
            messages=MESSAGES,
            max_tokens=3,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 3


def test_completions_non_stream_and_stream(client: openai.OpenAI, gateway: Gateway) -> None:
    completion = client.completions.create(model="sim-llama", prompt="one two three", max_tokens=2)
    assert completion.choices[0].text == "Hello from"
    assert completion.usage is not None and completion.usage.prompt_tokens == 3
    stream = client.completions.create(
        model="sim-llama", prompt="one two three", max_tokens=4, stream=True
    )
    texts = [c.choices[0].text for c in stream if c.choices]
    assert texts == ["Hello", " from", " the", " tollgate"]
    entry = gateway.request_log(stream.response.headers["x-request-id"])
    assert (entry["prompt_tokens"], entry["completion_tokens"]) == (3, 4)


def test_models(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == ["sim-llama"]


def test_served_model_name(make_gateway, sim: Sim) -> None:
    gw = make_gateway(sim.url, SERVED_MODEL_NAME="team-llama")
    models = openai.OpenAI(base_url=gw.url + "/v1", api_key=KEY_A).models.list()
    assert [m.id for m in models] == ["team-llama"]


@pytest.mark.parametrize("key", [None, "sk-wrong", "sk-test-a-but-longer"])
def test_wrong_key_is_authentication_error(gateway: Gateway, key: str | None) -> None:
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0)
    headers = {"Authorization": f"Bearer {key}" if key is not None else openai.Omit()}
    with pytest.raises(openai.AuthenticationError) as info:
        client.chat.completions.create(model="sim-llama", messages=MESSAGES, extra_headers=headers)
    assert info.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        client.models.list(extra_headers=headers)


@pytest.mark.parametrize("value", ["Bearer", "Basic c2stdGVzdC1hOg==", "sk-test-a", "bearer x y"])
def test_malformed_authorization_is_401(gateway: Gateway, value: str) -> None:
    r = httpx.post(
        gateway.url + "/v1/chat/completions",
        json={"messages": MESSAGES},
        headers={"authorization": value},
    )
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "invalid_api_key"


def test_upstream_model_error_passes_through(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="no-such-model", messages=MESSAGES)
    assert "does not exist" in info.value.message


def test_body_too_large_is_413(make_gateway, sim: Sim) -> None:
    gw = make_gateway(sim.url, GATEWAY_MAX_BODY_BYTES="2000")
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=KEY_A, max_retries=0)
    big = [{"role": "user", "content": "x" * 5000}]
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model="sim-llama", messages=big)
    assert info.value.status_code == 413
    assert info.value.code == "request_too_large"

    # A body without content-length (chunked) is limited while it is read.
    def chunks():
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(10):
            yield b"y" * 500
        yield b'"}]}'

    r = httpx.post(
        gw.url + "/v1/chat/completions",
        content=chunks(),
        headers={"authorization": f"Bearer {KEY_A}"},
    )
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "request_too_large"


def test_upstream_failures_map_to_sdk_errors(make_gateway, make_sim) -> None:
    sim = make_sim()
    # No health poll during the test: the requests, not the poll, meet the stopped sim.
    gw = make_gateway(
        sim.url,
        UPSTREAM_FIRST_BYTE_TIMEOUT_SECONDS="0.5",
        BREAKER_FAILURE_THRESHOLD="100",
        UPSTREAM_HEALTH_INTERVAL_SECONDS="600",
    )
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=KEY_A, max_retries=0)

    def call(**headers: str) -> None:
        client.chat.completions.create(model="sim-llama", messages=MESSAGES, extra_headers=headers)

    with pytest.raises(openai.InternalServerError) as info:
        call(**{"x-sim-fault": "error", "x-sim-error-status": "500"})
    assert info.value.status_code == 500
    with pytest.raises(openai.APIStatusError) as info:
        call(**{"x-sim-fault": "reset"})
    assert info.value.status_code == 502
    assert info.value.code == "upstream_error"
    with pytest.raises(openai.APIStatusError) as info:
        call(**{"x-sim-fault": "stall"})
    assert info.value.status_code == 504
    assert info.value.code == "upstream_timeout"
    sim.stop()
    with pytest.raises(openai.APIStatusError) as info:
        call()
    assert info.value.status_code == 502
    assert info.value.code == "upstream_unreachable"
