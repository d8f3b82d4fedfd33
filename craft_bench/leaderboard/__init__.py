"""The craft-bench leaderboard: the row schema and its validation, `submit` of a run, and `build` of LEADERBOARD.md.
The harness writes with `make_result_row` and `write_result_csv`; `python -m craft_bench.leaderboard` is the CLI."""

from craft_bench.leaderboard.schema import (
    BASE_METHOD,
    KEY_COLUMNS,
    LEADERBOARD_COLUMNS,
    NOT_APPLICABLE,
    REFERENCE_COLUMNS,
    SCHEMA_VERSION,
    LeaderboardValidationError,
    config_id,
    make_result_row,
    validate_csv,
    validate_rows,
    write_result_csv,
)

__all__ = [
    "BASE_METHOD",
    "KEY_COLUMNS",
    "LEADERBOARD_COLUMNS",
    "NOT_APPLICABLE",
    "REFERENCE_COLUMNS",
    "SCHEMA_VERSION",
    "LeaderboardValidationError",
    "config_id",
    "make_result_row",
    "validate_csv",
    "validate_rows",
    "write_result_csv",
]
