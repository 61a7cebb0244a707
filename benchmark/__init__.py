"""cssbench: a benchmark harness for class-incremental (continual) semantic segmentation."""
__version__ = '0.1.0'
