from __future__ import annotations

import pytest

from ltcore.methods.jrcl import JRCLRecipe


def test_jrcl_unknown_normal_class(toy) -> None:
    msg = r"loss.normal_class 'nv' is not a class of this dataset; choose one of a, b, c"
    with pytest.raises(ValueError, match=msg):
        toy.build("jrcl", normal_class="nv")


def test_jrcl_normal_index_and_terms(toy) -> None:
    recipe = toy.build("jrcl", normal_class="b")
    assert isinstance(recipe, JRCLRecipe) and recipe.normal_index == 1
    model = toy.model(recipe)
    batch = toy.batch()
    loss, logs = recipe.loss(model, batch, 0)
    # the four terms add up to the loss
    assert float(loss.detach()) == pytest.approx(logs["ce"] + logs["scl"] + logs["bdc"] + logs["aux_ce"], rel=1e-5)


