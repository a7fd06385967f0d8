"""``kombu-pg purge``: counts per queue, a confirmation, ready messages (as ``celery purge``),
delayed ones on request, leased ones only with --force."""
from __future__ import annotations

from conftest import console_script


def kombu_pg(procs, env, *args):
    return procs.run([console_script("kombu-pg"), "--url", env.url, "--schema", env.broker_schema, *args])


def counts(env, queue: str) -> dict:
    rows = env.messages(queue)
    return {"ready": sum(not r["invisible"] for r in rows),
            "delayed": sum(r["invisible"] and r["lease_token"] is None for r in rows),
            "leased": sum(r["lease_token"] is not None and r["invisible"] for r in rows)}


def publish(app, ready: int, delayed: int, queue: str = "celery") -> None:
    for i in range(ready):
        app.mark.apply_async((f"r{i}",), queue=queue)
    for i in range(delayed):
        app.mark.apply_async((f"d{i}",), countdown=3600, queue=queue)


def test_celery_purge_removes_ready_messages_only(make_app, procs, env):
    """What the README says `celery purge` does here."""
    app = make_app()
    publish(app, ready=3, delayed=2)
    out = procs.celery(app, "purge", "-f")
    assert out.returncode == 0, out.stdout + out.stderr
    assert counts(env, "celery") == {"ready": 0, "delayed": 2, "leased": 0}


def test_purge_counts_asks_and_deletes_per_queue(make_app, procs, env):
    app = make_app()
    publish(app, ready=3, delayed=2)
    publish(app, ready=1, delayed=1, queue="other")
    # One leased message: taken by a consumer that does not ack it.
    with app.app.connection_for_read() as conn:
        leased = conn.SimpleQueue("other").get(timeout=10)
        assert leased is not None
        assert counts(env, "other") == {"ready": 0, "delayed": 1, "leased": 1}

        # Without an answer (no terminal): nothing is deleted.
        out = kombu_pg(procs, env, "purge", "celery", "other")
        assert out.returncode == 1 and "nothing deleted" in out.stderr, out.stdout + out.stderr
        assert "celery" in out.stdout and "delete about 3 ready message(s)?" in out.stdout, out.stdout
        assert counts(env, "celery") == {"ready": 3, "delayed": 2, "leased": 0}

        out = kombu_pg(procs, env, "purge", "celery", "other", "--yes")
        assert out.returncode == 0, out.stdout + out.stderr
        assert "celery: deleted 3 ready" in out.stdout and "other: deleted 0 ready" in out.stdout, out.stdout
        assert counts(env, "celery") == {"ready": 0, "delayed": 2, "leased": 0}

        out = kombu_pg(procs, env, "purge", "celery", "--delayed", "--yes")
        assert out.returncode == 0 and "celery: deleted 0 ready, 2 delayed" in out.stdout, out.stdout
        assert counts(env, "celery") == {"ready": 0, "delayed": 0, "leased": 0}

        out = kombu_pg(procs, env, "purge", "other", "--leased", "--yes")
        assert out.returncode == 2 and "add --force" in out.stderr, out.stderr
        out = kombu_pg(procs, env, "purge", "other", "--leased", "--force", "--yes")
        assert out.returncode == 0 and "other: deleted 0 ready, 1 leased" in out.stdout, out.stdout
        assert counts(env, "other") == {"ready": 0, "delayed": 1, "leased": 0}
        leased.ack()  # finds nothing: no error

    out = kombu_pg(procs, env, "purge", "nosuchqueue", "--yes")
    assert out.returncode == 1 and "no queue 'nosuchqueue'" in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
