"""A bare CPU training step under glibc's default malloc vs ltcore's Train-worker settings, main vs other thread.

    python benchmarks/malloc_step.py                         # tf_efficientnet_lite0, 128 px, batch 64, 2 threads
    python benchmarks/malloc_step.py --steps 2 --warmup 1 --rounds 1 --batch-size 4 --image-size 32   # smoke

Why: Ray Train runs the training function in a thread of the worker actor, not in its main thread. glibc gives
such a thread its own malloc arena, whose heaps it trims and grows again as every step frees and re-allocates
its activations; each page faulted in again is system time. ``train.tune_malloc`` (on by default) starts the
Train workers with :data:`ltcore.engine.trainer.WORKER_MALLOC_ENV` (one arena, no trimming, a 1 GiB top pad).

Protocol: each case is a fresh Python process (malloc reads its settings at start-up) that builds
``--backbone`` (``package`` weights for EfficientNet-Lite0, else none) with a linear head for 7 classes, SGD
(lr 0.01, momentum 0.9, Nesterov, weight decay 1e-4) and ``torch.set_num_threads(--torch-threads)``, then runs
``--warmup`` untimed and ``--steps`` timed steps (forward, CE, zero_grad, backward, step) on one random batch of
``--batch-size`` images at ``--image-size`` px, in the main thread or in a second thread (as Ray Train does).
Cases: {glibc default, WORKER_MALLOC_ENV} x {main thread, other thread}, ``--rounds`` rounds in rotating order.
Per case: images/s from the median step, and the process's user and system CPU seconds and minor page faults over
warm-up + timed steps (``getrusage``). Medians over rounds. Results: ``benchmarks/results/malloc_step.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)

CASES = (("default", "main"), ("default", "thread"), ("tuned", "main"), ("tuned", "thread"))


def steps(args: argparse.Namespace) -> dict[str, Any]:
    """One case in this process: the timed steps' median and the process's CPU time and page faults."""
    import torch

    from ltcore.models import build_model

    torch.set_num_threads(args.torch_threads)
    torch.manual_seed(0)
    pretrained = "package" if args.backbone == "tf_efficientnet_lite0" else "none"
    model = build_model(num_classes=7, backbone=args.backbone, pretrained=pretrained, head="linear")
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=1e-4)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size)  # (B, 3, S, S)
    y = torch.randint(0, 7, (args.batch_size,))
    model.train()
    r0, times = resource.getrusage(resource.RUSAGE_SELF), []
    for _ in range(args.warmup + args.steps):
        t = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(x)["logits"], y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t)
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    step_s = statistics.median(times[args.warmup:])
    return {"images_per_s": args.batch_size / step_s, "step_s": step_s, "user_s": r1.ru_utime - r0.ru_utime,
            "sys_s": r1.ru_stime - r0.ru_stime, "minor_faults": r1.ru_minflt - r0.ru_minflt,
            "torch_threads": torch.get_num_threads()}


def child(args: argparse.Namespace) -> None:
    out: dict[str, Any] = {}
    if args.child == "main":
        out = steps(args)
    else:
        t = threading.Thread(target=lambda: out.update(steps(args)))
        t.start()
        t.join()
    print(json.dumps(out))


def run_case(args: argparse.Namespace, malloc: str, thread: str) -> dict[str, Any]:
    from ltcore.engine.trainer import WORKER_MALLOC_ENV

    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    if malloc == "tuned":
        env.update(WORKER_MALLOC_ENV)
    cmd = [sys.executable, __file__, "--child", thread, *args.forward]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="tf_efficientnet_lite0")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--torch-threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", default=os.path.join(HERE, "results", "malloc_step.json"))
    p.add_argument("--child", choices=["main", "thread"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return 0
    args.forward = [f"--{k}={getattr(args, k.replace('-', '_'))}" for k in
                    ("backbone", "image-size", "batch-size", "torch-threads", "warmup", "steps")]
    runs: dict[str, list[dict[str, Any]]] = {f"{m}/{t}": [] for m, t in CASES}
    for r in range(args.rounds):
        for m, t in CASES[r % len(CASES):] + CASES[: r % len(CASES)]:
            res = run_case(args, m, t)
            runs[f"{m}/{t}"].append(res)
            print(f"round {r + 1} {m:>7} malloc, {t:>6} thread: {res['images_per_s']:5.1f} img/s, user "
                  f"{res['user_s']:.1f} s, sys {res['sys_s']:.1f} s, {res['minor_faults']} minor faults", flush=True)
    med = {k: {f: statistics.median(x[f] for x in v) for f in ("images_per_s", "user_s", "sys_s", "minor_faults")}
           for k, v in runs.items()}
    result = {"protocol": {k: v for k, v in vars(args).items() if k not in ("child", "forward", "out")},
              "machine": {"cpus_visible": os.cpu_count(), "platform": platform.platform(),
                          "load_avg_1m_at_end": os.getloadavg()[0]},
              "medians": med, "runs": runs,
              "ratio_tuned_over_default_thread": med["tuned/thread"]["images_per_s"]
              / med["default/thread"]["images_per_s"]}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"\n{args.backbone}, {args.image_size} px, batch {args.batch_size}, {args.torch_threads} torch threads; "
          f"medians of {args.rounds} rounds\n")
    print("| malloc | thread | images/s | user s | sys s | minor faults |\n|---|---|---:|---:|---:|---:|")
    for k, v in med.items():
        m, t = k.split("/")
        print(f"| {m} | {t} | {v['images_per_s']:.1f} | {v['user_s']:.1f} | {v['sys_s']:.1f} | "
              f"{v['minor_faults']:.0f} |")
    print(f"\ntuned / default in a thread (as Ray Train runs): {result['ratio_tuned_over_default_thread']:.2f}")
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
