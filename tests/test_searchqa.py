"""Search-QA environments: exact-match reward, action syntax, data loading (jsonl, parquet, missing data), retrieval
(BM25 cache, HTTP client against a local server), the generated data set, the expert, and the privileged channel."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import gymnasium as gym
import pytest
from gymnasium.utils.env_checker import check_env

import craft_bench  # noqa: F401  (registers the ids)
from craft_bench.envs import searchqa_gen
from craft_bench.envs.base import INVALID_ACTION_FEEDBACK, PRIVILEGED_HEADER
from craft_bench.envs.retrieval import (
    BM25Retriever,
    Corpus,
    DenseRetriever,
    HTTPRetriever,
    bm25_stopwords,
    format_passages,
    parse_server_response,
)
from craft_bench.envs.searchqa import (
    CORRECT_FEEDBACK,
    STRATEGIES,
    WRONG_FEEDBACK,
    SearchQAEnv,
    canonical_action,
    exact_match,
    normalize_answer,
    parse_action,
    per_dataset_success,
    question_from_prompt,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
SMALL = searchqa_gen.GenConfig(questions_per_family={"train": 20, "valid": 5, "test": 10})


@pytest.fixture(scope="module", autouse=True)
def cache_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Indexes and generated data go to a private cache, so no test depends on what an earlier run left."""
    patch = pytest.MonkeyPatch()
    patch.setenv("CRAFT_BENCH_HOME", str(tmp_path_factory.mktemp("craft_home")))
    patch.delenv("CRAFT_SEARCHQA_DATA", raising=False)
    yield
    patch.undo()


@pytest.fixture(scope="module")
def official_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return searchqa_gen.write_official_layout(tmp_path_factory.mktemp("searchqa_data"), SMALL)


def make_official(root: Path, **kwargs: Any) -> SearchQAEnv:
    return gym.make("craft/SearchQA-v0", data_dir=root, **{"data_format": "jsonl", **kwargs}).unwrapped


def gen_env(split: str = "test", **kwargs: Any) -> gym.Env:
    return gym.make("craft/SearchQAGen-v0", split=split, **kwargs).unwrapped


# ================================================================================================ reward
@pytest.mark.parametrize(("prediction", "golden", "expected"), [
    ("The Beatles", ["Beatles"], True),                 # articles dropped
    ("beatles", ["the beatles"], True),
    ("an apple a day", ["apple day"], True),
    ("theatre", ["atre"], False),                      # an article only as a whole word
    ("U.S.A.", ["USA"], True),                         # punctuation removed
    ("Washington, D.C.", ["washington dc"], True),
    ("  NEW   york ", ["New York"], True),             # case and whitespace
    ("Zürich", ["Zurich"], True),                       # accents folded on both sides
    ("Zurich", ["Zürich"], True),
    ("Beyonce\u0301", ["Beyoncé"], True),              # decomposed vs composed
    ("O’Neill", ["O'Neill"], True),                    # typographic apostrophe
    ("Paris", ["London", "paris, france", "Paris"], True),   # any golden answer counts
    ("Paris", ["London", "Paris, France"], False),
    ("1,000", ["1000"], True),
    ("", ["a"], True),                                 # both normalise to empty, as in Search-R1
    ("42", "42", True),                                # a bare string golden answer
])
def test_exact_match_follows_search_r1_normalisation(prediction: str, golden: Any, expected: bool) -> None:
    assert exact_match(prediction, golden) is expected


def test_normalize_answer_is_search_r1s_on_ascii() -> None:
    assert normalize_answer("The  Lord of the Rings!") == "lord of rings"
    assert normalize_answer("A-ha") == "aha"


def test_per_dataset_success_reports_each_dataset_and_the_macro_average() -> None:
    records = [{"dataset": "nq", "won": True}, {"dataset": "nq", "won": False}, {"dataset": "nq", "won": True},
               {"dataset": "nq", "won": True}, {"dataset": "hotpotqa", "won": 0}]
    result = per_dataset_success(records)
    assert result["per_dataset"] == {"hotpotqa": 0.0, "nq": 0.75}
    assert result["counts"] == {"hotpotqa": 1, "nq": 4}
    assert result["macro_average"] == pytest.approx(0.375)  # not the micro average 0.6
    with pytest.raises(ValueError):
        per_dataset_success([])
    with pytest.raises(KeyError, match="dataset"):
        per_dataset_success([{"won": True}])


# ================================================================================================ actions
@pytest.mark.parametrize(("typed", "canonical"), [
    ("search[who wrote Hamlet]", "search[who wrote Hamlet]"),
    ("  Search [ who   wrote\nHamlet ] ", "search[who wrote Hamlet]"),
    ("ANSWER[William Shakespeare].", "answer[William Shakespeare]"),
    ("<search> who wrote Hamlet </search>", "search[who wrote Hamlet]"),
    ("<answer>Shakespeare</answer>", "answer[Shakespeare]"),
    ("search[list [of] things]", "search[list [of] things]"),
])
def test_canonical_action_keeps_free_text_and_normalises_syntax(typed: str, canonical: str) -> None:
    assert canonical_action(typed) == canonical
    assert parse_action(canonical) is not None


@pytest.mark.parametrize("typed", ["search[]", "search[   ]", "answer[]", "find[x]", "search x", "search[x] now",
                                   "hello", "[x]", "<search>x</answer>"])
def test_malformed_unknown_or_empty_actions_do_not_parse(typed: str) -> None:
    assert parse_action(canonical_action(typed)) is None


def test_format_passages_is_search_r1s_doc_lines() -> None:
    hits = [{"document": {"id": "1", "contents": '"Evan Morris"\nEvan Morris was a lobbyist.'}, "score": 2.0},
            {"document": {"id": "2", "contents": '"Roche"\nRoche is a company.\nSecond line.'}, "score": 1.0}]
    assert format_passages(hits) == ('Doc 1(Title: "Evan Morris") Evan Morris was a lobbyist.\n'
                                     'Doc 2(Title: "Roche") Roche is a company.\nSecond line.')


# ================================================================================================ data
def test_jsonl_and_parquet_give_the_same_tasks(official_root: Path) -> None:
    for split in searchqa_gen.SPLITS:
        from_jsonl = make_official(official_root, split=split, data_format="jsonl")
        from_parquet = make_official(official_root, split=split, data_format="parquet")
        assert from_jsonl.task_ids == from_parquet.task_ids
        for task_id in from_jsonl.task_ids:
            a, b = from_jsonl._items[task_id], from_parquet._items[task_id]
            assert (a.question, a.answers, a.dataset) == (b.question, b.answers, b.dataset)
        assert from_jsonl.data_sha256 != from_parquet.data_sha256  # different files, different hashes


def test_parquet_question_is_recovered_from_the_prompt() -> None:
    prompt = [{"role": "system", "content": "x"},
              {"role": "user", "content": "Answer it. For example, <answer> Beijing </answer>. Question: Who is he?\n"}]
    assert question_from_prompt(prompt, "row 0") == "Who is he?"
    with pytest.raises(ValueError, match="no 'Question: ...'"):
        question_from_prompt([{"role": "user", "content": "no marker here"}], "row 3")


def test_flashrag_rows_without_data_source_take_the_directory_name(official_root: Path, tmp_path: Path) -> None:
    nq = tmp_path / "nq"
    nq.mkdir()
    (nq / "corpus.jsonl").write_bytes((official_root / "corpus.jsonl").read_bytes())
    rows = [{"id": "test_0", "question": "who is it?", "golden_answers": ["Him", "He"], "metadata": {}},
            {"question": "where is it?", "golden_answers": ["There"]}]
    (nq / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    env = gym.make("craft/SearchQA-v0", data_dir=nq, split="test").unwrapped
    assert env.task_ids == ["nq/1", "nq/test_0"]
    _, info = env.reset(options={"task_id": "nq/test_0"})
    assert (info["dataset"], info["task_type"], info["goal"]) == ("nq", "nq", "who is it?")
    assert info["privileged"]["answers"] == ["Him", "He"]
    assert info["privileged"]["strategy"] == STRATEGIES["single_hop"]
    assert env.step("answer[he]")[1] == 1.0


def test_both_formats_present_must_be_chosen(official_root: Path) -> None:
    with pytest.raises(ValueError, match="data_format"):
        gym.make("craft/SearchQA-v0", data_dir=official_root, split="test")


def test_missing_data_error_names_the_generated_env_and_the_variable(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as error:
        gym.make("craft/SearchQA-v0", split="test")
    assert "craft/SearchQAGen-v0" in str(error.value) and "$CRAFT_SEARCHQA_DATA" in str(error.value)
    with pytest.raises(FileNotFoundError, match="craft/SearchQAGen-v0"):
        gym.make("craft/SearchQA-v0", data_dir=tmp_path, split="test")


def test_a_split_with_zero_questions_is_an_error(official_root: Path, tmp_path: Path) -> None:
    (tmp_path / "corpus.jsonl").write_bytes((official_root / "corpus.jsonl").read_bytes())
    (tmp_path / "test.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="zero questions"):
        gym.make("craft/SearchQA-v0", data_dir=tmp_path, split="test")


def test_data_from_the_environment_variable(official_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CRAFT_SEARCHQA_DATA", str(official_root))
    env = gym.make("craft/SearchQA-v0", split="valid", data_format="parquet").unwrapped
    _, info = env.reset(seed=0)
    assert info["data_source"] == str(official_root)
    assert info["dataset"] in searchqa_gen.FAMILIES and len(info["data_sha256"]) == 64
    assert info["privileged"]["expert_plan"] == [f"answer[{info['privileged']['answers'][0]}]"]


# ================================================================================================ retrieval
def test_search_returns_the_gold_passage_for_every_hop_query() -> None:
    env = gen_env("test")
    for item in env._items.values():
        for hop in item.metadata["hops"]:
            hits = env.retriever.search([hop["query"]], env.topk)[0]
            assert hits[0]["document"]["id"] == hop["passage_id"], (item.question, hop)


def test_bm25_index_is_reused_and_rebuilt_when_the_corpus_changes(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.jsonl"
    rows = [{"id": str(i), "contents": f'"Doc {i}"\nword{i} is about topic{i % 3}'} for i in range(20)]
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    first = BM25Retriever(Corpus(corpus))
    assert first.built and first.index_dir.is_dir()
    again = BM25Retriever(Corpus(corpus))
    assert not again.built and again.index_dir == first.index_dir
    assert again.search(["word7"])[0][0]["document"]["id"] == "7"
    rows.append({"id": "20", "contents": '"New"\nword7 word7 word7'})
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    changed = BM25Retriever(Corpus(corpus))
    assert changed.built and changed.index_dir != first.index_dir
    assert changed.search(["word7"])[0][0]["document"]["id"] == "20"


def test_bm25_search_ranks_as_bm25s_retrieve_does() -> None:
    import bm25s

    env = gen_env("test")
    queries = ["capital", "founded in 1805", "The city of the painter, the poet?", "Who founded it", "observatory",
               "Zoulzou Bank 1802"]
    for query in queries:
        tokens = bm25s.tokenize([query], stopwords=bm25_stopwords(), return_ids=False, show_progress=False)
        documents, scores = env.retriever._bm25.retrieve(tokens, k=3, show_progress=False)
        ours = env.retriever.search([query], 3)[0]
        expected = [(env.retriever.corpus[int(d)]["id"], float(s)) for d, s in zip(documents[0], scores[0]) if s > 0]
        # Same scores; the same passages except where bm25s breaks a tie at the k-th score its own way.
        assert [h["score"] for h in ours] == pytest.approx([s for _, s in expected]), query
        last = expected[-1][1]
        assert ({h["document"]["id"] for h in ours if h["score"] > last + 1e-6}
                == {d for d, s in expected if s > last + 1e-6}), query
    assert any(len({h["score"] for h in env.retriever.search([q], 3)[0]}) == 3 for q in queries)  # not all ties


def test_bm25_drops_passages_that_share_no_query_term(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(json.dumps({"id": "a", "contents": '"A"\nalpha'}) + "\n"
                      + json.dumps({"id": "b", "contents": '"B"\nbeta'}) + "\n")
    unknown, known = BM25Retriever(Corpus(corpus)).search(["gamma", "beta"], topk=3)
    assert unknown == [] and [hit["document"]["id"] for hit in known] == ["b"]


def test_corpus_rows_without_contents_are_rejected(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(json.dumps({"id": "a", "text": "no contents"}) + "\n")
    with pytest.raises(ValueError, match="'contents'"):
        Corpus(corpus)


class _RetrievalHandler(BaseHTTPRequestHandler):
    """Search-R1's `/retrieve` endpoint, answering from a BM25 retriever; records the requests it got."""

    retriever: BM25Retriever
    requests: list[dict[str, Any]] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.requests.append(body)
        if self.path != "/retrieve":
            self.send_error(404)
            return
        results = self.retriever.search(body["queries"], body["topk"])
        if not body.get("return_scores"):
            results = [[hit["document"] for hit in hits] for hits in results]
        payload = json.dumps({"result": results}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture()
def retrieval_server(official_root: Path) -> Iterator[str]:
    _RetrievalHandler.retriever = BM25Retriever(Corpus(official_root / "corpus.jsonl"))
    _RetrievalHandler.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _RetrievalHandler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/retrieve"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_http_retriever_speaks_search_r1s_protocol(retrieval_server: str, official_root: Path) -> None:
    local = BM25Retriever(Corpus(official_root / "corpus.jsonl"))
    queries = ["capital", "founded in"]
    remote = HTTPRetriever(retrieval_server, timeout_s=10).search(queries, topk=2)
    assert _RetrievalHandler.requests == [{"queries": queries, "topk": 2, "return_scores": True}]
    assert [[h["document"] for h in hits] for hits in remote] == [[h["document"] for h in hits]
                                                                  for hits in local.search(queries, 2)]


def test_env_runs_on_the_http_retriever_without_a_corpus(retrieval_server: str, official_root: Path,
                                                         tmp_path: Path) -> None:
    (tmp_path / "test.jsonl").write_bytes((official_root / "test.jsonl").read_bytes())
    env = gym.make("craft/SearchQA-v0", data_dir=tmp_path, split="test", retriever=retrieval_server).unwrapped
    _, info = env.reset(options={"task_index": 0})
    assert info["retriever"] == retrieval_server and env.corpus is None
    obs, _, _, _, info = env.step(info["privileged"]["expert_plan"][0])
    assert obs.startswith('Doc 1(Title: "')
    while not env._done:
        obs, reward, _, _, info = env.step(info["privileged"]["expert_plan"][0])
    assert info["won"] and reward == 1.0
    assert len(_RetrievalHandler.requests) == len(env._item.metadata["hops"])


def test_server_responses_without_scores_and_bad_shapes() -> None:
    doc = {"id": "3", "contents": '"T"\ntext'}
    assert parse_server_response({"result": [[doc]]}, 1) == [[{"document": doc, "score": 0.0}]]
    with pytest.raises(RuntimeError, match="one list per query"):
        parse_server_response({"result": []}, 1)
    with pytest.raises(RuntimeError, match="failed"):
        HTTPRetriever("http://127.0.0.1:9/retrieve", timeout_s=2).search(["q"])


def _tiny_encoder(directory: Path, texts: list[str]) -> Path:
    """A randomly initialised 2-layer BERT with a WordPiece vocabulary trained on `texts`, saved locally: the dense
    retriever's code path without any download."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.train_from_iterator(texts, trainers.WordPieceTrainer(
        vocab_size=400, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    fast.save_pretrained(directory)
    config = BertConfig(vocab_size=fast.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=512)
    import torch

    torch.manual_seed(0)
    BertModel(config).save_pretrained(directory)
    return directory


def test_dense_retriever_ranks_by_inner_product_and_caches_its_index(official_root: Path, tmp_path: Path) -> None:
    pytest.importorskip("faiss")
    import numpy as np

    corpus = Corpus(official_root / "corpus.jsonl")
    contents = list(corpus.iter_contents())
    model = _tiny_encoder(tmp_path / "tiny-e5", contents)
    dense = DenseRetriever(corpus, model)
    index_files = sorted(corpus.cache.glob("faiss-*.index"))
    assert len(index_files) == 1
    built_at = index_files[0].stat().st_mtime_ns
    passages = dense.embed(["passage: " + text for text in contents])
    for query in ["capital", "founded in 1805", "painter"]:
        scores = passages @ dense.embed(["query: " + query])[0]
        hits = dense.search([query], topk=3)[0]
        assert [h["score"] for h in hits] == pytest.approx(sorted(scores, reverse=True)[:3], abs=1e-5)
        assert [h["document"]["contents"] for h in hits][0] == contents[int(np.argmax(scores))]
    again = DenseRetriever(corpus, model, index_path=index_files[0])
    assert again.search(["capital"])[0] == dense.search(["capital"])[0]
    DenseRetriever(corpus, model)
    assert index_files[0].stat().st_mtime_ns == built_at  # reused, not rebuilt
    other = tmp_path / "corpus.jsonl"
    other.write_text("".join(line + "\n" for line in (official_root / "corpus.jsonl").read_text().splitlines()[:5]))
    with pytest.raises(ValueError, match="same corpus"):
        DenseRetriever(Corpus(other), model, index_path=index_files[0])


def test_dense_retriever_says_what_is_missing(official_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "faiss", None)  # as if the `dense` extra were not installed
    with pytest.raises(ImportError, match=r"craft-bench\[dense\]"):
        DenseRetriever(Corpus(official_root / "corpus.jsonl"), "/nonexistent/e5")


def test_dense_retriever_wants_a_local_model(official_root: Path) -> None:
    pytest.importorskip("faiss")
    with pytest.raises(FileNotFoundError, match="not a local directory"):
        DenseRetriever(Corpus(official_root / "corpus.jsonl"), "/nonexistent/e5")


# ================================================================================================ episodes
def test_check_env_passes_on_both_ids(official_root: Path) -> None:
    check_env(gen_env("valid", questions_per_family=5))
    check_env(make_official(official_root, split="test"))


def test_invalid_actions_change_nothing_and_count_as_steps() -> None:
    env = gen_env("test")
    _, info = env.reset(options={"task_index": 3})
    plan = info["privileged"]["expert_plan"]
    for step, bad in enumerate(["search[]", "lookup[x]", "answer", "", "x" * 600], start=1):
        if step > env.max_steps - 1:
            break
        obs, reward, terminated, truncated, info = env.step(bad)
        assert (obs, reward, terminated, truncated) == (INVALID_ACTION_FEEDBACK, 0.0, False, False)
        assert info["action_valid"] is False and info["step"] == step
        assert info["privileged"]["expert_plan"] == plan


def test_episodes_truncate_after_max_steps_of_searching() -> None:
    env = gen_env("test")
    env.reset(options={"task_index": 0})
    outcomes = [env.step("search[capital]")[2:4] for _ in range(4)]
    assert outcomes == [(False, False)] * 3 + [(False, True)]
    with pytest.raises(RuntimeError, match="reset"):
        env.step("answer[x]")


def test_a_wrong_answer_terminates_with_zero_reward() -> None:
    env = gen_env("test")
    env.reset(options={"task_index": 0})
    obs, reward, terminated, truncated, info = env.step("answer[certainly not this]")
    assert (obs, reward, terminated, truncated, info["won"]) == (WRONG_FEEDBACK, 0.0, True, False, False)


@pytest.mark.parametrize("split", ["test", "valid"])
def test_the_expert_wins_every_generated_task(split: str) -> None:
    env = gen_env(split)
    families = set()
    for task_id in env.task_ids:
        _, info = env.reset(options={"task_id": task_id})
        families.add(info["task_type"])
        hops = len(env._item.metadata["hops"])
        assert len(info["privileged"]["expert_plan"]) == hops + 1
        steps = 0
        while not info["won"]:
            obs, reward, terminated, truncated, info = env.step(info["privileged"]["expert_plan"][0])
            steps += 1
            assert not truncated, (task_id, obs)
        assert (reward, obs, steps, info["progress"]) == (1.0, CORRECT_FEEDBACK, hops + 1, 1.0)
    assert families == set(searchqa_gen.FAMILIES)


def test_privileged_text_never_appears_in_an_observation() -> None:
    env = gen_env("test")
    for task_index in range(0, 600, 7):
        obs, info = env.reset(options={"task_index": task_index})
        privileged = info["privileged"]
        gold = privileged["answers"][0]
        if info["task_type"] != "comparison":  # a comparison names both candidates, by design
            assert gold.lower() not in obs.lower()
        observations = [obs]
        for action in ["search[something unrelated]", "bad action", *privileged["expert_plan"][:-1],
                       "answer[wrong]"]:
            if env._done:
                break
            observations.append(env.step(action)[0])
        for seen in observations:
            assert PRIVILEGED_HEADER not in seen and "Expert plan" not in seen
            assert privileged["strategy"] not in seen and privileged["text"] not in seen
        assert privileged["strategy"] == STRATEGIES[info["task_type"]]
        assert privileged["evidence"] in privileged["text"]


def test_info_reports_dataset_hash_and_retriever() -> None:
    env = gen_env("valid")
    _, info = env.reset(seed=1)
    assert info["dataset"] == info["task_type"] in searchqa_gen.FAMILIES
    assert info["data_source"] == "generated" and len(info["data_sha256"]) == 64
    assert info["action_format"]["kind"] == "free" and info["admissible_actions"] == []
    assert (info["retriever"], info["topk"]) == ("bm25s", 3)
    assert [p["id"] for p in info["privileged"]["supporting_passages"]] == [
        h["passage_id"] for h in env._item.metadata["hops"]]


# ================================================================================================ generator
def test_generation_is_deterministic_and_seed_dependent() -> None:
    assert searchqa_gen.generate(SMALL) == searchqa_gen.generate(SMALL)
    other = searchqa_gen.GenConfig(seed=1, questions_per_family=SMALL.questions_per_family)
    assert searchqa_gen.generate(other)[0] != searchqa_gen.generate(SMALL)[0]


def test_splits_ask_about_disjoint_entities() -> None:
    _, questions = searchqa_gen.generate(SMALL)
    entities = {split: {hop["passage_id"] for row in rows for hop in row["metadata"]["hops"]}
                for split, rows in questions.items()}
    assert not entities["train"] & entities["test"]
    assert not entities["train"] & entities["valid"]
    assert not entities["valid"] & entities["test"]


def test_generated_splits_hold_every_family_with_the_asked_count() -> None:
    _, questions = searchqa_gen.generate(SMALL)
    for split, rows in questions.items():
        per_family = {f: sum(r["data_source"] == f for r in rows) for f in searchqa_gen.FAMILIES}
        assert per_family == dict.fromkeys(searchqa_gen.FAMILIES, SMALL.questions_per_family[split])
    with pytest.raises(ValueError, match="questions_per_family"):
        searchqa_gen.GenConfig(questions_per_family={"train": 0, "valid": 1, "test": 1})
