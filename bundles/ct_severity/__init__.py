"""The embedded ct-severity MONAI bundle, installed as package data.

This package holds no code: it carries the bundle's ``configs/``, ``models/`` and ``docs/`` (model
card and data licences) into wheels and installs, where :func:`pipelines.bundle.embedded_bundle` finds
them with ``importlib.resources.files("ct_severity")``.
"""
