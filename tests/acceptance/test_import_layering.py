"""Layer contract, checked in a fresh interpreter: importing the transport loads no Celery
module (the source-level check is tests/unit/test_layering.py)."""
import subprocess
import sys


def test_importing_the_transport_loads_no_celery():
    # (celery_ext._autoload is loaded at interpreter start by the .pth file: it imports no Celery.)
    code = ("import sys, kombu_pg.transport, kombu_pg.admin, kombu_pg.cli, kombu_pg.atomic;"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'celery'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
