"""Processes of the benchmarks: Python children for producers and consumers, Celery workers.

Each producer or consumer runs in a fresh spawned interpreter, so that no run inherits another
run's connections, pools or imported state, and publishing and consuming really are separate
processes. Every process started here is stopped by its PID when its block exits.
"""
from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CTX = multiprocessing.get_context("spawn")


class ChildError(RuntimeError):
    pass


def _child_main(fn, args, kwargs, conn):
    try:
        conn.send(("ok", fn(*args, **kwargs)))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


class Child:
    """``fn(*args, **kwargs)`` in a spawned process; :meth:`result` waits for its return value."""

    def __init__(self, fn, *args, **kwargs):
        self._conn, child_conn = CTX.Pipe(duplex=False)
        self.process = CTX.Process(target=_child_main, args=(fn, args, kwargs, child_conn), daemon=True)
        self.process.start()
        child_conn.close()

    def result(self, timeout: float):
        if not self._conn.poll(timeout):
            raise TimeoutError(f"child {self.process.pid} gave no result within {timeout:.0f}s")
        try:
            status, value = self._conn.recv()
        except EOFError:
            self.process.join(1)
            raise ChildError(f"child {self.process.pid} died (exit code {self.process.exitcode})") from None
        if status == "error":
            raise ChildError(value)
        return value

    def stop(self):
        self.process.join(0.5)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()


@contextlib.contextmanager
def child(fn, *args, **kwargs):
    proc = Child(fn, *args, **kwargs)
    try:
        yield proc
    finally:
        proc.stop()


def call(fn, *args, timeout: float, **kwargs):
    """Run ``fn`` in a child process and return its result."""
    with child(fn, *args, **kwargs) as proc:
        return proc.result(timeout)


def wait_for(predicate, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


class Worker:
    """A ``celery worker`` subprocess for the app in bench/celery_app.py; see :func:`worker`."""

    def __init__(self, proc: subprocess.Popen, workdir: Path):
        self.proc = proc
        self.pid = proc.pid
        self.ready_file = workdir / "ready"
        self.done_file = workdir / "done"
        self.recv_file = workdir / "received"
        self.log = workdir / "worker.log"

    def wait_ready(self, timeout: float = 60):
        def ready():
            if self.proc.poll() is not None:
                raise ChildError(f"celery worker exited with {self.proc.returncode}:\n{self.log_tail()}")
            return self.ready_file.exists()
        wait_for(ready, timeout, "the celery worker to be ready", interval=0.1)

    def started(self) -> int:
        """Tasks started so far (records in the done file); raises if the worker has exited."""
        # Imported here: the Kombu-only children import this module and must not load Celery.
        from .celery_app import count_records

        if self.proc.poll() is not None:
            raise ChildError(f"celery worker exited with {self.proc.returncode}:\n{self.log_tail()}")
        return count_records(self.done_file)

    def wait_started(self, count: int, timeout: float) -> None:
        wait_for(lambda: self.started() >= count, timeout, f"{count} tasks to start")

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@contextlib.contextmanager
def worker(endpoint, queue: str, pool: str, concurrency: int, workdir: Path, name: str):
    """Start a Celery worker consuming ``queue``; stopped (SIGTERM, then SIGKILL) on exit."""
    workdir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ,
               BENCH_BROKER_URL=endpoint.url,
               BENCH_TRANSPORT_OPTIONS=json.dumps(endpoint.transport_options),
               BENCH_QUEUE=queue,
               BENCH_WORKDIR=str(workdir))
    cmd = [sys.executable, "-m", "celery", "-A", "bench.celery_app", "worker",
           "-P", pool, "-c", str(concurrency), "-Q", queue, "-n", f"{name}@%h",
           # Cluster chatter is off for every broker: it would only add noise.
           "--without-mingle", "--without-gossip", "--without-heartbeat", "-l", "WARNING"]
    with open(workdir / "worker.log", "wb") as log:
        # Own session, so that the pool's children can be killed with the worker's group.
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield Worker(proc, workdir)
    finally:
        stop(proc)


def stop(proc: subprocess.Popen, grace: float = 15) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # warm shutdown: unacked messages go back
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # the worker (if stuck) and any leftover pool child
    proc.wait()
