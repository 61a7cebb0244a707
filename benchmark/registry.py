"""cssbench's registries: children of mmsegmentation's, under the scope ``cssbench``.

Building through our own child registries (rather than mmseg's directly) keeps mmseg from
importing ``mmseg.models`` and ``mmseg.datasets`` on first use: both import ``mmcv.ops``,
which the pinned ``mmcv-lite`` does not ship. Names registered here are found from mmseg's
registries as ``cssbench.<Name>``, and mmseg's and mmengine's own names are found from ours.
Every registry the Runner builds from has its child here, so that the Runner, running in the
``cssbench`` scope, finds each in the registry tree.
"""
from mmengine.registry import FUNCTIONS as MMENGINE_FUNCTIONS
from mmengine.registry import Registry
from mmseg import registry as mmseg

MODELS = Registry('model', parent=mmseg.MODELS, scope='cssbench',
                  locations=['cssbench.models', 'cssbench.baselines'])
DATASETS = Registry('dataset', parent=mmseg.DATASETS, scope='cssbench',
                    locations=['cssbench.datasets'])
METRICS = Registry('metric', parent=mmseg.METRICS, scope='cssbench',
                   locations=['cssbench.metrics'])
HOOKS = Registry('hook', parent=mmseg.HOOKS, scope='cssbench')
LOOPS = Registry('loop', parent=mmseg.LOOPS, scope='cssbench')
DATA_SAMPLERS = Registry('data sampler', parent=mmseg.DATA_SAMPLERS, scope='cssbench')
FUNCTIONS = Registry('function', parent=MMENGINE_FUNCTIONS, scope='cssbench')
MODEL_WRAPPERS = Registry('model_wrapper', parent=mmseg.MODEL_WRAPPERS, scope='cssbench')
WEIGHT_INITIALIZERS = Registry('weight initializer', parent=mmseg.WEIGHT_INITIALIZERS,
                               scope='cssbench')
OPTIMIZERS = Registry('optimizer', parent=mmseg.OPTIMIZERS, scope='cssbench')
OPTIM_WRAPPERS = Registry('optim_wrapper', parent=mmseg.OPTIM_WRAPPERS, scope='cssbench')
OPTIM_WRAPPER_CONSTRUCTORS = Registry('optimizer wrapper constructor',
                                      parent=mmseg.OPTIM_WRAPPER_CONSTRUCTORS, scope='cssbench')
PARAM_SCHEDULERS = Registry('parameter scheduler', parent=mmseg.PARAM_SCHEDULERS,
                            scope='cssbench')
EVALUATOR = Registry('evaluator', parent=mmseg.EVALUATOR, scope='cssbench')
VISUALIZERS = Registry('visualizer', parent=mmseg.VISUALIZERS, scope='cssbench')
VISBACKENDS = Registry('vis_backend', parent=mmseg.VISBACKENDS, scope='cssbench')
LOG_PROCESSORS = Registry('log_processor', parent=mmseg.LOG_PROCESSORS, scope='cssbench')
