"""Tests for mlx_serving.canary.flags."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from mlx_serving.canary import Flag, FlagSet, bucket


def test_percentage_uses_the_flag_bucketing():
    flag = Flag(name="new-sampler", percent=30)
    for key in (f"u{i}" for i in range(500)):
        assert flag.enabled(key) is (bucket("flag:new-sampler", key) < 3000)
    share = sum(flag.enabled(f"u{i}") for i in range(10000)) / 10000
    assert abs(share - 0.30) < 0.02


def test_raising_percent_only_adds_keys_and_edges():
    keys = [f"k{i}" for i in range(2000)]
    on = [{k for k in keys if Flag(name="f", percent=p).enabled(k)} for p in (0, 10, 50, 100)]
    assert on[0] == set() and on[-1] == set(keys)
    assert on[0] <= on[1] <= on[2] <= on[3]


def test_variants_and_kill_switch():
    fs = FlagSet([Flag(name="spec-decode", percent=100, variants=("canary",))])
    assert fs.enabled("spec-decode", "k", "canary")
    assert not fs.enabled("spec-decode", "k", "stable")
    assert not fs.enabled("spec-decode", "k")                # variant unknown: not listed
    assert FlagSet([Flag(name="all", percent=100)]).enabled("all", "k", "anything")
    killed = fs.kill("spec-decode")
    assert killed.killed and not fs.enabled("spec-decode", "k", "canary")
    assert fs.get("spec-decode").percent == 100              # the percentage is kept
    fs.kill("spec-decode", killed=False)
    assert fs.enabled("spec-decode", "k", "canary")
    assert not fs.enabled("missing", "k")


def test_set_get_list_remove_and_json_round_trip():
    fs = FlagSet()
    fs.set(Flag(name="b", percent=12.5))
    fs.set(Flag(name="a", percent=1, variants=("v2",), killed=True))
    fs.set(Flag(name="b", percent=20))                       # replace
    assert [f.name for f in fs.list()] == ["a", "b"] and fs.get("b").percent == 20
    again = FlagSet.from_json(fs.to_json())
    assert again.list() == fs.list() and len(again) == 2 and "a" in again
    assert fs.remove("a") and not fs.remove("a") and fs.get("a") is None


def test_validation():
    with pytest.raises(ValidationError):
        Flag(name="x", percent=101)
    with pytest.raises(ValidationError):
        Flag(name="", percent=1)
    with pytest.raises(ValidationError):
        FlagSet.from_dict({"flags": [{"name": "x", "pct": 3}]})
