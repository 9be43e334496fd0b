"""read_encoded / sniff_image: what the DALI loader's feeding thread does with every file (no DALI needed)."""
import io
import os

import numpy as np
import pytest
from PIL import Image

from sdmp_fast.pipelines import image_bytes
from sdmp_fast.pipelines.image_bytes import read_encoded, sniff_image


def _encoded(fmt: str, size=(32, 24)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, (200, 30, 90)).save(out, format=fmt)
    return out.getvalue()


def test_read_encoded_returns_the_file_bytes(tmp_path):
    data = _encoded("JPEG")
    (tmp_path / "a.jpg").write_bytes(data)
    buf, reason = read_encoded(str(tmp_path / "a.jpg"))
    assert reason is None and buf.dtype == np.uint8 and buf.tobytes() == data


def test_read_encoded_names_what_it_refuses(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_bytes(b"hello world")
    (tmp_path / "cut.jpg").write_bytes(_encoded("JPEG")[:-10])
    (tmp_path / "cut.png").write_bytes(_encoded("PNG")[:-20])
    assert read_encoded(str(tmp_path / "empty.jpg")) == (None, "empty file")
    assert "not an image" in read_encoded(str(tmp_path / "text.jpg"))[1]
    assert "truncated JPEG" in read_encoded(str(tmp_path / "cut.jpg"))[1]
    assert "truncated PNG" in read_encoded(str(tmp_path / "cut.png"))[1]
    buf, reason = read_encoded(str(tmp_path / "missing.jpg"))
    assert buf is None and reason.startswith("unreadable")


def test_read_encoded_reads_to_the_end_through_short_reads(tmp_path, monkeypatch):
    """os.read may return less than asked (over 2 GiB, a file that grew since its size was taken): the rest is
    read, not cut off (which the sniff would then call a truncated JPEG)."""
    data = _encoded("JPEG", (300, 200))
    (tmp_path / "a.jpg").write_bytes(data)
    real_read = os.read
    monkeypatch.setattr(image_bytes.os, "read", lambda fd, n: real_read(fd, min(n, 1000)))
    buf, reason = read_encoded(str(tmp_path / "a.jpg"))
    assert reason is None and buf.tobytes() == data


def test_read_encoded_reads_files_whose_size_is_not_reported():
    """A size of 0 from fstat (/proc, some FUSE mounts) is not taken for an empty file: read to the end."""
    data = image_bytes.read_file_bytes("/proc/self/status")
    assert data.startswith(b"Name:")


def test_sniff_takes_bytes_and_arrays_alike():
    for fmt in ("JPEG", "PNG", "BMP", "TIFF", "WEBP"):
        data = _encoded(fmt)
        assert sniff_image(data) is None, fmt
        assert sniff_image(np.frombuffer(data, np.uint8)) is None, fmt
    cut = _encoded("JPEG")[:-10]
    assert sniff_image(cut) == sniff_image(np.frombuffer(cut, np.uint8)) == "truncated JPEG (no end-of-image marker)"


def test_sniff_accepts_padding_after_the_jpeg_end_marker():
    data = _encoded("JPEG")
    assert sniff_image(data + b"\x00" * 1000) is None  # some writers pad after EOI
    assert sniff_image(data + b"\x00" * 5000) is None  # past the last 4 kB: found after the scan
    assert "truncated" in sniff_image(data[:-2] + b"\x00" * 5000)  # no end marker anywhere


@pytest.mark.parametrize("n", [1, 2, 3])
def test_sniff_of_tiny_files(n):
    assert sniff_image(b"\xff\xd8\xff"[:n]) in ("not an image (unknown signature)",
                                                "truncated JPEG (no end-of-image marker)")


def _with_size(data: bytes, fmt: str, w: int, h: int) -> bytes:
    """``data`` with its header claiming w x h pixels (a decompression bomb's trick: a few kB of file)."""
    import struct

    d = bytearray(data)
    if fmt == "JPEG":
        i = d.index(b"\xff\xc0")
        struct.pack_into(">HH", d, i + 5, h, w)
    else:
        struct.pack_into(">II", d, 16, w, h)
    return bytes(d)


def test_image_size_reads_the_header_of_every_format():
    for fmt in ("JPEG", "PNG", "BMP", "TIFF", "WEBP"):
        assert image_bytes.image_size(_encoded(fmt, (33, 21))) == (33, 21), fmt
    for fmt, kw in (("PPM", {}), ("TIFF", {}), ("TIFF", dict(compression="tiff_deflate"))):
        out = io.BytesIO()  # read without PIL (78 us a TIFF through Image.open, on DALI's feeding thread)
        Image.new("RGB", (33, 21)).save(out, format=fmt, **kw)
        read = image_bytes._tiff_size if fmt == "TIFF" else image_bytes._pnm_size
        assert read(out.getvalue()) == (33, 21) == image_bytes.image_size(out.getvalue()), fmt
    assert image_bytes._pnm_size(b"P5\n# made by hand\n 7 5\n255\n") == (7, 5)
    assert image_bytes._tiff_size(b"MM\x00*\x00\x00\x00\x08\x00\x02" + b"\x01\x00\x00\x03\x00\x00\x00\x01\x00\x21\x00\x00"
                                  + b"\x01\x01\x00\x04\x00\x00\x00\x01\x00\x00\x00\x15") == (33, 21)  # big-endian
    for kw in (dict(lossless=True), dict(), dict(exif=b"Exif\x00\x00II*\x00\x08\x00\x00\x00\x00\x00")):
        out = io.BytesIO()  # VP8L, VP8 and VP8X (extended) WebP headers, read without PIL
        Image.new("RGB", (33, 21)).save(out, format="WEBP", **kw)
        assert image_bytes._webp_size(out.getvalue()[:30]) == (33, 21), (kw, out.getvalue()[12:16])
    out = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (40, 30)).save(out, format="JPEG", progressive=True, exif=exif)
    assert image_bytes.image_size(out.getvalue()) == (40, 30)  # SOF2, after the EXIF segment
    data = _encoded("JPEG", (33, 21))
    assert image_bytes.image_size(data[:2] + b"\xff" + data[2:]) == (33, 21)  # a fill byte before a marker
    assert image_bytes.image_size(data[:40]) is None


def test_an_image_over_the_pixel_limit_is_refused_from_its_header(tmp_path, monkeypatch):
    """torch-gpu decoded a 1 kB JPEG claiming 60000 x 60000 into a 10.8 GB tensor; DALI and FFCV took photos
    that the torchvision backend refused. One limit now, read from the header: Pillow's (~179 MP) unless
    SDMP_MAX_IMAGE_PIXELS says otherwise."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # the variable sets it: restored
    monkeypatch.delenv("SDMP_MAX_IMAGE_PIXELS", raising=False)
    for fmt in ("JPEG", "PNG"):
        bomb = _with_size(_encoded(fmt), fmt, 60000, 60000)
        reason = sniff_image(bomb)
        assert reason.startswith("too large (60000 x 60000 = 3,600,000,000 pixels, over the limit of 178,956,970 "
                                 "pixels"), reason
        # extraneous bytes between segments (libjpeg and PIL skip them and decode) hid the size from the walk
        stray = bomb[:20] + b"\x00" + bomb[20:] if fmt == "JPEG" else bomb
        assert sniff_image(stray) == reason
        assert "SDMP_MAX_IMAGE_PIXELS" in reason
    (tmp_path / "big.png").write_bytes(_encoded("PNG", (40, 30)))
    monkeypatch.setenv("SDMP_MAX_IMAGE_PIXELS", "1000")
    assert sniff_image(_encoded("JPEG", (40, 25))) is None  # 1,000 pixels: at the limit
    assert sniff_image(_encoded("JPEG", (40, 30))).startswith("too large (40 x 30")
    assert "too large" in read_encoded(str(tmp_path / "big.png"))[1]
    with pytest.raises(ValueError, match="too large"):  # the PIL-decoding backends and eval: the same limit
        image_bytes.pil_rgb(str(tmp_path / "big.png"))
    with pytest.raises(ValueError, match="too large"):
        image_bytes.pil_rgb(io.BytesIO(_encoded("BMP", (40, 30))))
    monkeypatch.setenv("SDMP_MAX_IMAGE_PIXELS", "0")  # no limit
    assert sniff_image(_with_size(_encoded("JPEG"), "JPEG", 60000, 60000)) is None
    assert image_bytes.pil_rgb(str(tmp_path / "big.png")).size == (40, 30)
    monkeypatch.setenv("SDMP_MAX_IMAGE_PIXELS", "lots")
    with pytest.raises(ValueError, match="SDMP_MAX_IMAGE_PIXELS='lots'"):
        sniff_image(_encoded("JPEG"))


def test_the_limit_leaves_pillows_own_alone_unless_it_must_open_more(tmp_path, monkeypatch):
    """The variable set Pillow's limit for the whole process (its protection off for user code after a 0, lowered
    after a small value); now Pillow's is only raised, and only where an image the variable allows needs it."""
    from sdmp_fast.pipelines.base import make_loader

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    (tmp_path / "big.png").write_bytes(_encoded("PNG", (50, 40)))  # 2,000 pixels: Pillow refuses past 2,000
    monkeypatch.setenv("SDMP_MAX_IMAGE_PIXELS", "500")
    assert "too large" in sniff_image(_encoded("PNG", (50, 40)))
    assert Image.MAX_IMAGE_PIXELS == 1000  # not lowered
    (tmp_path / "bigger.png").write_bytes(_encoded("PNG", (60, 50)))
    monkeypatch.setenv("SDMP_MAX_IMAGE_PIXELS", "5000")
    assert image_bytes.pil_rgb(str(tmp_path / "bigger.png")).size == (60, 50)  # 3,000 > Pillow's 2,000
    assert Image.MAX_IMAGE_PIXELS == 5000
    monkeypatch.setenv("SDMP_MAX_IMAGE_PIXELS", "-3")  # named by make_loader, before anything is read
    with pytest.raises(ValueError, match=r"SDMP_MAX_IMAGE_PIXELS='-3': expected a whole number of pixels >= 0"):
        make_loader("torchvision", str(tmp_path), "byol2", 2, device="cpu", shard_id=0, num_shards=1)


def test_data_after_the_image_is_not_a_truncation():
    """A phone's motion photo appends a video after the JPEG's end marker; DALI's sniff called it truncated."""
    jpeg = _encoded("JPEG", (300, 200))
    assert sniff_image(jpeg + b"ftypmp42" + bytes(20000)) is None
    assert sniff_image(_encoded("PNG") + bytes(200)) is None
    # a cut file stays refused, an end marker inside an EXIF thumbnail (before the scan) notwithstanding
    rng = np.random.default_rng(0)
    noisy = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (200, 300, 3), dtype=np.uint8)).save(noisy, format="JPEG")
    noisy = noisy.getvalue()
    thumb = b"Exif\x00\x00" + b"\xff\xd8 a thumbnail \xff\xd9"
    cut = noisy[:2] + b"\xff\xe1" + (len(thumb) + 2).to_bytes(2, "big") + thumb + noisy[2:len(noisy) // 2]
    assert sniff_image(cut) == "truncated JPEG (no end-of-image marker)"


@pytest.mark.timeout(60)
def test_a_named_pipe_is_refused_not_waited_on(tmp_path):
    """Opening a FIFO named x.jpg blocked DALI's and torch-gpu's readers forever."""
    fifo = str(tmp_path / "pipe.jpg")
    os.mkfifo(fifo)
    buf, reason = read_encoded(fifo)
    assert buf is None and "not a regular file (a named pipe)" in reason
    with pytest.raises(ValueError, match="not a regular file .a named pipe."):
        image_bytes.pil_rgb(fifo)


def test_reading_sizes_in_threads_leaves_the_warning_filters_alone():
    """image_size's PIL fallback ran under warnings.catch_warnings, which is not thread-safe: from torch-gpu's
    reading threads it could leave an "ignore every warning" filter behind (the skipped-file warnings vanished)."""
    import threading
    import warnings

    odd = b"P6\n# no size here\n"  # a PNM header that does not parse: PIL's reading, in every thread
    before = list(warnings.filters)

    def read():
        for _ in range(300):
            image_bytes.image_size(odd)
            sniff_image(_encoded("TIFF"))

    threads = [threading.Thread(target=read) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert warnings.filters == before
