"""SIRA_REDIS_WAIT_REPLICAS on one Redis server: WAIT follows the scripts on their
connection, and a write no replica confirmed is not acknowledged (UNAVAILABLE).

The test Redis has no replica, so WAIT 1 always answers 0 within its timeout. The
cluster side (WAIT routed to the slot's master, failover) is `test_redis_cluster.py`.
"""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis
from store_helpers import create_experiment

from sira_server.config import ReplicaWait
from sira_server.errors import Unavailable
from sira_server.store.hot_keys import event_member
from sira_server.store.hot_state import HotState, TrackEvent, experiment_keys
from sira_server.store.script_transport import PipelineTransport, default_transport


async def test_a_write_no_replica_confirmed_is_unavailable_and_a_retry_is_safe(
    redis: aioredis.Redis, hot: HotState
) -> None:
    """`hot` (no WAIT, on each script transport) plays the caller's retry."""
    plain = hot
    experiment_id, variants = await create_experiment(plain.pool)
    await plain.init_experiment(experiment_id, variants, "conversion")
    transport = default_transport(redis, "channel", replica_wait=ReplicaWait(1, 20))
    assert isinstance(transport, PipelineTransport)  # WAIT needs redis-py's pipeline
    waiting = HotState(redis, plain.pool, transport=transport)

    with pytest.raises(Unavailable, match="NOREPLICAS"):
        await waiting.assign(experiment_id, "s1", variants[0], 0.5)
    # The script ran (the caller was told UNAVAILABLE): its retry finds the assignment.
    again = await plain.assign(experiment_id, "s1", variants[1], 0.5)
    assert (again.created, again.variant_id) == (False, variants[0])

    event = TrackEvent("s1", variants[0], "conversion", "e1", 1_700_000_000_000)
    with pytest.raises(Unavailable, match="NOREPLICAS"):
        await waiting.track(experiment_id, event)
    assert await redis.sismember(experiment_keys(experiment_id).events, event_member("e1", "s1"))

    # One WAIT per round trip: every event of a batch that ran is refused on its own.
    events = [
        TrackEvent("s1", variants[0], "conversion", f"b{i}", 1_700_000_000_000) for i in range(3)
    ]
    outcomes = await waiting.track_many(experiment_id, events)
    assert all(isinstance(o, Unavailable) and "NOREPLICAS" in str(o) for o in outcomes)
