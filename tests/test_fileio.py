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


def test_outputs_get_the_mode_of_a_plain_open(tmp_path):
    mask = os.umask(0o022)
    try:
        path = str(tmp_path / 'w.pth')
        atomic_write(path, lambda tmp: open(tmp, 'w').write('1'))
        plain = tmp_path / 'plain.txt'
        plain.write_text('1')
        assert os.stat(path).st_mode & 0o777 == 0o644
        assert os.stat(path).st_mode & 0o777 == plain.stat().st_mode & 0o777
    finally:
        os.umask(mask)


@pytest.mark.parametrize('content, reason', [
    (b'hello, a text file\n', 'is not a PyTorch checkpoint'),
    (bytes(range(256)) * 8, 'is not a PyTorch checkpoint'),
])
def test_load_torch_file_one_line_naming_the_file(tmp_path, content, reason):
    from moe_plugin.fileio import load_torch_file
    path = tmp_path / 'bad.pth'
    path.write_bytes(content)
    with pytest.raises(ValueError) as info:
        load_torch_file(str(path), 'dense checkpoint')
    message = str(info.value)
    assert message.startswith(f'dense checkpoint {path} {reason}')
    assert '\n' not in message and 'weights_only` set to `False' not in message
    with pytest.raises(FileNotFoundError, match='missing.pth does not exist'):
        load_torch_file(str(tmp_path / 'missing.pth'))


class _NotATensor:
    pass


def test_load_torch_file_names_a_refused_type(tmp_path):
    import torch

    from moe_plugin.fileio import load_torch_file
    path = tmp_path / 'obj.pth'
    torch.save({'x': _NotATensor()}, path)
    with pytest.raises(ValueError, match=r'holds objects .*_NotATensor'):
        load_torch_file(str(path))
    torch.save({'x': torch.ones(2)}, path)
    assert load_torch_file(str(path))['x'].tolist() == [1.0, 1.0]
