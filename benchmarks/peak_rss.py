"""Peak-memory measurement shared by the benchmark scripts (Linux /proc, CPU runs).

A benchmark re-runs itself with `--rss-of=VARIANT` in a fresh interpreter (`rss_child`); the child
warms up, resets the high-water mark and prints the peak RSS growth of one more step
(`print_step_growth`). glibc is told to mmap large blocks and unmap them on free, so RSS follows
live tensor memory instead of the allocator's cache.
"""

import os
import subprocess
import sys


def proc_status_bytes(field):
    """A /proc/self/status field (VmRSS, VmHWM, ...) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def print_step_growth(step):
    """In the child: reset VmHWM, run `step()` once, print its peak RSS growth in bytes."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = proc_status_bytes("VmRSS")
    step()
    print(proc_status_bytes("VmHWM") - base)


def rss_child(script, variant, flags):
    """Peak RSS growth (bytes) of one warm step of `variant`, measured by `script` in a fresh interpreter."""
    cmd = [sys.executable, os.path.abspath(script), f"--rss-of={variant}", *flags]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return int(out.strip().splitlines()[-1])
