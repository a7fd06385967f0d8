"""The kombu-pg demo: a Celery worker and beat on PostgreSQL, end to end.

    python3 dev.py demo          # from the repository root; or, inside the venv:
    python examples/demo.py

Uses the database in KOMBU_PG_URL if set, else starts a throw-away embedded PostgreSQL
server. Starts `celery worker` and `celery beat` (see app.py) as child processes, sends
tasks through the broker, prints the results, then stops everything it started. Exits
0 when every step worked, 130 when interrupted (Ctrl-C, SIGTERM or SIGHUP, all of which
stop what was started), 1 (with the end of the worker and beat logs) otherwise.
"""
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from kombu.utils.url import maybe_sanitize_url

HERE = Path(__file__).resolve().parent
TIME_LIMIT = 45.0  # seconds for all the steps; a healthy run takes about 15
STOP_TIMEOUT = 10.0  # seconds a child gets to shut down before it is killed


class DemoFailed(Exception):
    pass


class Children:
    """The celery processes we started, each in its own process group.

    Own process groups: a Ctrl-C in the terminal reaches only this script, which then
    stops the children in order (a worker first finishes or returns its messages),
    rather than every process getting the signal at once.
    """

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.procs = {}  # name -> Popen
        self.stopped = False

    def start(self, name: str, *celery_args: str) -> subprocess.Popen:
        with open(self.log_dir / f"{name}.log", "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "app", *celery_args],
                cwd=HERE, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.procs[name] = proc
        return proc

    def check_running(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise DemoFailed(f"celery {name} exited early with code {proc.returncode}")

    def stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        # SIGTERM is Celery's warm shutdown: the worker stops consuming, waits for
        # running tasks and gives unstarted messages back to the broker.
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + STOP_TIMEOUT
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            # The group id is the PID of the process we started: this reaches its pool
            # processes, and nothing else, should any be left.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def print_logs(self, lines: int = 25) -> None:
        for name in self.procs:
            text = (self.log_dir / f"{name}.log").read_text(errors="replace").splitlines()
            print(f"\n--- last {lines} lines of the celery {name} log ---", file=sys.stderr)
            print("\n".join(text[-lines:]), file=sys.stderr)


def run_steps(libpq_url: str, children: Children, first_result_id: int) -> None:
    # Imported here: app.py reads KOMBU_PG_URL at import time.
    from celery import chain, chord, group
    from celery.exceptions import TimeoutError as ResultTimeout

    import app as demo_app
    from app import add, slow, sum_of_squares, tsum

    celery_app = demo_app.app
    deadline = time.monotonic() + TIME_LIMIT

    def remaining() -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise DemoFailed(f"timed out: the demo did not finish within {TIME_LIMIT:.0f}s")
        return left

    def wait(result):
        # Short waits in a loop, so a crashed worker is reported at once rather than
        # after the whole time limit.
        while True:
            children.check_running()
            try:
                return result.get(timeout=min(1.0, remaining()))
            except ResultTimeout:
                pass

    def show(label, value):
        print(f"  {label:<44} -> {value}", flush=True)

    print("Waiting for the worker (a broadcast ping, answered through the broker) ...", flush=True)
    started = time.monotonic()
    while True:
        children.check_running()
        replies = celery_app.control.ping(timeout=min(1.0, remaining()), limit=1)
        if replies:
            worker = next(iter(replies[0]))
            print(f"  {worker} answered after {time.monotonic() - started:.1f}s", flush=True)
            break

    print("Tasks:", flush=True)
    show("add.delay(2, 3)", wait(add.delay(2, 3)))
    show("chain(add(1, 2), add(3), add(4))", wait(chain(add.s(1, 2), add.s(3), add.s(4))()))
    show("group(add(i, i) for i in range(5))", wait(group(add.s(i, i) for i in range(5))()))
    show("chord(add(i, i) for i in range(5))(tsum)",
         wait(chord(add.s(i, i) for i in range(5))(tsum.s())))
    show("sum_of_squares.delay(5)  (fans out a chord)", wait(sum_of_squares.delay(5)))

    sent = time.monotonic()
    value = wait(add.apply_async((20, 22), countdown=2))
    show("add.apply_async((20, 22), countdown=2)",
         f"{value} after {time.monotonic() - sent:.1f}s (held back by the broker until due)")

    # While a slow task runs, ask the worker what it is doing: `celery inspect active`.
    running = slow.delay(3)
    while True:
        children.check_running()
        active = celery_app.control.inspect(timeout=min(1.0, remaining()), limit=1).active() or {}
        names = [task["name"] for tasks in active.values() for task in tasks]
        if "app.slow" in names:
            show("slow.delay(3), seen by inspect().active()", names)
            break
        time.sleep(0.2)
    show("slow.delay(3)", wait(running))

    # Beat sends app.tick every second; count the runs recorded by the result backend.
    ticks = 0
    while ticks < 3:
        children.check_running()
        remaining()
        ticks = count_ticks(libpq_url, first_result_id)
        if ticks < 3:
            time.sleep(0.5)
    print(f"Beat: {ticks} ticks of app.tick ran so far (one a second)", flush=True)


def last_result_id(libpq_url: str) -> int:
    """The newest row of the result backend's table, so that runs of earlier demos against
    the same database are not counted."""
    import psycopg

    try:
        conn = psycopg.connect(libpq_url, connect_timeout=5)
    except psycopg.OperationalError as exc:
        raise DemoFailed(f"cannot connect to the database: {exc}") from None
    with conn:
        if not conn.execute("SELECT to_regclass('celery_taskmeta') IS NOT NULL").fetchone()[0]:
            return 0  # the backend creates its tables when it stores the first result
        return conn.execute("SELECT coalesce(max(id), 0) FROM celery_taskmeta").fetchone()[0]


def count_ticks(libpq_url: str, after_id: int) -> int:
    import psycopg

    with psycopg.connect(libpq_url, connect_timeout=5) as conn:
        if not conn.execute("SELECT to_regclass('celery_taskmeta') IS NOT NULL").fetchone()[0]:
            return 0
        return conn.execute(
            "SELECT count(*) FROM celery_taskmeta"
            " WHERE id > %s AND name = 'app.tick' AND status = 'SUCCESS'", (after_id,)
        ).fetchone()[0]


#: Signals that stop the demo the way Ctrl-C does: SIGTERM, and SIGHUP (its terminal closed).
STOP_SIGNALS = [signal.SIGTERM] + ([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # cleans up like Ctrl-C


def main() -> int:
    for signum in STOP_SIGNALS:
        signal.signal(signum, _interrupt)
    children = None
    # The stack unwinds in reverse: children stop first, then the server, then the
    # temporary directory (logs, beat's schedule file) is deleted.
    with contextlib.ExitStack() as stack:
        try:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="kombu-pg-demo-")))
            url = os.environ.get("KOMBU_PG_URL")
            if url:
                print(f"Broker: {maybe_sanitize_url(url)} (from KOMBU_PG_URL)", flush=True)
            else:
                from kombu_pg import embedded

                print("Starting an embedded PostgreSQL server ...", flush=True)
                url = stack.enter_context(embedded.start()).url
                print(f"Broker: {url}", flush=True)
            os.environ["KOMBU_PG_URL"] = url  # for app.py, here and in the children
            libpq_url = "postgresql://" + url.split("://", 1)[1]  # libpq knows no pg://
            first_result_id = last_result_id(libpq_url)

            children = Children(tmp)
            stack.callback(children.stop)
            worker = children.start("worker", "worker", "--pool", "prefork", "--concurrency", "2",
                                    "--hostname", "demo@%h", "--loglevel", "INFO")
            beat = children.start("beat", "beat", "--schedule", str(tmp / "beat-schedule"),
                                  "--loglevel", "INFO")
            print(f"Started celery worker (pid {worker.pid}) and celery beat (pid {beat.pid})",
                  flush=True)

            run_steps(libpq_url, children, first_result_id)
            print("Stopping everything the demo started ...", flush=True)
            code = 0
        except KeyboardInterrupt:
            print("\nInterrupted; stopping everything that was started ...", file=sys.stderr)
            code = 130
        except Exception as exc:
            if isinstance(exc, DemoFailed):
                print(f"\nDemo failed: {exc}", file=sys.stderr)
            else:
                print("\nDemo failed:", file=sys.stderr)
                traceback.print_exc()
            if children is not None:
                children.stop()  # so that their logs are complete
                children.print_logs()
            code = 1
        finally:
            # Stopping is bounded in time; a second Ctrl-C must not cut it short and
            # leave processes behind.
            for signum in [signal.SIGINT, *STOP_SIGNALS]:
                signal.signal(signum, signal.SIG_IGN)
    if code == 0:
        print("Demo finished.")
    return code


if __name__ == "__main__":
    sys.exit(main())
