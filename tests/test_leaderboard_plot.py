"""Tests of the learning-curve figure (issue 10 §4): two panels (held-out success, training success per step), the
band's statistic named, `base` as a horizontal reference line, methods told apart by colour and by line style or
marker. Checked on the figure object, not on pixels."""

from __future__ import annotations

import pandas as pd
import pytest
from matplotlib.colors import to_hex

from craft_bench.leaderboard.build import BAND, learning_curve_figure


def _curve(values: list[float]) -> pd.Series:
    return pd.Series(values, index=[float(step) for step in range(len(values))])


def _figure():
    evals = {"base": [(0.0, [0.1, 0.1, 0.1])], "grpo": [(10.0, [0.2, 0.3, 0.4])], "craft": [(10.0, [0.3, 0.4, 0.5])],
             "sdar": [(10.0, [0.25])]}
    curves = {name: [_curve([0.1, 0.2, 0.3]), _curve([0.2, 0.2, 0.4])] for name in ("grpo", "craft", "sdar")}
    return learning_curve_figure("craft/Test-v0 · tiny", evals, curves)


def test_the_figure_has_an_eval_panel_and_a_training_panel():
    left, right = _figure().axes
    assert "held-out eval success" in left.get_title()
    assert "training" in right.get_title() and right.get_xlabel() == "training step"
    assert BAND == "mean ± 1 SE over n seeds" and BAND in left.get_ylabel() and BAND in right.get_ylabel()


def test_base_is_a_horizontal_reference_line_at_its_mean_and_not_a_training_curve():
    left, right = _figure().axes
    (base,) = [line for line in left.get_lines() if line.get_label().startswith("base")]
    assert base.get_ydata() == pytest.approx([0.1, 0.1]) and list(base.get_xdata()) == [0, 1]  # axhline
    assert "n=3 seeds" in base.get_label()
    assert not any(line.get_label().startswith("base") for line in right.get_lines())


def test_methods_differ_by_colour_and_by_line_style_or_marker_and_legends_give_n():
    _, right = _figure().axes
    lines = {line.get_label(): line for line in right.get_lines()}
    assert sorted(lines) == ["craft (n=2 seeds)", "grpo (n=2 seeds)", "sdar (n=2 seeds)"]
    colours = {to_hex(line.get_color()) for line in lines.values()}
    shapes = {(line.get_linestyle(), line.get_marker()) for line in lines.values()}
    assert len(colours) == len(lines) and len(shapes) == len(lines)
    left_labels = _figure().axes[0].get_legend_handles_labels()[1]
    assert "sdar (n=1 seeds)" in left_labels and "grpo (n=3 seeds)" in left_labels


def test_long_training_curves_are_smoothed_by_a_trailing_mean_named_in_the_title():
    """A tenth of the longest curve: 30 steps alternating 0 and 0.3 plot as trailing means of 3 steps."""
    noisy = [0.3 * (step % 2) for step in range(30)]
    _, right = learning_curve_figure("craft/Test-v0 · tiny", {}, {"grpo": [_curve(noisy), _curve(noisy)]}).axes
    assert "trailing mean of 3 steps" in right.get_title()
    (line,) = right.get_lines()
    assert line.get_ydata()[:4] == pytest.approx([0.0, 0.15, 0.1, 0.2])
    assert line.get_ydata() == pytest.approx(pd.Series(noisy).rolling(3, min_periods=1).mean().to_numpy())


def test_short_training_curves_are_plotted_unsmoothed():
    _, right = _figure().axes
    assert "trailing mean" not in right.get_title()
    (grpo,) = [line for line in right.get_lines() if line.get_label().startswith("grpo")]
    assert grpo.get_ydata() == pytest.approx([0.15, 0.2, 0.35])
