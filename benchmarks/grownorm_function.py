"""GrowNorm's ONNX function in ONNX Runtime CPU: this tree's body against the body of another git
revision (A/B interleaved A B B A, medians, ratio), on conv features, [N, C] features and tokens.

    python benchmarks/grownorm_function.py --vs 0efffa8 --rounds 15

Each body is first checked against a float64 reference (relative error <= 1e-6). A revision whose
function cannot express a case (before ``axis`` existed: axis -1) is timed on the others only.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

from surgeon.export import grownorm_op

ROOT = Path(__file__).resolve().parents[1]
CASES = [("conv [8, 320, 14, 14], axis 1", (8, 320, 14, 14), [256, 64], 1),
         ("features [8, 4096], axis 1", (8, 4096), [3072, 1024], 1),
         ("tokens [1, 197, 3840], axis -1", (1, 197, 3840), [3072, 768], -1),
         ("tokens [8, 197, 3840], axis -1", (8, 197, 3840), [3072, 768], -1)]


def function_at(rev: str):
    source = subprocess.run(["git", "show", f"{rev}:surgeon/export/grownorm_op.py"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "grownorm_op_rev.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("grownorm_op_rev", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module.grownorm_function()


def model(fn, shape, groups, axis):
    attrs = dict(groups=groups, eps=1e-6, plugin_namespace="surgeon", plugin_version="1")
    if axis != 1:
        attrs["axis"] = axis
    gamma = helper.make_tensor("g", TensorProto.FLOAT, [sum(groups)], np.linspace(0.5, 2, sum(groups)).astype(np.float32))
    graph = helper.make_graph([helper.make_node("GrowNorm", ["x", "g"], ["y"], domain="surgeon", **attrs)], "m",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [gamma])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("surgeon", 1)],
                             functions=[fn])


def reference(x, groups, axis):
    xs = np.moveaxis(x.astype(np.float64), axis, -1)
    parts, start = [], 0
    for size in groups:
        p = xs[..., start:start + size]
        parts.append(p / np.maximum(np.sqrt((p ** 2).sum(-1, keepdims=True)), 1e-6))
        start += size
    return np.moveaxis(np.concatenate(parts, -1) * np.linspace(0.5, 2, sum(groups)), -1, axis)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vs", default="HEAD~1", help="git revision whose function body is B")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    bodies = {"this tree": grownorm_op.grownorm_function(), args.vs: function_at(args.vs)}
    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    so.log_severity_level = 3
    rng = np.random.default_rng(0)
    print(f"| case | this tree (ms) | {args.vs} (ms) | this ÷ {args.vs} |\n|---|---|---|---|")
    for name, shape, groups, axis in CASES:
        x = rng.standard_normal(shape).astype(np.float32)
        sessions = {}
        for label, fn in bodies.items():
            try:
                s = ort.InferenceSession(model(fn, list(shape), groups, axis).SerializeToString(), so,
                                         providers=["CPUExecutionProvider"])
                y = s.run(None, {"x": x})[0]
            except Exception:  # a body from before this case existed
                continue
            ref = reference(x, groups, axis)
            err = float(np.abs(y - ref).max() / np.abs(ref).max())
            if err > 1e-6:
                raise SystemExit(f"{label} is wrong on {name}: relative error {err:.2e}")
            sessions[label] = s
        times: dict[str, list[float]] = {k: [] for k in sessions}
        order = list(sessions) + list(sessions)[::-1]  # A B B A
        for _ in range(args.rounds):
            for label in order:
                t0 = time.perf_counter()
                sessions[label].run(None, {"x": x})
                times[label].append(time.perf_counter() - t0)
        med = {k: 1e3 * float(np.median(v)) for k, v in times.items()}
        a, b = med.get("this tree"), med.get(args.vs)
        print(f"| {name} | {a:.2f} | {f'{b:.2f}' if b else '-'} | {f'{a / b:.2f}' if b else '-'} |")


if __name__ == "__main__":
    main()
