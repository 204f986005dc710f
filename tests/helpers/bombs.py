"""Decompression bombs and odd images built byte by byte, so a test never has to hold what they
claim: headers of 2^32 pixels, a zlib TIFF whose strips all point at one compressed strip, a TIFF of
many huge pages."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bytes(arr: np.ndarray, width: int | None = None, height: int | None = None) -> bytes:
    """A PNG written by hand (filter 0 on every row): 8- or 16-bit, grey, grey+alpha, RGB or RGBA;
    ``width``/``height`` override what the header claims."""
    arr = np.asarray(arr)
    depth = 16 if arr.dtype == np.uint16 else 8
    channels = 1 if arr.ndim == 2 else arr.shape[2]
    colour = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    h, w = arr.shape[:2]
    rows = arr.astype(">u2" if depth == 16 else "u1").reshape(h, -1).view(np.uint8)
    raw = b"".join(b"\x00" + r.tobytes() for r in rows)
    ihdr = struct.pack(">IIBBBBB", width or w, height or h, depth, colour, 0, 0, 0)
    chunks = _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(raw)) + _chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + chunks


def png_bomb() -> bytes:
    """A PNG whose header claims 65,536 x 65,536 (2^32) pixels."""
    return png_bytes(np.zeros((4, 4), np.uint8), width=1 << 16, height=1 << 16)


def jpeg_bomb() -> bytes:
    """A JPEG whose frame header claims 65,535 x 65,535 pixels (the format's maximum)."""
    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(buf, format="JPEG")
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", 0xFFFF, 0xFFFF)
    return bytes(data)


def _ifd(width: int, height: int, rows_per_strip: int, strips: tuple[int, int, int], next_ifd: int) -> bytes:
    """One IFD of a deflate-compressed 8-bit grey page; ``strips``: (offsets at, counts at, number)."""
    offsets_at, counts_at, n_strips = strips
    def entry(tag, kind, count, value):
        field = struct.pack("<H2x", value) if kind == 3 else struct.pack("<I", value)
        return struct.pack("<HHI", tag, kind, count) + field
    entries = [entry(256, 4, 1, width), entry(257, 4, 1, height), entry(258, 3, 1, 8),
               entry(259, 3, 1, 8), entry(262, 3, 1, 1), entry(273, 4, n_strips, offsets_at),
               entry(277, 3, 1, 1), entry(278, 4, 1, rows_per_strip), entry(279, 4, n_strips, counts_at)]
    return struct.pack("<H", len(entries)) + b"".join(entries) + struct.pack("<I", next_ifd)


def tiff_bomb(width: int = 1 << 16, height: int = 1 << 16, pages: int = 1, rows_per_strip: int = 16) -> bytes:
    """A deflate TIFF of ``pages`` pages of ``width`` x ``height`` 8-bit pixels whose strips all point
    at one compressed strip of zeros: about 1 MB on disk for 2^32 pixels, 4 GiB once inflated."""
    strip = zlib.compress(bytes(width * rows_per_strip), 9)
    n = -(-height // rows_per_strip)
    offsets_at = 8 + len(strip)
    counts_at = offsets_at + 4 * n
    first_ifd = counts_at + 4 * n
    ifd_size = len(_ifd(0, 0, 0, (0, 0, 2), 0))
    body = b"II*\x00" + struct.pack("<I", first_ifd) + strip
    body += struct.pack(f"<{n}I", *([8] * n)) + struct.pack(f"<{n}I", *([len(strip)] * n))
    for p in range(pages):
        nxt = first_ifd + (p + 1) * ifd_size if p + 1 < pages else 0
        body += _ifd(width, height, rows_per_strip, (offsets_at, counts_at, n), nxt)
    return body
