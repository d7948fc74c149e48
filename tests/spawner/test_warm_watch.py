"""The hub's watcher of warm pools, in-process: a real pool HTTP server (no slots),
the hub's registry. A pool that answers stays offered; once it stops answering it is
out within the bound, with no claim or server there to notice."""

from __future__ import annotations

import asyncio
import threading
from http.server import ThreadingHTTPServer
from pathlib import Path

from gpuportal.provider import isolation, warmpool
from gpuportal.spawners.warm import PoolRef, WarmPools

SECRET = "s" * 64
JOB = "gpuportal-warmpool--nx--0000"


async def test_a_silent_pool_is_taken_out_within_the_bound(tmp_path: Path) -> None:
    from gpuportal.provider import warmclaim

    pool = warmpool.Pool(
        JOB, warmclaim.pool_key(SECRET, JOB), 0, {isolation.ENV_HOMES: str(tmp_path / "h")}
    )
    server = ThreadingHTTPServer(("127.0.0.1", 0), warmpool.handler_for(pool))
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}).start()
    pools = WarmPools()
    pools.secret = SECRET
    ref = PoolRef("http://jobs", "nx", JOB, f"http://127.0.0.1:{server.server_address[1]}")
    ref.state = "ready"
    pools.pools[("http://jobs", "nx")] = ref
    bound = 1.5
    try:
        pools.watch(ref, None, bound)
        pools.watch(ref, None, bound)  # idempotent: one watcher per pool
        assert len(pools._watchers) == 1
        await asyncio.sleep(2 * bound)  # answering: still offered after the whole bound
        assert pools.ready("http://jobs", "nx") is ref
    finally:
        server.shutdown()
        server.server_close()
    for _ in range(int(4 * bound / 0.25)):  # bounded wait, no timing asserted
        if ref.state == "failed":
            break
        await asyncio.sleep(0.25)
    assert ref.state == "failed" and "not answered" in ref.why
    assert pools.ready("http://jobs", "nx") is None
    rows = await pools.snapshot()
    assert rows == [{"node_id": "nx", "job_id": JOB, "state": "failed", "why": ref.why}]
    assert SECRET not in repr(rows)
