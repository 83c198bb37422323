"""Turn KubeRay CRD manifests into the compact JSON schemas the infra tests validate against.

    python infra/kuberay/schemas/extract.py ray.io_rayclusters.yaml ray.io_rayjobs.yaml \
        --out infra/kuberay/schemas --source "kuberay v1.7.0"

The inputs are KubeRay's own CRDs (``ray-operator/config/crd/bases/`` in the KubeRay repository,
or ``helm-chart/kuberay-operator/crds/``). Each output is the ``v1`` ``openAPIV3Schema`` with the
``description`` texts removed (they are three quarters of the bytes and validate nothing), written
as minified JSON so the tests load it in milliseconds and need no network.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import yaml


def strip_descriptions(node: Any) -> Any:
    """A copy of ``node`` without the ``description`` keys of schema objects.

    A property that is itself *named* ``description`` (under ``properties``) is kept.
    """
    if isinstance(node, list):
        return [strip_descriptions(item) for item in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "description" and isinstance(value, str):
            continue
        if key == "properties" and isinstance(value, dict):
            out[key] = {name: strip_descriptions(sub) for name, sub in value.items()}
        else:
            out[key] = strip_descriptions(value)
    return out


def crd_schema(crd: dict[str, Any], version: str = "v1", source: str = "") -> dict[str, Any]:
    """The ``openAPIV3Schema`` of ``version`` in a CustomResourceDefinition, plus provenance."""
    if crd.get("kind") != "CustomResourceDefinition":
        raise ValueError(f"not a CustomResourceDefinition: kind={crd.get('kind')!r}")
    for entry in crd["spec"]["versions"]:
        if entry["name"] == version:
            schema = strip_descriptions(entry["schema"]["openAPIV3Schema"])
            schema["x-dictlearn-source"] = {
                "group": crd["spec"]["group"],
                "kind": crd["spec"]["names"]["kind"],
                "version": version,
                "from": source,
                "controller-gen": crd["metadata"]
                .get("annotations", {})
                .get("controller-gen.kubebuilder.io/version"),
            }
            return schema
    raise ValueError(f"CRD {crd['metadata']['name']} has no version {version}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("crds", nargs="+", type=Path, help="CRD YAML files")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--version", default="v1", help="CRD version to extract")
    parser.add_argument(
        "--source", default="", help="where the CRDs came from, e.g. kuberay v1.7.0"
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for path in args.crds:
        crd = yaml.safe_load(path.read_text())
        schema = crd_schema(crd, args.version, args.source)
        kind = schema["x-dictlearn-source"]["kind"].lower()
        target = args.out / f"{kind}.{args.version}.schema.json"
        target.write_text(json.dumps(schema, separators=(",", ":"), sort_keys=True) + "\n")
        print(f"{path} -> {target} ({target.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
