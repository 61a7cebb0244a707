"""Joint (offline) training: every class of the protocol in a single step, the upper bound."""
from cssbench.methods import register_method
from cssbench.models import IncrementalSegmentor


@register_method('joint', joint=True)
class Joint(IncrementalSegmentor):
    """Joint training on all classes at once (offline upper bound)."""

    step0_kind = 'fine-tuning'   # its one step: cross-entropy on every class
