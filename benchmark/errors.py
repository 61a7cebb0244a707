"""Errors that are the user's to fix (the CLI prints their one-line message and exits with 2),
and the small checks of command-line input that raise them."""


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
