"""Where slow artefacts (downloaded wheels, converted weights, ONNX exports) are kept between runs.

They live outside the clone so that CI on the same machine reuses them and a fresh machine
rebuilds them itself. Entries are keyed by a hash of their inputs, so a changed input never
reuses a stale artefact.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock

CACHE_ENV = "SPECWHISPER_CACHE"
# Entries kept per kind: older ones (built by older code or for inputs no longer asked for) go,
# once unused for a day. A process holds the paths it was given (a test session, a bench, a training
# run): one that needed more than KEEP_PER_KIND entries had its first ones deleted under it.
KEEP_PER_KIND = 8
PRUNE_UNUSED_FOR_SECONDS = 24 * 3600


def cache_root() -> Path:
    """`$SPECWHISPER_CACHE`, else `$XDG_CACHE_HOME/specwhisper`, else `~/.cache/specwhisper`."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "specwhisper"


def input_key(*parts: object) -> str:
    """A short stable hash of JSON-serialisable inputs."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def cached_dir(kind: str, key: str, build: Callable[[Path], None]) -> Path:
    """Return `<root>/<kind>/<key>`, calling `build(tmp_dir)` first if it is not there yet.

    The build writes into a temporary sibling that is renamed into place only when it
    finished, so an interrupted build never leaves a half-written entry that looks complete. Two
    processes that want the same entry (the test session and its export prefetch, two jobs on one
    machine) build it once: the second waits on the entry's lock and then reads the first's. Where
    locks do not hold (some network file systems), the copy renamed into place first is kept.
    """
    final = cache_root() / kind / key
    if final.is_dir():
        os.utime(final)  # marks it used, so pruning removes the least recently used entries
        return final
    locks = cache_root() / ".locks"
    locks.mkdir(parents=True, exist_ok=True)
    with FileLock(locks / f"{kind}-{key}.lock"):
        if final.is_dir():  # built by the process that held the lock
            os.utime(final)
            return final
        _build_into(final, build)
    _prune(final.parent, keep=final)
    return final


def _build_into(final: Path, build: Callable[[Path], None]) -> None:
    # Under the entry's lock no one else builds it: what temporary copies remain are from builds
    # that were killed.
    for stale in final.parent.glob(f"{final.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    tmp.mkdir(parents=True)
    try:
        build(tmp)
        try:
            tmp.rename(final)
        except OSError:
            if not final.is_dir():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # same inputs, same content: keep the winner's
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _prune(kind_dir: Path, keep: Path) -> None:
    """Remove the entries of a kind beyond the most recently used, if unused for a day."""
    entries = sorted(
        (p for p in kind_dir.iterdir() if p.is_dir() and ".tmp-" not in p.name),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    unused_since = time.time() - PRUNE_UNUSED_FOR_SECONDS
    for old in entries[KEEP_PER_KIND:]:
        if old != keep and old.stat().st_mtime < unused_since:
            shutil.rmtree(old, ignore_errors=True)


def checkpoint_identity(checkpoint: str) -> object:
    """What depends on a checkpoint: its files' names, sizes and times, or its hub id."""
    path = Path(checkpoint)
    if not path.is_dir():
        return checkpoint
    return sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in path.iterdir() if f.is_file())
