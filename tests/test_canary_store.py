"""Tests for mlx_serving.canary.store: atomic state file and the audit log."""

from __future__ import annotations

import json
import os

import pytest

from mlx_serving.canary import AuditLog, Decision, Phase, Rollout, StateStore
from mlx_serving.canary import store as store_mod
from mlx_serving.canary.state import Action


def rollout() -> Rollout:
    return Rollout.start("r1", "v1", "v2", now=0.0)


def test_load_absent_is_none(tmp_path):
    assert StateStore(tmp_path / "nope.json").load() is None
    StateStore(tmp_path / "nope.json").delete()  # no error


def test_save_load_round_trip_and_no_temp_files_left(tmp_path):
    r = rollout()
    store = StateStore(tmp_path / "sub" / "state.json")
    store.save(r.state)
    r.pause(5.0, "x")
    store.save(r.state)
    loaded = store.load()
    assert loaded.to_dict() == r.state.to_dict() and loaded.phase is Phase.PAUSED
    assert os.listdir(tmp_path / "sub") == ["state.json"]
    json.loads((tmp_path / "sub" / "state.json").read_text())


def test_save_is_atomic_when_the_write_fails(tmp_path, monkeypatch):
    store = StateStore(tmp_path / "state.json")
    r = rollout()
    store.save(r.state)
    before = (tmp_path / "state.json").read_bytes()
    r.pause(5.0)

    def broken_replace(src, dst):
        raise OSError("disk gone")
    monkeypatch.setattr(store_mod.os, "replace", broken_replace)
    with pytest.raises(OSError):
        store.save(r.state)
    assert (tmp_path / "state.json").read_bytes() == before   # old state intact
    assert os.listdir(tmp_path) == ["state.json"]             # temp file cleaned up


def test_save_fsyncs_file_and_directory(tmp_path, monkeypatch):
    calls = []
    real = os.fsync
    monkeypatch.setattr(store_mod.os, "fsync", lambda fd: (calls.append(fd), real(fd)))
    StateStore(tmp_path / "s.json").save(rollout().state)
    assert len(calls) == 2  # the temp file, then the directory


def test_audit_log_appends_and_reads_the_last_n(tmp_path):
    log = AuditLog(tmp_path / "audit.jsonl")
    assert log.last(5) == []
    r = rollout()
    r.pause(1.0, "one")
    r.resume(2.0)
    r.rollback(3.0, "bad")
    log.extend(r.history)
    assert len((tmp_path / "audit.jsonl").read_text().splitlines()) == 4
    last = log.last(2)
    assert [d.action for d in last] == [Action.RESUME, Action.ROLLBACK]
    assert last[-1] == r.history[-1] and isinstance(last[-1], Decision)
    assert [d.action for d in log.last(100)] == [d.action for d in r.history]
    assert log.last(0) == []


def test_audit_log_survives_a_torn_last_line(tmp_path):
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    r = rollout()
    log.append(r.history[0])
    with open(path, "a") as f:
        f.write('{"at": 1.0, "action": "pau')       # crash in the middle of a write
    assert len(log.last(10)) == 1
    log.append(r.pause(2.0))
    got = log.last(10)
    assert [d.action for d in got] == [Action.START, Action.PAUSE]
