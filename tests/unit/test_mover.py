"""The mover (shardmgr/moves.py) driven against two real kv state machines.

The driver here executes each output on the kv state directly (apply and export, the
same functions the hosts call), so the tests see the mover's protocol end to end
without replication; the simulator adds the network, crashes and failovers.
"""

from __future__ import annotations

from kv_state import Harness, U, request

from loom.core.ids import Generation, MoveId, ShardId, UShard
from loom.core.time import Instant
from loom.kvstate.commands import Applied, Put, Rejected, decode_command
from loom.kvstate.ownership import (
    Owner,
    export_chunk,
    generation,
    movable_records,
    ownership,
)
from loom.kvstate.reads import read_item
from loom.shardmgr.moves import (
    ExportChunk,
    Exported,
    InstallMapping,
    Mover,
    MoverOutput,
    MoverParams,
    Proposed,
    ProposeMove,
    Step,
    Unanswered,
    plan_reshard,
)

S, T = ShardId(0), ShardId(1)


class Driver:
    def __init__(self, mover: Mover) -> None:
        self.mover = mover
        self.shards = {S: Harness(), T: Harness(initial=frozenset(), seq=100)}
        self.mapping = {U: S}
        self.now = 0.0
        self.proposed: list[tuple[ShardId, str]] = []
        self.installed_at: list[float] = []

    def answer(self, output: MoverOutput) -> None:
        match output:
            case ProposeMove():
                command = decode_command(output.command)
                self.proposed.append((output.shard, type(command).__name__))
                result = self.shards[output.shard].one(command)
                self.mover.on_reply(output.token, Proposed(result=result), Instant(self.now))
            case ExportChunk():
                state = self.shards[output.shard].state
                held = ownership(state, output.ushard, self.shards[output.shard].initial)
                if held.state is not Owner.FROZEN:
                    self.mover.on_reply(output.token, Unanswered(), Instant(self.now))
                    return
                records, cursor = export_chunk(state, output.ushard, output.after, output.limit)
                total = movable_records(state, output.ushard) if output.after is None else None
                reply = Exported(
                    records=tuple(records),
                    cursor=cursor,
                    generation=generation(state, output.ushard, Generation(0)),
                    total=total,
                )
                self.mover.on_reply(output.token, reply, Instant(self.now))
            case InstallMapping():
                self.mapping[output.ushard] = output.shard
                self.installed_at.append(self.now)
                self.mover.mapping_installed(output.move_id, Instant(self.now))

    def run(self, *, lose_every: int = 0, steps_max: int = 500) -> None:
        """Answer outputs (dropping every `lose_every`-th) and tick until idle."""
        sent = 0
        for _ in range(steps_max):
            outputs = self.mover.outputs()
            if not outputs and not self.mover.in_flight():
                return
            for output in outputs:
                sent += 1
                if lose_every and sent % lose_every == 0 and not isinstance(output, InstallMapping):
                    continue  # lost request or reply: the mover must resend
                self.answer(output)
            self.now += 100.0
            self.mover.tick(Instant(self.now))
        raise AssertionError("the move did not finish")


def loaded_driver(params: MoverParams) -> Driver:
    driver = Driver(Mover(params))
    source = driver.shards[S]
    for i in range(9):
        source.one(Put(request=request(i + 1), ushard=U, key=b"k%d" % i, value=b"v%d" % i))
    return driver


def test_a_move_copies_in_chunks_commits_installs_and_drops() -> None:
    driver = loaded_driver(MoverParams(chunk_records_max=4))
    move_id = driver.mover.start(U, S, T, Instant(0))
    driver.run()
    move = driver.mover.moves[move_id]
    assert move.step is Step.DONE and move.chunks > 3
    assert driver.mapping[U] == T
    target, source = driver.shards[T], driver.shards[S]
    item = read_item(target.state, U, b"k8", target.wall_ms)
    assert item is not None and item.value == b"v8"
    assert ownership(source.state, U, None).state is Owner.DROPPED
    # The order of the protocol: Freeze, Ingest…, Own, Drop.
    kinds = [kind for _, kind in driver.proposed]
    assert kinds[0] == "Freeze" and kinds[-2:] == ["Own", "Drop"]
    assert set(kinds[1:-2]) == {"Ingest"}


def test_a_pause_runs_from_the_moves_start_to_its_mapping_and_the_longest_is_kept() -> None:
    driver = loaded_driver(MoverParams(chunk_records_max=4))
    driver.mover.start(U, S, T, Instant(0))
    driver.run()
    first = driver.installed_at[-1]
    assert first > 0 and driver.mover.pauses == {U: first}
    # The μshard moves on, faster (everything fits one chunk): the longest stays.
    third = ShardId(2)
    driver.shards[third] = Harness(initial=frozenset(), seq=200)
    driver.mover.params = MoverParams(chunk_records_max=100)
    started = driver.now
    driver.mover.start(U, T, third, Instant(started))
    driver.run()
    second = driver.installed_at[-1] - started
    assert 0 < second < first and driver.mover.pauses == {U: first}


def test_lost_requests_and_replies_are_resent_and_the_move_still_completes() -> None:
    driver = loaded_driver(MoverParams(chunk_records_max=3, resend_after_ms=150))
    move_id = driver.mover.start(U, S, T, Instant(0))
    driver.run(lose_every=3)
    assert driver.mover.moves[move_id].step is Step.DONE
    retried = driver.shards[T].one(Put(request=request(9), ushard=U, key=b"k8", value=b"v8"))
    assert isinstance(retried, Applied) and retried.version.seq < 100  # the source's result


def test_a_move_that_cannot_copy_in_time_aborts_and_the_source_owns_again() -> None:
    driver = loaded_driver(MoverParams(abort_after_ms=1000))
    move_id = driver.mover.start(U, S, T, Instant(0))
    freeze = driver.mover.outputs()
    driver.answer(freeze[0])  # frozen; every export from now on is lost
    for _ in range(20):
        driver.now += 100.0
        driver.mover.tick(Instant(driver.now))
        driver.mover.outputs()
    driver.run()
    assert driver.mover.moves[move_id].step is Step.ABORTED
    assert driver.mapping[U] == S
    source = driver.shards[S]
    assert isinstance(source.one(Put(request=request(50), ushard=U, key=b"k", value=b"x")), Applied)
    assert ownership(driver.shards[T].state, U, frozenset()).state is Owner.ABSENT


def test_once_own_was_sent_the_move_never_aborts() -> None:
    driver = loaded_driver(MoverParams(chunk_records_max=100, abort_after_ms=1000))
    move_id = driver.mover.start(U, S, T, Instant(0))
    for _ in range(3):  # Freeze, Export, Ingest
        (output,) = driver.mover.outputs()
        driver.answer(output)
    (own,) = driver.mover.outputs()
    assert isinstance(own, ProposeMove) and decode_command(own.command).__class__.__name__ == "Own"
    for _ in range(50):  # Own's replies are all lost, far past abort_after_ms
        driver.now += 100.0
        driver.mover.tick(Instant(driver.now))
        for output in driver.mover.outputs():
            assert isinstance(output, ProposeMove)
            assert type(decode_command(output.command)).__name__ == "Own"
    driver.run()
    assert driver.mover.moves[move_id].step is Step.DONE


def test_a_stale_reply_is_ignored() -> None:
    driver = loaded_driver(MoverParams())
    move_id = driver.mover.start(U, S, T, Instant(0))
    (freeze,) = driver.mover.outputs()
    driver.now = 1000.0
    driver.mover.tick(Instant(driver.now))  # resent with a new token
    (resent,) = driver.mover.outputs()
    assert isinstance(freeze, ProposeMove) and isinstance(resent, ProposeMove)
    refused = Rejected(reason="ownership", message="stale")
    driver.mover.on_reply(freeze.token, Proposed(result=refused), Instant(driver.now))
    assert driver.mover.moves[move_id].step is Step.FREEZE
    driver.answer(resent)
    assert driver.mover.moves[move_id].step is Step.EXPORT
    assert driver.mover.moves[move_id].move_id == MoveId(1)


def test_a_reshard_plan_moves_exactly_the_ushards_whose_pshard_changes() -> None:
    current = {UShard(u): ShardId(u % 2) for u in range(8)}
    target = {UShard(u): ShardId(u % 4) for u in range(8)}
    plan = plan_reshard(current, target)
    assert sorted(plan) == [(UShard(u), ShardId(u % 4)) for u in range(8) if u % 4 >= 2]
    assert [shard for _, shard in plan][:2] == [ShardId(2), ShardId(3)]  # round-robin
    assert plan_reshard(target, target) == []


def test_planned_moves_start_at_most_the_parallelism_and_skip_settled_ushards() -> None:
    mover = Mover(MoverParams(moves_in_flight_max=2))
    mapping = {UShard(u): ShardId(0) for u in range(5)}
    mapping[UShard(4)] = ShardId(1)  # already where the plan sends it
    mover.plan([(UShard(u), ShardId(1)) for u in range(5)])
    assert mover.start_planned(mapping.__getitem__, Instant(0)) == 2
    assert mover.in_flight() == 2
    assert [u for u, _ in mover.planned] == [UShard(2), UShard(3)]
    assert mover.start_planned(mapping.__getitem__, Instant(10)) == 0  # no free slot


def test_planned_moves_wait_until_both_pshards_have_an_active_primary() -> None:
    mover = Mover(MoverParams(moves_in_flight_max=4))
    mapping = {UShard(0): ShardId(0), UShard(1): ShardId(0)}
    mover.plan([(UShard(0), ShardId(1)), (UShard(1), ShardId(2))])
    ready = {ShardId(0), ShardId(1)}  # p-shard 2 is still starting
    assert mover.start_planned(mapping.__getitem__, Instant(0), ready.__contains__) == 1
    assert mover.planned == [(UShard(1), ShardId(2))]
    ready.add(ShardId(2))
    assert mover.start_planned(mapping.__getitem__, Instant(10), ready.__contains__) == 1


def test_a_restored_mover_resumes_its_moves_and_its_plan() -> None:
    driver = loaded_driver(MoverParams(chunk_records_max=2))
    driver.mover.plan([(U, T)])
    driver.mover.start_planned(driver.mapping.__getitem__, Instant(0))
    for _ in range(4):  # Freeze, Export, Ingest, Export: mid-copy
        (output,) = driver.mover.outputs()
        driver.answer(output)
    (lost,) = driver.mover.outputs()  # the manager dies with this Ingest in flight
    assert isinstance(lost, ProposeMove)
    record = driver.mover.record()
    assert [m.step for m in record.moves] == [Step.INGEST]
    resumed = Mover(MoverParams(chunk_records_max=2))
    resumed.restore(record, Instant(0))
    driver.mover = resumed
    driver.run()
    (move,) = resumed.moves.values()
    assert move.step is Step.DONE and driver.mapping[U] == T
    target = driver.shards[T]
    item = read_item(target.state, U, b"k8", target.wall_ms)
    assert item is not None and item.value == b"v8"


def test_a_restored_move_that_may_have_sent_own_never_aborts() -> None:
    driver = loaded_driver(MoverParams(chunk_records_max=100, abort_after_ms=500))
    driver.mover.start(U, S, T, Instant(0))
    for _ in range(3):  # Freeze, Export, Ingest
        (output,) = driver.mover.outputs()
        driver.answer(output)
    record = driver.mover.record()  # Own is about to leave
    assert record.moves[0].own_sent
    resumed = Mover(MoverParams(abort_after_ms=500))
    resumed.restore(record, Instant(0))
    for _ in range(30):
        driver.now += 100.0
        resumed.tick(Instant(driver.now))
        for output in resumed.outputs():
            assert isinstance(output, ProposeMove)
            assert type(decode_command(output.command)).__name__ == "Own"
    driver.mover = resumed
    driver.run()
    assert next(iter(resumed.moves.values())).step is Step.DONE
