"""Atomic file writes and the cache folder."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path


def file_sha256(path: str | Path) -> str:
    with open(path, 'rb') as f:
        return hashlib.file_digest(f, 'sha256').hexdigest()


def cache_root() -> Path:
    """``$CSSBENCH_CACHE``, default ``~/.cache/cssbench`` (not created here)."""
    return Path(os.environ.get('CSSBENCH_CACHE', Path.home() / '.cache' / 'cssbench')).expanduser()


def cache_dir(*parts: str) -> Path:
    """The cache folder joined with ``parts``, created."""
    path = cache_root().joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _new_file_beside(path: Path) -> Path:
    """A new, empty file of a hidden temporary name beside ``path`` (its folder created), for
    a write that then takes ``path``'s place. It is created 0666 less the umask, as ``open``
    creates files: ``tempfile.mkstemp``'s are 0600 whatever the umask, which would shut other
    users out of a shared results store or cache."""
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = path.parent / f'.{path.name}.{secrets.token_hex(4)}.tmp'
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:   # another writer's name: draw again
            continue


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` for the block to write; renamed over ``path`` when
    the block ends, removed if it raises: ``path`` holds the old content or the new, whole."""
    path = Path(path)
    tmp = _new_file_beside(path)
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
    tmp = _new_file_beside(path)
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
