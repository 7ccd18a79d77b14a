"""distill: prompts, resumable responses, pairs, the trainer on tiny models, merge, resume."""
import json
from pathlib import Path

import pytest
import torch

from fsku.config import DistillConfig
from fsku.distill import data as D
from fsku.distill import trainer as T
from fsku.synth.records import SyntheticQA, write_jsonl


def _records(n=6):
    out = []
    for i in range(n):
        if i % 2 == 0:
            out.append(SyntheticQA(qa_id=f"mc{i}", kind="multiple_choice", qtype="lookup",
                                   question=f"전자금융거래의 보존 기간은 몇 년인가?\n1 {i + 1}년\n2 5년\n3 10년\n4 영구",
                                   answer="2", choices={"1": f"{i + 1}년", "2": "5년", "3": "10년", "4": "영구"},
                                   source_article=f"법 제{i}조"))
        else:
            out.append(SyntheticQA(qa_id=f"d{i}", kind="descriptive", qtype="procedural",
                                   question=f"접근매체 분실 신고 절차 {i}를 설명하세요.", answer="금융회사에 즉시 신고한다.",
                                   keywords=["신고"], source_article=f"법 제{i}조"))
    return out


@pytest.fixture
def synth_dir(tmp_path):
    folder = tmp_path / "synth"
    folder.mkdir()
    recs = _records()
    for r in recs:
        r.split = "train"
    write_jsonl(recs, folder / "train.jsonl")
    # what synth_qa writes beside it: the split as parquet, and its stats (an older stats.json: the corpus hash
    # of the KB the items came from under the key kb_version)
    from fsku.synth.pipeline import records_frame

    records_frame(recs).to_parquet(folder / "train.parquet", index=False)
    (folder / "stats.json").write_text(json.dumps({"kb_version": "abc123def456", "teacher": "tiny"}))
    return folder


class CountingLLM:
    """A fake backend answering with a fixed text per prompt; fails after `fail_after` prompts."""

    model_id = "fake"

    def __init__(self, fail_after=None):
        self.calls, self.fail_after = 0, fail_after

    def fingerprint(self):
        return "fake:1"

    def render_chat(self, messages):
        return json.dumps(messages, ensure_ascii=False)

    def generate(self, prompts, max_new_tokens, temperature=0.0, top_p=1.0, seed=None):
        from fsku.llm import Generation

        out = []
        for p in prompts:
            if self.fail_after is not None and self.calls >= self.fail_after:
                raise KeyboardInterrupt("killed")
            self.calls += 1
            out.append(Generation("2" if "선택지" in p else "즉시 신고합니다.", 3, -0.1, False))
        return out


def test_prompts_are_the_inference_prompts_without_the_split_sentinel():
    from fsku.infer import prompts as P

    rows = D.build_prompts(_records(2))
    mc, desc = rows
    assert mc["kind"] == "multiple_choice" and P.SPLIT not in mc["messages"][1]["content"]
    assert "선택지:\n1 1년\n2 5년" in mc["messages"][1]["content"] and P.MC_INSTRUCTION in mc["messages"][1]["content"]
    assert desc["messages"] == P.desc_messages(_records(2)[1].question)
    with pytest.raises(ValueError, match="duplicate qa_id"):
        D.build_prompts(_records(2) + _records(1))
    with_ctx = D.build_prompts(_records(1), contexts=["[자료 1] 참고"])
    assert with_ctx[0]["messages"][1]["content"].startswith("[자료 1] 참고")


def test_responses_resume_after_a_kill_without_duplicates(tmp_path):
    rows = D.build_prompts(_records(6))
    settings = D.ResponseSettings(gen_batch_size=2)
    path = tmp_path / "resp.jsonl"
    killed = CountingLLM(fail_after=3)
    with pytest.raises(KeyboardInterrupt):
        D.generate_responses(rows, killed, settings, path)
    kept = [json.loads(x) for x in path.read_text().splitlines()[1:]]
    # MC prompts run first (batches [mc0, mc2], [mc4]); the kill hits the first descriptive batch
    assert [k["ID"] for k in kept] == ["mc0", "mc2", "mc4"]
    again = CountingLLM()
    got = D.generate_responses(rows, again, settings, path)
    assert again.calls == 3 and set(got) == {r["prompt_id"] for r in rows}
    ids = [json.loads(x)["ID"] for x in path.read_text().splitlines()[1:]]
    assert len(ids) == len(set(ids)) == 6
    # multiple choice got the short cap, descriptive the long one: MC answers are numbers
    assert got["mc0"]["text"] == "2"
    # a different model refuses to mix into the file
    other = CountingLLM()
    other.fingerprint = lambda: "fake:2"
    with pytest.raises(ValueError, match="different run"):
        D.generate_responses(rows, other, settings, path)


def test_pairs_count_missing_and_empty_sides(tmp_path):
    rows = D.build_prompts(_records(4))
    teacher = {"mc0": {"text": "2"}, "d1": {"text": "신고"}, "mc2": {"text": "  "}}
    student = {"mc0": {"text": "1"}, "d1": {"text": ""}, "d3": {"text": "x"}}
    pairs, counts = D.make_pairs(rows, teacher, student)
    assert [p["prompt_id"] for p in pairs] == ["mc0"]
    assert counts.to_dict() == {"prompts": 4, "pairs": 1, "missing_teacher": 1, "missing_student": 1,
                                "empty_teacher": 1, "empty_student": 1}
    assert pairs[0]["chosen"] == [{"role": "assistant", "content": "2"}]
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(pairs[0], ensure_ascii=False) + "\n" + json.dumps({"prompt_id": "x", "prompt": [],
                                                                                  "chosen": [], "rejected": []}) + "\n")
    with pytest.raises(ValueError, match=r"pairs.jsonl:2: 'prompt' must be"):
        D.read_pairs(path)


def test_vocab_check_fails_clearly(tiny_models, tmp_path):
    from transformers import AutoTokenizer

    from fsku.llm.tiny import train_tokenizer

    tok = AutoTokenizer.from_pretrained(tiny_models["tokenizer"])
    assert T.check_shared_vocab(tok, tok) == len(tok)
    other = train_tokenizer(["completely different text only"], tmp_path / "tok", vocab_size=300)
    with pytest.raises(ValueError, match="one shared vocabulary"):
        T.check_shared_vocab(tok, other)


def test_dense_from_topk():
    logp = torch.log_softmax(torch.randn(2, 3, 10), -1)
    full = logp.topk(10, -1)
    assert torch.allclose(T.dense_from_topk(full.indices, full.values, 10), logp, atol=1e-6)
    part = logp.topk(4, -1)
    dense = T.dense_from_topk(part.indices, part.values, 10)
    assert torch.allclose(dense.exp().sum(-1), torch.ones(2, 3), atol=1e-5)
    assert torch.allclose(dense.gather(-1, part.indices), part.values)
    rest = (1 - part.values.exp().sum(-1)) / 6
    others = torch.ones(2, 3, 10, dtype=torch.bool).scatter(-1, part.indices, False)
    assert torch.allclose(dense.exp()[others].view(2, 3, 6), rest.unsqueeze(-1).expand(2, 3, 6), atol=1e-6)


def _features(tiny_models, n=4):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_models["teacher"])
    rows = D.build_prompts(_records(n))
    pairs, _ = D.make_pairs(rows, {r["prompt_id"]: {"text": "정답은 2번이며 5년간 보존합니다."} for r in rows},
                            {r["prompt_id"]: {"text": "1"} for r in rows})
    feats, cut = T.encode_pairs(tok, pairs, max_length=512, max_prompt_length=400)
    return tok, feats, cut


def test_encoding_masks_the_prompt(tiny_models):
    tok, feats, cut = _features(tiny_models, 2)
    f = feats[0]
    n_prompt = sum(1 for x in f["chosen_labels"] if x == T.IGNORE)
    assert n_prompt > 0 and f["chosen_labels"][n_prompt:] == f["chosen_input_ids"][n_prompt:]
    assert f["chosen_input_ids"][:n_prompt] == f["rejected_input_ids"][:n_prompt]  # same prompt on both sides
    assert tok.decode(f["chosen_input_ids"][n_prompt:]).endswith(tok.eos_token)
    batch = T.PairCollator(tok.pad_token_id)(feats)
    assert batch["chosen_input_ids"].shape == batch["chosen_labels"].shape == batch["chosen_attention_mask"].shape


def _trainer(tiny_models, tmp_path, loss_type="distillm_v2", teacher_logits="online", steps=1, topk=16, **loss_kw):
    from transformers import AutoModelForCausalLM, TrainingArguments

    tok, feats, _ = _features(tiny_models)
    teacher = AutoModelForCausalLM.from_pretrained(tiny_models["teacher"], dtype=torch.float32)
    if teacher_logits == "topk":
        T.precompute_topk(teacher, feats, k=topk, vocab_size=len(tok))
        teacher = None
    student = T.load_student(str(tiny_models["student"]), T.LoraSettings(lora_r=4, lora_alpha=8, lora_dropout=0.0),
                             torch.float32, "cpu")
    args = TrainingArguments(output_dir=str(tmp_path / "ckpt"), max_steps=steps, per_device_train_batch_size=2,
                             learning_rate=1e-2, report_to="none", remove_unused_columns=False, use_cpu=True,
                             logging_steps=1, save_strategy="no", disable_tqdm=True)
    cb = T.MetricsCallback()
    trainer = T.DistillTrainer(model=student, args=args, train_dataset=T.PairDataset(feats),
                               data_collator=T.PairCollator(tok.pad_token_id), teacher=teacher, callbacks=[cb],
                               loss=T.LossSettings(loss_type=loss_type, **loss_kw), vocab_size=len(tok))
    return trainer, cb


def test_one_step_changes_lora_weights_only(tiny_models, tmp_path):
    trainer, cb = _trainer(tiny_models, tmp_path)
    model = trainer.model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()
    lora_changed = [n for n, p in model.named_parameters() if "lora_" in n and not torch.equal(before[n], p)]
    base_changed = [n for n, p in model.named_parameters() if "lora_" not in n and not torch.equal(before[n], p)]
    assert lora_changed and not base_changed
    assert all(not p.requires_grad for p in trainer.teacher.parameters())
    logged = cb.history[0]
    for key in ("loss", "grad_norm", "learning_rate", "loss/chosen_skew_forward_kl", "loss/rejected_skew_reverse_kl",
                "alpha/chosen", "alpha/rejected", "beta"):
        assert key in logged, (key, logged)


@pytest.mark.parametrize("loss_type", ["sft", "kd", "rkl", "gkd"])
def test_baselines_train(tiny_models, tmp_path, loss_type):
    trainer, cb = _trainer(tiny_models, tmp_path, loss_type=loss_type)
    trainer.train()
    assert torch.isfinite(torch.tensor(cb.history[0]["loss"]))


def test_response_window_by_hand():
    ign = T.IGNORE
    # first labelled column 2 of width 5: logits at positions 1..4 are kept, 1..3 predict labels 2..4
    assert T.response_window(torch.tensor([[ign, ign, 5, 6, ign], [ign, ign, ign, 7, 8]])) == 4
    assert T.response_window(torch.tensor([[ign, ign, ign]])) == 3  # nothing labelled: the whole width
    assert T.response_window(torch.tensor([[4, 5, ign]])) == 3  # a label at 0 cannot be predicted


def test_windowed_loss_equals_the_full_width_loss(tiny_models, tmp_path):
    from fsku.distill import losses as L

    trainer, _ = _trainer(tiny_models, tmp_path)
    batch = T.PairCollator(0)([trainer.train_dataset[i] for i in range(3)])
    assert T.response_window(batch["chosen_labels"]) < batch["chosen_labels"].shape[1]  # the window does cut
    vocab = trainer.vocab_size
    sides = {}
    with torch.no_grad():
        for side in T.SIDES:
            ids, attn = batch[f"{side}_input_ids"], batch[f"{side}_attention_mask"]
            labels = batch[f"{side}_labels"][:, 1:]
            log_q = L.log_probs(trainer.model(input_ids=ids, attention_mask=attn).logits[:, :-1], vocab)
            log_p = L.log_probs(trainer.teacher(input_ids=ids, attention_mask=attn).logits[:, :-1], vocab)
            sides[side] = L.Side(log_q, log_p, labels, labels != T.IGNORE)
        full, _ = L.distillation_loss("distillm_v2", sides["chosen"], sides["rejected"], 0.1, 0.1, beta=1.0, jsd_weight=0.5)
        windowed = trainer.compute_loss(trainer.model, batch)
    assert windowed.item() == pytest.approx(full.item(), rel=1e-5, abs=1e-6)


def test_topk_teacher_matches_online_when_k_covers_the_mass(tiny_models, tmp_path):
    from fsku.distill import losses as L

    online, _ = _trainer(tiny_models, tmp_path / "a", loss_type="distillm_v2")
    topk, _ = _trainer(tiny_models, tmp_path / "b", loss_type="distillm_v2", teacher_logits="topk", topk=10**6)
    assert topk.teacher is None
    batch_online = T.PairCollator(0)([online.train_dataset[i] for i in range(2)])
    batch_topk = T.PairCollator(0)([topk.train_dataset[i] for i in range(2)])
    vocab = topk.vocab_size
    with torch.no_grad():
        # k >= the vocabulary: the stored rows are the teacher's whole distribution at every response position
        for side in T.SIDES:
            all_labels = batch_topk[f"{side}_labels"]
            keep = T.response_window(all_labels)
            mask = all_labels[:, all_labels.shape[1] - keep + 1:] != T.IGNORE
            full = online.teacher(input_ids=batch_online[f"{side}_input_ids"],
                                  attention_mask=batch_online[f"{side}_attention_mask"]).logits[:, :-1]
            want = L.log_probs(full, vocab)[:, -(keep - 1):]
            got = topk._teacher_logp(batch_topk, side, mask, torch.empty(*mask.shape, vocab), keep)
            assert mask.sum() > 0 and got.shape == want.shape
            assert torch.allclose(got[mask], want[mask], rtol=1e-6, atol=1e-6), side
        a = online.compute_loss(online.model, batch_online).item()
        b = topk.compute_loss(topk.model, batch_topk).item()
    assert b == pytest.approx(a, rel=1e-6, abs=1e-6)


def test_adaptive_alpha_sets_a_reference_then_adapts(tiny_models, tmp_path):
    trainer, cb = _trainer(tiny_models, tmp_path, steps=3, adaptive_alpha=True, alpha_reference_steps=1)
    trainer.train()
    assert trainer.reference_gap["chosen"] is not None
    assert all(0.01 - 1e-6 <= h["alpha/chosen"] <= 0.1 + 1e-6 for h in cb.history if "alpha/chosen" in h)
    assert "gap/chosen" in cb.history[-2]  # the last entry is the end-of-training summary


def test_adaptive_alpha_with_a_non_positive_reference_gap_warns_and_keeps_alpha(tiny_models, tmp_path, monkeypatch,
                                                                                 caplog):
    from fsku.distill import losses as L

    # the student likelier than the teacher: the reference gap is negative (-0.25); later gaps close towards 0,
    # where the unguarded formula would give 1 - 0.8 * (-0.25) / (-0.05) < 0, i.e. the 0.01 floor
    calls = []

    def gap(log_p, log_q, labels, mask):
        calls.append(1)
        return torch.full((labels.shape[0],), -0.25 if len(calls) <= 2 else -0.05)

    monkeypatch.setattr(L, "sequence_prob_gap", gap)
    trainer, cb = _trainer(tiny_models, tmp_path, steps=3, adaptive_alpha=True, alpha_reference_steps=1, alpha=0.2)
    with caplog.at_level("WARNING", logger="fsku.distill.trainer"):
        trainer.train()
    assert trainer.reference_gap["chosen"] == pytest.approx(-0.25)
    assert "reference gap over the first 1 steps is -0.25 <= 0" in caplog.text
    assert [h["alpha/chosen"] for h in cb.history if "alpha/chosen" in h] == pytest.approx([0.2, 0.2, 0.2])


def test_gradual_beta_rises_from_one_during_training(tiny_models, tmp_path):
    trainer, cb = _trainer(tiny_models, tmp_path, steps=4, gradual_beta=True)
    trainer.train()
    # 4 steps, ramp over the first half: global steps 0, 1, 2, 3 -> 1.0, 1.25, 1.5, 1.5
    assert [h["beta"] for h in cb.history if "beta" in h] == pytest.approx([1.0, 1.25, 1.5, 1.5])


def test_topk_tail_mass_by_hand():
    import math

    feats = [{"chosen_topk_logp": [[math.log(0.5), math.log(0.3)], [math.log(0.9), math.log(0.1)]],
              "rejected_topk_logp": [[math.log(0.6), math.log(0.2)]]},
             {"chosen_topk_logp": [], "rejected_topk_logp": [[math.log(0.7), math.log(0.3)]]}]
    # tails 0.2, 0.0, 0.2, 0.0 over four tokens
    assert T.topk_tail_mass(feats) == pytest.approx(0.1)
    assert T.topk_tail_mass(feats, ("chosen",)) == pytest.approx(0.1)  # 0.2 and 0.0
    assert T.topk_tail_mass([{"chosen_input_ids": [1, 2]}]) is None


def _naive_sides(trainer, batch):
    """Both sides of a batch as plain-list probabilities (student q, teacher p) at every response
    position, from full-width forward passes of the two models (no response window, no top-k)."""
    from test_distill_losses import naive_side_from_logits

    out = {}
    with torch.no_grad():
        for side in T.SIDES:
            ids, attn = batch[f"{side}_input_ids"], batch[f"{side}_attention_mask"]
            labels = batch[f"{side}_labels"][:, 1:]
            s = trainer.model(input_ids=ids, attention_mask=attn).logits[:, :-1, :trainer.vocab_size].double()
            t = trainer.teacher(input_ids=ids, attention_mask=attn).logits[:, :-1, :trainer.vocab_size].double()
            out[side] = naive_side_from_logits(s, t, labels, labels != T.IGNORE)
    return out


def _logged(trainer, cb) -> dict:
    """What the trainer logs for the compute_loss calls since the last log (its stored metrics, averaged)."""
    trainer.log({})
    return cb.history[-1]


@pytest.mark.parametrize("loss_type", ["distillm_v2", "sft", "kd", "rkl", "gkd"])
def test_trainer_loss_matches_naive_loops(tiny_models, tmp_path, loss_type):
    """compute_loss (response window, teacher online) against the formulas on full-width logits, with a
    non-default alpha, beta and JSD weight."""
    from test_distill_losses import naive_loss

    alpha, beta, w = 0.2, 0.6, 0.3
    trainer, cb = _trainer(tiny_models, tmp_path, loss_type=loss_type, alpha=alpha, beta=beta, jsd_weight=w)
    batch = T.PairCollator(0)([trainer.train_dataset[i] for i in range(3)])
    sides = _naive_sides(trainer, batch)
    want, want_terms = naive_loss(loss_type, sides["chosen"], sides["rejected"], alpha, alpha, beta, w)
    with torch.no_grad():
        got = trainer.compute_loss(trainer.model, batch).item()
    assert got == pytest.approx(want, rel=1e-5, abs=1e-6)
    logged = _logged(trainer, cb)
    assert {k[len("loss/"):] for k in logged if k.startswith("loss/")} == set(want_terms)
    for key, value in want_terms.items():
        assert logged[f"loss/{key}"] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def test_trainer_applies_the_adapted_alpha_after_its_reference_steps(tiny_models, tmp_path):
    """DistiLLM-2's adaptive alpha by hand: the mean teacher-student gap of the first
    `alpha_reference_steps` batches is the reference g_ref (those steps use the base alpha a0); later
    batches use alpha_i = clip(1 - (1 - a0) * g_ref / (g_i + 1e-5), 0.01, a0) per sequence and side,
    where g_i is how much likelier the side's own model finds the response (chosen: teacher minus
    student; rejected: student minus teacher) and 1e-5 is the trainer's guard against a zero gap."""
    from test_distill_losses import naive_loss, naive_sequence_gap

    a0, beta, steps = 0.3, 0.8, 2
    trainer, cb = _trainer(tiny_models, tmp_path, adaptive_alpha=True, alpha_reference_steps=steps, alpha=a0, beta=beta)
    collate = T.PairCollator(0)
    rows = [trainer.train_dataset[i] for i in range(4)]
    reference_batches, final = [collate(rows[:2]), collate(rows[2:])], collate(rows)
    reverse = {"chosen": False, "rejected": True}

    def mean(xs):
        return sum(xs) / len(xs)

    want_ref = {side: mean([mean(naive_sequence_gap(_naive_sides(trainer, b)[side], reverse[side]))
                            for b in reference_batches]) for side in T.SIDES}
    with torch.no_grad():
        for b in reference_batches:
            trainer.compute_loss(trainer.model, b)
    for side in T.SIDES:
        assert trainer.reference_gap[side] == pytest.approx(want_ref[side], rel=1e-5)
    logged = _logged(trainer, cb)
    assert logged["alpha/chosen"] == pytest.approx(a0) and logged["alpha/rejected"] == pytest.approx(a0)

    sides = _naive_sides(trainer, final)
    gaps = {side: naive_sequence_gap(sides[side], reverse[side]) for side in T.SIDES}
    # the tiny models' reference gaps are ~1e-4 (the rejected side's below 0, where the guard keeps a0): put a
    # positive reference above this batch's gaps in their place, so the formula moves every side's alpha
    used_ref = {side: 1.3 * max(abs(g) for g in gaps[side]) + 1e-6 for side in T.SIDES}
    trainer.reference_gap.update(used_ref)
    want_alpha = {side: [min(a0, max(0.01, 1 - (1 - a0) * used_ref[side] / (g + 1e-5))) for g in gaps[side]]
                  for side in T.SIDES}
    # the adaptation must matter on this batch, or the loss below could not tell it from the base alpha
    assert max(abs(a - a0) for side in T.SIDES for a in want_alpha[side]) > 1e-2, want_alpha
    want, _ = naive_loss("distillm_v2", sides["chosen"], sides["rejected"], want_alpha["chosen"],
                         want_alpha["rejected"], beta, 0.5)
    base, _ = naive_loss("distillm_v2", sides["chosen"], sides["rejected"], a0, a0, beta, 0.5)
    assert abs(want - base) > 1e-4
    with torch.no_grad():
        got = trainer.compute_loss(trainer.model, final).item()
    assert got == pytest.approx(want, rel=1e-5, abs=1e-6)
    logged = _logged(trainer, cb)
    for side in T.SIDES:
        assert logged[f"alpha/{side}"] == pytest.approx(mean(want_alpha[side]), abs=1e-5), side  # float32 vs double


def test_distill_pipeline_end_to_end_and_resume(tiny_models, synth_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from fsku.distill.pipeline import distill

    cfg = DistillConfig(data=str(synth_dir), teacher=str(tiny_models["teacher"]), student=str(tiny_models["student"]),
                        backend="transformers", device="cpu", dtype="float32", out=str(tmp_path / "out"),
                        max_steps=2, batch_size=2, save_steps=1, max_new_tokens=12, mc_max_new_tokens=3,
                        max_model_len=768, max_prompt_length=640, lora_r=4, lora_alpha=8, register_as=None,
                        cache_dir=str(tmp_path / "cache"), rounds=2, temperature=1.0, eval_steps=1, eval_prompts=2)
    held_out = _records()[:3]
    for r in held_out:
        r.split, r.qa_id = "validation", f"val-{r.qa_id}"
    write_jsonl(held_out, synth_dir / "validation.jsonl")
    logged = []
    res = distill(cfg, log_fn=lambda m, s: logged.append((s, m)), progress=False)
    out = Path(cfg.out)
    for name in ("prompts.jsonl", "responses_r1_teacher.jsonl", "responses_r1_student.jsonl",
                 "responses_r2_student.jsonl", "pairs_r1.jsonl", "pairs_r2.jsonl", "stats.json"):
        assert (out / name).exists(), name
    assert res.stats["rounds"][0]["pairs"]["prompts"] == 6 and len(res.stats["rounds"]) == 2
    assert 0.0 <= res.stats["teacher_label_accuracy"] <= 1.0  # the teacher's label vs the records' answers
    assert res.stats["rounds"][1]["steps"] == 2
    assert any("r2/loss" in m for _, m in logged)
    # held out: a seeded sample of 2 of the 3 validation prompts, measured at steps 0, 1, 2 of each round
    assert res.stats["heldout_prompts"] == 2
    for rnd in (1, 2):
        steps = [s for s, m in logged if f"r{rnd}/heldout/kl_to_teacher" in m]
        assert steps == [0, 1, 2], (rnd, steps)
    assert res.stats["rounds"][0]["heldout_s"] >= 0 and res.stats["rounds"][0]["heldout"]["first"]["step"] == 0
    merged = AutoModelForCausalLM.from_pretrained(res.merged)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert (res.merged / "tokenizer_config.json").exists() and (res.merged / "generation_config.json").exists()
    # a second call continues: responses come from the files, training resumes from the last checkpoint
    cfg2 = DistillConfig(**{**cfg.__dict__, "max_steps": 3, "rounds": 1})
    logged2 = []
    res2 = distill(cfg2, log_fn=lambda m, s: logged2.append((s, m)), progress=False)
    r = res2.stats["rounds"][0]
    assert r["resumed_from"].endswith("checkpoint-2") and r["steps"] == 3
    assert [s for s, m in logged2 if "heldout/kl_to_teacher" in m] == [3]  # not step 0 again: resumed at 2
    # resumed at its last checkpoint, the round trains no step: its end is still measured
    logged3 = []
    res3 = distill(cfg2, log_fn=lambda m, s: logged3.append((s, m)), progress=False)
    assert res3.stats["rounds"][0]["resumed_from"].endswith("checkpoint-3")
    assert [s for s, m in logged3 if "heldout/kl_to_teacher" in m] == [3]


def test_distill_step_logs_to_mlflow_and_registers_the_student(tiny_models, synth_dir, tmp_path):
    import mlflow

    from fsku.steps.distill import run_step

    cfg = DistillConfig(data=str(synth_dir), teacher=str(tiny_models["teacher"]), student=str(tiny_models["student"]),
                        backend="transformers", device="cpu", dtype="float32", out=str(tmp_path / "out"),
                        max_steps=2, batch_size=2, max_new_tokens=8, mc_max_new_tokens=3, max_model_len=768,
                        max_prompt_length=640, lora_r=4, lora_alpha=8, cache_dir="", temperature=1.0,
                        register_as="fsku-student-test", loss_type="distillm_v2", alpha=0.2, beta=0.5)
    # a held-out split: the KL to the teacher is measured at the start and at the last step (eval_steps 10 > 2)
    recs = _records()[:3]
    for r in recs:
        r.split, r.qa_id = "validation", f"val-{r.qa_id}"
    write_jsonl(recs, synth_dir / "validation.jsonl")
    out = run_step(cfg, progress=False)
    run_id, version = out["run_id"], out["version"]
    client = mlflow.MlflowClient()
    run = client.get_run(run_id)
    assert run.data.tags["fsku.loss_type"] == "distillm_v2"
    kl = client.get_metric_history(run_id, "heldout/kl_to_teacher")
    assert [h.step for h in kl] == [0, 2] and all(h.value > 0 for h in kl)
    assert len(client.get_metric_history(run_id, "heldout/teacher_nll")) == 2
    assert out["result"].stats["heldout_prompts"] == 3
    assert out["result"].stats["rounds"][0]["heldout"]["final"]["step"] == 2
    for key in ("loss", "grad_norm", "learning_rate", "loss/chosen_skew_forward_kl", "loss/rejected_skew_reverse_kl",
                "alpha/chosen", "cost/s_per_step", "pairs_pairs"):
        assert key in run.data.metrics, key
    assert len(client.get_metric_history(run_id, "loss")) == 2
    artifacts = {a.path for a in client.list_artifacts(run_id, "plots")}
    assert {"plots/loss_terms.png", "plots/alpha_beta.png", "plots/lr_grad_norm.png", "plots/heldout_kl.png"} <= artifacts
    mv = client.get_model_version("fsku-student-test", version)
    assert mv.tags["loss_type"] == "distillm_v2" and mv.tags["alpha"] == "0.2" and mv.tags["beta"] == "0.5"
    assert mv.tags["teacher"] == cfg.teacher and len(mv.tags["data_version"]) == 12
    # lineage: the training data by its MLflow dataset digest, the same a synth_qa run logging the split gets
    from fsku import tracking
    from fsku.steps.synth_qa import log_split_dataset

    with tracking.run("synth_qa", {}):
        produced = log_split_dataset(synth_dir, "train", {})
    assert mv.tags["training_dataset"] == f"fsku-synth-train@{produced.digest}"
    assert mv.tags["synth_kb_corpus_sha256"] == "abc123def456" and mv.tags["distill_run"] == run_id
    assert "distilled from" in mv.description and "abc123def456" in mv.description
    assert {d.dataset.name for d in run.inputs.dataset_inputs} == {"fsku-synth-train"}
    assert run.info.run_name == "distill-distillm_v2-r4-2steps"
    # the registered pyfunc answers prompts
    model = mlflow.pyfunc.load_model(f"models:/fsku-student-test/{version}")
    import pandas as pd

    out = model.predict(pd.DataFrame({"prompt": ["전자금융거래란?"]}), params={"max_new_tokens": 4})
    assert list(out.columns) == ["answer"] and len(out) == 1


def test_distill_config_rejects_bad_values():
    with pytest.raises(ValueError, match="loss_type"):
        DistillConfig(loss_type="dpo")
    with pytest.raises(ValueError, match="alpha"):
        DistillConfig(alpha=1.0)
    with pytest.raises(ValueError, match="beta"):
        DistillConfig(beta=3.0)
    with pytest.raises(ValueError, match="needs kb"):
        DistillConfig(context="gated")


def test_missing_training_data_is_a_clear_error(tmp_path):
    from fsku.distill.pipeline import load_records

    with pytest.raises(FileNotFoundError, match="run synth_qa first"):
        load_records(tmp_path, "train")
    (tmp_path / "train.jsonl").write_text('{"qa_id": "x"}\n')
    with pytest.raises(ValueError, match=r"train.jsonl:1: not a synth_qa record"):
        load_records(tmp_path, "train")


def test_topk_teacher_pipeline_frees_and_reloads_the_teacher_between_rounds(tiny_models, synth_dir, tmp_path):
    from fsku.distill.pipeline import distill

    cfg = DistillConfig(data=str(synth_dir), teacher=str(tiny_models["teacher"]), student=str(tiny_models["student"]),
                        backend="transformers", device="cpu", dtype="float32", out=str(tmp_path / "out"),
                        max_steps=1, batch_size=2, max_new_tokens=8, mc_max_new_tokens=3, max_model_len=768,
                        max_prompt_length=640, lora_r=4, lora_alpha=8, cache_dir="", temperature=1.0, rounds=2,
                        register_as=None, teacher_logits="topk", topk=8, loss_type="kd")
    res = distill(cfg, progress=False)
    assert [r["steps"] for r in res.stats["rounds"]] == [1, 1]
    assert all(r["teacher_topk_s"] >= 0 for r in res.stats["rounds"])
    # the tiny teacher spreads its mass over ~2,000 ids: top-8 leaves most of it outside
    assert all(0.0 < r["teacher_tail_mass"] < 1.0 for r in res.stats["rounds"])


def test_qlora_needs_cuda_and_gradient_checkpointing_trains(tiny_models, tmp_path):
    with pytest.raises(ValueError, match="qlora needs a CUDA GPU"):
        T.load_student(str(tiny_models["student"]), T.LoraSettings(qlora=True), torch.float32, "cpu")
    with pytest.raises(ValueError, match="none of the LoRA target modules"):
        T.load_student(str(tiny_models["student"]), T.LoraSettings(lora_target_modules="c_attn"), torch.float32, "cpu")
    student = T.load_student(str(tiny_models["student"]), T.LoraSettings(lora_r=4, lora_alpha=8, gradient_checkpointing=True),
                             torch.float32, "cpu")
    assert student.base_model.model.model.gradient_checkpointing
    tok, feats, _ = _features(tiny_models, 2)
    batch = T.PairCollator(tok.pad_token_id)(feats)
    student.train()
    out = student(input_ids=batch["chosen_input_ids"], attention_mask=batch["chosen_attention_mask"],
                  labels=batch["chosen_labels"])
    out.loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in student.named_parameters() if "lora_" in n)


def test_gradient_accumulation_matches_the_full_batch(tiny_models, tmp_path):
    from transformers import TrainingArguments

    norms = []
    for bs, ga in ((2, 1), (1, 2)):
        tok, feats, _ = _features(tiny_models, 2)
        torch.manual_seed(0)
        student = T.load_student(str(tiny_models["student"]), T.LoraSettings(lora_r=4, lora_alpha=8, lora_dropout=0.0),
                                 torch.float32, "cpu")
        args = TrainingArguments(output_dir=str(tmp_path / f"ga{ga}"), max_steps=1, per_device_train_batch_size=bs,
                                 gradient_accumulation_steps=ga, learning_rate=1e-3, report_to="none",
                                 remove_unused_columns=False, use_cpu=True, logging_steps=1, save_strategy="no",
                                 disable_tqdm=True, seed=0, data_seed=0)
        cb = T.MetricsCallback()
        trainer = T.DistillTrainer(model=student, args=args, train_dataset=T.PairDataset(feats),
                                   data_collator=T.PairCollator(tok.pad_token_id), callbacks=[cb],
                                   loss=T.LossSettings(loss_type="sft"), vocab_size=len(tok))
        trainer.train()
        norms.append((cb.history[0]["loss"], cb.history[0]["grad_norm"]))
    assert norms[0][0] == pytest.approx(norms[1][0], rel=1e-4)
    assert norms[0][1] == pytest.approx(norms[1][1], rel=1e-3)


# ---------------------------------------------------------------- label targets (mc_target=label)

class LabelLLM(CountingLLM):
    """A fake backend that scores option labels: label 3 most likely for every prompt."""

    def __init__(self):
        super().__init__()
        self.scored = []

    def render_chat(self, messages):
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"

    def option_logprobs(self, request, deadline=None):
        import numpy as np

        self.scored.append(request)
        lp = np.log(np.array([0.1, 0.2, 0.6, 0.1][:len(request.labels)]))
        return np.stack([lp for _ in request.suffixes])


def test_label_rows_carry_the_inference_cut_and_prefill():
    from fsku.infer import prompts as P

    rows = D.build_prompts(_records(2), style="fewshot+prefill", mc_target="label")
    mc, desc = rows
    assert (mc["target"], mc["prefill"], mc["n_options"]) == ("label", "정답: ", 4) and "target" not in desc
    render = LabelLLM().render_chat
    prefix, suffix = D.label_prompt_parts(mc, render)
    # the same cut inference makes: render the messages with the sentinel, split there, end with the prefill
    want = P.mc_prompt_parts(render(P.mc_messages(_records(2)[0].stem, ["1년", "5년", "10년", "영구"],
                                                  style="fewshot+prefill")), "fewshot+prefill")
    assert (prefix, suffix) == want and suffix.endswith("정답: ") and suffix.startswith("선택지:")
    assert prefix + suffix == render(mc["messages"]) + "정답: "
    assert D.build_prompts(_records(2), mc_target="generated")[0].keys() == {"prompt_id", "kind", "messages", "reference"}
    many = SyntheticQA(qa_id="m", kind="multiple_choice", qtype="lookup", question="q", answer="1",
                       choices={str(i): f"o{i}" for i in range(1, 11)})
    with pytest.raises(ValueError, match="10 options; label targets take at most 9"):
        D.build_prompts([many], mc_target="label")


def test_pick_label_by_hand():
    import math

    lp = [math.log(0.1), math.log(0.6), math.log(0.3)]
    assert D.pick_label(lp, 0.0, 0) == 2
    draws = [D.pick_label(lp, 1.0, s) for s in range(2000)]
    assert draws == [D.pick_label(lp, 1.0, s) for s in range(2000)]  # seeded
    share = {k: draws.count(k) / len(draws) for k in (1, 2, 3)}
    assert share[2] == pytest.approx(0.6, abs=0.04) and share[1] == pytest.approx(0.1, abs=0.03)


def test_label_responses_are_scored_not_generated_and_resume(tmp_path):
    rows = D.build_prompts(_records(4), style="prefill", mc_target="label")
    llm = LabelLLM()
    path = tmp_path / "resp.jsonl"
    got = D.generate_responses(rows, llm, D.ResponseSettings(gen_batch_size=2, temperature=0.0), path)
    assert got["mc0"]["text"] == "3" and got["mc0"]["n_tokens"] == 1
    assert got["mc0"]["label_logprobs"] == pytest.approx([math_log(0.1), math_log(0.2), math_log(0.6), math_log(0.1)],
                                                          abs=1e-4)
    assert len(llm.scored) == 2 and all(r.suffixes[0].endswith("정답: ") for r in llm.scored)
    assert llm.calls == 2  # only the two descriptive prompts were generated
    again = LabelLLM()
    D.generate_responses(rows, again, D.ResponseSettings(gen_batch_size=2, temperature=0.0), path)
    assert again.scored == [] and again.calls == 0
    pairs, _ = D.make_pairs(rows, got, {k: {**v, "text": "1"} for k, v in got.items()})
    mc = next(p for p in pairs if p["prompt_id"] == "mc0")
    assert (mc["prefill"], mc["chosen"][0]["content"], mc["rejected"][0]["content"]) == ("정답: ", "3", "1")
    assert "split_at" in mc and "split_at" not in next(p for p in pairs if p["kind"] == "descriptive")


def math_log(x):
    import math

    return math.log(x)


def test_label_pairs_train_the_one_position_inference_reads(tiny_models):
    """Through the trainer's own encoding and response window: the student's log-probs of the labels at the
    trained position equal what the inference backend scores for the same question."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fsku.distill import losses as L
    from fsku.llm import load_llm
    from fsku.llm.base import OptionRequest

    tok = AutoTokenizer.from_pretrained(tiny_models["student"])
    rows = D.build_prompts(_records(1), style="fewshot+prefill", mc_target="label")
    pairs, _ = D.make_pairs(rows, {"mc0": {"text": "2"}}, {"mc0": {"text": "4"}})
    feats, _ = T.encode_pairs(tok, pairs, 2048, 2000)
    labels = torch.tensor([feats[0]["chosen_labels"]])
    assert int((labels != T.IGNORE).sum()) == 1 and feats[0]["rejected_labels"][-1] == T.label_token_id(tok, "4")
    model = AutoModelForCausalLM.from_pretrained(tiny_models["student"]).eval()
    keep = T.response_window(labels)
    with torch.no_grad():
        logits = T.window_logits(model, torch.tensor([feats[0]["chosen_input_ids"]]),
                                 torch.ones_like(labels), keep)
    mask = labels[:, labels.shape[1] - keep + 1:] != T.IGNORE
    label_ids = [T.label_token_id(tok, str(j)) for j in range(1, 5)]
    trained = L.log_probs(logits, len(tok))[mask][0][label_ids]
    llm = load_llm(str(tiny_models["student"]), backend="transformers", device="cpu", dtype="float32")
    prefix, suffix = D.label_prompt_parts(rows[0], llm.render_chat)
    assert feats[0]["chosen_input_ids"][:-1] == llm.encode(prefix) + llm.encode(suffix)  # the ids the backend scores
    scored = llm.option_logprobs(OptionRequest(prefix, [suffix], ["1", "2", "3", "4"]))[0]
    assert trained.numpy() == pytest.approx(scored, abs=1e-4)


def test_label_encoding_matches_the_backend_on_the_real_qwen_tokenizer():
    from fsku.home import models_dir

    folder = models_dir() / "qwen2.5-coder-0.5b-instruct"
    if not (folder / "tokenizer.json").is_file():
        pytest.skip("the real offline model is absent (make llm-models)")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    rows = D.build_prompts(_records(1), contexts=["[자료 1] (출처: 전자금융거래법.pdf)\n제22조 보존 기간은 5년이다."],
                           style="fewshot+prefill", mc_target="label")
    pairs, _ = D.make_pairs(rows, {"mc0": {"text": "2"}}, {"mc0": {"text": "3"}})
    feats, _ = T.encode_pairs(tok, pairs, 4096, 4000)

    def render(msgs):
        return tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)

    prefix, suffix = D.label_prompt_parts(rows[0], render)
    enc = tok(prefix, add_special_tokens=False)["input_ids"] + tok(suffix, add_special_tokens=False)["input_ids"]
    whole = tok(render(rows[0]["messages"]) + "정답: ", add_special_tokens=False)["input_ids"]
    assert feats[0]["chosen_input_ids"] == enc + [tok("2", add_special_tokens=False)["input_ids"][0]]
    assert enc == whole  # on Qwen's tokenizer the cut at the options is a token boundary anyway


def test_responses_of_another_prompt_under_the_same_id_are_not_reused(tmp_path):
    path = tmp_path / "resp.jsonl"
    generated = D.build_prompts(_records(2), mc_target="generated")
    D.generate_responses(generated, CountingLLM(), D.ResponseSettings(gen_batch_size=2, temperature=0.0), path)
    # the same ids as label targets: scored again, not the generated text reused
    llm = LabelLLM()
    got = D.generate_responses(D.build_prompts(_records(2), style="prefill", mc_target="label"), llm,
                               D.ResponseSettings(gen_batch_size=2, temperature=0.0), path)
    assert len(llm.scored) == 1 and got["mc0"]["text"] == "3" and llm.calls == 0  # d1's prompt is unchanged
    label_rows = D.build_prompts(_records(2), style="prefill", mc_target="label")
    with pytest.raises(ValueError, match="mc0: the teacher's response '정답: 3' is not an option label 1..4"):
        D.make_pairs(label_rows, {"mc0": {"text": "정답: 3"}, "d1": {"text": "x"}}, {"mc0": {"text": "1"}, "d1": {"text": "y"}})


def test_mc_prompt_is_checked_and_generated_targets_use_the_plain_prompt():
    from fsku.distill.pipeline import mc_style

    with pytest.raises(ValueError, match="mc_prompt must be one of"):
        DistillConfig(mc_prompt="chatty")
    assert mc_style(DistillConfig()) == "fewshot+prefill"
    assert mc_style(DistillConfig(mc_target="generated")) == "plain"


def test_the_topk_cache_names_the_scorer_dtype(tiny_models):
    from transformers import AutoModelForCausalLM

    from fsku.distill.pipeline import scorer_id

    m = AutoModelForCausalLM.from_pretrained(tiny_models["teacher"], dtype=torch.float32)
    a = scorer_id("tiny@1", m)
    assert a == "tiny@1|torch.float32|cpu" and scorer_id("tiny@1", m.to(torch.bfloat16)) != a


def test_long_prompts_are_dropped_not_cut():
    rows = D.build_prompts(_records(4), style="prefill", mc_target="label")
    render = LabelLLM().render_chat
    lengths = {r["prompt_id"]: len(render(r["messages"]) + r.get("prefill", "")) for r in rows}
    kept, dropped = D.drop_long_prompts(rows, len, render, max(lengths.values()))
    assert dropped == 0 and kept == rows
    limit = sorted(lengths.values())[1]  # the two shortest fit
    kept, dropped = D.drop_long_prompts(rows, len, render, limit)
    assert dropped == 2 and sorted(lengths[r["prompt_id"]] for r in kept) == sorted(lengths.values())[:2]


def test_teacher_topk_is_cached_and_read_back(tiny_models, tmp_path):
    from transformers import AutoModelForCausalLM

    from fsku.stores import AnswerCache

    _, feats, _ = _features(tiny_models)
    teacher = AutoModelForCausalLM.from_pretrained(tiny_models["teacher"], dtype=torch.float32).eval()
    vocab = teacher.config.vocab_size
    cache = AnswerCache(str(tmp_path / "cache"))
    first = [dict(f) for f in feats]
    done = []
    counts = T.precompute_topk(teacher, first, 8, vocab, cache=cache, teacher_id="tiny@1", progress=done.append)
    assert counts == {"computed": 2 * len(feats), "cached": 0} and sum(done) == len(feats)
    again = [{k: v for k, v in f.items() if "topk" not in k} for f in feats]
    done = []
    counts = T.precompute_topk(None, again, 8, vocab, cache=cache, teacher_id="tiny@1", progress=done.append)
    assert counts == {"computed": 0, "cached": 2 * len(feats)} and sum(done) == len(feats)
    for a, b in zip(first, again, strict=True):
        for side in T.SIDES:
            assert a[f"{side}_topk_idx"] == b[f"{side}_topk_idx"]
            assert a[f"{side}_topk_logp"] == b[f"{side}_topk_logp"]  # JSON floats round-trip exactly
    # another teacher, another k or other tokens are other keys: computed, never mixed in
    other = [{k: v for k, v in f.items() if "topk" not in k} for f in feats]
    with pytest.raises(ValueError, match="no cached teacher top-k and no teacher"):
        T.precompute_topk(None, other, 8, vocab, cache=cache, teacher_id="tiny@2")
    assert T.precompute_topk(teacher, other, 4, vocab, cache=cache, teacher_id="tiny@1")["computed"] == 2 * len(feats)


def test_reference_labels_replace_the_teachers_choice_for_label_rows_only():
    rows = D.build_prompts(_records(4), style="prefill", mc_target="label")
    teacher = {"mc0": {"text": "3"}, "d1": {"text": "즉시 신고"}, "mc2": {"text": "2"}}
    got = D.with_reference_labels(rows, teacher)
    assert got["mc0"] == {"text": "2", "teacher_text": "3"} and got["mc2"]["text"] == "2"
    assert got["d1"] == {"text": "즉시 신고"} and "d3" not in got and teacher["mc0"]["text"] == "3"
    with pytest.raises(ValueError, match="mc_chosen must be teacher|reference"):
        DistillConfig(mc_chosen="judge")


def test_distill_with_reference_labels_trains_on_the_gold_option(tiny_models, synth_dir, tmp_path):
    from fsku.distill.pipeline import distill

    cfg = DistillConfig(data=str(synth_dir), teacher=str(tiny_models["teacher"]), student=str(tiny_models["student"]),
                        backend="transformers", device="cpu", dtype="float32", out=str(tmp_path / "out"),
                        max_steps=1, batch_size=2, max_new_tokens=8, mc_max_new_tokens=3, max_model_len=768,
                        max_prompt_length=640, lora_r=4, lora_alpha=8, cache_dir="", register_as=None,
                        loss_type="sft", mc_chosen="reference", eval_prompts=0)
    distill(cfg, progress=False)
    pairs = D.read_pairs(tmp_path / "out" / "pairs_r1.jsonl")
    mc = [p for p in pairs if p["kind"] == "multiple_choice"]
    assert mc and all(p["chosen"][0]["content"] == "2" for p in mc)  # every MC record's answer is option 2


def test_a_label_pair_computes_the_teachers_distribution_once(tiny_models):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_models["teacher"])
    rows = D.build_prompts(_records(4), style="prefill", mc_target="label")
    pairs, _ = D.make_pairs(rows, {r["prompt_id"]: {"text": "2" if r["kind"] != "descriptive" else "신고"} for r in rows},
                            {r["prompt_id"]: {"text": "4" if r["kind"] != "descriptive" else "접수"} for r in rows})
    feats, _ = T.encode_pairs(tok, pairs, 1024, 900)
    assert [T.same_answer_position(f) for f in feats] == [p["kind"] == "multiple_choice" for p in pairs]
    teacher = AutoModelForCausalLM.from_pretrained(tiny_models["teacher"], dtype=torch.float32).eval()
    vocab = len(tok)
    counts = T.precompute_topk(teacher, feats, 8, vocab)
    assert counts["computed"] == 2 * 2 + 2 * 1  # descriptive pairs: both sides; label pairs: one
    separate = [dict(f) for f in feats]
    for f in separate:
        for side in T.SIDES:
            f.pop(f"{side}_topk_idx"), f.pop(f"{side}_topk_logp")
    T.precompute_topk(teacher, separate, 8, vocab, sides=("rejected",))  # the rejected side on its own
    for a, b in zip(feats, separate, strict=True):
        assert a["rejected_topk_idx"] == b["rejected_topk_idx"]
        assert torch.allclose(torch.tensor(a["rejected_topk_logp"]), torch.tensor(b["rejected_topk_logp"]), atol=1e-5)


def test_held_out_settings_are_checked():
    for bad in ({"eval_prompts": -1}, {"eval_steps": 0}):
        with pytest.raises(ValueError, match="eval_prompts must be >= 0 and eval_steps >= 1"):
            DistillConfig(**bad)
