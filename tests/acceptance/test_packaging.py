"""What a fresh checkout and the built distributions offer a new user: `python3 dev.py --help`,
an sdist without the benchmark's generated files, a wheel that registers the pytest plugin."""
from __future__ import annotations

import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_dev_py_help_exits_0_with_the_usage(flag):
    out = subprocess.run([sys.executable, str(ROOT / "dev.py"), flag], capture_output=True, text=True,
                         timeout=60, stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: python3 dev.py demo | python3 dev.py test"), out.stdout


def test_dev_py_without_a_command_still_fails_with_the_usage():
    out = subprocess.run([sys.executable, str(ROOT / "dev.py"), "nonsense"], capture_output=True, text=True,
                         timeout=60, stdin=subprocess.DEVNULL)
    assert out.returncode == 1 and "usage: python3 dev.py" in out.stderr


def build(target: str, out_dir: Path) -> Path:
    pytest.importorskip("hatchling")
    result = subprocess.run([sys.executable, "-m", "hatchling", "build", "-t", target, "-d", str(out_dir)],
                            cwd=ROOT, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stdout + result.stderr
    [artifact] = out_dir.iterdir()
    return artifact


def test_sdist_has_the_code_and_not_the_benchmark_results(tmp_path):
    with tarfile.open(build("sdist", tmp_path)) as sdist:
        names = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
    assert {"kombu_pg/transport.py", "migrations/0001_core.sql", "bench/run.py", "README.md"} <= names
    assert not [n for n in names if n.startswith("bench/") and n.endswith((".png", ".json"))], sorted(names)


def test_wheel_registers_the_pytest_plugin_and_offers_the_result_backend_extra(tmp_path):
    with zipfile.ZipFile(build("wheel", tmp_path)) as wheel:
        def read(suffix):
            [name] = [n for n in wheel.namelist() if n.endswith(suffix)]
            return wheel.read(name).decode()

        entry_points, metadata = read(".dist-info/entry_points.txt"), read(".dist-info/METADATA")
        names = wheel.namelist()
    assert "[pytest11]\nkombu_pg = kombu_pg.testing.pytest_plugin" in entry_points, entry_points
    assert {"kombu_pg/testing/pytest_plugin.py", "celery_ext/testing.py"} <= set(names)
    # PEP 561: type checkers of the users' code read the packages' hints.
    assert {"kombu_pg/py.typed", "celery_ext/py.typed"} <= set(names)
    # The README's result backend needs SQLAlchemy: it says so, and the extra it names exists.
    assert "Requires-Dist: sqlalchemy>=2.0; extra == 'results'" in metadata
    readme = (ROOT / "README.md").read_text()
    backend = readme.index('result_backend = "db+postgresql+psycopg://')
    assert "pip install 'kombu-pg[results]'" in readme[backend:backend + 300]
