"""The README's Layout section is a map of the tree: one line per entry, each saying what it owns.

Every entry listed must exist; every module of kombu_pg/ and celery_ext/ (at any depth) and every
directory under them must be listed. Entries are indented two spaces per level under their
directory; a line indented as far as the descriptions continues the one above.
"""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("kombu_pg", "celery_ext")
DESCRIPTION_COLUMN = 16  # a line indented this far or more continues the previous description
ENTRY = re.compile(r"^(?P<indent> *)(?P<name>\S+)(?: {2,}(?P<description>\S.*))?$")


def layout_lines() -> list[str]:
    text = (ROOT / "README.md").read_text()
    assert "\n## Layout\n" in text, "README.md has no '## Layout' section"
    section = text.split("\n## Layout\n", 1)[1]
    start = section.index("```\n") + 4
    return section[start:section.index("```", start)].splitlines()


def listed_entries() -> tuple[dict[str, str], list[str]]:
    """{path: description} of the listed entries (directories end in '/'), and malformed lines."""
    entries: dict[str, str] = {}
    problems: list[str] = []
    parents: list[str] = []  # the directory of each indentation level
    last = None
    for line in layout_lines():
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        if indent >= DESCRIPTION_COLUMN and last:
            entries[last] += " " + line.strip()
            continue
        match = ENTRY.match(line)
        if not match or indent % 2 or indent // 2 > len(parents):
            problems.append(f"cannot read {line!r} (two spaces per level, then the name, two spaces, what it owns)")
            continue
        parents = parents[:indent // 2]
        last = "".join(parents) + match["name"]
        if not match["description"]:
            problems.append(f"{last} says nothing about what it owns")
        entries[last] = match["description"] or ""
        if last.endswith("/"):
            parents.append(match["name"])
    return entries, problems


def tree_entries() -> set[str]:
    """What must be listed: every module and directory of the packages, the packages themselves."""
    wanted = set()
    for package in PACKAGES:
        wanted.add(f"{package}/")
        for path in (ROOT / package).rglob("*"):
            relative = path.relative_to(ROOT)
            if "__pycache__" in relative.parts or any(part.startswith(".") for part in relative.parts):
                continue
            if path.is_dir():
                wanted.add(f"{relative.as_posix()}/")
            elif path.suffix == ".py" and path.name != "__init__.py":
                wanted.add(relative.as_posix())
    return wanted


def test_readme_layout_matches_the_tree():
    entries, problems = listed_entries()
    extra = sorted(entry for entry in entries
                   if not (ROOT / entry).exists() or entry.endswith("/") != (ROOT / entry).is_dir())
    missing = sorted(tree_entries() - set(entries))
    report = [f"  not in the tree (remove or fix the line): {entry}" for entry in extra]
    report += [f"  missing (add '{Path(entry.rstrip('/')).name}{'/' if entry.endswith('/') else ''}"
               f"   <what it owns>' under {Path(entry).parent.as_posix()}/): {entry}" for entry in missing]
    report += [f"  {problem}" for problem in problems]
    assert not report, "README.md's Layout section is out of date:\n" + "\n".join(report)


def test_the_layout_lists_the_test_rings_and_the_top_level():
    entries, _ = listed_entries()
    assert {"tests/unit/", "tests/integration/", "tests/acceptance/", "dev.py", ".ci/run",
            "migrations/", *(f"{package}/" for package in PACKAGES)} <= set(entries)
