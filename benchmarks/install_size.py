"""Installed size of a requirement set, as pip recorded it: walk the dependency closure of the given
requirements through the installed distributions' metadata (markers evaluated, extras followed) and
sum the sizes of the files in each one's RECORD.

    python benchmarks/install_size.py 'surgeon[trt,serve]' --exclude tensorrt   # the serving image's venv
    python benchmarks/install_size.py --pyproject OLD_pyproject.toml --extras trt,serve

Run it in an environment that has every package of the closure installed (e.g. `.venv-serve`). The
Dockerfile's serving image installs `surgeon[trt,serve]` over NVIDIA's TensorRT image, whose own
TensorRT (and its Python) are excluded with --exclude.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import tomllib
from importlib import metadata

from packaging.markers import default_environment
from packaging.requirements import Requirement


def canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _dist(name: str) -> metadata.Distribution | None:
    try:
        return metadata.distribution(name)
    except metadata.PackageNotFoundError:
        return None


def size_of(dist: metadata.Distribution) -> int:
    total = 0
    for f in dist.files or []:
        path = f.locate()
        if os.path.isfile(path):
            total += os.path.getsize(path)
    return total


def closure(requirements: list[str], exclude: set[str], own: dict[str, list[str]]) -> dict[str, int]:
    """{distribution: installed bytes}. ``own``: the project's requirements per extra ("" = base),
    read from its pyproject (so an old pyproject can be measured against the same packages)."""
    env = default_environment()
    seen: dict[str, int] = {}
    todo = [(Requirement(r), None) for r in requirements]
    done_extras: set[tuple[str, str]] = set()
    while todo:
        req, _ = todo.pop()
        name = canon(req.name)
        if name in exclude:
            continue
        if name == "surgeon":
            for extra in ["", *sorted(req.extras)]:
                if ("surgeon", extra) in done_extras:
                    continue
                done_extras.add(("surgeon", extra))
                todo += [(Requirement(r), None) for r in own.get(extra, [])]
            continue
        dist = _dist(name)
        if dist is None:
            raise SystemExit(f"{req.name} is not installed here; run this where every package is")
        if name not in seen:
            seen[name] = size_of(dist)
        for extra in ["", *sorted(req.extras)]:
            if (name, extra) in done_extras:
                continue
            done_extras.add((name, extra))
            for r in dist.requires or []:
                sub = Requirement(r)
                if sub.marker is None or sub.marker.evaluate({**env, "extra": extra}):
                    if sub.marker is not None and "extra" in str(sub.marker) and not extra:
                        continue
                    todo.append((sub, None))
    return seen


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pyproject", default="pyproject.toml")
    ap.add_argument("--extras", default="trt,serve", help="surgeon's extras to install (comma-separated)")
    ap.add_argument("--exclude", default="tensorrt,tensorrt-cu12,tensorrt-cu12-bindings,tensorrt-cu12-libs",
                    help="distributions the base image already has")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    project = tomllib.loads(open(args.pyproject).read())["project"]
    own = {"": project["dependencies"], **project.get("optional-dependencies", {})}
    extras = [e for e in args.extras.split(",") if e]
    sizes = closure([f"surgeon[{','.join(extras)}]" if extras else "surgeon"],
                    {canon(e) for e in args.exclude.split(",") if e}, own)
    total = sum(sizes.values())
    if args.json:
        print(json.dumps({"total_bytes": total, "packages": dict(sorted(sizes.items(), key=lambda kv: -kv[1]))}))
        return
    for name, size in sorted(sizes.items(), key=lambda kv: -kv[1])[:12]:
        print(f"{size / 2**20:9.1f} MiB  {name}")
    print(f"{total / 2**20:9.1f} MiB  total, {len(sizes)} distributions")


if __name__ == "__main__":
    main()
