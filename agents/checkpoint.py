"""Checkpoint files of a run: written atomically with their SHA-256 beside them, read back with torch's weights-only
loader (no code in the file can run), refused with a message naming the file and the way out when damaged or forged.

The file format is torch's zip format restricted to tensors and plain data (dict, list, tuple, str, int, float, bool,
None): exactly what `torch.load(..., weights_only=True)` accepts, checked when saving so that a payload that could not
be read back is refused at once, not at the next resume. `checkpoint.pt.sha256` (the `sha256sum` format) records the
file's digest; it detects flipped bytes and truncation, not a forger who rewrites both files (weights-only loading
is what makes a forged file harmless). Non-finite floating-point tensors are refused in both directions: a NaN never
replaces the last good checkpoint, and a checkpoint holding one is never resumed from silently.
"""

from __future__ import annotations

import errno
import hashlib
import math
import os
import pickle
import re
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

HASH_SUFFIX = ".sha256"
_PLAIN = (str, int, float, bool, type(None))
_RESTART_HINT = (
    "delete {name} and {name}.sha256 in {folder} to restart the run from step 0, or restore both files from a backup"
)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or trusted; the message names the file and what to do."""


class NonFiniteError(RuntimeError):
    """A training step produced a NaN or inf loss or gradient; the message names the step and the offenders."""


# ---------------------------------------------------------------------------------------------------- saving
def save_checkpoint(path: str | Path, payload: Mapping[str, Any]) -> str:
    """Write `payload` to `path` atomically and record its SHA-256 in `path.sha256`; returns the digest.

    A crash at any point leaves a loadable pair: the old checkpoint, or the new one, each matching the digest file
    (during the switch the digest file lists both). A failed write (disk full, permissions) raises CheckpointError,
    removes the temporary file and leaves the previous checkpoint untouched.
    """
    path = Path(path)
    _check_plain(payload, "payload")
    bad = _nonfinite_tensors(payload, "")
    if bad:
        raise CheckpointError(
            f"refusing to write {path}: non-finite values in {_summary(bad)}; the previous checkpoint is kept "
            "(the run diverged: lower the learning rate or resume from the kept checkpoint)"
        )
    tmp = path.with_name(path.name + ".tmp")
    digest_file = digest_path(path)
    try:
        with tmp.open("wb") as handle:
            writer = _HashingWriter(handle)
            torch.save(dict(payload), writer)
            handle.flush()
            os.fsync(handle.fileno())
        digest = writer.hexdigest()
        # Both digests are valid while the checkpoint itself is being replaced, so a kill between the two renames
        # never makes a good checkpoint look corrupt.
        previous = [d for d in _recorded_digests(digest_file) if d != "malformed"][:1]
        _write_text_atomic(digest_file, "".join(f"{d}  {path.name}\n" for d in [digest, *previous]))
        os.replace(tmp, path)
        _write_text_atomic(digest_file, f"{digest}  {path.name}\n")
        _fsync_dir(path.parent)
    except (OSError, RuntimeError) as error:
        # torch.save reports a failed write as a RuntimeError from its zip writer; the OSError is its context.
        tmp.unlink(missing_ok=True)
        cause = _os_error(error)
        if cause is None:
            reason = str(error).strip().splitlines()[0][:160] if str(error).strip() else type(error).__name__
        else:
            reason = "the disk is full" if cause.errno == errno.ENOSPC else (cause.strerror or str(cause))
        kept = f"the last complete checkpoint {path} is kept" if path.exists() else "no earlier checkpoint exists"
        raise CheckpointError(
            f"could not write checkpoint {path}: {reason}; {kept}. Free space (or fix the permissions) and rerun "
            "with --resume: it continues from the last checkpoint"
        ) from None
    return digest


def _os_error(error: BaseException | None) -> OSError | None:
    """The OSError behind an exception (itself, or one in its cause/context chain), if any."""
    seen = 0
    while error is not None and seen < 10:
        if isinstance(error, OSError):
            return error
        error, seen = error.__cause__ or error.__context__, seen + 1
    return None


def digest_path(path: str | Path) -> Path:
    """Where the digest of checkpoint `path` is recorded: `<path>.sha256`."""
    path = Path(path)
    return path.with_name(path.name + HASH_SUFFIX)


class _HashingWriter:
    """A write-only file wrapper that hashes what passes through: the digest costs no second read of the file."""

    def __init__(self, handle):
        self._handle = handle
        self._hash = hashlib.sha256()

    def write(self, data) -> int:
        self._hash.update(data)
        return self._handle.write(data)

    def flush(self) -> None:
        self._handle.flush()

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


# ---------------------------------------------------------------------------------------------------- loading
def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by `save_checkpoint`, tensors mapped to `device`, after checking its digest.

    Never runs code from the file. Raises CheckpointError, naming the file and what to do, when it is missing,
    empty, truncated, not a checkpoint, holds anything but tensors and plain data, does not match its recorded
    digest, or holds NaN/inf values. A checkpoint without a digest file (written before digests existed, or copied
    alone) is loaded with a warning: weights-only loading still keeps it from running code.
    """
    path = Path(path)
    hint = _RESTART_HINT.format(name=path.name, folder=path.parent)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): {hint}")
    expected = _recorded_digests(digest_path(path))
    if expected:
        actual = file_sha256(path)
        if actual not in expected:
            raise CheckpointError(
                f"checkpoint {path} does not match the SHA-256 recorded in {digest_path(path).name} (recorded "
                f"{expected[0][:12]}..., file {actual[:12]}...): it was damaged or changed after it was written; {hint}"
            )
    else:
        warnings.warn(f"{path} has no {digest_path(path).name} beside it, so its integrity is not verified", stacklevel=2)
    try:
        with warnings.catch_warnings():
            # torch warns about an unusual pickle protocol before refusing the file; the refusal below says more.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            payload = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"Unsupported (global|operand)[^\n.]*", str(error))
        what = f" ({found.group(0).strip()})" if found else ""
        raise CheckpointError(
            f"checkpoint {path} was refused: it is not a craft-bench checkpoint, or it holds objects other than "
            f"tensors and plain data{what}, which could run code when loaded. Do not load it with weights_only=False; "
            f"if it is your run's, {hint}"
        ) from None
    except (RuntimeError, EOFError, ValueError, zipfile.BadZipFile, OSError, KeyError, IndexError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({first[:160]}): {hint}") from None
    if not isinstance(payload, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(payload).__name__}, not a dict of run state: {hint}")
    bad = _nonfinite_tensors(payload, "")
    if bad:
        raise CheckpointError(f"checkpoint {path} holds non-finite values in {_summary(bad)}: {hint}")
    return payload


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _recorded_digests(path: Path) -> list[str]:
    """The digests listed in a `sha256sum`-style file; [] when there is none. A malformed file counts as a mismatch
    (one impossible digest), never as "no digest", so damage to it cannot switch the check off."""
    if not path.exists():
        return []
    digests = []
    for line in path.read_text(errors="replace").splitlines():
        match = re.fullmatch(r"([0-9a-f]{64})\s+\*?\S.*", line.strip())
        digests.append(match.group(1) if match else "malformed")
    return digests or ["malformed"]


# ---------------------------------------------------------------------------------------------------- guards
def check_finite(step: int, losses: Iterable[torch.Tensor | float], model: torch.nn.Module, *, on_nonfinite: str = "stop") -> bool:
    """The non-finite guard of one optimizer update, called after backward and before clipping and `optimizer.step`.

    True: every loss and gradient is finite. Otherwise `on_nonfinite` decides: "stop" raises NonFiniteError naming
    the step, the losses and the first parameters with a NaN/inf gradient (the checkpoint of the last good step is
    kept, since none is written after it); "skip" returns False, and the caller drops the gradients, does not step
    the optimizer, and records the skip (a skipped step still counts, so step numbering and seeds stay aligned).
    With several data-parallel ranks, reduce `nonfinite_problem(...) is not None` over the ranks instead, so that
    every rank takes the same decision.
    """
    if on_nonfinite not in NONFINITE_POLICIES:
        raise ValueError(f"on_nonfinite must be one of {NONFINITE_POLICIES}, got {on_nonfinite!r}")
    problem = nonfinite_problem(step, losses, model)
    if problem is None:
        return True
    if on_nonfinite == "skip":
        return False
    raise NonFiniteError(problem + NONFINITE_ADVICE)


NONFINITE_POLICIES = ("stop", "skip")
NONFINITE_ADVICE = (
    ". The run stops here; the checkpoint of the last good step is kept. Lower lr (or raise grad clipping) and "
    'resume, or set on_nonfinite="skip" to skip such steps'
)


def nonfinite_problem(step: int, losses: Iterable[torch.Tensor | float], model: torch.nn.Module) -> str | None:
    """None if every loss and every gradient of `model` is finite, else what is not: "step N: loss [...] in
    micro-batch(es) [...]; non-finite gradients in K parameter(s): name, ..." (the fast path is one reduction)."""
    values = [float(v.detach().float().sum()) if isinstance(v, torch.Tensor) else float(v) for v in losses]
    bad_losses = [i for i, v in enumerate(values) if not math.isfinite(v)]
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    grads_finite = not grads or bool(torch.isfinite(torch.stack([g.detach().float().abs().sum() for g in grads])).all())
    if not bad_losses and grads_finite:
        return None
    problems = []
    if bad_losses:
        problems.append(f"loss {[values[i] for i in bad_losses][:4]} in micro-batch(es) {bad_losses[:4]}")
    if not grads_finite:
        names = [name for name, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
        problems.append(f"non-finite gradients in {len(names)} parameter(s): {', '.join(names[:3])}{', ...' if len(names) > 3 else ''}")
    return f"step {step}: {'; '.join(problems)}"


def _nonfinite_tensors(value: Any, where: str) -> list[tuple[str, int]]:
    """(key path, count) of every floating-point tensor holding a NaN or inf."""
    found = []
    for key, tensor in _tensors(value, where):
        if tensor.is_floating_point() or tensor.is_complex():
            count = int((~torch.isfinite(tensor)).sum())
            if count:
                found.append((key, count))
    return found


def _tensors(value: Any, where: str) -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(value, torch.Tensor):
        yield where or "<root>", value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from _tensors(item, f"{where}/{key}" if where else str(key))
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from _tensors(item, f"{where}[{index}]")


def _summary(bad: list[tuple[str, int]]) -> str:
    listed = ", ".join(f"{key} ({count} values)" for key, count in bad[:3])
    return listed + (f" and {len(bad) - 3} more tensors" if len(bad) > 3 else "")


def _check_plain(value: Any, where: str) -> None:
    """Refuse at save time what `weights_only=True` would refuse at load time (anything but tensors, plain data)."""
    # Exact types: a subclass (numpy.float64, an IntEnum) pickles as its own class, which weights_only refuses.
    if isinstance(value, torch.Tensor) or type(value) in _PLAIN:
        return
    if isinstance(value, Mapping):
        if type(value) not in (dict, OrderedDict):  # state_dict() returns an OrderedDict; weights_only allows it
            raise TypeError(f"{where} is a {type(value).__name__}; checkpoints hold plain dicts (use dict(...))")
        for key, item in value.items():
            if not isinstance(key, (str, int)) or isinstance(key, bool):
                raise TypeError(f"{where} has the key {key!r}; checkpoint dict keys are str or int")
            _check_plain(item, f"{where}/{key}")
        return
    if type(value) in (list, tuple):
        for index, item in enumerate(value):
            _check_plain(item, f"{where}[{index}]")
        return
    raise TypeError(
        f"{where} is a {type(value).__module__}.{type(value).__name__}; checkpoints hold only tensors and plain data "
        "(dict, list, tuple, str, int, float, bool, None), so that loading them can never run code"
    )


# ---------------------------------------------------------------------------------------------------- files
def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        with tmp.open("w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _fsync_dir(folder: Path) -> None:
    """Make the renames durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
