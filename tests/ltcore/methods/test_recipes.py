"""What every stage-1 recipe owes the engine: its registry entry, gradients into every trainable parameter, a
falling loss on a toy batch, two views when it asks for them, and the same gradients under DDP."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from ltcore.dist import gather_rows
from ltcore.methods.recipes import STAGE1, stage1_methods
from ltcore.models import build_model

RECIPES = [
    ("proco", {}),
    ("metric", {"metric_loss": "triplet"}),
    ("metric", {"metric_loss": "centre_triplet"}),
    ("metric", {"metric_loss": "supcon"}),
    ("jrcl", {"normal_class": "a"}),
    # relation terms on from epoch 0; the channel term (weight 10) has gradients of norm ~100 on this untrained
    # toy model, so it trains with a smaller step (LMD itself uses lr 0.01)
    ("lmd_rrl", {"rrl_start_epoch": -1, "lr": 0.002}),
    ("spmix", {"spmix_patch": 4}),
]


@pytest.mark.parametrize(("name", "kw"), RECIPES, ids=[f"{n}-{kw.get('metric_loss', '')}" for n, kw in RECIPES])
def test_recipe_trains_on_toy_batch(name: str, kw: dict[str, object], toy) -> None:
    kw = dict(kw)
    lr = float(kw.pop("lr", 0.05))  # type: ignore[arg-type]
    recipe = toy.build(name, **kw)
    model = toy.model(recipe)
    recipe.setup(model)  # type: ignore[attr-defined]
    batch = toy.batch(tail=recipe.needs_tail_stream)
    # every trainable parameter (model and recipe) gets a finite gradient: DDP runs with find_unused_parameters=False
    loss, _ = recipe.loss(model, batch, 0)
    loss.backward()
    for p in toy.params(model, recipe):
        assert p.grad is not None and torch.isfinite(p.grad).all()
    model.zero_grad(set_to_none=True)
    first, last = toy.train(recipe, model, batch, steps=15, lr=lr)
    assert last < first


# every registered stage-1 recipe, with the settings that switch all of its terms on
GRAD_CASES = [(name, {}) for name in stage1_methods() if name not in ("metric", "lmd_rrl", "spmix")] + [
    ("metric", {"metric_loss": "triplet"}),
    ("metric", {"metric_loss": "centre_triplet"}),
    ("metric", {"metric_loss": "supcon"}),
    ("lmd_rrl", {"rrl_start_epoch": -1}),
    ("spmix", {"spmix_patch": 4, "spmix_prob": 1.0}),
    ("jrcl", {"spmix": True, "spmix_patch": 4, "spmix_prob": 1.0}),  # a recipe composed with SPMix
]


def test_grad_cases_cover_every_registered_recipe() -> None:
    assert {name for name, _ in GRAD_CASES} == set(stage1_methods())


@pytest.mark.parametrize(("name", "kw"), GRAD_CASES,
                         ids=[f"{n}-{'-'.join(map(str, kw.values()))}" for n, kw in GRAD_CASES])
def test_every_trainable_parameter_gets_a_nonzero_gradient(name: str, kw: dict[str, object], toy) -> None:
    # A module that is in the optimiser but outside the loss (a dead projector) has an exactly zero gradient.
    recipe = toy.build(name, **kw)
    model = toy.model(recipe)
    recipe.setup(model)
    batch = toy.batch(tail=recipe.needs_tail_stream)
    recipe.start_epoch(9)  # the last epoch of 10: DRW weights on
    loss, _ = recipe.loss(model, batch, 9)
    loss.backward()
    named = dict(nn.ModuleDict({"model": model, "extra": recipe.state_modules()}).named_parameters())
    trainable = {k: p for k, p in named.items() if p.requires_grad}
    assert trainable
    dead = [k for k, p in trainable.items() if p.grad is None or not bool(p.grad.abs().sum() > 0)]
    assert not dead, f"{name}: no gradient reaches {dead}"


def test_registry_names_and_requirements(toy) -> None:
    for name in ("proco", "metric", "jrcl", "lmd_rrl", "spmix"):
        assert name in STAGE1
    assert toy.build("metric", metric_loss="supcon").views == ("weak", "weak")
    assert toy.build("metric", metric_loss="triplet").views == ("weak",)
    jrcl = toy.build("jrcl")
    assert jrcl.needs_projector and jrcl.needs_aux_binary and jrcl.views == ("weak", "weak")
    assert toy.build("lmd_rrl").views == ("resize_flip", "strong")  # teacher: resize + flips; student: strong
    assert toy.build("spmix").needs_tail_stream
    for name in ("proco", "metric", "jrcl", "lmd_rrl", "spmix"):
        assert not toy.build(name).find_unused_parameters



def test_two_view_recipe_needs_image2(toy) -> None:
    recipe = toy.build("jrcl")
    batch = toy.batch()
    del batch["image2"]
    with pytest.raises(ValueError, match="image2"):
        recipe.loss(toy.model(recipe), batch, 0)



@pytest.mark.parametrize("name", ["jrcl", "lmd_rrl"])
def test_recipes_on_small_cnn(name: str, toy) -> None:
    recipe = toy.build(name, rrl_start_epoch=-1)
    torch.manual_seed(0)
    model = build_model(num_classes=3, backbone="small_cnn", proj_dim=8 if recipe.needs_projector else 0,
                        aux_binary=recipe.needs_aux_binary)
    recipe.setup(model)  # type: ignore[attr-defined]
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.randn(6, 3, 16, 16, generator=g), "image2": torch.randn(6, 3, 16, 16, generator=g),
             "label": torch.tensor([0, 0, 1, 1, 2, 2])}
    model.train()
    loss, _ = recipe.loss(model, batch, 0)
    assert torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_gather_rows_single_process_is_identity() -> None:
    t = torch.randn(3, 2, requires_grad=True)
    assert gather_rows(t, differentiable=True) is t
    assert not gather_rows(t).requires_grad


_DDP_SCRIPT = textwrap.dedent(
    """
    import os, sys, torch, torch.distributed as dist, torch.multiprocessing as mp
    from torch import nn
    from ltcore.config import LossConfig
    from ltcore.dist import gather_rows
    from ltcore.methods.recipes import build_stage1
    from ltcore.models import LTModel

    class Wrap(nn.Module):  # the engine's TrainModule
        def __init__(self, model, extra):
            super().__init__(); self.model = model; self.extra = extra
        def forward(self, x):
            return self.model(x)

    def make(name, **kw):
        cfg = LossConfig(normal_class="a", rrl_start_epoch=-1, proco_queue=16, **kw)
        recipe = build_stage1(name, loss_cfg=cfg, class_counts=[4, 3, 3], classes=["a", "b", "c"], epochs=1,
                              proj_dim=4)
        torch.manual_seed(0)
        bb = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 6))
        model = LTModel(bb, 6, 3, proj_dim=4 if recipe.needs_projector else 0, aux_binary=recipe.needs_aux_binary)
        recipe.setup(model)
        return recipe, model

    def data():
        g = torch.Generator().manual_seed(1)
        return {"image": torch.randn(10, 3, 2, 2, generator=g), "image2": torch.randn(10, 3, 2, 2, generator=g),
                "label": torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])}

    def run(rank, world, out, port):
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        dist.init_process_group("gloo", rank=rank, world_size=world)
        res = {}
        # 1. uneven gather, differentiable: grad of sum(w * gathered) is w restricted to this rank's rows
        t = torch.full((2 + rank, 1), float(rank), requires_grad=True)
        g = gather_rows(t, differentiable=True)
        (g.squeeze(1) * torch.arange(float(g.shape[0]))).sum().backward()
        res["gather"] = g.detach().squeeze(1).tolist()
        res["gather_grad"] = t.grad.squeeze(1).tolist()
        # 2. recipes under DDP with find_unused_parameters=False; rank r takes rows r*5 .. r*5+4
        full = data()
        part = {k: v[rank * 5:(rank + 1) * 5] for k, v in full.items()}
        for name in ("lmd_rrl", "proco", "jrcl"):
            recipe, model = make(name)
            ddp = nn.parallel.DistributedDataParallel(Wrap(model, recipe.state_modules()),
                                                      find_unused_parameters=False)
            loss, _ = recipe.loss(ddp, part, 0)
            loss.backward()
            recipe.after_step(model)
            res[name + "_grad"] = [p.grad.clone() for p in model.parameters()]
            if name == "proco":
                res["queue"] = recipe.proco.queue_keys.clone()
        torch.save(res, os.path.join(out, f"rank{rank}.pt"))
        dist.destroy_process_group()

    if __name__ == "__main__":
        mp.spawn(run, args=(2, sys.argv[1], sys.argv[2]), nprocs=2)
    """
)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_ddp_gather_and_recipes_match_single_process(tmp_path: Path) -> None:
    script = tmp_path / "ddp.py"
    script.write_text(_DDP_SCRIPT)
    repo = Path(__file__).resolve().parents[3]
    proc = subprocess.run([sys.executable, str(script), str(tmp_path), str(_free_port())], cwd=repo,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    # rank 0 holds 2 rows of 0.0, rank 1 three rows of 1.0. Both ranks compute L = sum(i * g_i); the gradient that
    # reaches a rank's own rows is the sum over the two ranks' losses: 2 * i
    assert r0["gather"] == r1["gather"] == [0.0, 0.0, 1.0, 1.0, 1.0]
    assert r0["gather_grad"] == [0.0, 2.0]
    assert r1["gather_grad"] == [4.0, 6.0, 8.0]
    # ProCo: every rank enqueued the keys of both ranks, in the same order
    torch.testing.assert_close(r0["queue"], r1["queue"])
    assert int((r0["queue"].norm(dim=1) > 0).sum()) == 10
    # LMD: the DDP gradient (local CE + relation terms on the gathered batch) equals the one-process gradient
    sys.path.insert(0, str(tmp_path))
    try:
        import importlib

        mod = importlib.import_module("ddp")
        recipe, model = mod.make("lmd_rrl")
        loss, _ = recipe.loss(model, mod.data(), 0)
        loss.backward()
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("ddp", None)
    for g0, g1, p in zip(r0["lmd_rrl_grad"], r1["lmd_rrl_grad"], model.parameters()):
        torch.testing.assert_close(g0, g1)
        torch.testing.assert_close(g0, p.grad, rtol=1e-4, atol=1e-6)



def test_recipe_modules_do_not_import_the_registry() -> None:
    # recipes.py imports every recipe module to build STAGE1; a recipe module importing recipes.py back would be an
    # import circle (the old paper_recipes <-> recipes one). They take the base class from methods._recipe instead.
    import ast

    methods = Path(__file__).resolve().parents[3] / "ltcore" / "methods"
    for name in ("_recipe", "proco", "metric", "jrcl", "lmd_rrl", "spmix"):
        tree = ast.parse((methods / f"{name}.py").read_text())
        imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        imported |= {a.name for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}
        assert "ltcore.methods.recipes" not in imported, name
        assert not any(m and m.startswith("ltcore.engine") for m in imported), name
