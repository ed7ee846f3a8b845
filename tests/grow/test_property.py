"""Property-based growth test with a seeded generator (no extra dependency).

Random small models (conv/linear stacks with BatchNorm, activations, pooling, flattening, dropout,
and now and then a residual add, a concat, a squeeze-excitation product, a grouped/depthwise conv,
a LayerNorm/GroupNorm, a shared or unused layer: so refusals get exercised) × random growth recipes
(wide/deep, a layer picked among *all* named modules, random units including 0 and negatives,
random/net2net/zero init, auto/constant γ, norm on/off).

The property: every step either grows (the model then runs, trains and, for a deterministic subset,
exports to ONNX and verifies against PyTorch through surgeon's own checkpoint → export → verify path
and tolerances) or is refused with a :class:`SurgeonError` whose message is one non-empty line —
never another exception, and a refused step leaves the model as it was. Recipes made only of
net2net/zero steps (no new head) must keep the function before normalization, i.e. with the
GrowNorms bypassed (what the README claims; deep net2net blocks only on non-negative inputs).

A case is a seed; to replay one with its ONNX export::

    .venv/bin/python -c "import pathlib, tempfile; from tests.grow.test_property import run_case; \
        print(run_case(SEED, export=True, tmp_path=pathlib.Path(tempfile.mkdtemp())))"

CI runs seeds 0..299 (a few exported); ``SURGEON_PROPERTY_SEEDS=N`` sizes the slow all-export test.
"""

from __future__ import annotations

import copy
import functools
import os
import random
import warnings
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from surgeon.errors import SurgeonError
from surgeon.grow.analysis import trace
from surgeon.grow.gamma import calibrate_gamma
from surgeon.grow.ops import GrowthState, apply_steps
from surgeon.grow.recipe import GrowStep, HeadStep

from tests.grow.helpers import randomize_batchnorms


# ---------------------------------------------------------------------------------------------
# Random architectures. The spec is a list of plain tuples made from a seed, so the checkpoint
# rebuild (``tests.grow.test_property:net_<seed>``, see ``__getattr__``) builds the same model.


class Residual(nn.Module):
    def __init__(self, c: int, linear: bool) -> None:
        super().__init__()
        if linear:
            self.conv1, self.bn1, self.conv2 = nn.Linear(c, c), nn.BatchNorm1d(c), nn.Linear(c, c)
        else:
            self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(c)
            self.conv2 = nn.Conv2d(c, c, 1)

    def forward(self, x):
        return F.relu(x + self.conv2(F.relu(self.bn1(self.conv1(x)))))


class Concat(nn.Module):
    def __init__(self, c: int, a: int, b: int, linear: bool) -> None:
        super().__init__()
        self.a = nn.Linear(c, a) if linear else nn.Conv2d(c, a, 1)
        self.b = nn.Linear(c, b) if linear else nn.Conv2d(c, b, 3, padding=1)

    def forward(self, x):
        return torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], dim=1)


class SqueezeExcite(nn.Module):
    def __init__(self, c: int, r: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(c, r, 1)
        self.fc2 = nn.Conv2d(r, c, 1)

    def forward(self, x):
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean((2, 3), keepdim=True)))))
        return x * s


class Twice(nn.Module):
    """One Linear/Conv called twice (shared weights)."""

    def __init__(self, c: int, linear: bool) -> None:
        super().__init__()
        self.shared = nn.Linear(c, c) if linear else nn.Conv2d(c, c, 1)

    def forward(self, x):
        return self.shared(F.relu(self.shared(x)))


_ACT_MODULES = {
    "ReLU": nn.ReLU, "ReLU_inplace": lambda: nn.ReLU(inplace=True), "LeakyReLU": lambda: nn.LeakyReLU(0.1),
    "ReLU6": nn.ReLU6, "GELU": nn.GELU, "SiLU": nn.SiLU, "Tanh": nn.Tanh, "Sigmoid": nn.Sigmoid,
    "Hardswish": nn.Hardswish, "ELU": nn.ELU, "PReLU": nn.PReLU,
}
_ACT_FUNCTIONS = ("F.relu", "torch.relu", "F.leaky_relu", "x.relu", "F.gelu", "x.sigmoid")
_DROPS = {"Dropout": lambda: nn.Dropout(0.2), "Dropout2d": lambda: nn.Dropout2d(0.2), "Identity": nn.Identity}


def _act_op(rng: random.Random) -> tuple:
    if rng.random() < 0.7:
        return ("module", rng.choice(list(_ACT_MODULES)))
    return ("fn", rng.choice(_ACT_FUNCTIONS))


def make_spec(seed: int) -> dict:
    """A random architecture for ``seed``: ``{"size", "classes", "ops": [(kind, ...), ...]}``."""
    rng = random.Random(seed)
    size = rng.choice([8, 12, 16])
    ops: list[tuple] = []
    c, h = 3, size
    if rng.random() < 0.8:  # a conv stage
        for _ in range(rng.randint(1, 4)):
            out = rng.randint(2, 10)
            r = rng.random()
            if r < 0.08 and c > 1:  # depthwise (refused to grow, but others around it grow)
                ops.append(("conv", c, c, 3, 1, c))
            elif r < 0.14 and c % 2 == 0 and out % 2 == 0:
                ops.append(("conv", c, out, 1, 1, 2))
                c = out
            else:
                k = rng.choice([1, 3])
                stride = 2 if h >= 8 and rng.random() < 0.2 else 1
                extra = rng.choice([{}, {}, {}, {"bias": False}, {"dilation": 2}, {"padding_mode": "reflect"}])
                ops.append(("conv", c, out, k, stride, 1, extra))
                c = out
                d = extra.get("dilation", 1)
                h = (h + 2 * d * (k // 2) - d * (k - 1) - 1) // stride + 1
            if rng.random() < 0.6:
                ops.append(("bn2d", c, rng.random() < 0.85, rng.random() < 0.9))
            elif rng.random() < 0.15:
                ops.append(rng.choice([("groupnorm", c), ("instancenorm", c)]))
            if rng.random() < 0.85:
                ops.append(_act_op(rng))
            if rng.random() < 0.2:
                ops.append(("drop", rng.choice(list(_DROPS))))
            r = rng.random()
            if r < 0.25 and h >= 4:
                ops.append(("pool", rng.choice(["MaxPool2d", "AvgPool2d", "F.max_pool2d"])))
                h //= 2
            elif r < 0.35:
                ops.append(("residual", c))
            elif r < 0.42:
                a, b = rng.randint(1, 5), rng.randint(1, 5)
                ops.append(("concat", c, a, b))
                c = a + b
            elif r < 0.47:
                ops.append(("se", c, rng.randint(1, 4)))
            elif r < 0.50:
                ops.append(("twice", c))
        if rng.random() < 0.1:  # a SqueezeNet-like conv head: conv -> ReLU -> pool -> flatten
            ops.append(("conv", c, "classes", 1, 1, 1))
            ops.append(("module", "ReLU"))
            ops.append(("flatten", "AdaptiveAvgPool2d+Flatten"))
            return {"size": size, "classes": rng.randint(2, 6), "ops": ops, "spare": rng.random() < 0.2}
        t = rng.choice(["AdaptiveAvgPool2d+Flatten", "AdaptiveAvgPool2d(2)+Flatten", "mean", "torch.flatten", "view", "AdaptiveMaxPool2d+flatten",
                        "Flatten", "reshape_fixed"] if h > 1 else ["torch.flatten", "Flatten", "view"])
        if t == "reshape_fixed" and rng.random() < 0.5:
            t = "torch.flatten"
        ops.append(("flatten", t, c * h * h) if t == "reshape_fixed" else ("flatten", t))
        f = c if t in ("AdaptiveAvgPool2d+Flatten", "mean", "AdaptiveMaxPool2d+flatten") else 4 * c if "(2)" in t else c * h * h
    else:  # an MLP on the flattened image
        ops.append(("flatten", rng.choice(["torch.flatten", "Flatten", "view"])))
        f = 3 * size * size
    for _ in range(rng.randint(0, 3)):
        out = rng.randint(2, 12)
        ops.append(("linear", f, out))
        f = out
        if rng.random() < 0.3:
            ops.append(("bn1d", f, True, rng.random() < 0.97))  # no running stats: cannot run one image
        elif rng.random() < 0.1:
            ops.append(("layernorm", f))
        if rng.random() < 0.8:
            ops.append(_act_op(rng))
        if rng.random() < 0.3:
            ops.append(("drop", rng.choice(["Dropout", "Identity", "F.dropout"])))
        r = rng.random()
        if r < 0.1:
            ops.append(("residual_fc", f))
        elif r < 0.17:
            a, b = rng.randint(1, 5), rng.randint(1, 5)
            ops.append(("concat_fc", f, a, b))
            f = a + b
        elif r < 0.2:
            ops.append(("twice_fc", f))
    ops.append(("linear", f, "classes"))
    if rng.random() < 0.1:  # something after the head that keeps its shape
        ops.append(("post", rng.choice(["log_softmax", "softmax", "scale"])))
    return {"size": size, "classes": rng.randint(2, 6), "ops": ops, "spare": rng.random() < 0.2}


class RandomNet(nn.Module):
    def __init__(self, spec: dict) -> None:
        super().__init__()
        self.kinds: list[tuple] = []
        self.layers = nn.ModuleList()
        classes = spec["classes"]
        for op in spec["ops"]:
            kind, args = op[0], op[1:]
            m: nn.Module | None = None
            if kind == "conv":
                cin, cout, k, stride, groups, *extra = args
                cout = classes if cout == "classes" else cout
                kw = dict(extra[0]) if extra else {}
                m = nn.Conv2d(cin, cout, k, stride=stride, padding=kw.get("dilation", 1) * (k // 2), groups=groups, **kw)
            elif kind == "linear":
                fin, fout = args
                m = nn.Linear(fin, classes if fout == "classes" else fout)
            elif kind in ("bn2d", "bn1d"):
                c, affine, track = args
                m = (nn.BatchNorm2d if kind == "bn2d" else nn.BatchNorm1d)(c, affine=affine, track_running_stats=track)
            elif kind == "groupnorm":
                m = nn.GroupNorm(1, args[0])
            elif kind == "instancenorm":
                m = nn.InstanceNorm2d(args[0])
            elif kind == "layernorm":
                m = nn.LayerNorm(args[0])
            elif kind == "module":
                m = _ACT_MODULES[args[0]]()
            elif kind == "drop" and args[0] in _DROPS:
                m = _DROPS[args[0]]()
            elif kind == "pool" and args[0] != "F.max_pool2d":
                m = getattr(nn, args[0])(2)
            elif kind == "residual":
                m = Residual(args[0], linear=False)
            elif kind == "residual_fc":
                m = Residual(args[0], linear=True)
            elif kind == "concat":
                m = Concat(*args, linear=False)
            elif kind == "concat_fc":
                m = Concat(*args, linear=True)
            elif kind == "se":
                m = SqueezeExcite(*args)
            elif kind in ("twice", "twice_fc"):
                m = Twice(args[0], linear=kind == "twice_fc")
            elif kind == "flatten":
                if args[0] == "AdaptiveAvgPool2d+Flatten":
                    m = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
                elif args[0] == "AdaptiveAvgPool2d(2)+Flatten":
                    m = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten())
                elif args[0] == "AdaptiveMaxPool2d+flatten":
                    m = nn.AdaptiveMaxPool2d(1)
                elif args[0] == "Flatten":
                    m = nn.Flatten()
            self.kinds.append(op if m is None else (kind, args[0] if args else None))
            self.layers.append(m if m is not None else nn.Identity())
        if spec.get("spare"):
            self.spare = nn.Linear(4, 4)  # never called

    def forward(self, x):
        for (kind, arg, *rest), layer in zip(self.kinds, self.layers):
            if kind == "fn":
                if arg == "F.relu":
                    x = F.relu(x)
                elif arg == "torch.relu":
                    x = torch.relu(x)
                elif arg == "F.leaky_relu":
                    x = F.leaky_relu(x, 0.1)
                elif arg == "x.relu":
                    x = x.relu()
                elif arg == "F.gelu":
                    x = F.gelu(x)
                else:
                    x = x.sigmoid()
            elif kind == "post":
                x = F.log_softmax(x, 1) if arg == "log_softmax" else x.softmax(1) if arg == "softmax" else x / 2
            elif kind == "pool" and arg == "F.max_pool2d":
                x = F.max_pool2d(x, 2)
            elif kind == "drop" and arg == "F.dropout":
                x = F.dropout(x, 0.2, self.training)
            elif kind == "flatten" and arg == "mean":
                x = x.mean((2, 3))
            elif kind == "flatten" and arg == "torch.flatten":
                x = torch.flatten(x, 1)
            elif kind == "flatten" and arg == "view":
                x = x.view(x.size(0), -1)
            elif kind == "flatten" and arg == "AdaptiveMaxPool2d+flatten":
                x = layer(x).flatten(1)
            elif kind == "flatten" and arg == "reshape_fixed":
                x = x.reshape(-1, rest[0])  # a hard-coded width
            else:
                x = layer(x)
        return x


def build_net(seed: int) -> RandomNet:
    return RandomNet(make_spec(seed))


def __getattr__(name: str):
    """``net_<seed>``: the factory a checkpoint's ``tests.grow.test_property:net_<seed>`` names."""
    if name.startswith("net_") and name[4:].isdigit():
        return functools.partial(build_net, int(name[4:]))
    raise AttributeError(name)


# ---------------------------------------------------------------------------------------------
# Random recipes


_SENTINEL_LAYERS = ("", "nope", "layers.99", "layers")


def make_steps(seed: int, model: nn.Module, size: int) -> tuple[list, bool]:
    """Random step *arguments* (built later, so bad arguments are part of the test). Returns
    ``(list of (cls, kwargs)), preserving)``: ``preserving`` recipes have no head step and only
    net2net/zero steps, so before normalization (GrowNorms bypassed) the grown model must compute
    what the base did."""
    rng = random.Random(seed * 7919 + 1)
    names = [n for n, _ in model.named_modules()]
    widths = {n: (m.out_features if isinstance(m, nn.Linear) else m.out_channels)
              for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    preserving = rng.random() < 0.25
    steps: list[tuple[type, dict]] = []
    if not preserving and rng.random() < 0.9:
        head: dict = {"classes": rng.choice([2, 3, 5]) if rng.random() < 0.95 else rng.choice([1, 0, True, 3.0])}
        if rng.random() < 0.1:
            head["layer"] = rng.choice(names)
        steps.append((HeadStep, head))
    for _ in range(rng.randint(1, 3)):
        layer = rng.choice(names) if rng.random() < 0.9 else rng.choice(_SENTINEL_LAYERS)
        if rng.random() < 0.7 and widths:  # bias toward real layers so growth happens often
            layer = rng.choice(list(widths))
        kind = "wide" if rng.random() < 0.6 else "deep"
        r = rng.random()
        if r < 0.04:
            units = 0
        elif r < 0.07:
            units = -rng.randint(1, 3)
        elif kind == "deep" and layer in widths and rng.random() < 0.6:
            units = widths[layer]
        else:
            units = rng.randint(1, 7) if rng.random() < 0.9 else rng.randint(8, 40)
        if preserving:
            init = "net2net" if kind == "deep" else rng.choice(["net2net", "zero"])
            norm, gamma = rng.random() < 0.4, "auto"  # with norm: checked with the GrowNorms bypassed
        else:
            init = rng.choice(["random", "net2net", "zero"])
            norm = rng.random() < 0.75
            g = rng.random()
            gamma = "auto" if g < 0.6 else round(rng.uniform(0.5, 20), 3) if g < 0.95 else rng.choice([0, -1.0, "big"])
        kwargs = {"kind": kind, "layer": layer, "units": units, "init": init, "norm": norm, "gamma_init": gamma}
        if rng.random() < 0.1:  # a value of the wrong kind or out of range (a hand-written recipe file)
            key, bad = rng.choice([("units", True), ("units", 2.0), ("units", "4"), ("kind", "tall"), ("init", "xavier"),
                                   ("norm", 1), ("eps", 0.0), ("eps", -1e-6), ("eps", True), ("eps", 1e-3),
                                   ("gamma_init", float("nan")), ("gamma_init", float("inf")), ("layer", 3)])
            kwargs[key] = bad
        steps.append((GrowStep, kwargs))
    return steps, preserving


# ---------------------------------------------------------------------------------------------
# One case


@dataclass
class Outcome:
    seed: int
    grown: list[str] = field(default_factory=list)      # steps applied
    refused: list[str] = field(default_factory=list)    # one-line messages
    preserved: bool | None = None
    exported: bool = False


def _check_message(exc: SurgeonError, what: str) -> str:
    msg = str(exc)
    assert msg.strip(), f"{what}: a {type(exc).__name__} with an empty message"
    assert "\n" not in msg and "\r" not in msg, f"{what}: a multi-line message: {msg!r}"
    assert "surgeon bug" not in msg, f"{what}: the analysis let a breaking edit through: {msg}"
    return msg


def _shapes(gm) -> dict:
    return {k: tuple(v.shape) for k, v in gm.state_dict().items()}


def _images(n: int, size: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def run_case(seed: int, export: bool = False, tmp_path=None) -> Outcome:
    spec = make_spec(seed)
    size = spec["size"]
    torch.manual_seed(seed)
    base = randomize_batchnorms(RandomNet(spec), seed).eval()
    x = _images(4, size, seed)
    with torch.no_grad():
        ref = base(x)  # the generator's models always run
    out = Outcome(seed)
    gm = trace(copy.deepcopy(base))
    state = GrowthState(input_size=size)
    applied = []
    step_args, preserving = make_steps(seed, base, size)
    torch.manual_seed(seed + 1)
    for cls, kwargs in step_args:
        desc = f"seed {seed}: {cls.__name__}({kwargs})"
        try:
            step = cls(**kwargs)
        except SurgeonError as exc:
            out.refused.append(_check_message(exc, desc))
            continue
        before = _shapes(gm)
        try:
            apply_steps(gm, [step], state)
        except SurgeonError as exc:
            out.refused.append(_check_message(exc, desc))
            assert _shapes(gm) == before, f"{desc}: refused, but the model was changed"
            continue
        applied.append(step)
        out.grown.append(desc)
    gm.eval()
    if any(isinstance(s, GrowStep) for s in applied):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "no signal" for dead activations is fine here
            calibrate_gamma(gm, _images(8, size, seed + 2))
    with torch.no_grad():
        y = gm(x)
    classes = next((s.classes for s in applied if isinstance(s, HeadStep)), spec["classes"])
    assert y.shape == (4, classes), f"seed {seed}: output {tuple(y.shape)} after {out.grown}"
    assert torch.isfinite(y).all(), f"seed {seed}: non-finite output after {out.grown}"
    if preserving and applied and _deep_inputs_non_negative(gm, state, x):
        # as tests/grow/test_function_preserving.py: the GrowNorms pass their input through
        hooks = [gm.get_submodule(n).register_forward_hook(lambda _m, inp, _out: inp[0]) for n in state.norms]
        with torch.no_grad():
            y_before_norm = gm(x)
        for h in hooks:
            h.remove()
        err = float((y_before_norm - ref).abs().max()) / max(float(ref.abs().max()), 1e-6)
        out.preserved = err < 1e-4
        assert out.preserved, f"seed {seed}: net2net/zero growth changed the function before normalization by {err:.1e}: {out.grown}"
    if export and applied:
        out.exported = _export(seed, gm, applied, size, classes, tmp_path)
    # The grown model trains (last: training mode updates BatchNorm statistics).
    gm.train()
    gm(x).sum().backward()
    return out


def _deep_inputs_non_negative(gm, state: GrowthState, x: torch.Tensor) -> bool:
    """net2net deep blocks are identities on non-negative (post-ReLU) inputs only."""
    seen: list[float] = []
    hooks = [gm.get_submodule(name).register_forward_pre_hook(lambda _m, a: seen.append(float(a[0].min())))
             for name in state.fresh if name != state.head]
    with torch.no_grad():
        gm(x)
    for h in hooks:
        h.remove()
    return all(v >= 0 for v in seen)


def _export(seed: int, gm, applied, size: int, classes: int, tmp_path) -> bool:
    """surgeon's own path: checkpoint → rebuild from the recipe → export → verify at its tolerances."""
    from surgeon.checkpoint import Checkpoint, load_model, save_checkpoint
    from surgeon.export.onnx_export import export_checkpoint
    from surgeon.preprocessing import Preprocessing

    pre = Preprocessing(input_size=size, resize=size)
    ckpt = save_checkpoint(tmp_path / f"grown{seed}.pt", Checkpoint(
        model=f"tests.grow.test_property:net_{seed}", weights="none", recipe=applied,
        classes=[f"c{i}" for i in range(classes)], preprocessing=pre, state_dict=gm.state_dict()))
    rebuilt = load_model(ckpt, trust_code=True)  # the recipe replayed on the architecture + the state dict
    x = _images(3, size, seed + 3)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), gm(x), rtol=1e-5, atol=1e-6)
    result = export_checkpoint(ckpt, tmp_path / f"m{seed}.onnx", trust_code=True)
    assert result.verifications and all(v.ok for v in result.verifications)
    return True


# ---------------------------------------------------------------------------------------------
# The tests

BLOCKS, PER_BLOCK = 6, 50   # 300 cases in CI
EXPORTS_PER_BLOCK = 2       # the first two cases of each block that grow go through ONNX (the slow part)


@pytest.fixture(autouse=True)
def _one_thread():
    # Models this small run fastest on one thread; two oversubscribe a loaded 2-core machine (10x slower).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _run_block(seeds, exports: int, tmp_path) -> list[Outcome]:
    outcomes = []
    for s in seeds:
        o = run_case(s, export=exports > 0, tmp_path=tmp_path)
        exports -= o.exported
        outcomes.append(o)
    return outcomes


@pytest.mark.parametrize("block", range(BLOCKS))
def test_growth_property(block, tmp_path):
    outcomes = _run_block(range(block * PER_BLOCK, (block + 1) * PER_BLOCK), EXPORTS_PER_BLOCK, tmp_path)
    # the generator exercises both sides of the property
    assert any(o.grown for o in outcomes) and any(o.refused for o in outcomes)
    assert any(o.exported for o in outcomes)


SLOW_SEEDS = int(os.environ.get("SURGEON_PROPERTY_SEEDS", "20"))  # more: SURGEON_PROPERTY_SEEDS=200


@pytest.mark.slow
@pytest.mark.parametrize("block", range(2))
def test_growth_property_export_more(block, tmp_path):
    """Every grown model of seeds 1000.. goes through ONNX export and verification (~4 s each)."""
    per = (SLOW_SEEDS + 1) // 2
    _run_block(range(1000 + block * per, 1000 + (block + 1) * per), per, tmp_path)


# ---------------------------------------------------------------------------------------------
# Regressions: what the property test found, as minimal cases.


class _SharedConsumer(nn.Module):
    """conv1 feeds a conv the forward calls twice."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 1)
        self.shared = nn.Conv2d(6, 6, 1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        x = self.shared(F.relu(self.shared(F.relu(self.conv1(x)))))
        return self.fc(x.mean((2, 3)))


class _SharedBatchNorm(nn.Module):
    """One BatchNorm after two layers."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 6, 1), nn.Conv2d(6, 6, 1)
        self.bn = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        x = F.relu(self.bn(self.conv2(F.relu(self.bn(self.conv1(x))))))
        return self.fc(x.mean((2, 3)))


class _NoRunningStats(nn.Module):
    """A BatchNorm1d without running statistics cannot run on one image."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(3 * 4 * 4, 8)
        self.fc2 = nn.Linear(8, 4)
        self.bn = nn.BatchNorm1d(4, track_running_stats=False)
        self.out = nn.Linear(4, 3)

    def forward(self, x):
        return self.out(self.bn(self.fc2(F.relu(self.fc1(x.flatten(1))))))


class _Blocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = Concat(3, 2, 2, linear=False)
        self.conv = nn.Conv2d(4, 5, 1)
        self.fc = nn.Linear(5, 3)

    def forward(self, x):
        return self.fc(F.relu(self.conv(self.block(x))).mean((2, 3)))


def _refused(model: nn.Module, steps, size: int, match: str):
    gm = trace(model.eval())
    state = GrowthState(input_size=size)
    before, code = _shapes(gm), gm.code
    with pytest.raises(SurgeonError) as info:
        apply_steps(gm, steps, state)
    msg = _check_message(info.value, str(steps))
    assert match in msg, msg
    assert _shapes(gm) == before and gm.code == code and not state.grown
    return gm, state


def test_regression_consumer_called_twice_is_refused():
    """seed 20: widening conv1 extended the input of a conv called twice; the second call broke."""
    gm, state = _refused(_SharedConsumer(), [GrowStep("wide", "conv1", 4)], 8,
                         "feeds shared, which is called 2 times in the forward (shared weights)")
    # the model still grows elsewhere after the refusal
    apply_steps(gm, [HeadStep(classes=2)], state)
    with torch.no_grad():
        assert gm(_images(2, 8, 0)).shape == (2, 2)


def test_regression_shared_batchnorm_is_refused():
    _refused(_SharedBatchNorm(), [GrowStep("wide", "conv1", 4)], 8, "a BatchNorm called 2 times")
    _refused(_SharedBatchNorm(), [GrowStep("wide", "conv2", 4)], 8, "a BatchNorm called 2 times")


def test_regression_failed_shape_propagation_leaves_no_stale_shapes():
    """seed 72: the first refusal ("does not run on one image") left the shapes of the nodes before
    the failure, so the next step skipped propagation, edited the model and then failed."""
    gm, state = _refused(_NoRunningStats(), [GrowStep("wide", "fc1", 4)], 4, "does not run on a 3x4x4 image")
    assert not any(n.meta.get("tensor_meta") for n in gm.graph.nodes)
    _refused(gm, [GrowStep("deep", "fc1", 8, init="net2net")], 4, "does not run on a 3x4x4 image")


@pytest.mark.parametrize("layer, match", [
    ("conv1", "its output feeds shared (linear)"),       # seed 130: feeds another conv
    ("shared", "is called 2 times"),
])
def test_regression_head_must_feed_the_model_output(layer, match):
    """seeds 104/130: ``--head`` naming a layer in the middle replaced it with one of ``classes``
    outputs and broke the layers after it."""
    _refused(_SharedConsumer(), [HeadStep(classes=3, layer=layer)], 8, match)


def test_regression_head_feeding_a_concat_is_refused():
    _refused(_Blocks(), [HeadStep(classes=3, layer="block.a")], 8, "its output feeds a concat")


@pytest.mark.parametrize("kwargs", [{"gamma_init": float("inf")}, {"gamma_init": "inf"}, {"gamma_init": "-inf"},
                                    {"eps": float("inf")}, {"eps": float("nan")}])
def test_regression_infinite_gamma_or_eps_is_refused(kwargs):
    """seeds 540, 773, ...: ``gamma_init=inf`` passed ``not v > 0`` and grew a model whose outputs are inf/nan."""
    with pytest.raises(SurgeonError) as info:
        GrowStep("wide", "fc", 2, **kwargs)
    assert "positive finite number" in _check_message(info.value, str(kwargs))
    from surgeon.grow.recipe import step_from_dict  # a recipe file's JSON may say Infinity too
    with pytest.raises(SurgeonError):
        step_from_dict({"op": "grow", "kind": "wide", "layer": "fc", "units": 2, **kwargs})


def test_a_block_name_is_no_layer():
    """A traced-through block was reported as "(Module) is not used by the model's forward"."""
    _refused(_Blocks(), [GrowStep("wide", "block", 2)], 8, "'block' (Concat) is a block of layers")
    _refused(_Blocks(), [HeadStep(classes=3, layer="block")], 8, "'block' (Concat) is a block of layers")


def test_a_step_that_fails_midway_leaves_the_model_as_it_was(monkeypatch):
    """Steps are atomic: an edit failing after others (here: the second consumer) undoes them all."""
    import surgeon.grow.ops as ops

    class TwoConsumers(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1, self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)
            self.bn = nn.BatchNorm2d(4)
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            x = F.relu(self.bn(self.conv1(x)))
            return self.fc((self.a(x) * self.b(x)).mean((2, 3)))

    real, calls = ops._extend_input, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return real(*args, **kwargs)

    monkeypatch.setattr(ops, "_extend_input", failing)
    gm = trace(TwoConsumers().eval())
    state = GrowthState(input_size=8)
    apply_steps(gm, [HeadStep(classes=2)], state)
    before, code, modules = _shapes(gm), gm.code, dict(gm.named_modules())
    fresh, norms = set(state.fresh), list(state.norms)
    with pytest.raises(RuntimeError, match="boom"):
        apply_steps(gm, [GrowStep("wide", "conv1", 2)], state)
    assert _shapes(gm) == before and gm.code == code and dict(gm.named_modules()) == modules
    assert state.fresh == fresh and state.norms == norms and not state.grown
    with torch.no_grad():
        assert gm(_images(2, 8, 0)).shape == (2, 2)


class SplitBatchNormNet(nn.Module):
    """conv -> BatchNorm2d without running statistics -> ReLU -> pool -> head (built by a checkpoint
    as ``tests.grow.test_property:SplitBatchNormNet``)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6, track_running_stats=False)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(F.relu(self.bn(self.conv(x))).mean((2, 3)))


def test_export_split_batchnorm_without_running_stats(tmp_path):
    """seed 3001: widening a conv before a BatchNorm without running statistics grows and runs; the
    export's merge-parallel pass raised ValueError (np.concatenate of None): it now skips, saying why."""
    from surgeon.checkpoint import Checkpoint, save_checkpoint
    from surgeon.export.onnx_export import export_checkpoint
    from surgeon.preprocessing import Preprocessing

    torch.manual_seed(0)
    steps = [HeadStep(classes=2), GrowStep("wide", "conv", 2, norm=False)]
    gm = trace(SplitBatchNormNet().eval())
    apply_steps(gm, steps, GrowthState(input_size=8))
    ckpt = save_checkpoint(tmp_path / "grown.pt", Checkpoint(
        model="tests.grow.test_property:SplitBatchNormNet", weights="none", recipe=steps, classes=["a", "b"],
        preprocessing=Preprocessing(input_size=8, resize=8), state_dict=gm.state_dict()))
    result = export_checkpoint(ckpt, tmp_path / "m.onnx", trust_code=True)
    assert all(v.ok for v in result.verifications)
    merge = next(p for p in result.passes if p["pass"] == "merge-parallel")
    assert any("not constant per-channel vectors" in s["reason"] for s in merge["skipped"]), merge
