"""Offline checks of ``infra/``: cluster definitions, manifests, image and operator README.

What each family of tests validates, and against what:

* Every YAML file under ``infra/`` parses (``yaml.safe_load_all``).
* Ray cluster-launcher files (``infra/ray/``) pass Ray's own validation, the one ``ray up`` runs:
  ``ray.autoscaler._private.util.prepare_config`` (merge with Ray's GCP defaults) then
  ``validate_config`` (``ray/autoscaler/ray-schema.json`` via jsonschema, plus Ray's cross-field
  checks). The raw file is also checked against the schema before defaults are merged, so a
  misspelt top-level key cannot hide behind a default. TPU accelerator types go through Ray's
  ``TPUAcceleratorManager.is_valid_tpu_accelerator_type`` and Ray's chips-per-host helpers.
* KubeRay manifests (``infra/kuberay/``) are validated with jsonschema against KubeRay's official
  CRD schemas (``infra/kuberay/schemas/*.schema.json``: the v1 ``openAPIV3Schema`` of KubeRay
  v1.7.0's ``ray.io_rayclusters`` / ``ray.io_rayjobs`` CRDs, descriptions stripped by
  ``infra/kuberay/schemas/extract.py``). The CRDs embed the full Kubernetes PodTemplateSpec
  schema, so containers, env, resources and node selectors are checked too. Unknown fields are
  rejected (``additionalProperties: false`` is added wherever the schema lists properties),
  like ``kubectl apply --validate=strict``. No PyPI package ships these CRDs;
  ``kubernetes-validate`` covers only built-in kinds.
* Every ``dictlearn`` command in a YAML entrypoint, a YAML comment or a README code block names a
  real subcommand, and the config file it names exists in the repository.
* Accelerators agree with the mesh: hosts x devices per host == ``mesh.data x mesh.model`` for the
  config (plus ``mesh.*`` overrides) each cluster file runs, and the README's mesh table agrees
  with the files.
* No secret literal, no dashboard on a public address, no LoadBalancer/NodePort service.
"""

from __future__ import annotations

import copy
import json
import math
import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import yaml
from ray._private.accelerators import TPUAcceleratorManager
from ray._private.accelerators import tpu as ray_tpu
from ray.autoscaler._private.util import prepare_config, validate_config

from dictlearn.config import apply_overrides, read_yaml
from launch.cli import COMMANDS
from sharding.mesh import MeshConfig

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
README = INFRA / "README.md"
YAML_FILES = sorted(INFRA.rglob("*.yaml"))
RAY_FILES = sorted((INFRA / "ray").glob("*.yaml"))
KUBE_FILES = sorted((INFRA / "kuberay").glob("*.yaml"))
SCHEMA_DIR = INFRA / "kuberay" / "schemas"

SUBCOMMANDS = set(COMMANDS)
"""The subcommands the real CLI parser has."""
PLANNED_SUBCOMMANDS = {"generate", "pipeline", "submit", "jobs"} - SUBCOMMANDS
"""Named by infra/ but still owed by open issues (3: generate; 4: pipeline, submit, jobs).
Their commands are strict xfails: they start failing, as they should, once implemented."""
JOBS_SUBCOMMANDS = {"list", "status", "logs", "stop"}
TAKES_CONFIG = {"generate", "train", "pipeline", "submit"}
PLACEHOLDERS = {"PROJECT_ID", "REGION", "ZONE", "IMAGE_TPU", "IMAGE_GPU"}

# TPU VM runtime images per generation (cloud.google.com/tpu/docs/runtimes).
TPU_RUNTIMES = {
    "v4": {"tpu-ubuntu2204-base", "tpu-vm-v4-base"},
    "v5litepod": {"v2-alpha-tpuv5-lite"},
    "v5p": {"v2-alpha-tpuv5"},
}
# GKE TPU node label -> Ray/GCE generation name.
GKE_TPU_GENERATIONS = {
    "tpu-v4-podslice": "v4",
    "tpu-v5-lite-podslice": "v5litepod",
    "tpu-v5p-slice": "v5p",
    "tpu-v6e-slice": "v6e",
}
# GCE machine types with built-in GPUs, and GKE accelerator labels, used here.
GCE_GPUS_PER_MACHINE = {"a3-highgpu-8g": 8, "a3-megagpu-8g": 8}
GKE_GPU_LABELS = {"nvidia-h100-80gb", "nvidia-h100-mega-80gb"}
ACCELERATOR_RESOURCES = ("google.com/tpu", "nvidia.com/gpu")
SECRET_NAME = re.compile(r"(api[_-]?key|token|secret|password|credential)", re.IGNORECASE)


def _rel(path: Path) -> str:
    return str(path.relative_to(REPO))


def _docs(path: Path) -> list[dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, f"{_rel(path)} holds no YAML document"
    return docs


def _walk(node: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """Every (dotted path, value) in a YAML tree."""
    yield path, node
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _walk(value, f"{path}.{key}" if path else str(key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _walk(value, f"{path}[{i}]")


# ----------------------------------------------------------------------------------------------
# dictlearn commands: where they are written and what they say


def _command_lines(path: Path) -> list[str]:
    """Lines that may hold shell commands: README code blocks, YAML comments and shell strings."""
    text = path.read_text()
    if path.suffix == ".md":
        blocks = re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.DOTALL)
        return [line for block in blocks for line in block.splitlines()]
    lines = [line.split("#", 1)[1] for line in text.splitlines() if "#" in line]
    for doc in _docs(path):
        # Shell strings: RayJob entrypoints and the launcher's *_commands lists.
        lines += [
            value
            for where, value in _walk(doc)
            if isinstance(value, str) and re.search(r"(entrypoint|commands)(\[\d+\])?$", where)
        ]
    return lines


def dictlearn_commands(line: str) -> list[list[str]]:
    """The ``dictlearn ...`` invocations in a shell line, as argument lists.

    ``dictlearn`` counts only in command position (start of the line or after ``&&``, ``;``,
    ``|``), so names like ``dictlearn-tpu`` or ``--cluster dictlearn`` are not commands.
    """
    try:
        tokens = shlex.split(line, comments=False)
    except ValueError:
        return []
    commands: list[list[str]] = []
    current: list[str] = []
    for token in [*tokens, ";"]:
        if token in {"&&", ";", "|", "||", "&"}:
            if current and current[0] == "dictlearn":
                commands.append(current)
            current = []
        else:
            current.append(token)
    return commands


def _all_commands() -> list[tuple[str, list[str]]]:
    found = []
    for path in [*YAML_FILES, README]:
        for line in _command_lines(path):
            for argv in dictlearn_commands(line):
                found.append((_rel(path), argv))
    return found


def check_command(argv: list[str]) -> None:
    """Raise AssertionError unless ``argv`` is a well-formed call of a real subcommand."""
    assert argv[0] == "dictlearn"
    assert len(argv) > 1, "bare `dictlearn` names no subcommand"
    sub = argv[1]
    assert sub in SUBCOMMANDS, f"`dictlearn {sub}` is not a subcommand ({sorted(SUBCOMMANDS)})"
    if sub == "jobs":
        assert len(argv) > 2 and argv[2] in JOBS_SUBCOMMANDS, (
            f"`dictlearn jobs` needs one of {sorted(JOBS_SUBCOMMANDS)}, got {argv[2:3]}"
        )
    if sub in TAKES_CONFIG:
        assert len(argv) > 2 and argv[2].endswith((".yaml", ".yml")), (
            f"`dictlearn {sub}` must name a CONFIG.yaml first, got {argv[2:3]}"
        )
        for arg in argv[3:]:
            assert (
                arg.startswith("--")
                or "=" in arg
                or argv[argv.index(arg) - 1]
                in {
                    "--address",
                    "--stage",
                }
            ), f"unexpected argument {arg!r} in {shlex.join(argv)}"
    if sub == "submit":
        assert "--address" in argv, "`dictlearn submit` needs --address"


def command_config(argv: list[str]) -> str | None:
    return argv[2] if len(argv) > 2 and argv[1] in TAKES_CONFIG else None


def command_overrides(argv: list[str]) -> list[str]:
    return [arg for arg in argv[3:] if "=" in arg and not arg.startswith("-")]


ALL_COMMANDS = _all_commands()
REFERENCED_CONFIGS = sorted({c for _, argv in ALL_COMMANDS if (c := command_config(argv))})


def test_commands_are_found() -> None:
    """Guard the scanner: every cluster file and the README show at least one command."""
    sources = {source for source, _ in ALL_COMMANDS}
    expected = {_rel(p) for p in [*RAY_FILES, README]} | {
        _rel(p) for p in KUBE_FILES if p.name.startswith(("raycluster", "rayjob"))
    }
    assert expected <= sources, f"no dictlearn command found in {sorted(expected - sources)}"


def _planned(argv: list[str]) -> list[pytest.MarkDecorator]:
    if len(argv) > 1 and argv[1] in PLANNED_SUBCOMMANDS:
        return [pytest.mark.xfail(strict=True, reason=f"`dictlearn {argv[1]}` not built yet")]
    return []


@pytest.mark.parametrize(
    ("source", "argv"),
    [pytest.param(s, a, marks=_planned(a)) for s, a in ALL_COMMANDS],
    ids=[f"{s}:{' '.join(a[:3])}" for s, a in ALL_COMMANDS],
)
def test_command_names_real_subcommand(source: str, argv: list[str]) -> None:
    check_command(argv)


def _config_marks(config: str) -> list[pytest.MarkDecorator]:
    users = [argv for _, argv in ALL_COMMANDS if command_config(argv) == config]
    planned_only = users and all(argv[1] in PLANNED_SUBCOMMANDS for argv in users)
    if planned_only and not (REPO / config).is_file():
        return [pytest.mark.xfail(strict=True, reason="config of a command not built yet")]
    return []


@pytest.mark.parametrize(
    "config", [pytest.param(c, marks=_config_marks(c)) for c in REFERENCED_CONFIGS]
)
def test_referenced_config_exists(config: str) -> None:
    assert not Path(config).is_absolute(), f"{config}: use a path relative to the repository"
    assert (REPO / config).is_file(), f"{config} is named by infra/ but does not exist"


@pytest.mark.parametrize(
    "argv",
    [
        ["dictlearn", "frobnicate", "launch/configs/x.yaml"],
        ["dictlearn", "jobs", "tail"],
        ["dictlearn", "train"],
        ["dictlearn", "submit", "launch/configs/x.yaml"],
    ],
)
def test_check_command_rejects_bad_calls(argv: list[str]) -> None:
    with pytest.raises(AssertionError):
        check_command(argv)


def test_command_scanner_ignores_names_that_are_not_commands() -> None:
    line = "gcloud container clusters create dictlearn --zone x && kubectl delete raycluster dictlearn-tpu"
    assert dictlearn_commands(line) == []
    assert dictlearn_commands("cd /app && dictlearn train a.yaml mesh.data=4") == [
        ["dictlearn", "train", "a.yaml", "mesh.data=4"]
    ]


# ----------------------------------------------------------------------------------------------
# Parsing, secrets, exposure


@pytest.mark.parametrize("path", YAML_FILES, ids=_rel)
def test_yaml_parses(path: Path) -> None:
    for doc in _docs(path):
        assert isinstance(doc, dict), f"{_rel(path)}: a document is not a mapping"


def secret_literals(doc: Any) -> list[str]:
    """Paths of values that look like a secret written into the file.

    A key whose name says secret (``WANDB_API_KEY: abc``), or a Kubernetes env entry
    ``{name: WANDB_API_KEY, value: abc}``, must not carry a literal; ``valueFrom`` is fine.
    """
    bad = []
    for path, node in _walk(doc):
        if not isinstance(node, dict):
            continue
        if path.endswith("file_mounts"):
            continue  # remote path -> local path: copies a file, holds no secret itself
        for key, value in node.items():
            if SECRET_NAME.search(str(key)) and isinstance(value, str | int) and value != "":
                bad.append(f"{path}.{key}")
        name = node.get("name")
        if isinstance(name, str) and SECRET_NAME.search(name) and "value" in node:
            bad.append(f"{path} ({name})")
    return bad


@pytest.mark.parametrize("path", YAML_FILES, ids=_rel)
def test_no_secret_literals(path: Path) -> None:
    for doc in _docs(path):
        assert secret_literals(doc) == [], f"{_rel(path)} holds secret literals"
    assert not re.search(r"(?i)wandb_api_key\s*[:=]\s*['\"]?\w", path.read_text())


def test_secret_scanner_catches_literals() -> None:
    env = {"env": [{"name": "WANDB_API_KEY", "value": "0123abcd"}]}
    assert secret_literals(env)
    assert secret_literals({"WANDB_API_KEY": "0123abcd"})
    ref = {"name": "WANDB_API_KEY", "valueFrom": {"secretKeyRef": {"name": "w", "key": "k"}}}
    assert secret_literals({"env": [ref]}) == []


@pytest.mark.parametrize("path", YAML_FILES, ids=_rel)
def test_nothing_exposed_publicly(path: Path) -> None:
    text = path.read_text()
    assert "0.0.0.0" not in text, f"{_rel(path)} binds something to every interface"
    for doc in _docs(path):
        for where, node in _walk(doc):
            if where.endswith(("serviceType", ".type")) and isinstance(node, str):
                assert node not in {"LoadBalancer", "NodePort"}, f"{_rel(path)}:{where}={node}"
    for host in re.findall(r"--dashboard-host[= ]([\w.:-]*\w)", text):
        assert host == "127.0.0.1", f"{_rel(path)}: dashboard bound to {host}"


@pytest.mark.parametrize("path", [*YAML_FILES, README], ids=_rel)
def test_only_documented_placeholders(path: Path) -> None:
    used = set(re.findall(r"\$\{([A-Za-z_]+)\}", path.read_text()))
    assert used <= PLACEHOLDERS, f"{_rel(path)}: undocumented placeholders {used - PLACEHOLDERS}"
    listed = set(re.findall(r"`\$\{([A-Z_]+)\}`", README.read_text().split("## Placeholders")[1]))
    assert listed == PLACEHOLDERS


# ----------------------------------------------------------------------------------------------
# Ray cluster launcher


def _ray_schema() -> dict[str, Any]:
    path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    return json.loads(path.read_text())


def launcher_devices(config: dict[str, Any]) -> tuple[int, int, int]:
    """``(nodes, hosts per node, devices per host)`` of the accelerator worker type.

    A TPU node type is one slice: Ray's helpers give its chips per host; JAX sees one device per
    chip. A GPU node type is one VM with the machine type's GPUs.
    """
    accel = []
    for name, node_type in config["available_node_types"].items():
        if name == config["head_node_type"]:
            continue
        node = node_type["node_config"]
        count = node_type.get("min_workers", 0)
        if "acceleratorType" in node:
            kind = node["acceleratorType"]
            chips = ray_tpu.get_total_chips_from_accelerator_type(kind)
            per_host = ray_tpu.get_num_tpu_visible_chips_per_host(kind)
            accel.append((count, chips // per_host, per_host))
        elif node.get("machineType") in GCE_GPUS_PER_MACHINE:
            accel.append((count, 1, GCE_GPUS_PER_MACHINE[node["machineType"]]))
    assert len(accel) == 1, "expected exactly one accelerator node type"
    return accel[0]


@pytest.mark.parametrize("path", RAY_FILES, ids=_rel)
def test_ray_launcher_passes_ray_validation(path: Path) -> None:
    (config,) = _docs(path)
    jsonschema.validate(config, _ray_schema())
    validate_config(prepare_config(copy.deepcopy(config)))


@pytest.mark.parametrize("path", RAY_FILES, ids=_rel)
def test_ray_launcher_nodes(path: Path) -> None:
    (config,) = _docs(path)
    assert config["provider"]["type"] == "gcp"
    head = config["available_node_types"][config["head_node_type"]]
    assert "machineType" in head["node_config"], "the head must be a plain CPU VM"
    assert "acceleratorType" not in head["node_config"]
    assert not {"TPU", "GPU"} & set(head["resources"]), "no accelerators on the head"
    assert head.get("max_workers", 0) == 0
    setup = "\n".join(config["setup_commands"])
    assert "uv sync --frozen" in setup
    for name, node_type in config["available_node_types"].items():
        if name == config["head_node_type"]:
            continue
        node = node_type["node_config"]
        # A slice or GPU VM is one indivisible unit of the mesh: a fixed count, no autoscaling.
        assert node_type["min_workers"] == node_type["max_workers"] >= 1
        if "acceleratorType" in node:
            kind = node["acceleratorType"]
            assert TPUAcceleratorManager.is_valid_tpu_accelerator_type(kind)
            generation = kind.split("-")[0]
            assert node["runtimeVersion"] in TPU_RUNTIMES[generation], kind
            assert "machineType" not in node, "a TPU VM node has no machineType"
            per_host = ray_tpu.get_num_tpu_visible_chips_per_host(kind)
            assert node_type["resources"]["TPU"] == per_host, "TPU resource is per host"
            assert "jax[tpu]" in setup
        else:
            gpus = GCE_GPUS_PER_MACHINE[node["machineType"]]
            assert node_type["resources"]["GPU"] == gpus
            assert node["scheduling"]["onHostMaintenance"] == "TERMINATE"
            assert "jax[cuda12]" in setup
    starts = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in starts
    for commands in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert "RAY_AUTH_MODE=token" in " ".join(config[commands])


def test_ray_validation_rejects_a_misspelt_key() -> None:
    (config,) = _docs(RAY_FILES[0])
    config["max_worker"] = 3
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(config, _ray_schema())


# ----------------------------------------------------------------------------------------------
# KubeRay


def strict(schema: Any) -> Any:
    """Copy of an OpenAPI schema that rejects fields it does not list (kubectl's strict mode)."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) if k != "properties" else v for k, v in schema.items()}
    if "properties" in schema:
        out["properties"] = {name: strict(sub) for name, sub in schema["properties"].items()}
        if "additionalProperties" not in schema and not schema.get(
            "x-kubernetes-preserve-unknown-fields"
        ):
            out["additionalProperties"] = False
    return out


def _kuberay_schema(kind: str) -> dict[str, Any]:
    schema = json.loads((SCHEMA_DIR / f"{kind.lower()}.v1.schema.json").read_text())
    assert schema["x-dictlearn-source"]["kind"] == kind
    return strict(schema)


def _ray_docs() -> list[tuple[Path, dict[str, Any]]]:
    return [
        (path, doc)
        for path in KUBE_FILES
        for doc in _docs(path)
        if doc.get("kind") in {"RayCluster", "RayJob"}
    ]


def cluster_spec(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def _containers(spec: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    groups = [("head", spec["headGroupSpec"])] + [
        (g["groupName"], g) for g in spec.get("workerGroupSpecs", [])
    ]
    for name, group in groups:
        for container in group["template"]["spec"]["containers"]:
            yield name, group, container


def kube_devices(spec: dict[str, Any]) -> tuple[int, int, int]:
    """``(replicas, hosts per replica, devices per host)`` of the accelerator worker group."""
    accel = []
    for name, group, container in _containers(spec):
        limits = container.get("resources", {}).get("limits", {})
        for resource in ACCELERATOR_RESOURCES:
            if resource in limits:
                assert name != "head", "no accelerators on the head"
                accel.append((group["replicas"], group.get("numOfHosts", 1), int(limits[resource])))
    assert len(accel) == 1, "expected exactly one accelerator worker group"
    return accel[0]


@pytest.mark.parametrize("path", KUBE_FILES, ids=_rel)
def test_kube_manifest_kinds(path: Path) -> None:
    for doc in _docs(path):
        assert doc["metadata"]["name"]
        if doc["kind"] == "ServiceAccount":
            assert doc["apiVersion"] == "v1"
            annotation = doc["metadata"]["annotations"]["iam.gke.io/gcp-service-account"]
            assert annotation.endswith(".iam.gserviceaccount.com"), "Workload Identity binding"
        else:
            assert doc["apiVersion"] == "ray.io/v1"
            assert doc["kind"] in {"RayCluster", "RayJob"}


@pytest.mark.parametrize("doc", [d for _, d in _ray_docs()], ids=[_rel(p) for p, _ in _ray_docs()])
def test_kuberay_manifest_matches_crd_schema(doc: dict[str, Any]) -> None:
    jsonschema.Draft7Validator(_kuberay_schema(doc["kind"])).validate(doc)


def test_crd_schema_rejects_unknown_and_mistyped_fields() -> None:
    (doc,) = _docs(INFRA / "kuberay" / "raycluster-tpu.yaml")
    validator = jsonschema.Draft7Validator(_kuberay_schema("RayCluster"))
    typo = copy.deepcopy(doc)
    typo["spec"]["headGroupSpec"]["serviceTyp"] = "ClusterIP"
    assert list(validator.iter_errors(typo))
    mistyped = copy.deepcopy(doc)
    mistyped["spec"]["workerGroupSpecs"][0]["numOfHosts"] = "four"
    assert list(validator.iter_errors(mistyped))


@pytest.mark.parametrize("doc", [d for _, d in _ray_docs()], ids=[_rel(p) for p, _ in _ray_docs()])
def test_kuberay_cluster_spec(doc: dict[str, Any]) -> None:
    spec = cluster_spec(doc)
    assert spec["rayVersion"] == ray.__version__, "cluster Ray must match the locked Ray"
    assert spec["authOptions"]["mode"] == "token"
    assert spec["headGroupSpec"]["serviceType"] == "ClusterIP"
    if doc["kind"] == "RayJob":
        assert doc["spec"]["entrypoint"].strip()
        assert doc["spec"]["shutdownAfterJobFinishes"] is True
    for name, group, container in _containers(spec):
        pod = group["template"]["spec"]
        assert pod["serviceAccountName"] == "dictlearn", f"{name}: Workload Identity account"
        assert container["image"], f"{name}: no image"
        resources = container["resources"]
        for resource in ACCELERATOR_RESOURCES:
            assert resources.get("limits", {}).get(resource) == resources.get("requests", {}).get(
                resource
            ), f"{name}: {resource} limits must equal requests"
        limits = resources.get("limits", {})
        if "google.com/tpu" in limits:
            selector = pod["nodeSelector"]
            generation = GKE_TPU_GENERATIONS[selector["cloud.google.com/gke-tpu-accelerator"]]
            topology = selector["cloud.google.com/gke-tpu-topology"]
            chips = ray_tpu.get_num_chips_from_topology(topology)
            per_host = ray_tpu.get_chips_per_host(topology, generation)
            assert int(limits["google.com/tpu"]) == per_host, f"{name}: chips per pod"
            assert group["numOfHosts"] * per_host == chips, f"{name}: numOfHosts x chips != slice"
            assert any(t["key"] == "google.com/tpu" for t in pod["tolerations"])
        if "nvidia.com/gpu" in limits:
            assert pod["nodeSelector"]["cloud.google.com/gke-accelerator"] in GKE_GPU_LABELS
            assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
        for env in container.get("env", []):
            if SECRET_NAME.search(env["name"]):
                assert "secretKeyRef" in env["valueFrom"], f"{env['name']} must come from a Secret"


# ----------------------------------------------------------------------------------------------
# Mesh consistency


def mesh_sections(data: dict[str, Any]) -> list[tuple[str, MeshConfig]]:
    """Every ``mesh`` section of a config tree (top level or inside a stage), validated."""
    return [
        (where, MeshConfig.model_validate(node))
        for where, node in _walk(data)
        if isinstance(node, dict) and (where == "mesh" or where.endswith(".mesh"))
    ]


def check_mesh(mesh: MeshConfig, devices: int) -> None:
    if mesh.data == -1:
        assert devices % mesh.model == 0, f"mesh.model={mesh.model} does not divide {devices}"
    else:
        assert mesh.data * mesh.model == devices, (
            f"mesh.data={mesh.data} x mesh.model={mesh.model} != {devices} devices"
        )


def effective_meshes(argv: list[str]) -> list[tuple[str, MeshConfig]]:
    """The meshes a command runs with: its config file, then its dotted overrides."""
    config = REPO / argv[2]
    overrides = command_overrides(argv)
    if config.is_file():
        data = apply_overrides(read_yaml(config), overrides)
    else:
        if not any(re.match(r"(.*\.)?mesh\.", o) for o in overrides):
            pytest.fail(f"{argv[2]} does not exist (yet) and the command sets no mesh")
        data = apply_overrides({}, overrides)
    sections = mesh_sections(data)
    return sections or [("mesh (defaults)", MeshConfig())]


def _cluster_files() -> list[Path]:
    return [*RAY_FILES, *(p for p in KUBE_FILES if p.name.startswith(("raycluster", "rayjob")))]


def cluster_devices(path: Path) -> tuple[int, int, int]:
    (doc,) = _docs(path)
    return launcher_devices(doc) if path.parent.name == "ray" else kube_devices(cluster_spec(doc))


@pytest.mark.parametrize("path", _cluster_files(), ids=_rel)
def test_mesh_matches_accelerators(path: Path) -> None:
    nodes, hosts, per_host = cluster_devices(path)
    devices = nodes * hosts * per_host
    commands = [
        argv
        for line in _command_lines(path)
        for argv in dictlearn_commands(line)
        if argv[1] in {"train", "pipeline", "submit"}
    ]
    assert commands, f"{_rel(path)} shows no command that runs a config"
    for argv in commands:
        for where, mesh in effective_meshes(argv):
            try:
                check_mesh(mesh, devices)
            except AssertionError as e:
                raise AssertionError(f"{_rel(path)}: `{shlex.join(argv)}` {where}: {e}") from e


def test_mesh_check_rejects_a_wrong_mesh() -> None:
    with pytest.raises(AssertionError):
        check_mesh(MeshConfig(data=2, model=4), 16)
    with pytest.raises(AssertionError):
        check_mesh(MeshConfig(data=-1, model=3), 16)
    check_mesh(MeshConfig(data=-1, model=4), 16)


def _mesh_table() -> list[dict[str, str]]:
    text = README.read_text().split("<!-- mesh-table", 1)[1]
    lines = [line for line in text.splitlines()[1:] if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = []
    for line in lines[2:]:
        cells = [c.strip().strip("`") for c in line.strip("|").split("|")]
        rows.append(dict(zip(header, cells, strict=True)))
    return rows


def test_readme_mesh_table_covers_every_cluster_file() -> None:
    listed = {row["cluster file"] for row in _mesh_table()}
    assert listed == {str(p.relative_to(INFRA)) for p in _cluster_files()}


@pytest.mark.parametrize("row", _mesh_table(), ids=lambda row: row["cluster file"])
def test_readme_mesh_table_matches_files(row: dict[str, str]) -> None:
    path = INFRA / row["cluster file"]
    nodes, hosts, per_host = cluster_devices(path)
    assert (int(row["hosts"]), int(row["devices per host"])) == (nodes * hosts, per_host)
    data, model = int(row["mesh.data"]), int(row["mesh.model"])
    assert data * model == math.prod((nodes, hosts, per_host))
    configs = {
        command_config(argv) for line in _command_lines(path) for argv in dictlearn_commands(line)
    }
    assert row["config"] in configs, f"{row['cluster file']} does not run {row['config']}"
    first_word = row["accelerator"].split()[0]
    assert first_word in path.read_text() or row["accelerator"].endswith("H100")


# ----------------------------------------------------------------------------------------------
# Container image


def test_dockerfile_installs_the_lock_without_secrets() -> None:
    text = (INFRA / "docker" / "Dockerfile").read_text()
    assert "COPY pyproject.toml uv.lock" in text
    assert "uv sync --frozen --no-dev" in text
    assert re.search(r"ARG ACCELERATOR=tpu", text) and '"jax[${ACCELERATOR}]' in text
    for line in text.splitlines():
        if line.startswith(("ENV", "ARG")):
            assert not SECRET_NAME.search(line), f"secret-like build setting: {line}"
    assert not re.search(r"(?i)COPY\s+.*(\.netrc|auth_token|\.json|\.env)\b", text)
    ignore = (INFRA / "docker" / "Dockerfile.dockerignore").read_text().splitlines()
    rules = [line for line in ignore if line and not line.startswith("#")]
    assert rules[0] == "**", "the build context starts empty; only the project is let back in"
    assert "**/auth_token" in rules and "**/.env" in rules
