"""The KubeRay manifests in k8s/, checked offline: rendered as `kubectl kustomize k8s/` would, the
RayCluster validated against KubeRay's CRD schema, and the pieces checked against each other
(worker groups and their custom resources, serve flags, Service, volumes, the node script).
Nothing here talks to a Kubernetes API server."""

from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from tests.deploy.conftest import K8S

IMAGE_PREFIX = "rayproject/ray:"
GRPC_PORT = 50051


def load_listed_resources() -> list[dict[str, Any]]:
    """Every object of the files kustomization.yaml lists, in order (what `kubectl kustomize`
    renders for a kustomization with nothing but a `resources` list)."""
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    extra = set(kustomization) - {"apiVersion", "kind", "resources"}
    assert not extra, f"the offline renderer only follows `resources`; kustomization.yaml also has {extra}"
    objects = []
    for name in kustomization["resources"]:
        objects += [doc for doc in yaml.safe_load_all((K8S / name).read_text()) if doc]
    return objects


@pytest.fixture(scope="module")
def rendered() -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return load_listed_resources()
    out = subprocess.run([kubectl, "kustomize", str(K8S)], check=True, capture_output=True, text=True).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def only(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


@pytest.fixture(scope="module")
def raycluster(rendered) -> dict[str, Any]:
    return only(rendered, "RayCluster")


def groups(raycluster: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {g["groupName"]: g for g in raycluster["spec"]["workerGroupSpecs"]}


def custom_resources(start_params: dict[str, str]) -> dict[str, float]:
    """rayStartParams `resources` is a JSON object inside a quoted string: '"{\\"expert\\": 8}"'."""
    if "resources" not in start_params:
        return {}
    value = json.loads(start_params["resources"])
    assert isinstance(value, str), "rayStartParams.resources must be a quoted JSON string"
    return json.loads(value)


def pod_templates(raycluster: dict[str, Any]) -> dict[str, dict[str, Any]]:
    spec = raycluster["spec"]
    return {"head": spec["headGroupSpec"]["template"]} | {n: g["template"] for n, g in groups(raycluster).items()}


def strict(schema: Any) -> Any:
    """The schema with unknown fields refused wherever it lists an object's fields: the API server
    would prune them silently, so a misspelt field would never reach KubeRay."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


def node_script(rendered) -> str:
    return only(rendered, "ConfigMap", "moecluster-scripts")["data"]["node.sh"]


def settings(rendered) -> dict[str, str]:
    return only(rendered, "ConfigMap", "moecluster-settings")["data"]


# ---- rendering ---------------------------------------------------------------------------------------
def test_kustomization_lists_every_manifest():
    listed = set(yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kubectl_kustomize_renders_what_the_files_hold(rendered):
    def key(o: dict[str, Any]) -> tuple[str, str]:
        return o["kind"], o["metadata"]["name"]

    assert sorted(rendered, key=key) == sorted(load_listed_resources(), key=key)


def test_rendered_objects(rendered):
    kinds = sorted((o["apiVersion"], o["kind"], o["metadata"]["name"]) for o in rendered)
    assert kinds == [
        ("ray.io/v1", "RayCluster", "moecluster"),
        ("v1", "ConfigMap", "moecluster-scripts"),
        ("v1", "ConfigMap", "moecluster-settings"),
        ("v1", "PersistentVolumeClaim", "moecluster-models"),
        ("v1", "Service", "moecluster-grpc"),
    ]


# ---- the RayCluster against KubeRay's CRD ----------------------------------------------------------------
def test_raycluster_validates_against_the_kuberay_crd(raycluster, schemas_dir: Path):
    crd = yaml.safe_load((schemas_dir / "ray.io_rayclusters.yaml").read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == raycluster["apiVersion"].split("/")[1])
    assert version["served"], f"{raycluster['apiVersion']} is not served by this CRD"
    schema = strict(version["schema"]["openAPIV3Schema"])
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(raycluster), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors)


def test_the_schema_check_catches_a_misspelt_field(raycluster, schemas_dir: Path):
    crd = yaml.safe_load((schemas_dir / "ray.io_rayclusters.yaml").read_text())
    schema = strict(next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"])
    broken = json.loads(json.dumps(raycluster))
    broken["spec"]["workerGroupSpecs"][0]["rayStartParam"] = broken["spec"]["workerGroupSpecs"][0].pop("rayStartParams")
    broken["spec"]["workerGroupSpecs"][1]["rayStartParams"]["num-gpus"] = 8  # must be a string
    messages = [e.message for e in jsonschema.Draft7Validator(schema).iter_errors(broken)]
    assert any("rayStartParam" in m for m in messages)
    assert any("is not of type 'string'" in m for m in messages)


# ---- worker groups, resources and the serve flags -----------------------------------------------------
def test_worker_groups_declare_their_custom_resource_and_gpus(raycluster):
    by_name = groups(raycluster)
    assert sorted(by_name) == ["attention", "expert"]
    for name, group in by_name.items():
        params = group["rayStartParams"]
        assert custom_resources(params) == {name: int(params["num-gpus"])}, name
        container = group["template"]["spec"]["containers"][0]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == params["num-gpus"], name
        assert container["resources"]["requests"]["nvidia.com/gpu"] == params["num-gpus"], name
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], name
    head = raycluster["spec"]["headGroupSpec"]["rayStartParams"]
    assert custom_resources(head) == {} and "num-gpus" not in head


def test_serve_flags_fit_the_worker_groups(raycluster, rendered):
    parser = argparse.ArgumentParser()
    for flag, kind in (("--attention-workers", int), ("--expert-workers", int), ("--gpus-per-worker", float),
                       ("--dtype", str)):
        parser.add_argument(flag, type=kind)
    flags = parser.parse_args(shlex.split(settings(rendered)["MOECLUSTER_SERVE_ARGS"]))
    for role, workers in (("attention", flags.attention_workers), ("expert", flags.expert_workers)):
        group = groups(raycluster)[role]
        offered = group["replicas"] * custom_resources(group["rayStartParams"])[role]
        gpus = group["replicas"] * int(group["rayStartParams"]["num-gpus"])
        assert workers <= offered, f"{workers} {role} workers, the group offers {offered} '{role}' resources"
        assert workers * flags.gpus_per_worker <= gpus, f"{role}: {workers} workers need more than {gpus} GPUs"


def test_images_and_ray_version_match_the_ray_pin(raycluster, ray_pin):
    assert raycluster["spec"]["rayVersion"] == ray_pin
    for role, template in pod_templates(raycluster).items():
        for container in template["spec"]["containers"]:
            assert container["image"] == f"{IMAGE_PREFIX}{ray_pin}-py311-gpu", role


# ---- the head: serve, the Service, volumes and the node script --------------------------------------------
def test_every_pod_runs_the_node_script_with_the_settings(raycluster):
    assert raycluster["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true"
    for role, template in pod_templates(raycluster).items():
        container = template["spec"]["containers"][0]
        expected = "head" if role == "head" else "worker"
        assert container["args"] == [f"exec /bin/bash /etc/moecluster/node.sh {expected}"], role
        assert {"configMapRef": {"name": "moecluster-settings"}} in container["envFrom"], role


def test_head_serves_grpc_behind_the_service(raycluster, rendered):
    script = node_script(rendered)
    serve = re.search(r"moecluster serve .*?&\n", script, re.S)
    assert serve, "node.sh does not start `moecluster serve`"
    for flag in ("--address auto", "--host 0.0.0.0", f"--port {GRPC_PORT}"):
        assert flag in serve.group(0)
    head = raycluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {"name": "grpc", "containerPort": GRPC_PORT} in head["ports"]
    service = only(rendered, "Service")
    assert service["spec"]["selector"] == {"ray.io/cluster": raycluster["metadata"]["name"], "ray.io/node-type": "head"}
    assert [(p["port"], p["targetPort"]) for p in service["spec"]["ports"]] == [(GRPC_PORT, GRPC_PORT)]


def test_volumes_refer_to_objects_that_are_rendered(raycluster, rendered):
    names = {(o["kind"], o["metadata"]["name"]) for o in rendered}
    for role, template in pod_templates(raycluster).items():
        for volume in template["spec"]["volumes"]:
            if "configMap" in volume:
                assert ("ConfigMap", volume["configMap"]["name"]) in names, role
            if "persistentVolumeClaim" in volume:
                assert ("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"]) in names, role
        mounts = {m["name"] for m in template["spec"]["containers"][0]["volumeMounts"]}
        assert mounts == {v["name"] for v in template["spec"]["volumes"]}, role


def test_model_dir_and_home_are_on_the_shared_volume(raycluster, rendered):
    config = settings(rendered)
    for role, template in pod_templates(raycluster).items():
        mounts = {m["mountPath"] for m in template["spec"]["containers"][0]["volumeMounts"]
                  if m["name"] == "models"}
        assert mounts == {"/models"}, role
    for key in ("MOECLUSTER_MODEL_DIR", "MOECLUSTER_HOME"):
        assert config[key].startswith("/models/"), key


def test_node_script_is_valid_bash_and_python(rendered, tmp_path: Path):
    script = node_script(rendered)
    path = tmp_path / "node.sh"
    path.write_text(script)
    subprocess.run(["bash", "-n", str(path)], check=True)
    python = re.search(r"<<'PY'\n(.*?)\nPY\n", script, re.S)
    assert python, "node.sh has no embedded Python wait step"
    compile(python.group(1), "node.sh:PY", "exec")
