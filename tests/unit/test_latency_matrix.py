"""The injected latency matrix: parsing, typed errors, per-address delays."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from loom.cli.main import main as cli
from loom.core.errors import InvalidArgument
from loom.core.ids import NodeId
from loom.runtime.latency import LatencyError, LinkDelays, client_links, parse_latency
from loom.shardmgr.routing import EMPTY_TABLE, NodeInfo, NodeRoute

MATRIX = "a-b=40,a-c=80,b-c=60"


def test_matrix_is_symmetric_and_zero_within_a_region() -> None:
    matrix = parse_latency(MATRIX)
    assert matrix.one_way_ms("a", "b") == matrix.one_way_ms("b", "a") == 40
    assert matrix.one_way_ms("c", "b") == 60
    assert matrix.one_way_ms("a", "a") == 0
    assert matrix.one_way_ms("", "b") == 0
    assert matrix.regions == {"a", "b", "c"}


def test_labels_with_dashes_use_a_colon() -> None:
    matrix = parse_latency("us-east:eu-west=45")
    assert matrix.one_way_ms("eu-west", "us-east") == 45


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("a-b=-1", "must be in"),
        ("a-b=nan", "must be in"),
        ("a-b=x", "not a number"),
        ("a-b", "not REGION-REGION=MS"),
        ("a-b=40,a-c=80", "no entry for b-c"),
        ("a-b=40,b-a=41", "twice"),
        ("a-a=5", "within a region"),
        ("us-east-eu=4", "REGION:REGION"),
        ("", "empty"),
    ],
)
def test_bad_matrices_are_typed_errors(text: str, problem: str) -> None:
    with pytest.raises(LatencyError, match=problem) as caught:
        parse_latency(text)
    assert isinstance(caught.value, InvalidArgument)


def test_a_region_outside_the_matrix_is_refused() -> None:
    with pytest.raises(LatencyError, match="not in the latency matrix"):
        LinkDelays(parse_latency(MATRIX), "d")
    with pytest.raises(LatencyError):
        client_links(MATRIX, "z")


def test_matrix_from_json_and_toml_files(tmp_path: Path) -> None:
    as_json = tmp_path / "m.json"
    as_json.write_text(json.dumps({"a": {"b": 40, "c": 80}, "b": {"c": 60}}))
    as_toml = tmp_path / "m.toml"
    as_toml.write_text("[a]\nb = 40\nc = 80\n[b]\nc = 60\n")
    for path in (as_json, as_toml):
        matrix = parse_latency(str(path))
        assert matrix.one_way_ms("c", "a") == 80
    (tmp_path / "bad.json").write_text('{"a": {"b": -3}}')
    with pytest.raises(LatencyError):
        parse_latency(str(tmp_path / "bad.json"))


def test_delays_follow_the_routing_table_and_are_off_without_a_matrix() -> None:
    info = NodeInfo(node=NodeId("n2"), host="127.0.0.1", port=9002, region="b")
    table = EMPTY_TABLE.__class__(
        version=(1, 1),
        keyspaces=(),
        shards=(),
        nodes=(NodeRoute(info=info, alive=True),),
        manager="127.0.0.1:9000",
        manager_region="c",
    )
    links = LinkDelays(parse_latency(MATRIX), "a")
    assert links.delay_s(("127.0.0.1", 9002)) == 0.0  # not known yet
    links.learn(table)
    assert links.delay_s(("127.0.0.1", 9002)) == pytest.approx(0.040)
    assert links.delay_s(("127.0.0.1", 9000)) == pytest.approx(0.080)
    delay = links.delay_for(("127.0.0.1", 9002))
    assert delay is not None and delay() == pytest.approx(0.040)
    off = LinkDelays(None, "a")
    off.learn(table)
    assert off.delay_for(("127.0.0.1", 9002)) is None
    assert off.delay_s(("127.0.0.1", 9002)) == 0.0


@pytest.mark.parametrize(
    ("args", "problem"),
    [
        (
            ["node", "--id", "n1", "--sm", "127.0.0.1:1", "--region", "d", "--latency", "a-b=4"],
            "not in the latency matrix",
        ),
        (["sm", "--data", "DATA", "--latency", "a-b=-4"], "must be in"),
        (["keyspace", "create", "ks", "--mapping", "nearest"], "nearest"),
    ],
)
def test_the_cli_refuses_bad_regions_delays_and_mappings(
    tmp_path: Path, args: list[str], problem: str
) -> None:
    args = [str(tmp_path) if a == "DATA" else a for a in args]
    if args[0] == "node":
        args += ["--data", str(tmp_path / "n1")]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2
    assert problem in result.output
