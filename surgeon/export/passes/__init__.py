"""Graph passes over the exported ONNX (onnx-graphsurgeon), each one small module:

- ``fold-gamma``: move GrowNorm's per-channel scale γ into the next Gemm/MatMul/Conv;
- ``merge-parallel``: the old and new branches of a widened layer become one op;
- ``merge-grouped``: grouped (depthwise) convs on consecutive channel slices become one grouped conv;
- ``cleanup``: constant folding, dead nodes, Identity/Dropout, toposort.

Each pass returns what it changed and, for every candidate it skipped, why. The manager (base.py)
runs them to a fixed point on one graph (graph.py: the IR, imported once); rules.py holds the
results and the pattern/check/rewrite rules the merge passes are written as. The caller verifies
the numbers after every pass that changed something.
"""

from surgeon.export.passes.base import PassManager, PassResult, default_passes

__all__ = ["PassManager", "PassResult", "default_passes"]
