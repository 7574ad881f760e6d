"""Small shared helpers at the bottom of the package (everything may import them): atomic file
writes, the one YAML reader, the one numeric option check, strict JSON values, device choice,
seeding."""

from __future__ import annotations

import contextlib
import errno
import io
import math
import os
import random
import re
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import yaml

from kvseg.errors import ConfigError

if TYPE_CHECKING:
    import torch

#: The largest seed: NumPy's generators take 0 .. 2**32 - 1.
MAX_SEED = 2**32 - 1


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it over ``path`` atomically.

    A crash (or SIGKILL) at any moment leaves either the previous file or the new one, never a
    half-written file. On an exception the temporary file is removed and ``path`` is untouched;
    an ``OSError`` while writing (a full disk: ENOSPC) is re-raised naming ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:  # a read-only or full folder: name the file asked for, not the temp one
        raise OSError(e.errno, f"{e.strerror} (cannot write it)", str(path)) from e
    os.close(fd)
    tmp = Path(tmp)
    try:
        try:
            try:
                yield tmp
            except Exception as e:  # writers in C++/Rust (torch.save, safetensors) on ENOSPC
                if isinstance(e, OSError) or not _write_failure(e):
                    raise
                code = _disk_errno(e, tmp)
                raise OSError(code, os.strerror(code), str(tmp)) from e
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            # mkstemp creates 0600; give the result the permissions a plain open() would.
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
            os.replace(tmp, path)
        except OSError as e:
            if e.errno is None or e.filename not in (None, str(tmp), tmp):
                raise
            # name the file the user asked for (not the temporary one) and what happened to it
            raise OSError(e.errno, f"{e.strerror} while writing it (the previous version, if "
                                   "any, is kept)", str(path)) from e
    finally:
        if tmp.exists():
            tmp.unlink()


def _write_failure(e: BaseException) -> bool:
    """Whether an error that is not an OSError (torch.save's RuntimeError, safetensors'
    SafetensorError) reports a failed write of the file."""
    text = str(e).lower()
    return any(word in text for word in ("no space", "storagefull", "ioerror", "write failed",
                                         "file write", "os error", "errno"))


def _disk_errno(e: BaseException, tmp: Path) -> int:
    """The errno a writer's message names (Rust's ``code: 28``), else ENOSPC when the folder
    has no free space left, else EIO."""
    code = re.search(r"(?:code|errno|os error):? (\d+)", str(e), re.IGNORECASE)
    if code:
        return int(code.group(1))
    try:
        st = os.statvfs(tmp.parent)
        return errno.ENOSPC if st.f_bavail * st.f_frsize < 1 << 20 else errno.EIO
    except OSError:
        return errno.EIO


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file in the same folder + rename)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def physical_memory() -> int | None:
    """This machine's RAM in bytes (None where the system does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def gigabytes(n: float) -> str:
    """``n`` bytes as ``'1.5 GB'`` (three significant digits)."""
    return f"{n / 1e9:.3g} GB"


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` → CUDA when available, else CPU; ``cpu``/``cuda``/``cuda:N`` as given."""
    import torch  # not at the top: the CLI imports this module before torch may load (MKL_CBWR)

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: CUDA is not available on this machine")
    if device != "cpu" and not device.startswith("cuda"):
        raise ConfigError(f"--device {device!r}: expected auto, cpu, cuda or cuda:N")
    return torch.device(device)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) RNGs."""
    import torch  # see resolve_device

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class _DuplicateKey(Exception):
    """A mapping that names one key twice (plain YAML keeps the last value silently)."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping, naming it and its
    line (the safe loader otherwise lets the later value win without a word)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                if key in seen:
                    raise _DuplicateKey(f"key {key!r} given twice (lines {seen[key]} and {line})")
                seen[key] = line
            except TypeError:  # an unhashable key: let the safe loader report it
                continue
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | os.PathLike) -> dict:
    """One YAML file as a mapping (``yaml.safe_load``: a file never executes).

    Raises FileNotFoundError, or :class:`ConfigError` naming the file when it is not UTF-8,
    not YAML, or not a mapping at the top level.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: config file not found")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except _DuplicateKey as e:
        raise ConfigError(f"{path}: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of option: value at the top level")
    return data


def check_number(name: str, value, *, integer: bool = False, minimum: float | None = None,
                 maximum: float | None = None, min_open: bool = False, max_open: bool = False,
                 optional: bool = False):
    """Validate one numeric option and return it (an int or a finite float).

    ``minimum``/``maximum`` bound it (exclusive with ``min_open``/``max_open``); NaN and
    infinities are always refused; ``optional`` lets ``None`` through. Raises
    :class:`ConfigError` naming the option, e.g. ``img_size=0: must be >= 1``.
    """
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{name}: must not be empty (null)")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        kind = "an integer" if integer else "a number"
        raise ConfigError(f"{name}={value!r}: expected {kind}")
    if integer and not isinstance(value, int):
        raise ConfigError(f"{name}={value!r}: expected an integer")
    if not math.isfinite(value):
        raise ConfigError(f"{name}={value}: must be a finite number")
    def show(bound) -> str:
        return str(bound) if isinstance(bound, int) else f"{bound:g}"

    if minimum is not None and (value <= minimum if min_open else value < minimum):
        raise ConfigError(f"{name}={value}: must be {'>' if min_open else '>='} {show(minimum)}")
    if maximum is not None and (value >= maximum if max_open else value > maximum):
        raise ConfigError(f"{name}={value}: must be {'<' if max_open else '<='} {show(maximum)}")
    return value


def jsonable(obj):
    """``obj`` made strict JSON: NaN/±inf -> None, tuples -> lists, numpy scalars -> Python
    numbers, dict keys -> str; nested dicts and lists are converted throughout."""
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(float(obj)) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (files only, no display), imported when the first
    figure is drawn: matplotlib takes a while to load and most commands draw nothing."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | os.PathLike) -> None:
    """Write a matplotlib figure as PNG (110 dpi, tight) atomically and close it."""
    plt = pyplot()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
