"""Model registry (timm-style): ``@register_model("name")`` backbones, wrapped with one head per dataset.

The registry and the parts every model shares live in :mod:`raymed.models.base`; the built-in
backbones register themselves when this package is imported: ``cnn`` and ``cnn_large``
(:mod:`~raymed.models.cnn`), ``cnn_gn`` and ``cnn_bn`` (:mod:`~raymed.models.norm_cnn`), ``resnet18``
and ``resnet18_gn`` (:mod:`~raymed.models.resnet`).
"""

from raymed.models import cnn, norm_cnn, resnet  # noqa: F401  (each registers its backbones)
from raymed.models.base import (
    MODELS,
    SHARED_HEAD,
    Backbone,
    BackboneFactory,
    FedModel,
    LinearHead,
    SuperResolutionHead,
    VQAHead,
    build_backbone,
    build_model,
    feature_grid,
    images_of,
    make_head,
    make_heads,
    reads_map,
    register_model,
)

__all__ = [
    "MODELS",
    "SHARED_HEAD",
    "Backbone",
    "BackboneFactory",
    "FedModel",
    "LinearHead",
    "SuperResolutionHead",
    "VQAHead",
    "build_backbone",
    "build_model",
    "feature_grid",
    "images_of",
    "make_head",
    "make_heads",
    "reads_map",
    "register_model",
]
