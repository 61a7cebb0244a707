"""Fine-tuning: each step trains on its own labels with plain cross-entropy, nothing else.

The lower bound of every table: old classes are labelled background in new steps' data, so
the model learns to predict them as background and forgets them.
"""
from cssbench.methods import register_method
from cssbench.models import IncrementalSegmentor


@register_method('ft')
class FineTuning(IncrementalSegmentor):
    """Fine-tuning: cross-entropy on the current step's labels (lower bound)."""

    step0_kind = 'fine-tuning'
