"""The DALI pipelines' GPU graphs, checked where there is no GPU. Building and running them needs CUDA (the cuda-marked
tests in test_dali.py and test_dali_mix.py do that on a GPU machine); until then nothing on CI touched the
GPU variant of any pipeline. Defining the graph does not need a GPU, and DALI checks there what can be checked
without one: every operator's arguments against its schema, argument inputs on the CPU, the conditionals.

Each GPU graph (every recipe x mixing placement x conditionals, the decoder probe, the solo-learn-style
baseline) must define, every operator must have an implementation for the device it is placed on, and every
operator downstream of the decoder must run on the GPU: image work placed on the CPU by mistake would either fail
to build or copy every view back to the host."""
import pytest
import torch

pytest.importorskip("nvidia.dali")

from nvidia.dali import backend as dali_backend  # noqa: E402

from sdmp_fast.pipelines import dali_ops  # noqa: E402
from sdmp_fast.pipelines.recipes import byol2, dino  # noqa: E402

REGISTERED = {"cpu": set(dali_backend.RegisteredCPUOps()), "gpu": set(dali_backend.RegisteredGPUOps()),
              "mixed": set(dali_backend.RegisteredMixedOps())}


def _define_graph(pipe):
    # DALI 2.4 (pinned): serialize() defines the Python graph without building the backend pipeline, which a
    # GPU pipeline could not do here; the operator instances are then in pipe._ops.
    pipe.serialize()
    return pipe._ops


def _schema_name(op):
    return op._op.schema.Name()


def check_gpu_graph(pipe, n_image_outputs):
    """Operators registered for their device; everything fed (directly or not) by the mixed decoder on the GPU;
    the first n_image_outputs outputs on the GPU."""
    ops = _define_graph(pipe)
    unregistered = [(_schema_name(op), op._op.device) for op in ops
                    if _schema_name(op) not in REGISTERED[op._op.device]]
    assert not unregistered, f"operators without an implementation for their device: {unregistered}"
    decoders = [op for op in ops if op._op.device == "mixed"]
    assert decoders, "no mixed (nvJPEG) decoder in the GPU graph"
    downstream = {op.name for op in decoders}
    for op in ops:  # pipe._ops is in definition order: an operator's inputs come before it
        if any(i.source is not None and i.source.name in downstream for i in op.inputs):
            downstream.add(op.name)
            assert op._op.device in ("gpu", "mixed"), \
                f"{_schema_name(op)} ({op.name}) works on decoded images on the CPU"
    outputs = pipe._graph_out
    assert all(o.device == "gpu" for o in outputs[:n_image_outputs]), [o.device for o in outputs]
    return ops


def _recipes():
    return {"byol2": byol2(size=32), "dino": dino(global_size=32, local_size=16, n_local=4, n_local_mixed=2)}


@pytest.mark.parametrize("recipe_name", ["byol2", "dino"])
@pytest.mark.parametrize("mix_in_graph", [False, True])
@pytest.mark.parametrize("conditionals", [False, True])
def test_loader_gpu_graph_defines_with_every_op_on_the_gpu(recipe_name, mix_in_graph, conditionals):
    recipe = _recipes()[recipe_name]
    pipe = dali_ops.define_pipeline(lambda info: None, recipe, batch_size=8, num_threads=2, device_id=None,
                                    gpu=True, seed=1, conditionals=conditionals, gpu_indices=True,
                                    mix_in_graph=mix_in_graph, fp16=True,
                                    decoder_options={"hw_decoder_load": 0.9})
    n_views = len(recipe.expanded_views()) + (len(recipe.mix.mixed_views) if mix_in_graph else 0)
    ops = check_gpu_graph(pipe, n_views)
    names = {_schema_name(op) for op in ops}
    assert ("MultiPaste" in names) == mix_in_graph  # the in-graph mixing is there only when asked for
    # outputs: the views, then the indices on the CPU and on the GPU
    assert [o.device for o in pipe._graph_out[n_views:]] == ["cpu", "gpu"]


@pytest.mark.parametrize("recipe_name", ["byol2", "dino"])
def test_crop_only_gpu_graph_for_torch_photometric(recipe_name):
    """photometric='torch': decode and crop on the GPU, nothing else of the recipe in the graph."""
    recipe = _recipes()[recipe_name]
    pipe = dali_ops.define_pipeline(lambda info: None, recipe, batch_size=8, num_threads=2, device_id=None,
                                    gpu=True, seed=1, gpu_indices=True, photometric="torch")
    ops = check_gpu_graph(pipe, len(recipe.expanded_views()))
    names = {_schema_name(op) for op in ops}
    assert not names & {"ColorTwist", "GaussianBlur", "CropMirrorNormalize", "MultiPaste"}, names
    assert {"RandomResizedCrop", "Transpose"} <= names


def test_probe_gpu_graph_defines():
    pipe = dali_ops.define_probe_pipeline(None, {"hw_decoder_load": 0.9}, gpu=True)
    check_gpu_graph(pipe, 1)


@pytest.mark.parametrize("recipe_name", ["byol2", "dino"])
def test_solo_learn_baseline_gpu_graph_defines(tmp_path, recipe_name):
    from sdmp_fast.benchmarks.baselines import solo_learn_pipeline
    from sdmp_fast.data import make_synthetic_image_folder
    from sdmp_fast.pipelines.base import list_images

    images = list_images(make_synthetic_image_folder(str(tmp_path / "data"), 2, 4))
    recipe = _recipes()[recipe_name]
    pipe = solo_learn_pipeline(images, recipe, 4, gpu=True, device_id=None, dtype=torch.float16)
    check_gpu_graph(pipe, len(recipe.expanded_views()))


def test_a_cpu_operator_on_decoded_images_is_caught():
    """The check itself: a graph that sends decoded images through a CPU operator fails it."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=2, num_threads=1, device_id=None)
    def graph():
        encoded = fn.external_source(source=lambda: None, batch=True, dtype=types.UINT8, ndim=1)
        images = fn.decoders.image(encoded, device="mixed")
        return fn.resize(images.cpu(), size=8)

    with pytest.raises(AssertionError, match="on the CPU"):
        check_gpu_graph(graph(), 1)


def test_an_unknown_argument_fails_at_definition():
    """What the GPU graphs lean on: DALI checks arguments when the graph is defined, with no GPU."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=2, num_threads=1, device_id=None)
    def graph():
        encoded = fn.external_source(source=lambda: None, batch=True, dtype=types.UINT8, ndim=1)
        return fn.resize(fn.decoders.image(encoded, device="mixed"), sizee=8)

    with pytest.raises(Exception, match="sizee"):
        _define_graph(graph())
