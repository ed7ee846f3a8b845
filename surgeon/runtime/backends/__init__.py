"""One module per inference framework; each opens a runner with ``run(batch) -> logits``.

Heavy imports (onnxruntime, tensorrt, torch models) happen only when a backend is opened."""
