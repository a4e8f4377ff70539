"""The host's memory as a process here can use it: /proc/meminfo capped by the cgroup limit (doctor reports it,
serving sizes its KV cache from it)."""

from __future__ import annotations

import os
import re


def read_text(path: str) -> str | None:
    """A small system file's text, or None when it cannot be read."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return None


def host_memory() -> tuple[int | None, int | None]:
    """(total, available) host bytes, capped by the cgroup limit: notebooks and containers see the host's
    /proc/meminfo but are killed at their own limit."""
    meminfo = read_text("/proc/meminfo") or ""
    values = {m.group(1): int(m.group(2)) * 1024 for m in re.finditer(r"^(\w+):\s+(\d+) kB", meminfo, re.MULTILINE)}
    total, available = values.get("MemTotal"), values.get("MemAvailable")
    if total is None and hasattr(os, "sysconf"):
        try:
            total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            total = None
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        limit = (read_text(limit_file) or "").strip()
        if limit.isdigit() and total and int(limit) < total:
            usage = (read_text(usage_file) or "").strip()
            total = int(limit)
            cgroup_available = total - int(usage) if usage.isdigit() else None
            if cgroup_available is not None:
                available = min(available, cgroup_available) if available is not None else cgroup_available
            break
    return total, available
