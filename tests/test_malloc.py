"""glibc's heap keeps freed large blocks after ``keep_freed_memory``."""
import subprocess
import sys

import pytest

from moe_plugin import malloc

# Allocates and frees a 64 MiB tensor twice and prints the bytes glibc held
# in mmap'd blocks while the tensor was alive (mallinfo2's hblkhd).
PROBE = r'''
import ctypes, sys
import torch
from moe_plugin.malloc import keep_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        'arena', 'ordblks', 'smblks', 'hblks', 'hblkhd', 'usmblks',
        'fsmblks', 'uordblks', 'fordblks', 'keepcost')]

libc = ctypes.CDLL('libc.so.6')
libc.mallinfo2.restype = MallInfo2
kept = keep_freed_memory() if sys.argv[1] == 'keep' else None
mapped = []
for _ in range(2):
    block = torch.ones(16 << 20)
    mapped.append(libc.mallinfo2().hblkhd)
    del block
print(kept, min(mapped))
'''


def _glibc_has_mallinfo2():
    libc = malloc._glibc()
    return libc is not None and hasattr(libc, 'mallinfo2')


@pytest.mark.skipif(not _glibc_has_mallinfo2(), reason='needs glibc 2.33+')
def test_large_blocks_come_from_the_heap():
    def probe(mode):
        out = subprocess.run([sys.executable, '-c', PROBE, mode],
                             capture_output=True, text=True, check=True)
        kept, mapped = out.stdout.split()
        return kept, int(mapped)

    kept, mapped = probe('keep')
    assert kept == 'True'
    assert mapped < 16 << 20  # the 64 MiB block is in the heap
    kept, mapped = probe('default')
    assert kept == 'None'
    assert mapped >= 64 << 20  # glibc's default: its own mapping


def test_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setenv(malloc.ENV_SWITCH, '0')
    assert malloc.keep_freed_memory() is False


@pytest.mark.parametrize('threshold', [0, 1 << 31])
def test_threshold_out_of_range(threshold):
    with pytest.raises(ValueError, match='threshold'):
        malloc.keep_freed_memory(threshold)
