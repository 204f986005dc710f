"""The plain KubeRay manifests and the Dockerfile in cluster/, and the offline validator itself.

The manifests are validated like the chart (tests/k8s_validate.py); the Dockerfile must install
exactly as `make install` does, pinned by constraints.txt alone (one source of truth).
"""

from __future__ import annotations

import ast
import copy
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from helpers import k8s_validate as kv

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
MANIFESTS = sorted((CLUSTER / "manifests").glob("*.yaml"))


def docs_of(name: str) -> list[dict]:
    return kv.load_documents((CLUSTER / "manifests" / name).read_text())


def pins() -> dict[str, str]:
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    return dict(ln.strip().lower().split("==", 1) for ln in lines if "==" in ln and not ln.startswith("#"))


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_validates(path):
    assert kv.validate(kv.load_documents(path.read_text())) >= 1


def test_manifest_set():
    kinds = sorted((d["kind"], d["metadata"]["name"])
                   for p in MANIFESTS for d in kv.load_documents(p.read_text()))
    assert kinds == [("RayCluster", "ray-inspect"), ("RayJob", "ray-inspect-scan"),
                     ("RayJob", "ray-inspect-train")]


def test_raycluster_has_a_cpu_head_and_a_gpu_worker_group():
    spec = docs_of("raycluster.yaml")[0]["spec"]
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "gpu" not in str(head["resources"]) and spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert {p["name"]: p["containerPort"] for p in head["ports"]}["inspect-metrics"] == 9400
    (gpu,) = spec["workerGroupSpecs"]
    res = gpu["template"]["spec"]["containers"][0]["resources"]
    assert res["limits"]["nvidia.com/gpu"] == 1 and (gpu["minReplicas"], gpu["maxReplicas"]) == (0, 4)
    for container in [head, gpu["template"]["spec"]["containers"][0]]:
        env = {e["name"]: e for e in container["env"]}
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert "value" not in env[key]
            assert env[key]["valueFrom"]["secretKeyRef"] == {"name": "ray-inspect-s3", "key": key}
    assert head["image"].endswith("-cpu")                     # the head has no GPU: no CUDA to pull
    assert gpu["template"]["spec"]["containers"][0]["image"].endswith("-cu128")


@pytest.mark.parametrize("name, command", [("rayjob-train.yaml", "train"), ("rayjob-scan.yaml", "scan")])
def test_rayjobs_run_on_the_raycluster_and_parse_with_the_cli(name, command):
    spec = docs_of(name)[0]["spec"]
    assert spec["clusterSelector"] == {"ray.io/cluster": "ray-inspect"}
    assert f" {command} s3://" in spec["entrypoint"]
    kv.parse_entrypoint(spec["entrypoint"])


def test_readme_covers_every_manifest():
    readme = (CLUSTER / "README.md").read_text()
    for p in MANIFESTS:
        assert f"manifests/{p.name}" in readme
    assert "kubectl create secret generic ray-inspect-s3" in readme


def test_ray_version_is_the_pinned_one():
    ray = pins()["ray"]
    assert re.search(rf"^ARG RAY_VERSION={re.escape(ray)}$", (CLUSTER / "Dockerfile").read_text(), re.M)
    assert yaml.safe_load((ROOT / "charts/ray-inspect/values.yaml").read_text())["rayVersion"] == ray
    assert docs_of("raycluster.yaml")[0]["spec"]["rayVersion"] == ray


def test_dockerfile_installs_like_make():
    """One source of truth: torch, then the package, each with `pip install -c constraints.txt`."""
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    makefile = (ROOT / "Makefile").read_text()
    steps = (r"pip install [^\n]*-c constraints\.txt torch\b[\s\S]*"
             r"pip install [^\n]*-c constraints\.txt (\.|-e '\.\[test\]')")
    assert re.search(steps, dockerfile) and re.search(steps, makefile)
    assert not re.search(r"torch\s*[=<>~]=", dockerfile + makefile)          # no second torch pin
    torch = next(Requirement(d) for d in dependencies() if Requirement(d).name == "torch")
    assert torch.specifier.contains(pins()["torch"]) and "==" not in str(torch.specifier)  # a range
    assert "COPY --chown=1000:100 constraints.txt" in dockerfile


def dependencies() -> list[str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]


def test_dockerfile_installs_the_dependencies_in_a_layer_before_the_source():
    """A code change rebuilds only the last layer: pyproject's dependencies are installed before the
    source is copied, the package itself after it without dependencies. The RUN line that lists
    them runs here in a shell as Docker runs it, and lists exactly pyproject's dependencies."""
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    deps_at = dockerfile.index("-r /tmp/requirements.txt")
    source_at = dockerfile.index("COPY --chown=1000:100 ray_inspect ./ray_inspect")
    assert deps_at < source_at
    assert "pip install --no-cache-dir --no-deps -c constraints.txt ." in dockerfile[source_at:]
    assert "COPY --chown=1000:100 ray_inspect" not in dockerfile[:deps_at]
    listing = re.search(r'(python -c "import tomllib.*")\s*\\\n\s*> /tmp/requirements\.txt', dockerfile)
    cmd = listing.group(1).replace("python", shlex.quote(sys.executable), 1)
    out = subprocess.run(["sh", "-c", cmd], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == dependencies()


def test_every_package_the_code_imports_is_declared():
    """Each third-party module imported anywhere in ray_inspect/ belongs to a distribution named in
    pyproject's dependencies (not only pulled in by another one)."""
    from importlib.metadata import packages_distributions

    modules = set()
    for path in (ROOT / "ray_inspect").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    third_party = modules - set(sys.stdlib_module_names) - {"ray_inspect", "__future__"}
    declared = {canonicalize_name(Requirement(d).name) for d in dependencies()}
    owners = packages_distributions()
    undeclared = {m: owners.get(m) for m in third_party
                  if not {canonicalize_name(d) for d in owners.get(m, [])} & declared}
    assert len(third_party) >= 15 and not undeclared, undeclared


def test_dockerfile_base_and_user():
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert "FROM rayproject/ray:${RAY_VERSION}-${PYTHON_TAG}-${FLAVOR}" in dockerfile
    assert re.search(r"^ARG FLAVOR=cpu$", dockerfile, re.M) and "cu128" in dockerfile
    users = re.findall(r"^USER (\S+)$", dockerfile, re.M)
    assert users and users[-1].split(":")[0] not in ("0", "root")


# The validator can fail: one deliberate error per kind of check.

def test_strict_crd_schema_rejects_unknown_fields_but_keeps_open_maps():
    schema = kv.make_strict({"type": "object", "properties": {
        "a": {"type": "object", "properties": {"b": {"type": "string"}}},
        "open": {"type": "object", "x-kubernetes-preserve-unknown-fields": True, "properties": {"c": {}}},
        "map": {"type": "object", "additionalProperties": {"type": "string"}}}})
    assert schema["additionalProperties"] is False
    assert schema["properties"]["a"]["additionalProperties"] is False
    assert "additionalProperties" not in schema["properties"]["open"]
    assert schema["properties"]["map"]["additionalProperties"] == {"type": "string"}


def test_misspelt_field_in_a_plain_rayjob_fails():
    job = docs_of("rayjob-scan.yaml")[0]
    broken = copy.deepcopy(job)
    broken["spec"]["entryPoint"] = broken["spec"].pop("entrypoint")
    with pytest.raises(kv.ManifestError, match="entryPoint"):
        kv.validate([broken])


def test_misspelt_field_in_the_raycluster_pod_template_fails():
    cluster = copy.deepcopy(docs_of("raycluster.yaml")[0])
    cluster["spec"]["workerGroupSpecs"][0]["template"]["spec"]["toleration"] = []
    with pytest.raises(kv.ManifestError, match="'toleration' was unexpected"):
        kv.validate([cluster])


def test_bad_metadata_and_core_kinds_fail():
    with pytest.raises(kv.ManifestError, match="nmae"):
        kv.validate([{"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": {"name": "x", "nmae": "y"},
                      "spec": {"entrypoint": "true"}}])
    with pytest.raises(kv.ManifestError, match="schedul"):
        kv.validate([{"apiVersion": "batch/v1", "kind": "CronJob", "metadata": {"name": "x"},
                      "spec": {"schedul": "* * * * *", "jobTemplate": {}}}])
    with pytest.raises(kv.ManifestError, match="invalid label value"):
        kv.validate([{"apiVersion": "v1", "kind": "ConfigMap",
                      "metadata": {"name": "x", "labels": {"a": "b c"}}}])


def test_monitoring_structure_checks_fail():
    pm = {"apiVersion": "monitoring.coreos.com/v1", "kind": "PodMonitor", "metadata": {"name": "x"},
          "spec": {"selector": {"matchLabels": {"a": "b"}}, "podMetricsEndpoints": [{"prot": "metrics"}]}}
    with pytest.raises(kv.ManifestError, match="prot"):
        kv.validate([pm])
    rule = {"apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule", "metadata": {"name": "x"},
            "spec": {"groups": [{"name": "g", "rules": [{"alert": "A", "record": "r", "expr": "1"}]}]}}
    with pytest.raises(kv.ManifestError, match="spec/groups/0/rules/0"):
        kv.validate([rule])


def test_vendored_kuberay_schemas_match_the_shared_copy():
    """The copies a fresh clone validates with are the schemas handed to the project."""
    import gzip

    shared = kv.shared_schema_dir()
    if shared is None:
        pytest.skip("no shared/schemas/kuberay beside this checkout (a fresh clone uses the vendored copy)")
    for name in kv.KUBERAY_KINDS.values():
        vendored = gzip.decompress((kv.VENDORED / (name + ".gz")).read_bytes())
        assert vendored == (shared / name).read_bytes(), name
