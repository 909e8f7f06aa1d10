"""The package layout the README promises: no two packages import each other (the ground floor,
opd/*.py, is shared by all), and no code outside opd/methods/ asks which method it runs."""

import ast
import re
from pathlib import Path

import opd

ROOT = Path(opd.__file__).parent


def package_imports() -> dict[str, set[str]]:
    """package -> the other opd packages its modules import (module-level and inside functions)."""
    edges: dict[str, set[str]] = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT).parts
        if len(parts) < 2:
            continue  # the ground floor
        mine = parts[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("opd."):
                other = node.module.split(".")[1]
                if other != mine and (ROOT / other).is_dir():
                    edges.setdefault(mine, set()).add(other)
    return edges


def test_no_two_packages_import_each_other():
    edges = package_imports()

    def reaches(a, b, seen=()):
        return any(n == b or (n not in seen and reaches(n, b, (*seen, n))) for n in edges.get(a, ()))

    cycles = sorted({tuple(sorted((a, b))) for a in edges for b in edges[a] if reaches(b, a)})
    assert not cycles, f"packages in an import cycle: {cycles}"


def test_no_method_name_comparison_outside_methods():
    names = "opd|sft|mixed|kd|rl|opd\\+rl"
    pattern = re.compile(rf"""(method(\.name)?|\.name)\s*(==|!=|in)\s*[\(\[{{]?\s*["']({names})["']""")
    hits = [f"{p.relative_to(ROOT)}:{i}" for p in ROOT.rglob("*.py") if "methods" not in p.parts
            for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not hits, hits
