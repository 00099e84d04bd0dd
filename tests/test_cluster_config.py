"""The deployment files: cluster.yaml through Ray's own validation, the KubeRay manifests by
structure, pins against pyproject.toml, and every command they run against the repo.

Set IMAGEFAB_KUBERAY_CRDS to a folder of KubeRay's CRD files (ray.io_rayclusters.yaml, …, e.g.
from `kubectl get crd rayclusters.ray.io -o yaml` or the kuberay-operator chart) to also validate
the manifests against their OpenAPI schemas.
"""

from __future__ import annotations

import ast
import copy
import os
import re
import shlex
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "deploy" / "k8s"
MANIFESTS = {"RayCluster": "raycluster.yaml", "RayJob": "rayjob.yaml", "RayService": "rayservice.yaml"}
GPU_RESOURCES = {"gpu_bulk", "gpu_hero", "gpu_serve"}


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def pinned(package: str) -> str:
    """The version pyproject.toml pins a dependency to (`ray[serve,data]==2.60.0` -> 2.60.0)."""
    for dep in pyproject()["project"]["dependencies"]:
        name, _, version = dep.partition("==")
        if re.sub(r"\[.*\]", "", name).strip() == package:
            return version.strip()
    raise LookupError(package)


RAY = pinned("ray")


def cluster_config() -> dict:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def manifest(kind: str) -> dict:
    return yaml.safe_load((K8S / MANIFESTS[kind]).read_text())


def ray_cluster_spec(doc: dict) -> dict:
    return {
        "RayCluster": lambda d: d["spec"],
        "RayJob": lambda d: d["spec"]["rayClusterSpec"],
        "RayService": lambda d: d["spec"]["rayClusterConfig"],
    }[doc["kind"]](doc)


def groups(spec: dict) -> list[dict]:
    return [{"groupName": "head", **spec["headGroupSpec"]}, *spec["workerGroupSpecs"]]


def containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


# --- cluster.yaml --------------------------------------------------------------------------------


def validated(cfg: dict) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(cfg))
    validate_config(prepared)
    return prepared


def test_cluster_yaml_passes_rays_validation():
    cfg = validated(cluster_config())
    assert cfg["provider"]["type"] == "aws"
    assert set(cfg["available_node_types"]) == {"head", "cpu_qc", "gpu_bulk", "gpu_hero"}


def _typo_in_a_node_type(cfg):
    cfg["available_node_types"]["gpu_bulk"]["max_worker"] = cfg["available_node_types"]["gpu_bulk"].pop("max_workers")


def _fractional_resource(cfg):
    cfg["available_node_types"]["gpu_bulk"]["resources"]["gpu_bulk"] = 0.5


def _unknown_head_type(cfg):
    cfg["head_node_type"] = "ray.head.default"


def _min_workers_over_the_cluster_max(cfg):
    cfg["available_node_types"]["cpu_qc"]["min_workers"] = cfg["max_workers"] + 1


def _node_type_without_resources(cfg):
    del cfg["available_node_types"]["gpu_hero"]["resources"]


@pytest.mark.parametrize(
    "breakage",
    [
        _typo_in_a_node_type,
        _fractional_resource,
        _unknown_head_type,
        _min_workers_over_the_cluster_max,
        _node_type_without_resources,
    ],
)
def test_rays_validation_rejects_a_broken_cluster_yaml(breakage):
    cfg = cluster_config()
    breakage(cfg)
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        validated(cfg)


def test_node_types_have_roles_resources_and_bounds():
    cfg = cluster_config()
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("CPU") == 0 and "GPU" not in head["resources"]  # the head takes no tasks
    assert types["cpu_qc"]["resources"]["cpu_qc"] == types["cpu_qc"]["resources"]["CPU"] > 0
    for name, marker in (("gpu_bulk", "gpu_bulk"), ("gpu_hero", "gpu_hero")):
        res = types[name]["resources"]
        # One unit of the marker per GPU: a generator takes num_gpus=1 plus one unit.
        assert res["GPU"] >= 1 and res[marker] == res["GPU"], (name, res)
        assert not (set(res) & GPU_RESOURCES) - {marker}, f"{name} advertises another GPU kind's resource"
    workers = {n: t for n, t in types.items() if n != cfg["head_node_type"]}
    for name, t in workers.items():
        assert 0 <= t["min_workers"] <= t["max_workers"], name
    # Every type can reach its own maximum at once.
    assert sum(t["max_workers"] for t in workers.values()) <= cfg["max_workers"]
    assert types["gpu_bulk"]["min_workers"] == types["gpu_hero"]["min_workers"] == 0  # GPUs only on demand


def test_cluster_yaml_is_pinned():
    cfg = cluster_config()
    images = [
        cfg["docker"]["image"],
        cfg["docker"]["head_image"],
        *(t["docker"]["worker_image"] for t in cfg["available_node_types"].values() if "docker" in t),
    ]
    py = "py" + pyproject()["project"]["requires-python"].split(">=")[1].split(",")[0].replace(".", "")
    for image in images:
        assert re.fullmatch(rf"rayproject/ray:{re.escape(RAY)}-{py}-(cpu|gpu)", image), image
    # The checkout is synced to every node and installed with its pinned dependencies; anything
    # else installed is pinned with ==.
    assert cfg["file_mounts"] == {"/home/ray/imagefab": "."}
    commands = cfg["setup_commands"] + cfg["head_setup_commands"] + cfg["worker_setup_commands"]
    installs = [shlex.split(c) for c in commands if "pip install" in c]
    assert installs
    for words in installs:
        targets = [w for w in words[words.index("install") + 1 :] if not w.startswith("-")]
        for t in targets:
            assert t == "/home/ray/imagefab" or re.fullmatch(r"[A-Za-z0-9_.\-\[\],]+==[\w.]+", t), f"unpinned: {t}"
    assert "latest" not in (REPO / "cluster.yaml").read_text().replace("/latest/ami-id", "")


# --- KubeRay manifests ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", MANIFESTS)
def test_manifest_kind_version_and_pins(kind):
    doc = manifest(kind)
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == kind and doc["metadata"]["name"]
    spec = ray_cluster_spec(doc)
    assert spec["rayVersion"] == RAY
    version = pyproject()["project"]["version"]
    for group in groups(spec):
        for c in containers(group):
            repo, _, tag = c["image"].rpartition(":")
            assert repo and tag and tag != "latest" and "/" not in tag, c["image"]
            assert repo.endswith("/imagefab") and tag == version, f"{c['image']}: image tag is not the package version"


@pytest.mark.parametrize("kind", MANIFESTS)
def test_gpu_groups_request_gpus_and_advertise_their_kind(kind):
    spec = ray_cluster_spec(manifest(kind))
    gpu_groups = [g for g in spec["workerGroupSpecs"] if g.get("resources", {}).keys() & GPU_RESOURCES]
    assert gpu_groups, "no GPU worker group"
    for g in gpu_groups:
        (c,) = containers(g)
        limits, requests = c["resources"]["limits"], c["resources"]["requests"]
        assert str(limits["nvidia.com/gpu"]) == str(requests["nvidia.com/gpu"]) == "1", g["groupName"]
        assert g["resources"].keys() & GPU_RESOURCES == {next(iter(g["resources"].keys() & GPU_RESOURCES))}
        assert g["template"]["spec"]["nodeSelector"]["nvidia.com/gpu.product"]
        assert 0 <= g["minReplicas"] <= g.get("replicas", 0) <= g["maxReplicas"], g["groupName"]
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert not any("nvidia.com/gpu" in c["resources"]["limits"] for c in containers(head))


def test_k8s_and_cluster_yaml_advertise_the_same_placement_resources():
    cluster = {r for t in cluster_config()["available_node_types"].values() for r in t["resources"]} - {"CPU", "GPU"}
    k8s = {r for g in ray_cluster_spec(manifest("RayCluster"))["workerGroupSpecs"] for r in g.get("resources", {})}
    assert cluster == k8s == {"cpu_qc", "gpu_bulk", "gpu_hero"}


def test_rayjob_entrypoint_is_a_valid_bulk_run_of_files_in_the_image():
    from jobs.generate import parse_args, spec_from_args

    doc = manifest("RayJob")
    argv = shlex.split(doc["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "jobs.generate"] and (REPO / "jobs" / "generate.py").is_file()
    runtime_env = yaml.safe_load(doc["spec"]["runtimeEnvYAML"])
    workdir = runtime_env["working_dir"]
    assert workdir == _dockerfile_workdir()
    args = parse_args(argv[3:])
    assert (REPO / args.spec).is_file() and args.output.startswith("s3://")
    spec = spec_from_args(args)  # the spec and every --set override validate
    assert spec.output.uri == args.output and spec.model.base == "sdxl-base-1.0"


def serve_application() -> dict:
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema.model_validate(yaml.safe_load(manifest("RayService")["spec"]["serveConfigV2"]))
    (app,) = config.applications
    return app


def test_rayservice_serve_config_is_valid_for_ray_serve_and_names_the_app_builder():
    app = serve_application()
    module, _, attr = app.import_path.partition(":")
    file = REPO / Path(*module.split(".")).with_suffix(".py")
    assert file.is_file(), f"{app.import_path}: no {file.relative_to(REPO)}"
    # Checked without importing (that would start Serve's machinery): the module defines it.
    defined = {n.name for n in ast.parse(file.read_text()).body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    defined |= {
        t.id
        for n in ast.parse(file.read_text()).body
        if isinstance(n, ast.Assign)
        for t in n.targets
        if isinstance(t, ast.Name)
    }
    assert attr in defined, f"{app.import_path}: {module} defines no {attr}"


def test_rayservice_args_are_a_valid_serve_config_in_the_image():
    from app.serve.config import load_serve_config

    args = dict(serve_application().args)
    path = Path(args.pop("config"))
    workdir = Path(_dockerfile_workdir())
    assert path.is_relative_to(workdir), f"{path} is not under the image's checkout {workdir}"
    local = REPO / path.relative_to(workdir)
    assert local.is_file(), f"{local.relative_to(REPO)} is not in the repo"
    top = local.relative_to(REPO).parts[0]
    assert re.search(rf"^COPY\s+(--\S+\s+)*{top}\s", (K8S / "Dockerfile").read_text(), re.M), f"the image lacks {top}/"
    config = load_serve_config(local, **args)
    assert config.output_uri.startswith("s3://")
    # Serve binds 0.0.0.0 on a cluster, so the app needs keys: every pod gets the keys' Secret.
    for group in groups(ray_cluster_spec(manifest("RayService"))):
        for c in containers(group):
            assert {"name": "imagefab-api-keys"} in [e.get("secretRef") for e in c.get("envFrom", [])], group[
                "groupName"
            ]


def _dockerfile_workdir() -> str:
    text = (K8S / "Dockerfile").read_text()
    return re.search(r"^WORKDIR\s+(\S+)", text, re.M).group(1)


def test_dockerfile_builds_on_the_pinned_ray_image_and_copies_what_exists():
    text = (K8S / "Dockerfile").read_text()
    py = "py" + pyproject()["project"]["requires-python"].split(">=")[1].split(",")[0].replace(".", "")
    assert re.search(rf"^FROM rayproject/ray:{re.escape(RAY)}-{py}-gpu$", text, re.M)
    for src in re.findall(r"^COPY\s+(?:--\S+\s+)*(.+?)\s+\S+$", text, re.M):
        for item in src.split():
            assert (REPO / item).exists(), f"Dockerfile copies {item}, which is not in the repo"
    ignored = (K8S / "Dockerfile.dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored


@pytest.mark.skipif(
    not os.environ.get("IMAGEFAB_KUBERAY_CRDS"), reason="set IMAGEFAB_KUBERAY_CRDS to KubeRay's CRD folder"
)
@pytest.mark.parametrize("kind", MANIFESTS)
def test_manifests_against_kuberay_crd_schemas(kind):
    doc = manifest(kind)
    crd = yaml.safe_load((Path(os.environ["IMAGEFAB_KUBERAY_CRDS"]) / f"ray.io_{kind.lower()}s.yaml").read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == doc["apiVersion"].split("/")[1])
    errors = [
        f"{list(e.absolute_path)}: {e.message[:200]}"
        for e in jsonschema.Draft7Validator(_no_unknown_fields(version["schema"]["openAPIV3Schema"])).iter_errors(doc)
    ]
    assert not errors, "\n".join(errors)


def _no_unknown_fields(schema):
    """Kubernetes silently prunes fields a CRD does not declare; make them errors, so typos show."""
    if isinstance(schema, dict):
        if (
            schema.get("type") == "object"
            and "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema = {**schema, "additionalProperties": False}
        return {k: _no_unknown_fields(v) for k, v in schema.items()}
    if isinstance(schema, list):
        return [_no_unknown_fields(v) for v in schema]
    return schema
