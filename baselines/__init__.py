"""The methods cssbench ships; importing this package registers them (``cssbench list``)."""
from . import ft, ilt, joint, lwf, mib  # noqa: F401
from . import plop  # noqa: F401
from . import sdr  # noqa: F401
