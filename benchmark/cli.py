"""The ``cssbench`` command line."""
from __future__ import annotations

import argparse
import sys

from .errors import UserError

DEFAULT_RESULTS = 'results'


def cmd_list(args) -> None:
    from .methods import METHODS, get_method
    from .protocols import available_protocols, load_protocol
    get_method('ft')  # registers the shipped methods
    print('protocols:')
    for name in available_protocols():
        p = load_protocol(name)
        sizes = '-'.join(str(len(set(s) - {0})) for s in p.steps[:3]) + ('-...' if p.num_steps > 3 else '')
        print(f'  {name:<24} {p.dataset:<6} {p.mode:<9} {p.num_steps:>2} steps  ({sizes})')
    print('methods:')
    for name, m in sorted(METHODS.items()):
        print(f'  {name:<24} {m.description}')


def cmd_splits(args) -> None:
    from .io import atomic_write_json
    from .protocols import load_protocol
    from .splits import index_dataset, protocol_splits, resolve_data_root
    protocol = load_protocol(args.protocol)
    root = resolve_data_root(protocol.dataset, args.data_root)
    index = index_dataset(protocol.dataset, root)
    steps = protocol_splits(protocol, index)
    print(f'{protocol.name} ({protocol.mode}) on {root}')
    print(f'{"step":>4}  {"classes":<14} {"train":>7} {"val":>6}')
    for s in steps:
        classes = f'{s["classes"][0]}-{s["classes"][-1]}' if len(s['classes']) > 1 else str(s['classes'][0])
        print(f'{s["step"]:>4}  {classes:<14} {len(s["train"]):>7} {len(s["val"]):>6}')
    if args.out:
        atomic_write_json(args.out, dict(protocol=protocol.name, dataset_fingerprint=index.fingerprint,
                                         steps=steps))
        print(f'wrote {args.out}')


def cmd_make_synth(args) -> None:
    from .synth import make_synth
    path = make_synth(args.out, n_train=args.n_train, n_val=args.n_val, size=args.size,
                      seed=args.seed, workers=args.workers)
    print(f'synthetic dataset at {path}')


def cmd_run(args) -> None:
    from .methods import method_names
    from .protocols import load_protocol
    from .runner import load_config, run_protocol
    from .tables import format_comparison, format_step_table
    load_protocol(args.protocol)  # every input checked before the first step trains
    load_config(args.config, args.epochs)
    methods = method_names(args.method)
    for method in methods:
        results = run_protocol(args.protocol, method, config=args.config, data_root=args.data_root,
                               epochs=args.epochs, results_root=args.results, work_dir=args.work_dir,
                               run_name=args.run_name, seed=args.seed, overwrite=args.overwrite,
                               resume=args.resume, deterministic=args.deterministic,
                               keep_epoch_checkpoints=args.keep_epoch_checkpoints,
                               step0_cache=not args.no_step0_cache)
        print(format_step_table(args.protocol, method, results))
    if len(methods) > 1:
        print(format_comparison(args.results, args.protocol))


def cmd_table(args) -> None:
    from .tables import format_comparison
    print(format_comparison(args.results, args.protocol))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='cssbench', description=__doc__)
    sub = parser.add_subparsers(dest='command', required=True)

    p = sub.add_parser('list', help='show the shipped protocols and methods')
    p.set_defaults(func=cmd_list)

    p = sub.add_parser('splits', help="print a protocol's per-step image counts, write the lists")
    p.add_argument('--protocol', required=True)
    p.add_argument('--data-root', help='dataset folder (default for synth-*: the generated one)')
    p.add_argument('--out', help='write the per-step lists to this JSON file')
    p.set_defaults(func=cmd_splits)

    p = sub.add_parser('make-synth', help='generate the synthetic dataset in the VOC layout')
    p.add_argument('--out', required=True)
    p.add_argument('--n-train', type=int, default=2000)
    p.add_argument('--n-val', type=int, default=300)
    p.add_argument('--size', type=int, default=64, help='image side in pixels (512 for GPU work)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--workers', type=int, default=1)
    p.set_defaults(func=cmd_make_synth)

    p = sub.add_parser('run', help='train and evaluate a method through every step of a protocol')
    p.add_argument('--protocol', required=True)
    p.add_argument('--method', default='ft',
                   help='a method, several separated by commas, or all')
    p.add_argument('--config', default='small', help='small | deeplabv3-r101 | path to a config .py')
    p.add_argument('--data-root')
    p.add_argument('--epochs', type=int, help="epochs per step (default: the config's)")
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--run-name', help='default: <config>-seed<seed>')
    p.add_argument('--results', default=DEFAULT_RESULTS, help='results folder (default: results)')
    p.add_argument('--work-dir', help='checkpoints and logs (default: <run folder>/work)')
    p.add_argument('--overwrite', action='store_true', help='replace a stored run of the same name')
    p.add_argument('--resume', action='store_true',
                   help='continue a stopped run (the default when one exists); error if none')
    p.add_argument('--deterministic', action='store_true',
                   help="torch's deterministic algorithms (slower on GPU)")
    p.add_argument('--no-step0-cache', action='store_true',
                   help='train step 0 even if a cached step-0 model of the same protocol, data, '
                        'config and seed exists (methods whose step 0 is fine-tuning share it)')
    p.add_argument('--keep-epoch-checkpoints', action='store_true',
                   help="keep each step's last epoch checkpoints (default: only its weights)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser('table', help='methods side by side after the last step, from stored results')
    p.add_argument('--protocol', required=True)
    p.add_argument('--results', default=DEFAULT_RESULTS)
    p.set_defaults(func=cmd_table)
    return parser


def one_line(error: Exception) -> str:
    """The error's own message. A DataLoader worker re-raises it with the worker's traceback
    in the message, whose last line is the original ``Type: message``."""
    message = str(error).strip()
    if '\n' in message:
        message = message.splitlines()[-1].split(': ', 1)[-1]
    return message


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (UserError, FileExistsError) as e:
        print(f'cssbench: error: {one_line(e)}', file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print('cssbench: interrupted; rerun the same command to resume', file=sys.stderr)
        return 130
    return 0
