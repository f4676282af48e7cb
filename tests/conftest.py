"""Shared fixtures: real weights (imported once, cached), their exports and real speech."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest

from specwhisper_export.cache import cache_root
from specwhisper_export.presets import load_whisper
from specwhisper_export.repository import link_tree
from specwhisper_training import asterisk
from tests import exports
from tests.support import clips, hf_greedy
from tests.toy_model import cached_export, write_toy_export


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The tests that need no real weights first: meanwhile the prefetch exports the real ones."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is not None)


def pytest_collection_finish(session: pytest.Session) -> None:
    if session.config.option.collectonly or hasattr(session.config, "workerinput"):
        return
    wanted = exports.fixtures_in_order_of_use([item.fixturenames for item in session.items])
    if wanted:
        log = cache_root() / "test-prefetch.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        session.config.stash[_PREFETCH] = (exports.start_prefetch(wanted, log), log)


def pytest_sessionfinish(session: pytest.Session) -> None:
    """An unfinished prefetch (the tests that wanted its exports were deselected or failed first) is
    interrupted, so that the cache removes its half-built entry; one that failed is reported."""
    if _PREFETCH not in session.config.stash:
        return
    process, log = session.config.stash[_PREFETCH]
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
    elif process.returncode != 0:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(f"the export prefetch failed (the fixtures built what they needed): see {log}")


_PREFETCH = pytest.StashKey[tuple[subprocess.Popen, Path]]()


@pytest.fixture(scope="session")
def base():
    return load_whisper("base")


@pytest.fixture(scope="session")
def tiny_en():
    return load_whisper("tiny.en")


@pytest.fixture(scope="session")
def decoder_only_cut() -> str:
    return exports.decoder_only_cut()


@pytest.fixture(scope="session")
def full_cut() -> str:
    return exports.full_cut()


@pytest.fixture(scope="session")
def trained_draft() -> str:
    """base's trained draft as it ships with the project: the product's default assistant."""
    return exports.trained_draft()


@pytest.fixture(scope="session")
def serving_assistant(trained_draft) -> str:
    """The assistant the Triton tests serve with base."""
    return trained_draft


@pytest.fixture(scope="session")
def base_export() -> Path:
    """base with a decoder-only assistant cut from its own layers."""
    return exports.export("base_export")


@pytest.fixture(scope="session")
def base_export_full_assistant() -> Path:
    """base with a full-model assistant (own encoder) cut from its own layers."""
    return exports.export("base_export_full_assistant")


@pytest.fixture(scope="session")
def agreeing_export(base_export, tmp_path_factory) -> Path:
    """base with a draft that is base's own decoder, graph files and all: it always agrees."""
    return exports.with_main_decoder_as_draft(base_export, tmp_path_factory.mktemp("agreeing"))


@pytest.fixture(scope="session")
def tiny_en_export() -> Path:
    return exports.export("tiny_en_export")


@pytest.fixture(scope="session")
def english_clips() -> list[tuple[asterisk.Prompt, np.ndarray]]:
    """10 real English recordings of 2-30 s with their transcripts, at 16 kHz."""
    return clips("en", 10)


@pytest.fixture(scope="session")
def hf_greedy_base(base, english_clips) -> dict[str, list[int]]:
    """transformers' own greedy tokens of base (no timestamps) for each English clip, computed once."""
    model, processor = base
    return {prompt.name: hf_greedy(model, processor, audio, "en") for prompt, audio in english_clips}


@pytest.fixture(scope="session")
def toy_export(tmp_path_factory) -> Path:
    """A toy Whisper (random weights, Whisper's token layout) and a draft that mostly agrees with it,
    exported through the real graphs: the engine end to end without real weights. Laid out as a
    model version directory (``toy/1``), linked from the cache."""
    version = tmp_path_factory.mktemp("toy") / "1"
    link_tree(cached_export(write_toy_export, "toy export"), version)
    return version
