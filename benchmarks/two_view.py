"""Two-view training steps: both views in one forward pass (what ltcore does) vs one forward pass per view.

    python benchmarks/two_view.py                                          # metric (SupCon) and JRCL, 128 px, batch 64
    python benchmarks/two_view.py --torch-threads 2                        # as issue 14's CPU runs
    python benchmarks/two_view.py --steps 2 --warmup 1 --batch-size 4 --image-size 32 --torch-threads 1  # smoke

Run from the repository root. No Ray, no data: bare training steps on random images, so the figure is the step's
own cost (no decode, no ingest, no DDP).

Protocol. For each method (``--methods``, default ``metric,jrcl``) the recipe is built from
``ltcore/configs/ham10000_<method>.yaml`` exactly as the stage-1 loop builds it (``build_stage1`` with the config's
``stage1.loss``: SupCon with tau 0.1 and lambda 1.0 plus CE for ``metric``; one-to-all SupCon + BDC + auxiliary
CE + CE for ``jrcl``) on HAM10000's 7 classes, and the model as the loop builds it: ``build_model`` with
``--backbone`` (``tf_efficientnet_lite0``), ``--pretrained`` (``none``; ``package`` = the offline EfficientNet-Lite0
weights), the config's head and projector (``proj_dim`` 128) and, for JRCL, the auxiliary binary head. Each step
is the loop's step: the recipe's ``loss(model, batch, epoch)``, ``zero_grad``, ``backward``, SGD (the config's lr,
momentum, weight decay, Nesterov) ``step``, the recipe's ``after_step``. The batch has ``--batch-size`` (64)
samples, each with two views ``image`` and ``image2`` (random uint8 pixels at ``--image-size`` (128) px,
normalised once before timing: no decode or normalisation cost in the step) and a label (every class in turn,
shuffled). The two forms:

- ``one pass``: the recipe as shipped: :func:`ltcore.methods._recipe.two_views` concatenates the views into one
  batch of 2B, one forward, the loss, one backward.
- ``two passes``: the same recipe code on a model wrapper that splits that 2B batch back into its views (a view
  of the tensor, no copy) and forwards each view separately (two forwards of B), concatenating the outputs, so
  that the recipe builds the same embeddings ``(N, 2, P)`` and the same loss; one backward through both graphs.
  The concatenation of the views in ``two_views`` is paid by both forms alike (~13 MB at B 64, 128 px).

The two forms do not compute exactly the same thing in training mode: with one pass BatchNorm's batch statistics
cover both views (2B samples), as in the SupCon reference code, while with two passes each view is normalised with
its own batch statistics (B samples), and the running statistics get two updates per step. In eval mode they are
the same function; the script checks that on the initial weights (``eval_loss_abs_diff``).

Timing: each form has its own copy of the same initial model, recipe and optimiser. ``--warmup`` (3) untimed steps
per form, then ``--rounds`` (3) rounds; in each round every form runs ``--steps`` (10) timed steps, the order
rotating from round to round (side by side in one process, so drift in machine load falls on both). Per round:
``samples/s`` = steps x B / wall time (``time.perf_counter()``; on CUDA between two ``torch.cuda.synchronize()``),
``views/s`` = 2 x samples/s (images through the backbone). The table gives the median over rounds and the ratio
one pass / two passes of the medians. ``--torch-threads N`` sets ``torch.set_num_threads(N)`` (0: torch's
default); the JSON records the count used. On a machine shared with other jobs keep it at or below the idle
cores: with more OpenMP threads than free cores a step can be ten times slower or worse. Results go to
``benchmarks/results/two_view.json`` and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)

import torch  # noqa: E402
from torch import nn  # noqa: E402

from ltcore import storage  # noqa: E402
from ltcore.config import Config, load_config  # noqa: E402
from ltcore.data.transforms import normalize_images  # noqa: E402
from ltcore.methods.recipes import Stage1Recipe, build_stage1  # noqa: E402
from ltcore.models import build_model  # noqa: E402

METHODS = ("metric", "jrcl")
FORMS = ("one pass", "two passes")
# HAM10000's classes (sorted dx codes, as the manifest lists them) and whole-dataset counts; these recipes use only
# the number of classes and the name of the normal class (JRCL: nv)
HAM_CLASSES = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
HAM_COUNTS = (327, 514, 1099, 115, 1113, 6705, 142)


class TwoPasses(nn.Module):
    """Forward a two-view batch ``(2B, C, H, W)`` as two batches of B; the outputs concatenated back to 2B rows."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        first, second = x.chunk(2, dim=0)  # (B, C, H, W) each: views of x, no copy
        a, b = self.model(first), self.model(second)
        return {k: torch.cat([a[k], b[k]], dim=0) for k in a}  # each (2B, ...)


@dataclass
class Form:
    """One way to run the step: its own model copy, recipe, optimiser."""

    name: str
    net: nn.Module  # what the recipe forwards: the model, or TwoPasses around it
    model: nn.Module
    recipe: Stage1Recipe
    optimizer: torch.optim.Optimizer


def autocast(device: torch.device) -> Any:
    # as ltcore.engine.worker.autocast (bf16 on CUDA only), without importing the engine (and Ray)
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def build_form(name: str, method: str, cfg: Config, model: nn.Module, device: torch.device) -> Form:
    """The recipe from config as the stage-1 loop builds it, set up on ``model`` (a fresh copy), and its optimiser."""
    recipe = build_stage1(method, loss_cfg=cfg.stage1.loss, class_counts=list(HAM_COUNTS), classes=list(HAM_CLASSES),
                          epochs=cfg.stage1.epochs, proj_dim=cfg.model.proj_dim)
    recipe.setup(model)
    extra = recipe.state_modules().to(device)
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    params = [p for p in [*model.parameters(), *extra.parameters()] if p.requires_grad]
    s1 = cfg.stage1  # the SGD ltcore's loop builds (build_optimizer, optimizer=sgd)
    opt = torch.optim.SGD(params, lr=s1.lr, momentum=s1.momentum, weight_decay=s1.weight_decay, nesterov=True)
    net = model if name == "one pass" else TwoPasses(model)
    return Form(name, net, model, recipe, opt)


def make_batches(n: int, batch_size: int, image_size: int, device: torch.device, seed: int) -> list[dict]:
    """``n`` two-view batches of random pixels, normalised as ``to_device`` does; labels cycle over the classes."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        views = [torch.randint(0, 256, (batch_size, 3, image_size, image_size), dtype=torch.uint8, generator=g)
                 for _ in range(2)]
        label = (torch.arange(batch_size) % len(HAM_CLASSES))[torch.randperm(batch_size, generator=g)]  # (B,)
        batch = {"image": normalize_images(views[0].to(device)), "image2": normalize_images(views[1].to(device)),
                 "label": label.to(device)}
        if device.type == "cuda":
            batch = {k: v.contiguous(memory_format=torch.channels_last) if v.ndim == 4 else v for k, v in batch.items()}
        out.append(batch)
    return out


def train_step(form: Form, batch: dict[str, torch.Tensor], device: torch.device) -> torch.Tensor:
    """The stage-1 loop's step (``_train_epoch``), same order of calls."""
    with autocast(device):
        loss, _ = form.recipe.loss(form.net, batch, 0)
    form.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    form.optimizer.step()
    form.recipe.after_step(form.model)
    return loss.detach()


def timed_steps(form: Form, batches: list[dict], steps: int, device: torch.device) -> float:
    """Wall seconds of ``steps`` training steps (CUDA: synchronised before and after, not per step)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for i in range(steps):
        train_step(form, batches[i % len(batches)], device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


@torch.no_grad()
def eval_loss_diff(forms: list[Form], batch: dict[str, torch.Tensor], device: torch.device) -> float:
    """|loss(one pass) - loss(two passes)| in eval mode on the forms' (equal, initial) weights: BatchNorm uses its
    running statistics there, so the two forms are the same function and the difference is rounding."""
    losses = []
    for f in forms:
        f.model.eval()
        with autocast(device):
            losses.append(float(f.recipe.loss(f.net, batch, 0)[0]))
        f.model.train()
    return abs(losses[0] - losses[1])


def run_method(method: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    cfg = load_config(os.path.join(REPO, "ltcore", "configs", f"ham10000_{method}.yaml"),
                      [f"model.backbone={args.backbone}", f"model.pretrained={args.pretrained}"])
    torch.manual_seed(args.seed)
    probe = build_stage1(method, loss_cfg=cfg.stage1.loss, class_counts=list(HAM_COUNTS), classes=list(HAM_CLASSES),
                         epochs=cfg.stage1.epochs, proj_dim=cfg.model.proj_dim)
    if len(probe.views) != 2:
        raise SystemExit(f"stage1.method={method!r} with its HAM10000 config uses {len(probe.views)} view(s), not two")
    base = build_model(num_classes=len(HAM_CLASSES), backbone=cfg.model.backbone, pretrained=cfg.model.pretrained,
                       head=cfg.model.head, proj_dim=cfg.model.proj_dim if probe.needs_projector else 0,
                       aux_binary=probe.needs_aux_binary, cosine_scale=cfg.model.cosine_scale)
    forms = [build_form(name, method, cfg, copy.deepcopy(base), device) for name in FORMS]
    batches = make_batches(2, args.batch_size, args.image_size, device, args.seed)
    diff = eval_loss_diff(forms, batches[0], device)
    for f in forms:  # warm-up: allocator, kernels, first-call costs
        timed_steps(f, batches, args.warmup, device)
    secs: dict[str, list[float]] = {f.name: [] for f in forms}
    for r in range(args.rounds):
        for f in forms[r % 2:] + forms[:r % 2]:  # rotate the order every round
            secs[f.name].append(timed_steps(f, batches, args.steps, device))
        print(f"[two_view] {method} round {r + 1}/{args.rounds}: " + ", ".join(
            f"{n} {args.steps * args.batch_size / s[-1]:.1f} samples/s" for n, s in secs.items()), flush=True)
    out: dict[str, Any] = {"eval_loss_abs_diff": diff, "forms": {}}
    for name, s in secs.items():
        rates = [args.steps * args.batch_size / x for x in s]
        med = statistics.median(rates)
        out["forms"][name] = {"round_seconds": s, "samples_per_s_rounds": rates, "samples_per_s": med,
                              "views_per_s": 2 * med, "s_per_step": statistics.median(s) / args.steps}
    out["one_over_two"] = out["forms"]["one pass"]["samples_per_s"] / out["forms"]["two passes"]["samples_per_s"]
    return out


def table(results: dict[str, dict[str, Any]]) -> str:
    lines = ["| method | form | samples/s | views/s | s/step | one pass / two passes |",
             "|---|---|---:|---:|---:|---:|"]
    for method, res in results.items():
        for name, f in res["forms"].items():
            ratio = f"{res['one_over_two']:.2f}" if name == "one pass" else ""
            lines.append(f"| {method} | {name} | {f['samples_per_s']:.1f} | {f['views_per_s']:.1f} "
                         f"| {f['s_per_step']:.3f} | {ratio} |")
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default=",".join(METHODS), help="two-view recipes, comma-separated: metric,jrcl")
    p.add_argument("--backbone", default="tf_efficientnet_lite0")
    p.add_argument("--pretrained", default="none", help="model.pretrained: none, package or a state-dict path/URI")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=64, help="B: samples per step (2B views)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per form before the first round")
    p.add_argument("--steps", type=int, default=10, help="timed steps per form per round")
    p.add_argument("--rounds", type=int, default=3, help="rounds; the forms' order rotates each round")
    p.add_argument("--torch-threads", type=int, default=0, help="torch.set_num_threads(N); 0 = torch's default")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join(HERE, "results", "two_view.json"))
    args = p.parse_args()
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not args.methods or any(m not in METHODS for m in args.methods):
        p.error(f"--methods takes a comma-separated subset of {','.join(METHODS)}")
    if min(args.steps, args.rounds, args.batch_size) < 1 or args.warmup < 0 or args.torch_threads < 0:
        p.error("--steps, --rounds and --batch-size must be >= 1; --warmup and --torch-threads >= 0")
    if args.batch_size < 2:
        p.error("--batch-size must be >= 2 (SupCon needs positives)")
    return args


def main() -> int:
    args = parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("two_view: --device cuda but no CUDA device on this machine; nothing measured")
        return 0
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    t0 = time.perf_counter()
    results = {m: run_method(m, args, device) for m in args.methods}
    result = {
        "protocol": {"methods": args.methods, "backbone": args.backbone, "pretrained": args.pretrained,
                     "image_size": args.image_size, "batch_size": args.batch_size, "views_per_sample": 2,
                     "warmup_steps": args.warmup, "timed_steps_per_round": args.steps, "rounds": args.rounds,
                     "statistic": "median over rounds", "device": str(device), "seed": args.seed,
                     "configs": {m: f"ltcore/configs/ham10000_{m}.yaml" for m in args.methods}},
        "machine": {"torch_threads": torch.get_num_threads(), "cpus_visible": os.cpu_count(),
                    "cuda_device": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                    "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
                    "load_avg_1m_at_end": os.getloadavg()[0]},
        "results": results,
        "total_s": time.perf_counter() - t0,
    }
    storage.write_json(args.out, result)
    print(f"\n{args.backbone} (pretrained {args.pretrained}), {args.image_size} px, B = {args.batch_size} samples "
          f"(2B views) per step, {device}, {torch.get_num_threads()} torch thread(s); median of {args.rounds} "
          f"round(s) of {args.steps} steps\n")
    print(table(results))
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
