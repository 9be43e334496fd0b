import pytest
import torch

from sdmp_fast.batch import SDMPBatch


def _batch(n=4):
    views = [torch.randn(n, 3, 8, 8), torch.randn(n, 3, 8, 8)]
    return SDMPBatch(views, torch.arange(n), torch.arange(n) + 100, [v.clone() for v in views], (0, 1),
                     torch.rand(n), torch.zeros(n, dtype=torch.long))


def test_to_dtype_converts_images_only():
    b = _batch().to("cpu", dtype=torch.bfloat16)
    assert all(v.dtype == torch.bfloat16 for v in b.views + b.mixed_views)
    assert b.labels.dtype == torch.int64 and b.lam.dtype == torch.float32
    assert b.mixed_from == (0, 1) and b.is_mixed and b.batch_size == 4


def test_inconsistent_batch_is_rejected():
    with pytest.raises(ValueError, match="mixed_from"):
        SDMPBatch([torch.zeros(2, 3, 4, 4)], torch.zeros(2), torch.zeros(2), [torch.zeros(2, 3, 4, 4)], ())
    with pytest.raises(ValueError, match="views\\[0\\] has batch size 3"):
        SDMPBatch([torch.zeros(3, 3, 4, 4)], torch.zeros(2), torch.zeros(2))


@pytest.mark.cuda
def test_pin_to_cuda_and_record_stream():
    b = _batch().pin_memory()
    assert b.views[0].is_pinned()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        g = b.to("cuda", non_blocking=True)
    torch.cuda.current_stream().wait_stream(s)
    g.record_stream(torch.cuda.current_stream())
    assert g.views[0].is_cuda and torch.equal(g.labels.cpu(), b.labels)


def test_moves_keep_lam_as_the_first_mixed_lam():
    """lam is mixed_lam[0] (the same tensor): moved once, still one tensor after .to() / .pin_memory()."""
    n = 4
    lam = torch.rand(n)
    b = SDMPBatch([torch.rand(n, 3, 8, 8)], torch.zeros(n, dtype=torch.long), torch.arange(n),
                  [torch.rand(n, 3, 8, 8), torch.rand(n, 3, 8, 8)], (0, 0), lam, torch.zeros(n, dtype=torch.long),
                  [lam, torch.rand(n)])
    copied = []
    moved = b._map(lambda t: copied.append(t) or t.clone())  # what .to(cuda) / .pin_memory() do per tensor
    assert len(copied) == 8  # 1 view, 2 mixed, labels, indices, lam (= mixed_lam[0]) once, method, mixed_lam[1]
    assert moved.lam is moved.mixed_lam[0] and moved.lam is not lam and moved.mixed_lam[1] is not moved.lam
    assert torch.equal(moved.mixed_lam[1], b.mixed_lam[1])
    assert b.to("cpu", dtype=torch.float64).mixed_lam[1].dtype == torch.float32  # images only
    with pytest.raises(ValueError, match="mixed_lam"):
        SDMPBatch(b.views, b.labels, b.indices, b.mixed_views, b.mixed_from, lam, b.method, [lam])
