"""Acceptance targets of the default plan, by simulation (guards off, fixed seeds).

Parameters (canary.simulation.SimulationParams defaults): 20 requests/s, a tick every 60 s;
log-normal TTFT median 200 ms sigma 0.5, ITL median 30 ms sigma 0.3, e2e median 4 s sigma 0.4;
1% errors. The figures are written up in docs/CANARY_STATS.md.
"""

from __future__ import annotations

import pytest

from mlx_serving.canary.simulation import SimulationParams, simulate

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def aa():
    return simulate(500, SimulationParams(), seed=1)


@pytest.fixture(scope="module")
def slower_ttft():
    return simulate(200, SimulationParams(canary_ttft_factor=1.2), seed=2)


@pytest.fixture(scope="module")
def more_errors():
    return simulate(200, SimulationParams(canary_error_rate=0.03), seed=3)


def test_aa_rarely_rolls_back_and_mostly_promotes(aa):
    assert aa.runs == 500 and aa.timeout == 0
    assert aa.rolled_back <= 0.05
    assert aa.promoted >= 0.90
    assert aa.rolled_back + aa.promoted + aa.paused == pytest.approx(1.0)
    # the figures documented in docs/CANARY_STATS.md (deterministic for the seed)
    assert (aa.rolled_back, aa.promoted, aa.paused) == (0.002, 0.986, 0.012)


def test_canary_20_percent_slower_ttft_is_rolled_back_within_two_stages(slower_ttft):
    assert slower_ttft.share_rolled_back_by(1) >= 0.95
    assert slower_ttft.promoted == 0.0
    assert slower_ttft.decided_stage == {"rolled_back": {0: 200}}


def test_canary_with_3_percent_errors_is_rolled_back_within_two_stages(more_errors):
    assert more_errors.share_rolled_back_by(1) >= 0.95
    assert more_errors.promoted == 0.0
    assert more_errors.decided_stage == {"rolled_back": {0: 200}}


def test_per_request_mode_agrees():
    """Drawing every request instead of each tick's moments gives the same decisions."""
    s = simulate(12, SimulationParams(per_request=True, canary_ttft_factor=1.2), seed=5)
    assert s.decided_stage == {"rolled_back": {0: 12}}
    s = simulate(8, SimulationParams(per_request=True), seed=6)
    assert s.promoted >= 0.75


def test_simulation_is_deterministic():
    p = SimulationParams(canary_ttft_factor=1.2)
    a, b = simulate(3, p, seed=9), simulate(3, p, seed=9)
    assert a.to_dict() == b.to_dict()
