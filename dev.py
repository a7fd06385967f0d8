#!/usr/bin/env python3
"""Run the demo or the tests from a fresh checkout, with nothing but Python 3.11+.

    python3 dev.py demo                  # examples/demo.py: a worker, beat and a few tasks
    python3 dev.py test [pytest args]    # the test suite: every ring
    python3 dev.py test tests/unit       # the unit ring alone: no database, a few seconds
    python3 dev.py test tests/integration tests/acceptance -x    # any pytest arguments

The tests come in three rings: tests/unit (pure logic), tests/integration (a real
PostgreSQL, in-process) and tests/acceptance (Celery workers, beat, the CLI and servers of
their own, as subprocesses). The whole suite is spread over the machine's cores with
pytest-xdist; the unit ring alone runs in a single process.

The first run creates .venv/ in the repository and installs the project into it
(editable, with the 'dev' extras); later runs reuse it and reinstall only when
pyproject.toml changed. Tests use the server in KOMBU_PG_TEST_URL when set, otherwise
an embedded throw-away PostgreSQL server.
"""
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
STAMP = VENV / ".kombu-pg-installed"
PYTHON = VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
USAGE = "usage: python3 dev.py demo | python3 dev.py test [pytest args...]"


def install_fingerprint() -> str:
    # What the installed venv depends on: the declared dependencies and where the
    # checkout lives (an editable install points at it).
    h = hashlib.sha256((ROOT / "pyproject.toml").read_bytes())
    h.update(str(ROOT).encode())
    return h.hexdigest()


def ensure_venv() -> None:
    if not PYTHON.exists():
        print(f"dev.py: creating {VENV.relative_to(ROOT)}/ ...", flush=True)
        try:
            venv.EnvBuilder(with_pip=True).create(VENV)
        except Exception as exc:
            shutil.rmtree(VENV, ignore_errors=True)  # a half-made venv would be reused
            # Debian/Ubuntu ship ensurepip separately from python3.
            sys.exit(f"dev.py: could not create the virtualenv ({exc}).\n"
                     "On Debian/Ubuntu: sudo apt install python3-venv")
    fingerprint = install_fingerprint()
    if STAMP.exists() and STAMP.read_text() == fingerprint:
        return  # up to date: stay quiet
    print("dev.py: installing kombu-pg and its dev dependencies into .venv/ "
          "(the first time takes a minute) ...", flush=True)
    pip = [str(PYTHON), "-m", "pip", "--disable-pip-version-check"]
    # cwd=ROOT: pip resolves '.' against it.
    if subprocess.call([*pip, "install", "--quiet", "-e", ".[dev]"], cwd=ROOT) != 0:
        STAMP.unlink(missing_ok=True)
        sys.exit("dev.py: pip install failed (see above)")
    STAMP.write_text(fingerprint)


def run(cmd: list) -> int:
    """Run ``cmd`` to completion and return its exit code.

    Ctrl-C reaches the child too (same process group), so we keep waiting while it
    shuts down cleanly instead of abandoning it (a third Ctrl-C kills it); a SIGTERM
    sent to us is passed on.
    """
    child = subprocess.Popen(cmd, cwd=ROOT)
    signal.signal(signal.SIGTERM, lambda *_: child.terminate())
    interrupts = 0
    while True:
        try:
            return child.wait()
        except KeyboardInterrupt:
            interrupts += 1
            if interrupts >= 3:
                child.kill()


def unit_only(args: list) -> bool:
    """Whether the arguments name test paths and all of them lie in the unit ring."""
    paths = [ROOT / a.split("::")[0] for a in args if not a.startswith("-")]  # pytest runs in ROOT
    paths = [p.resolve() for p in paths if p.exists()]
    return bool(paths) and all(p.is_relative_to(ROOT / "tests" / "unit") for p in paths)


def parallel(args: list) -> list:
    """Spread the tests over the machine's cores (at most 4: each test process runs its own
    PostgreSQL server and Celery workers), unless the arguments say otherwise or name only
    unit tests (starting the xdist workers would take longer than those tests).

    worksteal: an idle xdist worker takes queued tests from a busy one, so that a few slow
    acceptance tests do not leave a core idle at the end of the run."""
    if any(a.startswith(("-n", "--numprocesses", "--dist")) or a == "no:xdist" for a in args):
        return []
    if unit_only(args):
        return []
    return ["--numprocesses=auto", "--maxprocesses=4", "--dist=worksteal"]


def main(argv: list) -> int:
    if sys.version_info < (3, 11):
        sys.exit(f"dev.py: Python 3.11 or newer is needed, this is {sys.version.split()[0]}")
    if argv and argv[0] in ("-h", "--help", "help"):
        print(USAGE + "\n\n" + __doc__.split("\n\n", 1)[1].rstrip())
        return 0
    if not argv or argv[0] not in ("demo", "test"):
        sys.exit(USAGE)
    ensure_venv()
    if argv[0] == "demo":
        if len(argv) > 1:
            sys.exit(USAGE)
        code = run([str(PYTHON), "examples/demo.py"])
    else:
        code = run([str(PYTHON), "-m", "pytest", *parallel(argv[1:]), *argv[1:]])
        if code == 5:  # pytest: no tests were collected
            print("dev.py: pytest collected no tests; treating that as a failure", file=sys.stderr)
            return 1
    # A child killed by a signal has a negative code; report it the way a shell does.
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
