"""Binary Netpbm images (PGM ``P5`` grey, PPM ``P6`` RGB): raw 8-bit pixels behind a text header.

Shards of small images (``build_shards --image-format pnm``) store them this way: a 28x28 grey
image is 799 bytes as PGM against ~600 as PNG, but reading it is a header parse and a copy
(~3 us) instead of a PNG decode (~30 us with libpng, ~100 us through PIL), which matters when
the CPU loader prepares thousands of images per second on a few cores. DALI decodes the same
files. Format: http://netpbm.sourceforge.net/doc/pgm.html and ppm.html -- magic, whitespace,
width, whitespace, height, whitespace, maxval, one whitespace byte, then the raster, row by row,
channels interleaved; ``#`` starts a comment that runs to the end of the line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

PNM_EXTS = ("pgm", "ppm", "pnm")
_SEP = rb"(?:\s|#[^\r\n]*[\r\n])+"
_HEADER = re.compile(rb"P([56])" + _SEP + rb"(\d+)" + _SEP + rb"(\d+)" + _SEP + rb"(\d+)\s")


@dataclass(frozen=True)
class PnmHeader:
    """A binary PGM/PPM header.

    Attributes:
        height: rows.
        width: columns.
        channels: 1 (``P5``) or 3 (``P6``).
        maxval: largest sample value (8-bit rasters have maxval <= 255).
        offset: byte offset of the raster.
    """

    height: int
    width: int
    channels: int
    maxval: int
    offset: int

    @property
    def raster_bytes(self) -> int:
        """Bytes of a complete raster (2 bytes per sample when maxval > 255)."""
        return self.height * self.width * self.channels * (1 if self.maxval < 256 else 2)


def parse_header(data: bytes) -> PnmHeader | None:
    """The header of a binary PGM/PPM file, or ``None`` when ``data`` does not start with one."""
    m = _HEADER.match(data, 0, 512)
    if m is None:
        return None
    kind, width, height, maxval = m.groups()
    return PnmHeader(int(height), int(width), 1 if kind == b"5" else 3, int(maxval), m.end())


_last: list[tuple[bytes, PnmHeader]] = []  # the most recent header: shards of same-size images repeat it


def decode_pnm(data: bytes) -> torch.Tensor | None:
    """Pixels of an 8-bit (maxval 255) binary PGM/PPM file as uint8 [C, H, W].

    Args:
        data: the file bytes.

    Returns:
        The pixels; ``None`` when the file is not an 8-bit binary PGM/PPM (other maxvals, ASCII
        variants): decode those with a general decoder.

    Raises:
        ValueError: a zero-size image, or a raster shorter than the header says (truncated file).
    """
    if _last and data.startswith(_last[0][0]):
        header = _last[0][1]
    else:
        header = parse_header(data)
        if header is None or header.maxval != 255:
            return None
        _last[:] = [(data[: header.offset], header)]
    if header.height == 0 or header.width == 0:
        raise ValueError(f"PNM image has zero size {header.width}x{header.height}")
    end = header.offset + header.raster_bytes
    if len(data) < end:
        raise ValueError(
            f"PNM raster is truncated ({len(data) - header.offset} of {header.raster_bytes} bytes)"
        )
    pixels = torch.frombuffer(bytearray(data[header.offset : end]), dtype=torch.uint8)
    if header.channels == 1:
        return pixels.view(1, header.height, header.width)
    return pixels.view(header.height, header.width, 3).permute(2, 0, 1)
