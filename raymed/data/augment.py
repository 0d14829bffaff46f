"""Training-time augmentation suited to each imaging modality, applied per sample on the batch.

A policy says what a modality tolerates. Flips only where anatomy has no side: a chest X-ray, an
abdominal CT slice or a VQA-RAD study mirrored is a different (situs inversus) patient, and a
question or report may name the side, so those get a small affine jitter at most; an ultrasound or
OCT B-scan has a depth axis (top = probe or vitreous), so only left-right flips; microscopy,
pathology and dermatoscopy have no orientation at all (flips both ways and 90° turns). Any other
dataset (your own; or every dataset under ``data.augment: generic``) gets :data:`GENERIC`: left-right
flips and a small rotation, shift and zoom, in 2D and in 3D. MedMNIST's 3D volumes are not augmented
under ``data.augment: medmnist`` (as the published tables were measured); super-resolution and
report/VQA inputs never are.

=====================================  ======  ======  =====  =======================
modality (MedMNIST flags)              h-flip  v-flip  rot90  affine (rot°, shift, scale)
=====================================  ======  ======  =====  =======================
chest X-ray (chest, pneumonia)         –       –       –      ±10°, ±8%, ±10%
abdominal CT (organa/c/s)              –       –       –      ±10°, ±8%, ±10%
breast ultrasound (breast)             ✓       –       –      ±10°, ±8%, ±10%
retinal OCT (oct)                      ✓       –       –      ±10°, ±8%, ±10%
fundus photograph (retina)             ✓       –       –      ±15°, ±8%, ±10%
pathology, blood, tissue, derma        ✓       ✓       ✓      ±8%, ±10% (no rotation: rot90 covers it)
=====================================  ======  ======  =====  =======================

Random draws come from the client's seeded stream (:meth:`ClientContext.rng`), so a rerun sees the
same augmented batches on any device.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from raymed.data.vqa_rad import ORGANS


@dataclass(frozen=True)
class Policy:
    hflip: bool = False
    vflip: bool = False
    rot90: bool = False
    degrees: float = 0.0  # uniform rotation in ±degrees
    shift: float = 0.0  # uniform translation in ±shift of the image size
    scale: float = 0.0  # uniform zoom in 1 ± scale

    @property
    def affine(self) -> bool:
        return bool(self.degrees or self.shift or self.scale)


_SIDED = Policy(degrees=10, shift=0.08, scale=0.10)  # anatomy with a side: no flips
_DEPTH = Policy(hflip=True, degrees=10, shift=0.08, scale=0.10)  # a depth axis: left-right flips only
_FREE = Policy(hflip=True, vflip=True, rot90=True, shift=0.08, scale=0.10)  # no orientation

POLICIES: dict[str, Policy] = {
    "chestmnist": _SIDED,
    "pneumoniamnist": _SIDED,
    "organamnist": _SIDED,
    "organcmnist": _SIDED,
    "organsmnist": _SIDED,
    "breastmnist": _DEPTH,
    "octmnist": _DEPTH,
    "retinamnist": Policy(hflip=True, degrees=15, shift=0.08, scale=0.10),  # left and right eyes mirror each other
    "pathmnist": _FREE,
    "bloodmnist": _FREE,
    "tissuemnist": _FREE,
    "dermamnist": _FREE,
}


# Any dataset, 2D or 3D, whose modality raymed does not know (your own data; data.augment: generic):
# left-right flips and a small in-plane rotation, shift and zoom; no vertical flips or 90° turns,
# which would change what an image with an up and a down shows.
GENERIC = Policy(hflip=True, degrees=10, shift=0.06, scale=0.08)


def policy_for(flag: str, mode: str = "medmnist") -> Policy | None:
    """The policy of a dataset under ``data.augment`` (``mode``), or None when it is not augmented:
    medmnist: a MedMNIST modality's own policy (MedMNIST volumes: none, as measured), the generic
    one for any other dataset; generic: the generic policy for every dataset; none: None."""
    if mode == "none" or flag in ORGANS or flag == "r2gen":  # a question or report may name the side
        return None
    if mode == "generic":
        return GENERIC
    from medmnist import INFO

    return POLICIES.get(flag) if flag in INFO else GENERIC


def augment(x: torch.Tensor, policy: Policy, rng: np.random.Generator) -> torch.Tensor:
    """A new batch: each image of ``x`` (N×C×H×W, or N×C×D×H×W volumes, already scaled) transformed
    by its own draw. In a volume, flips and turns act within each slice (H, W) and the affine jitter
    rotates within the slices and shifts and zooms along all three axes."""
    n, volume = len(x), x.dim() == 5
    shape = (n,) + (1,) * (x.dim() - 1)
    if policy.hflip:
        x = torch.where(_coin(rng, shape, x.device), x.flip(-1), x)
    if policy.vflip:
        x = torch.where(_coin(rng, shape, x.device), x.flip(-2), x)
    if policy.rot90:
        turns = torch.as_tensor(rng.integers(0, 4, n), device=x.device).view(shape)
        x = sum(torch.where(turns == k, torch.rot90(x, k, dims=(-2, -1)), 0.0) for k in range(4))
    if policy.affine:
        angle = np.deg2rad(rng.uniform(-policy.degrees, policy.degrees, n))
        zoom = 1.0 + rng.uniform(-policy.scale, policy.scale, n)
        shift = rng.uniform(-policy.shift, policy.shift, (n, 3 if volume else 2)) * 2  # affine_grid's coordinates span [-1, 1]
        cos, sin, zero = np.cos(angle) / zoom, np.sin(angle) / zoom, np.zeros(n)
        if volume:  # grid coordinates are (W, H, D): rotate in the W-H plane, zoom and shift all three
            rows = [[cos, -sin, zero, shift[:, 0]], [sin, cos, zero, shift[:, 1]], [zero, zero, 1 / zoom, shift[:, 2]]]
        else:
            rows = [[cos, -sin, shift[:, 0]], [sin, cos, shift[:, 1]]]
        theta = np.stack([np.stack(r, 1) for r in rows], 1)
        grid = F.affine_grid(torch.as_tensor(theta, dtype=x.dtype, device=x.device), list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return x


def _coin(rng: np.random.Generator, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    return torch.as_tensor(rng.random(shape[0]) < 0.5, device=device).view(shape)


__all__ = ["GENERIC", "POLICIES", "Policy", "augment", "policy_for"]
