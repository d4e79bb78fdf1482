"""JRCL's stage-1 recipe: joint representation and classifier learning (Guan et al.; METHODS.md section 3).

``L = CE + L_SCL(one-to-all) + L_BDC + CE_aux``: the losses are in :mod:`ltcore.losses.jrcl`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ltcore.losses import BDCLoss, OneToAllSupConLoss, binary_targets
from ltcore.methods._recipe import PaperRecipe, Stage1Recipe, ce_from_config, check_proj_dim, fp32, require, two_views

__all__ = ["JRCLRecipe", "build", "normal_class_index"]


class JRCLRecipe(PaperRecipe):
    """JRCL: ``L = CE(z) + L_SCL + L_BDC(z, z_aux) + CE(z_aux, normal/abnormal)`` (METHODS.md section 3).

    ``L_SCL`` is :class:`~ltcore.losses.OneToAllSupConLoss` on the two weak views' embeddings ``(N, 2, P)``
    with learnable class centres owned by the recipe (``state_modules()['scl']``); ``L_BDC`` is
    :class:`~ltcore.losses.BDCLoss` (KL, or JS with ``symmetric``) between the multi-class head's
    normal/abnormal split and the auxiliary 2-way head, which is itself trained with CE on
    :func:`~ltcore.losses.binary_targets`. All weights are 1 (**interpretation**: the paper gives the sum
    unweighted). The classification terms (CE, BDC, auxiliary CE) use the first view.

    Args:
        criterion: the classification loss (CE).
        num_classes: C.
        proj_dim: P, the embedding dimension.
        normal_index: index of the normal class (``nv`` on HAM10000, ``No Finding`` on chest X-ray).
        temperature: tau of the one-to-all SupCon (0.1).
        bdc_symmetric: JS instead of KL.
        seed: seed of the class centres.
    """

    needs_projector = True
    needs_aux_binary = True
    views = ("weak", "weak")

    def __init__(self, *, criterion: nn.Module, num_classes: int, proj_dim: int, normal_index: int,
                 temperature: float = 0.1, bdc_symmetric: bool = False, seed: int = 0) -> None:
        super().__init__(criterion)
        self.normal_index = int(normal_index)
        self.scl = OneToAllSupConLoss(num_classes, proj_dim, temperature=temperature, seed=seed)
        self.bdc = BDCLoss(normal_index, symmetric=bdc_symmetric)

    def state_modules(self) -> nn.ModuleDict:
        return nn.ModuleDict({"criterion": self.criterion, "scl": self.scl, "bdc": self.bdc})

    def loss(
        self, model: nn.Module, batch: dict[str, torch.Tensor], epoch: int
    ) -> tuple[torch.Tensor, dict[str, float]]:
        y = batch["label"]
        n = y.shape[0]
        out = model(two_views(batch, "jrcl"))
        emb = require(out, "embedding", "jrcl", "proj_dim > 0")  # (2N, P)
        aux = require(out, "aux_logits", "jrcl", "aux_binary=True")[:n]  # (N, 2)
        logits = out["logits"][:n]  # (N, C)
        ce = self.criterion(logits, y)
        with fp32(y.device):
            scl = self.scl(torch.stack([emb[:n], emb[n:]], dim=1).float(), y)  # features (N, 2, P)
            bdc = self.bdc(logits.float(), aux.float())
            aux_ce = F.cross_entropy(aux.float(), binary_targets(y, self.normal_index))
        loss = ce + scl + bdc + aux_ce
        logs = {"ce": float(ce.detach()), "scl": float(scl.detach()), "bdc": float(bdc.detach()),
                "aux_ce": float(aux_ce.detach())}
        return loss, logs


def normal_class_index(normal_class: str, classes: Sequence[str]) -> int:
    """Index of ``loss.normal_class`` in ``classes``.

    Raises:
        ValueError: if the class is not one of ``classes``.
    """
    names = list(classes)
    if normal_class not in names:
        raise ValueError(f"loss.normal_class {normal_class!r} is not a class of this dataset; choose one of "
                         f"{', '.join(map(str, names))}")
    return names.index(normal_class)


def build(*, loss_cfg: Any, class_counts: Sequence[int], classes: Sequence[str], proj_dim: int,
          **_: Any) -> Stage1Recipe:
    """``stage1.method=jrcl`` from config: ``loss.normal_class`` (must be a class), ``loss.bdc_symmetric``."""
    dim = check_proj_dim("jrcl", proj_dim)
    return JRCLRecipe(criterion=ce_from_config(loss_cfg), num_classes=len(class_counts), proj_dim=dim,
                      normal_index=normal_class_index(loss_cfg.normal_class, classes),
                      temperature=loss_cfg.temperature, bdc_symmetric=loss_cfg.bdc_symmetric)
