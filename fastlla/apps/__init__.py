"""Applications built on the fastlla library: the command line, the demo, bundled data sets,
example models, the kernel-fidelity harness, the benchmark runner and memory measurement.

The library (``fastlla/*.py``) never imports this package; it is a client like any user code.
"""
