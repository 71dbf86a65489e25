"""Per-request measurements and their per-arm accumulation.

A :class:`Sample` is one finished request as the Router saw it. A :class:`SampleSet` holds one
arm's samples of the current stage in columnar numpy buffers (24-48 bytes per sample, so
100k samples are a few MB), keeping only what the analysis and the guards need: counts, the
error count, the natural logs of the latencies of successful requests (for quantiles) and,
per metric, running moments of those logs (n, mean, sum of squared deviations, merged batch
by batch with Chan's parallel formula), so an analysis costs O(1) whatever the sample size.

Rules, so that every caller counts the same way:

- A latency enters its metric only if the request did not fail (``error=False``) and the value
  is a finite number > 0. Failed requests count toward the error rate only.
- ``n`` (all samples, failed or not) is what the sample-ratio-mismatch check compares.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

#: The latency metrics, in the order the analysis reports them.
LATENCY_METRICS = ("ttft", "itl", "e2e")


@dataclass(frozen=True, slots=True)
class Moments:
    """n, mean and M2 (sum of squared deviations from the mean) of some values; ``var`` is
    the sample variance M2 / (n - 1). Batches merge exactly with :meth:`merge`."""

    n: int = 0
    mean: float = 0.0
    m2: float = 0.0

    @property
    def var(self) -> float:
        """Sample variance (ddof=1); NaN below 2 values."""
        return self.m2 / (self.n - 1) if self.n > 1 else math.nan

    @classmethod
    def of(cls, values: np.ndarray) -> "Moments":
        """The moments of an array (two-pass, numerically stable)."""
        x = np.asarray(values, dtype=np.float64)
        if x.size == 0:
            return cls()
        mean = float(x.mean())
        dev = x - mean
        return cls(int(x.size), mean, float(dev @ dev))

    def merge(self, other: "Moments") -> "Moments":
        """Moments of the union (Chan, Golub & LeVeque 1979)."""
        if other.n == 0:
            return self
        if self.n == 0:
            return other
        n = self.n + other.n
        delta = other.mean - self.mean
        return Moments(n, self.mean + delta * other.n / n,
                       self.m2 + other.m2 + delta * delta * self.n * other.n / n)


class Arm(str, enum.Enum):
    """Which variant served a request."""

    STABLE = "stable"
    CANARY = "canary"


@dataclass(frozen=True, slots=True)
class Sample:
    """One finished request.

    ``ttft_s``: time to first token; ``itl_s``: mean inter-token latency of the request;
    ``e2e_s``: whole request. Any may be None (not measured). ``key_bucket`` is the request's
    bucket (:func:`mlx_serving.canary.bucketing.bucket`) when the Router knows it;
    ``started_at`` the request's start time (same clock as the controller's ``now``), which
    lets the controller drop samples that began before a stage change.
    """

    arm: Arm
    ttft_s: float | None = None
    itl_s: float | None = None
    e2e_s: float | None = None
    error: bool = False
    key_bucket: int | None = None
    started_at: float | None = None

    def to_dict(self) -> dict:
        """JSON-safe form."""
        return {"arm": self.arm.value, "ttft_s": self.ttft_s, "itl_s": self.itl_s,
                "e2e_s": self.e2e_s, "error": self.error, "key_bucket": self.key_bucket,
                "started_at": self.started_at}

    @classmethod
    def from_dict(cls, data: dict) -> "Sample":
        """Inverse of :meth:`to_dict`."""
        return cls(arm=Arm(data["arm"]), ttft_s=data.get("ttft_s"), itl_s=data.get("itl_s"),
                   e2e_s=data.get("e2e_s"), error=bool(data.get("error", False)),
                   key_bucket=data.get("key_bucket"), started_at=data.get("started_at"))


class _Column:
    """A growable float64 buffer (amortised O(1) append of arrays)."""

    __slots__ = ("_buf", "_n")

    def __init__(self) -> None:
        self._buf = np.empty(256, dtype=np.float64)
        self._n = 0

    def extend(self, values: np.ndarray) -> None:
        k = values.shape[0]
        if k == 0:
            return
        need = self._n + k
        if need > self._buf.shape[0]:
            grown = np.empty(max(need, 2 * self._buf.shape[0]), dtype=np.float64)
            grown[: self._n] = self._buf[: self._n]
            self._buf = grown
        self._buf[self._n: need] = values
        self._n = need

    def view(self) -> np.ndarray:
        return self._buf[: self._n]

    def __len__(self) -> int:
        return self._n


def _log_valid(values: np.ndarray, ok: np.ndarray) -> np.ndarray:
    """Natural logs of the entries that are finite, > 0 and marked ok."""
    keep = ok & np.isfinite(values) & (values > 0.0)
    return np.log(values[keep])


class SampleSet:
    """One arm's samples for the current stage (or stage extension).

    Append with :meth:`append`, :meth:`extend` (Sample objects, e.g. a Router batch) or
    :meth:`add_arrays` (columns; the fast path). Samples from several Routers can be added in
    any order: nothing here depends on arrival order.
    """

    def __init__(self, arm: Arm | str) -> None:
        self.arm = Arm(arm)
        self.reset()

    def reset(self) -> None:
        """Forget every sample (a new stage or extension started)."""
        self._n = 0
        self._errors = 0
        self._cols = {m: _Column() for m in LATENCY_METRICS}
        self._moments = {m: Moments() for m in LATENCY_METRICS}
        self._values_kept = True
        self._version = getattr(self, "_version", -1) + 1  # never repeats, even across resets
        self._cache: dict[tuple, float] = {}

    # ---- adding ------------------------------------------------------------------------
    def append(self, sample: Sample) -> None:
        """Add one sample (its arm must be this set's arm)."""
        self.extend((sample,))

    def extend(self, samples: Iterable[Sample]) -> None:
        """Add a batch of samples; all must belong to this set's arm."""
        batch = list(samples)
        if not batch:
            return
        for s in batch:
            if s.arm is not self.arm:
                raise ValueError(f"{s.arm.value} sample given to the {self.arm.value} set")
        nan = math.nan
        self.add_arrays(
            ttft_s=np.fromiter((nan if s.ttft_s is None else s.ttft_s for s in batch),
                               np.float64, len(batch)),
            itl_s=np.fromiter((nan if s.itl_s is None else s.itl_s for s in batch),
                              np.float64, len(batch)),
            e2e_s=np.fromiter((nan if s.e2e_s is None else s.e2e_s for s in batch),
                              np.float64, len(batch)),
            error=np.fromiter((s.error for s in batch), np.bool_, len(batch)))

    def add_arrays(self, *, error: np.ndarray | None = None, n: int | None = None,
                   ttft_s: np.ndarray | None = None, itl_s: np.ndarray | None = None,
                   e2e_s: np.ndarray | None = None) -> None:
        """Add a batch given as columns of equal length (seconds; NaN = not measured).

        ``error`` (bool array) marks failed requests; without it none failed. ``n`` is the
        batch size, needed only when no column is given.
        """
        cols = {"ttft": ttft_s, "itl": itl_s, "e2e": e2e_s}
        sizes = {np.shape(c)[0] for c in cols.values() if c is not None}
        if error is not None:
            sizes.add(np.shape(error)[0])
        if n is not None:
            sizes.add(n)
        if len(sizes) != 1:
            raise ValueError(f"columns of unequal or unknown length: {sorted(sizes)}")
        size = sizes.pop()
        if size == 0:
            return
        err = (np.zeros(size, dtype=np.bool_) if error is None
               else np.asarray(error, dtype=np.bool_))
        ok = ~err
        for name, values in cols.items():
            if values is not None:
                self._add_logs(name, _log_valid(np.asarray(values, dtype=np.float64), ok))
        self._bump(size, int(err.sum()))

    def add_log_arrays(self, *, n: int, errors: int, ttft: np.ndarray | None = None,
                       itl: np.ndarray | None = None, e2e: np.ndarray | None = None) -> None:
        """Add ``n`` requests of which ``errors`` failed, with the natural-log latencies of the
        successful ones already computed (no validation of the logs)."""
        self._check_counts(n, errors)
        for name, values in (("ttft", ttft), ("itl", itl), ("e2e", e2e)):
            if values is not None:
                self._add_logs(name, np.asarray(values, dtype=np.float64))
        self._bump(n, errors)

    def add_log_moments(self, *, n: int, errors: int, ttft: Moments | None = None,
                        itl: Moments | None = None, e2e: Moments | None = None) -> None:
        """Add ``n`` requests of which ``errors`` failed, given only the moments of the
        successful ones' log latencies (the simulation's fast path). Afterwards the set keeps
        no values: :meth:`log_values` raises and :meth:`quantile` returns None."""
        self._check_counts(n, errors)
        for name, m in (("ttft", ttft), ("itl", itl), ("e2e", e2e)):
            if m is not None and m.n:
                self._moments[name] = self._moments[name].merge(m)
        self._values_kept = False
        self._bump(n, errors)

    def _add_logs(self, name: str, logs: np.ndarray) -> None:
        if logs.size:
            self._cols[name].extend(logs)
            self._moments[name] = self._moments[name].merge(Moments.of(logs))

    @staticmethod
    def _check_counts(n: int, errors: int) -> None:
        if errors > n or n < 0 or errors < 0:
            raise ValueError("need 0 <= errors <= n")

    def _bump(self, n: int, errors: int) -> None:
        self._n += n
        self._errors += errors
        self._version += 1
        self._cache.clear()

    # ---- reading -----------------------------------------------------------------------
    @property
    def n(self) -> int:
        """All samples (failed or not)."""
        return self._n

    def __len__(self) -> int:
        return self._n

    @property
    def errors(self) -> int:
        """Failed requests."""
        return self._errors

    @property
    def error_rate(self) -> float | None:
        """errors / n, None when empty."""
        return self._errors / self._n if self._n else None

    @property
    def version(self) -> int:
        """Increases at every addition (for callers that cache derived values)."""
        return self._version

    def count(self, metric: str) -> int:
        """Number of usable values of a latency metric (``ttft``, ``itl``, ``e2e``)."""
        return self._moments[metric].n

    def moments(self, metric: str) -> Moments:
        """Running n, mean and M2 of the metric's log values (what the t-tests use)."""
        return self._moments[metric]

    def log_values(self, metric: str) -> np.ndarray:
        """Natural logs of the metric's usable values (a read-only view; do not keep it
        across additions)."""
        if not self._values_kept:
            raise ValueError("this set holds moments only (add_log_moments)")
        view = self._cols[metric].view()
        view.flags.writeable = False
        return view

    def quantile(self, metric: str, q: float) -> float | None:
        """The metric's q-quantile in seconds (None when there are no values, or only
        moments). Cached until the next addition, so guards may ask every tick."""
        if not self._values_kept:
            return None
        key = (metric, q)
        if key not in self._cache:
            logs = self._cols[metric].view()
            self._cache[key] = float(np.exp(np.quantile(logs, q))) if logs.size else math.nan
        value = self._cache[key]
        return None if math.isnan(value) else value

    def summary(self) -> dict:
        """Counts per metric, for logs and the admin API."""
        return {"arm": self.arm.value, "n": self._n, "errors": self._errors,
                **{f"n_{m}": self._moments[m].n for m in LATENCY_METRICS}}


class StageSamples:
    """Both arms' sample sets for the current stage; routes mixed batches by arm."""

    def __init__(self) -> None:
        self.stable = SampleSet(Arm.STABLE)
        self.canary = SampleSet(Arm.CANARY)

    def add(self, samples: Iterable[Sample], *, since: float | None = None) -> None:
        """Add a mixed batch; with ``since``, drop samples that started before it (requests
        routed under the previous stage's weight)."""
        by_arm: dict[Arm, list[Sample]] = {Arm.STABLE: [], Arm.CANARY: []}
        for s in samples:
            if since is not None and s.started_at is not None and s.started_at < since:
                continue
            by_arm[s.arm].append(s)
        self.stable.extend(by_arm[Arm.STABLE])
        self.canary.extend(by_arm[Arm.CANARY])

    def reset(self) -> None:
        """Forget both arms' samples."""
        self.stable.reset()
        self.canary.reset()
