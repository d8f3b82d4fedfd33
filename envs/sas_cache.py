"""Fast Downward's PDDL-to-SAS translations of ALFWorld games, kept on disk so that a game's later loads, in any
process or run, skip the translation (`python -m craft_bench.bench._alfworld --loads` measures what that saves).

Every ALFWorld load and reset builds TextWorld `PddlState`s, and each one translates its problem twice with
`fast_downward.pddl2sas` (once plain, once with `optimize=True` for replanning). The translation is a pure function
of (domain, problem, optimize) and Fast Downward's version, and its SAS text is deterministic, so it can be stored:
an entry is the gzipped SAS text after a header that holds its key (the sha256 of its inputs, which also names its
file) and the text's sha256. A
hit parses the PDDL again into Fast Downward's task object (a median of 4.5-6.7 ms per problem against 88 ms for
the translation, `--loads`; the task is the same as the one a full translation returns, which tests/test_alfworld.py
checks) and reads the SAS text. An entry whose text fails its sha256 (truncated, corrupted, edited), or whose
header names another key (an entry copied or renamed onto another one's file), is translated again and rewritten,
so neither damaged nor another problem's SAS text ever reaches Fast Downward's C++ loader. Writes are atomic; a
temporary file that a killed writer left behind is deleted by a later write to its directory once it is an hour old.

Entries are single files with their own check rather than `envs/cache.py`'s verified directories (a manifest and a
lock per entry), because a load reads two of them on the reset path. They live under
`$CRAFT_BENCH_HOME/alfworld-sas/v2/` (4.4 KB each on average over 1,002 ALFWorldGen entries, two
per game); `CRAFT_BENCH_SAS_CACHE=0` turns the cache off, and deleting the directory clears it. Entries of
`alfworld-sas/v1/` (before the key was in the header) are not read; that directory can be deleted.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import importlib.metadata
import io
import os
import sys
import tempfile
import time
import zlib
from functools import lru_cache
from pathlib import Path
from typing import Any

from craft_bench.envs.cache import home

#: The environment variable that turns the disk cache off when set to "0" (the in-process memo stays).
SAS_CACHE_VARIABLE = "CRAFT_BENCH_SAS_CACHE"
FORMAT_VERSION = "v2"
#: Age in seconds after which a writer's temporary file is taken for the leftover of a killed process (a write takes
#: milliseconds).
STALE_TEMPORARY_S = 3600.0
_HEADER_PREFIX = b"craft-bench sas v2 key="


def enabled() -> bool:
    """Whether translations go through the disk cache (on unless `CRAFT_BENCH_SAS_CACHE=0`)."""
    return os.environ.get(SAS_CACHE_VARIABLE, "1") != "0"


@lru_cache(maxsize=1)
def _fast_downward_version() -> str:
    return importlib.metadata.version("fast-downward-textworld")


def entry_key(domain: str, problem: str, optimize: bool) -> str:
    """The sha256 naming one translation: Fast Downward's version, the optimize flag, the domain and the problem."""
    digest = hashlib.sha256()
    for part in (_fast_downward_version(), str(bool(optimize)), domain, problem):
        encoded = part.encode("utf-8")
        digest.update(len(encoded).to_bytes(8, "little"))  # length-prefixed: no two inputs share a byte stream
        digest.update(encoded)
    return digest.hexdigest()


def entry_path(key: str) -> Path:
    """Where an entry lives (nothing is created: a read that misses leaves no directory behind)."""
    return home() / "alfworld-sas" / FORMAT_VERSION / key[:2] / f"{key}.sas.gz"


def _header(key: str, body: bytes) -> bytes:
    return _HEADER_PREFIX + key.encode("ascii") + b" sha256=" + hashlib.sha256(body).hexdigest().encode("ascii")


def encode_entry(key: str, sas: str) -> bytes:
    body = sas.encode("utf-8")
    return gzip.compress(_header(key, body) + b"\n" + body, compresslevel=6, mtime=0)


def decode_entry(data: bytes, key: str) -> str | None:
    """The SAS text of the entry `key`'s bytes, or None when they fail gzip's CRC, name another key in their
    header, or fail the header's sha256."""
    try:
        raw = gzip.decompress(data)
    except (OSError, EOFError, zlib.error):
        return None
    header, newline, body = raw.partition(b"\n")
    if not newline or header != _header(key, body):
        return None
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        return None


def read_entry(key: str) -> str | None:
    try:
        data = entry_path(key).read_bytes()
    except OSError:
        return None
    return decode_entry(data, key)


def write_entry(key: str, sas: str) -> None:
    """Write atomically (temporary file, then rename), so that concurrent writers and readers of one entry, which
    all hold the same text, never see half a file; a full disk only costs the cache, never the translation."""
    try:
        path = entry_path(key)
        path.parent.mkdir(parents=True, exist_ok=True)  # a read-only or unusable home only costs the cache
        descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{key[:16]}-")
    except OSError:
        return
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(encode_entry(key, sas))
        os.replace(temporary, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
    remove_stale_temporaries(path.parent)


def remove_stale_temporaries(directory: Path, older_than_s: float = STALE_TEMPORARY_S) -> None:
    """Delete the temporary files (`.<key prefix>-*`) that writers killed before their rename left in `directory`,
    once they are older than any write takes, so that a live writer's file is never touched."""
    now = time.time()
    for leftover in directory.glob(".*-*"):
        with contextlib.suppress(OSError):
            if now - leftover.stat().st_mtime > older_than_s:
                leftover.unlink()


@lru_cache(maxsize=1)
def _translator_modules() -> tuple[Any, Any, Any]:
    """Fast Downward's normalize, lisp_parser and parsing_functions modules, imported once."""
    saved_argv = sys.argv
    # Fast Downward's translate `options` module parses sys.argv when first imported, as pddl2sas itself knows.
    sys.argv = ["translate.py", "domain", "task"]
    try:
        from fast_downward.translate import normalize
        from fast_downward.translate.pddl_parser import lisp_parser, parsing_functions
    finally:
        sys.argv = saved_argv
    return normalize, lisp_parser, parsing_functions


def parse_task(domain: str, problem: str) -> Any:
    """Fast Downward's normalized task for a domain and problem: what `pddl2sas` builds before translating."""
    normalize, lisp_parser, parsing_functions = _translator_modules()
    with contextlib.redirect_stdout(io.StringIO()):  # as pddl2sas, which prints only when verbose
        task = parsing_functions.parse_task(lisp_parser.parse_nested_list(domain.split("\n")),
                                            lisp_parser.parse_nested_list(problem.split("\n")))
        normalize.normalize(task)
    return task


@lru_cache(maxsize=4)
def parsed_task(domain: str, problem: str) -> Any:
    """`parse_task`, remembered for the last few problems: a load asks for the plain and the optimized translation
    of one problem, whose task objects are the same parse (pddl2sas parses and normalizes before it reads the flag),
    so two hits share one. TextWorld only reads the task (and discards the optimized one)."""
    return parse_task(domain, problem)


def translate(stock_translate: Any, domain: str, problem: str, verbose: bool = False,
              optimize: bool = False) -> tuple[Any, str]:
    """`fast_downward.pddl2sas(domain, problem, verbose, optimize)` through the disk cache (verbose runs bypass it:
    they ask to see the translator's output)."""
    if verbose or not enabled():
        return stock_translate(domain, problem, verbose=verbose, optimize=optimize)
    key = entry_key(domain, problem, optimize)
    sas = read_entry(key)
    if sas is not None:
        return parsed_task(domain, problem), sas
    task, sas = stock_translate(domain, problem, verbose=verbose, optimize=optimize)
    write_entry(key, sas)
    return task, sas
