"""A retrieval validation set over every level of the statute hierarchy, written by rules.

Why rules: the dev labels are 91 % act questions from two laws; a set we tune on must cover the
decree, the rule and the regulation too, and must not be the easy case where a question repeats its
article. How each question is made (all choices from one seeded `random.Random`):

1. Articles: the body articles (no 부칙) of every document at the level, round-robin over documents
   so a level with one document still gets its questions, at most `max_per_article` per article.
2. Evidence: one clause of the article (split at ①.., items and sentence ends, 25-160 characters),
   kept only when its text occurs in exactly one article of the whole corpus (so the gold is one
   article, not a sentence an act and its decree share) and inside one chunk (so a hit can hold it),
   and when it is self-contained (`self_contained`): no reference whose removal leaves a particle
   dangling ('제1항 또는 제2항에 따른 신고'), and key terms that few articles hold together (a clause
   a dozen regulations repeat in other words has no single gold either).
3. Paraphrase: references are removed ('제N조', '「…」', '법 제N조에 따른', the law's own name),
   then the wording is rewritten by a fixed table of legal synonyms (`SYNONYMS`, each applied with
   probability `p_synonym`): '하여야 한다' → '해야 한다', '지체 없이' → '즉시', '금융회사' → '금융기관'…
4. Stem form (`FORMS`): `mc` (which statement is right; the paraphrased clause among three
   distractors made by changing its number, its modal verb or its actor), `amount` (the clause asked
   back with its number hidden: '몇 일' / '얼마'), `yesno` (the clause turned into a question), and
   `describe` (its opening asked to be completed, or its key terms, by idf, asked to be explained —
   terms only when at most `max_term_articles` articles hold them all: a stem whose terms occur
   together in dozens of articles has no single gold). Forms the clause cannot take are skipped.
5. Mention (`MENTIONS`): how the question names its law — `full` title, `parent` (a decree's or
   regulation's act, the confusion FSKU questions invite), `level` ('시행령에 따르면', '감독규정상'),
   or `none`.

A row: qid, question, source (the PDF), law (title), level, article, evidence (the clause as the
statute writes it), form, mention, and for mc the answer's option number. `fsku level-set` writes it.
"""
from __future__ import annotations

import random
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Callable, Collection, Optional, Sequence

from ..config import LevelSetConfig
from ..retrieve import law_base_name

FORMS = ("mc", "amount", "yesno", "describe")
MENTIONS = ("full", "parent", "level", "none")
LEVEL_WORDS = {"act": ("법률상", "법에 따르면", "관련 법에서"), "decree": ("시행령에 따르면", "시행령상", "대통령령에서"),
               "rule": ("시행규칙에 따르면", "시행규칙상", "부령에서"),
               "regulation": ("감독규정에 따르면", "관련 고시에서", "금융위원회가 정한 규정상")}

# (pattern, replacement): meaning-preserving rewrites of statute wording, applied in this order (a verb form before
# the ending it contains: '통지하여야' before '하여야 한다')
SYNONYMS: tuple[tuple[str, str], ...] = (
    ("통지하여야", "알려야"), ("보존하여야", "보관해야"), ("하여서는 아니 된다", "해서는 안 된다"),
    ("그러하지 아니하다", "예외로 한다"), ("하여야 한다", "해야 한다"),
    ("하여야 하는", "해야 하는"), ("하여야 하며", "해야 하고"), ("아니 된다", "안 된다"), ("지체 없이", "즉시"),
    ("다음 각 호의", "아래의"), ("다음 각 호", "아래 항목"), ("경우에는", "때에는"), ("해당하는", "속하는"),
    ("금융회사 또는 전자금융업자", "금융기관이나 전자금융업자"), ("금융회사등", "금융기관 등"), ("금융회사", "금융기관"),
    ("이용자", "고객"), ("보존", "보관"),
    ("수립", "마련"), ("필요한 사항", "필요한 내용"), ("정하는 바에 따라", "정한 방식대로"), ("요청", "요구"),
    ("대통령령으로 정하는", "대통령령이 정한"), ("금융위원회가 정하는", "금융위원회가 정한"), ("포함한다", "포함된다"),
    ("위반한", "어긴"), ("설치", "구축"), ("지정", "선정"), ("게시", "공개"), ("이를", "그것을"), ("및", "그리고"),
    ("등을", "따위를"), ("하는 때", "하는 경우"), ("할 수 있다", "하는 것이 가능하다"), ("그 밖에", "그 외에"),
)
_ACTORS = ("금융위원회", "금융감독원장", "한국은행", "과학기술정보통신부장관", "개인정보 보호위원회", "행정안전부장관")
_MODALS = (("해야 한다", "할 수 있다"), ("할 수 있다", "해서는 안 된다"), ("해서는 안 된다", "해야 한다"),
           ("하는 것이 가능하다", "해서는 안 된다"), ("하여야 한다", "할 수 있다"), ("아니 된다", "할 수 있다"))
_NUMBER = re.compile(r"(\d+(?:\.\d+)?)\s*(년|개월|일|시간|분|퍼센트|%|만원|억원|원|명|회|개|배)")
_UNIT_QUESTION = {"년": "몇 년", "개월": "몇 개월", "일": "며칠", "시간": "몇 시간", "분": "몇 분", "퍼센트": "몇 퍼센트",
                  "%": "몇 퍼센트", "만원": "얼마", "억원": "얼마", "원": "얼마", "명": "몇 명", "회": "몇 회", "개": "몇 개",
                  "배": "몇 배"}
_CLAUSE_SPLIT = re.compile(r"(?<=다\.)\s+|\n+|(?=[①-⑳])|(?<=[가-힣\)])\s+(?=\d{1,2}\.\s)")
# an article's number and heading (one level of nested brackets: '(개인정보(신용정보)의 보존)')
_LEAD = re.compile(r"^\s*(?:제\d+조(?:의\d+)?\s*(?:\((?:[^()]|\([^()]*\))*\))?|[①-⑳]|\d{1,2}\.|[가-하]\.)\s*")
_ARTICLE = (r"제\s*\d+\s*조(?:\s*의\s*\d+)?(?:\s*제\s*\d+\s*[항호])*(?:\s*[가-하]목)?"
            r"(?:\s*(?:각\s*호\s*외의\s*부분\s*)?(?:본문|단서|전단|후단))?")
_FOLLOW = r"\s*(?:에\s*따른|에\s*따라|에서|의)?"
# the patterns see the text after the law names became '관련 법령'; word starts are anchored ((?<![가-힣])) so
# '시행규칙 제3조' is not read as '규칙 제3조', and '이 조'/'같은 조' end at a particle ('이 조치' stays)
_REFERENCES = (
    (re.compile(r"「[^」]{2,60}」\s*(?:시행령|시행규칙)?\s*(?:" + _ARTICLE + ")?" + _FOLLOW), "관련 법령에 따른"),
    (re.compile(r"(?:(?<![가-힣])[가-힣]{1,30}법|관련 법령)\s*(?:시행령|시행규칙)?\s*" + _ARTICLE + _FOLLOW), "관련 법령에 따른"),
    (re.compile(r"(?<![가-힣])(?:이\s*|같은\s*)?(?:시행령|시행규칙|법|영|규칙)\s*(?:시행령\s*)?" + _ARTICLE + _FOLLOW),
     "관련 규정에 따른"),
    (re.compile(r"(?:(?<![가-힣])(?:같은|이)\s*조(?=[\s에의제,.)]|$)|" + _ARTICLE + r")"
                r"\s*(?:제\s*\d+\s*[항호])*" + _FOLLOW), ""),
    (re.compile(r"제\s*\d+\s*[항호](?:\s*[가-하]목)?\s*(?:에\s*따른|에\s*따라|의)?"), ""),
    (re.compile(r"(?<![가-힣])[가-하]목\s*(?:에\s*따른|에\s*따라|의)?"), ""),
    (re.compile(r"\((?:이하|다음부터)[^)]*\)"), ""),
)
_HANGUL_WORD = re.compile(r"[가-힣]{2,}")
_STOP = {"다음", "경우", "해당", "사항", "이하", "관련", "규정", "법령", "대통령령", "내용", "규칙", "시행령", "방법", "각호",
         "필요", "포함", "이상", "이내", "관련", "따름"}


def _compact(text: str) -> str:
    return re.sub(r"\s+", "", text)


def clauses(body: str, min_chars: int = 25, max_chars: int = 160) -> list[str]:
    """The article's clauses (①.., items, sentences) without their leading markers, as written."""
    out = []
    for piece in _CLAUSE_SPLIT.split(body):
        s = piece.strip()
        while True:
            t = _LEAD.sub("", s, count=1).strip()
            if t == s:
                break
            s = t
        # deleted clauses and commencement lines ('이 규칙은 ...부터 시행한다') say nothing to ask about
        if (min_chars <= len(s) <= max_chars and "삭제" not in s[:6] and s.count("「") == s.count("」")
                and not s.rstrip(".").endswith("시행한다")):
            out.append(s)
    return out


# a reference followed by a conjunction or an object particle: stripping it leaves the particle dangling
# ('제1항 또는 제2항에 따른 신고' -> '또는 신고', '제10조제2항을 준용한다' -> '을 준용한다')
_DANGLING = re.compile(r"(?:제\s*\d+\s*(?:조(?:\s*의\s*\d+)?|항|호)|(?<![가-힣])[가-하]목)"
                       r"(?:\s*(?:본문|단서|전단|후단))?\s*(?:및|또는|이나|부터|까지|을|를|과|와|에도)(?![가-힣])")

# a clause cut out of its sentence ('에 따른 정보보호 전문서비스 기업의 ...')
_PARTICLE_START = re.compile(r"(?:에|의|을|를|은|는|이|가|및|또는|와|과|으로|로)\s")


def strip_references(text: str, law_names: Sequence[str] = ()) -> str:
    """The clause without article numbers, 「…」 names and the given law names (references become
    '관련 규정에 따른')."""
    # the names first: a pattern that sees '전자금융거래법 시행령 제3조' must not leave '전자금융거래' behind
    for name in sorted({n for n in law_names if n}, key=len, reverse=True):
        text = text.replace(name, "관련 법령")
    for pattern, repl in _REFERENCES:
        text = pattern.sub(repl, text)
    text = re.sub(r"(관련 (?:규정|법령)에 따른\s*)+", "관련 규정에 따른 ", text)
    return re.sub(r"\s+", " ", text).strip(" ,")


def _has_final(syllable: str) -> bool:
    """Whether a Hangul syllable ends in a consonant (받침), which picks the particle form."""
    code = ord(syllable) - 0xAC00
    return 0 <= code < 11172 and code % 28 != 0


_PARTICLES = {"는": "은", "가": "이", "를": "을", "와": "과"}  # after a vowel -> after a consonant


def _replace_word(text: str, old: str, new: str) -> str:
    """`text` with every `old` made `new`, the particle right after it agreeing with `new`'s last syllable."""
    out, start = [], 0
    for m in re.finditer(re.escape(old), text):
        out.append(text[start:m.start()])
        out.append(new)
        start = m.end()
        nxt = text[start:start + 1]
        if new and nxt and new[-1] != old[-1]:
            final = _has_final(new[-1])
            for after_vowel, after_consonant in _PARTICLES.items():
                if nxt in (after_vowel, after_consonant):
                    out.append(after_consonant if final else after_vowel)
                    start += 1
                    break
    out.append(text[start:])
    return "".join(out)


def paraphrase(text: str, rng: random.Random, p_synonym: float = 0.8) -> str:
    """`text` with each applicable SYNONYMS rewrite made with probability p_synonym (one draw per
    pattern, in SYNONYMS' order), the particle after a rewritten word agreeing with it."""
    for old, new in SYNONYMS:
        if old in text and rng.random() < p_synonym:
            text = _replace_word(text, old, new)
    return text


def as_question(statement: str) -> str:
    """'...해야 한다.' -> '...해야 하는가?' (the declarative ending turned interrogative)."""
    s = statement.rstrip(" .")
    for end, q in (("한다", "하는가"), ("된다", "되는가"), ("이다", "인가"), ("있다", "있는가"), ("없다", "없는가"),
                   ("본다", "보는가"), ("는다", "는가"), ("다", "는가")):
        if s.endswith(end):
            return s[: -len(end)] + q + "?"
    return s + "인가?"


def distractors(statement: str, rng: random.Random, n: int = 3) -> list[str]:
    """Up to n wrong versions of `statement`: its number changed, its modal verb turned, its actor
    swapped. Fewer when the statement has fewer handles."""
    out: list[str] = []
    for m in _NUMBER.finditer(statement):
        value = float(m.group(1))
        for factor in (2, 3, 0.5):
            v = value * factor
            new = f"{int(v) if v == int(v) else v}{m.group(2)}"
            cand = statement[: m.start()] + new + statement[m.end():]
            if cand != statement and cand not in out:
                out.append(cand)
                break
    for old, new in _MODALS:
        if old in statement:
            out.append(statement.replace(old, new, 1))
            break
    for actor in _ACTORS:
        if actor in statement:
            other = rng.choice([a for a in _ACTORS if a != actor])
            out.append(statement.replace(actor, other, 1))
            break
    out = list(dict.fromkeys(x for x in out if x != statement))
    rng.shuffle(out)
    return out[:n]


_KIWI: list = []


def nouns(text: str) -> list[str]:
    """The nouns of `text` (Kiwi NNG/NNP, two or more characters), in order."""
    if not _KIWI:
        from kiwipiepy import Kiwi

        _KIWI.append(Kiwi(num_workers=1, load_typo_dict=False, load_multi_dict=False))
    return [t.form for t in _KIWI[0].tokenize(text) if t.tag in ("NNG", "NNP") and len(t.form) >= 2]


def keywords(text: str, k: int = 3, idf: Optional[dict[str, float]] = None) -> list[str]:
    """The k nouns of `text` outside _STOP that say most about it: count x idf (the corpus's inverse
    document frequency, so '품질인증기관' beats '장관'; 1 without one), longer first on ties."""
    counts = Counter(w for w in nouns(text) if w not in _STOP)
    weight = {w: n * (idf.get(w, max(idf.values(), default=1.0)) if idf else 1.0) for w, n in counts.items()}
    return [w for w, _ in sorted(weight.items(), key=lambda kv: (-kv[1], -len(kv[0]), kv[0]))[:k]]


def noun_idf(texts: Sequence[str]) -> dict[str, float]:
    """log(N / df) of every noun over `texts` (one text per article)."""
    import math

    df: Counter = Counter()
    for t in texts:
        df.update(set(nouns(t)))
    n = max(len(texts), 1)
    return {w: math.log(n / d) for w, d in df.items()}


def mention_prefix(mention: str, title: str, level: str, parent: Optional[str], rng: random.Random) -> str:
    if mention == "full":
        return rng.choice((f"{title}에 따르면, ", f"{title}상 ", f"{title}에서 "))
    if mention == "parent":
        return f"{parent or title}에 따르면, "
    if mention == "level":
        return rng.choice(LEVEL_WORDS[level]) + " "
    return ""


def self_contained(clause: str, law_names: Sequence[str], idf: Optional[dict[str, float]] = None,
                   narrow: Optional[Callable[[Sequence[str]], bool]] = None) -> bool:
    """Whether a question made from the clause can have one answer: stripping its references leaves no
    dangling particle, and its key terms (the 3 best by idf, at least 2) are held together by few
    articles (`narrow`), so '감독원장은 이 규정의 시행에 필요한 세부사항을 정할 수 있다', which a dozen
    regulations say in other words, is not asked."""
    if _DANGLING.search(clause) or _PARTICLE_START.match(clause):
        return False
    terms = keywords(strip_references(clause, law_names), 3, idf)
    return len(terms) >= 2 and (narrow is None or narrow(terms))


def write_question(clause: str, form: str, prefix: str, law_names: Sequence[str], rng: random.Random,
                   p_synonym: float = 0.8, idf: Optional[dict[str, float]] = None,
                   narrow: Optional[Callable[[Sequence[str]], bool]] = None) -> Optional[tuple[str, Optional[int]]]:
    """(question, answer option for mc) in `form` from the clause, or None when the clause cannot take it.
    `narrow(terms)`: whether key terms point at few enough articles to ask about them alone (a
    descriptive stem made of terms only is skipped when they do not)."""
    plain = strip_references(clause, law_names)
    if len(_compact(plain)) < 15:
        return None
    stated = paraphrase(plain, rng, p_synonym)
    if form == "mc":
        wrong = distractors(stated, rng)
        if len(wrong) < 1:
            return None
        options = [stated] + wrong
        rng.shuffle(options)
        topic = " ".join(keywords(plain, 2, idf))
        stem = rng.choice((f"다음 중 {topic}에 관한 설명으로 옳은 것은?", f"{topic}에 대한 설명으로 가장 적절한 것은?",
                           f"{topic}과 관련하여 옳은 것을 고르시오."))
        body = "\n".join(f"{i} {o.rstrip('.')}" for i, o in enumerate(options, start=1))
        return f"{prefix}{stem}\n{body}", options.index(stated) + 1
    if form == "amount":
        m = _NUMBER.search(stated)
        if not m:
            return None
        masked = stated[: m.start()] + _UNIT_QUESTION[m.group(2)] + stated[m.end():]
        return prefix + as_question(masked), None
    if form == "yesno":
        return prefix + as_question(stated), None
    if form == "describe":
        words = keywords(plain, 3, idf)
        if len(words) < 2:
            return None
        if rng.random() < 0.5:  # the clause's opening (who, when), the rest asked for
            head = stated.split()
            head = " ".join(head[: max(4, int(0.6 * len(head)))]).rstrip(",")
            return prefix + rng.choice((f"{head} … 에 관하여 규정된 내용을 설명하시오.",
                                        f"'{head}'의 경우 무엇을 하여야 하는지 서술하시오.")), None
        stems = ((words, f"{', '.join(words)}에 관하여 정한 내용을 설명하시오."),
                 (words, f"{' '.join(words)}에 관한 규정의 내용은 무엇인지 서술하시오."),
                 (words[:2], f"{words[0]} 및 {words[1]}에 대해 규정이 정하는 바를 설명하시오."))
        used, stem = rng.choice(stems)
        if narrow is not None and not narrow(used):
            return None  # terms found together in many articles: no single article answers
        return prefix + stem, None
    raise ValueError(f"unknown form {form!r}; expected one of {FORMS}")


def build_level_set(chunks: Sequence[dict], cfg: Optional[LevelSetConfig] = None,
                    parents: Optional[dict[str, str]] = None,
                    levels: Sequence[str] = ("act", "decree", "rule", "regulation"),
                    exclude: Collection[tuple[str, str]] = ()) -> list[dict]:
    """Questions about the articles of `chunks` (dicts with source, title, level, article, path, text:
    a KB's chunks.parquet rows), `cfg.per_level` per level where the corpus allows (fewer when a level
    has too few usable clauses; levels the corpus lacks are absent). `parents`: a regulation's act
    title. `exclude`: (title, article) pairs no question is about (cfg.exclude's articles, read by
    `excluded_articles`). The other settings: LevelSetConfig."""
    cfg = cfg or LevelSetConfig()
    per_level, seed, max_per_article = cfg.per_level, cfg.seed, cfg.max_per_article
    p_synonym, max_term_articles = cfg.p_synonym, cfg.max_term_articles
    rng = random.Random(seed)
    parents = dict(parents or {})
    articles: dict[tuple[str, str], dict] = {}
    compact_text: dict[tuple[str, str], list[str]] = defaultdict(list)
    for c in chunks:
        if not c.get("article") or "부칙" in (c.get("path") or ""):
            continue
        key = (c["title"], c["article"])
        compact_text[key].append(_compact(c["text"]))  # excluded articles still count as homes of a clause
        if key in exclude:
            continue
        body = c["text"].partition("\n")[2] if "\n" in c["text"] else c["text"]
        art = articles.setdefault(key, {"title": c["title"], "article": c["article"], "source": c["source"],
                                        "level": c.get("level") or "other", "bodies": []})
        art["bodies"].append(body)
    all_titles = sorted({a["title"] for a in articles.values()}, key=len, reverse=True)
    idf = noun_idf([" ".join(a["bodies"]) for a in articles.values()])
    article_text = [_compact(" ".join(a["bodies"])) for a in articles.values()]

    def narrow(terms: Sequence[str]) -> bool:
        return sum(all(t in text for t in terms) for text in article_text) <= max_term_articles
    # where each clause occurs: the gold must be one article
    corpus_index = [(key, t) for key, texts in compact_text.items() for t in texts]

    def unique_home(clause: str) -> Optional[tuple[str, str]]:
        c = _compact(clause)
        homes = {key for key, t in corpus_index if c in t}
        return next(iter(homes)) if len(homes) == 1 else None

    rows: list[dict] = []
    for level in levels:
        by_doc: dict[str, list[tuple[str, str]]] = defaultdict(list)
        for key, art in articles.items():
            if art["level"] == level:
                by_doc[art["title"]].append(key)
        if not by_doc:
            continue
        queues = {t: rng.sample(keys, len(keys)) * max_per_article for t, keys in sorted(by_doc.items())}
        used_clauses: set[str] = set()
        made = 0
        while made < per_level and any(queues.values()):
            for title in sorted(queues):
                if made >= per_level or not queues[title]:
                    continue
                key = queues[title].pop(0)
                art = articles[key]
                options = [c for body in art["bodies"] for c in clauses(body) if c not in used_clauses]
                rng.shuffle(options)
                for clause in options:
                    if unique_home(clause) != key:
                        continue
                    parent = parents.get(title) or (law_base_name(title) if level in ("decree", "rule") else None)
                    names = [t for t in all_titles] + ([parent] if parent else [])
                    if not self_contained(clause, names, idf, narrow):
                        continue
                    mention = rng.choice(MENTIONS)
                    if mention == "parent" and not parent:
                        mention = "full"  # an act has no parent: the question names the act itself
                    prefix = mention_prefix(mention, title, level, parent, rng)
                    for form in rng.sample(FORMS, len(FORMS)):
                        written = write_question(clause, form, prefix, names, rng, p_synonym, idf, narrow)
                        if written is None:
                            continue
                        question, answer = written
                        made += 1
                        used_clauses.add(clause)
                        rows.append({"qid": f"LVL-{level}-{made:03d}", "question": question, "source": art["source"],
                                     "law": title, "level": level, "article": art["article"], "evidence": clause,
                                     "form": form, "mention": mention, **({"answer": str(answer)} if answer else {})})
                        break
                    else:
                        continue
                    break
    return rows


def excluded_articles(path: str) -> set[tuple[str, str]]:
    """The (law, article) pairs of a level-set file, for `exclude`; the error names the line."""
    import json

    out = set()
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            out.add((row["law"], row["article"]))
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"{path}:{n}: expected a level-set row (JSON with 'law' and 'article')") from None
    return out


def level_counts(rows: Sequence[dict]) -> dict[str, int]:
    return dict(Counter(r["level"] for r in rows))
