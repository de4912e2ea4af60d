"""DNS discovery: replicas join and leave as the name's records change. The resolver is
injected (a headless Service cannot be faked here); everything else is real: simulators
on several loopback addresses (127.0.0.2, 127.0.0.3 …) on one port, real health checks."""

from __future__ import annotations

import asyncio

from servers import free_port

from tollgate_gateway.settings import load_settings
from tollgate_gateway.upstream import UpstreamPool


def test_replicas_follow_the_dns_records(make_sim) -> None:
    port = free_port()
    sims = {ip: make_sim(host=ip, port=port) for ip in ("127.0.0.2", "127.0.0.3", "127.0.0.4")}
    records = ["127.0.0.2"]
    lookups: list[tuple[str, int]] = []

    async def resolver(host: str, p: int) -> list[str]:
        lookups.append((host, p))
        return list(records)

    async def scenario() -> None:
        settings = load_settings(
            vllm_dns_name=f"vllm.llm.svc.cluster.local:{port}",
            vllm_dns_refresh_seconds=3600,  # refreshed by hand below
        )
        pool = UpstreamPool(settings, resolver=resolver)
        await pool.start()
        try:
            assert [u.base for u in pool.upstreams] == [sims["127.0.0.2"].url]
            assert pool.pick("sim-llama") is pool.upstreams[0]
            assert pool.upstreams[0].healthy and pool.upstreams[0].models == {"sim-llama"}

            records[:] = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
            first = pool.upstreams[0]
            await pool.refresh_dns()
            assert sorted(u.base for u in pool.upstreams) == sorted(s.url for s in sims.values())
            assert pool.upstreams[0] is first  # a known replica keeps its state
            assert all(u.healthy for u in pool.upstreams)  # checked as soon as they joined
            picked = {pool.pick("sim-llama").base for _ in range(200)}
            assert picked == {s.url for s in sims.values()}

            records[:] = ["127.0.0.4"]
            await pool.refresh_dns()
            assert [u.base for u in pool.upstreams] == [sims["127.0.0.4"].url]

            records[:] = []  # an empty answer is treated as a glitch: keep what we have
            await pool.refresh_dns()
            assert [u.base for u in pool.upstreams] == [sims["127.0.0.4"].url]
            assert pool.dns_refreshes == {"ok": 4, "failed": 0}
        finally:
            await pool.close()
        assert lookups[0] == ("vllm.llm.svc.cluster.local", port)

    asyncio.run(scenario())
