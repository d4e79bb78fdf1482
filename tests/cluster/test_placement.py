"""Which storage a multi-node run may use (``ltcore.engine.placement``): pure checks on literal nodes and configs."""

from __future__ import annotations

import pytest

from ltcore.config import ConfigError, load_config
from ltcore.engine import placement
from ltcore.engine.runs import RESUMABLE_KEYS

ONE_NODE = [{"NodeID": "a", "Alive": True, "Resources": {"CPU": 2.0}}]
TWO_NODES = [*ONE_NODE, {"NodeID": "b", "Alive": True, "Resources": {"CPU": 1.0}}]
CPU_HEAD = [{"NodeID": "h", "Alive": True, "Resources": {"CPU": 4.0}}]


@pytest.mark.parametrize(("uri", "shared", "expected"), [
    ("s3://bucket/runs", (), True),
    ("gs://bucket/runs", (), True),
    ("/data/runs", (), False),
    ("file:///data/runs", (), False),
    ("./ltcore-runs", (), False),
    ("memory://runs", ("/",), False),  # one process's memory, whatever is declared
    ("/mnt/shared/runs", ("/mnt/shared",), True),
    ("file:///mnt/shared/runs", ("/mnt/shared/",), True),
    ("/mnt/shared", ("/mnt/shared",), True),
    ("/mnt/shared-other/runs", ("/mnt/shared",), False),  # a prefix of the name is not a parent folder
    ("/mnt/shared/../private/runs", ("/mnt/shared",), False),
])
def test_is_shared(uri: str, shared: tuple[str, ...], expected: bool) -> None:
    assert placement.is_shared(uri, shared) is expected


def test_spans_nodes() -> None:
    assert placement.spans_nodes(ONE_NODE, "a", needs_gpu=False) is None
    assert placement.spans_nodes(TWO_NODES, "a", needs_gpu=False) == "the Ray cluster has 2 nodes"
    dead = [*ONE_NODE, {"NodeID": "b", "Alive": False, "Resources": {}}]
    assert placement.spans_nodes(dead, "a", needs_gpu=False) is None  # a node that left does not count
    # a CPU head whose GPU workers the autoscaler has not started: the workers will run elsewhere
    assert "need GPUs" in (placement.spans_nodes(CPU_HEAD, "h", needs_gpu=True) or "")
    gpu_box = [{"NodeID": "g", "Alive": True, "Resources": {"CPU": 8.0, "GPU": 1.0}}]
    assert placement.spans_nodes(gpu_box, "g", needs_gpu=True) is None


def test_node_local_lists_every_location_the_workers_touch() -> None:
    cfg = load_config(None, ["train.storage=/runs", "data.output=s3://b/datasets", "model.pretrained=/w/r18.pt"])
    assert placement.node_local(cfg) == [("train.storage", "/runs"), ("model.pretrained", "/w/r18.pt")]
    cfg = load_config(None, ["train.storage=s3://b/runs", "dataset=/d/manifest.json", "model.pretrained=package"])
    assert placement.node_local(cfg) == [("dataset", "/d/manifest.json")]  # dataset, when set, replaces data.output
    shared = load_config(None, ["train.storage=/nfs/runs", "data.output=/nfs/data", "storage.shared_paths=[/nfs]"])
    assert shared.storage.shared_paths == ("/nfs",)
    assert placement.node_local(shared) == []


def test_refusal_is_one_line_naming_keys_and_the_fix() -> None:
    msg = placement.refusal([("train.storage", "/r"), ("data.output", "/d")], "the Ray cluster has 2 nodes")
    assert "\n" not in msg
    assert msg.startswith("train.storage '/r' and data.output '/d' are paths on one node's disk, but the Ray "
                          "cluster has 2 nodes")
    assert "s3://" in msg and "storage.shared_paths" in msg
    assert placement.refusal([("train.storage", "/r")], "x").startswith("train.storage '/r' is a path on")


def test_check_shared_storage_refuses_on_two_nodes(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Ray calls swapped for literal nodes: two nodes and a local path are refused, shared paths pass."""
    import ray

    from ltcore.engine import trainer

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "nodes", lambda: TWO_NODES)
    monkeypatch.setattr(ray, "get_runtime_context", lambda: type("C", (), {"get_node_id": lambda self: "a"})())
    monkeypatch.setattr(trainer, "use_gpu", lambda cfg: False)
    with pytest.raises(ConfigError, match=r"^train\.storage '/runs' and data\.output '/data' are paths"):
        placement.check_shared_storage(load_config(None, ["train.storage=/runs", "data.output=/data"]))
    placement.check_shared_storage(load_config(None, ["train.storage=s3://b/r", "data.output=s3://b/d"]))
    placement.check_shared_storage(load_config(None, ["train.storage=/nfs/r", "data.output=/nfs/d",
                                                      "storage.shared_paths=[/nfs]"]))
    monkeypatch.setattr(ray, "nodes", lambda: ONE_NODE)
    placement.check_shared_storage(load_config(None, ["train.storage=/runs", "data.output=/data"]))


def test_placement_strategy_is_a_checked_resumable_setting() -> None:
    assert load_config(None, ["train.placement_strategy=STRICT_SPREAD"]).train.placement_strategy == "STRICT_SPREAD"
    with pytest.raises(ConfigError, match="placement_strategy"):
        load_config(None, ["train.placement_strategy=ANYWHERE"])
    assert "train.placement_strategy" in RESUMABLE_KEYS  # where it runs, not what is trained
