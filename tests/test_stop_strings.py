"""Tests for mlx_serving.engine.stop_strings.StopStringMatcher."""

from __future__ import annotations

import random

import pytest

from mlx_serving.engine.stop_strings import StopStringMatcher


def run(stops, deltas):
    """Feed `deltas` until a match; return (per-feed outputs, matched, flushed text)."""
    matcher = StopStringMatcher(stops)
    outputs = []
    for delta in deltas:
        out, matched = matcher.feed(delta)
        outputs.append(out)
        if matched:
            return outputs, True, matcher.flush()
    return outputs, False, matcher.flush()


def reference(stops, deltas):
    """Non-incremental statement of the rule: at the first delta after which the text
    seen contains a stop string, output the text before the earliest-starting one."""
    seen = ""
    for delta in deltas:
        seen += delta
        starts = [i for i in (seen.find(s) for s in stops) if i >= 0]
        if starts:
            return seen[: min(starts)], True
    return seen, False


@pytest.mark.parametrize("stops", [[""], ["END", ""]])
def test_empty_stop_string_rejected(stops):
    with pytest.raises(ValueError):
        StopStringMatcher(stops)


def test_no_stops_is_passthrough():
    matcher = StopStringMatcher([])
    text = "anything </s> at all"
    out, matched = matcher.feed(text)
    assert out is text and not matched
    assert matcher.flush() == ""


def test_bare_string_is_one_stop():
    assert run("ab", ["xa", "b"]) == (["x", ""], True, "")


def test_stop_split_over_three_deltas():
    outputs, matched, _ = run(["<END>"], ["hello <E", "N", "D> ignored"])
    assert outputs == ["hello ", "", ""] and matched


def test_overlapping_partial_prefix():
    outputs, matched, _ = run(["abab"], list("abaabab"))
    assert "".join(outputs) == "aba" and matched
    assert outputs == ["", "", "", "aba", "", "", ""]


def test_near_miss_is_held_then_released():
    outputs, matched, flushed = run(["</s>"], ["answer</", "x more"])
    assert outputs == ["answer", "</x more"] and not matched and flushed == ""


def test_flush_returns_held_text_at_end():
    outputs, matched, flushed = run(["STOP"], ["done ST"])
    assert outputs == ["done "] and not matched and flushed == "ST"


def test_stop_at_very_start():
    assert run(["###"], ["### heading"]) == ([""], True, "")


def test_two_stops_earliest_start_wins_within_one_feed():
    assert run(["world", "lo w"], ["hello world"])[0] == ["hel"]
    assert run(["x", "y"], ["aybx"])[0] == ["a"]


def test_first_completed_stop_wins_across_feeds():
    # "bc" completes while "abcd" is still only a possible prefix: the stream ends there.
    assert run(["abcd", "bc"], ["ab", "c", "d"]) == (["", "a"], True, "")


def test_multibyte_stop_across_deltas():
    assert run(["你好"], ["说：你", "好！"]) == (["说：", ""], True, "")


def test_feed_after_match_raises():
    matcher = StopStringMatcher(["x"])
    assert matcher.feed("ax") == ("a", True)
    with pytest.raises(RuntimeError):
        matcher.feed("more")


# The second alphabet checks that regex metacharacters in stop strings are literal.
@pytest.mark.parametrize("alphabet", ["ab c", "a.^]-\\[*"])
def test_random_streams_match_reference_and_hold_back_minimally(alphabet):
    rng = random.Random(1234)
    for _ in range(2000):
        stops = [
            "".join(rng.choices(alphabet, k=rng.randint(1, 4))) for _ in range(rng.randint(1, 4))
        ]
        text = "".join(rng.choices(alphabet, k=rng.randint(0, 30)))
        cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, rng.randint(0, 8))))
        deltas = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)])]

        matcher = StopStringMatcher(stops)
        emitted, seen, matched = "", "", False
        for delta in deltas:
            out, matched = matcher.feed(delta)
            emitted += out
            seen += delta
            if matched:
                break
            # Only a tail that is a proper prefix of some stop string may be held back.
            held = seen[len(emitted) :]
            assert seen.startswith(emitted)
            assert all(
                not any(s.startswith(seen[i:]) for s in stops) for i in range(len(emitted))
            ), (stops, deltas)
            assert held == "" or any(s.startswith(held) for s in stops)
        if not matched:
            emitted += matcher.flush()
        assert (emitted, matched) == reference(stops, deltas), (stops, deltas)
