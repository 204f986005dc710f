"""Offline validation of Kubernetes manifests: the rendered Helm chart and the plain files in cluster/.

No cluster is reachable here, so every object is checked against the schemas the API server would use:

- core kinds (ConfigMap, CronJob, Role, ...): kubernetes-validate's bundled *strict* JSON schemas for
  Kubernetes ``K8S_VERSION`` (unknown fields are errors, as with ``kubectl --validate=strict``);
- KubeRay kinds (RayCluster, RayJob, RayCronJob): the ``openAPIV3Schema`` of the served, storage version
  of the CRDs in ``shared/schemas/kuberay/``, made strict: ``additionalProperties: false`` wherever a
  schema lists ``properties`` and does not set ``x-kubernetes-preserve-unknown-fields`` (the API server
  drops or, with strict field validation, rejects such fields). Their ``metadata`` is checked as an
  ObjectMeta. CEL rules (``x-kubernetes-validations``) are not evaluated;
- monitoring.coreos.com kinds (PodMonitor, PrometheusRule): no schema is available offline, so they get
  the small structural schemas below (ours, not the Prometheus Operator's CRDs);
- a few checks no schema expresses: object names, label values, container port names;
- RayJob entrypoints are parsed (not run) by the real click command line (parse_entrypoint).
"""

from __future__ import annotations

import copy
import functools
import gzip
import os
import re
import shlex
from pathlib import Path

import jsonschema
import kubernetes_validate
import yaml

K8S_VERSION = "1.31"
KUBERAY_KINDS = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml",
                 "RayCronJob": "ray.io_raycronjobs.yaml"}
REPO = Path(__file__).resolve().parents[2]
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class ManifestError(ValueError):
    """One or more objects do not match their schema; the message lists every problem."""


def load_documents(text: str) -> list[dict]:
    """The non-empty YAML documents of a (multi-document) manifest."""
    return [d for d in yaml.load_all(text, Loader=_Loader) if d]


VENDORED = Path(__file__).parent / "schemas" / "kuberay"


def shared_schema_dir() -> Path | None:
    """shared/schemas/kuberay inside or beside the checkout (the workplace's copy), if present."""
    for c in (REPO / "shared/schemas/kuberay", REPO.parent / "shared/schemas/kuberay"):
        if (c / KUBERAY_KINDS["RayJob"]).is_file():
            return c
    return None


def kuberay_crd_text(kind: str) -> str:
    """A KubeRay CRD: RAY_INSPECT_KUBERAY_SCHEMAS, else the shared copy, else the vendored one."""
    name = KUBERAY_KINDS[kind]
    override = os.environ.get("RAY_INSPECT_KUBERAY_SCHEMAS")
    for d in (Path(override) if override else None, shared_schema_dir()):
        if d is not None and (d / name).is_file():
            return (d / name).read_text()
    return gzip.decompress((VENDORED / (name + ".gz")).read_bytes()).decode()


def make_strict(schema: dict) -> dict:
    """A copy of an OpenAPI v3 schema that rejects fields it does not list."""
    s = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, list):
            for n in node:
                walk(n)
            return
        if not isinstance(node, dict):
            return
        if ("properties" in node and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")):
            node["additionalProperties"] = False
        for key in ("properties", "patternProperties"):
            for sub in node.get(key, {}).values():
                walk(sub)
        for key in ("items", "additionalProperties", "not", "allOf", "anyOf", "oneOf"):
            if key in node:
                walk(node[key])

    walk(s)
    return s


@functools.lru_cache(maxsize=None)
def crd_validator(kind: str) -> jsonschema.protocols.Validator:
    """Strict validator for the served storage version (v1) of a KubeRay CRD."""
    crd = yaml.load(kuberay_crd_text(kind), Loader=_Loader)
    assert crd["spec"]["names"]["kind"] == kind
    version = next(v for v in crd["spec"]["versions"] if v.get("served") and v.get("storage"))
    assert version["name"] == "v1", version["name"]
    return jsonschema.Draft7Validator(make_strict(version["schema"]["openAPIV3Schema"]))


DURATION = {"type": "string", "pattern": r"^(0|([0-9]+(ms|s|m|h|d|w|y))+)$"}
STRMAP = {"type": "object", "additionalProperties": {"type": "string"}}
META = {"type": "object", "required": ["name"]}
SELECTOR = {"type": "object", "additionalProperties": False, "minProperties": 1,
            "properties": {"matchLabels": STRMAP, "matchExpressions": {"type": "array"}}}
PODMONITOR = {  # the fields this chart uses, and nothing unknown
    "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"const": "PodMonitor"},
        "metadata": META,
        "spec": {"type": "object", "required": ["selector", "podMetricsEndpoints"],
                 "additionalProperties": False,
                 "properties": {
                     "selector": SELECTOR,
                     "namespaceSelector": {"type": "object", "additionalProperties": False,
                                           "properties": {"any": {"type": "boolean"},
                                                          "matchNames": {"type": "array",
                                                                         "items": {"type": "string"}}}},
                     "jobLabel": {"type": "string"},
                     "podMetricsEndpoints": {"type": "array", "minItems": 1, "items": {
                         "type": "object", "additionalProperties": False, "anyOf": [
                             {"required": ["port"]}, {"required": ["portNumber"]}],
                         "properties": {"port": {"type": "string", "minLength": 1},
                                        "portNumber": {"type": "integer"},
                                        "path": {"type": "string", "pattern": "^/"},
                                        "scheme": {"enum": ["http", "https"]},
                                        "interval": DURATION, "scrapeTimeout": DURATION,
                                        "honorLabels": {"type": "boolean"},
                                        "relabelings": {"type": "array"},
                                        "metricRelabelings": {"type": "array"}}}}}}}}
RULE = {"type": "object", "required": ["expr"], "additionalProperties": False,
        "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
        "properties": {"alert": {"type": "string", "minLength": 1},
                       "record": {"type": "string", "minLength": 1},
                       "expr": {"type": ["string", "integer"], "minLength": 1}, "for": DURATION,
                       "keep_firing_for": DURATION, "labels": STRMAP, "annotations": STRMAP}}
PROMETHEUSRULE = {
    "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"const": "PrometheusRule"},
        "metadata": META,
        "spec": {"type": "object", "required": ["groups"], "additionalProperties": False, "properties": {
            "groups": {"type": "array", "minItems": 1, "items": {
                "type": "object", "required": ["name", "rules"], "additionalProperties": False,
                "properties": {"name": {"type": "string", "minLength": 1}, "interval": DURATION,
                               "limit": {"type": "integer"}, "query_offset": DURATION, "labels": STRMAP,
                               "rules": {"type": "array", "items": RULE}}}}}}}}
MONITORING = {"PodMonitor": PODMONITOR, "PrometheusRule": PROMETHEUSRULE}

DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
PORT_NAME = re.compile(r"^(?=.*[a-z])[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
MAX_NAME = {"CronJob": 52}


def _errors(validator, doc: dict) -> list[str]:
    out = []
    for e in sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path)):
        path = "/".join(str(p) for p in e.absolute_path) or "(root)"
        out.append(f"{path}: {e.message[:300]}")
    return out


def _sanity(doc: dict) -> list[str]:
    """Names, label values and container ports, wherever they occur in the object."""
    out = []
    name = doc.get("metadata", {}).get("name", "")
    if not (DNS_SUBDOMAIN.match(name) and len(name) <= MAX_NAME.get(doc.get("kind"), 253)):
        out.append(f"metadata/name: {name!r} is not a valid {doc.get('kind')} name")

    def walk(node, path):
        if isinstance(node, dict):
            meta = node.get("metadata")
            labels = meta.get("labels") if isinstance(meta, dict) else None
            for k, v in (labels or {}).items():
                if not (isinstance(v, str) and LABEL_VALUE.match(v) and len(v) <= 63):
                    out.append(f"{path}/metadata/labels/{k}: invalid label value {v!r}")
            if isinstance(node.get("containers"), list):
                for c in node["containers"] + node.get("initContainers", []):
                    names = [p.get("name") for p in c.get("ports", []) if p.get("name")]
                    if len(names) != len(set(names)):
                        out.append(f"{path}/containers/{c.get('name')}: duplicate port names {names}")
                    out.extend(f"{path}/containers/{c.get('name')}: invalid port name {n!r}"
                               for n in names if not (PORT_NAME.match(n) and len(n) <= 15))
            for k, v in node.items():
                walk(v, f"{path}/{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{path}/{i}")

    walk(doc, "")
    return out


def problems(doc: dict) -> list[str]:
    """Every schema or sanity problem of one object (empty when it is valid)."""
    kind, api = doc.get("kind"), doc.get("apiVersion", "")
    if kind in KUBERAY_KINDS and api == "ray.io/v1":
        errs = _errors(crd_validator(kind), doc)
        errs += ["metadata/" + e for e in problems_core(
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": doc.get("metadata", {})})]
    elif api.startswith("monitoring.coreos.com/"):
        if kind not in MONITORING:
            return [f"no structural schema for {api} {kind}"]
        errs = _errors(jsonschema.Draft7Validator(MONITORING[kind]), doc)
    else:
        errs = problems_core(doc)
    return errs + _sanity(doc)


def problems_core(doc: dict) -> list[str]:
    """kubernetes-validate in strict mode for a core Kubernetes kind."""
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        path = "/".join(str(p) for p in e.absolute_path) or "(root)"
        return [f"{path}: {e.message[:300]}"]
    except kubernetes_validate.SchemaNotFoundError as e:
        return [e.message]
    return []


def embedded_rayjobs(doc: dict) -> list[dict]:
    """RayJob manifests carried in a ConfigMap (the CronJob scheduler's template), name filled in."""
    if doc.get("kind") != "ConfigMap":
        return []
    return [d for key, text in (doc.get("data") or {}).items() if key.endswith(".yaml")
            for d in load_documents(text.replace("__RAYJOB_NAME__", "rayjob-28000000"))]


def validate(docs: list[dict]) -> int:
    """Validate objects (and RayJobs embedded in ConfigMaps); raises ManifestError; returns the count."""
    report, n = [], 0
    for doc in docs:
        for d in [doc] + embedded_rayjobs(doc):
            n += 1
            where = f"{d.get('kind')}/{d.get('metadata', {}).get('name')}"
            report += [f"{where}: {p}" for p in problems(d)]
    if report:
        raise ManifestError("\n".join(report))
    return n


def parse_entrypoint(entrypoint: str) -> None:
    """Parse (not run) a RayJob entrypoint with the real ray_inspect.cli; click.UsageError on a bad
    option. An entrypoint is one command: KubeRay joins it into its submitter's shell line, where
    shell syntax would apply to ``ray job submit`` instead."""
    from ray_inspect.cli import main

    assert not set("|&;<>`$()") & set(entrypoint), f"shell syntax in an entrypoint: {entrypoint}"
    args = shlex.split(entrypoint)
    assert args[0] == "ray-inspect"
    names = set(main.commands)
    i = next(k for k, a in enumerate(args) if a in names)
    main.make_context("ray-inspect", args[1:i] + [args[i]])
    main.commands[args[i]].make_context(args[i], args[i + 1:])
