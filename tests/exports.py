"""The real-weight exports the slow tests use, named by the fixtures that hold them, and their prefetch.

On a fresh machine these exports are minutes of single-threaded tracing (``torch.export``), and the
fast tests, which the session runs first, keep one core busy too. So the session starts this module
in a process of its own (``python -m tests.exports FIXTURE...``, from ``conftest.py``) to build the
exports its slow tests will ask for, in the order they will ask, while the fast tests run. The
artefact cache locks an entry while it is built: a fixture that wants an export the prefetch is
building waits for it, and the prefetch skips one a fixture built first. Nothing depends on the
prefetch finishing, or running at all: a fixture builds what is missing itself.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from specwhisper_backend.facts import ModelFacts
from specwhisper_export.cut import cached_cut
from specwhisper_export.repository import ExportRequest, export_artefacts, link_tree, write_linked_facts
from specwhisper_export.shipped import shipped_draft

# Layers of base (6 encoder, 6 decoder) kept by the test assistants: correctness must hold
# whatever they propose, so they need not be good drafts.
CUT_DECODER_LAYERS = (0, 5)
CUT_ENCODER_LAYERS = (0, 5)


def decoder_only_cut() -> str:
    return str(cached_cut("base", "decoder_only", CUT_DECODER_LAYERS))


def full_cut() -> str:
    return str(cached_cut("base", "full", CUT_DECODER_LAYERS, CUT_ENCODER_LAYERS))


def trained_draft() -> str:
    """base's trained draft as it ships with the project: the product's default assistant."""
    return str(shipped_draft("base"))


# Fixture name -> the exports the tests using it open (the first is the fixture's own value).
REQUESTS: dict[str, Callable[[], list[ExportRequest]]] = {
    "base_export": lambda: [ExportRequest(main="base", assistant=decoder_only_cut())],
    "trained_draft": lambda: [
        ExportRequest(main="base", assistant=trained_draft(), assistant_int8=True),
        ExportRequest(main="base", assistant=trained_draft()),
    ],
    "base_export_full_assistant": lambda: [ExportRequest(main="base", assistant=full_cut())],
    "tiny_en_export": lambda: [ExportRequest(main="tiny.en")],
}


def export(fixture: str) -> Path:
    """The fixture's export, built now unless cached (or being built by the prefetch: then awaited)."""
    return export_artefacts(REQUESTS[fixture]()[0])


def with_main_decoder_as_draft(export: Path, directory: Path) -> Path:
    """``export`` linked into ``directory`` with its draft replaced by the main model's own decoder
    graphs (a session of their own): a draft that always agrees, with nothing to export."""
    link_tree(export, directory)
    facts = ModelFacts.load(directory)
    write_linked_facts(directory, replace(facts, assistant=replace(facts.main, encoder_file=None, alignment_file=None)))
    return directory


def fixtures_in_order_of_use(fixture_names_per_test: list[list[str]]) -> list[str]:
    """The export fixtures the tests use, in the order the tests will first ask for them."""
    wanted: list[str] = []
    for names in fixture_names_per_test:
        wanted += [name for name in names if name in REQUESTS and name not in wanted]
    return wanted


def start_prefetch(fixtures: list[str], log: Path) -> subprocess.Popen:
    with log.open("w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "tests.exports", *fixtures],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=Path(__file__).resolve().parents[1],
        )


def main(fixtures: list[str]) -> int:
    for fixture in fixtures:
        for request in REQUESTS[fixture]():
            print(f"{fixture}: {export_artefacts(request)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
