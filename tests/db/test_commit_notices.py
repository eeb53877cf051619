"""Commit notice payloads: round trip, splitting, malformed input."""

from __future__ import annotations

from kfeed_server.db.commits import GAP_IDS_PER_NOTICE, CommitNotice, batch_notices


def test_a_notice_round_trips_through_its_payload() -> None:
    notice = CommitNotice("abc123", 7, 100, 250, (3, 9))
    assert CommitNotice.parse(notice.payload()) == notice


def test_malformed_payloads_are_not_notices() -> None:
    for payload in ("", "{}", "[1, 2]", '["o", "x", 1, 2, []]', "not json"):
        assert CommitNotice.parse(payload) is None


def test_a_batch_without_snapshots_or_gaps_sends_nothing() -> None:
    assert batch_notices("o", 1, [], []) == []


def test_many_gaps_are_split_and_every_payload_fits_postgres_limit() -> None:
    gap_ids = list(range(10**12, 10**12 + 2 * GAP_IDS_PER_NOTICE + 5))
    notices = batch_notices("o" * 16, 2**40, [5, 9, 7], gap_ids)
    assert len(notices) == 3
    assert (notices[0].first_snapshot_id, notices[0].last_snapshot_id) == (5, 9)
    assert all(n.first_snapshot_id == 0 for n in notices[1:])
    assert [g for n in notices for g in n.gap_ids] == gap_ids
    assert {n.batch for n in notices} == {2**40}
    assert max(len(n.payload().encode()) for n in notices) < 8_000
