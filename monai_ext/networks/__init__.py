"""Classifier factory over MONAI networks, and the default layers attribution methods use."""

from __future__ import annotations

from monai_ext.networks.factory import CLASSIFIERS, build_classifier, default_cam_layer, default_iba_layer

__all__ = ["CLASSIFIERS", "build_classifier", "default_cam_layer", "default_iba_layer"]
