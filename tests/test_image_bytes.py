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
    assert "truncated" in sniff_image(data + b"\x00" * 5000)  # the marker is looked for in the last 4 kB only


@pytest.mark.parametrize("n", [1, 2, 3])
def test_sniff_of_tiny_files(n):
    assert sniff_image(b"\xff\xd8\xff"[:n]) in ("not an image (unknown signature)",
                                                "truncated JPEG (no end-of-image marker)")
