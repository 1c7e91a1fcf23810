"""The configuration history in a real SQLite file, across reopening (a restart)."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge.store.history import History


def test_a_pending_version_survives_a_restart_and_is_decided_after(tmp_path: Path) -> None:
    h = History(tmp_path / "config.db")
    h.commit_baseline({"devices": []})
    h.add_pending(5, {"version": 5})
    h.close()
    h = History(tmp_path / "config.db")  # the agent died in the health window
    pending = h.pending()
    assert pending is not None
    assert (pending.version, pending.content) == (5, {"version": 5})
    h.roll_back(5, "the agent restarted during the health window")
    assert h.pending() is None
    committed = h.committed()
    assert committed is not None
    assert committed.version == 0
    rolled = h.get(5)
    assert rolled is not None
    assert (rolled.state, rolled.reason) == ("rolled_back",
                                             "the agent restarted during the health window")


def test_commit_makes_the_version_the_one_to_run(tmp_path: Path) -> None:
    h = History(tmp_path / "config.db")
    h.commit_baseline({})
    for v in (3, 4):
        h.add_pending(v, {"version": v})
        h.commit(v)
    committed = h.committed()
    assert committed is not None
    assert committed.version == 4
    assert [(v.version, v.state) for v in h.versions()] == [
        (0, "superseded"), (3, "superseded"), (4, "committed")]
    h.commit_baseline({"ignored": True})  # only before any version
    assert len(h.versions()) == 3


def test_one_pending_version_at_a_time_and_no_version_twice(tmp_path: Path) -> None:
    h = History(tmp_path / "config.db")
    h.add_pending(1, {})
    with pytest.raises(ValueError, match="still pending"):
        h.add_pending(2, {})
    h.roll_back(1, "uplink did not reconnect")
    with pytest.raises(ValueError, match="already in the history"):
        h.add_pending(1, {})
    with pytest.raises(ValueError, match="not in the history"):
        h.commit(9)


def test_history_is_bounded_but_keeps_the_committed_version(tmp_path: Path) -> None:
    h = History(tmp_path / "config.db", keep=5)
    h.commit_baseline({})
    h.add_pending(1, {})
    h.commit(1)
    for v in range(2, 12):
        h.add_pending(v, {})
        h.roll_back(v, "broken")
    kept = [v.version for v in h.versions()]
    assert kept == [1, 7, 8, 9, 10, 11]  # the last five, and the committed one


def test_reinstate_goes_back_and_the_left_version_is_never_applied_again(tmp_path: Path) -> None:
    h = History(tmp_path / "config.db")
    h.commit_baseline({})
    for v in (1, 2):
        h.add_pending(v, {"version": v})
        h.commit(v)
    previous = h.previous()
    assert previous is not None
    assert previous.version == 1
    h.reinstate(1, "rolled back on request")
    assert [(v.version, v.state) for v in h.versions()] == [
        (0, "superseded"), (1, "committed"), (2, "rolled_back")]
    with pytest.raises(ValueError, match="was rolled back"):
        h.reinstate(2, "again")
    with pytest.raises(ValueError, match="not in the history"):
        h.reinstate(7, "never seen")
    previous = h.previous()
    assert previous is not None
    assert previous.version == 0


def test_rollback_requests_reach_the_agent_once(tmp_path: Path) -> None:
    cli_side = History(tmp_path / "config.db")
    agent_side = History(tmp_path / "config.db")  # another process, the same file
    cli_side.request_rollback(None)
    cli_side.request_rollback(3)
    assert agent_side.take_requests() == [None, 3]
    assert agent_side.take_requests() == []


def test_a_version_applied_by_a_restart_is_taken_once_by_the_next_start(tmp_path: Path) -> None:
    h = History(tmp_path / "config.db")
    h.commit_baseline({})
    h.add_pending(7, {"version": 7}, restart_before={"default/a": "online"})
    h.close()
    h = History(tmp_path / "config.db")  # the restart that applies it
    taken = h.take_restart()
    assert taken is not None
    assert (taken[0].version, taken[1]) == (7, {"default/a": "online"})
    h.close()
    h = History(tmp_path / "config.db")  # it died in the window: not taken again
    assert h.take_restart() is None
    pending = h.pending()
    assert pending is not None
    assert pending.version == 7
    h.roll_back(7, "the agent restarted during the health window")
    h.add_pending(8, {"version": 8}, restart_before={})
    h.commit(8)  # a decision ends the restart, whatever it was
    assert h.take_restart() is None


def test_desired_writes_are_remembered_until_their_property_goes(tmp_path: Path) -> None:
    h = History(tmp_path / "config.db")
    h.record_desired("default/a", "setpoint", "sig-1", "written", -40)
    h.record_desired("default/a", "enable", "sig-2", "written", True)
    h.record_desired("default/a", "setpoint", "sig-3", "written", -41)  # again: replaced
    h.record_desired("default/a", "voltage", "sig-4", "read_only")
    h.close()
    h = History(tmp_path / "config.db")
    assert h.desired_written() == {("default/a", "setpoint"): ("sig-3", "written", -41),
                                   ("default/a", "enable"): ("sig-2", "written", True),
                                   ("default/a", "voltage"): ("sig-4", "read_only", None)}
    h.unknown_desired("default/a", "setpoint")
    h.forget_desired({("default/a", "enable"), ("default/a", "setpoint")})
    assert h.desired_written() == {("default/a", "enable"): ("sig-2", "written", True)}
