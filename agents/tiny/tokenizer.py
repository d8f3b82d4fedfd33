"""The tiny model's tokenizer: a byte-level BPE trained with `tokenizers` on the build's own prompt and reply text,
in which a newline is always one token of its own (a plain-format reply ends at it)."""

from __future__ import annotations

import itertools
import json
import re
import string
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
NEWLINE = "\n"
#: The characters of an identifier's body (`id_pieces_pattern`, `sft.relabel_ids`).
ID_ALPHABET = string.ascii_lowercase + string.digits
#: Characters per piece of a copied identifier. Pairs give 36^2 = 1,296 possible pieces: few enough to add them all
#: to the vocabulary (`_with_every_id_piece`), many enough that a piece seldom occurs twice in one prompt, so a
#: one-token match finds where to copy from.
ID_PIECE_CHARS = 2
#: The word split of GPT-2 that `ByteLevel(use_regex=True)` applies (tokenizers' byte_level.rs).
GPT2_WORDS = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"


def id_word_pattern(prefix: str, body_length: int) -> str:
    """A regex matching a whole identifier `prefix` + `body_length` characters of `ID_ALPHABET` (lower case)."""
    return rf"\b{re.escape(prefix)}[a-z0-9]{{{body_length}}}\b"


def id_pieces_pattern(prefix: str, body_length: int) -> str:
    """A regex (Oniguruma, as `tokenizers` runs it) matching each `ID_PIECE_CHARS`-character piece of the body of
    an identifier written `prefix` + `body_length` lowercase letters or digits, as a whole word.

    WebShop's product ids are b0 + 8 such characters in its actions (`click[b0uuxocfxj]`). Byte-level BPE cuts a random
    body into rare fragments or single characters, and a single character recurs in every id of a results page, so
    a small model cannot tell which id it is copying. Cut into pairs, each piece of the body is nearly unique in the
    prompt. Each alternative fixes how many pieces precede and follow, so only whole identifiers are cut.
    """
    if not re.fullmatch(r"[a-z0-9]+", prefix):
        raise ValueError(f"an id prefix is lowercase letters or digits, got {prefix!r}")
    if body_length < ID_PIECE_CHARS or body_length % ID_PIECE_CHARS:
        raise ValueError(f"an id body length must be a positive multiple of {ID_PIECE_CHARS}, got {body_length}")
    pieces = body_length // ID_PIECE_CHARS
    piece = f"[a-z0-9]{{{ID_PIECE_CHARS}}}"
    alternatives = [
        f"(?<=\\b{prefix}{piece * before}){piece}(?={piece * (pieces - 1 - before)}\\b)" for before in range(pieces)
    ]
    return "|".join(alternatives)


def train_tokenizer(
    texts: Callable[[], Iterator[str]], vocab_size: int, special_tokens: Sequence[str] = (PAD, BOS, EOS),
    id_pattern: str = "",
):
    """A byte-level BPE tokenizer trained on `texts()`, wrapped as a `PreTrainedTokenizerFast`.

    Text is split into words GPT-2 style (a word keeps its leading space, numbers and punctuation stand alone) and
    `"\\n"` is split off first, so it is always exactly one token. An action then reads as the same token ids in
    the admissible list, in the privileged plan and in the reply, so copying an action is copying ids. (Tokens
    spanning words would make prompts about 3x shorter, but they fuse goals such as " put a cd in cabinet " into
    one token, which a small model cannot take apart on a held-out task.) No special token is added when text is
    encoded, so a prompt has the same ids with or without `add_special_tokens`.

    `special_tokens` are pad, bos and eos in that order; pass two (pad, eos) for a tokenizer without BOS.
    `id_pattern` (e.g. `id_pieces_pattern("b0", 8)`) splits its matches off as words of their own before BPE, and
    every possible piece becomes one token (`_with_every_id_piece`), so the vocabulary can exceed `vocab_size` by up
    to 36^2 tokens.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if len(special_tokens) not in (2, 3):
        raise ValueError(f"special_tokens must be (pad, eos) or (pad, bos, eos), got {list(special_tokens)}")
    tokenizer = Tokenizer(models.BPE())
    newline = pre_tokenizers.Split(Regex(r"\n"), behavior="isolated")
    if id_pattern:
        # The id pieces go first in one alternation with GPT-2's word split, which would otherwise cut a piece such
        # as "s4" into a letter and a digit.
        words = pre_tokenizers.Split(Regex(f"{id_pattern}|{GPT2_WORDS}"), behavior="isolated")
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [newline, words, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [newline, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
        )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts(), trainer=trainer)
    if id_pattern:
        tokenizer = _with_every_id_piece(tokenizer)
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


def _with_every_id_piece(tokenizer):
    """`tokenizer` with a token and a merge for every pair of lowercase letters or digits that it lacks.

    An id's random pieces are too rare in a build's text for BPE to learn them (on WebShopGen's build text, BPE with
    2,048 tokens left every pair of `b0uuxocfxj` as two characters), and a piece unseen in training must still be
    one token on a held-out id. The merges go last, so they only join pairs that every learned merge left apart.
    """
    from tokenizers import Tokenizer

    state = json.loads(tokenizer.to_str())
    vocab, merges = state["model"]["vocab"], state["model"]["merges"]
    for first, second in itertools.product(ID_ALPHABET, repeat=ID_PIECE_CHARS):
        if first + second not in vocab:
            vocab[first + second] = len(vocab)
            merges.append([first, second])
    return Tokenizer.from_str(json.dumps(state))
