"""The gateway with its upstream client swapped for httpx, to measure the alternative.

Not a supported mode: `gateway_bench.py --gateway-cmd ".venv/bin/python
bench/httpx_gateway.py"` runs the same benchmark against it, so the choice of aiohttp
(services/gateway/tollgate_gateway/upstream.py) rests on numbers from the real gateway.
Only the per-request POST changes; health checks keep using aiohttp.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from tollgate_gateway import main as gateway_main
from tollgate_gateway.upstream import Upstream

_closing: set[asyncio.Future[None]] = set()


class _Response:
    """The slice of aiohttp's ClientResponse that the proxy reads."""

    def __init__(self, response: httpx.Response) -> None:
        self._response = response
        self.status = response.status_code
        self.reason = response.reason_phrase
        self.headers = response.headers
        self.content_type = response.headers.get("content-type", "").split(";")[0]
        self.content = self

    def iter_any(self) -> Any:
        return self._response.aiter_raw()

    async def read(self) -> bytes:
        return await self._response.aread()

    def release(self) -> None:
        task = asyncio.ensure_future(self._response.aclose())
        _closing.add(task)
        task.add_done_callback(_closing.discard)

    close = release


class _Session:
    def __init__(self, aiohttp_session: Any) -> None:
        self._aiohttp = aiohttp_session
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(600.0, connect=5.0),
            limits=httpx.Limits(max_connections=1000, max_keepalive_connections=1000),
        )
        self.get = aiohttp_session.get

    async def post(self, url: Any, data: bytes, headers: dict[str, str], timeout: Any) -> Any:  # noqa: ASYNC109
        request = self._client.build_request("POST", str(url), content=data, headers=headers)
        return _Response(await self._client.send(request, stream=True))

    async def close(self) -> None:
        await self._client.aclose()
        await self._aiohttp.close()


_start = Upstream.start


async def _start_with_httpx(self: Upstream) -> None:
    await _start(self)
    self.session = _Session(self.session)  # type: ignore[assignment]


Upstream.start = _start_with_httpx  # type: ignore[method-assign]

if __name__ == "__main__":
    gateway_main.main()
