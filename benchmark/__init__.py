"""cssbench: a benchmark harness for class-incremental (continual) semantic segmentation."""
__version__ = '0.2.2'  # part of the step-0 cache key: bumped when training changes
