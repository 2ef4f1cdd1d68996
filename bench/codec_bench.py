"""The node codec alone: encode + decode round trips per second. A measurement, never a test.

    .venv/bin/python -m bench.codec_bench [--seconds 3]

Three messages, each measured for an equal share of `--seconds` (after a short warm-up),
in one thread, with `loom.runtime.codec.encode` then `decode` per round trip:
- accept 16x3x120: a PeerMessage holding an Accept of 16 entries of 3 commands of 120 bytes;
- write request: a ClientCall holding a WriteRequest with a 120-byte command;
- read reply: a ClientAnswer holding a ReadReply with a 100-byte value.
Prints one table: round trips/s, µs per round trip, encoded size, MB/s of encoded bytes.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass

from rich.console import Console
from rich.table import Table

from loom.core.ids import (
    Ballot,
    Epoch,
    Generation,
    Incarnation,
    NodeId,
    Seq,
    ShardId,
    Version,
)
from loom.host.requests import ReadReply, WriteRequest
from loom.kvstate.reads import Item
from loom.paxos.messages import Accept, Entry, Envelope
from loom.runtime.codec import ClientAnswer, ClientCall, NodeMessage, PeerMessage, decode, encode

SECONDS_DEFAULT = 3.0
SECONDS_MIN = 0.3
WARMUP_SHARE = 0.1
# Round trips between clock reads: keeps the timer's cost out of the figure.
CHUNK = 256
ENTRIES = 16
COMMANDS_PER_ENTRY = 3
COMMAND_BYTES = 120
PIPE_WIDTH = 100


@dataclass(frozen=True, slots=True, kw_only=True)
class Figure:
    name: str
    round_trips_per_s: float
    encoded_bytes: int


def _messages() -> dict[str, NodeMessage]:
    ballot = Ballot(epoch=Epoch(7), node=NodeId("node-2"), incarnation=Incarnation(3))
    entries = tuple(
        Entry(
            ballot=ballot,
            seq=Seq(1_000 + i),
            wall_ms=1_700_000_000_000 + i,
            epoch=Epoch(7),
            commands=tuple(bytes([i, c]) * (COMMAND_BYTES // 2) for c in range(3)),
        )
        for i in range(ENTRIES)
    )
    assert all(len(c) == COMMAND_BYTES for e in entries for c in e.commands)
    accept = Accept(ballot=ballot, entries=entries, commit_seq=Seq(999), round=42)
    version = Version(generation=Generation(1), seq=Seq(999), index=2)
    return {
        f"accept {ENTRIES}x{COMMANDS_PER_ENTRY}x{COMMAND_BYTES}": PeerMessage(
            envelope=Envelope(
                shard=ShardId(12), src=NodeId("node-2"), dst=NodeId("node-1"), message=accept
            )
        ),
        "write request": ClientCall(
            shard=ShardId(12), request=WriteRequest(token=123_456, command=b"c" * COMMAND_BYTES)
        ),
        "read reply": ClientAnswer(
            reply=ReadReply(
                token=123_456,
                item=Item(key=b"user:42", value=b"v" * 100, version=version),
                record_version=version,
                applied_seq=Seq(999),
                epoch=Epoch(7),
            )
        ),
    }


def _round_trips(message: NodeMessage, seconds: float) -> float:
    """Round trips per second over about `seconds`."""
    done = 0
    started = time.perf_counter()
    deadline = started + seconds
    now = started
    while now < deadline:
        for _ in range(CHUNK):
            decode(encode(message))
        done += CHUNK
        now = time.perf_counter()
    return done / (now - started)


def run(seconds: float) -> list[Figure]:
    messages = _messages()
    share = seconds / len(messages)
    figures = []
    for name, message in messages.items():
        assert decode(encode(message)) == message
        _round_trips(message, share * WARMUP_SHARE)
        figures.append(
            Figure(
                name=name,
                round_trips_per_s=_round_trips(message, share * (1 - WARMUP_SHARE)),
                encoded_bytes=len(encode(message)),
            )
        )
    return figures


def _table(figures: list[Figure]) -> Table:
    table = Table(title="loom.runtime.codec: encode + decode, one thread")
    table.add_column("message")
    for heading in ("round trips/s", "µs/round trip", "bytes", "MB/s encoded"):
        table.add_column(heading, justify="right")
    for figure in figures:
        table.add_row(
            figure.name,
            f"{figure.round_trips_per_s:,.0f}",
            f"{1e6 / figure.round_trips_per_s:.2f}",
            f"{figure.encoded_bytes:,}",
            f"{figure.round_trips_per_s * figure.encoded_bytes / 1e6:,.1f}",
        )
    return table


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.codec_bench", description="Measure the node codec."
    )
    parser.add_argument(
        "--seconds",
        type=float,
        default=SECONDS_DEFAULT,
        help=f"measuring budget, all messages together (default {SECONDS_DEFAULT:g})",
    )
    arguments = parser.parse_args()
    if arguments.seconds < SECONDS_MIN:
        parser.error(f"--seconds must be at least {SECONDS_MIN:g}")
    figures = run(arguments.seconds)
    console = Console(width=None if sys.stdout.isatty() else PIPE_WIDTH)
    console.print(_table(figures))


if __name__ == "__main__":
    main()
