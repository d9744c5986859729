"""The classifier's sentence-transformer body on ONNX Runtime: export (torch.onnx), int8 quantization, inference.

Why torch.onnx + onnxruntime directly and not `sentence-transformers[onnx]`: that extra pulls optimum-onnx, which
downgrades transformers (see the shared MODELS.md). The exported graph is the transformer only (input_ids,
attention_mask, token_type_ids -> last_hidden_state); mean pooling and L2 normalisation (the body's Pooling and
Normalize modules) run in numpy, and tokenization uses the artifact's own tokenizer.json through the Rust
`tokenizers` library, batch-encoded outside the inference call.

Files added to the artifact (and hashed in manifest.json): onnx/model.onnx (fp32) and onnx/model-int8.onnx
(onnxruntime.quantization.quantize_dynamic, int8 weights).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from callstream.core.errors import ConfigError

ONNX_DIR = "onnx"
ONNX_FP32 = f"{ONNX_DIR}/model.onnx"
ONNX_INT8 = f"{ONNX_DIR}/model-int8.onnx"
BACKENDS = ("torch", "onnx", "onnx-int8")
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")


def onnx_file(backend: str) -> str:
    if backend == "onnx":
        return ONNX_FP32
    if backend == "onnx-int8":
        return ONNX_INT8
    raise ValueError(f"backend {backend!r} has no ONNX file")


def _body_settings(model_dir: Path) -> tuple[int, bool, bool]:
    """(max_seq_length, mean pooling, normalize) from the sentence-transformers config files in the artifact."""
    max_len = 256
    config = model_dir / "sentence_bert_config.json"
    if config.is_file():
        max_len = int(json.loads(config.read_text()).get("max_seq_length") or max_len)
    modules = json.loads((model_dir / "modules.json").read_text()) if (model_dir / "modules.json").is_file() else []
    types = [str(m.get("type", "")) for m in modules]
    pooling = model_dir / "1_Pooling" / "config.json"
    if pooling.is_file():
        cfg = json.loads(pooling.read_text())
        mode = cfg.get("pooling_mode") or ("mean" if cfg.get("pooling_mode_mean_tokens", True) else "other")
        if mode != "mean":
            raise ConfigError(f"{model_dir}: ONNX backend supports mean pooling only (found {mode!r})")
    return max_len, True, any(t.endswith("Normalize") for t in types)


class OnnxEncoder:
    """Sentence embeddings from an exported body: tokenize (Rust, batched) -> ONNX Runtime -> mean pool -> L2."""

    def __init__(self, model_dir: Path, backend: str = "onnx", threads: int | None = None) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        path = model_dir / onnx_file(backend)
        if not path.is_file():
            raise ConfigError(
                f"{model_dir}: no {onnx_file(backend)} for backend {backend!r}: run "
                f"`callstream classifier export-onnx --model {model_dir}`"
            )
        self.max_len, _, self.normalize = _body_settings(model_dir)
        self.tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self.tokenizer.enable_truncation(max_length=self.max_len)
        self.tokenizer.enable_padding(pad_id=self.tokenizer.token_to_id("[PAD]") or 0, pad_token="[PAD]")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or int(os.environ.get("CALLSTREAM_ONNX_THREADS", "0")) or 0
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]

    def tokenize(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        encodings = self.tokenizer.encode_batch(list(texts))
        ids = np.asarray([e.ids for e in encodings], dtype=np.int64)
        return {
            "input_ids": ids,
            "attention_mask": np.asarray([e.attention_mask for e in encodings], dtype=np.int64),
            "token_type_ids": np.asarray([e.type_ids for e in encodings], dtype=np.int64),
        }

    def embed_tokens(self, features: dict[str, np.ndarray]) -> np.ndarray:
        hidden = self.session.run(None, {k: features[k] for k in self.input_names})[0]
        mask = features["attention_mask"][..., None].astype(np.float32)
        emb = (hidden * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1e-9)
        if self.normalize:
            emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
        return emb.astype(np.float32)

    def __call__(self, texts: Sequence[str], batch_size: int) -> np.ndarray:
        # Sorting by length keeps padding small inside each batch; the order is restored at the end.
        order = np.argsort([len(t) for t in texts], kind="stable")
        out = np.zeros((len(texts), 0), dtype=np.float32)
        parts: list[np.ndarray] = []
        for start in range(0, len(texts), batch_size):
            chunk = [texts[i] for i in order[start : start + batch_size]]
            parts.append(self.embed_tokens(self.tokenize(chunk)))
        if not parts:
            return out
        stacked = np.concatenate(parts)
        result = np.empty_like(stacked)
        result[order] = stacked
        return result


def export_onnx(model_dir: Path, *, quantize: bool = True, opset: int = 17) -> list[str]:
    """Export the artifact's body to onnx/model.onnx (and onnx/model-int8.onnx); returns the relative paths written.

    The caller re-hashes the artifact (classifier.add_onnx_to_artifact does both).
    """
    import torch
    from transformers import AutoModel, AutoTokenizer

    try:
        import onnx  # noqa: F401 - torch.onnx needs it
    except ImportError as exc:
        raise ConfigError("ONNX export needs the `onnx` package (pip install onnx)") from exc

    class _Body(torch.nn.Module):
        def __init__(self, model: Any) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
            return self.model(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).last_hidden_state

    model = AutoModel.from_pretrained(str(model_dir), local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    sample = tokenizer(["a short text", "a somewhat longer text for the export"], padding=True, return_tensors="pt")
    if "token_type_ids" not in sample:
        raise ConfigError(f"{model_dir}: the body's tokenizer gives no token_type_ids; ONNX export unsupported")
    written = [ONNX_FP32]
    with tempfile.TemporaryDirectory(prefix="callstream-onnx-") as scratch:
        fp32 = Path(scratch) / "model.onnx"
        axes = {name: {0: "batch", 1: "sequence"} for name in (*INPUT_NAMES, "last_hidden_state")}
        with torch.no_grad():
            torch.onnx.export(
                _Body(model),
                tuple(sample[k] for k in INPUT_NAMES),
                str(fp32),
                input_names=list(INPUT_NAMES),
                output_names=["last_hidden_state"],
                dynamic_axes=axes,
                opset_version=opset,
                dynamo=False,
            )
        (model_dir / ONNX_DIR).mkdir(exist_ok=True)
        if quantize:
            from onnxruntime.quantization import QuantType, quantize_dynamic

            int8 = Path(scratch) / "model-int8.onnx"
            quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8, per_channel=True)
            shutil.move(str(int8), model_dir / ONNX_INT8)
            written.append(ONNX_INT8)
        shutil.move(str(fp32), model_dir / ONNX_FP32)
    return written
