"""Schemas to validate Kubernetes objects against offline: the CRDs that ../shared/k8s/crds holds
(KubeRay, Prometheus operator), as jsonschema sees them."""

from __future__ import annotations

from pathlib import Path

import yaml

CRDS = Path(__file__).resolve().parents[1].parent / "shared" / "k8s" / "crds"


def crd_schema(file: str, version: str = "v1") -> dict:
    """The openAPIV3Schema of one version of the CRD in `file`."""
    crd = yaml.safe_load((CRDS / file).read_text())
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    return served["schema"]["openAPIV3Schema"]


def prune_nulls(value):
    """An object as an API server stores it: null fields are absent."""
    if isinstance(value, dict):
        return {k: prune_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [prune_nulls(v) for v in value]
    return value
