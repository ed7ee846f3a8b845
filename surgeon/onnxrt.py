"""ONNX Runtime helpers every stage shares (export's verification and the runtime's backends): a quiet
session with a one-line error, and ONNX Runtime's exceptions and messages made readable.

Below both export/ and runtime/, so verification does not import the runtime (data flows one way).
"""

from __future__ import annotations

import re

from surgeon.errors import SurgeonError, first_line


def ort_errors() -> tuple[type[BaseException], ...]:
    """The exceptions ONNX Runtime raises for a model or an input it cannot run (its pybind classes)."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    found = tuple(v for v in vars(state).values() if isinstance(v, type) and issubclass(v, Exception))
    return (*found, RuntimeError)


def ort_message(exc: BaseException) -> str:
    """ONNX Runtime's message in one readable line: without its ``[ONNXRuntimeError] : 2 : KIND :``
    prefix and the C++ source location and failed condition it embeds."""
    text = first_line(exc)
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text)
    text = re.sub(r"\S*onnxruntime_src/\S+:\d+ .*? was false\. ", "", text)
    return text[:300]


def session_options(threads: int | None = None):
    """The options of every ONNX Runtime session surgeon opens (verification, quantization, Session,
    predict, bench, serve): quiet, exact int8 arithmetic, ``threads`` intra-op threads if given."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    # x86 CPUs without VNNI (SSE4.1/AVX2/AVX-512F) multiply int8 in pairs into a saturating 16-bit sum
    # (vpmaddubsw): ONNX Runtime's fast U8S8 kernels then return wrong numbers for a Q/DQ model
    # (grown DigitNet on an AVX2 EPYC: max logit error 1.02 of 1.57 instead of 0.013). This option
    # makes ONNX Runtime use exact U8U8 kernels on exactly those CPUs and changes nothing elsewhere
    # (VNNI, ARM, float models).
    opts.add_session_config_entry("session.x64quantprecision", "1")
    if threads:
        opts.intra_op_num_threads = threads
    return opts


def open_session(source: str | bytes, providers: list[str], threads: int | None = None, what: str = "the model"):
    """An ONNX Runtime session (:func:`session_options`) or a one-line SurgeonError naming ``what``."""
    import onnxruntime as ort

    try:
        return ort.InferenceSession(source, session_options(threads), providers=providers)
    except Exception as exc:
        raise SurgeonError(f"ONNX Runtime cannot load {what}: {ort_message(exc)}") from None


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> set[str] | None:
    """The CPU's feature flags (Linux's ``/proc/cpuinfo``), or None where they cannot be read."""
    try:
        with open(cpuinfo, encoding="ascii", errors="replace") as fh:
            line = next((line for line in fh if line.startswith("flags")), None)
    except OSError:
        return None
    return None if line is None else set(line.split(":", 1)[1].split())


def u8s8_saturates(cpuinfo: str = "/proc/cpuinfo") -> bool | None:
    """True on an x86 CPU without VNNI, where ONNX Runtime's fast U8S8 int8 kernels can saturate (so
    :func:`session_options` makes it use slower exact ones for 8-bit weights); False on a VNNI or
    non-x86 CPU; None where the flags cannot be read (not Linux)."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return False
    flags = cpu_flags(cpuinfo)
    return None if flags is None else not {"avx512_vnni", "avx_vnni"} & flags
