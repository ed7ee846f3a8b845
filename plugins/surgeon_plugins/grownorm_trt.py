"""TensorRT plugin ``surgeon::GrowNorm`` version 1, through TensorRT's Python plugin API
(``tensorrt.plugin``, TensorRT 10.9+), serving the ``GrowNorm`` nodes of surgeon's ONNX files.

- ``register``: one output shaped and typed like ``x``; attributes ``groups`` (the node's INTS)
  and ``eps`` (FLOAT). ``plugin_namespace``/``plugin_version`` only route the node here. ``eps``
  is declared a one-element float32 array: TensorRT's parser hands every attribute over as a 1-D
  field, and ``tensorrt.plugin`` turns a ``float``-annotated one with ``float(array)``, which NumPy
  2.4 refuses for arrays of one dimension.
- ``aot_impl``: the Triton forward kernel compiled to PTX for the building GPU, with its launch grid
  as shape expressions — TensorRT embeds it, so the engine runs without Python (trtexec, Triton
  Inference Server). The kernel takes ``(X, GAMMA, N, S, Y)`` and nothing else: inputs, the extra
  int32 scalars, then the output, as TensorRT launches ahead-of-time plugin kernels (Triton's unused
  scratch parameters are dropped from the PTX; ``surgeon_plugins.aot_launch`` replays this launch).
- ``impl``: the same kernel launched from Python on TensorRT's stream (just-in-time plugins).
- ``autotune``: fp32 or fp16 I/O (γ fp32) and four tile configurations as tactics (three tile
  sizes, and whole-group tiles that read each element once where a group fits one tile); TensorRT
  times them.

Engines built with the plugin should set ``PREFER_AOT_PYTHON_PLUGINS`` on the network (surgeon's
builder does) so the ahead-of-time implementation is the one embedded.

This module must not use ``from __future__ import annotations``: ``tensorrt.plugin`` inspects the
annotations of the decorated functions as objects (written in ``typing``'s forms, as its docs do).
"""
# ruff: noqa: UP006, UP007, UP035

import math
from typing import List, Tuple, Union

import numpy as np
import numpy.typing as npt

PLUGIN_ID = "surgeon::GrowNorm"
# Tactic → (tile budget: elements of one [BLOCK_C, BLOCK_S] tile, whole groups: every group one
# chunk, each element read once, where that fits the budget). TensorRT times them all and keeps the fastest.
TACTICS = {1: (4096, False), 2: (2048, False), 3: (8192, False), 4: (8192, True)}
DEFAULT_TACTIC = 1
_REGISTERED = False


def spatial_size(shape) -> int | None:
    """S for a concrete shape (``-1`` where dynamic): 1 for ``[N, C]``, None if a spatial dim is dynamic."""
    dims = [int(d) for d in list(shape)[2:]]
    if any(d < 0 for d in dims):
        return None
    return math.prod(dims) if dims else 1


def attr_float(value) -> float:
    """A scalar plugin attribute as a float, whether TensorRT passes a float or a one-element array."""
    flat = np.asarray(value, dtype=np.float64).reshape(-1)
    if flat.size != 1:
        raise ValueError(f"expected one value, got {flat.size}")
    return float(flat[0])


def tactic_config(groups, shape, tactic: int, batch: int | None = None):
    """The tile configuration of one tactic for inputs of ``shape`` (``-1`` where dynamic)."""
    from surgeon_plugins.grownorm_kernel import block_config

    budget, whole = TACTICS.get(int(tactic), TACTICS[DEFAULT_TACTIC])
    return block_config(tuple(int(g) for g in groups), spatial_size(shape), batch, budget=budget, whole_groups=whole)


def aot_kernel(groups, eps, dtype: str, shape, tactic: int, arch: int):
    """The PTX TensorRT embeds for one input type/shape and tactic: ``(name, ptx, cfg, info)``
    (``cfg``: the tile configuration; ``info``: see ``grownorm_kernel.compile_ptx``)."""
    from surgeon_plugins.grownorm_kernel import compile_ptx

    groups = tuple(int(g) for g in groups)
    spatial = spatial_size(shape)
    cfg = tactic_config(groups, shape, tactic)
    name, ptx, info = compile_ptx(groups, attr_float(eps), dtype, True, int(arch), spatial=spatial, block_c=cfg.block_c,
                                  block_s=cfg.block_s, num_warps=cfg.num_warps)
    return name, ptx, cfg, info


def register() -> None:
    """Register ``surgeon::GrowNorm`` v1 with TensorRT (idempotent). Needs tensorrt 10.9+ and triton."""
    global _REGISTERED
    if _REGISTERED:
        return
    import tensorrt as trt
    import tensorrt.plugin as trtp

    dtypes = {trt.float32: "fp32", trt.float16: "fp16"}

    @trtp.register(PLUGIN_ID)
    def grownorm_desc(x: trtp.TensorDesc, gamma: trtp.TensorDesc, groups: npt.NDArray[np.int32],
                      eps: npt.NDArray[np.float32]) -> trtp.TensorDesc:
        return x.like()

    @trtp.autotune(PLUGIN_ID)
    def grownorm_autotune(x: trtp.TensorDesc, gamma: trtp.TensorDesc, groups: npt.NDArray[np.int32],
                          eps: npt.NDArray[np.float32], outputs: Tuple[trtp.TensorDesc]
                          ) -> List[trtp.AutoTuneCombination]:
        # x and y share a type (fp32 or fp16); γ is always fp32.
        return [trtp.AutoTuneCombination("FP32|FP16, FP32, FP32|FP16", "LINEAR", list(TACTICS))]

    @trtp.aot_impl(PLUGIN_ID)
    def grownorm_aot(x: trtp.TensorDesc, gamma: trtp.TensorDesc, groups: npt.NDArray[np.int32],
                     eps: npt.NDArray[np.float32], outputs: Tuple[trtp.TensorDesc], tactic: int
                     ) -> Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymExprs]:
        import torch

        major, minor = torch.cuda.get_device_capability()
        name, ptx, cfg, info = aot_kernel(groups, eps, dtypes[x.dtype], x.shape, tactic, major * 10 + minor)
        n = x.shape_expr[0]
        s = 1
        for d in range(2, x.ndim):
            s = x.shape_expr[d] if isinstance(s, int) else s * x.shape_expr[d]
        launch = trtp.KernelLaunchParams()
        launch.grid_x = cfg.grid(n, s, cdiv=trtp.cdiv)[0]  # the formula the Python launches use, over shape expressions
        launch.block_x = info["block"]
        launch.shared_mem = info["shared_mem"]
        extra = trtp.SymIntExprs(2)
        extra[0] = trtp.SymInt32(n)
        extra[1] = trtp.SymInt32(s)
        return name, ptx, launch, extra

    @trtp.impl(PLUGIN_ID)
    def grownorm_jit(x: trtp.Tensor, gamma: trtp.Tensor, groups: npt.NDArray[np.int32],
                     eps: npt.NDArray[np.float32], outputs: Tuple[trtp.Tensor], stream: int, tactic: int) -> None:
        import torch

        from surgeon_plugins.grownorm_kernel import forward_into

        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            xt = torch.as_tensor(x, device="cuda")
            yt = torch.as_tensor(outputs[0], device="cuda")
            gt = torch.as_tensor(gamma, device="cuda")
            sizes = tuple(int(g) for g in groups)
            cfg = tactic_config(sizes, xt.shape, tactic, batch=int(xt.shape[0]))
            forward_into(xt, yt, sizes, gt, attr_float(eps), cfg)

    _REGISTERED = True
