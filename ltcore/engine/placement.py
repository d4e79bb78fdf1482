"""Where a run's files may live, given the cluster it runs on: shared storage once the run spans nodes.

On one machine a plain path is fine: the driver, the Ray Data tasks and every Train worker see the same disk. On a
cluster of several nodes a plain path is a different folder on each node: the workers on other nodes write their
checkpoints where the driver never looks, read dataset shards that are not there, and a resume finds nothing.
Such a run is refused once Ray is up and before training starts, with one line that says what to use instead:
an object-store URI (``s3://``, ``gs://``, ...) or a path that every node mounts at the same place, declared in
``storage.shared_paths`` (NFS, EFS, a Kubernetes volume mounted in every pod).

A run spans nodes when the cluster has more than one live node, or when its workers need a GPU and the driver's
node has none (a CPU head whose GPU workers the autoscaler has not started yet). An autoscaling cluster that
shows one CPU node now and adds CPU workers later cannot be told apart from a single machine: use shared storage
there from the start (the shipped cluster configs use ``s3://``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from ltcore import storage
from ltcore.config import Config, ConfigError

# Schemes whose paths belong to one node (memory:// even to one process).
NODE_LOCAL_SCHEMES = ("file", "local", "memory")


def is_shared(uri: str, shared_paths: Sequence[str]) -> bool:
    """Whether every node of a cluster reaches ``uri``: an object-store URI, or a local path under one of
    ``shared_paths`` (compared as absolute, normalised paths; symlinks are not resolved, since what counts is the
    path on the other nodes)."""
    if storage.scheme(uri) not in NODE_LOCAL_SCHEMES:
        return True
    if storage.scheme(uri) == "memory":
        return False
    path = os.path.normpath(storage.local_path(uri))
    for shared in shared_paths:
        root = os.path.normpath(storage.local_path(shared))
        if path == root or path.startswith(root.rstrip(os.sep) + os.sep):
            return True
    return False


def run_locations(cfg: Config) -> list[tuple[str, str]]:
    """``(config key, URI)`` of everything the workers on any node read or write: the runs' storage, the dataset
    version (``dataset`` when set, else ``data.output`` where prepare writes it), and a pretrained state dict given
    as a path."""
    out = [("train.storage", cfg.train.storage)]
    out.append(("dataset", cfg.dataset) if cfg.dataset else ("data.output", cfg.data.output))
    if cfg.model.pretrained not in ("", "none", "package"):
        out.append(("model.pretrained", cfg.model.pretrained))
    return out


def node_local(cfg: Config) -> list[tuple[str, str]]:
    """The :func:`run_locations` that only one node reaches."""
    return [(k, uri) for k, uri in run_locations(cfg) if not is_shared(uri, cfg.storage.shared_paths)]


def refusal(local: Sequence[tuple[str, str]], why: str) -> str:
    """The one-line error for a multi-node run with node-local ``local`` locations; ``why``: why it spans nodes."""
    named = " and ".join(f"{k} {uri!r}" for k, uri in local)
    verb = "is a path" if len(local) == 1 else "are paths"
    return (f"{named} {verb} on one node's disk, but {why}: workers on other nodes cannot read or write it; use "
            "shared storage: an s3:// URI (or gs://, ...), or a path that every node mounts, listed in "
            "storage.shared_paths")


def spans_nodes(nodes: Sequence[dict[str, Any]], driver_node_id: str, needs_gpu: bool) -> str | None:
    """Why the run's workers may run on another node than the driver (a phrase), or None when they cannot.

    Args:
        nodes: ``ray.nodes()``: dicts with ``NodeID``, ``Alive`` and ``Resources``.
        driver_node_id: the node the driver runs on.
        needs_gpu: the workers ask for a GPU each.
    """
    alive = [n for n in nodes if n.get("Alive")]
    if len(alive) > 1:
        return f"the Ray cluster has {len(alive)} nodes"
    here = next((n for n in alive if n.get("NodeID") == driver_node_id), None)
    if needs_gpu and here is not None and float(here.get("Resources", {}).get("GPU", 0)) == 0:
        return "the workers need GPUs and the driver's node has none (they run on other nodes)"
    return None


def check_shared_storage(cfg: Config) -> None:
    """Refuse a run whose workers may run on other nodes while its storage is on this node's disk.

    Call it once Ray is up (the driver has joined the cluster) and before training.

    Raises:
        ConfigError: one line naming the node-local keys and what to use instead.
    """
    import ray

    local = node_local(cfg)
    if not local or not ray.is_initialized():  # no Ray yet: Ray Train starts a local one, a single node
        return

    from ltcore.engine.trainer import use_gpu

    why = spans_nodes(ray.nodes(), ray.get_runtime_context().get_node_id(), use_gpu(cfg))
    if why is not None:
        raise ConfigError(refusal(local, why))

