"""Shared helpers for the growth tests (small models, hooks, graph queries)."""

from __future__ import annotations

import copy

import torch
import torchvision
from torch import fx, nn

from surgeon.grow.analysis import trace
from surgeon.grow.grownorm import GrowNorm
from surgeon.grow.ops import GrowthState, apply_steps
from surgeon.zoo import build_architecture


def torchvision_model(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return torchvision.models.get_model(name, weights=None).eval()


def digitnet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_architecture("surgeon:digitnet").eval()


def randomize_batchnorms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial affine parameters and running statistics, where it has them
    ("pretrained-like")."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                if m.track_running_stats:
                    m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
                    m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(n, generator=g) * 0.2)
    return model


def grow(model: nn.Module, steps, input_size: int, *, copy_model: bool = True) -> tuple[fx.GraphModule, GrowthState]:
    """trace + apply_steps; returns the grown GraphModule (eval mode) and the state."""
    m = copy.deepcopy(model) if copy_model else model
    gm = trace(m)
    state = apply_steps(gm, list(steps), GrowthState(input_size=input_size))
    gm.eval()
    return gm, state


class Capture:
    """Forward hook that records a clone of a module's output (clone: in-place ReLUs follow)."""

    def __init__(self, module: nn.Module) -> None:
        self.value: torch.Tensor | None = None
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, _m, _inp, out):
        self.value = out.detach().clone()

    def remove(self) -> None:
        self.handle.remove()


def module_nodes(gm: fx.GraphModule, cls: type) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(str(n.target)), cls)]


def grownorm_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return module_nodes(gm, GrowNorm)


def images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g)


def save_grown(path, gm: fx.GraphModule, steps, spec: str, size: int, classes=("a", "b", "c", "d")):
    """Give each GrowNorm non-trivial learned scales (as after training) and save ``gm`` as a surgeon
    checkpoint whose architecture is ``spec`` (a ``module:factory`` the rebuild imports)."""
    from surgeon.checkpoint import Checkpoint, save_checkpoint
    from surgeon.preprocessing import Preprocessing

    with torch.no_grad():
        for m in gm.modules():
            if isinstance(m, GrowNorm):
                m.gamma.uniform_(0.5, 3.0)
    gm.eval()
    return save_checkpoint(path, Checkpoint(
        model=spec, weights="none", recipe=steps, classes=list(classes),
        preprocessing=Preprocessing(input_size=size, resize=size), state_dict=gm.state_dict()))


def grown_checkpoint(path, model: nn.Module, layer: str, units: int, init: str, spec: str, size: int):
    """Replace ``model``'s head (4 classes), widen ``layer`` by ``units`` with ``init`` (seed 1) and
    save it with :func:`save_grown`. Returns ``(path, grown GraphModule)``."""
    from surgeon.grow.analysis import trace
    from surgeon.grow.ops import GrowthState, apply_steps
    from surgeon.grow.recipe import GrowStep, HeadStep

    steps = [HeadStep(classes=4), GrowStep("wide", layer, units, init=init)]
    torch.manual_seed(1)
    gm = trace(model)
    apply_steps(gm, steps, GrowthState(input_size=size))
    return save_grown(path, gm, steps, spec, size), gm


def finetune_one_step(gm: fx.GraphModule, state: GrowthState, size: int, classes: int = 3):
    """γ calibrated, the paper's parameter groups (pretrained frozen but for the top, new units at
    10× the base rate), one SGD step on 6 images. Asserts every new parameter got a finite gradient;
    returns ``(split, names of the new parameters the step changed)``."""
    import torch.nn.functional as F

    from surgeon.grow.gamma import calibrate_gamma
    from surgeon.train.params import apply_freeze, split_parameters

    calibrate_gamma(gm, images(8, size, seed=2))
    split = split_parameters(gm, state, "top")
    apply_freeze(gm, split)
    opt = torch.optim.SGD([{"params": list(split.pretrained.values())},
                           {"params": list(split.new.values()), "lr": 0.1}], lr=0.01, momentum=0.9)
    gm.train()
    before = {n: p.detach().clone() for n, p in split.new.items()}
    F.cross_entropy(gm(images(6, size, seed=3)), torch.arange(6) % classes).backward()
    for name, p in split.new.items():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    opt.step()
    return split, {n for n, p in split.new.items() if not torch.equal(before[n], p.detach())}


def export_verified(checkpoint, out):
    """``export_checkpoint`` with the default passes, trusting the test's factory: every check passes
    within 1e-4 of the logits' scale and one GrowNorm node is left. Returns the result."""
    import onnx

    from surgeon.export.onnx_export import export_checkpoint

    result = export_checkpoint(checkpoint, out, trust_code=True)
    assert result.verifications and all(v.ok for v in result.verifications)
    assert max(v.rel_err for v in result.verifications) <= 1e-4
    assert sum(n.op_type == "GrowNorm" for n in onnx.load(result.path).graph.node) == 1
    return result


def builds_with_rtx(onnx_path) -> None:
    """TensorRT-RTX builds the file into an engine with its one GrowNorm (skips without TensorRT-RTX)."""
    import pytest

    pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx-cu12 is not installed")
    from surgeon.trt.build import build_engine

    report = build_engine(onnx_path, builder="tensorrt-rtx")  # 1-4 s for these models; the export is the slow part
    assert report.engine_bytes > 10_000 and report.grownorm_nodes == 1
