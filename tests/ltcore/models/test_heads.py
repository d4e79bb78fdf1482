from __future__ import annotations

import math

import pytest
import torch

from ltcore.models.heads import CosineHead, LinearHead, ProjectionMLP


def test_cosine_head_by_hand() -> None:
    head = CosineHead(2, 2, scale=16.0)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [1.0, 1.0]]))
    x = torch.tensor([[3.0, 4.0]])
    # |x| = 5; cos(x, [1, 0]) = 3/5 = 0.6; cos(x, [1, 1]) = (3 + 4) / (5 * sqrt 2) = 7 / (5 sqrt 2) ~= 0.98995
    expected = torch.tensor([[16.0 * 0.6, 16.0 * 7.0 / (5.0 * math.sqrt(2.0))]])
    torch.testing.assert_close(head(x), expected)


def test_cosine_head_ignores_feature_and_weight_norms() -> None:
    torch.manual_seed(0)
    head = CosineHead(5, 3, scale=10.0)
    x = torch.randn(4, 5)
    ref = head(x)
    torch.testing.assert_close(head(7.0 * x), ref)
    with torch.no_grad():
        head.weight.mul_(torch.tensor([[2.0], [0.5], [9.0]]))
    torch.testing.assert_close(head(x), ref)
    assert ref.abs().max() <= 10.0 + 1e-5


def test_linear_head_is_affine_and_without_bias() -> None:
    head = LinearHead(2, 3)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 2.0], [0.0, -1.0], [3.0, 0.0]]))
        head.bias.copy_(torch.tensor([0.5, 0.0, -1.0]))
    # [1, 1] -> [1 + 2 + 0.5, -1 + 0, 3 - 1] = [3.5, -1, 2]
    torch.testing.assert_close(head(torch.tensor([[1.0, 1.0]])), torch.tensor([[3.5, -1.0, 2.0]]))
    assert LinearHead(4, 2, bias=False).bias is None


def test_projection_output_has_unit_norm() -> None:
    torch.manual_seed(0)
    proj = ProjectionMLP(8, 16, 4)
    z = proj(torch.randn(5, 8) * 100.0)
    assert z.shape == (5, 4)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(5))
    assert proj(torch.randn(1, 8)).shape == (1, 4)  # batch of one works (no batch norm)


@pytest.mark.parametrize("bad", [lambda: CosineHead(0, 3), lambda: CosineHead(3, 2, scale=0.0),
                                 lambda: LinearHead(3, 0), lambda: ProjectionMLP(3, 0, 2)])
def test_bad_sizes_raise(bad) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError):
        bad()
