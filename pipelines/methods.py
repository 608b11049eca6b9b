"""Attribution methods by name, built for a loaded bundle model."""

from __future__ import annotations

from collections.abc import Callable

from monai_ext.attribution import IBA, LRP, Attributor, GradCAM, HiResCAM
from pipelines.bundle import LoadedModel

__all__ = ["METHODS", "make_attributor", "check_params"]


def _iba(model: LoadedModel, **params: object) -> Attributor:
    return IBA(model.network, target_layer=model.info.get("iba_layer"), estimator=model.iba_estimator, **params)


def _igospp(model: LoadedModel, **params: object) -> Attributor:
    from monai_ext.attribution import IGOSPP

    return IGOSPP(model.network, **params)


#: name -> factory(model, **params) returning an Attributor
METHODS: dict[str, Callable[..., Attributor]] = {
    "iba": _iba,
    "hirescam": lambda model, **p: HiResCAM(model.network, target_layer=model.info.get("cam_layer"), **p),
    "gradcam": lambda model, **p: GradCAM(model.network, target_layer=model.info.get("cam_layer"), **p),
    "igospp": _igospp,
    "lrp": lambda model, **p: LRP(model.network, **p),
}


def _attributor_class(method: str) -> type:
    from monai_ext.attribution import IGOSPP

    return {"iba": IBA, "hirescam": HiResCAM, "gradcam": GradCAM, "igospp": IGOSPP, "lrp": LRP}[method]


#: what the pipeline sets itself for each attributor (not user parameters)
_SET_BY_PIPELINE = {"self", "model", "target_layer", "estimator"}


def check_params(method: str, params: dict) -> None:
    """Check attributor parameters for ``method`` before any work: known keyword arguments of its
    class, not those the pipeline sets (model, layer, IBA estimator).

    Raises:
        ValueError: unknown method, or a parameter the method does not take.
    """
    import inspect

    if method not in METHODS:
        raise ValueError(f"unknown attribution method {method!r}; choose one of {', '.join(METHODS)}")
    allowed = sorted(k for k, v in inspect.signature(_attributor_class(method).__init__).parameters.items()
                     if k not in _SET_BY_PIPELINE and v.kind not in (v.VAR_POSITIONAL, v.VAR_KEYWORD))
    bad = sorted(set(params) - set(allowed))
    if bad:
        raise ValueError(f"--param: {method} takes no parameter {', '.join(map(repr, bad))}; "
                         f"its parameters: {', '.join(allowed)}")


def make_attributor(method: str, model: LoadedModel, **params: object) -> Attributor:
    """The attributor ``method`` for the model of a bundle (IBA gets the bundle's feature estimator).

    Raises:
        ValueError: unknown method, or IBA without an estimator in the bundle.
    """
    if method not in METHODS:
        raise ValueError(f"unknown attribution method {method!r}; choose one of {', '.join(METHODS)}")
    if method == "iba" and model.iba_estimator is None:
        raise ValueError(f"the bundle {model.bundle} has no IBA feature estimator (models/iba_estimator.pt)")
    return METHODS[method](model, **params)
