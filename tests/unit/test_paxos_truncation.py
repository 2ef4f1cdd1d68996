"""Log truncation: what is gone from memory is streamed by snapshot, never read from the
log (regression for simulator seed 179, where an unpinned log was truncated in memory
while `truncated_seq` lagged until the next Ready, and the next ack crashed the primary).
"""

from __future__ import annotations

from dataclasses import replace

from paxos_harness import PARAMS, Cluster, assignment, config, n

from loom.core.ids import Seq
from loom.core.limits import Limits
from loom.paxos.messages import Envelope, HeartbeatAck

SMALL_LOG = replace(PARAMS, limits=Limits(log_retained_entries_max=8))


def test_primary_streams_a_snapshot_when_an_ack_arrives_right_after_an_unpinned_truncation() -> (
    None
):
    cluster = Cluster("abc", params=SMALL_LOG, start=5_000.0)
    cluster.elect(assignment(1, "a", config(1, "abc")))
    cluster.isolate("c")
    primary = cluster.r("a")
    primary.pin_log(Seq(0))  # a snapshot transfer in progress keeps the whole log
    for i in range(40):
        cluster.propose("a", b"v%d" % i)
        cluster.pump()
    assert primary.truncated_seq == 0
    primary.pin_log(None)  # the transfer finished: the next input may truncate

    lead = primary.lead
    assert lead is not None
    lagging = lead.peers[n("c")].match_seq
    ack = HeartbeatAck(lead.ballot, lead.round, True, lagging)
    cluster.now += PARAMS.resend_after_ms
    # Two inputs before the driver takes the next Ready: the tick truncates in memory,
    # the late ack makes the primary send to the lagging member again.
    primary.tick(cluster.clock("a"))
    cluster.now += PARAMS.resend_after_ms / 2
    primary.step(Envelope(primary.shard, n("c"), n("a"), ack), cluster.clock("a"))

    assert primary.truncated_seq > 0
    assert all(seq in primary.log for seq in range(primary.truncated_seq + 1, primary.last_seq + 1))
    assert n("c") in primary.ready().snapshot_needed
