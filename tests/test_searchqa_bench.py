"""The Search-QA benchmark rows (`craft_bench.bench._searchqa`): shape and sanity of what `bench envs` receives.
Slow (two fresh processes import the stack): `python -m pytest tests/test_searchqa_bench.py -m slow`."""

from __future__ import annotations

import math

import pytest

from craft_bench.bench._searchqa import ENV_ID, searchqa_rows


@pytest.mark.slow
def test_searchqa_rows_measure_generation_index_searches_and_steps(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("CRAFT_BENCH_HOME", str(tmp_path))
    rows = searchqa_rows(40, 1, passages=2_000)
    assert [r["setting"] for r in rows] == ["generate data set", "index build", "raw engine", "one env"]
    for row in rows:
        assert row["env"] == ENV_ID and row["steps_per_s"] > 0 and math.isfinite(row["steps_per_s"])
    assert "searches/s: 40 bm25s top-3 searches" in rows[2]["note"]
    assert "cached" not in rows[1]["note"]
    again = searchqa_rows(40, 1, passages=2_000)
    assert "cached: nothing was rebuilt" in again[1]["note"]
