"""Shared fixtures: the real test data beside the repo, and small helpers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# One thread per process: the suite runs tiny models, and on 2 cores shared with DataLoader workers
# and subprocesses, OpenMP's spinning threads stalled small operations (20 training steps took
# 54 s with 2 threads under load, 2.4 s with 1). Child processes inherit the setting.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """`../shared/data` (or $PATHM3_TEST_DATA): real slides and the PatchGastric captions."""
    root = Path(os.environ.get("PATHM3_TEST_DATA", REPO.parent / "shared" / "data"))
    if not root.is_dir():
        pytest.skip(f"real test data not found at {root} (set PATHM3_TEST_DATA)")
    return root


@pytest.fixture(scope="session")
def slides_dir(shared_data: Path) -> Path:
    return shared_data / "slides"


# ---------------------------------------------------------------------------------------------
# Small models and batches


def tiny_config(*overrides: str, classes=("benign", "tumour")):
    """configs/demo.yaml with overrides and ``classes`` (a small, fast model). Without caption terms
    (``train.terms``) and mined prototypes (``train.prototypes``): a training run chooses the words
    and mines the directions, and these models are built directly."""
    from pathm3.config import load_config

    return load_config(REPO / "configs" / "demo.yaml", [f"data.classes=[{', '.join(classes)}]", "train.terms.weight=0",
                                                        "train.prototypes.enabled=false", *overrides])


def make_batch(model, bags, labels=None, captions=None, classifier_captions=None):
    """A :class:`pathm3.model.Batch` of tensors ``bags`` (each (M_i, D)); ``labels`` ints (None
    or -100: unlabelled) or, for multi-label, rows of 1/0/NaN."""
    import math

    import torch

    from pathm3.data import pad_bags
    from pathm3.model import Batch

    feats, mask = pad_bags(list(bags))
    c = model.num_classes
    if labels is None:
        targets = torch.full((len(bags), c), math.nan)
    elif torch.is_tensor(labels) and labels.ndim == 2:
        targets = labels.float()
    else:
        targets = torch.full((len(bags), c), math.nan)
        for i, y in enumerate([int(v) for v in labels]):
            if y >= 0:
                targets[i] = torch.nn.functional.one_hot(torch.tensor(y), c).float()
    caps = list(captions) if captions is not None else [None] * len(bags)
    tokens, text = model.tokenize(caps, classifier_captions)
    return Batch([f"s{i}" for i in range(len(bags))], feats, mask, targets, caps, tokens, text)


def fit(model, cfg, n: int, batch_of, steps: int, clip: bool = False):
    """Train ``model`` for ``steps`` AdamW steps with the config's warmup + cosine schedule, each on
    ``batch_of(idx)``: 8 indices into ``n`` items drawn from a generator seeded 0; ``clip`` clips
    gradients at ``train.gradient_clip``. Returns the model (still in train mode)."""
    from pathm3.optim import build_optimizer, build_scheduler

    opt = build_optimizer(model, cfg.train)
    sched = build_scheduler(opt, cfg.train, steps)
    order = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, n, (8,), generator=order).tolist()
        loss = model(batch_of(idx)).loss
        opt.zero_grad()
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.gradient_clip)
        opt.step()
        sched.step()
    return model


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """One tiny PathM3 trained for 3 epochs on a 40-slide synthetic cohort (shared by the tests that
    only read a trained run: eval, predict, heatmaps, checkpoints). Returns the run folder."""
    from pathm3.cli import train_main
    from pathm3.errors import run_cli
    from pathm3.synthetic import write_cohort

    tmp = tmp_path_factory.mktemp("trained")
    write_cohort(tmp / "cohort", n_slides=40, dim=64, seed=0)
    args = ["--config", str(REPO / "configs" / "demo.yaml"), "--no-progress",
            "--set", f"data.manifest={tmp / 'cohort' / 'manifest.csv'}", "--set", f"data.bags_dir={tmp / 'cohort' / 'bags'}",
            "--set", f"train.output_dir={tmp / 'runs'}", "--set", "train.max_epochs=3", "--set", "train.warmup_steps=5",
            "--set", "eval.num_beams=1", "--set", "eval.max_new_tokens=12"]
    assert run_cli(train_main, args) == 0
    return tmp / "runs" / "demo" / "seed0"


@pytest.fixture
def ctx(trained_run, tmp_path, monkeypatch):
    """The inputs of a bad-input case (``bad_input_cases.Ctx``), built in the test's own folder from
    the shared trained run; the working folder is the test's, so relative outputs are seen."""
    from bad_input_cases import Ctx

    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    return Ctx(tmp_path, trained_run)
