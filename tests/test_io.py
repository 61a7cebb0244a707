"""Tests of atomic writes and the cache folder (benchmark/io.py)."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

import cssbench.io as cio
from cssbench.io import atomic_write_json, atomic_write_text, cache_dir


def test_atomic_write_json_roundtrip(tmp_path: Path) -> None:
    path = tmp_path / 'sub' / 'dir' / 'x.json'
    atomic_write_json(path, {'a': [1, 2, 3], 'b': 'é', 'c': None})
    assert json.loads(path.read_text()) == {'a': [1, 2, 3], 'b': 'é', 'c': None}
    assert path.read_text().endswith('\n')
    assert os.listdir(path.parent) == ['x.json']


def test_atomic_write_json_replaces(tmp_path: Path) -> None:
    path = tmp_path / 'x.json'
    atomic_write_json(path, [1])
    atomic_write_json(path, [2, 3])
    assert json.loads(path.read_text()) == [2, 3]
    assert os.listdir(tmp_path) == ['x.json']


def test_unserialisable_leaves_previous_content(tmp_path: Path) -> None:
    path = tmp_path / 'x.json'
    atomic_write_json(path, {'ok': 1})
    before = path.read_bytes()
    with pytest.raises(TypeError):
        atomic_write_json(path, {'ok': 2, 'bad': object()})
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ['x.json']


def test_failure_during_write_leaves_previous_content(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / 'x.txt'
    atomic_write_text(path, 'old')

    def failing_fsync(fd):
        raise OSError(28, 'No space left on device')

    monkeypatch.setattr(cio.os, 'fsync', failing_fsync)
    with pytest.raises(OSError):
        atomic_write_text(path, 'new content')
    assert path.read_text() == 'old'
    assert os.listdir(tmp_path) == ['x.txt']   # the temp file was removed


def test_weights_and_copies_are_whole_or_not_written(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from cssbench.runner import save_weights
    path = tmp_path / 'model.pth'
    save_weights(torch.nn.Linear(2, 2), path)
    before = path.read_bytes()

    def save_half_then_fail(obj, f):   # killed, or the disk full, halfway through
        Path(f).write_bytes(before[:len(before) // 2])
        raise OSError(28, 'No space left on device')

    monkeypatch.setattr(torch, 'save', save_half_then_fail)
    with pytest.raises(OSError):
        save_weights(torch.nn.Linear(2, 2), path)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ['model.pth']

    with pytest.raises(FileNotFoundError):
        cio.atomic_copy(tmp_path / 'absent.pth', path)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ['model.pth']
    (tmp_path / 'other.pth').write_bytes(b'other')
    cio.atomic_copy(tmp_path / 'other.pth', path)
    assert path.read_bytes() == b'other' and sorted(os.listdir(tmp_path)) == ['model.pth', 'other.pth']


def no_hard_links(source, target):
    raise PermissionError(1, 'Operation not permitted')


def test_copy_if_absent_keeps_the_first_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ('first', 'second'):
        (tmp_path / name).write_bytes(name.encode())
    path = tmp_path / 'cache' / 'model.pth'
    assert cio.copy_if_absent(tmp_path / 'first', path) is True
    assert cio.copy_if_absent(tmp_path / 'second', path) is False   # a run that came second
    assert path.read_bytes() == b'first' and os.listdir(path.parent) == ['model.pth']
    with pytest.raises(FileNotFoundError):
        cio.copy_if_absent(tmp_path / 'absent', tmp_path / 'cache' / 'other.pth')
    assert os.listdir(path.parent) == ['model.pth']

    monkeypatch.setattr(os, 'link', no_hard_links)   # such a file system: the last copy stays
    assert cio.copy_if_absent(tmp_path / 'second', path) is True
    assert path.read_bytes() == b'second' and os.listdir(path.parent) == ['model.pth']


@pytest.fixture
def umask(request: pytest.FixtureRequest) -> int:
    """The process's umask set to the test's parameter while it runs."""
    before = os.umask(request.param)
    yield request.param
    os.umask(before)


@pytest.mark.parametrize('umask, mode', [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)],
                         indirect=['umask'], ids=['umask-022', 'umask-077', 'umask-002'])
def test_written_files_take_their_mode_from_the_umask(tmp_path: Path, umask: int, mode: int,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    source = tmp_path / 'source'
    source.write_bytes(b'weights')
    os.chmod(source, 0o600)   # a copy's mode is not its source's
    atomic_write_text(tmp_path / 'run.json', '{}')
    cio.atomic_copy(source, tmp_path / 'copied.pth')
    cio.copy_if_absent(source, tmp_path / 'cache' / 'linked.pth')
    monkeypatch.setattr(os, 'link', no_hard_links)
    cio.copy_if_absent(source, tmp_path / 'cache' / 'renamed.pth')
    for name in ('run.json', 'copied.pth', 'cache/linked.pth', 'cache/renamed.pth'):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode, name


def test_cache_dir_uses_env(isolated_cache: Path) -> None:
    d = cache_dir('splits', 'deeper')
    assert d == isolated_cache / 'splits' / 'deeper'
    assert d.is_dir()


WRITER = ('import os, sys, time; from pathlib import Path; from cssbench.io import temporary_beside; '
          'held = [temporary_beside(Path(sys.argv[1]) / "model.pth"), '
          'temporary_beside(Path(sys.argv[1]) / "synth", folder=True)]; '
          '[t.__enter__() for t in held]; print("writing", flush=True); '
          'os.kill(os.getpid(), 9) if sys.argv[2] == "killed" else sys.stdin.read()')


def writer_temporaries(folder: Path, fate: str):
    """A process that writes a file's (model.pth) and a folder's (synth) temporaries in
    ``folder``, then dies by SIGKILL (``fate`` 'killed': no cleanup runs) or goes on writing
    ('alive': until its stdin closes); returns it and the names of its temporaries."""
    before = set(os.listdir(folder))
    writer = subprocess.Popen([sys.executable, '-c', WRITER, str(folder), fate],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline() == 'writing\n'
    if fate == 'killed':
        assert writer.wait() == -9
    return writer, sorted(set(os.listdir(folder)) - before)


def test_a_killed_writers_temporaries_are_removed_by_the_next_write_beside_them(tmp_path: Path) -> None:
    old = time.time() - cio.STALE_AFTER_S - 1
    _, dead = writer_temporaries(tmp_path, 'killed')
    assert [name.split('.')[1] for name in dead] == ['model', 'synth']   # .model.pth.<hex>.tmp
    (tmp_path / dead[1] / 'half-drawn.png').write_bytes(b'png')
    writer, alive = writer_temporaries(tmp_path, 'alive')    # as long-running, in any namespace
    _, young = writer_temporaries(tmp_path, 'killed')        # its writer may not hold it yet
    (tmp_path / '.hidden').touch()                           # not a temporary
    for name in (*dead, *alive, '.hidden'):
        os.utime(tmp_path / name, (old, old))

    atomic_write_json(tmp_path / 'x.json', [1])
    assert sorted(os.listdir(tmp_path)) == sorted(['.hidden', 'x.json', *alive, *young])
    writer.stdin.close()
    assert writer.wait() == 0 and not set(alive) & set(os.listdir(tmp_path))   # removed by it


def test_replace_written_removes_only_what_the_command_wrote_before_and_not_now(tmp_path: Path) -> None:
    def write(*names: str) -> list[Path]:
        for name in names:
            (tmp_path / name).write_text(name)
        return [tmp_path / name for name in names]

    assert cio.replace_written(tmp_path, 'plot', {'a': write('a-1', 'a-2'), 'b': write('b-1')},
                               every_protocol=True) == []
    # one protocol rewritten: only its own stale files go; the other protocol's stay listed
    assert cio.replace_written(tmp_path, 'plot', {'a': write('a-1')}, every_protocol=False) == \
        [tmp_path / 'a-2']
    # every protocol rewritten: b's, not written this time, goes too; table's list is its own
    write('t-1')
    cio.replace_written(tmp_path, 'table', {'b': [tmp_path / 't-1']}, every_protocol=True)
    assert cio.replace_written(tmp_path, 'plot', {'a': write('a-1')}, every_protocol=True) == \
        [tmp_path / 'b-1']
    assert sorted(os.listdir(tmp_path)) == ['.cssbench-written.json', 'a-1', 't-1']
    # a list naming a path outside the folder is not trusted: nothing is removed
    outside = tmp_path.parent / 'outside'
    outside.write_text('kept')
    (tmp_path / cio.WRITTEN_LIST).write_text(json.dumps({'plot': {'a': ['../outside', 'a-1']}}))
    assert cio.replace_written(tmp_path, 'plot', {}, every_protocol=True) == []
    assert outside.read_text() == 'kept' and (tmp_path / 'a-1').is_file()
    write('a')   # nor one whose names are a text, not a list of names
    (tmp_path / cio.WRITTEN_LIST).write_text(json.dumps({'plot': {'a': 'a-1'}}))
    assert cio.replace_written(tmp_path, 'plot', {}, every_protocol=True) == []
    assert (tmp_path / 'a').is_file() and (tmp_path / 'a-1').is_file()
