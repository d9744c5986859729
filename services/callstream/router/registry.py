"""A model registry: several verified classifier versions side by side and a `current` pointer.

    <registry>/versions/<version>/   one artifact per version (manifest.json, model files, ...)
    <registry>/current               a text file holding the active version's name

`publish` copies a trained artifact in (verified, then moved into place atomically); `activate` rewrites
`current` atomically (write + rename), so a reader sees the old or the new name, never half of one. The router's
`model_dir` may name a registry: it loads `current`'s version and, with `reload_interval_s` > 0, polls the
pointer, loads and verifies a new version in the background and swaps it in between Kafka batches (see
router/service.py).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from callstream.core.errors import ConfigError

CURRENT = "current"
VERSIONS = "versions"


def is_registry(path: Path) -> bool:
    return (path / CURRENT).is_file() or (path / VERSIONS).is_dir()


def current_version(registry: Path) -> str:
    try:
        name = (registry / CURRENT).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"model registry {registry}: cannot read {CURRENT}: {exc}") from exc
    if not name or "/" in name or name.startswith("."):
        raise ConfigError(f"model registry {registry}: {CURRENT} holds an invalid version name {name!r}")
    return name


def resolve_model_dir(path: Path) -> Path:
    """An artifact directory as is; a registry's current version directory."""
    if (path / "manifest.json").is_file() or not is_registry(path):
        return path
    version_dir = path / VERSIONS / current_version(path)
    if not version_dir.is_dir():
        raise ConfigError(f"model registry {path}: current version {version_dir.name!r} is not in {VERSIONS}/")
    return version_dir


def list_versions(registry: Path) -> list[str]:
    root = registry / VERSIONS
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")) if root.is_dir() else []


def activate(registry: Path, version: str) -> Path:
    """Point `current` at `version` (which must be in the registry and verify); returns its directory."""
    from callstream.router.classifier import verify_artifact

    version_dir = registry / VERSIONS / version
    if not version_dir.is_dir():
        have = ", ".join(list_versions(registry)) or "none"
        raise ConfigError(f"model registry {registry}: no version {version!r} (have: {have})")
    verify_artifact(version_dir)
    fd, tmp = tempfile.mkstemp(prefix=f".{CURRENT}.", dir=registry)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(version + "\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, registry / CURRENT)
    return version_dir


def publish(model_dir: Path, registry: Path, *, make_current: bool = True) -> str:
    """Copy a verified artifact into the registry under its manifest's version; optionally make it current."""
    from callstream.router.classifier import verify_artifact

    manifest = verify_artifact(model_dir)
    target = registry / VERSIONS / manifest.version
    if not target.exists():
        (registry / VERSIONS).mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{manifest.version}.", dir=registry / VERSIONS))
        try:
            shutil.copytree(model_dir, staging, dirs_exist_ok=True)
            staging.chmod(0o755)
            verify_artifact(staging)
            staging.rename(target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    if make_current:
        activate(registry, manifest.version)
    return manifest.version
