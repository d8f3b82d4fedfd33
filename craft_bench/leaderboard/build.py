"""Builds leaderboard/LEADERBOARD.md (mean ± standard error over seeds, each method and the untrained `base` model
against GRPO with a paired t interval, success per dataset where episodes name one) and learning-curve PNGs (held-out
success and training success per step). Output is byte-for-byte reproducible: sorted, fixed formats, no dates."""

from __future__ import annotations

import io
import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib.style
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from craft_bench.leaderboard.identity import LATER_SETTINGS, TRAINING_ONLY_SETTINGS
from craft_bench.leaderboard.schema import (
    BASE_METHOD,
    EVAL_TEMPERATURE,
    NOT_APPLICABLE,
    UNKNOWN,
    canonical_json,
    config_id,
    macro_average,
)
from craft_bench.leaderboard.store import (
    DEFAULT_ROOT,
    PLOTS,
    atomic_write_bytes,
    check_not_linked,
    curve_path,
    load_reference,
    load_submissions,
    read_curve,
    slug,
)

# Rows of one table are comparable: same environment, data, split, model and initial weights (one base model).
GROUP_COLUMNS = ("env_id", "split", "model", "policy_sha256", "env_version", "data_source", "data_sha256")
# One table line per method configuration; its seeds are averaged.
ENTRY_COLUMNS = ("method", "method_config", "teacher_context")
AVERAGED = (("success_rate", "success", 3), ("progress_mean", "progress", 3), ("return_mean", "return", 3),
            ("steps_mean", "steps", 2), ("invalid_action_rate", "invalid actions", 3))
CURVE_METRIC = "env/success"
REFERENCE_METHOD = "grpo"
CONFIDENCE = 0.95
NO_SE = "—"
BAND = "mean ± 1 SE over n seeds"
_UNIT_LABELS = {"percent": "%", "score": "score 0–100"}
# Characters with a meaning in (GitHub-flavoured) markdown or HTML; escaped wherever a cell's text reaches the page.
_MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]()|~$#!{}])")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_LINE_STYLES = ("-", "--", "-.", ":")
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def md_text(value: Any) -> str:
    """Text from a data file, made inert in markdown: control characters (line breaks included) become spaces,
    `& < >` become HTML entities, and markdown punctuation (`| * _ [ ] ( ) ` ...) is backslash-escaped."""
    text = _CONTROL.sub(" ", str(value))
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return _MARKDOWN_SPECIAL.sub(r"\\\1", text)


def mean_se(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and standard error of the mean (sample std with ddof=1 over sqrt(n)); no SE from a single value."""
    if not values:
        raise ValueError("mean_se needs at least one value")
    mean = math.fsum(values) / len(values)
    if len(values) < 2:
        return mean, None
    variance = math.fsum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(variance / len(values))


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of the regularised incomplete beta function (modified Lentz's method)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _incomplete_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b), the regularised incomplete beta function, for 0 <= x <= 1."""
    if x <= 0.0 or x >= 1.0:
        return 0.0 if x <= 0.0 else 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, 1.0 - x) / b


def t_cdf(t: float, df: int) -> float:
    """P(T <= t) for Student's t with `df` degrees of freedom."""
    tail = 0.5 * _incomplete_beta(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: int) -> float:
    """The p-quantile of Student's t with `df` >= 1 degrees of freedom (bisection on `t_cdf`, to 1e-12)."""
    if not 0.0 < p < 1.0 or df < 1:
        raise ValueError(f"t_quantile needs 0 < p < 1 and df >= 1, got p={p}, df={df}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    low, high = 0.0, 1.0
    while t_cdf(high, df) < p:
        low, high = high, high * 2.0
    while high - low > 1e-12 * max(1.0, high):
        middle = (low + high) / 2.0
        low, high = (middle, high) if t_cdf(middle, df) < p else (low, middle)
    return (low + high) / 2.0


def paired_difference(values: Mapping[int, float], reference: Mapping[int, float], constant: bool = False,
                      confidence: float = CONFIDENCE) -> tuple[float, float | None, float | None, int]:
    """Mean difference `values - reference` over seeds with a two-sided t confidence interval.

    Paired over seeds: d_s = values[s] - reference[s] for every seed s in both, mean(d) ± t_{(1+c)/2, n-1} · sd(d)
    / sqrt(n) (sd with ddof = 1). With `constant` (an entry whose every seed gives the same value, such as the
    untrained model evaluated greedily), d_s = mean(values) - reference[s] over the reference's seeds. Returns
    (mean, low, high, n); low and high are None when n < 2. Raises ValueError when no seed pairs.
    """
    if constant:
        level = math.fsum(values.values()) / len(values)
        diffs = [level - reference[s] for s in sorted(reference)]
    else:
        diffs = [values[s] - reference[s] for s in sorted(set(values) & set(reference))]
    if not diffs:
        raise ValueError("no seed appears in both entries")
    mean, se = mean_se(diffs)
    if se is None:
        return mean, None, None, 1
    half = t_quantile((1.0 + confidence) / 2.0, len(diffs) - 1) * se
    return mean, mean - half, mean + half, len(diffs)


def _format(mean: float, se: float | None, digits: int) -> str:
    text = f"{mean:.{digits}f}"
    missing = se is None or (isinstance(se, float) and math.isnan(se))
    return f"{text} ± {NO_SE}" if missing else f"{text} ± {se:.{digits}f}"


def _span(values: pd.Series) -> str:
    numbers = sorted({int(v) for v in values})
    return str(numbers[0]) if len(numbers) == 1 else f"{numbers[0]}–{numbers[-1]}"


def _method_label(method: str, config: str, configs_of_method: int) -> str:
    return method if configs_of_method == 1 else f"{method} [{config}]"


def _train_settings(method_config: str) -> str:
    return canonical_json(json.loads(method_config).get("train", {}))


def summarise(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """One record per (group, method configuration): seeds, steps, episodes, per-seed successes, and mean ± SE of
    each averaged metric (SE None with one seed), sorted by group, then success (best first), method, config."""
    records = []
    for keys, entry in frame.groupby(list(GROUP_COLUMNS + ENTRY_COLUMNS), sort=True):
        record = dict(zip(GROUP_COLUMNS + ENTRY_COLUMNS, keys))
        record["config"] = config_id(record["method_config"])
        record["temperature"] = json.loads(record["method_config"])[EVAL_TEMPERATURE]
        record["seeds"] = len(entry)
        record["train_steps"] = _span(entry["train_steps"])
        record["episodes"] = _span(entry["n_eval_episodes"])
        record["model_params"] = _span(entry["model_params"])
        record["suite_version"] = ", ".join(sorted(set(entry["suite_version"])))
        record["by_seed"] = {int(s): float(v) for s, v in zip(entry["seed"], entry["success_rate"])}
        for column, _, _ in AVERAGED:
            record[column], record[column + "_se"] = mean_se([float(v) for v in entry[column]])
        scores = [float(v) for v in entry["task_score"] if v != NOT_APPLICABLE]
        record["task_score"], record["task_score_se"] = mean_se(scores) if scores else (None, None)
        record.update(_dataset_summary(list(entry["per_dataset"])))
        records.append(record)
    records.sort(key=lambda r: (tuple(r[c] for c in GROUP_COLUMNS), -round(r["success_rate"], 12), r["method"],
                                r["config"]))
    return records


def _dataset_summary(cells: list[str]) -> dict[str, Any]:
    """Per-dataset success of one entry from its seeds' `per_dataset` cells: `datasets` = {dataset: (mean, SE) over
    seeds}, and `macro_average` (± `macro_average_se`) = mean ± SE over seeds of each seed's macro average (every
    dataset weighing the same). All None unless every seed reports the same datasets."""
    parsed = [json.loads(cell) for cell in cells if cell != NOT_APPLICABLE]
    if not parsed or len(parsed) < len(cells) or any(set(p) != set(parsed[0]) for p in parsed):
        return {"datasets": None, "macro_average": None, "macro_average_se": None}
    datasets = {name: mean_se([float(p[name]["success_rate"]) for p in parsed]) for name in sorted(parsed[0])}
    macro, macro_se = mean_se([macro_average(p) for p in parsed])
    return {"datasets": datasets, "macro_average": macro, "macro_average_se": macro_se}


#: The later settings (identity.LATER_SETTINGS) a base row can leave out at their legacy value: a base row never
#: records training-only settings, so their legacy values say nothing about its protocol.
_BASE_LATER_SETTINGS = {name: value for name, value in LATER_SETTINGS.items() if name not in TRAINING_ONLY_SETTINGS}


def _evaluation_protocol_matches(base: dict[str, Any], other: dict[str, Any]) -> bool:
    """Whether `other` was evaluated as the `base` entry was: the same evaluation temperature and, for every setting
    the base row records (only those that change an untrained evaluation), the same value."""
    base_config, other_config = json.loads(base["method_config"]), json.loads(other["method_config"])
    # A setting a row leaves out at its legacy value (identity.LATER_SETTINGS) has that value: compare it too.
    base_train = {**_BASE_LATER_SETTINGS, **base_config.get("train", {})}
    other_train = {**LATER_SETTINGS, **other_config.get("train", {})}
    return (base_config[EVAL_TEMPERATURE] == other_config[EVAL_TEMPERATURE]
            and all(other_train.get(name) == value for name, value in base_train.items()))


def _reference_entries(entry: dict[str, Any], group: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The GRPO entries a row is compared with. A method: the group's only GRPO entry, or else the one GRPO entry with
    the same trainer settings; none when there is no such single entry. The untrained `base` entry, which records no
    training settings, is compared with every GRPO entry evaluated under its protocol (same evaluation settings), so
    each GRPO configuration of the table (a preset, a learning-rate sweep point) is measured against the untrained
    model."""
    candidates = [r for r in group if r["method"] == REFERENCE_METHOD]
    if entry["method"] == BASE_METHOD:
        return [r for r in candidates if _evaluation_protocol_matches(entry, r)]
    if len(candidates) > 1:
        candidates = [r for r in candidates if _train_settings(r["method_config"])
                      == _train_settings(entry["method_config"])]
    return candidates if len(candidates) == 1 else []


def _is_constant(entry: dict[str, Any]) -> bool:
    """An entry whose every seed gives the same number: the untrained model, evaluated greedily. (Sampled, its
    seeds differ and are paired with GRPO's seeds like any method's.)"""
    return entry["method"] == BASE_METHOD and entry["temperature"] == 0


def _difference_text(entry: dict[str, Any], reference: dict[str, Any]) -> str:
    """`+0.021 [-0.050, +0.092] (n=3)`: the success difference to one GRPO entry, the CI from `paired_difference`."""
    try:
        mean, low, high, n = paired_difference(entry["by_seed"], reference["by_seed"], constant=_is_constant(entry))
    except ValueError:
        return f"{NO_SE} (no common seed)"
    if low is None:
        return f"{mean:+.3f} (n=1, no interval)"
    return f"{mean:+.3f} [{low:+.3f}, {high:+.3f}] (n={n})"


def versus_grpo(entry: dict[str, Any], group: list[dict[str, Any]]) -> str:
    """The success difference to GRPO as table text: `+0.021 [-0.050, +0.092] (n=3)`. In a table with several GRPO
    entries each difference is followed by the config id it is taken against, and a `base` row facing several GRPO
    configurations of its protocol gives one difference per configuration."""
    references = _reference_entries(entry, group)
    if not references:
        if entry["method"] == BASE_METHOD:
            return f"{NO_SE} (no {REFERENCE_METHOD} entry with its evaluation settings)"
        return f"{NO_SE} (no single {REFERENCE_METHOD} entry)"
    if references == [entry]:
        return "reference"
    # In a table with one GRPO entry the comparison is unambiguous; with several (a preset and a sweep point, or one
    # preset trained in two dtypes) each difference names the entry it is taken against.
    if sum(r["method"] == REFERENCE_METHOD for r in group) == 1:
        return _difference_text(entry, references[0])
    return "; ".join(f"{_difference_text(entry, r)} vs `{r['config']}`" for r in references)


def _group_heading(g: dict[str, Any]) -> str:
    weights = (f"initial weights sha256 `{g['policy_sha256'][:12]}`" if g["policy_sha256"] != UNKNOWN
               else "initial weights unknown (schema-1 rows)")
    return f"### {md_text(g['env_id'])} · split {md_text(g['split'])} · model {md_text(g['model'])} · {weights}"


def _measured_section(summary: list[dict[str, Any]], plots: dict[tuple[str, ...], Path], root: Path) -> list[str]:
    lines = ["## Measured results (source = run)", ""]
    if not summary:
        return lines + ["No measured results yet: run `python -m craft_bench.leaderboard submit runs/<run>`.", ""]
    configs_per_method: dict[str, set[str]] = {}
    for record in summary:
        configs_per_method.setdefault(record["method"], set()).add(record["config"])
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for record in summary:
        groups.setdefault(tuple(record[c] for c in GROUP_COLUMNS), []).append(record)
    for keys, group in groups.items():
        g = dict(zip(GROUP_COLUMNS, keys))
        with_score = any(r["task_score"] is not None for r in group)
        with_datasets = any(r["macro_average"] is not None for r in group)
        metrics = (list(AVERAGED[:1]) + ([("macro_average", "success, macro avg over datasets", 3)] if with_datasets
                                         else [])
                   + ([("task_score", "task score", 3)] if with_score else []) + list(AVERAGED[1:]))
        header = ("| method | config | teacher context | eval temperature | seeds | train steps | eval episodes | "
                  + " | ".join(label for _, label, _ in metrics) + f" | success vs {REFERENCE_METHOD} |")
        rule = "|" + "---|" * 7 + "---:|" * len(metrics) + "---|"
        params = ", ".join(sorted({r["model_params"] for r in group}))
        suites = ", ".join(sorted({s for r in group for s in r["suite_version"].split(", ")}))
        lines += [_group_heading(g), "",
                  f"Model parameters: {md_text(params)}. Data: {md_text(g['data_source'])}, sha256 "
                  f"`{g['data_sha256'][:12]}`; env_version {md_text(g['env_version'])}; suite {md_text(suites)}.", "",
                  header, rule]
        for row in group:
            label = _method_label(row["method"], row["config"], len(configs_per_method[row["method"]]))
            cells = [md_text(label), f"`{row['config']}`", md_text(row["teacher_context"]), f"{row['temperature']:g}",
                     str(row["seeds"]), row["train_steps"], row["episodes"]]
            for column, _, digits in metrics:
                cells.append(NO_SE if row[column] is None else _format(row[column], row[column + "_se"], digits))
            cells.append(versus_grpo(row, group))  # generated text: numbers and fixed words only
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        if with_datasets:
            lines += _dataset_table(group, configs_per_method)
        plot = plots.get((g["env_id"], g["model"], g["policy_sha256"]))
        if plot is not None:
            relative = plot.relative_to(root).as_posix()
            lines += [f"Learning curves (left: held-out success after training; right: training {CURVE_METRIC} per "
                      f"step, smoothed by a trailing mean over a tenth of the longest run; {BAND}, all splits): "
                      f"![learning curves]({relative})", ""]
    lines += ["### Method configurations", "", "| config | method | method_config |", "|---|---|---|"]
    seen = set()
    for row in sorted(summary, key=lambda r: (r["method"], r["config"])):
        if (row["config"], row["method"]) not in seen:
            seen.add((row["config"], row["method"]))
            lines.append(f"| `{row['config']}` | {md_text(row['method'])} | "
                         f"{md_text(canonical_json(row['method_config']))} |")
    return lines + [""]


def _dataset_table(group: list[dict[str, Any]], configs_per_method: dict[str, set[str]]) -> list[str]:
    """Success per dataset (mean ± SE over seeds) and its macro average, one line per entry that reports datasets."""
    names = sorted({name for r in group if r["datasets"] for name in r["datasets"]})
    lines = ["Success per dataset (mean ± SE over seeds; the macro average weighs every dataset the same):", "",
             "| method | config | " + " | ".join(md_text(n) for n in names) + " | macro avg |",
             "|---|---|" + "---:|" * (len(names) + 1)]
    for row in group:
        if not row["datasets"]:
            continue
        label = _method_label(row["method"], row["config"], len(configs_per_method[row["method"]]))
        cells = [md_text(label), f"`{row['config']}`"]
        cells += [_format(*row["datasets"][n], 3) if n in row["datasets"] else NO_SE for n in names]
        cells.append(_format(row["macro_average"], row["macro_average_se"], 3))
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def _reference_section(reference: pd.DataFrame) -> list[str]:
    lines = ["## Published numbers (reference, NOT measured by craft-bench)", ""]
    if reference.empty:
        return lines + ["None.", ""]
    lines += ["Copied as printed from the papers named below (`leaderboard/reference/`). They come from other code, "
              "models and environment versions, so they are not comparable entry by entry with the measured tables "
              "above. Method names are as printed; a `*` is the paper's own marker.", ""]
    for (source, table_name), rows in reference.groupby(["source", "table"], sort=True):
        columns = sorted({(b, m, u) for b, m, u in zip(rows["benchmark"], rows["metric"], rows["unit"])})
        lines += [f"### {md_text(source)}, {md_text(table_name)}", "",
                  "| model | method | " + " | ".join(md_text(f"{b}: {m} ({_UNIT_LABELS[u]})") for b, m, u in columns)
                  + " |",
                  "|---|---|" + "---:|" * len(columns)]
        values = {(r.model, r.method, r.benchmark, r.metric): r.value for r in rows.itertuples()}
        for model, method in sorted(set(zip(rows["model"], rows["method"]))):
            cells = [values.get((model, method, b, m), "—") for b, m, _ in columns]
            lines.append("| " + " | ".join(md_text(c) for c in [model, method, *cells]) + " |")
        lines.append("")
    return lines


def _seed_curve(root: Path, path: Path) -> pd.Series | None:
    check_not_linked(root, path)
    if not path.is_file():
        return None
    curve = read_curve(path)
    if CURVE_METRIC not in curve.columns:
        return None
    steps = pd.to_numeric(curve["step"], errors="coerce")
    values = pd.to_numeric(curve[CURVE_METRIC], errors="coerce")
    kept = steps.notna() & values.notna()
    series = pd.Series(values[kept].to_numpy(float), index=steps[kept].to_numpy(float))
    return series.groupby(level=0).mean()


def _style(index: int) -> dict[str, Any]:
    """Line style and marker of the index-th line, so methods differ in more than colour."""
    return {"linestyle": _LINE_STYLES[index % len(_LINE_STYLES)], "marker": _MARKERS[index % len(_MARKERS)]}


def smoothing_window(curves: dict[str, list[pd.Series]]) -> int:
    """Steps in the training panel's trailing mean: a tenth of the longest curve (1, no smoothing, under 20 steps).
    One step's success over B x G episodes is mostly sampling noise (16 episodes at 10% success: ±0.075), which
    unsmoothed makes a panel of several methods unreadable; a tenth keeps a run's trend and its first and last part."""
    longest = max((len(seed) for seeds in curves.values() for seed in seeds), default=0)
    return max(1, longest // 10)


def learning_curve_figure(title: str, evals: dict[str, list[tuple[float, list[float]]]],
                          curves: dict[str, list[pd.Series]]) -> Figure:
    """The learning-curve figure of one table, as two panels (axes) in this order.

    Left: held-out success after training, one marker per method configuration (and per train-step count), mean ± 1
    SE over its n seeds (n in the legend), the untrained `base` model as a horizontal reference line (its mean over
    seeds). Right: training success per step, each seed's curve smoothed by a trailing mean over
    `smoothing_window` steps (named in the title), then the mean over seeds with a ±1 SE band where at least two
    seeds logged that step. Methods differ by colour and by marker and line style; the y axis fits the data (success
    is often low), starting at 0. `evals`: label -> [(train steps, per-seed successes)]; `curves`: label -> per-seed
    step series.
    """
    labels = sorted(set(evals) | set(curves))
    window = smoothing_window(curves)
    top = 0.0
    with matplotlib.style.context("default"):
        figure = Figure(figsize=(11.0, 4.6), dpi=100)
        FigureCanvasAgg(figure)
        left, right = figure.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.4]})
        ticks: list[tuple[float, str]] = []
        for index, label in enumerate(labels):
            style = _style(index)
            color = f"C{index % 10}"
            for steps, successes in evals.get(label, []):
                mean, se = mean_se(successes)
                top = max(top, mean + (se or 0.0))
                if label.split(" ")[0] == BASE_METHOD:
                    left.axhline(mean, color="0.3", linestyle=(0, (6, 3)), linewidth=1.4,
                                 label=f"{label}: untrained, mean of n={len(successes)} seeds")
                    continue
                x = float(len(ticks))
                ticks.append((x, f"{label}, {steps:g} steps"))  # one line: two-line labels collide when rotated
                left.errorbar([x], [mean], yerr=None if se is None else [se], color=color, capsize=4, markersize=7,
                              linestyle="none", marker=style["marker"], label=f"{label} (n={len(successes)} seeds)")
            seeds = curves.get(label)
            if not seeds:
                continue
            smoothed = [seed.sort_index().rolling(window, min_periods=1).mean() for seed in seeds]
            table = pd.concat(smoothed, axis=1).sort_index()  # seeds may have logged different steps
            mean = table.mean(axis=1)
            count = table.count(axis=1)
            se = table.std(axis=1, ddof=1) / np.sqrt(count)
            top = max(top, float((mean + se.fillna(0.0)).max()))
            right.plot(mean.index, mean.to_numpy(), color=color, linewidth=1.5, markersize=5,
                       markevery=max(1, len(mean) // 10), label=f"{label} (n={len(seeds)} seeds)", **style)
            band = (count >= 2).to_numpy()
            right.fill_between(mean.index[band], (mean - se)[band], (mean + se)[band], color=color, alpha=0.15,
                               linewidth=0)
        left.set_xticks([x for x, _ in ticks], [text for _, text in ticks], rotation=35, ha="right",
                        rotation_mode="anchor", fontsize=_label_size(len(ticks)))
        left.set_xlim(-0.6, max(len(ticks), 1) - 0.4)
        left.set_title("held-out eval success after training")
        left.set_ylabel(f"success rate ({BAND})")
        smoothing = f", trailing mean of {window} steps" if window > 1 else ""
        right.set_title(f"training rollouts: {CURVE_METRIC}{smoothing}")
        right.set_xlabel("training step")
        right.set_ylabel(f"training success ({BAND})")
        for axes in (left, right):
            axes.set_ylim(0.0, min(1.0, top * 1.15 + 0.02))
            axes.grid(alpha=0.3)
            entries = len(axes.get_legend_handles_labels()[0])
            if entries:  # a see-through legend, so that points behind a long one stay visible
                axes.legend(loc="best", fontsize=_label_size(entries), framealpha=0.5)
        figure.suptitle(title)
        figure.tight_layout()
    return figure


def _label_size(count: int) -> str:
    """Font size of `count` tick labels or legend entries: smaller past 6, where "small" ones collide."""
    return "small" if count <= 6 else "x-small"


def _png(figure: Figure) -> bytes:
    out = io.BytesIO()
    with matplotlib.style.context("default"):
        # No Software/date chunks: building twice must give identical bytes.
        figure.savefig(out, format="png", metadata={"Software": None})
    return out.getvalue()


def _plots(frame: pd.DataFrame, root: Path) -> dict[tuple[str, ...], tuple[Path, bytes]]:
    """One PNG per (env, model, initial weights), keyed so, with a marker per method configuration's held-out
    success (every split) and a line per configuration's stored training curves."""
    configs_per_method = frame.groupby("method")["method_config"].apply(lambda s: s.map(config_id).nunique()).to_dict()
    evals: dict[tuple[str, ...], dict[str, dict[float, list[float]]]] = {}
    curves: dict[tuple[str, ...], dict[str, list[pd.Series]]] = {}
    splits = frame.groupby(["env_id", "model", "policy_sha256"])["split"].nunique().to_dict()
    for row in frame.to_dict("records"):
        plot_key = (row["env_id"], row["model"], row["policy_sha256"])
        label = _method_label(row["method"], config_id(row["method_config"]), configs_per_method[row["method"]])
        eval_label = label if splits[plot_key] == 1 else f"{label} [{row['split']}]"
        evals.setdefault(plot_key, {}).setdefault(eval_label, {}).setdefault(float(row["train_steps"]), []).append(
            float(row["success_rate"]))
    for row in frame.drop_duplicates(["env_id", "model", "policy_sha256", "method", "method_config", "seed"]
                                     ).to_dict("records"):
        curve = _seed_curve(root, curve_path(root, row))
        if curve is None:
            continue
        label = _method_label(row["method"], config_id(row["method_config"]), configs_per_method[row["method"]])
        curves.setdefault((row["env_id"], row["model"], row["policy_sha256"]), {}).setdefault(label, []).append(curve)
    plots = {}
    for plot_key in sorted(curves):
        env_id, model, policy = plot_key
        name = f"{slug(env_id)}__{slug(model)}" + ("" if policy == UNKNOWN else f"__p{policy[:8]}")
        by_label = {label: sorted(points.items()) for label, points in evals.get(plot_key, {}).items()}
        weights = "" if policy == UNKNOWN else f" · weights {policy[:8]}"
        figure = learning_curve_figure(f"{env_id} · {model}{weights}", by_label, curves[plot_key])
        plots[plot_key] = (root / PLOTS / f"{name}.png", _png(figure))
    return plots


def build(root: str | Path = DEFAULT_ROOT) -> list[Path]:
    """Write root/LEADERBOARD.md and root/plots/*.png (removing plots no entry needs any more); return the paths.
    Everything is computed first; then every output path is checked (no symbolic links) before the first write."""
    root = Path(root)
    frame = load_submissions(root)
    frame["method_config"] = frame["method_config"].map(canonical_json)
    reference = load_reference(root)
    frame = frame.sort_values(["env_id", "model", "policy_sha256", "method", "method_config", "split", "seed"],
                              kind="mergesort")
    plots = _plots(frame, root)
    lines = ["# craft-bench leaderboard", "",
             "Generated by `python -m craft_bench.leaderboard build` from `submissions/`, `curves/` and `reference/`; "
             "do not edit by hand. Protocol and how to submit: [README.md](README.md).", "",
             "Each cell is the mean ± standard error over seeds (sample std / sqrt(n)) of that seed's evaluation on "
             f"the fixed held-out episode list; `± {NO_SE}` marks an entry with one seed (no standard error). Never "
             "the best seed or the best step. A table holds rows of one environment, split, model and initial "
             "weights (one base model).", "",
             f"*success vs {REFERENCE_METHOD}*: mean difference in success to the table's {REFERENCE_METHOD} entry, "
             f"paired over seeds (seed s of the method minus seed s of {REFERENCE_METHOD}), with a "
             f"{CONFIDENCE:.0%} Student-t interval over the n paired seeds (mean ± t(0.975, n-1) · sd / sqrt(n)). "
             f"The untrained `{BASE_METHOD}` model is compared with the {REFERENCE_METHOD} entry evaluated under "
             f"its protocol (same evaluation settings); evaluated greedily it scores the same on every seed, so its "
             f"mean is compared with each {REFERENCE_METHOD} seed (n = {REFERENCE_METHOD}'s seeds); evaluated with "
             "sampling, its seeds are paired like any method's. Where a table holds several "
             f"{REFERENCE_METHOD} entries, each difference names the config id it is taken against. An interval that "
             "excludes 0 is a significant difference at the 5% level.", ""]
    lines += _measured_section(summarise(frame), {key: path for key, (path, _) in plots.items()}, root)
    lines += _reference_section(reference)
    markdown = root / "LEADERBOARD.md"
    outputs = {markdown: ("\n".join(lines).rstrip("\n") + "\n").encode("utf-8")}
    outputs.update({path: data for path, data in plots.values()})
    check_not_linked(root, root / PLOTS)
    stale = [p for p in sorted((root / PLOTS).glob("*.png")) if p not in outputs]
    for path in [*outputs, *stale]:
        check_not_linked(root, path)
    for path, data in sorted(outputs.items()):
        atomic_write_bytes(root, path, data)
    for path in stale:
        path.unlink()
    return [markdown, *sorted(path for path, _ in plots.values())]

