"""The allocator settings featmap applies at import (``featmap.core.memory``)."""
import os
import platform
import subprocess
import sys

import pytest

from featmap.core import memory

CYCLE = """
import resource
import numpy as np
import featmap  # noqa: F401  (applies the settings unless FEATMAP_MALLOC=default)
a = np.ones(100 * 2**20 // 8); del a  # the heap grows once
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    a = np.ones(100 * 2**20 // 8); del a
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    env = {**os.environ, memory.MALLOC_ENV: mode}
    return int(subprocess.run([sys.executable, "-c", CYCLE], env=env, capture_output=True, text=True,
                              check=True).stdout.split()[-1])


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt only")
def test_freed_arrays_are_reused_instead_of_faulted_in_again():
    # ten 100 MiB arrays allocated and freed in turn: with glibc's defaults each is a fresh mmap whose pages fault
    # in again (thousands of faults); kept, the same heap memory is reused
    kept, default = _faults("keep"), _faults("default")
    assert kept * 4 < default, (kept, default)


def test_a_bad_setting_names_the_variable_and_the_choices(monkeypatch):
    monkeypatch.setenv(memory.MALLOC_ENV, "off")
    with pytest.raises(ValueError, match="FEATMAP_MALLOC must be 'keep'.*'default'.*'off'"):
        memory.keep_freed_memory()
    monkeypatch.setenv(memory.MALLOC_ENV, "default")
    assert memory.keep_freed_memory() is False
