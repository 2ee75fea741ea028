"""Outputs are written whole or not at all."""
import os

import pytest

from moe_plugin.fileio import atomic_outputs, atomic_write, check_outputs


def test_outputs_renamed_together_or_not_at_all(tmp_path):
    a, b = str(tmp_path / 'sub' / 'a.png'), str(tmp_path / 'sub' / 'b.json')
    with atomic_outputs([a, None, b]) as (tmp_a, none, tmp_b):
        assert none is None and tmp_a.endswith('.part.png')
        assert os.path.dirname(tmp_a) == os.path.dirname(a)
        for tmp in (tmp_a, tmp_b):
            with open(tmp, 'w') as f:
                f.write('new')
        assert not os.path.exists(a)  # nothing renamed before the end
    assert sorted(os.listdir(tmp_path / 'sub')) == ['a.png', 'b.json']
    with pytest.raises(OSError, match='disk full'):
        with atomic_outputs([a, b]) as (tmp_a, tmp_b):
            with open(tmp_a, 'w') as f:
                f.write('half')
            raise OSError('disk full')
    assert sorted(os.listdir(tmp_path / 'sub')) == ['a.png', 'b.json']
    assert open(a).read() == 'new'


def test_existing_outputs_are_refused_unless_forced(tmp_path):
    path = str(tmp_path / 'x.txt')
    atomic_write(path, lambda tmp: open(tmp, 'w').write('1'))
    with pytest.raises(FileExistsError, match='x.txt exists; pass --force'):
        check_outputs([None, path])
    check_outputs([path], force=True)
