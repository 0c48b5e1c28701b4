"""``WAIT`` after a round trip of scripts: acknowledged only once replicas have it.

Redis replicates asynchronously: a master that dies right after answering may take
the last writes with it, and the promoted replica never had them. With
`ReplicaWait`, the scripts of one round trip are followed, on the same connection, by
``WAIT replicas timeout_ms``, which answers how many replicas confirmed everything
this connection wrote; fewer than asked means the call is not acknowledged: a
``NOREPLICAS`` error (`store.faults` maps it to UNAVAILABLE; Assign is sticky and Track
idempotent, so the caller's retry is safe). The round trips are
`store.script_transport.PipelineTransport`'s (the script channel has no WAIT, so
`default_transport` never picks it with `ReplicaWait`); a refusal answers each call
that ran.

WAIT must reach the node that ran the scripts. One server: the pipeline is one
connection. A cluster: redis-py splits a pipeline per node and sends each node's part
on one connection, so WAIT is routed explicitly (``target_nodes``) to the master of
the scripts' slot (one round trip's scripts share a slot: `Coalescer` batches per
experiment). If the slot changed masters during the call (failover, MOVED), WAIT
confirmed the wrong node: the call is refused the same way. Not covered: a script
redirected with ASK while its slot is being migrated (resharding) runs on the target
node, and WAIT still confirms the source's replicas.
"""

from __future__ import annotations

from typing import Any

from redis import exceptions as redis_errors
from redis.asyncio.cluster import ClusterNode, RedisCluster

from sira_server.config import ReplicaWait as ReplicaWait
from sira_server.store.redis_conn import RedisClient


def add_wait(pipe: Any, redis: RedisClient, key: str, wait: ReplicaWait) -> ClusterNode | None:
    """Queue WAIT on `pipe` after the scripts on `key`'s slot; the node it targets."""
    if isinstance(redis, RedisCluster):
        node = redis.get_node_from_key(key)
        pipe.execute_command("WAIT", wait.replicas, wait.timeout_ms, target_nodes=node)
        return node
    pipe.execute_command("WAIT", wait.replicas, wait.timeout_ms)
    return None


def check_wait(
    reply: Any, redis: RedisClient, key: str, node: ClusterNode | None, wait: ReplicaWait
) -> None:
    """Raise unless `reply` (WAIT's) says enough replicas of the right node confirmed."""
    if isinstance(reply, redis_errors.ResponseError):
        # "WAIT cannot be used with replica instances": the node was demoted (failover).
        raise redis_errors.ResponseError(f"NOREPLICAS WAIT refused: {reply}") from reply
    if isinstance(reply, Exception):
        raise reply
    if node is not None and isinstance(redis, RedisCluster):
        now = redis.get_node_from_key(key)
        if now is None or now.name != node.name:
            raise redis_errors.ResponseError(
                f"NOREPLICAS the slot of {key} moved to another master during the call"
            )
    if int(reply) < wait.replicas:
        raise redis_errors.ResponseError(
            f"NOREPLICAS {int(reply)} of {wait.replicas} replica(s) confirmed the write"
            f" within {wait.timeout_ms} ms"
        )
