"""Inference on any surgeon artifact (``.onnx``, ``.engine``/``.plan``, ``grown.pt``): sessions, predict, bench."""

from surgeon.runtime.session import BACKENDS, Prediction, Session

__all__ = ["BACKENDS", "Prediction", "Session"]
