"""Every route of the endpoint table through a real gateway, with the clients teams use:
the openai SDK (embeddings, Responses incl. streaming, audio), the anthropic SDK
(Messages, streaming, count_tokens, its x-api-key header), raw HTTP for rerank, score and
the tokenizer. Each request's recorded usage is what the simulator reported."""

from __future__ import annotations

import anthropic
import httpx
import openai
import pytest
from audio import wav
from servers import KEY_A, Gateway, Sim

AUTH = {"authorization": f"Bearer {KEY_A}"}


def _client(gw: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=KEY_A, max_retries=0)


def _logged(gw: Gateway, request_id: str) -> tuple[int, int]:
    entry = gw.request_log(request_id)
    assert entry["usage_exact"] is True, entry
    return entry["prompt_tokens"], entry["completion_tokens"]


def _reported(sim: Sim, before: dict) -> tuple[int, int]:
    after = sim.stats()
    return (
        after["prompt_tokens"] - before["prompt_tokens"],
        after["completion_tokens"] - before["completion_tokens"],
    )


@pytest.fixture
def gw(make_gateway, sim: Sim) -> Gateway:
    return make_gateway(sim.url)


def test_embeddings_with_the_openai_sdk(gw: Gateway, sim: Sim) -> None:
    before = sim.stats()
    raw = _client(gw).embeddings.with_raw_response.create(
        model="sim-llama", input=["one two three", "four five"]
    )
    assert len(raw.parse().data) == 2
    assert _logged(gw, raw.headers["x-request-id"]) == _reported(sim, before) == (5, 0)
    entry = gw.request_log(raw.headers["x-request-id"])
    assert entry["route"] == "/v1/embeddings" and entry["operation"] == "embeddings"


def test_responses_json_stream_and_retrieve_with_the_openai_sdk(gw: Gateway, sim: Sim) -> None:
    client = _client(gw)
    before = sim.stats()
    raw = client.responses.with_raw_response.create(
        model="sim-llama", input="one two", max_output_tokens=3
    )
    answer = raw.parse()
    assert answer.output_text == "Hello from the"
    assert _logged(gw, raw.headers["x-request-id"]) == _reported(sim, before) == (2, 3)
    assert client.responses.retrieve(answer.id).id == answer.id

    before = sim.stats()
    with client.responses.with_streaming_response.create(
        model="sim-llama", input="one two three", max_output_tokens=4, stream=True
    ) as stream:
        request_id = stream.headers["x-request-id"]
        types = [line for line in stream.iter_lines() if line.startswith("event: ")]
    assert types[-1] == "event: response.completed"
    assert _logged(gw, request_id) == _reported(sim, before) == (3, 4)


def test_responses_retrieve_finds_the_replica_that_stored_it(make_sim, make_gateway) -> None:
    sims = [make_sim() for _ in range(3)]
    gw = make_gateway(sims[0].url, VLLM_URLS=",".join(s.url for s in sims))
    client = _client(gw)
    ids = [
        client.responses.create(model="sim-llama", input="x", max_output_tokens=1).id
        for _ in range(6)
    ]
    assert sum(1 for s in sims if s.stats()["requests"]) >= 2  # spread over replicas
    assert [client.responses.retrieve(i).id for i in ids] == ids


def test_messages_stream_and_count_tokens_with_the_anthropic_sdk(gw: Gateway, sim: Sim) -> None:
    # The anthropic SDK sends its key as x-api-key.
    client = anthropic.Anthropic(base_url=gw.url, api_key=KEY_A, max_retries=0)
    messages = [{"role": "user", "content": "one two three"}]
    before = sim.stats()
    raw = client.messages.with_raw_response.create(
        model="sim-llama", max_tokens=4, messages=messages
    )
    assert raw.parse().content[0].text == "Hello from the tollgate"  # type: ignore[union-attr]
    assert _logged(gw, raw.headers["x-request-id"]) == _reported(sim, before) == (3, 4)

    before = sim.stats()
    with client.messages.stream(model="sim-llama", max_tokens=5, messages=messages) as stream:
        text = "".join(stream.text_stream)
        request_id = stream.response.headers["x-request-id"]
    assert text == "Hello from the tollgate simulator"
    assert _logged(gw, request_id) == _reported(sim, before) == (3, 5)

    counted = client.messages.count_tokens(model="sim-llama", messages=messages)
    assert counted.input_tokens == 3
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=gw.url, api_key="sk-wrong", max_retries=0).messages.create(
            model="sim-llama", max_tokens=1, messages=messages
        )
    # The client's key never went upstream, in any header.
    assert KEY_A not in str(sim.stats()["recent"])


def test_rerank_score_and_the_tokenizer_over_http(gw: Gateway, sim: Sim) -> None:
    docs = ["the cat sat", "dogs run", "a cat"]
    for path in ("/rerank", "/v1/rerank", "/v2/rerank"):
        r = httpx.post(
            gw.url + path,
            json={"model": "sim-llama", "query": "cat", "documents": docs},
            headers={**AUTH, "x-request-id": f"rr{path.replace('/', '-')}"},
        )
        assert r.status_code == 200, r.text
        assert _logged(gw, f"rr{path.replace('/', '-')}") == (10, 0)
    for path in ("/score", "/v1/score"):
        r = httpx.post(
            gw.url + path,
            json={"model": "sim-llama", "text_1": "cat", "text_2": docs},
            headers={**AUTH, "x-request-id": f"sc{path.replace('/', '-')}"},
        )
        assert r.status_code == 200, r.text
        assert _logged(gw, f"sc{path.replace('/', '-')}") == (10, 0)
    tokens = httpx.post(
        gw.url + "/tokenize",
        json={"model": "sim-llama", "prompt": "hello big world"},
        headers={**AUTH, "x-request-id": "tok-1"},
    ).json()
    assert tokens["count"] == 3
    text = httpx.post(
        gw.url + "/detokenize", json={"model": "sim-llama", "tokens": tokens["tokens"]},
        headers=AUTH,
    )  # fmt: skip
    assert text.json() == {"prompt": "hello big world"}
    # The tokenizer is free, but authenticated.
    assert gw.request_log("tok-1")["prompt_tokens"] == 0
    assert httpx.post(gw.url + "/tokenize", json={"prompt": "x"}).status_code == 401


def test_audio_transcription_with_the_openai_sdk(gw: Gateway, sim: Sim) -> None:
    client = _client(gw)
    audio = wav(2.2)
    raw = client.audio.transcriptions.with_raw_response.create(
        model="sim-llama", file=("a.wav", audio)
    )
    assert raw.parse().text
    # A whole answer reports audio seconds (3 started): 50 tokens a second.
    assert _logged(gw, raw.headers["x-request-id"]) == (150, 0)
    # A stream reports tokens; the gateway asks for them and strips them again.
    before = sim.stats()
    r = httpx.post(
        gw.url + "/v1/audio/transcriptions",
        files={"file": ("a.wav", audio, "audio/wav")},
        data={"model": "sim-llama", "stream": "true"},
        headers={**AUTH, "x-request-id": "asr-stream"},
    )
    assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n")
    assert '"usage"' not in r.text
    assert _logged(gw, "asr-stream") == _reported(sim, before)
    translated = client.audio.translations.create(model="sim-llama", file=("a.wav", audio))
    assert translated.text


def test_usage_counts_against_the_key_on_every_route(make_sim, make_gateway, tmp_path) -> None:
    from configfile import MountedSecret, document

    sim = make_sim()
    secret = MountedSecret(tmp_path / "config")
    secret.write(
        document({"sk-day": {"name": "day", "policy": "day"}}, {"day": {"tokensPerDay": 30}})
    )
    gw = make_gateway(sim.url, GATEWAY_CONFIG_FILE=str(secret.path))
    headers = {"authorization": "Bearer sk-day"}
    body = {"model": "sim-llama", "input": "one two three four five six seven eight nine ten"}
    codes = [
        httpx.post(gw.url + "/v1/embeddings", json=body, headers=headers).status_code
        for _ in range(4)
    ]
    assert codes == [200, 200, 200, 429]
    usage = httpx.get(gw.url + "/v1/usage", headers=headers).json()
    assert usage["prompt_tokens"] == 30 and usage["remaining"] == 0


def test_only_the_tables_routes_are_passed_on(gw: Gateway, sim: Sim) -> None:
    sim.reset()
    for method, path, status in (
        ("POST", "/invocations", 404),  # vLLM serves it without its --api-key
        ("POST", "/v1/load_lora_adapter", 404),
        ("GET", "/v1/embeddings", 405),
        ("DELETE", "/v1/responses/resp_1", 405),
    ):
        r = httpx.request(method, gw.url + path, headers=AUTH, json={})
        assert r.status_code == status, (method, path, r.text)
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert sim.stats()["routes"] == {}


def test_model_aliases_and_fallbacks(make_sim, make_gateway, tmp_path) -> None:
    from configfile import MountedSecret, document

    big, small = make_sim("--model", "big-model"), make_sim("--model", "small-model")
    secret = MountedSecret(tmp_path / "config")
    doc = document({KEY_A: {"name": "team-a"}})
    doc["models"] = {"llama": {"upstream": "big-model", "fallback": "small-model"}}
    secret.write(doc)
    gw = make_gateway(
        big.url,
        VLLM_URLS=f"{big.url},{small.url}",
        GATEWAY_CONFIG_FILE=str(secret.path),
        GATEWAY_API_KEYS="",
        UPSTREAM_HEALTH_INTERVAL_SECONDS="0.2",
    )
    client = _client(gw)
    gw.wait_for(
        lambda: {"llama", "big-model", "small-model"} <= {m.id for m in client.models.list()},
        "the alias and both replicas' models to be listed",
    )
    # The alias goes to the replica serving what it names, under that name.
    for stream in (False, True):
        raw = client.chat.completions.with_raw_response.create(
            model="llama", messages=[{"role": "user", "content": "hi"}], max_tokens=2,
            stream=stream,
        )  # fmt: skip
        assert raw.status_code == 200 and "x-tollgate-fallback" not in raw.headers
    assert big.stats()["requests"] == 2 and small.stats()["requests"] == 0
    # With no replica of it left, the fallback answers, and the answer says so.
    big.stop()
    gw.wait_for(
        lambda: (
            "no available upstream serves big-model"
            in httpx.get(gw.url + "/ready").json()["upstream_problems"]
        ),
        "the big model's replica to be marked down",
    )
    raw = client.chat.completions.with_raw_response.create(
        model="llama", messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )
    assert raw.status_code == 200
    assert raw.headers["x-tollgate-fallback"] == "small-model"
    assert raw.parse().model == "small-model"
    assert small.stats()["requests"] == 1


def test_the_readme_lists_every_route_of_the_table() -> None:
    from pathlib import Path

    from tollgate_gateway.endpoints import ENDPOINTS

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    for endpoint in ENDPOINTS:
        route = endpoint.route
        assert f"`{endpoint.method} {route}`" in readme or f"`{route}`" in readme, route
