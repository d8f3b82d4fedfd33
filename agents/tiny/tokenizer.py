"""The tiny model's tokenizer: a byte-level BPE trained with `tokenizers` on the build's own prompt and reply text,
in which a newline is always one token of its own (a plain-format reply ends at it)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
NEWLINE = "\n"


def train_tokenizer(
    texts: Callable[[], Iterator[str]], vocab_size: int, special_tokens: Sequence[str] = (PAD, BOS, EOS),
):
    """A byte-level BPE tokenizer trained on `texts()`, wrapped as a `PreTrainedTokenizerFast`.

    Text is split into words GPT-2 style (a word keeps its leading space, numbers and punctuation stand alone) and
    `"\\n"` is split off first, so it is always exactly one token. An action then reads as the same token ids in
    the admissible list, in the privileged plan and in the reply, so copying an action is copying ids. (Tokens
    spanning words would make prompts about 3x shorter, but they fuse goals such as " put a cd in cabinet " into
    one token, which a small model cannot take apart on a held-out task.) No special token is added when text is
    encoded, so a prompt has the same ids with or without `add_special_tokens`.

    `special_tokens` are pad, bos and eos in that order; pass two (pad, eos) for a tokenizer without BOS.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if len(special_tokens) not in (2, 3):
        raise ValueError(f"special_tokens must be (pad, eos) or (pad, bos, eos), got {list(special_tokens)}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\n"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts(), trainer=trainer)
    pad, *bos, eos = special_tokens
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=bos[0] if bos else None, eos_token=eos, pad_token=pad,
        padding_side="left",
    )
    newline_ids = wrapped.encode(NEWLINE, add_special_tokens=False)
    if len(newline_ids) != 1:
        raise RuntimeError(f"the tiny tokenizer must encode a newline as one token, got ids {newline_ids}")
    return wrapped


def newline_token_id(tokenizer) -> int:
    """The id of the newline token, which ends every plain-format reply."""
    (token_id,) = tokenizer.encode(NEWLINE, add_special_tokens=False)
    return token_id


def name_tokenizer_class(config_path: Path) -> None:
    """Record the tokenizer class by its long-standing name, which every transformers release since 4.x loads
    (5.x writes its internal `TokenizersBackend`, which older releases do not know)."""
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2) + "\n")
