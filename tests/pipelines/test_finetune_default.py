"""``scripts/train_default_model.py --init``: fine-tuning starts from a trained bundle's weights and keeps
its network and input settings."""

from __future__ import annotations

import torch

from pipelines.bundle import load_model
from pipelines.train import train_bundle


def test_init_overrides_start_from_the_source_weights(tiny_bundle, tiny_studies, tmp_path, script,
                                                       torch_single_thread):
    source = load_model(tiny_bundle)
    overrides = script("train_default_model").init_overrides(tiny_bundle)
    # the source's input (64 px, not train.json's 192) and layers come along
    assert overrides["size"] == source.size == 64
    assert overrides["cam_layer"] == source.info["cam_layer"]
    out = tmp_path / "tuned"
    with torch_single_thread():
        info = train_bundle(tiny_studies, out, epochs=1, overrides={**overrides, "learning_rate": 1e-12})
    assert info["input"]["size"] == 64
    tuned = load_model(out)
    before, after = source.network.state_dict(), tuned.network.state_dict()
    # a vanishing learning rate leaves every weight where the source had it (batch-norm statistics move);
    # a network trained from scratch would share none of them
    convs = [k for k in before if k.endswith("weight") and before[k].ndim == 4]
    assert len(convs) > 5
    for k in convs:
        torch.testing.assert_close(after[k], before[k], rtol=0, atol=1e-6)
