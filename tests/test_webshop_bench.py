"""The WebShop benchmark rows (`craft_bench.bench._webshop`): shape and sanity of what `bench envs` receives.
Slow (it generates and indexes a catalogue): `python -m pytest tests/test_webshop_bench.py -m slow`."""

from __future__ import annotations

import math

import pytest

from craft_bench.bench._webshop import ENV_ID, webshop_rows


@pytest.mark.slow
def test_webshop_rows_measure_parse_index_cached_load_searches_and_steps(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("CRAFT_BENCH_HOME", str(tmp_path))
    rows = webshop_rows(60, n_products=1_000, n_queries=20)
    assert [r["setting"] for r in rows] == [
        "catalogue parse + BM25 index build", "catalogue load, cached", "search, uncached", "one env",
        "one env, expert policy"]
    for row in rows:
        assert row["env"] == ENV_ID and row["steps_per_s"] > 0 and math.isfinite(row["steps_per_s"])
    assert rows[0]["steps"] == 1_000 and rows[2]["steps"] == 20 and rows[3]["steps"] == 60
    assert 0 < rows[2]["search_ms_p50"] <= rows[2]["search_ms_p95"]
    assert (tmp_path / "envs" / "webshop_index").is_dir() and (tmp_path / "envs" / "webshop_catalogue").is_dir()
