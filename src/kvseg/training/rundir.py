"""Output folders: one owner at a time, and what a training run folder (RUN_DIR) holds.

Ownership: a command that writes into a folder (``train`` into RUN_DIR, ``reproduce`` into OUT,
``predict`` into OUT) holds :class:`FolderLock` on it for as long as it runs. A second kvseg
process asking for the same folder stops at once with one line naming the holder (pid, host,
command, start time). The lock is an advisory ``flock`` on ``FOLDER/.kvseg.lock``, released by
the operating system when the holder exits in any way (also SIGKILL or a crash), so a lock file
left behind by a killed process never blocks anybody: a stale lock is simply taken over. A
normal exit removes the file. On file systems without
``flock`` support (some network mounts) the lock degrades to a warning.

A training run folder holds, all written atomically by rank 0:

- ``config.yaml``  the resolved training config (plus what the data decided);
- ``metrics.csv``  one row per epoch (:data:`METRIC_COLUMNS`);
- ``best.safetensors``  weights with the best validation Jaccard, config in the metadata;
- ``last.ckpt``  the full training state for ``--resume``;
- ``curves.png``  losses and validation metrics per epoch;
- ``eval_<split>.json``  written later by ``kvseg evaluate``.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path

from kvseg.errors import RunDirError
from kvseg.utils import atomic_path, atomic_write_text, pyplot

log = logging.getLogger(__name__)

BEST = "best.safetensors"
LAST = "last.ckpt"
CONFIG = "config.yaml"
METRICS = "metrics.csv"
CURVES = "curves.png"
LOCK = ".kvseg.lock"
#: Files whose presence means the folder holds (part of) a training run. ``config.yaml`` alone
#: is not one: it is written when a run starts, so a run killed in its first epoch leaves only
#: it, and starting again loses nothing.
RUN_FILES = (LAST, BEST, METRICS)
METRIC_COLUMNS = ("epoch", "train_loss", "val_loss", "jaccard", "weighted_jaccard", "dice",
                  "lr", "seconds", "steps")


class FolderLock:
    """Exclusive ownership of an output folder by this process (see the module docstring).

    Use as a context manager: ``with FolderLock(out, "kvseg train"):``. Raises
    :class:`~kvseg.errors.RunDirError` naming the holder when another process owns the folder.
    The folder is created if needed.
    """

    def __init__(self, folder: str | os.PathLike, command: str = "kvseg") -> None:
        self.folder = Path(folder)
        self.command = command
        self.path = self.folder / LOCK
        self._file = None
        self._created = False  # this lock made the folder: a failed command leaves no trace

    def acquire(self) -> FolderLock:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            log.warning("%s: no file locking on this platform; do not run two kvseg commands "
                        "into it at once", self.folder)
            return self
        if self.folder.exists() and not self.folder.is_dir():
            raise RunDirError(f"{self.folder}: exists and is not a folder")
        self._created = not self.folder.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        while True:
            f = open(self.path, "a+")  # noqa: SIM115 - held open for the lock's lifetime
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                holder = _describe(f.read())
                f.close()
                raise RunDirError(f"{self.folder}: in use by another kvseg process ({holder}); "
                                  "wait for it to finish or choose another output "
                                  "folder") from None
            except OSError as e:  # e.g. ENOLCK on a network file system
                log.warning("%s: cannot lock (%s); do not run two kvseg commands into it at "
                            "once", self.folder, e.strerror)
                f.close()
                return self
            # the holder before us may have removed the file after we opened it: then we locked
            # a file nobody else will see; start again on the one at the path
            try:
                same = os.stat(self.path).st_ino == os.fstat(f.fileno()).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            f.close()
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                            "command": self.command,
                            "started": time.strftime("%Y-%m-%d %H:%M:%S")}))
        f.flush()
        self._file = f
        return self

    def release(self, failed: bool = False) -> None:
        """Remove the lock file (while still holding it) and unlock. ``failed``: the command
        stopped with an error; a folder this lock created is removed if it is still empty."""
        if self._file is not None:
            import fcntl

            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()
            self._file = None
        if failed and self._created:
            with contextlib.suppress(OSError):  # not empty (or gone): keep it
                self.folder.rmdir()
            self._created = False

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, exc_type, *exc) -> None:
        self.release(failed=exc_type is not None)


def _describe(text: str) -> str:
    try:
        h = json.loads(text)
        return f"pid {h['pid']} on {h['host']}, `{h['command']}`, since {h['started']}"
    except (ValueError, KeyError, TypeError):
        return "holder unknown"


def check_new_run(run_dir: Path) -> None:
    """Refuse to start a fresh run in a folder that holds (part of) another run.

    A folder with ``last.ckpt`` can be continued with ``--resume``; one with only some of the
    run files (e.g. ``best.safetensors`` without ``last.ckpt``, left by a copy or a cleanup) is
    refused as well, since a fresh run would overwrite its weights and leave its evaluation
    beside them.
    """
    present = [n for n in RUN_FILES if (run_dir / n).exists()]
    present += sorted(p.name for p in run_dir.glob("eval_*.json")) if run_dir.is_dir() else []
    if not present:
        return
    if LAST in present:
        raise RunDirError(f"{run_dir}: already holds a run ({LAST}); pass --resume to continue "
                          "it or choose another --out")
    raise RunDirError(f"{run_dir}: holds files of an earlier run ({', '.join(present)}) but no "
                      f"{LAST} to resume from; choose another --out (or move those files away)")


def command_line() -> str:
    """This process's command line, shortened, for lock files and reports."""
    argv = [Path(sys.argv[0]).name, *sys.argv[1:]] if sys.argv else ["python"]
    text = " ".join(argv)
    return text if len(text) < 200 else text[:197] + "..."


# --------------------------------------------------------------------------- metrics.csv
def write_metrics_csv(path: Path, history: list[dict]) -> None:
    """One row per epoch, columns :data:`METRIC_COLUMNS`; empty cells where not measured."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(METRIC_COLUMNS)
    for row in history:
        w.writerow(["" if row.get(k) is None else row[k] for k in METRIC_COLUMNS])
    atomic_write_text(path, buf.getvalue())


def plot_curves(path: Path, history: list[dict]) -> None:
    """Loss (train, val) and validation metrics per epoch -> PNG (matplotlib Agg)."""
    fig = pyplot().Figure(figsize=(10, 4))
    ax1, ax2 = fig.subplots(1, 2)
    ep = [r["epoch"] for r in history]
    ax1.plot(ep, [r["train_loss"] for r in history], "o-", label="train")
    val = [(r["epoch"], r["val_loss"]) for r in history if r["val_loss"] is not None]
    if val:
        ax1.plot(*zip(*val, strict=True), "s-", label="val")
    ax1.set(xlabel="epoch", ylabel="loss", title="loss")
    ax1.legend()
    for key in ("jaccard", "weighted_jaccard", "dice"):
        pts = [(r["epoch"], r[key]) for r in history if r[key] is not None]
        if pts:
            ax2.plot(*zip(*pts, strict=True), "o-", label=key)
    ax2.set(xlabel="epoch", ylabel="score", title="validation", ylim=(0, 1))
    ax2.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)


__all__ = ["BEST", "CONFIG", "CURVES", "LAST", "LOCK", "METRICS", "METRIC_COLUMNS", "RUN_FILES",
           "FolderLock", "check_new_run", "command_line", "plot_curves", "write_metrics_csv"]
