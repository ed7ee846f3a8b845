"""``surgeon finetune``: grow a pretrained model and fine-tune it on a target task.

The loop follows torchvision's reference classification script (SGD with momentum, step schedule,
``--amp``, ``--resume``, torchrun/DDP) with the paper's protocol: new units, γ and the head at
``lr_new_mult``× the base learning rate.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.utils.data import DataLoader, DistributedSampler, Subset
from tqdm.auto import tqdm

from surgeon import __version__
from surgeon.checkpoint import Checkpoint, checkpoint_from_dict, save_checkpoint
from surgeon.errors import CheckpointError, SurgeonError
from surgeon.fileio import atomic_write_text
from surgeon.grow.ops import GrowthState
from surgeon.grow.recipe import HeadStep, Step
from surgeon.log import LOG
from surgeon.preprocessing import Preprocessing
from surgeon.train import distributed as dist_utils
from surgeon.train.config import FinetuneConfig
from surgeon.train.curves import plot_curves
from surgeon.train.data import DataSplits, load_data
from surgeon.train.grown import calibrate, checkpoint_of, gamma_stats, grow, grown_info
from surgeon.train.params import freeze_frozen_batchnorms, param_groups
from surgeon.train.state import load_train_state, rng_state, save_train_state, set_rng_state
from surgeon.train.summary import LossWatch, run_summary, start_warnings

EpochCallback = Callable[[int, dict[str, Any]], None]


@dataclass
class Prepared:
    """A model ready to train: grown, with its data, and what its checkpoint must record."""

    model: fx.GraphModule
    state: GrowthState
    data: DataSplits
    arch: str
    weights: str
    recipe: list[Step]
    preprocessing: Preprocessing
    gamma_init: dict[str, list[float]] = field(default_factory=dict)  # mean γ per group before training


@dataclass
class FinetuneResult:
    output_dir: Path
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def final_acc(self) -> float:
        return self.history[-1]["val_acc"] if self.history else math.nan

    @property
    def best_acc(self) -> float:
        return max((h["val_acc"] for h in self.history), default=math.nan)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SurgeonError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SurgeonError("--device cuda was asked for but no CUDA device is available")
    return device


def _load_data(config: FinetuneConfig, pre: Preprocessing) -> DataSplits:
    return load_data(config.data, pre, val_split=config.val_split, augment=config.augment,
                     skip_bad_images=config.skip_bad_images, seed=config.seed, root=config.data_root,
                     max_image_pixels=config.max_image_pixels)


def prepare(config: FinetuneConfig) -> Prepared:
    """Build the base model, load the data, replace the head and apply the growth steps."""
    from surgeon.source import open_model

    src = open_model(config.model, config.weights, config.input_size, trust_code=config.trust_code)
    data = _load_data(config, src.preprocessing)
    steps: list[Step] = [HeadStep(classes=len(data.classes), layer=config.head or "")]
    if not config.baseline:
        steps += list(config.grow)
    gm = grow(src, steps)  # the Python API's growth too (surgeon.api.grow_model)
    info = grown_info(gm)
    assert info is not None and src.model is not None
    return Prepared(gm, info.state, data, src.model, src.weights, info.recipe, src.preprocessing)


def _calibration_batch(data: DataSplits, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(data.train), generator=g)[: max(1, min(n, len(data.train)))]
    return torch.stack([data.train[int(i)][0] for i in idx])


def build_optimizer(model: fx.GraphModule, state: GrowthState, config: FinetuneConfig) -> torch.optim.SGD:
    groups = param_groups(model, state, lr=config.lr, new_lr_mult=config.lr_new_mult, tune=config.tune,
                          weight_decay=config.wd)  # the Python API's groups too (surgeon.api.param_groups)
    return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, weight_decay=config.wd)


def _loader(ds, config: FinetuneConfig, *, shuffle: bool, epoch: int, d: dist_utils.Dist, device: torch.device) -> DataLoader:
    # One generator per epoch: data order and augmentation depend on (seed, epoch) only, so a
    # resumed run sees exactly the batches an uninterrupted one would.
    g = torch.Generator().manual_seed(config.seed * 100_003 + epoch)
    sampler = None
    if d.enabled and shuffle:
        sampler = DistributedSampler(ds, num_replicas=d.world, rank=d.rank, shuffle=True, seed=config.seed)
        sampler.set_epoch(epoch)
    elif d.enabled:
        ds = Subset(ds, list(range(d.rank, len(ds), d.world)))  # no padding: exact val metrics
    return DataLoader(ds, batch_size=config.batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
                      num_workers=config.workers, generator=g, pin_memory=device.type == "cuda",
                      persistent_workers=False, drop_last=False)


def _autocast(config: FinetuneConfig, device: torch.device):
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=config.amp)


def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, config: FinetuneConfig,
             d: dist_utils.Dist) -> tuple[float, float]:
    model.eval()
    loss_sum = correct = count = 0.0
    with torch.no_grad():
        for images, labels in loader:
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            with _autocast(config, device):
                logits = model(images)
            loss_sum += float(F.cross_entropy(logits.float(), labels, reduction="sum"))
            correct += float((logits.argmax(1) == labels).sum())
            count += len(labels)
    loss_sum, correct, count = dist_utils.all_sum([loss_sum, correct, count], d, device)
    return loss_sum / max(count, 1), correct / max(count, 1)


def train_one_epoch(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer,
                    scaler: torch.amp.GradScaler | None, device: torch.device, config: FinetuneConfig,
                    epoch: int, d: dist_utils.Dist, progress: bool) -> tuple[float, float]:
    model.train()
    freeze_frozen_batchnorms(model)
    loss_sum = correct = count = 0.0
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{config.epochs}", leave=False, disable=not (progress and d.main),
               dynamic_ncols=True)
    for images, labels in bar:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with _autocast(config, device):
            logits = model(images)
            loss = F.cross_entropy(logits.float(), labels)
        if not torch.isfinite(loss):
            raise SurgeonError(f"the training loss became {float(loss.detach())} in epoch {epoch + 1}; the run diverged: "
                               f"lower --lr (now {config.lr:g}) and start again")
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        n = len(labels)
        loss_sum += float(loss.detach()) * n
        correct += float((logits.detach().argmax(1) == labels).sum())
        count += n
        bar.set_postfix(loss=f"{loss_sum / count:.3f}", acc=f"{correct / count:.3f}")
    loss_sum, correct, count = dist_utils.all_sum([loss_sum, correct, count], d, device)
    return loss_sum / max(count, 1), correct / max(count, 1)


def _checkpoint(p: Prepared, model: nn.Module, history: list[dict], config: FinetuneConfig) -> Checkpoint:
    # What surgeon.api.save writes too; this run adds its epochs and settings.
    return checkpoint_of(model, classes=p.data.classes, preprocessing=p.preprocessing, history=history,
                         train_args=config.to_dict())


def finetune(config: FinetuneConfig, *, resume: str | Path | None = None, progress: bool = True,
             on_epoch_end: EpochCallback | None = None, epochs_override: int | None = None) -> FinetuneResult:
    """Run (or resume) a fine-tuning job; writes ``metrics.jsonl``, ``checkpoint.pt``, ``grown.pt``
    and ``curves.png`` under ``config.output_dir``."""
    resumed = load_train_state(resume) if resume else None
    if resumed is not None:
        config = resumed_config(resumed, resume, config, epochs_override)  # type: ignore[arg-type]
    device = resolve_device(config.device)
    d = dist_utils.setup(device)
    if device.type == "cuda" and d.enabled:
        device = torch.device("cuda", d.local_rank)
        torch.cuda.set_device(device)
    out = Path(config.output_dir)
    try:
        torch.manual_seed(config.seed)
        if resumed is None:
            prepared = prepare(config)
            model = prepared.model.to(device)
            calibrate(model, _calibration_batch(prepared.data, config.calib_samples, config.seed).to(device))
            prepared.gamma_init = gamma_stats(model)
            history: list[dict[str, Any]] = []
            start = 0
            notes = run_summary(prepared, config, device)
            warnings = start_warnings(config, prepared.weights)
        else:
            prepared = _prepare_resumed(config, resumed)
            model = prepared.model.to(device)
            history = list(resumed["history"])
            start = int(resumed["epoch"])
            notes = [f"resuming {out} after epoch {start} of {config.epochs} ({prepared.arch} on {config.data}, "
                     f"{len(prepared.data.classes)} classes; training on {device})"]
            warnings = []
        if d.main:
            for line in notes if progress else ():
                tqdm.write(line)
            for line in warnings:
                LOG.warning(line)
        watch = LossWatch(len(prepared.data.classes), config.lr)
        optimizer = build_optimizer(model, prepared.state, config)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=config.step_size, gamma=config.lr_gamma)
        scaler = torch.amp.GradScaler("cuda") if config.amp and device.type == "cuda" else None
        if resumed is not None:
            optimizer.load_state_dict(resumed["optimizer"])
            scheduler.load_state_dict(resumed["scheduler"])
            if scaler is not None and resumed.get("scaler"):
                scaler.load_state_dict(resumed["scaler"])
            set_rng_state(resumed["rng"])
        train_model: nn.Module = model
        if d.enabled:
            train_model = nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None)
        if d.main:
            out.mkdir(parents=True, exist_ok=True)
            # What this run is (surgeon compare groups runs that differ only in their seed by it).
            atomic_write_text(out / "run.json", json.dumps(config.to_dict(), indent=2))
        val_loader = _loader(prepared.data.val, config, shuffle=False, epoch=0, d=d, device=device)
        for epoch in range(start, config.epochs):
            t0 = time.perf_counter()
            train_loader = _loader(prepared.data.train, config, shuffle=True, epoch=epoch, d=d, device=device)
            lr = config.lr * config.lr_gamma ** (epoch // config.step_size)  # StepLR's rate for this epoch
            train_loss, train_acc = train_one_epoch(train_model, train_loader, optimizer, scaler, device, config,
                                                    epoch, d, progress)
            scheduler.step()
            dist_utils.sync_buffers(model, d)
            val_loss, val_acc = evaluate(model, val_loader, device, config, d)
            alarm = watch.check(epoch + 1, train_loss=train_loss, val_loss=val_loss)
            if alarm and d.main:
                LOG.warning(alarm)
            row = {"epoch": epoch + 1, "train_loss": train_loss, "train_acc": train_acc, "val_loss": val_loss,
                   "val_acc": val_acc, "lr": lr, "lr_new": lr * config.lr_new_mult, "time_s": time.perf_counter() - t0,
                   "gamma": gamma_stats(model)}
            history.append(row)
            if d.main:
                _write_epoch(out, prepared, model, history, config, optimizer, scheduler, scaler, epoch + 1)
                if progress:
                    tqdm.write(f"epoch {epoch + 1}/{config.epochs}  train loss {train_loss:.4f} acc {100 * train_acc:.2f}%  "
                               f"val loss {val_loss:.4f} acc {100 * val_acc:.2f}%  ({row['time_s']:.1f}s)")
            dist_utils.barrier(d)
            if on_epoch_end is not None:
                on_epoch_end(epoch + 1, row)
        if d.main:
            save_checkpoint(out / "grown.pt", _checkpoint(prepared, model, history, config))
            if history:
                plot_curves(history, out / "curves.png", title=_title(config))
        dist_utils.barrier(d)
        return FinetuneResult(out, history)
    finally:
        dist_utils.teardown(d)


def _title(config: FinetuneConfig) -> str:
    if config.baseline or not config.grow:
        return f"{config.model}: baseline fine-tuning on {config.data}"
    steps = ", ".join(f"{s.kind} {s.layer} +{s.units}" for s in config.grow)
    return f"{config.model}: {steps} on {config.data}"


def _write_epoch(out: Path, p: Prepared, model: nn.Module, history: list[dict], config: FinetuneConfig,
                 optimizer, scheduler, scaler, epoch: int) -> None:
    atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(h) + "\n" for h in history))
    save_train_state(out / "checkpoint.pt", {
        "checkpoint": _checkpoint(p, model, history, config).to_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "epoch": epoch,
        "history": history,
        "config": config.to_dict(),
        "rng": rng_state(),
        "surgeon_version": __version__,
    })


def resumed_config(resumed: dict[str, Any], resume: str | Path, caller: FinetuneConfig,
                   epochs_override: int | None = None) -> FinetuneConfig:
    """The settings of a resumed run: the experiment as the interrupted run recorded it, but what
    decides trust and where files go from the caller (the command line), never from the file. An
    edited ``checkpoint.pt`` could otherwise ask to import code or aim the run's writes anywhere."""
    folder = Path(resume)
    if folder.is_file():
        folder = folder.parent
    try:
        config = FinetuneConfig.from_dict(resumed["config"])
    except SurgeonError as exc:
        raise CheckpointError(f"{folder / 'checkpoint.pt'} holds settings surgeon cannot use ({exc})") from None
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"{folder / 'checkpoint.pt'} is a damaged training state (bad settings: {exc})") from None
    config.output_dir = str(folder)
    config.trust_code = caller.trust_code
    config.data_root = caller.data_root
    if epochs_override:
        config.epochs = epochs_override
    return config


def _prepare_resumed(config: FinetuneConfig, resumed: dict[str, Any]) -> Prepared:
    """Rebuild the model of an interrupted run from its training state (no new growth, no γ calibration)."""
    ckpt = checkpoint_from_dict(resumed["checkpoint"], "checkpoint.pt")
    gm = ckpt.build_model(trust_code=config.trust_code)
    gm.train()
    data = _load_data(config, ckpt.preprocessing)
    return Prepared(gm, gm.surgeon_state, data, ckpt.model, ckpt.weights, list(ckpt.recipe), ckpt.preprocessing,  # type: ignore[attr-defined]
                    gamma_init=dict(ckpt.history.get("gamma_init", {})))
