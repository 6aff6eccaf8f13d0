"""A whole extraction run: shards, per-slide claims, preparing ahead, and extraction.csv.

* Shards: ``--shard i/n`` (or torchrun's RANK / WORLD_SIZE) takes every n-th slide from the i-th.
* Claims: every process writing into one output folder takes a per-slide lock (a byte-range lock
  on ``<output>/.extraction.claims``) before it looks at a slide and keeps it until the slide's
  row is in extraction.csv. Two runs started on the same folder therefore never encode a slide
  twice: a slide claimed by the other run is put back and taken up after this run's free slides,
  and by then the other run has usually written it (its row stands; this run counts it as skipped
  and writes no row). The locks die with the process, so a killed run leaves no stale claim.
* Preparing ahead: while slide i is encoded, a background thread prepares slide i+1 (open,
  thumbnail, tissue mask, grid, preview), so the encoder does not wait between slides. The thread
  is only started after slide i's reader processes have been forked.
"""

from __future__ import annotations

import csv
import errno
import fcntl
import hashlib
import os
import re
import threading
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
from tqdm.auto import tqdm

from feature_extraction.encoders import Encoder, load_encoder
from feature_extraction.pipeline import PreparedSlide, finish, one_line, open_batches, prepare
from feature_extraction.settings import CSV_COLUMNS, PRECISIONS, ExtractionSettings, SlideJob, SlideResult
from feature_extraction.slides import SlideError
from pathm3.bags import BagInfo, inspect_bag
from pathm3.errors import DataError, UsageError
from pathm3.files import write_csv

CLAIMS_FILE = ".extraction.claims"
POLL_SECONDS = 0.5


def parse_shard(text: str | None) -> tuple[int, int]:
    """``i/n`` (0-based) -> (i, n); without it, torchrun's RANK / WORLD_SIZE, else (0, 1)."""
    if text is None:
        rank, world = os.environ.get("RANK", "0"), os.environ.get("WORLD_SIZE", "1")
        if not (rank.isdigit() and world.isdigit() and int(rank) < int(world)):
            raise UsageError(f"RANK={rank} WORLD_SIZE={world}: expected 0 <= RANK < WORLD_SIZE (set by torchrun)")
        return int(rank), int(world)
    m = re.fullmatch(r"(\d+)/(\d+)", text.strip())
    if not m or int(m.group(2)) < 1 or int(m.group(1)) >= int(m.group(2)):
        raise UsageError(f"--shard {text}: expected i/n with 0 <= i < n, e.g. --shard 0/4")
    return int(m.group(1)), int(m.group(2))


def current_bag(bag_path: Path, settings: ExtractionSettings) -> BagInfo | None:
    """The bag's info when ``bag_path`` is a complete bag made with these settings, else None."""
    if not bag_path.is_file():
        return None
    try:
        info = inspect_bag(bag_path)
    except DataError:
        return None
    return info if info.attrs.get("extraction_settings") == settings.fingerprint() else None


def bag_is_current(bag_path: Path, settings: ExtractionSettings) -> int | None:
    """N patches when ``bag_path`` is a complete bag made with these settings, else None."""
    info = current_bag(Path(bag_path), settings)
    return None if info is None else info.n_patches


def record_results(csv_path: Path, results: Iterable[SlideResult]) -> None:
    """Insert or update rows of extraction.csv by slide_id, under a folder lock (runs share it)."""
    results = list(results)
    if not results:
        return
    lock = os.open(csv_path.parent, os.O_RDONLY)  # lock the folder: no lock file left behind
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        rows: dict[str, dict] = {}
        if csv_path.is_file():
            with open(csv_path, newline="", encoding="utf-8") as fh:
                rows = {r["slide_id"]: r for r in csv.DictReader(fh)}
        for r in results:
            rows[r.slide_id] = r.row()
        write_csv(csv_path, rows.values(), CSV_COLUMNS)
    finally:
        os.close(lock)  # closing releases the lock


class SlideClaims:
    """Per-slide exclusive locks shared by every process writing into one output folder: one
    byte of ``.extraction.claims`` per slide, at an offset hashed from its slide_id."""

    def __init__(self, out_dir: Path):
        self.fd = os.open(out_dir / CLAIMS_FILE, os.O_RDWR | os.O_CREAT, 0o644)

    @staticmethod
    def _offset(slide_id: str) -> int:
        return int.from_bytes(hashlib.sha256(slide_id.encode()).digest()[:7], "big")

    def try_claim(self, slide_id: str) -> bool:
        try:
            fcntl.lockf(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, self._offset(slide_id))
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                return False
            return True  # a file system without locks: behave as before claims existed
        return True

    def release(self, slide_id: str) -> None:
        try:
            fcntl.lockf(self.fd, fcntl.LOCK_UN, 1, self._offset(slide_id))
        except OSError:
            pass

    def close(self) -> None:
        os.close(self.fd)  # releases every claim this process still holds


class _Background:
    """Run ``fn(*args)`` in a daemon thread; :meth:`result` joins it and returns or re-raises."""

    def __init__(self, fn: Callable, *args):
        self._value, self._error = None, None
        self._thread = threading.Thread(target=self._target, args=(fn, *args), daemon=True, name="pathm3-prepare")
        self._thread.start()

    def _target(self, fn: Callable, *args) -> None:
        try:
            self._value = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            self._error = exc

    def result(self):
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value


def make_output_folder(out_dir: Path) -> None:
    """Create the output folder, or a usage error naming it and the reason."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--output {out_dir}: cannot create this folder ({exc.strerror or exc}); "
                         "choose another location") from None


def run(jobs: Sequence[SlideJob], out_dir: str | os.PathLike, settings: ExtractionSettings,
        shard: tuple[int, int] = (0, 1), encoder: Encoder | None = None) -> list[SlideResult]:
    """Process this shard's jobs; returns one result per slide (also recorded in extraction.csv).
    Nothing is written before the settings, and the encoder when one is needed, are accepted."""
    settings.validate()
    out_dir = Path(out_dir)
    mine = list(jobs)[shard[0]::shard[1]]
    if encoder is None and any(settings.overwrite or current_bag(out_dir / f"{j.slide_id}.h5", settings) is None
                               for j in mine):
        encoder = _load(settings)
    make_output_folder(out_dir)
    claims = SlideClaims(out_dir)
    try:
        return _Run(mine, out_dir, settings, encoder, claims).execute()
    finally:
        claims.close()


def _load(settings: ExtractionSettings) -> Encoder:
    return load_encoder(settings.encoder, settings.weights).to(torch.device(settings.device),
                                                               PRECISIONS[settings.precision])


class _Run:
    """The loop over one process's slides (see the module docstring)."""

    def __init__(self, jobs: list[SlideJob], out_dir: Path, settings: ExtractionSettings,
                 encoder: Encoder | None, claims: SlideClaims):
        self.queue, self.out_dir, self.settings, self.claims = list(jobs), out_dir, settings, claims
        self.encoder = encoder
        self.started = time.time()
        self.results: list[SlideResult] = []
        self.unrecorded: list[SlideResult] = []
        self.bar = tqdm(total=len(jobs), desc="slides", unit="slide", disable=not settings.progress,
                        dynamic_ncols=True)

    def execute(self) -> list[SlideResult]:
        try:
            job = self._next(wait=True)
            pending = self._prepare(job)
            while job is not None:
                prepared, batches = self._start(job, pending)  # forks the readers of this slide
                following = self._next(wait=False)
                following_pending = self._prepare(following)  # ... then prepares the next one
                self._finish(job, prepared, batches)
                prepared = batches = None  # lets a failed slide's reader processes shut down
                if following is None:
                    following = self._next(wait=True)
                    following_pending = self._prepare(following)
                job, pending = following, following_pending
            self._record([])
        finally:
            self.bar.close()
        return self.results

    # -- choosing slides

    def _next(self, wait: bool) -> SlideJob | None:
        """Claim the next slide that needs work, recording skips on the way. Without ``wait``,
        None when every queued slide is claimed by another run; with it, wait for one."""
        while self.queue:
            job = next((j for j in self.queue if self.claims.try_claim(j.slide_id)), None)
            if job is None:
                if not wait:
                    return None
                self._record([])
                time.sleep(POLL_SECONDS)
                continue
            self.queue.remove(job)
            if not self._skip(job):
                return job
        return None

    def _skip(self, job: SlideJob) -> bool:
        """Under the claim: True (and a skipped result) when the slide's bag is already current."""
        _remove_stale_temporaries(self.out_dir, job.slide_id)
        bag = self.out_dir / f"{job.slide_id}.h5"
        info = current_bag(bag, self.settings)
        by_other_run = info is not None and bag.stat().st_mtime >= self.started
        if info is None or (self.settings.overwrite and not by_other_run):
            return False
        result = SlideResult(job.slide_id, str(job.path), "skipped", info.n_patches,
                             warning=str(info.attrs.get("warning") or ""))
        self.results.append(result)
        if not by_other_run:  # done by a concurrent run during this one: its own row stands
            self.unrecorded.append(result)
        self.claims.release(job.slide_id)
        self.bar.update(1)
        return True

    # -- one slide

    def _prepare(self, job: SlideJob | None) -> _Background | None:
        if job is None:
            return None
        if self.encoder is None:
            self.encoder = _load(self.settings)
        return _Background(prepare, job, self.settings, self.encoder.input_size)

    def _start(self, job: SlideJob, pending: _Background):
        """(prepared slide, started batches), or (failed result, None)."""
        try:
            prepared: PreparedSlide = pending.result()
            return prepared, open_batches(prepared.dataset, self.settings)
        except Exception as exc:  # noqa: BLE001 - this slide fails alone
            return _failed(job, exc), None

    def _finish(self, job: SlideJob, prepared, batches) -> None:
        result = prepared
        if batches is not None:
            try:
                result = finish(prepared, batches, self.encoder, self.out_dir, self.settings)
            except Exception as exc:  # noqa: BLE001 - a corrupt tile, an unreadable image: this slide only
                result = _failed(job, exc)
        self.results.append(result)
        self._record([result])
        self.claims.release(job.slide_id)
        self.bar.update(1)

    def _record(self, results: list[SlideResult]) -> None:
        record_results(self.out_dir / "extraction.csv", self.unrecorded + results)
        self.unrecorded = []


def _failed(job: SlideJob, exc: Exception) -> SlideResult:
    message = str(exc) if isinstance(exc, SlideError) else f"{type(exc).__name__}: {one_line(exc)}"
    return SlideResult(job.slide_id, str(job.path), "failed", error=" ".join(message.split()))


def _remove_stale_temporaries(out_dir: Path, slide_id: str) -> None:
    # Left by a killed run under pathm3.files.temporary_name's pattern (any pid); only called
    # while this process holds the slide's claim, so no live writer owns them.
    for pattern in (f".{glob_escape(slide_id)}.h5.tmp-*", f"previews/.{glob_escape(slide_id)}.png.tmp-*"):
        for tmp in out_dir.glob(pattern):
            tmp.unlink(missing_ok=True)


def glob_escape(text: str) -> str:
    """``text`` with glob metacharacters made literal."""
    return re.sub(r"([*?\[])", r"[\1]", text)
