"""What a graph pass could make of GrowNorm (γ folded to 1) → MatMul, on ONNX Runtime CPU (issue 12
part 5): ViT-B/16's widened last MLP, x = GELU output [N, 197, 3072 + 768] → MatMul [3840, 768].

Hand-built ONNX graphs, each checked against a float64 numpy GrowNorm + MatMul (one all-zero group
row, so eps counts) first, then timed A B / B A (``onnx_latency.interleaved_medians``):

  plain       MatMul alone (the same widths without GrowNorm; the floor);
  function    today's ``surgeon::GrowNorm`` node (its local function) → MatMul;
  split-scale Split per group → ReduceSumSquare → Max(eps²) → Sqrt → Reciprocal → Mul → Concat → MatMul;
  split-mm    Split per group, MatMul of each group with its rows of W, scaled per (row, group)
              after the MatMul, Sum (the scale is one scalar per sample, position and group);
  blocks-B    the group sizes as constants: X as [N, 197, C/B, B], ReduceSumSquare over B, each
              group's block sums added (Slice + ReduceSum), the scales gathered per block, one Mul,
              MatMul (no copy of X; B = 64, 256 and 768 = gcd).

    python benchmarks/grownorm_matmul_alternatives.py [--rounds 9] [--batches 1 8]
"""

from __future__ import annotations

import sys

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from onnx_latency import interleaved_medians, latency_parser, session  # sibling script

from surgeon.export.grownorm_op import DOMAIN, FUNCTION_OPSET, OP_TYPE, grownorm_function

GROUPS, TOKENS, OUT, EPS = (3072, 768), 197, 768, 1e-6
C = sum(GROUPS)
OFFSETS = np.cumsum((0,) + GROUPS)


def const(name: str, value) -> "TensorProto":
    return numpy_helper.from_array(np.asarray(value), name)


def graph(nodes, inits, function: bool = False) -> bytes:
    g = helper.make_graph(nodes, "alt", [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", TOKENS, C])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", FUNCTION_OPSET), helper.make_opsetid(DOMAIN, 1)],
                          ir_version=9)
    if function:
        m.functions.append(grownorm_function())
    return m.SerializeToString()


def plain(w):
    return graph([helper.make_node("MatMul", ["images", "W"], ["y"])], [const("W", w)])


def function(w):
    norm = helper.make_node(OP_TYPE, ["images", "gamma"], ["xn"], domain=DOMAIN, groups=list(GROUPS), eps=EPS, axis=-1,
                            plugin_namespace="surgeon", plugin_version="1")
    return graph([norm, helper.make_node("MatMul", ["xn", "W"], ["y"])],
                 [const("W", w), const("gamma", np.ones(C, np.float32))], function=True)


def _split_scales():
    """Split X per group and each group's 1 / max(‖x_g‖, eps) as s{i}: [N, T, 1]."""
    nodes = [helper.make_node("Split", ["images", "split"], [f"x{i}" for i in range(len(GROUPS))], axis=-1)]
    for i in range(len(GROUPS)):
        nodes += [helper.make_node("ReduceSumSquare", [f"x{i}", "last"], [f"ss{i}"], keepdims=1),
                  helper.make_node("Max", [f"ss{i}", "eps_sq"], [f"sm{i}"]),
                  helper.make_node("Sqrt", [f"sm{i}"], [f"n{i}"]),
                  helper.make_node("Reciprocal", [f"n{i}"], [f"s{i}"])]
    return nodes, [const("split", np.array(GROUPS, np.int64)), const("last", np.array([-1], np.int64)),
                   const("eps_sq", np.float32(EPS * EPS))]


def split_scale(w):
    nodes, inits = _split_scales()
    nodes += [helper.make_node("Mul", [f"x{i}", f"s{i}"], [f"h{i}"]) for i in range(len(GROUPS))]
    nodes += [helper.make_node("Concat", [f"h{i}" for i in range(len(GROUPS))], ["h"], axis=-1),
              helper.make_node("MatMul", ["h", "W"], ["y"])]
    return graph(nodes, inits + [const("W", w)])


def split_mm(w):
    nodes, inits = _split_scales()
    for i in range(len(GROUPS)):
        nodes += [helper.make_node("MatMul", [f"x{i}", f"W{i}"], [f"m{i}"]),
                  helper.make_node("Mul", [f"m{i}", f"s{i}"], [f"p{i}"])]
        inits.append(const(f"W{i}", w[OFFSETS[i]:OFFSETS[i + 1]]))
    nodes.append(helper.make_node("Sum", [f"p{i}" for i in range(len(GROUPS))], ["y"]))
    return graph(nodes, inits)


def blocks(w, b: int):
    nb, ends = C // b, OFFSETS // b
    nodes = [helper.make_node("Reshape", ["images", "shape_4d"], ["x4"]),
             helper.make_node("ReduceSumSquare", ["x4", "last"], ["block_sq"], keepdims=1)]   # [N, T, C/B, 1]
    inits = [const("shape_4d", np.array([0, 0, nb, b], np.int64)), const("shape_3d", np.array([0, 0, C], np.int64)),
             const("last", np.array([-1], np.int64)), const("blocks_axis", np.array([-2], np.int64)),
             const("eps_sq", np.float32(EPS * EPS)),
             const("group_of_block", np.repeat(np.arange(len(GROUPS)), np.diff(ends)).astype(np.int64))]
    for i in range(len(GROUPS)):
        inits += [const(f"start{i}", np.array([ends[i]], np.int64)), const(f"end{i}", np.array([ends[i + 1]], np.int64))]
        nodes += [helper.make_node("Slice", ["block_sq", f"start{i}", f"end{i}", "blocks_axis"], [f"bs{i}"]),
                  helper.make_node("ReduceSum", [f"bs{i}", "blocks_axis"], [f"ss{i}"], keepdims=1)]
    nodes += [helper.make_node("Concat", [f"ss{i}" for i in range(len(GROUPS))], ["ss"], axis=-2),
              helper.make_node("Max", ["ss", "eps_sq"], ["sm"]), helper.make_node("Sqrt", ["sm"], ["n"]),
              helper.make_node("Reciprocal", ["n"], ["s"]),
              helper.make_node("Gather", ["s", "group_of_block"], ["s_blocks"], axis=-2),
              helper.make_node("Mul", ["x4", "s_blocks"], ["h4"]), helper.make_node("Reshape", ["h4", "shape_3d"], ["h"]),
              helper.make_node("MatMul", ["h", "W"], ["y"])]
    return graph(nodes, inits + [const("W", w)])


def reference(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    parts = [x[..., a:b] / np.maximum(np.sqrt((x[..., a:b] ** 2).sum(-1, keepdims=True)), EPS)
             for a, b in zip(OFFSETS[:-1], OFFSETS[1:])]
    return np.concatenate(parts, -1) @ w.astype(np.float64)


def main() -> None:
    args = latency_parser(__doc__, 9, [1, 8]).parse_args()
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((C, OUT)) * 0.02).astype(np.float32)
    models = {"plain": plain(w), "function": function(w), "split-scale": split_scale(w), "split-mm": split_mm(w),
              **{f"blocks-{b}": blocks(w, b) for b in (64, 256, 768)}}
    sessions = {k: session(m, args.threads) for k, m in models.items()}
    for batch in args.batches:
        x = np.maximum(rng.standard_normal((batch, TOKENS, C)), 0).astype(np.float32)
        x[:, 0, GROUPS[0]:] = 0  # an all-zero new group: the eps branch
        want = reference(x, w)
        errs = {k: float(np.abs(s.run(None, {"images": x})[0] - want).max() / np.abs(want).max())
                for k, s in sessions.items() if k != "plain"}
        assert max(errs.values()) < 1e-5, errs
        med = interleaved_medians(sessions, x, args.rounds, reps=max(1, 16 // batch))
        over = {k: v - med["plain"] for k, v in med.items()}
        print(f"batch {batch}: " + "  ".join(
            f"{k} {1e3 * v:.2f} ms" + ("" if k == "plain" else f" (÷plain {v / med['plain']:.3f}, cost÷function's "
                                       f"{over[k] / over['function']:.2f}, err {errs[k]:.1e})")
            for k, v in med.items()), flush=True)


if __name__ == "__main__":
    sys.exit(main())
