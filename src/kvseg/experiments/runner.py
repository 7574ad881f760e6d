"""One job runner for the commands that train many runs (``reproduce``; a sweep later).

A command builds a list of :class:`Job` (one training run each: its folder, its
:class:`~kvseg.config.TrainConfig` and the settings that define it) and a ``work`` function that
trains, evaluates and profiles one job and returns its result row. :func:`run_jobs` then:

- skips a job whose folder holds ``done.json`` with the same settings (its stored row is used);
- refuses one whose ``done.json`` holds other settings (:class:`~kvseg.errors.RunDirError`):
  an output folder never mixes settings;
- continues an interrupted job from its ``last.ckpt`` (``config.resume``);
- writes ``done.json`` (settings, fingerprint, row) last, atomically, when ``work`` returns;
- with ``n_jobs > 1`` runs the pending jobs in that many worker processes at once (one overall
  progress bar; one ``on_done`` call per finished run). An interrupted parallel run resumes
  like a sequential one: finished runs have ``done.json``, the others continue from
  ``last.ckpt``.

Settings are compared key by key (:func:`same_settings`), not by hash, so a training option
added to kvseg later counts as equal at its default and finished runs stay valid.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import multiprocessing as mp
import os
import shlex
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm.auto import tqdm

from kvseg.config import TrainConfig, config_defaults, config_to_flags
from kvseg.errors import RunDirError
from kvseg.training.rundir import CONFIG, CURVES, LAST, METRICS, RUN_FILES
from kvseg.utils import atomic_write_text, jsonable

log = logging.getLogger(__name__)

DONE = "done.json"
#: Training options that may differ when a run is continued (not part of its settings).
FREE_KEYS = ("out", "device", "resume", "workers", "cache_dir", "cache")


@dataclass
class Job:
    """One training run of a multi-run command.

    Attributes:
        key: what identifies it in the command (e.g. ``("setr_kv", 0)`` for model and seed).
        run_dir: its folder (RUN_DIR of ``kvseg train``, plus ``done.json``).
        config: its training options.
        settings: what a finished run must match to be reused: by default the config without
            :data:`FREE_KEYS`; commands add their own (e.g. profiling settings).
        meta: what the command keeps with the job (not compared), e.g. a sweep's factor.
    """

    key: tuple
    run_dir: Path
    config: TrainConfig
    settings: dict
    meta: dict = field(default_factory=dict)

    @classmethod
    def make(cls, key: tuple, run_dir: Path, config: TrainConfig, *, meta: dict | None = None,
             **extra) -> Job:
        settings = {k: v for k, v in vars(config).items() if k not in FREE_KEYS}
        settings.update(extra)
        return cls(key, Path(run_dir), config, settings, dict(meta or {}))

    def train_command(self) -> str:
        """A self-contained ``kvseg train`` command line for this run (for a cluster
        scheduler); ``--resume`` when the run was started already."""

        argv = ["kvseg", "train", *config_to_flags(self.config, skip=("resume",))]
        if (self.run_dir / LAST).is_file():
            argv.append("--resume")
        return shlex.join(argv)

    @property
    def label(self) -> str:
        return " ".join(str(k) if not isinstance(k, int) else f"seed {k}" for k in self.key)


@dataclass
class JobResult:
    job: Job
    row: dict
    skipped: bool


def fingerprint(settings: dict) -> str:
    """A short hash of the settings (recorded in done.json; not used to compare)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


#: Training options that only watch a run (what they change is not a result): a finished run
#: stays valid when they change.
OBSERVERS = ("tensorboard",)


def same_settings(stored: dict | None, current: dict) -> bool:
    """Whether a finished run's settings equal the current ones. A training option the stored
    run does not list (added to kvseg since) counts as equal when the current value is that
    option's default, so upgrading kvseg does not invalidate finished runs; :data:`OBSERVERS`
    are not compared."""
    if not isinstance(stored, dict):
        return False
    defaults = config_defaults()
    missing = object()
    for key in (set(stored) | set(current)) - set(OBSERVERS):
        a, b = stored.get(key, missing), current.get(key, missing)
        a = defaults.get(key, missing) if a is missing else a
        b = defaults.get(key, missing) if b is missing else b
        if a != b:
            return False
    return True


def read_done(path: Path) -> dict | None:
    """A job's ``done.json`` (None when absent or unreadable: the job is then redone)."""
    if not path.is_file():
        return None
    try:
        done = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        log.warning("%s is unreadable; the run will be redone", path)
        return None
    return done if isinstance(done, dict) and isinstance(done.get("row"), dict) else None


def pending_jobs(jobs: Sequence[Job]) -> list[Job]:
    """The jobs without a finished run (``done.json``), in order."""
    return [job for job in jobs if read_done(job.run_dir / DONE) is None]


def untrained_jobs(jobs: Sequence[Job]) -> list[Job]:
    """The pending jobs whose training has not finished all its epochs (``metrics.csv`` has
    fewer rows than ``epochs``): what ``--list-runs`` hands to a scheduler. A run trained
    elsewhere but not yet evaluated is not listed; the next reproduce/sweep evaluates it."""
    out = []
    for job in pending_jobs(jobs):
        path = job.run_dir / METRICS
        epochs = 0
        if path.is_file() and (job.run_dir / LAST).is_file():
            with contextlib.suppress(OSError, UnicodeDecodeError):
                epochs = max(0, len(path.read_text(encoding="utf-8").splitlines()) - 1)
        if epochs < job.config.epochs:
            out.append(job)
    return out


def run_jobs(jobs: Sequence[Job], work: Callable[[Job], dict], *, progress: bool = True,
             desc: str = "runs", n_jobs: int = 1, threads: int | None = None,
             on_done: Callable[[JobResult], None] | None = None) -> list[JobResult]:
    """Run every job not finished yet (see the module docstring); results in job order.

    Args:
        jobs: the runs, in the order to run them.
        work: trains, evaluates and profiles one job; returns its result row (a dict of plain
            values; NaN allowed, stored as null). With ``n_jobs > 1`` it runs in worker
            processes, so it must be picklable (a module-level function or a
            ``functools.partial`` of one).
        progress: one overall tqdm bar (one run per step).
        desc: the bar's label.
        n_jobs: runs trained at the same time, each in its own process (``spawn``). Each run
            is deterministic on the CPU given its seed and thread count, so the results do not
            depend on ``n_jobs`` as long as ``threads`` is fixed.
        threads: torch CPU threads for each run (None: leave torch's default in-process; in
            worker processes the machine's cores divided by ``n_jobs``).
        on_done: called in this process for each finished (not skipped) job, in completion
            order (e.g. a one-line log).
    """
    for job in jobs:  # refuse mixed settings before anything trains
        done = read_done(job.run_dir / DONE)
        if done is not None and not same_settings(done.get("settings"), job.settings):
            raise RunDirError(f"{job.run_dir} holds a run with other settings (preset, data or "
                              "epochs differ); use another --out")
    results: dict[int, JobResult] = {}
    pending = []
    for i, job in enumerate(jobs):
        done = read_done(job.run_dir / DONE)
        if done is not None:
            results[i] = JobResult(job, done["row"], skipped=True)
            log.info("%s: complete in %s, skipped", job.label, job.run_dir)
        else:
            job.config.resume = (job.run_dir / LAST).is_file()
            if not job.config.resume:
                _clear_partial_run(job.run_dir)
            pending.append(i)
    bar = tqdm(total=len(jobs), initial=len(results), desc=desc, unit="run",
               disable=not progress, dynamic_ncols=True)

    def finish(i: int, row: dict) -> None:
        job = jobs[i]
        row = jsonable(row)
        record = {"fingerprint": fingerprint(job.settings), "settings": job.settings,
                  "row": row, "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        atomic_write_text(job.run_dir / DONE, json.dumps(record, indent=2) + "\n")
        results[i] = JobResult(job, row, skipped=False)
        if on_done is not None:
            on_done(results[i])
        bar.update(1)

    try:
        if n_jobs <= 1 or len(pending) <= 1:
            before = torch.get_num_threads()
            torch.set_num_threads(int(threads or before))
            try:
                for i in pending:
                    bar.set_postfix_str(jobs[i].label)
                    finish(i, work(jobs[i]))
            finally:
                torch.set_num_threads(before)
        else:
            _run_parallel(jobs, pending, work, finish, n_jobs, threads, bar)
    finally:
        bar.close()
    return [results[i] for i in range(len(jobs))]


def _clear_partial_run(run_dir: Path) -> None:
    """Remove what a run of this job left when it was killed before its first ``last.ckpt``
    (e.g. between writing ``best.safetensors`` and ``last.ckpt``): the folder belongs to this
    command's output and the run starts again. Only kvseg's run files are removed."""
    if not run_dir.is_dir():
        return
    stale = [run_dir / n for n in (*RUN_FILES, CONFIG, CURVES)] + list(run_dir.glob("eval_*.json"))
    removed = [p.name for p in stale if p.is_file()]
    for name in removed:
        (run_dir / name).unlink()
    if removed:
        log.warning("%s: removed %s of a run killed before its first checkpoint; it starts "
                    "again", run_dir, ", ".join(removed))


def _run_parallel(jobs: Sequence[Job], pending: list[int], work: Callable[[Job], dict],
                  finish: Callable[[int, dict], None], n_jobs: int, threads: int | None,
                  bar) -> None:
    threads = threads or max(1, (os.cpu_count() or 1) // n_jobs)
    pool = ProcessPoolExecutor(max_workers=min(n_jobs, len(pending)),
                               mp_context=mp.get_context("spawn"), initializer=_init_worker,
                               initargs=(threads,))
    futures = {}
    try:
        for i in pending:
            futures[pool.submit(work, jobs[i])] = i
        bar.set_postfix_str(f"{min(n_jobs, len(pending))} in parallel, {threads} thread(s) each")
        remaining = set(futures)
        while remaining:
            finished, remaining = wait(remaining, return_when=FIRST_COMPLETED)
            for future in sorted(finished, key=lambda f: futures[f]):
                finish(futures[future], future.result())  # a worker's error is raised here
    except BaseException:
        for future in futures:
            future.cancel()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


def _init_worker(threads: int) -> None:
    """A worker process: its torch threads, and quiet logging (the parent reports each run)."""
    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


__all__ = ["DONE", "FREE_KEYS", "Job", "JobResult", "fingerprint", "pending_jobs", "read_done",
           "run_jobs", "same_settings", "untrained_jobs"]
