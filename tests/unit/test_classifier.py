"""Classifier artifacts without training: manifest hashing, tamper detection, data sampling."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from callstream.core.errors import ConfigError, InvalidInputError
from callstream.router.classifier import (
    MANIFEST_NAME,
    ModelManifest,
    TrainingInfo,
    hash_artifact_files,
    is_valid_artifact,
    load_classifier,
    read_examples,
    read_manifest,
    sample_shots,
    sha256_file,
    verify_artifact,
)


def fake_artifact(root: Path) -> Path:
    model_dir = root / "fake-model"
    (model_dir / "1_Pooling").mkdir(parents=True)
    (model_dir / "model_head.pkl").write_bytes(b"not really a pickle")
    (model_dir / "config.json").write_text('{"hidden_size": 4}')
    (model_dir / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true}')
    manifest = ModelManifest(
        name="fake",
        version="fake-20250101000000-deadbeef",
        created_at="2025-01-01T00:00:00+00:00",
        labels=["a", "b"],
        base_model="test",
        training=TrainingInfo(
            data="x.csv", data_sha256="0" * 64, shots=None, n_train=2, num_iterations=0, epochs=1, seed=1, seconds=0.1
        ),
        files=hash_artifact_files(model_dir),
    )
    manifest.write(model_dir)
    return model_dir


def test_manifest_lists_every_file_with_its_sha256(tmp_path: Path) -> None:
    model_dir = fake_artifact(tmp_path)
    manifest = read_manifest(model_dir)
    assert set(manifest.files) == {"model_head.pkl", "config.json", "1_Pooling/config.json"}
    assert manifest.files["model_head.pkl"] == sha256_file(model_dir / "model_head.pkl")
    raw = json.loads((model_dir / MANIFEST_NAME).read_text())
    assert {"name", "version", "created_at", "labels", "base_model", "training", "metrics", "files"} <= set(raw)
    assert {"data", "data_sha256", "shots", "num_iterations", "epochs", "seed", "seconds"} <= set(raw["training"])
    assert verify_artifact(model_dir).version == "fake-20250101000000-deadbeef"
    assert is_valid_artifact(model_dir)


def test_modified_file_is_named(tmp_path: Path) -> None:
    model_dir = fake_artifact(tmp_path)
    (model_dir / "1_Pooling" / "config.json").write_text('{"pooling_mode_max_tokens": true}')
    with pytest.raises(ConfigError, match=r"file 1_Pooling/config.json does not match manifest.json"):
        verify_artifact(model_dir)
    assert not is_valid_artifact(model_dir)


def test_tampered_head_is_refused_before_loading(tmp_path: Path) -> None:
    model_dir = fake_artifact(tmp_path)
    (model_dir / "model_head.pkl").write_bytes(b"malicious pickle")
    with pytest.raises(ConfigError, match=r"model_head.pkl does not match"):
        load_classifier(model_dir)


def test_missing_and_unlisted_files(tmp_path: Path) -> None:
    model_dir = fake_artifact(tmp_path)
    (model_dir / "config.json").unlink()
    with pytest.raises(ConfigError, match=r"file config.json listed in manifest.json is missing"):
        verify_artifact(model_dir)

    model_dir = fake_artifact(tmp_path / "second")
    (model_dir / "extra.py").write_text("print('hi')")
    with pytest.raises(ConfigError, match=r"file extra.py is not listed in manifest.json"):
        verify_artifact(model_dir)


def test_manifest_entries_cannot_escape_the_directory(tmp_path: Path) -> None:
    model_dir = fake_artifact(tmp_path)
    (tmp_path / "outside.txt").write_text("x")
    raw = json.loads((model_dir / MANIFEST_NAME).read_text())
    raw["files"]["../outside.txt"] = sha256_file(tmp_path / "outside.txt")
    (model_dir / MANIFEST_NAME).write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match=r"invalid file entry '../outside.txt'"):
        verify_artifact(model_dir)


def test_missing_or_invalid_manifest(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        read_manifest(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no manifest.json"):
        load_classifier(tmp_path / "empty")
    (tmp_path / "empty" / MANIFEST_NAME).write_text('{"name": "x"}')
    with pytest.raises(ConfigError, match="invalid manifest"):
        read_manifest(tmp_path / "empty")


def test_training_refuses_to_replace_a_foreign_directory(tmp_path: Path) -> None:
    from callstream.router.classifier import train_classifier

    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not a classifier artifact directory"):
        train_classifier(tmp_path / "data.csv", out, shots=None, num_iterations=0, progress=False)
    assert (out / "notes.txt").read_text() == "keep me"


def write_csv(path: Path, rows: list[tuple[str, str]], header: str = "text,category") -> Path:
    path.write_text(header + "\n" + "".join(f"{t},{c}\n" for t, c in rows))
    return path


def test_sample_shots_is_deterministic_and_per_label(tmp_path: Path) -> None:
    rows = [(f"a text {i}", "a") for i in range(10)] + [(f"b text {i}", "b") for i in range(3)] + [(" ", "b")]
    examples = read_examples(write_csv(tmp_path / "d.csv", rows))
    assert len(examples) == 13  # the blank text is skipped
    first = sample_shots(examples, 4, seed=7)
    assert first == sample_shots(examples, 4, seed=7)
    assert sample_shots(examples, 4, seed=8) != first
    assert [e.label for e in first].count("a") == 4
    assert [e.label for e in first].count("b") == 3  # fewer than shots: all of them
    assert sample_shots(examples, None, seed=7) == examples


def test_read_examples_errors(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="no column"):
        read_examples(write_csv(tmp_path / "d.csv", [("x", "y")], header="sentence,label"))
    with pytest.raises(InvalidInputError, match="cannot read"):
        read_examples(tmp_path / "missing.csv")
    assert read_examples(write_csv(tmp_path / "e.csv", [("x", "y")], header="sentence,label"), "sentence", "label")
