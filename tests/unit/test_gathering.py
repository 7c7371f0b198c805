"""The calls a process gathers and what rides them (shared.gathering): pure bookkeeping, no I/O.

The rules: an identical chunk rides the open call of its update while it fits (members and alerts),
never its own; a call's untaken riders become orphans when its lead's try ends, adopted by the next call
of their update opened here; with orphans and no open call one of them is queued to lead (the driver),
and an orphan that waited too long is queued on its own; riders the call took are owed nothing.
"""

from __future__ import annotations

from shared.gathering import Gathering, update_key
from shared.ledger import Chunk, PendingState

CLOSE = {"status": "Resolved", "comment": "closed by script"}
OTHER = {"status": "Resolved", "comment": "another comment"}
T0 = 1_700_000_000.0


def chunk(seq: int, *alerts: str, fields: dict[str, str] = CLOSE, call_id: str | None = None) -> Chunk:
    made = Chunk(f"{seq:012d}", f"op{seq}", alerts or (f"a{seq}",), dict(fields), T0, msg_token=f"t{seq}")
    if call_id is not None:
        made.state, made.call_id = PendingState.SENDING, call_id
    return made


def ids(chunks: list[Chunk]) -> list[str]:
    return [c.chunk_id for c in chunks]


def test_an_identical_chunk_rides_the_open_call_of_its_update_and_no_other() -> None:
    gathering, lead = Gathering(), chunk(1)
    assert gathering.ride(chunk(2)) is None  # nothing open

    gathering.open(lead, slot=T0 + 0.2, limit=500)

    call = gathering.ride(chunk(2))
    assert call is not None and call.lead == lead.chunk_id and call.slot == T0 + 0.2
    assert ids(call.riders) == [chunk(2).chunk_id] and call.members == 2 and call.alerts == 2
    assert gathering.ride(chunk(3, fields=OTHER)) is None  # another update
    assert gathering.ride(lead) is None  # a lead never rides its own call
    assert gathering.is_open(CLOSE) and not gathering.is_open(OTHER)


def test_a_call_takes_riders_only_while_they_fit_its_members_and_its_alerts() -> None:
    gathering = Gathering(max_members=3)
    gathering.open(chunk(1), T0, limit=4)

    assert gathering.ride(chunk(2, "a2", "a3")) is not None  # 3 alerts in all
    assert gathering.ride(chunk(3, "a4", "a5")) is None  # 5 alerts: over the limit
    assert gathering.ride(chunk(4)) is not None  # 4 alerts, 3 members
    assert gathering.ride(chunk(5)) is None  # a fourth member


def test_opening_again_moves_the_lead_s_slot_and_never_replaces_another_lead() -> None:
    gathering = Gathering()
    gathering.open(chunk(1), T0 + 0.2, 500)
    gathering.open(chunk(1), T0 + 0.9, 500)
    gathering.open(chunk(7), T0 + 0.1, 500)

    call = gathering.call_of(CLOSE)
    assert call is not None and call.lead == chunk(1).chunk_id and call.slot == T0 + 0.9


def test_riders_the_call_took_are_owed_nothing_and_the_rest_wait_for_the_next_call() -> None:
    gathering, lead = Gathering(), chunk(1)
    gathering.open(lead, T0, 500)
    for n in (2, 3, 4):
        gathering.ride(chunk(n))
    gathering.taken(lead.chunk_id, [chunk(1, call_id="c1"), chunk(2, call_id="c1")])

    driver = gathering.close(lead, now=T0 + 1)

    # 3 and 4 were left out: one of them is queued to lead the next call, the other waits for it
    assert ids(driver) == [chunk(3).chunk_id]
    assert ids(gathering.orphans(CLOSE)) == [chunk(4).chunk_id]
    assert not gathering.is_open(CLOSE)


def test_the_next_call_opened_here_adopts_the_orphans_that_fit() -> None:
    gathering = Gathering(max_members=3)
    gathering.open(chunk(1), T0, 500)
    for n in (2, 3, 4, 5):
        gathering.ride(chunk(n))  # 2 and 3 ride; 4 and 5 do not fit (3 members)
    assert gathering.close(chunk(1), now=T0 + 1) == [chunk(2)]  # the driver; 3 is an orphan

    gathering.open(chunk(9), T0 + 2, 500)

    call = gathering.call_of(CLOSE)
    assert call is not None and ids(call.riders) == [chunk(3).chunk_id]
    assert gathering.orphans(CLOSE) == []


def test_a_driver_is_queued_only_while_no_call_of_the_update_is_open() -> None:
    gathering = Gathering()
    gathering.open(chunk(1), T0, 500)
    gathering.ride(chunk(2))
    gathering.ride(chunk(3))
    assert ids(gathering.close(chunk(1), now=T0 + 1)) == [chunk(2).chunk_id]  # 3 waits

    gathering.open(chunk(2), T0 + 2, 500)  # the driver leads: it adopts 3
    # another try of the update ends while that call is open: no second driver
    assert gathering.close(chunk(8), now=T0 + 2) == []
    call = gathering.call_of(CLOSE)
    assert call is not None and ids(call.riders) == [chunk(3).chunk_id]


def test_an_orphan_that_waited_too_long_is_queued_on_its_own() -> None:
    gathering = Gathering(orphan_max_wait=5.0)
    gathering.open(chunk(1), T0, 500)
    for n in (2, 3):
        gathering.ride(chunk(n))
    assert ids(gathering.close(chunk(1), now=T0)) == [chunk(2).chunk_id]
    gathering.open(chunk(20, fields=OTHER), T0, 500)

    assert gathering.close(chunk(20, fields=OTHER), now=T0 + 4) == []  # 3 still waits for its driver
    assert ids(gathering.close(chunk(21, fields=OTHER), now=T0 + 6)) == [chunk(3).chunk_id]
    assert gathering.orphans(CLOSE) == []


def test_orphans_over_the_next_call_s_size_wait_for_the_call_after() -> None:
    gathering = Gathering(max_members=4)
    gathering.open(chunk(1), T0, 500)
    for n in (2, 3, 4):
        gathering.ride(chunk(n))
    assert ids(gathering.close(chunk(1), now=T0)) == [chunk(2).chunk_id]  # 3 and 4 wait

    gathering.open(chunk(9), T0 + 1, limit=2)  # room for one more alert: 3 rides, 4 still waits
    call = gathering.call_of(CLOSE)
    assert call is not None and ids(call.riders) == [chunk(3).chunk_id]
    assert ids(gathering.orphans(CLOSE)) == [chunk(4).chunk_id]

    # 9's call took nothing: 4 leads the next call, 3 waits for it
    assert ids(gathering.close(chunk(9), now=T0 + 2)) == [chunk(4).chunk_id]
    assert ids(gathering.orphans(CLOSE)) == [chunk(3).chunk_id]


def test_calls_marked_by_a_lead_are_in_flight_here_until_its_try_ends() -> None:
    gathering, lead = Gathering(), chunk(1)
    gathering.open(lead, T0, 500)
    gathering.taken(lead.chunk_id, [chunk(1, call_id="c1"), chunk(2, call_id="c1")])

    assert gathering.sending_here("c1") and not gathering.sending_here("c2")
    assert not gathering.sending_here(None)
    gathering.close(lead, now=T0)
    assert not gathering.sending_here("c1")


def test_identical_updates_share_a_key_whatever_the_order_of_their_fields() -> None:
    assert update_key({"a": "1", "b": "2"}) == update_key({"b": "2", "a": "1"})
    assert update_key({"a": "1"}) != update_key({"a": "2"})
