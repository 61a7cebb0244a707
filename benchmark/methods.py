"""The method registry: a method is a segmentor class registered under a short name."""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError, comma_list, refuse_repeats
from .registry import MODELS
from .store import PLAIN_NAME, is_plain_name


@dataclass(frozen=True)
class Method:
    name: str
    model_type: str         # the segmentor's name in cssbench's MODELS registry
    step0_kind: str | None  # the segmentor's: methods of one kind share a cached step 0
    joint: bool = False     # trains every class of the protocol in one step (upper bound)
    description: str = ''
    defined_in: str = ''    # the segmentor class's module and name


METHODS: dict[str, Method] = {}


def register_method(name: str, *, joint: bool = False, description: str = ''):
    """Class decorator: registers a segmentor as method ``name`` and in MODELS under its class
    name. The method's name names its runs' folders (a plain name); it and the class name are
    one class's each: another class taking either is refused, naming both (a module imported
    again registers its own classes again)."""
    if not is_plain_name(name):
        raise UserError(f'method name {name!r} is not {PLAIN_NAME}: it names its runs\' folders')
    if name == 'all':
        raise UserError("method name 'all' is --method's for every method: choose another")

    def wrap(cls):
        defined_in = _defined_in(cls)
        if name in METHODS and METHODS[name].defined_in != defined_in:
            raise UserError(f'{defined_in}: the method name {name!r} is taken, by '
                            f'{METHODS[name].defined_in}: choose another')
        namesake = MODELS.module_dict.get(cls.__name__)
        if namesake is not None and _defined_in(namesake) != defined_in:
            raise UserError(f'{defined_in}: the class name {cls.__name__} is taken, by '
                            f'{_defined_in(namesake)} (it names the model in the registry): '
                            f'rename the class')
        MODELS.register_module(cls.__name__, module=cls, force=True)
        METHODS[name] = Method(name, f'cssbench.{cls.__name__}', cls.step0_kind, joint,
                               description or (cls.__doc__ or '').strip().split('\n')[0],
                               defined_in)
        return cls
    return wrap


def _defined_in(cls) -> str:
    return f'{cls.__module__}.{cls.__qualname__}'


def registered_methods() -> dict[str, Method]:
    """Every method: the shipped ones (``baselines/``, imported here: they register as they
    load) and any registered since."""
    import cssbench.baselines  # noqa: F401
    return METHODS


def get_method(name: str) -> Method:
    methods = registered_methods()
    if name not in methods:
        unimported = unimported_file_registering(name)
        advice = (f'; {unimported} registers it, but baselines/__init__.py does not import it '
                  f'(add: from . import {unimported.stem})' if unimported else '')
        raise UserError(f'unknown method {name!r} (known: {", ".join(sorted(methods))}){advice}')
    return methods[name]


def unimported_file_registering(name: str) -> Path | None:
    """A module file of the baselines package that registers method ``name`` but was never
    imported (a new method whose import was forgotten), found by its text; None if none."""
    import cssbench.baselines as package
    registers = re.compile(rf"""register_method\(\s*['"]{re.escape(name)}['"]""")
    for path in sorted(Path(package.__file__).parent.glob('*.py')):
        if (f'{package.__name__}.{path.stem}' not in sys.modules
                and registers.search(path.read_text(errors='replace'))):
            return path
    return None


def method_names(spec: str) -> list[str]:
    """``all`` or a comma-separated list of method names, each checked."""
    if spec.strip() == 'all':
        return sorted(registered_methods())
    names = comma_list(spec)
    if not names:
        raise UserError('no method given')
    if 'all' in names:
        raise UserError(f'--method {spec}: all stands alone (it names every method)')
    refuse_repeats('--method', names)
    for name in names:
        get_method(name)
    return names
