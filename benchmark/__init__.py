"""cssbench: a benchmark harness for class-incremental (continual) semantic segmentation."""
__version__ = '0.2.2'  # released versions; the step-0 cache key also counts the code's bytes
