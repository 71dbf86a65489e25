"""Tests for mlx_serving.canary.stats: hand-computed references, then the analysis."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from mlx_serving.canary import AnalysisConfig, Arm, Outcome, SampleSet, analyze
from mlx_serving.canary.config import LatencyMetricConfig
from mlx_serving.canary.stats import (Verdict, cohens_d, holm, look_alpha, newcombe_upper,
                                      ni_miss_latency, ni_miss_proportion,
                                      obrien_fleming_spending, required_n, required_samples,
                                      required_samples_proportion, smallest_n, srm_test,
                                      two_proportion_ztest, welch_test, wilson_interval)

REF = json.loads((Path(__file__).parent / "data" / "canary" / "stats_reference.json").read_text())
TOL = 1e-6


def close(a, b, tol=TOL):
    return abs(a - b) <= tol * max(1.0, abs(b))


# ---- reference values (tests/data/canary/stats_reference.json) -------------------------

def test_welch_matches_hand_computation():
    r = REF["welch"]
    res = welch_test(np.array(r["canary"], float), np.array(r["stable"], float),
                     alternative="greater")
    assert close(res.diff, r["diff"]) and close(res.se, r["se"])
    assert close(res.t, r["t"]) and close(res.df, r["df"])
    assert close(res.p, r["p_greater"])
    ni = welch_test(np.array(r["canary"], float), np.array(r["stable"], float),
                    delta0=r["delta0"], alternative="less")
    assert close(ni.t, r["t_ni"]) and close(ni.df, r["df"]) and close(ni.p, r["p_less_ni"])


def test_cohens_d_matches_hand_computation():
    r = REF["cohens_d"]
    assert close(cohens_d(np.array(r["canary"], float), np.array(r["stable"], float)), r["d"])


def test_two_proportion_z_matches_hand_computation():
    r = REF["two_proportion_z"]
    res = two_proportion_ztest(r["x_c"], r["n_c"], r["x_s"], r["n_s"])
    assert close(res.z, r["z"]) and close(res.p, r["p"])


def test_wilson_and_newcombe_match_hand_computation():
    r = REF["wilson"]
    lo, hi = wilson_interval(r["x"], r["n"], r["z"])
    assert close(lo, r["lower"]) and close(hi, r["upper"])
    r = REF["newcombe"]
    assert close(newcombe_upper(r["x_c"], r["n_c"], r["x_s"], r["n_s"], r["z"]), r["upper"])


@pytest.mark.parametrize("name", ["srm", "srm_ok"])
def test_srm_matches_hand_computation(name):
    r = REF[name]
    res = srm_test(r["n_stable"], r["n_canary"], r["expected_share"])
    assert close(res.chi2, r["chi2"]) and close(res.p, r["p"])
    assert res.flagged is (r["p"] < 0.001)


def test_holm_matches_hand_computation():
    r = REF["holm"]
    adjusted = holm(r["p"])
    assert all(close(a, b) for a, b in zip(adjusted, r["adjusted"]))
    assert [a <= r["alpha"] for a in adjusted] == r["rejected"]


def test_obrien_fleming_matches_closed_form():
    r = REF["obrien_fleming"]
    for t, spent in zip(r["t"], r["spent"]):
        assert close(obrien_fleming_spending(t, r["alpha"]), spent, 1e-9), t


@pytest.mark.parametrize("case", REF["required_samples"]["cases"])
def test_required_samples_matches_formula(case):
    n = required_samples(case["margin"], case["sigma"], case["alpha"], case["power"],
                         case["canary_share"])
    assert n == case["n"] == math.ceil(case["raw"])


@pytest.mark.parametrize("case", REF["required_n_proportion_wald"]["cases"])
def test_required_n_proportion_wald_matches_formula(case):
    r = case["rate"]
    assert required_n(case["margin"], r * (1 - r), case["alpha"], case["power"],
                      case["canary_share"]) == case["n"]


# ---- properties of the small functions ---------------------------------------------------

def test_spending_is_increasing_and_looks_sum_to_alpha():
    levels = [look_alpha(k, 6, 0.05).level for k in range(1, 7)]
    assert all(b > a for a, b in zip(levels, levels[1:]))  # O'Brien-Fleming: late looks get more
    assert math.isclose(sum(levels), 0.05, rel_tol=1e-12)
    assert look_alpha(7, 6, 0.05).level == 0.0           # past the plan: nothing left
    assert obrien_fleming_spending(0.0, 0.05) == 0.0


def test_required_samples_proportion_is_newcombe_aware():
    wald = required_n(0.005, 0.0099, 0.025, 0.93, 0.05)
    n = required_samples_proportion(0.005, 0.01, 0.025, 0.93, 0.05)
    assert n > wald
    assert ni_miss_proportion(n, 0.005, 0.01, 0.025, 0.05) <= 0.07
    assert ni_miss_proportion(n - 1, 0.005, 0.01, 0.025, 0.05) > 0.07


def test_latency_miss_is_consistent_with_the_closed_form():
    n = required_samples(0.1, 0.5, 0.05, 0.8, 0.25)
    assert ni_miss_latency(n, 0.1, 0.5, 0.05, 0.25) <= 0.2 < ni_miss_latency(n - 1, 0.1, 0.5,
                                                                                0.05, 0.25)
    assert smallest_n(lambda k: ni_miss_latency(k, 0.1, 0.5, 0.05, 0.25), 0.2) == n


def test_welch_is_scipys_ttest_ind():
    from scipy import stats as sps  # consistency with the function the brief names, not a reference
    rng = np.random.default_rng(3)
    c, s = rng.normal(0.1, 0.5, 300), rng.normal(0.0, 0.7, 1000)
    for alt, d0 in (("greater", 0.0), ("less", 0.0953)):
        ours = welch_test(c, s, delta0=d0, alternative=alt)
        ref = sps.ttest_ind(c - d0, s, equal_var=False, alternative=alt)
        assert ours.t == pytest.approx(ref.statistic, rel=1e-10)
        assert ours.p == pytest.approx(ref.pvalue, rel=1e-8)
        assert ours.df == pytest.approx(ref.df, rel=1e-10)


def test_degenerate_inputs():
    assert two_proportion_ztest(0, 100, 0, 1000).p == 1.0
    same = np.full(10, 1.0)
    assert welch_test(same, same).p == 1.0
    assert welch_test(same + 1, same).p == 0.0
    assert welch_test(same, same, delta0=0.1, alternative="less").p == 0.0
    assert math.isnan(cohens_d(same, same))
    assert srm_test(0, 0, 0.05).flagged is False
    assert srm_test(100, 0, 0.0).p == 1.0


# ---- analyze ------------------------------------------------------------------------------

def lognormal_grid(n: int, median: float, sigma: float) -> np.ndarray:
    """Deterministic 'sample': log-normal quantiles at (i + 0.5) / n (mean log = log median)."""
    from scipy.stats import norm
    return median * np.exp(sigma * norm.ppf((np.arange(n) + 0.5) / n))


def arm(which: Arm, n: int, *, ttft=0.2, itl=0.03, e2e=4.0, error_rate=0.01, rng=None,
        sigma=0.5, with_itl=True) -> SampleSet:
    s = SampleSet(which)
    n_err = int(round(n * error_rate))
    err = np.arange(n) < n_err  # failed requests carry no latency
    if rng is None:
        cols = [np.concatenate([np.full(n_err, np.nan), lognormal_grid(n - n_err, m, sigma)])
                for m in (ttft, itl, e2e)]
    else:
        cols = [m * np.exp(sigma * rng.standard_normal(n)) for m in (ttft, itl, e2e)]
    s.add_arrays(ttft_s=cols[0], itl_s=cols[1] if with_itl else None, e2e_s=cols[2], error=err)
    return s


CFG = AnalysisConfig()


def test_analyze_equal_arms_pass():
    a = analyze(arm(Arm.STABLE, 76000), arm(Arm.CANARY, 4000), CFG, look=1, max_looks=6,
                expected_canary_share=0.05, looks_per_stage=2)
    assert a.outcome is Outcome.PASS, a.reason
    assert all(m.verdict is Verdict.PASS for m in a.metrics)
    ttft = a.metric("ttft")
    assert ttft.ratio == pytest.approx(1.0, abs=1e-9)
    assert ttft.ni_upper < 1.10 and ttft.n_canary == 3960  # failed requests carry no latency
    assert a.alpha_pass == 0.025 and a.alpha_fail == pytest.approx(1.5794492e-06, rel=1e-6)
    json.dumps(a.to_dict(), allow_nan=False)


def test_analyze_slower_canary_fails_with_holm():
    a = analyze(arm(Arm.STABLE, 3000), arm(Arm.CANARY, 1000, ttft=0.2 * 1.3), CFG, look=2,
                max_looks=6, expected_canary_share=0.25)
    assert a.outcome is Outcome.FAIL
    ttft = a.metric("ttft")
    assert ttft.verdict is Verdict.FAIL and ttft.ratio == pytest.approx(1.3)
    assert ttft.fail_p_holm >= ttft.fail_p
    assert ttft.fail_p_holm <= a.alpha_fail
    assert ttft.cohens_d == pytest.approx(math.log(1.3) / 0.5, rel=0.02)
    assert "ttft" in a.reason
    d = a.to_dict()
    assert d["outcome"] == "fail" and d["metrics"][0]["verdict"] == "fail"


def test_analyze_error_rate_fail():
    a = analyze(arm(Arm.STABLE, 8000, error_rate=0.01), arm(Arm.CANARY, 2000, error_rate=0.05),
                CFG, look=3, max_looks=6, expected_canary_share=0.2)
    assert a.outcome is Outcome.FAIL
    e = a.metric("error_rate")
    assert e.verdict is Verdict.FAIL and e.rate_canary == 0.05 and e.rate_stable == 0.01


def test_analyze_too_few_samples_is_inconclusive():
    a = analyze(arm(Arm.STABLE, 40), arm(Arm.CANARY, 40), CFG, look=1, max_looks=6,
                expected_canary_share=0.5)
    assert a.outcome is Outcome.INCONCLUSIVE
    assert {m.verdict for m in a.metrics} == {Verdict.NO_DATA}
    assert "no data" in a.reason


def test_analyze_missing_metric_blocks_pass_unless_disabled():
    stable, canary = arm(Arm.STABLE, 76000), arm(Arm.CANARY, 4000, with_itl=False)
    a = analyze(stable, canary, CFG, 1, 6, 0.05, looks_per_stage=2)
    assert a.outcome is Outcome.INCONCLUSIVE and a.metric("itl").verdict is Verdict.NO_DATA
    no_itl = CFG.model_copy(update={"itl": LatencyMetricConfig(enabled=False)})
    assert analyze(stable, canary, no_itl, 1, 6, 0.05, looks_per_stage=2).outcome is Outcome.PASS


def test_analyze_srm_makes_it_inconclusive_even_if_worse():
    # 5% weight but the canary got 10% of the samples, and is clearly slower
    a = analyze(arm(Arm.STABLE, 9000), arm(Arm.CANARY, 1000, ttft=0.4), CFG, 3, 6, 0.05)
    assert a.srm.flagged and a.outcome is Outcome.INCONCLUSIVE
    assert "sample ratio mismatch" in a.reason and "ttft" in a.reason


def test_analyze_small_slowdown_within_margin_is_not_pass_when_underpowered():
    rng = np.random.default_rng(7)
    a = analyze(arm(Arm.STABLE, 300, rng=rng), arm(Arm.CANARY, 300, ttft=0.21, rng=rng), CFG,
                1, 6, 0.5)
    assert a.outcome is Outcome.INCONCLUSIVE  # "not significant" is not "pass"


def test_aa_false_fail_rate_at_a_single_look_is_at_most_its_alpha():
    """Random A/A data at the last look (level ~0.018, Holm over 4 metrics)."""
    rng = np.random.default_rng(11)
    fails = 0
    for _ in range(300):
        a = analyze(arm(Arm.STABLE, 400, rng=rng), arm(Arm.CANARY, 400, rng=rng), CFG, 6, 6,
                    0.5)
        fails += a.outcome is Outcome.FAIL
    assert fails / 300 <= 0.05
