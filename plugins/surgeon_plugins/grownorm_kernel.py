"""GrowNorm as Triton kernels: one source for the PyTorch CUDA path and the TensorRT plugin.

What the kernels compute
------------------------
For ``x`` of shape ``[N, C, *spatial]``, viewed as a contiguous ``[N, C, S]`` (``S = prod(spatial)``,
``S = 1`` for ``[N, C]``), with the channels split into consecutive groups of the given sizes::

    r[n, g, s]  = 1 / sqrt(max(sum_{c in g} x[n, c, s]^2, eps^2))
    y[n, c, s]  = gamma[c] * x[n, c, s] * r[n, g(c), s]          (gamma absent: 1)

I/O in fp32, fp16 or bf16; every reduction and the scaling run in fp32; gamma is read as fp32.
This is :func:`surgeon.grow.grownorm.grow_norm` (the oracle) fused into one kernel launch.

Backward (autograd of that composite, clamp included; with ``xh = x * r`` and ``dxh = gamma * gy``)::

    dx = r * (dxh - xh * <xh, dxh>_g)     where sum x^2 >  eps^2
    dx = r * dxh                          where sum x^2 <= eps^2  (the clamp is active: norm constant)
    dgamma[c] = sum_{n, s} gy * xh

Grid, blocks and passes
-----------------------
The group boundaries are compile-time constants (``GROUPS``, a ``tl.constexpr`` tuple of group
sizes; ``tl.static_range`` unrolls the loop over groups), so each distinct grouping compiles once.
One program owns ``BLOCK_S`` positions and all ``C`` channels of them; there are two layouts:

* ``ROWS=False`` (``S > 1``): a position is ``(n, s)``; program ``pid`` takes sample
  ``n = pid // cdiv(S, BLOCK_S)`` and positions ``s`` in its ``BLOCK_S`` block.  Tiles are
  ``[BLOCK_C, BLOCK_S]`` and contiguous (coalesced) along ``s``.
  ``grid = (N * cdiv(S, BLOCK_S),)``.
* ``ROWS=True`` (``S == 1``, i.e. ``[N, C]`` inputs): a position is a sample; program ``pid`` takes
  samples ``pid * BLOCK_S ...``.  Tiles are ``[BLOCK_C, BLOCK_S]`` with ``C`` the contiguous axis
  (coalesced and vectorisable along ``C``).  ``grid = (cdiv(N, BLOCK_S),)``.  This variant assumes
  ``S == 1`` and never reads ``S``.

Per group, in chunks of ``BLOCK_C`` channels (the last chunk masked; a group smaller than
``BLOCK_C`` uses the next power of two of its size): pass 1 accumulates ``x^2`` in an fp32
``[BLOCK_C, BLOCK_S]`` register tile and reduces it over channels once; ``r`` is computed with IEEE
``sqrt``/division; pass 2 re-reads ``x``, multiplies by ``r * gamma`` and writes ``y``.  The
PyTorch forward then writes ``r`` (fp32, ``[N, G, *spatial]``) for the backward.  When a group fits
in one chunk, Triton's common-subexpression elimination merges the two loads of ``x`` (nothing is
stored between them; the PTX has one load per element), so such groups are read once.

The backward kernel has the same grid: pass 1 accumulates ``sum x^2`` (for the clamp test) and
``sum x * dxh`` per position; pass 2 re-reads ``x`` and ``gy``, writes ``dx`` and, if gamma needs a
gradient, stores this program's per-channel partial ``sum_s gy * x * r`` into an fp32 buffer
``[num_programs, C]`` that torch then sums over programs (deterministic; no atomics).

Memory traffic (the kernels are bandwidth-bound): forward reads ``x`` twice where a group spans
several chunks (once per pass; the re-read of a program's ``group x BLOCK_S`` slice may hit in L2 --
not measured here), once where it fits one, and writes ``y`` once, plus ``C`` gamma values per
program (cache-resident) and, on the PyTorch path, ``N*G*S`` fp32 ``r`` values.  Backward reads
``x`` and ``gy`` twice each (once for one-chunk groups), reads ``r`` and writes ``dx`` once, plus
``C`` fp32 partials per program.

Block heuristic (:func:`block_config`): ``S > 1``: ``BLOCK_S = min(next_pow2(S), 64)`` and
``BLOCK_C`` fills the tile budget; ``S == 1``: ``BLOCK_C = min(next_pow2(max group), 2048)`` and
``BLOCK_S`` samples fill it (at most ``next_pow2(N)``).  The budget is ``BLOCK_C * BLOCK_S <= 4096``
elements for the forward and 2048 for the backward (two accumulators); ``num_warps`` aims at 8 tile
elements per thread, clamped to 4..8 (no register spills in either kernel).  ``whole_groups=True``
(a TensorRT tactic) instead makes each group a single chunk, trading shorter contiguous runs along
``S`` for reading every element once.

TensorRT
--------
:func:`compile_ptx` compiles the forward ahead of time (no GPU needed; Triton bundles ``ptxas``)
for a kernel whose parameters are the input pointers ``X, GAMMA``, the int32 scalars ``N, S`` and
the output pointer ``Y`` (:data:`grownorm_fwd_qdp_kernel`): TensorRT's Python plugin API launches an
ahead-of-time kernel with its inputs, then the extra scalar arguments, then its outputs, and
nothing more.  Triton appends two hidden pointer parameters (global and profile scratch) to every
kernel; this kernel uses neither, so :func:`compile_ptx` drops them from the PTX's ``.entry`` and
the kernel takes exactly the five arguments TensorRT passes (a launch with fewer arguments than the
kernel declares would make the driver read past TensorRT's argument array).
"""

from __future__ import annotations

import functools
import math
import re
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl

from surgeon.contract import DEFAULT_EPS  # the one place the contract is spelled

_IO_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_TILE_BUDGET = 4096  # elements of one [BLOCK_C, BLOCK_S] tile
_MAX_BLOCK_S = 64  # positions per program when S > 1
_MAX_ROWS_BLOCK_C = 2048  # channels per chunk when S == 1
_MIN_WHOLE_BLOCK_S = 16  # positions per program at least, for whole-group tiles when S > 1


# ----------------------------------------------------------------------------------------------
# compile-time helpers (plain Python; evaluated on constexprs)
#
# The kernels call only Triton builtins, these constexpr functions and their own @triton.jit
# functions -- no jitted helpers of triton.language's standard library (tl.sum, tl.zeros, tl.cdiv):
# whether those are interpreter objects depends on TRITON_INTERPRET when *triton* was imported, and
# either kind breaks the other mode.  Sums go through tl.reduce with the standard library's add
# (the interpreter recognises it and sums with numpy; compile_ptx swaps in a compilable copy).
_sum_combine = tl.standard._sum_combine


@triton.constexpr_function
def _group_start(groups, g):
    return sum(groups[:g])


@triton.constexpr_function
def _group_block(groups, g, block_c):
    return min(block_c, triton.next_power_of_2(groups[g]))


# ----------------------------------------------------------------------------------------------
# device functions


@triton.jit
def _program_layout(pid, N, S, C: tl.constexpr, NUM_GROUPS: tl.constexpr, ROWS: tl.constexpr,
                    BLOCK_S: tl.constexpr):
    """Where program ``pid``'s positions live: scalar int64 bases and int32 per-position offsets."""
    p = tl.arange(0, BLOCK_S)
    if ROWS:
        row0 = pid * BLOCK_S
        p_mask = (row0 + p) < N
        x_base = row0.to(tl.int64) * C
        x_pos = p * C
        r_base = row0.to(tl.int64) * NUM_GROUPS
        r_pos = p * NUM_GROUPS
    else:
        blocks = (S + (BLOCK_S - 1)) // BLOCK_S
        n = pid // blocks
        s0 = (pid % blocks) * BLOCK_S
        p_mask = (s0 + p) < S
        x_base = n.to(tl.int64) * C * S + s0
        x_pos = p
        r_base = n.to(tl.int64) * NUM_GROUPS * S + s0
        r_pos = p
    return x_base, x_pos, r_base, r_pos, p_mask


@triton.jit
def _chunk(c0, G_END: tl.constexpr, S, x_pos, p_mask, ROWS: tl.constexpr, BC: tl.constexpr):
    """Channels ``c0 ..< c0 + BC`` of a group ending at ``G_END``: indices, their mask, and the
    ``[BC, BLOCK_S]`` element offsets and mask of the tile."""
    c = c0 + tl.arange(0, BC)
    c_mask = c < G_END
    if ROWS:
        c_off = c
    else:
        c_off = c * S
    return c, c_mask, c_off[:, None] + x_pos[None, :], c_mask[:, None] & p_mask[None, :]


@triton.jit
def _fwd_group(Xp, GAMMA, Yp, Rp, x_pos, r_pos, p_mask, S,
               G_START: tl.constexpr, G_SIZE: tl.constexpr, G_IDX: tl.constexpr, EPS: tl.constexpr,
               HAS_GAMMA: tl.constexpr, STORE_RNORM: tl.constexpr, ROWS: tl.constexpr,
               BC: tl.constexpr, BLOCK_S: tl.constexpr):
    # pass 1: sum of squares per position, fp32
    acc = tl.full([BC, BLOCK_S], 0.0, tl.float32)
    for c0 in range(G_START, G_START + G_SIZE, BC):
        c, c_mask, offs, m = _chunk(c0, G_START + G_SIZE, S, x_pos, p_mask, ROWS, BC)
        x = tl.load(Xp + offs, mask=m, other=0.0).to(tl.float32)
        acc += x * x
    ss = tl.reduce(acc, 0, _sum_combine)
    r = tl.div_rn(1.0, tl.sqrt_rn(tl.maximum(ss, EPS * EPS)))
    # pass 2: re-read, scale by r * gamma, write (no store before these loads: a one-chunk group's
    # two loads then merge into one)
    for c0 in range(G_START, G_START + G_SIZE, BC):
        c, c_mask, offs, m = _chunk(c0, G_START + G_SIZE, S, x_pos, p_mask, ROWS, BC)
        x = tl.load(Xp + offs, mask=m, other=0.0).to(tl.float32)
        if HAS_GAMMA:
            gam = tl.load(GAMMA + c, mask=c_mask, other=0.0).to(tl.float32)
            scale = r[None, :] * gam[:, None]
        else:
            scale = r[None, :]
        tl.store(Yp + offs, (x * scale).to(Yp.dtype.element_ty), mask=m)
    if STORE_RNORM:
        if ROWS:
            tl.store(Rp + (r_pos + G_IDX), r, mask=p_mask)
        else:
            tl.store(Rp + (r_pos + G_IDX * S), r, mask=p_mask)


@triton.jit
def _fwd_program(pid, X, GAMMA, Y, RNORM, N, S,
                 GROUPS: tl.constexpr, C: tl.constexpr, EPS: tl.constexpr, HAS_GAMMA: tl.constexpr,
                 STORE_RNORM: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr,
                 BLOCK_S: tl.constexpr):
    """The whole forward of one program; shared by the PyTorch and the TensorRT kernels."""
    x_base, x_pos, r_base, r_pos, p_mask = _program_layout(pid, N, S, C, len(GROUPS), ROWS, BLOCK_S)
    for g in tl.static_range(len(GROUPS)):
        _fwd_group(X + x_base, GAMMA, Y + x_base, RNORM + r_base, x_pos, r_pos, p_mask, S,
                   _group_start(GROUPS, g), GROUPS[g], g, EPS, HAS_GAMMA, STORE_RNORM, ROWS,
                   _group_block(GROUPS, g, BLOCK_C), BLOCK_S)


@triton.jit
def _bwd_load(Xp, GYp, GAMMA, c, c_mask, offs, m, HAS_GAMMA: tl.constexpr):
    """``x``, ``gy`` and ``dxh = gamma * gy`` of one tile, fp32."""
    x = tl.load(Xp + offs, mask=m, other=0.0).to(tl.float32)
    gy = tl.load(GYp + offs, mask=m, other=0.0).to(tl.float32)
    if HAS_GAMMA:
        gam = tl.load(GAMMA + c, mask=c_mask, other=0.0).to(tl.float32)
        dxh = gy * gam[:, None]
    else:
        dxh = gy
    return x, gy, dxh


@triton.jit
def _bwd_group(Xp, GYp, GAMMA, Rp, DXp, DGP, x_pos, r_pos, p_mask, S,
               G_START: tl.constexpr, G_SIZE: tl.constexpr, G_IDX: tl.constexpr, EPS: tl.constexpr,
               HAS_GAMMA: tl.constexpr, NEED_DGAMMA: tl.constexpr, ROWS: tl.constexpr,
               BC: tl.constexpr, BLOCK_S: tl.constexpr):
    # pass 1: sum x^2 (clamp test) and <x, dxh> per position, fp32
    acc_ss = tl.full([BC, BLOCK_S], 0.0, tl.float32)
    acc_dot = tl.full([BC, BLOCK_S], 0.0, tl.float32)
    for c0 in range(G_START, G_START + G_SIZE, BC):
        c, c_mask, offs, m = _chunk(c0, G_START + G_SIZE, S, x_pos, p_mask, ROWS, BC)
        x, gy, dxh = _bwd_load(Xp, GYp, GAMMA, c, c_mask, offs, m, HAS_GAMMA)
        acc_ss += x * x
        acc_dot += x * dxh
    ss = tl.reduce(acc_ss, 0, _sum_combine)
    dot = tl.reduce(acc_dot, 0, _sum_combine)
    if ROWS:
        r = tl.load(Rp + (r_pos + G_IDX), mask=p_mask, other=0.0)
    else:
        r = tl.load(Rp + (r_pos + G_IDX * S), mask=p_mask, other=0.0)
    # d r / d x = -x r^3 where the clamp is inactive, 0 where it is active (clamp_min passes no
    # gradient at equality either)
    coef = tl.where(ss > EPS * EPS, r * r * r * dot, 0.0)
    # pass 2: dx = r * dxh - x * r^3 * <x, dxh>; per-channel dgamma partials
    for c0 in range(G_START, G_START + G_SIZE, BC):
        c, c_mask, offs, m = _chunk(c0, G_START + G_SIZE, S, x_pos, p_mask, ROWS, BC)
        x, gy, dxh = _bwd_load(Xp, GYp, GAMMA, c, c_mask, offs, m, HAS_GAMMA)
        dx = r[None, :] * dxh - x * coef[None, :]
        tl.store(DXp + offs, dx.to(DXp.dtype.element_ty), mask=m)
        if NEED_DGAMMA:
            part = tl.reduce(gy * (x * r[None, :]), 1, _sum_combine)
            tl.store(DGP + c, part, mask=c_mask)


# ----------------------------------------------------------------------------------------------
# kernels


@triton.jit
def grownorm_fwd_kernel(X, GAMMA, Y, RNORM, N, S,
                        GROUPS: tl.constexpr, C: tl.constexpr, EPS: tl.constexpr,
                        HAS_GAMMA: tl.constexpr, STORE_RNORM: tl.constexpr, ROWS: tl.constexpr,
                        BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """PyTorch forward: writes ``Y`` and (if ``STORE_RNORM``) the fp32 reciprocal norms ``RNORM``."""
    _fwd_program(tl.program_id(0), X, GAMMA, Y, RNORM, N, S, GROUPS, C, EPS, HAS_GAMMA, STORE_RNORM,
                 ROWS, BLOCK_C, BLOCK_S)


@triton.jit
def grownorm_fwd_qdp_kernel(X, GAMMA, N, S, Y,
                            GROUPS: tl.constexpr, C: tl.constexpr, EPS: tl.constexpr,
                            HAS_GAMMA: tl.constexpr, ROWS: tl.constexpr,
                            BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """TensorRT forward, parameters ``(X, GAMMA, N, S, Y)``: inputs, extra scalars, outputs (the order
    TensorRT launches ahead-of-time plugin kernels in); ``GAMMA`` is never read without gamma."""
    _fwd_program(tl.program_id(0), X, GAMMA, Y, Y, N, S, GROUPS, C, EPS, HAS_GAMMA, False,
                 ROWS, BLOCK_C, BLOCK_S)


@triton.jit
def grownorm_bwd_kernel(X, GY, GAMMA, RNORM, DX, DGAMMA_PART, N, S,
                        GROUPS: tl.constexpr, C: tl.constexpr, EPS: tl.constexpr,
                        HAS_GAMMA: tl.constexpr, NEED_DGAMMA: tl.constexpr, ROWS: tl.constexpr,
                        BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """Backward: writes ``DX`` and (if ``NEED_DGAMMA``) row ``pid`` of ``DGAMMA_PART`` ``[grid, C]``."""
    pid = tl.program_id(0)
    x_base, x_pos, r_base, r_pos, p_mask = _program_layout(pid, N, S, C, len(GROUPS), ROWS, BLOCK_S)
    for g in tl.static_range(len(GROUPS)):
        _bwd_group(X + x_base, GY + x_base, GAMMA, RNORM + r_base, DX + x_base,
                   DGAMMA_PART + pid.to(tl.int64) * C, x_pos, r_pos, p_mask, S,
                   _group_start(GROUPS, g), GROUPS[g], g, EPS, HAS_GAMMA, NEED_DGAMMA, ROWS,
                   _group_block(GROUPS, g, BLOCK_C), BLOCK_S)


_JIT_NAMES = (
    "_program_layout",
    "_chunk",
    "_fwd_group",
    "_fwd_program",
    "_bwd_load",
    "_bwd_group",
    "grownorm_fwd_kernel",
    "grownorm_fwd_qdp_kernel",
    "grownorm_bwd_kernel",
)


# ----------------------------------------------------------------------------------------------
# launch configuration


@dataclass(frozen=True)
class BlockConfig:
    """Tile shape and launch width of one GrowNorm launch (see the module docstring)."""

    rows: bool  # True: the [N, C] layout (S == 1), positions are samples
    block_c: int  # channels per chunk (a smaller group uses next_pow2(group size))
    block_s: int  # positions (S > 1) or samples (S == 1) per program
    num_warps: int

    def grid(self, n: Any, s: Any, cdiv: Callable[[Any, int], Any] = triton.cdiv) -> tuple[Any, int, int]:
        """Launch grid for ``N`` samples of ``S`` positions.  ``cdiv``: ceiling division over the
        type of ``n``/``s`` (TensorRT's plugin passes its symbolic shape expressions and ``trtp.cdiv``)."""
        if self.rows:
            return (cdiv(n, self.block_s), 1, 1)
        return (n * cdiv(s, self.block_s), 1, 1)


def block_config(
    groups: Sequence[int], spatial: int | None = None, batch: int | None = None, budget: int = _TILE_BUDGET,
    whole_groups: bool = False,
) -> BlockConfig:
    """The block heuristic.  ``spatial``: S (``1`` selects the [N, C] layout; ``None``: unknown, > 1);
    ``batch``: N if known (caps the samples per program of the [N, C] layout); ``budget``: elements
    of one tile (the backward keeps two accumulators and uses half the forward's).

    ``whole_groups``: make every group one chunk (``BLOCK_C = next_pow2(largest group)``, fewer
    positions per program), so each element is read once instead of twice, where the tile still fits
    the budget with at least ``_MIN_WHOLE_BLOCK_S`` positions (S > 1: shorter contiguous runs along S
    would waste memory transactions); otherwise the usual chunked tile.  Whether the single read
    beats the longer runs depends on the GPU: TensorRT times both (tactics), gpu_check reports both."""
    largest = triton.next_power_of_2(max(groups))
    if whole_groups:
        min_s = 1 if spatial == 1 else _MIN_WHOLE_BLOCK_S
        if largest * min_s <= budget:
            if spatial == 1:
                block_s = budget // largest
                if batch is not None:
                    block_s = min(block_s, triton.next_power_of_2(max(int(batch), 1)))
            else:
                cap = _MAX_BLOCK_S if spatial is None else min(triton.next_power_of_2(int(spatial)), _MAX_BLOCK_S)
                block_s = min(cap, budget // largest)
            return BlockConfig(rows=spatial == 1, block_c=largest, block_s=block_s,
                               num_warps=_num_warps(largest * block_s))
    if spatial == 1:
        block_c = min(largest, _MAX_ROWS_BLOCK_C)
        block_s = max(1, budget // block_c)
        if batch is not None:
            block_s = min(block_s, triton.next_power_of_2(max(int(batch), 1)))
        rows = True
    else:
        block_s = _MAX_BLOCK_S if spatial is None else min(triton.next_power_of_2(int(spatial)), _MAX_BLOCK_S)
        block_c = max(1, min(largest, budget // block_s))
        rows = False
    return BlockConfig(rows=rows, block_c=block_c, block_s=block_s, num_warps=_num_warps(block_c * block_s))


def _num_warps(tile: int) -> int:
    """4 to 8 warps, aiming at 8 tile elements per thread."""
    return min(8, max(4, tile // 256))


# ----------------------------------------------------------------------------------------------
# validation


def _check_groups(groups: Sequence[int]) -> tuple[int, ...]:
    try:
        out = tuple(int(g) for g in groups)
    except TypeError:
        raise ValueError(f"GrowNorm groups must be a sequence of channel counts, got {groups!r}") from None
    if not out or any(g <= 0 for g in out):
        raise ValueError(f"GrowNorm groups must be positive channel counts, got {out}")
    return out


def _check_eps(eps: float) -> float:
    if not float(eps) > 0:
        raise ValueError(f"GrowNorm eps must be positive, got {eps}")
    return float(eps)


def is_interpreted() -> bool:
    """True when the kernels were built by Triton's CPU interpreter (``TRITON_INTERPRET=1`` at import)."""
    from triton.runtime.jit import JITFunction

    return not isinstance(grownorm_fwd_kernel, JITFunction)


def _check_device(x: torch.Tensor) -> None:
    if x.device.type != "cuda" and not (is_interpreted() and x.device.type == "cpu"):
        raise ValueError(
            f"GrowNorm Triton kernels need a CUDA tensor (or CPU with TRITON_INTERPRET=1 set before import), "
            f"got device {x.device}"
        )


def _shape(x: torch.Tensor, groups: tuple[int, ...]) -> tuple[int, int, int]:
    if x.dim() < 2:
        raise ValueError(f"GrowNorm needs a tensor of rank >= 2 ([N, C, ...]), got shape {tuple(x.shape)}")
    n, c = int(x.shape[0]), int(x.shape[1])
    if sum(groups) != c:
        raise ValueError(f"GrowNorm groups {groups} sum to {sum(groups)} but the input has {c} channels")
    if x.dtype not in _IO_DTYPES:
        raise ValueError(f"GrowNorm Triton kernels take float32, float16 or bfloat16, got {x.dtype}")
    s = math.prod(int(d) for d in x.shape[2:])
    if c * s >= 2**31:
        raise ValueError(f"GrowNorm Triton kernels need C*S < 2**31 per sample, got C={c}, S={s}")
    return n, c, s


def _gamma32(gamma: torch.Tensor | None, c: int, x: torch.Tensor) -> torch.Tensor | None:
    if gamma is None:
        return None
    if tuple(gamma.shape) != (c,):
        raise ValueError(f"GrowNorm gamma must have shape ({c},), got {tuple(gamma.shape)}")
    if gamma.device != x.device:
        raise ValueError(f"GrowNorm gamma is on {gamma.device} but the input is on {x.device}")
    return gamma.detach().to(torch.float32).contiguous()


# ----------------------------------------------------------------------------------------------
# PyTorch launchers


def _launch_forward(x: torch.Tensor, y: torch.Tensor, rnorm: torch.Tensor | None, groups: tuple[int, ...],
                    g32: torch.Tensor | None, eps: float, cfg: BlockConfig | None) -> None:
    """The forward kernel over contiguous ``x`` into ``y`` (and the norms into ``rnorm`` if given)."""
    n, c, s = _shape(x, groups)
    if x.numel() == 0:
        return
    cfg = _layout_checked(cfg or block_config(groups, s, n), s)
    grownorm_fwd_kernel[cfg.grid(n, s)](
        x, g32 if g32 is not None else x, y, rnorm if rnorm is not None else y, n, s,
        GROUPS=groups, C=c, EPS=eps, HAS_GAMMA=g32 is not None, STORE_RNORM=rnorm is not None, ROWS=cfg.rows,
        BLOCK_C=cfg.block_c, BLOCK_S=cfg.block_s, num_warps=cfg.num_warps,
    )


def grow_norm_forward(
    x: torch.Tensor,
    groups: Sequence[int],
    gamma: torch.Tensor | None = None,
    eps: float = DEFAULT_EPS,
    cfg: BlockConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the forward kernel.  Returns ``(y, rnorm)``: ``y`` like ``x``; ``rnorm`` fp32
    ``[N, G, *spatial]``, the reciprocal clamped group norms the backward reuses.  ``cfg``: the tile
    configuration (default: :func:`block_config`)."""
    groups = _check_groups(groups)
    eps = _check_eps(eps)
    n, c, _ = _shape(x, groups)
    g32 = _gamma32(gamma, c, x)
    _check_device(x)
    x = x.contiguous()
    y = torch.empty_like(x)
    rnorm = torch.empty((n, len(groups)) + tuple(x.shape[2:]), device=x.device, dtype=torch.float32)
    _launch_forward(x, y, rnorm, groups, g32, eps, cfg)
    return y, rnorm


def _layout_checked(cfg: BlockConfig, s: int) -> BlockConfig:
    if cfg.rows and s != 1:
        raise ValueError(f"GrowNorm: the [N, C] tile layout needs S == 1, got S = {s}")
    return cfg


def forward_into(
    x: torch.Tensor,
    y: torch.Tensor,
    groups: Sequence[int],
    gamma: torch.Tensor | None = None,
    eps: float = DEFAULT_EPS,
    cfg: BlockConfig | None = None,
) -> None:
    """The forward kernel writing into ``y`` (contiguous, shaped and typed like ``x``), without the
    norms the backward needs: for callers that own the output (TensorRT's JIT plugin path).
    ``cfg``: the tile configuration (default: :func:`block_config`)."""
    groups = _check_groups(groups)
    eps = _check_eps(eps)
    _, c, _ = _shape(x, groups)
    g32 = _gamma32(gamma, c, x)
    _check_device(x)
    if tuple(y.shape) != tuple(x.shape) or y.dtype != x.dtype or not y.is_contiguous() or not x.is_contiguous():
        raise ValueError("GrowNorm forward_into needs contiguous x and y of the same shape and dtype")
    _launch_forward(x, y, None, groups, g32, eps, cfg)


def grow_norm_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    rnorm: torch.Tensor,
    groups: Sequence[int],
    gamma: torch.Tensor | None = None,
    eps: float = DEFAULT_EPS,
    need_grad_gamma: bool = True,
    cfg: BlockConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run the backward kernel.  Returns ``(grad_x, grad_gamma)``; ``grad_gamma`` is ``None`` without
    gamma or with ``need_grad_gamma=False``, else in gamma's dtype (reduced in fp32: per-program
    partials ``[num_programs, C]`` summed by torch).  ``cfg``: the tile configuration (default:
    :func:`block_config` with half the forward's budget)."""
    groups = _check_groups(groups)
    eps = _check_eps(eps)
    n, c, s = _shape(x, groups)
    if tuple(grad_y.shape) != tuple(x.shape):
        raise ValueError(f"GrowNorm grad_y has shape {tuple(grad_y.shape)}, expected {tuple(x.shape)}")
    if rnorm.numel() != n * len(groups) * s or rnorm.dtype != torch.float32:
        raise ValueError(f"GrowNorm rnorm must be float32 with N*G*S = {n * len(groups) * s} elements")
    g32 = _gamma32(gamma, c, x)
    _check_device(x)
    x = x.contiguous()
    grad_y = grad_y.contiguous()
    rnorm = rnorm.contiguous()
    grad_x = torch.empty_like(x)
    want_dgamma = g32 is not None and need_grad_gamma
    if x.numel() == 0:
        return grad_x, (torch.zeros_like(gamma) if want_dgamma else None)
    cfg = _layout_checked(cfg or block_config(groups, s, n, budget=_TILE_BUDGET // 2), s)
    grid = cfg.grid(n, s)
    partial = torch.empty((grid[0], c) if want_dgamma else (1,), device=x.device, dtype=torch.float32)
    grownorm_bwd_kernel[grid](
        x, grad_y, g32 if g32 is not None else x, rnorm, grad_x, partial, n, s,
        GROUPS=groups, C=c, EPS=eps, HAS_GAMMA=g32 is not None, NEED_DGAMMA=want_dgamma, ROWS=cfg.rows,
        BLOCK_C=cfg.block_c, BLOCK_S=cfg.block_s, num_warps=cfg.num_warps,
    )
    grad_gamma = partial.sum(dim=0).to(gamma.dtype) if want_dgamma else None
    return grad_x, grad_gamma


class GrowNormFunction(torch.autograd.Function):
    """Autograd wrapper: ``GrowNormFunction.apply(x, gamma_or_None, groups_tuple, eps)``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, gamma: torch.Tensor | None, groups: tuple, eps: float) -> torch.Tensor:
        y, rnorm = grow_norm_forward(x, groups, gamma, eps)
        ctx.save_for_backward(x, gamma, rnorm)
        ctx.groups = tuple(groups)
        ctx.eps = float(eps)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y: torch.Tensor):
        x, gamma, rnorm = ctx.saved_tensors
        need_x, need_gamma = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_x or need_gamma):
            return None, None, None, None
        grad_x, grad_gamma = grow_norm_backward(
            grad_y, x, rnorm, ctx.groups, gamma, ctx.eps, need_grad_gamma=need_gamma
        )
        return (grad_x if need_x else None), grad_gamma, None, None


def grow_norm_triton(
    x: torch.Tensor,
    groups: Sequence[int],
    gamma: torch.Tensor | None = None,
    eps: float = DEFAULT_EPS,
) -> torch.Tensor:
    """GrowNorm through the Triton kernels, differentiable in ``x`` and ``gamma``; same contract as
    :func:`surgeon.grow.grownorm.grow_norm`."""
    groups = _check_groups(groups)
    eps = _check_eps(eps)
    _, c, _ = _shape(x, groups)
    _gamma32(gamma, c, x)  # validates shape and device
    _check_device(x)
    return GrowNormFunction.apply(x.contiguous(), gamma, groups, eps)


# ----------------------------------------------------------------------------------------------
# ahead-of-time compilation (TensorRT)


@functools.cache
def _compilable_namespace() -> dict[str, Any]:
    """The kernels as real ``JITFunction`` objects, whatever ``TRITON_INTERPRET`` was at import.

    Under the interpreter ``@triton.jit`` yields interpreter objects that ``triton.compile`` cannot
    use; rebuild the same functions (same code, hence same source and line numbers) over a copy of
    this module's globals in which every jitted name is a ``JITFunction``.
    """
    from triton.runtime.jit import JITFunction

    module = globals()
    if all(isinstance(module[name], JITFunction) for name in _JIT_NAMES + ("_sum_combine",)):
        return module
    namespace = dict(module)
    if not isinstance(_sum_combine, JITFunction):
        namespace["_sum_combine"] = JITFunction(_sum_combine.fn)
    for name in _JIT_NAMES:
        raw = module[name].fn
        fn = types.FunctionType(raw.__code__, namespace, raw.__name__, raw.__defaults__, raw.__closure__)
        fn.__qualname__ = raw.__qualname__
        fn.__module__ = raw.__module__
        fn.__doc__ = raw.__doc__
        fn.__kwdefaults__ = raw.__kwdefaults__
        namespace[name] = JITFunction(fn)
    return namespace


def _ptx_directive(ptx: str, directive: str) -> str | None:
    """The argument of the first ``.version``/``.target`` line of a PTX module."""
    for line in ptx.splitlines():
        if line.startswith(directive + " "):
            return line.split()[1]
    return None


def ptx_entry_params(ptx: str, kernel_name: str) -> list[str]:
    """The ``.param`` declarations of ``.entry kernel_name`` in a PTX module, in order."""
    match = re.search(r"\.entry\s+" + re.escape(kernel_name) + r"\s*\(([^)]*)\)", ptx)
    if match is None:
        raise ValueError(f"no .entry {kernel_name} in this PTX")
    return [p.strip() for p in match.group(1).split(",") if p.strip()]


def drop_unused_params(ptx: str, kernel_name: str, keep: int) -> str:
    """``ptx`` with the parameters of ``.entry kernel_name`` after the first ``keep`` removed.

    Each removed parameter must be unreferenced in the module (declared, never loaded): otherwise
    the kernel needs it and a ``ValueError`` says which.
    """
    params = ptx_entry_params(ptx, kernel_name)
    if keep > len(params):
        raise ValueError(f".entry {kernel_name} has {len(params)} parameters, cannot keep {keep}")
    for index in range(keep, len(params)):
        name = f"{kernel_name}_param_{index}"
        if len(re.findall(r"\b" + re.escape(name) + r"\b", ptx)) != 1:
            raise ValueError(f"{name} ({params[index]}) is used by the kernel and cannot be dropped")
    match = re.search(r"(\.entry\s+" + re.escape(kernel_name) + r"\s*\()([^)]*)(\))", ptx)
    assert match is not None  # ptx_entry_params found it
    kept = ",\n".join("\t" + p for p in params[:keep])
    return ptx[: match.start(2)] + "\n" + kept + "\n" + ptx[match.end(2):]


def assemble_ptx(ptx: str, arch: int) -> bytes:
    """A cubin for the PTX's own ``.target``, assembled by the ``ptxas`` Triton ships (no GPU needed)."""
    import subprocess
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas

    target = _ptx_directive(ptx, ".target")
    if target is None:
        raise ValueError("PTX without a .target directive")
    with tempfile.TemporaryDirectory() as tmp:
        src, out = f"{tmp}/kernel.ptx", f"{tmp}/kernel.cubin"
        with open(src, "w") as f:
            f.write(ptx)
        proc = subprocess.run([get_ptxas(int(arch)).path, f"-arch={target}", "-o", out, src],
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"ptxas rejected the PTX for {target}: {proc.stderr.strip()[:500]}")
        with open(out, "rb") as f:
            return f.read()


# PTX ISA versions a driver of CUDA 11.8 (R520) and 12.0 (R525, TensorRT 10's minimum) can JIT-compile.
_PORTABLE_PTX_ISA = ("7.8", "8.0")


def oldest_ptx_isa(ptx: str, arch: int) -> tuple[str, bytes]:
    """``ptx`` relabelled with the oldest PTX ISA ``.version`` that ``ptxas`` accepts for it, and its cubin.

    Triton labels its PTX with the newest ISA its ``ptxas`` knows (8.8 for CUDA 12.9), which a driver
    older than that CUDA release refuses to load, although a simple kernel uses nothing that new.
    ``ptxas`` rejects a label older than the instructions and the target need, so the first label
    it accepts is safe; the instructions are unchanged.
    """
    current = _ptx_directive(ptx, ".version")
    for version in _PORTABLE_PTX_ISA:
        if current is None or tuple(map(int, version.split("."))) >= tuple(map(int, current.split("."))):
            break
        candidate = re.sub(r"^\.version \S+$", f".version {version}", ptx, count=1, flags=re.MULTILINE)
        try:
            return candidate, assemble_ptx(candidate, arch)
        except RuntimeError:
            continue
    return ptx, assemble_ptx(ptx, arch)


def _compile(kernel_name: str, runtime: dict[str, str], constexprs: dict[str, Any], arch: int, num_warps: int,
             aligned: Sequence[str] = ()):
    """``triton.compile`` one of this module's kernels for ``sm_<arch>``; no GPU needed.

    ``runtime``: the non-constexpr parameters in order, with Triton type strings (``*fp16``, ``i32``);
    ``constexprs``: values of the rest; ``aligned``: pointer parameters promised 16-byte aligned.
    """
    from triton.backends.compiler import GPUTarget

    fn = _compilable_namespace()[kernel_name]
    signature = dict(runtime)
    signature.update({name: "constexpr" for name in constexprs})
    if list(signature) != fn.arg_names:
        raise ValueError(f"{kernel_name} takes {fn.arg_names}, got {list(signature)}")
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in aligned}
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})


_TRT_KERNEL = "grownorm_fwd_qdp_kernel"
_TRT_PARAMS = ("X", "GAMMA", "N", "S", "Y")  # inputs, TensorRT's extra scalar arguments, outputs


def compile_ptx(
    groups: Sequence[int],
    eps: float = DEFAULT_EPS,
    dtype: str = "fp32",
    has_gamma: bool = True,
    arch: int = 90,
    *,
    spatial: int | None = None,
    block_c: int | None = None,
    block_s: int | None = None,
    num_warps: int | None = None,
    gamma_dtype: str = "fp32",
    assume_aligned: bool = True,
) -> tuple[str, str, dict[str, Any]]:
    """Compile the TensorRT-facing forward kernel to PTX ahead of time (works without a GPU).

    ``groups``/``eps``/``has_gamma`` are baked in.  ``dtype``: ``"fp32"``, ``"fp16"`` or ``"bf16"``
    for ``X`` and ``Y``; ``gamma_dtype`` the same for ``GAMMA`` (read as fp32 inside).  ``arch``:
    compute capability as an int (80, 86, 89, 90, ...; Triton emits ``.target sm_90a`` for 90 and up,
    which runs on that architecture only).  ``spatial``: the S the engine sees, for the block
    heuristic; ``1`` selects the ``[N, C]`` layout, which is valid **only** for ``S == 1``; ``None``
    means "unknown, greater than 1".  ``block_c``/``block_s``/``num_warps`` override the heuristic
    (powers of two).  The kernel's parameters are ``(X, GAMMA, N, S, Y)``.  ``assume_aligned``: promise that the
    three pointers are 16-byte aligned (lets Triton vectorise; TensorRT's buffers are).

    Returns ``(kernel_name, ptx, launch_info)``; ``launch_info`` holds ``arch``, ``dtype``,
    ``gamma_dtype``, ``channels`` (C), ``target``
    (``sm_80``/``sm_90a``), ``num_warps``, ``block`` (threads per block, ``num_warps * 32``),
    ``shared_mem`` (dynamic shared memory bytes to launch with), ``block_c``, ``block_s``, ``rows``,
    ``grid`` (callable ``(N, S) -> (gx, 1, 1)``), ``grid_formula`` (text), ``params`` (the runtime
    parameters in order, ``N``/``S`` int32: the PTX's ``.entry`` declares exactly these),
    ``hidden_params`` (how many parameters Triton appended and this function dropped: with Triton
    3.8, 2 pointers, global and profile scratch, unused since both sizes are 0),
    ``global_scratch_size``, ``profile_scratch_size``, ``ptx_version`` (the ISA label, lowered by
    :func:`oldest_ptx_isa` so that drivers from CUDA 12.0 on load it), ``triton_ptx_version`` (the
    label Triton gave it) and ``cubin`` (the ptxas output for the same target, bytes).
    """
    groups = _check_groups(groups)
    eps = _check_eps(eps)
    for name, value in (("dtype", dtype), ("gamma_dtype", gamma_dtype)):
        if value not in ("fp32", "fp16", "bf16"):
            raise ValueError(f"GrowNorm compile_ptx {name} must be 'fp32', 'fp16' or 'bf16', got {value!r}")
    if int(arch) < 80:
        raise ValueError(f"GrowNorm compile_ptx needs arch >= 80, got {arch}")
    if spatial is not None and int(spatial) < 1:
        raise ValueError(f"GrowNorm compile_ptx spatial must be >= 1 or None, got {spatial}")
    cfg = block_config(groups, spatial)
    bc = cfg.block_c if block_c is None else int(block_c)
    bs = cfg.block_s if block_s is None else int(block_s)
    for name, value in (("block_c", bc), ("block_s", bs)):
        if value < 1 or value & (value - 1):
            raise ValueError(f"GrowNorm compile_ptx {name} must be a power of two, got {value}")
    warps = _num_warps(bc * bs) if num_warps is None else int(num_warps)
    cfg = BlockConfig(rows=cfg.rows, block_c=bc, block_s=bs, num_warps=warps)

    kernel_name, params = _TRT_KERNEL, _TRT_PARAMS
    types_ = {"X": f"*{dtype}", "GAMMA": f"*{gamma_dtype}", "Y": f"*{dtype}", "N": "i32", "S": "i32"}
    constexprs = {
        "GROUPS": groups, "C": sum(groups), "EPS": eps, "HAS_GAMMA": bool(has_gamma), "ROWS": cfg.rows,
        "BLOCK_C": cfg.block_c, "BLOCK_S": cfg.block_s,
    }
    compiled = _compile(
        kernel_name, {name: types_[name] for name in params}, constexprs, int(arch), cfg.num_warps,
        aligned=("X", "GAMMA", "Y") if assume_aligned else (),
    )
    md = compiled.metadata
    ptx = compiled.asm["ptx"]
    hidden = len(ptx_entry_params(ptx, md.name)) - len(params)
    if md.global_scratch_size or md.profile_scratch_size:
        raise RuntimeError(f"GrowNorm kernel {md.name} needs Triton scratch memory, which an ahead-of-time launch "
                           "does not provide")
    triton_isa = _ptx_directive(ptx, ".version")
    ptx, cubin = oldest_ptx_isa(drop_unused_params(ptx, md.name, len(params)), int(arch))
    grid_formula = "grid_x = cdiv(N, BLOCK_S)" if cfg.rows else "grid_x = N * cdiv(S, BLOCK_S)"
    info = {
        "arch": int(arch),
        "dtype": dtype,
        "gamma_dtype": gamma_dtype,
        "channels": sum(groups),
        "target": _ptx_directive(ptx, ".target"),
        "num_warps": md.num_warps,
        "block": md.num_warps * 32,
        "shared_mem": md.shared,
        "block_c": cfg.block_c,
        "block_s": cfg.block_s,
        "rows": cfg.rows,
        "grid": cfg.grid,
        "grid_formula": grid_formula + " (grid_y = grid_z = 1)",
        "params": params,
        "hidden_params": hidden,
        "global_scratch_size": md.global_scratch_size,
        "profile_scratch_size": md.profile_scratch_size,
        "ptx_version": _ptx_directive(ptx, ".version"),
        "triton_ptx_version": triton_isa,
        "cubin": cubin,
    }
    return md.name, ptx, info
