"""The tiny tokenizer and its product ids: newlines are one token, ids that replies copy are cut into pairs (each
one token), and training examples can get fresh ids so that a model copies them instead of memorising them."""

from __future__ import annotations

import dataclasses
import re

import pytest

from craft_bench.agents.tiny import BUDGETS
from craft_bench.agents.tiny.budget import LATER_FIELDS
from craft_bench.agents.tiny.build import key_fields
from craft_bench.agents.tiny.tokenizer import GPT2_WORDS, id_pieces_pattern, train_tokenizer

CORPUS = [
    "click[b0uuxocfxj]\nTarget: b0pws4q84n (Torbel Non Slip Sneakers)\n",
    "WebShop [SEP] Instruction: [SEP] i need sneakers, color purple [SEP] Search\n",
    "it's a b0ab table 12ab34 costs 17.99 dollars; don't b0abcdefghij\n",
] * 20


def pieces(tokenizer, text: str) -> list[str]:
    return [tokenizer.decode([i]) for i in tokenizer.encode(text)]


def test_an_id_is_its_prefix_then_one_token_per_pair_even_for_pairs_never_seen_in_training():
    tokenizer = train_tokenizer(lambda: iter(CORPUS), 300, id_pattern=id_pieces_pattern("b0", 8))
    # "zq", "7w", "k3" and "9x" occur nowhere in CORPUS, and "k3" mixes a letter and a digit (GPT-2's split alone
    # would cut it in two).
    assert pieces(tokenizer, "click[b0zq7wk39x]")[-7:] == ["b", "0", "zq", "7w", "k3", "9x", "]"]
    assert pieces(tokenizer, " b0pws4q84n")[-4:] == ["pw", "s4", "q8", "4n"]
    assert tokenizer.decode(tokenizer.encode("Target: b0pws4q84n (x)")) == "Target: b0pws4q84n (x)"


def test_only_whole_ids_are_cut():
    tokenizer = train_tokenizer(lambda: iter(CORPUS), 300, id_pattern=id_pieces_pattern("b0", 8))
    plain = train_tokenizer(lambda: iter(CORPUS), 300)
    # Too short (b0 + 2) or too long (b0 + 10): not an id, so the id pattern splits nothing off; upper case is the
    # page's spelling, not the actions', and stays with BPE.
    words = tokenizer.backend_tokenizer.pre_tokenizer.pre_tokenize_str(" b0ab b0abcdefghij b0abcdefgh")
    assert [w for w, _ in words] == ["Ġb", "0", "ab", "Ġb", "0", "abcdefghij", "Ġb", "0", "ab", "cd", "ef", "gh"]
    assert pieces(tokenizer, "B0UUXOCFXJ") == ["B", "0", "U", "U", "X", "O", "C", "F", "X", "J"]
    # Without an id pattern the pre-tokenizer is GPT-2's byte-level split, as before.
    assert [w for w, _ in plain.backend_tokenizer.pre_tokenizer.pre_tokenize_str(" b0abcdefgh")] == [
        "Ġb", "0", "abcdefgh"]


def test_the_explicit_word_split_is_the_byte_level_one():
    from tokenizers import Regex, pre_tokenizers

    implicit = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    explicit = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(GPT2_WORDS), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    for text in CORPUS[:3] + ["  two  spaces\tand tabs 3.14 'll 've ...!?", "x"]:
        assert explicit.pre_tokenize_str(text) == implicit.pre_tokenize_str(text)


@pytest.mark.parametrize(("prefix", "length", "match"), [
    ("B0", 8, "lowercase"), ("b-", 8, "lowercase"), ("b0", 7, "multiple of 2"), ("b0", 0, "multiple of 2"),
])
def test_a_malformed_id_format_is_an_error_naming_it(prefix, length, match):
    with pytest.raises(ValueError, match=match):
        id_pieces_pattern(prefix, length)


def test_the_id_fields_are_set_together_and_stay_out_of_older_cache_keys():
    test = BUDGETS["test"]
    assert LATER_FIELDS["id_prefix"] == "" and LATER_FIELDS["id_body_length"] == 0
    assert LATER_FIELDS["relabel_ids"] is False
    assert {"id_prefix", "id_body_length", "relabel_ids"}.isdisjoint(key_fields(test))
    assert test.id_pattern == ""
    with_ids = dataclasses.replace(test, id_prefix="b0", id_body_length=8)
    assert key_fields(with_ids)["id_prefix"] == "b0" and with_ids.id_pattern == id_pieces_pattern("b0", 8)
    with pytest.raises(ValueError, match="set together"):
        dataclasses.replace(test, id_prefix="b0")
    with pytest.raises(ValueError, match="multiple of 2"):
        dataclasses.replace(test, id_prefix="b0", id_body_length=9)


def test_a_saved_tokenizer_loads_with_its_id_pieces(tmp_path):
    from transformers import AutoTokenizer

    tokenizer = train_tokenizer(lambda: iter(CORPUS), 300, id_pattern=id_pieces_pattern("b0", 8))
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "Expert plan from here: click[b0zq7wk39x]; click[buy now]\n"
    assert loaded.encode(text) == tokenizer.encode(text)
    assert "k3" in pieces(loaded, text)


def test_relabelling_gives_each_example_fresh_ids_consistent_across_case_prompt_and_reply():
    from craft_bench.agents.tiny.sft import TextExample, relabel_ids

    prompt = "Results [SEP] B0UUXOCFXJ [SEP] Shoes [SEP] B0PWS4Q84N [SEP] Boots\nAdmissible: click[b0uuxocfxj] | " \
             "click[b0pws4q84n] | click[b0ab]\nAction:"
    examples = [TextExample(prompt, " click[b0pws4q84n]\n", teacher) for teacher in (False, True)]
    first, second = relabel_ids(examples, "b0", 8, seed=0)
    ids = re.findall(r"\b[bB]0[a-zA-Z0-9]{8}\b", first.prompt)
    upper_a, upper_b, lower_a, lower_b = ids
    assert upper_a == lower_a.upper() and upper_b == lower_b.upper() and lower_a != lower_b
    assert {lower_a, lower_b}.isdisjoint({"b0uuxocfxj", "b0pws4q84n"})
    assert first.reply == f" click[{lower_b}]\n" and first.teacher is False and second.teacher is True
    assert "click[b0ab]" in first.prompt  # not an id of the format: left alone
    assert re.findall(r"\bb0[a-z0-9]{8}\b", second.prompt) != [lower_a, lower_b]  # every example its own ids
    # The same prompt with the renaming undone is the original: only ids changed.
    assert first.prompt.replace(upper_a, "B0UUXOCFXJ").replace(upper_b, "B0PWS4Q84N").replace(
        lower_a, "b0uuxocfxj").replace(lower_b, "b0pws4q84n") == prompt
    assert relabel_ids(examples, "b0", 8, seed=0) == [first, second]  # seeded
    with pytest.raises(ValueError, match="relabel_ids needs"):
        dataclasses.replace(BUDGETS["test"], relabel_ids=True)
