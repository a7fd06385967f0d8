from conftest import wait_for

PATCH = '''
from kombu_pg.transport import Transport
_orig_on_due = Transport._on_due
def _on_due(self, queue):
    _orig_on_due(self, queue)
    if self._hub is not None and self._ready:
        self.deliver_ready()   # inside Hub.fire_timers: Celery's ETA entry fires in the same pass
Transport._on_due = _on_due
'''

import pytest
@pytest.mark.parametrize("patched", [False, True])
def test_probe(make_app, procs, env, patched):
    app = make_app(visibility_timeout=30, extra_source=PATCH if patched else "")
    procs.worker(app, pool="prefork", concurrency=1)
    out = []
    for i in range(5):
        app.mark.apply_async((f"x{i}",), countdown=2)
        [row] = wait_for(lambda: env.messages("celery"), 5, interval=0.01)
        due = row["visible_at"]
        leased = wait_for(lambda: [r for r in env.messages("celery") if r["lease_token"]], 10, interval=0.01)
        claimed = leased[0]["visible_at"].timestamp() - 30
        [run] = env.wait_runs(i + 1)[-1:]
        out.append((round(claimed - due.timestamp(), 3), round(run["started_at"].timestamp() - claimed, 3)))
        env.wait_count("celery", 0)
    print(f"\nPATCHED={patched} LATE BY (claim-due, start-claim)", out)
    assert 0
