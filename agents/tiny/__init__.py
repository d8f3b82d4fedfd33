"""`--model tiny`: a small Llama-style agent built offline from expert episodes of any craft-bench environment whose
`info["privileged"]["expert_plan"]` is filled, cached under `$CRAFT_BENCH_HOME/models/tiny/`.

Modules, in build order: `data` (expert and perturbed episodes on the group runner), `sft` (examples in the student
and teacher prompt formats, supervised fine-tuning on the reply tokens), `tokenizer` (byte-level BPE, newline a
token of its own), `model` (the architecture, shared with the benchmarks), `copying` (optional copy pre-training
before the fine-tuning), `budget` (build settings and presets), `build` (build and cache). `evaluate` and the CLI
(`python -m craft_bench.agents.tiny`) sit above the policy and are not imported here: the policy imports this package
to resolve `--model tiny`, never the other way round.
"""

from craft_bench.agents.tiny.budget import BUDGETS, RECIPE_VERSION, TinyBudget, resolve_budget
from craft_bench.agents.tiny.build import (
    DEFAULT_ENV_ID,
    METADATA_FILE,
    build_key,
    build_tiny_model,
    env_fingerprint,
    load_metadata,
    tiny_model_path,
)
from craft_bench.agents.tiny.model import TinyShape, count_parameters, make_model

#: The model name that selects craft-bench's own offline model (`--model tiny`).
TINY_MODEL = "tiny"

__all__ = [
    "BUDGETS", "DEFAULT_ENV_ID", "METADATA_FILE", "RECIPE_VERSION", "TINY_MODEL", "TinyBudget", "TinyShape",
    "build_key", "build_tiny_model", "count_parameters", "env_fingerprint", "load_metadata", "make_model",
    "resolve_budget", "tiny_model_path",
]
