"""Flower against the PostgreSQL broker, read through its HTTP API: `celery flower` and a worker
sending events (-E), both subprocesses. Flower lists the worker (by remote control: inspect over
the broker's fanout) and the tasks with their states (from the events). Its broker page and
/api/queues/length know only RabbitMQ and Redis: for kombu-pg they answer 404, and queue
lengths come from `kombu-pg stats` or the Prometheus exporter instead (see the README)."""
from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request

import pytest

from conftest import HOST, console_script, wait_for

pytest.importorskip("flower")

FAILING = '''
@app.task(bind=True, max_attempts=2, backoff_base=0.1)
def fails(self, label):
    record(self, label)
    raise KeyError(label)
'''


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Flower:
    def __init__(self, procs, app):
        self.port = free_port()
        procs.env["FLOWER_UNAUTHENTICATED_API"] = "true"  # no auth configured: a loopback test
        self.proc = procs.spawn([console_script("celery"), "-A", app.name, "flower", f"--port={self.port}",
                                 "--address=127.0.0.1"], name="flower")

    def get(self, path: str):
        """(status, parsed JSON or text) of GET ``path``."""
        url = f"http://127.0.0.1:{self.port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=15) as response:
                status, body = response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            status, body = exc.code, exc.read().decode(errors="replace")
        try:
            return status, json.loads(body)
        except ValueError:
            return status, body

    def up(self) -> bool:
        assert self.proc.alive(), f"flower exited ({self.proc.popen.returncode}):\n{self.proc.log()[-3000:]}"
        try:
            return self.get("/healthcheck") == (200, "OK")
        except OSError:
            return False


@pytest.mark.slow
def test_flower_lists_the_worker_and_the_tasks_with_their_states(make_app, procs, env):
    app = make_app(extra_source=FAILING)
    procs.worker(app, extra_args=("-E",))
    flower = Flower(procs, app)
    wait_for(flower.up, 60, what="Flower to answer /healthcheck")
    # Flower's event receiver has its queue once it is bound to the events exchange.
    wait_for(lambda: any(q.startswith("celeryev.") for q in env.queue_names()), 30,
             what="Flower's event queue")

    worker = f"w1@{HOST}"
    status, workers = wait_for(lambda: (lambda r: r if worker in r[1] else None)(flower.get("/api/workers?refresh=1")),
                               30, what="Flower to list the worker")
    assert status == 200
    assert app.task_name("add") in workers[worker]["registered"]
    assert workers[worker]["stats"]["broker"]["transport"] == "postgresql"
    assert [q["name"] for q in workers[worker]["active_queues"]] == ["celery"]

    ok = app.add.delay(2, 3)
    bad = app.fails.delay("flower")
    assert ok.get(timeout=30) == 5

    def states():
        tasks = flower.get("/api/tasks")[1]
        return {task_id: tasks.get(task_id, {}).get("state") for task_id in (ok.id, bad.id)}

    wait_for(lambda: states() == {ok.id: "SUCCESS", bad.id: "FAILURE"}, 60,
             what=lambda: f"Flower to see the tasks' final states (has {states()})")
    status, info = flower.get(f"/api/task/info/{ok.id}")
    assert status == 200
    assert (info["name"], info["state"], info["worker"], info["result"]) == (app.task_name("add"), "SUCCESS", worker, "5")
    status, info = flower.get(f"/api/task/info/{bad.id}")
    assert (info["state"], info["exception"]) == ("FAILURE", "KeyError('flower')")
    assert len(env.runs("flower")) == 2  # both attempts ran; the dead letter holds both errors

    # Queue lengths: Flower asks only RabbitMQ's management API or Redis.
    status, body = flower.get("/api/queues/length")
    assert status == 404 and "'postgresql' broker is not supported" in str(body)
