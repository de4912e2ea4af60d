"""Random request bodies, headers and content types, sent over real HTTP: the gateway
answers each in the OpenAI error shape or passes it on, and never fails for its own
reasons (500) or stops answering."""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from servers import KEY_A, Gateway

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
_fields = st.fixed_dictionaries(
    {},
    optional={
        "model": st.sampled_from(["sim-llama", "", "other"]) | _json,
        "messages": st.just([{"role": "user", "content": "hi"}]) | _json,
        "prompt": st.just("hi") | _json,
        "stream": st.booleans() | _json,
        "stream_options": st.just({"include_usage": True}) | st.just({}) | _json,
        "max_tokens": st.integers(-2, 4) | _json,
    },
)
_bodies = (
    _fields.map(lambda d: json.dumps(d).encode())
    | _json.map(lambda v: json.dumps(v).encode())
    | st.binary(max_size=64)
)
_header_names = st.text("abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=12).filter(
    lambda n: n not in {"content-length", "transfer-encoding", "host", "connection", "expect"}
)
_header_values = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=20)


@pytest.fixture(scope="module")
def http(gateway: Gateway):
    with httpx.Client(base_url=gateway.url, timeout=10) as client:
        yield client


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    path=st.sampled_from(["/v1/chat/completions", "/v1/completions"]),
    body=_bodies,
    content_type=st.sampled_from(["application/json", "text/plain", "", "multipart/form-data"]),
    extra=st.dictionaries(_header_names, _header_values, max_size=4),
    authorized=st.booleans(),
)
def test_random_requests_never_break_the_gateway(
    http: httpx.Client, path: str, body: bytes, content_type: str, extra: dict, authorized: bool
) -> None:
    headers = {**extra, "content-type": content_type}
    headers["authorization"] = f"Bearer {KEY_A}" if authorized else headers.get("authorization", "")
    r = http.post(path, content=body, headers=headers)
    assert r.status_code != 500, r.text
    if r.status_code >= 400:
        error = r.json()["error"]
        assert isinstance(error["message"], str) and error["message"]
        assert set(error) == {"message", "type", "param", "code"}
    else:
        assert r.status_code == 200
    assert http.get("/health").status_code == 200
