"""Training questions at scale from the statutes, written by rules: a synth_qa-format folder of
multiple-choice items in the competition's format (and some descriptive ones) for distillation.

Why rules: distillation needs thousands of prompts grounded in the same statutes the KB holds, with
the context inference would give them; a teacher LLM on a CPU writes a few hundred a day. The
building blocks are the per-level validation set's (`fsku.synth.levelset`): self-contained clauses
whose text occurs in one article only, references and law names stripped, a synonym paraphrase,
distractors made by changing a clause's number, modal verb or actor, and the four ways a question
names its law. Per usable clause (all choices from one seeded `random.Random`):

- `lookup`: "…에 관한 설명으로 옳은 것은?" — the paraphrased clause among n − 1 false statements
  (its own distractors first, then distractors of other clauses of the same document);
- `negative`: "…에 관한 설명으로 옳지 않은 것은?" — one false version of the clause among n − 1 true
  statements (the clause and other clauses of the same article, then of the same document);
- `descriptive` (a `descriptive_share` of the clauses): the clause asked back (levelset's describe,
  yesno and amount forms) with the clause as the reference answer.

n is 4 or 5 (`five_option_share`); the correct option's position is dealt round-robin per n, so every
position is right equally often and no position prior can be learned. Items are split by article
(`split_by_group`: no article in two splits). Decontamination: every (law, article) named by an
`exclude` file is left out, and so is every clause sharing a `shingle_chars`-character run (spacing
ignored) with any question, option or answer of those files.
"""
from __future__ import annotations

import csv
import json
import random
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence

from ..config import MCBankConfig
from ..retrieve import law_base_name
from . import levelset as LV
from .records import SyntheticQA, qa_id_for, render_mc_question
from .split import split_by_group

TEACHER = "rules:mc-bank"
PROMPT_VERSION = "mc-bank-1"
POSITIVE_STEMS = ("다음 중 {topic}에 관한 설명으로 옳은 것은?", "{topic}에 대한 설명으로 가장 적절한 것은?",
                  "{topic_and} 관련하여 옳은 것을 고르시오.")
NEGATIVE_STEMS = ("다음 중 {topic}에 관한 설명으로 옳지 않은 것은?", "{topic}에 대한 설명으로 적절하지 않은 것은?",
                  "{topic_and} 관련하여 틀린 것을 고르시오.")


def with_and(word: str) -> str:
    """`word` + the comitative particle that agrees with its last syllable ('책임자와', '신고과' -> '신고와')."""
    if not word:
        return word
    return word + ("과" if LV._has_final(word[-1]) else "와")


def compact(text) -> str:
    """Spacing removed, as the level set matches clauses across the corpus (any value read as text)."""
    return LV._compact(str(text))


# revision notes the PDFs carry inline ('<개정 2020. 2. 4.>', a '<개정' cut at the clause's end)
_REVISION = re.compile(r"\s*[<〈]\s*(?:개정|신설|전문개정|본조신설|시행일)[^>〉]*[>〉]?")
# a statement ends in a predicate ('…하여야 한다.', '…할 수 없다.'); list items ('…한 경우', '…법인') do not
_STATEMENT_END = re.compile(r"다\.?$")


def is_statement(clause: str) -> bool:
    """Whether the clause states something whole, so it can be right or wrong as an option: it ends in a
    predicate, its brackets close, and it does not open mid-sentence ('이하 "…"이라 한다]을 …') or with a
    proviso ('다만, …': true or false only with the sentence before it)."""
    c = clause.strip()
    return (bool(_STATEMENT_END.search(c)) and c.count("(") == c.count(")") and c.count("[") == c.count("]")
            and not c.startswith(("이하", "다만", ")", "]", "을 ", "를 ")))


_CANON_RNG = random.Random(0)  # paraphrase(p=1) draws nothing that matters: every rewrite applies


def canonical(text: str, law_names: Sequence[str] = ()) -> str:
    """One form for a statement however it was written: revision notes, references and law names
    stripped, every synonym rewrite applied, spacing and the final period dropped."""
    plain = LV.strip_references(_REVISION.sub("", text), law_names)
    return compact(LV.paraphrase(plain, _CANON_RNG, 1.0)).rstrip(".")


def agree_particles(text: str) -> str:
    """The particle after each actor name agreeing with it (a distractor that swapped '금융위원회가' for
    '금융감독원장' must read '금융감독원장이')."""
    for actor in LV._ACTORS:
        final = LV._has_final(actor[-1])
        for after_vowel, after_consonant in LV._PARTICLES.items():
            right = after_consonant if final else after_vowel
            wrong = after_vowel if final else after_consonant
            text = re.sub(re.escape(actor + wrong) + r"(?=\s)", actor + right, text)
    return text


# ------------------------------------------------------------------ decontamination

MIN_SHORT_CHARS = 8  # an evaluation text shorter than the shingle but at least this long is matched as a substring


@dataclass
class Exclusions:
    """What no training item may touch: (law, article) pairs, character shingles of evaluation text, the
    evaluation texts shorter than a shingle, and the texts themselves (for the articles they name)."""
    articles: set[tuple[str, str]] = field(default_factory=set)
    shingles: set[str] = field(default_factory=set)
    short: set[str] = field(default_factory=set)
    texts: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)

    def add_text(self, text: str, size: int) -> None:
        c = compact(text)
        if len(c) >= size:
            self.shingles |= {c[i:i + size] for i in range(len(c) - size + 1)}
        elif len(c) >= MIN_SHORT_CHARS:
            self.short.add(c)
        if c:
            self.texts.append(c)

    def touches(self, text: str, size: int) -> bool:
        c = compact(text)
        return (any(c[i:i + size] in self.shingles for i in range(max(1, len(c) - size + 1)))
                or any(s in c for s in self.short))

    def names_article(self, title: str, article: str) -> bool:
        """Whether an evaluation text names the article ('전자금융거래법 제7조에 따라 …')."""
        needle = compact(title) + compact(article)
        return any(needle in t for t in self.texts)


def _texts_of_row(row: dict) -> Iterable[str]:
    for key in ("question", "Question", "answer", "Answer", "evidence", "Explanation (detailed)", "choices"):
        value = row.get(key)
        if isinstance(value, dict):
            yield from (str(v) for v in value.values())
        elif value not in (None, ""):
            yield str(value)


def load_exclusions(paths: Sequence[str], size: int) -> Exclusions:
    """Articles and text shingles of evaluation files: JSONL (retrieval labels, level sets, synth records:
    `law`/`article` name an article, `question`/`answer`/`evidence` give text) or CSV (mcq_dev,
    descriptive_dev, test.csv: every Question/Answer cell). A line that is not JSON names its file:line."""
    out = Exclusions()
    for raw in paths:
        path = Path(raw)
        if not path.is_file():
            raise FileNotFoundError(f"--exclude {path}: no such file")
        out.files.append(str(path))
        if path.suffix.lower() == ".csv":
            with path.open(encoding="utf-8-sig", newline="") as fh:
                for row in csv.DictReader(fh):
                    for text in _texts_of_row(row):
                        out.add_text(text, size)
            continue
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                raise ValueError(f"{path}:{n}: expected one JSON object per line") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
            if row.get("law") and row.get("article"):
                out.articles.add((compact(row["law"]), compact(row["article"])))
            for text in _texts_of_row(row):
                out.add_text(text, size)
    return out


# ------------------------------------------------------------------ items

def _options_with_answer(correct: str, others: Sequence[str], n: int, position: int) -> list[str]:
    """`others` (n − 1 of them) with `correct` at 1-based `position`."""
    options = list(others[:n - 1])
    options.insert(position - 1, correct)
    return [o.rstrip(". ") for o in options]


class PositionDealer:
    """The correct option's position for the next item with n options: 1..n in a shuffled cycle, so every
    position is right equally often (within one cycle) and the order is not learnable either."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.queues: dict[int, list[int]] = defaultdict(list)

    def __call__(self, n: int) -> int:
        if not self.queues[n]:
            self.queues[n] = self.rng.sample(range(1, n + 1), n)
        return self.queues[n].pop()

    def give_back(self, n: int, position: int) -> None:
        """A position dealt to an item that was then dropped: the next item with n options gets it."""
        self.queues[n].append(position)


def build_mc_bank(chunks: Sequence[dict], cfg: Optional[MCBankConfig] = None, parents: Optional[dict[str, str]] = None,
                  exclusions: Optional[Exclusions] = None, progress: bool = False) -> tuple[list[SyntheticQA], dict]:
    """(records, stats) from a KB's chunk rows (chunk_id, source, title, level, article, path, text);
    `progress`: a bar over the articles while their clauses are checked (the slow part)."""
    from tqdm.auto import tqdm

    cfg = cfg or MCBankConfig()
    exclusions = exclusions or Exclusions()
    rng = random.Random(cfg.seed)
    deal = PositionDealer(rng)
    parents = dict(parents or {})
    stats: Counter = Counter()
    articles: dict[tuple[str, str], dict] = {}
    compact_text: dict[tuple[str, str], list[str]] = defaultdict(list)
    matched_exclusions: set[tuple[str, str]] = set()
    for c in chunks:
        if not c.get("article") or "부칙" in (c.get("path") or ""):
            continue
        key = (c["title"], c["article"])
        compact_text[key].append(compact(c["text"]))
        names = {compact(c["title"]), compact(Path(str(c.get("source", ""))).stem)}
        hit = next(((n, compact(c["article"])) for n in names if (n, compact(c["article"])) in exclusions.articles), None)
        if hit:
            matched_exclusions.add(hit)
            continue
        body = c["text"].partition("\n")[2] if "\n" in c["text"] else c["text"]
        art = articles.setdefault(key, {"title": c["title"], "article": c["article"], "level": c.get("level") or "other",
                                        "chunk_id": c.get("chunk_id", ""), "bodies": []})
        art["bodies"].append(body)
    if exclusions.texts:  # articles an evaluation question names, not only the one it is labelled with
        named = [key for key in articles if exclusions.names_article(*key)]
        for key in named:
            del articles[key]
        stats["excluded_articles_named"] = len(named)
    stats["articles"] = len(articles)
    stats["excluded_articles"] = len({k for k in compact_text if k not in articles})
    every_title = sorted({k[0] for k in compact_text} | set(parents.values()), key=len, reverse=True)
    all_titles = sorted({a["title"] for a in articles.values()}, key=len, reverse=True)
    idf = LV.noun_idf([" ".join(a["bodies"]) for a in articles.values()])
    article_text = [compact(" ".join(a["bodies"])) for a in articles.values()]
    corpus_index = [(key, t) for key, texts in compact_text.items() for t in texts]

    def canon(text: str) -> str:
        return canonical(text, every_title)

    # what the corpus states (every clause of every article, excluded ones included), in that one form: an
    # option whose form is here is true somewhere, so it is never a wrong option
    true_forms = {canon(c) for texts in compact_text.values() for t in texts for c in LV.clauses(t)}
    true_forms |= {canon(c) for a in articles.values() for b in a["bodies"] for c in LV.clauses(b)}

    def false_ones(candidates: Sequence[str]) -> list[str]:
        out = [agree_particles(w) for w in candidates]
        kept = [w for w in out if canon(w) not in true_forms]
        stats["distractors_true_elsewhere"] += len(out) - len(kept)
        return kept

    def one_answer(options: Sequence[str], qtype: str) -> bool:
        """n distinct statements, exactly one of them right: the true one (lookup) or the false one (negative)."""
        forms = [canon(o) for o in options]
        true = sum(f in true_forms for f in forms)
        return len(set(forms)) == len(forms) and true == (1 if qtype == "lookup" else len(forms) - 1)

    def narrow(terms: Sequence[str]) -> bool:
        return sum(all(t in text for t in terms) for text in article_text) <= cfg.max_term_articles

    def unique_home(clause: str) -> Optional[tuple[str, str]]:
        cc = compact(clause)
        homes = {key for key, t in corpus_index if cc in t}
        return next(iter(homes)) if len(homes) == 1 else None

    # usable clauses per article, paraphrased once (the statement every item about the clause uses)
    usable: dict[tuple[str, str], list[tuple[str, str]]] = {}
    for key, art in tqdm(sorted(articles.items()), desc="articles", unit="article", disable=not progress):
        parent = parents.get(art["title"]) or (law_base_name(art["title"]) if art["level"] in ("decree", "rule") else None)
        names = all_titles + ([parent] if parent else [])
        found = []
        for clause in dict.fromkeys(_REVISION.sub("", c).strip() for body in art["bodies"] for c in LV.clauses(body)):
            stats["clauses"] += 1
            if not is_statement(clause):
                stats["clauses_not_statements"] += 1
                continue
            if exclusions.touches(clause, cfg.shingle_chars):
                stats["clauses_contaminated"] += 1
                continue
            if unique_home(clause) != key or not LV.self_contained(clause, names, idf, narrow):
                continue
            plain = LV.strip_references(clause, names)
            # too short, or opening with the particle a stripped reference left ('제5조에서 규정한' -> '에서 규정한')
            if len(compact(plain)) < 15 or LV._PARTICLE_START.match(plain):
                continue
            stated = LV.paraphrase(plain, rng, cfg.p_synonym).rstrip(" .") + "."
            found.append((clause, stated))
        if found:
            usable[key] = found[:cfg.max_clauses_per_article]
    stats["clauses_usable"] = sum(len(v) for v in usable.values())

    # the split first, by article: an item's options come only from articles of its own split, so no text of a
    # validation or test article is seen in training
    groups = [f"{k[0]} {k[1]}" for k, found in sorted(usable.items()) for _ in found]
    split_of = dict(zip(groups, split_by_group(groups, cfg.split_ratios_tuple(), cfg.seed), strict=True))
    doc_statements: dict[tuple[str, str], list[tuple[tuple[str, str], str]]] = defaultdict(list)
    for key, found in sorted(usable.items()):
        doc_statements[(key[0], split_of[f"{key[0]} {key[1]}"])].extend((key, st) for _, st in found)

    records: list[SyntheticQA] = []
    for key, found in sorted(usable.items()):
        art = articles[key]
        parent = parents.get(art["title"]) or (law_base_name(art["title"]) if art["level"] in ("decree", "rule") else None)
        names = all_titles + ([parent] if parent else [])
        source_article = f"{art['title']} {art['article']}"
        split = split_of[source_article]
        same_doc = [st for k, st in doc_statements[(art["title"], split)] if k != key]
        for clause, stated in found:
            mention = rng.choice(LV.MENTIONS)
            if (mention == "parent" and not parent) or (mention == "level" and art["level"] not in LV.LEVEL_WORDS):
                mention = "full"  # an act has no parent; a document of no known level has no level words
            prefix = LV.mention_prefix(mention, art["title"], art["level"], parent, rng)
            plain = LV.strip_references(clause, names)
            topic = " ".join(LV.keywords(plain, 2, idf))
            made = []
            if rng.random() < cfg.descriptive_share:
                for form in rng.sample(("describe", "yesno", "amount"), 3):
                    written = LV.write_question(clause, form, prefix, names, rng, cfg.p_synonym, idf, narrow)
                    if written is not None:
                        made.append(("descriptive", "lookup", written[0], stated, []))
                        break
            for qtype in rng.sample(("lookup", "negative"), 2)[:cfg.items_per_clause]:
                n = 5 if rng.random() < cfg.five_option_share else 4
                if qtype == "lookup":
                    # at most two wrong versions of the clause itself, the rest wrong versions of other clauses: the
                    # right option is not simply the one every other option was made from
                    own = false_ones(LV.distractors(stated, rng))[:2]
                    others: list[str] = []
                    for other in rng.sample(same_doc, min(len(same_doc), 3 * n)):
                        if len(own) + len(others) >= n - 1:
                            break
                        others += [w for w in false_ones(LV.distractors(other, rng, 1)) if w not in others]
                    wrong = own + others
                    if len(wrong) < n - 1:
                        stats["skipped_few_distractors"] += 1
                        continue
                    position = deal(n)
                    options = _options_with_answer(stated, rng.sample(wrong[:n - 1], n - 1), n, position)
                    stem = rng.choice(POSITIVE_STEMS).format(topic=topic, topic_and=with_and(topic))
                else:
                    # one wrong version of the clause among true statements of the article and its law, the clause
                    # itself left out (else the answer would be one of the two near-identical options)
                    false = false_ones(LV.distractors(stated, rng, 1))
                    siblings = [st for _, st in found if st != stated]
                    true = rng.sample(siblings, len(siblings)) + rng.sample(same_doc, min(len(same_doc), n))
                    true = list(dict.fromkeys(true))[:n - 1]
                    if not false or len(true) < n - 1:
                        stats["skipped_few_true_statements"] += 1
                        continue
                    position = deal(n)
                    rng.shuffle(true)
                    options = _options_with_answer(false[0], true, n, position)
                    stem = rng.choice(NEGATIVE_STEMS).format(topic=topic, topic_and=with_and(topic))
                if not one_answer(options, qtype):
                    stats["skipped_ambiguous"] += 1
                    deal.give_back(n, position)
                    continue
                made.append(("multiple_choice", qtype, render_mc_question(prefix + stem, options), str(position),
                             options))
            for kind, qtype, question, answer, options in made:
                common = dict(kind=kind, qtype=qtype, question=question, answer=answer, context_chunk_ids=[art["chunk_id"]],
                              source_article=source_article, teacher_model=TEACHER, overall_quality_score=10.0,
                              difficulty_level=2, prompt_version=PROMPT_VERSION, split=split)
                if kind == "multiple_choice":
                    rec = SyntheticQA(qa_id=qa_id_for(art["chunk_id"] or source_article, kind, question),
                                      choices={str(i): o for i, o in enumerate(options, start=1)}, **common)
                else:
                    rec = SyntheticQA(qa_id=qa_id_for(art["chunk_id"] or source_article, kind, question),
                                      keywords=LV.keywords(plain, 2, idf), **common)
                records.append(rec)
    seen: set[str] = set()
    unique = []
    for r in records:  # the same rendered question twice (two clauses of one article, same stem and options)
        if r.qa_id not in seen:
            seen.add(r.qa_id)
            unique.append(r)
    records = unique
    stats["records"] = len(records)
    stats["excluded_article_pairs_given"] = len(exclusions.articles)
    stats["excluded_article_pairs_found"] = len(matched_exclusions)
    summary = dict(stats)
    summary["by_kind"] = dict(Counter(r.kind for r in records))
    summary["by_qtype"] = dict(Counter(f"{r.kind}/{r.qtype}" for r in records))
    summary["by_split"] = dict(Counter(r.split for r in records))
    summary["by_level"] = dict(Counter(articles[_key_of(r)]["level"] for r in records if _key_of(r) in articles))
    summary["answer_positions"] = {str(n): dict(sorted(Counter(r.answer for r in records if r.kind == "multiple_choice"
                                                               and len(r.choices) == n).items()))
                                   for n in (4, 5)}
    return records, summary


def _key_of(record: SyntheticQA) -> tuple[str, str]:
    title, _, article = record.source_article.rpartition(" ")
    return title, article


MARKER = "mc_bank.json"  # proves a folder was written by mc-bank (only such a folder is replaced)


def write_bank(records: Sequence[SyntheticQA], stats: dict, out: str | Path, source: dict) -> Path:
    """The synth_qa folder layout: <split>.jsonl and .parquet per split, stats.json (with the KB and
    `teacher` distill's lineage reads) and the marker; written to a staging folder and swapped in whole."""
    from ..outputs import staged_folder
    from .pipeline import records_frame
    from .records import write_jsonl
    from .split import SPLIT_NAMES

    out = Path(out)
    with staged_folder(out, (MARKER,), "--out") as staging:
        for split in SPLIT_NAMES:
            part = [r for r in records if r.split == split]
            write_jsonl(part, staging / f"{split}.jsonl")
            records_frame(part).to_parquet(staging / f"{split}.parquet", index=False)
        write_jsonl(records, staging / "accepted.jsonl")
        (staging / "stats.json").write_text(json.dumps({**stats, **source, "teacher": TEACHER}, indent=2,
                                                       ensure_ascii=False), encoding="utf-8")
        (staging / MARKER).write_text(json.dumps({"prompt_version": PROMPT_VERSION, **source}, indent=2,
                                                 ensure_ascii=False), encoding="utf-8")
    return out
