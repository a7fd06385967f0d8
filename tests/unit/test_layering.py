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


def _imports(path: Path, module: str, package: bool, known: set[str]) -> set[str]:
    """The modules of ``known`` that ``module`` (at ``path``) imports, at any depth of its code
    (imports inside functions count: they close a circle at run time just the same)."""
    found = set()
    base = module.split(".") if package else module.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            parent = ".".join(base[:len(base) - node.level + 1]) if node.level else ""
            stem = ".".join(filter(None, [parent, node.module or ""]))
            candidates = [stem, *(f"{stem}.{alias.name}" for alias in node.names)]
        else:
            continue
        for name in candidates:
            while name and name not in known:  # a.b.c -> a.b, the nearest module that exists
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


def test_the_import_graph_of_kombu_pg_and_celery_ext_has_no_cycles():
    root = PACKAGE.parent
    paths = {}
    for package in ("kombu_pg", "celery_ext"):
        for path in (root / package).rglob("*.py"):
            parts = path.relative_to(root).with_suffix("").parts
            paths[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {module: _imports(path, module, path.name == "__init__.py", set(paths))
             for module, path in paths.items()}
    # A package's __init__ runs when any of its modules is imported: a module importing its own
    # package (``from . import x`` in a sibling) is not a circle, only a way to reach the sibling.
    for module, targets in graph.items():
        targets -= {p for p in targets if module.startswith(p + ".")}

    cycles: list[str] = []
    done: set[str] = set()

    def visit(module: str, stack: list[str]) -> None:
        for target in sorted(graph[module]):
            if target in stack:
                cycles.append(" -> ".join(stack[stack.index(target):] + [target]))
            elif target not in done:
                visit(target, stack + [target])
        done.add(module)

    for module in sorted(graph):
        if module not in done:
            visit(module, [module])
    assert not cycles, "import circles:\n" + "\n".join(cycles)
