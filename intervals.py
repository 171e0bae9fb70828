"""Means with 95% Student t intervals and Welch intervals of differences: the numbers of the
evaluation report (eval.py prints them, report.py renders them). A component: imports nothing
of the repository.
"""

import math

import numpy as np


# two-sided 95% Student t quantiles for 1..30 degrees of freedom; 1.96 beyond
_T95 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
        2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
        2.045, 2.042]


def t95(df):
    if df < 1:
        return float("nan")
    return _T95[int(df) - 1] if df <= 30 else 1.96


def mean_ci(values):
    """(n, mean, half-width of the 95% t interval) of a list of floats."""
    x = np.asarray(values, dtype=np.float64)
    n = len(x)
    if n == 0:
        return 0, float("nan"), float("nan")
    if n == 1:
        return 1, float(x[0]), float("nan")
    return n, float(x.mean()), t95(n - 1) * float(x.std(ddof=1)) / math.sqrt(n)


def delta_ci(a, b):
    """Difference of means a - b with a Welch 95% interval (Welch-Satterthwaite degrees of freedom)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if len(a) < 2 or len(b) < 2:
        return float(a.mean() - b.mean()) if len(a) and len(b) else float("nan"), float("nan")
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se = math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1)) if se > 0 else len(a) + len(b) - 2
    return float(a.mean() - b.mean()), t95(max(1, math.floor(df))) * se


def summarize(samples, table):
    """{metric: {variant: (n, mean, ci)}} over the samples of each variant."""
    variants = sorted({s["variant"] for s in samples})
    out = {}
    for metric, values in table.items():
        out[metric] = {}
        for v in variants:
            vals = [values[s["id"]] for s in samples if s["variant"] == v and s["id"] in values]
            out[metric][v] = mean_ci(vals)
    return out


def format_ci(mean, ci):
    """`mean ± ci` with 3 decimals (the mean alone without an interval, – without a mean)."""
    if not math.isfinite(mean):
        return "–"
    return f"{mean:.3f} ± {ci:.3f}" if math.isfinite(ci) else f"{mean:.3f}"
