"""The on-disk spool: durable append, acks, crash recovery, torn tails, order, compaction."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from kfeed.v1 import ingest_service_pb2, types_pb2
from kfeed_ingest.spool import JOURNAL_NAME, Spool


def _batch(ticker: str) -> ingest_service_pb2.PublishRequest:
    return ingest_service_pb2.PublishRequest(
        producer="test", snapshots=[types_pb2.MarketSnapshot(ticker=ticker)]
    )


def _tickers(spool: Spool) -> list[str]:
    return [request.snapshots[0].ticker for request in spool.pending()]


def test_batches_are_numbered_and_pending_until_acked(tmp_path: Path) -> None:
    with Spool.open(tmp_path) as spool:
        first, second = spool.append(_batch("A")), spool.append(_batch("B"))
        assert (first.batch_id, second.batch_id) == (1, 2)
        spool.mark_acked(1)
        assert [r.batch_id for r in spool.pending()] == [2]


def test_reopening_resends_unacked_batches_in_append_order(tmp_path: Path) -> None:
    with Spool.open(tmp_path) as spool:
        for ticker in "ABCDE":
            spool.append(_batch(ticker))
        spool.mark_acked(2)
        spool.mark_acked(4)
    with Spool.open(tmp_path) as reopened:
        assert _tickers(reopened) == ["A", "C", "E"]
        assert reopened.next_batch_id == 6


def test_a_process_killed_after_append_loses_nothing(tmp_path: Path) -> None:
    # A real crash: the child appends, then dies with os._exit (no close, no flush by Python).
    script = textwrap.dedent(
        f"""
        import os
        from kfeed.v1 import ingest_service_pb2, types_pb2
        from kfeed_ingest.spool import Spool
        spool = Spool.open({str(tmp_path)!r})
        for ticker in ("A", "B", "C"):
            spool.append(ingest_service_pb2.PublishRequest(snapshots=[types_pb2.MarketSnapshot(ticker=ticker)]))
        spool.mark_acked(1)
        os._exit(9)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], check=False, timeout=60)
    assert result.returncode == 9
    with Spool.open(tmp_path) as spool:
        assert _tickers(spool) == ["B", "C"]


def test_a_torn_tail_is_detected_and_truncated(tmp_path: Path) -> None:
    with Spool.open(tmp_path) as spool:
        spool.append(_batch("A"))
        spool.append(_batch("B"))
    journal = tmp_path / JOURNAL_NAME
    intact = journal.stat().st_size
    with journal.open("ab") as handle:
        handle.write(b"\x00\x00\x01\x00garbage-from-a-torn-write")

    with Spool.open(tmp_path) as spool:
        assert _tickers(spool) == ["A", "B"]
        assert spool.truncated_bytes > 0
        assert journal.stat().st_size == intact
        spool.append(_batch("C"))
    with Spool.open(tmp_path) as spool:
        assert _tickers(spool) == ["A", "B", "C"]


def test_a_flipped_byte_in_the_last_record_drops_only_that_record(tmp_path: Path) -> None:
    with Spool.open(tmp_path) as spool:
        spool.append(_batch("A"))
        spool.append(_batch("B"))
    journal = tmp_path / JOURNAL_NAME
    data = bytearray(journal.read_bytes())
    data[-1] ^= 0xFF
    journal.write_bytes(bytes(data))
    with Spool.open(tmp_path) as spool:
        assert _tickers(spool) == ["A"]


def test_compaction_keeps_pending_batches_and_numbering(tmp_path: Path) -> None:
    with Spool.open(tmp_path) as spool:
        for ticker in "ABCD":
            spool.append(_batch(ticker))
        for batch_id in (1, 2, 4):
            spool.mark_acked(batch_id)
        before = (tmp_path / JOURNAL_NAME).stat().st_size
        spool.compact()
        assert (tmp_path / JOURNAL_NAME).stat().st_size < before
        assert spool.append(_batch("E")).batch_id == 5
    with Spool.open(tmp_path) as spool:
        assert _tickers(spool) == ["C", "E"]
        spool.mark_acked(3)
        spool.mark_acked(5)
        spool.compact()
    with Spool.open(tmp_path) as spool:
        assert len(spool) == 0
        assert spool.append(_batch("F")).batch_id == 6  # ids never repeat after compaction


def test_compaction_happens_on_its_own_past_the_size_threshold(tmp_path: Path) -> None:
    with Spool.open(tmp_path, compact_after_bytes=2_000) as spool:
        for index in range(200):
            spool.mark_acked(spool.append(_batch(f"M{index}")).batch_id)
        assert (tmp_path / JOURNAL_NAME).stat().st_size < 2_000
        assert not any(name.endswith(".compacting") for name in os.listdir(tmp_path))


def _rows(*tickers: str) -> ingest_service_pb2.PublishRequest:
    return ingest_service_pb2.PublishRequest(
        trades=[types_pb2.Trade(trade_id=f"t-{ticker}", ticker=ticker) for ticker in tickers]
    )


def test_rows_recorded_by_a_killed_process_become_their_batch(tmp_path: Path) -> None:
    """Rows recorded while their batch is being collected outlive a kill (os._exit: no close,
    no flush by Python): the next open makes them a pending batch with the reserved id. A batch
    whose B record was written is not duplicated by its rows."""
    script = textwrap.dedent(
        f"""
        import os
        from kfeed.v1 import ingest_service_pb2, types_pb2
        from kfeed_ingest.spool import Spool
        def rows(ticker):
            trade = types_pb2.Trade(trade_id="t-" + ticker, ticker=ticker)
            return ingest_service_pb2.PublishRequest(producer="p", trades=[trade])
        spool = Spool.open({str(tmp_path)!r})
        done = spool.reserve_batch_id()
        spool.record_rows(done, rows("A"))
        spool.append(ingest_service_pb2.PublishRequest(batch_id=done, trades=rows("A").trades))
        collecting = spool.reserve_batch_id()
        for ticker in ("B", "C"):
            spool.record_rows(collecting, rows(ticker))
        os._exit(9)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], check=False, timeout=60)
    assert result.returncode == 9
    with Spool.open(tmp_path) as spool:
        pending = spool.pending()
        assert [r.batch_id for r in pending] == [1, 2]
        assert [[t.ticker for t in r.trades] for r in pending] == [["A"], ["B", "C"]]
        assert pending[1].producer == "p"
        assert spool.reserve_batch_id() == 3
    with Spool.open(tmp_path) as spool:  # recovered once, not again
        assert [r.batch_id for r in spool.pending()] == [1, 2]


def test_compaction_keeps_rows_of_the_batch_being_collected(tmp_path: Path) -> None:
    with Spool.open(tmp_path) as spool:
        spool.mark_acked(spool.append(_batch("A")).batch_id)
        collecting = spool.reserve_batch_id()
        spool.record_rows(collecting, _rows("B"))
        spool.compact()
        spool.record_rows(collecting, _rows("C"))
    with Spool.open(tmp_path) as spool:
        assert [[t.ticker for t in r.trades] for r in spool.pending()] == [["B", "C"]]
