"""The glibc malloc thresholds the step loop runs with."""

import ctypes
import platform

import pytest

from workers.malloc_tuning import tune_malloc


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_glibc_accepts_the_thresholds_and_a_second_call_is_a_no_op():
    assert tune_malloc() is True
    assert tune_malloc() is True
    # the heap still works for blocks around the new mmap threshold
    buffers = [ctypes.create_string_buffer(n) for n in (1 << 20, 8 << 20, 40 << 20)]
    assert [len(b) for b in buffers] == [1 << 20, 8 << 20, 40 << 20]
