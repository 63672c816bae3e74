"""Render the lrsa-serve chart with real Helm and validate every manifest, offline.

    python deploy/helmtool.py [-f VALUES.yaml]... [--set key=value]... [--validate]
                              [--kube-version 1.33] [--release NAME] [--namespace NS]

prints the rendered manifests like ``helm template`` (and with ``--validate`` checks them).

Why not the ``helm`` binary: none is installable from the package registries this project uses,
so rendering goes through ``helm-python-sdk`` (PyPI), which bundles Helm's own Go SDK (v4) as a
shared library: the same template engine, Sprig functions, values coalescing and
values.schema.json validation as ``helm template``. Where a ``helm`` binary exists, ``helm template
deploy/helm/lrsa-serve -f ...`` gives the same manifests.

Validation: built-in kinds against the Kubernetes OpenAPI schemas shipped by
``kubernetes-validate`` (strict: unknown fields are errors); the two CRDs the chart can emit
(ServiceMonitor, KEDA ScaledObject) against the pydantic models that ``cloudcoil-models-*``
generate from those projects' CRD schemas, made strict the same way.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml

CHART = Path(__file__).resolve().parent / "helm" / "lrsa-serve"
# The chart's minimum (Chart.yaml kubeVersion) and the newest schemas kubernetes-validate ships.
KUBE_VERSIONS = ("1.27", "1.37")


class ManifestError(ValueError):
    """A rendered manifest that the Kubernetes (or CRD) schema rejects."""


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Deep merge of values files, later wins (what repeated ``helm -f`` does)."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def load_values(files: Iterable[str | Path] = (), sets: Iterable[str] = ()) -> dict[str, Any]:
    import helm_python as helm

    values: dict[str, Any] = {}
    for path in files:
        values = merge(values, yaml.safe_load(Path(path).read_text()) or {})
    for expression in sets:
        values = merge(values, helm.parse_set_string(expression))
    return values


def render(
    values: dict[str, Any] | None = None,
    *,
    chart: str | Path = CHART,
    release: str = "lrsa",
    namespace: str = "default",
) -> dict[str, str]:
    """Template path -> rendered text, as ``helm template`` renders it (install, revision 1).

    Raises helm_python.HelmValuesError when the values break values.schema.json, and
    helm_python.HelmRenderError when a template fails (including the chart's own ``fail`` checks).
    """
    import helm_python as helm

    with helm.Chart.load(str(chart)) as loaded:
        return loaded.render(
            values or {}, name=release, namespace=namespace, revision=1, is_install=True
        )


def documents(rendered: dict[str, str]) -> list[dict[str, Any]]:
    """Every Kubernetes object in a render (NOTES.txt and empty documents left out)."""
    docs = []
    for path in sorted(rendered):
        if not path.endswith((".yaml", ".yml")):
            continue
        for doc in yaml.safe_load_all(rendered[path]):
            if doc:
                docs.append(doc)
    return docs


def _crd_models() -> dict[tuple[str, str], Any]:
    # cloudcoil's models ignore unknown fields by default; forbid them (like kubernetes-validate's
    # strict schemas) before the generated classes are created, so they inherit it.
    import cloudcoil.pydantic

    cloudcoil.pydantic.BaseModel.model_config["extra"] = "forbid"
    from cloudcoil.models.keda import v1alpha1 as keda
    from cloudcoil.models.prometheus_operator import v1 as prometheus

    return {
        ("monitoring.coreos.com/v1", "ServiceMonitor"): prometheus.ServiceMonitor,
        ("keda.sh/v1alpha1", "ScaledObject"): keda.ScaledObject,
    }


def validate(doc: dict[str, Any], kube_version: str) -> None:
    """Raise ManifestError unless ``doc`` is valid for that Kubernetes version (strict)."""
    import kubernetes_validate
    import pydantic

    name = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
    model = _crd_models().get((doc.get("apiVersion"), doc.get("kind")))
    if model is not None:
        try:
            model.model_validate(doc)
        except pydantic.ValidationError as e:
            raise ManifestError(f"{name}: {e}") from None
        return
    try:
        kubernetes_validate.validate(doc, kube_version, strict=True)
    except kubernetes_validate.ValidationError as e:
        path = "/".join(str(p) for p in e.absolute_path)
        raise ManifestError(f"{name} (Kubernetes {kube_version}) at /{path}: {e.message}") from None
    except kubernetes_validate.SchemaNotFoundError as e:
        raise ManifestError(f"{name}: {e.message}") from None


def validate_all(docs: Sequence[dict[str, Any]], kube_versions: Sequence[str] = KUBE_VERSIONS):
    for doc in docs:
        for version in kube_versions:
            validate(doc, version)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-f", "--values", action="append", default=[], help="values file")
    parser.add_argument("--set", action="append", default=[], help="key=value (helm --set)")
    parser.add_argument("--release", default="lrsa")
    parser.add_argument("--namespace", default="default")
    parser.add_argument("--chart", default=str(CHART))
    parser.add_argument("--validate", action="store_true", help="check against the schemas")
    parser.add_argument(
        "--kube-version", action="append", help=f"with --validate (default {KUBE_VERSIONS})"
    )
    parser.add_argument("--notes", action="store_true", help="print NOTES.txt as well")
    args = parser.parse_args(argv)

    import helm_python as helm

    try:
        rendered = render(
            load_values(args.values, args.set),
            chart=args.chart,
            release=args.release,
            namespace=args.namespace,
        )
    except helm.HelmError as e:
        print(f"render failed: {e}", file=sys.stderr)
        return 1
    for path in sorted(rendered):
        text = rendered[path].strip()
        if path.endswith("NOTES.txt") or not text:
            continue
        print(f"---\n# Source: {path}\n{text}")
    if args.notes:
        notes = [text for path, text in rendered.items() if path.endswith("NOTES.txt")]
        print("\n".join(notes), file=sys.stderr)
    if args.validate:
        docs = documents(rendered)
        try:
            validate_all(docs, args.kube_version or KUBE_VERSIONS)
        except ManifestError as e:
            print(f"invalid: {e}", file=sys.stderr)
            return 1
        print(f"valid: {len(docs)} objects", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
