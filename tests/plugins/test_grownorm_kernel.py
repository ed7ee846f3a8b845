"""The GrowNorm Triton kernels against the composite oracle, and their ahead-of-time PTX.

Without a GPU the kernels run on CPU tensors under Triton's interpreter (see ``conftest.py``);
``compile_ptx`` needs neither.  References are :func:`surgeon.grow.grownorm.grow_norm` on float64
copies of the same (already rounded) inputs, forward and autograd backward.
"""

from __future__ import annotations

import json
import random

import pytest
import torch

from surgeon.grow.grownorm import grow_norm

pytest.importorskip("triton")

EPS = 1e-6
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _random_cases(seed: int, count: int):
    rng = random.Random(seed)
    cases = []
    for _ in range(count):
        c = rng.choice([2, 5, 17, 64, 130])
        cuts = sorted(rng.sample(range(1, c), min(c - 1, rng.randint(1, 3))))
        groups = tuple(b - a for a, b in zip([0] + cuts, cuts + [c]))
        spatial = rng.choice([(), (3,), (2, 5), (4, 4)])
        cases.append(((rng.randint(1, 3), c) + spatial, groups, rng.random() < 0.7, torch.float32))
    return cases


# (shape, groups, with gamma, dtype); N and S stay tiny so the interpreter stays fast
CASES = [
    ((3, 1), (1,), True, torch.float32),
    ((4, 3), (1, 2), False, torch.float32),
    ((2, 3), (1, 1, 1), True, torch.float32),
    ((2, 3, 4, 5), (3,), True, torch.float32),
    ((2, 1000), (1, 999), True, torch.float32),
    ((2, 1000), (500, 300, 200), False, torch.float32),
    ((2, 1000, 2, 3), (10, 990), True, torch.float32),
    ((2, 6144), (4096, 2048), True, torch.float32),
    ((1, 6144, 2), (6141, 3), False, torch.float32),
    ((3, 7, 3, 3), (2, 2, 3), True, torch.float16),
    ((2, 1000), (700, 300), True, torch.float16),
    ((2, 6144), (4096, 1024, 1024), True, torch.float16),
    ((2, 130, 5), (65, 65), False, torch.float16),
    ((2, 40, 3, 3), (8, 32), True, torch.bfloat16),
] + _random_cases(seed=7, count=4)


def _case_id(case):
    shape, groups, with_gamma, dtype = case
    g = "+".join(map(str, groups))
    return f"{'x'.join(map(str, shape))}-{g}-{'gamma' if with_gamma else 'nogamma'}-{str(dtype)[6:]}"


def _inputs(case, device, seed=0):
    shape, _, with_gamma, dtype = case
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen).to(dtype)
    gamma = (torch.rand(shape[1], generator=gen) * 2 + 0.5) if with_gamma else None
    gy = torch.randn(shape, generator=gen).to(dtype)
    return x.to(device), (None if gamma is None else gamma.to(device)), gy.to(device)


def _assert_close(actual, expected, rtol, what, scale=0.0):
    """Max-norm relative error: |actual - expected|_inf <= rtol * max(|expected|_inf, scale)."""
    assert actual.shape == expected.shape, what
    actual = actual.detach().to(torch.float64).cpu()
    expected = expected.detach().to(torch.float64).cpu()
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    err = (actual - expected).abs().max().item() if actual.numel() else 0.0
    scale = max(expected.abs().max().item() if expected.numel() else 0.0, float(scale))
    assert err <= rtol * scale + 1e-12, f"{what}: max error {err:.3g} vs scale {scale:.3g} (rtol {rtol})"


def _reference(x, groups, gamma, gy, eps=EPS):
    xd = x.detach().cpu().to(torch.float64).requires_grad_()
    gd = None if gamma is None else gamma.detach().cpu().to(torch.float64).requires_grad_()
    y = grow_norm(xd, groups, gd, eps)
    grads = torch.autograd.grad(y, [xd] if gd is None else [xd, gd], gy.cpu().to(torch.float64))
    return y.detach(), grads[0], (grads[1] if gd is not None else None)


def _grad_x_scale(x, groups, gamma, gy, eps=EPS):
    """Size of the terms grad_x is made of, r * gamma * gy: the error floor where they cancel
    (a one-channel group has grad_x = 0 exactly: y = gamma * sign(x))."""
    parts = torch.split(x.detach().cpu().double(), list(groups), dim=1)
    r = max(p.pow(2).sum(1).clamp_min(eps * eps).rsqrt().max().item() for p in parts)
    g = 1.0 if gamma is None else gamma.detach().abs().max().item()
    return r * g * gy.detach().abs().max().item()


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_forward_matches_composite(gk, device, case):
    x, gamma, _ = _inputs(case, device)
    groups = case[1]
    y, rnorm = gk.grow_norm_forward(x, groups, gamma, EPS)
    assert y.dtype == x.dtype and y.shape == x.shape and y.device == x.device
    assert rnorm.dtype == torch.float32 and rnorm.shape == (x.shape[0], len(groups)) + x.shape[2:]
    ref = grow_norm(x.cpu().double(), groups, None if gamma is None else gamma.cpu().double(), EPS)
    _assert_close(y, ref, TOL[x.dtype], "y")
    parts = torch.split(x.cpu().double(), list(groups), dim=1)
    ref_r = torch.stack([p.pow(2).sum(1).clamp_min(EPS * EPS).rsqrt() for p in parts], dim=1)
    _assert_close(rnorm, ref_r, 1e-6, "rnorm")


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_backward_matches_composite_autograd(gk, device, case):
    x, gamma, gy = _inputs(case, device, seed=1)
    groups = case[1]
    xt = x.clone().requires_grad_()
    gt = None if gamma is None else gamma.clone().requires_grad_()
    y = gk.grow_norm_triton(xt, groups, gt, EPS)
    grads = torch.autograd.grad(y, [xt] if gt is None else [xt, gt], gy)
    y_ref, gx_ref, gg_ref = _reference(x, groups, gamma, gy)
    tol = TOL[x.dtype]
    _assert_close(y, y_ref, tol, "y")
    assert grads[0].dtype == x.dtype
    _assert_close(grads[0], gx_ref, tol, "grad_x", scale=_grad_x_scale(x, groups, gamma, gy))
    if gt is not None:
        assert grads[1].dtype == gamma.dtype and grads[1].shape == gamma.shape
        _assert_close(grads[1], gg_ref, tol, "grad_gamma")


@pytest.mark.parametrize("dtype, eps, tiny", [(torch.float32, 1e-6, 1e-9), (torch.float16, 1e-2, 1e-4)],
                         ids=["float32", "float16"])
def test_all_zero_and_tiny_groups(gk, device, dtype, eps, tiny):
    """Zero groups give y = 0 and finite gradients (the clamp cuts the gradient through the norm).
    fp16 uses a larger eps: where the clamp is active grad_x = gamma * gy / eps, and 1/1e-6
    overflows fp16 -- in the composite just the same."""
    groups = (2, 4, 3)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 9, 2, 3, generator=gen)
    x[0, :2] = 0  # a whole group zero in one sample (every position)
    x[1, 2:6, 0] = 0  # a group zero at some positions only
    x[2] = 0  # every group zero
    x[3, 6:] = tiny  # norm below eps: the clamp is active
    x = x.to(dtype).to(device)
    gamma = (torch.rand(9, generator=gen) + 0.5).to(device)
    gy = torch.randn(x.shape, generator=gen).to(dtype).to(device)

    xt, gt = x.clone().requires_grad_(), gamma.clone().requires_grad_()
    y = gk.grow_norm_triton(xt, groups, gt, eps)
    gx, gg = torch.autograd.grad(y, [xt, gt], gy)
    assert (y[0, :2] == 0).all() and (y[1, 2:6, 0] == 0).all() and (y[2] == 0).all()
    assert torch.isfinite(gx).all() and torch.isfinite(gg).all()
    y_ref, gx_ref, gg_ref = _reference(x, groups, gamma, gy, eps)
    _assert_close(y, y_ref, TOL[dtype], "y")
    _assert_close(gx, gx_ref, TOL[dtype], "grad_x")
    _assert_close(gg, gg_ref, TOL[dtype], "grad_gamma")
    # where the clamp is active the gradient is gamma * gy / eps, nothing through the norm
    clamped = (gamma[6:, None, None] * gy[3, 6:].float() / eps).cpu().double()
    _assert_close(gx[3, 6:], clamped, TOL[dtype], "grad_x under the clamp")


def test_gradient_flags(gk, device):
    """Only what needs a gradient gets one; gamma in another float dtype gets its own back."""
    x, gamma, gy = _inputs(((2, 6, 3), (2, 4), True, torch.float32), device, seed=2)
    _, gx_ref, gg_ref = _reference(x, (2, 4), gamma, gy)

    xt = x.clone().requires_grad_()
    (gx,) = torch.autograd.grad(gk.grow_norm_triton(xt, (2, 4), gamma, EPS), [xt], gy)
    _assert_close(gx, gx_ref, 1e-5, "grad_x (gamma frozen)")

    g64 = gamma.double().requires_grad_()
    (gg,) = torch.autograd.grad(gk.grow_norm_triton(x, (2, 4), g64, EPS), [g64], gy)
    assert gg.dtype == torch.float64
    _assert_close(gg, gg_ref, 1e-5, "grad_gamma (x frozen)")

    gx2, gg2 = gk.grow_norm_backward(gy, x, gk.grow_norm_forward(x, (2, 4), gamma, EPS)[1], (2, 4), gamma,
                                     EPS, need_grad_gamma=False)
    assert gg2 is None
    _assert_close(gx2, gx_ref, 1e-5, "grad_x (launcher)")


def test_noncontiguous_input_and_empty_batch(gk, device):
    x = torch.randn(3, 2, 5, generator=torch.Generator().manual_seed(4)).to(device).transpose(1, 2)  # [3, 5, 2]
    y = gk.grow_norm_triton(x, (3, 2), None, EPS)
    _assert_close(y, grow_norm(x.cpu().double(), (3, 2), None, EPS), 1e-5, "y (non-contiguous x)")
    empty = torch.empty(0, 5, 2, device=device)
    assert gk.grow_norm_triton(empty, (3, 2)).shape == (0, 5, 2)


# ----------------------------------------------------------------------------------------------
# bad input: one-line ValueErrors, raised before any kernel is touched


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: (torch.randn(5), (5,), None, EPS), "rank >= 2"),
        (lambda: (torch.randn(2, 5), (2, 2), None, EPS), "sum to 4 but the input has 5 channels"),
        (lambda: (torch.randn(2, 5), (2, 3), torch.ones(4), EPS), r"gamma must have shape \(5,\)"),
        (lambda: (torch.randn(2, 5), (2, 3), torch.ones(5, 1), EPS), r"gamma must have shape \(5,\)"),
        (lambda: (torch.randn(2, 5), (2, 3), None, 0.0), "eps must be positive"),
        (lambda: (torch.randn(2, 5), (2, 3), None, -1e-6), "eps must be positive"),
        (lambda: (torch.randn(2, 5), (5, 0), None, EPS), "positive channel counts"),
        (lambda: (torch.randn(2, 5), (), None, EPS), "positive channel counts"),
        (lambda: (torch.randn(2, 5).double(), (5,), None, EPS), "float32, float16 or bfloat16"),
    ],
    ids=["rank1", "groups-sum", "gamma-len", "gamma-2d", "eps-zero", "eps-negative", "group-zero",
         "no-groups", "float64"],
)
def test_bad_input_raises_one_line_value_error(gk, make, match):
    x, groups, gamma, eps = make()
    with pytest.raises(ValueError, match=match) as info:
        gk.grow_norm_triton(x, groups, gamma, eps)
    assert "\n" not in str(info.value)


def test_cpu_tensor_without_interpreter_is_refused(gk):
    if gk.is_interpreted():
        pytest.skip("the kernels run on CPU tensors under the interpreter here")
    with pytest.raises(ValueError, match="need a CUDA tensor"):
        gk.grow_norm_triton(torch.randn(2, 5), (5,))


def test_block_config(gk):
    rows = gk.block_config((4096, 1024), 1, batch=256)
    assert rows.rows and rows.block_c == 2048 and rows.block_c * rows.block_s <= 4096
    assert rows.grid(256, 1) == (256 // rows.block_s, 1, 1)
    assert gk.block_config((3,), 1, batch=2).block_s == 2  # capped at next_pow2(N)
    spatial = gk.block_config((512, 512), 56 * 56)
    assert not spatial.rows and spatial.block_s == 64 and spatial.block_c * spatial.block_s == 4096
    assert spatial.grid(2, 3136) == (2 * 49, 1, 1)
    assert gk.block_config((7,), 9).block_s == 16
    assert gk.block_config((512, 512), 49, budget=2048).block_c * 64 <= 2048
    for cfg in (rows, spatial):
        assert 4 <= cfg.num_warps <= 8
    # whole groups: every group one chunk where the tile fits, else the chunked tile of that budget
    whole = gk.block_config((448, 64), 196, budget=8192, whole_groups=True)
    assert (whole.rows, whole.block_c, whole.block_s, whole.num_warps) == (False, 512, 16, 8)
    assert gk.block_config((4096, 2048), 1, batch=1024, budget=8192, whole_groups=True).block_c == 4096
    assert gk.block_config((40, 24), 9, budget=8192, whole_groups=True).block_s == 16  # capped at next_pow2(S)
    big = gk.block_config((1000,), 49, budget=8192, whole_groups=True)  # 1024 x 16 > 8192: chunked
    assert big == gk.block_config((1000,), 49, budget=8192)


# ----------------------------------------------------------------------------------------------
# ahead-of-time PTX for the TensorRT plugin (no GPU needed)


def _param_kinds(gk, ptx, name):
    kinds = []
    for decl in gk.ptx_entry_params(ptx, name):
        assert decl.startswith(".param"), decl
        kinds.append("ptr" if ".ptr" in decl and ".u64" in decl else "u32" if ".u32" in decl else decl)
    return kinds


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
@pytest.mark.parametrize("groups, spatial", [((4096, 1024), None), ((4096, 1024), 1), ((3,), 1), ((3,), 49)],
                         ids=["4096+1024-NCHW", "4096+1024-NC", "3-NC", "3-NCHW"])
def test_compile_ptx(gk, arch, dtype, groups, spatial):
    name, ptx, info = gk.compile_ptx(groups, EPS, dtype, True, arch, spatial=spatial)
    assert name == "grownorm_fwd_qdp_kernel"  # the default: the order TensorRT launches AOT plugin kernels in
    target = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"  # Triton 3.8 targets sm_90a for arch 90
    assert info["target"] == target and f".target {target}\n" in ptx
    assert f".entry {name}(" in ptx
    # X, GAMMA pointers, N and S int32, the Y pointer: exactly what TensorRT passes. Triton's two
    # hidden scratch pointers (unused) are dropped, and ptxas still accepts the module.
    assert _param_kinds(gk, ptx, name) == ["ptr", "ptr", "u32", "u32", "ptr"]
    assert info["params"] == ("X", "GAMMA", "N", "S", "Y") and info["hidden_params"] == 2
    assert info["global_scratch_size"] == 0 and info["profile_scratch_size"] == 0
    assert info["block"] == info["num_warps"] * 32 and 4 <= info["num_warps"] <= 8
    assert f".reqntid {info['block']}" in ptx
    assert isinstance(info["shared_mem"], int) and 0 <= info["shared_mem"] <= 48 * 1024
    assert info["rows"] == (spatial == 1)
    bc, bs = info["block_c"], info["block_s"]
    assert bc & (bc - 1) == 0 and bs & (bs - 1) == 0 and bc * bs <= 4096
    if spatial == 1:
        assert info["grid"](1000, 1) == (-(-1000 // bs), 1, 1) and "cdiv(N, BLOCK_S)" in info["grid_formula"]
    else:
        assert info["grid"](8, 49) == (8 * -(-49 // bs), 1, 1) and "N * cdiv(S, BLOCK_S)" in info["grid_formula"]
    assert info["cubin"][:4] == b"\x7fELF" and name.encode() in info["cubin"]  # ptxas assembled the trimmed PTX
    # Labelled with the oldest ISA ptxas accepts (sm_90a needs 8.0), so CUDA 12.0 drivers load it
    assert info["ptx_version"] == ("8.0" if arch >= 90 else "7.8") and f".version {info['ptx_version']}\n" in ptx
    assert info["triton_ptx_version"] >= info["ptx_version"]
    if spatial == 1 and groups == (4096, 1024):
        assert "ld.global.v4" in ptx  # [N, C]: contiguous along C, vectorised loads


def test_compile_ptx_options(gk):
    name, ptx, info = gk.compile_ptx((3, 5), 1e-5, "bf16", False, 80, block_c=8, block_s=32, num_warps=4)
    assert name == "grownorm_fwd_qdp_kernel" and info["params"] == ("X", "GAMMA", "N", "S", "Y")
    assert _param_kinds(gk, ptx, name) == ["ptr", "ptr", "u32", "u32", "ptr"]
    assert (info["block_c"], info["block_s"], info["num_warps"]) == (8, 32, 4)
    with pytest.raises(ValueError, match="power of two"):
        gk.compile_ptx((3,), block_s=48)
    with pytest.raises(ValueError, match="dtype"):
        gk.compile_ptx((3,), dtype="fp64")


def test_drop_unused_params_keeps_what_the_kernel_reads(gk):
    ptx = """.version 8.0
.target sm_80
.address_size 64
.visible .entry k(
\t.param .u64 .ptr .global .align 1 k_param_0,
\t.param .u32 k_param_1,
\t.param .u64 .ptr .global .align 1 k_param_2,
\t.param .u64 .ptr .global .align 1 k_param_3
)
{
\t.reg .b64 %rd<2>;
\t.reg .b32 %r<2>;
\tld.param.u64 %rd1, [k_param_0];
\tld.param.u32 %r1, [k_param_1];
\tld.param.u64 %rd1, [k_param_2];
\tret;
}
"""
    trimmed = gk.drop_unused_params(ptx, "k", 3)
    assert gk.ptx_entry_params(trimmed, "k") == gk.ptx_entry_params(ptx, "k")[:3]
    assert "k_param_3" not in trimmed and trimmed.endswith("\tret;\n}\n")
    assert gk.assemble_ptx(trimmed, 80)[:4] == b"\x7fELF"
    with pytest.raises(ValueError, match=r"k_param_2 .* is used by the kernel"):
        gk.drop_unused_params(ptx, "k", 2)
    with pytest.raises(ValueError, match="no .entry nope"):
        gk.drop_unused_params(ptx, "nope", 1)
    with pytest.raises(RuntimeError, match="ptxas rejected the PTX for sm_80"):
        gk.assemble_ptx(trimmed.replace("ret;", "bogus;"), 80)


def test_oldest_ptx_isa_keeps_what_ptxas_needs(gk):
    body = """.target {target}
.address_size 64
.visible .entry k(
\t.param .u64 .ptr .global .align 1 k_param_0
)
{{
\t.reg .b64 %rd<2>;
\t.reg .b32 %r<2>;
\tld.param.u64 %rd1, [k_param_0];
\t{load}
\tret;
}}
"""
    plain = ".version 8.8\n" + body.format(target="sm_80", load="ld.global.u32 %r1, [%rd1];")
    lowered, cubin = gk.oldest_ptx_isa(plain, 80)
    assert lowered.startswith(".version 7.8\n") and lowered[len(".version 7.8"):] == plain[len(".version 8.8"):]
    assert cubin[:4] == b"\x7fELF"
    assert gk.oldest_ptx_isa(plain.replace("sm_80", "sm_90a"), 90)[0].startswith(".version 8.0\n")  # sm_90a: 8.0+
    # an instruction of ISA 8.0 (cp.async.bulk.prefetch.L2) gets 8.0; one of ISA 8.3 keeps Triton's label
    newer = ".version 8.8\n" + body.format(target="sm_90", load="cp.async.bulk.prefetch.L2.global [%rd1], 128;")
    assert gk.oldest_ptx_isa(newer, 90)[0].startswith(".version 8.0\n")
    newest = ".version 8.3\n" + body.format(target="sm_90", load="fence.proxy.tensormap::generic.release.gpu;")
    assert gk.oldest_ptx_isa(newest, 90)[0] == newest
    old = ".version 7.0\n" + body.format(target="sm_80", load="ld.global.u32 %r1, [%rd1];")
    assert gk.oldest_ptx_isa(old, 80)[0] == old  # never relabelled upwards


@pytest.mark.parametrize("arch", [80, 90])
def test_pytorch_path_kernels_compile_for_gpus(gk, arch):
    """The CUDA training path cannot run here; check that its kernels compile for real targets."""
    for dtype, groups, spatial in (("fp32", (4096, 1024), 1), ("fp16", (3, 61), 49)):
        for kernel, budget in (("grownorm_fwd_kernel", 4096), ("grownorm_bwd_kernel", 2048)):
            cfg = gk.block_config(groups, spatial, 64, budget=budget)
            if kernel == "grownorm_fwd_kernel":
                pointers = {"X": f"*{dtype}", "GAMMA": "*fp32", "Y": f"*{dtype}", "RNORM": "*fp32"}
                flag = {"STORE_RNORM": True}
            else:
                pointers = {"X": f"*{dtype}", "GY": f"*{dtype}", "GAMMA": "*fp32", "RNORM": "*fp32",
                            "DX": f"*{dtype}", "DGAMMA_PART": "*fp32"}
                flag = {"NEED_DGAMMA": True}
            constexprs = {"GROUPS": groups, "C": sum(groups), "EPS": EPS, "HAS_GAMMA": True, **flag,
                          "ROWS": cfg.rows, "BLOCK_C": cfg.block_c, "BLOCK_S": cfg.block_s}
            compiled = gk._compile(kernel, {**pointers, "N": "i32", "S": "i32"}, constexprs, arch, cfg.num_warps)
            kinds = _param_kinds(gk, compiled.asm["ptx"], compiled.metadata.name)
            assert kinds == ["ptr"] * len(pointers) + ["u32", "u32", "ptr", "ptr"]


@pytest.mark.parametrize("shape, groups, spatial", [((5, 12), (4, 8), 1), ((2, 12, 3, 3), (4, 8), None),
                                                    ((2, 300, 7, 7), (200, 100), None)],
                         ids=["NC", "NCHW", "NCHW-chunked-or-whole"])
@pytest.mark.parametrize("tactic", [1, 2, 3, 4])
def test_trt_kernel_runs_with_its_launch_info(gk, device, shape, groups, spatial, tactic):
    """Launch the TensorRT-facing kernel of each tactic exactly as launch_info describes; check the numbers."""
    from surgeon_plugins.grownorm_trt import aot_kernel

    name, _, _, info = aot_kernel(groups, EPS, "fp32", (-1,) + shape[1:], tactic, 90)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(shape, generator=gen).to(device)
    gamma = (torch.rand(shape[1], generator=gen) + 0.5).to(device)
    y = torch.full_like(x, float("nan"))
    n, s = shape[0], x[0, 0].numel()
    tensors = {"X": x, "GAMMA": gamma, "Y": y, "N": n, "S": s}
    getattr(gk, name)[info["grid"](n, s)](
        *(tensors[p] for p in info["params"]),
        GROUPS=groups, C=sum(groups), EPS=EPS, HAS_GAMMA=True, ROWS=info["rows"],
        BLOCK_C=info["block_c"], BLOCK_S=info["block_s"], num_warps=info["num_warps"],
    )
    _assert_close(y, grow_norm(x.cpu().double(), groups, gamma.cpu().double(), EPS), 1e-5, "y")


@pytest.mark.parametrize("shape, groups", [((6, 300), (200, 100)), ((2, 40, 3, 5), (24, 16)),
                                           ((2, 300, 7, 7), (200, 100))])
def test_forward_and_backward_with_whole_group_tiles(gk, device, shape, groups):
    """The PyTorch path's kernels with an explicit (whole-group) tile configuration, against float64."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(shape, generator=gen).to(device)
    gamma = (torch.rand(shape[1], generator=gen) + 0.5).to(device)
    gy = torch.randn(shape, generator=gen).to(device)
    s = 1 if len(shape) == 2 else shape[2] * shape[3]
    fwd = gk.block_config(groups, s, shape[0], budget=8192, whole_groups=True)
    bwd = gk.block_config(groups, s, shape[0], budget=4096, whole_groups=True)
    assert fwd.block_c == bwd.block_c == (32 if groups == (24, 16) else 256)  # next_pow2 of the largest group
    if shape == (2, 300, 7, 7):  # where the default tiles are chunked: a different kernel is checked
        assert fwd != gk.block_config(groups, s, shape[0])
        assert bwd != gk.block_config(groups, s, shape[0], budget=2048)
    y, rnorm = gk.grow_norm_forward(x, groups, gamma, EPS, cfg=fwd)
    dx, dgamma = gk.grow_norm_backward(gy, x, rnorm, groups, gamma, EPS, cfg=bwd)
    xr, gr = x.cpu().double().requires_grad_(), gamma.cpu().double().requires_grad_()
    ref = grow_norm(xr, groups, gr, EPS)
    ref_dx, ref_dg = torch.autograd.grad(ref, (xr, gr), gy.cpu().double())
    _assert_close(y, ref.detach(), 1e-5, "y")
    _assert_close(dx, ref_dx, 1e-4, "dx")
    _assert_close(dgamma, ref_dg, 1e-4, "dgamma")
    with pytest.raises(ValueError, match=r"\[N, C\] tile layout needs S == 1"):
        gk.grow_norm_forward(torch.randn(2, 40, 3, 5, device=device), (24, 16),
                             cfg=gk.block_config((24, 16), 1, budget=8192, whole_groups=True))


@pytest.mark.parametrize("shape, groups", [((6, 3000), (2000, 1000)), ((2, 40, 3, 5), (24, 16))])
def test_forward_into_writes_the_callers_output(gk, device, shape, groups):
    """TensorRT's JIT path writes into the buffer it is given, with any tile configuration."""
    x = torch.randn(shape, device=device)
    gamma = torch.rand(shape[1], device=device) + 0.5
    want, _ = gk.grow_norm_forward(x, groups, gamma, EPS)
    s = 1 if len(shape) == 2 else shape[2] * shape[3]
    for budget, whole in ((4096, False), (2048, False), (8192, False), (8192, True)):
        y = torch.full_like(x, float("nan"))
        gk.forward_into(x, y, groups, gamma, EPS, gk.block_config(groups, s, shape[0], budget=budget, whole_groups=whole))
        torch.testing.assert_close(y, want, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="same shape and dtype"):
        gk.forward_into(x, torch.empty_like(x, dtype=torch.float16), groups, gamma, EPS)


@pytest.mark.gpu
def test_grownorm_module_uses_the_kernel_on_cuda(gk):
    """On CUDA, GrowNorm modules run the fused kernel (forward and backward) unless told not to."""
    from surgeon.grow import grownorm as gn

    module = gn.GrowNorm((48, 16), eps=EPS).cuda()
    with torch.no_grad():
        module.gamma.uniform_(0.5, 3.0)
    x = torch.randn(8, 64, 7, 7, device="cuda", requires_grad=True)
    assert gn.fused_kernel() is gk.grow_norm_triton or gn.fused_kernel().__module__ == gk.__name__
    y = module(x)
    y.backward(torch.ones_like(y))
    ref_x = x.detach().double().requires_grad_()
    ref = gn.grow_norm(ref_x, (48, 16), module.gamma.detach().double(), EPS)
    ref.backward(torch.ones_like(ref))
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad.double(), ref_x.grad, rtol=1e-4, atol=1e-6)
    gn.use_fused_kernel(False)
    try:
        assert gn.fused_kernel() is None
        torch.testing.assert_close(module(x), y)
    finally:
        gn.use_fused_kernel(True)


def _gpu_check_script():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("_gpu_check", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_gpu_check_timing_part_runs_its_variants(gk, device, monkeypatch):
    """gpu_check's timing of one case, here: every variant runs once through the same code (the
    kernels under the interpreter), a stand-in returns one time per variant in place of CUDA events,
    torch.compile is the identity, and the engine's kernel cannot load (no CUDA driver) -- so the
    row it builds says which variants were timed, which were left out and why, and the ratios."""
    script = _gpu_check_script()
    ran = []

    def fake_interleaved(fns, rounds, iters):
        out = {}
        for i, (name, fn) in enumerate(fns.items()):
            fn()  # runs the variant's code (rotation, kernels, autograd)
            ran.append(name)
            out[name] = 1e-3 * (i + 1)
        return out

    monkeypatch.setattr(script, "interleaved", fake_interleaved)
    monkeypatch.setattr(script.torch, "compile", lambda fn, **kw: fn)
    groups = (200, 100)
    x = torch.randn(2, 300, 7, 7, device=device)
    gamma = torch.rand(300, device=device) + 0.5
    forward, both, notes = script._time_case([x, x.clone()], gamma, groups, rounds=1, iters=1)
    assert list(forward) == ["fused", "eager", "compiled", "fused_whole"]
    assert list(both) == ["fused", "eager", "compiled", "direct", "direct_whole"]
    assert ran == list(forward) + list(both)
    assert sorted(notes["rejected"]) == ["aot1", "aot2", "aot3", "aot4"]  # no CUDA driver here: named, not fatal
    assert notes["configs"]["whole_fwd"]["block_c"] == 256 and notes["configs"]["default_fwd"]["block_c"] == 64
    row = script.case_row(x, groups, forward, both, notes, copy_bw=1e9)
    assert row["default_over_whole_forward"] == forward["fused"] / forward["fused_whole"] == 0.25
    assert row["default_over_whole_train"] == both["direct"] / both["direct_whole"] == 0.8
    assert row["eager_over_fused"] == 2.0 and "aot_best_tactic" not in row
    md = script.markdown({"device": "cpu", "torch": "-", "triton": "-", "copy_bandwidth_gbs": 1.0, "timing": [row]})
    assert "| float32 | [2, 300, 7, 7] |" in md and "| 0.25, 0.80 |" in md


def test_gpu_check_script_correctness_part_runs(gk, device, tmp_path):
    """benchmarks/gpu_check.py's correctness part on this machine's device (the interpreter here), on
    small cases: the script that runs on a GPU machine is exercised before it gets there."""
    script = _gpu_check_script()
    rows = script.check_correctness(device.type, cases=[((3, 10, 2, 3), (6, 4)), ((4, 70), (69, 1))])
    assert len(rows) == 4 and all(r["ok"] for r in rows), rows

    # Timed inputs rotate through copies that together exceed 3x the L2 cache (here: 3 x 10 kB of 4 kB tensors).
    x = torch.randn(10, 100)
    xs = script.input_sets(x, l2_bytes=10_000)
    assert len(xs) == 8 and xs[0] is x and all(torch.equal(c, x) for c in xs)
    assert len({c.data_ptr() for c in xs}) == 8
    take = script._rotating(xs)
    assert [id(take()) for _ in range(9)] == [id(c) for c in xs[1:] + xs[:2]]
    assert len(script.input_sets(torch.randn(1000, 1000), l2_bytes=10_000)) == 1

    # The report of a run whose training part failed still says what passed, and which part failed.
    out = tmp_path / "gpu-results"
    out.mkdir()
    report = {"device": "cpu", "torch": torch.__version__, "triton": "-", "copy_bandwidth_gbs": 1.0, "checks": rows,
              "errors": {"training": "Traceback (most recent call last):\n  ...\nRuntimeError: out of memory\n"}}
    script._write(out, report)
    md = (out / "gpu_check.md").read_text()
    assert "forward and backward: 4/4 cases within tolerance" in md
    assert "**training failed**: RuntimeError: out of memory" in md and "Training step" not in md
    assert json.loads((out / "gpu_check.json").read_text())["checks"] == rows
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.json", "gpu_check.md"]  # no temp files left


# ----------------------------------------------------------------------------------------------
# axis -1 ([N, ..., C]): the module runs the [N, C] kernel on x viewed as [-1, C]


def _moved_reference(x, groups, gamma, gy, eps=EPS):
    """float64 composite over the last axis: forward and autograd backward."""
    xd = x.detach().cpu().double().requires_grad_()
    gd = None if gamma is None else gamma.detach().cpu().double().requires_grad_()
    y = grow_norm(xd, groups, gd, eps, axis=-1)
    grads = torch.autograd.grad(y, [xd] if gd is None else [xd, gd], gy.cpu().double())
    return y.detach(), grads[0], (grads[1] if gd is not None else None)


@pytest.mark.parametrize("shape, groups", [((3, 5, 12), (8, 4)), ((2, 3, 2, 130), (65, 65)), ((4, 7), (2, 5)),
                                           ((2, 4, 6144), (4096, 2048))],
                         ids=["NTC", "NHWC", "NC", "NTC-chunked"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_last_axis_through_the_rows_kernel(gk, device, monkeypatch, shape, groups, dtype):
    """GrowNorm(axis=-1) on the fused path (forced here: the interpreter runs CPU tensors), forward
    and backward against float64, and the routing helper views x as [-1, C] for the [N, C] kernel."""
    from surgeon.grow import grownorm as gn

    gen = torch.Generator().manual_seed(11)
    x = torch.randn(shape, generator=gen).to(dtype).to(device)
    x[0, ..., : groups[0]] = 0  # an all-zero group in some rows
    gy = torch.randn(shape, generator=gen).to(dtype).to(device)
    eps = EPS if dtype == torch.float32 else 1e-2  # under the clamp grad_x = gamma * gy / eps: 1e6 overflows fp16
    module = gn.GrowNorm(groups, eps=eps, axis=-1).to(device)
    with torch.no_grad():
        module.gamma.uniform_(0.5, 3.0, generator=gen)
    calls = []

    def kernel(rows, *args):
        calls.append(tuple(rows.shape))
        return gk.grow_norm_triton(rows, *args)

    monkeypatch.setattr(gn, "_runs_fused", lambda t: True)
    monkeypatch.setattr(gn, "fused_kernel", lambda: kernel)
    xt = x.clone().requires_grad_()
    y = module(xt)
    gx, gg = torch.autograd.grad(y, [xt, module.gamma], gy)
    assert calls == [(x.numel() // shape[-1], shape[-1])]  # one launch of the [N, C] layout
    assert y.shape == x.shape and y.dtype == dtype and gx.dtype == dtype
    y_ref, gx_ref, gg_ref = _moved_reference(x, groups, module.gamma, gy, eps)
    tol = TOL[dtype]
    _assert_close(y, y_ref, tol, "y")
    moved = torch.movedim(x, -1, 1)
    _assert_close(gx, gx_ref, tol, "grad_x", scale=_grad_x_scale(moved, groups, module.gamma, torch.movedim(gy, -1, 1), eps))
    _assert_close(gg, gg_ref, tol, "grad_gamma")


def test_last_axis_noncontiguous_and_empty(gk, device):
    from surgeon.grow.grownorm import fused_grow_norm

    x = torch.randn(6, 3, 4, generator=torch.Generator().manual_seed(12)).to(device).transpose(0, 1)  # [3, 6, 4]
    gamma = torch.rand(4, device=device) + 0.5
    y = fused_grow_norm(gk.grow_norm_triton, x, (1, 3), gamma, EPS, axis=-1)
    _assert_close(y, grow_norm(x.cpu().double(), (1, 3), gamma.cpu().double(), EPS, axis=-1), 1e-5, "y")
    assert fused_grow_norm(gk.grow_norm_triton, torch.empty(0, 5, 4, device=device), (1, 3), None, EPS, -1).shape == (0, 5, 4)
    with pytest.raises(ValueError, match="axis must be 1"):
        fused_grow_norm(gk.grow_norm_triton, x, (1, 3), None, EPS, axis=2)
