"""The README's demo command works on a machine with no PostgreSQL configured: the demo starts
an embedded server, a worker and beat, runs its tasks, and cleans up after itself, also when
it is interrupted."""
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_demo_runs_on_an_embedded_server(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KOMBU_PG", "PG"))}
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "demo.py")], cwd=tmp_path, env=env,
                            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=170)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has stopped; its parent has not reaped it yet


def _pids_using(path: str) -> list[int]:
    """Processes whose command line names ``path`` (the embedded server's data directory)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if path in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(signal, "SIGHUP") or not Path("/proc").is_dir(), reason="POSIX with /proc")
def test_sighup_stops_everything_the_demo_started(tmp_path):
    """Closing the demo's terminal (SIGHUP) stops the worker, beat and the embedded server."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KOMBU_PG", "PG"))}
    env["PYTHONUNBUFFERED"] = "1"
    out = tmp_path / "demo.out"
    with open(out, "wb") as log:
        demo = subprocess.Popen([sys.executable, str(ROOT / "examples" / "demo.py")], cwd=tmp_path, env=env,
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    started, data_dir = [], None
    try:
        deadline = time.monotonic() + 120
        while not started:
            text = out.read_text(errors="replace")
            data_dir = data_dir or next(iter(re.findall(r"Broker: \S*host=(/\S*?kombu-pg-[^/\s&]+)", text)), None)
            match = re.search(r"celery worker \(pid (\d+)\) and celery beat \(pid (\d+)\)", text)
            if match:
                started = [int(match.group(1)), int(match.group(2))]
            assert demo.poll() is None, f"the demo exited early ({demo.returncode}):\n{text[-3000:]}"
            assert time.monotonic() < deadline, f"the demo did not start its children:\n{text[-3000:]}"
            time.sleep(0.2)
        assert data_dir, out.read_text()
        assert all(map(_alive, started)) and _pids_using(data_dir)

        os.kill(demo.pid, signal.SIGHUP)
        assert demo.wait(timeout=60) == 130, out.read_text()[-3000:]
        assert [pid for pid in started if _alive(pid)] == [], out.read_text()[-3000:]
        assert [pid for pid in _pids_using(data_dir) if _alive(pid)] == []
        assert not Path(data_dir).exists()
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGKILL)
            demo.wait(timeout=10)
        for pid in started:  # each started in its own process group, led by itself
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
