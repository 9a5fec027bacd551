"""A loopback HTTP server standing in for MASKSTREAM_MODEL_MIRROR (a pytest plugin, loaded by
conftest.py): test_zoo fetches named models through it, test_cli_ux runs `maskstream run --model`
against it. torchvision's own files cannot be fetched here (no network); the code path (urllib,
hash prefix, atomic rename) is the one used against download.pytorch.org."""
from __future__ import annotations

import functools
import http.server
import threading

import pytest
from maskstream.model import zoo


class MirrorHandler(http.server.SimpleHTTPRequestHandler):
    truncate: set[str] = set()  # file names sent cut in half, under a Content-Length for the whole

    def log_message(self, *args):  # keep pytest's output clean
        pass

    def copyfile(self, source, outputfile):
        if self.path.lstrip("/") in self.truncate:  # promise the whole file, send half of it
            data = source.read()
            outputfile.write(data[: len(data) // 2])
            return
        super().copyfile(source, outputfile)


@pytest.fixture
def mirror(tmp_path, monkeypatch):
    """(served folder, server): a loopback HTTP server over tmp_path/served, set as the model mirror
    (MASKSTREAM_MODEL_MIRROR); the model cache (MASKSTREAM_CACHE_DIR) is tmp_path/cache."""
    served = tmp_path / "served"
    served.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             functools.partial(MirrorHandler, directory=str(served)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv(zoo.MIRROR_ENV, f"http://127.0.0.1:{server.server_address[1]}/")
    monkeypatch.setenv(zoo.CACHE_ENV, str(tmp_path / "cache"))
    MirrorHandler.truncate = set()
    yield served, server
    server.shutdown()
    server.server_close()
