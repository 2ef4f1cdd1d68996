"""The RPC transport with TLS (ADR 0015), on 127.0.0.1 with certificates made by
`init_certificates`: calls go through; every mismatch is a typed error at once."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from loom.core.errors import CertificateRefused, ConnectionFailed, InvalidArgument, TlsRequired
from loom.runtime.rpc import RpcClient, RpcServer, run
from loom.runtime.tls import ENV_CA, ENV_CERT, ENV_KEY, TlsConfig, peer_is_cluster
from loom.runtime.tls_certs import CertificateFiles, init_certificates

REFUSAL_S_MAX = 5.0


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> tuple[CertificateFiles, CertificateFiles]:
    base = tmp_path_factory.mktemp("certs")
    return init_certificates(base / "mine"), init_certificates(base / "other")


async def _role(body: bytes) -> bytes:
    return body + (b":cluster" if peer_is_cluster() else b":client")


def test_calls_over_tls_know_whether_the_peer_has_the_cluster_certificate(
    certs: tuple[CertificateFiles, CertificateFiles],
) -> None:
    mine, _ = certs

    async def scenario() -> None:
        async with RpcServer(_role, tls=mine.cluster()) as server:
            for tls, role in (
                (mine.cluster(), b":cluster"),
                (mine.client(), b":client"),
                (TlsConfig(ca=mine.ca), b":client"),
            ):
                async with await RpcClient.connect("127.0.0.1", server.port, tls=tls) as rpc:
                    replies = await rpc.call_many([b"a", b"b"], timeout_s=5)
                    assert replies == [b"a" + role, b"b" + role]

    run(scenario())


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_every_mismatch_is_a_typed_error_at_once(
    certs: tuple[CertificateFiles, CertificateFiles], loop: str
) -> None:
    """On uvloop (processes) and on asyncio's own loop (e.g. `asyncio.run` in an app):
    the two implement TLS separately."""
    mine, other = certs
    foreign_cert = TlsConfig(ca=mine.ca, cert=other.cert("client"), key=other.key("client"))

    async def refused(port: int, tls: TlsConfig | None) -> ConnectionFailed:
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(ConnectionFailed) as caught:
            async with await RpcClient.connect("127.0.0.1", port, tls=tls) as rpc:
                await rpc.call(b"x", timeout_s=30)
        assert loop.time() - started < REFUSAL_S_MAX
        return caught.value

    async def scenario() -> None:
        async with RpcServer(_role, tls=mine.cluster()) as server:
            plaintext = await refused(server.port, None)
            assert isinstance(plaintext, TlsRequired)
            assert "expects TLS" in str(plaintext)
            foreign = await refused(server.port, foreign_cert)
            assert isinstance(foreign, CertificateRefused)
            assert "this client's certificate" in str(foreign)
            distrusted = await refused(server.port, other.client())
            assert isinstance(distrusted, CertificateRefused)
            assert "server's certificate failed verification" in str(distrusted)
            # The listener still serves after refusing all of them.
            async with await RpcClient.connect("127.0.0.1", server.port, tls=mine.client()) as rpc:
                assert await rpc.call(b"ok", timeout_s=5) == b"ok:client"
        async with RpcServer(_role) as plain_server:
            tls_to_plain = await refused(plain_server.port, mine.client())
            assert "does it run without TLS" in str(tls_to_plain)

    (run if loop == "uvloop" else asyncio.run)(scenario())


def test_a_tls_config_checks_its_files_when_made(
    certs: tuple[CertificateFiles, CertificateFiles], tmp_path: Path
) -> None:
    mine, other = certs
    with pytest.raises(InvalidArgument, match="both a certificate and its key"):
        TlsConfig(ca=mine.ca, cert=mine.cert("node"))
    with pytest.raises(InvalidArgument, match="no file"):
        TlsConfig(ca=tmp_path / "missing.pem")
    with pytest.raises(InvalidArgument, match="cannot load"):
        TlsConfig(ca=mine.ca, cert=mine.cert("node"), key=other.key("node"))  # not its key
    with pytest.raises(InvalidArgument, match="needs a certificate"):
        TlsConfig(ca=mine.ca).server_context()


def test_a_tls_config_comes_from_the_environment(
    certs: tuple[CertificateFiles, CertificateFiles], monkeypatch: pytest.MonkeyPatch
) -> None:
    mine, _ = certs
    monkeypatch.delenv(ENV_CA, raising=False)
    assert TlsConfig.from_env() is None
    monkeypatch.setenv(ENV_CA, str(mine.ca))
    monkeypatch.setenv(ENV_CERT, str(mine.cert("client")))
    monkeypatch.setenv(ENV_KEY, str(mine.key("client")))
    assert TlsConfig.from_env() == mine.client()
