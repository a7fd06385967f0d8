"""The table of Celery and Kombu patches (celery_ext/patches.py) against the installed versions."""
from __future__ import annotations

import json
import subprocess
import sys

import celery
import kombu

from celery_ext import patches

# Run in a fresh interpreter: the green pools' modules import gevent and eventlet, and the
# patches stay for the life of the process.
PROBE = r"""
import importlib, json, sys
import celery_ext.patches as p

p.apply(p.INSTALL)
p.apply(p.WORKER_METRICS)
for pool in ("gevent", "eventlet"):  # their patches wait for the pool's module
    importlib.import_module(f"celery.concurrency.{pool}")


def state():
    out = {}
    for patch in p.PATCHES:
        value = p.resolve(patch.target)
        marked = any(getattr(value, m, False) is True for m in ("_kombu_pg", "_kombu_pg_metrics"))
        out[patch.target] = [id(value), marked]
    return out


first = state()
for when in (p.START, p.INSTALL, p.WORKER_METRICS):
    p.apply(when)
import kombu_pg._autoload, kombu.transport
kombu_pg._autoload.register(kombu.transport)
print(json.dumps({"first": first, "again": state()}))
"""


def _probe() -> dict:
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", PROBE], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_table_was_checked_against_the_installed_celery_and_kombu():
    checked = patches.CHECKED.rsplit(".", 1)[0]
    for name, version in (("celery", celery.__version__), ("kombu", kombu.__version__)):
        assert version.rsplit(".", 1)[0] == checked, (
            f"{name} {version}: check every target of celery_ext/patches.py against it (what the "
            f"wrapped code does now, not only that it exists), then set CHECKED")


def test_every_target_exists_is_patched_and_applying_again_changes_nothing():
    result = _probe()  # a target that is gone fails in resolve(), in the probe
    first, again = result["first"], result["again"]
    assert set(first) == {patch.target for patch in patches.PATCHES}
    unmarked = {target for target, (_, marked) in first.items() if not marked}
    # Transport aliases and a set are values, not wrappers; Request.on_success is wrapped in
    # the subclasses create_request_cls makes.
    assert unmarked == {t for t in first if "TRANSPORT_ALIASES" in t or t.endswith(
        (".compatible_transports", "Request.on_success"))}
    assert again == first


def test_every_owner_is_a_function_of_celery_ext_or_kombu_pg():
    for patch in patches.PATCHES:
        assert patch.owner.split(".")[0] in ("celery_ext", "kombu_pg"), patch
        assert callable(patches.resolve(patch.owner)), patch
        assert patch.when in (patches.START, patches.INSTALL, patches.WORKER_METRICS), patch
        assert patch.why, patch
