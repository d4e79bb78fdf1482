from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ltcore.losses.proco import ProCoLoss, recalibration_weights


def make(**kw: object) -> ProCoLoss:
    args: dict[str, object] = {"num_classes": 2, "dim": 2, "class_counts": [1, 1], "queue_size": 0}
    args.update(kw)
    return ProCoLoss(**args)  # type: ignore[arg-type]


def set_prototypes(loss: ProCoLoss, protos: list[list[float]]) -> None:
    loss.prototypes.copy_(torch.tensor(protos))
    loss.proto_initialised.fill_(True)


# --- recalibration weights -------------------------------------------------------------------------------


def test_recalibration_weights_hand_value() -> None:
    # n = [100, 25, 4], gamma 0.5: n^-0.5 = [0.1, 0.2, 0.5], sum 0.8 -> w = 3 * [0.1, 0.2, 0.5] / 0.8
    w = recalibration_weights([100, 25, 4], gamma=0.5)
    assert torch.allclose(w, torch.tensor([0.375, 0.75, 1.875]))
    assert w.sum().item() == pytest.approx(3.0)


def test_recalibration_weights_identity_gamma_zero_is_ones() -> None:
    assert torch.equal(recalibration_weights([7, 300, 2, 5], gamma=0.0), torch.ones(4))


@pytest.mark.parametrize("counts", [[3, 0, 2], [], [[1, 2]], [1.0, float("nan")]])
def test_recalibration_weights_bad_counts_raise(counts: list) -> None:
    with pytest.raises(ValueError, match="class_counts"):
        recalibration_weights(counts, gamma=0.5)


# --- prototype EMA and queue -----------------------------------------------------------------------------


def test_ema_update_by_hand() -> None:
    loss = make(momentum=0.5, queue_size=0)
    start1 = loss.prototypes[1].clone()
    # First batch of class 0: keys (1,0) and (0,1), mean (0.5, 0.5) -> the prototype becomes (1,1)/sqrt2
    # (a class's first update replaces the random start).
    loss.update(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0]))
    s = 1 / math.sqrt(2)
    assert torch.allclose(loss.prototypes[0], torch.tensor([s, s]), atol=1e-6)
    # Second batch, key (2,0) (normalised to (1,0)): 0.5 * (s, s) + 0.5 * (1, 0) = (0.85355, 0.35355),
    # normalised = (cos 22.5 deg, sin 22.5 deg) = (0.92388, 0.38268).
    loss.update(torch.tensor([[2.0, 0.0]]), torch.tensor([0]))
    expected = torch.tensor([math.cos(math.pi / 8), math.sin(math.pi / 8)])
    assert torch.allclose(loss.prototypes[0], expected, atol=1e-6)
    # Class 1 never appeared: untouched.
    assert torch.equal(loss.prototypes[1], start1)
    assert loss.proto_initialised.tolist() == [True, False]


def test_ema_default_momentum_formula() -> None:
    loss = make()
    set_prototypes(loss, [[1.0, 0.0], [0.0, 1.0]])
    loss.update(torch.tensor([[0.0, 1.0]]), torch.tensor([0]))
    # normalize(0.99 * (1, 0) + 0.01 * (0, 1)) = (0.99, 0.01) / sqrt(0.9802)
    expected = torch.tensor([0.99, 0.01]) / math.sqrt(0.99**2 + 0.01**2)
    assert torch.allclose(loss.prototypes[0], expected, atol=1e-7)


def test_queue_fifo_wrap_around() -> None:
    loss = make(num_classes=5, class_counts=[1] * 5, queue_size=4)
    keys = torch.eye(2).repeat(3, 1)  # (6, 2), any unit vectors
    assert loss.queue_valid.tolist() == [False] * 4
    loss.update(keys[:3], torch.tensor([0, 1, 2]))
    assert loss.queue_labels.tolist() == [0, 1, 2, -1]
    assert loss.queue_valid.tolist() == [True, True, True, False]
    assert int(loss.queue_ptr) == 3
    loss.update(keys[:2], torch.tensor([3, 4]))  # slot 3, then wraps to slot 0
    assert loss.queue_labels.tolist() == [4, 1, 2, 3]
    assert int(loss.queue_ptr) == 1
    # A batch of 6 > K = 4 keeps its last 4 keys [2, 3, 4, 0], written from slot (1 + 2) % 4 = 3 on:
    # slots 3, 0, 1, 2 <- 2, 3, 4, 0; the pointer moves by 6 to (1 + 6) % 4 = 3, the oldest entry.
    loss.update(keys, torch.tensor([0, 1, 2, 3, 4, 0]))
    assert loss.queue_labels.tolist() == [3, 4, 0, 2]
    assert int(loss.queue_ptr) == 3


def test_queue_stores_normalised_keys() -> None:
    loss = make(queue_size=2)
    loss.update(torch.tensor([[3.0, 4.0]]), torch.tensor([1]))
    assert torch.allclose(loss.queue_keys[0], torch.tensor([0.6, 0.8]))


# --- the proto-loss --------------------------------------------------------------------------------------


def test_loss_hand_value_no_fgsm_with_recalibration() -> None:
    # tau = 1, eps = 0 (proto-instances = prototypes), no queue. p0 = (1,0), p1 = (0,1).
    # One query q = (1,0) of class 0, its key k = (0,1). Targets [p0, p1, a0, a1, k], logits [1, 0, 1, 0, 0],
    # lse = log(2e + 3). Positives: p0 (weight w0), a0, k (label 0).
    # counts [1, 4], gamma 0.5: n^-0.5 = [1, 0.5] -> w = 2 * [1, 0.5] / 1.5 = [4/3, 2/3].
    # L = -[w0 (1 - lse) + (1 - lse) + (0 - lse)] / 3 = ((w0 + 2) lse - (w0 + 1)) / 3 = (10 lse - 7) / 9
    loss = make(class_counts=[1, 4], temperature=1.0, fgsm_eps=0.0, recal_gamma=0.5)
    set_prototypes(loss, [[1.0, 0.0], [0.0, 1.0]])
    got = loss(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]), torch.tensor([0]))
    lse = math.log(2 * math.e + 3)
    assert got.item() == pytest.approx((10 * lse - 7) / 9, abs=1e-6)
    assert got.item() == pytest.approx(1.591750, abs=1e-5)


def test_identity_no_recalibration_no_fgsm_is_supcon_over_targets() -> None:
    # gamma 0, eps 0: L_pl = mean_i -mean_{p in P(i)} log softmax(q_i . t / tau)_p over the target list
    # [prototypes, prototypes again, batch keys, queue keys]; checked against that direct formula.
    g = torch.Generator().manual_seed(0)
    loss = ProCoLoss(
        num_classes=3, dim=4, class_counts=[50, 5, 1], temperature=0.2, queue_size=8, fgsm_eps=0.0, recal_gamma=0.0
    )
    loss.update(torch.randn(5, 4, generator=g), torch.tensor([0, 1, 2, 0, 1]))
    q, k = torch.randn(4, 4, generator=g), torch.randn(4, 4, generator=g)
    y = torch.tensor([0, 2, 1, 0])
    got = loss(q, k, y)
    valid = loss.queue_valid
    targets = torch.cat([loss.prototypes, loss.prototypes, F.normalize(k, dim=1), loss.queue_keys[valid]])
    labels = torch.cat([torch.arange(3), torch.arange(3), y, loss.queue_labels[valid]])
    total = 0.0
    for i in range(4):
        log_prob = F.log_softmax(F.normalize(q[i], dim=0) @ targets.T / 0.2, dim=0)
        total += -log_prob[labels == y[i]].mean().item()
    assert got.item() == pytest.approx(total / 4, abs=1e-5)


def test_fgsm_step_by_hand() -> None:
    # tau = 1, gamma 0, eps 0.1, no queue; p0 = (1,0), p1 = (0,1); one query q = (0.6,-0.8) of class 0 whose
    # key is q itself. Without proto-instances the targets are [p0, p1, k] with logits [0.6, -0.8, 1] and
    # positives {p0, k}: L = lse - (0.6 + 1) / 2. dL/dp_c = (softmax_c - [c = 0] / 2) q, with
    # softmax = [e^0.6, e^-0.8, e^1] / sum = [0.3652, 0.0900, 0.5448]:
    #   dL/dp0 = (0.3652 - 0.5) q = -0.1348 q -> sign = -sign(q) = (-1, +1) -> a0 = normalize(0.9, 0.1)
    #   dL/dp1 = 0.0900 q                     -> sign =  sign(q) = (+1, -1) -> a1 = normalize(0.1, 0.9)
    # (the positive prototype moves away from q, the negative one towards it: both get harder).
    soft = torch.softmax(torch.tensor([0.6, -0.8, 1.0]), dim=0)
    assert soft[0] < 0.5 and soft[1] > 0  # the signs used above
    loss = make(temperature=1.0, fgsm_eps=0.1, recal_gamma=0.0)
    set_prototypes(loss, [[1.0, 0.0], [0.0, 1.0]])
    q = torch.tensor([[0.6, -0.8]])
    adv = loss.proto_instances(q, q.clone(), torch.tensor([0]))
    expected = F.normalize(torch.tensor([[0.9, 0.1], [0.1, 0.9]]), dim=1)
    assert torch.allclose(adv, expected, atol=1e-6)
    # Before normalisation the step is exactly eps * sign: a_c * ||p_c + eps s_c|| - p_c = eps s_c.
    step = adv * torch.tensor([[0.9, 0.1], [0.1, 0.9]]).norm(dim=1, keepdim=True) - loss.prototypes
    assert torch.allclose(step, 0.1 * torch.tensor([[-1.0, 1.0], [1.0, -1.0]]), atol=1e-6)


def test_identity_eps_zero_proto_instances_equal_prototypes() -> None:
    g = torch.Generator().manual_seed(1)
    loss = ProCoLoss(num_classes=3, dim=5, class_counts=[9, 3, 1], queue_size=16, fgsm_eps=0.0)
    q, k = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    adv = loss.proto_instances(q, k, torch.tensor([0, 1, 2, 0, 0, 1]))
    assert torch.equal(adv, loss.prototypes)


def test_no_gradient_reaches_prototypes_or_key() -> None:
    g = torch.Generator().manual_seed(2)
    loss = ProCoLoss(num_classes=3, dim=4, class_counts=[9, 3, 1], queue_size=8)
    q = torch.randn(5, 4, generator=g, requires_grad=True)
    k = torch.randn(5, 4, generator=g, requires_grad=True)
    out = loss(q, k, torch.tensor([0, 1, 2, 0, 1]))
    out.backward()
    assert q.grad is not None and torch.isfinite(q.grad).all() and q.grad.abs().sum() > 0
    assert k.grad is None
    assert not loss.prototypes.requires_grad


def test_sgd_pulls_queries_to_their_prototypes() -> None:
    g = torch.Generator().manual_seed(3)
    loss = ProCoLoss(num_classes=3, dim=4, class_counts=[20, 5, 2], queue_size=16)
    set_prototypes(loss, F.normalize(torch.randn(3, 4, generator=g), dim=1).tolist())
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    q = torch.randn(6, 4, generator=g, requires_grad=True)
    opt = torch.optim.SGD([q], lr=0.1)

    def own_distance() -> float:
        return (1 - (F.normalize(q, dim=1) * loss.prototypes[y]).sum(1)).mean().item()

    before = own_distance()
    for _ in range(10):
        opt.zero_grad()
        out = loss(q, q.detach(), y)
        assert torch.isfinite(out)
        out.backward()
        opt.step()
        loss.update(q.detach(), y)
    assert own_distance() < before


def test_state_dict_round_trip() -> None:
    g = torch.Generator().manual_seed(4)
    a = ProCoLoss(num_classes=3, dim=4, class_counts=[9, 3, 1], queue_size=5, seed=0)
    a.update(torch.randn(7, 4, generator=g), torch.tensor([0, 1, 2, 0, 0, 1, 2]))
    state = a.state_dict()
    assert set(state) == {"prototypes", "proto_initialised", "class_weights", "queue_keys", "queue_labels", "queue_ptr"}
    b = ProCoLoss(num_classes=3, dim=4, class_counts=[9, 3, 1], queue_size=5, seed=1)
    assert not torch.equal(a.prototypes, b.prototypes)
    b.load_state_dict(state)
    q, k = torch.randn(4, 4, generator=g), torch.randn(4, 4, generator=g)
    y = torch.tensor([2, 1, 0, 0])
    assert torch.equal(a(q, k, y), b(q, k, y))
    assert int(b.queue_ptr) == 2 and b.queue_valid.all()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"momentum": 1.0}, "momentum"),
        ({"queue_size": -1}, "queue_size"),
        ({"fgsm_eps": -0.1}, "fgsm_eps"),
        ({"recal_gamma": -1.0}, "recal_gamma"),
        ({"class_counts": [1, 2, 3]}, "class_counts"),
        ({"temperature": 0.0}, "temperature"),
    ],
)
def test_bad_arguments_raise(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make(**kwargs)


def test_bad_inputs_raise() -> None:
    loss = make()
    q = torch.zeros(2, 2)
    with pytest.raises(ValueError, match="labels"):
        loss(q, q, torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="key"):
        loss(q, torch.zeros(3, 2), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="query"):
        loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([0, 1]))
