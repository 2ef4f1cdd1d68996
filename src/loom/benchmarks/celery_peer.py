"""The Celery peer of `loom bench functions --peer celery`: a real `redis-server` as the
broker, a real Celery worker process, `calls` no-op tasks sent by `submitters`
concurrent submitters; the figures of `calls_figures` (definitions there).

Rules of this module:
- Every process is a child we started: `redis-server` (127.0.0.1, a free port, its
  directory and log under `workdir`) and `celery worker` (in a session of its own, so
  its pool processes share its process group). We stop only those, by PID: SIGTERM,
  then SIGKILL after a timeout; the worker's process group too if a pool process
  outlived it. On success, error, timeout and Ctrl-C alike.
- Redis runs with no config file, so its persistence is the default that Debian's
  redis.conf also keeps: RDB snapshots (save 3600 1 300 100 60 10000), no AOF. The
  values Redis reports are passed to `progress`. Celery keeps its defaults too: a task
  is acknowledged when a worker takes it (not after it ran), no result backend.
- The no-op task records when it finished (the worker's wall clock) in a Redis list,
  which the measurer drains after the submit phase (see `celery_app`); a submit's time
  is read just before `send_task`, its acknowledgement (Redis's reply to the LPUSH)
  just after, on the same wall clock.
- Submitters are threads, each with its own producer and connection: Celery's client
  is synchronous, so a thread stands for one application thread submitting.
- Everything is bounded: starting (`START_TIMEOUT_S`), stopping (`STOP_TIMEOUT_S`), and
  the run: submitting may take up to `timeout_s`, and completions are awaited up to
  `timeout_s` after the submit phase ends (as loom's side does); calls not completed by
  then are lost.
- celery and redis (the `dev` extra) are imported lazily, so loom runs without them;
  their absence, like a missing `redis-server`, is a `CeleryMissing` that says so.
"""

from __future__ import annotations

import importlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, ExitStack, contextmanager, suppress
from pathlib import Path
from types import ModuleType, TracebackType
from typing import Literal, Protocol, Self, cast, get_args

from loom.benchmarks.calls_figures import CallsFigures

HOST = "127.0.0.1"
BROKER_URL_ENV = "LOOM_BENCH_CELERY_BROKER"
DONE_KEY = "loom-bench:done"
READY_KEY = "loom-bench:ready"
NOOP_TASK = "loom_bench.noop"
WORKER_APP = "loom.benchmarks.celery_app"

Pool = Literal["prefork", "threads", "gevent", "solo"]
POOLS: tuple[Pool, ...] = get_args(Pool)
# The fastest pool for a no-op on 2 shared cores, measured with bench/celery_peer_bench.py
# (3000-5000 calls, runs interleaved): threads beat prefork in every paired run, ~1.3-2x
# the completed calls/s, and cost less worker CPU per call (~1.2 against ~1.7 s per 1000
# calls): no pipe round trip to a pool process per task, and a no-op never holds the
# GIL long. gevent was no faster than threads and is one more dependency; solo ignores
# `concurrency` (one call at a time) and was no faster either.
POOL_DEFAULT: Pool = "threads"

CALLS_MAX = 1_000_000
CONCURRENCY_MAX = 512
SUBMITTERS_MAX = 256
START_TIMEOUT_S = 30.0
START_ATTEMPTS_MAX = 3
PORT_IN_USE = "Address already in use"
STOP_TIMEOUT_S = 10.0
SOCKET_TIMEOUT_S = 10.0
POLL_INTERVAL_S = 0.05
DRAIN_BATCH = 1000
DRAIN_WAIT_S = 0.2
LOG_TAIL_BYTES = 2000
REDIS_SETTINGS = ("save", "appendonly", "appendfsync")
DEV_EXTRA = "dev"

Progress = Callable[[str], None]


class CeleryPeerError(Exception):
    """The Celery peer could not be started, or failed while measured."""


class CeleryMissing(CeleryPeerError):
    """redis-server, celery or the redis client is not installed."""


# --- typed views of the untyped clients ------------------------------------------


class _Redis(Protocol):
    """The part of `redis.Redis` the measurer uses."""

    def ping(self) -> object: ...

    def get(self, name: str) -> bytes | None: ...

    def flushdb(self) -> object: ...

    def lpop(self, name: str, count: int | None = None) -> list[bytes] | bytes | None: ...

    def blpop(self, keys: list[str], timeout: float) -> tuple[bytes, bytes] | None: ...

    def config_get(self, pattern: str) -> dict[str, str]: ...

    def info(self, section: str) -> dict[str, object]: ...

    def close(self) -> None: ...


class _CeleryApp(Protocol):
    """The part of `celery.Celery` the submitters use (celery has no type hints)."""

    def send_task(self, name: str, args: tuple[object, ...], producer: object) -> object: ...

    def producer_or_acquire(self) -> AbstractContextManager[object]: ...

    def close(self) -> None: ...


def _import(module: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise CeleryMissing(
            f"the Celery peer needs the {module!r} package: pip install -e '.[{DEV_EXTRA}]' "
            "(or pip install 'celery[redis]>=5.7')"
        ) from error


def _binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise CeleryMissing(
            f"{name!r} not found on PATH (Debian: apt-get install redis-server; "
            "`make redis` does it)"
        )
    return path


def _check(calls: int, concurrency: int, submitters: int, timeout_s: float) -> None:
    if not 1 <= calls <= CALLS_MAX:
        raise ValueError(f"calls must be in 1..{CALLS_MAX}, not {calls}")
    if not 1 <= concurrency <= CONCURRENCY_MAX:
        raise ValueError(f"concurrency must be in 1..{CONCURRENCY_MAX}, not {concurrency}")
    if not 1 <= submitters <= SUBMITTERS_MAX:
        raise ValueError(f"submitters must be in 1..{SUBMITTERS_MAX}, not {submitters}")
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be positive, not {timeout_s}")


# --- processes ----------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _log_tail(path: Path) -> str:
    try:
        with path.open("rb") as log:
            log.seek(0, os.SEEK_END)
            log.seek(max(0, log.tell() - LOG_TAIL_BYTES))
            return log.read().decode(errors="replace")
    except OSError:
        return "(no log)"


@contextmanager
def _child(
    args: list[str], log_path: Path, env: dict[str, str]
) -> Iterator[subprocess.Popen[bytes]]:
    """A child process in a session of its own, output to `log_path`; stopped by PID
    (SIGTERM, SIGKILL after `STOP_TIMEOUT_S`) when the block ends, however it ends."""
    with log_path.open("wb") as log:
        process = subprocess.Popen(  # noqa: S603 (our own arguments, no shell)
            args,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    try:
        yield process
    finally:
        _stop(process)


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    # The child led a process group of its own (start_new_session): whatever is left in
    # it (a Celery pool process whose parent was killed) is ours to end.
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)


def _wait_until(
    is_done: Callable[[], bool], process: subprocess.Popen[bytes], what: str, log_path: Path
) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while not is_done():
        if process.poll() is not None:
            raise CeleryPeerError(
                f"{what} exited with {process.returncode}; log {log_path}:\n{_log_tail(log_path)}"
            )
        if time.monotonic() > deadline:
            raise CeleryPeerError(
                f"{what} not ready within {START_TIMEOUT_S:g} s; log {log_path}:\n"
                f"{_log_tail(log_path)}"
            )
        time.sleep(POLL_INTERVAL_S)


def _start_redis(stack: ExitStack, workdir: Path) -> tuple[str, _Redis, subprocess.Popen[bytes]]:
    binary = _binary("redis-server")
    redis_module = _import("redis")
    data_dir = workdir / "redis"
    data_dir.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, START_ATTEMPTS_MAX + 1):
        with ExitStack() as attempt_stack:
            try:
                url, client, process = _start_redis_once(
                    attempt_stack, binary, redis_module, data_dir
                )
            except CeleryPeerError as error:
                # Another process may take the port between our probe and Redis's bind.
                if PORT_IN_USE not in str(error) or attempt == START_ATTEMPTS_MAX:
                    raise
                continue
            stack.push(attempt_stack.pop_all())
            return url, client, process
    raise AssertionError("unreachable: the last attempt returns or raises")


def _start_redis_once(
    stack: ExitStack, binary: str, redis_module: ModuleType, data_dir: Path
) -> tuple[str, _Redis, subprocess.Popen[bytes]]:
    port = _free_port()
    log_path = data_dir.parent / "redis.log"
    args = [binary, "--bind", HOST, "--port", str(port), "--dir", str(data_dir)]
    process = stack.enter_context(_child([*args, "--daemonize", "no"], log_path, _env()))
    url = f"redis://{HOST}:{port}/0"
    client = cast(
        _Redis,
        redis_module.Redis.from_url(
            url, socket_timeout=SOCKET_TIMEOUT_S, socket_connect_timeout=SOCKET_TIMEOUT_S
        ),
    )
    stack.callback(client.close)

    def is_up() -> bool:
        try:
            client.ping()
        except (OSError, redis_module.RedisError):
            return False
        return True

    _wait_until(is_up, process, f"redis-server on port {port}", log_path)
    # A snapshot left in a reused workdir would bring back old tasks, completions and
    # a stale readiness mark.
    client.flushdb()
    return url, client, process


def _start_worker(
    stack: ExitStack, workdir: Path, url: str, client: _Redis, *, pool: Pool, concurrency: int
) -> subprocess.Popen[bytes]:
    _import("celery")
    log_path = workdir / "celery-worker.log"
    args = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        WORKER_APP,
        "worker",
        f"--pool={pool}",
        f"--concurrency={concurrency}",
        "--loglevel=WARNING",
        # Cluster chatter the benchmark does not use; mingle also delays the start.
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
    ]
    process = stack.enter_context(_child(args, log_path, {**_env(), BROKER_URL_ENV: url}))
    _wait_until(lambda: client.get(READY_KEY) is not None, process, "celery worker", log_path)
    return process


def _env() -> dict[str, str]:
    # A caller's CELERY_* variables would silently reconfigure the worker.
    return {k: v for k, v in os.environ.items() if not k.startswith(("CELERY_", BROKER_URL_ENV))}


# --- measuring ----------------------------------------------------------------------


def _celery_app(url: str) -> _CeleryApp:
    celery = _import("celery")
    app = celery.Celery("loom_bench_submitter", broker=url)
    app.conf.update(
        task_ignore_result=True,
        broker_transport_options={
            "socket_timeout": SOCKET_TIMEOUT_S,
            "socket_connect_timeout": SOCKET_TIMEOUT_S,
        },
    )
    return cast(_CeleryApp, app)


def _submit_all(
    app: _CeleryApp, calls: int, submitters: int, deadline: float
) -> tuple[list[float], float]:
    """Sends the calls from `submitters` threads (call i from thread i % submitters);
    returns each call's submit time and the submit phase in seconds."""
    submitted_at = [0.0] * calls
    acked_at = [0.0] * calls
    stop = threading.Event()

    def submitter(first: int) -> None:
        with app.producer_or_acquire() as producer:
            for index in range(first, calls, submitters):
                if stop.is_set():
                    return
                submitted_at[index] = time.time()
                app.send_task(NOOP_TASK, args=(index,), producer=producer)
                acked_at[index] = time.time()

    with ThreadPoolExecutor(max_workers=submitters, thread_name_prefix="submitter") as threads:
        futures = [threads.submit(submitter, first) for first in range(submitters)]
        try:
            for future in futures:
                future.result(timeout=max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            raise CeleryPeerError("submitting the calls took longer than the timeout") from None
        except Exception as error:
            raise CeleryPeerError(f"a submit failed: {type(error).__name__}: {error}") from error
        finally:
            stop.set()
    return submitted_at, max(acked_at) - min(submitted_at)


def _drain(client: _Redis, calls: int, deadline: float) -> tuple[list[float | None], int]:
    """Completion times read from `DONE_KEY` until every call completed or the deadline;
    also how many completions were repeats (Celery runs a task at most once when it
    acknowledges early, so 0 is expected)."""
    completed_at: list[float | None] = [None] * calls
    seen = repeats = 0
    while seen < calls and time.monotonic() < deadline:
        batch = client.lpop(DONE_KEY, DRAIN_BATCH)
        if not batch:
            popped = client.blpop([DONE_KEY], timeout=DRAIN_WAIT_S)
            batch = [] if popped is None else [popped[1]]
        assert isinstance(batch, list)
        for record in batch:
            index_text, finished_text = record.decode().split()
            index = int(index_text)
            if not 0 <= index < calls:
                raise CeleryPeerError(f"a completion for call {index}, which was never sent")
            if completed_at[index] is None:
                completed_at[index] = float(finished_text)
                seen += 1
            else:
                repeats += 1
    return completed_at, repeats


def _redis_settings(client: _Redis) -> str:
    version = client.info("server").get("redis_version", "?")
    settings: dict[str, str] = {}
    for name in REDIS_SETTINGS:
        settings.update(client.config_get(name))
    shown = ", ".join(f"{name} {settings.get(name, '?')!r}" for name in REDIS_SETTINGS)
    return f"redis {version} ({shown})"


class CeleryPeer:
    """redis-server and a Celery worker (`pool`, `concurrency`) under `workdir`, started
    on entering and stopped by PID on leaving, however the block ends; `measure` sends
    the calls. Not reentrant."""

    def __init__(self, workdir: Path, *, pool: Pool = POOL_DEFAULT, concurrency: int) -> None:
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {', '.join(POOLS)}, not {pool!r}")
        if not 1 <= concurrency <= CONCURRENCY_MAX:
            raise ValueError(f"concurrency must be in 1..{CONCURRENCY_MAX}, not {concurrency}")
        self.workdir = workdir
        self.pool = pool
        self.concurrency = concurrency
        self._stack = ExitStack()
        self._processes: list[subprocess.Popen[bytes]] = []
        self._url = ""
        self._client: _Redis | None = None

    @property
    def pids(self) -> tuple[int, ...]:
        """redis-server's and the worker's; each also leads its own process group."""
        return tuple(p.pid for p in self._processes)

    def __enter__(self) -> Self:
        self.workdir.mkdir(parents=True, exist_ok=True)
        with ExitStack() as stack:
            self._url, self._client, redis_process = _start_redis(stack, self.workdir)
            self._processes.append(redis_process)
            worker = _start_worker(
                stack,
                self.workdir,
                self._url,
                self._client,
                pool=self.pool,
                concurrency=self.concurrency,
            )
            self._processes.append(worker)
            self._stack = stack.pop_all()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._stack.close()

    def describe(self) -> str:
        assert self._client is not None
        return (
            f"{_redis_settings(self._client)} and a worker (pool {self.pool}, concurrency "
            f"{self.concurrency}, a task acknowledged before it runs, Celery's default)"
        )

    def measure(
        self, calls: int, *, submitters: int, timeout_s: float, progress: Progress
    ) -> CallsFigures:
        """Sends `calls` no-op tasks from `submitters` threads and waits up to
        `timeout_s` after the submit phase for them to complete."""
        assert self._client is not None
        with ExitStack() as stack:
            app = _celery_app(self._url)
            stack.callback(app.close)
            submit_deadline = time.monotonic() + timeout_s
            submitted_at, submit_s = _submit_all(app, calls, submitters, submit_deadline)
            progress(f"celery: submitted in {submit_s:.1f} s; waiting for completions")
            drain_deadline = time.monotonic() + timeout_s
            completed_at, repeats = _drain(self._client, calls, drain_deadline)
        if repeats:
            progress(f"celery: {repeats} calls ran more than once")
        return CallsFigures.from_times(
            submitted_at_s=submitted_at, completed_at_s=completed_at, submit_s=submit_s
        )


def run_celery(
    calls: int,
    *,
    concurrency: int = 16,
    submitters: int = 4,
    timeout_s: float = 120.0,
    workdir: Path,
    pool: Pool = POOL_DEFAULT,
    progress: Progress = lambda _: None,
) -> CallsFigures:
    """Starts redis-server and a Celery worker (`pool`, `concurrency`) under `workdir`,
    sends `calls` no-op tasks from `submitters` threads, waits up to `timeout_s` after
    the submit phase for them to complete, stops both processes and returns the
    figures. Raises ValueError on settings out of range, CeleryMissing when redis-server,
    celery or redis is not installed, CeleryPeerError when a process fails."""
    _check(calls, concurrency, submitters, timeout_s)
    started = time.monotonic()
    with CeleryPeer(workdir, pool=pool, concurrency=concurrency) as peer:
        progress(f"celery: {peer.describe()} ready in {time.monotonic() - started:.1f} s")
        return peer.measure(calls, submitters=submitters, timeout_s=timeout_s, progress=progress)
