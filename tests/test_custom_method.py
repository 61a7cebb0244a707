"""The README's "Add your own method" example is complete: it registers, builds and runs."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from cssbench.errors import UserError
from cssbench.methods import METHODS, get_method, register_method
from cssbench.registry import MODELS
from cssbench.runner import run_protocol
from cssbench.synth import make_synth
from conftest import unregister_methods

ROOT = Path(__file__).resolve().parent.parent


def readme_example() -> str:
    text = (ROOT / 'README.md').read_text()
    match = re.search(r'<!-- example-method:.*?-->\s*```python\n(.*?)```', text, re.S)
    assert match, 'the README lost its example method'
    return match.group(1)


def test_readme_method_registers_and_runs_two_steps(tmp_path):
    namespace: dict = {'__name__': 'readme_example'}
    exec(compile(readme_example(), 'README.md', 'exec'), namespace)
    try:
        method = get_method('feature-anchor')
        assert method.model_type == 'cssbench.FeatureAnchor' and method.description

        data = make_synth(tmp_path / 'data', n_train=60, n_val=12, size=32, progress=False)
        config = tmp_path / 'tiny.py'
        config.write_text(f"_base_ = ['{ROOT / 'benchmark' / 'configs' / 'small.py'}']\n"
                          "data = dict(crop_size=32, batch_size=4, num_workers=0)\n"
                          "model = dict(anchor_weight=0.5)\n")
        steps = run_protocol('synth-15-5-overlap', 'feature-anchor', config=str(config),
                             data_root=str(data), epochs=1, results_root=tmp_path / 'results',
                             log=lambda *a: None)
        assert [s['step'] for s in steps] == [0, 1]
        assert steps[1]['columns']['new']['label'] == '16-20'
    finally:
        unregister_methods('feature-anchor')


def test_a_method_or_class_name_taken_by_another_class_is_refused_naming_both():
    """A copied method file keeping either name would replace the shipped method, or break
    the registry at import: refused in one line; the shipped method stays."""
    from cssbench.baselines.ft import FineTuning as Shipped
    here = f'{__name__}.test_a_method_or_class_name_taken_by_another_class_is_refused_naming_both.<locals>'
    with pytest.raises(UserError) as taken:
        @register_method('ft')
        class Copy(Shipped):
            pass
    assert str(taken.value) == (f"{here}.Copy: the method name 'ft' is taken, by "
                                f"cssbench.baselines.ft.FineTuning: choose another")
    with pytest.raises(UserError) as taken:
        @register_method('ft-copy')
        class FineTuning(Shipped):
            pass
    assert str(taken.value) == (f'{here}.FineTuning: the class name FineTuning is taken, by '
                                f'cssbench.baselines.ft.FineTuning (it names the model in the '
                                f'registry): rename the class')
    assert 'ft-copy' not in METHODS
    assert get_method('ft').defined_in == 'cssbench.baselines.ft.FineTuning'
    assert MODELS.get('cssbench.FineTuning') is Shipped
    with pytest.raises(UserError, match=r"^method name 'ft copy' is not a plain name"):
        register_method('ft copy')
    with pytest.raises(UserError, match=r"^method name 'all' is --method's for every method"):
        register_method('all')


def test_a_module_imported_again_registers_its_methods_again():
    namespace: dict = {'__name__': 'readme_example'}
    try:
        for _ in range(2):   # as importlib.reload would
            exec(compile(readme_example(), 'README.md', 'exec'), dict(namespace))
        assert get_method('feature-anchor').defined_in == 'readme_example.FeatureAnchor'
    finally:
        unregister_methods('feature-anchor')


def test_a_method_whose_module_is_not_imported_is_refused_naming_the_file_and_the_import(
        tmp_path, monkeypatch):
    import cssbench.baselines as package
    monkeypatch.setattr(package, '__file__', str(tmp_path / '__init__.py'))
    (tmp_path / 'mine.py').write_text(readme_example().replace("'feature-anchor'", "'mine'"))
    with pytest.raises(UserError) as unknown:
        get_method('mine')
    assert str(unknown.value).endswith(f"; {tmp_path / 'mine.py'} registers it, but "
                                       f"baselines/__init__.py does not import it (add: from . "
                                       f"import mine)")
    with pytest.raises(UserError) as unknown:   # no file registers it
        get_method('yours')
    assert str(unknown.value).startswith("unknown method 'yours' (known: ")
    assert str(unknown.value).endswith(')')


def test_a_method_shares_a_cached_step0_only_by_the_kind_its_own_class_states():
    """A subclass may train step 0 otherwise than its base (a term without a teacher): it does
    not inherit the base's step-0 kind, and trains its own step 0 unless it states one."""
    from cssbench.baselines.lwf import LwF

    class AddsAStep0Term(LwF):
        pass

    class StatesItsKind(LwF):
        step0_kind = 'fine-tuning'
    assert (LwF.step0_kind, AddsAStep0Term.step0_kind, StatesItsKind.step0_kind) == \
        ('fine-tuning', None, 'fine-tuning')
    namespace: dict = {'__name__': 'readme_example'}
    try:
        exec(compile(readme_example(), 'README.md', 'exec'), namespace)
        assert get_method('feature-anchor').step0_kind == 'fine-tuning'   # the README's states it
    finally:
        unregister_methods('feature-anchor')


def test_a_model_that_the_meta_device_cannot_build_is_not_refused_for_it():
    """The config check builds each method's model on the meta device; a constructor doing
    what meta tensors cannot (reading a number back) is the check's limit, not the config's."""
    import torch
    from cssbench.baselines.ft import FineTuning
    from cssbench.config import load_config
    from cssbench.protocols import load_protocol
    from cssbench.runner import check_model_builds

    @register_method('reads-back')
    class ReadsBack(FineTuning):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.scale = torch.ones(()).item()
    try:
        check_model_builds(load_config('small'), 'cssbench.ReadsBack', load_protocol('voc-15-1-overlap'))
    finally:
        unregister_methods('reads-back')
