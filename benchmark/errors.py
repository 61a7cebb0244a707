"""Errors that are the user's to fix (the CLI prints their one-line message and exits with 2;
a command of several runs leaves a run held elsewhere and exits with 1 at its end, and goes on
after a run stopped by an error and exits with 2 at its end), and the small checks of
command-line input that raise them."""
from __future__ import annotations

import errno
import os
from pathlib import Path


class UserError(Exception):
    """Bad input (a file, a flag, a dataset): the message says which and what is wrong."""


class DatasetError(UserError):
    """A dataset root, list file, image or mask that cannot be read as the layout promises."""


class RunHeldElsewhere(UserError):
    """A run that another cssbench process is running (it holds the lock of the run's folder or
    work dir): a command of several runs leaves it to that process and goes on."""


class RaisedByMainProcess(Exception):
    """Marks the error that the other processes raise when torchrun's rank 0 met one deciding
    for all of them (``distributed.decided_by_main``): rank 0 alone reports it."""


def refuse_repeats(option: str, *lists: list[str]) -> None:
    """Refuse what was given to ``option`` if one of ``lists`` names something twice."""
    twice = sorted({n for names in lists for n in names if names.count(n) > 1})
    if twice:
        raise UserError(f'{option}: {", ".join(twice)} given twice')


def comma_list(text: str) -> list[str]:
    """The items of a comma-separated option value, stripped; empty items dropped."""
    return [item.strip() for item in text.split(',') if item.strip()]


def refuse_unwritable_folder(option: str, given: str | Path, folder: Path) -> None:
    """Refuse what was given to ``option`` if ``folder`` (``given``, or a folder to be made in
    it) could not be made or written in: the nearest of it and the folders above it that
    exists is not a folder, or not one this process may write in (its permissions, a
    read-only mount). Tells without writing anything."""
    existing = folder
    while not os.path.lexists(existing):   # a broken symbolic link exists, as mkdir sees it
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f'{option} {given}: {existing} is not a folder')
    if not os.access(existing, os.W_OK | os.X_OK):
        read_only = os.statvfs(existing).f_flag & os.ST_RDONLY
        raise UserError(f'{option} {given}: cannot write in {existing} '
                        f'({os.strerror(errno.EROFS if read_only else errno.EACCES)})')


def refuse_unwritable_file(option: str, given: str | Path, what: str, advice: str = '') -> None:
    """Refuse what was given to ``option`` as the file to write ``what`` to (``the table``) if
    it is a folder, or in a folder that could not be made or written in
    (``refuse_unwritable_folder``). Tells without writing anything."""
    if Path(given).is_dir():
        raise UserError(f'{option} {given}: a folder; give {what} a file name{advice}')
    refuse_unwritable_folder(option, given, Path(given).absolute().parent)
