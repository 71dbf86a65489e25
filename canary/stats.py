"""The judgment: is the canary worse than stable, shown no worse, or not yet known?

A pipeline of small pure functions (Kayenta's shape)::

    preprocess   SampleSets -> per metric: moments of the log latencies / error counts
    SRM          chi-square of the observed split against the weight
    classify     per metric: FAIL test (one-sided "canary worse") and
                 PASS test (one-sided non-inferiority within the margin)
    score        Holm across the metrics' FAIL p-values at this look's spent alpha;
                 PASS needs every metric's non-inferiority test (intersection-union)
    decide       Outcome PASS / FAIL / INCONCLUSIVE with every number behind it

The method, its formulas and why: docs/CANARY_STATS.md. Reference values worked out by hand:
tests/data/canary/stats_reference.json.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields

import numpy as np
from scipy import special
from scipy import stats as sps

from mlx_serving.canary.config import AnalysisConfig
from mlx_serving.canary.samples import Moments, SampleSet


class Outcome(str, enum.Enum):
    """What one analysis concludes."""

    PASS = "pass"                  # every metric shown non-inferior, nothing worse
    FAIL = "fail"                  # some metric significantly worse (after Holm)
    INCONCLUSIVE = "inconclusive"  # neither; or the split is broken (SRM)


class Verdict(str, enum.Enum):
    """What one analysis concludes about one metric."""

    PASS = "pass"                  # shown non-inferior (within the margin)
    FAIL = "fail"                  # significantly worse (Holm-adjusted, this look's alpha)
    INCONCLUSIVE = "inconclusive"  # neither
    NO_DATA = "no_data"            # fewer than min_samples values in an arm


# ---------------------------------------------------------------------------------------
# Small test functions (each checked against hand-computed values)
# ---------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class WelchResult:
    """Welch's unequal-variance t-test of mean(canary) - mean(stable) against ``delta0``."""

    diff: float        # mean(canary) - mean(stable)
    se: float          # sqrt(var_c/n_c + var_s/n_s)
    t: float           # (diff - delta0) / se
    df: float          # Welch-Satterthwaite degrees of freedom
    p: float           # one-sided p-value for ``alternative``
    delta0: float
    alternative: str   # "greater" (canary worse) or "less" (non-inferiority)


def welch_test(canary: np.ndarray, stable: np.ndarray, *, delta0: float = 0.0,
               alternative: str = "greater") -> WelchResult:
    """One-sided Welch t-test of H0: mean_c - mean_s = delta0 (scipy's Welch test,
    ``equal_var=False``). ``alternative="greater"``: H1 diff > delta0 (canary worse);
    ``"less"``: H1 diff < delta0 (non-inferiority with delta0 = log(1 + margin))."""
    c = np.asarray(canary, dtype=np.float64)
    s = np.asarray(stable, dtype=np.float64)
    if c.size < 2 or s.size < 2:
        raise ValueError("Welch's test needs at least 2 values per arm")
    return welch_from_moments(Moments.of(c), Moments.of(s), delta0=delta0,
                              alternative=alternative)


def welch_from_moments(c: Moments, s: Moments, *, delta0: float = 0.0,
                       alternative: str = "greater") -> WelchResult:
    """Welch's test from each arm's n, mean and sample variance
    (``scipy.stats.ttest_ind_from_stats(..., equal_var=False, alternative=...)``, the summary
    form of ``ttest_ind``): t = (diff - delta0) / se, se = sqrt(v_c/n_c + v_s/n_s),
    df = se^4 / ((v_c/n_c)^2/(n_c-1) + (v_s/n_s)^2/(n_s-1))."""
    if alternative not in ("greater", "less"):
        raise ValueError("alternative must be 'greater' or 'less'")
    vn_c, vn_s = c.var / c.n, s.var / s.n
    diff = c.mean - s.mean
    se = math.sqrt(vn_c + vn_s)
    if se == 0.0:  # both arms constant: the sign of the shifted difference decides
        shifted = diff - delta0
        hit = shifted > 0 if alternative == "greater" else shifted < 0
        t = math.copysign(math.inf, shifted) if shifted else 0.0
        return WelchResult(diff, 0.0, t, float(c.n + s.n - 2), 0.0 if hit else 1.0,
                           delta0, alternative)
    res = sps.ttest_ind_from_stats(c.mean - delta0, math.sqrt(c.var), c.n, s.mean,
                                   math.sqrt(s.var), s.n, equal_var=False,
                                   alternative=alternative)
    df = (vn_c + vn_s) ** 2 / (vn_c ** 2 / (c.n - 1) + vn_s ** 2 / (s.n - 1))
    return WelchResult(diff, se, float(res.statistic), df, float(res.pvalue), delta0,
                       alternative)


def cohens_d(canary: np.ndarray, stable: np.ndarray) -> float:
    """Cohen's d = (mean_c - mean_s) / pooled SD, pooled SD =
    sqrt(((n_c-1) s_c^2 + (n_s-1) s_s^2) / (n_c + n_s - 2)). NaN if the pooled SD is 0."""
    return _cohens_d(Moments.of(np.asarray(canary, dtype=np.float64)),
                     Moments.of(np.asarray(stable, dtype=np.float64)))


def _cohens_d(c: Moments, s: Moments) -> float:
    pooled = ((c.n - 1) * c.var + (s.n - 1) * s.var) / (c.n + s.n - 2)
    return (c.mean - s.mean) / math.sqrt(pooled) if pooled > 0.0 else math.nan


@dataclass(frozen=True, slots=True)
class ZResult:
    """A z statistic and its one-sided p-value."""

    z: float
    p: float


def two_proportion_ztest(x_c: int, n_c: int, x_s: int, n_s: int) -> ZResult:
    """One-sided pooled two-proportion z-test of H1: p_c > p_s.
    z = (x_c/n_c - x_s/n_s) / sqrt(pbar (1 - pbar) (1/n_c + 1/n_s)), pbar = (x_c+x_s)/(n_c+n_s).
    With no failures (or only failures) in both arms there is no evidence: z = 0, p = 1."""
    pbar = (x_c + x_s) / (n_c + n_s)
    var = pbar * (1.0 - pbar) * (1.0 / n_c + 1.0 / n_s)
    if var <= 0.0:
        return ZResult(0.0, 1.0)
    z = (x_c / n_c - x_s / n_s) / math.sqrt(var)
    return ZResult(z, float(special.ndtr(-z)))


def wilson_interval(x: int, n: int, z: float) -> tuple[float, float]:
    """Wilson score interval for a proportion x/n with normal quantile z:
    (p + z^2/2n -+ z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n)."""
    p = x / n
    z2 = z * z
    centre = p + z2 / (2 * n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    denom = 1 + z2 / n
    return (centre - half) / denom, (centre + half) / denom


def newcombe_upper(x_c: int, n_c: int, x_s: int, n_s: int, z: float) -> float:
    """Upper confidence bound of p_c - p_s by Newcombe's hybrid score method (Newcombe 1998,
    method 10): D + sqrt((u_c - p_c)^2 + (p_s - l_s)^2) with u_c the Wilson upper bound of the
    canary rate and l_s the Wilson lower bound of stable's. With z = z_{1-a} it is a
    one-sided (1 - a) bound; non-inferiority holds at level a when it is < the margin."""
    p_c, p_s = x_c / n_c, x_s / n_s
    _, u_c = wilson_interval(x_c, n_c, z)
    l_s, _ = wilson_interval(x_s, n_s, z)
    return (p_c - p_s) + math.sqrt((u_c - p_c) ** 2 + (p_s - l_s) ** 2)


@dataclass(frozen=True, slots=True)
class SrmResult:
    """Sample-ratio-mismatch check: chi-square goodness of fit (1 df) of the split."""

    n_stable: int
    n_canary: int
    expected_share: float   # canary share the weight asks for
    observed_share: float | None
    chi2: float
    p: float
    threshold: float
    flagged: bool

    def to_dict(self) -> dict:
        return _clean(_fields(self))


def srm_test(n_stable: int, n_canary: int, expected_share: float,
             threshold: float = 0.001) -> SrmResult:
    """Chi-square test of observed (n_stable, n_canary) against expected
    (N (1 - w), N w): chi2 = sum (O - E)^2 / E, 1 df, p = P(chi2_1 > chi2) = erfc(sqrt(chi2/2)).
    ``flagged`` when p < threshold. A weight of 0 or 1 leaves nothing to compare (p = 1)."""
    total = n_stable + n_canary
    if total == 0 or not 0.0 < expected_share < 1.0:
        observed = n_canary / total if total else None
        return SrmResult(n_stable, n_canary, expected_share, observed, 0.0, 1.0, threshold,
                         False)
    e_c = total * expected_share
    e_s = total - e_c
    chi2 = (n_canary - e_c) ** 2 / e_c + (n_stable - e_s) ** 2 / e_s
    p = float(special.chdtrc(1, chi2))
    return SrmResult(n_stable, n_canary, expected_share, n_canary / total, chi2, p, threshold,
                     p < threshold)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values, in the input order: sort ascending, the i-th
    smallest (1-based) gets max_{j<=i} min(1, (m - j + 1) p_(j)). A metric is rejected at
    family-wise level a when its adjusted p-value is <= a."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


def obrien_fleming_spending(t: float, alpha: float) -> float:
    """Lan-DeMets O'Brien-Fleming-type alpha-spending function (Lan & DeMets 1983;
    gsDesign ``sfLDOF``): alpha(t) = 2 - 2 Phi(z_{1-alpha/2} / sqrt(t)) for 0 < t <= 1,
    alpha(0) = 0, alpha(1) = alpha. ``alpha`` is the one-sided level to spend."""
    if t <= 0.0:
        return 0.0
    t = min(t, 1.0)
    return float(2.0 * special.ndtr(special.ndtri(alpha / 2.0) / math.sqrt(t)))


@dataclass(frozen=True, slots=True)
class LookAlpha:
    """The FAIL tests' alpha at one look."""

    look: int
    max_looks: int
    information_fraction: float
    spent_before: float   # alpha(t_{look-1})
    spent: float          # alpha(t_look): cumulative after this look
    level: float          # spent - spent_before: this look's significance level


def look_alpha(look: int, max_looks: int, alpha: float) -> LookAlpha:
    """Alpha for look ``look`` (1-based) of at most ``max_looks``, information fraction
    t = look / max_looks. Looks past the plan get nothing (the budget is spent)."""
    if look < 1 or max_looks < 1:
        raise ValueError("look and max_looks start at 1")
    t_prev = min(look - 1, max_looks) / max_looks
    t = min(look, max_looks) / max_looks
    before = obrien_fleming_spending(t_prev, alpha)
    spent = obrien_fleming_spending(t, alpha)
    return LookAlpha(look, max_looks, t, before, spent, max(0.0, spent - before))


def _z(p: float) -> float:
    return float(special.ndtri(p))


def required_samples(margin: float, sigma: float, alpha: float, power: float,
                     canary_share: float = 0.5) -> int:
    """Canary samples for the log-latency non-inferiority test to reach ``power`` when the
    canary is truly equal to stable:

        n_c = ceil( (z_{1-alpha} + z_{power})^2 sigma^2 / (ln(1 + margin)^2 (1 - w)) )

    with w = ``canary_share`` (stable gets n_c (1 - w) / w samples, so the variance of the
    difference of means is sigma^2 / (n_c (1 - w)); at w = 0.5 this is the textbook per-arm
    size 2 (z + z)^2 sigma^2 / delta^2). ``margin`` is relative (0.10 = 10% slower), ``sigma``
    the SD of the log latency, ``alpha`` one-sided."""
    return required_n(math.log1p(margin), sigma * sigma, alpha, power, canary_share)


def required_samples_proportion(margin: float, rate: float, alpha: float, power: float,
                                canary_share: float = 0.5) -> int:
    """Canary samples for the error-rate non-inferiority test (absolute ``margin``) to reach
    ``power`` when both arms truly fail at ``rate``.

    Start: the Wald formula (Chow, Shao & Wang, *Sample Size Calculations in Clinical
    Research*, 3rd ed., sec. 4.2), ceil((z_{1-alpha} + z_power)^2 rate (1 - rate) /
    (margin^2 (1 - w))). The test uses Newcombe's bound, whose upper side is wider than
    Wald's at small rates (Wilson's skew), so the answer is the smallest n_c >= that start
    with :func:`ni_miss_proportion` <= 1 - power (about +25% at 1% errors and 5% weight)."""
    start = required_n(margin, rate * (1.0 - rate), alpha, power, canary_share)
    return smallest_n(lambda n: ni_miss_proportion(n, margin, rate, alpha, canary_share),
                      1.0 - power, start)


def required_n(delta: float, variance: float, alpha: float, power: float, w: float) -> int:
    """The common closed form: ceil((z_{1-alpha} + z_power)^2 variance / (delta^2 (1 - w)))
    canary samples, for an effect scale ``delta`` and a per-observation ``variance``."""
    _check_design(alpha, power, w)
    if delta <= 0.0:
        raise ValueError("the margin must be positive")
    z_sum = _z(1.0 - alpha) + _z(power)
    return int(math.ceil(z_sum * z_sum * variance / (delta * delta * (1.0 - w)) - 1e-9))


def ni_miss_latency(n_c: float, margin: float, sigma: float, alpha: float,
                    canary_share: float) -> float:
    """P(the log-latency non-inferiority test does not pass) with n_c canary samples when the
    canary equals stable (normal approximation): Phi(z_{1-alpha} - ln(1+margin)
    sqrt(n_c (1 - w)) / sigma)."""
    return float(special.ndtr(_z(1.0 - alpha)
                              - math.log1p(margin) * math.sqrt(n_c * (1.0 - canary_share))
                              / sigma))


def ni_miss_proportion(n_c: float, margin: float, rate: float, alpha: float,
                       canary_share: float) -> float:
    """P(the Newcombe non-inferiority bound is not below ``margin``) with n_c canary samples
    when both arms fail at ``rate`` (delta method). The bound is
    U(p_c, p_s) = (p_c - p_s) + sqrt((u(p_c) - p_c)^2 + (p_s - l(p_s))^2) with Wilson bounds
    u, l at z_{1-alpha}; with n_s = n_c (1 - w) / w,

        miss = Phi((U(r, r) - margin) / se_U),
        se_U^2 = g_c^2 r (1 - r) / n_c + g_s^2 r (1 - r) / n_s,

    g_c, g_s the partial derivatives of U at (r, r) (central differences). The derivatives
    matter: the Wilson width grows with the observed rate, so U varies ~10% more than p_c - p_s
    at 1% errors and 5% weight."""
    w = canary_share
    n_s = n_c * (1.0 - w) / w
    z = _z(1.0 - alpha)
    var_c, var_s = rate * (1.0 - rate) / n_c, rate * (1.0 - rate) / n_s

    def bound(p_c: float, p_s: float) -> float:
        _, u_c = wilson_interval(p_c * n_c, n_c, z)
        l_s, _ = wilson_interval(p_s * n_s, n_s, z)
        return (p_c - p_s) + math.sqrt((u_c - p_c) ** 2 + (p_s - l_s) ** 2)

    h_c, h_s = 1e-3 * math.sqrt(var_c), 1e-3 * math.sqrt(var_s)
    g_c = (bound(rate + h_c, rate) - bound(rate - h_c, rate)) / (2 * h_c)
    g_s = (bound(rate, rate + h_s) - bound(rate, rate - h_s)) / (2 * h_s)
    se = math.sqrt(g_c * g_c * var_c + g_s * g_s * var_s)
    return float(special.ndtr((bound(rate, rate) - margin) / se))


def smallest_n(miss, target: float, start: int = 2) -> int:
    """The smallest integer n >= ``start`` with ``miss(n) <= target``, for a ``miss`` that
    decreases with n (doubling, then bisection)."""
    lo = max(2, int(start))
    if miss(lo) <= target:
        return lo
    hi = lo * 2
    while miss(hi) > target:
        lo, hi = hi, hi * 2
        if hi > 10 ** 12:
            raise ValueError("no sample size reaches the wanted power")
    while hi - lo > 1:  # invariant: miss(lo) > target >= miss(hi)
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if miss(mid) <= target else (mid, hi)
    return hi


def _check_design(alpha: float, power: float, w: float) -> None:
    if not 0.0 < w < 1.0:
        raise ValueError("canary_share must lie strictly between 0 and 1")
    if not 0.0 < alpha < 0.5 or not 0.0 < power < 1.0:
        raise ValueError("need 0 < alpha < 0.5 and 0 < power < 1")


# ---------------------------------------------------------------------------------------
# Per-metric classification
# ---------------------------------------------------------------------------------------

@dataclass(slots=True)
class MetricResult:
    """Everything computed for one metric. Latency fields are on the natural-log scale
    (``*_log``) or in seconds (geometric means); error-rate fields are proportions."""

    name: str
    kind: str                       # "latency" or "error_rate"
    verdict: Verdict
    n_stable: int
    n_canary: int
    margin: float                   # relative (latency) or absolute (error rate)
    # FAIL test (one-sided, canary worse); p_holm is compared with the look's alpha
    fail_statistic: float | None = None
    fail_df: float | None = None
    fail_p: float | None = None
    fail_p_holm: float | None = None
    # PASS test (non-inferiority at alpha_pass)
    ni_statistic: float | None = None
    ni_p: float | None = None
    ni_upper: float | None = None   # latency: upper bound of the GM ratio; error: of p_c-p_s
    ni_threshold: float | None = None  # latency: 1 + margin; error: margin
    # latency description
    mean_log_stable: float | None = None
    mean_log_canary: float | None = None
    sd_log_stable: float | None = None
    sd_log_canary: float | None = None
    gm_stable_s: float | None = None
    gm_canary_s: float | None = None
    ratio: float | None = None      # geometric-mean ratio canary / stable
    cohens_d: float | None = None
    # error-rate description
    errors_stable: int | None = None
    errors_canary: int | None = None
    rate_stable: float | None = None
    rate_canary: float | None = None
    difference: float | None = None  # rate_canary - rate_stable
    method: str = ""

    def to_dict(self) -> dict:
        out = _clean(_fields(self))
        out["verdict"] = self.verdict.value
        return {k: v for k, v in out.items() if v is not None and v != ""}


def classify_latency(name: str, ms: Moments, mc: Moments, margin: float, alpha_pass: float,
                     min_samples: int) -> MetricResult:
    """Both tests for one latency metric, from each arm's moments of the log values. The
    verdict here is PASS, INCONCLUSIVE or NO_DATA; FAIL is decided later by Holm across
    metrics."""
    r = MetricResult(name, "latency", Verdict.NO_DATA, ms.n, mc.n, margin,
                     method="welch t on ln(latency); GM ratio = exp(mean diff)")
    if min(ms.n, mc.n) < max(2, min_samples):
        return r
    r.mean_log_stable, r.mean_log_canary = ms.mean, mc.mean
    r.sd_log_stable, r.sd_log_canary = math.sqrt(ms.var), math.sqrt(mc.var)
    r.gm_stable_s, r.gm_canary_s = math.exp(ms.mean), math.exp(mc.mean)
    r.ratio = math.exp(mc.mean - ms.mean)
    r.cohens_d = _cohens_d(mc, ms)
    worse = welch_from_moments(mc, ms, alternative="greater")
    r.fail_statistic, r.fail_df, r.fail_p = worse.t, worse.df, worse.p
    delta0 = math.log1p(margin)
    ni = welch_from_moments(mc, ms, delta0=delta0, alternative="less")
    r.ni_statistic, r.ni_p = ni.t, ni.p
    r.ni_threshold = 1.0 + margin
    r.ni_upper = math.exp(ni.diff + float(special.stdtrit(ni.df, 1.0 - alpha_pass)) * ni.se)
    r.verdict = Verdict.PASS if ni.p < alpha_pass else Verdict.INCONCLUSIVE
    return r


def classify_error_rate(x_s: int, n_s: int, x_c: int, n_c: int, margin: float,
                        alpha_pass: float, min_samples: int) -> MetricResult:
    """Both tests for the error rate: pooled z (canary worse) and the Newcombe hybrid score
    upper bound of p_c - p_s at one-sided level alpha_pass (non-inferiority)."""
    r = MetricResult("error_rate", "error_rate", Verdict.NO_DATA, n_s, n_c, margin,
                     method="pooled z (worse); Newcombe hybrid score bound (non-inferiority)")
    r.errors_stable, r.errors_canary = x_s, x_c
    if min(n_s, n_c) < max(2, min_samples):
        return r
    r.rate_stable, r.rate_canary = x_s / n_s, x_c / n_c
    r.difference = r.rate_canary - r.rate_stable
    worse = two_proportion_ztest(x_c, n_c, x_s, n_s)
    r.fail_statistic, r.fail_p = worse.z, worse.p
    r.ni_upper = newcombe_upper(x_c, n_c, x_s, n_s, _z(1.0 - alpha_pass))
    r.ni_threshold = margin
    r.verdict = Verdict.PASS if r.ni_upper < margin else Verdict.INCONCLUSIVE
    return r


# ---------------------------------------------------------------------------------------
# The analysis
# ---------------------------------------------------------------------------------------

@dataclass(slots=True)
class Analysis:
    """One look's conclusion and every number behind it (``to_dict`` is JSON-safe)."""

    outcome: Outcome
    reason: str
    look: int
    max_looks: int
    information_fraction: float
    alpha: float                 # the plan's one-sided alpha
    alpha_fail: float            # this look's level for the FAIL tests (Holm family)
    alpha_spent_before: float
    alpha_spent: float           # cumulative FAIL alpha after this look
    alpha_pass: float            # one-sided level of each non-inferiority test
    expected_canary_share: float
    n_stable: int
    n_canary: int
    srm: SrmResult | None
    metrics: list[MetricResult] = field(default_factory=list)

    def metric(self, name: str) -> MetricResult:
        """The result for one metric by name."""
        for m in self.metrics:
            if m.name == name:
                return m
        raise KeyError(name)

    def to_dict(self) -> dict:
        """JSON-safe dict (non-finite numbers become None)."""
        return {
            "outcome": self.outcome.value, "reason": self.reason,
            "look": self.look, "max_looks": self.max_looks,
            "information_fraction": _num(self.information_fraction),
            "alpha": self.alpha, "alpha_fail": _num(self.alpha_fail),
            "alpha_spent_before": _num(self.alpha_spent_before),
            "alpha_spent": _num(self.alpha_spent), "alpha_pass": _num(self.alpha_pass),
            "expected_canary_share": self.expected_canary_share,
            "n_stable": self.n_stable, "n_canary": self.n_canary,
            "srm": self.srm.to_dict() if self.srm else None,
            "metrics": [m.to_dict() for m in self.metrics],
        }


def analyze(stable: SampleSet, canary: SampleSet, config: AnalysisConfig, look: int,
            max_looks: int, expected_canary_share: float, *,
            looks_per_stage: int = 1) -> Analysis:
    """Compare the canary with stable at look ``look`` of at most ``max_looks``.

    ``expected_canary_share`` is the canary weight as a fraction (0.05 at 5%).
    ``looks_per_stage`` is how many looks the current stage may take (1 + max_extensions):
    each non-inferiority test runs at alpha / looks_per_stage so that a stage passes a
    canary worse than the margin with probability <= alpha.
    """
    la = look_alpha(look, max_looks, config.alpha)
    alpha_pass = config.alpha / max(1, looks_per_stage)

    # preprocess + classify
    results = [classify_latency(name, stable.moments(name), canary.moments(name),
                                cfg.margin, alpha_pass, config.min_samples)
               for name, cfg in config.latency_metrics()]
    if config.error_rate.enabled:
        results.append(classify_error_rate(stable.errors, stable.n, canary.errors, canary.n,
                                           config.error_rate.margin, alpha_pass,
                                           config.min_samples))

    # score: Holm across the FAIL tests of the metrics that have data
    tested = [r for r in results if r.fail_p is not None]
    for r, adj in zip(tested, holm([r.fail_p for r in tested])):
        r.fail_p_holm = adj
        if la.level > 0.0 and adj <= la.level:
            r.verdict = Verdict.FAIL

    srm = (srm_test(stable.n, canary.n, expected_canary_share, config.srm_p_threshold)
           if config.srm_check else None)

    # decide
    failed = [r for r in results if r.verdict is Verdict.FAIL]
    if srm is not None and srm.flagged:
        outcome = Outcome.INCONCLUSIVE
        reason = (f"sample ratio mismatch: canary share {srm.observed_share:.4f} vs expected "
                  f"{expected_canary_share:.4f} (chi2 {srm.chi2:.1f}, p {srm.p:.2g} < "
                  f"{srm.threshold}); "
                  "the split is broken, nothing is concluded")
        if failed:
            reason += "; metrics that would fail: " + ", ".join(r.name for r in failed)
    elif failed:
        outcome = Outcome.FAIL
        reason = "canary worse: " + "; ".join(_describe_fail(r, la.level) for r in failed)
    elif results and all(r.verdict is Verdict.PASS for r in results):
        outcome = Outcome.PASS
        reason = "non-inferior on every metric: " + "; ".join(_describe_ni(r) for r in results)
    else:
        outcome = Outcome.INCONCLUSIVE
        open_ = [r for r in results if r.verdict is not Verdict.PASS]
        reason = ("no metric enabled" if not results else
                  "not shown non-inferior: " + "; ".join(_describe_open(r, config.min_samples)
                                                         for r in open_))
    return Analysis(outcome, reason, look, max_looks, la.information_fraction, config.alpha,
                    la.level, la.spent_before, la.spent, alpha_pass, expected_canary_share,
                    stable.n, canary.n, srm, results)


def _describe_fail(r: MetricResult, level: float) -> str:
    what = (f"GM ratio {r.ratio:.3f}" if r.kind == "latency"
            else f"error rate {r.rate_canary:.4f} vs {r.rate_stable:.4f}")
    return f"{r.name} {what}, Holm p {r.fail_p_holm:.3g} <= {level:.3g}"


def _describe_ni(r: MetricResult) -> str:
    if r.kind == "latency":
        return f"{r.name} ratio <= {r.ni_upper:.3f} < {r.ni_threshold:.3f}"
    return f"{r.name} diff <= {r.ni_upper:.4f} < {r.ni_threshold:.4f}"


def _describe_open(r: MetricResult, min_samples: int) -> str:
    if r.verdict is Verdict.NO_DATA:
        return f"{r.name} no data (n {r.n_stable}/{r.n_canary} < {min_samples})"
    if r.kind == "latency":
        return f"{r.name} ratio bound {r.ni_upper:.3f} >= {r.ni_threshold:.3f}"
    return f"{r.name} diff bound {r.ni_upper:.4f} >= {r.ni_threshold:.4f}"


def _num(x):
    if isinstance(x, (float, np.floating)):
        x = float(x)
        return x if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    return x


def _fields(obj) -> dict:
    return {f.name: getattr(obj, f.name) for f in fields(obj)}


def _clean(d: dict) -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, enum.Enum):
            v = v.value
        out[k] = _num(v)
    return out
