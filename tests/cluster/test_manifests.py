"""The shipped cluster files: every YAML parses; KubeRay manifests validate against KubeRay's CRDs; the launcher
YAML against Ray 2.60's own schema; the image installs ltcore with the script CI's `make` runs; cluster configs keep
their data on object storage.

KubeRay's CRD schemas do not forbid unknown keys (the API server drops them silently), so a misspelt key would
pass a plain check and do nothing on the cluster; here every object schema that lists its properties is closed
(``additionalProperties: false``) unless it says ``x-kubernetes-preserve-unknown-fields``, as
``kubectl apply --validate=strict`` does.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from ltcore.config import flatten, load_config, to_dict
from ltcore.engine.placement import node_local

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
SCHEMAS = REPO.parent / "shared" / "schemas" / "kuberay"
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml",
             "RayCronJob": "ray.io_raycronjobs.yaml"}
IMAGE_ROOT = "/home/ray/ltcore"  # where docker/Dockerfile puts the repository

pytestmark = pytest.mark.timeout(120)


def _close(schema: Any) -> Any:
    if isinstance(schema, dict):
        out = {k: _close(v) for k, v in schema.items() if not k.startswith("x-kubernetes-")}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_close(v) for v in schema]
    return schema


@cache
def crd_schema(kind: str) -> dict[str, Any]:
    path = SCHEMAS / CRD_FILES[kind]
    if not path.exists():
        pytest.skip(f"KubeRay CRDs not found at {SCHEMAS}")
    crd = yaml.safe_load(path.read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return _close(version["schema"]["openAPIV3Schema"])  # type: ignore[no-any-return]


def kuberay_docs() -> list[tuple[str, dict[str, Any]]]:
    """Every ray.io document in cluster/kuberay, with the RayJob embedded in the fallback CronJob's ConfigMap."""
    out = []
    for path in sorted((CLUSTER / "kuberay").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc["kind"] == "ConfigMap":
                for name, text in doc["data"].items():
                    out.append((f"{path.name}:{name}", yaml.safe_load(text)))
            elif doc["apiVersion"].startswith("ray.io/"):
                out.append((path.name, doc))
    return out


def every_yaml() -> list[Path]:
    return sorted([*CLUSTER.rglob("*.yaml"), *(REPO / "docker").glob("*.yaml")])


@pytest.mark.parametrize("path", every_yaml(), ids=lambda p: str(p.relative_to(REPO)))
def test_yaml_parses(path: Path) -> None:
    docs = list(yaml.safe_load_all(path.read_text()))
    assert docs and all(isinstance(d, dict) for d in docs)


def test_kuberay_has_each_kind() -> None:
    kinds = sorted(doc["kind"] for _, doc in kuberay_docs())
    assert kinds == ["RayCluster", "RayCronJob", "RayJob", "RayJob"]  # the last: the fallback CronJob's


@pytest.mark.parametrize("name_doc", kuberay_docs(), ids=lambda nd: f"{nd[0]}-{nd[1]['kind']}")
def test_kuberay_manifest_validates_against_crd(name_doc: tuple[str, dict[str, Any]]) -> None:
    _, doc = name_doc
    assert doc["apiVersion"] == "ray.io/v1"
    jsonschema.validate(doc, crd_schema(doc["kind"]))


def test_crd_validation_can_fail() -> None:
    doc = next(d for _, d in kuberay_docs() if d["kind"] == "RayJob")
    bad = copy.deepcopy(doc)
    bad["spec"]["shutdownAfterJobFinish"] = True  # misspelt: KubeRay would drop it and keep the cluster
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, crd_schema("RayJob"))
    bad = copy.deepcopy(doc)
    bad["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["maxReplicas"] = "four"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, crd_schema("RayJob"))


def _job_specs() -> dict[str, dict[str, Any]]:
    specs = {}
    for name, doc in kuberay_docs():
        if doc["kind"] == "RayJob":
            specs[name] = doc["spec"]
        elif doc["kind"] == "RayCronJob":
            specs[name] = doc["spec"]["jobTemplate"]
    return specs


def test_job_entrypoints_and_images() -> None:
    """Entrypoints run the image's copies of the entry scripts with a shipped cluster config; every pod runs the
    same image; the RayCronJob says it is alpha behind the feature gate; the fallback runs retraining too."""
    specs = _job_specs()
    assert "pipelines/two_stage.py" in specs["rayjob.yaml"]["entrypoint"]
    assert "pipelines/retrain.py" in specs["raycronjob.yaml"]["entrypoint"]
    assert specs["cronjob-fallback.yaml:rayjob.yaml"] == specs["raycronjob.yaml"]
    for spec in specs.values():
        argv = shlex.split(spec["entrypoint"])
        assert argv[0] == "python" and argv[1].startswith(IMAGE_ROOT + "/pipelines/")
        config = argv[argv.index("--config") + 1]
        assert config.startswith(IMAGE_ROOT + "/cluster/configs/")
        assert (REPO / config.removeprefix(IMAGE_ROOT + "/")).exists()
    images = set(re.findall(r"image: (\S+)", "".join(p.read_text() for p in (CLUSTER / "kuberay").glob("ray*.yaml"))))
    assert images == {"registry.example.com/ltcore:0.1.0"}
    cron_text = (CLUSTER / "kuberay" / "raycronjob.yaml").read_text()
    assert "alpha" in cron_text.lower() and "RayCronJob=true" in cron_text and "cronjob-fallback.yaml" in cron_text
    fallback = list(yaml.safe_load_all((CLUSTER / "kuberay" / "cronjob-fallback.yaml").read_text()))
    cron = next(d for d in fallback if d["kind"] == "CronJob")
    assert cron["spec"]["schedule"] == yaml.safe_load(cron_text)["spec"]["schedule"]
    container = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    assert container["args"] == ["create", "-f", "/manifests/rayjob.yaml"]  # generateName needs create, not apply


def test_launcher_yaml_validates_against_ray_schema() -> None:
    """The raw file against ray/autoscaler/ray-schema.json, then what `ray up` checks after filling defaults."""
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    config = yaml.safe_load((CLUSTER / "launcher-aws.yaml").read_text())
    jsonschema.validate(config, schema)
    validate_config(prepare_config(copy.deepcopy(config)))
    assert config["provider"]["type"] == "aws"
    assert config["available_node_types"]["head"]["resources"] == {"CPU": 0}
    assert "g5" in config["available_node_types"]["gpu_worker"]["node_config"]["InstanceType"]
    assert config["available_node_types"]["gpu_worker"]["max_workers"] > config["available_node_types"][
        "gpu_worker"]["min_workers"]
    assert config["docker"]["image"] == "registry.example.com/ltcore:0.1.0"
    bad = copy.deepcopy(config)
    bad["available_node_types"]["gpu_worker"]["max_worker"] = 4
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


def test_dockerfile_installs_with_the_ci_script() -> None:
    """One install: the Dockerfile and `make` (what .ci/run calls) both run docker/install.sh, and neither runs
    pip on its own."""
    dockerfile = (REPO / "docker" / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE_IMAGE=rayproject/ray:2\.60\.0-py311-cu\d+$", dockerfile, flags=re.M)
    assert "ray-ml" not in dockerfile.replace("The ray-ml images are discontinued", "")
    runs = [ln for ln in dockerfile.splitlines() if ln.startswith("RUN ")]
    assert any(ln.startswith("RUN sh docker/install.sh python .") for ln in runs), runs
    assert not any("pip" in ln for ln in runs)
    assert re.search(rf"^WORKDIR {IMAGE_ROOT}$", dockerfile, flags=re.M)
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^\tsh docker/install\.sh \$\(PY\) -e \"\.\[dev\]\"$", makefile, flags=re.M)
    assert "pip install" not in makefile
    assert "make test" in (REPO / ".ci" / "run").read_text()
    install = (REPO / "docker" / "install.sh").read_text()
    assert '"$py" -m pip install -q "$@"' in install
    ignore = (REPO / ".dockerignore").read_text().split()
    assert {".git", ".venv", "ltcore-runs"} <= set(ignore)
    for copied in re.findall(r"^COPY --chown=\S+ (\S+)", dockerfile, flags=re.M):
        assert copied not in ignore and (REPO / copied).exists(), copied


def test_compose_is_a_two_node_cluster_with_s3() -> None:
    compose = yaml.safe_load((REPO / "docker" / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"s3", "ray-head", "ray-worker"}
    assert "--head" in services["ray-head"]["command"]
    assert "--address=ray-head:6379" in services["ray-worker"]["command"]
    for node in ("ray-head", "ray-worker"):
        assert services[node]["environment"]["AWS_ENDPOINT_URL"] == "http://s3:5000"  # merged from the anchor


def test_runtime_env_file() -> None:
    env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    assert env["working_dir"] == "."
    assert {".git", ".venv", "ltcore-runs"} <= set(env["excludes"])
    assert not any(k.startswith("AWS_") for k in env.get("env_vars", {}))  # no credentials in a committed file
    from ray.runtime_env import RuntimeEnv

    RuntimeEnv(**env)  # Ray's own check of the fields


@pytest.mark.parametrize("path", sorted((CLUSTER / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_cluster_configs_keep_everything_on_object_storage(path: Path) -> None:
    cfg = load_config(str(path))
    assert node_local(cfg) == []
    locations = {k: v for k, v in flatten(to_dict(cfg)).items()
                 if k in ("train.storage", "data.output", "data.source.table", "data.source.image_root", "dataset")
                 and v}
    assert locations and all(str(v).startswith("s3://") for v in locations.values()), locations
    assert os.path.basename(path).endswith(".yaml")
