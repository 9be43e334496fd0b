"""Reading encoded image files and a cheap sniff that rejects bytes no decoder can use.

Backends that hand raw bytes to a batched decoder (DALI, nvJPEG) check each file here first: one zero-byte,
truncated or non-image file in a batch otherwise fails the whole batch inside the decoder. The sniff is a
few byte comparisons (magic number, and for JPEG the end-of-image marker), so it costs nothing next to the
decode; files that pass it but still fail to decode are caught by the backend's own fallback.
"""
from __future__ import annotations

import contextlib
import os
import stat
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
    """None when ``buf`` looks decodable, else a short reason ("empty file", "not an image", "truncated JPEG",
    "too large")."""
    if len(buf) == 0:
        return "empty file"
    fmt = image_format(buf)
    if fmt is None:
        return "not an image (unknown signature)"
    # searched from the end, where the marker is (a forward search through the tail cost 4.6 us a JPEG); only a
    # file without one there is searched further: data after the image (a phone's motion photo appends a video)
    if fmt == "jpeg" and _tail(buf, _JPEG_TAIL).rfind(b"\xff\xd9") < 0 and not _jpeg_ends(buf):
        return "truncated JPEG (no end-of-image marker)"
    if fmt == "png" and _tail(buf, 64).rfind(b"IEND") < 0 and bytes(buf).rfind(b"IEND") < 0:
        return "truncated PNG (no IEND chunk)"
    return too_large(buf, fmt)


def _jpeg_ends(buf) -> bool:
    """Whether the JPEG's end-of-image marker follows its first scan anywhere (entropy-coded data never holds
    FF D9; an EXIF thumbnail's own marker, before the scan, does not count)."""
    data = bytes(buf)
    i = _jpeg_marker(data, _JPEG_SOS)
    return i >= 0 and data.find(b"\xff\xd9", i) >= 0


def jpeg_segments(data: bytes):
    """(offset, marker) of each top-level segment of the JPEG ``data``, up to and including the start of scan or
    end of image, walking the segment lengths (so markers inside EXIF / XMP segments are not seen). Fill bytes
    and extraneous bytes between segments are skipped, as libjpeg and PIL skip them."""
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            i = data.find(b"\xff", i)
            if i < 0:
                return
            continue
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte before a marker
            i += 1
            continue
        yield i, marker
        if marker == 0xD9 or marker == 0xDA:
            return
        i += 2 if 0xD0 <= marker <= 0xD7 or marker == 0x01 else 2 + (data[i + 2] << 8 | data[i + 3])


def _jpeg_marker(data: bytes, wanted: frozenset) -> int:
    """Offset of the first top-level marker of the JPEG ``data`` in ``wanted``; -1 when the walk reaches the
    scan or the end first."""
    return next((i for i, marker in jpeg_segments(data) if marker in wanted), -1)


# start-of-frame markers (baseline, progressive, lossless, arithmetic...): C0-CF less DHT, JPG and DAC
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_JPEG_SOS = frozenset({0xDA})


def image_size(buf, fmt: Optional[str] = None) -> Optional[Tuple[int, int]]:
    """(width, height) the image's header declares, without decoding it; None when it cannot be read. JPEG and
    PNG headers are parsed here (a few microseconds); other formats through PIL's lazy open."""
    fmt = fmt or image_format(buf)
    head = bytes(buf[:24]) if fmt == "png" else None
    if fmt == "png":
        return (int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")) if len(head) == 24 else None
    if fmt == "jpeg":
        data = bytes(buf)
        i = _jpeg_marker(data, _JPEG_SOF)
        if 0 <= i and i + 9 <= len(data):
            return data[i + 7] << 8 | data[i + 8], data[i + 5] << 8 | data[i + 6]
        # a layout the walk does not follow: PIL's reading of it, as the decoders may still decode it
    elif fmt == "webp":
        size = _webp_size(bytes(buf[:30]))
        if size:
            return size
    elif fmt == "tiff":
        size = _tiff_size(bytes(buf[:65536]))
        if size:
            return size
    elif fmt == "pnm":
        size = _pnm_size(bytes(buf[:1024]))
        if size:
            return size
    elif fmt == "bmp":
        head = bytes(buf[:26])
        if len(head) == 26 and int.from_bytes(head[14:18], "little") >= 40:  # BITMAPINFOHEADER or later
            return (abs(int.from_bytes(head[18:22], "little", signed=True)),
                    abs(int.from_bytes(head[22:26], "little", signed=True)))
    import io

    from PIL import Image

    try:  # no warnings.catch_warnings here: not thread-safe (the readers are threads), it could drop every warning
        with Image.open(io.BytesIO(bytes(buf))) as im:
            return im.size
    except Image.DecompressionBombError as e:  # PIL refuses to open past its own limit: read the size it names
        n = _bomb_pixels(e)
        return (n, 1) if n else None
    except Exception:  # noqa: BLE001 - unreadable headers are the decoder's to report
        return None


_PIL_IMAGE = None  # PIL.Image, imported on first use (a function-level import costs more per file than the check)


def _tiff_size(data: bytes) -> Optional[Tuple[int, int]]:
    """ImageWidth (256) and ImageLength (257) of a TIFF's first IFD, None where they are not both in ``data``."""
    if len(data) < 8:
        return None
    order = "little" if data[:2] == b"II" else "big"
    ifd = int.from_bytes(data[4:8], order)
    if ifd + 2 > len(data):
        return None
    found = {}
    for k in range(int.from_bytes(data[ifd:ifd + 2], order)):
        entry = ifd + 2 + 12 * k
        if entry + 12 > len(data):
            return None
        tag, kind = int.from_bytes(data[entry:entry + 2], order), int.from_bytes(data[entry + 2:entry + 4], order)
        if tag in (256, 257) and kind in (3, 4):  # SHORT or LONG, one value, held in the entry itself
            found[tag] = int.from_bytes(data[entry + 8:entry + (10 if kind == 3 else 12)], order)
    return (found[256], found[257]) if len(found) == 2 else None


def _pnm_size(head: bytes) -> Optional[Tuple[int, int]]:
    """Width and height from a PNM header ("P6 # comment\n 640 480 ..."), None where it does not parse."""
    tokens = []
    for line in head[2:].split(b"\n"):
        tokens += line.split(b"#", 1)[0].split()
        if len(tokens) >= 2:
            break
    try:
        return int(tokens[0]), int(tokens[1])
    except (IndexError, ValueError):
        return None


def _webp_size(head: bytes) -> Optional[Tuple[int, int]]:
    """Canvas size from a WebP's first chunk (VP8X, VP8L or VP8), None where it is none of them."""
    if len(head) < 30:
        return None
    chunk = head[12:16]
    if chunk == b"VP8X":
        return 1 + int.from_bytes(head[24:27], "little"), 1 + int.from_bytes(head[27:30], "little")
    if chunk == b"VP8L" and head[20] == 0x2F:
        bits = int.from_bytes(head[21:25], "little")
        return 1 + (bits & 0x3FFF), 1 + (bits >> 14 & 0x3FFF)
    if chunk == b"VP8 " and head[23:26] == b"\x9d\x01\x2a":
        return int.from_bytes(head[26:28], "little") & 0x3FFF, int.from_bytes(head[28:30], "little") & 0x3FFF
    return None


def max_pixels() -> Optional[int]:
    """The most pixels an image may have (None: no limit), the same in every backend: $SDMP_MAX_IMAGE_PIXELS
    (0: no limit), else Pillow's decompression-bomb limit, twice ``PIL.Image.MAX_IMAGE_PIXELS`` (~179 MP by
    default). An environment variable reaches every worker process (fork or spawn); a
    ``PIL.Image.MAX_IMAGE_PIXELS`` set in Python reaches forked workers only. Raises ValueError for a bad value:
    ``make_loader``, ``convert`` and ``eval`` call it before reading anything."""
    global _PIL_IMAGE
    if _PIL_IMAGE is None:
        from PIL import Image as _PIL_IMAGE
    env = os.environ.get("SDMP_MAX_IMAGE_PIXELS")
    if env:
        try:
            limit = int(env)
            if limit < 0:
                raise ValueError
        except ValueError:
            raise ValueError(f"SDMP_MAX_IMAGE_PIXELS={env!r}: expected a whole number of pixels >= 0 "
                             f"(0: no limit)") from None
        return limit or None
    pil = _PIL_IMAGE.MAX_IMAGE_PIXELS
    return None if pil is None else 2 * int(pil)


def _allow_in_pil(limit: Optional[int]) -> None:
    """Raise Pillow's own limit (it refuses past twice MAX_IMAGE_PIXELS when opening) to ``limit`` where that is
    higher, so an image SDMP_MAX_IMAGE_PIXELS allows opens; never lowered (the size check here refuses first)."""
    pil = _PIL_IMAGE.MAX_IMAGE_PIXELS
    if pil is not None and (limit is None or limit > 2 * pil):
        _PIL_IMAGE.MAX_IMAGE_PIXELS = limit  # its warning starts there too: past it, the check here refuses


def too_large(buf, fmt: Optional[str] = None) -> Optional[str]:
    """A skip reason when the image's header declares more pixels than ``max_pixels()`` (a decompression bomb,
    or a photo larger than any backend here would decode), else None."""
    limit = max_pixels()
    if limit is None:
        return None
    size = image_size(buf, fmt)
    return size_reason(size, limit) if size else None


def size_reason(size: Tuple[int, int], limit: Optional[int]) -> Optional[str]:
    """The "too large" skip reason for an image of ``size`` (w, h; (pixels, 1) where only the count is known),
    or None within ``limit``."""
    w, h = size
    if limit is None or w * h <= limit:
        return None
    dims = f"{w} x {h} = {_pixels(w * h)}" if h > 1 else _pixels(w)  # (w, 1): a count from Pillow's message
    return f"too large ({dims}, over the limit of {_pixels(limit)}: set SDMP_MAX_IMAGE_PIXELS, 0 for no limit)"


def _pixels(n: int) -> str:
    return f"{n:,} pixels"


def _bomb_pixels(e: Exception) -> Optional[int]:
    """The pixel count in Pillow's DecompressionBombError message ("Image size (N pixels) exceeds limit...")."""
    import re

    m = re.search(r"\((\d+) pixels\)", str(e))
    return int(m.group(1)) if m else None


def _tail(buf, n: int) -> bytes:
    return buf[-n:] if isinstance(buf, bytes) else bytes(buf[-n:])


def read_encoded(path: str) -> Tuple[Optional[np.ndarray], Optional[str]]:
    """(uint8 bytes, None) for a file that looks decodable, else (None, reason)."""
    try:
        data = read_file_bytes(path)
    except OSError as e:
        return None, f"unreadable ({e.strerror or e})"
    reason = sniff_image(data)
    return (None, reason) if reason else (np.frombuffer(data, dtype=np.uint8), None)


def read_file_bytes(path: str) -> bytes:
    """The whole file, in as few calls as the OS allows. Half the cost of ``np.fromfile`` per small file
    (2026-11-28, 2-core CPU, 39 kB JPEGs in the page cache: 10 vs 21 us), which DALI's feeding thread pays
    20,000 times a second on a GPU."""
    # checked before the open: opening a named pipe waits for a writer for ever (O_NONBLOCK would avoid that, but
    # some FUSE file systems pass it on to their own reads)
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        raise NotRegularFileError(f"not a regular file ({file_kind(mode)})")
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        data = os.read(fd, size) if size else b""
        if size and len(data) == size:  # the file as it was when asked for its size: no call to find its end
            return data
        # a short read (over 2 GiB, a file that shrank or grew meanwhile) or a size of 0 (empty, or a file system
        # that does not report sizes: /proc, some FUSE mounts): read to the end
        parts = [data]
        while chunk := os.read(fd, 1 << 20):
            parts.append(chunk)
        return b"".join(parts)
    finally:
        os.close(fd)


class NotRegularFileError(OSError):
    """A named pipe, device or folder where a file was expected (reading one blocks or means nothing)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "not a regular file"


def file_kind(mode: int) -> str:
    """What a non-regular file is, in words."""
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"


def regular_file_size(path: str) -> int:
    """Size of the regular file ``path``; ValueError for a named pipe, device or folder (reading one would block
    or mean nothing), OSError when it cannot be read."""
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"not a regular file ({file_kind(st.st_mode)})")
    return st.st_size


@contextlib.contextmanager
def open_image(source):
    """PIL's lazy ``Image.open`` of a path or a binary file object, refusing (ValueError) a zero-byte file,
    a named pipe or device (opening one would block), and an image over ``max_pixels()``."""
    from PIL import Image

    if isinstance(source, (str, os.PathLike)) and regular_file_size(source) == 0:
        raise ValueError("zero-byte file")
    limit = max_pixels()
    _allow_in_pil(limit)
    try:
        im = Image.open(source)
    except Image.DecompressionBombError as e:  # raised by the open itself, past Pillow's limit
        n = _bomb_pixels(e)
        reason = size_reason((n, 1), limit) if n else None
        raise ValueError(reason or f"too large ({e}; set SDMP_MAX_IMAGE_PIXELS, 0 for no limit)") from None
    with im:
        reason = size_reason(im.size, limit)
        if reason:
            raise ValueError(reason)
        yield im


def pil_rgb(source):
    """Fully decoded, upright 8-bit RGB PIL image from a path or a binary file object; raises on anything
    undecodable, or refused by ``open_image``. PIL reports corrupt data as exceptions (libpng through
    torchvision.io can crash the process on a bad PNG checksum), and reads every format ``list_images`` lists
    (BMP, TIFF, PNM, ...)."""
    from PIL import ImageOps

    with open_image(source) as im:
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
