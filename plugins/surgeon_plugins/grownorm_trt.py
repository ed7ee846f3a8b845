"""TensorRT plugin ``surgeon::GrowNorm`` version 1, through TensorRT's Python plugin API
(``tensorrt.plugin``, TensorRT 10.9+), serving the ``GrowNorm`` nodes of surgeon's ONNX files.

- ``register``: one output shaped and typed like ``x``; attributes ``groups`` (the node's INTS),
  ``eps`` (FLOAT) and ``axis`` (INT: 1 for ``[N, C, ...]``, -1 for ``[N, ..., C]``).
  ``plugin_namespace``/``plugin_version`` only route the node here. ``eps`` and ``axis`` are
  declared one-element arrays: TensorRT's parser hands every attribute over as a 1-D field, and
  ``tensorrt.plugin`` turns a ``float``-annotated one with ``float(array)``, which NumPy 2.4
  refuses for arrays of one dimension.
- ``axis`` is an attribute of version 1, not a version 2: ``tensorrt.plugin`` registers every
  creator as version "1" (so a v2 could not be served by it), and old engines embed their kernel
  (attributes are not serialized with an AOT implementation), so they stay valid. In ONNX a node
  without ``axis`` means axis 1, but ``tensorrt.plugin`` refuses default values in ``register``
  ("Default values are not supported yet") and reads every declared attribute from the field
  collection, from which TensorRT's parser leaves out what the node lacks ("Attribute ... not
  found in plugin node! Ensure that the plugin creator has a default value defined"). So a model is
  parsed for the plugin through :func:`with_explicit_axis` (axis 1 written where it is absent);
  the ONNX file itself keeps omitting it.
- For ``axis=-1`` the kernel runs its ``[N, C]`` layout with N = the product of all dims but the
  last, C = the last, S = 1 (:func:`launch_dims`).
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

from surgeon.contract import DEFAULT_AXIS, DOMAIN, OP_TYPE, PLUGIN_ID  # noqa: F401  (the one place the contract is spelled)

# Tactic → (tile budget: elements of one [BLOCK_C, BLOCK_S] tile, whole groups: every group one
# chunk, each element read once, where that fits the budget). TensorRT times them all and keeps the fastest.
TACTICS = {1: (4096, False), 2: (2048, False), 3: (8192, False), 4: (8192, True)}
DEFAULT_TACTIC = 1
_REGISTERED = False



def spatial_size(shape, axis: int = DEFAULT_AXIS) -> int | None:
    """S for a concrete shape (``-1`` where dynamic): 1 for ``[N, C]`` and for every ``axis=-1``
    input (rows of C), None if a spatial dim is dynamic."""
    if check_axis(axis) == -1:
        return 1
    dims = [int(d) for d in list(shape)[2:]]
    if any(d < 0 for d in dims):
        return None
    return math.prod(dims) if dims else 1


def check_axis(axis) -> int:
    """The channel axis as an int (TensorRT passes a one-element array): 1 or -1, else ValueError."""
    flat = np.asarray(axis).reshape(-1)
    if flat.size != 1 or int(flat[0]) not in (1, -1) or float(flat[0]) != int(flat[0]):
        raise ValueError(f"GrowNorm axis must be 1 or -1, got {axis!r}")
    return int(flat[0])


def launch_dims(dims: list, axis: int = DEFAULT_AXIS) -> tuple:
    """``(N, S)`` the kernel launches over, from the input's dims (ints or TensorRT shape
    expressions): axis 1: ``(dims[0], prod(dims[2:]))``; axis -1: ``(prod(dims[:-1]), 1)``."""
    if len(dims) < 2:
        raise ValueError(f"GrowNorm needs an input of rank >= 2, got rank {len(dims)}")
    rows, positions = (dims[:-1], []) if check_axis(axis) == -1 else (dims[:1], dims[2:])

    def prod(items):
        out = 1
        for d in items:
            out = d if isinstance(out, int) and out == 1 else out * d
        return out

    return prod(rows), prod(positions)


def with_explicit_axis(model):
    """A copy of an ONNX model whose ``surgeon::GrowNorm`` nodes all carry ``axis`` (1 where they
    lack it, which is what absent means): what the plugin's parser needs (see the module docstring)."""
    import onnx

    out = onnx.ModelProto()
    out.CopyFrom(model)
    for node in out.graph.node:
        if node.op_type == OP_TYPE and node.domain == DOMAIN and not any(a.name == "axis" for a in node.attribute):
            node.attribute.append(onnx.helper.make_attribute("axis", DEFAULT_AXIS))
    return out


def attr_float(value) -> float:
    """A scalar plugin attribute as a float, whether TensorRT passes a float or a one-element array."""
    flat = np.asarray(value, dtype=np.float64).reshape(-1)
    if flat.size != 1:
        raise ValueError(f"expected one value, got {flat.size}")
    return float(flat[0])


def tactic_config(groups, shape, tactic: int, batch: int | None = None, axis: int = DEFAULT_AXIS):
    """The tile configuration of one tactic for inputs of ``shape`` (``-1`` where dynamic)."""
    from surgeon_plugins.grownorm_kernel import block_config

    budget, whole = TACTICS.get(int(tactic), TACTICS[DEFAULT_TACTIC])
    return block_config(tuple(int(g) for g in groups), spatial_size(shape, axis), batch, budget=budget,
                        whole_groups=whole)


def aot_kernel(groups, eps, dtype: str, shape, tactic: int, arch: int, axis: int = DEFAULT_AXIS):
    """The PTX TensorRT embeds for one input type/shape and tactic: ``(name, ptx, cfg, info)``
    (``cfg``: the tile configuration; ``info``: see ``grownorm_kernel.compile_ptx``)."""
    from surgeon_plugins.grownorm_kernel import compile_ptx

    groups = tuple(int(g) for g in groups)
    spatial = spatial_size(shape, axis)
    cfg = tactic_config(groups, shape, tactic, axis=axis)
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
                      eps: npt.NDArray[np.float32], axis: npt.NDArray[np.int32]) -> trtp.TensorDesc:
        return x.like()

    @trtp.autotune(PLUGIN_ID)
    def grownorm_autotune(x: trtp.TensorDesc, gamma: trtp.TensorDesc, groups: npt.NDArray[np.int32],
                          eps: npt.NDArray[np.float32], axis: npt.NDArray[np.int32], outputs: Tuple[trtp.TensorDesc]
                          ) -> List[trtp.AutoTuneCombination]:
        # x and y share a type (fp32 or fp16); γ is always fp32.
        return [trtp.AutoTuneCombination("FP32|FP16, FP32, FP32|FP16", "LINEAR", list(TACTICS))]

    @trtp.aot_impl(PLUGIN_ID)
    def grownorm_aot(x: trtp.TensorDesc, gamma: trtp.TensorDesc, groups: npt.NDArray[np.int32],
                     eps: npt.NDArray[np.float32], axis: npt.NDArray[np.int32], outputs: Tuple[trtp.TensorDesc], tactic: int
                     ) -> Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymExprs]:
        import torch

        major, minor = torch.cuda.get_device_capability()
        name, ptx, cfg, info = aot_kernel(groups, eps, dtypes[x.dtype], x.shape, tactic, major * 10 + minor, axis)
        n, s = launch_dims([x.shape_expr[d] for d in range(x.ndim)], check_axis(axis))
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
                     eps: npt.NDArray[np.float32], axis: npt.NDArray[np.int32], outputs: Tuple[trtp.Tensor], stream: int, tactic: int) -> None:
        import torch

        from surgeon_plugins.grownorm_kernel import forward_into

        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            xt = torch.as_tensor(x, device="cuda")
            yt = torch.as_tensor(outputs[0], device="cuda")
            gt = torch.as_tensor(gamma, device="cuda")
            sizes = tuple(int(g) for g in groups)
            if check_axis(axis) == -1:  # rows of C: the [N, C] layout over every leading dim
                xt, yt = xt.view(-1, xt.shape[-1]), yt.view(-1, yt.shape[-1])
            cfg = tactic_config(sizes, xt.shape, tactic, batch=int(xt.shape[0]))
            forward_into(xt, yt, sizes, gt, attr_float(eps), cfg)

    _REGISTERED = True
