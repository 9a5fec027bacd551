"""Named models: download through a real HTTP server (a local mirror: the `mirror` fixture of
tests/model_mirror.py), hash check, cache, refusal.

torchvision's own files cannot be fetched here (no network), so the downloads come from a
loopback HTTP server standing in for MASKSTREAM_MODEL_MIRROR, as a site behind a proxy would
use it; the code path (urllib, hash prefix, atomic rename) is the one used against
download.pytorch.org.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from maskstream.model import zoo
from maskstream.model.bundled import BUNDLED_CHECKPOINT
from maskstream.model.checkpoint import CheckpointError, identify, read_state_dict

from tests.model_mirror import MirrorHandler
from tests.shared_data import SHARED


def _hashed_copy(source: Path, folder: Path, stem: str) -> Path:
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    target = folder / f"{stem}-{digest[:8]}.pth"
    target.write_bytes(source.read_bytes())
    return target


def test_download_checks_the_hash_caches_and_then_needs_no_server(mirror, tmp_path):
    served, server = mirror
    file = _hashed_copy(BUNDLED_CHECKPOINT, served, "shapes")
    model = zoo.named_model(f"https://download.example.invalid/models/{file.name}")  # the mirror serves it
    path = zoo.fetch(model, progress=False)
    assert path == tmp_path / "cache" / file.name
    assert path.read_bytes() == file.read_bytes()
    server.shutdown()  # a cache hit asks nobody
    assert zoo.fetch(model, progress=False) == path
    assert identify(read_state_dict(path), path).num_classes == 5


def test_a_corrupt_download_is_refused_and_nothing_is_kept(mirror, tmp_path):
    served, _ = mirror
    model = zoo.named_model("maskrcnn_resnet50_fpn_coco")
    (served / model.file_name).write_bytes(b"not the checkpoint torchvision published" * 100)
    with pytest.raises(zoo.DownloadError) as err:
        zoo.fetch(model, progress=False)
    message = str(err.value)
    assert "bf2d0c1e" in message and "refused" in message and str(tmp_path / "cache" / model.file_name) in message
    assert not list((tmp_path / "cache").iterdir())  # no partial or corrupt file left behind


def test_a_cut_download_is_never_used(mirror, tmp_path):
    served, _ = mirror
    file = _hashed_copy(BUNDLED_CHECKPOINT, served, "shapes")
    MirrorHandler.truncate = {file.name}
    with pytest.raises(zoo.DownloadError, match="cannot download"):  # cut short, not a hash mismatch
        zoo.fetch(zoo.named_model(f"https://example.invalid/{file.name}"), progress=False)
    assert not list((tmp_path / "cache").iterdir())


def test_without_network_the_message_says_url_hash_and_where_to_put_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv(zoo.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv(zoo.MIRROR_ENV, "http://127.0.0.1:9/models")  # discard port: connection refused
    model = zoo.named_model("maskrcnn_resnet50_fpn_v2_coco")
    with pytest.raises(zoo.DownloadError) as err:
        zoo.fetch(model, progress=False, timeout_s=5)
    message = str(err.value)
    assert "http://127.0.0.1:9/models/maskrcnn_resnet50_fpn_v2_coco-73cbd019.pth" in message
    assert "https://download.pytorch.org/models/maskrcnn_resnet50_fpn_v2_coco-73cbd019.pth" in message
    assert "73cbd019" in message and str(tmp_path / "cache" / model.file_name) in message


def test_catalogue_names_torchvision_urls_and_the_bundled_model():
    assert zoo.named_model("maskrcnn_resnet50_fpn_coco").url == \
        "https://download.pytorch.org/models/maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth"
    assert zoo.named_model("maskrcnn_resnet50_fpn_v2_coco").sha256_prefix == "73cbd019"
    bundled = zoo.named_model("bundled_lite_shapes")
    assert zoo.fetch(bundled) == BUNDLED_CHECKPOINT
    with pytest.raises(ValueError, match="unknown model.*maskrcnn_resnet50_fpn_coco"):
        zoo.named_model("maskrcnn_r50")
    with pytest.raises(ValueError, match="sha256 prefix"):
        zoo.named_model("https://example.invalid/weights.pth")


@pytest.mark.parametrize("name,variant", [("torchvision_maskrcnn_resnet50_fpn", "v1"),
                                          ("torchvision_maskrcnn_resnet50_fpn_v2", "v2")])
def test_torchvision_checkpoints_explain_themselves(name, variant):
    manifest = SHARED / "reference" / f"{name}.json"
    if not manifest.is_file():
        pytest.skip(f"{manifest} missing (../shared not laid out)")
    state = {p["name"]: torch.empty(p["shape"]) for p in json.loads(manifest.read_text())["params"]}
    config = identify(state, name)
    assert (config.variant, config.num_classes, config.fpn_channels, config.box_representation) == (variant, 91, 256,
                                                                                                     1024)


def test_a_checkpoint_of_another_architecture_is_named_in_one_short_message():
    classifier = {"conv1.weight": torch.empty(64, 3, 7, 7), "fc.weight": torch.empty(1000, 2048)}
    with pytest.raises(CheckpointError) as err:
        identify(classifier, "resnet50.pth")
    message = str(err.value)
    assert "resnet50.pth: 2 tensors, an image classifier" in message and "conv1.weight" in message
    assert message.count("\n") == 0 and len(message) < 600
    state = read_state_dict(BUNDLED_CHECKPOINT)
    faster = {k: v for k, v in state.items() if not k.startswith("roi_heads.mask")}
    with pytest.raises(CheckpointError, match="without a mask head"):
        identify(faster, "faster.pth")
