"""Named network models for :mod:`mpff.predict`: one message of ``n`` bytes costs
``latency + n / bandwidth`` seconds (the alpha-beta model).

The figures are nominal, from vendors' data sheets and standards, with their sources in
``docs/predict.md``; what MPI reaches on a real cluster is lower (large messages typically reach
80-95 % of the line rate; small-message latency adds the MPI library's software path). Measure
your own link with ``osu_latency`` / ``osu_bw`` and pass ``--latency`` / ``--bandwidth`` when it
matters.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..config import ConfigError


@dataclass(frozen=True)
class Link:
    name: str
    latency: float      # seconds per message (alpha)
    bandwidth: float    # bytes per second (1 / beta); inf: free
    about: str = ""

    def seconds(self, nbytes: int) -> float:
        return self.latency + nbytes / self.bandwidth

    def describe(self) -> str:
        bw = "unlimited" if self.bandwidth == float("inf") else f"{self.bandwidth / 1e9:g} GB/s"
        return f"{self.name} ({_fmt_seconds(self.latency)} + bytes / {bw})"


GB = 1e9

#: name -> Link. Bandwidths are per direction, in bytes per second.
PRESETS: dict[str, Link] = {link.name: link for link in (
    Link("ideal", 0.0, float("inf"), "free messages: the pipeline's own limit"),
    Link("shm", 1e-6, 10 * GB, "MPI shared memory between ranks of one node (typical OSU "
         "osu_latency / osu_bw on a recent x86 node)"),
    Link("eth10", 25e-6, 1.25 * GB, "10 Gigabit Ethernet, MPI over TCP"),
    Link("eth25", 25e-6, 3.125 * GB, "25 Gigabit Ethernet, MPI over TCP"),
    Link("eth100", 25e-6, 12.5 * GB, "100 Gigabit Ethernet, MPI over TCP"),
    Link("ib-hdr", 1e-6, 25 * GB, "InfiniBand HDR, 200 Gb/s (4x), e.g. ConnectX-6"),
    Link("ib-ndr", 1e-6, 50 * GB, "InfiniBand NDR, 400 Gb/s (4x), e.g. ConnectX-7"),
    Link("nvlink4", 2e-6, 450 * GB, "NVLink 4 (H100/H200), 900 GB/s per GPU both directions; "
         "mpff packs buffers in host memory today, so its messages do not use NVLink"),
)}


def preset(name: str) -> Link:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown interconnect {name!r}; choose one of {', '.join(PRESETS)} "
                          "or give --latency and --bandwidth") from None


_UNITS_SECONDS = {"": 1.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}


def parse_seconds(text: str, what: str = "--latency") -> float:
    """'2e-6', '2us', '0.5 ms' -> seconds."""
    m = re.fullmatch(r"\s*([0-9.eE+-]+)\s*(s|ms|us|µs|ns)?\s*", text)
    try:
        value = float(m.group(1)) * _UNITS_SECONDS[m.group(2) or ""] if m else None
    except ValueError:
        value = None
    if value is None or value < 0:
        raise ConfigError(f"{what} {text!r} is not a time: give seconds, e.g. 2e-6 or 2us")
    return value


def parse_bandwidth(text: str, what: str = "--bandwidth") -> float:
    """'12.5e9', '12.5GB/s' (bytes), '100Gb/s' (bits: lower-case b) -> bytes per second."""
    m = re.fullmatch(r"\s*([0-9.eE+-]+)\s*([kKMGT]?)([bB])?(/s)?\s*", text)
    value = None
    if m and (m.group(3) or not (m.group(2) or m.group(4))):
        try:
            value = float(m.group(1))
        except ValueError:
            value = None
        if value is not None:
            value *= {"": 1.0, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}[m.group(2)]
            if m.group(3) == "b":  # bits
                value /= 8
    if value is None or value <= 0:
        raise ConfigError(f"{what} {text!r} is not a bandwidth: give bytes per second, e.g. "
                          "12.5e9, 12.5GB/s or 100Gb/s")
    return value


def _fmt_seconds(x: float) -> str:
    if x == 0:
        return "0 s"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6), ("ns", 1e-9)):
        if x >= scale:
            return f"{x / scale:g} {unit}"
    return f"{x:g} s"
