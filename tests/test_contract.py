"""The GrowNorm contract (DESIGN.md §2) is spelled in one module, surgeon/contract.py: the PyTorch
module, the ONNX node and function, the passes, the TensorRT plugin and its kernel import it."""

from __future__ import annotations

import ast

from tests.conftest import ROOT

NAMES = {"DOMAIN", "OP_TYPE", "PLUGIN_NAMESPACE", "PLUGIN_VERSION", "PLUGIN_ID", "DEFAULT_EPS", "DEFAULT_AXIS", "AXES"}
VALUES = {"surgeon::GrowNorm"}


def _sources():
    for top in ("surgeon", "plugins"):
        yield from sorted((ROOT / top).rglob("*.py"))


def test_no_module_but_the_contract_defines_its_constants():
    defined = []
    for path in _sources():
        if path == ROOT / "surgeon" / "contract.py":
            continue
        for node in ast.parse(path.read_text()).body:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
            defined += [f"{path.relative_to(ROOT)}: {t.id}" for t in targets if isinstance(t, ast.Name) and t.id in NAMES]
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and node.value.value in VALUES:
                defined.append(f"{path.relative_to(ROOT)}: {node.value.value!r}")
    assert defined == []


def test_the_plugin_and_the_exporter_read_the_contract():
    from surgeon import contract
    from surgeon.export import grownorm_op
    from surgeon.trt import plugin

    trt_source = (ROOT / "plugins" / "surgeon_plugins" / "grownorm_trt.py").read_text()
    kernel_source = (ROOT / "plugins" / "surgeon_plugins" / "grownorm_kernel.py").read_text()
    assert "from surgeon.contract import" in trt_source and "from surgeon.contract import DEFAULT_EPS" in kernel_source
    assert (grownorm_op.DOMAIN, grownorm_op.OP_TYPE) == (contract.DOMAIN, contract.OP_TYPE)
    assert (plugin.NAME, plugin.NAMESPACE, plugin.VERSION) == (contract.OP_TYPE, contract.PLUGIN_NAMESPACE,
                                                              contract.PLUGIN_VERSION)
    assert contract.PLUGIN_ID == "surgeon::GrowNorm"
