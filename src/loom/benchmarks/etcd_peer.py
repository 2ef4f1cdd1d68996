"""The etcd peer of `loom bench kv --peer etcd`: a real local 3-member etcd cluster and
a YCSB `Driver` over etcd's native gRPC API.

Rules of this module:
- Every etcd process is a child we started; we stop only those, by PID (SIGTERM, then
  SIGKILL after a timeout), and their logs go to files in the cluster's directory.
- etcd runs with its defaults for durability (WAL fsync on every commit, as deployed);
  only names, directories and 127.0.0.1 URLs are set.
- The etcd client (`aetcd`, gRPC) is imported lazily, only when a driver is made, and
  kept behind a small typed wrapper (it ships no type hints).
"""

from __future__ import annotations

import asyncio
import importlib
import itertools
import json
import os
import shutil
import signal
import socket
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType, TracebackType
from typing import Literal, Protocol, Self, cast

from loom.benchmarks.ycsb import Driver

HOST = "127.0.0.1"
START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 10.0
START_ATTEMPTS_MAX = 3
HTTP_TIMEOUT_S = 2.0
HTTP_RESPONSE_BYTES_MAX = 64 * 1024
POLL_INTERVAL_S = 0.05
LOG_TAIL_BYTES = 2000
RPC_TIMEOUT_S = 10
CLIENT_EXTRA = "bench"
PORT_IN_USE = "address already in use"
STATUS_PATH = "/v3/maintenance/status"

Placement = Literal["spread", "leader"]


class EtcdError(Exception):
    """The etcd peer could not be started or reached."""


class EtcdMissing(EtcdError):
    """The etcd binary or the etcd client package is not installed."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Endpoint:
    host: str
    port: int


@dataclass(frozen=True, slots=True, kw_only=True)
class _Member:
    name: str
    client_port: int
    peer_port: int
    data_dir: Path

    @property
    def client_url(self) -> str:
        return f"http://{HOST}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{HOST}:{self.peer_port}"

    @property
    def log_path(self) -> Path:
        return self.data_dir.parent / f"{self.name}.log"


def _free_ports(count: int) -> list[int]:
    """Ports the kernel hands out now; all held open together so they are distinct."""
    with ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind((HOST, 0))
            ports.append(int(sock.getsockname()[1]))
        return ports


def _etcd_env() -> dict[str, str]:
    # ETCD_* variables from the caller's environment would silently change the flags.
    return {k: v for k, v in os.environ.items() if not k.startswith("ETCD_")}


def _log_tail(path: Path) -> str:
    try:
        with path.open("rb") as log:
            log.seek(0, os.SEEK_END)
            log.seek(max(0, log.tell() - LOG_TAIL_BYTES))
            return log.read().decode(errors="replace")
    except OSError:
        return "(no log)"


def _prepare_dirs(base_dir: Path, members: list[_Member]) -> None:
    base_dir.mkdir(parents=True, exist_ok=True)
    for member in members:
        shutil.rmtree(member.data_dir, ignore_errors=True)


async def _http(port: int, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
    """One HTTP/1.0 exchange with a member (for health and status only)."""
    async with asyncio.timeout(HTTP_TIMEOUT_S):
        reader, writer = await asyncio.open_connection(HOST, port)
        try:
            head = (
                f"{method} {path} HTTP/1.0\r\nHost: {HOST}:{port}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
            )
            writer.write(head.encode() + body)
            await writer.drain()
            response = b""
            while chunk := await reader.read(HTTP_RESPONSE_BYTES_MAX):
                response += chunk
                if len(response) > HTTP_RESPONSE_BYTES_MAX:
                    raise EtcdError(f"etcd on port {port} sent an oversized reply to {path}")
        finally:
            writer.close()
            await writer.wait_closed()
    status_line, _, rest = response.partition(b"\r\n")
    _, _, payload = rest.partition(b"\r\n\r\n")
    parts = status_line.split()
    status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
    return status, payload


class EtcdCluster:
    """A fresh local etcd cluster (`members` members, static bootstrap) under `base_dir`;
    an async context manager. `endpoints` are the members' client addresses."""

    def __init__(
        self,
        base_dir: Path,
        *,
        members: int = 3,
        binary: str = "etcd",
        start_timeout_s: float = START_TIMEOUT_S,
        stop_timeout_s: float = STOP_TIMEOUT_S,
    ) -> None:
        assert members >= 1
        self.base_dir = base_dir
        self.member_count = members
        self.binary = binary
        self.start_timeout_s = start_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self._members: list[_Member] = []
        self._processes: list[asyncio.subprocess.Process] = []

    @property
    def endpoints(self) -> tuple[Endpoint, ...]:
        return tuple(Endpoint(host=HOST, port=m.client_port) for m in self._members)

    @property
    def pids(self) -> tuple[int, ...]:
        return tuple(p.pid for p in self._processes)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        binary = shutil.which(self.binary)
        if binary is None:
            raise EtcdMissing(
                f"etcd binary {self.binary!r} not found on PATH "
                "(Debian: apt-get install etcd-server)"
            )
        for attempt in range(1, START_ATTEMPTS_MAX + 1):
            try:
                await self._start_once(binary)
                return
            except EtcdError as error:
                await self.stop()
                # Another process may take a port between our probe and etcd's bind.
                if PORT_IN_USE not in str(error) or attempt == START_ATTEMPTS_MAX:
                    raise
            except BaseException:
                await self.stop()
                raise

    async def _start_once(self, binary: str) -> None:
        ports = _free_ports(2 * self.member_count)
        self._members = [
            _Member(
                name=f"m{i + 1}",
                client_port=ports[2 * i],
                peer_port=ports[2 * i + 1],
                data_dir=self.base_dir / f"m{i + 1}",
            )
            for i in range(self.member_count)
        ]
        await asyncio.to_thread(_prepare_dirs, self.base_dir, self._members)
        initial_cluster = ",".join(f"{m.name}={m.peer_url}" for m in self._members)
        token = f"loom-bench-{ports[0]}"
        for member in self._members:
            await self._spawn(binary, member, initial_cluster, token)
        await self._wait_healthy()

    async def _spawn(self, binary: str, member: _Member, initial_cluster: str, token: str) -> None:
        args = [
            f"--name={member.name}",
            f"--data-dir={member.data_dir}",
            f"--listen-client-urls={member.client_url}",
            f"--advertise-client-urls={member.client_url}",
            f"--listen-peer-urls={member.peer_url}",
            f"--initial-advertise-peer-urls={member.peer_url}",
            f"--initial-cluster={initial_cluster}",
            "--initial-cluster-state=new",
            f"--initial-cluster-token={token}",
            "--logger=zap",
            "--log-outputs=stderr",
        ]
        log = await asyncio.to_thread(member.log_path.open, "wb")
        try:
            process = await asyncio.create_subprocess_exec(
                binary,
                *args,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=_etcd_env(),
            )
        finally:
            log.close()  # the child holds its own descriptor
        self._processes.append(process)

    async def _wait_healthy(self) -> None:
        try:
            async with asyncio.timeout(self.start_timeout_s):
                for member, process in zip(self._members, self._processes, strict=True):
                    while not await self._is_healthy(member):
                        if process.returncode is not None:
                            raise EtcdError(
                                f"etcd member {member.name} exited with {process.returncode}; "
                                f"log {member.log_path}:\n{_log_tail(member.log_path)}"
                            )
                        await asyncio.sleep(POLL_INTERVAL_S)
        except TimeoutError:
            tails = "\n".join(f"--- {m.log_path}:\n{_log_tail(m.log_path)}" for m in self._members)
            raise EtcdError(
                f"etcd cluster not healthy within {self.start_timeout_s:g} s\n{tails}"
            ) from None

    async def _is_healthy(self, member: _Member) -> bool:
        try:
            status, body = await _http(member.client_port, "GET", "/health")
        except (OSError, TimeoutError):
            return False
        return status == 200 and b'"health":"true"' in body.replace(b" ", b"")

    async def leader(self) -> Endpoint:
        """The member that is raft leader now (asked through etcd's JSON gateway)."""
        for member in self._members:
            try:
                status, body = await _http(member.client_port, "POST", STATUS_PATH, b"{}")
                answer = json.loads(body) if status == 200 else {}
                is_leader = answer.get("leader") == answer["header"]["member_id"]
            except (OSError, TimeoutError, ValueError, KeyError, TypeError):
                continue  # a member down or an answer we do not understand: ask the next
            if is_leader:
                return Endpoint(host=HOST, port=member.client_port)
        raise EtcdError("no etcd member reports itself leader")

    async def stop(self) -> None:
        """SIGTERM to each member we started, SIGKILL after `stop_timeout_s`; idempotent.

        The leader goes last: a leader stopped with live followers first tries to hand
        its leadership over, and waits up to 7 s if they are stopping too."""
        leader_port = await self._leader_port_if_known()
        followers = [
            p
            for m, p in zip(self._members, self._processes, strict=False)
            if m.client_port != leader_port
        ]
        await self._terminate(followers)
        await self._terminate(self._processes)
        self._processes = []

    async def _leader_port_if_known(self) -> int | None:
        if not any(p.returncode is None for p in self._processes):
            return None
        try:
            return (await self.leader()).port
        except EtcdError:
            return None

    async def _terminate(self, processes: list[asyncio.subprocess.Process]) -> None:
        for process in processes:
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                async with asyncio.timeout(self.stop_timeout_s):
                    await process.wait()
            except TimeoutError:
                process.kill()
                await process.wait()


# --- the driver --------------------------------------------------------------------


class _KeyValue(Protocol):
    value: bytes


class _AetcdClient(Protocol):
    """The part of `aetcd.Client` the driver uses (aetcd has no type hints)."""

    async def connect(self) -> None: ...

    async def close(self) -> None: ...

    async def get(self, key: bytes, serializable: bool = False) -> _KeyValue | None: ...

    async def put(self, key: bytes, value: bytes) -> object: ...


def _import_aetcd() -> ModuleType:
    try:
        return importlib.import_module("aetcd")
    except ImportError as error:
        raise EtcdMissing(
            "the etcd peer needs the 'aetcd' package: "
            f"pip install -e '.[{CLIENT_EXTRA}]' (or pip install 'aetcd>=1.0')"
        ) from error


class EtcdDriver:
    """One etcd client with its own gRPC channel and TCP connection. `get` is etcd's
    default linearizable read (serializable=False); `put` is a plain put."""

    def __init__(self, client: _AetcdClient) -> None:
        self._client = client

    @classmethod
    async def connect(cls, endpoint: Endpoint, *, rpc_timeout_s: int = RPC_TIMEOUT_S) -> Self:
        aetcd = _import_aetcd()
        # gRPC shares one connection among channels with equal arguments unless each
        # channel has its own subchannel pool; a driver stands for one app process.
        options = {"grpc.use_local_subchannel_pool": 1}
        client = cast(
            _AetcdClient,
            aetcd.Client(
                host=endpoint.host, port=endpoint.port, timeout=rpc_timeout_s, options=options
            ),
        )
        await client.connect()
        return cls(client)

    async def get(self, key: bytes) -> bytes | None:
        found = await self._client.get(key, serializable=False)
        return None if found is None else bytes(found.value)

    async def put(self, key: bytes, value: bytes) -> None:
        await self._client.put(key, value)

    async def close(self) -> None:
        await self._client.close()


class EtcdDrivers:
    """A `DriverFactory`: each call connects a new `EtcdDriver`, round-robin over
    `endpoints`.

    Placement "leader" (the default) points every driver at the raft leader: measured
    here 15-25 % more puts and linearizable gets per second than "spread" over the
    three members, because a follower forwards each put to the leader and asks it for a
    ReadIndex before each linearizable get; loom's clients likewise go to the primary."""

    def __init__(self, endpoints: tuple[Endpoint, ...]) -> None:
        assert endpoints
        self._next = itertools.cycle(endpoints)

    @classmethod
    async def for_cluster(cls, cluster: EtcdCluster, placement: Placement = "leader") -> Self:
        if placement == "leader":
            return cls((await cluster.leader(),))
        return cls(cluster.endpoints)

    async def __call__(self) -> Driver:
        return await EtcdDriver.connect(next(self._next))
