"""GrowNorm / grow_norm against an independent float64 (numpy) reference."""

from __future__ import annotations

import random
import zlib

import numpy as np
import pytest
import torch
import torch.fx
from torch import nn

from surgeon.grow.analysis import SurgeonTracer
from surgeon.grow.grownorm import DEFAULT_EPS, GrowNorm, grow_norm


def reference(x: torch.Tensor, groups, gamma: torch.Tensor | None = None, eps: float = DEFAULT_EPS) -> np.ndarray:
    """Per-group L2 norm over dim 1, max(norm, eps), times gamma; float64 numpy, no torch maths."""
    a = x.detach().to(torch.float64).cpu().numpy()
    out = np.empty_like(a)
    start = 0
    for g in groups:
        part = a[:, start:start + g]
        norm = np.sqrt((part * part).sum(axis=1, keepdims=True))
        out[:, start:start + g] = part / np.maximum(norm, eps)
        start += g
    assert start == a.shape[1]
    if gamma is not None:
        gm = gamma.detach().to(torch.float64).cpu().numpy()
        out = out * gm.reshape((1, -1) + (1,) * (a.ndim - 2))
    return out


def split(c: int, how: str, rng: random.Random) -> tuple[int, ...]:
    if how == "one" or c == 1:
        return (c,)
    if how == "two":
        a = rng.randint(1, c - 1)
        return (a, c - a)
    # several: a random composition of c into 3..min(c, 6) positive parts
    n = rng.randint(min(3, c), min(c, 6))
    cuts = sorted(rng.sample(range(1, c), n - 1))
    bounds = [0, *cuts, c]
    return tuple(b - a for a, b in zip(bounds, bounds[1:]))


SPATIAL = {2: (), 3: (5,), 4: (3, 2)}


@pytest.mark.parametrize("rank", [2, 3, 4])
@pytest.mark.parametrize("channels", [1, 3, 1000])
@pytest.mark.parametrize("how", ["one", "two", "several"])
@pytest.mark.parametrize("with_gamma", [False, True])
def test_matches_reference(rank, channels, how, with_gamma):
    rng = random.Random(zlib.crc32(repr((rank, channels, how, with_gamma)).encode()))
    torch.manual_seed(rng.randint(0, 2**31))
    groups = split(channels, how, rng)
    assert sum(groups) == channels and all(g > 0 for g in groups)
    x = torch.randn(4, channels, *SPATIAL[rank]) * rng.choice([1e-2, 1.0, 30.0])
    gamma = torch.rand(channels) * 20 + 0.5 if with_gamma else None
    y = grow_norm(x, groups, gamma)
    assert y.shape == x.shape and y.dtype == x.dtype
    np.testing.assert_allclose(y.double().numpy(), reference(x, groups, gamma), rtol=1e-5, atol=1e-6)

    mod = GrowNorm(groups, scale=with_gamma, gamma_init=1.0)
    if with_gamma:
        with torch.no_grad():
            mod.gamma.copy_(gamma)
    else:
        assert mod.gamma is None
    np.testing.assert_allclose(mod(x).detach().double().numpy(), reference(x, groups, gamma), rtol=1e-5, atol=1e-6)


def test_each_group_has_unit_norm_without_gamma():
    x = torch.randn(3, 10, 4, 4)
    y = grow_norm(x, (7, 3))
    torch.testing.assert_close(y[:, :7].norm(dim=1), torch.ones(3, 4, 4))
    torch.testing.assert_close(y[:, 7:].norm(dim=1), torch.ones(3, 4, 4))


def test_float64_stays_float64():
    x = torch.randn(2, 5, dtype=torch.float64)
    y = grow_norm(x, (2, 3), torch.full((5,), 3.0))
    assert y.dtype == torch.float64
    np.testing.assert_allclose(y.numpy(), reference(x, (2, 3), torch.full((5,), 3.0)), rtol=1e-12)


@pytest.mark.parametrize("rank", [2, 4])
def test_all_zero_group_gives_zero_and_finite_gradient(rank):
    torch.manual_seed(0)
    shape = (3, 6) + ((2, 2) if rank == 4 else ())
    x = torch.randn(*shape)
    x[:, 2:] = 0.0  # second group all zero everywhere (e.g. dead units after a ReLU)
    x.requires_grad_(True)
    gamma = torch.rand(6) + 0.5
    y = grow_norm(x, (2, 4), gamma)
    assert torch.equal(y[:, 2:].detach(), torch.zeros_like(y[:, 2:]))
    np.testing.assert_allclose(y.detach().double().numpy(), reference(x, (2, 4), gamma), rtol=1e-5, atol=1e-7)
    w = torch.randn_like(y)
    (y * w).sum().backward()
    assert torch.isfinite(x.grad).all()
    # Below eps the op is y = gamma * x / eps, so dL/dx = w * gamma / eps on the zero group.
    view = (1, -1) + (1,) * (rank - 2)
    expected = w[:, 2:] * gamma[2:].reshape(view) / DEFAULT_EPS
    torch.testing.assert_close(x.grad[:, 2:], expected, rtol=1e-5, atol=1e-3)


def test_gradcheck_float64_with_zero_group():
    torch.manual_seed(1)
    x = torch.randn(2, 7, 2, dtype=torch.float64)
    x[:, 3:5] = 0.0  # the middle group is all zero
    x.requires_grad_(True)
    gamma = (torch.rand(7, dtype=torch.float64) + 0.5).requires_grad_(True)
    groups = (3, 2, 2)
    assert torch.autograd.gradcheck(lambda a, g: grow_norm(a, groups, g, eps=1e-3), (x, gamma))
    assert torch.autograd.gradcheck(lambda a: grow_norm(a, groups, None, eps=1e-3), (x,))


def test_gradcheck_module_float64():
    torch.manual_seed(2)
    mod = GrowNorm((2, 3), eps=1e-3, gamma_init=5.0).double()
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(mod, (x,))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_computed_in_fp32(dtype):
    torch.manual_seed(3)
    x = (torch.randn(4, 40, 3, 3) * 2).to(dtype)
    gamma = torch.rand(40) * 10 + 1
    y = grow_norm(x, (30, 10), gamma)
    assert y.dtype == dtype
    tol = 1e-2 if dtype == torch.float16 else 3e-2
    np.testing.assert_allclose(y.double().numpy(), reference(x, (30, 10), gamma), rtol=tol, atol=tol)
    mod = GrowNorm((30, 10), gamma_init=3.0).to(dtype)
    assert mod(x).dtype == dtype


def test_fp16_sum_of_squares_would_overflow_and_underflow_in_fp16():
    # Squares of 1000 overflow fp16 (max 65504) and squares of 1e-4 underflow it: only an fp32
    # reduction gets these right.
    big = torch.full((2, 64), 1000.0, dtype=torch.float16)
    small = torch.full((2, 64), 1e-4, dtype=torch.float16)
    for x in (big, small):
        y = grow_norm(x, (64,))
        assert y.dtype == torch.float16
        assert torch.isfinite(y).all()
        np.testing.assert_allclose(y.double().numpy(), reference(x, (64,)), rtol=2e-3)


def test_errors():
    x = torch.randn(2, 5, 3)
    with pytest.raises(ValueError, match="sum to 4 but the input has 5 channels"):
        grow_norm(x, (2, 2))
    with pytest.raises(ValueError, match="rank >= 2"):
        grow_norm(torch.randn(5), (5,))
    for bad in [(0, 5), (6, -1), ()]:
        with pytest.raises(ValueError, match="positive"):
            grow_norm(x, bad)
        with pytest.raises(ValueError, match="positive"):
            GrowNorm(bad)
    with pytest.raises(ValueError, match="sum to"):
        GrowNorm((2, 2))(x)


def test_module_parameters_and_repr():
    assert GrowNorm((3, 4)).gamma.tolist() == [1.0] * 7           # auto: 1 until calibrated
    assert GrowNorm((3, 4), gamma_init=20).gamma.tolist() == [20.0] * 7
    m = GrowNorm((3, 4), scale=False)
    assert m.gamma is None and list(m.parameters()) == [] and m.channels == 7
    assert "groups=(3, 4)" in repr(GrowNorm((3, 4)))


class _WithModule(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.norm = GrowNorm((4, 2), gamma_init=7.0)

    def forward(self, x):
        return self.norm(torch.relu(self.fc(x)))


class _WithFunction(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.gamma = nn.Parameter(torch.full((6,), 3.0))

    def forward(self, x):
        return grow_norm(torch.relu(self.fc(x)), (4, 2), self.gamma)


def test_surgeon_tracer_keeps_grownorm_as_leaf():
    m = _WithModule()
    gm = torch.fx.GraphModule(m, SurgeonTracer().trace(m))
    assert [str(n.target) for n in gm.graph.nodes if n.op == "call_module"] == ["fc", "norm"]
    x = torch.randn(3, 4)
    torch.testing.assert_close(gm(x), m(x))


def test_symbolic_trace_module():
    m = _WithModule()
    gm = torch.fx.symbolic_trace(m)
    x = torch.randn(3, 4)
    torch.testing.assert_close(gm(x), m(x))


def test_symbolic_trace_functional():
    m = _WithFunction()
    gm = torch.fx.symbolic_trace(m)
    x = torch.randn(3, 4)
    torch.testing.assert_close(gm(x), m(x))


@pytest.mark.parametrize("eps", [0.0, -1e-6])
def test_non_positive_eps_is_refused(eps):
    with pytest.raises(ValueError, match="eps"):
        GrowNorm((2, 3), eps=eps)


# -- the channel axis (DESIGN.md §2): 1 for [N, C, ...], -1 for [N, ..., C] ------------------------

AXIS_SHAPES = {2: (4, None), 3: (2, 5, None), 4: (2, 3, 2, None)}


def reference_axis(x: torch.Tensor, groups, gamma=None, eps: float = DEFAULT_EPS, axis: int = 1) -> np.ndarray:
    """float64 numpy GrowNorm over ``axis``: the dim-1 reference with the channels moved there."""
    moved = torch.movedim(x.detach(), axis, 1)
    return np.moveaxis(reference(moved, groups, gamma, eps), 1, axis)


@pytest.mark.parametrize("rank", [2, 3, 4])
@pytest.mark.parametrize("groups", [(7,), (4, 3), (2, 3, 2)], ids=["C", "Co+Cn", "3groups"])
@pytest.mark.parametrize("with_gamma", [False, True])
def test_last_axis_matches_reference(rank, groups, with_gamma):
    torch.manual_seed(rank * 10 + len(groups))
    shape = tuple(sum(groups) if d is None else d for d in AXIS_SHAPES[rank])
    x = torch.randn(shape) * 3
    x[0, ..., : groups[0]] = 0  # an all-zero group in one sample
    gamma = torch.rand(sum(groups)) * 10 + 0.5 if with_gamma else None
    want = reference_axis(x, groups, gamma, axis=-1)
    y = grow_norm(x, groups, gamma, axis=-1)
    assert y.shape == x.shape
    np.testing.assert_allclose(y.double().numpy(), want, rtol=1e-6, atol=1e-7)
    mod = GrowNorm(groups, scale=with_gamma, gamma_init=1.0, axis=-1)
    if with_gamma:
        with torch.no_grad():
            mod.gamma.copy_(gamma)
    np.testing.assert_allclose(mod(x).detach().double().numpy(), want, rtol=1e-6, atol=1e-7)
    # the same numbers as axis 1 on the channels-first copy
    first = torch.movedim(x, -1, 1)
    torch.testing.assert_close(torch.movedim(grow_norm(first, groups, gamma, axis=1), 1, -1), y, rtol=1e-6, atol=1e-7)


def test_last_axis_float64_gradcheck_and_half_inputs():
    torch.manual_seed(4)
    x = torch.randn(2, 3, 7, dtype=torch.float64)
    x[1, 0, 3:5] = 0.0
    x.requires_grad_(True)
    gamma = (torch.rand(7, dtype=torch.float64) + 0.5).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, g: grow_norm(a, (3, 2, 2), g, eps=1e-3, axis=-1), (x, gamma))
    for dtype, tol in ((torch.float16, 1e-2), (torch.bfloat16, 3e-2)):
        big = (torch.randn(3, 4, 40) * 1000).to(dtype)  # squares overflow fp16: the reduction runs in fp32
        y = grow_norm(big, (30, 10), torch.full((40,), 3.0), axis=-1)
        assert y.dtype == dtype and torch.isfinite(y).all()
        np.testing.assert_allclose(y.double().numpy(), reference_axis(big, (30, 10), torch.full((40,), 3.0), axis=-1),
                                   rtol=tol, atol=tol)


def test_axis_errors_are_one_line():
    for bad in (0, 2, -2, 1.0, True, "1"):
        with pytest.raises(ValueError, match="axis must be 1") as info:
            GrowNorm((2, 3), axis=bad)
        assert "\n" not in str(info.value)
        with pytest.raises(ValueError, match="axis must be 1"):
            grow_norm(torch.randn(2, 5), (2, 3), axis=bad)
    with pytest.raises(ValueError, match=r"sum to 5 but the input has 4 channels \(axis -1\)"):
        grow_norm(torch.randn(2, 5, 4), (2, 3), axis=-1)
    with pytest.raises(ValueError, match=r"rank >= 2 \(\[N, \.\.\., C\]\)"):
        grow_norm(torch.randn(5), (5,), axis=-1)


def test_axis_attribute_repr_state_and_custom_op():
    m = GrowNorm((3, 4), gamma_init=2.0, axis=-1)
    assert m.axis == -1 and "axis=-1" in repr(m) and "axis=1" in repr(GrowNorm((3, 4)))
    # axis is not state: the state dict is what it was, and a module rebuilt with the same axis
    # (as a recipe replay does) loads it and computes the same thing
    assert list(m.state_dict()) == ["gamma"]
    with torch.no_grad():
        m.gamma.uniform_(0.5, 3.0)
    rebuilt = GrowNorm((3, 4), axis=-1)
    rebuilt.load_state_dict(m.state_dict())
    x = torch.randn(2, 5, 7)
    torch.testing.assert_close(rebuilt(x), m(x))
    # the opaque op export sees carries the axis and defaults to 1
    g = m.gamma.detach()
    torch.testing.assert_close(torch.ops.surgeon.grow_norm(x, g, [3, 4], 1e-6, -1), grow_norm(x, (3, 4), g, axis=-1))
    x1 = torch.randn(2, 7, 5)
    torch.testing.assert_close(torch.ops.surgeon.grow_norm(x1, g, [3, 4], 1e-6), grow_norm(x1, (3, 4), g))


def test_fx_keeps_the_axis():
    class Tokens(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 6)
            self.norm = GrowNorm((4, 2), gamma_init=3.0, axis=-1)
            self.gamma = nn.Parameter(torch.full((6,), 2.0))

        def forward(self, x):
            return self.norm(self.fc(x)) + grow_norm(self.fc(x), (3, 3), self.gamma, axis=-1)

    m = Tokens()
    x = torch.randn(2, 5, 4)
    for gm in (torch.fx.symbolic_trace(m), torch.fx.GraphModule(m, SurgeonTracer().trace(m))):
        torch.testing.assert_close(gm(x), m(x))
