"""Retrieval for Search-QA: a corpus in Search-R1's `corpus.jsonl` format and retrievers over it (BM25 with bm25s,
dense E5 with transformers + FAISS, or Search-R1's HTTP retrieval server) behind one interface.

Every retriever answers a batch of queries with Search-R1's server shape, `[[{"document": {"id", "contents"},
"score": float}, ...], ...]`, so the environment formats hits the same way whichever retriever found them.
Indexes are built once, cached under `$CRAFT_BENCH_HOME/searchqa/` by the corpus's sha256, and memory-mapped.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import urllib.error
import urllib.request
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import numpy as np

from craft_bench.envs.cache import build_once, cache_dir

#: Bumped when the cached index layout or the tokenisation changes, so old caches are never reused.
INDEX_VERSION = 1
DEFAULT_TOPK = 3
#: bm25s.tokenize's default token pattern, applied to queries exactly as to the corpus.
_BM25_TOKEN = re.compile(r"(?u)\b\w\w+\b")

Hit = dict[str, Any]
"""One retrieved passage: `{"document": {"id": str, "contents": str}, "score": float}`."""


def format_passages(hits: list[Hit]) -> str:
    """Hits as Search-R1's agent shows them: `Doc i(Title: <first line>) <rest>` per hit, one line each.

    The title is the first line of `contents` as stored, so wiki-18's quotes around titles stay (`Title: "Foo"`).
    """
    lines = []
    for rank, hit in enumerate(hits, start=1):
        title, _, text = hit["document"]["contents"].partition("\n")
        lines.append(f"Doc {rank}(Title: {title}) {text}")
    return "\n".join(lines)


# ============================================================================================== corpus on disk
def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes, remembered under the cache by (path, size, mtime) so that a multi-GB corpus
    is hashed once, not on every environment construction."""
    path = Path(path).resolve()
    stat = path.stat()
    key = hashlib.sha256(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:32]
    memo = cache_dir("searchqa", "file-hashes") / key
    if memo.exists():
        return memo.read_text().strip()
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    value = digest.hexdigest()
    tmp = memo.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(value)
    os.replace(tmp, memo)
    return value


class Corpus:
    """`corpus.jsonl` (rows `{"id", "contents"}`) read by line offsets: rows are parsed only when retrieved, so a
    wiki-18-sized corpus costs one int64 per passage in memory (the offsets are cached and memory-mapped)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path).expanduser()
        if not self.path.is_file():
            raise FileNotFoundError(f"corpus file {self.path} does not exist (expected Search-R1's corpus.jsonl: "
                                    'one {"id", "contents"} row per line, contents "\\"Title\\"\\ntext")')
        self.sha256 = file_sha256(self.path)
        self.cache = cache_dir("searchqa", f"corpus-{self.sha256[:24]}-v{INDEX_VERSION}")
        offsets_path = build_once(self.cache / "offsets.npy", self._write_offsets)
        self.offsets = np.load(offsets_path, mmap_mode="r")
        self._local = threading.local()

    def _write_offsets(self, target: Path) -> None:
        offsets = []
        position = 0
        with self.path.open("rb") as handle:
            for number, line in enumerate(handle, start=1):
                if line.strip():
                    _check_row(json.loads(line), self.path, number)
                    offsets.append(position)
                position += len(line)
        if not offsets:
            raise ValueError(f"corpus file {self.path} holds no passages")
        with target.open("wb") as handle:
            np.save(handle, np.asarray(offsets, dtype=np.int64))

    def __len__(self) -> int:
        return int(self.offsets.shape[0])

    def __getitem__(self, index: int) -> dict[str, str]:
        handle = getattr(self._local, "handle", None)
        if handle is None:
            handle = self._local.handle = self.path.open("rb")
        handle.seek(int(self.offsets[index]))
        row = json.loads(handle.readline())
        return {"id": str(row["id"]), "contents": row["contents"]}

    def iter_contents(self):
        """Every passage's `contents`, in corpus order (streamed)."""
        with self.path.open("rb") as handle:
            for line in handle:
                if line.strip():
                    yield json.loads(line)["contents"]

    def __getstate__(self) -> dict[str, Any]:
        # File handles and memory maps do not pickle; a worker reopens both.
        return {"path": self.path}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"])


def _check_row(row: Any, path: Path, number: int) -> None:
    if not isinstance(row, dict) or "contents" not in row or "id" not in row:
        raise ValueError(f"{path}:{number}: a corpus row needs 'id' and 'contents' (Search-R1's corpus.jsonl), "
                         f"got {str(row)[:120]}")


# ================================================================================================== retrievers
class Retriever(ABC):
    """Answers batches of queries with the top-k passages, best first, in Search-R1's server shape."""

    #: A short description for `info["retriever"]` and results (e.g. `bm25s` or the server URL).
    name: str = ""

    @abstractmethod
    def search(self, queries: list[str], topk: int = DEFAULT_TOPK) -> list[list[Hit]]:
        """For each query, up to `topk` hits, best first."""


_BM25_LOADED: dict[Path, Any] = {}


def bm25_stopwords() -> list[str]:
    """bm25s's English stop words. Tokenisation is fixed (this list, no stemmer) so that an index and its queries
    always agree and results never depend on whether PyStemmer happens to be installed."""
    from bm25s.stopwords import STOPWORDS_EN

    return list(STOPWORDS_EN)


class BM25Retriever(Retriever):
    """BM25 (bm25s's default Lucene variant, k1=1.5, b=0.75) over a `Corpus`, without stemming and with English
    stop words. The index is built once per corpus sha256 and loaded memory-mapped, once per process."""

    name = "bm25s"

    def __init__(self, corpus: Corpus):
        import bm25s  # a core dependency; imported here so that the module loads without it for the HTTP client

        self.corpus = corpus
        self.index_dir = corpus.cache / f"bm25s-{bm25s.__version__}"
        self.built = False
        build_once(self.index_dir, self._build)
        if self.index_dir not in _BM25_LOADED:
            _BM25_LOADED[self.index_dir] = bm25s.BM25.load(str(self.index_dir), mmap=True, show_progress=False)
        self._bm25 = _BM25_LOADED[self.index_dir]
        self._stopwords = frozenset(bm25_stopwords())

    def _build(self, target: Path) -> None:
        import bm25s

        tokens = bm25s.tokenize(list(self.corpus.iter_contents()), stopwords=bm25_stopwords(),
                                token_pattern=_BM25_TOKEN.pattern, show_progress=False)
        index = bm25s.BM25()
        index.index(tokens, show_progress=False)
        index.save(str(target), show_progress=False)
        self.built = True

    def query_token_ids(self, query: str) -> list[int]:
        """The query's index token ids, tokenised as `bm25s.tokenize` tokenises the corpus (same pattern, lower
        case, stop words); terms the corpus never uses are dropped."""
        vocab = self._bm25.vocab_dict
        tokens = (t for t in _BM25_TOKEN.findall(query.lower()) if t not in self._stopwords)
        return [vocab[t] for t in tokens if t in vocab]

    def search(self, queries: list[str], topk: int = DEFAULT_TOPK) -> list[list[Hit]]:
        # Scores come from bm25s's eager sparse matrix; the top-k is taken here because `BM25.retrieve` spends more
        # time on progress bars and thread pools than on scoring when the env sends one query per step.
        k = min(int(topk), len(self.corpus))
        results = []
        for query in queries:
            ids = self.query_token_ids(query)
            if not ids:
                results.append([])
                continue
            scores = self._bm25.get_scores_from_ids(ids)
            top = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
            # Best score first, ties by corpus order, so results never depend on argpartition's internals.
            top = top[np.lexsort((top, -scores[top]))]
            # A zero score means no query term occurs in the passage: not a hit.
            results.append([{"document": self.corpus[int(d)], "score": float(scores[d])} for d in top
                            if scores[d] > 0])
        return results

    def __getstate__(self) -> dict[str, Any]:
        return {"corpus": self.corpus}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["corpus"])


class HTTPRetriever(Retriever):
    """A client of Search-R1's retrieval server: `POST {url} {"queries", "topk", "return_scores": true}` answered by
    `{"result": [[{"document": {...}, "score": s}, ...], ...]}` (or bare documents when the server sends no scores).

    Uses only the standard library; every request has a timeout and a failure names the server.
    """

    def __init__(self, url: str, timeout_s: float = 30.0):
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"retrieval server URL must start with http:// or https://, got {url!r}")
        self.url = url
        self.name = url
        self.timeout_s = float(timeout_s)

    def search(self, queries: list[str], topk: int = DEFAULT_TOPK) -> list[list[Hit]]:
        if not queries:
            return []
        payload = json.dumps({"queries": list(queries), "topk": int(topk), "return_scores": True}).encode()
        request = urllib.request.Request(self.url, data=payload, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                body = json.loads(response.read())
        except (urllib.error.URLError, TimeoutError, json.JSONDecodeError) as error:
            raise RuntimeError(f"retrieval server {self.url} failed: {error}") from error
        return parse_server_response(body, len(queries), self.url)


def parse_server_response(body: Any, n_queries: int, url: str = "the server") -> list[list[Hit]]:
    """Search-R1's `/retrieve` response as hits; documents without scores (return_scores false) get score 0."""
    if not isinstance(body, dict) or not isinstance(body.get("result"), list) or len(body["result"]) != n_queries:
        raise RuntimeError(f"{url} answered {str(body)[:200]}; expected {{'result': [...]}} with one list per query "
                           f"({n_queries})")
    results = []
    for per_query in body["result"]:
        hits = []
        for item in per_query:
            document = item["document"] if isinstance(item, dict) and "document" in item else item
            if not isinstance(document, dict) or "contents" not in document:
                raise RuntimeError(f"{url} returned a document without 'contents': {str(item)[:200]}")
            hits.append({"document": {"id": str(document.get("id", "")), "contents": document["contents"]},
                         "score": float(item.get("score", 0.0)) if "document" in item else 0.0})
        results.append(hits)
    return results


class DenseRetriever(Retriever):
    """Dense retrieval as Search-R1's e5 retriever does it: a local transformers encoder with mean pooling over the
    attention mask, `query: ` / `passage: ` prefixes for E5 models, L2-normalised embeddings, and an exact FAISS
    inner-product index (`IndexFlatIP`) whose row i is corpus passage i.

    Needs the `dense` extra (faiss) and a local model directory: nothing is downloaded at run time. The passage
    index is built once per (corpus, model) and cached, or read from `index_path` (e.g. Search-R1's
    `e5_Flat.index` for wiki-18, which follows the corpus order).
    """

    def __init__(self, corpus: Corpus, model_path: str | os.PathLike, index_path: str | os.PathLike | None = None,
                 batch_size: int = 64, max_length: int = 256):
        try:
            import faiss
        except ImportError as error:
            raise ImportError(
                "the dense retriever needs faiss (faiss is missing): pip install 'craft-bench[dense]', "
                "or use the default BM25 retriever"
            ) from error
        import torch
        from transformers import AutoModel, AutoTokenizer

        model_dir = Path(model_path).expanduser()
        if not model_dir.is_dir():
            raise FileNotFoundError(f"dense retriever model {model_dir} is not a local directory; download the E5 "
                                    "model once (e.g. intfloat/e5-base-v2) and pass its path: nothing is fetched here")
        self.corpus = corpus
        self.name = f"dense:{model_dir.name}"
        self.max_length = int(max_length)
        self._torch = torch
        # Search-R1 adds the E5 prefixes when the model's name says e5; so do we.
        self._prefixes = ("query: ", "passage: ") if "e5" in model_dir.name.lower() else ("", "")
        self._tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        self._model = AutoModel.from_pretrained(model_dir, local_files_only=True).eval()
        if index_path is None:
            model_key = hashlib.sha256(str(model_dir.resolve()).encode()).hexdigest()[:12]
            target = corpus.cache / f"faiss-flatip-{model_dir.name}-{model_key}-{self.max_length}.index"

            def build(staged: Path) -> None:
                index = None
                batch: list[str] = []
                for contents in [*corpus.iter_contents(), None]:
                    if contents is not None:
                        batch.append(self._prefixes[1] + contents)
                    if batch and (len(batch) == batch_size or contents is None):
                        vectors = self.embed(batch)
                        if index is None:
                            index = faiss.IndexFlatIP(vectors.shape[1])
                        index.add(vectors)
                        batch = []
                faiss.write_index(index, str(staged))

            index_path = build_once(target, build)
        index_path = Path(index_path).expanduser()
        if not index_path.is_file():
            raise FileNotFoundError(f"FAISS index {index_path} does not exist")
        self._index = faiss.read_index(str(index_path), faiss.IO_FLAG_MMAP)
        if self._index.ntotal != len(corpus):
            raise ValueError(f"FAISS index {index_path} holds {self._index.ntotal} vectors but the corpus "
                             f"{corpus.path} has {len(corpus)} passages; they must be built from the same corpus")

    def embed(self, texts: list[str]) -> np.ndarray:
        """L2-normalised mean-pooled embeddings (float32, one row per text); prefixes are the caller's."""
        torch = self._torch
        inputs = self._tokenizer(texts, max_length=self.max_length, padding=True, truncation=True,
                                 return_tensors="pt")
        with torch.no_grad():
            hidden = self._model(**inputs, return_dict=True).last_hidden_state
        mask = inputs["attention_mask"][..., None].to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1)
        return torch.nn.functional.normalize(pooled, dim=-1).float().numpy().astype(np.float32, order="C")

    def search(self, queries: list[str], topk: int = DEFAULT_TOPK) -> list[list[Hit]]:
        if not queries:
            return []
        k = min(int(topk), len(self.corpus))
        scores, documents = self._index.search(self.embed([self._prefixes[0] + q for q in queries]), k)
        return [[{"document": self.corpus[int(d)], "score": float(s)} for d, s in zip(row_d, row_s) if d >= 0]
                for row_d, row_s in zip(documents, scores)]


def make_retriever(spec: str | Retriever, corpus: Corpus | None,
                   dense_index: str | os.PathLike | None = None) -> Retriever:
    """A retriever from its spec: `bm25` (default), `http://host:port/retrieve` (Search-R1's server) or
    `dense:<local model dir>` (`DenseRetriever`, optionally over a prebuilt FAISS `dense_index`); a `Retriever`
    instance is used as is."""
    if isinstance(spec, Retriever):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"retriever must be a spec string or a Retriever, got {type(spec).__name__}")
    if spec.startswith(("http://", "https://")):
        return HTTPRetriever(spec)
    if corpus is None:
        raise ValueError(f"retriever {spec!r} needs a corpus.jsonl")
    if spec == "bm25":
        return BM25Retriever(corpus)
    if spec.startswith("dense:"):
        return DenseRetriever(corpus, spec[len("dense:"):], dense_index)
    raise ValueError(f"unknown retriever {spec!r}; valid: 'bm25', 'dense:<local model dir>', "
                     "'http://host:port/retrieve'")
