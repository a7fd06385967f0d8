"""What the numbers were measured on: hardware, software versions, brokers' durability settings."""
from __future__ import annotations

import datetime as dt
import importlib.metadata
import os
import platform
import subprocess

import psutil

from .procs import ROOT

PACKAGES = ("kombu-pg", "kombu", "celery", "psycopg", "psycopg-pool", "redis", "amqp", "sqlalchemy")


def describe() -> dict:
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        "packages": {name: _version(name) for name in PACKAGES},
        "git": _git(),
        "pgbench": _run(["pgbench", "--version"]),
        "loadavg_at_start": os.getloadavg(),
    }


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        return None


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git() -> dict:
    commit = _run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    changed = _run(["git", "-C", str(ROOT), "status", "--porcelain", "--",
                    "kombu_pg", "celery_ext", "migrations"])
    # The transport may be measured with uncommitted changes: say so.
    return {"commit": commit, "transport_modified": bool(changed)}


def _run(cmd: list[str]) -> str | None:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None
