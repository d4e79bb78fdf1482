"""Ray stays out of the core: losses, sampling, splits, models, methods and eval import with Ray unimportable."""

from __future__ import annotations

import subprocess
import sys

CORE = [
    "ltcore.config", "ltcore.storage", "ltcore.losses", "ltcore.augment", "ltcore.models", "ltcore.eval",
    "ltcore.methods.recipes", "ltcore.methods.paper_recipes", "ltcore.methods.stage2", "ltcore.methods.icc",
    "ltcore.methods.pk", "ltcore.data.sampling", "ltcore.data.splits", "ltcore.data.sources",
    "ltcore.data.manifest", "ltcore.data.transforms",
]


def test_core_imports_without_ray():
    code = (
        "import sys\n"
        "sys.modules['ray'] = None  # any 'import ray' now raises ImportError\n"
        f"import importlib\nfor m in {CORE!r}:\n    importlib.import_module(m)\n"
        "from ltcore.methods.recipes import build_stage1\n"
        "from ltcore.config import LossConfig\n"
        "build_stage1('jrcl', loss_cfg=LossConfig(normal_class='a'), class_counts=[5, 1], classes=['a', 'b'],"
        " epochs=1, proj_dim=8)\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")
