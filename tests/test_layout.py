"""The package's plan: folders follow the data flow, imports run with it, never against it, never in a circle; and the
repository speaks of the product only."""
from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

import pytest

import featmap

PACKAGE = Path(featmap.__file__).parent
# The data flow, upstream first. A module may import from its own folder or any folder before it.
FLOW = ["core", "data", "edits", "features", "train", "maps", "score", "run", "report"]
# Outside the flow: the package's front door and the command line import anything.
ENTRY = {"featmap", "featmap.__main__"}


def module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, package: Path = PACKAGE) -> set[str]:
    """Returns the featmap modules ``path`` (a file of the featmap tree at ``package``) imports anywhere in its body
    (function-level imports too)."""
    me = module_name(path, package)
    parent = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("featmap")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = parent.rsplit(".", node.level - 1)[0] if node.level > 1 else parent
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module or ""
            if mod.startswith("featmap"):
                out.add(mod)
                for a in node.names:  # ``from featmap.maps import learned`` imports a module too
                    target = package.parent / f"{mod}.{a.name}".replace(".", "/")
                    if target.with_suffix(".py").exists() or (target / "__init__.py").exists():
                        out.add(f"{mod}.{a.name}")
    return out


def graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Returns module -> the featmap modules it imports, for every module of the featmap tree at ``package``."""
    return {module_name(p, package): imports(p, package) for p in sorted(package.rglob("*.py"))}


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


def against_the_flow(g: dict[str, set[str]]) -> list[str]:
    """Returns, sorted, every import of ``g`` (module -> imported modules) from a folder downstream of the
    importer's ("module imports dependency")."""
    against = []
    for module, deps in g.items():
        if module in ENTRY:
            continue
        for dep in deps:
            if folder(dep) and FLOW.index(folder(dep)) > FLOW.index(folder(module)):
                against.append(f"{module} imports {dep}")
    return sorted(against)


def test_imports_run_with_the_data_flow():
    against = against_the_flow(graph())
    assert not against, "imports against the data flow:\n" + "\n".join(against)


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


def test_the_checkers_see_planted_violations_in_a_package_tree(tmp_path):
    """A featmap tree with an import against the flow (core -> report, written three ways) and a cycle inside maps:
    the checkers the real package passes report exactly those."""
    tree = {"__init__.py": "",
            "core/__init__.py": '"""Shared plumbing."""\n',
            "core/bad.py": "import json\nfrom featmap.core import ok\n\n\ndef late():\n"
                           "    from featmap.report.claims import overall\n    return overall\n",
            "core/ok.py": "",
            "core/worse.py": "from ..report import claims\n",
            "core/also.py": "import featmap.report.plots\n",
            "maps/__init__.py": '"""Maps."""\nfrom featmap.maps import a  # a registry filling: not a cycle\n',
            "maps/a.py": "from featmap.maps.b import B\nfrom featmap.core.ok import *\n",
            "maps/b.py": "from featmap.maps import a\nB = 1\n",
            "report/__init__.py": '"""Reports."""\n',
            "report/claims.py": "from featmap.maps.a import B\n",
            "report/plots.py": ""}
    for name, text in tree.items():
        (tmp_path / "featmap" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "featmap" / name).write_text(text)
    g = graph(tmp_path / "featmap")
    assert against_the_flow(g) == ["featmap.core.also imports featmap.report.plots",
                                   "featmap.core.bad imports featmap.report.claims",
                                   "featmap.core.worse imports featmap.report",  # the package, then its module
                                   "featmap.core.worse imports featmap.report.claims"]
    assert cycles(g) == [["featmap.maps.a", "featmap.maps.b", "featmap.maps.a"]]


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


# Text about the work that made the repository rather than the product (its stages, requests and tickets, tools used
# to make it), each written so that it does not match itself. Files the text names must be in the repository: see
# MARKDOWN.
WORK_TALK = [re.compile(p, re.IGNORECASE) for p in (
    r"\b(this|last|next|previous)[ ]stop\b", r"\bearlier[ ]stops\b", r"\bstops[ ]ago\b",
    r"\bthe[ ]brief\b", r"\b(issue|ticket)s?[ ]#?\d+", r"(?<![\w.-])shared[/]",
    r"\b(this|last|previous|next|work|working)[ ]session\b",
    r"\bdevice[ ](tool|image|machine)\b", r"\btimeout[_]s\b", r"\bcarry(ing)?[ ](it\b|\[|`?\.whl)",
)]
MARKDOWN = re.compile(r"\b[A-Z][A-Z_]*\.md\b")  # a markdown file named in capitals, as README.md: one of the repository


def work_talk(root: Path, files: list[str]) -> list[str]:
    """Returns "file:line: text" for every line of ``files`` (text files under ``root``; others are passed over)
    that speaks of the work rather than the product, or names a markdown file the repository does not hold."""
    held = {Path(f).name for f in files}
    found = []
    for name in files:
        try:
            text = (root / name).read_text(encoding="utf-8")
        except (UnicodeDecodeError, IsADirectoryError, FileNotFoundError):
            continue
        for number, line in enumerate(text.splitlines(), 1):
            if any(p.search(line) for p in WORK_TALK) or set(MARKDOWN.findall(line)) - held:
                found.append(f"{name}:{number}: {line.strip()[:160]}")
    return found


def tracked_files() -> list[str]:
    """Returns the repository's tracked files (``git ls-files``), relative to its root."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z"], cwd=PACKAGE.parent, capture_output=True, check=True)
    except (OSError, subprocess.CalledProcessError) as error:
        pytest.skip(f"not a git checkout, so there is no list of the repository's files: {error}")
    return [f for f in listed.stdout.decode().split("\0") if f]


def test_the_repository_speaks_of_the_product_only():
    found = work_talk(PACKAGE.parent, tracked_files())
    assert not found, f"{len(found)} line(s) about the work, not the product, or naming a file the repository " \
                      "does not hold:\n" + "\n".join(found)


def test_the_work_talk_scan_sees_planted_lines(tmp_path):
    # "~" is dropped before the scan: it keeps these lines from being found in this file
    lines = [line.replace("~", "") for line in (
        "measured on this ~stop's code", "Earlier ~stops: none", "as the ~brief states", "fixed (issue ~15)",
        "see shared~/paper/notes.txt", "see DESIGN~.md", "run with carry ~[\".whl\"]", "timeout~_s 600",
        "what the device ~image lacks")]
    fine = ["the stop criterion: patience 6", "this stops early", "a brief summary", "issues a warning",
            "see README.md", "a session-scoped fixture, once per session", "rows carry one interval"]
    (tmp_path / "notes.txt").write_text("\n".join(lines + fine) + "\n")
    (tmp_path / "README.md").write_text("")
    (tmp_path / "photo.webp").write_bytes(bytes(range(256)))  # not text: passed over
    found = work_talk(tmp_path, ["notes.txt", "README.md", "photo.webp"])
    assert found == [f"notes.txt:{i}: {line}" for i, line in enumerate(lines, 1)]
