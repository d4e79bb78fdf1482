"""Stage-1 recipes of the five papers (METHODS.md sections 1-5), registered by name for ``stage1.method``.

======================  ==================================================================================
name                    loss
======================  ==================================================================================
``proco``               ``CE + proco_lambda * L_pl`` (ProCo, Yang, Pan et al., MICCAI 2022, arXiv 2209.00183)
``metric``              ``CE + lambda * L_metric`` (Zeng et al., arXiv 2207.06975): batch-hard triplet,
                        class-centre triplet or SupCon, chosen by ``loss.metric_loss``; lambda 0.03 / 0.07 /
                        1.0 unless ``loss.metric_lambda`` is set
``jrcl``                ``CE + L_SCL(one-to-all) + L_BDC + CE_aux`` (JRCL, Guan et al.)
``lmd_rrl``             ``CE + [epoch > rrl_start_epoch] * L_RRL`` against an EMA teacher (LMD stage 1,
                        Pan et al., arXiv 2502.03238)
``spmix``               ``CE`` on SPMix images (Wei et al., arXiv 2406.10801); any other recipe composes with
                        SPMix through ``loss.spmix=true`` (:func:`with_augmentations`)
======================  ==================================================================================

Engine contract (beyond :class:`~ltcore.methods.recipes.Stage1Recipe`):

- ``setup(model)`` must be called once with the freshly built :class:`~ltcore.models.LTModel`, *before*
  ``state_modules()``: ProCo sizes its query projector from ``model.feat_dim`` and LMD copies the model into
  its teacher. Both then live in ``state_modules()`` so that they are moved to the device, checkpointed and
  (for learnable ones) optimised and all-reduced with the model.
- The recipes' own learnable modules (ProCo's projector G, JRCL's class centres) are used *outside* the DDP
  forward. DDP allows that only with ``find_unused_parameters=False`` (with ``True`` it fails with "Expected
  to mark a variable ready only once"), so every recipe here sets ``find_unused_parameters = False`` and makes
  every trainable parameter take part in every step's loss.
- Contrastive and relation terms are computed in float32 with autocast off (they exponentiate similarities
  divided by small temperatures, and the FGSM / Cholesky steps need full precision).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
from torch import nn

from ltcore.augment.spmix import SPMix
from ltcore.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from ltcore.losses import (
    BatchHardTripletLoss,
    BDCLoss,
    ClassCentreTripletLoss,
    CrossEntropyLoss,
    OneToAllSupConLoss,
    ProCoLoss,
    RelationDistillationLoss,
    SupConLoss,
    binary_targets,
    ema_alpha,
    ema_update_,
)
from ltcore.losses.lmd import active
from ltcore.methods.recipes import Stage1Recipe, register_stage1
from ltcore.models.heads import ProjectionMLP

__all__ = [
    "JRCLRecipe",
    "LMDRRLRecipe",
    "MetricRecipe",
    "ProCoRecipe",
    "SPMixRecipe",
    "gather_rows",
    "with_augmentations",
]


# ---------------------------------------------------------------------------------------------------------------
# small helpers


def _world_size() -> int:
    if torch_dist.is_available() and torch_dist.is_initialized():
        return torch_dist.get_world_size()
    return 1


def _rank() -> int:
    if torch_dist.is_available() and torch_dist.is_initialized():
        return torch_dist.get_rank()
    return 0


def gather_rows(t: torch.Tensor, *, differentiable: bool = False) -> torch.Tensor:
    """Concatenate ``t (n_r, ...)`` of every rank along dim 0, in rank order; ``t`` itself when not distributed.

    Ranks may hold different row counts (the last batch of an epoch): sizes are exchanged first and rows are
    padded to the largest count for the collective, then trimmed. With ``differentiable=True`` the gather is
    autograd-aware (``torch.distributed.nn``): its backward sums, over ranks, the gradient each rank's loss sends
    to this rank's rows, so a loss computed identically on every rank from the gathered rows, followed by DDP's
    gradient averaging, yields exactly the gradient of that global loss. Otherwise the result is detached.
    """
    world = _world_size()
    if world == 1:
        return t if differentiable else t.detach()
    n = torch.tensor([t.shape[0]], device=t.device, dtype=torch.long)
    sizes_t = [torch.zeros_like(n) for _ in range(world)]
    torch_dist.all_gather(sizes_t, n)
    sizes = [int(s) for s in sizes_t]
    pad = max(sizes) - t.shape[0]
    padded = torch.cat([t, t.new_zeros((pad, *t.shape[1:]))]) if pad else t
    if differentiable:
        from torch.distributed.nn.functional import all_gather

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # deprecated in favour of a private API; still correct
            parts = list(all_gather(padded))
    else:
        parts = [torch.empty_like(padded) for _ in range(world)]
        torch_dist.all_gather(parts, padded.detach().contiguous())
    return torch.cat([p[:s] for p, s in zip(parts, sizes)])


@contextmanager
def _fp32(device: torch.device) -> Iterator[None]:
    """Autocast off for the block (the caller casts its inputs with ``.float()``)."""
    with torch.autocast(device_type=device.type, enabled=False):
        yield


def _ce(loss_cfg: Any) -> nn.Module:
    return CrossEntropyLoss(label_smoothing=loss_cfg.label_smoothing)


def _check_proj_dim(method: str, proj_dim: int) -> int:
    if proj_dim < 1:
        raise ValueError(f"model.proj_dim must be >= 1 for stage1.method={method!r} (it trains a projection), "
                         f"got {proj_dim}")
    return int(proj_dim)


def _two_views(batch: dict[str, torch.Tensor], method: str) -> torch.Tensor:
    """``image`` and ``image2`` stacked into one batch ``(2N, C, H, W)`` (one forward, shared BN statistics)."""
    if "image2" not in batch:
        raise ValueError(f"stage1.method={method!r} needs two views: the batch must carry 'image2' "
                         "(ingest with the recipe's views)")
    return torch.cat([batch["image"], batch["image2"]], dim=0)


def _require(out: dict[str, torch.Tensor], key: str, method: str, what: str) -> torch.Tensor:
    if key not in out:
        raise ValueError(f"stage1.method={method!r} needs the model's {key!r} output; build the model with {what}")
    return out[key]


class _PaperRecipe(Stage1Recipe):
    """Shared defaults: DDP without unused-parameter search (see module docstring) and a no-op ``setup``."""

    find_unused_parameters = False

    def setup(self, model: nn.Module) -> None:
        """Bind to the freshly built LTModel before ``state_modules()``; no-op unless a recipe needs the model."""


# ---------------------------------------------------------------------------------------------------------------
# 1. ProCo


class ProCoRecipe(_PaperRecipe):
    """ProCo: ``L = CE(head(f)) + lambda * L_pl(q, q.detach(), y)`` (METHODS.md section 1; arXiv 2209.00183).

    Two projectors on the backbone features ``h (N, D)``, both trained:

    - F, the image-feature projector, is a neck the recipe puts into the model (:meth:`LTModel.set_neck`, an
      MLP D -> D -> D): ``f = F(h)`` is what the model's classifier head reads, so F learns through the CE
      term, and prediction, stage-2 calibrators and checkpoints all see ``f``;
    - G, the query projector (:class:`~ltcore.models.heads.ProjectionMLP`, D -> D -> P, L2-normalised), owned
      by the recipe (``state_modules()['query_head']``): ``q = G(h)`` feeds the proto-loss, so G learns
      through ``L_pl`` (and the backbone through both terms).

    **Interpretation** (METHODS.md leaves the key encoder open): no momentum copy of G; the keys are the
    batch's own queries, detached (``k = q.detach()``), so the prototypes are EMAs of q and the queue holds
    detached q. Prototype/queue updates happen in ``after_step`` (after the optimiser step, as ``ProCoLoss``
    asks), with the batch's keys and labels gathered from every rank (no grad) so all ranks keep identical state.

    Args:
        criterion: the classification loss on the logits (CE).
        num_classes: C.
        proj_dim: P, the dimension of q, prototypes and queue.
        class_counts: training count per class (C,), for the prototype recalibration weights.
        lam: weight of ``L_pl`` (1 in METHODS.md).
        temperature, momentum, queue_size, fgsm_eps, recal_gamma: :class:`~ltcore.losses.ProCoLoss` settings.
        seed: seeds the initial prototypes and the initial weights of F and G (identical on every rank).
    """

    def __init__(
        self,
        *,
        criterion: nn.Module,
        num_classes: int,
        proj_dim: int,
        class_counts: Sequence[int],
        lam: float = 1.0,
        temperature: float = 0.1,
        momentum: float = 0.99,
        queue_size: int = 4096,
        fgsm_eps: float = 0.1,
        recal_gamma: float = 0.5,
        seed: int = 0,
    ) -> None:
        super().__init__(criterion)
        if lam < 0:
            raise ValueError(f"loss.proco_lambda must be >= 0, got {lam}")
        self.lam = float(lam)
        self.proj_dim = int(proj_dim)
        self.seed = int(seed)
        self.proco = ProCoLoss(num_classes, proj_dim, class_counts, temperature=temperature, momentum=momentum,
                               queue_size=queue_size, fgsm_eps=fgsm_eps, recal_gamma=recal_gamma, seed=seed)
        self.query_head: ProjectionMLP | None = None
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None

    def setup(self, model: nn.Module) -> None:
        """Install F as the model's neck (unless it has one: a resumed model) and build G, both seeded."""
        feat_dim = int(model.feat_dim)  # type: ignore[arg-type]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            if getattr(model, "neck", None) is None:
                model.set_neck()  # type: ignore[operator]
            self.query_head = ProjectionMLP(feat_dim, feat_dim, self.proj_dim)

    def state_modules(self) -> nn.ModuleDict:
        if self.query_head is None:
            raise RuntimeError("ProCoRecipe.setup(model) must be called before state_modules()")
        return nn.ModuleDict({"criterion": self.criterion, "proco": self.proco, "query_head": self.query_head})

    def loss(
        self, model: nn.Module, batch: dict[str, torch.Tensor], epoch: int
    ) -> tuple[torch.Tensor, dict[str, float]]:
        if self.query_head is None:
            raise RuntimeError("ProCoRecipe.setup(model) must be called before loss()")
        y = batch["label"]
        out = model(batch["image"])
        h = _require(out, "backbone_features", "proco", "the neck ProCoRecipe.setup installs")  # (N, D)
        ce = self.criterion(out["logits"], y)  # logits = head(F(h))
        with _fp32(y.device):
            q = self.query_head(h.float())  # (N, P)
            k = q.detach()  # (N, P)
            l_pl = self.proco(q, k, y)
        self._pending = (gather_rows(k), gather_rows(y))
        return ce + self.lam * l_pl, {"ce": float(ce.detach()), "proco": float(l_pl.detach())}

    def after_step(self, model: nn.Module) -> None:
        if self._pending is not None:
            self.proco.update(*self._pending)
            self._pending = None


@register_stage1("proco")
def _proco(*, loss_cfg: Any, class_counts: Sequence[int], proj_dim: int, **_: Any) -> Stage1Recipe:
    return ProCoRecipe(criterion=_ce(loss_cfg), num_classes=len(class_counts),
                       proj_dim=_check_proj_dim("proco", proj_dim), class_counts=class_counts,
                       lam=loss_cfg.proco_lambda, temperature=loss_cfg.temperature, momentum=loss_cfg.proco_momentum,
                       queue_size=loss_cfg.proco_queue, fgsm_eps=loss_cfg.proco_eps, recal_gamma=loss_cfg.proco_gamma)


# ---------------------------------------------------------------------------------------------------------------
# 2. Metric learning in stage 1 (Zeng et al.)

METRIC_LOSSES = ("triplet", "centre_triplet", "supcon")
#: lambda of ``L1 = CE + lambda * L_metric`` per loss, from the authors' public configs (METHODS.md section 2)
METRIC_LAMBDAS = {"triplet": 0.03, "centre_triplet": 0.07, "supcon": 1.0}


class MetricRecipe(_PaperRecipe):
    """``L1 = CE + lambda * L_metric`` on the model's L2-normalised ``embedding`` (METHODS.md section 2).

    **Interpretation** (from the authors' public configs): ``L_metric`` is batch-hard triplet (lambda 0.03,
    margin 0.2), class-centre triplet (lambda 0.07) or SupCon (lambda 1.0, tau 0.1); ``lam=None`` takes the
    chosen loss's lambda (:data:`METRIC_LAMBDAS`), a number overrides it. SupCon uses two weak views (``image``,
    ``image2``), forwarded as one batch; the embeddings enter as ``(N, 2, P)`` and CE is on the first view's
    logits. The triplet losses use one view and profit from P x K class-balanced batches
    (:class:`~ltcore.methods.pk.PKBatcher`).

    Args:
        criterion: the classification loss (CE).
        metric: ``triplet``, ``centre_triplet`` or ``supcon``.
        lam: weight of the metric loss; None for the loss's own default.
        margin: triplet margin.
        temperature: SupCon tau.

    Raises:
        ValueError: unknown ``metric`` or negative ``lam``.
    """

    needs_projector = True

    def __init__(self, *, criterion: nn.Module, metric: str, lam: float | None = None, margin: float = 0.2,
                 temperature: float = 0.1) -> None:
        super().__init__(criterion)
        if metric not in METRIC_LOSSES:
            raise ValueError(f"loss.metric_loss {metric!r} is not valid; choose one of {', '.join(METRIC_LOSSES)}")
        lam = METRIC_LAMBDAS[metric] if lam is None else lam
        if lam < 0:
            raise ValueError(f"loss.metric_lambda must be >= 0, got {lam}")
        self.metric_name, self.lam = metric, float(lam)
        self.metric: nn.Module
        if metric == "triplet":
            self.metric = BatchHardTripletLoss(margin=margin)
        elif metric == "centre_triplet":
            self.metric = ClassCentreTripletLoss(margin=margin)
        else:
            self.metric = SupConLoss(temperature=temperature)
        self.views = ("weak", "weak") if metric == "supcon" else ("weak",)

    def state_modules(self) -> nn.ModuleDict:
        return nn.ModuleDict({"criterion": self.criterion, "metric": self.metric})

    def loss(
        self, model: nn.Module, batch: dict[str, torch.Tensor], epoch: int
    ) -> tuple[torch.Tensor, dict[str, float]]:
        y = batch["label"]
        n = y.shape[0]
        two = len(self.views) == 2
        out = model(_two_views(batch, "metric") if two else batch["image"])
        emb = _require(out, "embedding", "metric", "proj_dim > 0")  # (N or 2N, P)
        ce = self.criterion(out["logits"][:n], y)
        with _fp32(y.device):
            z = torch.stack([emb[:n], emb[n:]], dim=1).float() if two else emb.float()  # (N, 2, P) or (N, P)
            metric = self.metric(z, y)
        return ce + self.lam * metric, {"ce": float(ce.detach()), self.metric_name: float(metric.detach())}


@register_stage1("metric")
def _metric(*, loss_cfg: Any, proj_dim: int, **_: Any) -> Stage1Recipe:
    _check_proj_dim("metric", proj_dim)
    lam = None if loss_cfg.metric_lambda == "auto" else float(loss_cfg.metric_lambda)
    return MetricRecipe(criterion=_ce(loss_cfg), metric=loss_cfg.metric_loss, lam=lam,
                        margin=loss_cfg.metric_margin, temperature=loss_cfg.temperature)


# ---------------------------------------------------------------------------------------------------------------
# 3. JRCL


class JRCLRecipe(_PaperRecipe):
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
        out = model(_two_views(batch, "jrcl"))
        emb = _require(out, "embedding", "jrcl", "proj_dim > 0")  # (2N, P)
        aux = _require(out, "aux_logits", "jrcl", "aux_binary=True")[:n]  # (N, 2)
        logits = out["logits"][:n]  # (N, C)
        ce = self.criterion(logits, y)
        with _fp32(y.device):
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


@register_stage1("jrcl")
def _jrcl(*, loss_cfg: Any, class_counts: Sequence[int], classes: Sequence[str], proj_dim: int,
          **_: Any) -> Stage1Recipe:
    dim = _check_proj_dim("jrcl", proj_dim)
    return JRCLRecipe(criterion=_ce(loss_cfg), num_classes=len(class_counts), proj_dim=dim,
                      normal_index=normal_class_index(loss_cfg.normal_class, classes),
                      temperature=loss_cfg.temperature, bdc_symmetric=loss_cfg.bdc_symmetric)


# ---------------------------------------------------------------------------------------------------------------
# 4. LMD stage 1 (RRL)


class _StepCounter(nn.Module):
    step: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("step", torch.zeros((), dtype=torch.long))


class LMDRRLRecipe(_PaperRecipe):
    """LMD stage 1 (RRL): ``CE(z_s) + [epoch > start] * (w_p L_prob + w_b L_batch + w_c L_chan)`` (METHODS.md 4).

    The student (the model) sees the strong view ``image2``; the teacher, an EMA copy of the student made in
    ``setup`` (``requires_grad=False``, in ``state_modules()['teacher']`` so it is checkpointed), sees the
    resize + flip view ``image`` under no-grad. After every optimiser step ``after_step`` sets
    ``teacher <- a teacher + (1 - a) student`` with ``a = ema_alpha(t) = min(1 - 1/(t+1), 0.999)`` at the
    step counter ``t`` (a buffer, also checkpointed); the EMA runs from the first step, also before the
    relation terms switch on.

    The relation terms use the batch gathered from all workers (METHODS.md: "A is the batch of backbone
    features, gathered across workers"): the student's logits and features through a differentiable gather,
    the teacher's through a plain one; every rank computes the same global terms, and the gather's backward
    plus DDP's averaging give their exact gradient. The teacher follows the student's train/eval mode (the
    engine puts the whole train module in train mode, so its BatchNorm uses batch statistics, as in the
    mean-teacher reference code).

    Args:
        criterion: the classification loss (CE).
        start_epoch: the relation terms are on for ``epoch > start_epoch`` (20 in the paper, 0-based epochs).
        w_prob, w_batch, w_chan: weights (5, 10, 10).
        chan_norm: ``L_chan`` divided by D / 4 (``"dim"``) or by B (``"batch"``, the public code); see
            :class:`~ltcore.losses.RelationDistillationLoss`.
    """

    #: teacher view ``image``: resize + flips; student view ``image2``: the strong augmentation (METHODS.md 4)
    views = ("resize_flip", "strong")

    def __init__(self, *, criterion: nn.Module, start_epoch: int = 20, w_prob: float = 5.0, w_batch: float = 10.0,
                 w_chan: float = 10.0, chan_norm: str = "dim") -> None:
        super().__init__(criterion)
        self.rrl_start_epoch = int(start_epoch)
        self.relation = RelationDistillationLoss(w_prob=w_prob, w_batch=w_batch, w_chan=w_chan, chan_norm=chan_norm)
        self.counter = _StepCounter()
        self.teacher: nn.Module | None = None

    def setup(self, model: nn.Module) -> None:
        self.teacher = copy.deepcopy(model)
        self.teacher.requires_grad_(False)

    def state_modules(self) -> nn.ModuleDict:
        if self.teacher is None:
            raise RuntimeError("LMDRRLRecipe.setup(model) must be called before state_modules()")
        return nn.ModuleDict({"criterion": self.criterion, "relation": self.relation, "counter": self.counter,
                              "teacher": self.teacher})

    def loss(
        self, model: nn.Module, batch: dict[str, torch.Tensor], epoch: int
    ) -> tuple[torch.Tensor, dict[str, float]]:
        if self.teacher is None:
            raise RuntimeError("LMDRRLRecipe.setup(model) must be called before loss()")
        if "image2" not in batch:
            raise ValueError("stage1.method='lmd_rrl' needs the teacher view 'image' (resize + flip) and the "
                             "strong view 'image2'")
        y = batch["label"]
        out = model(batch["image2"])  # student: strong view
        ce = self.criterion(out["logits"], y)
        logs = {"ce": float(ce.detach()), "rrl_prob": 0.0, "rrl_batch": 0.0, "rrl_chan": 0.0}
        if not active(epoch, self.rrl_start_epoch):
            return ce, logs
        with torch.no_grad():
            t_out = self.teacher(batch["image"])  # teacher: resize + flip view
        with _fp32(y.device):
            rel = self.relation(
                gather_rows(out["logits"].float(), differentiable=True),
                gather_rows(t_out["logits"].float()),
                gather_rows(out["features"].float(), differentiable=True),
                gather_rows(t_out["features"].float()),
            )
        logs.update({"rrl_prob": float(rel["prob"].detach()), "rrl_batch": float(rel["batch"].detach()),
                     "rrl_chan": float(rel["chan"].detach())})
        return ce + rel["total"], logs

    def after_step(self, model: nn.Module) -> None:
        if self.teacher is None:
            raise RuntimeError("LMDRRLRecipe.setup(model) must be called before after_step()")
        ema_update_(self.teacher, model, ema_alpha(int(self.counter.step)))
        self.counter.step += 1


@register_stage1("lmd_rrl")
def _lmd_rrl(*, loss_cfg: Any, **_: Any) -> Stage1Recipe:
    return LMDRRLRecipe(criterion=_ce(loss_cfg), start_epoch=loss_cfg.rrl_start_epoch, w_prob=loss_cfg.rrl_w_prob,
                        w_batch=loss_cfg.rrl_w_batch, w_chan=loss_cfg.rrl_w_chan, chan_norm=loss_cfg.rrl_chan_norm)


# ---------------------------------------------------------------------------------------------------------------
# 5. SPMix as a composable wrapper


class SPMixRecipe(Stage1Recipe):
    """Any recipe trained on SPMix images: tail images mixed patch-wise with head images, tail labels kept.

    The batch carries ``image``/``label`` from the instance-sampled stream (the head images B) and
    ``tail_image``/``tail_label`` from a class-balanced stream (the tail images A, METHODS.md section 5). The
    wrapper hands the inner recipe a batch whose ``image`` is ``spmix(tail_image, image)`` and whose ``label`` is
    ``tail_label``; rows beyond the shorter of the two streams' batches are dropped. For a two-view inner
    recipe the tail stream must carry its second view ``tail_image2`` too: ``image2`` becomes
    ``spmix(tail_image2, image2)`` with the same per-sample decision to mix (the same random draw) and each
    view's own saliency, so both views still show the same (mixed) sample. Mixing runs in float32 with autocast
    off.

    Args:
        inner: the recipe that computes the loss.
        spmix: the mixer (alpha, patch, probability, saliency function).
        seed: the mixing draws are a function of ``(seed, epoch, rank)``.
    """

    needs_tail_stream = True

    def __init__(self, inner: Stage1Recipe, spmix: SPMix, seed: int = 0) -> None:
        super().__init__(inner.criterion)
        if isinstance(inner, SPMixRecipe):
            raise ValueError("SPMix is already applied; do not wrap an SPMixRecipe again")
        self.inner, self.spmix, self.seed = inner, spmix, int(seed)
        self.views = inner.views
        self.needs_projector = inner.needs_projector
        self.needs_aux_binary = inner.needs_aux_binary
        self.find_unused_parameters = inner.find_unused_parameters
        self.generator = torch.Generator()
        self._reseed(0)

    def setup(self, model: nn.Module) -> None:
        setup = getattr(self.inner, "setup", None)
        if setup is not None:
            setup(model)

    def state_modules(self) -> nn.ModuleDict:
        return self.inner.state_modules()

    def _reseed(self, epoch: int) -> None:
        seq = np.random.SeedSequence((self.seed, int(epoch), _rank()))
        self.generator.manual_seed(int(seq.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1)))

    def start_epoch(self, epoch: int) -> None:
        self._reseed(epoch)
        self.inner.start_epoch(epoch)

    def mix(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The inner recipe's batch: mixed ``image`` (and ``image2``), ``label = tail_label``, no ``tail_*`` keys."""
        for key in ("tail_image", "tail_label"):
            if key not in batch:
                raise ValueError(f"loss.spmix needs the class-balanced tail stream: the batch has no {key!r}")
        two = "image2" in batch and len(self.views) == 2
        if two and "tail_image2" not in batch:
            raise ValueError("a two-view recipe with loss.spmix needs the tail stream's second view 'tail_image2'")
        n = min(batch["tail_label"].shape[0], batch["label"].shape[0])
        out = {k: v[:n] for k, v in batch.items() if not k.startswith("tail_")}
        y_tail = batch["tail_label"][:n]
        device = batch["image"].device
        with _fp32(device):
            state = self.generator.get_state()
            out["image"], out["label"] = self.spmix(batch["tail_image"][:n].float(), y_tail,
                                                    batch["image"][:n].float(), self.generator)
            if two:
                after = self.generator.get_state()
                self.generator.set_state(state)  # same draw: view 2 is mixed exactly where view 1 is
                out["image2"], _ = self.spmix(batch["tail_image2"][:n].float(), y_tail,
                                              batch["image2"][:n].float(), self.generator)
                self.generator.set_state(after)
        return out

    def loss(
        self, model: nn.Module, batch: dict[str, torch.Tensor], epoch: int
    ) -> tuple[torch.Tensor, dict[str, float]]:
        return self.inner.loss(model, self.mix(batch), epoch)

    def after_step(self, model: nn.Module) -> None:
        self.inner.after_step(model)


def _mixer(loss_cfg: Any) -> SPMix:
    # The engine hands recipes batches normalised with the ImageNet statistics (transforms.normalize_images);
    # SPMix undoes that for the saliency, which must see the image as it is.
    return SPMix(alpha=loss_cfg.spmix_alpha, patch=loss_cfg.spmix_patch, prob=loss_cfg.spmix_prob,
                 mean=IMAGENET_MEAN, std=IMAGENET_STD)


def with_augmentations(recipe: Stage1Recipe, loss_cfg: Any, seed: int = 0) -> Stage1Recipe:
    """Wrap ``recipe`` in :class:`SPMixRecipe` when ``loss_cfg.spmix`` is true (and it is not wrapped already)."""
    if not loss_cfg.spmix or isinstance(recipe, SPMixRecipe):
        return recipe
    return SPMixRecipe(recipe, _mixer(loss_cfg), seed=seed)


@register_stage1("spmix")
def _spmix(*, loss_cfg: Any, **kwargs: Any) -> Stage1Recipe:
    """SPMix with plain CE. **Interpretation**: the paper trains with GPaCo; we ship CE so that SPMix is
    compared with the other methods on the same loss (and composes with any of them via ``loss.spmix``)."""
    return SPMixRecipe(Stage1Recipe(_ce(loss_cfg)), _mixer(loss_cfg), seed=int(kwargs.get("seed", 0)))
