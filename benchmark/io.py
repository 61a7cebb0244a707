"""Atomic file writes and the cache folder."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path


def file_sha256(path: str | Path) -> str:
    with open(path, 'rb') as f:
        return hashlib.file_digest(f, 'sha256').hexdigest()


def file_stamp(path: Path) -> tuple[int, int, int, int]:
    """What changes when a file does: its size, modification time, inode and change time. The
    last two because a file replaced by ``cp -p`` or ``rsync -a`` keeps the size and
    modification time it was given."""
    st = path.stat()
    return st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns


def cache_root() -> Path:
    """``$CSSBENCH_CACHE``, default ``~/.cache/cssbench`` (not created here)."""
    return Path(os.environ.get('CSSBENCH_CACHE', Path.home() / '.cache' / 'cssbench')).expanduser()


def cache_dir(*parts: str) -> Path:
    """The cache folder joined with ``parts``, created."""
    path = cache_root().joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


# A temporary file or folder is named for its writer: .<name>.<machine>-<pid>-<random>.tmp. One
# left behind by a process killed outright (SIGKILL, no cleanup) is removed by the next write
# into its folder from the same machine (the machine is a hash of the host name: temporaries
# of another machine sharing the folder are never judged).
_MACHINE = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
_TEMPORARY = re.compile(r'\..+\.(?P<machine>[0-9a-f]{8})-(?P<pid>\d+)-[0-9a-f]{8}\.tmp')
# A writer alive in another PID namespace on the same host name looks dead from here; no
# write of ours leaves its temporary untouched this long.
STALE_AFTER_S = 600


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # another user's process
        return True
    return True


def remove_stale_temporaries(folder: Path) -> None:
    """Remove the temporaries in ``folder`` whose writer, a process of this machine, is gone
    (and that were last written ``STALE_AFTER_S`` ago)."""
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        match = _TEMPORARY.fullmatch(name)
        if not match or match['machine'] != _MACHINE or _process_exists(int(match['pid'])):
            continue
        path = folder / name
        with contextlib.suppress(OSError):
            if time.time() - path.lstat().st_mtime < STALE_AFTER_S:
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()


def new_temporary_beside(path: Path, folder: bool = False) -> Path:
    """A new, empty file (or ``folder``) of a hidden temporary name beside ``path`` (its
    folder created), for a write that then takes ``path``'s place; the stale temporaries
    there are removed first. It is created as ``open`` and ``mkdir`` create (0666 or 0777
    less the umask): ``tempfile``'s are private whatever the umask, which would shut other
    users out of a shared results store or cache."""
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent)
    while True:
        tmp = path.parent / f'.{path.name}.{_MACHINE}-{os.getpid()}-{secrets.token_hex(4)}.tmp'
        try:
            if folder:
                tmp.mkdir()
            else:
                os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:   # another writer's name: draw again
            continue


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` for the block to write; renamed over ``path`` when
    the block ends, removed if it raises: ``path`` holds the old content or the new, whole."""
    path = Path(path)
    tmp = new_temporary_beside(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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
    tmp = new_temporary_beside(path)
    try:
        shutil.copyfile(source, tmp)
        try:
            os.link(tmp, path)   # fails if path exists, where a rename would replace it
        except FileExistsError:
            return False
        except OSError:   # a file system without hard links: the last one's stays
            os.replace(tmp, path)
        return True
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1) + '\n')
