"""The artefact cache: built once per key, never half-written, safe when two jobs race."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from specwhisper_export import cache


@pytest.fixture(autouse=True)
def _root(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECWHISPER_CACHE", str(tmp_path))


def test_built_once_then_reused():
    calls = []

    def build(tmp):
        calls.append(tmp)
        (tmp / "file").write_text("x")

    first = cache.cached_dir("kind", "key", build)
    assert cache.cached_dir("kind", "key", build) == first
    assert len(calls) == 1 and (first / "file").read_text() == "x"


def test_interrupted_build_leaves_nothing():
    def build(tmp):
        (tmp / "half").write_text("x")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cache.cached_dir("kind", "key", build)
    assert list((cache.cache_root() / "kind").iterdir()) == []


def test_an_entry_finished_meanwhile_by_another_job_is_kept():
    def build(tmp):
        (tmp / "mine").write_text("x")
        winner = tmp.parent / "key"  # another process renames its build into place first
        winner.mkdir()
        (winner / "theirs").write_text("y")

    final = cache.cached_dir("kind", "key", build)
    assert [p.name for p in final.iterdir()] == ["theirs"]
    assert [p.name for p in final.parent.iterdir()] == ["key"]


def _entry(name: str, age_seconds: float):
    entry = cache.cached_dir("kind", name, lambda tmp: (tmp / "file").write_text(name))
    past = time.time() - age_seconds
    os.utime(entry, (past, past))
    return entry


def test_old_unused_entries_beyond_the_most_recent_are_pruned():
    day = cache.PRUNE_UNUSED_FOR_SECONDS
    stale = [_entry(f"stale{i}", 2 * day + i) for i in range(3)]
    recent = [_entry(f"recent{i}", day + 100 - i) for i in range(cache.KEEP_PER_KIND - 1)]
    newest = cache.cached_dir("kind", "newest", lambda tmp: None)  # a build prunes
    kept = {p.name for p in (cache.cache_root() / "kind").iterdir()}
    assert kept == {p.name for p in recent} | {newest.name}
    assert not any(p.exists() for p in stale)


def test_entries_used_within_a_day_are_never_pruned():
    """A test session or a training run holds the paths it was given while it builds more."""
    held = [_entry(f"held{i}", 3600 + i) for i in range(cache.KEEP_PER_KIND + 3)]
    cache.cached_dir("kind", "one-more", lambda tmp: None)
    assert all((p / "file").is_file() for p in held)


def test_two_processes_wanting_one_entry_build_it_once(tmp_path):
    """The test session and its export prefetch (or two jobs) ask for the same entry at once: the
    second waits for the first's build instead of building it again."""
    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from specwhisper_export import cache\n"
        "def build(tmp):\n"
        "    with open(sys.argv[1], 'a') as log:\n"
        "        log.write('built\\n')\n"
        "    time.sleep(1.0)\n"
        "    (tmp / 'file').write_text('x')\n"
        "print(cache.cached_dir('kind', 'key', build))\n"
    )
    log = tmp_path / "builds.log"
    jobs = [
        subprocess.Popen([sys.executable, "-c", script, str(log)], stdout=subprocess.PIPE, text=True) for _ in range(2)
    ]
    outputs = [job.communicate(timeout=60)[0].strip() for job in jobs]
    assert [job.returncode for job in jobs] == [0, 0]
    assert log.read_text() == "built\n"
    assert outputs[0] == outputs[1] == str(cache.cache_root() / "kind" / "key")


def test_a_killed_builds_leftovers_are_removed_by_the_next_build():
    leftover = cache.cache_root() / "kind" / "key.tmp-999999"
    leftover.mkdir(parents=True)
    (leftover / "half").write_text("x")
    cache.cached_dir("kind", "key", lambda tmp: (tmp / "file").write_text("x"))
    assert [p.name for p in (cache.cache_root() / "kind").iterdir()] == ["key"]
