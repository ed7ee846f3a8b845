"""Whether TensorRT can use the ``surgeon::GrowNorm`` plugin, and registering it.

The plugin itself (TensorRT's Python plugin API, with an ahead-of-time Triton kernel) lives in
``plugins/`` (the ``surgeon_plugins`` package); this module only decides whether it can be used.
"""

from __future__ import annotations

from surgeon.contract import OP_TYPE as NAME
from surgeon.contract import PLUGIN_NAMESPACE as NAMESPACE
from surgeon.contract import PLUGIN_VERSION as VERSION
from surgeon.trt.toolkit import Toolkit


def registered(tk: Toolkit) -> bool:
    """The plugin is in this process's TensorRT plugin registry."""
    try:
        return tk.module.get_plugin_registry().get_creator(NAME, VERSION, NAMESPACE) is not None
    except Exception:
        return False


def plugin_status(tk: Toolkit) -> tuple[bool, str]:
    """(usable, what or why not). Registers the plugin when it can."""
    if tk.ahead_of_time:
        return False, "TensorRT-RTX has no plugin layers"
    trt = tk.module
    if not hasattr(trt, "QuickPluginCreationRequest"):
        return False, f"TensorRT {tk.version} cannot embed Python plugins ahead of time (10.9 or later is needed)"
    try:
        import triton  # noqa: F401  (compiles the plugin's kernel to PTX)
    except ImportError:
        return False, "triton is not installed (it compiles the plugin's kernel)"
    try:
        from surgeon_plugins import grownorm_trt

        grownorm_trt.register()
    except Exception as exc:
        first = next((ln for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
        return False, f"registering {NAMESPACE}::{NAME} failed: {first[:200]}"
    if not registered(tk):
        return False, f"{NAMESPACE}::{NAME} is not in TensorRT's plugin registry after registering it"
    return True, f"{NAMESPACE}::{NAME} v{VERSION} plugin (Triton kernel compiled ahead of time, embedded in the engine)"
