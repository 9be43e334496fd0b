import pytest
import torch

from sdmp_fast.pipelines.base import EpochSampler, assemble_batch, list_images, make_loader
from sdmp_fast.pipelines.recipes import byol2, dino, make_recipe


@pytest.mark.parametrize("n,b,w", [(23, 4, 1), (23, 4, 2), (10, 3, 3), (7, 8, 1)])
def test_two_epochs_cover_every_sample_once_without_drop_last(n, b, w):
    for epoch in (0, 1):
        seen = []
        for r in range(w):
            s = EpochSampler(n, b, r, w, shuffle=True, seed=5, drop_last=False)
            s.set_epoch(epoch)
            batches = s.batches()
            assert len(batches) == len(s)
            seen += torch.cat(batches).tolist()
        assert sorted(seen) == list(range(n))


def test_drop_last_gives_equal_steps_per_rank_and_disjoint_shards():
    shards = [EpochSampler(103, 8, r, 2, seed=1, drop_last=True) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 51 // 8
    a, b = (set(s.indices().tolist()) for s in shards)
    assert not a & b


def test_set_epoch_reshuffles_deterministically():
    s = EpochSampler(50, 5, seed=3)
    e0 = s.indices()
    s.set_epoch(1)
    e1 = s.indices()
    s.set_epoch(0)
    assert torch.equal(e0, s.indices()) and not torch.equal(e0, e1)


def test_batch_larger_than_shard_is_a_clear_error():
    with pytest.raises(ValueError, match="batch_size 64 is larger"):
        EpochSampler(40, 64, drop_last=True)


def test_odd_last_batch_is_left_unmixed_with_lam_one():
    r = byol2(size=8)
    views = [torch.randn(3, 3, 8, 8), torch.randn(3, 3, 8, 8)]
    b = assemble_batch(views, torch.zeros(3, dtype=torch.long), torch.arange(3), r, torch.Generator())
    assert torch.equal(b.lam, torch.ones(3)) and torch.equal(b.mixed_views[0], views[0])


def test_recipes_validate_and_name_the_setting():
    assert dino(n_local=6, n_local_mixed=3).mix.mixed_views == (0, 1, 5, 6, 7)
    assert make_recipe("byol2", size=32).num_views == 2
    with pytest.raises(ValueError, match="recipe: unknown recipe 'simclr'"):
        make_recipe("simclr")
    from dataclasses import replace
    bad = replace(byol2(), views=(replace(byol2().views[0], scale=(0.5, 0.2)),))
    with pytest.raises(ValueError, match="scale"):
        bad.validate()


def test_list_images_errors_name_the_path(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        list_images(tmp_path / "nope")
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(ValueError, match="holds no image files"):
        list_images(tmp_path)


def test_make_loader_rejects_bad_settings_before_reading(tmp_path):
    with pytest.raises(ValueError, match="unknown loader backend 'pil'"):
        make_loader("pil", tmp_path, "byol2", 8)
    with pytest.raises(ValueError, match="batch_size 7"):
        make_loader("torchvision", tmp_path, "byol2", 7)
