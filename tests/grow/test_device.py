"""Growth runs where the model is: new tensors on the module's device and in its dtype (meta: shapes
only, no memory), the same weights for a seed on every device."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import surgeon
from surgeon.grow.recipe import GrowStep, HeadStep
from surgeon.zoo import build_architecture

from tests.grow.helpers import grow

# Each init, on conv layers (a BatchNorm split; the Linear after the flatten gets new columns per
# position), on a Linear read by a pretrained Linear, and into the (fresh) head.
STEPS = {
    "random": [GrowStep("wide", "features.4", 8), GrowStep("wide", "features.8", 8),
               GrowStep("wide", "classifier.0", 16), GrowStep("deep", "classifier.3", 8)],
    "net2net": [GrowStep("wide", "features.8", 8, init="net2net"), GrowStep("wide", "classifier.0", 16, init="net2net"),
                GrowStep("deep", "classifier.3", 128, init="net2net")],
    "zero": [GrowStep("wide", "features.8", 8, init="zero"), GrowStep("wide", "classifier.3", 16, init="zero")],
}
HEAD = [HeadStep(classes=3)]


def _digitnet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_architecture("surgeon:digitnet").eval()


def _tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


@pytest.mark.parametrize("init", sorted(STEPS))
def test_growth_on_the_meta_device_gives_shapes_and_no_data(init, tmp_path):
    cpu, _ = grow(_digitnet(), HEAD + STEPS[init], 32)
    gm = surgeon.grow_model(_digitnet().to("meta"), STEPS[init], classes=3)  # no calib: nothing to calibrate on
    tensors = _tensors(gm)
    assert {t.device.type for t in tensors.values()} == {"meta"}
    assert {k: (t.shape, t.dtype) for k, t in tensors.items()} == {k: (t.shape, t.dtype) for k, t in _tensors(cpu).items()}
    assert gm(torch.empty(2, 3, 32, 32, device="meta")).shape == (2, 3)
    with pytest.raises(surgeon.SurgeonError, match="meta device has shapes but no weights"):
        surgeon.save(gm, tmp_path / "grown.pt", classes=["a", "b", "c"])


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_growth_keeps_the_model_dtype(dtype):
    gm, _ = grow(_digitnet().to(dtype), HEAD + STEPS["random"], 32)
    assert {t.dtype for t in gm.parameters()} == {dtype}
    assert gm(torch.randn(2, 3, 32, 32, dtype=dtype)).dtype == dtype


def _cuda_checks(device: str, dtype: torch.dtype) -> None:
    for init, steps in STEPS.items():
        torch.manual_seed(1)
        on_cpu, _ = grow(_digitnet().to(dtype), HEAD + steps, 32)
        torch.manual_seed(1)
        on_gpu, _ = grow(_digitnet().to(device, dtype), HEAD + steps, 32)
        tensors = _tensors(on_gpu)
        wrong = {k: (str(t.device), t.dtype) for k, t in tensors.items()
                 if t.device.type != "cuda" or (t.is_floating_point() and t.dtype != dtype)}
        assert wrong == {}, init
        # New units are drawn on the CPU whatever the device: one seed, the same grown weights (up to
        # the spread of the existing columns, a reduction that CUDA rounds its own way).
        assert tensors.keys() == _tensors(on_cpu).keys()
        for k, t in _tensors(on_cpu).items():
            torch.testing.assert_close(tensors[k].cpu(), t, msg=f"{init} {k}")
        x = torch.randn(4, 3, 32, 32, dtype=dtype)
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(on_gpu(x.to(device)).cpu(), on_cpu(x), rtol=tol, atol=tol)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_growth_on_cuda_keeps_every_tensor_on_the_device(dtype):
    _cuda_checks("cuda", dtype)


@pytest.mark.gpu
def test_the_api_grows_calibrates_and_trains_on_cuda(tmp_path):
    images = torch.randn(16, 3, 32, 32, device="cuda")
    gm = surgeon.grow_model(_digitnet().cuda(), [surgeon.Wide("classifier.3", 8)], classes=["a", "b", "c"],
                            calib=images, arch="surgeon:digitnet")
    assert {p.device.type for p in gm.parameters()} == {"cuda"}
    opt = torch.optim.SGD(surgeon.param_groups(gm, lr=1e-2), momentum=0.9)
    gm.train()
    loss = nn.functional.cross_entropy(gm(images), torch.zeros(16, dtype=torch.long, device="cuda"))
    loss.backward()
    opt.step()
    path = surgeon.save(gm, tmp_path / "grown.pt")
    gm.eval()
    rebuilt = surgeon.load(path)
    torch.testing.assert_close(rebuilt(images.cpu()), gm(images).cpu(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("init", ["random", "zero", "net2net"])
def test_new_columns_are_made_where_the_consumer_weight_is(init):
    # Without any default-device context: the columns follow the weight (meta stands in for CUDA here).
    from surgeon.grow import init as winit

    full = torch.empty(6, 4, dtype=torch.float64, device="meta")
    mapping = winit.copy_mapping(4, 2) if init == "net2net" else None
    shares = winit.split_shares(4, mapping) if mapping is not None else None
    updated, extra = winit.extra_columns(full, 2, 1, init, mapping, shares)
    assert (extra.device.type, extra.dtype, tuple(extra.shape)) == ("meta", torch.float64, (6, 2))
    assert updated.device.type == "meta"
    assert mapping is None or mapping.device.type == "cpu"  # index bookkeeping stays on the CPU


@pytest.mark.parametrize("family", ["mnasnet", "regnet_y"])
def test_net2net_through_depthwise_and_grouped_convs_on_the_meta_device(family):
    """net2net's group bookkeeping stays on the CPU under a meta model (a checkpoint's meta rebuild)."""
    from tests.grow import test_depthwise_growth as dw

    build, layer, conv, *_ = dw.FAMILIES[family]
    units = 16 if family == "regnet_y" else 12
    cpu, _ = grow(build(), [GrowStep("wide", layer, units, init="net2net")], dw.SIZE)
    gm = surgeon.grow_model(build().to("meta"), [surgeon.Wide(layer, units, init="net2net")],
                           input_size=dw.SIZE)
    assert {t.device.type for t in _tensors(gm).values()} == {"meta"}
    assert {k: t.shape for k, t in _tensors(gm).items()} == {k: t.shape for k, t in _tensors(cpu).items()}
