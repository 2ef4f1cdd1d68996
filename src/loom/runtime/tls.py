"""Optional TLS for every loom connection (ADR 0015): one `TlsConfig` per process, threaded
to its listener and every connector.

Rules of this module:
- off by default, and then nothing here runs: listeners and connectors take `tls=None`
  and keep their plain asyncio streams (zero overhead when off);
- a TLS listener looks at the first byte a connection sends before it starts TLS: a
  TLS handshake begins with 0x16, a loom frame with 0x4C. A plaintext client is answered
  in plaintext with one connection-level error (request id 0, code `tls_required`) and
  closed, so it fails at once with `TlsRequired` instead of hanging or guessing;
- a listener asks every peer for a certificate and verifies any it gets against the CA
  (a certificate from another CA fails the handshake); clients may present none;
- cluster-internal messages (replication, assignments, reports, routing pushes, μshard
  moves) are taken only from peers whose verified certificate names the cluster role
  (organizational unit `CLUSTER_UNIT`): node↔node and node↔sm traffic is mutual TLS;
- SSL contexts are built once per `TlsConfig` (loading certificates costs milliseconds),
  so a bad path or key fails when the process starts, not on its first connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import os
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from loom.core.errors import (
    CertificateRefused,
    ConnectionFailed,
    InvalidArgument,
    PermissionDenied,
    TlsRequired,
)
from loom.runtime.codec import (
    AssignMessage,
    DropShard,
    ManagerEvent,
    MoverCall,
    NodeReportMessage,
    PeerMessage,
    RoutingPush,
)
from loom.wire.envelope import Response, encode_items
from loom.wire.frames import encode_frame

# The organizational unit of certificates that may send cluster-internal messages.
CLUSTER_UNIT: Final = "loom-cluster"
CLIENT_UNIT: Final = "loom-client"
# The first byte of a TLS record carrying a handshake (the ClientHello).
TLS_HANDSHAKE_BYTE: Final = 0x16
# The connection-level error a TLS listener sends a plaintext client.
ERROR_TLS_REQUIRED: Final = "tls_required"
TLS_REQUIRED_DETAIL: Final = "connect with TLS and the cluster's CA (--tls-ca or $LOOM_TLS_CA)"
# How long a refused plaintext peer gets to read the error before the socket closes.
REFUSAL_LINGER_S: Final = 1.0
ACCEPT_RETRY_S: Final = 0.01
ENV_CA, ENV_CERT, ENV_KEY = "LOOM_TLS_CA", "LOOM_TLS_CERT", "LOOM_TLS_KEY"

# The verified certificate of the peer on the connection this task serves (None: the
# peer presented none, or the listener runs without TLS). Set per connection task.
PEER_CERTIFICATE: Final[contextvars.ContextVar[dict[str, Any] | None]] = contextvars.ContextVar(
    "loom_peer_certificate", default=None
)


@dataclass(frozen=True, kw_only=True)
class TlsConfig:
    """`ca`: the CA bundle peers are verified against. `cert` + `key`: this process's
    certificate; listeners need one, and so does cluster-internal traffic (mutual TLS);
    clients may go without."""

    ca: Path | str
    cert: Path | str | None = None
    key: Path | str | None = None
    _server: ssl.SSLContext | None = field(default=None, init=False, repr=False, compare=False)
    _client: ssl.SSLContext = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        ca, cert, key = (None if p is None else Path(p) for p in (self.ca, self.cert, self.key))
        if ca is None:
            raise InvalidArgument("TLS needs a CA bundle (ca=...)")
        if (cert is None) != (key is None):
            raise InvalidArgument("TLS: give both a certificate and its key, or neither")
        for path in (ca, cert, key):
            if path is not None and not path.is_file():
                raise InvalidArgument(f"TLS: no file {path}")
        object.__setattr__(self, "ca", ca)
        object.__setattr__(self, "cert", cert)
        object.__setattr__(self, "key", key)
        try:
            object.__setattr__(self, "_client", self._context(ssl.Purpose.SERVER_AUTH))
            if cert is not None:
                object.__setattr__(self, "_server", self._context(ssl.Purpose.CLIENT_AUTH))
        except (ssl.SSLError, OSError) as error:
            raise InvalidArgument(f"TLS: cannot load {ca}, {cert}, {key}: {error}") from None

    @classmethod
    def from_env(cls) -> TlsConfig | None:
        """From $LOOM_TLS_CA, $LOOM_TLS_CERT and $LOOM_TLS_KEY; None when no CA is set."""
        ca = os.environ.get(ENV_CA)
        if not ca:
            return None
        cert, key = os.environ.get(ENV_CERT), os.environ.get(ENV_KEY)
        return cls(ca=Path(ca), cert=Path(cert) if cert else None, key=Path(key) if key else None)

    def _context(self, purpose: ssl.Purpose) -> ssl.SSLContext:
        context = ssl.create_default_context(purpose, cafile=str(self.ca))
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.cert is not None:
            context.load_cert_chain(str(self.cert), str(self.key))
        if purpose is ssl.Purpose.CLIENT_AUTH:
            # Ask every peer for a certificate and verify any it sends; clients may
            # send none, cluster-internal messages need one (see `may_send`).
            context.verify_mode = ssl.CERT_OPTIONAL
        return context

    def client_context(self) -> ssl.SSLContext:
        return self._client

    def server_context(self) -> ssl.SSLContext:
        if self._server is None:
            raise InvalidArgument("a TLS listener needs a certificate and key (--tls-cert)")
        return self._server

    def args(self) -> list[str]:
        """The same configuration as `loom` command-line options."""
        args = ["--tls-ca", str(self.ca)]
        if self.cert is not None and self.key is not None:
            args += ["--tls-cert", str(self.cert), "--tls-key", str(self.key)]
        return args


def is_cluster_certificate(certificate: dict[str, Any] | None) -> bool:
    """Does this verified peer certificate name the cluster role?"""
    if not certificate:
        return False
    subject = certificate.get("subject", ())
    return any(
        name == "organizationalUnitName" and value == CLUSTER_UNIT
        for rdn in subject
        for name, value in rdn
    )


def peer_is_cluster() -> bool:
    """In a handler: did the peer of this connection present a cluster certificate?"""
    return is_cluster_certificate(PEER_CERTIFICATE.get())


# Messages only the cluster's own processes send: replication, assignments and drops,
# routing pushes and μshard moves (from the manager), reports and events (to it).
CLUSTER_MESSAGES: Final = (
    PeerMessage,
    AssignMessage,
    DropShard,
    RoutingPush,
    MoverCall,
    NodeReportMessage,
    ManagerEvent,
)


def require_cluster_peer(message: object) -> None:
    """In a TLS listener's handler: refuse a cluster-internal message from a peer
    without a cluster certificate."""
    if isinstance(message, CLUSTER_MESSAGES) and not peer_is_cluster():
        raise PermissionDenied(
            f"{type(message).__name__} is cluster-internal: it needs a peer certificate "
            f"with organizational unit {CLUSTER_UNIT!r}"
        )


# ------------------------------------------------------------------------ connecting


async def open_connection(
    host: str, port: int, config: TlsConfig, handshake_timeout_s: float
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """`asyncio.open_connection` with TLS; a failed handshake is `ConnectionFailed`
    (not retryable), a refused or timed-out connection stays an `OSError`/`TimeoutError`."""
    try:
        return await asyncio.open_connection(
            host,
            port,
            ssl=config.client_context(),
            ssl_handshake_timeout=handshake_timeout_s,
        )
    except ConnectionRefusedError:
        raise
    except (ssl.SSLError, ConnectionResetError, BrokenPipeError) as failure:
        raise handshake_error(host, port, failure) from None


def handshake_error(host: str, port: int, error: BaseException) -> ConnectionFailed:
    """What a failed TLS handshake at connect time means, as a typed error."""
    where = f"{host}:{port}"
    if isinstance(error, ssl.SSLCertVerificationError):
        return CertificateRefused(
            f"TLS to {where}: the server's certificate failed verification "
            f"({error.verify_message}); is --tls-ca the cluster's CA?"
        )
    if isinstance(error, ssl.SSLError):
        return _refusal(where, error)
    return ConnectionFailed(
        f"TLS to {where}: the server closed the connection during the TLS handshake "
        f"({error!r}); does it run without TLS?"
    )


def stream_error(host: str, port: int, error: ssl.SSLError) -> ConnectionFailed:
    """An SSL error after the handshake: with TLS 1.3 a server refuses a client's
    certificate only once the client has finished its side of the handshake."""
    return _refusal(f"{host}:{port}", error)


def _refusal(where: str, error: ssl.SSLError) -> ConnectionFailed:
    reason = error.reason or str(error)
    lowered = reason.lower()
    if "certificate" in lowered or "unknown_ca" in lowered or "unknown ca" in lowered:
        return CertificateRefused(
            f"TLS to {where}: the server refused this client's certificate ({reason}); "
            "is it signed by the cluster's CA?"
        )
    return ConnectionFailed(f"TLS to {where} failed: {reason}")


def is_refused_after_handshake(writer: asyncio.StreamWriter) -> bool:
    """Did a TLS 1.3 server close this connection without ever accepting it? A server
    that accepts sends session tickets right after the handshake; one that refuses the
    client's certificate closes instead (asyncio does not flush its alert)."""
    ssl_object = writer.get_extra_info("ssl_object")
    if ssl_object is None:
        return False
    session = ssl_object.session
    return session is not None and not session.has_ticket


def certificate_refused(host: str, port: int) -> CertificateRefused:
    return CertificateRefused(
        f"TLS to {host}:{port}: the server closed the connection right after the "
        "handshake without accepting it: it refused this client's certificate (is it "
        "signed by the cluster's CA?)"
    )


def connection_error(error: str) -> ConnectionFailed:
    """A connection-level error a server sent (request id 0) before closing."""
    code, _, detail = error.partition(": ")
    if code == ERROR_TLS_REQUIRED:
        return TlsRequired(f"the server expects TLS: {detail}")
    return ConnectionFailed(f"the server refused the connection: {error}")


# ------------------------------------------------------------------------ listening

Connected = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class TlsListener:
    """Accepts on one socket; starts TLS with peers that begin a TLS handshake and
    answers the others with a `tls_required` error frame before closing them.
    Quacks like the part of `asyncio.Server` that `RpcServer` uses."""

    def __init__(self, config: TlsConfig, connected: Connected, handshake_timeout_s: float) -> None:
        self._context = config.server_context()
        self._connected = connected
        # One response frame with request id 0 (ids start at 1): a connection-level error.
        refused = Response(request_id=0, error=f"{ERROR_TLS_REQUIRED}: {TLS_REQUIRED_DETAIL}")
        self._refusal = encode_frame(encode_items([refused]))
        self._handshake_timeout_s = handshake_timeout_s
        self._socket: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._admitting: set[asyncio.Task[None]] = set()

    @property
    def sockets(self) -> list[socket.socket]:
        assert self._socket is not None
        return [self._socket]

    async def start(self, host: str, port: int) -> None:
        listener = socket.create_server((host, port), backlog=1024, reuse_port=False)
        listener.setblocking(False)
        self._socket = listener
        self._accepting = asyncio.get_running_loop().create_task(self._accept())

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._socket is not None
        while True:
            try:
                peer, _ = await loop.sock_accept(self._socket)
            except OSError:
                # The peer reset before we accepted, or no descriptor was left: keep
                # listening, without spinning on an error that persists.
                await asyncio.sleep(ACCEPT_RETRY_S)
                continue
            task = loop.create_task(self._admit(peer))
            self._admitting.add(task)
            task.add_done_callback(self._admitting.discard)

    async def _admit(self, peer: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        peer.setblocking(False)
        peer.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            async with asyncio.timeout(self._handshake_timeout_s):
                first = await _peek_byte(peer)
                if first != TLS_HANDSHAKE_BYTE:
                    await self._refuse(peer, first)
                    return
                reader = asyncio.StreamReader(limit=2**20)
                protocol = asyncio.StreamReaderProtocol(reader)
                # The transport gets its own descriptor: if the handshake fails, it
                # aborts its one while ours keeps the connection up for `_close_gently`.
                transport, _ = await loop.connect_accepted_socket(
                    lambda: protocol,
                    peer.dup(),
                    ssl=self._context,
                    ssl_handshake_timeout=self._handshake_timeout_s,
                )
        except (OSError, TimeoutError):  # SSLError is an OSError: a failed handshake
            # A TLS 1.3 client learns that its certificate was refused from an alert
            # after its side of the handshake; close gently so a reset does not eat it.
            await _close_gently(peer)
            return
        peer.close()  # the transport's descriptor stays open
        writer = asyncio.StreamWriter(transport, protocol, reader, loop)
        certificate = writer.get_extra_info("peercert")
        PEER_CERTIFICATE.set(certificate or None)
        await self._connected(reader, writer)

    async def _refuse(self, peer: socket.socket, first: int | None) -> None:
        """Tell a plaintext peer why, in its own protocol, then close."""
        loop = asyncio.get_running_loop()
        try:
            with contextlib.suppress(BlockingIOError):
                peer.recv(1 << 16)  # read what it sent, so our close does not reset
            if first is not None:
                await loop.sock_sendall(peer, self._refusal)
        except OSError:
            pass
        await _close_gently(peer)

    def close(self) -> None:
        if self._accepting is not None:
            self._accepting.cancel()
        for task in list(self._admitting):
            task.cancel()
        if self._socket is not None:
            self._socket.close()

    async def wait_closed(self) -> None:
        tasks = [t for t in (self._accepting, *self._admitting) if t is not None]
        if tasks:
            await asyncio.wait(tasks)


async def _close_gently(peer: socket.socket) -> None:
    """Close after the peer has read what we sent: shut our side, then wait (briefly) for
    it to close, discarding what it sends; closing with unread bytes would reset the
    connection and the peer could lose our last words."""
    loop = asyncio.get_running_loop()
    try:
        peer.shutdown(socket.SHUT_WR)
        async with asyncio.timeout(REFUSAL_LINGER_S):
            while await loop.sock_recv(peer, 1 << 16):
                pass
    except (OSError, TimeoutError):
        pass
    finally:
        peer.close()


async def _peek_byte(peer: socket.socket) -> int | None:
    """The first byte the peer sent, left unread (None: it closed without sending)."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            data = peer.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            pass
        else:
            return data[0] if data else None
        readable: asyncio.Future[None] = loop.create_future()

        def wake(readable: asyncio.Future[None] = readable) -> None:
            if not readable.done():
                readable.set_result(None)

        loop.add_reader(peer.fileno(), wake)
        try:
            await readable
        finally:
            loop.remove_reader(peer.fileno())
