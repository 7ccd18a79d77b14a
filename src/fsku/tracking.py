"""The one module that talks to MLflow: runs, params, metrics, plots, artifacts and the
Model Registry (the knowledge base as a pyfunc model). Everything else logs with `logging`.

Tracking goes to MLFLOW_TRACKING_URI when set, else to the project's own SQLite store
``<project home>/mlflow.db`` (see `fsku.home`; resolved at each call, never a ``mlflow.db`` in an
arbitrary working directory). Registry URIs (``models:/name@alias``, ``models:/name/<version>``)
become local folders here (`resolve_model_uri`), before any model path reaches `fsku.llm`.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Iterator, Optional, Sequence

import mlflow
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

from . import home
from .config import RetrieveConfig
from .outputs import staged_folder

log = logging.getLogger(__name__)

EXPERIMENT = "fsku"  # overridden by $FSKU_EXPERIMENT or $MLFLOW_EXPERIMENT_NAME (experiment_name)
EXPERIMENT_NOTE = ("fsku: a folder of financial-security documents -> a checked FSKU submission. One run per pipeline "
                   "step (build_kb, synth_qa, distill, quantize, evaluate, tune, promote, package), the chained ones "
                   "nested under their `main` run; each run's name says its step and key settings.")
# the UI's classic training view (runs table, charts) instead of MLflow 3's GenAI traces page
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
NOTE_TAG = "mlflow.note.content"
DEFAULT_EXPERIMENT_ID = "0"


def experiment_name() -> str:
    """The experiment fsku's runs go to: $MLFLOW_EXPERIMENT_NAME, else $FSKU_EXPERIMENT, else 'fsku'."""
    return os.environ.get("MLFLOW_EXPERIMENT_NAME") or os.environ.get("FSKU_EXPERIMENT") or EXPERIMENT


def param_text(value) -> str:
    """One spelling per value in the runs table (so the compare view shows no fake differences):
    None -> 'none', booleans -> 'true'/'false' (the spelling MLproject and the flags use), the rest str()."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


_CONCURRENT_CREATE = ("UNIQUE", "already exists")


def _store() -> str:
    """Point MLflow at the store `fsku.home.tracking_uri` names (MLFLOW_TRACKING_URI, else the project's
    mlflow.db; outside a project without either, HomeNotFound) and return it. Called by every function
    here that opens the store, so the choice follows the environment at call time."""
    uri = home.tracking_uri()
    if mlflow.get_tracking_uri() != uri:
        mlflow.set_tracking_uri(uri)
    return uri


@contextlib.contextmanager
def _sqlite_init_lock(uri: str) -> Iterator[None]:
    """Hold an exclusive lock beside a SQLite tracking database while it is opened: MLflow migrates a
    new database on first use, and two processes migrating it at once (tune workers) leave one of
    them with a broken schema. Other stores (a tracking server, PostgreSQL) initialise once, elsewhere."""
    path = uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else ""
    try:
        import fcntl
    except ImportError:  # not on POSIX: no lock
        fcntl = None
    if not path or fcntl is None or not Path(path).parent.is_dir():
        yield
        return
    with open(path + ".init-lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def set_experiment(name: str, attempts: int = 5) -> None:
    """mlflow.set_experiment, safe when several processes start on a new store at once (tune workers):
    a SQLite database is opened (and migrated) under a file lock, and the loser of a race to create
    the same experiment (a UNIQUE-constraint error) asks again, by when it exists."""
    uri = _store()
    artifacts = home.default_artifact_location(uri)
    for attempt in range(attempts):
        try:
            with _sqlite_init_lock(uri):
                client = mlflow.MlflowClient()
                adopt_default_experiment(client, name, uri)
                if artifacts and client.get_experiment_by_name(name) is None:
                    mlflow.create_experiment(name, artifact_location=artifacts)
                experiment = mlflow.set_experiment(name)
                _describe_experiment(client, experiment)
            return
        except Exception as exc:  # MlflowException or the SQL driver's IntegrityError, depending on the store
            if not any(m in str(exc) for m in _CONCURRENT_CREATE) or attempt == attempts - 1:
                raise
            log.debug("experiment %r was created concurrently (%s); asking again", name, exc)
            time.sleep(0.2 * (attempt + 1))


def adopt_default_experiment(client, name: str, uri: str) -> bool:
    """On a local SQLite store, give experiment 0 ("Default") the project's name when no experiment has
    it yet: `mlflow run` without --experiment-name files its runs under experiment 0, the CLI under
    `name`; with one experiment that is both, every run of the project lands in one place. Other
    stores (a shared tracking server) are left alone. True when it renamed."""
    if not uri.startswith("sqlite:///") or client.get_experiment_by_name(name) is not None:
        return False
    try:
        default = client.get_experiment(DEFAULT_EXPERIMENT_ID)
    except mlflow.exceptions.MlflowException:
        return False
    if default.name != "Default" or default.lifecycle_stage != "active":
        return False
    # only when its artifacts already go where the project keeps them (<store folder>/mlruns: a store that
    # `mlflow run` created in the project); a Default made from another working directory keeps them there
    if not _is_under(default.artifact_location, home.default_artifact_location(uri)):
        return False
    client.rename_experiment(DEFAULT_EXPERIMENT_ID, name)
    log.info("experiment 0 ('Default') of %s is now %r: runs of `mlflow run` and of the CLI share it", uri, name)
    return True


def _is_under(location: Optional[str], root: Optional[str]) -> bool:
    """Whether the local artifact location (a path or file: URI) lies inside `root` (a file: URI)."""
    from urllib.parse import urlparse
    from urllib.request import url2pathname

    def local(text: str) -> Path:
        parsed = urlparse(text)
        return Path(url2pathname(parsed.path) if parsed.scheme == "file" else text).resolve()

    if not location or not root or urlparse(location).scheme not in ("", "file"):
        return False
    return local(location).is_relative_to(local(root))


def _describe_experiment(client, experiment) -> None:
    """A description and the training view on the project's experiment, unless someone set their own."""
    tags = experiment.tags or {}
    if NOTE_TAG not in tags:
        client.set_experiment_tag(experiment.experiment_id, NOTE_TAG, EXPERIMENT_NOTE)
    if EXPERIMENT_KIND[0] not in tags:
        client.set_experiment_tag(experiment.experiment_id, *EXPERIMENT_KIND)


def _settle_entry_experiment(run_id: str) -> None:
    """Under `mlflow run`: the run sits where MLflow put it. Experiment 0 of a SQLite store becomes the
    project's experiment (`adopt_default_experiment`); a run left outside it is named in a warning
    with the flag that puts the next one there."""
    client = mlflow.MlflowClient()
    name, uri = experiment_name(), tracking_uri()
    experiment = client.get_experiment(mlflow.get_run(run_id).info.experiment_id)
    if experiment.name == name:
        _describe_experiment(client, experiment)
        return
    with _sqlite_init_lock(uri):
        if experiment.experiment_id == DEFAULT_EXPERIMENT_ID and adopt_default_experiment(client, name, uri):
            _describe_experiment(client, client.get_experiment(DEFAULT_EXPERIMENT_ID))
            return
    log.warning("this run is in experiment %r, not %r: pass `--experiment-name %s` to `mlflow run` (or set "
                "MLFLOW_EXPERIMENT_NAME) to keep the project's runs in one experiment", experiment.name, name, name)


# the run `mlflow run` started for this process, remembered here and taken out of the environment when a
# block attaches to it: mlflow.start_run(nested=True) resumes MLFLOW_RUN_ID when it is set, so a run nested
# under the entry run (promote's evaluations, tune's trials) would otherwise BE the entry run, renamed; and
# a step that opens several blocks must name it explicitly, or every block after the first is unparented
_ENTRY_POINT_RUN_ID = os.environ.get("MLFLOW_RUN_ID")


def _entry_point_run_id() -> Optional[str]:
    global _ENTRY_POINT_RUN_ID
    _ENTRY_POINT_RUN_ID = os.environ.pop("MLFLOW_RUN_ID", None) or _ENTRY_POINT_RUN_ID
    return _ENTRY_POINT_RUN_ID


@contextlib.contextmanager
def run(step: str, params: dict, tags: Optional[dict] = None, name: Optional[str] = None,
        note: Optional[str] = None) -> Iterator[mlflow.ActiveRun]:
    """Start (or, under `mlflow run`, attach to) a run for one pipeline step, named `name` (default: the
    step; MLflow's random name is replaced) with `note` as its description. Inside another step's run
    (promote's evaluations of candidate and champion) it is a run nested under that one."""
    _store()
    parent = mlflow.active_run()
    entry = None if parent is not None else _entry_point_run_id()
    if entry:
        _settle_entry_experiment(entry)
    elif parent is None:
        set_experiment(experiment_name())
    if parent is not None:
        started = mlflow.start_run(run_name=name or step, nested=True)
    else:
        started = mlflow.start_run(run_id=entry, run_name=None if entry else (name or step))
    with started as active:
        if entry:
            mlflow.MlflowClient().update_run(active.info.run_id, name=name or step)
        mlflow.set_tags({"fsku.step": step, **({NOTE_TAG: note} if note else {}), **(tags or {})})
        # under `mlflow run` the entry point's parameters are already logged; add only the rest
        logged = mlflow.get_run(active.info.run_id).data.params
        mlflow.log_params({k: param_text(v)[:6000] for k, v in params.items() if k not in logged})
        yield active


class ChildRun:
    """Handle of a nested run: `status` (FINISHED, KILLED, FAILED) is applied when the block ends."""

    def __init__(self, active: mlflow.ActiveRun):
        self.run_id = active.info.run_id
        self.status = "FINISHED"


@contextlib.contextmanager
def child_run(name: str, params: dict, tags: Optional[dict] = None) -> Iterator[ChildRun]:
    """A run nested under the active one (an Optuna trial under its study run). An exception
    leaving the block ends it FAILED; otherwise it ends with the handle's status."""
    active = mlflow.start_run(run_name=name, nested=True)
    handle = ChildRun(active)
    try:
        set_tags(tags or {})
        mlflow.log_params({k: param_text(v)[:6000] for k, v in params.items()})
        yield handle
    except BaseException:
        mlflow.end_run("FAILED")
        raise
    mlflow.end_run(handle.status)


def set_tags(tags: dict) -> None:
    mlflow.set_tags({k: str(v) for k, v in tags.items()})


# What the runs table and the chart view group as cost (time, memory, size) rather than quality: names
# ending in a unit or a rate; the Trainer's own throughput counters. Judged on the name's last segment,
# with a trailing _ratio (a comparison of two such values) ignored.
COST_PREFIX = "cost/"
_COST_SUFFIXES = ("_s", "_ms", "_seconds", "_min", "_minutes", "_bytes", "_mb", "_gb", "_gib", "_per_s", "_per_second")
_COST_NAMES = ("seconds", "minutes")
_COST_STARTS = ("seconds_", "s_per_", "latency_", "peak_", "size_", "train_runtime", "total_flos")
_COST_WORDS = ("_latency_", "_tokens_per_s", "_peak_", "_size_mb")


def metric_key(name: str) -> str:
    """The logged name of a metric: time, memory and size measurements go under ``cost/`` (the MLflow UI
    then shows them as their own chart section and the runs table's column filter separates them);
    quality and count metrics keep their names."""
    if name.startswith(COST_PREFIX):
        return name
    last = name.rsplit("/", 1)[-1]
    if last.endswith("_ratio"):
        last = last[:-len("_ratio")]
    padded = f"_{last}_"
    if (last in _COST_NAMES or last.endswith(_COST_SUFFIXES) or last.startswith(_COST_STARTS)
            or any(w in padded for w in _COST_WORDS)):
        return COST_PREFIX + name
    return name


def log_metrics(metrics: dict, step: Optional[int] = None, model_uri: Optional[str] = None, dataset=None) -> None:
    """Numeric values of `metrics` on the active run, cost measurements under ``cost/`` (`metric_key`); with
    `model_uri` (a models:/ URI) also linked to that version's logged model and with `dataset` (what
    log_dataset returned) to the data, so the scores show on the model's page in the UI."""
    clean = {metric_key(k): float(v) for k, v in metrics.items()
             if isinstance(v, (int, float)) and not isinstance(v, bool)}
    model_id = logged_model_id(model_uri) if model_uri else None
    mlflow.log_metrics(clean, step=step, **({"model_id": model_id} if model_id else {}),
                       **({"dataset": dataset} if dataset is not None and model_id else {}))


def logged_model_id(model_uri: str) -> Optional[str]:
    """The logged-model id behind a ``models:/name/<version>`` or ``models:/name@alias`` URI (None for
    anything else, or a version registered without one)."""
    if not str(model_uri).startswith("models:/"):
        return None
    try:
        name, version = parse_model_uri(model_uri)
        mv = mlflow.MlflowClient().get_model_version(name, version)
    except (ValueError, mlflow.exceptions.MlflowException):
        return None
    # a SQLite registry leaves ModelVersion.model_id empty; the version's source is then models:/<model id>
    source = str(mv.source or "")
    return getattr(mv, "model_id", None) or (source[len("models:/"):] if source.startswith("models:/m-") else None)


def log_artifacts(folder: str | Path, artifact_path: Optional[str] = None) -> None:
    mlflow.log_artifacts(str(folder), artifact_path)


def log_artifact(path: str | Path, artifact_path: Optional[str] = None) -> None:
    mlflow.log_artifact(str(path), artifact_path)


def log_table(df: pd.DataFrame, name: str) -> None:
    mlflow.log_table(df, artifact_file=name)


def load_run_table(run_id: str, names: Sequence[str]) -> tuple[str, pd.DataFrame]:
    """(artifact name, table) of the first of `names` that run `run_id` logged with log_table."""
    _store()
    try:
        run = mlflow.get_run(run_id)
    except mlflow.exceptions.MlflowException as e:
        raise ValueError(f"{run_id!r} is neither a per-question file nor a run in {tracking_uri()} ({e.message})") from None
    logged = {a.path for a in mlflow.MlflowClient().list_artifacts(run_id)}
    for sub in {Path(n).parent.as_posix() for n in names if "/" in n}:
        logged |= {a.path for a in mlflow.MlflowClient().list_artifacts(run_id, sub)}
    for name in names:
        if name in logged:
            return name, mlflow.load_table(name, run_ids=[run.info.run_id])
    raise ValueError(f"run {run_id} ({run.data.tags.get('fsku.step', 'no step tag')}) logged none of {list(names)}")


def log_figure(fig, name: str) -> None:
    mlflow.log_figure(fig, name)


def log_dict(data: dict, name: str) -> None:
    mlflow.log_dict(data, name)


def log_dataset(df: pd.DataFrame, name: str, source: str, context: str, targets: Optional[str] = None,
                tags: Optional[dict] = None):
    """Record a dataset as a run input (mlflow.data): name, digest, schema and source lineage; returns
    the dataset (its `.digest` links a consumer's run to the producer's). Nested values (lists, dicts)
    are stored as JSON strings so the schema can be inferred."""
    import json

    import mlflow.data

    flat = df.copy()
    for col in flat.columns:
        if flat[col].map(lambda v: isinstance(v, (list, dict))).any():
            flat[col] = flat[col].map(lambda v: json.dumps(v, ensure_ascii=False))
    dataset = mlflow.data.from_pandas(flat, source=source, name=name, targets=targets)
    for attempt in range(5):
        try:
            mlflow.log_input(dataset, context=context, tags=tags)
            return dataset
        except mlflow.exceptions.MlflowException as exc:
            # two runs logging the same new dataset at once (tune workers, parallel evaluations): the
            # store's get-or-create loses a unique-constraint race; the retry finds the winner's row
            text = str(exc).lower()
            if attempt == 4 or not ("unique" in text or "duplicate key" in text):
                raise
            time.sleep(0.2 * (attempt + 1))


def tracking_uri() -> str:
    return _store()


def run_url(run_id: str) -> str:
    return f"{tracking_uri()} (experiment {mlflow.get_run(run_id).info.experiment_id}, run {run_id})"


# ----------------------------------------------------------------------------- registry
def _text_column(model_input, column: str) -> list[str]:
    """pyfunc input as strings: the named column of a DataFrame, or any sequence of texts."""
    if isinstance(model_input, pd.DataFrame):
        if column not in model_input.columns:
            raise ValueError(f"expected a {column!r} column, got {list(model_input.columns)}")
        return model_input[column].astype(str).tolist()
    return [str(x) for x in model_input]


class KnowledgeBaseModel(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper: predict(DataFrame with a 'question' column) -> ranked hits, one row per hit
    (question_index, rank, chunk_id, source, path, score, method, text)."""

    def load_context(self, context):
        from .kb import KnowledgeBase

        self.kb = KnowledgeBase.load(context.artifacts["kb"])

    # a DataFrame type hint: MLflow keeps the explicit signature below and does not warn about missing hints
    def predict(self, context, model_input: pd.DataFrame, params: Optional[dict] = None) -> pd.DataFrame:
        questions = _text_column(model_input, "question")
        from .config import RetrieveConfig

        params = params or {}
        # unset (or the signature's sentinel '' / -1) means the KB's own, possibly tuned, settings
        overrides = {"top_k": int(params.get("top_k", RetrieveConfig.top_k))}
        if params.get("fusion"):
            overrides["fusion"] = str(params["fusion"])
        if float(params.get("w_bm25", -1.0)) >= 0:
            overrides["w_bm25"] = float(params["w_bm25"])
        hits = self.kb.search(questions, **overrides)
        rows = [{"question_index": qi, **h.to_dict()} for qi, hs in enumerate(hits) for h in hs]
        return pd.DataFrame(rows, columns=["question_index", "rank", "chunk_id", "source", "path", "score", "method", "text"])


KB_SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("string", "question")]),
    outputs=Schema([ColSpec("long", "question_index"), ColSpec("long", "rank"), ColSpec("string", "chunk_id"),
                    ColSpec("string", "source"), ColSpec("string", "path"), ColSpec("double", "score"),
                    ColSpec("string", "method"), ColSpec("string", "text")]),
    params=ParamSchema([ParamSpec("top_k", "long", RetrieveConfig.top_k), ParamSpec("fusion", "string", ""),
                        ParamSpec("w_bm25", "double", -1.0)]),
)


KB_EXAMPLE_QUESTION = "전자금융거래법상 접근매체를 양도하는 것이 금지되는 이유는?"
STUDENT_EXAMPLE_PROMPT = "전자금융거래에서 접근매체란 무엇인가?"


def _describe_version(name: str, version: str, tags: dict, description: str, model_description: str) -> None:
    set_version_tags(name, version, tags)
    client = mlflow.MlflowClient()
    if description:
        client.update_model_version(name, version, description=description)
    if model_description and not (client.get_registered_model(name).description or "").strip():
        client.update_registered_model(name, description=model_description)


def register_knowledge_base(kb_folder: str | Path, name: str, tags: Optional[dict] = None, description: str = "",
                            model_description: str = "") -> str:
    """Log the KB folder as a pyfunc model in the active run and register it, with version `tags` (its
    lineage) and `description` (the registered model gets `model_description` when it has none yet);
    returns the version."""
    info = mlflow.pyfunc.log_model(
        name="kb", python_model=KnowledgeBaseModel(), artifacts={"kb": str(kb_folder)},
        signature=KB_SIGNATURE, registered_model_name=name, pip_requirements=_pip_requirements(),
        # shown on the model page; MLflow also checks it by loading the KB and searching once
        input_example=(pd.DataFrame({"question": [KB_EXAMPLE_QUESTION]}), {"top_k": 3}))
    version = str(info.registered_model_version)
    _describe_version(name, version, tags or {}, description, model_description)
    mlflow.set_tag("fsku.kb_model", f"models:/{name}/{version}")
    return version


class StudentModel(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper of a merged student: predict(DataFrame with a 'prompt' column: the user turn)
    -> DataFrame with 'answer' (greedy chat completion with the model's own template)."""

    def load_context(self, context):
        from .llm import load_llm

        self.llm = load_llm(context.artifacts["model"], backend="transformers")

    # a DataFrame type hint: MLflow keeps the explicit signature below and does not warn about missing hints
    def predict(self, context, model_input: pd.DataFrame, params: Optional[dict] = None) -> pd.DataFrame:
        prompts = _text_column(model_input, "prompt")
        params = params or {}
        rendered = [self.llm.render_chat([{"role": "user", "content": p}]) for p in prompts]
        gens = self.llm.generate(rendered, max_new_tokens=int(params.get("max_new_tokens", 256)))
        return pd.DataFrame({"answer": [g.text for g in gens]})


STUDENT_SIGNATURE = ModelSignature(inputs=Schema([ColSpec("string", "prompt")]),
                                   outputs=Schema([ColSpec("string", "answer")]),
                                   params=ParamSchema([ParamSpec("max_new_tokens", "long", 256)]))


def register_student(model_folder: str | Path, name: str, tags: dict[str, str], description: str = "",
                     model_description: str = "", logged_name: str = "student") -> str:
    """Log the merged student folder as a pyfunc model (`logged_name`: distill's `student`, quantize's
    `student-int8`, ...) in the active run, register it as a new version of `name`, tag that version
    (its lineage: base model, teacher, loss, training data digest, KB version, ...) and describe it."""
    info = mlflow.pyfunc.log_model(
        name=logged_name, python_model=StudentModel(), artifacts={"model": str(model_folder)},
        signature=STUDENT_SIGNATURE, registered_model_name=name, pip_requirements=_pip_requirements(),
        # one generated token: MLflow checks the example by loading the model and predicting once
        input_example=(pd.DataFrame({"prompt": [STUDENT_EXAMPLE_PROMPT]}), {"max_new_tokens": 1}))
    version = str(info.registered_model_version)
    _describe_version(name, version, tags, description, model_description)
    mlflow.set_tag("fsku.student_model", f"models:/{name}/{version}")
    return version


def parse_model_uri(uri: str) -> tuple[str, str]:
    """('name', 'version') of ``models:/name/<version|latest>`` or ``models:/name@alias``, the
    version resolved in the registry (a clear error when the alias or model does not exist)."""
    if not uri.startswith("models:/"):
        raise ValueError(f"{uri!r} is not a models:/ URI")
    body = uri[len("models:/"):].strip("/")
    _store()
    client = mlflow.MlflowClient()
    try:
        if "@" in body:
            name, alias = body.split("@", 1)
            return name, str(client.get_model_version_by_alias(name, alias).version)
        name, _, version = body.partition("/")
        if not name or not version:
            raise ValueError(f"{uri!r}: expected models:/<name>/<version|latest> or models:/<name>@<alias>")
        if version == "latest":
            versions = client.search_model_versions(f"name = '{name}'")
            if not versions:
                raise ValueError(f"{uri}: registered model {name!r} has no versions")
            version = str(max(int(v.version) for v in versions))
        client.get_model_version(name, version)
        return name, version
    except mlflow.exceptions.MlflowException as exc:
        raise ValueError(f"{uri}: not found in the registry at {tracking_uri()} ({exc.message})") from exc


def model_version_tags(name: str, version: str) -> dict[str, str]:
    _store()
    return dict(mlflow.MlflowClient().get_model_version(name, version).tags)


def alias_version(name: str, alias: str) -> Optional[str]:
    """The version that `alias` points to, or None when the alias (or the model) does not exist."""
    _store()
    try:
        return str(mlflow.MlflowClient().get_model_version_by_alias(name, alias).version)
    except mlflow.exceptions.MlflowException:
        return None


def set_alias(name: str, alias: str, version: str) -> None:
    _store()
    mlflow.MlflowClient().set_registered_model_alias(name, alias, version)


def append_version_description(name: str, version: str, line: str) -> None:
    """Add `line` as a paragraph of a model version's description (its model card on the version page)."""
    _store()
    client = mlflow.MlflowClient()
    current = (client.get_model_version(name, version).description or "").rstrip()
    client.update_model_version(name, version, description=f"{current}\n\n{line}" if current else line)


def set_version_tags(name: str, version: str, tags: dict) -> None:
    _store()
    client = mlflow.MlflowClient()
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, str(value))


DOWNLOADED_MARKER = ".fsku-downloaded"  # the origin of a finished registry download: the folder is ours


def download_registered_model(uri: str, dest_root: str | Path | None = None,
                              marker: str = "config.json") -> tuple[Path, str, str]:
    """Download a registered pyfunc model (a student, possibly quantized, or with marker
    'manifest.json' a knowledge base) once into ``dest_root/<name>/<version>`` (default: the
    project's models/registry) and return (the folder inside its artifacts that holds `marker`,
    name, version). The download is staged beside the folder and swapped in whole; an existing folder
    is replaced only when it is an earlier download (it holds .fsku-downloaded), never a folder of
    someone else's that happens to sit there."""
    name, version = parse_model_uri(uri)
    dest = Path(dest_root if dest_root is not None else home.models_dir() / "registry") / name / version
    done = dest / DOWNLOADED_MARKER
    # another tracking store can hold a different model under the same name and version
    origin = f"{tracking_uri()} {mlflow.MlflowClient().get_model_version(name, version).source}"
    if not done.is_file() or done.read_text(encoding="utf-8") != origin:
        with staged_folder(dest, (DOWNLOADED_MARKER,), f"registry download folder of models:/{name}/{version}") as tmp:
            log.info("downloading models:/%s/%s to %s", name, version, dest)
            mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=str(tmp))
            (tmp / DOWNLOADED_MARKER).write_text(origin, encoding="utf-8")
    folders = [p.parent for p in dest.rglob(marker) if "artifacts" in p.parts]
    if len(folders) != 1:
        raise ValueError(f"{uri}: expected one folder with {marker} among the artifacts in {dest}, found "
                         f"{len(folders)}; is it the right kind of model?")
    return folders[0], name, version


def resolve_model_uri(model: Optional[str], marker: str = "config.json") -> Optional[str]:
    """A local path for `model`: a ``models:/`` registry URI is downloaded once (see
    `download_registered_model`; marker 'manifest.json' for a knowledge base) and its folder
    returned; anything else (a folder, hub id, ``offline:<name>``, None) passes through unchanged."""
    if not isinstance(model, str) or not model.startswith("models:/"):
        return model
    return str(download_registered_model(model, marker=marker)[0])


def resolve_model_fields(cfg, *fields: str):
    """A copy of the config dataclass `cfg` with the named fields' registry URIs resolved to local
    folders (`resolve_model_uri`; a field named ``kb`` holds a knowledge base, the others an LLM);
    other values are kept, and `cfg` itself when nothing changes."""
    import dataclasses

    changes = {f: resolve_model_uri(getattr(cfg, f), "manifest.json" if f == "kb" else "config.json") for f in fields
               if str(getattr(cfg, f) or "").startswith("models:/")}
    return dataclasses.replace(cfg, **changes) if changes else cfg


def _pip_requirements() -> list[str]:
    req = Path(__file__).resolve().parents[2] / "requirements.txt"
    if req.exists():
        return [ln.strip() for ln in req.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    return ["fsku"]


# ----------------------------------------------------------------------------- multistep (main)

def git_commit() -> Optional[str]:
    """The project's current commit as MLflow records it for `mlflow run` (None outside git)."""
    import subprocess

    root = home.project_home()
    proc = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=root)
    return proc.stdout.strip() or None if proc.returncode == 0 else None


def _same_param(stored: Optional[str], wanted: str) -> bool:
    import shlex

    # MLflow logs an entry point's parameters shell-quoted ('' for an empty value, 'a b' for spaces)
    if stored == wanted or stored == shlex.quote(wanted):
        return True
    # `path` parameters are stored absolute
    return stored is not None and ("/" in wanted or Path(wanted).exists()) and \
        os.path.abspath(stored) == os.path.abspath(wanted)


def find_finished_run(entry_point: str, params: dict, commit: Optional[str]) -> Optional[str]:
    """A FINISHED run of `entry_point` with these parameters and the same code version (MLflow's
    multistep pattern), newest first; None when there is none."""
    _store()
    client = mlflow.MlflowClient()
    experiment_id = _chain_experiment()
    if experiment_id is None:
        return None
    runs = client.search_runs([experiment_id], f"tags.`mlflow.project.entryPoint` = '{entry_point}'",
                              order_by=["attributes.start_time DESC"], max_results=200)
    for r in runs:
        if r.info.status != "FINISHED":
            continue
        if commit and r.data.tags.get("mlflow.source.git.commit") != commit:
            continue
        if all(_same_param(r.data.params.get(k), str(v)) for k, v in params.items()):
            return r.info.run_id
    return None


def _chain_experiment() -> Optional[str]:
    """The experiment a chain's steps run in: the active (main) run's."""
    active = mlflow.active_run()
    if active is not None:
        return active.info.experiment_id
    experiment = mlflow.MlflowClient().get_experiment_by_name(experiment_name())
    return experiment.experiment_id if experiment else None


def run_entry_point(entry_point: str, params: dict) -> str:
    """`mlflow run <project home> -e ENTRY_POINT -P ...` in this environment, synchronously, in the main
    run's experiment; returns the run id."""
    _store()
    project = home.require_home("running a chain step (mlflow run)")
    submitted = mlflow.projects.run(str(project), entry_point=entry_point, parameters={k: str(v) for k, v in params.items()},
                                    env_manager="local", synchronous=True, experiment_id=_chain_experiment())
    return submitted.run_id


def registered_version_of_run(name: str, run_id: str) -> Optional[str]:
    """The version of registered model `name` created by run `run_id` (None if it registered none)."""
    _store()
    versions = mlflow.MlflowClient().search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    return max((v.version for v in versions), key=int) if versions else None
