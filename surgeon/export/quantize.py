"""INT8 post-training quantization: an fp32 ONNX (GrowNorm's γ already folded) → a Q/DQ ONNX that
ONNX Runtime runs and TensorRT builds (strongly typed: INT8 means explicit Quantize/Dequantize nodes).

Library: ONNX Runtime's static quantization (``onnxruntime.quantization.quantize_static``), because
it is already a dependency of the deploy install, runs without PyTorch or a GPU, writes QDQ graphs
(QuantFormat.QDQ) and has the calibrators (MinMax, Entropy, Percentile) and per-tensor range
overrides needed here. NVIDIA's Model Optimizer is the alternative with TensorRT-tuned placement,
but nvidia-modelopt 0.47.0 requires torch >= 2.8 even for ONNX PTQ, and its ``[onnx]`` extra pins
onnx ~= 1.21 and, on Linux x86, onnxruntime-gpu ~= 1.24.2 and cupy-cuda12x (read from its wheel's
metadata): it cannot serve the torch-free deploy install, and onnxruntime-gpu would take the
``onnxruntime`` module over from the CPU build. Nothing here is written by hand but what is specific
to grown models and to TensorRT's needs:

- the settings TensorRT's explicit quantization needs: symmetric int8 activations (zero point 0)
  per tensor, symmetric int8 weights per output channel, float biases (TensorRT's parser rejects an
  int32 DequantizeLinear), only Conv/Gemm/MatMul quantized; the logits stay float (the last Q/DQ
  pair is removed: quantizing the output only adds error);
- GrowNorm is not quantized: it reads a dequantized tensor and its result is quantized again where
  the next linear op reads it, so its norms are computed in float;
- GrowNorm outputs are bounded by construction (each group is unit-norm before the scale, so
  |y_c| <= |γ_c|): ``grownorm_ranges="gamma"`` sets the range of every quantized tensor that is a
  GrowNorm output (or reached from one through bound-preserving ops) from γ, without calibration;
- agreement with the fp32 model is measured on held-out images, and a model below
  ``min_agreement`` is not written; the layers whose quantization hurts most are named (each layer
  quantized alone, ranked by logit error) so they can be kept in float with ``exclude``.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from surgeon.contract import DOMAIN, OP_TYPE
from surgeon.errors import SurgeonError
from surgeon.export.calibration import image_files, labelled_images, load_images, model_preprocessing, split
from surgeon.export.lean import LeanModel
from surgeon.export.onnx_io import set_metadata
from surgeon.export.ort_runner import OrtRunner
from surgeon.runner import run_batched
from surgeon.spec import CALIB_METHODS, DEFAULT_CALIB_SAMPLES, DEFAULT_MIN_AGREEMENT, GROWNORM_RANGES, QUANT_TARGETS

OP_TYPES = ("Conv", "Gemm", "MatMul")
# Ops through which a bound |v| <= b on every element still holds (GrowNorm's γ bound reaches the
# quantized input of the next linear op through them).
_BOUND_PRESERVING = {"Relu", "MaxPool", "GlobalMaxPool", "AveragePool", "GlobalAveragePool", "ReduceMean", "ReduceMax",
                     "Flatten", "Reshape", "Identity", "Dropout", "Squeeze", "Unsqueeze", "Transpose"}
_CALIB_BATCH = 16
SENSITIVITY_IMAGES = 128   # held-out images per one-layer-quantized model
SENSITIVITY_MAX_LAYERS = 64
TOP_LAYERS = 3


@dataclass(frozen=True)
class QuantizeOptions:
    calib: str
    samples: int = DEFAULT_CALIB_SAMPLES
    method: str = "minmax"
    min_agreement: float = DEFAULT_MIN_AGREEMENT
    exclude: tuple[str, ...] = ()
    force: bool = False
    grownorm_ranges: str = "calibrated"
    data: str | None = None
    target: str = "tensorrt"
    # 7-bit weights (|w| <= 64: two uint8 x int8 products sum to <= 32640, inside the 16-bit sums that
    # ONNX Runtime's fast U8S8 kernels saturate on x86 CPUs without VNNI), so it keeps those kernels
    # there; 8-bit weights get exact but slower U8U8 ones (surgeon.onnxrt.session_options)
    reduce_range: bool = False

    def check(self) -> None:
        if self.target not in QUANT_TARGETS:
            raise SurgeonError(f"--target must be one of {', '.join(QUANT_TARGETS)}, got {self.target!r}")
        if self.reduce_range and self.target == "tensorrt":
            raise SurgeonError("--reduce-range (7-bit weights) is for --target ort-cpu on x86 CPUs without VNNI; "
                               "TensorRT takes full 8-bit weights")
        if self.method not in CALIB_METHODS:
            raise SurgeonError(f"--calib-method must be one of {', '.join(CALIB_METHODS)}, got {self.method!r}")
        if self.grownorm_ranges not in GROWNORM_RANGES:
            raise SurgeonError(f"--grownorm-ranges must be one of {', '.join(GROWNORM_RANGES)}, got {self.grownorm_ranges!r}")
        if not 0.0 <= self.min_agreement <= 1.0:
            raise SurgeonError(f"--min-agreement must be between 0 and 1, got {self.min_agreement}")


@dataclass
class Agreement:
    """int8 against fp32 logits on the same images."""

    images: int
    top1: float            # fraction of images whose top-1 class is the same
    max_abs_err: float
    mean_abs_err: float
    scale: float           # max |fp32 logit|: the errors' yardstick
    margin: float = 0.0    # median fp32 gap between the top two logits: flips happen where the error reaches it

    @classmethod
    def of(cls, reference: np.ndarray, actual: np.ndarray) -> Agreement:
        err = np.abs(reference.astype(np.float64) - actual.astype(np.float64))
        top2 = np.sort(reference, axis=1)[:, -2:] if reference.shape[1] > 1 else np.zeros((len(reference), 2))
        return cls(len(reference), float(np.mean(reference.argmax(1) == actual.argmax(1))), float(err.max()),
                   float(err.mean()), float(np.abs(reference).max()), float(np.median(top2[:, 1] - top2[:, 0])))


@dataclass
class RangeNote:
    """A GrowNorm-bounded quantized tensor: its calibrated range and its bound from γ."""

    tensor: str
    grownorm: str
    calibrated: float   # max |v| the calibration saw (the symmetric range it gives)
    gamma_bound: float  # max |γ| of the GrowNorm it comes from
    # max |y| of each group (old units first) at the GrowNorm's output on the calibration images:
    # one per-tensor scale serves all groups, so a group far below the others gets fewer levels
    group_max: list[float] = field(default_factory=list)


@dataclass
class QuantizeResult:
    path: Path | None
    model: LeanModel
    method: str
    calibration_images: int
    held_out: Agreement                       # the written model's
    grownorm_ranges: str                      # which ranges the written model uses
    alternative: Agreement | None = None      # the other GrowNorm range choice, for comparison
    ranges: list[RangeNote] = field(default_factory=list)
    quantized: list[str] = field(default_factory=list)   # nodes whose inputs are int8
    excluded: list[str] = field(default_factory=list)    # nodes kept in float (--exclude)
    accuracy: dict | None = None              # --data: fp32 and int8 accuracy on labelled images
    sensitivity: list[dict] = field(default_factory=list)  # computed when below min_agreement
    below_min_agreement: bool = False         # written anyway (force)
    target: str = "tensorrt"
    weight_bits: int = 8                      # 7 with reduce_range

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "model"}
        d["path"] = str(self.path) if self.path else None
        return d


# -- the graph --------------------------------------------------------------------------------------


def quantizable_nodes(proto: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in proto.graph.node if n.op_type in OP_TYPES and not n.domain]


def resolve_exclude(proto: onnx.ModelProto, names: tuple[str, ...]) -> list[str]:
    """ONNX node names for ``--exclude`` entries: a node's name, or the PyTorch module whose weight
    or bias (``NAME.weight``, ``NAME.bias``) the node reads (a merged or folded weight has a new name)."""
    nodes = quantizable_nodes(proto)
    by_module = {i.rsplit(".", 1)[0]: n.name for n in nodes for i in n.input[1:] if i.endswith((".weight", ".bias"))}
    out = []
    for name in names:
        if any(n.name == name for n in nodes):
            out.append(name)
        elif name in by_module:
            out.append(by_module[name])
        else:
            shown = ", ".join(n.name for n in nodes[:8]) + (", ..." if len(nodes) > 8 else "")
            raise SurgeonError(f"--exclude {name}: no Conv/Gemm/MatMul node or module of that name (nodes: {shown})")
    return list(dict.fromkeys(out))


def _initializer(model: LeanModel, name: str) -> np.ndarray | None:
    if name in model.weights:
        return np.asarray(model.weights[name])
    found = next((t for t in model.proto.graph.initializer if t.name == name), None)
    return None if found is None else numpy_helper.to_array(found)


def grownorm_bounds(model: LeanModel) -> dict[str, tuple[str, float, float]]:
    """tensor → (GrowNorm node, low, high): every GrowNorm output and what bound-preserving ops make
    of it lies in [-max|γ|, max|γ|] (γ = 1 where the node has none, as after fold-gamma), in
    [0, max γ] where it is non-negative (a Relu's output normalized with γ >= 0, or a Relu on the way)."""
    proto = model.proto
    producer = {o: n for n in proto.graph.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in proto.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    bounds: dict[str, tuple[str, float, float]] = {}
    for n in proto.graph.node:
        if n.op_type != OP_TYPE or n.domain != DOMAIN:
            continue
        gamma = _initializer(model, n.input[1]) if len(n.input) > 1 and n.input[1] else None
        bound = float(np.max(np.abs(gamma))) if gamma is not None and gamma.size else 1.0
        source = producer.get(n.input[0])
        signed = not (source is not None and source.op_type == "Relu" and (gamma is None or gamma.min() >= 0))
        todo = [(n.output[0], signed)]
        while todo:
            t, signed = todo.pop()
            bounds[t] = (n.name, -bound if signed else 0.0, bound)
            todo += [(c.output[0], signed and c.op_type != "Relu") for c in consumers.get(t, [])
                     if c.op_type in _BOUND_PRESERVING and not c.domain and c.input[0] == t]
    return bounds


def group_maxima(model: LeanModel, images: np.ndarray) -> dict[str, list[float]]:
    """GrowNorm node → max |y| of each of its groups on ``images`` (the node's own output)."""
    from surgeon.onnxrt import open_session

    nodes = [n for n in model.proto.graph.node if n.op_type == OP_TYPE and n.domain == DOMAIN]
    if not nodes or not len(images):
        return {}
    proto = onnx.ModelProto()
    proto.CopyFrom(model.proto)
    proto.graph.output.extend(onnx.helper.make_tensor_value_info(n.output[0], onnx.TensorProto.FLOAT, None) for n in nodes)
    session = open_session(proto.SerializeToString(), ["CPUExecutionProvider"])
    names = [n.output[0] for n in nodes]
    peaks = {name: None for name in names}
    for i in range(0, len(images), _CALIB_BATCH):
        outs = session.run(names, model.feeds(**{model.inputs[0].name: images[i:i + _CALIB_BATCH]}))
        for n, y in zip(nodes, outs):
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
            per_channel = np.abs(np.moveaxis(y, int(attrs.get("axis", 1)), -1)).reshape(-1, y.shape[int(attrs.get("axis", 1))]).max(0)
            peaks[n.output[0]] = per_channel if peaks[n.output[0]] is None else np.maximum(peaks[n.output[0]], per_channel)
    out = {}
    for n in nodes:
        groups = list(onnx.helper.get_attribute_value(next(a for a in n.attribute if a.name == "groups")))
        edges = np.cumsum([0, *groups])
        out[n.name] = [float(peaks[n.output[0]][a:b].max()) for a, b in zip(edges[:-1], edges[1:])]
    return out


def _quantized_inputs(proto: onnx.ModelProto, exclude: list[str]) -> set[str]:
    """The activations ONNX Runtime will quantize: the first input of every quantized node."""
    return {n.input[0] for n in quantizable_nodes(proto) if n.name not in exclude}


def _producers_and_uses(graph: onnx.GraphProto) -> tuple[dict[str, onnx.NodeProto], dict[str, int]]:
    """tensor → the node that writes it; tensor → how many node inputs read it."""
    uses: dict[str, int] = {}
    for n in graph.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    return {o: n for n in graph.node for o in n.output}, uses


def _float_outputs(proto: onnx.ModelProto) -> None:
    """Remove the Q/DQ pair ONNX Runtime puts on a graph output: the producer writes the output
    itself (logits are not worth an 8-bit rounding, and a runtime reads them as float)."""
    graph = proto.graph
    producer, uses = _producers_and_uses(graph)
    drop = []
    for out in graph.output:
        dq = producer.get(out.name)
        if dq is None or dq.op_type != "DequantizeLinear":
            continue
        q = producer.get(dq.input[0])
        if q is None or q.op_type != "QuantizeLinear" or uses.get(q.output[0], 0) != 1:
            continue
        source = producer.get(q.input[0])
        if source is None or uses.get(q.input[0], 0) != 1 or any(o.name == q.input[0] for o in graph.output):
            continue
        source.output[list(source.output).index(q.input[0])] = out.name
        drop += [q, dq]
    _remove(graph, drop)


def _remove(graph: onnx.GraphProto, nodes: list[onnx.NodeProto]) -> None:
    """Remove ``nodes`` and the scalar scales and zero points no node reads any more."""
    for n in nodes:
        graph.node.remove(n)
    used = {i for n in graph.node for i in n.input}
    for t in [t for t in graph.initializer if t.name not in used and not t.dims and t.name.endswith(("_scale", "_zero_point"))]:
        graph.initializer.remove(t)


def fuse_residual_adds(proto: onnx.ModelProto) -> list[str]:
    """TensorRT's Q/DQ placement at a skip connection (its developer guide, "Q/DQ Layer-Placement
    Recommendations"): quantize the *residual* input of the Add, and leave the weighted layer's output
    that is the Add's other input in float, so that the conv and the add fuse into one int8 kernel
    (an extra Q/DQ pair between them "forces the separation of the convolution from the element-wise
    addition"); the residual's precision is the fused kernel's output precision, so it must be int8.
    ONNX Runtime's quantizer puts a Q/DQ pair on every Conv/Gemm/MatMul output; this removes the one
    on a weighted layer's output read only by an Add whose other input is dequantized (the residual).
    Where both inputs are such outputs (a projection shortcut), the first keeps float and fuses:
    ``out += identity`` puts the main branch first. Returns the Adds changed."""
    graph = proto.graph
    producer, uses = _producers_and_uses(graph)
    outputs = {o.name for o in graph.output}

    def fusable(tensor: str) -> tuple[onnx.NodeProto, onnx.NodeProto, onnx.NodeProto] | None:
        """(weighted node, Q, DQ) where ``tensor`` is DQ(Q(a weighted node's output)), each read once."""
        dq = producer.get(tensor)
        q = producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
        w = producer.get(q.input[0]) if q is not None and q.op_type == "QuantizeLinear" else None
        if w is None or w.op_type not in OP_TYPES or w.domain:
            return None
        if any(uses.get(t, 0) != 1 or t in outputs for t in (q.input[0], dq.input[0], tensor)):
            return None
        return w, q, dq

    changed, drop = [], []
    for add in [n for n in graph.node if n.op_type == "Add" and not n.domain and len(n.input) == 2]:
        chains = [fusable(i) for i in add.input]
        dequantized = [(producer.get(i) is not None and producer[i].op_type == "DequantizeLinear") for i in add.input]
        if not all(dequantized) or not any(chains):
            continue
        k = 0 if chains[0] else 1   # the other input stays the quantized residual
        w, q, dq = chains[k]
        add.input[k] = w.output[0]
        drop += [q, dq]
        changed.append(add.name)
    _remove(graph, drop)
    return changed


def quantized_nodes(proto: onnx.ModelProto) -> list[str]:
    """Nodes of OP_TYPES that read a dequantized activation (their int8 inputs)."""
    dq = {o for n in proto.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return [n.name for n in quantizable_nodes(proto) if n.input and n.input[0] in dq]


# -- ONNX Runtime ----------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """ONNX Runtime's quantizer logs advice through the root logger (pre-processing, opset updates)
    and its sessions warn on stderr; neither is for the user of surgeon."""
    import onnxruntime as ort

    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    ort.set_default_logger_severity(3)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the histogram calibrators print their progress
            yield
    finally:
        logging.disable(previous)


class _Reader:
    """ONNX Runtime's CalibrationDataReader protocol over preprocessed images, in batches."""

    def __init__(self, name: str, images: np.ndarray, batch: int) -> None:
        self._batches = iter([{name: images[i:i + batch]} for i in range(0, len(images), batch)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def _methods() -> dict:
    from onnxruntime.quantization import CalibrationMethod

    return {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile}


class _Quantizer:
    """Calibrates once (ONNX Runtime's calibration cache in a private folder), then quantizes
    variants of one model from the same ranges: the model itself, one layer at a time, other ranges."""

    def __init__(self, model: LeanModel, images: np.ndarray, method: str, workdir: Path, target: str = "tensorrt",
                 reduce_range: bool = False) -> None:
        # A file, not a ModelProto: ONNX Runtime's quantizer moves an in-memory model's tensors to
        # external data in its own temporary folder, which a second call would then miss.
        self.source = model.save(workdir / "fp32.onnx", direct=False)[0]  # read back at once: keep it cached
        self.large = model.is_large()
        self.input = model.inputs[0].name
        self.method = method
        self.target = target
        self.reduce_range = reduce_range
        self.workdir = workdir
        self.cache = workdir / "ranges.json"
        self._images = images
        self._count = 0

    def quantize(self, *, exclude: list[str], only: list[str] | None = None,
                 overrides: dict[str, tuple[float, float]] | None = None) -> LeanModel:
        from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

        if not self.cache.is_file():
            self._calibrate()
        self._count += 1
        out = self.workdir / f"q{self._count}.onnx"
        trt = self.target == "tensorrt"
        extra = {
            # TensorRT: int8 activations with zero point 0. ONNX Runtime on x86 runs uint8 x int8
            # (U8S8) kernels; int8 activations there are slower than fp32 (BENCHMARKS.md), so the
            # ort-cpu target takes uint8 activations with their own zero points, as ONNX Runtime advises.
            "ActivationSymmetric": trt,
            "WeightSymmetric": True,
            "QuantizeBias": False,                  # TensorRT's parser rejects int32 DequantizeLinear
            "QDQKeepRemovableActivations": trt,     # keep Relu explicit for TensorRT (it fuses it); ORT folds it into the zero point
            "TensorQuantOverrides": {t: [{"rmin": np.float32(lo), "rmax": np.float32(hi)}] for t, (lo, hi) in (overrides or {}).items()},
        }
        with _quiet():
            try:
                quantize_static(self.source, out, None, quant_format=QuantFormat.QDQ, op_types_to_quantize=list(OP_TYPES),
                                per_channel=True, activation_type=QuantType.QInt8 if trt else QuantType.QUInt8,
                                weight_type=QuantType.QInt8, reduce_range=self.reduce_range,
                                nodes_to_quantize=only, nodes_to_exclude=list(exclude), calibrate_method=_methods()[self.method],
                                use_external_data_format=self.large, extra_options=extra,
                                calibration_cache_path=self.cache)
            except Exception as exc:  # ONNX Runtime's own errors are ValueError/RuntimeError/its pybind types
                from surgeon.onnxrt import ort_message

                raise SurgeonError(f"ONNX Runtime's quantization failed: {ort_message(exc)}") from None
        lean = LeanModel.load(out)
        _float_outputs(lean.proto)
        if trt:
            fuse_residual_adds(lean.proto)
        return lean

    def _calibrate(self) -> None:
        """Ranges for every tensor the quantizer may use, into the cache that quantize_static reads.
        Calibrated here rather than by quantize_static, which passes its Entropy calibrator no bin
        counts: with the defaults (128 bins for 128 quantized bins) it searches no threshold but the
        full range, i.e. it is MinMax. Entropy here is TensorRT's: 2048 bins, 128 quantized bins."""
        from onnxruntime.quantization import create_calibrator, save_tensors_data

        # The histogram calibrators stack each batch's outputs into one array: batches of one image
        # (a shorter last batch would not stack).
        batch = _CALIB_BATCH if self.method == "minmax" else 1
        extra = {"symmetric": True, **({"num_bins": 2048, "num_quantized_bins": 128} if self.method == "entropy" else {})}
        with _quiet():
            try:
                calibrator = create_calibrator(self.source, list(OP_TYPES), augmented_model_path=str(self.workdir / "augmented.onnx"),
                                               calibrate_method=_methods()[self.method], use_external_data_format=self.large,
                                               extra_options=extra)
                calibrator.collect_data(_Reader(self.input, self._images, batch))
                save_tensors_data(calibrator.compute_data(), self.cache)
            except Exception as exc:
                from surgeon.onnxrt import ort_message

                raise SurgeonError(f"ONNX Runtime's calibration failed: {ort_message(exc)}") from None

    def calibrated_range(self, tensor: str) -> float | None:
        from onnxruntime.quantization import load_tensors_data

        ranges = load_tensors_data(self.cache)
        if tensor not in ranges:
            return None
        lo, hi = ranges[tensor].range_value
        return float(max(abs(float(np.min(lo))), abs(float(np.max(hi)))))


# -- the whole step --------------------------------------------------------------------------------


def _check_fp32(proto: onnx.ModelProto, source: str) -> None:
    ops = {n.op_type for n in proto.graph.node}
    if ops & {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul"}:
        raise SurgeonError(f"{source} is already quantized: quantize the fp32 export")
    meta = {p.key: p.value for p in proto.metadata_props}
    if meta.get("surgeon.precision", "fp32") != "fp32" or any(
            i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16 for i in proto.graph.input):
        raise SurgeonError(f"{source} is a {meta.get('surgeon.precision', 'fp16')} model: quantize the fp32 export")


def quantize_model(model: LeanModel, options: QuantizeOptions, *, source: str = "the model") -> QuantizeResult:
    """Calibrate on part of ``options.calib``, quantize, measure agreement on the rest (and accuracy
    on ``options.data``); raise SurgeonError (naming the layers that hurt most) when agreement is
    below ``options.min_agreement`` unless ``options.force``. Writes nothing."""
    options.check()
    proto = model.proto
    _check_fp32(proto, source)
    pre = model_preprocessing(proto, model.inputs, source)
    exclude = resolve_exclude(proto, options.exclude)
    parts = split(image_files(options.calib), options.samples)
    calib_x, held_x = load_images(parts.calibration, pre), load_images(parts.held_out, pre)
    labelled = labelled_images(options.data, _classes(proto)) if options.data else None
    data_x = load_images(labelled[0], pre) if labelled else None

    fp32 = OrtRunner(model)
    reference = run_batched(fp32, held_x)
    quantized_inputs = _quantized_inputs(proto, exclude)
    bounds = {t: b for t, b in grownorm_bounds(model).items() if t in quantized_inputs}
    with tempfile.TemporaryDirectory(prefix="surgeon-quantize-") as tmp:
        q = _Quantizer(model, calib_x, options.method, Path(tmp), options.target, options.reduce_range)
        variants = {"calibrated": None, "gamma": {t: (lo, hi) for t, (_, lo, hi) in bounds.items()}}
        chosen = options.grownorm_ranges
        int8 = q.quantize(exclude=exclude, overrides=variants[chosen])
        int8_runner = OrtRunner(int8)   # one session for the held-out and the labelled images
        held = Agreement.of(reference, run_batched(int8_runner, held_x))
        alternative = None
        if bounds:  # compare the other choice of GrowNorm ranges on the same images
            other = "gamma" if chosen == "calibrated" else "calibrated"
            other_model = q.quantize(exclude=exclude, overrides=variants[other])
            alternative = Agreement.of(reference, run_batched(OrtRunner(other_model), held_x))
        per_group = group_maxima(model, calib_x) if bounds else {}
        ranges = [RangeNote(t, g, q.calibrated_range(t) or 0.0, hi, per_group.get(g, []))
                  for t, (g, _, hi) in sorted(bounds.items())]
        accuracy = None
        if labelled is not None and data_x is not None:
            labels = labelled[1]
            accuracy = {"images": int(len(labels)),
                        "fp32": float(np.mean(run_batched(fp32, data_x).argmax(1) == labels)),
                        "int8": float(np.mean(run_batched(int8_runner, data_x).argmax(1) == labels))}
        result = QuantizeResult(None, int8, options.method, len(parts.calibration), held, chosen, alternative, ranges,
                                quantized_nodes(int8.proto), exclude, accuracy, target=options.target,
                                weight_bits=7 if options.reduce_range else 8)
        if held.top1 < options.min_agreement:
            result.sensitivity = _sensitivity(q, proto, exclude, reference, held_x, variants[chosen])
            result.below_min_agreement = True
            if not options.force:
                raise SurgeonError(refusal(result, options.min_agreement))
    set_metadata(int8.proto, {"surgeon.precision": "int8", "surgeon.quantization": json.dumps({
        "library": "onnxruntime.quantization", "target": options.target, "method": options.method,
        "calibration_images": len(parts.calibration), "held_out_images": held.images, "top1_agreement": held.top1,
        "grownorm_ranges": chosen, "excluded": exclude, "weight_bits": result.weight_bits})})
    return result


def _sensitivity(q: _Quantizer, proto: onnx.ModelProto, exclude: list[str], reference: np.ndarray, held_x: np.ndarray,
                 overrides: dict[str, tuple[float, float]] | None) -> list[dict]:
    """Each layer quantized alone, ranked by its top-1 agreement (what --min-agreement judges), then
    by mean logit error (the finer measure where few images flip), on (part of) the held-out images."""
    n = min(len(held_x), SENSITIVITY_IMAGES)
    layers = [node.name for node in quantizable_nodes(proto) if node.name not in exclude][:SENSITIVITY_MAX_LAYERS]
    rows = []
    for name in layers:
        model = q.quantize(exclude=exclude, only=[name], overrides=overrides)
        alone = Agreement.of(reference[:n], run_batched(OrtRunner(model), held_x[:n]))
        rows.append({"layer": name, "top1": alone.top1, "mean_abs_err": alone.mean_abs_err, "max_abs_err": alone.max_abs_err})
    return sorted(rows, key=lambda r: (r["top1"], -r["mean_abs_err"], r["layer"]))


def refusal(result: QuantizeResult, min_agreement: float) -> str:
    held = result.held_out
    worst = ", ".join(f"{r['layer']} (alone: agreement {r['top1']:.3f}, mean |err| {r['mean_abs_err']:.2e})"
                      for r in result.sensitivity[:TOP_LAYERS])
    flags = " ".join(f"--exclude {r['layer']}" for r in result.sensitivity[:TOP_LAYERS])
    return (f"int8 top-1 agreement with fp32 is {held.top1:.4f} on {held.images} held-out images, below --min-agreement "
            f"{min_agreement}; the layers whose quantization hurts most: {worst}; keep them in float with {flags}, "
            f"or write it anyway with --force (nothing was written)")


def _classes(proto: onnx.ModelProto) -> list[str]:
    meta = {p.key: p.value for p in proto.metadata_props}
    if "surgeon.classes" in meta:
        return [str(c) for c in json.loads(meta["surgeon.classes"])]
    dims = proto.graph.output[0].type.tensor_type.shape.dim if proto.graph.output else []
    return [str(i) for i in range(dims[-1].dim_value)] if dims and dims[-1].HasField("dim_value") else []


def quantize_file(model_path: str | Path, output: str | Path, options: QuantizeOptions) -> QuantizeResult:
    """``surgeon quantize``: read an fp32 ONNX, quantize it (see :func:`quantize_model`), write it atomically."""
    from surgeon.export.onnx_io import load_onnx

    load_onnx(model_path, load_external_data=False)  # one-line errors for a missing or unreadable file
    result = quantize_model(LeanModel.load(model_path), options, source=str(model_path))
    result.model.check()
    result.path = result.model.save(output)[0]
    return result
