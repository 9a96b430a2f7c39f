"""The package layout holds its rules (docs/layout.md): at most 10 modules at the package root, no
import cycle, and every import going down the layer table, imports inside functions included."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "optimum_grape"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def explicit_imports(name: str) -> set[str]:
    """Every optimum_grape module `name` imports by name, anywhere in the file."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                full = f"{target}.{alias.name}"
                found.add(full if full in MODULES else target)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {t for t in found if t in MODULES and t != name}


def import_graph() -> dict[str, set[str]]:
    """Explicit imports plus the packages Python runs on the way to them (`a.b.c` runs `a/b/__init__`)."""
    graph = {}
    for name in MODULES:
        targets = explicit_imports(name)
        for target in list(targets):
            parts = target.split(".")
            for i in range(1, len(parts)):
                parent = ".".join(parts[:i])
                if not name.startswith(parent + ".") and parent in MODULES:
                    targets.add(parent)
        graph[name] = targets - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], [0]
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter[0]
        counter[0] += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def layer_table() -> dict[str, int]:
    """unit -> layer, read from the table in docs/layout.md."""
    table = {}
    for line in (ROOT / "docs" / "layout.md").read_text(encoding="utf-8").splitlines():
        match = re.match(r"^\| (\d+) \| (.+?) \|", line)
        if match:
            for unit in re.findall(r"`([\w.]+)`", match.group(2)):
                table[unit] = int(match.group(1))
    return table


def unit_of(module: str, table: dict[str, int]) -> str:
    rest = module.removeprefix("optimum_grape").lstrip(".") or "__init__"
    candidates = [u for u in table if rest == u or rest.startswith(u + ".")]
    assert candidates, f"{module} is in no unit of docs/layout.md's table: add it"
    return max(candidates, key=len)


def test_package_root_holds_at_most_ten_modules():
    root_modules = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(root_modules) <= 10, root_modules


def test_no_import_cycle():
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_every_import_goes_down_the_layer_table():
    table = layer_table()
    assert table["errors"] == 0 and table["cli"] == 15
    upward = []
    for module in MODULES:
        unit = unit_of(module, table)
        for target in explicit_imports(module):
            target_unit = unit_of(target, table)
            if target_unit != unit and table[target_unit] >= table[unit]:
                upward.append(f"{module} ({unit}, layer {table[unit]}) imports {target} "
                              f"({target_unit}, layer {table[target_unit]})")
    assert upward == []


def test_every_module_says_what_it_owns():
    missing = [name for name, path in MODULES.items()
               if not ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))]
    assert missing == []


def test_the_docs_the_cli_points_to_ship_with_the_package():
    """`optimum_grape/docs` links to docs/ and is package data, so an installed wheel carries them."""
    import tomllib

    assert (PACKAGE / "docs").resolve() == (ROOT / "docs").resolve()
    assert (PACKAGE / "docs" / "methods.md").is_file()
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["optimum_grape"]
    assert "docs/*.md" in data
    assert (ROOT / "LICENSE").read_text().lstrip().startswith("Apache License")
