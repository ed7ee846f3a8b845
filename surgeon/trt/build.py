"""ONNX → TensorRT engine: one optimization profile over the batch, strongly typed, timing cache
reused across builds, GrowNorm as the ``surgeon::GrowNorm`` plugin or the model's ONNX function.

The engine is written atomically next to the ONNX (``model.engine``), with ``model.engine.json``
beside it: the ONNX file's ``surgeon.*`` metadata (classes, preprocessing, recipe) and this build's
report, which runtimes need and a serialized engine cannot carry.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import onnx

from surgeon.contract import DOMAIN, OP_TYPE
from surgeon.errors import SurgeonError
from surgeon.export.onnx_io import load_onnx, model_inputs, quantization_target
from surgeon.fileio import atomic_write, atomic_write_text
from surgeon.spec import PLUGIN_CHOICES, BatchRange
from surgeon.trt.einsum import needs_lowercase, with_lowercase_einsum
from surgeon.trt.plugin import plugin_status, registered
from surgeon.trt.toolkit import Toolkit, find_toolkit


@dataclass
class EngineReport:
    engine: str
    onnx: str
    builder: str
    ahead_of_time: bool
    precision: str
    input: str
    batch: str
    input_shape: list[int]
    grownorm_nodes: int
    grownorm_impl: str            # "plugin" | "onnx function" | "-" (no GrowNorm left)
    grownorm_detail: str
    plugin_layers: int
    timing_cache: str | None
    workspace_mb: int | None
    build_seconds: float
    engine_bytes: int
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> list[str]:
        lines = [f"builder   {self.builder}",
                 f"engine    {self.engine} ({self.engine_bytes / 1e6:.1f} MB, built in {self.build_seconds:.1f} s)",
                 f"profile   {self.input} {self.input_shape} for batch {self.batch}; precision {self.precision} (from the graph)",
                 f"GrowNorm  {self.grownorm_nodes} node(s): {self.grownorm_impl} — {self.grownorm_detail}"]
        if self.timing_cache:
            lines.append(f"timing    {self.timing_cache}")
        return lines


def _input_of(model: onnx.ModelProto) -> tuple[str, list[int]]:
    inputs = model_inputs(model)
    if len(inputs) != 1:
        raise SurgeonError(f"expected one image input, found {len(inputs)}: {', '.join(i.name for i in inputs)}")
    dims = inputs[0].type.tensor_type.shape.dim
    shape = [d.dim_value if d.HasField("dim_value") else -1 for d in dims]
    if len(shape) < 2 or any(v <= 0 for v in shape[1:]):
        raise SurgeonError(f"input {inputs[0].name} has shape {shape}: only the batch dimension may be dynamic")
    return inputs[0].name, shape


def _graph_precision(model: onnx.ModelProto) -> str:
    meta = {p.key: p.value for p in model.metadata_props}
    if "surgeon.precision" in meta:
        return meta["surgeon.precision"]
    fp16 = any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)
    return "fp16" if fp16 else "fp32"


def choose_grownorm(tk: Toolkit, plugin: str, nodes: int) -> tuple[str, str]:
    """(implementation, why) for the GrowNorm nodes."""
    if plugin not in PLUGIN_CHOICES:
        raise SurgeonError(f"--plugin must be one of {', '.join(PLUGIN_CHOICES)}, got {plugin!r}")
    if nodes == 0:
        return "-", "the graph has no GrowNorm node"
    if plugin == "off":
        return "onnx function", "--plugin off: the model's surgeon.GrowNorm function in standard TensorRT layers"
    ok, why = plugin_status(tk)
    if ok:
        return "plugin", why
    if plugin == "on":
        raise SurgeonError(f"--plugin on: the GrowNorm plugin cannot be used: {why}")
    return "onnx function", f"the model's surgeon.GrowNorm function in standard TensorRT layers ({why})"


def _network_flags(trt, use_plugin: bool) -> int:
    flags = 0
    creation = trt.NetworkDefinitionCreationFlag
    if hasattr(creation, "STRONGLY_TYPED"):  # TensorRT 11 networks are always strongly typed
        flags |= 1 << int(creation.STRONGLY_TYPED)
    if use_plugin and hasattr(creation, "PREFER_AOT_PYTHON_PLUGINS"):
        flags |= 1 << int(creation.PREFER_AOT_PYTHON_PLUGINS)  # embed the PTX: the engine runs without Python
    return flags


def _parse(tk: Toolkit, network, path: Path, header: onnx.ModelProto, force_function: bool, plugin: bool) -> None:
    trt = tk.module
    parser = trt.OnnxParser(network, tk.logger().native)
    edit = None
    if force_function:
        # The parser prefers a registered plugin over the local function: inline the function.
        from onnx.inliner import inline_local_functions

        edit = inline_local_functions
    elif plugin:
        # tensorrt.plugin has no attribute defaults, and the parser leaves out attributes a node lacks:
        # the plugin gets `axis` spelled out (absent means 1; files keep omitting it).
        from surgeon_plugins.grownorm_trt import with_explicit_axis

        edit = with_explicit_axis
    if needs_lowercase(header):  # TensorRT's parser takes lowercase Einsum equations only (MaxViT)
        edit = _then(edit, with_lowercase_einsum)
    if edit is None:
        ok = parser.parse_from_file(str(path))  # reads external data from beside the file
    else:
        # The edited copy goes beside the original, so its external data is still found.
        edited = edit(header if _is_external(header) else load_onnx(path))
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.edited.", suffix=".onnx", dir=path.parent)
        os.close(fd)
        try:
            onnx.save(edited, tmp)
            ok = parser.parse_from_file(tmp)
        finally:
            os.unlink(tmp)
    if not ok:
        errors = [str(parser.get_error(i)).strip() for i in range(parser.num_errors)] or tk.logger().errors[-1:]
        raise SurgeonError(f"TensorRT's ONNX parser rejects {path.name}: {(errors[0] if errors else 'unknown error').splitlines()[0][:300]}")


def _then(first: Callable[[onnx.ModelProto], onnx.ModelProto] | None,
          second: Callable[[onnx.ModelProto], onnx.ModelProto]) -> Callable[[onnx.ModelProto], onnx.ModelProto]:
    return second if first is None else (lambda model: second(first(model)))


def _is_external(model: onnx.ModelProto) -> bool:
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


def _plugin_layers(trt, network) -> int:
    kinds = {getattr(trt.LayerType, k) for k in ("PLUGIN", "PLUGIN_V2", "PLUGIN_V3") if hasattr(trt.LayerType, k)}
    return sum(network.get_layer(i).type in kinds for i in range(network.num_layers))


def _timing_cache(tk: Toolkit, config, path: Path | None) -> tuple[object | None, str | None]:
    if path is None:
        return None, None
    if tk.ahead_of_time:
        return None, (f"{path} not used: TensorRT-RTX has no timing cache (it picks kernels on the target GPU "
                      f"when the engine loads)")
    data = path.read_bytes() if path.is_file() else b""
    cache = config.create_timing_cache(data)
    if cache is not None and config.set_timing_cache(cache, ignore_mismatch=False):
        return cache, (f"reused {path} ({len(data)} bytes)" if data else f"created {path}")
    cache = config.create_timing_cache(b"")  # another TensorRT version or GPU made it: start afresh
    config.set_timing_cache(cache, ignore_mismatch=False)
    return cache, f"{path} was made by another TensorRT or GPU: replaced"


def build_engine(onnx_path: str | Path, output: str | Path | None = None, *, batch: BatchRange | None = None,
                 precision: str | None = None, plugin: str = "auto", timing_cache: str | Path | None = None,
                 workspace_mb: int | None = None, builder: str = "auto") -> EngineReport:
    """Build and write a TensorRT engine for ``onnx_path`` (see the module docstring)."""
    path = Path(onnx_path)
    # Graph and metadata; external tensors stay on disk, their locations checked: the parser itself
    # follows an in-folder symbolic link out of the folder and would embed that file in the engine.
    header = load_onnx(path, load_external_data=False)
    meta = {p.key: p.value for p in header.metadata_props}
    graph_precision = _graph_precision(header)
    if graph_precision == "int8" and quantization_target(meta) == "ort-cpu":
        raise SurgeonError(f"{path.name} was quantized for ONNX Runtime on a CPU (uint8 activations with zero points), "
                           f"which TensorRT does not take: quantize with --target tensorrt")
    if precision is not None and precision != graph_precision:
        raise SurgeonError(f"{path.name} is an {graph_precision} graph, but {precision} was asked: TensorRT builds "
                           f"strongly typed networks, so precision comes from the graph (export with --precision {precision})")
    if batch is None:
        batch = BatchRange.parse(meta["surgeon.batch"]) if "surgeon.batch" in meta else BatchRange()
    if workspace_mb is not None and workspace_mb <= 0:
        raise SurgeonError(f"--workspace must be a positive number of MB, got {workspace_mb}")
    name, shape = _input_of(header)
    nodes = sum(n.op_type == OP_TYPE and n.domain == DOMAIN for n in header.graph.node)
    tk = find_toolkit(builder)
    impl, detail = choose_grownorm(tk, plugin, nodes)
    trt = tk.module
    log = tk.logger()
    log.reset()

    trt_builder = trt.Builder(log.native)
    network = trt_builder.create_network(_network_flags(trt, impl == "plugin"))
    _parse(tk, network, path, header, force_function=impl == "onnx function" and registered(tk), plugin=impl == "plugin")
    plugin_layers = _plugin_layers(trt, network)
    if impl == "plugin" and plugin_layers < nodes:
        if plugin == "on":
            raise SurgeonError(f"--plugin on: TensorRT's parser used the plugin for {plugin_layers} of {nodes} GrowNorm node(s)")
        impl, detail = "onnx function", f"the parser expanded the ONNX function for {nodes - plugin_layers} of {nodes} node(s)"

    config = trt_builder.create_builder_config()
    profile = trt_builder.create_optimization_profile()
    profile.set_shape(name, *([b, *shape[1:]] for b in (batch.min, batch.opt, batch.max)))
    config.add_optimization_profile(profile)
    if workspace_mb is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    cache_path = Path(timing_cache) if timing_cache else None
    cache, cache_note = _timing_cache(tk, config, cache_path)

    t0 = time.perf_counter()
    plan = trt_builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - t0
    if plan is None:
        why = log.errors[-1].splitlines()[0][:300] if log.errors else "no error was logged"
        raise SurgeonError(f"TensorRT could not build {path.name}: {why}")

    out = Path(output) if output else path.with_suffix(".engine")
    atomic_write(out, lambda tmp: tmp.write_bytes(memoryview(plan)))
    if cache is not None and cache_path is not None:
        serialized = cache.serialize()
        atomic_write(cache_path, lambda tmp: tmp.write_bytes(memoryview(serialized)))
    report = EngineReport(
        engine=str(out), onnx=str(path), builder=tk.describe(), ahead_of_time=tk.ahead_of_time,
        precision=graph_precision, input=name, batch=str(batch), input_shape=shape, grownorm_nodes=nodes,
        grownorm_impl=impl, grownorm_detail=detail, plugin_layers=plugin_layers, timing_cache=cache_note,
        workspace_mb=workspace_mb, build_seconds=seconds, engine_bytes=out.stat().st_size,
        warnings=sorted(set(log.warnings))[:20])
    sidecar = {"metadata": {k: v for k, v in meta.items() if k.startswith("surgeon")}, "build": report.to_dict()}
    atomic_write_text(engine_sidecar(out), json.dumps(sidecar, indent=2))
    return report


def engine_sidecar(engine: str | Path) -> Path:
    """``model.engine`` → ``model.engine.json`` (the ONNX metadata and the build report)."""
    engine = Path(engine)
    return engine.with_name(engine.name + ".json")
