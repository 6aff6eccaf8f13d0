"""Training with Lightning: one run per seed, resumable, then the test split is evaluated.

Run layout, ``train.output_dir/<train.name>/seed<k>/``::

    config.yaml            the resolved config
    run.json               trainable parameters, seconds of training, epochs run
    tokenizer.json         the caption tokenizer (when built from the training captions)
    checkpoints/last.ckpt  Lightning state for --resume (trainable weights, optimizer, loops)
    checkpoints/best.safetensors, last.safetensors   model checkpoints for eval/predict/heatmap
    metrics.csv            per-step and per-epoch logs
    metrics.json, predictions.csv   the test split, evaluated with the best checkpoint

Under DDP (``train.devices`` > 1) every rank trains; rank 0 alone writes checkpoints and
evaluates, and the learning-rate schedule spans ``trainer.estimated_stepping_batches`` (the
optimizer steps of the whole run, whatever the world size).

Determinism: every step reseeds the RNGs from (seed, step) and the sampler shuffles with its own
(seed, epoch) generator, so a run resumed from ``last.ckpt`` retraces the uninterrupted one.
"""

from __future__ import annotations

import importlib.util
import random
import time
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from pathm3 import legacy
from pathm3.config import Config, apply_overrides, config_from_dict, read_yaml, save_config
from pathm3.data import BagCollator, BagDataset, check_bags, limit_patches
from pathm3.errors import DataError, UsageError
from pathm3.evaluate import evaluate, predict, thresholds_of, training_slides, write_json, write_predictions
from pathm3.files import check_writable, write_csv, write_text
from pathm3.manifest import Slide, read_manifest
from pathm3.metrics import start_meteor, tune_thresholds
from pathm3.mining import fit_prototypes
from pathm3.model import Batch, PathM3
from pathm3.optim import build_optimizer, build_scheduler
from pathm3.parts.t5 import NoCaptionerConfig
from pathm3.parts.terms import with_terms
from pathm3.pretrained import (build_model, checkpoint_provenance, checkpoint_tokenizer, load_checkpoint,
                               needs_built_tokenizer, save_checkpoint)
from pathm3.provenance import cohort_provenance
from pathm3.runtime import for_inference
from pathm3.summary import summarise
from pathm3.text import build_word_tokenizer, strip_class_words, word_tokenizer_from_json, word_tokenizer_to_json


def effective_config(cfg: Config) -> Config:
    """Apply ``train.task``: classification trains L_cls only (no captioner), captioning L_gen only."""
    if cfg.train.task == "classification":
        model = cfg.model.model_copy(update={"alpha": 1.0, "captioner": NoCaptionerConfig()})
        return cfg.model_copy(update={"model": model})
    if cfg.train.task == "captioning":
        return apply_overrides(cfg, ["model.alpha=0.0"])
    return cfg


def run_dir(cfg: Config, seed: int) -> Path:
    return Path(cfg.train.output_dir) / cfg.train.name / f"seed{seed}"


class EpochSampler(Sampler[int]):
    """Shuffles with a generator seeded by (seed, epoch): the order does not depend on history."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


class PathM3Module(L.LightningModule):
    """Lightning wrapper: losses, validation accuracy, AdamW with warmup + cosine."""

    def __init__(self, model: PathM3, cfg: Config):
        super().__init__()
        self.model, self.cfg = model, cfg
        self.unstored = {f"model.{k}" for k in model.unstored_keys()}  # weights read from folders again
        self.strict_loading = not self.unstored
        self._val: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def on_fit_start(self) -> None:
        # The evaluation after training scores captions with METEOR, whose Java server takes seconds
        # to load: start it now, beside training, on the rank that evaluates.
        if self.trainer.is_global_zero and self.model.captioner is not None:
            start_meteor()

    def on_train_batch_start(self, batch: Batch, batch_idx: int) -> None:
        # Reseed before every step from (seed, step): Lightning draws from the global RNG at moments
        # that differ between a continuous and a resumed run (e.g. creating loader iterators).
        s = self.cfg.train.seed * 1_000_003 + self.global_step * 101 + self.global_rank
        random.seed(s)
        np.random.seed(s % 2**32)
        torch.manual_seed(s)

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        batch = limit_patches(batch, self.cfg.data.max_patches)
        out = self.model(batch)
        b = len(batch.slide_ids)
        self.log("train/loss", out.loss, batch_size=b, prog_bar=True)
        self.log("train/loss_cls", out.loss_cls, batch_size=b)
        self.log("train/loss_gen", out.loss_gen, batch_size=b)
        if out.loss_contrastive is not None:
            self.log("train/loss_contrastive", out.loss_contrastive, batch_size=b)
        if out.loss_terms is not None:
            self.log("train/loss_terms", out.loss_terms, batch_size=b)
        if out.loss_mix is not None:
            self.log("train/loss_mix", out.loss_mix, batch_size=b)
        self.log("lr", self.optimizers().param_groups[0]["lr"], batch_size=b)
        return out.loss

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        out = self.model(batch)
        b = len(batch.slide_ids)
        self.log("val/loss", out.loss, batch_size=b, prog_bar=True, sync_dist=True)
        self.log("val/loss_gen", out.loss_gen, batch_size=b, sync_dist=True)
        # val/accuracy is image-only (slides without captions are the use case); the forward's
        # logits use the caption when there is one: val/accuracy_image_text.
        image_only = self.model.classify(batch.features, batch.mask)
        self._val.append((image_only.detach().cpu(), out.logits.detach().cpu(), batch.targets.cpu()))

    def on_validation_epoch_end(self) -> None:
        """val/accuracy: share of labelled slides right (multi-label: of known entries right at 0.5)."""
        if not self._val:
            return
        image_only, image_text, targets = (torch.cat(parts) for parts in zip(*self._val))
        self._val.clear()
        for name, logits in (("val/accuracy", image_only), ("val/accuracy_image_text", image_text)):
            accuracy = self._accuracy(logits, targets)
            if accuracy is not None:
                self.log(name, accuracy, prog_bar=name == "val/accuracy", sync_dist=True)

    def _accuracy(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor | None:
        known = ~torch.isnan(targets)
        if self.model.multilabel:
            return ((logits > 0).float() == targets)[known].float().mean() if known.any() else None
        rows = known.all(1)
        return (logits[rows].argmax(-1) == targets[rows].argmax(-1)).float().mean() if rows.any() else None

    def configure_optimizers(self):
        opt = build_optimizer(self.model, self.cfg.train)
        total = int(self.trainer.estimated_stepping_batches)  # the whole run's optimizer steps, any world size
        sched = build_scheduler(opt, self.cfg.train, total)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.unstored:
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k not in self.unstored}


class ExportCheckpoints(L.Callback):
    """After each validation: ``last.safetensors``, and ``best.safetensors`` when the monitored
    metric improves. Its best value is kept in the Lightning checkpoint for resume."""

    def __init__(self, folder: Path, cfg: Config, classes: Sequence[str], tokenizer=None, provenance=None):
        self.folder, self.cfg, self.classes, self.tokenizer = folder, cfg, list(classes), tokenizer
        self.provenance = provenance
        self.best: tuple[float, float] | None = None  # (monitored value, val/loss)

    def on_validation_end(self, trainer: L.Trainer, module: PathM3Module) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        save_checkpoint(module.model, self.folder / "last.safetensors", self.cfg, self.classes, self.tokenizer,
                        self.provenance)
        value = trainer.callback_metrics.get(self.cfg.train.monitor)
        if value is None:
            return
        sign = 1 if self.cfg.train.monitor_mode == "max" else -1
        loss = float(trainer.callback_metrics.get("val/loss", float("inf")))
        # Ties (accuracy saturates early on small validation sets) go to the lower validation
        # loss, which includes the captioning loss: otherwise an early, caption-less model wins.
        key = (sign * float(value), -loss)
        if self.best is None or key > self.best:
            self.best = key
            save_checkpoint(module.model, self.folder / "best.safetensors", self.cfg, self.classes, self.tokenizer,
                            self.provenance)

    def state_dict(self) -> dict[str, Any]:
        return {"best": list(self.best) if self.best else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = tuple(state["best"]) if state.get("best") else None


def _tokenizer(cfg: Config, slides: Sequence[Slide], folder: Path):
    """A word tokenizer built from the training captions when no tokenizer folders are configured
    (a resumed run reads its own); :func:`train_one` saves it once the run is set up."""
    if not needs_built_tokenizer(cfg):
        return None
    path = folder / "tokenizer.json"
    if path.is_file():  # a resumed run keeps its vocabulary
        return word_tokenizer_from_json(path.read_text(encoding="utf-8"))
    texts = [s.caption for s in slides if s.caption and s.split == "train"] or ["no captions"]
    sizes = [getattr(cfg.model.aggregator, "vocab_size", None), getattr(cfg.model.captioner, "vocab_size", None)]
    return build_word_tokenizer(texts, min([s for s in sizes if s] or [512]))


def _mine(model: PathM3, train: Sequence[Slide], seed: int, progress: bool) -> None:
    """With ``train.prototypes``: mine the training bags and write the prototypes into the model."""
    if model.prototypes is not None:
        fit_prototypes(model.prototypes, train, model.term_names, model.multilabel, seed, progress)


def train_one(cfg: Config, seed: int, resume: bool = False, progress: bool = True) -> Path | None:
    """Train one seed (or resume it), evaluate its best checkpoint on the test split; returns the run
    dir (None on DDP ranks other than 0, which neither evaluate nor write results)."""
    cfg = apply_overrides(cfg, [f"train.seed={seed}"])
    out = run_dir(cfg, seed)
    ckpt_dir = out / "checkpoints"
    last = ckpt_dir / "last.ckpt"
    if resume and not last.is_file():
        raise UsageError(f"{out}: nothing to resume (no checkpoints/last.ckpt)")
    classes = list(cfg.data.classes)
    if not classes:
        raise UsageError("data.classes is empty: list the class names in the config")
    slides = read_manifest(cfg.data.manifest, cfg.data.bags_dir, classes, multilabel=cfg.data.multilabel)
    check_bags(slides, cfg.model.feature_dim, progress=progress)
    provenance = cohort_provenance([s.bag_path for s in slides])
    train = [s for s in slides if s.split == "train"]
    val = [s for s in slides if s.split == "val"]
    if not train:
        raise DataError(f"{cfg.data.manifest}: no rows with split=train")
    check_writable(out / "config.yaml")
    cfg = with_terms(cfg, train)
    eff = effective_config(cfg)

    L.seed_everything(seed, workers=True, verbose=False)
    tokenizer = _tokenizer(eff, slides, out)
    model = build_model(eff, tokenizer)
    if not resume:  # a resumed run's checkpoint holds the mined directions
        _mine(model, train, seed, progress)
    cls_text = (lambda c: strip_class_words(c, classes)) if cfg.data.strip_class_words else None
    collate = BagCollator(model.tokenize)
    train_ds = BagDataset(train, classifier_text=cls_text)  # max_patches is applied in the step
    loader = DataLoader(train_ds, batch_size=cfg.train.batch_size, sampler=EpochSampler(len(train_ds), seed),
                        collate_fn=collate, num_workers=cfg.data.num_workers)
    val_loader = (DataLoader(BagDataset(val, classifier_text=cls_text), batch_size=cfg.eval.batch_size,
                             collate_fn=collate, num_workers=cfg.data.num_workers) if val else None)
    module = PathM3Module(model, eff)
    trainer = L.Trainer(
        default_root_dir=str(out),
        max_epochs=cfg.train.max_epochs,
        max_steps=cfg.train.max_steps,
        accelerator=cfg.train.accelerator,
        devices=cfg.train.devices,
        num_nodes=cfg.train.num_nodes,
        strategy=_strategy(cfg),
        precision=_precision(cfg),
        gradient_clip_val=cfg.train.gradient_clip or None,
        accumulate_grad_batches=cfg.train.accumulate_grad_batches,
        deterministic=cfg.train.deterministic,
        check_val_every_n_epoch=cfg.train.check_val_every_n_epoch,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
        enable_progress_bar=progress,
        enable_model_summary=False,
        logger=_loggers(out),
        callbacks=[L.pytorch.callbacks.ModelCheckpoint(dirpath=str(ckpt_dir), filename="last", save_top_k=1,
                                                       every_n_epochs=1, enable_version_counter=False),
                   ExportCheckpoints(ckpt_dir, eff, classes, tokenizer, provenance)],
    )
    # Everything is set up (model, weights, trainer): only now does the run folder get files.
    save_config(cfg, out / "config.yaml")
    if tokenizer is not None and not (out / "tokenizer.json").is_file():
        write_text(out / "tokenizer.json", word_tokenizer_to_json(tokenizer))
    start = time.perf_counter()
    trainer.fit(module, loader, val_loader, ckpt_path=str(last) if resume else None, weights_only=True)
    if not trainer.is_global_zero:
        return None
    seconds, epochs = time.perf_counter() - start, max(1, trainer.current_epoch)
    write_json({"trainable_parameters": sum(p.numel() for _, p in model.trainable_parameters()),
                "fit_seconds": seconds, "epochs": epochs, "seconds_per_epoch": seconds / epochs}, out / "run.json")
    merge_metrics(out)
    evaluate_run(out, progress=progress)
    return out


def evaluate_run(out: Path, split: str = "test", progress: bool = True) -> dict[str, Any]:
    """Evaluate a run's best checkpoint (else last) on a split; writes metrics.json, predictions.csv.
    Multi-label runs with ``eval.tune_thresholds`` first choose per-class thresholds on val and
    store them in the checkpoint (``eval.thresholds``)."""
    ckpt = out / "checkpoints" / "best.safetensors"
    if not ckpt.is_file():
        ckpt = out / "checkpoints" / "last.safetensors"
    model, cfg, classes = load_checkpoint(ckpt)
    model, cfg = for_inference(model, cfg)  # eval.device, eval.precision
    if model.multilabel and cfg.eval.tune_thresholds:
        cfg = _tune_and_store_thresholds(model, cfg, classes, ckpt, progress)
    slides = read_manifest(cfg.data.manifest, cfg.data.bags_dir, classes, splits=[split],
                           multilabel=cfg.data.multilabel)
    metrics, preds = evaluate(model, cfg, classes, slides, progress=progress, reference=training_slides(cfg, classes))
    metrics["checkpoint"] = str(ckpt)
    write_json(metrics, out / "metrics.json")
    write_predictions(preds, classes, out / "predictions.csv", model.multilabel, thresholds_of(cfg, classes))
    return metrics


def _tune_and_store_thresholds(model: PathM3, cfg: Config, classes: list[str], ckpt: Path, progress: bool) -> Config:
    val = read_manifest(cfg.data.manifest, cfg.data.bags_dir, classes, splits=["val"], multilabel=True)
    if not val:
        return cfg
    preds = predict(model, val, classes, batch_size=cfg.eval.batch_size, captions=False, progress=progress,
                    precision=cfg.eval.precision, num_workers=cfg.data.num_workers)
    tuned = tune_thresholds(np.stack([p.targets for p in preds]), np.stack([p.probabilities for p in preds]))
    cfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(
        update={"thresholds": {c: float(t) for c, t in zip(classes, tuned)}})})
    write_json(cfg.eval.thresholds, ckpt.parent.parent / "thresholds.json")
    save_checkpoint(model, ckpt, cfg, classes, checkpoint_tokenizer(ckpt), checkpoint_provenance(ckpt))
    return cfg


def _strategy(cfg: Config) -> str:
    """``ddp`` (and ``auto`` on several devices) become DDP with unused-parameter detection: which
    parts get gradients depends on the batch (a caption dropped at random, slides without captions),
    so ranks can use different parameters in one step, and plain DDP then waits forever."""
    t = cfg.train
    devices = t.devices if isinstance(t.devices, int) else len(t.devices) if isinstance(t.devices, list) else None
    if t.devices in ("auto", -1, "-1") and t.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        devices = torch.cuda.device_count()
    several = (devices or 1) > 1 or t.num_nodes > 1
    if t.strategy == "ddp" or (t.strategy == "auto" and several):
        return "ddp_find_unused_parameters_true"
    return t.strategy


def _precision(cfg: Config) -> str:
    if cfg.train.precision != "auto":
        return cfg.train.precision
    return "bf16-mixed" if torch.cuda.is_available() and cfg.train.accelerator != "cpu" else "32-true"


def _loggers(out: Path) -> list:
    # One CSV log per launch (logs/version_N), merged into metrics.csv by merge_metrics().
    loggers: list = [L.pytorch.loggers.CSVLogger(save_dir=str(out), name="logs")]
    if importlib.util.find_spec("tensorboard") is not None:  # optional: logs there too when installed
        loggers.append(L.pytorch.loggers.TensorBoardLogger(save_dir=str(out), name="tensorboard"))
    return loggers


def merge_metrics(out: Path) -> Path:
    """metrics.csv from every launch's log; a resumed launch replaces rows from its first step on."""
    import csv

    versions = sorted((out / "logs").glob("version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[1]))
    rows: list[dict] = []
    fields: list[str] = []
    for path in versions:
        with open(path, newline="") as fh:
            reader = csv.DictReader(fh)
            new = list(reader)
            fields += [f for f in reader.fieldnames or [] if f not in fields]
        if new:
            first = int(new[0]["step"])
            rows = [r for r in rows if int(r["step"]) < first] + new
    return write_csv(out / "metrics.csv", rows, fields)


# --------------------------------------------------------------------------------------------
# Several seeds: summary.json and summary.md


def train_seeds(cfg: Config, seeds: Sequence[int], progress: bool = True) -> Path | None:
    """Train and evaluate each seed, then write summary.json / summary.md beside the seed folders."""
    dirs = [train_one(cfg, s, progress=progress) for s in seeds]
    if any(d is None for d in dirs):
        return None  # a DDP rank other than 0
    out = Path(cfg.train.output_dir) / cfg.train.name
    summarise(dirs, out)
    return out


def resume_run(folder: str | Path, progress: bool = True) -> Path | None:
    """Continue the run in ``folder`` (a seed folder) from its last Lightning checkpoint."""
    folder = Path(folder)
    cfg_path = folder / "config.yaml"
    if not cfg_path.is_file():
        raise UsageError(f"{folder}: not a run folder (no config.yaml); pass train.output_dir/<name>/seed<k>")
    # Run folders of release 0.2.0 say model.captioner.freeze: read them as today's config.
    cfg = config_from_dict(legacy.upgrade_finetune(read_yaml(cfg_path)), str(cfg_path))
    if run_dir(cfg, cfg.train.seed).resolve() != folder.resolve():
        cfg = apply_overrides(cfg, [f"train.output_dir={folder.parent.parent}", f"train.name={folder.parent.name}"])
    return train_one(cfg, cfg.train.seed, resume=True, progress=progress)
