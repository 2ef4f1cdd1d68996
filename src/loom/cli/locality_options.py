"""Options of `loom sm`, `loom node` and `loom cluster up` for regions, the injected
latency matrix and the Akkio placement settings (ADR 0013)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

from loom.runtime.latency import LatencyError, LatencyMatrix, parse_latency
from loom.shardmgr.locality import LocalityParams

F = TypeVar("F", bound=Callable[..., Any])

LATENCY_HELP = (
    "Inject one-way delays between regions, e.g. 'a-b=40,a-c=80,b-c=60' (ms; "
    "'a:b=40' for labels with '-'), or a .json/.toml file {region: {region: ms}}."
)


def latency_option(function: F) -> F:
    return click.option("--latency", default="", help=LATENCY_HELP)(function)


def parse_latency_option(text: str, region: str) -> LatencyMatrix | None:
    """The matrix of `--latency` (None when empty); a bad one is a usage error."""
    if not text.strip():
        return None
    try:
        matrix = parse_latency(text)
        matrix.check_region(region)
    except LatencyError as error:
        raise click.BadParameter(str(error), param_hint="--latency") from None
    return matrix


def akkio_options(function: F) -> F:
    defaults = LocalityParams()
    options = [
        click.option(
            "--akkio-period",
            "akkio_period_s",
            type=click.FloatRange(0.1, 3600),
            default=2.0,
            show_default=True,
            help="Seconds between Akkio placement decisions.",
        ),
        click.option(
            "--akkio-share",
            type=click.FloatRange(0.5, 1.0, min_open=True),
            default=round(defaults.share_min, 3),
            show_default=True,
            help="Share of a μshard's accesses from one region that moves it there.",
        ),
        click.option(
            "--akkio-dwell",
            "akkio_dwell_s",
            type=click.FloatRange(0, 86_400),
            default=defaults.dwell_ms / 1000,
            show_default=True,
            help="Seconds a moved μshard stays before it may move again.",
        ),
        click.option(
            "--akkio-accesses-min",
            type=click.FloatRange(0),
            default=defaults.accesses_min,
            show_default=True,
            help="Decayed accesses a μshard needs before it is moved.",
        ),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def locality_params(share: float, dwell_s: float, accesses_min: float) -> LocalityParams:
    margin = min(LocalityParams().return_margin, 1 - share)
    params = LocalityParams(
        share_min=share, return_margin=margin, dwell_ms=dwell_s * 1000, accesses_min=accesses_min
    )
    problem = params.problem()
    if problem is not None:
        raise click.BadParameter(problem, param_hint="--akkio-share")
    return params
