"""Verification: is the traffic a change touched worse than it would have been?

A step is judged on four metrics — error rate, p95 latency, cost per request and
quality (where requests carry ``quality_score``) — each by a one-sided test at
``confidence``, against a reference and a tolerance (``[actions.verify]``):

- error rate: H1 "touched rate > reference rate + tolerance" (a z-test of one
  proportion against the tolerated rate, exact binomial when the counts are small);
- p95 latency: H1 "more than 5 % of touched requests are slower than the reference
  p95 x (1 + tolerance)" (a binomial test on the count above that bar);
- cost per request: H1 "touched mean > reference mean x (1 + tolerance)" (Welch);
- quality: H1 "touched mean < bar" (Welch), where the bar is the quality the finding
  promised for the traffic moved (its evidence) less the tolerance, else the
  reference mean less the tolerance.

The reference is the same scope before the change, carried to the hours after it
by untouched traffic where some runs in those hours (ratios for latency and cost,
differences for rates): a change of the whole day's traffic (seasonality, an
incident) moves both and is not blamed on the action. A regression on any metric
fails the step; a metric without enough samples on either side is not judged and
says so — except that errors can fail a step early: a handful of touched requests
that mostly fail already reject "no worse than tolerated" at ``confidence`` (a
gateway that takes a failing deployment out of its picks leaves few to count).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy import stats


@dataclass
class Sample:
    """Requests of one group: status, latency, cost and quality per request."""

    errors: np.ndarray  # bool per request
    latency_ms: np.ndarray  # of the successful requests
    cost_usd: np.ndarray  # of the priced requests
    quality: np.ndarray  # of the requests that carry a score

    @property
    def requests(self) -> int:
        return int(self.errors.size)

    @classmethod
    def of(cls, rows: list[tuple[Any, ...]]) -> Sample:
        """From ``(status, latency_ms, cost_usd, quality_score)`` rows."""
        status = np.array([r[0] != "ok" for r in rows], dtype=bool)
        lat = np.array([r[1] for r in rows if r[0] == "ok" and r[1] is not None], dtype=float)
        cost = np.array([r[2] for r in rows if r[2] is not None], dtype=float)
        q = np.array([r[3] for r in rows if r[3] is not None], dtype=float)
        return cls(status, lat, cost, q)


@dataclass
class Check:
    metric: str
    judged: bool
    regressed: bool
    touched: float | None
    reference: float | None
    bar: float | None
    p_value: float | None
    detail: str


@dataclass
class Verdict:
    passed: bool
    checks: list[Check] = field(default_factory=list)
    touched_requests: int = 0
    reference_requests: int = 0

    @property
    def reasons(self) -> list[str]:
        return [c.detail for c in self.checks if c.regressed]

    def summary(self) -> str:
        if self.passed:
            judged = [c.metric for c in self.checks if c.judged]
            return f"no regression in {', '.join(judged) or 'nothing judged'}"
        return "; ".join(self.reasons)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["summary"] = self.summary()
        return out


@dataclass(frozen=True)
class Tolerances:
    confidence: float = 0.95
    error_rate: float = 0.01
    p95_latency: float = 0.25
    cost: float = 0.05
    quality: float = 0.02
    min_samples: int = 30


def judge(
    touched: Sample,
    before: Sample,
    tol: Tolerances,
    *,
    control_before: Sample | None = None,
    control_after: Sample | None = None,
    quality_bar: float | None = None,
) -> Verdict:
    """The verdict on ``touched`` against ``before`` (see the module docstring)."""
    alpha = 1.0 - tol.confidence
    use_control = (
        control_before is not None
        and control_after is not None
        and control_before.requests >= tol.min_samples
        and control_after.requests >= tol.min_samples
    )
    checks = [
        _errors(
            touched, before, tol, alpha, control_before if use_control else None, control_after
        ),
        _latency(
            touched, before, tol, alpha, control_before if use_control else None, control_after
        ),
        _cost(touched, before, tol, alpha, control_before if use_control else None, control_after),
        _quality(touched, before, tol, alpha, quality_bar),
    ]
    return Verdict(
        passed=not any(c.regressed for c in checks),
        checks=checks,
        touched_requests=touched.requests,
        reference_requests=before.requests,
    )


def _errors(
    t: Sample, b: Sample, tol: Tolerances, alpha: float, cb: Sample | None, ca: Sample | None
) -> Check:
    if t.requests == 0 or b.requests < tol.min_samples:
        return _unjudged("error rate", t.requests, b.requests, tol)
    ref = float(b.errors.mean())
    if cb is not None and ca is not None:
        ref = min(1.0, max(0.0, ref + float(ca.errors.mean()) - float(cb.errors.mean())))
    bar = min(1.0, ref + tol.error_rate)
    k, n = int(t.errors.sum()), t.requests
    p = 1.0 if bar >= 1.0 else float(stats.binomtest(k, n, bar, alternative="greater").pvalue)
    regressed = p < alpha
    if n < tol.min_samples and not regressed:  # a few requests can show a failure, not health
        return _unjudged("error rate", t.requests, b.requests, tol)
    return Check(
        "error rate",
        True,
        regressed,
        k / n,
        ref,
        bar,
        p,
        f"error rate {k / n:.1%} of {n:,} touched requests against {ref:.1%} before"
        + (f" (tolerated {bar:.1%}; p = {p:.3g})" if regressed else ""),
    )


def _latency(
    t: Sample, b: Sample, tol: Tolerances, alpha: float, cb: Sample | None, ca: Sample | None
) -> Check:
    if t.latency_ms.size < tol.min_samples or b.latency_ms.size < tol.min_samples:
        return _unjudged("p95 latency", t.latency_ms.size, b.latency_ms.size, tol)
    ref = float(np.percentile(b.latency_ms, 95))
    if cb is not None and ca is not None and cb.latency_ms.size and ca.latency_ms.size:
        ref *= float(np.percentile(ca.latency_ms, 95)) / max(
            1e-9, float(np.percentile(cb.latency_ms, 95))
        )
    bar = ref * (1.0 + tol.p95_latency)
    above = int((t.latency_ms > bar).sum())
    n = int(t.latency_ms.size)
    p = float(stats.binomtest(above, n, 0.05, alternative="greater").pvalue)
    observed = float(np.percentile(t.latency_ms, 95))
    regressed = p < alpha
    return Check(
        "p95 latency",
        True,
        regressed,
        observed,
        ref,
        bar,
        p,
        f"p95 latency {observed:,.0f} ms against {ref:,.0f} ms before"
        + (f" ({above / n:.1%} of requests above {bar:,.0f} ms; p = {p:.3g})" if regressed else ""),
    )


def _cost(
    t: Sample, b: Sample, tol: Tolerances, alpha: float, cb: Sample | None, ca: Sample | None
) -> Check:
    if t.cost_usd.size < tol.min_samples or b.cost_usd.size < tol.min_samples:
        return _unjudged("cost per request", t.cost_usd.size, b.cost_usd.size, tol)
    ref = float(b.cost_usd.mean())
    if cb is not None and ca is not None and cb.cost_usd.size and ca.cost_usd.size:
        ref *= float(ca.cost_usd.mean()) / max(1e-12, float(cb.cost_usd.mean()))
    bar = ref * (1.0 + tol.cost)
    p = _welch_greater(t.cost_usd, b.cost_usd * (bar / ref) if ref > 0 else b.cost_usd)
    observed = float(t.cost_usd.mean())
    regressed = p < alpha
    return Check(
        "cost per request",
        True,
        regressed,
        observed,
        ref,
        bar,
        p,
        f"cost per request ${observed:.6f} against ${ref:.6f} before"
        + (f" (tolerated ${bar:.6f}; p = {p:.3g})" if regressed else ""),
    )


def _quality(t: Sample, b: Sample, tol: Tolerances, alpha: float, promised: float | None) -> Check:
    if t.quality.size < tol.min_samples:
        return _unjudged("quality", t.quality.size, b.quality.size, tol)
    if promised is None and b.quality.size < tol.min_samples:
        return _unjudged("quality", t.quality.size, b.quality.size, tol)
    ref = promised if promised is not None else float(b.quality.mean())
    bar = ref - tol.quality
    observed = float(t.quality.mean())
    if _constant(t.quality):
        p = 0.0 if observed < bar else 1.0
    else:
        mean, sd, n = float(t.quality.mean()), float(t.quality.std(ddof=1)), t.quality.size
        p = float(stats.t.cdf((mean - bar) / (sd / math.sqrt(n)), df=n - 1))
    regressed = p < alpha
    source = "promised by the finding" if promised is not None else "before"
    return Check(
        "quality",
        True,
        regressed,
        observed,
        ref,
        bar,
        p,
        f"quality {observed:.3f} of {t.quality.size:,} scored requests against {ref:.3f} "
        f"{source}" + (f" (bar {bar:.3f}; p = {p:.3g})" if regressed else ""),
    )


def _welch_greater(a: np.ndarray, b: np.ndarray) -> float:
    """p of H1 mean(a) > mean(b) (Welch's t-test); 1.0 when both are constant and equal."""
    if _constant(a) and _constant(b):  # no spread: the t statistic is undefined
        return 0.0 if float(a.mean()) > float(b.mean()) else 1.0
    sa = 0.0 if _constant(a) else float(a.std(ddof=1))
    sb = 0.0 if _constant(b) else float(b.std(ddof=1))
    p = float(
        stats.ttest_ind_from_stats(
            float(a.mean()),
            sa,
            a.size,
            float(b.mean()),
            sb,
            b.size,
            equal_var=False,
            alternative="greater",
        ).pvalue
    )
    return 1.0 if math.isnan(p) else p


def _constant(x: np.ndarray) -> bool:
    """All values equal, to float rounding."""
    return x.size < 2 or float(np.ptp(x)) <= 1e-9 * max(1e-12, float(np.abs(x).max()))


def _unjudged(metric: str, touched: int, reference: int, tol: Tolerances) -> Check:
    return Check(
        metric,
        False,
        False,
        None,
        None,
        None,
        None,
        f"{metric} not judged: {touched:,} touched and {reference:,} reference samples "
        f"(at least {tol.min_samples} each)",
    )
