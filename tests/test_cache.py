"""The artefact cache: built once per key, never half-written, safe when two jobs race."""

from __future__ import annotations

import pytest

from specwhisper_backend import cache


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
