"""`sdmp-fast show` draws a legible PNG grid: views and mixed views of one batch."""
import pytest
import torch
from PIL import Image

from sdmp_fast.cli import main as cli_main
from sdmp_fast.data import make_synthetic_image_folder
from sdmp_fast.pipelines.base import assemble_batch
from sdmp_fast.pipelines.recipes import byol2, dino
from sdmp_fast.pipelines.show import plot_batch, to_display


def test_to_display_undoes_the_recipe_normalisation():
    r = byol2()
    x = torch.rand(2, 3, 4, 4)
    normed = (x - torch.tensor(r.mean).view(1, 3, 1, 1)) / torch.tensor(r.std).view(1, 3, 1, 1)
    assert torch.allclose(to_display(normed, r.mean, r.std), x.permute(0, 2, 3, 1), atol=1e-6)


def test_plot_batch_has_one_row_per_view_and_mixed_view(tmp_path):
    r = dino(global_size=32, local_size=16, n_local=2, n_local_mixed=1)
    views = [torch.randn(4, 3, v.size, v.size) for v in r.expanded_views()]
    batch = assemble_batch(views, torch.zeros(4, dtype=torch.long), torch.arange(4), r, torch.Generator())
    small = plot_batch(batch, r, str(tmp_path / "a.png"), max_samples=2)
    full = plot_batch(batch, r, str(tmp_path / "b.png"))
    with Image.open(small) as a, Image.open(full) as b:
        assert a.format == b.format == "PNG"
        # 4 clean + 3 mixed rows in both; columns = samples shown.
        assert a.size[1] == b.size[1] and b.size[0] > a.size[0]


@pytest.mark.timeout(180)
def test_show_command_writes_a_png_from_a_real_loader(tmp_path, capsys):
    make_synthetic_image_folder(str(tmp_path / "data"), num_classes=2, per_class=4, size=(64, 80))
    out = tmp_path / "grid.png"
    rc = cli_main(["show", "--data", str(tmp_path / "data"), "--backend", "torchvision", "--recipe", "byol2",
                   "--batch-size", "4", "--out", str(out), "--device", "cpu", "--num-workers", "0"])
    assert rc == 0
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size[0] > 400 and im.size[1] > 400
    assert "mixed=2" in capsys.readouterr().out
