"""TensorRT engines: ``build_engine`` (ONNX → engine) with full TensorRT or TensorRT-RTX."""
