"""The allocator settings of featmap's entry points (``featmap.core.memory``), the warnings its pages keep quiet, and
an ``import featmap`` that changes neither."""
import json
import os
import platform
import subprocess
import sys

import pytest

from featmap.core import memory

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
glibc_only = pytest.mark.skipif(not GLIBC, reason="glibc's mallopt only")

# Ten 100 MiB arrays allocated and freed in turn: with glibc's defaults each is a fresh mmap whose pages fault in
# again (thousands of faults); with featmap's settings the same heap memory is reused.
FAULTS = '''
import resource

import numpy as np


def faults():
    """Returns the page faults of ten 100 MiB arrays allocated and freed in turn (after one that grows the heap)."""
    a = np.ones(100 * 2**20 // 8); del a
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        a = np.ones(100 * 2**20 // 8); del a
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
'''


def _clean_env(**extra) -> dict[str, str]:
    """Returns this process's environment without allocator variables, with ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in memory.ENV_NAMES.values() and k != memory.MALLOC_ENV}
    return {**env, **extra}


def _run(script: str, env: dict[str, str], *args: str) -> dict:
    """Returns the JSON that ``script`` prints last, run in a fresh Python with ``args``."""
    out = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True,
                         check=True).stdout
    return json.loads(out.splitlines()[-1])


MEASURE = FAULTS + """
import json, sys
from featmap.core import memory
set_here = "mallopt" in sys.argv and memory.keep_freed_memory()
print(json.dumps({"set": set_here, "faults": faults()}))
"""


@glibc_only
def test_freed_arrays_are_reused_when_set_in_process_or_given_at_start():
    default = _run(MEASURE, _clean_env())
    mallopt = _run(MEASURE, _clean_env(), "mallopt")
    started = _run(MEASURE, _clean_env(**memory.allocator_env()))
    assert mallopt["set"] and not default["set"] and not started["set"]
    assert mallopt["faults"] * 4 < default["faults"] and started["faults"] * 4 < default["faults"], \
        (mallopt, started, default)


def test_importing_featmap_changes_nothing_outside_it():
    """A fresh ``import featmap`` leaves the warnings filters, the environment, the import machinery and (glibc) the
    allocator as they were; calling the entry points' ``keep_freed_memory`` afterwards does change the allocator,
    so the measurement can tell."""
    script = FAULTS + """
import json, os, sys, warnings
state = lambda: {"filters": [repr(f) for f in warnings.filters], "environ": dict(os.environ),
                 "meta_path": [repr(f) for f in sys.meta_path], "path_hooks": [repr(h) for h in sys.path_hooks]}
before = state()
import featmap
after = state()
imported = faults()
from featmap.core.memory import keep_freed_memory
kept = faults() if keep_freed_memory() else None
print(json.dumps({"before": before, "after": after, "imported": imported, "kept": kept}))
"""
    seen = _run(script, _clean_env(FEATMAP_MALLOC="keep"))
    for what in seen["before"]:
        assert seen["after"][what] == seen["before"][what], f"import featmap changed {what}"
    if GLIBC:
        assert seen["kept"] * 4 < seen["imported"], seen  # the import left glibc's defaults


# A chapter that shows the warnings of its kernel (tqdm.auto's notice, and one that must reach the page) and prints
# its page faults.
CHAPTER = FAULTS + """
import json, warnings
import tqdm.autonotebook  # warns in a kernel without ipywidgets
from tqdm import TqdmWarning
from tqdm.notebook import WARN_NOIPYW
warnings.warn(WARN_NOIPYW, TqdmWarning)  # the notice itself, whether ipywidgets is there or not
warnings.warn("a planted notice", TqdmWarning)
print(json.dumps({"faults": faults()}))
"""


def test_the_book_runner_starts_chapters_with_the_allocator_settings_and_quiet_pages(tmp_path, monkeypatch):
    """``run_book``'s papermill kernels start with featmap's allocator settings (none with ``FEATMAP_MALLOC=default``)
    and show no 'IProgress not found' notice, while other warnings still reach the page."""
    import nbformat

    from featmap.run.book import run_book

    book = tmp_path / "book"
    book.mkdir()
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell(CHAPTER)]
    nbformat.write(nb, book / "data.ipynb")
    for name in memory.ENV_NAMES.values():
        monkeypatch.delenv(name, raising=False)
    seen = {}
    for mode in ("keep", "default"):
        monkeypatch.setenv(memory.MALLOC_ENV, mode)
        run_book(["data"], book, tmp_path / mode, jobs=1)
        outputs = json.loads((tmp_path / mode / "book" / "data.ipynb").read_text())["cells"][0]["outputs"]
        stderr = "".join("".join(o["text"]) for o in outputs if o.get("name") == "stderr")
        assert "a planted notice" in stderr and "IProgress" not in stderr, stderr
        stdout = "".join("".join(o["text"]) for o in outputs if o.get("name") == "stdout")
        seen[mode] = json.loads(stdout.splitlines()[-1])["faults"]
    if GLIBC:
        assert seen["keep"] * 4 < seen["default"], seen


def test_a_bad_setting_names_the_variable_and_the_choices(monkeypatch):
    monkeypatch.setenv(memory.MALLOC_ENV, "off")
    for apply in (memory.keep_freed_memory, memory.allocator_env):
        with pytest.raises(ValueError, match="FEATMAP_MALLOC must be 'keep'.*'default'.*'off'"):
            apply()
    monkeypatch.setenv(memory.MALLOC_ENV, "default")
    assert memory.keep_freed_memory() is False and memory.allocator_env() == {}
    monkeypatch.setenv(memory.MALLOC_ENV, "keep")
    expected = {"MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str(2**31 - 1),
                "MALLOC_TOP_PAD_": str(64 << 20)} if GLIBC else {}
    assert memory.allocator_env() == expected
