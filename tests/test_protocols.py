"""Tests of protocol loading and validation (benchmark/protocols.py)."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from cssbench.cli import main
from cssbench.protocols import (CLASS_ORDERS, EVAL_CROP_CHOICES, EVAL_UNSEEN_CHOICES, FILE_DEFAULTS,
                                PROTOCOLS_DIR, TRAIN_IGNORE_CHOICES, Protocol, ProtocolError,
                                available_protocols, load_protocol, load_protocol_file,
                                parse_protocol, setting_notes)

SHIPPED = sorted(p.stem for p in Path(PROTOCOLS_DIR).glob('*.yaml'))


def test_shipped_protocol_list() -> None:
    assert len(SHIPPED) == 28
    assert available_protocols() == SHIPPED
    assert 'voc-15-1-overlap' in SHIPPED and 'ade-100-50' in SHIPPED


def test_an_installed_wheel_ships_the_protocols(tmp_path) -> None:
    """pip install . (not -e): the package alone, with no checkout beside it to read from."""
    repo, source, site = Path(__file__).resolve().parent.parent, tmp_path / 'src', tmp_path / 'site'
    for part in ('benchmark', 'baselines', 'protocols'):
        shutil.copytree(repo / part, source / part, ignore=shutil.ignore_patterns('__pycache__'))
    for part in ('pyproject.toml', 'README.md'):
        shutil.copy(repo / part, source / part)
    subprocess.run([sys.executable, '-m', 'pip', 'install', '-q', '--no-deps', '--no-index',
                    '--no-build-isolation', '--target', str(site), str(source)], check=True)
    listed = subprocess.run([sys.executable, '-m', 'cssbench', 'list'], cwd=tmp_path, check=True,
                            env={**os.environ, 'PYTHONPATH': str(site)}, capture_output=True,
                            text=True).stdout
    assert (site / 'cssbench' / 'shipped_protocols' / 'voc-15-1-overlap.yaml').is_file()
    assert [line.split()[0] for line in listed.split('methods:')[0].splitlines()[1:]] == SHIPPED


@pytest.mark.parametrize('name', SHIPPED)
def test_every_shipped_protocol_loads(name: str) -> None:
    p = load_protocol(name)
    assert isinstance(p, Protocol)
    assert p.name == name
    assert p.dataset == name.split('-')[0]
    assert p.mode == ('disjoint' if name.endswith('disjoint') else 'overlap')
    plop = name.endswith('-plop')   # PLOP's label conventions; the others are the reference's
    assert (p.train_ignore, p.eval_unseen) == (('ignore', 'background') if plop else ('background', 'ignore'))
    assert p.steps[0][0] == 0


def test_voc_15_1_overlap_steps() -> None:
    p = load_protocol('voc-15-1-overlap')
    assert p.steps == (tuple(range(16)), (16,), (17,), (18,), (19,), (20,))
    assert p.mode == 'overlap'
    assert p.dataset == 'voc'
    assert p.num_steps == 6
    assert len(p.class_order) == 21


def test_the_readmes_protocol_file_is_the_shipped_voc_15_1_overlap(tmp_path) -> None:
    readme = (Path(__file__).resolve().parent.parent / 'README.md').read_text()
    example = readme.split('## Protocols', 1)[1].split('```yaml\n', 1)[1].split('```', 1)[0]
    (tmp_path / 'mine.yaml').write_text(example)
    shipped = load_protocol('voc-15-1-overlap')
    assert load_protocol(str(tmp_path / 'mine.yaml')) == replace(shipped, description='')
    random = (example.replace('class_order: fixed', 'class_order: random')
              .replace('# class_order_seed', 'class_order_seed')
              .replace('name: voc-15-1-overlap', 'name: mine-random'))   # not the shipped one
    (tmp_path / 'random.yaml').write_text(random)
    drawn = load_protocol(str(tmp_path / 'random.yaml'))
    assert drawn.ordering == 'random' and drawn.ordering_seed == 3


def test_voc_10_1_disjoint_steps() -> None:
    p = load_protocol('voc-10-1-disjoint')
    assert p.num_steps == 11
    assert p.mode == 'disjoint'
    assert p.steps[0] == tuple(range(11))
    assert p.steps[1:] == ((11,), (12,), (13,), (14,), (15,), (16,), (17,), (18,), (19,), (20,))


def test_ade_protocols() -> None:
    p = load_protocol('ade-100-10')
    assert p.num_steps == 6
    assert len(p.class_order) == 151
    assert p.steps[0] == tuple(range(101))
    assert p.steps[1] == (101, 102, 103, 104, 105, 106, 107, 108, 109, 110)
    assert p.steps[5] == tuple(range(141, 151))
    assert load_protocol('ade-100-5').num_steps == 11
    assert load_protocol('ade-100-5').steps[1] == (101, 102, 103, 104, 105)
    p = load_protocol('ade-50-50')
    assert p.steps == (tuple(range(51)), tuple(range(51, 101)), tuple(range(101, 151)))
    assert load_protocol('ade-100-50').steps == (tuple(range(101)), tuple(range(101, 151)))


@pytest.mark.parametrize('mode', ['overlap', 'disjoint'])
def test_voc_19_1(mode: str) -> None:
    p = load_protocol(f'voc-19-1-{mode}')
    assert p.steps == (tuple(range(20)), (20,))
    assert p.mode == mode


@pytest.mark.parametrize('name', [n for n in SHIPPED if n.startswith('synth-')])
def test_synth_protocols_mirror_voc(name: str) -> None:
    synth = load_protocol(name)
    voc = load_protocol('voc-' + name[len('synth-'):])
    assert synth.dataset == 'synth'
    assert synth.steps == voc.steps
    assert synth.mode == voc.mode
    assert synth.train_ignore == voc.train_ignore


def test_voc_and_synth_sets_match() -> None:
    voc = {n[len('voc-'):] for n in SHIPPED if n.startswith('voc-')}
    synth = {n[len('synth-'):] for n in SHIPPED if n.startswith('synth-')}
    assert voc == synth == {'10-1-disjoint', '10-1-overlap', '10-10-disjoint', '10-10-overlap',
                            '15-1-disjoint', '15-1-overlap', '15-5-disjoint', '15-5-overlap',
                            '19-1-disjoint', '19-1-overlap', '15-1-overlap-random', '15-1-overlap-plop'}


# --- helpers on a known protocol ----------------------------------------------------------

def test_classes_seen_old_sizes_on_15_1() -> None:
    p = load_protocol('voc-15-1-overlap')
    assert p.classes_seen(0) == (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15)
    assert p.classes_seen(2) == (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17)
    assert p.classes_seen(5) == tuple(range(21))
    assert p.classes_old(0) == ()
    assert p.classes_old(1) == (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15)
    assert p.classes_old(3) == (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17)
    assert p.step_sizes(0) == [16]
    assert p.step_sizes(1) == [16, 1]
    assert p.step_sizes(5) == [16, 1, 1, 1, 1, 1]
    assert p.class_order == tuple(range(21))


def test_joint_on_15_1() -> None:
    p = load_protocol('voc-15-1-overlap')
    j = p.joint()
    assert j.steps == (tuple(range(21)),)
    assert j.num_steps == 1
    assert j.dataset == 'voc' and j.mode == 'overlap' and j.name == 'voc-15-1-overlap'
    assert j.step_sizes(0) == [21]
    assert j.train_ignore == p.train_ignore


def test_fingerprint_ignores_name_but_not_steps() -> None:
    a = parse_protocol(dict(name='a', dataset='voc', mode='overlap', steps=['0-15', '16-20']))
    b = parse_protocol(dict(name='b', dataset='voc', mode='overlap', steps=['0-15', '16-20']))
    c = parse_protocol(dict(name='a', dataset='voc', mode='disjoint', steps=['0-15', '16-20']))
    d = parse_protocol(dict(name='a', dataset='voc', mode='overlap', steps=['0-10', '11-20']))
    assert a.fingerprint == b.fingerprint
    assert len({a.fingerprint, c.fingerprint, d.fingerprint}) == 3


def test_random_class_order_is_drawn_by_the_run_seed() -> None:
    p = load_protocol('voc-15-1-overlap-random')
    assert p.ordering == 'random' and p.steps == load_protocol('voc-15-1-overlap').steps
    a, b = p.with_class_order(0), p.with_class_order(1)
    for q in (a, b):
        assert [len(s) for s in q.steps] == [16, 1, 1, 1, 1, 1]
        assert q.steps[0][0] == 0 and sorted(q.class_order) == list(range(21))
        assert q.ordering == 'drawn' and q.with_class_order(5) == q   # drawn once only
    assert a.steps != b.steps
    assert p.with_class_order(0) == a                                  # the same seed, the same order
    assert a.to_dict()['class_order'] == 'drawn' and a.to_dict()['class_order_seed'] == 0
    assert a.fingerprint != b.fingerprint
    # numpy's permutation of 1..20 under seed 0, then cut into steps of 15, 1, 1, 1, 1, 1
    perm = np.random.default_rng(0).permutation(np.arange(1, 21))
    assert a.steps[1:] == tuple((int(c),) for c in perm[15:])
    assert set(a.steps[0]) == {0, *map(int, perm[:15])}


def test_class_order_seed_fixes_the_order() -> None:
    p = parse_protocol(dict(name='r', dataset='voc', mode='overlap', steps=['0-10', '11-20'],
                            class_order='random', class_order_seed=7))
    assert p.with_class_order(0) == p.with_class_order(1)
    assert p.with_class_order(0).ordering_seed == 7


def test_fixed_order_is_untouched() -> None:
    p = load_protocol('voc-15-1-overlap')
    assert p.with_class_order(3) is p and 'class_order' not in p.to_dict()


@pytest.mark.parametrize('over, message', [
    (dict(class_order='shuffled'), "field class_order: 'shuffled' is not one of"),
    (dict(class_order_seed=3), 'field class_order_seed: only with class_order: random'),
    (dict(class_order='random', class_order_seed=-1), 'field class_order_seed: expected a non-negative'),
    (dict(class_order='random', class_order_seed='x'), 'field class_order_seed: expected a non-negative'),
])
def test_class_order_errors(over, message) -> None:
    with pytest.raises(ProtocolError, match=message):
        parse_protocol(dict(name='r', dataset='voc', mode='overlap', steps=['0-15', '16-20'], **over))


# --- parsing ------------------------------------------------------------------------------

def _base(**over) -> dict:
    data = dict(name='custom', dataset='voc', mode='overlap', steps=['0-15', 16, '17-18', [19, 20]])
    data.update(over)
    return data


def test_parse_valid_mixed_items() -> None:
    p = parse_protocol(_base(train_ignore='ignore', eval_unseen='background', eval_crop='whole',
                             description='d'), 'src.yaml')
    assert p.steps == (tuple(range(16)), (16,), (17, 18), (19, 20))
    assert (p.train_ignore, p.eval_unseen, p.eval_crop) == ('ignore', 'background', 'whole')
    assert p.description == 'd'
    assert p.source == Path('src.yaml')


def test_eval_unseen_is_recorded_only_where_it_is_not_the_default() -> None:
    # protocols (and the split caches keyed by their fingerprints) written before the field
    # existed stay as they were
    reference, plop = load_protocol('voc-15-1-overlap'), load_protocol('voc-15-1-overlap-plop')
    assert 'eval_unseen' not in reference.to_dict()
    assert plop.to_dict()['eval_unseen'] == 'background'
    assert parse_protocol(dict(plop.to_dict(), name='x')).eval_unseen == 'background'
    assert replace(plop, name=reference.name, train_ignore='background', eval_unseen='ignore',
                   description=reference.description, source=None).to_dict() == reference.to_dict()


def test_eval_crop_is_recorded_only_where_it_is_not_the_default() -> None:
    reference = load_protocol('voc-15-1-overlap')
    assert reference.eval_crop == 'center' and 'eval_crop' not in reference.to_dict()
    whole = parse_protocol(dict(reference.to_dict(), eval_crop='whole'))
    assert whole.to_dict() == dict(reference.to_dict(), eval_crop='whole')
    # scored otherwise, so its split cache is keyed apart (and its step-0 IoUs: step0.py)
    assert whole.fingerprint != reference.fingerprint
    assert parse_protocol(whole.to_dict()).eval_crop == 'whole'


@pytest.mark.parametrize('over, field, detail', [
    (dict(dataset='cityscapes'), 'dataset', 'cityscapes'),
    (dict(dataset=['voc']), 'dataset', "['voc'] is not one of ('voc', 'ade', 'synth')"),
    (dict(dataset={'voc': 1}), 'dataset', "{'voc': 1} is not one of"),
    (dict(dataset=False), 'dataset', 'YAML reads an unquoted yes, no'),
    (dict(steps=['0-15', '16-21']), 'steps[1]', '21'),
    (dict(steps=['0-15', '16-20', 21]), 'steps[2]', '21'),
    (dict(steps=['0-15', '15-20']), 'steps[1]', 'class 15 is already in steps[0]'),
    (dict(steps=['0-15', [16, 17], 17, '18-20']), 'steps[2]', 'class 17 is already in steps[1]'),
    (dict(steps=['0-15', [], '16-20']), 'steps[1]', 'no classes'),
    (dict(steps=['0-15']), 'steps', '16, 17, 18, 19, 20'),
    (dict(steps=['0-15', '16-19']), 'steps', '20'),
    (dict(steps=['1-15', '0', '16-20']), 'steps[0]', 'background'),
    (dict(steps=['0-15', 'x-20']), 'steps[1]', "'x-20'"),
    (dict(steps=['0-15', '20-16']), 'steps[1]', 'empty'),
    (dict(steps=['0-15', True, '16-20']), 'steps[1]', 'True'),
    (dict(steps=[]), 'steps', 'non-empty'),
    (dict(mode='sequential'), 'mode', 'sequential'),
    (dict(train_ignore='zero'), 'train_ignore', 'zero'),
    (dict(eval_unseen=255), 'eval_unseen', '255'),
    (dict(eval_crop='full'), 'eval_crop', "'full' is not one of ('center', 'whole')"),
    (dict(name='../../elsewhere'), 'name', 'not a plain name'),   # it names a results folder
    (dict(name='my protocol'), 'name', 'not a plain name'),
])
def test_parse_errors_name_source_and_field(over, field, detail) -> None:
    with pytest.raises(ProtocolError) as e:
        parse_protocol(_base(**over), 'my/proto.yaml')
    msg = str(e.value)
    assert 'my/proto.yaml' in msg
    assert field in msg
    assert detail in msg


@pytest.mark.parametrize('value', ['', '~', 'null'])
def test_an_optional_field_left_without_a_value_is_refused(tmp_path, value) -> None:
    path = tmp_path / 'p.yaml'
    path.write_text(f'name: p\ndataset: voc\nmode: overlap\nsteps: ["0-15", "16-20"]\n'
                    f'eval_crop: {value}\n')
    with pytest.raises(ProtocolError, match=re.escape(
            f"{path}: field eval_crop: no value (one of ('center', 'whole'))")):
        load_protocol_file(path)


@pytest.mark.parametrize('missing', ['name', 'dataset', 'mode', 'steps'])
def test_parse_missing_field(missing: str) -> None:
    data = _base()
    del data[missing]
    with pytest.raises(ProtocolError) as e:
        parse_protocol(data, 'p.yaml')
    assert 'p.yaml' in str(e.value)
    assert repr(missing) in str(e.value)
    assert 'missing' in str(e.value)


def test_parse_unknown_field_and_non_mapping() -> None:
    with pytest.raises(ProtocolError, match=r"p\.yaml.*'colour'"):
        parse_protocol(_base(colour='red'), 'p.yaml')
    with pytest.raises(ProtocolError, match=r'p\.yaml'):
        parse_protocol(['not', 'a', 'mapping'], 'p.yaml')


def test_malformed_yaml_names_file(tmp_path: Path) -> None:
    path = tmp_path / 'broken.yaml'
    path.write_text('name: broken\ndataset: voc\nsteps: ["0-15", 16\nmode: overlap\n')
    with pytest.raises(ProtocolError) as e:
        load_protocol_file(path)
    assert str(path) in str(e.value)
    assert 'malformed YAML' in str(e.value)
    with pytest.raises(ProtocolError, match='broken.yaml'):
        load_protocol(str(path))


@pytest.mark.parametrize('value, read', [('', 'None'), ('yes', 'True'), ('1.50', '1.5'),
                                         ('2024-01-01', 'datetime.date(2024, 1, 1)')])
def test_a_name_that_yaml_reads_as_no_text_is_refused(tmp_path, value, read) -> None:
    # taken as str() of it, the protocol would be stored under another name than the file's
    path = tmp_path / 'p.yaml'
    path.write_text(f'name: {value}\ndataset: voc\nmode: overlap\nsteps: ["0-15", "16-20"]\n')
    with pytest.raises(ProtocolError, match=re.escape(f'{path}: field name: {read} is not text')):
        load_protocol_file(path)
    path.write_text(f'name: "{value or "p"}"\ndataset: voc\nmode: overlap\nsteps: ["0-15", "16-20"]\n')
    assert load_protocol_file(path).name == (value or 'p')


@pytest.mark.parametrize('value, read', [('\n  source: MiB', "{'source': 'MiB'}"),
                                         ('[a, b]', "['a', 'b']"), ('yes', 'True')])
def test_a_description_that_yaml_reads_as_no_text_is_refused(tmp_path, value, read) -> None:
    # an unquoted "key: value" line below it is a mapping, which str() made "{'source': ...}"
    path = tmp_path / 'p.yaml'
    head = 'name: p\ndataset: voc\nmode: overlap\nsteps: ["0-15", "16-20"]\n'
    path.write_text(f'{head}description: {value}\n')
    with pytest.raises(ProtocolError, match=re.escape(f'{path}: field description: {read} is not text')):
        load_protocol_file(path)
    path.write_text(f'{head}description:\n')   # nothing: no description, not "None"
    assert load_protocol_file(path).description == ''
    path.write_text(f'{head}description: "source: MiB"\n')
    assert load_protocol_file(path).description == 'source: MiB'


def test_protocol_file_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / 'latin1.yaml'
    path.write_bytes('name: caf\xe9\n'.encode('latin-1'))
    with pytest.raises(ProtocolError, match=f'{path}: not a UTF-8 text file'):
        load_protocol_file(path)


def test_missing_protocol_file(tmp_path: Path) -> None:
    path = tmp_path / 'absent.yaml'
    with pytest.raises(ProtocolError) as e:
        load_protocol(str(path))
    assert str(path) in str(e.value)


def test_unknown_protocol_name() -> None:
    with pytest.raises(ProtocolError) as e:
        load_protocol('nope')
    assert "'nope'" in str(e.value)


def test_custom_yaml_path_loads(tmp_path: Path) -> None:
    path = tmp_path / 'mine.yml'
    path.write_text('name: my-protocol\ndataset: voc\nmode: disjoint\n'
                    'train_ignore: ignore\nsteps: ["0-10", "11-15", [16, "17-20"]]\n')
    p = load_protocol(str(path))
    assert p.name == 'my-protocol'  # a file path need not match its name
    assert p.dataset == 'voc' and p.mode == 'disjoint' and p.train_ignore == 'ignore'
    assert p.steps == (tuple(range(11)), (11, 12, 13, 14, 15), (16, 17, 18, 19, 20))
    assert p.source == path
    assert p.to_dict() == dict(name='my-protocol', dataset='voc', mode='disjoint',
                               steps=[list(range(11)), [11, 12, 13, 14, 15], [16, 17, 18, 19, 20]],
                               train_ignore='ignore')
    upper = tmp_path / 'MINE.YAML'   # the suffix in any case
    upper.write_text(path.read_text())
    assert load_protocol(str(upper)).to_dict() == p.to_dict()


def test_custom_yaml_with_errors_names_file(tmp_path: Path) -> None:
    path = tmp_path / 'bad.yaml'
    path.write_text('name: bad\ndataset: voc\nmode: overlap\nsteps: ["0-15", 21]\n')
    with pytest.raises(ProtocolError) as e:
        load_protocol(str(path))
    assert str(path) in str(e.value) and 'steps[1]' in str(e.value) and '21' in str(e.value)


def test_list_shows_where_a_shipped_protocol_departs_from_the_reference(capsys) -> None:
    assert main(['list']) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()
             if line.startswith('  ')}
    assert lines['voc-15-1-overlap'].endswith('6 steps  (15-1-1-...)')
    assert lines['voc-15-1-overlap-plop'].endswith('(15-1-1-...)  train_ignore: ignore, '
                                                   'eval_unseen: background')
    assert lines['synth-15-1-overlap-random'].endswith('  class_order: random')
    assert lines['ade-100-50'].endswith('2 steps  (100-50)')


@pytest.mark.parametrize('field, choices', [('train_ignore', TRAIN_IGNORE_CHOICES),
                                            ('eval_unseen', EVAL_UNSEEN_CHOICES),
                                            ('eval_crop', EVAL_CROP_CHOICES),
                                            ('class_order', CLASS_ORDERS)])
def test_every_setting_that_is_not_the_references_is_noted_in_the_tables(field, choices) -> None:
    assert {'train_ignore', 'eval_unseen', 'eval_crop', 'class_order'} == set(FILE_DEFAULTS)
    for value in set(choices) - {FILE_DEFAULTS[field]}:
        # as a run records it: its class order, if random, drawn
        record = parse_protocol(_base(**{field: value})).with_class_order(0).to_dict()
        [note] = setting_notes(record)
        assert f'({field}: {value};' in note
