"""Shared fixtures: real weights (imported once, cached), their exports and real speech."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from specwhisper_export.cut import cached_cut
from specwhisper_export.presets import load_whisper
from specwhisper_export.repository import ExportRequest, export_artefacts, link_tree
from specwhisper_export.shipped import shipped_draft
from specwhisper_training import asterisk
from tests.support import clips, hf_greedy
from tests.toy_model import cached_export, write_toy_export

# Layers of base (6 encoder, 6 decoder) kept by the test assistants: correctness must hold
# whatever they propose, so they need not be good drafts.
CUT_DECODER_LAYERS = (0, 5)
CUT_ENCODER_LAYERS = (0, 5)


@pytest.fixture(scope="session")
def base():
    return load_whisper("base")


@pytest.fixture(scope="session")
def tiny_en():
    return load_whisper("tiny.en")


@pytest.fixture(scope="session")
def decoder_only_cut() -> str:
    return str(cached_cut("base", "decoder_only", CUT_DECODER_LAYERS))


@pytest.fixture(scope="session")
def full_cut() -> str:
    return str(cached_cut("base", "full", CUT_DECODER_LAYERS, CUT_ENCODER_LAYERS))


@pytest.fixture(scope="session")
def trained_draft() -> str:
    """base's trained draft as it ships with the project: the product's default assistant."""
    return str(shipped_draft("base"))


@pytest.fixture(scope="session")
def serving_assistant(trained_draft) -> str:
    """The assistant the Triton tests serve with base."""
    return trained_draft


@pytest.fixture(scope="session")
def base_export(decoder_only_cut):
    """base with a decoder-only assistant cut from its own layers."""
    return export_artefacts(ExportRequest(main="base", assistant=decoder_only_cut))


@pytest.fixture(scope="session")
def base_export_full_assistant(full_cut):
    """base with a full-model assistant (own encoder) cut from its own layers."""
    return export_artefacts(ExportRequest(main="base", assistant=full_cut))


@pytest.fixture(scope="session")
def agreeing_export():
    """base with a draft that is base's own decoder: it always agrees (up to float rounding)."""
    every_layer = tuple(range(6))
    return export_artefacts(ExportRequest(main="base", assistant=str(cached_cut("base", "decoder_only", every_layer))))


@pytest.fixture(scope="session")
def tiny_en_export():
    return export_artefacts(ExportRequest(main="tiny.en"))


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
