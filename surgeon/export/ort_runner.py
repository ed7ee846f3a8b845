"""An ONNX Runtime (CPU) session over a LeanModel, a ModelProto or a file: what verification and
quantization run models with. numpy and onnx only (no torch), so the deploy side can use it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from surgeon.export.lean import LeanModel


class OrtRunner:
    """An ONNX Runtime (CPU) session that feeds a LeanModel's weights along with the input
    (a :class:`surgeon.runner.Runner`)."""

    backend = "ort-cpu"

    def __init__(self, model: LeanModel | onnx.ModelProto | str | Path):
        from surgeon.onnxrt import open_session

        if isinstance(model, onnx.ModelProto):
            model = LeanModel.from_proto(model)
        elif not isinstance(model, LeanModel) and _has_external_data(Path(model)):
            model = LeanModel.load(model)  # mapped tensors as feeds: no second copy of a large model
        self._weights = model.weights if isinstance(model, LeanModel) else {}
        source = model.proto.SerializeToString() if isinstance(model, LeanModel) else str(model)
        self.session = open_session(source, ["CPUExecutionProvider"])
        self.input = next(i for i in self.session.get_inputs() if i.name not in self._weights)
        self.input_name = self.input.name

    def check_input(self, x: np.ndarray) -> str | None:
        """Why ``x`` does not fit the model's declared input (None when it does)."""
        dims = [d if isinstance(d, int) else None for d in self.input.shape]
        if not dims:  # ONNX Runtime shows an input of unknown rank as []: nothing to check
            return None
        if len(dims) == x.ndim and all(d is None or d == n for d, n in zip(dims, x.shape)):
            return None
        from surgeon.export.onnx_io import show_shape

        return f"the model's input {self.input_name} has shape {show_shape(dims)}, but the checkpoint takes {list(x.shape)}"

    def run(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {**self._weights, self.input_name: x})[0]


def _has_external_data(path: Path) -> bool:
    from surgeon.export.onnx_io import load_onnx

    header = load_onnx(path, load_external_data=False)  # refuses external data outside the model's folder
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in header.graph.initializer)


