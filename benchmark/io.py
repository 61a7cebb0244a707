"""Atomic file writes, the cache folder, and the list of the files a command generated."""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from .errors import refuse_unwritable_folder

T = TypeVar('T')


def file_sha256(path: str | Path) -> str:
    with open(path, 'rb') as f:
        return hashlib.file_digest(f, 'sha256').hexdigest()


def file_stamp(path: Path) -> tuple[int, int, int, int]:
    """What changes when a file does: its size, modification time, inode and change time. The
    last two because a file replaced by ``cp -p`` or ``rsync -a`` keeps the size and
    modification time it was given."""
    st = path.stat()
    return st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns


def read_json_or_none(path: Path, parse: Callable[[Any], T] = lambda stored: stored) -> T | None:
    """What ``parse`` makes of the JSON in ``path`` (a cache or a record a run left); None if
    there is none, or it is damaged, or not what ``parse`` expects (it raises KeyError,
    TypeError, ValueError or AttributeError)."""
    try:
        return parse(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def cache_root() -> Path:
    """``$CSSBENCH_CACHE``, default ``~/.cache/cssbench`` (not created here)."""
    return Path(os.environ.get('CSSBENCH_CACHE', Path.home() / '.cache' / 'cssbench')).expanduser()


def cache_dir(*parts: str) -> Path:
    """The cache folder joined with ``parts``, created; one that cannot be (``$CSSBENCH_CACHE``
    a file, or a read-only folder without it) is refused in one line naming the variable."""
    root = cache_root()
    path = root.joinpath(*parts)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        refuse_unwritable_folder('$CSSBENCH_CACHE', root, path)   # says which folder, and why
        raise
    return path


# A temporary file or folder (.<name>.<random>.tmp beside what it becomes) is locked by its
# writer until the write ends: flock, whose locks conflict between any two open files, also of
# one process, and die with the process, in any PID namespace. One left behind by a process
# killed outright (SIGKILL: no cleanup ran) is removed by the next write into its folder.
_TEMPORARY = re.compile(r'\..+\.[0-9a-f]{8}\.tmp')
# The moment between a temporary's creation and its writer's lock: none is judged this young.
STALE_AFTER_S = 600


def _lock(fd: int) -> bool:
    """Whether an exclusive lock on ``fd``'s file was taken (held until ``fd`` is closed)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:   # held by a writer (or locks unsupported here: left alone)
        return False


def remove_stale_temporaries(folder: Path) -> None:
    """Remove the temporaries in ``folder`` that no writer holds (and that are
    ``STALE_AFTER_S`` old)."""
    try:
        names = [name for name in os.listdir(folder) if _TEMPORARY.fullmatch(name)]
    except OSError:
        return
    for name in names:
        path = folder / name
        with contextlib.suppress(OSError):
            if time.time() - path.lstat().st_mtime < STALE_AFTER_S:
                continue
            fd = os.open(path, os.O_RDONLY)
            try:
                if _lock(fd):
                    shutil.rmtree(path) if path.is_dir() else path.unlink()
            finally:
                os.close(fd)


@contextlib.contextmanager
def temporary_beside(path: Path, folder: bool = False) -> Iterator[Path]:
    """A new, empty file (or ``folder``) of a hidden temporary name beside ``path`` (its
    folder created, the stale temporaries there removed), for the block to write and then
    put in ``path``'s place; locked while the block runs, removed after it if still there.
    It is created as ``open`` and ``mkdir`` create (0666 or 0777 less the umask):
    ``tempfile``'s are private whatever the umask, which would shut other users out of a
    shared results store or cache."""
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent)
    while True:
        tmp = path.parent / f'.{path.name}.{secrets.token_hex(4)}.tmp'
        try:
            if folder:
                tmp.mkdir()
                fd = os.open(tmp, os.O_RDONLY)
            else:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            break
        except FileExistsError:   # another writer's name: draw again
            continue
    try:
        _lock(fd)
        yield tmp
    finally:
        if folder:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` for the block to write; renamed over ``path`` when
    the block ends, removed if it raises: ``path`` holds the old content or the new, whole."""
    path = Path(path)
    with temporary_beside(path) as tmp:
        yield tmp
        os.replace(tmp, path)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temporary file beside ``path``, fsync, then rename over it."""
    with atomic_path(path) as tmp, open(tmp, 'wb') as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_copy(source: str | Path, path: str | Path) -> None:
    """Copy ``source`` to a temporary file beside ``path``, then rename it over ``path``."""
    with atomic_path(path) as tmp:
        shutil.copyfile(source, tmp)


def copy_if_absent(source: str | Path, path: str | Path) -> bool:
    """Copy ``source`` to ``path`` unless ``path`` exists; whether this call wrote it. The copy
    appears whole, and of calls racing to write ``path``, the first one's stays."""
    path = Path(path)
    with temporary_beside(path) as tmp:
        shutil.copyfile(source, tmp)
        try:
            os.link(tmp, path)   # fails if path exists, where a rename would replace it
        except FileExistsError:
            return False
        except OSError:   # a file system without hard links: the last one's stays
            os.replace(tmp, path)
        return True


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1) + '\n')


# In a folder of tables and plots: per command, the files it wrote there for each protocol.
WRITTEN_LIST = '.cssbench-written.json'

# The longest file name written through ``temporary_beside``: the file system's 255 bytes
# less what its temporary adds ('.' + name + '.<8 hex>.tmp').
MAX_FILE_NAME = 255 - len('..01234567.tmp')


def fitting_file_name(parts: list[str], suffix: str) -> str:
    """``parts`` joined by '-', then ``suffix``; where that is longer than ``MAX_FILE_NAME``
    (names of the store's, each up to 255 characters, joined), the longest parts are cut
    (short ones, a method's, kept whole) and a digest of the whole marks the name, one per
    ``parts``: ``<parts cut>~<8 hex><suffix>``. The store's names are ASCII."""
    name = '-'.join(parts) + suffix
    if len(name) <= MAX_FILE_NAME:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    lengths = [len(part) for part in parts]
    room = MAX_FILE_NAME - len(suffix) - len(digest) - 1 - (len(parts) - 1)
    while sum(lengths) > room:
        lengths[lengths.index(max(lengths))] -= 1
    return '-'.join(part[:n] for part, n in zip(parts, lengths)) + f'~{digest}{suffix}'


def _file_name(name: str) -> str:
    if not isinstance(name, str) or name in ('', '.', '..') or Path(name).name != name:
        raise ValueError(f'not a file name: {name!r}')
    return name


def _file_names(names: list[str]) -> list[str]:
    if not isinstance(names, list):
        raise TypeError(f'not a list of file names: {names!r}')
    return [_file_name(name) for name in names]


def _written_list(stored) -> dict[str, dict[str, list[str]]]:
    return {command: {protocol: _file_names(names) for protocol, names in protocols.items()}
            for command, protocols in stored.items()}


def replace_written(folder: str | Path, command: str, written: dict[str, list[Path]],
                    every_protocol: bool) -> list[Path]:
    """Note which files ``command`` wrote into ``folder`` for each protocol, and delete the
    ones it wrote there last time, for the protocols written now (for every protocol it wrote,
    with ``every_protocol``), that it did not write again: the table or heat map of a run since
    deleted or no longer chosen. A file the list does not name is never touched. The deleted
    files, in order."""
    folder = Path(folder)
    listed = read_json_or_none(folder / WRITTEN_LIST, _written_list) or {}
    before = listed.get(command, {})
    now = {protocol: sorted(path.name for path in paths) for protocol, paths in written.items()}
    rewritten = before if every_protocol else now
    kept = {name for names in now.values() for name in names}
    stale = sorted({folder / name for protocol in rewritten for name in before.get(protocol, ())
                    if name not in kept and (folder / name).is_file()})
    for path in stale:   # before the list is written: a list naming a file gone does no harm
        path.unlink(missing_ok=True)
    listed[command] = now if every_protocol else {**before, **now}
    atomic_write_json(folder / WRITTEN_LIST, listed)
    return stale
