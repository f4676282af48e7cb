"""``specwhisper-bench`` end to end on real speech: two drafts side by side against one plain run."""

from __future__ import annotations

import json

from specwhisper_export import benchmark


def test_bench_runs_two_drafts_against_the_same_plain_decoding(decoder_only_cut, trained_draft, tmp_path):
    out = tmp_path / "bench.json"
    argv = ["--assistant", decoder_only_cut, "--versus", trained_draft, "--languages", "en", "--clips", "3"]
    argv += ["--long-seconds", "0", "--no-transformers", "--json", str(out)]
    assert benchmark.main(argv) == 0

    (row,) = json.loads(out.read_text()).values()
    versus = row["versus"]
    assert row["identical_tokens"] and versus["identical_tokens"]
    assert row["plain_s"] == versus["plain_s"]  # one plain run serves both comparisons
    # The trained draft agrees with base far more often than two of base's layers cut out unchanged.
    assert versus["acceptance_rate"] > row["acceptance_rate"] + 0.2
    assert versus["tokens_per_main_pass"] > row["tokens_per_main_pass"]
