"""Reading encoded image files and a cheap sniff that rejects bytes no decoder can use.

Backends that hand raw bytes to a batched decoder (DALI, nvJPEG) check each file here first: one zero-byte,
truncated or non-image file in a batch otherwise fails the whole batch inside the decoder. The sniff is a
few byte comparisons (magic number, and for JPEG the end-of-image marker), so it costs nothing next to the
decode; files that pass it but still fail to decode are caught by the backend's own fallback.
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

# PIL modes whose values exceed 8 bits: convert("RGB") would clip them to white, so they are rescaled first.
_HIGH_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")

# (magic prefix, format) of what DALI / nvImageCodec decode (JPEG, PNG, BMP, TIFF, WebP, PNM, JPEG 2000).
_MAGIC = (
    (b"\xff\xd8\xff", "jpeg"),
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"BM", "bmp"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "jp2"),
    (b"\xffO\xffQ", "j2k"),
)
# JPEG entropy-coded data never holds FF D9 (FF is byte-stuffed), so a file whose tail lacks the EOI marker
# was cut short. Some writers pad after EOI: look a little way back.
_JPEG_TAIL = 4096


def image_format(buf) -> Optional[str]:
    """The format the bytes claim to be, or None when no known image signature matches."""
    head = bytes(buf[:16])
    for magic, fmt in _MAGIC:
        if head.startswith(magic):
            return fmt
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if len(head) >= 2 and head[0:1] == b"P" and head[1:2] in b"123456":
        return "pnm"
    return None


def sniff_image(buf) -> Optional[str]:
    """None when ``buf`` looks decodable, else a short reason ("empty file", "not an image", "truncated JPEG")."""
    if len(buf) == 0:
        return "empty file"
    fmt = image_format(buf)
    if fmt is None:
        return "not an image (unknown signature)"
    if fmt == "jpeg" and b"\xff\xd9" not in bytes(buf[-_JPEG_TAIL:]):
        return "truncated JPEG (no end-of-image marker)"
    if fmt == "png" and b"IEND" not in bytes(buf[-64:]):
        return "truncated PNG (no IEND chunk)"
    return None


def read_encoded(path: str) -> Tuple[Optional[np.ndarray], Optional[str]]:
    """(uint8 bytes, None) for a file that looks decodable, else (None, reason)."""
    try:
        buf = np.fromfile(path, dtype=np.uint8)
    except OSError as e:
        return None, f"unreadable ({e.strerror or e})"
    reason = sniff_image(buf)
    return (None, reason) if reason else (buf, None)


def pil_rgb(source):
    """Fully decoded, upright 8-bit RGB PIL image from a path or a binary file object; raises on anything
    undecodable. PIL reports corrupt data as exceptions (libpng through torchvision.io can crash the process
    on a bad PNG checksum), and reads every format ``list_images`` lists (BMP, TIFF, PNM, ...)."""
    from PIL import Image, ImageOps

    with Image.open(source) as im:
        im.load()  # the full decode: truncated / corrupt data raises here
        return rgb8(ImageOps.exif_transpose(im))


def rgb8(im):
    """Any PIL mode -> 8-bit RGB PIL image. PIL's own convert("RGB") clips high-bit-depth values to 255 (a white
    image), so those modes are rescaled first."""
    from PIL import Image

    if im.mode in _HIGH_BIT_MODES:
        a = np.asarray(im, dtype=np.float64)
        if im.mode.startswith("I;16"):  # full-range 16-bit: a dark image is dark, whatever its maximum
            a = a / 257.0
        else:  # 32-bit int / float modes say nothing of their range ('I' holds 8-bit data from some encoders)
            a = a * 255.0 if im.mode == "F" and a.max(initial=0.0) <= 1.0 else a
            a = a / 257.0 if a.max(initial=0.0) > 255 else a
        im = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8))
    return im.convert("RGB")
