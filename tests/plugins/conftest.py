"""Fixtures for the TensorRT plugin kernels (``plugins/``).

Without a GPU the Triton kernels run on CPU tensors under Triton's interpreter.  Triton 3.8 reads
``TRITON_INTERPRET`` when a function is decorated with ``@triton.jit`` (``triton.knobs`` reads the
environment lazily), so it must be set before ``plugins/surgeon_plugins/grownorm_kernel.py`` is imported; this file
sets it at import time, i.e. when pytest collects ``tests/plugins``, before any of its tests run.
The kernels avoid triton.language's own jitted helpers, so it does not matter whether ``triton``
itself was imported earlier.  If the kernel module was imported before the variable was set (or
``TRITON_INTERPRET=0`` is set explicitly) the kernels cannot run here and those tests skip.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
KERNEL_FILE = ROOT / "plugins" / "surgeon_plugins" / "grownorm_kernel.py"
_PACKAGE_NAME = "surgeon_plugins.grownorm_kernel"  # plugins/surgeon_plugins, installed with surgeon
_FILE_NAME = "_surgeon_tests_grownorm_kernel"  # loaded straight from the working tree otherwise

if not torch.cuda.is_available() and _PACKAGE_NAME not in sys.modules and _FILE_NAME not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _load_kernel_module() -> ModuleType:
    try:
        module = importlib.import_module(_PACKAGE_NAME)
        if Path(module.__file__).resolve() == KERNEL_FILE:
            return module
    except ImportError:
        pass
    if _FILE_NAME in sys.modules:
        return sys.modules[_FILE_NAME]
    spec = importlib.util.spec_from_file_location(_FILE_NAME, KERNEL_FILE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[_FILE_NAME] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[_FILE_NAME]
        raise
    return module


@pytest.fixture(scope="session")
def gk() -> ModuleType:
    """``plugins/surgeon_plugins/grownorm_kernel.py`` (compile-only use is fine without GPU or interpreter)."""
    pytest.importorskip("triton")
    return _load_kernel_module()


@pytest.fixture(scope="session")
def device(gk) -> torch.device:
    """Where the kernels can run: CUDA, else the CPU under the interpreter, else skip."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if gk.is_interpreted():
        return torch.device("cpu")
    pytest.skip(
        "no CUDA device, and the GrowNorm kernels were not built by Triton's interpreter: "
        f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')!r} when the kernel module was first imported "
        "(set TRITON_INTERPRET=1 before importing plugins/surgeon_plugins/grownorm_kernel.py)"
    )
