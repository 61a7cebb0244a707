"""Static facts about the datasets cssbench knows: class count, names, background scoring."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# IGNORE_INDEX: the VOC layout's void label (255), which the synthetic masks hold too
from .synth import CLASS_NAMES as SYNTH_CLASS_NAMES, IGNORE_INDEX

VOC_CLASSES = (
    'background', 'aeroplane', 'bicycle', 'bird', 'boat', 'bottle', 'bus', 'car', 'cat', 'chair',
    'cow', 'diningtable', 'dog', 'horse', 'motorbike', 'person', 'pottedplant', 'sheep', 'sofa',
    'train', 'tvmonitor')

ADE_CLASSES = tuple(
    (Path(__file__).parent / 'data' / 'ade20k_classes.txt').read_text().split('\n')[:151])


@dataclass(frozen=True)
class DatasetInfo:
    classes: tuple[str, ...]
    layout: str                 # the on-disk reader: 'voc' or 'ade'
    # Whether class 0 is scored at evaluation. In the reference code (LTTM/SDR, fcdl94/MiB
    # dataset/ade.py) ADE's 0 is void/"other": background in training, ignored in testing.
    background_scored: bool = True
    # Whether its folders are cssbench make-synth's: the VOC reader refuses the synthetic
    # dataset to Pascal VOC's protocols and Pascal VOC to the synthetic one's.
    synthetic: bool = False

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def scored(self, classes) -> tuple[int, ...]:
        """``classes`` as evaluation scores them: without background where it is not scored."""
        return tuple(c for c in classes if self.background_scored or c != 0)


DATASET_INFO: dict[str, DatasetInfo] = {
    'voc': DatasetInfo(VOC_CLASSES, layout='voc'),
    'ade': DatasetInfo(ADE_CLASSES, layout='ade', background_scored=False),
    # Procedurally generated, in VOC's on-disk layout (see synth.py): 20 shape-texture classes.
    'synth': DatasetInfo(('background', *SYNTH_CLASS_NAMES), layout='voc', synthetic=True),
}
