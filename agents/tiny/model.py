"""The tiny model's architecture, defined once: a small Llama (`LlamaForCausalLM`, tied embeddings) whose weights are
drawn from a seeded generator. Used by the tiny-model build and by the benchmarks (bench/rollout.py's random model)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TinyShape:
    """The architecture of a tiny model (the vocabulary size comes from its tokenizer)."""

    hidden_size: int = 256
    intermediate_size: int = 512
    num_layers: int = 4
    num_heads: int = 4
    max_positions: int = 2048


def make_model(
    shape: TinyShape,
    vocab_size: int,
    generator: torch.Generator,
    *,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    stop_token_ids: Sequence[int] = (),
):
    """A `LlamaForCausalLM` of `shape` with tied embeddings, every weight drawn from `generator` (never the global
    RNG). Generation stops at `eos_token_id` and at every id of `stop_token_ids` (e.g. the newline token that ends a
    plain-format reply)."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_heads,
        max_position_embeddings=shape.max_positions,
        tie_word_embeddings=True,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )
    model = LlamaForCausalLM(config)
    init_weights(model, config.initializer_range, generator)
    stops = list(dict.fromkeys([*stop_token_ids, *([] if eos_token_id is None else [eos_token_id])]))
    model.generation_config = GenerationConfig(
        eos_token_id=stops or None,
        pad_token_id=pad_token_id,
        bos_token_id=bos_token_id,
        do_sample=False,
        max_new_tokens=32,
    )
    return model.eval()


def init_weights(model: torch.nn.Module, std: float, generator: torch.Generator) -> None:
    """Llama's initialisation (normal matrices, unit norms), drawn from `generator` in a fixed parameter order."""
    with torch.no_grad():
        for _, param in model.named_parameters():
            if param.ndim == 1:
                param.fill_(1.0)  # RMSNorm gains
            else:
                torch.nn.init.normal_(param, mean=0.0, std=std, generator=generator)


def count_parameters(model: torch.nn.Module) -> int:
    """Number of parameters (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters())
