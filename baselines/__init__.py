"""The methods cssbench ships; importing this package registers them (``cssbench list``)."""
from . import ft, joint  # noqa: F401
