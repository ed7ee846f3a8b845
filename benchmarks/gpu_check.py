"""GPU check of the fused GrowNorm kernel, in one call (a few minutes on one CUDA GPU):

1. correctness on CUDA against a float64 reference (the composite in float64), forward and backward,
   fp32 and fp16, odd channel counts, several group splits, an all-zero group;
2. forward and forward+backward time of the fused kernel vs the PyTorch eager composite vs
   ``torch.compile`` of the composite, A/B interleaved, medians, cycling through copies of the input
   that together exceed 3× the L2 cache; achieved bandwidth as a fraction of
   the device's measured copy bandwidth (targets: ≥ 80 % of copy bandwidth, ≥ 3× eager, not slower
   than torch.compile);
   Also the PyTorch path with whole-group tiles against its default chunked tiles (forward, and
   forward + backward called directly), to choose that default;
3. one training step of a grown ResNet50 (``layer4.2.conv1`` +128) with and without the kernel;
4. the PTX a TensorRT engine embeds (``compile_ptx``, Triton's scratch parameters dropped), loaded
   by the CUDA driver and launched with exactly the arguments TensorRT passes
   (``surgeon_plugins.aot_launch``): correctness on the cases of 1, and its forward time beside the
   fused kernel's in 2 — the engine's kernel, checked without TensorRT.

    python benchmarks/gpu_check.py --out gpu-results/     # writes gpu_check.json and gpu_check.md

Each part that fails is recorded (with its traceback) and the others still run; the JSON is
rewritten after every part, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

from surgeon.grow.grownorm import grow_norm, use_fused_kernel

EPS = 1e-6
CHECK_CASES = [  # (shape, groups)
    ((4, 1000, 7, 7), (600, 400)),
    ((8, 6144), (4096, 1024, 1024)),
    ((3, 3, 5, 5), (1, 2)),
    ((2, 1, 4, 4), (1,)),
    ((16, 512, 14, 14), (448, 64)),
    ((5, 1000), (999, 1)),
]
TIMING_CASES = [((256, 512, 14, 14), (448, 64)), ((64, 256, 56, 56), (192, 64)), ((1024, 6144), (4096, 2048))]
TOLERANCE = {torch.float32: (1e-5, 1e-4), torch.float16: (2e-3, 5e-3)}  # (forward, backward), relative to max |ref|


def _kernel():
    from surgeon_plugins.grownorm_kernel import grow_norm_triton

    return grow_norm_triton


def _aot_kernel(groups, shape, dtype: torch.dtype, tactic: int | None = None):
    """The engine's kernel for this case and tactic (default: the plugin's), loaded through the CUDA driver."""
    from surgeon_plugins.aot_launch import AotKernel
    from surgeon_plugins.grownorm_trt import DEFAULT_TACTIC, aot_kernel

    major, minor = torch.cuda.get_device_capability()
    label = {torch.float32: "fp32", torch.float16: "fp16"}[dtype]
    tactic = DEFAULT_TACTIC if tactic is None else tactic
    name, ptx, _, info = aot_kernel(groups, EPS, label, (-1,) + tuple(shape[1:]), tactic, major * 10 + minor)
    return AotKernel.load(name, ptx, info)


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.detach(), ref.detach()
    return float((a.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def check_correctness(device: str = "cuda", cases=CHECK_CASES) -> list[dict]:
    """``device="cpu"`` runs the same checks under Triton's interpreter (a smoke test of this script)."""
    fused = _kernel()
    rows = []
    g = torch.Generator(device=device).manual_seed(0)
    for dtype in (torch.float32, torch.float16):
        for shape, groups in cases:
            x = torch.randn(shape, device=device, generator=g).to(dtype)
            if dtype == torch.float32:
                # An all-zero group (after a ReLU). Not in fp16: its gradient is γ·dy/eps ≈ 1e6 at
                # eps = 1e-6, beyond fp16's range in the composite and the kernel alike.
                x[0, : groups[0]] = 0
            gamma = torch.rand(shape[1], device=device, generator=g) * 3 + 0.5
            gy = torch.randn(shape, device=device, generator=g).to(dtype)
            xr, gr = x.double().requires_grad_(), gamma.double().requires_grad_()
            ref = grow_norm(xr, groups, gr, EPS)
            ref_dx, ref_dg = torch.autograd.grad(ref, (xr, gr), gy.double())
            xk, gk = x.clone().requires_grad_(), gamma.clone().requires_grad_()
            y = fused(xk, groups, gk, EPS)
            dx, dg = torch.autograd.grad(y, (xk, gk), gy)
            fwd_tol, bwd_tol = TOLERANCE[dtype]
            row = {"dtype": str(dtype).split(".")[-1], "shape": list(shape), "groups": list(groups),
                   "forward_rel_err": _rel(y, ref.detach()), "grad_x_rel_err": _rel(dx, ref_dx),
                   "grad_gamma_rel_err": _rel(dg, ref_dg), "finite": bool(torch.isfinite(dx).all())}
            row["ok"] = (row["forward_rel_err"] <= fwd_tol and row["grad_x_rel_err"] <= bwd_tol
                         and row["grad_gamma_rel_err"] <= bwd_tol and row["finite"] and y.dtype == dtype)
            rows.append(row)
            print(f"check {row['dtype']} {shape} {groups}: fwd {row['forward_rel_err']:.1e} dx {row['grad_x_rel_err']:.1e} "
                  f"dgamma {row['grad_gamma_rel_err']:.1e} {'ok' if row['ok'] else 'FAIL'}", flush=True)
    return rows


def check_aot(cases=CHECK_CASES) -> list[dict]:
    """The engine's PTX launched as TensorRT launches it, against the float64 composite (forward)."""
    rows = []
    g = torch.Generator(device="cuda").manual_seed(0)
    for dtype in (torch.float32, torch.float16):
        for shape, groups in cases:
            x = torch.randn(shape, device="cuda", generator=g).to(dtype)
            x[0, : groups[0]] = 0
            gamma = torch.rand(shape[1], device="cuda", generator=g) * 3 + 0.5
            kernel = _aot_kernel(groups, shape, dtype)
            y = kernel(x, gamma, torch.full_like(x, float("nan")))
            torch.cuda.synchronize()
            kernel.unload()
            ref = grow_norm(x.double(), groups, gamma.double(), EPS)
            err = _rel(y, ref)
            ok = err <= TOLERANCE[dtype][0] and bool(torch.isfinite(y).all())
            rows.append({"dtype": str(dtype).split(".")[-1], "shape": list(shape), "groups": list(groups),
                         "forward_rel_err": err, "ok": ok})
            print(f"aot {rows[-1]['dtype']} {shape} {groups}: fwd {err:.1e} {'ok' if ok else 'FAIL'}", flush=True)
    return rows


_QUEUE_CYCLES = 60_000_000  # ~30 ms of GPU clock: longer than the host needs to queue one timed batch


def _cuda_times(fn, iters: int) -> list[float]:
    """Seconds per call on the GPU: the GPU first sleeps while the host queues every call between
    event pairs, so the times hold the kernels alone, not the host's launch overhead."""
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    torch.cuda._sleep(_QUEUE_CYCLES)
    for start, end in zip(starts, ends):
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) / 1e3 for start, end in zip(starts, ends)]


def interleaved(fns: dict, rounds: int, iters: int) -> dict[str, float]:
    """Median seconds per call of each function, A/B/C interleaved over ``rounds``."""
    for fn in fns.values():  # warm-up (and compilation)
        for _ in range(3):
            fn()
    torch.cuda.synchronize()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name] += _cuda_times(fn, iters)
    return {k: statistics.median(v) for k, v in times.items()}


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """Bytes per second of a device-to-device copy (read + write counted)."""
    a = torch.empty(nbytes // 4, device="cuda")
    b = torch.empty_like(a)
    t = interleaved({"copy": lambda: b.copy_(a)}, rounds=3, iters=10)["copy"]
    return 2 * nbytes / t


def _rotating(tensors: list[torch.Tensor]):
    """A callable returning the next tensor of ``tensors`` each call (round robin)."""
    index = [0]

    def take() -> torch.Tensor:
        index[0] = (index[0] + 1) % len(tensors)
        return tensors[index[0]]

    return take


def input_sets(x: torch.Tensor, l2_bytes: int) -> list[torch.Tensor]:
    """``x`` and copies of it, enough that cycling through them never finds one in the L2 cache."""
    count = max(1, -(-3 * l2_bytes // (x.numel() * x.element_size())))
    return [x] + [x.clone() for _ in range(count - 1)]


def _agrees(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Same values up to the dtype's tolerance (max-norm, relative to max |want|)."""
    tol = TOLERANCE[want.dtype][1]
    return bool(torch.isfinite(got).all()) and _rel(got, want.double()) <= tol


def _time_case(xs: list[torch.Tensor], gamma: torch.Tensor, groups: tuple[int, ...], rounds: int,
               iters: int) -> tuple[dict, dict, dict]:
    """Median seconds of forward (fused kernel, eager composite, compiled composite, the PyTorch
    path with whole-group tiles, the engine's kernel for each tactic) and of forward+backward (fused,
    eager, compiled, and the kernels called directly with default and with whole-group tiles); each
    call takes the next of ``xs`` (copies of one input, so the timings measure device memory, not
    the L2 cache).  Every variant's output is checked against the fused kernel's before it is timed;
    one that disagrees or fails is left out and named in the returned notes."""
    import surgeon_plugins.grownorm_kernel as gk
    from surgeon_plugins.grownorm_trt import TACTICS

    torch._dynamo.reset()  # a fresh compile per case: dynamo's recompile limit would fall back to eager
    fused = _kernel()
    compiled = torch.compile(grow_norm, dynamic=False)
    n, s = xs[0].shape[0], xs[0][0, 0].numel()
    configs = {"default_fwd": gk.block_config(groups, s, n), "default_bwd": gk.block_config(groups, s, n, budget=2048),
               "whole_fwd": gk.block_config(groups, s, n, budget=8192, whole_groups=True),
               "whole_bwd": gk.block_config(groups, s, n, budget=8192, whole_groups=True)}
    notes: dict = {"configs": {k: vars(v) for k, v in configs.items()}, "rejected": {}}
    want = fused(xs[0], groups, gamma, EPS)
    aot, out = {}, torch.empty_like(xs[0])

    def admit(name: str, check, fn) -> bool:
        try:
            ok = _agrees(check(), want)
        except Exception as exc:  # noqa: BLE001 (recorded; the other variants are still timed)
            notes["rejected"][name] = f"{type(exc).__name__}: {exc}"[:300]
            return False
        if not ok:
            notes["rejected"][name] = "output disagrees with the fused kernel's"
            return False
        candidates[name] = fn
        return True

    candidates: dict = {}
    for name, fn in (("fused", fused), ("eager", grow_norm), ("compiled", compiled)):
        candidates[name] = functools.partial(lambda f, t: f(t(), groups, gamma, EPS), fn, _rotating(xs))
    admit("fused_whole", lambda: gk.grow_norm_forward(xs[0], groups, gamma, EPS, cfg=configs["whole_fwd"])[0],
          functools.partial(lambda t: gk.grow_norm_forward(t(), groups, gamma, EPS, cfg=configs["whole_fwd"]),
                            _rotating(xs)))
    for tactic in TACTICS:  # every tactic TensorRT times when it builds the engine; it keeps the fastest
        try:
            aot[tactic] = _aot_kernel(groups, xs[0].shape, xs[0].dtype, tactic)
        except Exception as exc:  # noqa: BLE001 (recorded)
            notes["rejected"][f"aot{tactic}"] = f"{type(exc).__name__}: {exc}"[:300]
            continue
        out.fill_(float("nan"))
        admit(f"aot{tactic}", functools.partial(lambda k: k(xs[0], gamma, out), aot[tactic]),
              functools.partial(lambda k, t: k(t(), gamma, out), aot[tactic], _rotating(xs)))
    forward = interleaved(candidates, rounds, iters)
    for kernel in aot.values():
        kernel.unload()

    xgs = [x.clone().requires_grad_() for x in xs]
    gys = [torch.randn_like(xs[0]) for _ in xs]
    gg = gamma.clone().requires_grad_()

    def train(fn):
        take_x, take_gy = _rotating(xgs), _rotating(gys)

        def step():
            xg = take_x()
            return torch.autograd.grad(fn(xg, groups, gg, EPS), (xg, gg), take_gy())

        return step

    def direct(fwd_cfg, bwd_cfg):  # the kernels without autograd
        take_x, take_gy = _rotating(xs), _rotating(gys)

        def step():
            x = take_x()
            _, rnorm = gk.grow_norm_forward(x, groups, gamma, EPS, cfg=fwd_cfg)
            return gk.grow_norm_backward(take_gy(), x, rnorm, groups, gamma, EPS, cfg=bwd_cfg)

        return step

    candidates = {"fused": train(fused), "eager": train(grow_norm), "compiled": train(compiled)}
    want = gk.grow_norm_backward(gys[0], xs[0], gk.grow_norm_forward(xs[0], groups, gamma, EPS)[1], groups, gamma, EPS)[0]

    def first_dx(fwd_cfg, bwd_cfg):
        _, rnorm = gk.grow_norm_forward(xs[0], groups, gamma, EPS, cfg=fwd_cfg)
        return gk.grow_norm_backward(gys[0], xs[0], rnorm, groups, gamma, EPS, cfg=bwd_cfg)[0]

    admit("direct", lambda: first_dx(configs["default_fwd"], configs["default_bwd"]), direct(None, None))
    admit("direct_whole", lambda: first_dx(configs["whole_fwd"], configs["whole_bwd"]),
          direct(configs["whole_fwd"], configs["whole_bwd"]))
    both = interleaved(candidates, rounds, iters)
    return forward, both, notes


def case_row(x: torch.Tensor, groups, forward: dict, both: dict, notes: dict, copy_bw: float) -> dict:
    """One row of the timing table from ``_time_case``'s medians (``x``: the case's input)."""
    moved = 2 * x.numel() * x.element_size()  # x read once, y written once: the floor
    row = {"dtype": str(x.dtype).split(".")[-1], "shape": list(x.shape), "groups": list(groups),
           "forward_s": forward, "forward_backward_s": both, **notes,
           "fused_bandwidth_fraction": moved / forward["fused"] / copy_bw,
           "eager_over_fused": forward["eager"] / forward["fused"],
           "compiled_over_fused": forward["compiled"] / forward["fused"],
           "train_eager_over_fused": both["eager"] / both["fused"],
           "train_compiled_over_fused": both["compiled"] / both["fused"]}
    whole = triton.next_power_of_2(max(groups))  # BLOCK_C of a whole-group tile
    if "fused_whole" in forward and notes["configs"]["whole_fwd"]["block_c"] >= whole:
        row["default_over_whole_forward"] = forward["fused"] / forward["fused_whole"]
    if {"direct", "direct_whole"} <= both.keys() and notes["configs"]["whole_bwd"]["block_c"] >= whole:
        row["default_over_whole_train"] = both["direct"] / both["direct_whole"]
    aot = {k: v for k, v in forward.items() if k.startswith("aot")}
    if aot:
        best = min(aot, key=aot.get)
        row["aot_best_tactic"] = int(best[3:])
        row["aot_bandwidth_fraction"] = moved / aot[best] / copy_bw
    return row


def time_kernels(copy_bw: float, rounds: int, iters: int, on_row=None) -> list[dict]:
    """The timing table; ``on_row(row)`` is called after each case (gpu_check saves the report there)."""
    rows = []
    for dtype in (torch.float32, torch.float16):
        for shape, groups in TIMING_CASES:
            x = torch.randn(shape, device="cuda", dtype=dtype)
            gamma = torch.rand(shape[1], device="cuda") + 0.5
            xs = input_sets(x, torch.cuda.get_device_properties(0).L2_cache_size)
            forward, both, notes = _time_case(xs, gamma, groups, rounds, iters)
            row = case_row(x, groups, forward, both, notes, copy_bw)
            row["input_sets"] = len(xs)
            rows.append(row)
            if on_row is not None:
                on_row(row)
            print(f"time {row['dtype']} {shape}: fused {forward['fused'] * 1e6:.1f} us "
                  f"({row['fused_bandwidth_fraction']:.0%} of copy bw), eager/fused {row['eager_over_fused']:.2f}, "
                  f"compiled/fused {row['compiled_over_fused']:.2f}; fwd+bwd eager/fused {row['train_eager_over_fused']:.2f}, "
                  f"compiled/fused {row['train_compiled_over_fused']:.2f}; rejected {sorted(notes['rejected']) or 'none'}",
                  flush=True)
    return rows


def training_step(rounds: int, batch: int) -> dict:
    """A grown ResNet50's SGD step with the fused kernel and with the composite, interleaved."""
    from surgeon.grow.analysis import trace
    from surgeon.grow.ops import GrowthState, apply_steps
    from surgeon.grow.recipe import GrowStep, HeadStep
    from surgeon.zoo import build_architecture

    torch.manual_seed(0)
    gm = trace(build_architecture("torchvision:resnet50"))
    apply_steps(gm, [HeadStep(100), GrowStep("wide", "layer4.2.conv1", 128, gamma_init=10.0)], GrowthState(224))
    model = gm.cuda().train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x = torch.randn(batch, 3, 224, 224, device="cuda")
    y = torch.randint(0, 100, (batch,), device="cuda")

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    def with_kernel(enabled: bool):
        def run():
            use_fused_kernel(enabled)
            step()
        return run

    times = interleaved({"fused": with_kernel(True), "composite": with_kernel(False)}, rounds, iters=5)
    use_fused_kernel(True)
    result = {"model": "resnet50 layer4.2.conv1 +128", "batch": batch, "step_s": times,
              "composite_over_fused": times["composite"] / times["fused"]}
    print(f"train step resnet50 (batch {batch}): fused {times['fused'] * 1e3:.1f} ms, composite "
          f"{times['composite'] * 1e3:.1f} ms, ratio {result['composite_over_fused']:.3f}", flush=True)
    return result


def markdown(report: dict) -> str:
    lines = [(f"GPU check on {report['device']} (torch {report['torch']}, triton {report['triton']}); "
              f"copy bandwidth {report['copy_bandwidth_gbs']:.0f} GB/s"), "",
             ("| dtype | shape | fused fwd | % copy bw | engine kernel % copy bw | eager ÷ fused | compile ÷ fused "
              "| fwd+bwd eager ÷ fused | fwd+bwd compile ÷ fused | chunked ÷ whole-group (fwd, fwd+bwd) |"),
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report.get("timing", []):
        aot = (f"{r['aot_bandwidth_fraction']:.0%} (tactic {r['aot_best_tactic']})" if "aot_bandwidth_fraction" in r
               else "—")
        whole = ", ".join(f"{r[k]:.2f}" if k in r else "—"
                          for k in ("default_over_whole_forward", "default_over_whole_train"))
        lines.append(f"| {r['dtype']} | {r['shape']} | {r['forward_s']['fused'] * 1e6:.1f} µs | "
                     f"{r['fused_bandwidth_fraction']:.0%} | {aot} | {r['eager_over_fused']:.2f} | "
                     f"{r['compiled_over_fused']:.2f} | {r['train_eager_over_fused']:.2f} | {r['train_compiled_over_fused']:.2f} "
                     f"| {whole} |")
    if "training" in report:
        t = report["training"]
        lines += ["", f"Training step, {t['model']}, batch {t['batch']}: composite ÷ fused = {t['composite_over_fused']:.3f}"]
    for key, label in (("checks", "Fused kernel (autograd op), forward and backward"),
                       ("aot_checks", "Engine kernel (AOT PTX, TensorRT's launch), forward")):
        if key in report:
            lines += ["", f"{label}: {sum(r['ok'] for r in report[key])}/{len(report[key])} cases within tolerance"]
    for key, error in report.get("errors", {}).items():
        lines += ["", f"**{key} failed**: {error.strip().splitlines()[-1]}"]
    return "\n".join(lines) + "\n"


def _write(out: Path, report: dict) -> None:
    """gpu_check.json and gpu_check.md, each replaced atomically."""
    for name, text in (("gpu_check.json", json.dumps(report, indent=2)), ("gpu_check.md", markdown(report))):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out / name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="gpu-results")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--batch", type=int, default=64, help="ResNet50 training batch")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_check needs a CUDA GPU")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    report: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                    "python": platform.python_version(), "copy_bandwidth_gbs": copy_bandwidth() / 1e9, "errors": {}}
    # the longest part (a torch.compile per case) last: a run cut short keeps the rest
    parts = [("checks", check_correctness), ("aot_checks", check_aot),
             ("training", lambda: training_step(args.rounds, args.batch)),
             ("timing", lambda: time_kernels(report["copy_bandwidth_gbs"] * 1e9, args.rounds, args.iters,
                                             on_row=lambda row: (report.setdefault("timing", []).append(row),
                                                                 _write(out, report))))]
    for key, part in parts:
        try:
            result = part()
            if key != "timing":  # timing rows are added (and saved) one by one as they come
                report[key] = result
        except Exception:  # noqa: BLE001 (recorded; the other parts still run)
            report["errors"][key] = traceback.format_exc()
            print(f"{key} failed:\n{report['errors'][key]}", flush=True)
        report["wall_s"] = time.time() - t0
        _write(out, report)
    print(markdown(report))
    failed = [r for key in ("checks", "aot_checks") for r in report.get(key, []) if not r["ok"]]
    if failed or report["errors"]:
        raise SystemExit(f"{len(failed)} correctness cases out of tolerance, {len(report['errors'])} parts failed "
                         "(see gpu_check.json)")


if __name__ == "__main__":
    main()
