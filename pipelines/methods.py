"""Attribution methods by name, built for a loaded bundle model."""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Sequence

from monai_ext.attribution import IBA, IGOSPP, LRP, Attributor, GradCAM, HiResCAM
from pipelines.bundle import LoadedModel

__all__ = ["METHODS", "CLASSES", "make_attributor", "check_params", "parse_params"]


#: name -> attributor class; the pipeline binds the model's network, layers and IBA estimator itself
CLASSES: dict[str, type[Attributor]] = {"iba": IBA, "hirescam": HiResCAM, "gradcam": GradCAM, "igospp": IGOSPP,
                                        "lrp": LRP}
#: constructor arguments the pipeline sets from the bundle (not user parameters)
_SET_BY_PIPELINE = {"self", "model", "target_layer", "estimator"}


def _bound(method: str, model: LoadedModel) -> dict:
    """The constructor arguments of ``method`` that come from the bundle."""
    if method == "iba":
        return {"target_layer": model.info.get("iba_layer"), "estimator": model.iba_estimator}
    if method in ("hirescam", "gradcam"):
        return {"target_layer": model.info.get("cam_layer")}
    return {}


def _factory(method: str) -> Callable[..., Attributor]:
    def build(model: LoadedModel, **params: object) -> Attributor:
        return CLASSES[method](model.network, **_bound(method, model), **params)

    return build


#: name -> factory(model, **params) returning an Attributor
METHODS: dict[str, Callable[..., Attributor]] = {name: _factory(name) for name in CLASSES}


def parse_params(items: Sequence[str] | None, methods: Sequence[str]) -> dict[str, dict]:
    """``["iba.steps=3", "igospp.iterations=5"]`` -> ``{"iba": {"steps": 3}, ...}`` (JSON values, else
    strings), for ``--param`` options.

    Raises:
        ValueError: an item that is not ``METHOD.KEY=VALUE`` or names a method not in ``methods``.
    """
    out: dict[str, dict] = {}
    for item in items or ():
        head, sep, value = str(item).partition("=")
        method, dot, key = head.partition(".")
        if not sep or not dot or not key.strip():
            raise ValueError(f"--param expects METHOD.KEY=VALUE, got {item!r}")
        method = method.strip().lower()
        if method not in methods:
            raise ValueError(f"--param {item!r}: unknown method {method!r}; choose from {', '.join(methods)}")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        out.setdefault(method, {})[key.strip()] = parsed
    return out


def check_params(method: str, params: dict) -> None:
    """Check attributor parameters for ``method`` before any work: keyword arguments of its class,
    not those the pipeline sets (model, layer, IBA estimator).

    Raises:
        ValueError: unknown method, or a parameter the method does not take.
    """
    if method not in CLASSES:
        raise ValueError(f"unknown attribution method {method!r}; choose one of {', '.join(CLASSES)}")
    allowed = sorted(k for k, v in inspect.signature(CLASSES[method].__init__).parameters.items()
                     if k not in _SET_BY_PIPELINE and v.kind not in (v.VAR_POSITIONAL, v.VAR_KEYWORD))
    bad = sorted(set(params) - set(allowed))
    if bad:
        raise ValueError(f"--param: {method} takes no parameter {', '.join(map(repr, bad))}; "
                         f"its parameters: {', '.join(allowed)}")


def make_attributor(method: str, model: LoadedModel, **params: object) -> Attributor:
    """The attributor ``method`` for the model of a bundle (IBA gets the bundle's feature estimator; the
    bundle's own method parameters apply unless ``params`` override them).

    Raises:
        ValueError: unknown method, or IBA without an estimator in the bundle.
    """
    if method not in METHODS:
        raise ValueError(f"unknown attribution method {method!r}; choose one of {', '.join(METHODS)}")
    if method == "iba" and model.iba_estimator is None:
        raise ValueError(f"the bundle {model.bundle} has no IBA feature estimator (models/iba_estimator.pt)")
    return METHODS[method](model, **{**model.method_defaults(method), **params})
