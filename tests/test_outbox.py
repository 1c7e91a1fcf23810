"""The SQLite outbox on real files: order, totals, seqs, bounds, damaged files, full disks."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest

from edge.store.outbox import NewMessage, Outbox, StoreFullError

NONE: frozenset[int] = frozenset()


def msg(device: str, seq: int, size: int = 100, ts: int = 1000) -> NewMessage:
    return NewMessage(f"t/{device}", b"x" * size, 1, ts, device, seq)


def open_box(path: Path, **kw: object) -> Outbox:
    opts: dict[str, object] = {"max_bytes": 1 << 20, "ttl_ms": 3_600_000, **kw}
    return Outbox(path, **opts)  # type: ignore[arg-type]


def test_rows_keep_their_order_and_survive_a_reopen(tmp_path: Path) -> None:
    box = open_box(tmp_path / "o.db")
    rows, drops = box.write([msg("ns/a", 1), msg("ns/b", 1), msg("ns/a", 2)], [], keep=NONE)
    assert drops == []
    assert [r.id for r in rows] == sorted(r.id for r in rows)
    assert [r.topic for r in rows] == ["t/ns/a", "t/ns/b", "t/ns/a"]
    assert (box.stats.rows, box.stats.bytes) == (3, 3 * (100 + len("t/ns/a")))
    box.close()

    again = open_box(tmp_path / "o.db")
    assert again.seqs == {"ns/a": 2, "ns/b": 1}
    assert (again.stats.rows, again.stats.bytes) == (3, 318)
    assert [r.payload for r in again.rows_from(again.first_id(), 10)] == [r.payload for r in rows]
    assert again.rows_from(rows[1].id, 10) == rows[1:]


def test_acked_rows_are_deleted_in_the_same_transaction_and_ids_never_go_back(
    tmp_path: Path,
) -> None:
    box = open_box(tmp_path / "o.db")
    rows, _ = box.write([msg("ns/a", 1), msg("ns/a", 2)], [], keep=NONE)
    more, _ = box.write([msg("ns/a", 3)], rows, keep=NONE)
    assert (box.stats.rows, box.stats.acked) == (1, 2)
    box.write([], more, keep=NONE)
    assert (box.stats.rows, box.stats.bytes, box.stats.oldest_ts) == (0, 0, 0)
    assert box.first_id() == more[0].id + 1 == box.end_id
    box.close()
    again = open_box(tmp_path / "o.db")
    rows, _ = again.write([msg("ns/a", 4)], [], keep=NONE)
    assert rows[0].id == more[0].id + 1  # AUTOINCREMENT: an emptied store does not reuse ids


def test_oldest_are_dropped_at_the_byte_limit_with_an_exact_count(tmp_path: Path) -> None:
    box = open_box(tmp_path / "o.db", max_bytes=10 * 106)  # ten messages of 106 bytes
    first, _ = box.write([msg("ns/a", i, ts=i) for i in range(1, 9)], [], keep=NONE)
    inflight = frozenset({first[0].id})  # handed to the broker: never dropped
    _, drops = box.write([msg("ns/a", i, ts=i) for i in range(9, 14)], [], keep=inflight)
    assert len(drops) == 1
    d = drops[0]
    assert (d.reason, d.count, d.bytes) == ("max_bytes", 3, 318)
    assert (d.first_id, d.last_id) == (first[1].id, first[3].id)
    assert (d.first_ts, d.last_ts) == (2, 4)
    left = box.rows_from(0, 100)
    assert [r.ts for r in left] == [1, 5, 6, 7, 8, 9, 10, 11, 12, 13]
    assert box.stats.bytes == 10 * 106
    assert box.stats.dropped == {"max_bytes": 3}


def test_newest_policy_drops_what_just_came(tmp_path: Path) -> None:
    box = open_box(tmp_path / "o.db", max_bytes=4 * 106, drop="newest")
    box.write([msg("ns/a", i, ts=i) for i in range(1, 5)], [], keep=NONE)
    rows, drops = box.write([msg("ns/a", 5, ts=5), msg("ns/a", 6, ts=6)], [], keep=NONE)
    assert [(d.count, d.first_ts, d.last_ts) for d in drops] == [(2, 5, 6)]
    assert [r.ts for r in box.rows_from(0, 10)] == [1, 2, 3, 4]
    assert {r.id for r in rows} == {drops[0].first_id, drops[0].last_id}


def test_ttl_drops_what_is_older(tmp_path: Path) -> None:
    box = open_box(tmp_path / "o.db", ttl_ms=1000)
    box.write([msg("ns/a", i, ts=ts) for i, ts in enumerate([100, 200, 5000, 5100], 1)], [],
              keep=NONE)
    assert box.expire(5500, NONE) is not None
    assert box.stats.dropped == {"ttl": 2}
    assert [r.ts for r in box.rows_from(0, 10)] == [5000, 5100]
    assert box.stats.oldest_ts == 5000
    assert box.expire(5500, NONE) is None


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda p: p.write_bytes(b"this is not a database" * 100), id="not-a-db"),
        pytest.param(None, id="malformed-pages"),
    ],
)
def test_a_damaged_file_is_moved_aside_and_a_fresh_store_started(
    tmp_path: Path, damage: object
) -> None:
    path = tmp_path / "o.db"
    if damage is None:
        box = open_box(path)
        box.write([msg("ns/a", i, size=3000) for i in range(1, 40)], [], keep=NONE)
        box.close()
        raw = bytearray(path.read_bytes())
        raw[100:4096 * 3] = os.urandom(4096 * 3 - 100)  # the schema page and beyond
        path.write_bytes(bytes(raw))
    else:
        damage(path)  # type: ignore[operator]
    box = open_box(path)
    assert box.replaced_damaged_file
    (moved,) = box.stats.corrupt_files
    assert Path(moved).exists()
    assert Path(moved).name.startswith("o.db.corrupt-")
    rows, _ = box.write([msg("ns/a", 1)], [], keep=NONE)
    assert box.rows_from(0, 10) == rows
    box.close()
    assert not open_box(path).replaced_damaged_file


def test_room_again_lets_the_file_grow_after_make_room(tmp_path: Path) -> None:
    box = open_box(tmp_path / "o.db", reserve_bytes=64 << 10)
    box.write([msg("ns/a", i, size=3000) for i in range(1, 10)], [], keep=NONE)
    assert box.make_room(6000, NONE) is not None
    big = [msg("ns/a", i, size=8000) for i in range(10, 30)]
    with pytest.raises(StoreFullError):  # the file may not grow after make_room
        box.write(big, [], keep=NONE)
    assert box.room_again()  # plenty of disk here
    box.write(big, [], keep=NONE)
    assert (tmp_path / "o.db.reserve").stat().st_size == 64 << 10


def test_reopen_fresh_keeps_seqs_and_continues_ids(tmp_path: Path) -> None:
    box = open_box(tmp_path / "o.db")
    rows, _ = box.write([msg("ns/a", 7), msg("ns/b", 3)], [], keep=NONE)
    box.reopen_fresh()
    assert box.seqs == {"ns/a": 7, "ns/b": 3}
    (new,), _ = box.write([msg("ns/a", 8)], [], keep=NONE)
    assert new.id > rows[-1].id
    box.close()
    assert open_box(tmp_path / "o.db").seqs == {"ns/a": 8, "ns/b": 3}


def fill(directory: Path) -> Path:
    """Fill the file system of ``directory`` up to the last byte; return the filler."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 512)
    except OSError:
        pass
    finally:
        os.close(fd)
    return filler


def write_until_full(box: Outbox, device: str, first_seq: int = 1) -> None:
    """Append 2 kB messages until the disk is full (StoreFullError), at most 10 000."""
    for i in range(first_seq, 10_000):
        try:
            box.write([msg(device, i, size=2000)], [], keep=NONE)
        except StoreFullError:
            return
    raise AssertionError("the disk never filled")


def test_full_disk_raises_store_full_and_keeps_the_store_usable(small_disk: Path) -> None:
    box = open_box(small_disk / "o.db", max_bytes=64 << 20, reserve_bytes=512 << 10)
    assert (small_disk / "o.db.reserve").stat().st_size == 512 << 10
    write_until_full(box, "ns/a")  # an outage that outgrows the disk
    stored = box.stats.rows
    assert stored > 20
    assert stored == len(box.rows_from(0, 100_000))
    with pytest.raises(StoreFullError):
        box.write([msg("ns/a", 10_000, size=2000)], [], keep=NONE)
    drop = box.make_room(box.stats.bytes // 5, NONE)
    assert drop is not None
    assert drop.count >= stored // 5
    assert (small_disk / "o.db.reserve").exists()  # taken back from the WAL's room
    for i in range(5):  # room made inside the file
        box.write([msg("ns/b", i, size=2000)], [], keep=NONE)
    filler = fill(small_disk)  # and the last byte of the disk taken by someone else
    write_until_full(box, "ns/b", first_seq=5)
    filler.unlink()
    box.write([msg("ns/b", 10_000, size=2000)], [], keep=NONE)
    assert box.stats.rows == len(box.rows_from(0, 100_000))
    assert box.stats.dropped == {"disk_full": drop.count}
    box.close()
    check = sqlite3.connect(small_disk / "o.db")
    assert check.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert check.execute("SELECT count(*) FROM outbox").fetchone() == (box.stats.rows,)
    assert box.stats.rows >= stored - drop.count + 6
