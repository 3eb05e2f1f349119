"""CPU seconds, RSS and open file descriptors of one process, from /proc (psutil elsewhere)."""

from __future__ import annotations

import os

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _psutil(pid: int):  # type: ignore[no-untyped-def]
    try:
        import psutil
    except ImportError:
        return None
    try:
        return psutil.Process(pid)
    except psutil.Error:
        return None


def cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU seconds the process has used so far (children not included)."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        proc = _psutil(pid)
        if proc is None:
            return None
        times = proc.cpu_times()
        return float(times.user + times.system)
    # The command name (field 2) may contain spaces: split after its closing parenthesis.
    fields = stat[stat.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def rss_bytes(pid: int | None) -> int | None:
    """Resident set size (VmRSS)."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        proc = _psutil(pid)
        return int(proc.memory_info().rss) if proc is not None else None
    return None


def open_fds(pid: int | None) -> int | None:
    if pid is None:
        return None
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        proc = _psutil(pid)
        try:
            return int(proc.num_fds()) if proc is not None else None
        except Exception:
            return None


def machine_cpu() -> float | None:
    """CPU seconds all cores have been busy so far (everything but idle and iowait)."""
    try:
        with open("/proc/stat", "rb") as f:
            fields = f.readline().split()[1:]
    except OSError:
        try:
            import psutil
        except ImportError:
            return None
        times = psutil.cpu_times()
        return float(sum(times) - times.idle - getattr(times, "iowait", 0.0))
    ticks = [int(v) for v in fields[:8]]  # user nice system idle iowait irq softirq steal
    return (sum(ticks) - ticks[3] - ticks[4]) / _TICKS
