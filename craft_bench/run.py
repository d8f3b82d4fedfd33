"""`python -m craft_bench.run`: train and evaluate one or more methods and seeds, write each run's CSVs, print a table.
With only `--method`, it runs the embedded default: generated ALFWorld tasks and the tiny model, on the CPU.

A run directory `runs/<env>__<method>__<model>__<config id>__s<seed>/` holds config.json, metrics.csv (one row per
step), eval.csv (one row per evaluation episode), result.csv (its leaderboard row), checkpoint.pt (with its
checkpoint.pt.sha256) and final_model/. The config id hashes every setting that changes results (--set values and
method options included), so two configurations never share a directory; one process at a time holds a directory
(`.lock`). `--resume` picks up after any interruption without losing a finished step; `--eval-only` evaluates the
run's final_model/ (else its checkpoint, else the initial model, and says which) into eval_only.csv and
eval_only_result.csv, never touching the training outputs; with `--trained-in DIR` it evaluates the model a finished
run in DIR trained with the same settings under this call's evaluation protocol (more episodes, say) into a run
directory of its own. Bad settings are refused before anything is created.

`--method base` (SDAR's "Vanilla") evaluates the untrained initial model on the run's evaluation list: no training,
no checkpoint, train_steps 0. Its config id leaves out training-only settings (leaderboard.identity), so one base
row stands beside every method of one env x model x evaluation protocol; `--resume` or `--eval-only` of a finished
base run reports its row without evaluating again.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import re
import shutil
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import pandas as pd

from craft_bench.agents.checkpoint import (
    CheckpointError,
    NonFiniteError,
    digest_path,
    load_checkpoint,
)
from craft_bench.agents.distributed import DataParallel
from craft_bench.agents.episodes import invalid_rate
from craft_bench.agents.methods import METHOD_NAMES, make_method
from craft_bench.agents.policy import count_parameters
from craft_bench.agents.presets import PRESET_NAMES, preset_values
from craft_bench.agents.run_files import (
    ConfigError,
    RunLock,
    RunLockedError,
    config_differences,
    read_metrics,
    validate_train_config,
    write_json_atomic,
    write_text_atomic,
)
from craft_bench.agents.trainer import (
    CHECKPOINT_FILE,
    CONFIG_FILE,
    EVAL_FILE,
    FINAL_MODEL_DIR,
    METRICS_FILE,
    TrainConfig,
    Trainer,
    TrainState,
)
from craft_bench.leaderboard.schema import BASE_METHOD

RESULT_FILE = "result.csv"
EVAL_ONLY_FILE = "eval_only.csv"
EVAL_ONLY_RESULT_FILE = "eval_only_result.csv"
#: `--method base --privileged-eval`: the same evaluation episodes played on the teacher prompt (privileged block shown).
PRIVILEGED_EVAL_FILE = "eval_privileged.csv"
#: The trained model's TrainState, beside final_model/'s weights: what --eval-only reports as train_steps.
FINAL_STATE_FILE = "craft_bench_state.json"
#: Fields that --set may not change, and the flag that does.
FLAG_FIELDS = {"seed": "--seeds (e.g. --seeds 0,1,2)", "method": "--method"}
#: What --method accepts: the untrained model `base`, then every trainer.
RUN_METHODS: tuple[str, ...] = (BASE_METHOD, *METHOD_NAMES)
#: The method a `base` evaluation builds its Trainer with: its options are {}, so it holds no teacher or reference
#: copy; it never trains, so the method never acts. (Trainer has no evaluation-only mode to ask for instead.)
BASE_STAND_IN = "grpo"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(prog="python -m craft_bench.run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", action="append", required=True, help=f"method(s), comma-separated or repeated: {', '.join(RUN_METHODS)} (base: the untrained model, evaluated only)")
    parser.add_argument("--env", default=defaults.env_id, help=f"environment id (default {defaults.env_id})")
    parser.add_argument("--model", default=defaults.model, help="hub id, local path or .gguf, 'smollm2-135m' (offline chat model, extra smollm2), or 'tiny' (default)")
    parser.add_argument("--engine", choices=["hf", "vllm"], default=None, help="rollout engine: hf (default) or vllm (extra vllm; docs/real_models.md)")
    parser.add_argument("--env-workers", default=None, help="where env workers run: local (default), ray, ray://HOST:PORT or auto (a running Ray cluster), inprocess")
    parser.add_argument("--steps", type=int, default=None, help=f"training steps (default {defaults.steps})")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds, e.g. 0,1,2 (default 0)")
    parser.add_argument("--preset", choices=PRESET_NAMES, default="cpu", help="cpu: the embedded tiny setting; paper: SDAR/CRAFT's GPU setting")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE", help="override any TrainConfig field (JSON value), e.g. --set group_size=8")
    parser.add_argument("--option", dest="method_options", action="append", default=[], metavar="NAME=VALUE", help="method option (JSON value), e.g. --option p1=false")
    parser.add_argument("--out", default="runs", help="parent directory of run directories (default runs/)")
    parser.add_argument("--device", default=None, help="torch device, e.g. cuda (default cpu)")
    parser.add_argument("--num-workers", type=int, default=None, help="environment worker processes (default: cores)")
    parser.add_argument("--resume", action="store_true", help="continue existing runs from their last checkpoint")
    parser.add_argument("--eval-only", action="store_true", help="evaluate (the run's trained model if it exists, else the initial one) without training")
    parser.add_argument("--trained-in", default=None, metavar="DIR", help="with --eval-only: evaluate the model that a finished run in DIR trained with these settings, under this call's evaluation protocol (--set eval_episodes / eval_samples / eval_temperature / eval_split may differ from the run's), into a run directory of its own under --out, ready for `leaderboard submit`")
    parser.add_argument("--privileged-eval", action="store_true", help=f"with --method base: also play the evaluation episodes on the teacher prompt (the privileged block shown) into {PRIVILEGED_EVAL_FILE}, the untrained model's success with the privileged context")
    parser.add_argument("--overwrite", action="store_true", help="delete an existing run directory's outputs and start over")
    parser.add_argument("--log", default="csv", help="comma-separated loggers beyond the CSVs: tensorboard, wandb")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def build_configs(args: argparse.Namespace) -> list[TrainConfig]:
    """One TrainConfig per (method, seed), seed-major: every method gets seed 0 before any gets seed 1, so an
    interrupted multi-seed call has already compared all methods on the seeds it finished.

    Every check that can fail runs here, before any directory is created: flags, methods and their options, seeds,
    the type and range of every setting, the environment id, the model path and the device."""
    methods = [m.strip() for group in args.method for m in group.split(",") if m.strip()]
    unknown = [m for m in methods if m not in RUN_METHODS]
    if unknown:
        raise SystemExit(f"error: unknown method(s) {unknown}; valid: {', '.join(RUN_METHODS)}")
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise SystemExit(f"error: --seeds must be comma-separated integers, got {args.seeds!r}") from None
    if not seeds:
        raise SystemExit("error: --seeds is empty")
    if args.privileged_eval and BASE_METHOD not in methods:
        raise SystemExit(f"error: --privileged-eval evaluates the untrained model on the teacher prompt; it needs --method {BASE_METHOD}")
    if args.eval_only and (args.resume or args.overwrite):
        raise SystemExit("error: --eval-only evaluates an existing run as it is; it cannot be combined with --resume or --overwrite")
    if args.trained_in is not None:
        if not args.eval_only:
            raise SystemExit("error: --trained-in names where a trained model is, to evaluate it: it needs --eval-only")
        if BASE_METHOD in methods:
            raise SystemExit(f"error: --trained-in evaluates trained models; method {BASE_METHOD!r} (the untrained model) "
                             f"is evaluated under any protocol by --method {BASE_METHOD} alone")
        if not Path(args.trained_in).is_dir():
            raise SystemExit(f"error: --trained-in {args.trained_in}: no such directory")
    overrides: dict[str, Any] = {"env_id": args.env, "model": args.model}
    if args.steps is not None:
        overrides["steps"] = args.steps
    if args.device is not None:
        overrides["device"] = args.device
    if args.num_workers is not None:
        overrides["num_workers"] = args.num_workers
    if args.engine is not None:
        overrides["engine"] = args.engine
    if args.env_workers is not None:
        if args.env_workers.startswith("ray://") or args.env_workers == "auto":
            overrides["env_workers"], overrides["ray_address"] = "ray", args.env_workers
        else:
            overrides["env_workers"] = args.env_workers
    for item in args.overrides:
        key, value = _key_value(item, "--set")
        if key in FLAG_FIELDS:
            raise SystemExit(f"error: --set {key} is not a setting of one run; use {FLAG_FIELDS[key]}")
        overrides[key] = value
    cli_options = dict(_key_value(item, "--option") for item in args.method_options)
    try:
        validate_train_config({**overrides, "seed": seeds[0]}, TrainConfig)
        for seed in seeds[1:]:
            validate_train_config({"seed": seed}, TrainConfig)
    except ConfigError as error:
        raise SystemExit(f"error: {error}") from None
    _check_env(overrides["env_id"])
    _check_model(overrides["model"])
    _check_device(overrides.get("device", TrainConfig().device))
    set_options = overrides.pop("method_options", {})
    if set(methods) == {BASE_METHOD} and (cli_options or set_options):
        raise SystemExit(f"error: method {BASE_METHOD!r} (the untrained model) has no options; drop --option and --set method_options")
    configs = []
    for seed in seeds:
        for method in methods:
            values = preset_values(args.preset, method, overrides["env_id"])
            # Preset options, then --set method_options={...}, then each --option: the most specific wins. The
            # untrained model has none (the preset's other settings, its evaluation protocol, still apply).
            options = {**values.pop("method_options", {}), **set_options, **cli_options}
            if method == BASE_METHOD:
                options = {}
            values = {**values, **overrides, "method": method, "seed": seed, "method_options": options}
            try:
                validate_train_config(values, TrainConfig)
                if method != BASE_METHOD:
                    make_method(method, **options)  # unknown or bad method options fail here, not after the start
                configs.append(TrainConfig.from_dict(values))
            except (TypeError, ValueError) as error:  # ConfigError is a ValueError
                raise SystemExit(f"error: {error}") from None
    return configs


def _check_env(env_id: str) -> None:
    import gymnasium as gym

    import craft_bench  # noqa: F401  (registers the craft/* ids)

    if env_id not in gym.registry:
        valid = sorted(k for k in gym.registry if k.startswith("craft/"))
        raise SystemExit(f"error: unknown environment {env_id!r}; valid: {', '.join(valid)}")


def _check_model(model: str) -> None:
    """A --model that names a local path must exist; hub ids (`org/name`) and "tiny" are checked when loaded."""
    path = Path(model).expanduser()
    looks_like_path = model.startswith(("/", ".", "~")) or "\\" in model or model.count("/") > 1
    if looks_like_path and not path.exists():
        raise SystemExit(
            f"error: --model {model}: no such file or directory (give a local model directory, a hub id such as "
            "Qwen/Qwen2.5-0.5B-Instruct, or tiny)"
        )


def _check_device(device: str) -> None:
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise SystemExit(f"error: --device {device!r} is not a torch device (e.g. cpu, cuda, cuda:1, mps)") from None
    if parsed.type == "cuda":
        if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
            raise SystemExit(f"error: --device {device}: this torch build ({torch.__version__}) has no CUDA support; use --device cpu, or install a CUDA build of torch")
        count = torch.cuda.device_count()
        if count == 0:
            raise SystemExit(f"error: --device {device}: no CUDA device is visible (torch {torch.__version__}); use --device cpu")
        if parsed.index is not None and parsed.index >= count:
            raise SystemExit(f"error: --device {device}: only {count} CUDA device(s) are visible (cuda:0 to cuda:{count - 1})")
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise SystemExit(f"error: --device {device}: MPS is not available on this machine; use --device cpu")


def run_config_of(config: TrainConfig) -> dict[str, Any]:
    """The run's `method_config` (leaderboard.identity.run_config): its method's resolved options ({} for base) and
    every other setting that changes results. The one source of the run directory's id, config.json's run_id and
    the result row's method_config, so the three cannot drift apart."""
    from craft_bench.leaderboard.identity import run_config

    options = {} if config.method == BASE_METHOD else make_method(config.method, **config.method_options).config
    return run_config(asdict(config), options)


def run_id(config: TrainConfig) -> str:
    """The configuration's id (leaderboard.identity.config_id of `run_config_of`): every setting that changes
    results except the ones in the run name itself (env, method, model, split, seed); the leaderboard names the
    run's entry with the same id (`config_id` of the row's method_config)."""
    from craft_bench.leaderboard.identity import config_id

    return config_id(run_config_of(config))


def run_name(config: TrainConfig) -> str:
    """`<env>__<method>__<model>__<config id>__s<seed>`, file-system safe."""
    env = config.env_id.split("/")[-1]
    model = Path(config.model).name if config.model != "tiny" else "tiny"
    parts = [env, config.method, model, run_id(config), f"s{config.seed}"]
    return "__".join(re.sub(r"[^A-Za-z0-9._-]+", "-", p) for p in parts)


def run_one(
    config: TrainConfig, out: Path, *, resume: bool, eval_only: bool, overwrite: bool, progress: bool,
    loggers: list[str], dp: DataParallel | None = None, privileged_eval: bool = False, trained_in: Path | None = None,
) -> dict[str, Any] | None:
    """Train (unless eval-only), evaluate, write the run's files; returns its leaderboard row (None on the
    data-parallel ranks other than 0, which train but neither write nor evaluate). With `trained_in` (eval-only),
    the model a finished run there trained is evaluated under this config's evaluation protocol instead.

    The run directory is locked for the whole call, so a second process is refused (naming this one's pid) instead
    of writing every step twice. A start that fails before writing anything removes the directory it created."""
    dp = dp or DataParallel()
    if eval_only and dp.world_size > 1:
        raise SystemExit("error: --eval-only runs in one process; launch it without accelerate/torchrun")
    run_dir = out / run_name(config)
    source = _trained_source(config, trained_in) if trained_in is not None else None
    if config.method == BASE_METHOD and not dp.is_main:
        return None  # evaluation only: rank 0 does it alone, nothing collective happens
    if not dp.is_main:  # rank 0 makes, locks and checks the directory; the others follow its verdict
        verdict = dp.gather(None)[0]
        if verdict:
            raise SystemExit(verdict)
        try:
            return _train_and_evaluate(config, run_dir, resume=resume, overwrite=overwrite, progress=False,
                                       loggers=[], dp=dp)
        except (CheckpointError, NonFiniteError) as error:
            raise SystemExit(f"error: {error}") from None
    created = [d for d in (out, run_dir) if not d.exists()]
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = RunLock(run_dir)
    try:
        lock.acquire()
    except RunLockedError as error:
        _tell_ranks(dp, f"error: {error}")
        raise SystemExit(f"error: {error}") from None
    try:
        if config.method == BASE_METHOD:
            return _evaluate_base(config, run_dir, finished_ok=resume or eval_only, overwrite=overwrite,
                                  progress=progress, privileged=privileged_eval)
        if source is not None:
            return _evaluate_trained_elsewhere(config, run_dir, source, progress=progress)
        if eval_only:
            return _evaluate_only(config, run_dir, progress=progress)
        if dp.world_size > 1:
            try:
                _check_fresh_or_resumed(run_dir, resume=resume, overwrite=overwrite)
            except SystemExit as error:
                _tell_ranks(dp, str(error))
                raise
            _tell_ranks(dp, None)
        return _train_and_evaluate(config, run_dir, resume=resume, overwrite=overwrite, progress=progress,
                                   loggers=loggers, dp=dp)
    except (CheckpointError, NonFiniteError) as error:
        raise SystemExit(f"error: {error}") from None
    finally:
        lock.release()
        for folder in reversed(created):  # only what this call created, and only if nothing else is in it
            if folder == run_dir and {p.name for p in folder.iterdir()} <= {".lock"}:
                (folder / ".lock").unlink(missing_ok=True)
            try:
                folder.rmdir()
            except OSError:
                break


def _tell_ranks(dp: DataParallel, verdict: str | None) -> None:
    """Rank 0's verdict on the run directory (None: go; else the error), sent to the other ranks, which wait for it
    at the start of `run_one` and exit with the same error instead of waiting forever."""
    if dp.world_size > 1:
        dp.gather(verdict)


#: Everything a training run writes, removed by --overwrite (eval_only files and loggers' folders stay).
TRAINING_OUTPUTS = (CONFIG_FILE, METRICS_FILE, EVAL_FILE, RESULT_FILE, PRIVILEGED_EVAL_FILE, CHECKPOINT_FILE, digest_path(CHECKPOINT_FILE).name, FINAL_MODEL_DIR)


def _check_fresh_or_resumed(run_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse to write over a finished or interrupted run unless told to resume or overwrite it; --overwrite
    removes its training outputs."""
    existing = [name for name in TRAINING_OUTPUTS if (run_dir / name).exists()]
    if existing and not (resume or overwrite):
        raise SystemExit(f"error: {run_dir} already holds a run ({', '.join(existing)}); pass --resume to continue it, --eval-only to evaluate it, or --overwrite to start over")
    if overwrite:
        for name in TRAINING_OUTPUTS:
            target = run_dir / name
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)


def _train_and_evaluate(
    config: TrainConfig, run_dir: Path, *, resume: bool, overwrite: bool, progress: bool, loggers: list[str],
    dp: DataParallel,
) -> dict[str, Any] | None:
    if dp.world_size == 1:  # with several ranks, rank 0 checked before the others started
        _check_fresh_or_resumed(run_dir, resume=resume, overwrite=overwrite)
    trainer = _start_trainer(config, run_dir, progress=progress, dp=dp)
    try:
        trainer.loggers = _make_loggers(loggers, run_dir, config)
        policy_sha256 = _weights_sha256(trainer)  # the initial weights, before a checkpoint replaces them
        try:
            resumed = trainer.load_checkpoint() if resume else False
        except ValueError as error:  # a different config in the checkpoint
            raise SystemExit(f"error: {error}") from None
        if resume and not resumed and dp.is_main:
            print(f"{run_dir}: no checkpoint to resume, starting at step 0", file=sys.stderr)
        if dp.is_main:
            write_json_atomic(run_dir / CONFIG_FILE, {**_config_record(config, trainer), "policy_sha256": policy_sha256})
        trainer.train()
        if not dp.is_main:  # rank 0 saves, evaluates and writes the results of the one model every rank holds
            dp.barrier()
            return None
        trainer.save_final_model()
        write_json_atomic(run_dir / FINAL_MODEL_DIR / FINAL_STATE_FILE, asdict(trainer.state))
        row = _evaluate_into(config, trainer, run_dir / EVAL_FILE, run_dir / RESULT_FILE, policy_sha256)
        dp.barrier()
        return row
    finally:
        trainer.close()
        for logger in trainer.loggers:
            logger.close()


def _evaluate_only(config: TrainConfig, run_dir: Path, *, progress: bool) -> dict[str, Any]:
    """Evaluate the run's trained weights (final_model/, else the checkpoint, else the initial model) into
    eval_only.csv and eval_only_result.csv. Reads the training outputs, never writes them."""
    final = run_dir / FINAL_MODEL_DIR
    checkpoint = run_dir / CHECKPOINT_FILE
    policy_sha256 = _recorded_policy_sha256(run_dir)
    if (final / "config.json").is_file():
        trainer = _start_trainer(replace(config, model=str(final)), run_dir, progress=progress)
        steps, source = _final_model_steps(run_dir)
        trainer.state.step = steps
        what = f"{final} ({steps} training steps, from {source})"
    elif checkpoint.exists():
        trainer = _start_trainer(config, run_dir, progress=progress)
        try:
            policy_sha256 = policy_sha256 or _weights_sha256(trainer)
            payload = load_checkpoint(checkpoint, config.device)
            differing = config_differences(payload["config"], asdict(config), asdict(TrainConfig()))
            if differing:
                raise SystemExit(f"error: {checkpoint} was made with other settings ({', '.join(differing)} differ)")
            trainer.model.load_state_dict(payload["model"])
            trainer.state = type(trainer.state)(**payload["state"])
        except BaseException:
            trainer.close()
            raise
        what = f"{checkpoint} (no final_model/: the run stopped after {trainer.state.step} of {config.steps} steps)"
    else:
        trainer = _start_trainer(config, run_dir, progress=progress)
        policy_sha256 = _weights_sha256(trainer)
        what = f"the initial model {config.model} ({run_dir} holds no trained model: neither final_model/ nor {CHECKPOINT_FILE})"
        siblings = sorted(p.name for p in run_dir.parent.glob(_any_config_id(run_dir.name)) if p != run_dir)
        if siblings:
            what += f"; runs of the same method, model and seed with other settings (see their config.json): {', '.join(siblings)}"
    print(f"eval-only: evaluating {what}", file=sys.stderr)
    try:
        return _evaluate_into(config, trainer, run_dir / EVAL_ONLY_FILE, run_dir / EVAL_ONLY_RESULT_FILE, policy_sha256)
    finally:
        trainer.close()


def _trained_source(config: TrainConfig, parent: Path) -> Path:
    """The finished run under `parent` (same env, method, model and seed, with a final_model/) whose configuration
    is `config`'s apart from the evaluation protocol (identity.EVALUATION_PROTOCOL_SETTINGS): the run that trained
    the very model `config` describes. Refuses, naming what differs, when there is none."""
    from craft_bench.leaderboard.identity import EVALUATION_PROTOCOL_SETTINGS

    protocol = {name: getattr(config, name) for name in EVALUATION_PROTOCOL_SETTINGS}
    wanted = run_config_of(config)
    pattern = _any_config_id(run_name(config))
    found, near = [], []
    for run_dir in sorted(parent.glob(pattern)):
        if not (run_dir / FINAL_MODEL_DIR / "config.json").is_file():
            continue
        try:
            saved = TrainConfig.from_dict(json.loads((run_dir / CONFIG_FILE).read_text())["config"])
        except (OSError, ValueError, KeyError, TypeError) as error:
            near.append(f"{run_dir.name} (its {CONFIG_FILE} cannot be read: {error})")
            continue
        theirs = run_config_of(replace(saved, **protocol))
        if theirs == wanted:
            found.append(run_dir)
        else:
            near.append(f"{run_dir.name} ({', '.join(_differing(theirs, wanted))} differ)")
    if not found:
        listed = "; ".join(near) if near else f"no {pattern} directory holds a {FINAL_MODEL_DIR}/"
        raise SystemExit(f"error: --trained-in {parent}: no finished run there was trained with these settings "
                         f"(only {', '.join(EVALUATION_PROTOCOL_SETTINGS)} may differ): {listed}")
    if len(found) > 1:  # one training configuration evaluated under several protocols: the same trained model
        print(f"--trained-in: {len(found)} runs trained with these settings ({', '.join(p.name for p in found)}); "
              f"evaluating {found[0].name}'s model", file=sys.stderr)
    return found[0]


def _any_config_id(name: str) -> str:
    """A glob of the run names of `name`'s env, method, model and seed under any config id."""
    return re.sub(r"__[0-9a-f]{8}__s", "__*__s", name)


def _differing(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """The names of the settings and method options in which two run configs (`run_config_of`) differ, sorted."""
    def named(config: dict[str, Any]) -> dict[str, Any]:
        return {**{k: v for k, v in config.items() if k != "train"}, **config["train"]}

    a, b = named(a), named(b)
    return sorted(k for k in a.keys() | b.keys() if k not in a or k not in b or a[k] != b[k])


def _evaluate_trained_elsewhere(config: TrainConfig, run_dir: Path, source: Path, *, progress: bool) -> dict[str, Any]:
    """Evaluate `source`'s final_model/ (trained with `config`'s training settings) under `config`'s evaluation
    protocol, into `run_dir`: config.json (naming the source under "trained_in"), the source's metrics.csv (the same
    training, so the same curve), eval.csv and result.csv. The row's train_steps and wall_clock_s are the source's
    training plus this evaluation. A run_dir that already holds a result is reported, not evaluated again."""
    from craft_bench.leaderboard import validate_csv

    result = run_dir / RESULT_FILE
    if result.is_file():
        print(f"{run_dir}: already evaluated ({RESULT_FILE}); nothing to do", file=sys.stderr)
        return validate_csv(result).to_dict("records")[0]
    _check_fresh_or_resumed(run_dir, resume=False, overwrite=False)
    state_file = source / FINAL_MODEL_DIR / FINAL_STATE_FILE
    try:
        state = TrainState(**json.loads(state_file.read_text()))
    except (OSError, ValueError, TypeError) as error:
        raise SystemExit(f"error: {state_file} cannot be read ({error}): the run's training time and steps are unknown") from None
    policy_sha256 = _recorded_policy_sha256(source)
    if policy_sha256 is None:
        raise SystemExit(f"error: {source / CONFIG_FILE} does not record the initial weights' hash (policy_sha256)")
    print(f"eval-only: evaluating {source / FINAL_MODEL_DIR} ({state.step} training steps) into {run_dir}", file=sys.stderr)
    trainer = _start_trainer(replace(config, model=str(source / FINAL_MODEL_DIR)), run_dir, progress=progress)
    try:
        trainer.state = state
        # config.json and metrics.csv come after the evaluation, result.csv last of all: an evaluation that fails
        # or is killed leaves nothing that would refuse the next try (result.csv means done).
        records, eval_s = _evaluate_records(trainer)
        if (source / METRICS_FILE).is_file():
            shutil.copyfile(source / METRICS_FILE, run_dir / METRICS_FILE)
        write_json_atomic(run_dir / CONFIG_FILE, {**_config_record(config, trainer), "policy_sha256": policy_sha256,
                                                  "trained_in": str(source)})
        return _write_evaluation(config, trainer, records, eval_s, run_dir / EVAL_FILE, result, policy_sha256)
    finally:
        trainer.close()


def _evaluate_base(config: TrainConfig, run_dir: Path, *, finished_ok: bool, overwrite: bool, progress: bool,
                   privileged: bool = False) -> dict[str, Any]:
    """`base`: the untrained initial model on the run's evaluation list, into eval.csv and result.csv (train_steps
    0, the initial weights' hash); no optimizer step, no checkpoint, no final_model/. It evaluates through the
    Trainer (with BASE_STAND_IN, never trained), so the base row is measured exactly as every trained row is. A
    finished base run is reported, not evaluated again, under --resume or --eval-only (nothing could change it).
    With `privileged`, the same episodes are also played on the teacher prompt into eval_privileged.csv (once)."""
    from craft_bench.leaderboard import validate_csv

    result = run_dir / RESULT_FILE
    row = None
    if result.is_file() and finished_ok and not overwrite:
        row = validate_csv(result).to_dict("records")[0]
        if not privileged or (run_dir / PRIVILEGED_EVAL_FILE).is_file():
            _check_base_weights(row, _initial_weights_sha256(config, progress=progress), config, result)
            print(f"{run_dir}: the untrained model is already evaluated ({RESULT_FILE}); nothing to do", file=sys.stderr)
            return row
    else:
        _check_fresh_or_resumed(run_dir, resume=finished_ok, overwrite=overwrite)
    trainer = _start_trainer(replace(config, method=BASE_STAND_IN, method_options={}), run_dir, progress=progress)
    try:
        policy_sha256 = _weights_sha256(trainer)
        if row is None:
            write_json_atomic(run_dir / CONFIG_FILE, {**_config_record(config, trainer), "policy_sha256": policy_sha256})
            row = _evaluate_into(config, trainer, run_dir / EVAL_FILE, result, policy_sha256)
        else:  # only the privileged evaluation is missing: the trainer's own weights are checked, not loaded twice
            _check_base_weights(row, policy_sha256, config, result)
        if privileged:
            _evaluate_privileged(trainer, run_dir / PRIVILEGED_EVAL_FILE)
        return row
    finally:
        trainer.close()


def _check_base_weights(row: dict[str, Any], current: str, config: TrainConfig, result: Path) -> None:
    """A finished base row stands only for the weights it was measured on. The directory name cannot hold the
    weights' hash (known only once loaded): a model rebuilt or replaced under the same name must not inherit it."""
    if row["policy_sha256"] != current:
        raise SystemExit(
            f"error: {result} was measured on initial weights {row['policy_sha256'][:12]}, but --model "
            f"{config.model} now loads weights {current[:12]}; pass --overwrite to evaluate the new ones"
        )


def _evaluate_privileged(trainer: Trainer, path: Path) -> None:
    """The evaluation episodes played on the teacher prompt, into `path`, with a one-line summary on stderr."""
    records = trainer.evaluate(act_on="teacher")
    write_text_atomic(path, pd.DataFrame(records).to_csv(index=False))
    won = sum(bool(r["won"]) for r in records)
    invalid = invalid_rate([r["invalid_actions"] for r in records], [r["steps"] for r in records])
    print(f"{path}: on the teacher prompt (privileged block shown) {won}/{len(records)} won "
          f"(success {won / len(records):.3f}), invalid-action rate {invalid:.3f}", file=sys.stderr)


def _initial_weights_sha256(config: TrainConfig, *, progress: bool) -> str:
    """The hash of the weights `config.model` loads now (as Trainer loads them), without starting a Trainer."""
    from craft_bench.agents.policy import Policy
    from craft_bench.leaderboard.identity import weights_sha256

    tiny_options = ({"env_id": config.env_id, "env_kwargs": config.env_kwargs, "budget": config.tiny_budget,
                     "progress": progress} if config.model == "tiny" else None)
    try:
        policy = Policy.from_pretrained(config.model, device=config.device, tiny_options=tiny_options)
    except (OSError, ValueError, ImportError) as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise SystemExit(f"error: could not load --model {config.model}: {first}") from None
    return weights_sha256(policy.engine.model.state_dict())  # type: ignore[attr-defined]


def _weights_sha256(trainer: Trainer) -> str:
    from craft_bench.leaderboard.identity import weights_sha256

    return weights_sha256(trainer.model.state_dict())


def _recorded_policy_sha256(run_dir: Path) -> str | None:
    """The initial weights' hash the training run recorded in config.json, if any."""
    try:
        value = json.loads((run_dir / CONFIG_FILE).read_text()).get("policy_sha256")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) and re.fullmatch(r"[0-9a-f]{64}", value) else None


def _final_model_steps(run_dir: Path) -> tuple[int, str]:
    """How many steps final_model/ was trained for, and where that number comes from."""
    state_file = run_dir / FINAL_MODEL_DIR / FINAL_STATE_FILE
    if state_file.is_file():
        try:
            return int(json.loads(state_file.read_text())["step"]), state_file.name
        except (ValueError, KeyError, TypeError):
            pass
    _, rows = read_metrics(run_dir / METRICS_FILE)
    return len(rows), f"{METRICS_FILE} ({FINAL_STATE_FILE} is missing)"


def _start_trainer(config: TrainConfig, run_dir: Path, *, progress: bool, dp: DataParallel | None = None) -> Trainer:
    """The Trainer, with a model or environment that cannot be loaded reported in one line."""
    try:
        return Trainer(config, run_dir, progress=progress, data_parallel=dp)
    except (OSError, ValueError, ImportError) as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise SystemExit(f"error: could not start the run with --model {config.model} on {config.env_id}: {first}") from None


def _evaluate_into(config: TrainConfig, trainer: Trainer, eval_path: Path, result_path: Path, policy_sha256: str | None) -> dict[str, Any]:
    records, eval_s = _evaluate_records(trainer)
    return _write_evaluation(config, trainer, records, eval_s, eval_path, result_path, policy_sha256)


def _evaluate_records(trainer: Trainer) -> tuple[list[dict[str, Any]], float]:
    """The evaluation's episode records (with each episode's dataset / task_score where the env reports them) and
    its seconds."""
    tick = time.perf_counter()
    records = trainer.evaluate()
    return records, time.perf_counter() - tick


def _write_evaluation(config: TrainConfig, trainer: Trainer, records: list[dict[str, Any]], eval_s: float,
                      eval_path: Path, result_path: Path, policy_sha256: str | None) -> dict[str, Any]:
    """eval.csv, then result.csv (the row, returned)."""
    from craft_bench.leaderboard import make_result_row, write_result_csv

    write_text_atomic(eval_path, pd.DataFrame(records).to_csv(index=False))
    row = make_result_row(**_result_fields(config, trainer, records, eval_s), policy_sha256=policy_sha256 or "unknown")
    write_result_csv(result_path, [row])
    return row


def _result_fields(config: TrainConfig, trainer: Trainer, records: list[dict[str, Any]], eval_s: float) -> dict[str, Any]:
    from craft_bench.leaderboard.schema import per_dataset_success

    n = len(records)
    won = [float(r["won"]) for r in records]
    success = sum(won) / n
    by_type: dict[str, list[float]] = {}
    for record in records:
        by_type.setdefault(record["task_type"], []).append(float(record["won"]))
    env_meta = _env_metadata(config, trainer)
    state = trainer.state
    scores = [r.get("task_score") for r in records]
    return {
        "env_id": config.env_id,
        "env_version": env_meta["env_version"],
        "data_source": env_meta["data_source"],
        "data_sha256": env_meta["data_sha256"],
        "split": config.eval_split,
        "method": config.method,
        "method_config": run_config_of(config),
        "teacher_context": env_meta["teacher_context"] if config.method != BASE_METHOD and trainer.method.needs_teacher else "none",
        "model": config.model,
        "model_params": count_parameters(trainer.model),
        "seed": config.seed,
        "train_steps": state.step,
        "n_eval_episodes": n,
        "success_rate": success,
        "success_se": math.sqrt(success * (1 - success) / (n - 1)) if n > 1 else 0.0,
        "progress_mean": sum(float(r["progress"]) for r in records) / n,
        "return_mean": sum(float(r["return"]) for r in records) / n,
        "steps_mean": sum(float(r["steps"]) for r in records) / n,
        "invalid_action_rate": invalid_rate([r["invalid_actions"] for r in records], [r["steps"] for r in records]),
        "per_task_type": {k: sum(v) / len(v) for k, v in sorted(by_type.items())},
        "wall_clock_s": round(state.wall_clock_s + eval_s, 3),
        "env_steps_per_s": round(state.env_steps / state.env_time_s, 3) if state.env_time_s > 0 else 0.0,
        # Environments with a graded score (WebShop) report it per episode; the others have none ('NA').
        "task_score": sum(scores) / n if all(isinstance(v, (int, float)) for v in scores) else None,
        # Environments whose episodes come from several datasets (Search-QA) report success per dataset; the
        # leaderboard adds their macro average, as Search-R1 and SDAR report it.
        "per_dataset": per_dataset_success(records) if all(r.get("dataset") for r in records) else None,
    }


def _env_metadata(config: TrainConfig, trainer: Trainer) -> dict[str, str]:
    """Version, data provenance and privileged keys of the evaluation environment, from an evaluation episode's info."""
    info = trainer.eval_info
    if info is None:
        raise RuntimeError("the result row needs trainer.evaluate() to have run first")
    digest = info.get("data_sha256")
    if not (isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest)):
        # Environments without their own data hash: the identity of the evaluated episode list.
        digest = hashlib.sha256(json.dumps([config.env_id, info["env_version"], trainer.eval_tasks]).encode()).hexdigest()
    keys = sorted(k for k in info["privileged"] if k != "text")
    return {
        "env_version": str(info["env_version"]),
        "data_source": str(info["data_source"]),
        "data_sha256": digest,
        "teacher_context": "+".join(keys) or "none",
    }


def _config_record(config: TrainConfig, trainer: Trainer) -> dict[str, Any]:
    import torch
    import transformers

    import craft_bench

    return {
        "config": asdict(config),
        "run_id": run_id(config),
        "method_config": {} if config.method == BASE_METHOD else trainer.method.config,
        "eval_tasks": trainer.eval_tasks,
        "versions": {
            "craft_bench": craft_bench.__version__,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
    }


def _key_value(item: str, flag: str) -> tuple[str, Any]:
    if "=" not in item:
        raise SystemExit(f"error: {flag} expects NAME=VALUE, got {item!r}")
    key, raw = item.split("=", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw  # a bare string such as --set model=Qwen/Qwen2.5-3B-Instruct
    return key.strip(), value


def _make_loggers(names: list[str], run_dir: Path, config: TrainConfig) -> list:
    from craft_bench.loggers import make_loggers

    return make_loggers(names, run_dir, asdict(config))


def _summary(rows: list[dict[str, Any]]) -> pd.DataFrame:
    frame = pd.DataFrame(rows)[["env_id", "method", "model", "seed", "train_steps", "n_eval_episodes", "success_rate", "progress_mean", "invalid_action_rate", "wall_clock_s"]]
    numbers = ["seed", "train_steps", "n_eval_episodes", "success_rate", "progress_mean", "invalid_action_rate", "wall_clock_s"]
    return frame.assign(**{c: pd.to_numeric(frame[c]) for c in numbers})  # a reported base row is read as text


def main(argv: list[str] | None = None) -> int:
    from craft_bench.loggers import check_loggers

    args = parse_args(argv)
    configs = build_configs(args)
    loggers = [name.strip() for name in args.log.split(",") if name.strip() and name.strip() != "csv"]
    check_loggers(loggers)
    out = Path(args.out)
    # Launched by accelerate or torchrun (WORLD_SIZE > 1): data-parallel ranks (agents/distributed.py).
    dp = DataParallel.from_environment(configs[0].device)
    rows = []
    for config in configs:
        rows.append(run_one(config, out, resume=args.resume, eval_only=args.eval_only, overwrite=args.overwrite,
                            progress=not args.no_progress, loggers=loggers, dp=dp, privileged_eval=args.privileged_eval,
                            trained_in=Path(args.trained_in) if args.trained_in else None))
    dp.close()  # every rank finished: leave the process group before exiting (not on an error, where a rank may be gone)
    if not dp.is_main:
        return 0
    table = _summary(rows)
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    if len(rows) > 1:
        grouped = table.groupby(["env_id", "method", "model"])["success_rate"].agg(["mean", "sem", "count"]).reset_index()
        print("\nmean success over seeds (sem = standard error):")
        print(grouped.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"\nrun directories under {out}/; submit with: python -m craft_bench.leaderboard submit {out}/<run>")
    return 0


if __name__ == "__main__":
    sys.exit(main())
