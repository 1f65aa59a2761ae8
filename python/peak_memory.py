"""Peak extra memory and time of one call, measured in a fresh process: the measuring primitives
the memory benchmarks share (bench_long_context.py, bench_kl_loss.py).

Method: the child builds its inputs and warms the code up, then resets the Linux kernel's peak-RSS
counter (writing 5 to /proc/self/clear_refs resets VmHWM) and reads VmRSS; after the measured call
it reads VmHWM. Peak extra memory = VmHWM - VmRSS before the call: every page the call (and
autograd) touched above what the inputs held, whether allocated by torch or by a kernel's own
buffers. Where clear_refs is unavailable, ru_maxrss (the process's high-water mark) minus the RSS
before the call. Children run with MALLOC_MMAP_THRESHOLD_=16384, so glibc maps every block of
16 KiB or more afresh and unmaps it on free: a call's buffers cannot hide in heap pages an earlier
allocation left resident.
"""
from __future__ import annotations

import json
import os
import re
import resource
import subprocess
import sys
import time
from typing import Callable


def status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1))


def reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure(call: Callable[[], object]) -> dict:
    """Runs call() once in this process; returns wall and CPU seconds and the peak extra bytes."""
    exact = reset_peak()
    rss_before = status_kib("VmRSS")
    c0, t0 = time.process_time(), time.perf_counter()
    call()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak_kib = status_kib("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"wall_s": wall, "cpu_s": cpu, "peak_extra_bytes": (peak_kib - rss_before) * 1024,
            "rss_before_bytes": rss_before * 1024,
            "method": "VmHWM reset via clear_refs" if exact else "ru_maxrss delta"}


def spawn(script: str, *args: str) -> dict:
    """Runs `python script --child args...` in a fresh process; its last stdout line is JSON."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="16384")
    out = subprocess.run([sys.executable, os.path.abspath(script), "--child", *args],
                         capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{script} --child {' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])
