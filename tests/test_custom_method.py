"""The README's "Add your own method" example is complete: it registers, builds and runs."""
from __future__ import annotations

import re
from pathlib import Path

from cssbench.methods import METHODS, get_method
from cssbench.runner import run_protocol
from cssbench.synth import make_synth

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
        METHODS.pop('feature-anchor', None)
        from cssbench.registry import MODELS
        MODELS._module_dict.pop('FeatureAnchor', None)
