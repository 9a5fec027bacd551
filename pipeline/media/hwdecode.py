"""Which decoder a run uses, chosen once at start: `--decode auto|cpu|nvdec` (source.decode).

nvdec: FFmpeg's CUDA hardware acceleration through PyAV (`av.codec.hwaccel.HWAccel`, PyAV >= 14):
the stream's own decoder (h264, hevc, av1, ...) with a CUDA device attached runs on the GPU's
NVDEC engines, the same hardware as FFmpeg's separate h264_cuvid / hevc_cuvid decoders, which
PyAV's container API cannot select. Frames are downloaded as NV12 and leave decode as their
4:2:0 planes (pipeline.media.pixels), never converted to RGB on the CPU. A stream whose codec
NVDEC cannot decode (MJPEG from a webcam, an unsupported profile) is decoded on the CPU.

auto: NVDEC when FFmpeg can open a CUDA device here, else the CPU, with the reason; nvdec: the
same check, and a `DecoderUnavailable` naming the reason where it fails; cpu: no check at all.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import av
from av.codec.hwaccel import HWAccel, hwdevices_available

__all__ = ["DECODE_MODES", "DecodeMode", "Decoder", "DecoderChoice", "DecoderUnavailable", "choose_decoder",
           "hwaccel", "nvdec_problem"]

log = logging.getLogger("maskstream.decode")

DecodeMode = Literal["auto", "cpu", "nvdec"]
Decoder = Literal["cpu", "nvdec"]
DECODE_MODES: tuple[DecodeMode, ...] = ("auto", "cpu", "nvdec")


class DecoderUnavailable(ValueError):
    """--decode nvdec on a host where FFmpeg cannot decode on a CUDA device."""


@dataclass(frozen=True)
class DecoderChoice:
    decoder: Decoder
    reason: str  # why this decoder: for a fallback, what NVDEC lacked


def nvdec_problem() -> str | None:
    """Why FFmpeg cannot decode on a CUDA device here, or None when it can: the device type is
    built in and a CUDA device context opens (what a decoder with hwaccel opens per stream)."""
    if "cuda" not in hwdevices_available():
        return f"PyAV {av.__version__}'s FFmpeg has no cuda device type (it has: {', '.join(hwdevices_available())})"
    try:
        HWAccel("cuda", allow_software_fallback=False).create(av.Codec("h264", "r"))
    except Exception as exc:  # FFmpeg reports a missing driver or device as assorted OSErrors
        return f"FFmpeg cannot open a CUDA device ({type(exc).__name__}: {exc}; no NVIDIA driver or GPU visible?)"
    return None


def choose_decoder(mode: str, problem: Callable[[], str | None] = nvdec_problem) -> DecoderChoice:
    """The run's decoder for `mode`; a fallback is logged with its reason (DecoderUnavailable for
    mode "nvdec" where NVDEC cannot be used, ValueError for an unknown mode)."""
    if mode not in DECODE_MODES:
        raise ValueError(f"decode: expected one of {', '.join(DECODE_MODES)}, got {mode!r}")
    if mode == "cpu":
        return DecoderChoice("cpu", "asked for (--decode cpu)")
    found = problem()
    if found is None:
        return DecoderChoice("nvdec", f"NVDEC available (--decode {mode})")
    if mode == "nvdec":
        raise DecoderUnavailable(f"--decode nvdec: NVDEC cannot be used on this host: {found}")
    choice = DecoderChoice("cpu", f"--decode auto: decoding on the CPU, NVDEC is unavailable: {found}")
    log.info("%s", choice.reason)
    return choice


def hwaccel(decoder: Decoder) -> HWAccel | None:
    """What av.open takes for `decoder`: a CUDA HWAccel that falls back to software decoding for a
    stream NVDEC cannot decode; None on the CPU."""
    return HWAccel("cuda", allow_software_fallback=True) if decoder == "nvdec" else None
