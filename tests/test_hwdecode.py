"""The decoder a run uses (pipeline.media.hwdecode), chosen once at start: auto falls back to the
CPU with the reason logged where NVDEC cannot be used, nvdec is then an error naming the reason,
cpu never looks; and what `--decode` does end to end on a host without a CUDA device."""
from __future__ import annotations

import logging

import pytest
import torch
from maskstream.pipeline.cli.main import main
from maskstream.pipeline.config import load_config
from maskstream.pipeline.media.hwdecode import DecoderUnavailable, choose_decoder, hwaccel, nvdec_problem
from maskstream.pipeline.media.sources import SourceSpec
from maskstream.pipeline.media.video import write_test_clip
from maskstream.pipeline.run_config import CONFIG_DIR, RunConfig

NO_DEVICE = "FFmpeg cannot open a CUDA device (PermissionError: [Errno 1] Operation not permitted)"


def _never() -> str | None:
    raise AssertionError("--decode cpu must not probe for a device")


def test_auto_falls_back_to_the_cpu_with_the_reason_logged(caplog):
    with caplog.at_level(logging.INFO, logger="maskstream.decode"):
        choice = choose_decoder("auto", lambda: NO_DEVICE)
    assert choice.decoder == "cpu" and NO_DEVICE in choice.reason
    assert [r.getMessage() for r in caplog.records] == [
        f"--decode auto: decoding on the CPU, NVDEC is unavailable: {NO_DEVICE}"]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="maskstream.decode"):
        assert choose_decoder("auto", lambda: None).decoder == "nvdec"
    assert not caplog.records  # nothing fell back


def test_nvdec_is_an_error_naming_the_reason_and_cpu_never_probes():
    with pytest.raises(DecoderUnavailable, match=r"^--decode nvdec: NVDEC cannot be used on this host: "
                                                 r"FFmpeg cannot open a CUDA device \(PermissionError"):
        choose_decoder("nvdec", lambda: NO_DEVICE)
    assert choose_decoder("nvdec", lambda: None).decoder == "nvdec"
    assert choose_decoder("cpu", _never).decoder == "cpu"
    with pytest.raises(ValueError, match="decode: expected one of auto, cpu, nvdec, got 'gpu'"):
        choose_decoder("gpu", lambda: None)
    assert hwaccel("cpu") is None and hwaccel("nvdec") is not None
    with pytest.raises(ValueError, match="decoder must be 'cpu' or 'nvdec'"):
        SourceSpec("a.mp4", decoder="cuda")  # type: ignore[arg-type]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback on a host without a CUDA device")
def test_without_a_cuda_device_the_real_probe_says_why(caplog):
    problem = nvdec_problem()
    assert problem is not None and "CUDA" in problem
    with pytest.raises(DecoderUnavailable, match="NVDEC cannot be used on this host: .*CUDA"):
        choose_decoder("nvdec")
    with caplog.at_level(logging.INFO, logger="maskstream.decode"):
        assert choose_decoder("auto").decoder == "cpu"
    assert problem in caplog.records[0].getMessage()
    assert load_config(RunConfig, CONFIG_DIR / "pipeline.yaml").source.decode == "auto"
    with pytest.raises(ValueError, match="source.decode"):
        load_config(RunConfig, None, ["source.decode=gpu"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a host without a CUDA device")
def test_run_with_decode_nvdec_is_refused_with_the_reason(tmp_path, capsys):
    clip = tmp_path / "clip.mp4"
    write_test_clip(clip, frames=2, size=(96, 64))
    code = main(["run", "--source", str(clip), "--model-config", str(CONFIG_DIR / "model_lite.yaml"), "--device",
                 "cpu", "--decode", "nvdec", "--out-dir", str(tmp_path / "run")])
    assert code == 2
    assert "--decode nvdec: NVDEC cannot be used on this host" in capsys.readouterr().err
