"""Sparse retrieval: a registry of BM25 tokenizers (name -> factory) and a bm25s index.

Tokenizers map a list of texts to a list of token lists. The default, ``kiwi``, keeps
Korean content morphemes (nouns, roots, verb/adjective stems, numbers, foreign words) and
adds statute references such as ``제21조의3`` as single tokens. Kiwi analyses each unique
whitespace-separated word once and reuses the result: statutes repeat their vocabulary so
heavily that this is ~5x faster than sentence-level analysis with the same tokens for
retrieval purposes, and queries go through the identical path.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

log = logging.getLogger(__name__)

Tokenizer = Callable[[Sequence[str]], list[list[str]]]
TOKENIZERS: dict[str, Callable[..., Tokenizer]] = {}

ARTICLE_REF = re.compile(r"제\d+조(?:의\d+)?")
_WORD = re.compile(r"\S+")
_PUNCT = re.compile(r"^[\W_]+|[\W_]+$")


def register_tokenizer(name: str):
    def deco(factory):
        TOKENIZERS[name] = factory
        return factory
    return deco


def get_tokenizer(name: str, **kwargs) -> Tokenizer:
    if name not in TOKENIZERS:
        raise ValueError(f"unknown BM25 tokenizer {name!r}; choose one of {sorted(TOKENIZERS)}")
    return TOKENIZERS[name](**kwargs)


def _article_refs(text: str) -> list[str]:
    return ARTICLE_REF.findall(text)


class WordCachedTokenizer:
    """Analyse each distinct word once (batched through `analyse_words`) and concatenate.
    With `cache_file`, analyses persist across builds (JSON, keyed by the analyser's identity),
    so a rebuild of an unchanged corpus never starts the analyser."""

    def __init__(self, analyse_words: Callable[[list[str]], list[list[str]]], cache_file: Optional[Path] = None):
        self.analyse_words = analyse_words
        self.cache_file = cache_file
        self.cache: dict[str, list[str]] = {}
        self._dirty = False
        if cache_file is not None and cache_file.exists():
            try:
                self.cache = json.loads(cache_file.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:  # a cache cut short by a crash is rebuilt, not fatal
                log.warning("ignoring unreadable token cache %s: %s", cache_file, exc)

    def __call__(self, texts: Sequence[str]) -> list[list[str]]:
        words_per_text = [_WORD.findall(t) for t in texts]
        new = sorted({w for words in words_per_text for w in words if w not in self.cache})
        if new:
            for word, toks in zip(new, self.analyse_words(new), strict=False):
                self.cache[word] = toks + _article_refs(word)
            self._dirty = True
        return [[tok for w in words for tok in self.cache[w]] for words in words_per_text]

    def save(self) -> None:
        if self.cache_file is None or not self._dirty:
            return
        self.cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.cache_file.with_suffix(".partial")
        tmp.write_text(json.dumps(self.cache, ensure_ascii=False), encoding="utf-8")
        tmp.replace(self.cache_file)
        self._dirty = False


def _cache_file(cache_dir: Optional[str], *identity: str) -> Optional[Path]:
    if not cache_dir:
        return None
    digest = hashlib.sha1("\x00".join(identity).encode()).hexdigest()[:16]
    return Path(cache_dir) / f"{identity[0]}-{digest}.json"


KIWI_CONTENT_TAGS = frozenset({"NNG", "NNP", "NR", "SL", "SN", "SH", "XR", "VV", "VA", "W_URL", "W_EMAIL", "W_HASHTAG"})


@register_tokenizer("kiwi")
def kiwi_tokenizer(user_dict: Optional[str] = None, workers: int = 2, cache_dir: Optional[str] = None, **_) -> Tokenizer:
    try:
        import kiwipiepy
        from kiwipiepy import Kiwi
    except ImportError as exc:  # pragma: no cover
        raise ImportError("the 'kiwi' BM25 tokenizer needs `pip install kiwipiepy kiwipiepy_model`") from exc
    state: dict = {}

    def analyse(words: list[str]) -> list[list[str]]:
        if "kiwi" not in state:  # built on first use (~1-2 s): a fully cached rebuild never pays it
            kiwi = Kiwi(num_workers=workers, load_typo_dict=False, load_multi_dict=False)
            if user_dict:
                n = kiwi.load_user_dictionary(str(user_dict))
                log.info("kiwi: %d user dictionary entries from %s", n, user_dict)
            state["kiwi"] = kiwi
        out = []
        for toks in state["kiwi"].tokenize(words):
            out.append([t.form.lower() if t.tag == "SL" else t.form for t in toks if t.tag in KIWI_CONTENT_TAGS])
        return out

    dict_hash = hashlib.sha1(Path(user_dict).read_bytes()).hexdigest() if user_dict else ""
    identity = ("kiwi", kiwipiepy.__version__, ",".join(sorted(KIWI_CONTENT_TAGS)), dict_hash)
    return WordCachedTokenizer(analyse, _cache_file(cache_dir, *identity))


@register_tokenizer("whitespace")
def whitespace_tokenizer(**_) -> Tokenizer:
    def tokenize(texts: Sequence[str]) -> list[list[str]]:
        out = []
        for t in texts:
            toks = [_PUNCT.sub("", w).lower() for w in t.split()]
            out.append([w for w in toks if w] + _article_refs(t))
        return out
    return tokenize


@register_tokenizer("char_bigram")
def char_bigram_tokenizer(**_) -> Tokenizer:
    """Hangul character bigrams inside words (robust to spacing and inflection), other words whole."""
    hangul = re.compile(r"[가-힣]+|[A-Za-z0-9]+")

    def tokenize(texts: Sequence[str]) -> list[list[str]]:
        out = []
        for t in texts:
            toks: list[str] = []
            for run in hangul.findall(t):
                if "가" <= run[0] <= "힣":
                    toks.extend(run[i:i + 2] for i in range(max(1, len(run) - 1)))
                else:
                    toks.append(run.lower())
            out.append(toks + _article_refs(t))
        return out
    return tokenize


@register_tokenizer("bm25s_default")
def bm25s_default_tokenizer(**_) -> Tokenizer:
    """bm25s's own default splitting (lower-cased \\w\\w+ words, no stemming): the seed design's
    baseline, kept for comparisons."""
    word = re.compile(r"(?u)\b\w\w+\b")

    def tokenize(texts: Sequence[str]) -> list[list[str]]:
        return [word.findall(t.lower()) for t in texts]
    return tokenize


def _konlpy(cls_name: str, tags: tuple[str, ...]):
    def factory(**_) -> Tokenizer:
        try:
            import konlpy.tag
        except ImportError as exc:
            raise ImportError(f"the '{cls_name.lower()}' BM25 tokenizer needs the optional extra: "
                              "pip install 'fsku[konlpy]' (KoNLPy, GPL-3, needs Java)") from exc
        tagger = getattr(konlpy.tag, cls_name)()

        def analyse(words: list[str]) -> list[list[str]]:
            return [[f for f, p in tagger.pos(w) if p.startswith(tags)] for w in words]

        return WordCachedTokenizer(analyse)
    return factory


TOKENIZERS["okt"] = _konlpy("Okt", ("Noun", "Verb", "Adjective", "Alpha", "Number"))
TOKENIZERS["komoran"] = _konlpy("Komoran", ("NN", "VV", "VA", "SL", "SN", "XR"))
TOKENIZERS["mecab"] = _konlpy("Mecab", ("NN", "VV", "VA", "SL", "SN", "XR"))


class BM25Index:
    """bm25s over pre-tokenised chunks; `scores(query_tokens)` returns a score per chunk."""

    def __init__(self, retriever, tokenizer_name: str):
        self.retriever = retriever
        self.tokenizer_name = tokenizer_name
        self.vocab = retriever.vocab_dict

    @classmethod
    def build(cls, corpus_tokens: list[list[str]], tokenizer_name: str, k1: float = 1.2, b: float = 0.75) -> "BM25Index":
        import bm25s

        retriever = bm25s.BM25(k1=k1, b=b)
        retriever.index(corpus_tokens, show_progress=False)
        return cls(retriever, tokenizer_name)

    def scores(self, query_tokens: list[str]) -> np.ndarray:
        known = [t for t in query_tokens if t in self.vocab]
        if not known:
            return np.zeros(self.retriever.scores["num_docs"], dtype=np.float32)
        return np.asarray(self.retriever.get_scores(known), dtype=np.float32)

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.retriever.save(str(folder), show_progress=False)
        (folder / "fsku_bm25.json").write_text(json.dumps({"tokenizer": self.tokenizer_name}))

    @classmethod
    def load(cls, folder: Path) -> "BM25Index":
        import bm25s

        meta = json.loads((folder / "fsku_bm25.json").read_text())
        return cls(bm25s.BM25.load(str(folder)), meta["tokenizer"])
