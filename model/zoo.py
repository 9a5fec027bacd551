"""Named models: `--model NAME` instead of a config file and a checkpoint found by hand.

torchvision's COCO checkpoints are fetched from torchvision's own download URLs on first use
and kept in the user's cache directory (platformdirs; MASKSTREAM_CACHE_DIR overrides it).
Their integrity is checked as torchvision checks them: the file name carries the first hex
digits of the file's SHA-256 (`name-<prefix>.pth`), and a download whose digest does not start
with them is refused. Downloads go to a temporary file beside the target and are renamed into
place only once complete and checked, so a partial or corrupt file is never used.

MASKSTREAM_MODEL_MIRROR=<base URL> fetches `<base URL>/<file name>` instead (a proxy or an
internal mirror); the hash check is the same. Nothing here downloads unless asked (`fetch`).
"""
from __future__ import annotations

import hashlib
import http.client
import os
import re
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from maskstream.configs import CONFIG_DIR
from maskstream.model.bundled import BUNDLED_CHECKPOINT, BUNDLED_CONFIG

__all__ = ["MODELS", "DownloadError", "NamedModel", "cache_dir", "cached_path", "fetch", "named_model"]

MIRROR_ENV = "MASKSTREAM_MODEL_MIRROR"
CACHE_ENV = "MASKSTREAM_CACHE_DIR"
_HASH_IN_NAME = re.compile(r"-([a-f0-9]+)\.")  # torchvision's HASH_REGEX
_CHUNK = 1 << 20


class DownloadError(RuntimeError):
    """A named model's weights could not be had: the message says from where, what was
    expected, and where to put the file by hand."""


@dataclass(frozen=True)
class NamedModel:
    name: str
    config: Path | None  # the model YAML (ModelConfig); None: read from the checkpoint's keys
    url: str | None  # None: shipped inside the package
    checkpoint: Path | None = None  # shipped weights, when url is None
    description: str = ""

    @property
    def file_name(self) -> str:
        assert self.url is not None
        return self.url.rsplit("/", 1)[-1]

    @property
    def sha256_prefix(self) -> str:
        match = _HASH_IN_NAME.search(self.file_name)
        if match is None:
            raise ValueError(f"{self.file_name}: expected a name of the form name-<sha256 prefix>.pth")
        return match.group(1)


def _torchvision(name: str, file_name: str, config: str, description: str) -> NamedModel:
    return NamedModel(name, CONFIG_DIR / config, f"https://download.pytorch.org/models/{file_name}",
                      description=description)


MODELS: dict[str, NamedModel] = {
    "bundled_lite_shapes": NamedModel(
        "bundled_lite_shapes", BUNDLED_CONFIG, None, BUNDLED_CHECKPOINT,
        "lite MobileNetV2-FPN trained on the built-in synthetic shapes (ships inside the package; the default)"),
    "maskrcnn_resnet50_fpn_coco": _torchvision(
        "maskrcnn_resnet50_fpn_coco", "maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth", "model_v1.yaml",
        "torchvision's Mask R-CNN R50-FPN (v1), COCO's 80 classes, 170 MB"),
    "maskrcnn_resnet50_fpn_v2_coco": _torchvision(
        "maskrcnn_resnet50_fpn_v2_coco", "maskrcnn_resnet50_fpn_v2_coco-73cbd019.pth", "model_v2.yaml",
        "torchvision's Mask R-CNN R50-FPN v2, COCO's 80 classes, 177 MB"),
}


def named_model(name: str) -> NamedModel:
    """A catalogue name, or the http(s) URL of a checkpoint named as torchvision names theirs
    (`name-<sha256 prefix>.pth`: the same check applies; its config is read from its keys)."""
    if name.startswith(("http://", "https://")):
        model = NamedModel(name.rsplit("/", 1)[-1].split("-", 1)[0], None, name)
        try:
            model.sha256_prefix  # noqa: B018  (refuse an unverifiable URL before anything else)
        except ValueError as exc:
            raise ValueError(f"--model {name}: {exc}") from None
        return model
    if name not in MODELS:
        raise ValueError(f"--model {name!r}: unknown model; known: {', '.join(MODELS)}, or a checkpoint URL")
    return MODELS[name]


def cache_dir() -> Path:
    override = os.environ.get(CACHE_ENV)
    if override:
        return Path(override)
    import platformdirs  # only where a download may happen

    return Path(platformdirs.user_cache_dir("maskstream")) / "models"


def cached_path(model: NamedModel) -> Path:
    """Where the model's weights are, or will be once fetched."""
    if model.url is None:
        assert model.checkpoint is not None
        return model.checkpoint
    return cache_dir() / model.file_name


def source_url(model: NamedModel) -> str:
    assert model.url is not None
    mirror = os.environ.get(MIRROR_ENV, "").strip()
    return f"{mirror.rstrip('/')}/{model.file_name}" if mirror else model.url


def fetch(model: NamedModel, progress: bool = True, timeout_s: float = 30.0) -> Path:
    """The model's weights on disk: shipped, cached, or downloaded now (and then cached)."""
    path = cached_path(model)
    if model.url is None or path.is_file():
        return path
    url = source_url(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    by_hand = (f"expected SHA-256 starting {model.sha256_prefix}; to install it by hand, download {model.url} "
               f"and put it at {path}, or set {MIRROR_ENV} to a base URL that serves {model.file_name}")
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:  # noqa: S310 (https/http URLs only)
            total = int(response.headers.get("Content-Length") or 0) or None
            with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".part",
                                             delete=False) as part:
                try:
                    digest = _copy(response, part, total, progress, model.file_name)
                except BaseException:
                    Path(part.name).unlink(missing_ok=True)
                    raise
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise DownloadError(f"model {model.name}: cannot download {url} ({reason}); {by_hand}") from None
    if not digest.startswith(model.sha256_prefix):
        Path(part.name).unlink(missing_ok=True)
        raise DownloadError(f"model {model.name}: {url} gave a file whose SHA-256 is {digest[:16]}..., not the one "
                            f"torchvision published ({model.sha256_prefix}...): refused, nothing kept; {by_hand}")
    os.replace(part.name, path)  # atomic: the cache holds a whole, checked file or nothing
    return path


def _copy(response: IO[bytes], out: IO[bytes], total: int | None, progress: bool, name: str) -> str:
    from tqdm import tqdm

    sha, received = hashlib.sha256(), 0
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=f"downloading {name}",
              disable=not progress) as bar:
        while chunk := response.read(_CHUNK):
            out.write(chunk)
            sha.update(chunk)
            bar.update(len(chunk))
            received += len(chunk)
    if total is not None and received != total:
        raise OSError(f"the connection ended after {received} of {total} bytes")
    return sha.hexdigest()
