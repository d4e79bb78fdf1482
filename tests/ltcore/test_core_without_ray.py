"""Ray stays out of the core: losses, sampling, splits, models, methods and eval import with Ray unimportable,
every stage-1 recipe builds, and neither Ray nor the engine is imported on the way."""

from __future__ import annotations

import subprocess
import sys

CORE = [
    "ltcore.config", "ltcore.storage", "ltcore.dist", "ltcore.losses", "ltcore.augment", "ltcore.models",
    "ltcore.eval", "ltcore.methods.recipes", "ltcore.methods.proco", "ltcore.methods.metric", "ltcore.methods.jrcl",
    "ltcore.methods.lmd_rrl", "ltcore.methods.spmix", "ltcore.methods.stage2", "ltcore.methods.icc",
    "ltcore.methods.pk", "ltcore.methods.calibrators", "ltcore.data.sampling", "ltcore.data.splits",
    "ltcore.data.sources", "ltcore.data.manifest", "ltcore.data.transforms",
]


def test_core_imports_without_ray():
    code = (
        "import sys\n"
        "sys.modules['ray'] = None  # any 'import ray' now raises ImportError\n"
        f"import importlib\nfor m in {CORE!r}:\n    importlib.import_module(m)\n"
        "from ltcore.methods.recipes import build_stage1\n"
        "from ltcore.config import LossConfig\n"
        "from ltcore.methods.recipes import stage1_methods\n"
        "for name in stage1_methods():\n"
        "    build_stage1(name, loss_cfg=LossConfig(normal_class='a', spmix=True), class_counts=[5, 1],"
        " classes=['a', 'b'], epochs=1, proj_dim=8)\n"
        "bad = sorted(m for m, mod in sys.modules.items() if mod is not None and m.split('.')[0] == 'ray'"
        " or m.startswith('ltcore.engine'))\n"
        "assert not bad, bad  # neither Ray nor the engine (a layer above the core) came in\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")
