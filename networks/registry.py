"""One registry for every target architecture: ``networks.build(name, num_classes, **kwargs)``."""
from __future__ import annotations

import importlib
import inspect
import json
import re
from typing import Any, Iterable

import torchvision
from torch import nn

from .cifar_resnet import CifarResNet
from .vgg import CifarVGG

_CIFAR_RESNET = re.compile(r"^(?:cifar_)?resnet(\d+)_cifar$|^cifar_resnet(\d+)$")
TIMM_PREFIX = "timm:"
_VIT_CIFAR = {"image_size": 32, "patch_size": 4, "num_layers": 4, "num_heads": 4, "hidden_dim": 64,
              "mlp_dim": 128}


def available() -> list[str]:
    """Names accepted by :func:`build` (CIFAR nets plus every torchvision classifier). Also
    accepted, not listed: ``timm:<name>`` for any name of ``timm.list_models()`` and
    ``package.module:Class``."""
    cifar = [f"resnet{d}_cifar" for d in (20, 32, 44, 56, 110)] + ["vgg19_bn_cifar", "vit_cifar"]
    return cifar + sorted(torchvision.models.list_models(module=torchvision.models))


def build(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    """Build an untrained target network.

    ``resnet<depth>_cifar`` (depth 6n+2) and ``vgg19_bn_cifar`` accept ``width`` (a channel
    multiplier for CPU-scale runs). ``vit_cifar`` is torchvision's VisionTransformer at CIFAR
    scale (32x32 images, patch 4, depth 4, 4 heads, width 64, MLP 128; each overridable by
    keyword). ``package.module:Class`` builds a user's own ``nn.Module`` class (importable from
    where the command runs), with ``kwargs`` and, when its constructor takes it,
    ``num_classes``. ``timm:<name>`` builds ``timm.create_model(name, pretrained=False,
    num_classes=num_classes, **kwargs)`` (timm must be installed). Any other name is looked up
    among torchvision's classification models and built with ``weights=None`` (nothing is ever
    downloaded).
    """
    if name.startswith(TIMM_PREFIX):
        return _timm_model(name, num_classes, kwargs)
    if ":" in name:
        return _user_class(name, num_classes, kwargs)
    m = _CIFAR_RESNET.match(name)
    if m:
        return CifarResNet(depth=int(m.group(1) or m.group(2)), num_classes=num_classes, **kwargs)
    if name == "vgg19_bn_cifar":
        return CifarVGG(num_classes=num_classes, **kwargs)
    if name == "vit_cifar":
        return torchvision.models.VisionTransformer(
            **{**_VIT_CIFAR, **kwargs}, num_classes=num_classes)
    if name in torchvision.models.list_models(module=torchvision.models):
        if kwargs.get("weights") not in (None,):
            raise ValueError(
                f"network {name!r}: pretrained torchvision weights are never downloaded here; "
                "pass weights=None and load a local checkpoint instead"
            )
        kwargs.pop("weights", None)
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    raise ValueError(
        f"unknown network {name!r}. Use resnet<6n+2>_cifar (e.g. resnet56_cifar), vgg19_bn_cifar, vit_cifar, "
        f"a torchvision classifier name such as resnet50 or mobilenet_v2, a timm model as "
        f"timm:<name> (e.g. timm:convnext_atto; names from timm.list_models()), or your own class "
        f"as package.module:Class"
    )



def build_arch(arch: dict[str, Any]) -> nn.Module:
    """The untrained, unpruned network an architecture record names (``{"name",
    "num_classes", "kwargs"}``, as network files store it): what speed-ups are measured
    against."""
    return build(arch["name"], arch["num_classes"], **arch.get("kwargs", {}))


def plain_arch(arch: dict[str, Any]) -> dict[str, Any]:
    """An architecture record reduced to what names the architecture (name, classes, kwargs),
    comparable with ``==``."""
    return {"name": arch["name"], "num_classes": arch["num_classes"],
            "kwargs": dict(arch.get("kwargs") or {})}


def distinct_architectures(archs: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The distinct architecture records among ``archs``, in a fixed order."""
    unique = {json.dumps(plain_arch(a), sort_keys=True): plain_arch(a) for a in archs}
    return [unique[k] for k in sorted(unique)]


def describe_arch(arch: dict[str, Any]) -> str:
    """``resnet20_cifar (width=0.5), 10 classes``: an architecture record for messages."""
    kwargs = ", ".join(f"{k}={v}" for k, v in sorted((arch.get("kwargs") or {}).items()))
    return f"{arch['name']}{f' ({kwargs})' if kwargs else ''}, {arch['num_classes']} classes"


def _timm_model(name: str, num_classes: int, kwargs: dict[str, Any]) -> nn.Module:
    """``timm:<model>``, untrained; timm is imported only here (an optional dependency)."""
    model_name = name[len(TIMM_PREFIX):]
    if kwargs.get("pretrained"):
        raise ValueError(f"network {name!r}: pretrained timm weights are never downloaded here; "
                         "load a local checkpoint instead")
    kwargs = {k: v for k, v in kwargs.items() if k != "pretrained"}
    try:
        import timm
    except ImportError:
        raise ValueError(f"network {name!r}: timm is not installed; pip install timm") from None
    if not timm.is_model(model_name):
        raise ValueError(f"network {name!r}: timm has no model {model_name!r}; "
                         "timm.list_models() lists its names (e.g. timm.list_models('convnext*'))")
    try:
        return timm.create_model(model_name, pretrained=False, num_classes=num_classes, **kwargs)
    except TypeError as e:
        raise ValueError(f"network {name!r} with arguments {kwargs}: {e}") from None


def _user_class(name: str, num_classes: int, kwargs: dict[str, Any]) -> nn.Module:
    """``package.module:Class(**kwargs[, num_classes=...])``, every failure named."""
    module_name, _, class_name = name.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except ImportError as e:
        raise ValueError(f"network {name!r}: module {module_name!r} cannot be imported ({e}); "
                         "run from the folder that holds it, or install it") from None
    except AttributeError:
        raise ValueError(f"network {name!r}: module {module_name!r} has no {class_name!r}") from None
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"network {name!r}: {class_name!r} is not an nn.Module class")
    params = inspect.signature(cls).parameters
    if "num_classes" in params:
        kwargs = {**kwargs, "num_classes": num_classes}
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ValueError(f"network {name!r} with arguments {kwargs}: {e}") from None
