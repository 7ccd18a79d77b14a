"""tune: Optuna studies over retrieval (chunking, BM25 tokenizer, fusion, priors) and distillation
(loss, alpha, beta, learning rate, LoRA rank).

Pure parts, tested on their own: the search space (`Param`, `suggest`, conditional parameters),
which build settings a trial's knowledge base depends on (`kb_key`), the study's baseline trial
(`baseline_params`) and the recipes written from the best trial (`recipes_from_params`).
The objectives (`RetrievalObjective`, `DistillObjective`) do the work of one trial; the step
(`fsku.steps.tune`) adds storage, MLflow child runs and plots.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from .config import (
    BETA_RANGE,
    BuildKBConfig,
    DistillConfig,
    FusionSettings,
    LLMSettings,
    RetrieveConfig,
    block_view,
    recipe_values,
)

log = logging.getLogger(__name__)

FUSION_FIELDS = tuple(f.name for f in dataclasses.fields(FusionSettings))  # what a retrieval trial may re-rank with
STUDIES = ("retrieval", "distill")


@dataclass(frozen=True)
class Param:
    """One dimension of a search space. `when` makes it conditional: (other parameter, value)."""

    name: str
    kind: str  # "float" | "int" | "categorical"
    low: float = 0.0
    high: float = 1.0
    choices: tuple = ()
    log: bool = False
    step: Optional[float] = None
    when: Optional[tuple[str, Any]] = None

    def __post_init__(self):
        if self.kind not in ("float", "int", "categorical"):
            raise ValueError(f"{self.name}: kind must be float, int or categorical, got {self.kind!r}")
        if self.kind == "categorical" and not self.choices:
            raise ValueError(f"{self.name}: a categorical parameter needs choices")
        if self.kind != "categorical" and not self.low <= self.high:
            raise ValueError(f"{self.name}: low {self.low} > high {self.high}")
        if self.log and self.low <= 0:
            raise ValueError(f"{self.name}: a log-scale range must be positive")


def active(param: Param, values: dict) -> bool:
    return param.when is None or values.get(param.when[0]) == param.when[1]


def suggest(trial, space: Sequence[Param]) -> dict:
    """Sample one point of `space` with an Optuna trial; conditional parameters are sampled only when
    their condition holds (so TPE models them separately). Conditions must refer to earlier params."""
    values: dict = {}
    for p in space:
        if not active(p, values):
            continue
        if p.kind == "categorical":
            values[p.name] = trial.suggest_categorical(p.name, list(p.choices))
        elif p.kind == "int":
            values[p.name] = trial.suggest_int(p.name, int(p.low), int(p.high), step=int(p.step or 1), log=p.log)
        else:
            values[p.name] = trial.suggest_float(p.name, p.low, p.high, step=p.step, log=p.log)
    return values


def parse_choices(text: str, kind: type) -> tuple:
    """'320,480,640' -> (320, 480, 640); raises naming the bad entry."""
    out = []
    for part in (x.strip() for x in str(text).split(",")):
        if not part:
            continue
        try:
            out.append(kind(float(part)) if kind is int else kind(part))
        except ValueError:
            raise ValueError(f"{text!r}: {part!r} is not a valid {kind.__name__}") from None
    if not out:
        raise ValueError(f"{text!r}: expected a comma-separated list")
    return tuple(dict.fromkeys(out))


def retrieval_space(chunk_sizes: Sequence[int], chunk_overlaps: Sequence[int], tokenizers: Sequence[str]) -> list[Param]:
    """Chunking and tokenizer choices are categorical (each distinct triple is one KB build, cached);
    fusion, its weights and the statute priors are continuous (a trial only re-ranks)."""
    space = []
    if len(chunk_sizes) > 1:
        space.append(Param("chunk_size", "categorical", choices=tuple(chunk_sizes)))
    if len(chunk_overlaps) > 1:
        space.append(Param("chunk_overlap", "categorical", choices=tuple(chunk_overlaps)))
    if len(tokenizers) > 1:
        space.append(Param("bm25_tokenizer", "categorical", choices=tuple(tokenizers)))
    return space + [
        Param("fusion", "categorical", choices=("minmax", "rrf")),
        Param("w_bm25", "float", 0.0, 1.0, when=("fusion", "minmax")),
        Param("rrf_k", "int", 1, 120, when=("fusion", "rrf")),
        Param("w_law", "float", 0.0, 0.5),
        Param("w_article", "float", 0.0, 0.5),
        Param("statute_family", "categorical", choices=(False, True)),
        Param("family_share", "float", 0.0, 1.0, when=("statute_family", True)),
        Param("w_level", "float", 0.0, 0.5),
        Param("w_link", "float", 0.0, 0.5),
        Param("group", "categorical", choices=("chunk", "article")),
        Param("sibling_bonus", "float", 0.0, 0.5, when=("group", "article")),
        Param("article_chunks", "int", 1, 3, when=("group", "article")),
    ]


def distill_space(loss_types: Sequence[str], lr_low: float, lr_high: float, lora_ranks: Sequence[int]) -> list[Param]:
    space = []
    if len(loss_types) > 1:
        space.append(Param("loss_type", "categorical", choices=tuple(loss_types)))
    alpha_when = ("loss_type", "distillm_v2") if len(loss_types) > 1 else None
    if len(loss_types) > 1 or loss_types[0] == "distillm_v2":
        space += [Param("alpha", "float", 0.01, 0.5, log=True, when=alpha_when),
                  Param("beta", "float", *BETA_RANGE, when=alpha_when)]
    space.append(Param("learning_rate", "float", lr_low, lr_high, log=True))
    if len(lora_ranks) > 1:
        space.append(Param("lora_r", "categorical", choices=tuple(lora_ranks)))
    return space


def baseline_params(space: Sequence[Param], defaults: dict) -> dict:
    """The default configuration as a point of the space (enqueued as trial 0, so 'does tuning beat
    the default?' is answered inside the study). Values outside a categorical's choices are dropped
    (Optuna then samples them)."""
    out: dict = {}
    for p in space:
        if not active(p, {**defaults, **out}) or p.name not in defaults:
            continue
        v = defaults[p.name]
        if p.kind == "categorical" and v not in p.choices:
            continue
        if p.kind != "categorical" and not p.low <= v <= p.high:
            continue
        out[p.name] = v
    return out


KB_KEYS = ("chunk_size", "chunk_overlap", "bm25_tokenizer")


def kb_key(build: dict) -> str:
    """Folder name of the cached KB a trial needs: only the settings that change the index."""
    return "cs{chunk_size}_ov{chunk_overlap}_{bm25_tokenizer}".format(**build)


def recipes_from_params(study: str, params: dict, build: Optional[BuildKBConfig] = None,
                        distill: Optional[DistillConfig] = None) -> dict[str, dict]:
    """{stage: recipe mapping} for the best trial: a retrieval study gives build_kb (the chunking and,
    stored in the KB manifest, the default fusion) and retrieve; a distill study gives distill.
    Every value is validated through the stage config before it is written."""
    if study == "retrieval":
        build = build or BuildKBConfig()
        fields = {f.name for f in dataclasses.fields(BuildKBConfig)}
        kb = dataclasses.replace(build, **{k: v for k, v in params.items() if k in fields})
        retrieve = RetrieveConfig(kb=kb.out, **dataclasses.asdict(block_view(kb, FusionSettings)))
        return {"build_kb": recipe_values(kb, exclude=("register_as", "cache_dir")), "retrieve": recipe_values(retrieve)}
    if study == "distill":
        distill = distill or DistillConfig()
        fields = {f.name for f in dataclasses.fields(DistillConfig)}
        cfg = dataclasses.replace(distill, **distill_trial_values({k: v for k, v in params.items() if k in fields},
                                                                  distill))  # as its trials ran
        return {"distill": recipe_values(cfg, exclude=("restart", "register_as"))}
    raise ValueError(f"unknown study {study!r}; expected one of {STUDIES}")


def distill_trial_values(params: dict, base: DistillConfig) -> dict:
    """The DistillConfig values of a distill-study trial: the sampled ones, lora_alpha tied to 2 x
    lora_r, and gradual_beta off when beta itself is sampled (a fixed beta is what the trial measures).
    Shared by the trials and the recipe written from the best one, so the recipe is what ran."""
    values = dict(params)
    if "lora_r" in values:
        values["lora_alpha"] = 2 * int(values["lora_r"])
    if "beta" in values and base.gradual_beta:
        values["gradual_beta"] = False
    return values


def write_recipes(folder: str | Path, recipes: dict[str, dict], header: str) -> list[Path]:
    import yaml

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for stage, values in recipes.items():
        path = folder / f"{stage}.yaml"
        text = ("".join(f"# {line}\n" for line in header.splitlines())
                + yaml.safe_dump(values, sort_keys=False, allow_unicode=True))
        path.write_text(text, encoding="utf-8")
        paths.append(path)
    return paths


# ----------------------------------------------------------------------------- retrieval objective

class RetrievalObjective:
    """MRR/hit@k of one retrieval configuration on labelled queries.

    KBs are built once per (chunk_size, chunk_overlap, bm25_tokenizer) under `kb_root` and shared by
    every process of the study (built under a private name, then renamed into place; a process that
    loses the race uses the winner's). Embeddings and Kiwi analyses come from the content-hash caches,
    and the loaded KB memoises the query side, so a trial that changes only fusion weights or priors
    re-ranks in milliseconds."""

    def __init__(self, base: BuildKBConfig, labels: str, kb_root: str | Path, metric: str = "mrr_at_10",
                 eval_k: int = 10, candidates: int = 50, progress: bool = False, folds: int = 0, fold_seed: int = 0):
        from .evaluate.retrieval import load_labels
        from .evaluate.stats import split_folds

        self.base, self.metric, self.eval_k, self.candidates = base, metric, eval_k, candidates
        self.kb_root = Path(kb_root)
        self.queries = load_labels(labels)
        self.progress = progress
        self._kbs: dict[str, tuple] = {}
        self.ks = sorted({k for k in (1, 3, 5) if k <= eval_k} | {eval_k})
        valid = {f"{m}_at_{k}" for m in ("hit", "recall") for k in self.ks} | {f"mrr_at_{eval_k}"}
        if metric not in valid:
            raise ValueError(f"metric {metric!r} is not computed with eval_k={eval_k}; expected one of {sorted(valid)}")
        everything = list(range(len(self.queries)))
        self.parts = {"all": everything, "tune": everything, "holdout": []}
        if folds:
            if metric.startswith("recall_"):
                raise ValueError(f"metric {metric} has no per-query paired test for the held-out check; "
                                 "use hit_at_k or mrr_at_k, or folds 0")
            try:
                self.parts["tune"], self.parts["holdout"] = split_folds([q.qid for q in self.queries], folds, fold_seed)
            except ValueError as e:
                raise ValueError(f"{labels}: {e}") from None

    def build_settings(self, params: dict) -> dict:
        return {k: params.get(k, getattr(self.base, k)) for k in KB_KEYS}

    def knowledge_base(self, build: dict):
        """(KnowledgeBase, relevant-chunk counts) for the build settings, built on first use."""
        from .evaluate.retrieval import count_relevant_chunks
        from .kb import KnowledgeBase, build_knowledge_base

        key = kb_key(build)
        if key not in self._kbs:
            folder = self.kb_root / key
            if not (folder / "manifest.json").exists():
                private = self.kb_root / f"{key}.{os.getpid()}"
                cfg = dataclasses.replace(self.base, out=str(private), labels=None, register_as=None, **build)
                log.info("building KB %s", key)
                build_knowledge_base(cfg, progress=self.progress)
                try:
                    private.rename(folder)
                except OSError:  # another worker finished the same KB first
                    shutil.rmtree(private, ignore_errors=True)
            kb = KnowledgeBase.load(folder)
            n_rel = count_relevant_chunks(self.queries, kb.chunks[["source", "text"]].to_dict("records"))
            self._kbs[key] = (kb, n_rel)
        return self._kbs[key]

    def evaluate(self, params: dict, part: str = "tune") -> dict:
        """Metrics of `params` on one part of the labels: "tune" (the tuning folds; every label when
        folds is 0), "holdout" (the held-out fold) or "all"."""
        return self.evaluate_rows(params, part)[0]

    def evaluate_rows(self, params: dict, part: str = "tune") -> tuple[dict, list[dict]]:
        """(metrics, per-query rows {qid, first_relevant_rank}) of `params` on `part`."""
        from .evaluate.retrieval import evaluate_hits, first_relevant_rank

        index = self.parts[part]
        if not index:
            raise ValueError(f"no labelled queries in part {part!r}")
        queries = [self.queries[i] for i in index]
        kb, n_rel = self.knowledge_base(self.build_settings(params))
        fusion = {k: params[k] for k in FUSION_FIELDS if k in params}
        cfg = dataclasses.replace(kb.retrieve_defaults(), top_k=self.eval_k, candidates=max(self.candidates, self.eval_k),
                                  **fusion)
        hits = kb.search([q.question for q in queries], cfg)
        result = evaluate_hits(queries, [[h.to_dict() for h in hs] for hs in hits], [n_rel[i] for i in index], ks=self.ks)
        metrics = dict(result["metrics"])
        metrics["kb_chunks"] = len(kb.chunks)
        rows = [{"qid": q.qid, "first_relevant_rank": first_relevant_rank(rel)}
                for q, rel in zip(queries, result["relevance"], strict=True)]
        return metrics, rows

    def __call__(self, trial, params: dict, report: Callable[[dict], None]) -> float:
        metrics = self.evaluate(params, "tune")
        report(metrics)
        return float(metrics[self.metric])

    def holdout_check(self, best: dict, default: dict) -> dict:
        """Re-score the best and the default configuration on the tuning folds and on the held-out fold:
        {"tune_best", "tune_default", "holdout_best", "holdout_default", "paired" (best vs default on the
        held-out fold: fsku.evaluate.compare.paired), "keep_tuned" (False when the best is worse than
        the default on the held-out fold: a gain that does not carry over is no gain, and a loss inside
        the noise is no reason to leave the defaults either)}."""
        from .evaluate.compare import paired

        tune_best, tune_default = self.evaluate(best, "tune")[self.metric], self.evaluate(default, "tune")[self.metric]
        held_best, best_rows = self.evaluate_rows(best, "holdout")
        held_default, default_rows = self.evaluate_rows(default, "holdout")
        test = paired(best_rows, default_rows, self.metric)
        return {"tune_best": tune_best, "tune_default": tune_default, "holdout_best": held_best[self.metric],
                "holdout_default": held_default[self.metric], "n_tune": len(self.parts["tune"]),
                "n_holdout": len(self.parts["holdout"]), "paired": test, "keep_tuned": test["diff"] >= 0}


# ----------------------------------------------------------------------------- distill objective

class DistillObjective:
    """Held-out KL(teacher ‖ student) of one distillation configuration (lower is better).

    The teacher answers the validation prompts once (cached) and its top-k log-probabilities
    are kept in memory; each trial trains with `fsku.distill.distill` and a callback that measures the
    validation KL every `eval_every` steps, reports it to Optuna and stops a trial the pruner rejects."""

    def __init__(self, base: DistillConfig, work: str | Path, eval_every: int = 5, topk: int = 64,
                 max_validation: int = 64, progress: bool = False):
        self.base, self.work, self.eval_every, self.topk = base, Path(work), eval_every, topk
        self.max_validation, self.progress = max_validation, progress
        self._features: Optional[list[dict]] = None
        self._vocab = 0

    def validation_features(self) -> tuple[list[dict], int]:
        if self._features is not None:
            return self._features, self._vocab
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from .distill.heldout import build_features
        from .distill.pipeline import heldout_prompts, pick_device_dtype
        from .distill.trainer import check_shared_vocab
        from .llm import load_llm
        from .llm.resolve import resolve_model
        from .stores import AnswerCache

        # the same held-out prompts distill measures (validation split, a seeded sample, the training context)
        cfg = dataclasses.replace(self.base, eval_prompts=self.max_validation)
        device, dtype = pick_device_dtype(cfg.device, cfg.dtype)
        teacher_path = resolve_model(cfg.teacher)
        tok = AutoTokenizer.from_pretrained(resolve_model(cfg.student))
        vocab = check_shared_vocab(tok, AutoTokenizer.from_pretrained(teacher_path))
        llm = load_llm(cfg.teacher, **cfg.llm_kwargs(max_model_len=cfg.max_model_len + cfg.max_new_tokens,
                                                      batch_size=LLMSettings.batch_size))  # not the training batch
        self.work.mkdir(parents=True, exist_ok=True)
        held = heldout_prompts(cfg, llm, tok, self.work, AnswerCache(cfg.cache_dir), self.progress)
        if held is None:
            raise ValueError(f"{cfg.data}/validation.jsonl is missing or empty: the distill study measures the held-out "
                             "KL on it")
        prompts, responses = held
        del llm
        teacher = AutoModelForCausalLM.from_pretrained(teacher_path, dtype=dtype).to(device).eval()
        features = build_features(prompts, responses, tok, teacher, vocab_size=vocab, topk=self.topk,
                                  max_length=cfg.max_model_len, max_prompt_length=cfg.max_prompt_length,
                                  batch_size=cfg.batch_size)
        del teacher
        if not features:
            raise ValueError("the teacher gave no usable validation response")
        self._features, self._vocab = features, vocab
        log.info("validation: %d teacher responses, top-%d teacher log-probabilities", len(features), self.topk)
        return features, vocab

    def config_for(self, trial_number: int, params: dict) -> DistillConfig:
        if "beta" in params and self.base.gradual_beta:
            log.warning("the study samples beta: the base recipe's gradual_beta is turned off in its trials")
        values = distill_trial_values(params, self.base)
        # eval_prompts 0: the trial's own callback measures the held-out KL (on the study's shared features)
        return dataclasses.replace(self.base, out=str(self.work / f"trial_{trial_number:04d}"), register_as=None,
                                   restart=True, eval_prompts=0, **values)

    def __call__(self, trial, params: dict, report: Callable[[dict], None]) -> float:
        import optuna
        from transformers import TrainerCallback

        from .distill.heldout import KL_KEY, held_out_metrics
        from .distill.pipeline import distill

        features, vocab = self.validation_features()
        cfg = self.config_for(trial.number, params)
        every = self.eval_every
        measured: dict[int, float] = {}

        class Pruning(TrainerCallback):
            def on_step_end(self, args, state, control, model=None, **kwargs):
                if state.global_step % every and state.global_step != state.max_steps:
                    return
                kl = held_out_metrics(model, features, vocab)[KL_KEY]
                measured[state.global_step] = kl
                report({"validation_kl": kl, "step": state.global_step})
                trial.report(kl, state.global_step)
                if trial.should_prune():
                    raise optuna.TrialPruned(f"validation KL {kl:.4f} at step {state.global_step}")

        try:
            result = distill(cfg, progress=self.progress, callbacks=[Pruning()])
        finally:
            _remove_checkpoints(Path(cfg.out))
        if not measured:
            raise RuntimeError("training ended before the first validation measurement")
        final = measured[max(measured)]
        report({"train_loss": result.stats["rounds"][-1]["train_loss"], "s_per_step": result.stats["rounds"][-1]["s_per_step"]})
        return final


def _remove_checkpoints(out: Path) -> None:
    """Trial outputs keep responses, pairs and stats; checkpoints (optimizer state) go."""
    for ckpt in out.glob("round_*/checkpoints"):
        shutil.rmtree(ckpt, ignore_errors=True)

