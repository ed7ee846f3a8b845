"""What the grown units do: the computations behind ``surgeon analyze`` (no plotting here).

For every :class:`~surgeon.grow.grownorm.GrowNorm` of a grown model, on a deterministic subset of
the validation images:

- accuracy of the model with both unit groups, with only the old units and with only the new units
  (the other group's channels are zeroed at the GrowNorm output by a forward hook);
- linear probes (logistic regression) on each group's features and on both, trained and tested on
  a stratified half/half split of the evaluated images;
- γ and pre-normalization activation norms per group, and γ's trajectory from the checkpoint history;
- a 2-D embedding (t-SNE, or PCA above :data:`TSNE_MAX_POINTS` points) of the layer's features;
- the units with the highest mean activation per group and the images that activate them most.

Convolutional features (``[N, C, H, W]``) and token / channels-last features (``[N, ..., C]``,
a GrowNorm with ``axis=-1``) are average-pooled over positions to one value per channel and image;
activation norms are taken over a group's channels at each position and then averaged over positions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from surgeon.errors import DataError, SurgeonError
from surgeon.grow.grownorm import GrowNorm

TSNE_MAX_POINTS = 2000
TOP_IMAGES = 5
SUBSET_SEED = 0
NO_GROWNORM = "nothing to analyze: the model has no GrowNorm (it was not grown with normalization)"


@dataclass
class LayerCapture:
    """Per-image data captured at one GrowNorm (all arrays have one row per evaluated image)."""

    name: str
    groups: tuple[int, ...]
    role: str
    spatial: bool = False
    features: list[np.ndarray] = field(default_factory=list)     # pooled GrowNorm output  [N, C]
    activations: list[np.ndarray] = field(default_factory=list)  # pooled GrowNorm input   [N, C]
    norms: list[np.ndarray] = field(default_factory=list)        # input L2 norm per group [N, G]

    @property
    def widened(self) -> bool:
        return len(self.groups) >= 2

    def group_slices(self) -> dict[str, slice]:
        """Channel ranges: ``old`` (group 0) and ``new`` (all later groups) for a widened layer;
        one ``units`` range for a deepened layer."""
        total = sum(self.groups)
        if not self.widened:
            return {"units": slice(0, total)}
        return {"old": slice(0, self.groups[0]), "new": slice(self.groups[0], total)}


def grow_norms(model: nn.Module) -> list[tuple[str, GrowNorm]]:
    """The GrowNorm modules of ``model`` with their names; raises if there is none."""
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, GrowNorm)]
    if not found:
        raise SurgeonError(NO_GROWNORM)
    return found


def select_subset(n: int, max_images: int) -> list[int]:
    """Deterministic subset of ``range(n)``: all of it, or ``max_images`` indices drawn with a fixed
    seed (sorted)."""
    if n <= max_images:
        return list(range(n))
    rng = np.random.default_rng(SUBSET_SEED)
    return sorted(int(i) for i in rng.choice(n, size=max_images, replace=False))


def _channels_first(x: torch.Tensor, axis: int) -> torch.Tensor:
    """``[N, ..., C]`` (axis -1) → ``[N, C, ...]``; axis 1 as is."""
    return x if axis == 1 or x.dim() == 2 else x.movedim(-1, 1)


def _pool(x: torch.Tensor, axis: int = 1) -> torch.Tensor:
    """[N, C, *spatial] (or [N, *positions, C] for axis -1) → [N, C] (mean over positions)."""
    x = _channels_first(x, axis)
    return x.float().flatten(2).mean(2) if x.dim() > 2 else x.float()


def _group_norms(x: torch.Tensor, groups: tuple[int, ...], axis: int = 1) -> torch.Tensor:
    """L2 norm over each group's channels at each position, averaged over positions: [N, G]."""
    parts = torch.split(_channels_first(x, axis).float(), list(groups), dim=1)
    norms = [p.pow(2).sum(1).sqrt() for p in parts]  # [N, *spatial]
    return torch.stack([n.flatten(1).mean(1) if n.dim() > 1 else n for n in norms], dim=1)


def _zero_channels(keep: slice, total: int, axis: int = 1):
    """A forward hook that zeroes every output channel (on ``axis``) outside ``keep``."""

    def hook(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        mask = torch.zeros(total, dtype=output.dtype, device=output.device)
        mask[keep] = 1
        if axis == -1:  # broadcasts over every leading dim
            return output * mask
        return output * mask.reshape((1, -1) + (1,) * (output.dim() - 2))

    return hook


def _batches(dataset: Any, indices: list[int], batch_size: int, workers: int):
    subset = torch.utils.data.Subset(dataset, indices)
    return torch.utils.data.DataLoader(subset, batch_size=batch_size, shuffle=False, num_workers=workers)


@torch.no_grad()
def _predict(model: nn.Module, dataset: Any, indices: list[int], batch_size: int, workers: int,
             device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    preds, labels = [], []
    for images, y in _batches(dataset, indices, batch_size, workers):
        preds.append(model(images.to(device)).argmax(1).cpu().numpy())
        labels.append(np.asarray(y))
    return np.concatenate(preds), np.concatenate(labels)


@torch.no_grad()
def capture(model: nn.Module, dataset: Any, indices: list[int], *, batch_size: int = 64, workers: int = 0,
            device: torch.device | str = "cpu") -> tuple[dict[str, LayerCapture], np.ndarray, np.ndarray]:
    """One pass over ``indices`` of ``dataset`` recording, at every GrowNorm, the pooled output
    features, the pooled input activations and the per-group input norms. Returns the captures,
    the model's predictions and the labels."""
    device = torch.device(device)
    model.eval().to(device)
    caps: dict[str, LayerCapture] = {}
    handles = []
    for name, m in grow_norms(model):
        cap = caps[name] = LayerCapture(name, tuple(m.groups), str(m.role))

        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor, cap: LayerCapture = cap) -> None:
            x, axis = inputs[0], getattr(module, "axis", 1)
            cap.spatial = x.dim() > 2
            cap.activations.append(_pool(x, axis).cpu().numpy())
            cap.norms.append(_group_norms(x, cap.groups, axis).cpu().numpy())
            cap.features.append(_pool(output, axis).cpu().numpy())

        handles.append(m.register_forward_hook(hook))
    try:
        preds, labels = _predict(model, dataset, indices, batch_size, workers, device)
    finally:
        for h in handles:
            h.remove()
    for cap in caps.values():
        cap.features = np.concatenate(cap.features)  # type: ignore[assignment]
        cap.activations = np.concatenate(cap.activations)  # type: ignore[assignment]
        cap.norms = np.concatenate(cap.norms)  # type: ignore[assignment]
    return caps, preds, labels


@torch.no_grad()
def masked_accuracy(model: nn.Module, norm_name: str, keep: slice, dataset: Any, indices: list[int], *,
                    batch_size: int = 64, workers: int = 0, device: torch.device | str = "cpu") -> float:
    """Accuracy with every channel of GrowNorm ``norm_name`` outside ``keep`` zeroed at its output."""
    module = model.get_submodule(norm_name)
    handle = module.register_forward_hook(_zero_channels(keep, sum(module.groups), getattr(module, "axis", 1)))
    try:
        preds, labels = _predict(model, dataset, indices, batch_size, workers, torch.device(device))
    finally:
        handle.remove()
    return float((preds == labels).mean())


def probe_split(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool]:
    """Half/half split of the evaluated images (stratified by class when every class has at least
    two images; otherwise a plain seeded split). Returns train rows, test rows, stratified?"""
    from sklearn.model_selection import train_test_split

    rows = np.arange(len(labels))
    counts = np.bincount(labels)
    stratified = bool(counts[counts > 0].min() >= 2) and len(labels) >= 2 * len(counts[counts > 0])
    train, test = train_test_split(rows, test_size=0.5, random_state=SUBSET_SEED,
                                   stratify=labels if stratified else None)
    return np.sort(train), np.sort(test), stratified


def probe_accuracy(features: np.ndarray, labels: np.ndarray, train: np.ndarray, test: np.ndarray) -> float | None:
    """Test accuracy of a standardized logistic-regression probe; None when the training half has
    a single class (no probe can be fitted)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if len(np.unique(labels[train])) < 2 or len(test) == 0:
        return None
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=SUBSET_SEED))
    probe.fit(features[train], labels[train])
    return float((probe.predict(features[test]) == labels[test]).mean())


def embed(features: np.ndarray) -> tuple[np.ndarray, str]:
    """2-D embedding: t-SNE (fixed seed) up to :data:`TSNE_MAX_POINTS` points, PCA above."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    x = features.astype(np.float64)
    n = len(x)
    if x.shape[1] < 2 or n < 3:  # nothing to reduce: pad to two dimensions
        out = np.zeros((n, 2))
        out[:, : min(2, x.shape[1])] = x[:, :2]
        return out, "identity"
    if n <= TSNE_MAX_POINTS and n > 5:
        from threadpoolctl import threadpool_limits

        perplexity = float(min(30.0, max(2.0, (n - 1) / 3.0)))
        tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=SUBSET_SEED)
        # one thread: t-SNE's OpenMP loops oversubscribe the cores torch already uses (10x slower)
        with threadpool_limits(1):
            return tsne.fit_transform(x), "t-SNE"
    return PCA(n_components=2, random_state=SUBSET_SEED).fit_transform(x), "PCA"


def stats(values: np.ndarray) -> dict[str, float]:
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0:
        return {"count": 0}
    return {"count": int(v.size), "mean": float(v.mean()), "std": float(v.std()), "min": float(v.min()),
            "median": float(np.median(v)), "max": float(v.max())}


def gamma_history(history: dict[str, Any], name: str) -> dict[str, Any] | None:
    """Mean γ per group at initialisation and after each epoch, from a checkpoint's ``history``;
    None when the history does not record it."""
    init = (history.get("gamma_init") or {}).get(name)
    epochs = []
    for row in history.get("epochs") or []:
        g = (row.get("gamma") or {}).get(name) if isinstance(row, dict) else None
        if g is not None:
            epochs.append({"epoch": int(row.get("epoch", len(epochs) + 1)), "mean_gamma": [float(v) for v in g]})
    if init is None and not epochs:
        return None
    return {"init": [float(v) for v in init] if init is not None else None, "epochs": epochs}


def top_units(activations: np.ndarray, sl: slice, units: int, images: int = TOP_IMAGES) -> list[dict[str, Any]]:
    """The ``units`` channels of ``sl`` with the highest mean (pooled) activation, each with the rows
    of its ``images`` most activating images."""
    block = activations[:, sl]
    means = block.mean(0)
    order = np.argsort(-means, kind="stable")[:units]
    out = []
    for j in order:
        rows = np.argsort(-block[:, j], kind="stable")[:images]
        out.append({"unit": int(sl.start + j), "mean_activation": float(means[j]),
                    "rows": [int(r) for r in rows], "activations": [float(block[r, j]) for r in rows]})
    return out


def check_classes(data_classes: list[str], ckpt_classes: list[str], spec: str) -> None:
    if len(data_classes) != len(ckpt_classes):
        raise DataError(f"{spec} has {len(data_classes)} classes but the checkpoint was trained on "
                        f"{len(ckpt_classes)}; analyze it on data with the checkpoint's classes")


def analyze_model(model: nn.Module, dataset: Any, *, history: dict[str, Any] | None = None, max_images: int = 1000,
                  units: int = 4, batch_size: int = 64, workers: int = 0,
                  device: torch.device | str = "cpu") -> dict[str, Any]:
    """All numbers of the report. Besides the JSON-able metrics, keys starting with ``_`` carry the
    arrays the plots need (embeddings, γ, norms); :func:`surgeon.analyze.report.write_report`
    drops them from ``metrics.json``."""
    grow_norms(model)
    indices = select_subset(len(dataset), max_images)
    if len(indices) < 2:
        raise DataError(f"the validation split has {len(indices)} image(s); analyze needs at least 2")
    caps, preds, labels = capture(model, dataset, indices, batch_size=batch_size, workers=workers, device=device)
    both_acc = float((preds == labels).mean())
    train_rows, test_rows, stratified = probe_split(labels)
    layers: dict[str, Any] = {}
    for name, cap in caps.items():
        module = model.get_submodule(name)
        slices = cap.group_slices()
        gamma = module.gamma.detach().float().cpu().numpy() if module.gamma is not None else None
        info: dict[str, Any] = {
            "kind": "widened" if cap.widened else "deepened",
            "role": cap.role,
            "groups": list(cap.groups),
            "channels": int(sum(cap.groups)),
            "conv": cap.spatial,
            "feature_pooling": "mean over positions" if cap.spatial else "none (one value per channel)",
        }
        acc = {"both": both_acc}
        if cap.widened:
            for key, sl in slices.items():
                acc[f"{key}_only"] = masked_accuracy(model, name, sl, dataset, indices, batch_size=batch_size,
                                                     workers=workers, device=device)
        info["accuracy"] = acc
        probe_sets = dict(slices)
        if cap.widened:
            probe_sets["both"] = slice(0, int(sum(cap.groups)))
        info["probe_accuracy"] = {k: probe_accuracy(cap.features[:, sl], labels, train_rows, test_rows)
                                  for k, sl in probe_sets.items()}
        info["gamma"] = ({k: stats(gamma[sl]) for k, sl in slices.items()} if gamma is not None else None)
        # norms are per GrowNorm group: "old"/"units" is group 0, "new" pools every later group
        norm_vals = {k: cap.norms[:, [0] if k != "new" else list(range(1, len(cap.groups)))].ravel() for k in slices}
        info["activation_norm"] = {k: stats(v) for k, v in norm_vals.items()}
        info["gamma_history"] = gamma_history(history or {}, name)
        embeddings, methods = {}, {}
        for k, sl in probe_sets.items():
            embeddings[k], methods[k] = embed(cap.features[:, sl])
        info["embedding"] = {"method": methods, "points": len(indices), "panels": list(probe_sets)}
        info["top_units"] = {}
        for k, sl in slices.items():
            tops = top_units(cap.activations, sl, units)
            for t in tops:
                t["images"] = [int(indices[r]) for r in t["rows"]]
                t["labels"] = [int(labels[r]) for r in t["rows"]]
            info["top_units"][k] = tops
        info["_gamma"] = {k: gamma[sl] for k, sl in slices.items()} if gamma is not None else None
        info["_norms"] = norm_vals
        info["_embeddings"] = embeddings
        layers[name] = info
    return {
        "images": len(indices),
        "image_indices": [int(i) for i in indices],
        "subset": ("the whole validation split" if len(indices) == len(dataset)
                   else f"{len(indices)} of {len(dataset)} validation images, drawn with seed {SUBSET_SEED}"),
        "accuracy": both_acc,
        "probe": {"classifier": "standardized logistic regression (scikit-learn, lbfgs)",
                  "train_images": len(train_rows), "test_images": len(test_rows),
                  "stratified": stratified},
        "layers": layers,
        "_labels": labels,
    }
