"""Verify each surgery stage at the cost of what it changed, not of the whole network.

The export stage runs the whole model in ONNX Runtime against PyTorch, and keeps, for every
verification input, the values of a few activations where passes act (the data inputs of GrowNorm,
of the branches a Concat joins and of Slice/Identity/Dropout; small ones first, within
:data:`CAPTURE_BUDGET`: every capture is memory held through the passes). After a pass, every tensor of the new graph gets a
provenance key — its producer's op, attributes and inputs' keys, down to the model input, the
initializers' bytes and the weights' arrays — so a tensor whose key is one the export stage
captured provably holds the captured value. The stage is then checked by running only the nodes
between those tensors and the outputs (fed with the captured values) and comparing the logits with
PyTorch at the same tolerance: the same numbers ONNX Runtime would compute for the whole model, up
to float rounding at the cut. Where nothing can be cut (or the graph has subgraphs), the stage
runs whole, as :func:`~surgeon.export.verify.verify` does.

For a grown VGG16 the passes act on the classifier, so four of five verifications skip the
convolutions (~99 % of the FLOPs).
"""

from __future__ import annotations

import hashlib

import numpy as np
import onnx
from onnx import helper

from surgeon.export.grownorm_op import DOMAIN, OP_TYPE
from surgeon.export.lean import LeanModel
from surgeon.export.ort_runner import OrtRunner
from surgeon.export.verify import FP32_TOLERANCE, NOT_WRITTEN, Reference, Verification, check_cases, verify

CAPTURE_BUDGET = 16 << 20  # bytes of captured activations, over all verification inputs
_CUT_OPS = {"Identity", "Dropout", "Slice"}  # besides GrowNorm and the branches a Concat joins


def _digest(*parts: bytes | str) -> str:
    h = hashlib.blake2b(digest_size=16)
    for p in parts:
        h.update(p if isinstance(p, bytes) else p.encode())
        h.update(b"\0")
    return h.hexdigest()


def _array_key(name: str, a: np.ndarray) -> str:
    """A weight: its name, layout, address and a sample of its bytes (passes name every tensor they
    create afresh, so an equal key is the same array)."""
    flat = a.reshape(-1)
    sample = np.ascontiguousarray(flat[:: max(1, flat.size // 4096)]).tobytes()
    return _digest("weight", name, str(a.dtype), str(a.shape), str(a.__array_interface__["data"][0]), sample)


def provenance(model: LeanModel) -> dict[str, str] | None:
    """tensor name → key; equal keys hold equal values on equal inputs. None for graphs with
    subgraphs (If/Loop/Scan bodies read outer tensors the keys would not see)."""
    graph = model.proto.graph
    keys: dict[str, str] = {"": ""}  # an omitted optional input
    for i in graph.input:
        if i.name not in model.weights:
            keys[i.name] = _digest("input", i.name)
    for name, a in model.weights.items():
        keys[name] = _array_key(name, a)
    for t in graph.initializer:
        keys[t.name] = _digest("init", t.SerializeToString())
    for node in graph.node:
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            return None
        ins = [keys.get(n) for n in node.input]
        if any(k is None for k in ins):  # not in topological order: leave its outputs unmatched
            continue
        base = _digest(node.op_type, node.domain, *(a.SerializeToString() for a in node.attribute), *ins)  # type: ignore[arg-type]
        for j, out in enumerate(node.output):
            if out:
                keys[out] = _digest(base, str(j))
    return keys


def _cut_candidates(model: LeanModel) -> list[tuple[str, int]]:
    """(activation, bytes per sample) worth capturing, smallest first; unknown sizes are left out."""
    graph = model.proto.graph
    producer = {o: n for n in graph.node for o in n.output}
    wanted: set[str] = set()
    for node in graph.node:
        if node.op_type == "Concat":  # the input the joined branches read
            wanted.update(p.input[0] for t in node.input if (p := producer.get(t)) is not None and p.input)
        if node.input and (node.op_type in _CUT_OPS or (node.op_type == OP_TYPE and node.domain == DOMAIN)):
            wanted.add(node.input[0])
    wanted -= set(model.weights) | {t.name for t in graph.initializer} | {o.name for o in graph.output} | {""}
    try:
        inferred = model.infer_shapes().graph.value_info
    except Exception:
        return []
    sizes = []
    for vi in inferred:
        tt = vi.type.tensor_type
        # Only tensors that carry the batch on dim 0 (dynamic there, fixed after): a scalar or a tensor
        # computed from constants (Swin-V2's clamped logit scale) is no per-sample activation to feed.
        batched = tt.HasField("shape") and len(tt.shape.dim) >= 1 and not tt.shape.dim[0].HasField("dim_value")
        if vi.name in wanted and tt.elem_type and batched and all(d.HasField("dim_value") for d in tt.shape.dim[1:]):
            per_sample = int(np.prod([d.dim_value for d in tt.shape.dim[1:]], dtype=np.int64))  # the batch is dynamic
            sizes.append((vi.name, per_sample * helper.tensor_dtype_to_np_dtype(tt.elem_type).itemsize))
    return sorted(sizes, key=lambda s: s[1])


class IncrementalVerifier:
    """``export(model)`` once, then ``stage(name, model)`` after every pass that changed it."""

    def __init__(self, reference: Reference, tolerance: float = FP32_TOLERANCE, budget: int = CAPTURE_BUDGET):
        self.reference, self.tolerance, self.budget = reference, tolerance, budget
        self._captured: dict[str, list[np.ndarray]] = {}   # provenance key → value per case

    def export(self, model: LeanModel, stage: str = "export") -> list[Verification]:
        """The whole model against PyTorch, capturing the cut candidates' values on the way."""
        samples = sum(len(x) for _, x, _ in self.reference.cases)
        picks, used = [], 0
        for name, per_sample in _cut_candidates(model):
            if used + per_sample * samples <= self.budget:
                picks.append(name)
                used += per_sample * samples
        keys = provenance(model) if picks else None
        if not keys:
            return verify(model, self.reference, stage=stage, tolerance=self.tolerance)
        probe = onnx.ModelProto()
        probe.CopyFrom(model.proto)  # the small proto only: the weights stay shared
        probe.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in picks)
        runner = OrtRunner(LeanModel(probe, model.weights))
        values: dict[str, list[np.ndarray]] = {n: [] for n in picks}

        def run(i: int, x: np.ndarray) -> np.ndarray:
            out = runner.session.run(None, {**model.weights, runner.input_name: x})
            for name, v in zip(picks, out[len(out) - len(picks):]):
                values[name].append(v.copy())  # our own copy: ONNX Runtime's buffer would pin its whole arena
            return out[0]

        checks = check_cases(self.reference, run, stage=stage, tolerance=self.tolerance, check_input=runner.check_input)
        self._captured = {keys[n]: v for n, v in values.items()}
        return checks

    def stage(self, stage: str, model: LeanModel, on_failure: str = NOT_WRITTEN) -> list[Verification]:
        """``model`` against PyTorch: only what changed since the export stage, where that is less than all."""
        cut = _suffix(model, self._captured)
        if cut is None:
            return verify(model, self.reference, stage=stage, tolerance=self.tolerance, on_failure=on_failure)
        proto, fed = cut
        declared = {i.name for i in proto.graph.input}
        weights = {n: a for n, a in model.weights.items() if n in declared}
        real = next((i.name for i in model.inputs if i.name in declared), None)
        session = OrtRunner(LeanModel(proto, weights)).session

        def run(i: int, x: np.ndarray) -> np.ndarray:
            feeds = {**weights, **{name: self._captured[key][i] for name, key in fed.items()}}
            if real is not None:
                feeds[real] = x
            return session.run(None, feeds)[0]

        ran = f"the changed part, from {len(fed)} unchanged tensor(s) of the export run"
        return check_cases(self.reference, run, stage=stage, tolerance=self.tolerance, on_failure=on_failure, ran=ran)


def _suffix(model: LeanModel, captured: dict[str, list[np.ndarray]]) -> tuple[onnx.ModelProto, dict[str, str]] | None:
    """The nodes between captured tensors and the outputs, as a model whose inputs are those tensors
    (and whatever else the nodes read); with the captured tensors it feeds (name → key). None when
    that is not fewer nodes than the model."""
    keys = provenance(model) if captured else None
    if keys is None:
        return None
    graph = model.proto.graph
    fed = {name: key for name, key in keys.items() if key in captured}
    producer = {o: i for i, n in enumerate(graph.node) for o in n.output}
    needed: set[int] = set()
    used: set[str] = set()
    todo, seen = [o.name for o in graph.output], set()
    while todo:  # backwards from the outputs, stopping at captured tensors
        t = todo.pop()
        if t in seen:
            continue
        seen.add(t)
        if t in fed:
            used.add(t)
        elif t in producer and producer[t] not in needed:
            needed.add(producer[t])
            todo.extend(graph.node[producer[t]].input)
    # A node that runs anyway (a Split whose other output is needed) defines its fed outputs itself.
    used = {t for t in used if producer.get(t) not in needed}
    if not used or len(needed) >= len(graph.node):
        return None
    proto = onnx.ModelProto()
    proto.CopyFrom(model.proto)  # small: the weights are beside it
    g = proto.graph
    del g.node[:], g.input[:], g.initializer[:], g.value_info[:]
    g.node.extend(n for i, n in enumerate(graph.node) if i in needed)
    reads = {n for node in g.node for n in node.input}
    g.initializer.extend(t for t in graph.initializer if t.name in reads)
    g.input.extend(i for i in graph.input if i.name in reads and i.name not in used)
    for name in sorted(used):  # typed and shaped (batch left free), so ONNX Runtime optimizes the part as in the whole
        value = captured[fed[name]][0]
        g.input.append(helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(value.dtype),
                                                     ["batch", *value.shape[1:]]))
    return proto, {name: fed[name] for name in used}
