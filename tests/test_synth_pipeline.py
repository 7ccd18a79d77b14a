"""synth_qa end to end with a scripted teacher (deterministic JSON built from the chunk it is
shown, some of it malformed), then resume after a kill, MLflow logging, decontamination of
copied FSKU dev questions, sampling/planning, the judge, and a run with the real tiny model."""
from __future__ import annotations

import dataclasses
import json
import re

import mlflow
import numpy as np
import pandas as pd
import pytest

from conftest import needs_shared
from fsku.config import SynthQAConfig
from fsku.llm import Generation
from fsku.synth import generate as G
from fsku.synth import pipeline
from fsku.synth.judge import LLMJudge, digit_score, judge_prompt
from fsku.synth.process import FilterSettings, process
from fsku.synth.records import from_teacher_json, read_jsonl


class ScriptedTeacher:
    """Stands in for an LLM backend: reads the template's chunk and kind from the prompt and
    answers with JSON grounded in that chunk; every fifth call answers with prose (unparseable)
    and every seventh with a fenced, trailing-comma JSON (repairable)."""

    model_id = "scripted-teacher"

    def __init__(self):
        self.calls = 0

    def fingerprint(self):
        return "scripted:1"

    def render_chat(self, messages):
        return json.dumps(messages, ensure_ascii=False)

    def truncate_tokens(self, text, n):
        return text[: n * 4]

    def count_tokens(self, text):
        return len(text) // 4

    def _answer(self, user: str) -> str:
        head, body = user.split("\n", 1)
        chunk = body.split("\n\n")[0]
        sentences = [s.strip() for s in re.split(r"(?<=다\.)\s+|\n", chunk) if len(s.strip()) > 12]
        fact = sentences[-1][:60] if sentences else chunk[:60]
        name = head.replace("[조문]", "").strip()
        if "객관식" in user:
            n = int(re.search(r"선택지는 정확히 (\d)개", user).group(1))
            fake = ["달에 있는 기지국을 이용한다", "모든 거래를 종이로 기록한다", "보안 담당자를 두지 않는다",
                    "인터넷 사용을 전면 금지한다", "매일 비밀번호를 공개한다"]
            if "옳지 않은 것은" in user:
                options = [s[:50] for s in (sentences * n)[: n - 1]]
                if len(set(options)) < n - 1:
                    options = [f"{o} ({i})" for i, o in enumerate(options)]
                options.append(fake[0])
                return json.dumps({"question": f"{name}에 관한 설명으로 옳지 않은 것은?", "choices": options,
                                   "answer": n, "difficulty": 2}, ensure_ascii=False)
            options = [fact] + fake[: n - 1]
            kind = "절차" if "절차" in user else "내용"
            return json.dumps({"question": f"{name}의 {kind}으로 옳은 것은?", "choices": options, "answer": 1,
                               "difficulty": 3}, ensure_ascii=False)
        if "정하지 않은 사항" in user:
            return json.dumps({"question": f"{name}은 위반 시 포상금을 정하고 있는가?",
                               "answer": f"해당 조문은 포상금을 규정하고 있지 않습니다. {fact}",
                               "keywords": [name.split()[0]], "difficulty": 2}, ensure_ascii=False)
        words = [w for w in re.findall(r"[가-힣]{2,}", fact)]
        return json.dumps({"question": f"{name}의 {'절차' if '절차' in user else '핵심 내용'}을 설명하세요.",
                           "answer": fact, "keywords": words[:2] or [name], "difficulty": 2}, ensure_ascii=False)

    def generate(self, prompts, max_new_tokens=256, temperature=0.0, top_p=1.0, seed=None, max_time=None,
                 repetition_penalty=1.0):
        out = []
        for p in prompts:
            self.calls += 1
            user = json.loads(p)[1]["content"]
            if self.calls % 5 == 0:
                text = "죄송합니다. 문제를 만들 수 없습니다."
            elif self.calls % 7 == 0:
                text = "```json\n" + self._answer(user)[:-1] + ",}\n```"
            else:
                text = self._answer(user)
            out.append(Generation(text, 40, -0.5, False))
        return out


@pytest.fixture
def synth_env(sample_kb, tmp_path, monkeypatch):
    kb, _, _ = sample_kb
    teacher = ScriptedTeacher()
    monkeypatch.setattr("fsku.llm.load_llm", lambda *a, **k: teacher)
    monkeypatch.chdir(tmp_path)  # no project evaluation/ folder here: decontamination uses given files only
    folder = tmp_path / "scripted"  # what the steps' input check sees: a local model folder (load_llm is scripted)
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    cfg = SynthQAConfig(kb=str(kb.folder), teacher=str(folder), n_chunks=12, questions_per_chunk=3, min_chunk_chars=40,
                        out=str(tmp_path / "synth"), cache_dir=str(tmp_path / "cache"), batch_size=4, min_grounding=0.5)
    return cfg, teacher


def test_synthesize_end_to_end(synth_env):
    cfg, teacher = synth_env
    result = pipeline.synthesize(cfg, progress=False)
    s = result.stats
    assert s["tasks"] == 36 and s["generated"] == 36 and teacher.calls == 36
    assert s["accepted"] >= 12, s
    assert s["rejected_by_reason"].get("no_json_object", 0) == 7  # calls 5, 10, ..., 35
    assert s["json_repairs"].get("trailing_commas", 0) >= 1  # the fenced answers were repaired, not rejected
    assert s["accepted"] + s["rejected"] == s["generated"]
    accepted = read_jsonl(result.out / "accepted.jsonl")
    assert {r.kind for r in accepted} == {"multiple_choice", "descriptive"}
    # every accepted multiple-choice item is in the competition format the classifier reads
    from fsku.infer.classify import classify_question

    for r in accepted:
        if r.kind == "multiple_choice":
            q = classify_question(r.qa_id, r.question)
            assert q.question_type == "multiple_choice" and q.choices == r.choices
    # split by article: no source article in two splits; parquet files hold the same records
    by_article: dict[str, set] = {}
    for r in accepted:
        by_article.setdefault(r.source_article, set()).add(r.split)
    assert all(len(v) == 1 for v in by_article.values())
    total = sum(len(pd.read_parquet(result.out / f"{sp}.parquet")) for sp in ("train", "validation", "test"))
    assert total == len(accepted)
    rejected = [json.loads(line) for line in (result.out / "rejected.jsonl").read_text(encoding="utf-8").splitlines()]
    assert all(r["reason"] and r["stage"] for r in rejected)


def test_synthesize_resumes_after_a_kill_without_duplicates(synth_env):
    cfg, teacher = synth_env
    first = pipeline.synthesize(dataclasses.replace(cfg, cache_dir=""), progress=False)
    raw = (first.out / "raw.jsonl").read_text(encoding="utf-8").splitlines()
    # a kill mid-run: the header, 20 finished generations and half a line survive
    (first.out / "raw.jsonl").write_text("\n".join(raw[:21]) + "\n" + raw[21][:30], encoding="utf-8")
    teacher.calls = 20  # the scripted teacher continues its sequence like a resumed process
    again = pipeline.synthesize(dataclasses.replace(cfg, cache_dir=""), progress=False)
    assert again.stats["generated_this_run"] == 16 and teacher.calls == 36
    ids = [json.loads(line)["ID"] for line in (again.out / "raw.jsonl").read_text(encoding="utf-8").splitlines()[1:]]
    assert len(ids) == len(set(ids)) == 36
    assert [r.to_dict() for r in read_jsonl(again.out / "accepted.jsonl")] == \
        [r.to_dict() for r in read_jsonl(first.out / "accepted.jsonl")]
    # a finished run started again asks the teacher nothing
    third = pipeline.synthesize(dataclasses.replace(cfg, cache_dir=""), progress=False)
    assert third.stats["generated_this_run"] == 0 and teacher.calls == 36


def test_cached_responses_survive_a_restart(synth_env):
    cfg, teacher = synth_env
    pipeline.synthesize(cfg, progress=False)
    calls = teacher.calls
    again = pipeline.synthesize(dataclasses.replace(cfg, restart=True), progress=False)
    assert teacher.calls == calls and again.stats["generated"] == 36  # all from .cache/synth


def test_synth_qa_step_logs_dataset_plots_and_tables(synth_env):
    from fsku.steps.synth_qa import run_step

    cfg, _ = synth_env
    out = run_step(cfg, progress=False)
    result, run_id = out["result"], out["run_id"]
    run = mlflow.get_run(run_id)
    assert run.data.metrics["accepted"] == result.stats["accepted"]
    assert run.data.metrics["rejected_no_json_object"] == 7
    names = {d.dataset.name for d in run.inputs.dataset_inputs}
    assert "fsku-synth-train" in names
    client = mlflow.tracking.MlflowClient()
    plots = {a.path for a in client.list_artifacts(run_id, "plots")}
    assert {"plots/rejections_by_reason.png", "plots/accepted_by_kind_type.png",
            "plots/accepted_by_difficulty.png", "plots/question_length_hist.png"} <= plots
    assert {a.path for a in client.list_artifacts(run_id, "tables")} >= {"tables/sample_items.json"}


def test_decontamination_catches_every_copied_fsku_dev_question(sample_kb, tmp_path):
    """Items built by copying FSKU dev questions into the candidate pool are all caught."""
    data = needs_shared("fsku-benchmark")
    mcq = pd.read_csv(data / "mcq_dev.csv")
    desc = pd.read_csv(data / "descriptive_dev.csv")
    kb, _, _ = sample_kb
    chunks = pd.read_parquet(kb.folder / "chunks.parquet")
    chunk = chunks.iloc[18]
    raw = []
    from fsku.infer.classify import classify_question

    for i, text in enumerate(mcq["Question"]):
        q = classify_question(f"m{i}", text)
        obj = {"question": q.parsed_question, "choices": [q.choices[k] for k in sorted(q.choices, key=int)], "answer": 1}
        raw.append({"ID": f"m{i}", "chunk_id": chunk.chunk_id, "kind": "multiple_choice", "qtype": "lookup",
                    "n_options": len(q.choices), "text": json.dumps(obj, ensure_ascii=False)})
    for i, (text, ans) in enumerate(zip(desc["Question"], desc["Answer"], strict=True)):
        obj = {"question": text, "answer": ans, "keywords": ["보안"]}
        raw.append({"ID": f"d{i}", "chunk_id": chunk.chunk_id, "kind": "descriptive", "qtype": "lookup",
                    "text": json.dumps(obj, ensure_ascii=False)})
    files = [data / "mcq_dev.csv", data / "descriptive_dev.csv"]
    eval_questions = pipeline.read_eval_questions(files)
    # grounding off, dedup off: every item reaching the pool-level checks must be caught there
    settings = FilterSettings(min_grounding=0.0, dedup_threshold=1.0, min_hangul=0.0)
    out = process(raw, chunks, lambda texts: [t.split() for t in texts], settings, eval_questions)
    stages = {r["ID"]: r["stage"] for r in out.rejected}
    reached = [r["ID"] for r in raw if stages.get(r["ID"]) in (None, "decontamination")]
    assert len(reached) >= 140
    assert out.accepted == [] and all(stages[i] == "decontamination" for i in reached)


def test_read_eval_questions_errors_name_the_file(tmp_path):
    bad = tmp_path / "x.csv"
    bad.write_text("ID,Text\n1,a\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"x.csv: expected a 'Question' column"):
        pipeline.read_eval_questions([bad])
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        pipeline.read_eval_questions([tmp_path / "missing.jsonl"])


def test_sample_chunks_spreads_over_documents_and_articles():
    chunks = pd.DataFrame({
        "chunk_id": [f"c{i}" for i in range(12)],
        "doc_id": ["A"] * 8 + ["B"] * 4,
        "title": ["법A"] * 8 + ["법B"] * 4,
        "path": [""] * 12,
        "article": ["제1조", "제1조", "제1조", "제2조", "제3조", "제4조", "제5조", "제6조", "제1조", "제2조", "", ""],
        "text": ["가" * 200] * 11 + ["짧다"],
    })
    picked = G.sample_chunks(chunks, 6, seed=1, min_chars=50)
    assert len(picked) == 6 and "c11" not in set(picked["chunk_id"])
    assert (picked["doc_id"] == "B").sum() == 3  # documents take turns until B runs out
    a_articles = picked.loc[picked["doc_id"] == "A", "article"]
    assert a_articles.is_unique  # one chunk per article before any second
    assert list(G.sample_chunks(chunks, 6, seed=1, min_chars=50)["chunk_id"]) == list(picked["chunk_id"])
    with pytest.raises(ValueError, match="no chunk"):
        G.sample_chunks(chunks, 3, min_chars=10_000)


def test_plan_tasks_proportions_and_ids():
    tasks = G.plan_tasks([f"c{i}" for i in range(10)], 3, 0.6, {"lookup": 0.5, "procedural": 0.3, "negative": 0.2}, seed=0)
    assert len(tasks) == 30 and len({t.task_id for t in tasks}) == 30
    assert sum(t.kind == "multiple_choice" for t in tasks) == 18
    assert [sum(t.qtype == q for t in tasks) for q in ("lookup", "procedural", "negative")] == [15, 9, 6]
    assert all(t.n_options in (4, 5) for t in tasks if t.kind == "multiple_choice")
    assert all(t.n_options == 0 for t in tasks if t.kind == "descriptive")
    assert G.plan_tasks(["a"], 2, 1.0, {"lookup": 1}, n_options=5, seed=0)[0].n_options == 5
    assert [t.task_id for t in G.plan_tasks([f"c{i}" for i in range(10)], 3, 0.6,
                                            {"lookup": 0.5, "procedural": 0.3, "negative": 0.2}, seed=0)] \
        == [t.task_id for t in tasks]


def test_digit_score_hand_computed():
    assert digit_score(np.log(np.eye(10)[7] + 1e-12)) == pytest.approx(70 / 9, abs=1e-6)
    assert digit_score(np.zeros(10)) == pytest.approx(5.0)  # uniform: mean digit 4.5 -> 5.0
    with np.errstate(divide="ignore"):
        two_point = np.log([0.5] + [0.0] * 8 + [0.5])  # digits 0 and 9 only
    assert digit_score(two_point) == pytest.approx(5.0)
    assert digit_score(np.log([1.0] * 10) + 3.0) == pytest.approx(5.0)  # shift-invariant
    # mode: the digit a greedy judge writes; a diffuse distribution whose mean is 5.7 still reads 8
    diffuse = np.log([0.02, 0.05, 0.05, 0.08, 0.1, 0.1, 0.1, 0.15, 0.3, 0.05])
    assert digit_score(diffuse, "mean") == pytest.approx(sum(d * q for d, q in enumerate(np.exp(diffuse))) * 10 / 9)
    assert digit_score(diffuse, "mode") == pytest.approx(80 / 9)
    assert digit_score(np.zeros(10), "mode") == 0.0  # ties: the lowest digit, never a lucky high one
    with pytest.raises(ValueError, match="mode"):
        digit_score(np.zeros(10), "median")


def test_llm_judge_scores_with_one_forward_pass(tiny_llm):
    item = from_teacher_json({"question": "보존기간은?", "choices": ["5년", "3년", "1년", "10년"], "answer": 1},
                             kind="multiple_choice", qtype="lookup", chunk_id="c", source_article="a",
                             teacher_model="t", prompt_version="v")
    assert "출제자가 표시한 정답: 1번 (5년)" in judge_prompt(item, "기록은 5년 동안 보존한다.")
    score = LLMJudge(tiny_llm)(item, "기록은 5년 동안 보존한다.")
    assert 0.0 <= score <= 10.0


def test_real_tiny_teacher_runs_the_whole_path(sample_kb, tiny_models, tmp_path, monkeypatch):
    """The untrained tiny teacher writes nothing parseable: every item is rejected with a reason."""
    kb, _, _ = sample_kb
    monkeypatch.chdir(tmp_path)
    cfg = SynthQAConfig(kb=str(kb.folder), teacher=str(tiny_models["teacher"]), n_chunks=2, questions_per_chunk=1,
                        min_chunk_chars=40, max_new_tokens=32, out=str(tmp_path / "s"), cache_dir="", dtype="float32")
    result = pipeline.synthesize(cfg, progress=False)
    assert result.stats["generated"] == 2
    assert result.stats["accepted"] + result.stats["rejected"] == 2


def test_tiny_teacher_learns_the_format_from_templated_qa(sample_kb, tmp_path):
    """The format lesson behind the demo: templated QA from the KB lowers the response loss, and
    `fsku make-tiny-models --kb` records the fine-tuning next to the teacher."""
    from fsku.cli import main as cli_main
    from fsku.llm.tiny import make_tiny_pair, train_on_examples
    from fsku.synth.templated import teacher_sft_examples
    from fsku.synth.templates import load_templates

    kb, _, _ = sample_kb
    examples = teacher_sft_examples(pd.read_parquet(kb.folder / "chunks.parquet"), load_templates())
    kinds = {json.loads(t).get("choices") is not None for _, t in examples}
    assert len(examples) >= 60 and kinds == {True, False}
    for _, target in examples:
        assert set(json.loads(target)) >= {"question", "answer", "difficulty"}
    pair = make_tiny_pair(tmp_path / "tiny")
    info = train_on_examples(pair["teacher"], examples[:4], steps=12, lr=3e-3, batch_size=2)
    assert info["examples"] == 4 and info["final_loss"] < info["first_loss"]
    assert cli_main(["make-tiny-models", "--out", str(tmp_path / "cli"), "--kb", str(kb.folder), "--teacher-steps", "1"]) == 0
    recorded = json.loads((tmp_path / "cli" / "teacher" / "sft.json").read_text())
    assert recorded["steps"] == 1 and len(recorded["losses"]) == 1 and len(info["losses"]) == 12


def test_teacher_sft_figure_only_for_a_teacher_trained_here(tmp_path):
    from fsku.steps.synth_qa import teacher_sft_figure

    assert teacher_sft_figure("Qwen/Qwen2.5-1.5B-Instruct") is None and teacher_sft_figure(str(tmp_path)) is None
    (tmp_path / "sft.json").write_text("{not json")
    assert teacher_sft_figure(str(tmp_path)) is None
    (tmp_path / "sft.json").write_text(json.dumps({"steps": 3, "examples": 2}))  # written before losses were kept
    assert teacher_sft_figure(str(tmp_path)) is None
    (tmp_path / "sft.json").write_text(json.dumps({"steps": 3, "examples": 2, "losses": [3.0, 2.0, 1.5]}))
    fig = teacher_sft_figure(str(tmp_path))
    line = fig.axes[0].lines[0]
    assert list(line.get_ydata()) == [3.0, 2.0, 1.5] and "2 templated" in fig.axes[0].get_title()


def test_bad_synth_inputs_get_clear_errors(tmp_path):
    with pytest.raises(ValueError, match=r"qtype_mix: expected name:weight .* got 'essay:1'"):
        SynthQAConfig(qtype_mix="lookup:1,essay:1")
    with pytest.raises(ValueError, match="qtype_mix: weight of 'lookup' is not a number"):
        SynthQAConfig(qtype_mix="lookup:x")
    with pytest.raises(ValueError, match="split_ratios must be numbers"):
        SynthQAConfig(split_ratios="0.8,a,0.1")
    with pytest.raises(ValueError, match="n_options must be 0, 4 or 5"):
        SynthQAConfig(n_options=3)
    with pytest.raises(FileNotFoundError, match="chunks.parquet not found: build the knowledge base first"):
        G.load_chunks(tmp_path)
    pd.DataFrame({"chunk_id": ["c"], "text": ["t"]}).to_parquet(tmp_path / "chunks.parquet")
    with pytest.raises(ValueError, match=r"chunks.parquet: missing columns \['article', 'doc_id', 'path', 'title'\]"):
        G.load_chunks(tmp_path)


def test_n_questions_sets_the_total_number_of_tasks(synth_env):
    cfg, teacher = synth_env
    cfg = dataclasses.replace(cfg, n_questions=5, questions_per_chunk=2, restart=True)
    assert cfg.chunks_needed == 3
    result = pipeline.synthesize(cfg, progress=False)
    assert result.stats["tasks"] == 5 and teacher.calls == 5
