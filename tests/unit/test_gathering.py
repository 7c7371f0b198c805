"""The calls a process gathers and what rides them (shared.gathering): pure bookkeeping, no I/O.

The rules: an identical chunk rides the open call of its update while it fits (members and alerts),
never its own and never a younger lead's; a call takes riders until its lead's try ends, and never longer
than OPEN_CALL_MAX_SECONDS; the calls a lead's try marked Sending are in flight here until that try ends;
a call that closes hands back the riders without a message it did not carry.
"""

from __future__ import annotations

from shared.gathering import OPEN_CALL_MAX_SECONDS, Gathering, update_key
from shared.ledger import Chunk, PendingState

CLOSE = {"status": "Resolved", "comment": "closed by script"}
OTHER = {"status": "Resolved", "comment": "another comment"}
T0 = 1_700_000_000.0


def chunk(seq: int, *alerts: str, fields: dict[str, str] = CLOSE, call_id: str | None = None) -> Chunk:
    made = Chunk(f"{seq:012d}", f"op{seq}", alerts or (f"a{seq}",), dict(fields), T0, msg_token=f"t{seq}")
    if call_id is not None:
        made.state, made.call_id = PendingState.SENDING, call_id
    return made


def test_an_identical_chunk_rides_the_open_call_of_its_update_and_no_other() -> None:
    gathering, lead = Gathering(), chunk(1)
    assert gathering.ride(chunk(2), T0) is None  # nothing open

    gathering.open(lead, slot=T0 + 0.2, limit=500, now=T0)

    call = gathering.ride(chunk(2), T0)
    assert call is not None and call.lead == lead.chunk_id and call.slot == T0 + 0.2
    assert [r.chunk_id for r in call.riders] == [chunk(2).chunk_id] and (call.members, call.alerts) == (2, 2)
    assert gathering.ride(chunk(3, fields=OTHER), T0) is None  # another update
    assert gathering.ride(lead, T0) is None  # a lead never rides its own call
    assert gathering.is_open(CLOSE, T0) and not gathering.is_open(OTHER, T0)


def test_a_call_takes_riders_only_while_they_fit_its_members_and_its_alerts() -> None:
    gathering = Gathering(max_members=3)
    gathering.open(chunk(1), T0, limit=4, now=T0)

    assert gathering.ride(chunk(2, "a2", "a3"), T0) is not None  # 3 alerts in all
    assert gathering.ride(chunk(3, "a4", "a5"), T0) is None  # 5 alerts: over the limit
    assert gathering.ride(chunk(4), T0) is not None  # 4 alerts, 3 members
    assert gathering.ride(chunk(5), T0) is None  # a fourth member


def test_opening_again_moves_the_lead_s_slot_and_never_replaces_another_lead() -> None:
    gathering = Gathering()
    gathering.open(chunk(1), T0 + 0.2, 500, now=T0)
    gathering.open(chunk(1), T0 + 0.9, 500, now=T0)
    gathering.open(chunk(7), T0 + 0.1, 500, now=T0)

    call = gathering.call_of(CLOSE, T0)
    assert call is not None and call.lead == chunk(1).chunk_id and call.slot == T0 + 0.9


def test_a_call_takes_no_riders_once_its_lead_s_try_ended_and_the_next_lead_may_open() -> None:
    gathering = Gathering()
    gathering.open(chunk(1), T0, 500, now=T0)
    gathering.close(chunk(9))  # another try of the update ends: the call stays
    assert gathering.is_open(CLOSE, T0)

    gathering.close(chunk(1))

    assert not gathering.is_open(CLOSE, T0) and gathering.ride(chunk(2), T0) is None
    gathering.open(chunk(2), T0 + 1, 500, now=T0)
    call = gathering.call_of(CLOSE, T0)
    assert call is not None and call.lead == chunk(2).chunk_id


def test_a_call_open_too_long_takes_no_riders_whatever_happened_to_its_lead() -> None:
    gathering = Gathering()
    gathering.open(chunk(1), T0, 500, now=T0)
    late = T0 + OPEN_CALL_MAX_SECONDS + 1

    assert gathering.ride(chunk(2), late) is None
    assert not gathering.is_open(CLOSE, late)
    gathering.open(chunk(3), late, 500, now=late)  # a new lead opens in its place
    call = gathering.call_of(CLOSE, late)
    assert call is not None and call.lead == chunk(3).chunk_id


def test_calls_marked_by_a_lead_are_in_flight_here_until_its_try_ends() -> None:
    gathering, lead = Gathering(), chunk(1)
    gathering.open(lead, T0, 500, now=T0)
    gathering.taken(lead.chunk_id, [chunk(1, call_id="c1"), chunk(2, call_id="c1")])

    assert gathering.sending_here("c1") and not gathering.sending_here("c2")
    assert not gathering.sending_here(None)
    gathering.ended(lead)
    assert not gathering.sending_here("c1")


def test_identical_updates_share_a_key_whatever_the_order_of_their_fields() -> None:
    assert update_key({"a": "1", "b": "2"}) == update_key({"b": "2", "a": "1"})
    assert update_key({"a": "1"}) != update_key({"a": "2"})


def test_an_older_chunk_never_rides_a_younger_lead_s_call() -> None:
    """A call takes the chunks accepted after its lead first, so an older rider would be left out of every
    full call a younger lead makes: it leads instead (its own call takes the younger ones along)."""
    gathering = Gathering()
    gathering.open(chunk(5), T0, 500, now=T0)

    assert gathering.ride(chunk(3), T0) is None
    assert gathering.ride(chunk(6), T0) is not None


def test_closing_a_call_returns_the_riders_without_a_message_it_did_not_carry() -> None:
    gathering, lead = Gathering(), chunk(1)
    gathering.open(lead, T0, 500, now=T0)
    gathering.ride(chunk(2), T0, queued=False)
    gathering.ride(chunk(3), T0, queued=False)
    gathering.ride(chunk(4), T0)  # has its own message: comes back by it if left out
    assert gathering.has_riders(lead) and not gathering.has_riders(chunk(2))

    gathering.taken(lead.chunk_id, [lead, chunk(2, call_id="c1")])

    assert [c.chunk_id for c in gathering.close(lead)] == [chunk(3).chunk_id]
    assert gathering.close(lead) == []  # handed back once


def test_riders_expected_by_a_lead_join_its_call_when_it_opens_and_come_back_if_it_leads_none() -> None:
    gathering = Gathering()
    gathering.expect(chunk(1), [chunk(2), chunk(3)])
    assert gathering.has_riders(chunk(1)) and not gathering.is_open(CLOSE, T0)  # not taking riders yet

    gathering.open(chunk(1), T0 + 0.2, 500, now=T0)
    call = gathering.call_of(CLOSE, T0)
    assert call is not None and (call.members, call.alerts) == (3, 3)
    assert gathering.ride(chunk(4), T0, queued=False) is not None
    gathering.taken(chunk(1).chunk_id, [chunk(1), chunk(2), chunk(4)])
    assert [c.chunk_id for c in gathering.close(chunk(1))] == [chunk(3).chunk_id]

    # a lead that never opens a call of its own (another lead's is open) hands its expected riders back
    gathering.open(chunk(7), T0, 500, now=T0)
    gathering.expect(chunk(8), [chunk(9)])
    gathering.open(chunk(8), T0, 500, now=T0)
    open_call = gathering.call_of(CLOSE, T0)
    assert open_call is not None and open_call.lead == chunk(7).chunk_id
    assert [c.chunk_id for c in gathering.close(chunk(8))] == [chunk(9).chunk_id]
