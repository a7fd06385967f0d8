"""Layer contract: the transport (kombu_pg) never imports Celery; only celery_ext does.

That importing the transport loads no Celery module needs a fresh interpreter:
tests/acceptance/test_import_layering.py."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "kombu_pg"


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
