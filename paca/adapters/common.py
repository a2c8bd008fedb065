"""What every adapter format shares: file names, one atomic writer (a file or a folder) and one
"tensors to contiguous CPU copies" helper.

Atomic means a reader never sees a half-written file or folder under its final name: the data
goes to a temporary name in the same folder, is flushed to disk, and is moved into place with
``os.replace`` (a rename, atomic on POSIX filesystems). A failed write (a full disk, a read-only
folder, a kill) leaves what was there before untouched.

Imports: ``paca.errors`` only.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from paca.errors import PacaError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter.safetensors"  # paca's own format
PEFT_WEIGHTS = "adapter_model.safetensors"  # PEFT's formats (LoRA, PaCA)
PEFT_PREFIX = "base_model.model."
FORMAT = "paca"
FORMAT_VERSION = 1


class OutputExists(PacaError, FileExistsError):
    """The output folder exists and the caller did not ask to replace it."""


class WriteError(PacaError, OSError):
    """Writing an adapter, checkpoint or model failed (disk full, read-only folder, ...);
    what was at the destination before is unchanged."""


def _write_error(target: Path, exc: OSError) -> WriteError:
    reason = exc.strerror or str(exc)
    return WriteError(
        f"could not write {target}: {reason}; free some space or choose a writable folder "
        f"({target} is as it was before)"
    )


def _umask() -> int:
    """The process's umask (read by setting it, so set back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_file(target: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path beside ``target``; when the block ends without an error the file
    written there replaces ``target`` in one rename. Raises ``WriteError`` on an OS error."""
    target = Path(target)
    try:
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        os.close(fd)
    except OSError as exc:
        raise _write_error(target, exc) from exc
    tmp = Path(tmp)
    try:
        yield tmp
        _fsync(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would keep servers' users out
        os.replace(tmp, target)
    except OSError as exc:
        raise _write_error(target, exc) from exc
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike, replace: bool = False) -> Iterator[Path]:
    """Yields an empty staging folder beside ``target``; when the block ends without an error it
    becomes ``target`` in one rename (an existing ``target`` is replaced only if ``replace``).

    Raises:
        OutputExists: ``target`` exists and ``replace`` is False (checked before anything is
            written).
        WriteError: an OS error while writing; ``target`` is as it was.
    """
    target = Path(target)
    old = target.parent / f".{target.name}.old"
    if old.is_dir() and not target.exists():
        os.replace(old, target)  # a replace killed between its two renames: put the old back
    if target.exists() and not replace:
        raise OutputExists(f"{target} exists; choose another output or pass force=True")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(
            tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        )
    except OSError as exc:
        raise _write_error(target, exc) from exc
    try:
        yield staging
        os.chmod(staging, 0o777 & ~_umask())  # mkdtemp's 0700, as a plain mkdir would make it
        move_into_place(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def move_into_place(staged: str | os.PathLike, target: str | os.PathLike) -> None:
    """Flushes the finished folder ``staged`` to disk and renames it to ``target``, replacing
    what is there (moved aside first, removed once the new folder is in place; put back if the
    rename fails).

    Raises:
        WriteError: an OS error; ``target`` is as it was.
    """
    staged, target = Path(staged), Path(target)
    old = target.parent / f".{target.name}.old"
    try:
        for file in staged.rglob("*"):
            if file.is_file():
                _fsync(file)
        if target.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)  # a folder cannot be replaced by rename while it has files
        os.replace(staged, target)
    except OSError as exc:
        if old.exists() and not target.exists():
            os.replace(old, target)
        raise _write_error(target, exc) from exc
    finally:
        shutil.rmtree(old, ignore_errors=True)


def cpu_tensors(tensors: Mapping[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """``{prefix + name: a contiguous CPU copy}``: what safetensors can write (it refuses views
    and tensors sharing storage, such as tied weights). A tensor sharded by FSDP2 (a DTensor)
    is gathered whole first: a collective, so every process of the group must call this."""
    return {f"{prefix}{name}": _whole(value) for name, value in tensors.items()}


def _whole(value: torch.Tensor) -> torch.Tensor:
    value = value.detach()
    if hasattr(value, "full_tensor"):  # torch.distributed.tensor.DTensor
        value = value.full_tensor()
    return value.to("cpu").contiguous().clone()


def base_model_name(model) -> str | None:
    """``config._name_or_path`` of a transformers model (``None`` if it has none)."""
    return getattr(getattr(model, "config", None), "_name_or_path", None) or None
