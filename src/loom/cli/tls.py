"""TLS from the command line (ADR 0015): `loom tls init DIR`, the `--tls-ca`,
`--tls-cert` and `--tls-key` options of the processes (`loom sm`, `node`, `scheduler`,
`worker`) and of the root command for client commands (`loom --tls-ca ca.pem kv get …`),
all defaulting to $LOOM_TLS_CA, $LOOM_TLS_CERT and $LOOM_TLS_KEY."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from loom.core.errors import InvalidArgument
from loom.runtime.tls import ENV_CA, ENV_CERT, ENV_KEY, TlsConfig

FILE = click.Path(exists=True, dir_okay=False, path_type=Path)
_OPTIONS = (
    click.option(
        "--tls-ca", type=FILE, envvar=ENV_CA, help=f"CA bundle: turns TLS on (${ENV_CA})."
    ),
    click.option(
        "--tls-cert",
        type=FILE,
        envvar=ENV_CERT,
        help=f"This process's certificate (${ENV_CERT}); listeners need one.",
    ),
    click.option("--tls-key", type=FILE, envvar=ENV_KEY, help=f"Its private key (${ENV_KEY})."),
)


def tls_config(ca: Path | None, cert: Path | None, key: Path | None) -> TlsConfig | None:
    """The configuration these options give; None (TLS off) without a CA."""
    if ca is None:
        if cert is not None or key is not None:
            raise click.UsageError("--tls-cert/--tls-key need --tls-ca (the CA to verify peers)")
        return None
    try:
        return TlsConfig(ca=ca, cert=cert, key=key)
    except InvalidArgument as error:
        raise click.UsageError(str(error)) from None


def tls_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Adds the three options to a command, which gets them as one `tls` argument
    (falling back to the root command's, `loom --tls-ca … COMMAND`)."""

    @functools.wraps(fn)
    def command(
        *args: Any, tls_ca: Path | None, tls_cert: Path | None, tls_key: Path | None, **kw: Any
    ) -> Any:
        tls = tls_config(tls_ca, tls_cert, tls_key) or current_tls()
        return fn(*args, tls=tls, **kw)

    for option in reversed(_OPTIONS):
        command = option(command)
    return command


def root_tls_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(_OPTIONS):
        fn = option(fn)
    return fn


def current_tls() -> TlsConfig | None:
    """The root command's TLS options (or the environment's), for client commands."""
    context = click.get_current_context(silent=True)
    root = context.find_root().obj if context is not None else None
    if isinstance(root, dict) and isinstance(root.get("tls"), TlsConfig):
        tls: TlsConfig = root["tls"]
        return tls
    try:
        return TlsConfig.from_env()
    except InvalidArgument as error:
        raise click.UsageError(str(error)) from None


@click.group("tls")
def tls_group() -> None:
    """Certificates for a cluster with TLS."""


@tls_group.command("init")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--host",
    "hosts",
    multiple=True,
    help="Another name or IP the nodes are reached by (repeatable; 127.0.0.1, ::1 and "
    "localhost are always in).",
)
def init_command(directory: Path, hosts: tuple[str, ...]) -> None:
    """Make a CA, a cluster certificate (sm, nodes, schedulers) and a client certificate
    in DIRECTORY. Keys are written 0600; nothing is overwritten."""
    from loom.runtime.tls_certs import init_certificates  # noqa: PLC0415 - needs cryptography

    try:
        files = init_certificates(directory, hosts)
    except InvalidArgument as error:
        raise click.ClickException(str(error)) from None
    node, client = files.cert("node"), files.cert("client")
    click.echo(f"CA {files.ca} (its key: {files.key('ca')})")
    click.echo(f"cluster certificate {node}, key {files.key('node')}")
    click.echo(f"client certificate {client}, key {files.key('client')}")
    click.echo(f"  processes: --tls-ca {files.ca} --tls-cert {node} --tls-key {files.key('node')}")
    click.echo(f"  clients:   export {ENV_CA}={files.ca}")
