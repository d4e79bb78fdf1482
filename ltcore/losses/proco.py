"""ProCo proto-loss, "ProCo: Prototype-aware Contrastive Learning for Long-tailed Medical Image Classification",
Yang, Pan et al., MICCAI 2022, arXiv 2209.00183.

The paper's public material names the pieces (class prototypes, a sample queue, adversarial
proto-instances, prototype recalibration, one "proto-loss") but not their formulas; everything numeric
here is the **interpretation** of METHODS.md section 1:

- prototypes: one L2-normalised vector per class, EMA ``p_c <- normalize(m p_c + (1 - m) mean{k_i : y_i = c})``;
- queue: FIFO of (key, label), K entries;
- adversarial proto-instance: ``a_c = normalize(p_c + eps * sign(grad_{p_c} L))``, one FGSM step;
- recalibration: ``w_c proportional to n_c^(-gamma)``, normalised to sum to C;
- proto-loss ``L_pl``: InfoNCE of each query against {prototypes, proto-instances, keys}, tau = 0.1.

The total loss ``CE(classifier(f)) + lambda * L_pl`` is assembled by the caller.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ltcore.losses.supcon import _check_temperature


def recalibration_weights(class_counts: torch.Tensor | Sequence[int], gamma: float = 0.5) -> torch.Tensor:
    """Per-prototype weights ``w_c = C * n_c^(-gamma) / sum_k n_k^(-gamma)`` (C,), which sum to C.

    ``gamma = 0`` gives all ones; larger ``gamma`` up-weights the rare classes.

    Raises:
        ValueError: if ``class_counts`` is not a non-empty 1-D sequence of positive counts, or ``gamma < 0``.
    """
    n = torch.as_tensor(class_counts, dtype=torch.float64).detach().clone()
    if n.ndim != 1 or n.numel() == 0:
        raise ValueError(f"class_counts must be a non-empty 1-D sequence, got shape {tuple(n.shape)}")
    bad = ~torch.isfinite(n) | (n <= 0)
    if bool(bad.any()):
        j = int(torch.nonzero(bad)[0])
        raise ValueError(f"class_counts[{j}] = {n[j].item()}: every class needs at least one training sample")
    if not gamma >= 0.0:
        raise ValueError(f"recal_gamma must be >= 0, got {gamma}")
    w = n.pow(-float(gamma))
    return (w * (n.numel() / w.sum())).to(torch.get_default_dtype())


class ProCoLoss(nn.Module):
    """ProCo proto-loss ``L_pl`` with its prototype/queue state (**interpretation**, METHODS.md section 1).

    For query ``q_i`` (label ``y_i``) and targets ``t_j`` = [prototypes p_1..p_C, proto-instances
    a_1..a_C, batch keys, valid queue keys], with ``log_prob_ij = log softmax_j(q_i . t_j / tau)``:

        L_pl = mean_i  -1/|P(i)| * sum_{j in P(i)} omega_ij * log_prob_ij

    where ``P(i)`` = {``p_{y_i}``, ``a_{y_i}``, keys with label ``y_i`` (its own key included)}, and the
    recalibration weight ``omega_ij = w_{y_i}`` on the prototype term and 1 on the others.
    Our reading of "re-weights each prototype inside the proto-loss": the weight scales the prototype's
    pull term (so, with ``w_c ~ n_c^-gamma``, rare-class queries are pulled harder to their prototypes)
    rather than the prototype's exp inside the softmax (a logit-adjustment reading, under which larger
    rare-class weights would make the rare classes' own positive term easier, not harder).
    With ``recal_gamma = 0`` and ``fgsm_eps = 0`` it is SupCon-style InfoNCE with each prototype present twice.

    Proto-instances come from one FGSM step on the prototypes: ``L_pl`` is first evaluated without them
    (queries detached, prototypes as the only variable) and ``a_c = normalize(p_c + eps * sign(dL/dp_c))``,
    a harder positive for class-c queries and a harder negative for the rest. Prototypes, proto-instances
    and keys carry no gradient (keys are detached, like MoCo's momentum keys); only the query learns.
    Query and key are L2-normalised inside.

    Use per step: ``loss = ce + lam * proco(q, k, y)``, ``loss.backward()``, then ``proco.update(k, y)``
    (EMA of the prototypes, then enqueue). Under DDP gather ``k`` and ``y`` across ranks before ``update``
    so that every rank keeps the same state.

    Args:
        num_classes: C.
        dim: D, the dimension of the query/key space.
        class_counts: training count per class (C,), for the recalibration weights.
        temperature: tau > 0.
        momentum: EMA momentum m in [0, 1) for the prototypes. A class's first update sets its prototype
            to the normalised key mean (random seeded vectors before that).
        queue_size: K >= 0 (0: contrast against the batch keys only).
        fgsm_eps: eps >= 0 of the FGSM step (0: proto-instances equal the prototypes).
        recal_gamma: gamma >= 0 of the recalibration weights.
        seed: seed of the initial random prototypes.

    Raises:
        ValueError: on an invalid argument, or inputs of the wrong shape/dtype or labels outside [0, C).
    """

    prototypes: torch.Tensor
    proto_initialised: torch.Tensor
    class_weights: torch.Tensor
    queue_keys: torch.Tensor
    queue_labels: torch.Tensor
    queue_ptr: torch.Tensor

    def __init__(
        self,
        num_classes: int,
        dim: int,
        class_counts: torch.Tensor | Sequence[int],
        temperature: float = 0.1,
        momentum: float = 0.99,
        queue_size: int = 4096,
        fgsm_eps: float = 0.1,
        recal_gamma: float = 0.5,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if num_classes < 1 or dim < 1:
            raise ValueError(f"num_classes and dim must be >= 1, got num_classes={num_classes}, dim={dim}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if queue_size < 0:
            raise ValueError(f"queue_size must be >= 0, got {queue_size}")
        if not fgsm_eps >= 0.0:
            raise ValueError(f"fgsm_eps must be >= 0, got {fgsm_eps}")
        weights = recalibration_weights(class_counts, recal_gamma)
        if weights.numel() != num_classes:
            raise ValueError(f"class_counts has {weights.numel()} entries but num_classes is {num_classes}")
        self.num_classes = int(num_classes)
        self.dim = int(dim)
        self.temperature = _check_temperature(temperature)
        self.momentum = float(momentum)
        self.queue_size = int(queue_size)
        self.fgsm_eps = float(fgsm_eps)
        self.recal_gamma = float(recal_gamma)
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("prototypes", F.normalize(torch.randn(num_classes, dim, generator=g), dim=1))
        self.register_buffer("proto_initialised", torch.zeros(num_classes, dtype=torch.bool))
        self.register_buffer("class_weights", weights)
        self.register_buffer("queue_keys", torch.zeros(queue_size, dim))
        # -1 marks an empty slot.
        self.register_buffer("queue_labels", torch.full((queue_size,), -1, dtype=torch.long))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    @property
    def queue_valid(self) -> torch.Tensor:
        """Mask (K,) of the queue slots that hold a key."""
        return self.queue_labels >= 0

    def _check(self, query: torch.Tensor, key: torch.Tensor | None, labels: torch.Tensor) -> None:
        if not torch.is_floating_point(query) or query.ndim != 2 or query.shape[1] != self.dim:
            raise ValueError(f"query must be a float tensor of shape (N, {self.dim}), got {tuple(query.shape)}")
        n = query.shape[0]
        if key is not None and tuple(key.shape) != tuple(query.shape):
            raise ValueError(f"key must have the query's shape {tuple(query.shape)}, got {tuple(key.shape)}")
        if labels.ndim != 1 or labels.shape[0] != n or torch.is_floating_point(labels) or labels.dtype == torch.bool:
            raise ValueError(
                f"labels must be an integer tensor of shape ({n},), got {labels.dtype} {tuple(labels.shape)}"
            )
        if n and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise ValueError(
                f"labels must lie in [0, {self.num_classes}), got range [{int(labels.min())}, {int(labels.max())}]"
            )

    def _instances(self, key: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Instance targets: batch keys then valid queue keys, ``(M, D)`` and labels ``(M,)``."""
        k = F.normalize(key.detach(), dim=1)
        valid = self.queue_valid
        keys = torch.cat([k, self.queue_keys[valid].to(k)], dim=0)
        return keys, torch.cat([labels, self.queue_labels[valid].to(labels.device)], dim=0)

    def _proto_loss(
        self,
        q: torch.Tensor,
        labels: torch.Tensor,
        protos: torch.Tensor,
        instances: torch.Tensor | None,
        keys: torch.Tensor,
        key_labels: torch.Tensor,
    ) -> torch.Tensor:
        """``L_pl`` for normalised ``q (N, D)`` against ``protos (C, D)``, ``instances (C, D)`` and ``keys (M, D)``."""
        c = self.num_classes
        classes = torch.arange(c, device=q.device)
        blocks, block_labels = [protos], [classes]
        if instances is not None:
            blocks.append(instances)
            block_labels.append(classes)
        targets = torch.cat([*blocks, keys], dim=0)  # (T, D)
        target_labels = torch.cat([*block_labels, key_labels], dim=0)  # (T,)
        logits = q @ targets.T / self.temperature  # (N, T)
        log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
        pos = (labels[:, None] == target_labels[None, :]).to(q.dtype)  # (N, T); own prototype always in
        omega = torch.ones_like(pos)
        omega[:, :c] = self.class_weights.to(q)[None, :]  # only the own-prototype column is a positive
        return (-(pos * omega * log_prob).sum(dim=1) / pos.sum(dim=1)).mean()

    def proto_instances(self, query: torch.Tensor, key: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Adversarial proto-instances ``a (C, D)``, L2-normalised, detached, for this batch."""
        self._check(query, key, labels)
        q = F.normalize(query.detach(), dim=1)
        protos = self.prototypes.to(q)
        if self.fgsm_eps == 0.0:
            return protos.clone()
        keys, key_labels = self._instances(key, labels)
        p = protos.clone().requires_grad_(True)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(self._proto_loss(q, labels, p, None, keys, key_labels), p)
        # One FGSM ascent step: moves each prototype to where the proto-loss is larger.
        return F.normalize(protos + self.fgsm_eps * grad.sign(), dim=1)

    def forward(self, query: torch.Tensor, key: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Return the scalar ``L_pl`` for ``query (N, D)``, ``key (N, D)`` (detached) and ``labels (N,)``."""
        self._check(query, key, labels)
        if query.shape[0] == 0:
            return query.sum() * 0.0
        adv = self.proto_instances(query, key, labels)
        keys, key_labels = self._instances(key, labels)
        q = F.normalize(query, dim=1)
        return self._proto_loss(q, labels, self.prototypes.to(q), adv, keys, key_labels)

    @torch.no_grad()
    def update(self, key: torch.Tensor, labels: torch.Tensor) -> None:
        """EMA-update the prototypes of the classes in the batch, then enqueue ``key (N, D)``, ``labels (N,)``."""
        self._check(key, None, labels)
        k = F.normalize(key.detach(), dim=1).to(self.prototypes)
        y = labels.to(self.prototypes.device)
        counts = torch.bincount(y, minlength=self.num_classes)  # (C,)
        sums = torch.zeros_like(self.prototypes).index_add_(0, y, k)  # (C, D)
        present = counts > 0
        mean = sums / counts.clamp_min(1)[:, None].to(sums)
        # p_c <- normalize(m p_c + (1 - m) mean_c); a class's first batch replaces the random start.
        ema = self.momentum * self.prototypes + (1.0 - self.momentum) * mean
        new = torch.where(self.proto_initialised[:, None], ema, mean)
        # Skip a degenerate zero mean (keys that cancel out) instead of writing a zero prototype.
        ok = present & (new.norm(dim=1) > 1e-12)
        self.prototypes[ok] = F.normalize(new[ok], dim=1)
        self.proto_initialised |= ok
        self._enqueue(k, y)

    def _enqueue(self, k: torch.Tensor, y: torch.Tensor) -> None:
        size, n = self.queue_size, k.shape[0]
        if size == 0 or n == 0:
            return
        keep = min(n, size)  # a batch larger than the queue leaves only its last K keys
        slots = (self.queue_ptr + (n - keep) + torch.arange(keep, device=k.device)) % size
        self.queue_keys[slots] = k[n - keep :]
        self.queue_labels[slots] = y[n - keep :]
        self.queue_ptr.copy_((self.queue_ptr + n) % size)

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, dim={self.dim}, temperature={self.temperature}, "
            f"momentum={self.momentum}, queue_size={self.queue_size}, fgsm_eps={self.fgsm_eps}, "
            f"recal_gamma={self.recal_gamma}"
        )
