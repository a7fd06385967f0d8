"""The Celery integration installs itself whichever way an app gets its PostgreSQL broker URL:
the constructor, ``conf`` (attribute or ``update``), ``config_from_object`` (a module or an
object), ``add_defaults`` (a dict or a callable), Django settings. Each app module below uses
one way only, names neither package, and is run as a user runs it: a process that publishes,
and a worker."""
from __future__ import annotations

import json
import os
import sysconfig
import textwrap
import types
from pathlib import Path

import pytest

from conftest import INTEGRATION_LINE, PY, HOST, Worker, unique, wait_for

NOT_INSTALLED = "kombu-pg: the broker is PostgreSQL but the Celery integration is not installed"

SETTINGS = ("task_acks_late", "task_reject_on_worker_lost", "task_acks_on_failure", "task_acks_on_timeout")

MODULE = '''\
import os

import psycopg
from celery import Celery

NAME = __name__
URL = {url!r}
OPTIONS = {options!r}
RUNS = {runs!r}

{configure}


@app.task(bind=True)
def fails_once(self, label):
    """Fails on its first delivery: only a server-side retry (the integration) runs it again."""
    redelivered = bool((self.request.delivery_info or {{}}).get("redelivered"))
    with psycopg.connect(URL, autocommit=True) as conn:
        conn.execute("INSERT INTO " + RUNS + " (task_id, label, redelivered) VALUES (%s, %s, %s)",
                     (self.request.id, label, redelivered))
    if not redelivered:
        raise RuntimeError("the first attempt fails")
    return label
'''

WAYS = {
    "constructor": """
        app = Celery(NAME, broker=URL)
        app.conf.broker_transport_options = OPTIONS
    """,
    "conf_attribute": """
        app = Celery(NAME)
        app.conf.broker_url = URL
        app.conf.broker_transport_options = OPTIONS
    """,
    "conf_update": """
        app = Celery(NAME)
        app.conf.update(broker_url=URL, broker_transport_options=OPTIONS)
    """,
    "config_module": """
        app = Celery(NAME)
        app.config_from_object(NAME + "_config")
    """,
    "config_object": """
        class Config:
            broker_url = URL
            broker_transport_options = OPTIONS

        app = Celery(NAME)
        app.config_from_object(Config)
    """,
    "add_defaults_dict": """
        app = Celery(NAME)
        app.add_defaults({"broker_url": URL, "broker_transport_options": OPTIONS})
    """,
    "add_defaults_callable": """
        app = Celery(NAME)
        app.add_defaults(lambda: {"broker_url": URL, "broker_transport_options": OPTIONS})
    """,
    "django": """
        os.environ.setdefault("DJANGO_SETTINGS_MODULE", NAME + "_settings")
        app = Celery(NAME)
        app.config_from_object("django.conf:settings", namespace="CELERY")
    """,
}

# Publishes one task and prints the app's effective settings, as the publishing process sees them.
PUBLISH = """
import json, sys
module = __import__(sys.argv[1])
module.fails_once.delay(sys.argv[2])
app = module.app
print(json.dumps({"installed": getattr(app, "_kombu_pg_installed", False),
                  **{key: app.conf[key] for key in %r}}))
""" % (SETTINGS,)


def write_app(tmp_path, env, way: str) -> str:
    name = unique("kpway_")
    options = {"schema": env.broker_schema, "backoff_base": 0.2, "polling_interval": 0.2}
    source = MODULE.format(url=env.url, options=options, runs=f'"{env.app_schema}".runs',
                           configure=textwrap.dedent(WAYS[way]).strip())
    (tmp_path / f"{name}.py").write_text(source)
    if way == "config_module":
        (tmp_path / f"{name}_config.py").write_text(
            f"broker_url = {env.url!r}\nbroker_transport_options = {options!r}\n")
    if way == "django":
        (tmp_path / f"{name}_settings.py").write_text(
            f"SECRET_KEY = 'test'\nINSTALLED_APPS = []\nUSE_TZ = True\n"
            f"CELERY_BROKER_URL = {env.url!r}\nCELERY_BROKER_TRANSPORT_OPTIONS = {options!r}\n")
    return name


@pytest.mark.slow
@pytest.mark.parametrize("way", list(WAYS))
def test_integration_installs_whichever_way_the_broker_url_is_given(tmp_path, env, procs, way):
    name = write_app(tmp_path, env, way)
    worker = procs.worker(types.SimpleNamespace(name=name), pool="solo", concurrency=1)

    out = procs.run([PY, "-c", PUBLISH, name, way])
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {
        "installed": True, "task_acks_late": True, "task_reject_on_worker_lost": True,
        "task_acks_on_failure": False, "task_acks_on_timeout": False}

    # In the worker: the start-up line (at INFO), and the failed first attempt retried server-side.
    [line] = [line for line in worker.log().splitlines() if INTEGRATION_LINE in line]
    assert "INFO/" in line and "task_acks_late=True" in line, line
    assert NOT_INSTALLED not in worker.log()
    runs = env.wait_runs(2, way, timeout=30, what="the failed first attempt to be retried")
    assert [run["redelivered"] for run in runs] == [False, True]


def test_worker_without_the_integration_says_so(tmp_path, env, procs):
    """``python -S`` skips site-packages' .pth files, as an interpreter without kombu-pg in its
    site-packages would: the app names the transport class itself (the URL scheme is not
    registered either), and the worker says plainly what it runs without."""
    name = write_app(tmp_path, env, "conf_update")
    path = tmp_path / f"{name}.py"
    path.write_text(path.read_text().replace(
        "app.conf.update(", "app.conf.update(broker_transport='kombu_pg.transport:Transport', "))
    repo = Path(__file__).resolve().parents[2]
    procs.env = dict(procs.env, PYTHONPATH=os.pathsep.join(
        [str(tmp_path), sysconfig.get_paths()["purelib"], str(repo)]))
    worker = procs.spawn([PY, "-S", "-m", "celery", "-A", name, "worker", "-P", "solo", "-n", f"w1@{HOST}",
                          "-l", "INFO"], name="worker-w1", cls=Worker, hostname=f"w1@{HOST}").wait_ready()
    wait_for(lambda: NOT_INSTALLED in worker.log(), 10, what="the worker to say it lacks the integration")
    assert INTEGRATION_LINE not in worker.log()
    [line] = [line for line in worker.log().splitlines() if NOT_INSTALLED in line]
    assert "WARNING/" in line and "lease renewal, server-side retries or dead letters" in line, line
