"""The package's plan: folders follow the data flow, imports run with it, never against it, never in a circle."""
from __future__ import annotations

import ast
from pathlib import Path

import featmap

PACKAGE = Path(featmap.__file__).parent
# The data flow, upstream first. A module may import from its own folder or any folder before it.
FLOW = ["core", "data", "edits", "features", "train", "maps", "score", "run", "report"]
# Outside the flow: the package's front door and the command line import anything.
ENTRY = {"featmap", "featmap.__main__"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Returns the featmap modules ``path`` imports anywhere in its body (function-level imports too)."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("featmap")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module or ""
            if mod.startswith("featmap"):
                out.add(mod)
                for a in node.names:  # ``from featmap.maps import learned`` imports a module too
                    path = PACKAGE.parent / f"{mod}.{a.name}".replace(".", "/")
                    if path.with_suffix(".py").exists() or (path / "__init__.py").exists():
                        out.add(f"{mod}.{a.name}")
    return out


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


def folder(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in FLOW else None


def test_every_module_lives_in_a_flow_folder():
    stray = [m for m in graph() if m not in ENTRY and folder(m) is None]
    assert not stray, f"modules outside the data-flow folders {FLOW}: {stray}"


def test_every_folder_says_what_it_is_for():
    for name in FLOW:
        doc = ast.get_docstring(ast.parse((PACKAGE / name / "__init__.py").read_text()))
        assert doc and len(doc.splitlines()) == 1, f"featmap/{name}/__init__.py needs a one-line docstring"


def test_imports_run_with_the_data_flow():
    against = []
    for module, deps in graph().items():
        if module in ENTRY:
            continue
        for dep in deps:
            if folder(dep) and FLOW.index(folder(dep)) > FLOW.index(folder(module)):
                against.append(f"{module} imports {dep}")
    assert not against, "imports against the data flow:\n" + "\n".join(sorted(against))


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Returns the import cycles of ``g`` (module -> imported modules), ignoring a package's own ``__init__``
    importing its submodules (how registries fill) and a module importing the packages above it (Python runs
    their ``__init__`` first, but they hold no logic that imports back)."""
    def counts(a: str, b: str) -> bool:
        return b in g and b != a and not b.startswith(a + ".") and not a.startswith(b + ".")

    state, found = {}, []

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(d for d in g[node] if counts(node, d)):
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(g):
        if node not in state:
            visit(node, [node])
    return found


def test_no_import_cycles():
    found = cycles(graph())
    assert not found, "import cycles: " + "; ".join(" -> ".join(c) for c in found)


def test_the_cycle_finder_sees_a_planted_cycle():
    g = {"featmap.a.x": {"featmap.b.y"}, "featmap.b.y": {"featmap.a.x"}, "featmap.a": {"featmap.a.x"}}
    assert cycles(g) == [["featmap.a.x", "featmap.b.y", "featmap.a.x"]]


def test_the_checker_sees_a_planted_violation(tmp_path):
    planted = tmp_path / "featmap" / "core" / "bad.py"
    planted.parent.mkdir(parents=True)
    planted.write_text("from featmap.report.claims import overall\n")
    global PACKAGE
    saved, PACKAGE = PACKAGE, tmp_path / "featmap"
    try:
        assert imports(planted) == {"featmap.report.claims"}
        assert folder("featmap.core.bad") == "core" and FLOW.index("report") > FLOW.index("core")
    finally:
        PACKAGE = saved


def test_progress_goes_to_the_terminal_file_never_a_kernel_page(tmp_path, monkeypatch):
    import sys

    from featmap.core import progress

    monkeypatch.delenv(progress.PROGRESS_ENV, raising=False)
    monkeypatch.setitem(sys.modules, "ipykernel", object())  # as inside a notebook kernel
    bar = progress.bar(total=3, desc="extracting", unit="img")
    bar.update(3)
    bar.close()
    assert bar.disable  # nothing reaches the page
    log = tmp_path / "progress.log"
    monkeypatch.setenv(progress.PROGRESS_ENV, str(log))
    bar = progress.bar(total=3, desc="extracting", unit="img")
    bar.update(3)
    bar.close()
    assert "extracting" in log.read_text() and "3/3" in log.read_text()
