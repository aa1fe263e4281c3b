"""How many CPU threads torch uses in one command, and a warning when cores are shared.

Two torch processes whose threads share cores slow each other down far more than the
share suggests (measured on a 2-core machine: 67 s instead of 5.4 s for a short run; with
one thread each, 6.1 s), because idle OpenMP threads spin while they wait. So every
command that runs torch takes ``--threads``; the default is ``OMP_NUM_THREADS`` when set,
else the cores this process may use divided by the torchrun processes on this machine,
and a command warns when other work already keeps cores busy.
"""

from __future__ import annotations

import os
import time


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_threads() -> int:
    """``OMP_NUM_THREADS`` when set, else the cores this process may use, split evenly among
    torchrun's local processes."""
    configured = os.environ.get("OMP_NUM_THREADS", "")
    if configured.isdigit() and int(configured) > 0:
        return int(configured)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(1, usable_cores() // max(1, local_world))


def _cpu_times() -> tuple[int, int] | None:
    try:
        with open("/proc/stat") as stat:
            fields = stat.readline().split()[1:]
    except OSError:
        return None
    values = [int(v) for v in fields]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    return sum(values), idle


def busy_cores(seconds: float = 0.1) -> float | None:
    """Cores kept busy by other work over a short sample (None where it cannot be read)."""
    first = _cpu_times()
    if first is None:
        return None
    time.sleep(seconds)
    second = _cpu_times()
    total, idle = second[0] - first[0], second[1] - first[1]
    if total <= 0:
        return None
    return (os.cpu_count() or 1) * (1 - idle / total)


def use_threads(threads: int | None) -> tuple[int, str | None]:
    """Set torch's thread count (``None``: the default) and say when it shares cores."""
    import torch

    from compress.errors import CompressError

    if threads is not None and threads < 1:
        raise CompressError(f"--threads must be at least 1, got {threads}")
    chosen = threads or default_threads()
    torch.set_num_threads(chosen)
    busy = busy_cores()
    free = usable_cores() - (busy or 0.0)
    if busy is not None and busy >= 0.75 and chosen > max(1, round(free)):
        advice = f"pass --threads {max(1, round(free))} (or wait)" if threads is None else \
            f"--threads {max(1, round(free))} may be faster while they are (or wait)"
        return chosen, (f"about {busy:.1f} of the {usable_cores()} cores are busy with other "
                        f"work and torch uses {chosen} thread(s); threads that share cores "
                        f"slow each other down many times over: {advice}")
    return chosen, None
