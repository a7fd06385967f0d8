"""The README's demo command works on a machine with no PostgreSQL configured: the demo starts
an embedded server, a worker and beat, runs its tasks, and cleans up after itself."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_demo_runs_on_an_embedded_server(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KOMBU_PG", "PG"))}
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "demo.py")], cwd=tmp_path, env=env,
                            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=170)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
