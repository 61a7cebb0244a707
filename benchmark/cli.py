"""The ``cssbench`` command line."""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import select
import shlex
import signal
import sys
import traceback
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import (RaisedByMainProcess, RunHeldElsewhere, UserError, comma_list,
                     refuse_repeats, refuse_unwritable_file, refuse_unwritable_folder)
from .interrupts import noting_interrupts, raise_if_interrupted
from .store import DEFAULT_RESULTS, Store

if TYPE_CHECKING:
    from .protocols import Protocol

# Copies, checked by tests, of tables.FORMATS, synth.SYNTH_DEFAULTS and config.CPU_CONFIG: importing
# those modules (pandas, numpy, PIL, mmengine) would make every command, --help included, start up
# to seconds later.
FORMATS = ('md', 'csv', 'latex')
SYNTH_DEFAULTS = dict(n_train=2000, n_val=300, size=64, seed=0)
CPU_CONFIG = 'small'
DATA_ROOT_HELP = ('dataset folder (default: for dataset synth the generated one, for voc '
                  '$CSSBENCH_VOC_ROOT, for ade $CSSBENCH_ADE_ROOT)')


def cmd_list(args) -> None:
    from .methods import registered_methods
    from .protocols import available_protocols, load_protocol, settings_of
    methods = registered_methods()
    width = max(map(len, [*available_protocols(), *methods]))
    print('protocols:')
    for name in available_protocols():
        p = load_protocol(name)
        sizes = '-'.join(str(len(set(s) - {0})) for s in p.steps[:3]) + ('-...' if p.num_steps > 3 else '')
        settings = ', '.join(f'{k}: {v}' for k, v in settings_of(p.to_dict()).items())
        print(f'  {name:<{width}} {p.dataset:<6} {p.mode:<9} {p.num_steps:>2} steps  ({sizes})'
              + (f'  {settings}' if settings else ''))
    print('methods:')
    for name, m in sorted(methods.items()):
        print(f'  {name:<{width}} {m.description}')


def cmd_splits(args) -> None:
    from .io import atomic_write_json
    from .metrics import range_label
    from .protocols import load_protocol
    from .splits import index_dataset, protocol_splits, resolve_data_root
    given = load_protocol(args.protocol)
    protocol = given.with_class_order(0 if args.seed is None else args.seed)
    if args.seed is not None and not given.run_seed_draws_class_order:
        why = ('its class order is fixed' if given.ordering != 'random' else
               f'its class order is drawn with its class_order_seed, {given.ordering_seed}')
        print(f"cssbench: note: --seed changes nothing in {given.name}'s splits: {why}",
              file=sys.stderr)
    if args.out:   # before the scan, not after it
        refuse_unwritable_file('--out', args.out, 'the lists')
    root = resolve_data_root(protocol.dataset, args.data_root)
    index = index_dataset(protocol.dataset, root)
    steps = protocol_splits(protocol, index)
    drawn = f', class order drawn with seed {protocol.ordering_seed}' if protocol.ordering == 'drawn' else ''
    print(f'{protocol.name} ({protocol.mode}{drawn}) on {root}')
    print(f'{"step":>4} {"train":>7} {"val":>6}  classes')
    for s in steps:
        print(f'{s["step"]:>4} {len(s["train"]):>7} {len(s["val"]):>6}  {range_label(s["classes"])}')
    for s in steps:
        empty = ' or '.join(kind for kind, key in (('training', 'train'), ('evaluation', 'val'))
                            if not s[key])
        if empty:
            print(f'cssbench: note: step {s["step"]} has no {empty} images: `cssbench run` '
                  f'refuses this protocol on this data', file=sys.stderr)
    if args.out:
        seed = dict(class_order_seed=protocol.ordering_seed) if drawn else {}   # what drew it
        atomic_write_json(args.out, dict(protocol=protocol.name, **seed,
                                         dataset_fingerprint=index.fingerprint, steps=steps))
        print(f'wrote {args.out}')


def cmd_make_synth(args) -> None:
    from .synth import make_synth, writes_into
    out = Path(args.out).absolute()
    if writes_into(out):   # written from beside it (a temporary folder renamed)
        refuse_unwritable_folder('--out', args.out, out.parent)
    path = make_synth(args.out, n_train=args.n_train, n_val=args.n_val, size=args.size,
                      seed=args.seed, workers=args.workers)
    print(f'synthetic dataset at {path}')


def cmd_run(args) -> int:
    # A Ctrl-C stops it even where Python swallowed the KeyboardInterrupt (in a finalizer)
    with noting_interrupts():
        return _run_command(args)


def _run_command(args) -> int:
    parent = os.getppid()   # before the imports (seconds): under torchrun, its agent
    from .distributed import decided_by_main, is_main_process, start_from_env
    from .runner import locate_run, revision_of_this_process
    from .tables import format_step_table
    revision_of_this_process()   # the code imported now is what every run of the command runs
    start_from_env(parent)  # under torchrun: join the run's processes (rank 0 alone prints and writes)
    # Every input is checked before the first step trains; under torchrun, by rank 0 for all.
    protocols, runs = decided_by_main(_planned_runs)(args)
    several = len(runs) > 1
    if several:
        _check_runs_before_training(args, runs)
    left_to_others = {}   # run folder: protocol given
    stopped = {}          # run folder: protocol given (an error stopped it, reported above)
    for given, seed, method, run_name in runs:
        raise_if_interrupted()
        *_, name, folder = locate_run(given, method, args.results, run_name, args.config, seed)
        try:
            results = _run_one(args, several, given, seed, method, run_name)
        except RunHeldElsewhere as e:   # every process of a torchrun gets it, from rank 0
            if not several:
                raise
            if is_main_process():
                print(f'cssbench: note: {e}; left to it', file=sys.stderr)
            left_to_others[str(folder)] = given
            continue
        except Exception as e:
            if not (several and _goes_on_after(e, method)):
                raise
            _report_stopped_run(e, folder)
            stopped[str(folder)] = given
            continue
        print(format_step_table(protocols[given].name, method, name, results))
    if several and is_main_process():  # rank 0 reads the store
        _print_leaderboards(args.results, protocols, {*left_to_others.values(), *stopped.values()})
    if is_main_process():
        if left_to_others:
            print(f'cssbench: runs left to other cssbench processes, which the leaderboards may '
                  f'lack: {", ".join(left_to_others)}', file=sys.stderr)
        if stopped:
            print(f'cssbench: error: runs stopped by an error (above), which the leaderboards '
                  f'lack: {", ".join(stopped)}', file=sys.stderr)
    return 2 if stopped else 1 if left_to_others else 0


def _print_leaderboards(results: str, protocols: dict[str, Protocol], unfinished: set[str]) -> None:
    """Each protocol's leaderboard; a note instead for one of the protocols ``unfinished``
    (some run of it left to another process or stopped) of which no run is complete."""
    for given, protocol in protocols.items():
        try:
            print(render_table(results, protocol.name, 'md'))
        except UserError:   # none complete
            if given not in unfinished:
                raise
            print(f'cssbench: note: no leaderboard of {protocol.name}: no run of it is '
                  f'complete yet', file=sys.stderr)


def _goes_on_after(error: Exception, method: str) -> bool:
    """Whether a command of several runs goes on with its other runs after ``error`` stopped
    one of ``method``: after a refusal (a step gone NaN, a loss term refused) or an error
    raised in the method's own code (``_raised_in_method_code``: a bug the other methods do
    not share), unless it is the machine's (``_machine_error``), which the next run would meet
    too. In one process only: under torchrun an error can be one process's alone, the others
    still in the run's collectives."""
    if _under_torchrun() or _machine_error(error):
        return False
    return isinstance(error, UserError) or _raised_in_method_code(error, method)


def _machine_error(error: Exception) -> bool:
    """A full disk, stdout's reader gone (OSError), no memory left on the host (MemoryError,
    or a loader worker that the kernel's OOM killer killed: torch raises that from its
    SIGCHLD handler, in whatever code runs then, the method's too), a CUDA error."""
    import torch
    lost_loader_worker = (isinstance(error, RuntimeError)
                          and str(error).startswith('DataLoader worker (pid'))
    return lost_loader_worker or isinstance(
        error, (OSError, MemoryError, getattr(torch, 'AcceleratorError', ())))


def _raised_in_method_code(error: Exception, method: str) -> bool:
    """Whether ``error``'s traceback passes through the files that define ``method``'s
    segmentor and its bases up to ``IncrementalSegmentor`` (so not plain fine-tuning's)."""
    from .methods import get_method
    from .models import IncrementalSegmentor
    from .registry import MODELS
    model_cls = MODELS.get(get_method(method).model_type)
    files = {getattr(sys.modules.get(klass.__module__), '__file__', None)
             for klass in model_cls.__mro__
             if issubclass(klass, IncrementalSegmentor) and klass is not IncrementalSegmentor}
    files.discard(None)
    return any(frame.f_code.co_filename in files
               for frame, _ in traceback.walk_tb(error.__traceback__))


def _report_stopped_run(error: Exception, folder: Path) -> None:
    if isinstance(error, UserError):
        print(f'cssbench: error: {one_line(error)}', file=sys.stderr)
    else:   # not the user's: the traceback, as the command would have ended with
        traceback.print_exc()
    print(f"cssbench: note: {folder} stopped; going on with the command's other runs",
          file=sys.stderr)


def _run_one(args, several: bool, given: str, seed: int, method: str,
             run_name: str | None) -> list[dict]:
    """One run of the command; returns its per-step metrics."""
    from .runner import run_protocol
    with _advising_one_of_several(args, several, given, seed, method, run_name):
        return run_protocol(given, method, config=args.config, data_root=args.data_root,
                            epochs=args.epochs, results_root=args.results,
                            work_dir=args.work_dir, run_name=run_name, seed=seed,
                            overwrite=args.overwrite, resume=args.resume and not several,
                            keep_complete=several, deterministic=args.deterministic,
                            keep_epoch_checkpoints=args.keep_epoch_checkpoints,
                            step0_cache=not args.no_step0_cache,
                            compile=args.compile, fp32=args.fp32)


def _planned_runs(args) -> tuple[dict[str, Protocol], list[tuple]]:
    """The command's protocols (by the name or path given) and its runs, each ``(protocol
    given, seed, method, run name)``, in the order they run; refused: what ``load_protocols``
    and ``_checked_methods`` refuse, a run name that is not a plain folder name, a --results
    or --work-dir where a run's folder could not be made or written (before anything is
    written, or any data read), and for several runs a --work-dir, or --resume with none of
    them stored."""
    from .runner import locate_run, run_is_stored
    protocols = load_protocols(args.protocol)
    methods = _checked_methods(args, protocols)
    seeds = args.seeds or [0 if args.seed is None else args.seed]
    runs = [(given, seed, method,
             args.run_name and (f'{args.run_name}-seed{seed}' if args.seeds else args.run_name))
            for given in protocols for seed in seeds for method in methods]
    if len(runs) > 1 and args.work_dir:
        raise UserError('--work-dir holds the checkpoints of one run: leave it out with several '
                        'protocols, methods or seeds (each run then works inside its results '
                        'folder)')
    for given, seed, method, run_name in runs:
        *_, folder = locate_run(given, method, args.results, run_name, args.config, seed)
        refuse_unwritable_folder('--results', args.results, folder)
    if args.work_dir:
        refuse_unwritable_folder('--work-dir', args.work_dir, Path(args.work_dir))
    if len(runs) > 1 and args.resume and not any(
            run_is_stored(given, method, args.results, run_name, args.config, seed)
            for given, seed, method, run_name in runs):
        raise UserError(f'{args.results}: none of these runs is stored; no run to resume')
    return protocols, runs


def _checked_methods(args, protocols: dict[str, Protocol]) -> list[str]:
    """``--method``'s methods; refused first, a --data-root for protocols on several
    datasets, and after, a config that does not load for a protocol's dataset, sets what a
    method, its backbone or its head does not take, builds no model, or has a batch that
    torchrun's processes cannot share."""
    from .config import load_config
    from .distributed import world_size
    from .engine import per_process_batch
    from .methods import get_method, method_names
    from .runner import check_model_builds
    datasets = sorted({p.dataset for p in protocols.values()})
    if args.data_root and len(datasets) > 1:
        raise UserError(f'--data-root is the folder of one dataset, and these protocols are on '
                        f'{" and ".join(datasets)}: run them apart')
    methods = method_names(args.method)
    for dataset in datasets:
        cfg = load_config(args.config, args.epochs, dataset=dataset, compile=args.compile,
                          fp32=args.fp32)
        per_process_batch(cfg.data.batch_size, world_size())
        protocol = next(p for p in protocols.values() if p.dataset == dataset)
        for method in methods:
            check_model_builds(cfg, get_method(method).model_type, protocol)
    return methods


def _check_runs_before_training(args, runs: list[tuple]) -> None:
    """A command of several runs checks every run's inputs before the first trains. It
    continues as a whole: the runs it finished are kept, and --resume asks only that one of
    them was started (``_planned_runs``)."""
    from .methods import get_method
    from .runner import check_run_inputs
    data_checked = set()   # the data checks read the protocol, its drawn order, joint or not
    for given, seed, method, run_name in runs:
        data = (given, seed, get_method(method).joint)
        with _advising_one_of_several(args, True, given, seed, method, run_name):
            if check_run_inputs(given, method, config=args.config, data_root=args.data_root,
                                epochs=args.epochs, results_root=args.results, run_name=run_name,
                                seed=seed, deterministic=args.deterministic,
                                overwrite=args.overwrite, check_data=data not in data_checked):
                data_checked.add(data)


@contextlib.contextmanager
def _advising_one_of_several(args, several: bool, given: str, seed: int, method: str,
                             run_name: str | None):
    """A refusal of one run of a command of several that advises --overwrite or --work-dir:
    given to that command, --overwrite would train every run again, complete ones included,
    and --work-dir is refused; the refusal names the command of that run alone instead."""
    try:
        yield
    except UserError as e:
        if (not several or isinstance(e, RaisedByMainProcess)
                or not any(option in str(e) for option in ('--overwrite', '--work-dir'))):
            raise
        alone = _command_of_one_run(args, given, seed, method, run_name)
        raise UserError(f'{e} (with several runs, --overwrite would train every one again and '
                        f'--work-dir is refused: give what this advises to the command of this '
                        f'run alone, {alone})') from None


def _command_of_one_run(args, given: str, seed: int, method: str, run_name: str | None) -> str:
    """The ``cssbench run`` of one run of a command of several: its protocol, method, seed and
    name, and every other option the command was given (they decide the run's folder, config
    and data), but --overwrite and --resume."""
    defaults = vars(parse_arguments(['run', '--protocol', given]))
    one = dict(vars(args), seeds=None, run_name=run_name, overwrite=False, resume=False)
    words = ['cssbench', 'run', f'--protocol={given}', f'--method={method}', f'--seed={seed}']
    for dest, value in one.items():
        if dest not in ('protocol', 'method', 'seed') and value != defaults[dest]:
            option = '--' + dest.replace('_', '-')   # --option=value: a value may start with -
            words.append(option if value is True else f'{option}={value}')
    return shlex.join(words)


def load_protocols(text: str) -> dict[str, Protocol]:
    """``--protocol``'s protocols, by the name or path given: one, or several separated by
    commas; each loaded (and so checked), none named twice."""
    from .protocols import load_protocol
    if Path(text).is_file():   # a path with a comma in it
        given = [text]
    else:
        given = comma_list(text)
    if not given:
        raise UserError(f'--protocol: expected a protocol, or several separated by commas, got {text!r}')
    protocols = {name: load_protocol(name) for name in given}
    # given twice, or by its name and its file
    refuse_repeats('--protocol', given, [p.name for p in protocols.values()])
    return protocols


def cmd_bench(args) -> None:
    from .bench import run_bench
    run_bench(config=args.config, size=args.size, data_root=args.data_root, batch=args.batch,
              iters=args.iters, warmup=args.warmup, workers=args.workers, compile=args.compile,
              amp=args.amp, teacher=args.teacher, profile=args.profile)


def _patterns(text: str | None) -> list[str] | None:
    return comma_list(text) if text else None


def read_store(results: str) -> Store:
    """The results store, for a command that reads it: one the user cannot write is read all
    the same, with a line on stderr where its index stays stale on disk. A file given as one
    is refused (read as a store it held no run, and the advice to store one there failed)."""
    from .store import open_store
    if Path(results).exists() and not Path(results).is_dir():
        raise UserError(f'--results {results}: a file, not a folder of results')
    store = open_store(results)
    note = store.index_note()
    if note:
        print(f'cssbench: note: {note}', file=sys.stderr)
    return store


def render_table(results: str, protocol: str, fmt: str, kind: str = 'leaderboard',
                 run: str | None = None, config: str | None = None) -> str:
    from .tables import TABLES, render
    store = read_store(results)
    return render(TABLES[kind](store, protocol, _patterns(run), config), fmt)


def _require_protocol_or_all(args, command: str) -> None:
    """One of --protocol and --all; --all takes none of the options that choose what it
    writes (table's: every protocol, in every format, every kind of table)."""
    if not args.all and not args.protocol:
        raise UserError(f'{command}: give --protocol P, or --all for every protocol')
    if args.all:
        given = [option for option, value in (
            ('--protocol', args.protocol), ('--format', getattr(args, 'format', None)),
            ('--per-step', getattr(args, 'per_step', False)),
            ('--per-class', getattr(args, 'per_class', False))) if value]
        if given:
            what = ("writes every protocol's tables, in every format" if command == 'table'
                    else 'plots every protocol')
            raise UserError(f'{command} --all {what}: drop {" and ".join(given)}, or --all')


def _tables_folder(args) -> Path:
    """Where ``--all`` tables and the plots go: ``--out``, else ``<results>/tables`` (the
    store read first: ``read_store`` refuses a file given as one)."""
    folder = Path(args.out) if args.out else Path(args.results) / 'tables'
    if folder.exists() and not folder.is_dir():
        raise UserError(f'{folder}: a file, where a folder for the tables and plots is needed')
    if args.out:
        refuse_unwritable_folder('--out', args.out, folder)
    else:   # a store read-only to its reader (README: give --out)
        try:
            refuse_unwritable_folder('--results', args.results, folder)
        except UserError as e:
            raise UserError(f'{e}; --out DIR writes the tables and plots elsewhere') from None
    return folder


def cmd_table(args) -> None:
    from .tables import chosen_by, write_all_tables
    _require_protocol_or_all(args, 'table')
    if args.all:
        store = read_store(args.results)
        out = _tables_folder(args)
        written, not_written = write_all_tables(store, out, _patterns(args.run), args.config)
        for line in not_written:
            print(line)
        if not written:
            raise UserError(f'{args.results}: no complete run{chosen_by(args.run, args.config)} '
                            f'stored; nothing to tabulate'
                            + _configs_advice(store, store.protocols(), args))
        _remove_unwritten(out, 'table', written, every_protocol=True)
        print(f'wrote {sum(map(len, written.values()))} files to {out}/')
        return
    kind = 'per_step' if args.per_step else 'per_class' if args.per_class else 'leaderboard'
    if args.out:
        refuse_unwritable_file('--out', args.out, 'the table',
                               ' (--all writes every table into a folder)')
    text = render_table(args.results, stored_protocol_name(args.protocol, args.results), args.format or 'md',
                        kind, args.run, args.config)
    if args.out:
        from .io import atomic_write_text
        atomic_write_text(args.out, text)
        print(f'wrote {args.out}')
    else:
        print(text, end='')


def cmd_plot(args) -> None:
    from .plots import write_protocol_plots
    from .store import select_runs
    from .tables import chosen_by, runs_of_protocol
    _require_protocol_or_all(args, 'plot')
    store = read_store(args.results)
    protocols = (store.protocols_with_skipped() if args.all
                 else [stored_protocol_name(args.protocol, args.results)])
    out = _tables_folder(args)
    written = {}
    for protocol in protocols:
        # one protocol: refused as table refuses it, saying what is stored or how to store it
        if not args.all:
            rows = runs_of_protocol(store, protocol, _patterns(args.run), args.config)
        else:
            try:
                rows = select_runs(store, protocol, _patterns(args.run), args.config)
            except UserError as e:   # as table --all: the other protocols' plots still go
                print(f'cssbench: no plots for {protocol}: {e}', file=sys.stderr)
                continue
        if rows:
            written[protocol] = write_protocol_plots(protocol, rows, out)
    if not written:
        raise UserError(f'{args.results}: no complete run{chosen_by(args.run, args.config)} stored '
                        f'for {", ".join(protocols) or "any protocol"}'
                        + _configs_advice(store, protocols, args)
                        + ''.join(map(store.skipped_note, protocols)))
    for skipped in (s for protocol in protocols for s in store.skipped_in(protocol)):
        print(f'cssbench: skipped {skipped.path}: {skipped.reason}', file=sys.stderr)
    for path in (path for paths in written.values() for path in paths):
        print(f'wrote {path}')
    _remove_unwritten(out, 'plot', written, every_protocol=args.all)


def _remove_unwritten(out: Path, command: str, written: dict[str, list[Path]],
                      every_protocol: bool) -> None:
    """Deletes the files an earlier ``command`` wrote into ``out`` that this one did not write
    (io.replace_written), saying so."""
    from .io import replace_written
    for path in replace_written(out, command, written, every_protocol):
        print(f'removed {path}: an earlier `cssbench {command}` wrote it, this one did not')


def _configs_advice(store: Store, protocols: list[str], args) -> str:
    from .tables import configs_of_runs
    advice = configs_of_runs(store, protocols, _patterns(args.run), args.config)
    return f'; {advice}' if advice else ''


def stored_protocol_name(text: str, results: str) -> str:
    """Results are stored under the protocol's name; a protocol file's path gives its name,
    refused where the runs stored under it are of another protocol (as ``run`` refuses it)."""
    from .protocols import check_stored_protocol_name, is_protocol_path, load_protocol
    if is_protocol_path(text):
        protocol = load_protocol(text)
        check_stored_protocol_name(Path(results), protocol, 'their tables are not of this one')
        return protocol.name
    return text


def path_value(text: str) -> str:
    """A path option's value (or a config's name), a leading ``~`` the home folder: no shell
    expands it in ``--out=~/x``. An empty one (an unset variable's ``--out "$DIR"``) is refused:
    it would mean the current folder, or the default, or nothing, where something else was
    meant."""
    if not text:
        raise argparse.ArgumentTypeError('an empty value')
    return os.path.expanduser(text)


def seed_value(text: str) -> int:
    if not text.strip().isdecimal():
        raise argparse.ArgumentTypeError(f'expected a non-negative integer, got {text!r}')
    return int(text)


def seed_list(text: str) -> list[int]:
    """``--seeds``: distinct seeds, each as ``--seed`` takes it, separated by commas."""
    try:
        seeds = [seed_value(s) for s in comma_list(text)]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f'expected comma-separated non-negative integers, got {text!r}') from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f'expected distinct non-negative integers, got {text!r}')
    return seeds


class _Parser(argparse.ArgumentParser):
    """argparse's parser taking every option by its whole name only: an abbreviation
    (``--proto``) that a later option made ambiguous would break the scripts using it. The
    commands' parsers are of the top-level parser's class (``add_subparsers``' default)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(allow_abbrev=False, **kwargs)


def _add_results_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--results', type=path_value, default=DEFAULT_RESULTS,
                        help='results folder (default: %(default)s)')


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog='cssbench', description='Class-incremental semantic segmentation benchmark: run '
        'methods through protocols, tabulate and plot the results.')
    sub = parser.add_subparsers(dest='command', required=True)

    p = sub.add_parser('list', help='show the shipped protocols and methods')
    p.set_defaults(func=cmd_list)

    p = sub.add_parser('splits', help="print a protocol's per-step image counts, write the lists")
    p.add_argument('--protocol', required=True, help='a protocol (a name `list` shows, or a .yaml file)')
    p.add_argument('--data-root', type=path_value, help=DATA_ROOT_HELP)
    p.add_argument('--out', type=path_value, help='write the per-step lists to this JSON file')
    p.add_argument('--seed', type=seed_value,
                   help="the run seed, which draws a random class order (class_order: random; "
                        "default 0)")
    p.set_defaults(func=cmd_splits)

    p = sub.add_parser('make-synth', help='generate the synthetic dataset in the VOC layout')
    p.add_argument('--out', type=path_value, required=True,
                   help='the folder to write it into: new, empty, or holding a dataset of the same '
                        'parameters (then reused as it is)')
    p.add_argument('--n-train', type=int, default=SYNTH_DEFAULTS['n_train'],
                   help='training images (default: %(default)s)')
    p.add_argument('--n-val', type=int, default=SYNTH_DEFAULTS['n_val'],
                   help='validation images (default: %(default)s)')
    p.add_argument('--size', type=int, default=SYNTH_DEFAULTS['size'],
                   help='image side in pixels (default: %(default)s; 512 for GPU work)')
    p.add_argument('--seed', type=seed_value, default=SYNTH_DEFAULTS['seed'], help='default: %(default)s')
    p.add_argument('--workers', type=int, default=1,
                   help='processes that draw the images (default: 1; the same files for any number)')
    p.set_defaults(func=cmd_make_synth)

    p = sub.add_parser('run', help='train and evaluate a method through every step of a protocol')
    p.add_argument('--protocol', required=True,
                   help='a protocol (a name `list` shows, or a .yaml file), or several separated '
                        'by commas, each run in turn')
    p.add_argument('--method', default='ft',
                   help='a method, several separated by commas, or all (default: ft)')
    p.add_argument('--config', type=path_value, default=CPU_CONFIG,
                   help='small | deeplabv3-r101 | path to a config .py (default: %(default)s)')
    p.add_argument('--data-root', type=path_value, help=DATA_ROOT_HELP)
    p.add_argument('--epochs', type=int, help="epochs per step (default: the config's for the protocol's dataset)")
    seeds = p.add_mutually_exclusive_group()
    # default None, not 0: argparse takes a value equal to the default for no value, and
    # would let `--seed 0 --seeds 1,2` through
    seeds.add_argument('--seed', type=seed_value, help='default: 0')
    seeds.add_argument('--seeds', type=seed_list, help='several seeds, e.g. 0,1,2: each one run in turn')
    p.add_argument('--run-name', help='default: <config>-seed<seed> (with --seeds: <name>-seed<seed>)')
    _add_results_option(p)
    p.add_argument('--work-dir', type=path_value, help='checkpoints and logs (default: <run folder>/work)')
    stored = p.add_mutually_exclusive_group()
    stored.add_argument('--overwrite', action='store_true',
                        help='replace a stored run of the same name')
    stored.add_argument('--resume', action='store_true',
                        help='continue a stopped run (the default when one exists); error if none')
    p.add_argument('--deterministic', action='store_true',
                   help="torch's deterministic algorithms (slower on GPU)")
    p.add_argument('--no-step0-cache', action='store_true',
                   help='train step 0 even if a cached model of the same step 0, data, config '
                        'and seed exists (shared by methods that train step 0 alike, e.g. ft, '
                        'lwf and mib, or sdr and sdr+mib, and by protocols that begin alike, '
                        'e.g. 15-1 and 15-5)')
    p.add_argument('--keep-epoch-checkpoints', action='store_true',
                   help="keep each step's last epoch checkpoints (default: only its weights)")
    p.add_argument('--compile', action='store_true',
                   help='torch.compile the backbone and the head (first iterations slower)')
    p.add_argument('--fp32', action='store_true',
                   help="the reference code's regime: fp32, no channels_last, no cudnn benchmark, "
                        "the teacher as trained (default on GPU: the config's speed section; unless "
                        "it sets others, bf16 autocast, channels_last, cudnn benchmark, the "
                        "teacher made for inference)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser('bench', help='training and evaluation throughput, fp32 eager vs the fast '
                                     'path, and the projected time of voc-15-1-overlap')
    p.add_argument('--config', type=path_value, help='default: deeplabv3-r101 on GPU, small on CPU')
    p.add_argument('--size', type=int,
                   help='side of the synthetic images (default: 512 on GPU, 64 on CPU; not with '
                        '--data-root)')
    p.add_argument('--data-root', type=path_value, help='a VOC-layout dataset to read instead of the synthetic one')
    p.add_argument('--batch', type=int, help="training batch (default: the config's)")
    p.add_argument('--iters', type=int, default=20,
                   help='timed iterations of each training case and of evaluation, in each '
                        'regime (default: 20)')
    p.add_argument('--warmup', type=int, default=5, help='untimed iterations before them (default: 5)')
    p.add_argument('--workers', type=int, help="loader workers (default: the config's)")
    p.add_argument('--compile', action='store_true',
                   help='also measure the fast path with torch.compile (a third regime; with several --amp, '
                        'one per dtype)')
    p.add_argument('--amp', metavar='DTYPES',
                   help="the fast path's autocast dtype, or several to compare side by side, "
                        "comma-separated: bfloat16, float16 (default: the config's; GPU only)")
    p.add_argument('--teacher', metavar='KINDS',
                   help="the fast path's teacher: made for inference (BNs folded) or as trained, "
                        "or both side by side: inference,trained (default: the config's "
                        "inference_teacher; GPU only)")
    p.add_argument('--profile', action='store_true',
                   help="also profile each regime's training steps: their time by kind of work "
                        "(convolutions, batch norm, ...) and the longest kernels")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser('table', help='methods side by side, from the results store')
    p.add_argument('--protocol', help='a protocol with stored runs (its name, or its .yaml file)')
    p.add_argument('--all', action='store_true',
                   help="write every protocol's tables, in every format, to <results>/tables/")
    p.add_argument('--format', choices=FORMATS, help='default: md (--all writes all three)')
    kind = p.add_mutually_exclusive_group()
    kind.add_argument('--per-step', action='store_true', help='old / new / all after every step')
    kind.add_argument('--per-class', action='store_true', help='forgetting of every old class')
    p.add_argument('--run', help='use the runs of these names (comma-separated, globs allowed) '
                                 'instead of the latest run of each seed')
    p.add_argument('--config', type=path_value, help="only runs of this config (a config file's also by its bare "
                                    "name: anchor for cfgs/anchor.py)")
    _add_results_option(p)
    p.add_argument('--out', type=path_value, help='write to this file (with --all: this folder)')
    p.set_defaults(func=cmd_table)

    p = sub.add_parser('plot', help='mIoU-by-step and per-class IoU figures (PNG)')
    p.add_argument('--protocol', help='as for table')
    p.add_argument('--all', action='store_true', help='every protocol with results')
    p.add_argument('--run', help='as for table')
    p.add_argument('--config', type=path_value, help='as for table')
    _add_results_option(p)
    p.add_argument('--out', type=path_value, help='folder for the PNGs (default: <results>/tables)')
    p.set_defaults(func=cmd_plot)
    for command_parser in sub.choices.values():   # its usage, for an option it does not know
        command_parser.set_defaults(command_parser=command_parser)
    return parser


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    """The command line's arguments; an option the command does not know (a typo) is refused
    with that command's usage, where argparse would show the top-level one."""
    args, unknown = build_parser().parse_known_args(argv)
    command_parser = vars(args).pop('command_parser')
    if unknown:
        command_parser.error(f'unrecognized arguments: {" ".join(unknown)}')
    return args


def one_line(error: Exception) -> str:
    """The error's own message. A DataLoader worker re-raises it with the worker's traceback
    in the message, whose last line is the original ``Type: message``."""
    message = str(error).strip()
    if '\n' in message:
        message = message.splitlines()[-1].split(': ', 1)[-1]
    return message


def stdout_reader_left() -> bool:
    """Whether stdout is a pipe (or socket) whose reading end is closed: poll reports an
    error or a hang-up on it."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):   # no stdout, or no file descriptor under it
        return False


def send_stdout_nowhere() -> None:
    """What stdout still holds would fail again, as an error, at the interpreter's exit."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def main(argv: list[str] | None = None) -> int:
    with contextlib.redirect_stderr(io.StringIO()) if _is_other_process() else contextlib.nullcontext():
        args = parse_arguments(argv)   # a usage error: rank 0 prints it (torchrun)
    if _under_torchrun() and args.command != 'run':   # each process would print and write it
        if not _is_other_process():
            print(f'cssbench: error: {args.command} runs in one process: only `cssbench run` '
                  f'runs under torchrun', file=sys.stderr)
        return 2
    try:
        # None: done; run: 1 where it left runs to others, 2 where some stopped on an error
        status = args.func(args) or 0
        if sys.stdout is not None:   # None: started with no stdout at all
            sys.stdout.flush()   # here, where a reader that left is handled, rather than at exit
    except RaisedByMainProcess as e:   # torchrun: rank 0 reports it
        return 2 if isinstance(e, (UserError, OSError)) else 1
    except (UserError, OSError) as e:   # OSError: a path given that cannot be written or read
        if isinstance(e, BrokenPipeError) and stdout_reader_left():   # `cssbench list | head`
            send_stdout_nowhere()
            return 141   # 128 + SIGPIPE, as a command that the signal stopped
        print(f'cssbench: error: {one_line(e)}', file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if _is_other_process():   # torchrun interrupts every process; rank 0 says it
            return 130
        if args.command == 'bench':   # it keeps nothing to resume: a rerun measures anew
            rerun = 'the measures taken so far are above'
        elif getattr(args, 'overwrite', False):
            rerun = ('rerun it to start over, or without --overwrite to continue where it stopped '
                     '(a complete run it had not yet replaced stays as it was)')
        else:
            rerun = 'rerun the same command to resume'
        print(f'cssbench: interrupted; {rerun}', file=sys.stderr)
        return 130
    except RuntimeError as e:
        if not _lost_another_process(e):
            raise
        print('cssbench: error: another process of this run stopped (its message is above); '
              'rerun the same command to resume', file=sys.stderr)
        return 1
    return status


def command_main() -> int:
    """The ``cssbench`` command (``main`` is its body, also called in-process by tests). Once a
    Ctrl-C has stopped it, a second one is ignored: the command is ending, and it would only
    break into Python's shutdown (torch's exit handlers) with a traceback."""
    status = main()
    if status == 130:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    return status


def _under_torchrun() -> bool:
    return int(os.environ.get('WORLD_SIZE', '1')) > 1   # as distributed.start_from_env reads it


def _is_other_process() -> bool:
    """A process of torchrun's other than rank 0 (told without importing torch)."""
    return _under_torchrun() and os.environ.get('RANK', '0') != '0'


def _lost_another_process(error: RuntimeError) -> bool:
    """Whether ``error`` is gloo's (CPU), in a process of a torchrun whose other process
    stopped (on an error of its own, which it printed) in the middle of a collective."""
    return _under_torchrun() and any(lost in str(error) for lost in ('closed by peer', 'reset by peer'))
