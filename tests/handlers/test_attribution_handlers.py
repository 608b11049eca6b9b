"""AttributionHandler + HeatmapSaver inside a MONAI evaluator, on a synthetic study."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import nibabel as nib
import numpy as np
import pytest
import torch
from ignite.engine import Events
from monai.data import DataLoader
from monai.engines import SupervisedEvaluator
from torch import nn

from monai_ext.attribution import Attributor, HiResCAM
from monai_ext.handlers import AttributionHandler, HeatmapSaver
from monai_ext.io import load_ct

SHAPE = (36, 34, 5)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The CPU is shared: one intra-op thread avoids OpenMP spinning against other processes."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class Echo(Attributor):
    """Returns the (first channel of the) input: the written volume must reproduce the input."""

    def attribute(self, x: torch.Tensor, target: int | Sequence[int] | torch.Tensor | None) -> torch.Tensor:
        return x[:, :1]


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(conv=nn.Conv2d(1, 4, 3, padding=1), relu=nn.ReLU(),
                                     pool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(), fc=nn.Linear(4, 2)))


@pytest.fixture()
def study(tmp_path):
    """A small HU volume stored in LPS-like orientation (so that RAS processing flips two axes)."""
    rng = np.random.default_rng(0)
    data = np.full(SHAPE, -1000.0, dtype=np.float32)
    data[4:30, 3:29, :] = rng.normal(30, 200, size=(26, 26, SHAPE[2]))
    affine = np.array([[-0.7, 0, 0, 90.0], [0, -0.7, 0, 110.0], [0, 0, 2.5, -40.0], [0, 0, 0, 1]])
    path = tmp_path / "study_01.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path, data, affine


def slice_items(path, select=None) -> list[dict]:
    vol = load_ct(path)  # (1, X, Y, Z) RAS, with the input grid in its metadata
    arr = vol.as_tensor()
    depth = arr.shape[-1]
    idx = list(range(depth)) if select is None else select
    return [{"image": arr[..., i].clone(), "label": torch.tensor(0), "study_id": str(path), "slice_index": i,
             "num_slices": len(idx), "volume_shape": torch.tensor(arr.shape[1:]),
             "volume_affine": torch.as_tensor(vol.affine, dtype=torch.float64), "reference": str(path)}
            for i in idx]


def run(items, handlers, batch_size=2, decollate=True):
    net = tiny_net()
    loader = DataLoader(items, batch_size=batch_size)
    evaluator = SupervisedEvaluator(device=torch.device("cpu"), val_data_loader=loader, network=net,
                                    decollate=decollate)
    for h in handlers:
        h.attach(evaluator)
    evaluator.run()
    return evaluator, net


@pytest.mark.parametrize("decollate", [True, False])
def test_volume_written_voxel_exactly_on_the_input_grid(study, tmp_path, decollate):
    path, data, affine = study
    saver = HeatmapSaver(tmp_path / "out")
    evaluator, net = run(slice_items(path), [AttributionHandler(Echo(tiny_net())), saver], decollate=decollate)
    out = saver.written[str(path)]
    assert out.name == "study_01_heatmap.nii.gz" and out.exists()
    img = nib.load(str(out))
    assert img.shape == SHAPE
    np.testing.assert_allclose(img.affine, affine, atol=1e-4)
    np.testing.assert_allclose(np.asarray(img.dataobj), data, atol=1e-3)  # echo of the input: same voxels


def test_real_attributor_maps_in_output_and_partial_study(study, tmp_path):
    path, _, affine = study
    net = tiny_net()
    handler = AttributionHandler(HiResCAM(net, "relu"), output_key="heat", target="label")
    seen = []

    def grab(engine):
        seen.extend(item["heat"].shape for item in engine.state.output)

    saver = HeatmapSaver(tmp_path / "out", heatmap_key="heat", output_postfix="hirescam")
    items = slice_items(path, select=[1, 3])  # slices without lung are never seen: zero in the volume
    for item in items:
        item["num_slices"] = 3  # one slice missing: the study is written at the end of the epoch
    evaluator = SupervisedEvaluator(device=torch.device("cpu"), val_data_loader=DataLoader(items, batch_size=2),
                                    network=net)
    handler.attach(evaluator)
    evaluator.add_event_handler(Events.ITERATION_COMPLETED, grab)
    saver.attach(evaluator)
    with pytest.warns(UserWarning, match="2 of 3 slices"):
        evaluator.run()
    assert seen == [(1, SHAPE[0], SHAPE[1])] * 2
    img = nib.load(str(saver.written[str(path)]))
    vol = np.asarray(img.dataobj)
    assert img.shape == SHAPE and np.allclose(img.affine, affine, atol=1e-4)
    assert vol.min() >= 0
    assert not vol[:, :, [0, 2, 4]].any()


def test_saver_without_reference_writes_processing_grid(study, tmp_path):
    path, _, _ = study
    items = slice_items(path)
    for item in items:
        del item["reference"], item["num_slices"]
    saver = HeatmapSaver(tmp_path / "out")
    run(items, [AttributionHandler(Echo(tiny_net())), saver], batch_size=3)
    img = nib.load(str(saver.written[str(path)]))
    ras = load_ct(path)
    assert img.shape == tuple(ras.shape[1:])
    np.testing.assert_allclose(img.affine, ras.affine.numpy(), atol=1e-4)
    np.testing.assert_allclose(np.asarray(img.dataobj), ras[0].numpy(), atol=1e-3)


def test_errors(study, tmp_path):
    path, _, _ = study
    items = slice_items(path)
    for item in items:
        del item["slice_index"]
    with pytest.raises(ValueError, match="slice_index"):
        run(items, [AttributionHandler(Echo(tiny_net())), HeatmapSaver(tmp_path)])
    with pytest.raises(ValueError, match="AttributionHandler"):
        run(slice_items(path), [HeatmapSaver(tmp_path)])
    with pytest.raises(TypeError):
        AttributionHandler(tiny_net())  # type: ignore[arg-type]
