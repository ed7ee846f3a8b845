"""The import graph keeps the layering DESIGN.md §3 describes (data flows one way):

    base  <  grow  <  model (zoo, source, checkpoint)  <  train  <  export  <  trt  <  runtime  <  analyze  <  api  <  cli

A module imports only from its own layer or lower ones (lazy imports inside functions count too;
``if TYPE_CHECKING:`` blocks do not). The deploy side stays torch-free: no module of trt/ or runtime/
imports torch or torchvision except the torch backend, and the base modules, surgeon.spec's users
and the CLI's module-level imports never reach torch. And there is no import cycle.

A small AST check (import-linter is not a dependency)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "surgeon"

# Lowest first. Modules are matched by their longest listed prefix.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("surgeon.errors", "surgeon.spec", "surgeon.contract", "surgeon.imageio", "surgeon.preprocessing",
              "surgeon.fileio", "surgeon.collect", "surgeon.log", "surgeon.cuda", "surgeon.onnxrt", "surgeon.runner")),
    ("grow", ("surgeon.grow",)),
    ("model", ("surgeon.zoo", "surgeon.source", "surgeon.checkpoint")),
    ("train", ("surgeon.train",)),
    ("export", ("surgeon.export",)),
    ("trt", ("surgeon.trt",)),
    ("runtime", ("surgeon.runtime",)),
    ("analyze", ("surgeon.analyze",)),
    ("api", ("surgeon.api",)),
    ("cli", ("surgeon.commands", "surgeon.cli", "surgeon.__main__")),
]
TORCH = ("torch", "torchvision")
# Imported torch-free at module level, whatever they import lazily.
TORCH_FREE_AT_IMPORT = ("surgeon.spec", "surgeon.contract", "surgeon.errors", "surgeon.imageio", "surgeon.preprocessing",
                        "surgeon.fileio", "surgeon.collect", "surgeon.log", "surgeon.cuda", "surgeon.onnxrt", "surgeon.runner", "surgeon.grow.recipe",
                        "surgeon.train.config", "surgeon.cli", "surgeon.commands", "surgeon.trt", "surgeon.runtime",
                        # surgeon quantize runs in the deploy install
                        "surgeon.export.quantize", "surgeon.export.calibration", "surgeon.export.ort_runner")
# The only runtime/trt modules that may import torch at all (even lazily).
TORCH_BACKENDS = {
    "surgeon.runtime.backends.torch_eager": "the torch backend",
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(mod: str, node: ast.ImportFrom, is_pkg: bool) -> str:
    if not node.level:
        return node.module or ""
    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
    base = base[: len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def imports(path: Path) -> tuple[list[tuple[str, bool]], ...]:
    """(imported module, at module level?) for each import outside ``if TYPE_CHECKING:``."""
    mod, tree = module_name(path), ast.parse(path.read_text(), str(path))
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                for orelse in child.orelse:
                    visit(orelse, top)
                continue
            if isinstance(child, ast.Import):
                found.extend((a.name, top) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                target = _resolve(mod, child, path.name == "__init__.py")
                found.append((target, top))
                # `from surgeon.export import grownorm_op` imports the submodule
                found.extend((f"{target}.{a.name}", top) for a in child.names if (PKG.parent / f"{target}.{a.name}".replace(".", "/")).with_suffix(".py").exists()
                             or (PKG.parent / f"{target}.{a.name}".replace(".", "/") / "__init__.py").exists())
            visit(child, top and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(tree, True)
    return (found,)


MODULES = {module_name(p): p for p in sorted(PKG.rglob("*.py"))}
EDGES = {m: imports(p)[0] for m, p in MODULES.items()}


def internal(target: str) -> str | None:
    """The surgeon module an import loads (the longest known prefix), None outside surgeon."""
    while target:
        if target in MODULES:
            return target
        target = target.rpartition(".")[0]
    return None


def layer(mod: str) -> int | None:
    best = None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (mod == p or mod.startswith(p + ".")) and (best is None or len(p) > best[1]):
                best = (i, len(p))
    return None if best is None else best[0]


def test_every_module_has_a_layer():
    assert [m for m in MODULES if m != "surgeon" and layer(m) is None] == []


def test_no_import_from_a_lower_layer_to_a_higher_one():
    bad = []
    for mod, edges in EDGES.items():
        if mod == "surgeon":  # the package facade (surgeon.load) sits above everything
            continue
        for target, _ in edges:
            dep = internal(target)
            if dep and dep != "surgeon" and layer(dep) > layer(mod):
                bad.append(f"{mod} ({LAYERS[layer(mod)][0]}) imports {dep} ({LAYERS[layer(dep)][0]})")
    assert bad == []


def test_trt_and_runtime_import_no_torch_except_the_torch_backend():
    bad = [f"{mod} imports {target}" for mod, edges in EDGES.items()
           if mod.startswith(("surgeon.trt", "surgeon.runtime")) and mod not in TORCH_BACKENDS
           for target, _ in edges if target.split(".")[0] in TORCH]
    assert bad == []


def _module_level_closure(mod: str) -> set[str]:
    seen, todo = set(), [mod]
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        parts = m.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)) if ".".join(parts[:i]) in MODULES)  # parents run first
        for target, top in EDGES.get(m, []):
            if top:
                todo.append(internal(target) or target)
    return seen


def test_torch_free_modules_reach_no_torch_when_imported():
    bad = {}
    for mod in MODULES:
        if any(mod == p or mod.startswith(p + ".") for p in TORCH_FREE_AT_IMPORT) and mod not in TORCH_BACKENDS:
            reached = {m for m in _module_level_closure(mod) if m.split(".")[0] in TORCH}
            if reached:
                bad[mod] = sorted(reached)
    assert bad == {}


def _import_graph() -> dict[str, set[str]]:
    return {m: {d for t, _ in edges if (d := internal(t)) and d != m and d != "surgeon"} for m, edges in EDGES.items()}


def _cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def strongconnect(v: str) -> None:  # Tarjan
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(comp)

    for v in graph:
        if v not in index:
            strongconnect(v)
    return out


def test_no_import_cycles():
    assert [sorted(c) for c in _cycles(_import_graph())] == []


def test_the_check_sees_what_it_should():
    # Guards against a checker that passes because it finds nothing.
    assert any(t == "torch" for t, _ in EDGES["surgeon.grow.grownorm"])
    assert "surgeon.checkpoint" in {internal(t) for t, _ in EDGES["surgeon.source"]}
    # The cycle finder finds the kind of cycle base.py ↔ the passes once was (a lazy import back).
    graph = _import_graph()
    graph["surgeon.export.passes.graph"] = graph["surgeon.export.passes.graph"] | {"surgeon.export.passes.base"}
    assert any({"surgeon.export.passes.base", "surgeon.export.passes.graph"} <= c for c in _cycles(graph))
