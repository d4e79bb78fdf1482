"""LMD stage 1, relation-aware representation learning (RRL), and its EMA teacher.

"Long-tailed Medical Diagnosis with Relation-aware Representation Learning and Iterative Classifier
Calibration" (Pan et al., arXiv 2502.03238; METHODS.md section 4). ``CE + [epoch > 20] * (5 L_prob + 10 L_batch
+ 10 L_chan)`` against an EMA teacher, ``alpha_t = min(1 - 1/(t+1), 0.999)``; the relation losses are
:class:`~ltcore.losses.RelationDistillationLoss`. The same EMA ramp smooths the class statistics of LMD's
stage 2 (:mod:`ltcore.methods.icc`), once per round.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from ltcore.dist import gather_rows
from ltcore.losses import RelationDistillationLoss
from ltcore.methods._recipe import PaperRecipe, Stage1Recipe, ce_from_config, fp32

__all__ = ["LMDRRLRecipe", "active", "build", "ema_alpha", "ema_update_"]


def ema_alpha(step: int) -> float:
    """Teacher EMA decay at optimiser step ``step`` (0-based): ``min(1 - 1/(step+1), 0.999)``.

    Step 0 gives 0 (the teacher becomes a copy of the student); the decay then ramps up and is capped at
    0.999, as in the public mean-teacher code.

    Raises:
        ValueError: if ``step`` is negative.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return min(1.0 - 1.0 / (step + 1), 0.999)


@torch.no_grad()
def ema_update_(teacher: nn.Module, student: nn.Module, alpha: float) -> None:
    """In place: ``teacher <- alpha * teacher + (1 - alpha) * student`` for parameters and float buffers.

    Non-float buffers (e.g. BatchNorm's ``num_batches_tracked``) are copied from the student.

    Raises:
        ValueError: if ``alpha`` is outside ``[0, 1]`` or the two modules do not have the same
            parameter/buffer names and shapes.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    for kind, t_items, s_items in (
        ("parameter", teacher.named_parameters(), student.named_parameters()),
        ("buffer", teacher.named_buffers(), student.named_buffers()),
    ):
        t_dict, s_dict = dict(t_items), dict(s_items)
        if t_dict.keys() != s_dict.keys():
            diff = sorted(set(t_dict) ^ set(s_dict))
            raise ValueError(f"teacher and student differ in {kind} names (e.g. {diff[:3]}); use the same architecture")
        for name, t in t_dict.items():
            s = s_dict[name]
            if t.shape != s.shape:
                raise ValueError(f"{kind} {name!r}: teacher shape {tuple(t.shape)} != student {tuple(s.shape)}")
            if t.is_floating_point():
                t.mul_(alpha).add_(s.detach().to(t.dtype), alpha=1.0 - alpha)
            else:
                t.copy_(s)


def active(epoch: int, start_epoch: int = 20) -> bool:
    """Whether the relation terms are on: ``epoch > start_epoch`` (the paper's ``[epoch > 20]``).

    ``epoch`` is counted the way the caller counts it (the public code's loop is 0-based).
    """
    return epoch > start_epoch


class _StepCounter(nn.Module):
    step: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("step", torch.zeros((), dtype=torch.long))


class LMDRRLRecipe(PaperRecipe):
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
        with fp32(y.device):
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


def build(*, loss_cfg: Any, **_: Any) -> Stage1Recipe:
    """``stage1.method=lmd_rrl`` from config: ``loss.rrl_*``."""
    return LMDRRLRecipe(criterion=ce_from_config(loss_cfg), start_epoch=loss_cfg.rrl_start_epoch,
                        w_prob=loss_cfg.rrl_w_prob, w_batch=loss_cfg.rrl_w_batch, w_chan=loss_cfg.rrl_w_chan,
                        chan_norm=loss_cfg.rrl_chan_norm)
