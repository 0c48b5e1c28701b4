"""A real local Redis Cluster for tests: 3 masters + 3 replicas from `redis-server`.

Ports are chosen free (bound to port 0 by the OS, then released); each node has its
own directory, no persistence (`save ""`, no AOF: the test is about replication, not
disks). `cluster-node-timeout` is short so a killed master is replaced in about a
second. Everything waits on a condition with a deadline; `stop()` kills every node.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

NODE_TIMEOUT_MS = 500
READY_SECONDS = 30.0


def cluster_binaries_missing() -> str | None:
    """Why a local cluster cannot start here, or None."""
    for binary in ("redis-server", "redis-cli"):
        if shutil.which(binary) is None:
            return f"{binary} is not on PATH (needed for the local Redis Cluster)"
    return None


def _free_ports(count: int) -> list[int]:
    """Ports the OS hands out as free, with their cluster-bus port (+10000) free too."""
    ports: list[int] = []
    sockets = []
    try:
        while len(ports) < count:
            probe = socket.socket()
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
            sockets.append(probe)
            if port + 10000 > 65535 or port in ports:
                continue
            with socket.socket() as bus:
                try:
                    bus.bind(("127.0.0.1", port + 10000))
                except OSError:
                    continue
            ports.append(port)
    finally:
        for probe in sockets:
            probe.close()
    return ports


@dataclass
class ClusterNodeProcess:
    port: int
    directory: Path
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        log = (self.directory / "redis.log").open("ab")
        options = {
            "port": self.port,
            "bind": "127.0.0.1",
            "dir": self.directory,
            "cluster-enabled": "yes",
            "cluster-config-file": "nodes.conf",
            "cluster-node-timeout": NODE_TIMEOUT_MS,
            "cluster-replica-validity-factor": 0,  # any replica may take over
            "cluster-require-full-coverage": "no",  # other slots serve during a failover
            "save": "",
            "appendonly": "no",
        }
        args = [arg for name, value in options.items() for arg in (f"--{name}", str(value))]
        self.process = subprocess.Popen(
            ["redis-server", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()

    def kill(self) -> None:
        """SIGKILL: a crash, nothing flushed, no goodbye to the cluster."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=2.0, decode_responses=True)


@dataclass
class LocalRedisCluster:
    """3 masters + 3 replicas on free loopback ports under `directory`."""

    directory: Path
    masters: int = 3
    nodes: list[ClusterNodeProcess] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.nodes[0].port}"

    def start(self) -> None:
        ports = _free_ports(self.masters * 2)
        self.nodes = [ClusterNodeProcess(port, self.directory / str(port)) for port in ports]
        for node in self.nodes:
            node.start()
        for node in self.nodes:
            _wait(lambda node=node: _answers(node), f"redis-server on {node.port} answers")
        addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
        create = ["--cluster", "create", *addresses, "--cluster-replicas", "1", "--cluster-yes"]
        subprocess.run(
            ["redis-cli", *create],
            check=True,
            capture_output=True,
            timeout=60,
        )
        self.wait_ok()

    def wait_ok(self) -> None:
        """Until every running node says cluster_state:ok and sees all masters with a
        replica each (slots covered, replication links up)."""
        _wait(self._all_ok, "cluster_state:ok on every node")

    def _all_ok(self) -> bool:
        for node in self.running():
            with node.client() as client:
                info = client.execute_command("CLUSTER", "INFO")
                text = info if isinstance(info, str) else info.decode()
                if "cluster_state:ok" not in text:
                    return False
        return True

    def running(self) -> list[ClusterNodeProcess]:
        return [n for n in self.nodes if n.process is not None and n.process.poll() is None]

    def node(self, port: int) -> ClusterNodeProcess:
        return next(n for n in self.nodes if n.port == port)

    def master_of(self, key: str) -> ClusterNodeProcess:
        """The running node that serves `key`'s slot now (asked of any live node)."""
        for node in self.running():
            with contextlib.suppress(redis.RedisError), node.client() as client:
                slot = int(client.execute_command("CLUSTER", "KEYSLOT", key))
                for start, end, master, *_ in client.execute_command("CLUSTER", "SLOTS"):
                    if start <= slot <= end:
                        return self.node(int(master[1]))
        raise RuntimeError(f"no running node knows the master of {key!r}")

    def replica_of(self, master: ClusterNodeProcess) -> ClusterNodeProcess:
        with master.client() as client:
            master_id = client.execute_command("CLUSTER", "MYID")
            for line in client.execute_command("CLUSTER", "NODES").splitlines():
                parts = line.split()
                if len(parts) > 3 and parts[3] == master_id and "slave" in parts[2]:
                    return self.node(int(parts[1].split("@")[0].rsplit(":", 1)[1]))
        raise RuntimeError(f"master on {master.port} has no replica")

    def wait_promoted(self, key: str, old: ClusterNodeProcess) -> ClusterNodeProcess:
        """Until a node other than `old` serves `key`'s slot (the replica took over)."""
        _wait(lambda: self.master_of(key).port != old.port, f"new master for {key!r}")
        return self.master_of(key)

    def wait_replicated(self, master: ClusterNodeProcess) -> None:
        """Until `master` has a replica whose link is up (``state=online``)."""

        def online() -> bool:
            with master.client() as client:
                info = client.info("replication")
            return any(
                isinstance(v, dict) and v.get("state") == "online"
                for k, v in info.items()
                if k.startswith("slave")
            )

        _wait(online, f"an online replica of {master.port}")

    def restart(self, node: ClusterNodeProcess) -> None:
        """Start a killed node again: it rejoins (its nodes.conf) as a replica."""
        node.start()
        _wait(lambda: _answers(node), f"redis-server on {node.port} answers again")

    def stop(self) -> None:
        for node in self.nodes:
            node.kill()


def _answers(node: ClusterNodeProcess) -> bool:
    try:
        with node.client() as client:
            return bool(client.ping())
    except redis.RedisError:
        return False


def _wait(condition: object, what: str, seconds: float = READY_SECONDS) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            if callable(condition) and condition():
                return
        except (redis.RedisError, RuntimeError):
            pass  # not there yet (a node restarting, a replica not attached)
        if time.monotonic() > deadline:
            raise TimeoutError(f"local Redis Cluster: no {what} within {seconds:g}s")
        time.sleep(0.05)
