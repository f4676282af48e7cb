"""``specwhisper-report --smoke``: every table, row and column written, as markdown, JSON and a plot."""

from __future__ import annotations

import json
from dataclasses import fields

import pytest

from specwhisper_bench.report import Row, SweepPoint, main

pytestmark = pytest.mark.slow

SYSTEMS = (
    "transformers greedy",
    "transformers assisted",
    "faster-whisper float32",
    "faster-whisper int8",
    "specwhisper plain (Triton)",
    "specwhisper speculative (Triton)",
)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory, serving_assistant):
    """One smoke run (the test cut as draft: a trained one would be built on first use, for many minutes)."""
    out = tmp_path_factory.mktemp("report")
    assert main(["--smoke", "--out", str(out), "--assistant", serving_assistant]) == 0
    return out


def test_markdown_has_both_tables_and_the_sweep(report_dir):
    markdown = (report_dir / "report.md").read_text()
    assert "## en short clips" in markdown and "## en long-form" in markdown
    assert "## Concurrency sweep" in markdown
    for system in SYSTEMS:
        assert markdown.count(f"| {system} |") == 2, system


def test_json_has_every_row_with_every_column(report_dir):
    report = json.loads((report_dir / "report.json").read_text())
    columns = {f.name for f in fields(Row)}
    assert [t["title"].split(" (")[0] for t in report["tables"]] == ["en short clips", "en long-form"]
    for table in report["tables"]:
        assert [row["system"] for row in table["rows"]] == list(SYSTEMS), table["notes"]
        for row in table["rows"]:
            assert set(row) == columns
            assert row["seconds"] > 0 and row["wer"] >= 0
        greedy = table["rows"][0]
        assert greedy["speedup_vs_transformers_greedy"] == 1.0 and greedy["identical_to_greedy"] == 1.0
        assert all(row["acceptance_rate"] is None for row in table["rows"][:-1]), "only speculative rows draft"
    points = {(p["clients"], p["speculative"]) for p in report["sweep"]}
    assert points == {(c, s) for c in (1, 2) for s in (False, True)}
    assert all(set(p) == {f.name for f in fields(SweepPoint)} and p["failures"] == 0 for p in report["sweep"])


def test_png_is_written(report_dir):
    assert (report_dir / "report.png").read_bytes()[:8] == PNG_SIGNATURE
