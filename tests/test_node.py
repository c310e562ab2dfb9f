"""Front ends that share a mail directory: what a node's clean-up may touch,
its name, and its leases (unit tests; tests/test_cluster_blackbox.py runs two
real front ends)."""

from __future__ import annotations

import os
import socket

import pytest
from twisted.internet import task
from twisted.internet.defer import succeed

from mailboxd import queue
from mailboxd.maildir import clean_spool, spool_files, unique_name
from mailboxd.node import Claims, Leases, NameInUse, claim_name, process_owner
from mailboxd.queue import Entry, Recipient
from mailboxd.state import SQLiteStateStore, StateError, state_path

T0 = 1_790_000_000.0


def entry(entry_id: str) -> Entry:
    return Entry(entry_id, "", 0, 0.0, [Recipient("a@far.test")])


def spooled(spool_dir, node: str):
    """A spool file as node `node` names it."""
    path = spool_dir / unique_name(node)
    path.write_bytes(b"Subject: x\n")
    return path


def test_a_nodes_clean_up_takes_only_what_it_left_half_queued(tmp_path):
    spool, directory = tmp_path / ".incoming", tmp_path / ".queue"
    spool.mkdir()
    directory.mkdir()
    # Node a crashed twice mid-enqueue: linked from its spool, and written
    # from memory (its temp file still there).
    mine = spooled(spool, "a")
    os.link(mine, directory / "A1.msg")
    (directory / ".A2.a.msg.tmp").write_bytes(b"x")
    os.link(directory / ".A2.a.msg.tmp", directory / "A2.msg")
    (directory / ".A3.a.json.tmp").write_text("{")
    # Node b is writing right now: its message is there, its envelope not yet.
    theirs = spooled(spool, "b")
    os.link(theirs, directory / "B1.msg")
    (directory / ".B2.b.json.tmp").write_text("{")
    # ...and mid-removal: the envelope renamed away, the message still there.
    (directory / "A4.msg").write_bytes(b"x")
    (directory / ".A4.a.gone.tmp").write_text("{")
    # A whole entry, whoever wrote it, is never touched.
    queue.enqueue_bytes(directory, b"Subject: y\n\n", entry("C1"), "b")

    files = spool_files(spool, "a")
    assert files == [mine]
    assert queue.remove_unacknowledged(directory, "a", files) == 6
    assert clean_spool(files) == 1
    assert sorted(p.name for p in directory.iterdir()) == [
        ".B2.b.json.tmp",
        "B1.msg",
        "C1.json",
        "C1.msg",
    ]
    assert list(spool.iterdir()) == [theirs]
    # Node b's spool file, if b never comes back (renamed), goes after a day.
    later = os.stat(theirs).st_mtime + 86400 + 1
    assert spool_files(spool, "a", now=later) == [theirs]


def test_an_entry_written_from_memory_or_removed_leaves_no_temp_file(tmp_path):
    directory = tmp_path / ".queue"
    queue.enqueue_bytes(directory, b"Subject: y\n\n", entry("E1"), "a")
    assert sorted(p.name for p in directory.iterdir()) == ["E1.json", "E1.msg"]
    assert queue.remove_all(directory, ["E1", "E2"], "a") == [True, False]
    assert list(directory.iterdir()) == []


def test_an_orphan_nobody_names_goes_once_it_is_a_day_old(tmp_path):
    directory = tmp_path / ".queue"
    directory.mkdir()
    (directory / "X1.msg").write_bytes(b"x")  # left by a node that never came back
    (directory / "X2.msg").write_bytes(b"x")
    (directory / ".X2.c.json.tmp").write_text("{")  # node c may still finish it
    assert queue.remove_unacknowledged(directory, "a", []) == 0
    later = os.stat(directory / "X1.msg").st_mtime + queue.ORPHAN_AGE + 1
    os.utime(directory / ".X2.c.json.tmp", (later - 5, later - 5))  # c still at work
    assert queue.remove_unacknowledged(directory, "a", [], now=later) == 1
    assert sorted(p.name for p in directory.iterdir()) == [".X2.c.json.tmp", "X2.msg"]
    # A temp file a day old is anyone's: its writer is long gone, and so is its message.
    much_later = later + queue.ORPHAN_AGE
    assert queue.remove_unacknowledged(directory, "a", [], now=much_later) == 2
    assert list(directory.iterdir()) == []


def test_a_name_is_held_by_one_running_front_end(tmp_path):
    store = SQLiteStateStore(state_path(tmp_path))
    claim_name(store, "a", "a@elsewhere.test/1", T0, 30)
    with pytest.raises(NameInUse, match="'a' is in use by a@elsewhere.test/1"):
        claim_name(store, "a", process_owner("a"), T0 + 1, 30)
    claim_name(store, "a", process_owner("a"), T0 + 31, 30)  # the other stopped renewing
    # A holder on this host whose process is gone (killed) is replaced at once...
    claim_name(store, "b", f"b@{socket.gethostname()}/999999999", T0, 30)
    claim_name(store, "b", process_owner("b"), T0 + 1, 30)
    # ...a live one is not.
    with pytest.raises(NameInUse):
        claim_name(store, "b", f"b@{socket.gethostname()}/1", T0 + 2, 30)


def in_thread(f, *args):
    try:
        return succeed(f(*args))
    except Exception as e:  # noqa: BLE001 - handed on as the Deferred's failure
        from twisted.internet.defer import fail

        return fail(e)


def test_leases_are_renewed_together_and_a_lost_one_is_said(tmp_path):
    store = SQLiteStateStore(state_path(tmp_path))
    clock, now = task.Clock(), [T0]
    lost: list[list[str]] = []
    leases = Leases(store, in_thread, lambda: now[0], clock, "A", 30, lost.append)
    leases.start()
    assert leases.take("pop3:x").result is None
    assert leases.take("pop3:x").result is None  # a second session here: the lock file decides
    assert store.take_lease("pop3:y", "B", T0, 30) is None
    assert leases.take("pop3:y").result == "B"
    now[0] += 25
    clock.advance(10)  # renewed: still A's past the first 30 s
    assert store.take_lease("pop3:x", "B", T0 + 35, 30) == "A"
    leases.release("pop3:x")
    assert store.leases("pop3:x", now[0]) != []  # one session still has it
    leases.release("pop3:x")
    assert store.leases("pop3:x", now[0]) == []
    assert leases.take("pop3:z").result is None
    store.release_lease("pop3:z", "A")
    store.take_lease("pop3:z", "B", now[0], 30)
    clock.advance(10)
    assert lost == [["pop3:z"]]
    leases.stop()


def test_claims_take_what_nobody_holds_and_let_go_of_everything_when_the_store_fails(tmp_path):
    store = SQLiteStateStore(state_path(tmp_path))
    claims = Claims(store, in_thread, lambda: T0, "a", 30)
    store.take_lease("queue:B1", "b", T0, 30)
    assert claims.renew(["A1", "B1"]).result == {"A1"}
    assert claims.held == {"A1"}
    assert claims.renew(["A1", "A2"]).result == {"A2"}
    store.close()

    def broken(*args):
        raise StateError("state.sqlite3: database is locked")

    store.renew_leases = broken  # type: ignore[method-assign]
    assert claims.renew(["A1", "A2"]).result == set()
    assert claims.held == set()  # delivery waits rather than risk sending twice
