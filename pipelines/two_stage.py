"""Two-stage long-tail training on Ray Train (``ltcore-train``): see :mod:`ltcore.entry.train`.

    python pipelines/two_stage.py                                   # demo: embedded digits, local Ray, minutes
    python pipelines/two_stage.py --config ltcore/configs/ham10000_ce_crt.yaml
    python pipelines/two_stage.py --config ... --smoke-test stage1.epochs=2
    ray job submit --working-dir . -- python pipelines/two_stage.py --config ...
"""

from ltcore.entry.train import run

if __name__ == "__main__":
    run()
