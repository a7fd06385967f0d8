"""Layer contract: the transport (kombu_pg) never imports Celery; only celery_ext does."""
import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "kombu_pg"


def test_no_module_of_kombu_pg_imports_celery():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            offenders += [f"{path.relative_to(PACKAGE)}: {name}" for name in names
                          if name.split(".")[0] in ("celery", "celery_ext")]
    assert offenders == []


def test_importing_the_transport_loads_no_celery():
    # (celery_ext._autoload is loaded at interpreter start by the .pth file: it imports no Celery.)
    code = ("import sys, kombu_pg.transport, kombu_pg.admin, kombu_pg.cli, kombu_pg.atomic;"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'celery'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
