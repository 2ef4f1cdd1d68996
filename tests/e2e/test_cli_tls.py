"""TLS from the command line (ADR 0015): `loom tls init` makes the certificates, `loom
cluster up --tls` runs a whole cluster with them, and the client commands connect with
$LOOM_TLS_CA (or `loom --tls-ca`) — and say why when they connect without it."""

from __future__ import annotations

import ipaddress
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509

from e2e.test_cli_cluster import loom

STOP_TIMEOUT_S = 20


def test_tls_init_makes_a_ca_and_certificates_with_private_keys(tmp_path: Path) -> None:
    made = loom("tls", "init", str(tmp_path / "certs"), "--host", "db.example")
    assert "ca.pem" in made.stdout
    certs = tmp_path / "certs"
    for key in ("ca-key.pem", "node-key.pem", "client-key.pem"):
        assert stat.S_IMODE((certs / key).stat().st_mode) == 0o600
    node = x509.load_pem_x509_certificate((certs / "node.pem").read_bytes())
    names = node.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "db.example" in names.get_values_for_type(x509.DNSName)
    assert "localhost" in names.get_values_for_type(x509.DNSName)
    assert ipaddress.ip_address("127.0.0.1") in names.get_values_for_type(x509.IPAddress)
    again = loom("tls", "init", str(certs), check=False)
    assert again.returncode != 0
    assert "not overwriting" in again.stderr


@pytest.mark.timeout(180)
def test_cluster_up_with_tls_serves_the_cli_with_the_ca_in_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "data"
    args = ["cluster", "up", "--tls", "--port", "0", "--data", str(data)]
    up = subprocess.Popen(  # our own interpreter and arguments
        [sys.executable, "-m", "loom.cli.main", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert up.stdout is not None
        lines = [up.stdout.readline() for _ in range(8)]
        address = next(line.split()[-1] for line in lines if "connect to" in line)
        assert any("TLS is on" in line for line in lines), lines
        ca = data / "tls" / "ca.pem"
        at = ("-c", address)
        for name in ("LOOM_TLS_CERT", "LOOM_TLS_KEY"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("LOOM_TLS_CA", str(ca))  # the loom subprocesses inherit it
        created = loom("keyspace", "create", "users", "--shards", "1", *at)
        assert "ready" in created.stdout
        loom("kv", "put", "users", "alice", "hello", *at)
        monkeypatch.delenv("LOOM_TLS_CA")
        # The root option works as the environment does.
        got = loom("--tls-ca", str(ca), "kv", "get", "users", "alice", *at)
        assert got.stdout == "hello\n"

        plain = loom("kv", "get", "users", "alice", *at, check=False)
        assert plain.returncode == 1
        assert "TlsRequired" in plain.stderr
        assert "expects TLS" in plain.stderr
    finally:
        up.send_signal(signal.SIGTERM)
        up.wait(timeout=STOP_TIMEOUT_S)
        if up.stdout is not None:
            up.stdout.close()
