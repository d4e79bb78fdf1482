"""The model registry: MLflow model versions, the serving alias (``champion``), decisions, and the retrain lock.

Nothing here is a registry of ltcore's own: a trained model is an MLflow model version whose source is the
``checkpoint/`` artifact folder of its MLflow run (``state.pt`` + ``meta.json``), tagged ``ltcore.*`` with its run,
dataset version, config hash and test metrics; the serving model is the version holding the alias.

Two retrains at once: a retrain holds :class:`RegistryLock` while it runs. The lock is a registered model named
``<model>.retrain-lock``: creating a registered model that exists fails in every MLflow store (a unique key in the
SQL stores), which makes creation an atomic test-and-set. The holder renews an expiry tag from a thread; a lock
whose holder stopped renewing (killed) is taken over after its expiry, or at once when the holder ran on this host
and its process is gone. Moving the alias is also a compare-and-set (:func:`set_alias`): it is refused if the alias
moved since the gate read it.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Mapping
from typing import Any

TAG = "ltcore."
DECISION_TAG = "ltcore.decision"  # on a model version: promoted / kept / pending (the gate has not finished)
LAST_DECISION_TAG = "ltcore.last_decision"  # on the registered model: the last retrain's decision, JSON
LOCK_SUFFIX = ".retrain-lock"


class RegistryError(RuntimeError):
    pass


class LockHeld(RegistryError):
    """Another live retrain holds the registry lock."""


class AliasMoved(RegistryError):
    """The alias changed between the gate's read and the move (another writer)."""


def _already_exists(e: Exception) -> bool:
    return getattr(e, "error_code", "") == "RESOURCE_ALREADY_EXISTS"


def _not_found(e: Exception) -> bool:
    return getattr(e, "error_code", "") == "RESOURCE_DOES_NOT_EXIST"


def ensure_model(c: Any, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        c.create_registered_model(name, description="ltcore model; the serving version holds the alias 'champion'")
    except MlflowException as e:
        if not _already_exists(e):
            raise


def alias_version(c: Any, name: str, alias: str) -> Any | None:
    """The model version holding ``alias``, or None (no such model, or the alias is unset)."""
    from mlflow.exceptions import MlflowException

    try:
        return c.get_model_version_by_alias(name, alias)
    except MlflowException as e:
        if _not_found(e) or getattr(e, "error_code", "") == "INVALID_PARAMETER_VALUE":
            return None
        raise


def resolve(c: Any, name: str, ref: str) -> Any:
    """A model version by number (``3``) or alias (``champion``).

    Raises:
        ValueError: no such version or alias (one line naming what exists).
    """
    from mlflow.exceptions import MlflowException

    try:
        if ref.isdigit():
            return c.get_model_version(name, ref)
        mv = alias_version(c, name, ref)
    except MlflowException as e:
        raise ValueError(f"model {name!r} version {ref!r}: {str(e).splitlines()[0]}") from None
    if mv is None:
        raise ValueError(f"model {name!r} has no version with alias {ref!r}; run retrain.py first, or name a version "
                         "number (--model 3)")
    return mv


def versions(c: Any, name: str) -> list[Any]:
    """Every version of ``name``, oldest first."""
    return sorted(c.search_model_versions(f"name='{name}'"), key=lambda v: int(v.version))


def register(c: Any, name: str, run_id: str, tags: Mapping[str, str]) -> Any:
    """A new model version from the ``checkpoint/`` artifacts of MLflow run ``run_id``, tagged with ``tags``
    (the gate's decision tag starts as ``pending``)."""
    from ltcore.lifecycle.tracking import CHECKPOINT_ARTIFACT

    ensure_model(c, name)
    run = c.get_run(run_id)
    source = f"{run.info.artifact_uri.rstrip('/')}/{CHECKPOINT_ARTIFACT}"
    all_tags = {DECISION_TAG: "pending", **{k: str(v) for k, v in tags.items()}}
    return c.create_model_version(name, source, run_id=run_id, tags=all_tags)


def set_alias(c: Any, name: str, alias: str, version: str, expected: str | None) -> None:
    """Move ``alias`` to ``version`` if it still points at ``expected`` (None: unset).

    Raises:
        AliasMoved: it points elsewhere now.
    """
    current = alias_version(c, name, alias)
    now = None if current is None else str(current.version)
    if now != expected:
        raise AliasMoved(f"alias {alias!r} of {name!r} moved from version {expected} to {now} while this retrain ran")
    c.set_registered_model_alias(name, alias, str(version))


def record_decision(c: Any, name: str, decision: Mapping[str, Any], version: str | None = None) -> None:
    """Write a gate decision (outcome, numbers, time) on the registered model (``ltcore.last_decision`` and one
    ``ltcore.decision.<UTC time>`` tag per decision: the decision log), and on the challenger's version."""
    ensure_model(c, name)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    text = json.dumps({"time": stamp, **decision}, sort_keys=True, default=str)
    c.set_registered_model_tag(name, LAST_DECISION_TAG, text)
    c.set_registered_model_tag(name, f"{DECISION_TAG}.{stamp}", text)
    if version is not None:
        c.set_model_version_tag(name, version, DECISION_TAG, str(decision["outcome"]))
        c.set_model_version_tag(name, version, f"{DECISION_TAG}_detail", text)


def decisions(c: Any, name: str) -> list[dict[str, Any]]:
    """The decision log of ``name``, oldest first."""
    tags = c.get_registered_model(name).tags
    return [json.loads(tags[k]) for k in sorted(tags) if k.startswith(DECISION_TAG + ".")]


def download_checkpoint(mv: Any, dest: str) -> str:
    """The checkpoint folder of a model version, copied into ``dest`` (local); returns the folder path."""
    import mlflow.artifacts

    return str(mlflow.artifacts.download_artifacts(artifact_uri=mv.source, dst_path=dest))


# ---------------------------------------------------------------------------------------------------------------
# the retrain lock


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RegistryLock:
    """Mutual exclusion of retrains of one registered model, with expiry for a dead holder (see the module
    docstring). Use as a context manager; :meth:`acquire` raises :class:`LockHeld` when a live retrain holds it.

    Args:
        client: an ``mlflow.MlflowClient``.
        model: the registered model the lock guards.
        ttl_s: seconds after the last renewal at which the lock counts as abandoned; renewed every ``ttl_s / 4``.
    """

    def __init__(self, client: Any, model: str, ttl_s: float = 600.0) -> None:
        if ttl_s <= 0:
            raise ValueError(f"lock ttl must be > 0 seconds, got {ttl_s}")
        self.c, self.model, self.ttl_s = client, model, float(ttl_s)
        self.name = model + LOCK_SUFFIX
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _tags(self) -> dict[str, str]:
        return {"owner": self.owner, "host": socket.gethostname(), "pid": str(os.getpid()),
                "expires": f"{time.time() + self.ttl_s:.3f}"}

    def holder(self) -> dict[str, str] | None:
        """The tags of the current lock (owner, host, pid, expires), or None when free."""
        from mlflow.exceptions import MlflowException

        try:
            return dict(self.c.get_registered_model(self.name).tags)
        except MlflowException as e:
            if _not_found(e):
                return None
            raise

    @staticmethod
    def abandoned(tags: Mapping[str, str]) -> bool:
        """Expired, or held by a process of this host that no longer exists."""
        if float(tags.get("expires", 0) or 0) < time.time():
            return True
        pid = tags.get("pid", "")
        return tags.get("host") == socket.gethostname() and pid.isdigit() and not _pid_alive(int(pid))

    def acquire(self) -> None:
        from mlflow.exceptions import MlflowException

        for _ in range(3):
            try:
                self.c.create_registered_model(self.name, tags=self._tags(),
                                               description="held by a running ltcore retrain; removed when it ends")
                break
            except MlflowException as e:
                if not _already_exists(e):
                    raise
            held = self.holder()
            if held is None:
                continue  # released in between
            if not self.abandoned(held):
                left = float(held.get("expires", 0) or 0) - time.time()
                raise LockHeld(f"another retrain holds the registry lock of {self.model!r} (owner {held.get('owner')}, "
                               f"expires in {left:.0f} s unless renewed)") from None
            # Take over an abandoned lock: delete it only if it is still the one judged abandoned.
            again = self.holder()
            if again is not None and again.get("owner") == held.get("owner"):
                try:
                    self.c.delete_registered_model(self.name)
                except MlflowException as e:
                    if not _not_found(e):
                        raise
        else:
            raise LockHeld(f"could not take the registry lock of {self.model!r}; retry")
        self._thread = threading.Thread(target=self._renew, name="ltcore-registry-lock", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            # a failed renewal is retried at the next tick; expiry is the safety net
            with contextlib.suppress(Exception):
                self.c.set_registered_model_tag(self.name, "expires", f"{time.time() + self.ttl_s:.3f}")

    def release(self) -> None:
        from mlflow.exceptions import MlflowException

        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        held = self.holder()
        if held is not None and held.get("owner") == self.owner:
            try:
                self.c.delete_registered_model(self.name)
            except MlflowException as e:
                if not _not_found(e):
                    raise

    def __enter__(self) -> RegistryLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
