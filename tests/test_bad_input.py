"""Bad input: one line on stderr that names the file and what is wrong, exit status 2."""
from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import shutil
import subprocess
import sys

from pathlib import Path

import pytest

import cssbench.runner as runner
from cssbench.cli import build_parser, main, parse_arguments, path_value
from cssbench.synth import make_synth
from conftest import locked_by_another_process, make_voc_tree, mask_with, stop_run_in_step

CONFIGS = Path(__file__).resolve().parent.parent / 'benchmark' / 'configs'


def fails(capsys, *args: str) -> str:
    """Runs the CLI, expects exit status 2 and one error line last; returns that line.

    Progress bars (cleared with carriage returns) may precede the error on stderr.
    """
    assert main(list(args)) == 2
    err = capsys.readouterr().err
    assert 'Traceback' not in err, err
    last = err.replace('\r', '\n').strip().splitlines()[-1]
    assert last.startswith('cssbench: error: '), err
    return last


@pytest.fixture
def voc_root(tmp_path) -> Path:
    return make_voc_tree(tmp_path / 'voc', {'a': mask_with({0, 1}), 'b': mask_with({0, 16})},
                         {'c': mask_with({0, 1})})


@pytest.fixture(scope='module')
def tiny_run(tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp('bad')
    config = base / 'tiny.py'
    config.write_text(f"_base_ = ['{CONFIGS / 'small.py'}']\n"
                      "data = dict(crop_size=32, batch_size=4, num_workers=1)\n")
    return dict(base=base, config=str(config))


def test_a_reader_that_left_ends_the_command_quietly():
    """``cssbench list | head -1``: the rest of the output has nowhere to go; no traceback,
    no error line, the exit status of a command stopped by SIGPIPE."""
    read_end, write_end = os.pipe()
    os.close(read_end)   # the reader has left before the first write
    try:
        proc = subprocess.run([sys.executable, '-m', 'cssbench', 'list'], stdout=write_end,
                              stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write_end)
    assert (proc.returncode, proc.stderr) == (141, '')



def test_a_command_started_without_stdout_runs():
    # `cssbench list >&-`: Python has no sys.stdout at all
    proc = subprocess.run([sys.executable, '-m', 'cssbench', 'list'], preexec_fn=lambda: os.close(1),
                          stderr=subprocess.PIPE, text=True, timeout=120)
    assert (proc.returncode, proc.stderr) == (0, '')


def test_a_broken_pipe_that_is_not_stdouts_is_an_error(capsys, monkeypatch):
    # e.g. a loader worker's pipe: not the reader of the output leaving
    def broken(args):
        raise BrokenPipeError(32, 'Broken pipe')
    monkeypatch.setattr('cssbench.cli.cmd_list', broken)
    assert main(['list']) == 2
    assert capsys.readouterr().err == 'cssbench: error: [Errno 32] Broken pipe\n'


@pytest.mark.parametrize('argv, usage', [
    (['table', '--protocol', 'voc-15-1-overlap', '--per-stp'], 'usage: cssbench table '),
    (['run', '--protocol', 'synth-15-1-overlap', '--bogus', 'x'], 'usage: cssbench run '),
])
def test_an_option_the_command_does_not_know_shows_that_commands_usage(argv, usage, capsys):
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(usage), err
    command = argv[0]
    unknown = ' '.join(argv[3:])
    assert err.splitlines()[-1] == f'cssbench {command}: error: unrecognized arguments: {unknown}'


@pytest.mark.parametrize('argv, error', [
    (['run', '--proto', 'nope'], 'the following arguments are required: --protocol'),
    (['run', '--protocol', 'nope', '--epoch', '3'], 'unrecognized arguments: --epoch 3'),
    (['table', '--proto', 'nope'], 'unrecognized arguments: --proto nope'),
])   # (a protocol that does not exist: taken, the command fails at once)
def test_an_abbreviated_option_is_refused(argv, error, capsys):
    # argparse would take --proto for --protocol: an option added later (--protocol-file)
    # would make it ambiguous, and the scripts using it fail
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == f'cssbench {argv[0]}: error: {error}'


PATH_OPTIONS = {'run': ['--config', '--data-root', '--results', '--work-dir'],
                'splits': ['--data-root', '--out'], 'make-synth': ['--out'],
                'bench': ['--config', '--data-root'], 'table': ['--config', '--out', '--results'],
                'plot': ['--config', '--out', '--results']}


@pytest.mark.parametrize('command, option', [(c, o) for c, options in PATH_OPTIONS.items()
                                             for o in options])
def test_an_empty_path_or_config_is_refused(command, option, tmp_path, monkeypatch, capsys):
    """An unset variable's ``--results "$DIR"`` ran in the current folder, ``splits --out ""``
    wrote no file, ``make-synth --out ""`` wrote into the current folder, and ``--config ""``
    took the default."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stopped:
        main([command, option, ''])   # refused as it is read, before a missing --protocol
    assert stopped.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f'cssbench {command}: error: argument {option}: an empty value')
    assert not any(tmp_path.iterdir())


REQUIRED_OPTIONS = {'run': ['--protocol', 'p'], 'splits': ['--protocol', 'p'],
                    'make-synth': ['--out', 'synth']}


@pytest.mark.parametrize('command, option', [(c, o) for c, options in PATH_OPTIONS.items()
                                             for o in options])
def test_a_path_option_takes_a_leading_tilde_for_the_home_folder(command, option, tmp_path,
                                                                 monkeypatch):
    """No shell expands the ~ of ``--out=~/x``: ``splits --out`` checked the home folder, then
    wrote into a folder named '~' in the current one, as ``table --out`` and ``--results`` did."""
    monkeypatch.setenv('HOME', str(tmp_path))
    args = parse_arguments([command, *REQUIRED_OPTIONS.get(command, []), f'{option}=~/x'])
    assert getattr(args, option[2:].replace('-', '_')) == str(tmp_path / 'x')


def test_the_empty_value_check_covers_every_path_option():
    parser = build_parser()
    [commands] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    checked = {command: {a.option_strings[0] for a in p._actions if a.type is path_value}
               for command, p in commands.choices.items()}
    assert {c: o for c, o in checked.items() if o} == {
        c: set(o) for c, o in PATH_OPTIONS.items()}


def test_no_command_takes_abbreviated_options():
    parser = build_parser()
    [commands] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert not parser.allow_abbrev
    assert not [name for name, p in commands.choices.items() if p.allow_abbrev]


def test_missing_dataset_root(capsys, tmp_path):
    err = fails(capsys, 'splits', '--protocol', 'voc-15-1-overlap', '--data-root', str(tmp_path / 'nope'))
    assert str(tmp_path / 'nope') in err and 'not found' in err


def test_voc_tree_given_to_an_ade_protocol(capsys, voc_root):
    err = fails(capsys, 'splits', '--protocol', 'ade-100-50', '--data-root', str(voc_root))
    assert str(voc_root) in err and 'Pascal VOC tree' in err and 'ADE20K' in err


def test_the_synthetic_dataset_given_to_a_voc_protocol_and_voc_to_a_synth_one(capsys, tmp_path,
                                                                               voc_root):
    # the same layout: `table` would set the synthetic scores beside the papers' VOC numbers
    synth = make_synth(tmp_path / 'synth', n_train=30, n_val=8, size=32, progress=False)
    for root in (synth, synth.parent.parent):   # its VOC2012 folder, or the folder above
        assert fails(capsys, 'splits', '--protocol', 'voc-15-1-overlap', '--data-root', str(root)) == (
            f'cssbench: error: {root}: the synthetic dataset (it holds synth.json): its protocols '
            f'are synth-*')
    assert fails(capsys, 'splits', '--protocol', 'synth-15-1-overlap', '--data-root', str(voc_root)) == (
        f"cssbench: error: {voc_root}: not the synthetic dataset (no synth.json, which make-synth "
        f"writes last): synth-* protocols run on cssbench make-synth's folders (one it did not "
        f"finish: run it again)")
    assert main(['splits', '--protocol', 'synth-15-1-overlap', '--data-root', str(synth)]) == 0


def test_list_file_naming_a_missing_image(capsys, voc_root):
    (voc_root / 'VOCdevkit/VOC2012/JPEGImages/b.jpg').unlink()
    err = fails(capsys, 'splits', '--protocol', 'voc-15-1-overlap', '--data-root', str(voc_root))
    assert str(voc_root / 'VOCdevkit/VOC2012/JPEGImages/b.jpg') in err


@pytest.mark.parametrize('encoding', ['utf-16', 'latin-1'])
def test_a_list_file_that_is_not_utf8(capsys, voc_root, encoding):
    # Notepad's "Unicode" is UTF-16; a Latin-1 file is UTF-8 until its first accented letter
    list_file = voc_root / 'VOCdevkit/VOC2012/ImageSets/Segmentation/train_aug.txt'
    list_file.write_text('a\nb\ncaf\u00e9\n', encoding=encoding)
    err = fails(capsys, 'splits', '--protocol', 'voc-15-1-overlap', '--data-root', str(voc_root))
    assert err.startswith(f'cssbench: error: {list_file}: not UTF-8 text (byte ')


def test_a_list_file_not_utf8_after_its_byte_order_mark_names_the_bad_byte(capsys, voc_root):
    list_file = voc_root / 'VOCdevkit/VOC2012/ImageSets/Segmentation/train_aug.txt'
    list_file.write_bytes(b'\xef\xbb\xbfab\xe9\n')   # the mark, 'ab', then Latin-1's e-acute
    err = fails(capsys, 'splits', '--protocol', 'voc-15-1-overlap', '--data-root', str(voc_root))
    assert err.startswith(f'cssbench: error: {list_file}: not UTF-8 text (byte 5: ')


def test_mask_value_outside_the_classes(capsys, tmp_path):
    root = make_voc_tree(tmp_path / 'voc', {'a': mask_with({0, 1}), 'b': mask_with({0, 77})},
                         {'c': mask_with({0, 1})})
    err = fails(capsys, 'splits', '--protocol', 'voc-15-1-overlap', '--data-root', str(root))
    assert 'SegmentationClassAug/b.png' in err and '77' in err


def test_truncated_png_mask(capsys, voc_root):
    mask = voc_root / 'VOCdevkit/VOC2012/SegmentationClassAug/a.png'
    mask.write_bytes(mask.read_bytes()[:30])
    err = fails(capsys, 'splits', '--protocol', 'voc-15-1-overlap', '--data-root', str(voc_root))
    assert str(mask) in err and 'cannot read mask' in err


def test_image_and_mask_sizes_differ(capsys, tmp_path):
    root = make_voc_tree(tmp_path / 'voc', {'a': mask_with({0, 1}), 'b': mask_with({0, 16}, (6, 4))},
                         {'c': mask_with({0, 1})})
    (root / 'VOCdevkit/VOC2012/JPEGImages/b.jpg').write_bytes(
        (root / 'VOCdevkit/VOC2012/JPEGImages/a.jpg').read_bytes())   # a 4x4 image
    err = fails(capsys, 'splits', '--protocol', 'voc-15-1-overlap', '--data-root', str(root))
    assert 'SegmentationClassAug/b.png' in err and '4x6' in err and '4x4' in err


def test_malformed_protocol_yaml(capsys, tmp_path):
    bad = tmp_path / 'bad.yaml'
    bad.write_text('name: x\ndataset: voc\nsteps: [0-15, 16\n')
    err = fails(capsys, 'run', '--protocol', str(bad))
    assert str(bad) in err and 'malformed YAML' in err


def test_inconsistent_protocol_yaml(capsys, tmp_path):
    bad = tmp_path / 'bad.yaml'
    bad.write_text('name: x\ndataset: voc\nmode: overlap\nsteps: ["0-15", "15-20"]\n')
    err = fails(capsys, 'run', '--protocol', str(bad))
    assert str(bad) in err and 'steps[1]' in err and 'class 15' in err


def test_protocol_yaml_that_reads_otherwise_than_it_looks(capsys, tmp_path):
    twice = tmp_path / 'twice.yaml'
    twice.write_text('name: x19\ndataset: voc\nmode: overlap\nname: x20\nsteps: ["0-15", "16-20"]\n')
    assert fails(capsys, 'run', '--protocol', str(twice)) == (
        f"cssbench: error: {twice}: malformed YAML at line 4: field 'name' given twice")
    boolean = tmp_path / 'boolean.yaml'
    boolean.write_text('name: x\ndataset: voc\nmode: overlap\ntrain_ignore: yes\n'
                       'steps: ["0-15", "16-20"]\n')
    assert fails(capsys, 'run', '--protocol', str(boolean)) == (
        f"cssbench: error: {boolean}: field train_ignore: True is not one of ('ignore', "
        f"'background') (YAML reads an unquoted yes, no, on, off as true or false)")


def test_protocol_yaml_merge_keys_load_and_unhashable_keys_are_refused(capsys, tmp_path):
    from cssbench.protocols import load_protocol
    merged = tmp_path / 'merged.yaml'   # << merges a mapping; the keys given beside it win
    merged.write_text('<<: {name: m2, dataset: voc, mode: disjoint}\nmode: overlap\n'
                      'steps: ["0-15", "16-20"]\n')
    assert (load_protocol(str(merged)).name, load_protocol(str(merged)).mode) == ('m2', 'overlap')
    unhashable = tmp_path / 'unhashable.yaml'
    unhashable.write_text('? [a, b]\n: 1\n')
    assert fails(capsys, 'splits', '--protocol', str(unhashable)) == (
        f'cssbench: error: {unhashable}: malformed YAML at line 1: found unhashable key')


def test_a_protocol_file_taking_a_shipped_protocols_name(capsys, tmp_path):
    shipped = Path(__file__).resolve().parent.parent / 'protocols' / 'voc-15-1-overlap.yaml'
    copy = tmp_path / 'copy.yaml'
    copy.write_text(shipped.read_text())   # the same protocol: its name is its own
    assert main(['splits', '--protocol', str(copy), '--data-root', str(tmp_path / 'none')]) == 2
    assert 'shipped' not in capsys.readouterr().err
    other = tmp_path / 'other.yaml'
    other.write_text(shipped.read_text().replace('disjoint', 'overlap').replace(
        'mode: overlap', 'mode: disjoint'))
    assert fails(capsys, 'run', '--protocol', str(other)) == (
        f"cssbench: error: {other}: field name: 'voc-15-1-overlap' is a shipped protocol's, "
        f"which this one is not; give it another name")


def test_an_output_file_that_is_a_folder_or_a_worker_count_below_one(capsys, tmp_path):
    assert fails(capsys, 'splits', '--protocol', 'synth-15-5-overlap', '--out', str(tmp_path),
                 '--data-root', str(tmp_path / 'absent')) == \
        f'cssbench: error: --out {tmp_path}: a folder; give the lists a file name'
    assert fails(capsys, 'make-synth', '--workers', '0', '--out', str(tmp_path / 'synth')) == \
        'cssbench: error: a synthetic dataset is drawn by at least 1 worker, got 0'
    assert not (tmp_path / 'synth').exists()


def test_splits_out_under_a_file_is_refused_before_the_scan(capsys, voc_root, tmp_path):
    (tmp_path / 'afile').write_text('')
    out = tmp_path / 'afile' / 'splits.json'
    assert main(['splits', '--protocol', 'voc-15-1-overlap', '--data-root', str(voc_root),
                 '--out', str(out)]) == 2
    printed = capsys.readouterr()
    assert printed.out == ''   # no table first: refused before the scan
    assert printed.err == f'cssbench: error: --out {out}: {tmp_path / "afile"} is not a folder\n'


def test_make_synth_out_under_a_file(capsys, tmp_path):
    (tmp_path / 'afile').write_text('')
    out = tmp_path / 'afile' / 'synth'
    assert fails(capsys, 'make-synth', '--out', str(out), '--n-train', '2', '--n-val', '2',
                 '--size', '16') == \
        f'cssbench: error: --out {out}: {tmp_path / "afile"} is not a folder'


def test_tables_of_no_run(capsys, tmp_path):
    results = tmp_path / 'results'
    results.mkdir()
    assert fails(capsys, 'table', '--all', '--results', str(results)) == \
        f'cssbench: error: {results}: no complete run stored; nothing to tabulate'
    assert fails(capsys, 'table', '--all', '--results', str(results), '--run', 'zzz') == \
        f'cssbench: error: {results}: no complete run matching --run/--config stored; nothing to tabulate'
    assert not (results / 'tables').exists()


def test_a_results_store_that_is_a_file_is_refused_by_every_reader(capsys, tmp_path):
    """``table`` read it as an empty store and advised `cssbench run ... --results FILE`,
    which failed in turn; ``table --all`` and ``plot`` advised --out."""
    a_file = tmp_path / 'results'
    a_file.write_text('kept')
    for command in (['table', '--protocol', 'synth-15-1-overlap'], ['table', '--all'],
                    ['plot', '--protocol', 'synth-15-1-overlap'], ['plot', '--all']):
        assert fails(capsys, *command, '--results', str(a_file)) == (
            f'cssbench: error: --results {a_file}: a file, not a folder of results')
    assert a_file.read_text() == 'kept' and os.listdir(tmp_path) == ['results']


def test_a_data_root_that_is_a_file_is_named_as_one(capsys, tmp_path):
    """It was refused as 'dataset root not found', though it was there."""
    a_file = tmp_path / 'voc.tar'
    a_file.write_bytes(b'')
    assert fails(capsys, 'splits', '--protocol', 'synth-15-1-overlap', '--data-root', str(a_file)) == (
        f'cssbench: error: {a_file}: a file, not a dataset root (a folder)')
    assert fails(capsys, 'splits', '--protocol', 'synth-15-1-overlap', '--data-root',
                 str(tmp_path / 'voc')) == f'cssbench: error: {tmp_path / "voc"}: dataset root not found'


def test_unknown_method_config_and_epochs(capsys, tmp_path):
    assert 'unknown method' in fails(capsys, 'run', '--protocol', 'synth-15-1-overlap', '--method', 'ft,nope')
    assert 'unknown config' in fails(capsys, 'run', '--protocol', 'synth-15-1-overlap', '--config', 'huge')
    # a path is a file that is not there, or a folder, not an 'unknown config' (which the
    # message then offered "a path to a .py file" for)
    for path, what in ((tmp_path / 'mine.py', 'no such file'), (tmp_path / 'cfgs' / 'mine', 'no such file'),
                       (tmp_path, 'a folder')):
        assert fails(capsys, 'run', '--protocol', 'synth-15-1-overlap', '--config', str(path)) == (
            f'cssbench: error: {path}: {what}; a config is a .py file, or one of: deeplabv3-r101, small')
    assert 'at least 1' in fails(capsys, 'run', '--protocol', 'synth-15-1-overlap', '--epochs', '0')
    assert fails(capsys, 'run', '--protocol', 'synth-15-1-overlap', '--method', 'ft,lwf,ft') == \
        'cssbench: error: --method: ft given twice'
    assert fails(capsys, 'run', '--protocol', 'synth-15-1-overlap', '--method', 'ft,all') == \
        'cssbench: error: --method ft,all: all stands alone (it names every method)'


def test_an_interrupted_run_says_how_to_resume_it(capsys, monkeypatch):
    import cssbench.cli as cli

    def interrupted(args):
        raise KeyboardInterrupt
    monkeypatch.setattr(cli, 'cmd_run', interrupted)
    assert main(['run', '--protocol', 'synth-15-1-overlap']) == 130
    assert capsys.readouterr().err == 'cssbench: interrupted; rerun the same command to resume\n'
    assert main(['run', '--protocol', 'synth-15-1-overlap', '--overwrite']) == 130
    assert capsys.readouterr().err == (
        'cssbench: interrupted; rerun it to start over, or without --overwrite to continue where '
        'it stopped (a complete run it had not yet replaced stays as it was)\n')
    with pytest.raises(SystemExit) as stopped:   # argparse's usage error
        main(['run', '--protocol', 'synth-15-1-overlap', '--overwrite', '--resume'])
    assert stopped.value.code == 2
    assert 'argument --resume: not allowed with argument --overwrite' in capsys.readouterr().err
    monkeypatch.setenv('RANK', '1')   # without torchrun, whatever set it
    assert main(['run', '--protocol', 'synth-15-1-overlap']) == 130
    assert capsys.readouterr().err == 'cssbench: interrupted; rerun the same command to resume\n'
    monkeypatch.setenv('WORLD_SIZE', '2')   # torchrun's other processes: rank 0 says it
    assert main(['run', '--protocol', 'synth-15-1-overlap']) == 130
    assert capsys.readouterr().err == ''
    with pytest.raises(SystemExit) as stopped:   # and prints the usage error
        main(['run', '--protocol', 'synth-15-1-overlap', '--overwrite', '--resume'])
    assert stopped.value.code == 2 and capsys.readouterr().err == ''


def test_a_process_whose_partner_stopped_says_so_in_one_line(capsys, monkeypatch):
    import cssbench.cli as cli

    def partner_gone(args):
        raise RuntimeError('[gloo/transport/tcp/pair.cc:561] Connection closed by peer '
                           '[127.0.0.1]:9601. This is typically caused by a remote worker crashing.')
    monkeypatch.setattr(cli, 'cmd_run', partner_gone)
    monkeypatch.setenv('WORLD_SIZE', '2')
    assert main(['run', '--protocol', 'synth-15-1-overlap']) == 1
    assert capsys.readouterr().err == ('cssbench: error: another process of this run stopped (its '
                                       'message is above); rerun the same command to resume\n')
    monkeypatch.setenv('WORLD_SIZE', '1')   # no partner: gloo's message is not about one
    with pytest.raises(RuntimeError, match='Connection closed by peer'):
        main(['run', '--protocol', 'synth-15-1-overlap'])


def test_a_run_name_that_is_not_a_plain_folder_name(capsys, tmp_path):
    results = tmp_path / 'results'
    for name in ('../../escape', 'a/b', '.', ' ', '_x', '', 'é', 'x' * 256):
        assert fails(capsys, 'run', '--protocol', 'synth-15-1-overlap', '--run-name', name,
                     '--results', str(results)) == (
            f"cssbench: error: run name {name!r} is not a plain name (letters, digits, and "
            f". _ + - after the first; 255 at most): it names a folder of the results store")
    config = tmp_path / 'my small.py'
    config.write_text(f"_base_ = ['{CONFIGS / 'small.py'}']\n")
    assert fails(capsys, 'run', '--protocol', 'synth-15-1-overlap', '--config', str(config),
                 '--results', str(results)) == (
        f"cssbench: error: the config {config} names runs 'my small-seed0' by default, not a "
        f"plain name (letters, digits, and . _ + - after the first; 255 at most); give --run-name")
    assert not results.exists()   # results/<protocol>/<method>/../../escape is inside it
    # with --seeds, the name of each seed's run: 'x' * 250 + '-seed0' is 256 long (it failed as
    # the folder was made, in a line naming no option: [Errno 36] File name too long: '<path>')
    assert fails(capsys, 'run', '--protocol', 'synth-15-1-overlap', '--run-name', 'x' * 250,
                 '--seeds', '0,1', '--results', str(results)) == (
        f"cssbench: error: run name '{'x' * 250}-seed0' is not a plain name (letters, digits, "
        f"and . _ + - after the first; 255 at most): it names a folder of the results store")
    assert not results.exists()


def test_config_naming_an_unknown_model_part(capsys, tmp_path, tiny_run):
    config = tmp_path / 'badmodel.py'
    config.write_text(f"_base_ = ['{tiny_run['config']}']\nmodel = dict(backbone=dict(type='cssbench.Nope'))\n")
    data = make_synth(tmp_path / 'synth', n_train=30, n_val=8, size=32, progress=False)
    err = fails(capsys, 'run', '--protocol', 'synth-15-5-overlap', '--config', str(config),
                '--data-root', str(data), '--results', str(tmp_path / 'results'))
    assert str(config) in err and 'cssbench.Nope' in err


def test_config_that_does_not_load(capsys, tmp_path):
    broken = tmp_path / 'broken.py'
    broken.write_text('model = dict(\n')
    err = fails(capsys, 'run', '--protocol', 'synth-15-1-overlap', '--config', str(broken))
    assert err.startswith(f'cssbench: error: {broken}: cannot load this config (SyntaxError: ')
    orphan = tmp_path / 'orphan.py'
    orphan.write_text(f"_base_ = ['{tmp_path / 'gone.py'}']\n")
    err = fails(capsys, 'run', '--protocol', 'synth-15-1-overlap', '--config', str(orphan))
    assert str(orphan) in err and 'FileNotFoundError' in err and str(tmp_path / 'gone.py') in err


def test_config_missing_what_a_run_needs(capsys, tmp_path):
    partial = tmp_path / 'partial.py'   # no _base_: a model override alone
    partial.write_text("model = dict(loss_kd=50.0)\ndata = dict(crop_size=32)\n")
    results = tmp_path / 'results'
    err = fails(capsys, 'run', '--protocol', 'synth-15-1-overlap', '--config', str(partial),
                '--results', str(results))
    assert err.startswith(f'cssbench: error: {partial}: this config does not set model.type, '
                          'model.backbone, model.decode_head, data.batch_size, ')
    assert 'schedule.poly_power' in err and 'data.crop_size' not in err
    one_lr = tmp_path / 'one_lr.py'
    one_lr.write_text(f"_base_ = ['{CONFIGS / 'small.py'}']\nschedule = dict(lr=0.01)\n")
    err = fails(capsys, 'run', '--protocol', 'synth-15-1-overlap', '--config', str(one_lr),
                '--results', str(results))
    assert err == f'cssbench: error: {one_lr}: schedule.lr must be (step 0 lr, later steps lr), got 0.01'
    no_weights = tmp_path / 'no_weights.py'
    no_weights.write_text(f"_base_ = ['{CONFIGS / 'deeplabv3_r101.py'}']\n"
                          f"model = dict(backbone=dict(pretrained='{tmp_path / 'r101.pth'}'))\n")
    err = fails(capsys, 'run', '--protocol', 'voc-15-1-overlap', '--config', str(no_weights),
                '--results', str(results))
    assert err == (f'cssbench: error: {no_weights}: model.backbone.pretrained: '
                   f'{tmp_path / "r101.pth"} is not a file')
    assert not results.exists()


@pytest.mark.parametrize('setting, says', [
    ("schedule = dict(epochs='x')", "schedule.epochs must be a whole number >= 1, got 'x'"),
    ('schedule = dict(epochs=0)', 'schedule.epochs must be a whole number >= 1, got 0'),
    ('schedule = dict(epochs_by_dataset=dict(synth=0))',
     'schedule.epochs_by_dataset.synth must be a whole number >= 1, got 0'),
    ('schedule = dict(lr=(0.01, -1))', 'schedule.lr[1] must be a number > 0, got -1'),
    ("schedule = dict(lr=(float('inf'), 0.001))", 'schedule.lr[0] must be a number > 0, got inf'),
    ('schedule = dict(momentum=1.5)', 'schedule.momentum must be a number in [0, 1), got 1.5'),
    ('schedule = dict(nesterov=1)', 'schedule.nesterov must be True or False, got 1'),
    ('data = dict(batch_size=0)', 'data.batch_size must be a whole number >= 2 (batch norm '
     'trains on 2 images a batch at least), got 0'),
    ('data = dict(batch_size=1)', 'data.batch_size must be a whole number >= 2 (batch norm '
     'trains on 2 images a batch at least), got 1'),
    ('data = dict(num_workers=-1)', 'data.num_workers must be a whole number >= 0, got -1'),
    ('data = dict(crop_size=32.5)', 'data.crop_size must be a whole number >= 1, got 32.5'),
    # a misspelt setting, which a run would not read: the base's value would train unnoticed
    ('schedule = dict(epoch=3)', 'schedule.epoch is not a setting of the schedule section (its '
     'settings: epochs, epochs_by_dataset, lr, momentum, nesterov, poly_power, weight_decay)'),
    ('data = dict(batchsize=4, workers=0)', 'data.batchsize, data.workers are not settings of the '
     'data section (its settings: batch_size, crop_size, eval_batch_size, num_workers)'),
    ('shedule = dict(epochs=3)', 'shedule is not a section of a config; did you mean schedule? '
     '(its sections: model, data, schedule, speed)'),
    ('Speed = dict(amp=None)', 'Speed is not a section of a config; did you mean speed? (its '
     'sections: model, data, schedule, speed)'),
    # a string in the speed section's place stopped the command with a traceback
    ("speed = 'fast'", "speed must be a dict of speed settings, e.g. speed = dict(amp='float16'), "
     "got 'fast'"),
    ('schedule = dict(momentum=0.0)', 'schedule.nesterov needs a momentum > 0 (SGD refuses '
     'Nesterov without momentum); set nesterov=False for plain SGD'),
    # what run.json cannot hold: found as it was written, after --overwrite deleted the run
    ('extra = {1, 2}', 'extra is {1, 2}, a set, which run.json cannot hold (a config holds '
     'numbers, strings, True, False, None, lists, tuples and dicts)'),
    ("model = dict(backbone=dict(widths=[32, 64, {96}, 128]))", 'model.backbone.widths[2] is '
     '{96}, a set, which run.json cannot hold (a config holds numbers, strings, True, False, '
     'None, lists, tuples and dicts)'),
    ('extra = {(1, 2): 3}', "extra has the key (1, 2), which run.json cannot hold: a dict's "
     'keys are strings or numbers'),
    ('from pathlib import Path\nmodel = dict(backbone=dict(type=Path))', 'model.backbone.type '
     "is the class Path, which run.json cannot hold: give its registered name as a string (e.g. "
     "'cssbench.Path')"),
    # a method's class: --method chooses it, and the config's was replaced unnoticed
    ("model = dict(type='cssbench.LwF')", "model.type must be 'cssbench.IncrementalSegmentor', got "
     "'cssbench.LwF': the method (run --method) chooses the class that trains"),
    ("model = dict(backbone=dict(type='Nope'))", "model.backbone.type: 'Nope' is not a registered "
     "model (cssbench registers its own as cssbench.<Name>)"),
    ("model = dict(decode_head=dict(_delete_=True, channels=8))", "model.decode_head.type: None is "
     "not a registered model (cssbench registers its own as cssbench.<Name>)"),
    # the backbone's and the head's settings, and a model that does not build or fit together
    ('model = dict(backbone=dict(widthz=(8, 8, 8, 8)))', 'model.backbone.widthz is not a setting '
     'of cssbench.SmallResNet (its settings: dilations, strides, widths)'),
    ("model = dict(decode_head=dict(channels='64'))", "model.decode_head.channels of "
     "cssbench.ASPPHead must be a whole number, got '64' (its default: 256)"),
    ('model = dict(classifier_dropout=2.0)', 'the model does not build with these settings '
     '(ValueError: dropout probability has to be between 0 and 1, but got 2.0)'),
])
def test_config_value_a_run_cannot_train_with(capsys, tmp_path, setting, says):
    config = tmp_path / 'bad.py'
    config.write_text(f"_base_ = ['{CONFIGS / 'small.py'}']\n{setting}\n")
    results = tmp_path / 'results'
    assert fails(capsys, 'run', '--protocol', 'synth-15-1-overlap', '--config', str(config),
                 '--results', str(results)) == f'cssbench: error: {config}: {says}'
    assert not results.exists()   # refused before a run folder is made


@pytest.mark.parametrize('base, backbone, error', [
    ('small.py', 'strides=(1, 2)', 'ValueError: widths (32, 64, 96, 128), strides (1, 2) and '
                                   'dilations (1, 1, 1, 2) differ in length (one of each per stage)'),
    # fewer widths than strides: it trained two stages of four, the others dropped silently
    ('small.py', 'widths=(32, 64)', 'ValueError: widths (32, 64), strides (1, 2, 2, 1) and '
                                    'dilations (1, 1, 1, 2) differ in length (one of each per stage)'),
    # torchvision's own errors named neither the setting nor what it takes
    ('deeplabv3_r101.py', 'depth=18', 'ValueError: depth 18 takes output_stride=32 only (its '
                                      'blocks cannot dilate), got 16'),
    ('deeplabv3_r101.py', 'depth=102', 'ValueError: depth must be one of 18, 34, 50, 101, 152, '
                                       'got 102'),
    ('deeplabv3_r101.py', 'output_stride=4', 'ValueError: output_stride must be 8, 16 or 32, got 4'),
])
def test_a_config_whose_model_parts_do_not_fit_is_refused_before_anything_is_written(
        capsys, tmp_path, base, backbone, error):
    """A backbone's stages given other numbers of widths and strides: refused when the model
    is built on the meta device, before the run's folder is made (it failed at the first
    iteration, a run folder left behind, or trained fewer stages than the config's widths)."""
    config = tmp_path / 'misfit.py'
    config.write_text(f"_base_ = ['{CONFIGS / base}']\n"
                      f"model = dict(backbone=dict({backbone}))\n")
    results = tmp_path / 'results'
    assert fails(capsys, 'run', '--protocol', 'synth-15-1-overlap', '--method', 'ft,lwf',
                 '--config', str(config), '--results', str(results)) == (
        f'cssbench: error: {config}: the model does not build with these settings ({error})')
    assert not results.exists()


@pytest.mark.parametrize('name, section', [
    ('shedule', 'schedule'), ('scheduel', 'schedule'), ('Schedule', 'schedule'), ('modle', 'model'),
    ('spead', 'speed'), ('daata', 'data'),
    # one letter off at the end, or more than one: names of their own, as a helper's may be
    ('mode', None), ('modes', None), ('schedules', None), ('scheduler', None), ('date', None),
    ('sched', None), ('norm_cfg', None), ('model', None),
])
def test_which_top_level_names_misspell_a_section(name, section):
    from cssbench.config import misspelt_section
    assert misspelt_section(name) == section


def test_a_misspelt_section_is_named_before_the_settings_it_leaves_missing(capsys, tmp_path):
    config = tmp_path / 'own.py'   # no _base_: its schedule is missing, under another name
    config.write_text((CONFIGS / 'small.py').read_text().replace('schedule = dict(', 'shedule = dict('))
    assert fails(capsys, 'run', '--protocol', 'synth-15-1-overlap', '--config', str(config),
                 '--results', str(tmp_path / 'results')) == (
        f'cssbench: error: {config}: shedule is not a section of a config; did you mean schedule? '
        '(its sections: model, data, schedule, speed)')


def test_config_helper_values_beside_the_sections_are_kept(tmp_path):
    from cssbench.config import load_config
    config = tmp_path / 'helpers.py'   # top-level names of the file's own, not sections
    config.write_text(f"_base_ = ['{CONFIGS / 'small.py'}']\ncrop = 48\nmode = 'fast'\n"
                      "norm_cfg = dict(type='BN')\nschedules = dict(voc=30)\n"
                      "data = dict(crop_size=crop)\n")
    cfg = load_config(str(config))
    assert (cfg.data.crop_size, cfg.mode, cfg.norm_cfg.type, cfg.schedules.voc) == (48, 'fast', 'BN', 30)


def test_epochs_are_checked_as_resolved_for_the_dataset(tmp_path):
    from cssbench.config import load_config
    from cssbench.errors import UserError
    config = tmp_path / 'by_dataset.py'   # schedule.epochs is read for no dataset of these
    config.write_text(f"_base_ = ['{CONFIGS / 'small.py'}']\n"
                      "schedule = dict(epochs=None, epochs_by_dataset=dict(synth=2, voc=30))\n")
    assert load_config(str(config), dataset='synth').schedule.epochs == 2
    assert load_config(str(config), 3, dataset='ade').schedule.epochs == 3
    with pytest.raises(UserError, match='schedule.epochs must be a whole number >= 1, got None'):
        load_config(str(config), dataset='ade')


def test_epochs_for_a_dataset_cssbench_does_not_know_are_refused(tmp_path):
    """A misspelt dataset (``synht``) was read by no run: the schedule's epochs trained
    unnoticed, as a misspelt setting's base value would."""
    from cssbench.config import load_config
    from cssbench.errors import UserError
    config = tmp_path / 'by_dataset.py'
    config.write_text(f"_base_ = ['{CONFIGS / 'small.py'}']\n"
                      "schedule = dict(epochs_by_dataset=dict(synht=2, voc=3, VOC=4))\n")
    with pytest.raises(UserError) as refused:
        load_config(str(config), 5, dataset='synth')   # --epochs too: the file is wrong all the same
    assert str(refused.value) == (f"{config}: schedule.epochs_by_dataset: 'synht', 'VOC' are not "
                                  'datasets (the datasets: ade, synth, voc)')
    config.write_text(f"_base_ = ['{CONFIGS / 'small.py'}']\n"
                      "schedule = dict(epochs_by_dataset=dict(synth=2, ade=3))\n")
    assert load_config(str(config), dataset='synth').schedule.epochs == 2


def test_config_setting_what_a_method_does_not_take(capsys, tmp_path, tiny_run):
    config = tmp_path / 'kd50.py'
    config.write_text(f"_base_ = ['{tiny_run['config']}']\nmodel = dict(loss_kd=50.0)\n")
    results = tmp_path / 'results'
    err = fails(capsys, 'run', '--protocol', 'synth-15-5-overlap', '--method', 'sdr,ft',
                '--config', str(config), '--results', str(results))
    assert err == (f"cssbench: error: {config}: model.loss_kd is not a setting of method 'ft' (its "
                   "settings: backbone, classifier_dropout, data_preprocessor, decode_head, "
                   "ignore_index, overlapped)")
    assert not results.exists()  # refused before sdr, first in the list, trained


@pytest.mark.parametrize('setting, says', [
    ("loss_kd='10'", "model.loss_kd of method 'lwf' must be a number >= 0, got '10' (its default: "
     "100.0)"),
    ("loss_kd=float('nan')", "model.loss_kd of method 'lwf' must be a number >= 0, got nan (its "
     "default: 100.0)"),
    ('overlapped=1', "model.overlapped of method 'lwf' must be True or False, got 1 (its default: "
     'False)'),
    ('ignore_index=255.0', "model.ignore_index of method 'lwf' must be a whole number, got 255.0 "
     '(its default: 255)'),
    ("pseudo=3", "model.pseudo of method 'plop' must be a string or None, got 3 (its default: "
     "'entropy')"),
])
def test_config_setting_of_the_wrong_kind_for_a_method(capsys, tmp_path, tiny_run, setting, says):
    config = tmp_path / 'wrong_kind.py'
    config.write_text(f"_base_ = ['{tiny_run['config']}']\nmodel = dict({setting})\n")
    results = tmp_path / 'results'
    method = 'plop' if 'plop' in says else 'lwf'
    err = fails(capsys, 'run', '--protocol', 'synth-15-5-overlap', '--method', method,
                '--config', str(config), '--results', str(results))
    assert err == f'cssbench: error: {config}: {says}'
    assert not results.exists()


# Every shipped method's loss weights, inherited ones included (ft and joint have none).
LOSS_WEIGHTS = {'lwf': ['loss_kd'], 'ilt': ['loss_kd', 'loss_de'], 'mib': ['loss_kd'],
                'sdr': ['loss_kd', 'loss_de_prototypes', 'loss_fc', 'lfc_sep_clust',
                        'loss_featspars'],
                'sdr+mib': ['loss_kd', 'loss_de_prototypes', 'loss_fc', 'lfc_sep_clust',
                            'loss_featspars'],
                'plop': ['pod_factor', 'pod_logits_factor']}


@pytest.mark.parametrize('method, weight', [(m, w) for m, ws in LOSS_WEIGHTS.items() for w in ws])
def test_a_negative_loss_weight_is_refused_before_anything_is_written(capsys, tmp_path, tiny_run,
                                                                      method, weight):
    from cssbench.config import load_config
    from cssbench.methods import get_method
    from cssbench.protocols import load_protocol
    from cssbench.runner import check_model_builds
    config = tmp_path / 'negative.py'   # -1 would turn the term off, as 0 does, unnoticed
    config.write_text(f"_base_ = ['{tiny_run['config']}']\nmodel = dict({weight}=-1)\n")
    results = tmp_path / 'results'
    err = fails(capsys, 'run', '--protocol', 'synth-15-5-overlap', '--method', method,
                '--config', str(config), '--results', str(results))
    assert err.startswith(f"cssbench: error: {config}: model.{weight} of method {method!r} must "
                          f"be a number >= 0, got -1 (its default: ")
    assert not results.exists()
    config.write_text(f"_base_ = ['{tiny_run['config']}']\nmodel = dict({weight}=0)\n")
    check_model_builds(load_config(str(config)), get_method(method).model_type,
                       load_protocol('synth-15-5-overlap'))


def test_a_method_settings_kind_is_its_annotations_or_else_its_defaults():
    import inspect
    from cssbench.runner import setting_refusal

    from cssbench.models import LossWeight

    def __init__(self, weight: float = 1, mode: 'float | str' = 0.5, plain=1, bins: int = 3,
                 scales: 'tuple[int, ...]' = (1,), flag=True, kd: LossWeight = 1.0,
                 written: 'models.LossWeight | None' = None):
        pass
    params = inspect.signature(__init__).parameters
    assert setting_refusal(params['kd'], -0.5) == 'must be a number >= 0, got -0.5'
    assert setting_refusal(params['kd'], 0) is None
    assert setting_refusal(params['written'], -1) == 'must be a number >= 0 or None, got -1'
    assert setting_refusal(params['weight'], 0.5) is None        # annotated float, int default
    assert setting_refusal(params['mode'], 'auto') is None
    assert setting_refusal(params['mode'], None) == "must be a number or a string, got None"
    assert setting_refusal(params['plain'], 0.5) is None          # no annotation: a number
    assert setting_refusal(params['plain'], '1') == "must be a number, got '1'"
    assert setting_refusal(params['bins'], 2.5) == 'must be a whole number, got 2.5'
    assert setting_refusal(params['scales'], 'any') is None       # no plain kind: not checked
    assert setting_refusal(params['flag'], 1) == 'must be True or False, got 1'


def test_config_settings_of_their_kind_are_taken(tmp_path, tiny_run):
    from cssbench.config import load_config
    from cssbench.runner import check_model_settings
    config = tmp_path / 'kinds.py'   # an int for a float, None where the annotation takes it
    config.write_text(f"_base_ = ['{tiny_run['config']}']\n"
                      "model = dict(threshold=1, pseudo=None, pod_scales=[1, 2])\n")
    check_model_settings(load_config(str(config)), 'cssbench.PLOP')


def test_synthetic_dataset_too_small(capsys, tmp_path):
    err = fails(capsys, 'make-synth', '--size', '8', '--out', str(tmp_path / 'synth'))
    assert 'size >= 16' in err and '(got 2000, 300, 8)' in err
    assert not (tmp_path / 'synth').exists()


@pytest.mark.parametrize('split', ['train', 'val'])
def test_a_jpeg_cut_short_is_refused_before_anything_is_written(capsys, tmp_path, tiny_run, split):
    # Its header whole, its data cut: a copy interrupted. A val image would otherwise fail
    # only at the evaluation, after the step's last epoch.
    data = make_synth(tmp_path / 'synth', n_train=30, n_val=8, size=32, progress=False)
    victim = sorted((data / 'JPEGImages').glob(f'synth_{split}_*.jpg'))[0]
    victim.write_bytes(victim.read_bytes()[:-100])
    results = tmp_path / 'results'
    err = fails(capsys, 'run', '--protocol', 'synth-15-5-overlap', '--config', tiny_run['config'],
                '--data-root', str(data), '--epochs', '1', '--results', str(results))
    assert err.startswith(f'cssbench: error: {victim}: cannot read image (image file is truncated')
    assert not results.exists()


def test_work_dir_of_another_protocol_is_refused(capsys, tmp_path, tiny_run):
    data = make_synth(tmp_path / 'synth', n_train=30, n_val=8, size=32, progress=False)
    common = ['--config', tiny_run['config'], '--data-root', str(data), '--epochs', '1',
              '--results', str(tmp_path / 'results'), '--work-dir', str(tmp_path / 'work')]
    assert main(['run', '--protocol', 'synth-19-1-overlap', *common]) == 0
    capsys.readouterr()
    err = fails(capsys, 'run', '--protocol', 'synth-15-5-overlap', *common)
    first = tmp_path / 'results' / 'synth-19-1-overlap' / 'ft' / 'tiny-seed0'
    assert err == (f'cssbench: error: {tmp_path / "work"}: holds the checkpoints of another run '
                   f'({first}); choose another --work-dir')
    weights = (tmp_path / 'work' / 'step1' / 'model.pth').read_bytes()
    assert fails(capsys, 'run', '--protocol', 'synth-15-5-overlap', *common, '--overwrite') == err
    assert (tmp_path / 'work' / 'step1' / 'model.pth').read_bytes() == weights   # nothing deleted


def test_work_dir_of_an_earlier_start_with_another_config_needs_overwrite(capsys, tmp_path, tiny_run):
    data = make_synth(tmp_path / 'synth', n_train=30, n_val=8, size=32, progress=False)
    common = ['run', '--protocol', 'synth-19-1-overlap', '--data-root', str(data), '--epochs', '1',
              '--results', str(tmp_path / 'results'), '--run-name', 'r']
    assert main([*common, '--config', tiny_run['config']]) == 0
    run_dir = tmp_path / 'results' / 'synth-19-1-overlap' / 'ft' / 'r'
    (run_dir / 'run.json').unlink()           # as a start that stopped before writing it
    capsys.readouterr()
    other = tmp_path / 'other_lr.py'
    other.write_text(f"_base_ = ['{tiny_run['config']}']\nschedule = dict(lr=(0.04, 0.004))\n")
    err = fails(capsys, *common, '--config', str(other))
    assert err == (f'cssbench: error: {run_dir / "work"}: holds checkpoints of this run with another '
                   'config_digest; --overwrite clears them, or choose another --work-dir')
    assert main([*common, '--config', str(other), '--overwrite']) == 0
    assert json.loads((run_dir / 'run.json').read_text())['config']['schedule']['lr'] == [0.04, 0.004]


def test_a_step_with_fewer_images_than_a_batch_is_refused_before_training(capsys, tmp_path):
    data = make_synth(tmp_path / 'synth', n_train=30, n_val=8, size=32, progress=False)
    results = tmp_path / 'results'
    err = fails(capsys, 'run', '--protocol', 'synth-19-1-overlap', '--data-root', str(data),
                '--results', str(results))    # the small config: batch 8
    assert err.startswith(f'cssbench: error: {data}: step 1 of synth-19-1-overlap has ')
    assert err.endswith('training images, fewer than a batch (8): it would train nothing; use a '
                        'config with a smaller data.batch_size')
    assert not results.exists()


def test_a_step_with_no_training_image_is_refused_naming_its_classes(capsys, tmp_path):
    voc = make_voc_tree(tmp_path / 'voc', train={f't{i}': mask_with({0, 1}) for i in range(8)},
                        val={'v0': mask_with({0, 20})})   # no train image holds class 20
    err = fails(capsys, 'run', '--protocol', 'voc-19-1-overlap', '--data-root', str(voc),
                '--results', str(tmp_path / 'results'))
    assert err == (f'cssbench: error: {voc}: step 1 of voc-19-1-overlap has no training images: '
                   f'the train list has none that the step keeps for its classes (20)')


def test_a_step_with_no_evaluation_image_is_refused_before_training(capsys, tmp_path):
    voc = make_voc_tree(tmp_path / 'voc', train={f't{i}': mask_with({0, 1, 20}) for i in range(8)},
                        val={'v0': mask_with({0, 20})})   # no val image holds a class of step 0
    results = tmp_path / 'results'
    err = fails(capsys, 'run', '--protocol', 'voc-19-1-overlap', '--data-root', str(voc),
                '--results', str(results), '--epochs', '1')
    assert err == (f'cssbench: error: {voc}: step 0 of voc-19-1-overlap has no evaluation images: '
                   f'the val list has none holding a class learned by then (1-19)')
    assert not results.exists()


def test_finished_run_is_not_overwritten_without_flag(capsys, tmp_path, tiny_run):
    data = make_synth(tmp_path / 'synth', n_train=30, n_val=8, size=32, progress=False)
    work = tmp_path / 'shared-work'
    work.mkdir()
    (work / 'notes.txt').write_text('not cssbench\'s')
    args = ['run', '--protocol', 'synth-19-1-overlap', '--config', tiny_run['config'],
            '--data-root', str(data), '--epochs', '1', '--results', str(tmp_path / 'results'),
            '--work-dir', str(work)]
    assert main(args) == 0
    metrics = next((tmp_path / 'results').rglob('metrics.json'))
    before = metrics.read_bytes()
    capsys.readouterr()
    assert 'complete' in fails(capsys, *args)
    assert metrics.read_bytes() == before
    assert main(args + ['--overwrite']) == 0
    assert (work / 'notes.txt').read_text() == "not cssbench's"   # only the run's own files go
    assert (work / 'step1' / 'model.pth').is_file()


def test_a_results_or_work_dir_where_a_file_stands_is_named_and_nothing_is_written(capsys, tmp_path,
                                                                                    tiny_run):
    a_file = tmp_path / 'a-file'
    a_file.write_text('')
    run = ['run', '--protocol', 'synth-19-1-overlap', '--config', tiny_run['config']]
    for results in (a_file, a_file / 'results'):
        for methods in ('ft', 'ft,lwf'):
            assert fails(capsys, *run, '--method', methods, '--results', str(results)) == \
                f'cssbench: error: --results {results}: {a_file} is not a folder'
    results = tmp_path / 'results'
    err = fails(capsys, *run, '--results', str(results), '--work-dir', str(a_file / 'work'))
    assert err == f"cssbench: error: --work-dir {a_file / 'work'}: {a_file} is not a folder"
    assert sorted(os.listdir(tmp_path)) == ['a-file'] and a_file.read_text() == ''


@pytest.mark.skipif(os.geteuid() == 0, reason='file permissions do not stop root')
def test_a_results_or_work_dir_in_a_folder_the_user_cannot_write_is_named(capsys, tmp_path, tiny_run):
    shared = tmp_path / 'shared'
    shared.mkdir()
    shared.chmod(0o555)
    run = ['run', '--protocol', 'synth-19-1-overlap', '--config', tiny_run['config']]
    try:
        for results in (shared, shared / 'results'):
            assert fails(capsys, *run, '--results', str(results)) == \
                f'cssbench: error: --results {results}: cannot write in {shared} (Permission denied)'
        assert fails(capsys, *run, '--results', str(tmp_path / 'results'), '--work-dir',
                     str(shared / 'work')) == (f"cssbench: error: --work-dir {shared / 'work'}: "
                                               f"cannot write in {shared} (Permission denied)")
        assert os.listdir(shared) == [] and sorted(os.listdir(tmp_path)) == ['shared']
    finally:
        shared.chmod(0o755)


def test_a_work_dir_another_process_runs_in_is_refused_and_left_to_it(capsys, monkeypatch, tmp_path,
                                                                        tiny_run):
    """Two new runs given one --work-dir at once would both find it unmarked: the second is
    refused by the work dir's lock, leaving no run folder, and the work dir as the first has it."""
    data = make_synth(tmp_path / 'synth', n_train=30, n_val=8, size=32, progress=False)
    results, work = tmp_path / 'results', tmp_path / 'work'
    args = ['run', '--protocol', 'synth-19-1-overlap', '--config', tiny_run['config'],
            '--data-root', str(data), '--epochs', '1', '--results', str(results), '--work-dir']
    refusal = f'cssbench: error: {work}: another cssbench process is running a run in this work dir'
    with locked_by_another_process(work):
        assert fails(capsys, *args, str(work)) == refusal
    assert not results.exists() and [p.name for p in work.iterdir()] == ['.lock']
    # A work dir new at the start, taken by another process before this one locks it
    new_work, real_lock = tmp_path / 'new-work', runner._lock_folder
    with contextlib.ExitStack() as holders:
        def taken_first(folder, held, refusal):
            if folder == new_work:
                holders.enter_context(locked_by_another_process(folder))
            return real_lock(folder, held, refusal)
        monkeypatch.setattr(runner, '_lock_folder', taken_first)
        assert fails(capsys, *args, str(new_work)) == refusal.replace(str(work), str(new_work))
    assert not results.exists() and [p.name for p in new_work.iterdir()] == ['.lock']


def test_a_refused_run_leaves_no_folder_its_work_dir_needed(capsys, monkeypatch, tmp_path, tiny_run):
    """The work dir and the folders above it, made for its lock, go with a refusal; a file
    system without locks is named as such, not as another process's."""
    args = ['run', '--protocol', 'synth-19-1-overlap', '--config', tiny_run['config'],
            '--results', str(tmp_path / 'results'), '--work-dir', str(tmp_path / 'new' / 'w' / 'work')]
    assert fails(capsys, *args, '--data-root', str(tmp_path / 'nowhere')).endswith('not found')
    assert sorted(os.listdir(tmp_path)) == []

    def no_locks(*_):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
    monkeypatch.setattr(runner.fcntl, 'lockf', no_locks)
    assert fails(capsys, *args) == f'cssbench: error: [Errno {errno.ENOLCK}] {os.strerror(errno.ENOLCK)}'
    assert sorted(os.listdir(tmp_path)) == []


def test_overwrite_clears_only_the_steps_of_a_work_dir(capsys, tmp_path, tiny_run):
    """--overwrite deletes the run's step<t> folders in a --work-dir, and nothing else there."""
    data = make_synth(tmp_path / 'synth', n_train=30, n_val=8, size=32, progress=False)
    work = tmp_path / 'work'
    (work / 'steps').mkdir(parents=True)
    (work / 'steps' / 'keep.json').write_text('{}')
    (work / 'step0').mkdir()
    (work / 'step0' / 'stale.txt').write_text('')
    assert main(['run', '--protocol', 'synth-19-1-overlap', '--config', tiny_run['config'],
                 '--data-root', str(data), '--epochs', '1', '--results', str(tmp_path / 'results'),
                 '--work-dir', str(work), '--overwrite']) == 0
    assert (work / 'steps' / 'keep.json').exists() and not (work / 'step0' / 'stale.txt').exists()


def test_a_run_continued_in_another_work_dir_is_refused_before_it_writes(capsys, tmp_path, tiny_run):
    data = make_synth(tmp_path / 'synth', n_train=30, n_val=8, size=32, progress=False)
    args = ['run', '--protocol', 'synth-19-1-overlap', '--config', tiny_run['config'],
            '--data-root', str(data), '--epochs', '1', '--results', str(tmp_path / 'results'),
            '--keep-epoch-checkpoints', '--no-step0-cache']
    run_dir = tmp_path / 'results' / 'synth-19-1-overlap' / 'ft' / 'tiny-seed0'
    trained_in, other = tmp_path / 'work', tmp_path / 'other'
    assert main([*args, '--work-dir', str(trained_in)]) == 0
    capsys.readouterr()
    refusal = (f'cssbench: error: {run_dir}: its checkpoints are in {trained_in.resolve()}, the '
               f'work dir it trained in: give --work-dir {trained_in.resolve()}, or move that '
               f'folder to {other} first (or --overwrite)')

    def refused_leaving_all_as_it_was(expected: str) -> None:
        record = (run_dir / 'run.json').read_bytes()
        assert fails(capsys, *args, '--work-dir', str(other)) == expected
        assert (run_dir / 'run.json').read_bytes() == record
        assert not other.exists()

    stop_run_in_step(run_dir, trained_in, 1)   # step 0's weights are in the work dir it names
    refused_leaving_all_as_it_was(refusal)
    # A record from before run.json named its work dir: refused for the finished step's weights
    run = json.loads((run_dir / 'run.json').read_text())
    (run_dir / 'run.json').write_text(json.dumps({k: v for k, v in run.items() if k != 'work_dir'}))
    refused_leaving_all_as_it_was(
        f'cssbench: error: {run_dir / "steps" / "step0.json"}: step 0 is done, but its weights '
        f'are not in {other}: give the --work-dir it was trained in (or --overwrite)')
    # No step finished: step 0's epoch checkpoint would be missed, the step trained from its start
    (run_dir / 'run.json').write_text(json.dumps(run))
    stop_run_in_step(run_dir, trained_in, 0)
    refused_leaving_all_as_it_was(refusal)
    # Checkpoints moved: the run continues where they are, from step 0's epoch checkpoint
    trained_in.rename(other)
    assert main([*args, '--work-dir', str(other)]) == 0
    assert (f'[synth-19-1-overlap/ft/{run_dir.name}] step 0: trained, to be evaluated, from its epoch checkpoint '
            f'in {other / "step0"}\n') in capsys.readouterr().out
    run = json.loads((run_dir / 'run.json').read_text())
    assert (run['status'], run['work_dir']) == ('complete', str(other.resolve()))


def test_a_continued_step_whose_checkpoint_misses_weights_says_so(capsys, tmp_path, tiny_run):
    import torch
    data = make_synth(tmp_path / 'synth', n_train=30, n_val=8, size=32, progress=False)
    results = tmp_path / 'results'
    args = ['run', '--protocol', 'synth-19-1-overlap', '--config', tiny_run['config'],
            '--data-root', str(data), '--epochs', '1', '--keep-epoch-checkpoints',
            '--no-step0-cache', '--results', str(results)]
    assert main(args) == 0
    run_dir = results / 'synth-19-1-overlap' / 'ft' / 'tiny-seed0'
    stop_run_in_step(run_dir, run_dir / 'work', 1)
    checkpoint = run_dir / 'work' / 'step1' / 'epoch_1.pth'
    state = torch.load(checkpoint, weights_only=False)
    missing = next(iter(state['state_dict']))
    del state['state_dict'][missing]
    torch.save(state, checkpoint)
    capsys.readouterr()
    assert main(args) == 0
    out = capsys.readouterr().out   # mmengine's warning shows; its 'Loads checkpoint' line not
    assert f'missing keys in source state_dict: {missing}\n' in out
    assert 'Loads checkpoint' not in out


def test_a_run_folder_moved_away_from_its_work_dir_continues_in_it(capsys, tmp_path, tiny_run):
    data = make_synth(tmp_path / 'synth', n_train=30, n_val=8, size=32, progress=False)
    args = ['run', '--protocol', 'synth-19-1-overlap', '--config', tiny_run['config'],
            '--data-root', str(data), '--epochs', '1', '--keep-epoch-checkpoints',
            '--no-step0-cache']
    work = tmp_path / 'work'
    assert main([*args, '--results', str(tmp_path / 'results'), '--work-dir', str(work)]) == 0
    stop_run_in_step(tmp_path / 'results' / 'synth-19-1-overlap' / 'ft' / 'tiny-seed0', work, 1)
    (tmp_path / 'results').rename(tmp_path / 'moved')
    run_dir = tmp_path / 'moved' / 'synth-19-1-overlap' / 'ft' / 'tiny-seed0'
    args += ['--results', str(tmp_path / 'moved')]
    capsys.readouterr()
    # Its record names the work dir, whose marker names the folder it left: refused without it
    record = (run_dir / 'run.json').read_bytes()
    assert fails(capsys, *args) == (
        f'cssbench: error: {run_dir}: its checkpoints are in {work.resolve()}, the work dir it '
        f'trained in: give --work-dir {work.resolve()}, or move that folder to {run_dir / "work"} '
        f'first (or --overwrite)')
    assert (run_dir / 'run.json').read_bytes() == record and not (run_dir / 'work').exists()
    # and continued in it, from step 1's epoch checkpoint, which the marker then names
    assert main([*args, '--work-dir', str(work)]) == 0
    assert (f'[synth-19-1-overlap/ft/{run_dir.name}] step 1: trained, to be evaluated, from its epoch checkpoint '
            f'in {work / "step1"}\n') in capsys.readouterr().out
    assert json.loads((run_dir / 'run.json').read_text())['status'] == 'complete'
    assert json.loads((work / 'cssbench-work.json').read_text())['run'] == str(run_dir.resolve())
    # Moved again, and trained over with --overwrite: the work dir is still its own
    (tmp_path / 'moved').rename(tmp_path / 'again')
    again = tmp_path / 'again' / 'synth-19-1-overlap' / 'ft' / 'tiny-seed0'
    assert main([*args[:-1], str(tmp_path / 'again'), '--work-dir', str(work), '--overwrite']) == 0
    assert json.loads((work / 'cssbench-work.json').read_text())['run'] == str(again.resolve())


def test_a_step_stopped_mid_way_continues_only_with_as_many_processes(capsys, tmp_path, tiny_run):
    data = make_synth(tmp_path / 'synth', n_train=30, n_val=8, size=32, progress=False)
    args = ['run', '--protocol', 'synth-19-1-overlap', '--config', tiny_run['config'],
            '--data-root', str(data), '--epochs', '2', '--results', str(tmp_path / 'results'),
            '--keep-epoch-checkpoints']
    assert main(args) == 0
    capsys.readouterr()
    # as if two torchrun processes had stopped in step 1 while writing its last epoch's
    # checkpoint (of two): it continues after its first epoch
    run_dir = tmp_path / 'results' / 'synth-19-1-overlap' / 'ft' / 'tiny-seed0'
    (run_dir / 'steps' / 'step1.json').unlink()
    last = run_dir / 'work' / 'step1' / 'epoch_2.pth'
    last.write_bytes(last.read_bytes()[:1000])
    run = json.loads((run_dir / 'run.json').read_text())
    (run_dir / 'run.json').write_text(json.dumps(dict(run, status='running')))
    (run_dir / 'work' / 'step1' / 'clock.json').write_text('{"train_seconds": 1.0, "processes": 2}')
    files = sorted(p for p in run_dir.rglob('*') if p.is_file())
    err = fails(capsys, *args)
    assert err == (f'cssbench: error: {run_dir}: step 1 stopped mid-way, trained by 2 processes, '
                   f'and its epoch checkpoints continue only so: rerun under torchrun '
                   f'--nproc_per_node=2, or delete {run_dir / "work" / "step1"} to train the step '
                   f'again from its start, or --overwrite the run')
    assert sorted(p for p in run_dir.rglob('*') if p.is_file()) == files
    # step 0 stays; step 1 trains again from its start
    shutil.rmtree(run_dir / 'work' / 'step1')
    assert main(args) == 0
    assert 'step 0: done before' in capsys.readouterr().out
    assert json.loads((run_dir / 'run.json').read_text())['status'] == 'complete'


def test_a_work_dir_marker_is_a_runs_own_by_its_run_or_its_runs_record(tmp_path):
    from cssbench.runner import _marks_this_run
    work, here, left, kept = (tmp_path / name for name in ('w', 'here', 'left', 'kept'))
    kept.mkdir()
    (kept / 'run.json').write_text('{}')   # a run still stored there
    identity = dict(run=str(here))
    names_work = dict(work_dir=str(work.resolve()))
    assert _marks_this_run(str(here), work, identity, None)
    # a folder the run left (moved here since), when this run's record names the work dir
    assert _marks_this_run(str(left), work, identity, names_work)
    assert not _marks_this_run(str(left), work, identity, dict(work_dir=str(tmp_path / 'x')))
    assert not _marks_this_run(str(left), work, identity, None)
    assert not _marks_this_run(str(kept), work, identity, names_work)   # a copy: the original's
    # an older marker, naming no run: a stored run's, unless its record names another work dir
    assert _marks_this_run(None, work, identity, {}) and _marks_this_run(None, work, identity, names_work)
    assert not _marks_this_run(None, work, identity, dict(work_dir=str(tmp_path / 'x')))
    assert not _marks_this_run(None, work, identity, None)   # a new run


@pytest.mark.parametrize('command', [['list'], ['table', '--protocol', 'synth-15-1-overlap'],
                                     ['make-synth', '--out', 'synth']])
def test_only_run_runs_under_torchrun(capsys, monkeypatch, tmp_path, command):
    """torchrun starts every command in each of its processes: any other than `run` would
    print (and write) once per process; it is refused, rank 0 saying why."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv('WORLD_SIZE', '2')
    monkeypatch.setenv('RANK', '0')
    assert main(command) == 2
    assert capsys.readouterr() == ('', f'cssbench: error: {command[0]} runs in one process: only '
                                       f'`cssbench run` runs under torchrun\n')
    monkeypatch.setenv('RANK', '1')
    assert main(command) == 2
    assert capsys.readouterr() == ('', '')
    assert not list(tmp_path.iterdir())
