"""Paired timing shared by the benchmark scripts.

Two things make a CPU benchmark lie: other processes (this is a shared machine) and drift (caches,
allocator, frequency). Timing each variant in its own run, or one after the other, lets either
land on one variant only: two back-to-back runs of the DiT benchmark once gave ratios 3.08 and
0.42. So every variant runs once per round, rounds alternate the order (A B, B A, ...), and a
ratio is taken per round (ours / reference of the same round) before its median. The spread of
those per-round ratios, and the load average before and after, say whether to trust it.
Peak memory is never measured here: see peak_rss.py (a fresh process per variant).
"""

import os
import statistics
import time

SPREAD_LIMIT = 10.0  # % of the median: a wider spread of paired ratios is reported as untrustworthy


def paired_times(steps, rounds, warmup=1):
    """{name: [seconds of each round]} for the callables in `steps`, run once each per round after
    `warmup` untimed calls; even rounds run them in order, odd rounds in reverse."""
    names = list(steps)
    for name in names:
        for _ in range(warmup):
            steps[name]()
    times = {name: [] for name in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            t0 = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - t0)
    return times


def spread(values):
    """(median, spread as % of the median, kind): the interquartile range from 4 values on, else min-max."""
    values = sorted(values)
    med = statistics.median(values)
    if len(values) >= 4:
        q1, _, q3 = statistics.quantiles(values, n=4)
        width, kind = q3 - q1, "IQR"
    else:
        width, kind = values[-1] - values[0], "min-max"
    return med, 100 * width / med, kind


def describe(label, values, unit="", scale=1.0, fmt=".3f"):
    """One line: median, spread and, if the spread is over SPREAD_LIMIT, a warning."""
    med, pct, kind = spread([v * scale for v in values])
    warn = f"  [spread > {SPREAD_LIMIT:g}% of the median: do not trust]" if pct > SPREAD_LIMIT else ""
    return f"{label}: {med:{fmt}}{unit} (median of {len(values)}, {kind} {pct:.1f}% of median){warn}"


def ratios(a, b):
    """Per-round ratios a[i] / b[i] of two paired time lists."""
    return [x / y for x, y in zip(a, b)]


def load():
    """The 1-minute load average now."""
    return os.getloadavg()[0]


def load_line(before, after, threads):
    """The machine's load around a measurement, flagged busy when other processes competed for it
    (load above this benchmark's own threads + 0.5) or the cores were oversubscribed."""
    cores = os.cpu_count()
    busy = max(before, after) > threads + 0.5 or max(before, after) > cores
    state = ("BUSY: other processes shared the CPU, absolute times are inflated (paired ratios less so)"
             if busy else "otherwise idle")
    return (f"load average (1 min) {before:.2f} before, {after:.2f} after, {cores} cores, "
            f"{threads} thread(s) here: {state}")
