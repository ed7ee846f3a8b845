"""The INT8 Q/DQ graphs `surgeon quantize` writes parse and build with TensorRT-RTX on the CPU (ahead
of time, strongly typed: precision from the graph), with GrowNorm as the model's function."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from surgeon.cli import cli
from surgeon.errors import SurgeonError
from surgeon.trt.build import build_engine
from tests.export.test_quantize import digits, grown, int8  # noqa: F401  (fixtures)

pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx-cu12 is not installed")


def test_int8_graph_builds_with_tensorrt_rtx(int8, tmp_path):  # noqa: F811
    report = build_engine(int8.path, tmp_path / "m.engine", builder="tensorrt-rtx", precision="int8")
    assert (tmp_path / "m.engine").stat().st_size == report.engine_bytes > 10_000
    assert report.precision == "int8" and report.ahead_of_time
    assert report.grownorm_nodes == 1 and report.grownorm_impl == "onnx function"
    with pytest.raises(SurgeonError, match="is an int8 graph, but fp32 was asked"):
        build_engine(int8.path, tmp_path / "x.engine", builder="tensorrt-rtx", precision="fp32")
    assert not (tmp_path / "x.engine").exists()


def test_cli_build_checks_the_graph_is_quantized(int8, grown, tmp_path):  # noqa: F811
    runner = CliRunner()
    res = runner.invoke(cli, ["build", str(int8.path), "-o", str(tmp_path / "q.engine"), "--precision", "int8",
                              "--builder", "tensorrt-rtx"])
    assert res.exit_code == 0, res.output
    assert "precision int8 (from the graph)" in res.output
    res = runner.invoke(cli, ["build", str(grown[1]), "-o", str(tmp_path / "f.engine"), "--precision", "int8",
                              "--builder", "tensorrt-rtx"])
    assert res.exit_code == 1 and "is an fp32 graph, but int8 was asked" in res.output


def test_ort_cpu_target_is_refused_before_parsing(grown, digits, tmp_path):  # noqa: F811
    from surgeon.export.quantize import QuantizeOptions, quantize_file

    cpu = quantize_file(grown[1], tmp_path / "cpu.onnx", QuantizeOptions(str(digits), target="ort-cpu")).path
    with pytest.raises(SurgeonError, match="quantized for ONNX Runtime on a CPU .* quantize with --target tensorrt"):
        build_engine(cpu, tmp_path / "cpu.engine", builder="tensorrt-rtx")
    assert not (tmp_path / "cpu.engine").exists()


@pytest.mark.slow
def test_export_precision_int8_with_trt_builds_the_quantized_graph(grown, digits, tmp_path):  # noqa: F811
    res = CliRunner().invoke(cli, ["export", str(grown[0]), "--precision", "int8", "--calib", str(digits), "--trt",
                                   "--builder", "tensorrt-rtx", "-o", str(tmp_path / "m.engine")])
    assert res.exit_code == 0, res.output
    assert "held out  100 image(s)" in res.output and "precision int8 (from the graph)" in res.output
    assert (tmp_path / "m.onnx").exists() and (tmp_path / "m.engine").stat().st_size > 10_000
    res = CliRunner().invoke(cli, ["export", str(grown[0]), "--precision", "int8", "--calib", str(digits), "--trt",
                                   "--target", "ort-cpu", "-o", str(tmp_path / "c.engine")])
    assert res.exit_code == 2 and "--trt needs --target tensorrt" in res.output and not (tmp_path / "c.onnx").exists()
