"""The GrowNorm contract (DESIGN.md §2) as plain values: the PyTorch module, the ONNX node and its
local function, and the TensorRT plugin all spell these the same way.

Pure Python, no torch or onnx: the CLI, the deploy side and ``surgeon.grow.recipe`` import it cheaply.
"""

from __future__ import annotations

DOMAIN = "surgeon"           # the ONNX node's domain (and the local function's)
OP_TYPE = "GrowNorm"         # the ONNX node's op type and the TensorRT plugin's name
PLUGIN_NAMESPACE = "surgeon"
PLUGIN_VERSION = "1"
DEFAULT_EPS = 1e-6
PLUGIN_ID = f"{PLUGIN_NAMESPACE}::{OP_TYPE}"  # how tensorrt.plugin names the plugin
AXES = (1, -1)  # the channel axis: dim 1 ([N, C, ...]) or the last dim ([N, ..., C])
DEFAULT_AXIS = 1  # a GrowNorm node without ``axis`` normalizes dim 1
