"""Adapters yield exactly the formats of DINO / MoCo v3 / solo-learn / lightly / torch DataLoader loops."""
import os

import pytest
import torch

from sdmp_fast.batch import SDMPBatch
from sdmp_fast.pipelines import adapters
from sdmp_fast.pipelines.base import EpochSampler, assemble_batch, list_images, make_generator, make_loader
from sdmp_fast.pipelines.recipes import byol2, dino


class FakeLoader:
    """A minimal SDMPLoader: random views of the recipe's shapes, the real sampler and the real mixing."""

    def __init__(self, recipe, num_samples=22, batch_size=4, drop_last=True, files=None):
        self.recipe, self.batch_size = recipe, batch_size
        self.sampler = EpochSampler(num_samples, batch_size, drop_last=drop_last, seed=1)
        self.images = files
        self.epochs = []

    def __len__(self):
        return len(self.sampler)

    def set_epoch(self, epoch):
        self.epochs.append(epoch)
        self.sampler.set_epoch(epoch)

    def __iter__(self):
        g = make_generator(0, self.sampler.epoch, 0, "cpu")
        for idx in self.sampler.batches():
            views = [torch.rand(len(idx), 3, v.size, v.size, generator=g) for v in self.recipe.expanded_views()]
            yield assemble_batch(views, idx % 3, idx, self.recipe, g)


def small_dino():
    return dino(global_size=16, local_size=8, n_local=4, n_local_mixed=2)


def test_dino_format_is_views_and_labels_with_right_shapes():
    loader = FakeLoader(small_dino())
    dl = adapters.as_dino(loader)
    assert len(dl) == len(loader) == 5
    n = 0
    for images, labels in dl:
        n += 1
        assert isinstance(images, list) and len(images) == 6
        assert [tuple(x.shape) for x in images] == [(4, 3, 16, 16)] * 2 + [(4, 3, 8, 8)] * 4
        assert labels.shape == (4,) and labels.dtype == torch.long
    assert n == len(dl)


def test_mocov3_with_mix_info_appends_mixed_views_and_reports_lam():
    loader = FakeLoader(byol2(size=16))
    for images, labels, info in adapters.as_mocov3(loader, with_mix_info=True):
        assert info["num_clean"] == 2 and info["mixed_from"] == (0, 1) and len(images) == 4
        lam = info["lam"]
        assert lam.shape == (4,) and bool(((lam >= 0) & (lam <= 1)).all())
        assert info["method"].shape == (4,) and info["indices"].shape == (4,)
        # Mixed view j is clean view mixed_from[j] blended with its flipped partner.
        assert not torch.equal(images[2], images[0])
        assert labels.shape == (4,)
    # The side attribute holds the last batch's info for loops that keep the 2-tuple.
    plain = adapters.as_mocov3(loader, append_mixed=True)
    images, _ = next(iter(plain))
    assert len(images) == 4 and plain.mix_info["num_clean"] == 2


def test_solo_learn_format_is_indexes_crops_targets():
    loader = FakeLoader(byol2(size=16), num_samples=13, batch_size=4, drop_last=False)
    batches = list(adapters.as_solo_learn(loader))
    assert len(batches) == len(loader) == 4
    seen = []
    for batch in batches:
        assert isinstance(batch, list) and len(batch) == 3
        indexes, crops, targets = batch
        assert isinstance(crops, list) and len(crops) == 2
        assert crops[0].shape[0] == indexes.shape[0] == targets.shape[0]
        seen += indexes.tolist()
    assert sorted(seen) == list(range(13))
    assert len(next(iter(adapters.as_solo_learn(loader, with_mix_info=True)))) == 4


def test_lightly_format_names_files_relative_to_root(tmp_path):
    from sdmp_fast.data import make_synthetic_image_folder

    make_synthetic_image_folder(str(tmp_path), num_classes=2, per_class=5)
    files = list_images(str(tmp_path))
    loader = FakeLoader(byol2(size=16), num_samples=len(files), batch_size=4)
    views, targets, fnames = next(iter(adapters.as_lightly(loader, data=str(tmp_path))))
    assert len(views) == 2 and targets.shape == (4,) and len(fnames) == 4
    assert all(isinstance(f, str) and not os.path.isabs(f) and f.startswith("class") for f in fnames)
    # The loader's own file list is used when it keeps one; without any, names are dataset indices.
    loader.images = files
    _, _, fnames2 = next(iter(adapters.as_lightly(loader)))
    assert all(f.startswith("class") for f in fnames2)
    loader.images = None
    _, _, fnames3 = next(iter(adapters.as_lightly(loader)))
    assert all(f.isdigit() for f in fnames3)


def test_adapters_forward_set_epoch_and_reshuffle():
    loader = FakeLoader(byol2(size=8))
    for make in (adapters.as_dino, adapters.as_mocov3, adapters.as_solo_learn, adapters.as_lightly):
        a = make(loader)
        a.set_epoch(3)
        assert loader.epochs[-1] == 3 and loader.sampler.epoch == 3
    dl = adapters.as_dataloader(adapters.as_dino(loader))
    dl.sampler.set_epoch(7)
    assert loader.epochs[-1] == 7
    idx7 = list(dl.sampler)
    dl.set_epoch(8)
    assert loader.sampler.epoch == 8 and list(dl.sampler) != idx7


def test_dataloader_sampler_shows_the_order_of_the_next_pass_without_set_epoch():
    # lightly / single-GPU moco-v3 loops never call set_epoch: each pass runs the next epoch, and dl.sampler
    # must list the order that pass takes (it listed the previous pass's)
    imgs = torch.randint(0, 256, (10, 12, 12), dtype=torch.uint8)
    loader = make_loader("memory", imgs, byol2(size=8), 2, device="cpu", shard_id=0, num_shards=1)
    dl = adapters.as_dataloader(adapters.as_solo_learn(loader))
    for _ in range(3):
        predicted = list(dl.sampler)
        assert sum((b[0].tolist() for b in dl), []) == predicted
    dl.sampler.set_epoch(7)
    assert list(dl.sampler) == sum((b[0].tolist() for b in dl), [])


def test_dataloader_like_attributes():
    loader = FakeLoader(byol2(size=8), num_samples=22, batch_size=4)
    dl = adapters.as_dataloader(loader)
    assert len(dl) == 5 and len(dl.dataset) == 22 and dl.batch_size == 4 and dl.drop_last is True
    assert len(dl.sampler) == 20 and sorted(dl.sampler) == sorted(loader.sampler.indices().tolist())
    batches = list(dl)
    assert len(batches) == 5 and all(isinstance(b, SDMPBatch) for b in batches)
    # Forwarded attributes of the wrapped loader stay reachable through an adapter.
    assert adapters.as_dino(loader).recipe.name == "byol2"


def test_adapter_rejects_a_loader_that_yields_something_else():
    class Bad(FakeLoader):
        def __iter__(self):
            yield (torch.zeros(1), torch.zeros(1))

    with pytest.raises(TypeError, match="expected SDMPBatch"):
        next(iter(adapters.as_dino(Bad(byol2(size=8)))))


def test_adapters_over_the_memory_backend():
    images = torch.randint(0, 256, (12, 3, 40, 48), dtype=torch.uint8)
    loader = make_loader("memory", (images, torch.arange(12) % 3), byol2(size=32), 4, device="cpu")
    dl = adapters.as_dataloader(adapters.as_solo_learn(loader))
    assert len(dl) == len(loader) == 3 and len(dl.dataset) == 12 and dl.batch_size == 4
    seen = []
    for indexes, crops, targets in dl:
        assert len(crops) == 2 and crops[0].shape == (4, 3, 32, 32) and targets.shape == (4,)
        assert torch.equal(targets, indexes % 3)  # labels travel with their samples
        seen += indexes.tolist()
    assert sorted(seen) == list(range(12))


@pytest.mark.timeout(120)
def test_lightly_names_come_from_a_file_backend(tmp_path):
    from sdmp_fast.data import make_synthetic_image_folder

    make_synthetic_image_folder(str(tmp_path), num_classes=2, per_class=4, size=(40, 48))
    loader = make_loader("torchvision", str(tmp_path), byol2(size=32), 4, device="cpu", num_workers=0)
    views, targets, fnames = next(iter(adapters.as_lightly(loader)))
    files = list_images(str(tmp_path))
    rel = [os.path.relpath(f, files.root) for f in files.files]
    assert len(views) == 2 and len(fnames) == 4 and all(f in rel for f in fnames)
    assert [files.labels[rel.index(f)] for f in fnames] == targets.tolist()


def test_adapter_sampler_is_a_dataloaders_and_dataloader_like_forwards_the_rest():
    loader = FakeLoader(byol2(size=8), num_samples=22, batch_size=4)
    a = adapters.as_solo_learn(loader)
    assert len(a.sampler) == 20 and sorted(a.sampler) == sorted(loader.sampler.indices().tolist())
    a.sampler.set_epoch(4)
    assert loader.sampler.epoch == 4
    dl = adapters.as_dataloader(a)
    next(iter(dl))
    assert dl.recipe.name == "byol2" and dl.mix_info["lam"].shape == (4,)


def test_lightly_names_of_a_beton_skip_what_convert_skipped(tmp_path):
    # a .beton's index counts the converted files only: with data= the folder, the skipped ones are left out
    from sdmp_fast.data import make_synthetic_image_folder

    make_synthetic_image_folder(str(tmp_path), num_classes=2, per_class=4, size=(20, 20))
    files = list_images(str(tmp_path)).files
    skipped = [files[1], files[5]]

    class BetonLoader(FakeLoader):
        path = str(tmp_path / "x.beton")

        @property
        def skipped(self):
            return skipped

    loader = BetonLoader(byol2(size=8), num_samples=6, batch_size=2, drop_last=False)
    names = [n for _, _, fn in adapters.as_lightly(loader, data=str(tmp_path)) for n in fn]
    stored = [os.path.relpath(f, str(tmp_path)) for f in files if f not in skipped]
    assert sorted(names) == sorted(stored)
    with pytest.raises(ValueError, match="lists 8 files but the loader reads 6 samples"):
        adapters.as_lightly(FakeLoader(byol2(size=8), num_samples=6, batch_size=2), data=str(tmp_path))


def test_lightly_names_of_a_beton_converted_elsewhere_or_before_the_data_moved(tmp_path):
    # convert's list of skipped files holds the paths it was given: relative to the folder it ran in, or
    # absolute under where the data was then
    from sdmp_fast.data import make_synthetic_image_folder

    make_synthetic_image_folder(str(tmp_path), num_classes=2, per_class=4, size=(20, 20))
    files = list_images(str(tmp_path)).files
    rel = [os.path.relpath(f, str(tmp_path)) for f in files]

    class BetonLoader(FakeLoader):
        path = str(tmp_path / "x.beton")
        skipped = [os.path.join("imgs", rel[1]), os.path.join("/scratch/old/copy", rel[5])]

    loader = BetonLoader(byol2(size=8), num_samples=6, batch_size=2, drop_last=False)
    names = [n for _, _, fn in adapters.as_lightly(loader, data=str(tmp_path)) for n in fn]
    assert sorted(names) == sorted(r for k, r in enumerate(rel) if k not in (1, 5))


def test_lightly_data_listing_the_loaders_files_in_another_order_is_refused(tmp_path):
    from sdmp_fast.data import make_synthetic_image_folder

    make_synthetic_image_folder(str(tmp_path / "d"), num_classes=2, per_class=2, size=(20, 20))
    files = list_images(str(tmp_path / "d")).files
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"{f} {k // 2}\n" for k, f in reversed(list(enumerate(files)))))
    loader = make_loader("torchvision", str(listing), byol2(size=8), 2, device="cpu", num_workers=0)
    with pytest.raises(ValueError, match="lists other files, or the same in another order"):
        adapters.as_lightly(loader, data=str(tmp_path / "d"))
    names = [n for _, _, fn in adapters.as_lightly(loader) for n in fn]  # its own list names them
    assert sorted(names) == sorted(os.path.relpath(f, str(tmp_path)) for f in files)


def test_solo_learn_default_batch_is_what_stock_methods_unpack():
    loader = FakeLoader(byol2(size=8))
    indexes, crops, targets = next(iter(adapters.as_solo_learn(loader)))  # solo-learn: `_, X, targets = batch`
    assert len(crops) == 2  # == num_crops: clean views only
    indexes, crops, targets, mix = next(iter(adapters.as_solo_learn(loader, with_mix_info=True)))
    assert len(crops) == 4 and mix["num_clean"] == 2


@pytest.mark.timeout(300)
def test_lightly_names_of_a_converted_file_of_any_name_skip_what_convert_skipped(tmp_path):
    """as_lightly knew a converted file by its .beton suffix: out/x.ffcv with skipped files was refused
    ("lists 8 files but the loader reads 7 samples")."""
    pytest.importorskip("ffcv")
    from sdmp_fast.data import make_synthetic_image_folder
    from sdmp_fast.pipelines.convert import convert

    data = tmp_path / "d"
    make_synthetic_image_folder(str(data), num_classes=2, per_class=4, size=(20, 20))
    files = list_images(str(data)).files
    with open(files[2], "wb") as f:
        f.write(b"not an image")
    convert(str(data), str(tmp_path / "x.ffcv"), workers=1)
    loader = make_loader("ffcv", str(tmp_path / "x.ffcv"), byol2(size=8), 4, device="cpu", num_workers=1,
                         drop_last=False, shuffle=False)
    names = [n for _, _, fn in adapters.as_lightly(loader, data=str(data)) for n in fn]
    assert names == [os.path.relpath(f, str(data)) for k, f in enumerate(files) if k != 2]


def test_dataloader_like_begins_no_pass_of_a_bare_loader_until_read():
    """Lightning calls iter() once on a non-DataLoader to check it is iterable, and drops it: as_dataloader(loader)
    began the loader's pass right there (DALI's __iter__ starts it at once, and takes the state load_state_dict
    restored) and consumed a skip_batches(k) set before, so the pass the trainer read started at batch 0."""
    images = torch.randint(0, 256, (12, 3, 16, 16), dtype=torch.uint8)
    loader = make_loader("memory", images, byol2(size=8), 2, device="cpu", shard_id=0, num_shards=1)
    whole = [b.indices.tolist() for b in loader]
    loader.set_epoch(0)
    dl = adapters.as_dataloader(loader)
    loader.skip_batches(2)
    iter(dl)  # Lightning's _check_dataloader_iterable
    assert [b.indices.tolist() for b in dl] == whole[2:]

    class Eager(FakeLoader):  # begins its pass in __iter__ itself, as the DALI loader does
        passes = 0

        def __iter__(self):
            self.passes += 1
            return super().__iter__()

    eager = Eager(byol2(size=8))
    dl = adapters.as_dataloader(eager)
    iter(dl)
    assert eager.passes == 0
    assert len(list(dl)) == len(eager) and eager.passes == 1


def test_as_dataloader_refuses_bad_or_contradicting_sizes():
    # batch_size=0 / dataset_size=0 were silently replaced by the loader's, dataset_size=-1 failed at len(dl.dataset)
    # ("__len__() should return >= 0"), and a batch_size or dataset_size other than the loader's was taken as given
    loader = FakeLoader(byol2(size=8), num_samples=22, batch_size=4)
    for kw in ({"batch_size": 0}, {"batch_size": -4}, {"batch_size": 4.0}, {"dataset_size": 0},
               {"dataset_size": -1}):
        with pytest.raises(ValueError, match=f"as_dataloader: {next(iter(kw))} must be a positive integer"):
            adapters.as_dataloader(loader, **kw)
    with pytest.raises(ValueError, match="batch_size=8 but the loader makes batches of 4"):
        adapters.as_dataloader(loader, batch_size=8)
    with pytest.raises(ValueError, match="dataset_size=30 but the loader reads a data set of 22"):
        adapters.as_dataloader(adapters.as_dino(loader), dataset_size=30)
    dl = adapters.as_dataloader(loader, batch_size=4, dataset_size=22)  # the loader's own values: accepted
    assert dl.batch_size == 4 and len(dl.dataset) == 22

    class Quiet:  # tells neither its batch size nor its sample count
        def __len__(self):
            return 3

        def __iter__(self):
            return iter(())

    dl = adapters.as_dataloader(Quiet(), dataset_size=10, batch_size=2)
    assert dl.batch_size == 2 and len(dl.dataset) == 10


def test_adapter_dataset_is_the_whole_data_set_as_solo_learns_deepclusterv2_reads():
    # DeepClusterV2.on_train_start: len(self.trainer.train_dataloader.dataset), Lightning's train_dataloader being
    # the object given to trainer.fit: the adapter raised AttributeError ('...Loader' has no attribute 'dataset')
    loader = FakeLoader(byol2(size=8), num_samples=22, batch_size=4)
    loader.sampler = EpochSampler(22, 4, shard_id=1, num_shards=2, seed=1)
    a = adapters.as_solo_learn(loader)
    assert len(a.dataset) == 22 and len(a.sampler) == 8 and len(a) == 2
    assert len(adapters.as_dataloader(a).dataset) == 22


@pytest.mark.timeout(120)
def test_dataloader_like_of_a_dali_loader_resumes_its_epoch_after_an_iterability_check(tmp_path):
    """The DALI loader's __iter__ begins its pass at once: Lightning's iter() check through as_dataloader(loader)
    began one, which took the state load_state_dict restored, so the resumed epoch drew other crops."""
    pytest.importorskip("nvidia.dali")
    from sdmp_fast.data import make_synthetic_image_folder

    make_synthetic_image_folder(str(tmp_path), num_classes=2, per_class=8, size=(24, 24))

    def make():
        return make_loader("dali", str(tmp_path), byol2(size=16), 4, device="cpu", num_workers=1, shard_id=0,
                           num_shards=1)

    first = make()
    list(first)
    first.set_epoch(1)
    it = iter(first)
    ref = [next(it).views[0].clone()]
    state = first.state_dict()  # as a checkpoint written during epoch 1
    ref += [b.views[0].clone() for b in it]
    resumed = make()
    resumed.load_state_dict(state)
    dl = adapters.as_dataloader(resumed)
    iter(dl)  # Lightning's _check_dataloader_iterable
    dl.sampler.set_epoch(1)  # Lightning's _set_sampler_epoch
    got = [b.views[0] for b in dl]
    assert len(got) == len(ref) and all(torch.equal(a, b) for a, b in zip(got, ref))


def test_lightly_names_of_a_beton_skip_only_the_file_a_skipped_path_names(tmp_path):
    # a skipped path (from before the data moved) matched every file whose path below the root was a tail of it:
    # class b's b/x.png went with class a's a/b/x.png, and as_lightly refused the folder ("lists 3 files but the
    # loader reads 4 samples")
    from PIL import Image

    for rel in ("a/b/x.png", "a/y.png", "b/x.png", "b/z.png", "c/x.png"):
        os.makedirs(os.path.dirname(tmp_path / "d" / rel), exist_ok=True)
        Image.new("RGB", (12, 12)).save(tmp_path / "d" / rel)
    data = str(tmp_path / "d")

    class BetonLoader(FakeLoader):
        path = str(tmp_path / "x.beton")
        skipped = ["/scratch/old/d/a/b/x.png"]

    loader = BetonLoader(byol2(size=8), num_samples=4, batch_size=2, drop_last=False)
    names = [n for _, _, fn in adapters.as_lightly(loader, data=data) for n in fn]
    assert sorted(names) == ["a/y.png", "b/x.png", "b/z.png", "c/x.png"]


def test_lightly_names_of_a_beton_skip_each_link_to_one_undecodable_file(tmp_path):
    # convert lists each path it could not decode: two links to one bad file are two skipped samples. Matching by
    # real path alone mapped both to one file, and as_lightly refused the folder ("lists 5 files but the loader
    # reads 4 samples"); it worked before 083e64f
    from PIL import Image

    for rel in ("a/x.png", "a/y.png", "b/z.png", "b/w.png"):
        os.makedirs(os.path.dirname(tmp_path / "d" / rel), exist_ok=True)
        Image.new("RGB", (12, 12)).save(tmp_path / "d" / rel)
    (tmp_path / "bad.png").write_bytes(b"not an image")
    os.symlink(tmp_path / "bad.png", tmp_path / "d" / "a" / "bad.png")
    os.symlink(tmp_path / "bad.png", tmp_path / "d" / "b" / "bad.png")
    data = str(tmp_path / "d")

    class BetonLoader(FakeLoader):
        path = str(tmp_path / "x.beton")
        skipped = [os.path.abspath(os.path.join(data, "a", "bad.png")),
                   os.path.abspath(os.path.join(data, "b", "bad.png"))]

    loader = BetonLoader(byol2(size=8), num_samples=4, batch_size=2, drop_last=False)
    names = [n for _, _, fn in adapters.as_lightly(loader, data=data) for n in fn]
    assert sorted(names) == ["a/x.png", "a/y.png", "b/w.png", "b/z.png"]


def test_adapters_over_a_torch_dataloader_with_a_distributed_sampler_see_the_whole_data_set():
    # a torch DistributedSampler's num_samples is one replica's share: the adapter's .dataset (the DataLoader's
    # own before it had one) became a view of 500 samples of 1000, and as_dataloader(dl, dataset_size=1000)
    # was refused as contradicting the loader ("reads a data set of 500")
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

    ds = TensorDataset(torch.arange(1000))
    dl = DataLoader(ds, batch_size=10, sampler=DistributedSampler(ds, num_replicas=2, rank=0))
    assert adapters.as_dino(dl).dataset is ds
    assert len(adapters.as_dataloader(dl).dataset) == 1000
    assert len(adapters.as_dataloader(dl, dataset_size=1000).dataset) == 1000

    class OwnLoader(FakeLoader):  # a loader of one's own holding torch's sampler, without a .dataset
        def __init__(self):
            super().__init__(byol2(size=8))
            self.sampler = DistributedSampler(ds, num_replicas=4, rank=1, shuffle=False)

    assert len(adapters.as_dino(OwnLoader()).dataset) == 1000


def test_as_dataloader_takes_numpy_and_torch_integer_sizes_and_names_a_missing_dataset():
    # as before sizes were checked: a size computed with numpy / torch is an integer (it was refused as
    # "must be a positive integer, got np.int64(22)")
    import numpy as np

    loader = FakeLoader(byol2(size=8), num_samples=22, batch_size=4)
    dl = adapters.as_dataloader(loader, batch_size=np.int64(4), dataset_size=torch.tensor(22))
    assert dl.batch_size == 4 and type(dl.batch_size) is int and len(dl.dataset) == 22
    with pytest.raises(ValueError, match="dataset_size must be a positive integer"):
        adapters.as_dataloader(loader, dataset_size=np.float64(22.0))

    class Quiet:  # tells no sample count: the adapter's message says what to do, not "'Quiet' has no attribute"
        batch_size = 2

        def __len__(self):
            return 3

        def __iter__(self):
            return iter(())

    with pytest.raises(AttributeError, match=r"dataset_size=\.\.\."):
        adapters.as_dino(Quiet()).dataset
    assert not hasattr(adapters.as_dino(Quiet()), "dataset")
    assert len(adapters.as_dino(adapters.as_dataloader(Quiet(), dataset_size=6)).dataset) == 6


def _memory_loader():
    images = torch.randint(0, 256, (24, 3, 20, 20), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return make_loader("memory", (images, torch.arange(24) % 3), byol2(size=16), 4, device="cpu")


def _first_view(wrap, b):
    return {"solo_learn": lambda: b[1][0], "dataloader_of_dino": lambda: b[0][0], "dataloader": lambda: b.views[0],
            "lightly": lambda: b[0][0]}[wrap]()


ADAPT = {"solo_learn": adapters.as_solo_learn, "lightly": adapters.as_lightly,
         "dataloader_of_dino": lambda l: adapters.as_dataloader(adapters.as_dino(l)),
         "dataloader": adapters.as_dataloader}


@pytest.mark.parametrize("wrap", list(ADAPT))
def test_an_adapter_resumes_mid_epoch_with_the_batches_the_interrupted_run_would_have_read(tmp_path, wrap):
    """Lightning restores a loader that has state_dict / load_state_dict and expects it to go on where it was:
    the adapters keep the epoch and the batches handed out (nested adapters keep one position), and the resumed
    pass begins with the next batch (memory loader: skipped unread)."""
    whole = ADAPT[wrap](_memory_loader())
    ref = []
    for e in (0, 1, 2):
        whole.sampler.set_epoch(e)
        ref += [_first_view(wrap, b) for b in whole]
    first = ADAPT[wrap](_memory_loader())
    got = []
    first.sampler.set_epoch(0)
    got += [_first_view(wrap, b) for b in first]
    first.sampler.set_epoch(1)
    it = iter(first)
    got += [_first_view(wrap, next(it)) for _ in range(2)]
    state = first.state_dict()
    assert {k: state[k] for k in ("epoch", "batches", "num_batches", "shard")} == \
        {"epoch": 1, "batches": 2, "num_batches": 6, "shard": [0, 1]}
    torch.save(state, tmp_path / "ckpt.pt")  # as in a checkpoint
    resumed = ADAPT[wrap](_memory_loader())
    resumed.load_state_dict(torch.load(tmp_path / "ckpt.pt", weights_only=True))
    assert resumed.state_dict()["batches"] == 2  # loaded, not used yet: still what a checkpoint would save
    iter(resumed)  # Lightning's iterability check begins nothing
    resumed.sampler.set_epoch(1)  # Lightning's, every epoch
    got += [_first_view(wrap, b) for b in resumed]
    assert resumed.state_dict()["batches"] == 6
    resumed.sampler.set_epoch(2)
    got += [_first_view(wrap, b) for b in resumed]
    assert len(got) == len(ref) == 18 and all(torch.equal(a, b) for a, b in zip(got, ref))


def test_a_resumed_adapter_goes_on_without_set_epoch_and_refuses_another_loaders_state():
    """A loop that never calls set_epoch resumes too (load_state_dict sets the epoch); a pass saved whole
    resumes at the next epoch; a state of a loader with another number of batches is refused, naming both."""
    ref = adapters.as_dino(_memory_loader())
    epochs = [[b[0][0] for b in ref] for _ in range(3)]  # epochs 0, 1, 2 (no set_epoch: each pass the next)
    a = adapters.as_dino(_memory_loader())
    list(a)
    it = iter(a)
    next(it)
    b = adapters.as_dino(_memory_loader())
    b.load_state_dict(a.state_dict())
    rest = [x[0][0] for x in b]
    assert len(rest) == 5 and all(torch.equal(x, y) for x, y in zip(rest, epochs[1][1:]))
    c = adapters.as_dino(_memory_loader())
    c.load_state_dict(b.state_dict())  # the pass was read to its end
    assert all(torch.equal(x[0][0], y) for x, y in zip(c, epochs[2]))
    images = torch.zeros(12, 3, 20, 20, dtype=torch.uint8)
    other = adapters.as_dino(make_loader("memory", (images, torch.zeros(12, dtype=torch.long)), byol2(size=16), 4))
    with pytest.raises(ValueError, match="saved by a loader of 6 batches per epoch, this one makes 3"):
        other.load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="not an sdmp-fast adapter state_dict"):
        other.load_state_dict({"epoch": 1})
    # over a loader of another kind the adapters have no state of their own (Lightning would call it)
    import inspect

    dl = adapters.as_dino(torch.utils.data.DataLoader(list(range(8)), batch_size=4))
    assert not hasattr(dl, "state_dict") and not hasattr(dl, "load_state_dict")
    with pytest.raises(AttributeError):
        inspect.getattr_static(dl, "state_dict")


@pytest.mark.timeout(180)
def test_an_adapter_over_a_dali_loader_resumes_mid_epoch_with_its_random_state(tmp_path):
    """DALI cannot skip unread: the adapter restores the DALI state it saved beside its position, reads the
    epoch's first batches and drops them; the batches after are the interrupted run's, crops and colours too."""
    pytest.importorskip("nvidia.dali")
    from sdmp_fast.data import make_synthetic_image_folder

    make_synthetic_image_folder(str(tmp_path), num_classes=2, per_class=8, size=(24, 24))

    def make():
        return adapters.as_solo_learn(make_loader("dali", str(tmp_path), byol2(size=16), 4, device="cpu",
                                                  num_workers=1, shard_id=0, num_shards=1))

    first = make()
    first.sampler.set_epoch(0)
    list(first)
    first.sampler.set_epoch(1)
    it = iter(first)
    next(it)
    state = first.state_dict()
    assert state["batches"] == 1 and state["loader"]["dali_epoch_starts"]
    ref = [b[1][0].clone() for b in it]
    resumed = make()
    resumed.load_state_dict(state)
    iter(resumed)
    resumed.sampler.set_epoch(1)
    got = [b[1][0] for b in resumed]
    assert len(got) == len(ref) == 3 and all(torch.equal(a, b) for a, b in zip(got, ref))
    lone = make()  # the DALI loader's own state, as adapters took it before they kept a position
    lone.load_state_dict(state["loader"])


def test_set_epoch_over_a_torch_dataloader_reaches_its_sampler():
    """Lightning, DINO and MoCo v3 call ``loader.sampler.set_epoch(e)``: over a torch DataLoader it raised
    "'DataLoader' object has no attribute 'set_epoch'" (Lightning's fit crashed at its first epoch)."""
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

    ds = TensorDataset(torch.arange(16))
    sampler = DistributedSampler(ds, num_replicas=2, rank=0)
    for make in (adapters.as_dino, adapters.as_solo_learn, adapters.as_dataloader):
        dl = make(DataLoader(ds, batch_size=4, sampler=sampler))
        dl.sampler.set_epoch(3)
        assert sampler.epoch == 3
        dl.set_epoch(5)
        assert sampler.epoch == 5
    plain = adapters.as_dino(DataLoader(ds, batch_size=4, shuffle=True))  # a RandomSampler: nothing to set
    plain.sampler.set_epoch(1)
    adapters.as_dataloader(plain).sampler.set_epoch(2)


@pytest.mark.parametrize("make", ["as_dino", "as_mocov3", "as_solo_learn", "as_lightly", "as_dataloader"])
def test_an_adapter_of_something_that_is_no_loader_says_so(make, tmp_path):
    """``as_dino("/data/train")`` (make_loader forgotten) had len 11, the string's, which DINO's schedules took,
    and failed later with "'str' object has no attribute 'set_epoch'"; None failed at the first batch."""
    for bad, message in (("/data/train", r"expected a loader \(make_loader\(backend, data, recipe, batch_size\) "
                                         r"or a torch DataLoader\), got '/data/train'"),
                         (tmp_path, "expected a loader"), (None, "got None"),
                         (3, r"expected a loader \(an iterable of batches\), got a int")):
        with pytest.raises(ValueError, match=f"{make.split('_')[0] if make == 'as_dataloader' else ''}.*{message}"):
            getattr(adapters, make)(bad)


def test_lightly_names_of_a_file_list_outside_its_folder_stay_below_a_common_folder(tmp_path):
    """A file list of absolute paths elsewhere gave names such as '../data/class0/0004.jpg'."""
    from sdmp_fast.data import make_synthetic_image_folder

    make_synthetic_image_folder(str(tmp_path / "data"), num_classes=2, per_class=2, size=(40, 48))
    files = list_images(str(tmp_path / "data"))
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "train.txt").write_text("".join(f"{f} {y}\n" for f, y in zip(files.files, files.labels)))
    loader = make_loader("torchvision", str(tmp_path / "lists" / "train.txt"), byol2(size=32), 4, device="cpu",
                         num_workers=0, shuffle=False)
    _, _, fnames = next(iter(adapters.as_lightly(loader)))
    assert fnames == [os.path.relpath(f, str(tmp_path / "data")) for f in files.files]
    assert all(not n.startswith("..") and "class" in n for n in fnames)


ADAPTER_MAKERS = ("as_dino", "as_mocov3", "as_solo_learn", "as_lightly", "as_dataloader")


@pytest.mark.parametrize("maker", ADAPTER_MAKERS)
def test_a_dropped_adapter_frees_its_loader_at_once_without_the_cyclic_collector(maker):
    """The adapter stored its own bound methods (state_dict, load_state_dict) on itself, and as_dataloader's
    .sampler held it: a reference cycle, so a dropped adapter kept its loader alive (worker processes, threads,
    FFCV's compiled pipeline, DALI's device memory) until the cyclic collector ran. Over torchvision workers
    that collection stalled 10 s per loader and left their temp dirs behind."""
    import gc
    import weakref

    images = torch.randint(0, 255, (32, 28, 28), dtype=torch.uint8)
    was = gc.isenabled()
    gc.disable()
    try:
        loader = make_loader("memory", images, byol2(16), 4, device="cpu")
        adapter = getattr(adapters, maker)(loader)
        next(iter(adapter))
        state = adapter.state_dict()
        refs = weakref.ref(adapter), weakref.ref(loader)
        del adapter, loader
        assert [r() for r in refs] == [None, None]
    finally:
        if was:
            gc.enable()
    assert state["batches"] == 1


def test_state_after_set_epoch_is_the_new_epochs_start_not_the_last_pass():
    """After a pass ended early (an exception) or a whole pass, set_epoch(e) for the next epoch and a checkpoint
    before its first batch: state_dict() still gave the last pass's position, so a resume replayed the old
    epoch's remaining batches (or started at the epoch after the old one) instead of epoch e from its start."""
    images = torch.randint(0, 255, (32, 28, 28), dtype=torch.uint8)

    def make():
        return adapters.as_solo_learn(make_loader("memory", images, byol2(16), 4, device="cpu", shard_id=0,
                                                  num_shards=2))

    a = make()
    a.set_epoch(0)
    with pytest.raises(KeyError):
        for k, _ in enumerate(a):
            if k == 1:
                raise KeyError
    a.set_epoch(3)
    state = a.state_dict()
    assert (state["epoch"], state["batches"]) == (3, 0)
    b = make()
    b.load_state_dict(state)
    assert next(iter(b))[0].tolist() == a.loader.sampler.indices(3)[:4].tolist()
    c = make()
    c.set_epoch(0)
    list(c)
    assert (c.state_dict()["epoch"], c.state_dict()["batches"]) == (0, 4)  # whole: a resume starts epoch 1
    c.set_epoch(5)
    assert (c.state_dict()["epoch"], c.state_dict()["batches"]) == (5, 0)
    d = make()  # a position loaded for epoch 2 stays through set_epoch(2) (Lightning's order), not set_epoch(4)
    d.load_state_dict(dict(state, epoch=2, batches=1))
    d.set_epoch(2)
    assert (d.state_dict()["epoch"], d.state_dict()["batches"]) == (2, 1)
    d.set_epoch(4)
    assert (d.state_dict()["epoch"], d.state_dict()["batches"]) == (4, 0)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copied_adapter_keeps_its_own_position(how):
    """state_dict / load_state_dict hold the adapter weakly (no reference cycle): a deepcopy's read the original's
    position, and pickling (Lightning's ddp_spawn pickles the loaders given to fit) raised "cannot pickle
    'weakref.ReferenceType'"."""
    import copy
    import pickle

    images = torch.randint(0, 255, (32, 28, 28), dtype=torch.uint8)
    original = adapters.as_solo_learn(make_loader("memory", images, byol2(16), 4, device="cpu"))
    twin = copy.deepcopy(original) if how == "deepcopy" else pickle.loads(pickle.dumps(original))
    next(iter(twin))
    assert (twin.state_dict()["batches"], original.state_dict()["batches"]) == (1, 0)
    del original
    assert twin.state_dict()["batches"] == 1
