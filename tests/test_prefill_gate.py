"""The rule that decides when waiting prompts join a decoding batch."""

from __future__ import annotations

from mlx_serving.engine.prefill_gate import PrefillGate


def gate(steps: int = 4, ratio: float = 0.5) -> PrefillGate:
    return PrefillGate(max_wait_steps=steps, min_waiting_ratio=ratio)


def test_an_idle_batch_takes_arrivals_at_once():
    assert gate().open(step=0, running=0, waiting=1, free_slots=8)


def test_a_lone_arrival_waits_max_wait_steps_then_joins():
    g = gate(steps=4)
    opened = [g.open(step=s, running=8, waiting=1, free_slots=24) for s in range(10, 15)]
    assert opened == [False, False, False, False, True]


def test_enough_arrivals_open_the_gate_early():
    g = gate(steps=100, ratio=0.25)
    assert not g.open(step=1, running=8, waiting=1, free_slots=24)
    assert g.open(step=2, running=8, waiting=2, free_slots=24)


def test_arrivals_that_fill_the_batch_join_at_once():
    assert gate(steps=100, ratio=10).open(step=1, running=30, waiting=2, free_slots=2)


def test_zero_wait_steps_never_holds():
    assert gate(steps=0, ratio=10).open(step=1, running=8, waiting=1, free_slots=24)


def test_each_hold_counts_from_its_own_start():
    g = gate(steps=3)
    assert [g.open(step=s, running=4, waiting=1, free_slots=4 * 8) for s in range(4)] == \
        [False, False, False, True]
    # The next arrival after the gate opened waits its own three steps.
    assert [g.open(step=s, running=4, waiting=1, free_slots=32) for s in range(10, 14)] == \
        [False, False, False, True]
