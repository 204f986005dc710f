"""The Helm chart charts/ray-inspect, rendered and linted offline with the Helm 4 SDK (helm-python-sdk).

Every value combination below is rendered and each object validated against the real schemas
(tests/k8s_validate.py: strict Kubernetes schemas, the KubeRay CRDs, structural checks for the
Prometheus Operator kinds); the unit tests assert the fields that matter to users.
"""

from __future__ import annotations

import copy
import json
import shlex
from pathlib import Path

import helm_python as helm
import pytest
import yaml

from helpers import k8s_validate as kv

CHART = Path(__file__).resolve().parents[2] / "charts" / "ray-inspect"
CPU_ONLY = {"workers": {"gpu": {"enabled": False}, "cpu": {"enabled": True}}}
MONITORING_OFF = {"monitoring": {"podMonitor": {"enabled": False}, "grafanaDashboard": {"enabled": False},
                                 "prometheusRule": {"enabled": False}}}
RAYCRONJOB = {"scan": {"scheduler": "RayCronJob"}}
COMBINATIONS = {
    "defaults": {},
    "cpu-only": CPU_ONLY,
    "gpu-and-cpu": {"workers": {"cpu": {"enabled": True}}},
    "raycronjob": RAYCRONJOB,
    "site-adaptations": {
        "pods": {"serviceAccountName": "ray-inspect-irsa", "annotations": {"team": "qa"},
                 "labels": {"cost-center": "line-1"}, "priorityClassName": "batch",
                 "extraEnv": [{"name": "HTTPS_PROXY", "value": "http://proxy:3128"},
                              {"name": "SITE_TOKEN",
                               "valueFrom": {"secretKeyRef": {"name": "s", "key": "t"}}}],
                 "envFrom": [{"configMapRef": {"name": "site-env"}}],
                 "volumes": [{"name": "ca", "configMap": {"name": "site-ca"}}],
                 "volumeMounts": [{"name": "ca", "mountPath": "/etc/site-ca", "readOnly": True}]},
        "cluster": {"head": {"labels": {"role": "head", "app.kubernetes.io/instance": "hijack"},
                             "priorityClassName": "critical"}},
        "workers": {"gpu": {"runtimeClassName": "nvidia", "annotations": {"team": "vision"},
                            "volumes": [{"name": "scratch", "emptyDir": {}}],
                            "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}]}},
        "submitter": {"extraEnv": [{"name": "RAY_JOB_POLL", "value": "5"}]}},
    "network-policy-own-token": {"networkPolicy": {"enabled": True},
                                 "cluster": {"auth": {"mode": "token", "secretName": "ray-token"}}},
    "date-partitioned": {"scan": {"source": "s3://line-1/{date:year=%Y/month=%m/day=%d}", "out": "s3://s/{date}"}},
    "raycronjob-cpu-only": {**RAYCRONJOB, **CPU_ONLY},
    "monitoring-off": MONITORING_OFF,
    "cronjob-monitoring-off-cpu-only": {**MONITORING_OFF, **CPU_ONLY},
    "training-only": {"scan": {"enabled": False}},
    "scan-only-raycronjob": {"training": {"enabled": False}, "scan": {"scheduler": "RayCronJob"}},
    "no-autoscaling-workload-identity": {
        "cluster": {"autoscaling": {"enabled": False}},
        "s3": {"credentialsSecret": {"name": ""}, "region": "eu-central-1"}},
    "placement-and-registry": {
        "fullnameOverride": "inspect",
        "imagePullSecrets": [{"name": "regcred"}],
        "image": {"repository": "registry.example.com/qa/ray-inspect", "tag": "0.1.0-cu126"},
        "s3": {"endpoint": "http://minio.storage.svc:9000"},
        "telemetry": {"metricsPort": 9500, "pushgateway": "http://pushgateway.monitoring:9091",
                      "pipeline": "line-1"},
        "cluster": {"head": {"nodeSelector": {"pool": "system"}}},
        "workers": {"gpu": {"gpusPerPod": 2, "gpuResourceName": "amd.com/gpu", "maxReplicas": 8,
                            "nodeSelector": {"accelerator": "a100"},
                            "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
                                "nodeSelectorTerms": [{"matchExpressions": [
                                    {"key": "zone", "operator": "In", "values": ["a", "b"]}]}]}}}}},
        "training": {"runName": "fabric-v2", "extraArgs": ["--latent", "128"], "useGpu": False},
        "scan": {"force": True, "gpusPerWorker": 0.5, "allowBadInputs": False, "schedule": "30 1 * * 1-5",
                 "timeZone": "Europe/Berlin", "model": "s3://ray-inspect/models/fabric-v2"}},
}


@pytest.fixture(scope="module")
def chart():
    with helm.Chart.load(CHART) as c:
        yield c


def render(chart, values=None) -> list[dict]:
    out = chart.render(values or {}, name="ri", namespace="inspect")
    return [d for path, text in sorted(out.items()) if path.endswith(".yaml")
            for d in kv.load_documents(text)]


def by_kind(docs, kind):
    return [d for d in docs if d["kind"] == kind]


def one(docs, kind):
    found = by_kind(docs, kind)
    assert len(found) == 1, [d["kind"] for d in docs]
    return found[0]


def scan_rayjob(docs) -> dict:
    """The nightly scan's RayJob spec, whichever scheduler carries it."""
    if by_kind(docs, "RayCronJob"):
        return one(docs, "RayCronJob")["spec"]["jobTemplate"]
    cm = next(d for d in by_kind(docs, "ConfigMap") if "rayjob.yaml" in d["data"])
    return kv.embedded_rayjobs(cm)[0]["spec"]


def containers(cluster_spec):
    head = cluster_spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    workers = {g["groupName"]: g for g in cluster_spec["workerGroupSpecs"]}
    return head, workers


@pytest.mark.parametrize("name", list(COMBINATIONS))
def test_combination_renders_and_validates(chart, name):
    docs = render(chart, COMBINATIONS[name])
    assert kv.validate(docs) >= 1


@pytest.mark.parametrize("name", ["defaults", "cpu-only", "raycronjob", "monitoring-off",
                                  "placement-and-registry"])
def test_helm_lint_has_no_errors_or_warnings(name):
    report = helm.lint(CHART, COMBINATIONS[name], strict=True, kube_version="v1.31.0", namespace="inspect")
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


def test_defaults_render_the_expected_objects(chart):
    kinds = sorted(d["kind"] for d in render(chart))
    assert kinds == ["ConfigMap", "ConfigMap", "CronJob", "PodMonitor", "PrometheusRule", "RayJob", "Role",
                     "RoleBinding", "ServiceAccount"]


def test_training_rayjob(chart):
    job = one(render(chart), "RayJob")
    spec = job["spec"]
    assert job["metadata"]["name"] == "ri-ray-inspect-train"
    assert shlex.split(spec["entrypoint"]) == [
        "ray-inspect", "--metrics-port", "9400", "--metrics-bind", "0.0.0.0", "--log-format", "json",
        "train", "s3://ray-inspect/patches.zarr", "s3://ray-inspect/models/fabric", "--loss", "ssim",
        "--epochs", "200", "--batch-size", "32", "--workers", "4", "--use-gpu", "--storage",
        "s3://ray-inspect/runs", "--checkpoint-every", "1", "--max-failures", "3", "--address", "auto"]
    assert (spec["shutdownAfterJobFinishes"], spec["ttlSecondsAfterFinished"], spec["activeDeadlineSeconds"],
            spec["backoffLimit"], spec["submissionMode"]) == (True, 300, 86400, 2, "K8sJobMode")
    head, workers = containers(spec["rayClusterSpec"])
    assert spec["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert "nvidia.com/gpu" not in json.dumps(head)
    assert {p["name"]: p["containerPort"] for p in head["ports"]}["inspect-metrics"] == 9400
    assert {"name": "RAY_INSPECT_PIPELINE", "value": "ri"} in head["env"]
    gpu = workers["gpu"]
    assert (gpu["minReplicas"], gpu["maxReplicas"]) == (0, 4)
    res = gpu["template"]["spec"]["containers"][0]["resources"]
    assert res["limits"]["nvidia.com/gpu"] == 1 and res["requests"]["nvidia.com/gpu"] == 1
    assert gpu["template"]["spec"]["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert head["image"].endswith(":0.1.0-cpu")                       # no CUDA where no GPU is used
    assert gpu["template"]["spec"]["containers"][0]["image"].endswith(":0.1.0-cu128")
    assert spec["submitterPodTemplate"]["spec"]["containers"][0]["image"].endswith(":0.1.0-cpu")
    assert spec["rayClusterSpec"]["enableInTreeAutoscaling"] is True


def test_site_adaptations_reach_the_pods_they_are_meant_for(chart):
    """pods.* reach every Ray pod and submitter; a group's own values merge over them (labels,
    annotations) or add to them (env, volumes); the chart's selector labels stay the chart's."""
    spec = one(render(chart, COMBINATIONS["site-adaptations"]), "RayJob")["spec"]
    cluster = spec["rayClusterSpec"]
    head_pod = cluster["headGroupSpec"]["template"]
    gpu_pod = cluster["workerGroupSpecs"][0]["template"]
    sub_pod = spec["submitterPodTemplate"]
    for pod in (head_pod, gpu_pod, sub_pod):
        assert pod["spec"]["serviceAccountName"] == "ray-inspect-irsa"
        assert pod["metadata"]["labels"]["cost-center"] == "line-1"
        assert pod["metadata"]["labels"]["app.kubernetes.io/instance"] == "ri"
        container = pod["spec"]["containers"][0]
        assert {"name": "HTTPS_PROXY", "value": "http://proxy:3128"} in container["env"]
        assert container["envFrom"] == [{"configMapRef": {"name": "site-env"}}]
        assert {"name": "ca", "mountPath": "/etc/site-ca", "readOnly": True} in container["volumeMounts"]
        assert {"name": "ca", "configMap": {"name": "site-ca"}} in pod["spec"]["volumes"]
    assert head_pod["metadata"]["labels"]["role"] == "head"
    assert head_pod["spec"]["priorityClassName"] == "critical"
    assert gpu_pod["spec"]["priorityClassName"] == sub_pod["spec"]["priorityClassName"] == "batch"
    assert gpu_pod["spec"]["runtimeClassName"] == "nvidia" and "runtimeClassName" not in head_pod["spec"]
    assert gpu_pod["metadata"]["annotations"] == {"team": "vision"}
    assert head_pod["metadata"]["annotations"] == {"team": "qa"}
    assert [v["name"] for v in gpu_pod["spec"]["volumes"]] == ["ca", "scratch"]
    head_env = [e["name"] for e in head_pod["spec"]["containers"][0]["env"]]
    assert head_env.index("AWS_SECRET_ACCESS_KEY") < head_env.index("HTTPS_PROXY")   # the chart's first
    assert {"name": "RAY_JOB_POLL", "value": "5"} in sub_pod["spec"]["containers"][0]["env"]
    assert "RAY_JOB_POLL" not in json.dumps(head_pod)


def _cluster_specs(docs) -> list[dict]:
    """Every RayCluster spec the release creates: the training RayJob's and the nightly scan's."""
    return [one(docs, "RayJob")["spec"]["rayClusterSpec"], scan_rayjob(docs)["rayClusterSpec"]]


def test_every_ray_cluster_requires_its_token_and_no_port_is_open_without_it(chart):
    """Token auth on every RayCluster of every scheduler (the dashboard, Jobs API and GCS listen on
    the pod network, and only with the token), a Secret of one's own when named, and no Service,
    Ingress or host port that would take a Ray or metrics port beyond the pod network."""
    for name in ("defaults", "raycronjob", "network-policy-own-token", "site-adaptations"):
        docs = render(chart, COMBINATIONS[name])
        for spec in _cluster_specs(docs):
            want = {"mode": "token", "secretName": "ray-token"} if "own-token" in name else {"mode": "token"}
            assert spec["authOptions"] == want, name
        assert not by_kind(docs, "Service") and not by_kind(docs, "Ingress")
        assert '"hostPort"' not in json.dumps(docs) and '"hostNetwork"' not in json.dumps(docs)
    raycluster = kv.load_documents((CHART.parents[1] / "cluster/manifests/raycluster.yaml").read_text())[0]
    assert raycluster["spec"]["authOptions"] == {"mode": "token"}


def test_network_policy_admits_the_release_the_operator_and_prometheus_only(chart):
    docs = render(chart, COMBINATIONS["network-policy-own-token"])
    policy = one(docs, "NetworkPolicy")["spec"]
    own = {"app.kubernetes.io/part-of": "ray-inspect", "app.kubernetes.io/instance": "ri"}
    assert policy["podSelector"]["matchLabels"] == own and policy["policyTypes"] == ["Ingress"]
    peers, operator, prometheus = policy["ingress"]
    assert peers == {"from": [{"podSelector": {"matchLabels": own}}]}              # every port, own pods
    assert operator["from"][0]["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name":
                                                                       "kuberay-operator"}
    assert [p["port"] for p in operator["ports"]] == [8265]
    assert prometheus["from"][0]["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name":
                                                                         "monitoring"}
    assert [p["port"] for p in prometheus["ports"]] == [8080, 9400]
    submitter = one(docs, "RayJob")["spec"]["submitterPodTemplate"]["metadata"]["labels"]
    assert own.items() <= submitter.items()                                     # the submitter is a peer
    assert not by_kind(render(chart), "NetworkPolicy")


def test_s3_credentials_only_by_secret_reference(chart):
    for name, values in COMBINATIONS.items():
        docs = render(chart, values)
        for doc in docs + [e for d in docs for e in kv.embedded_rayjobs(d)]:
            envs = _all_env(doc)
            for env in envs:
                if env["name"].startswith("AWS_") and env["name"] != "AWS_DEFAULT_REGION":
                    assert "value" not in env, (name, env)
                    assert env["valueFrom"]["secretKeyRef"]["name"] == "ray-inspect-s3"
            secret = values.get("s3", {}).get("credentialsSecret", {}).get("name")
            if doc["kind"] == "RayJob" and secret != "":
                assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= {e["name"] for e in envs}, name


def test_secret_name_and_keys_are_configurable(chart):
    secret = {"name": "minio-creds", "accessKeyIdKey": "user", "secretAccessKeyKey": "password",
              "endpointKey": ""}
    docs = render(chart, {"s3": {"credentialsSecret": secret}})
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"]
            for e in _all_env(one(docs, "RayJob")) if "valueFrom" in e}
    assert refs["AWS_ACCESS_KEY_ID"] == {"name": "minio-creds", "key": "user"}
    assert refs["AWS_SECRET_ACCESS_KEY"] == {"name": "minio-creds", "key": "password"}
    assert "RAY_INSPECT_S3_ENDPOINT" not in refs


def test_endpoint_value_wins_over_the_secret_key(chart):
    docs = render(chart, {"s3": {"endpoint": "http://minio:9000"}})
    env = {e["name"]: e for e in _all_env(one(docs, "RayJob"))}
    assert env["RAY_INSPECT_S3_ENDPOINT"] == {"name": "RAY_INSPECT_S3_ENDPOINT", "value": "http://minio:9000"}


def test_nightly_cronjob_creates_a_rayjob_with_least_privilege(chart):
    docs = render(chart)
    cron = one(docs, "CronJob")
    assert cron["metadata"]["name"] == "ri-ray-inspect-nightly"
    assert (cron["spec"]["schedule"], cron["spec"]["timeZone"]) == ("0 2 * * *", "Etc/UTC")
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    sa = one(docs, "ServiceAccount")["metadata"]["name"]
    assert pod["serviceAccountName"] == sa
    assert one(docs, "Role")["rules"] == [{"apiGroups": ["ray.io"], "resources": ["rayjobs"],
                                           "verbs": ["get", "create"]}]
    binding = one(docs, "RoleBinding")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa, "namespace": "inspect"}]
    assert binding["roleRef"]["name"] == one(docs, "Role")["metadata"]["name"]
    cm = next(d for d in by_kind(docs, "ConfigMap") if "rayjob.yaml" in d["data"])
    assert pod["volumes"][0]["configMap"]["name"] == cm["metadata"]["name"]
    assert "k create -f -" in cm["data"]["submit-scan.sh"]   # behaviour: test_cronjob_script_...
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    field_path = env["CRONJOB_JOB_NAME"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert field_path.endswith("['batch.kubernetes.io/job-name']")
    assert env["RAYJOB_PREFIX"]["value"] == "ri-ray-inspect-scan"
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"


def test_scan_rayjob(chart):
    spec = scan_rayjob(render(chart))
    assert shlex.split(spec["entrypoint"]) == [
        "ray-inspect", "--metrics-port", "9400", "--metrics-bind", "0.0.0.0", "--log-format", "json",
        "scan", "s3://ray-inspect/models/fabric", "s3://ray-inspect/incoming", "s3://ray-inspect/scans/nightly",
        "--workers", "4", "--gpus-per-worker", "1", "--address", "auto", "--allow-bad-inputs"]
    limits = (spec["shutdownAfterJobFinishes"], spec["activeDeadlineSeconds"], spec["backoffLimit"])
    assert limits == (True, 21600, 2)


def test_date_partitioned_nights_pass_the_placeholder_and_the_schedules_time_zone(chart):
    """{date} reaches the command unexpanded (the scan fills it in when it runs) and the default
    night is taken in the schedule's time zone; a fixed source passes no time zone."""
    values = {"scan": {"source": "s3://line-1/images/{date:%Y/%m/%d}", "out": "s3://scans/{date}",
                       "timeZone": "Europe/Berlin"}}
    cron = {"scan": {**values["scan"], "scheduler": "RayCronJob"}}
    for docs in (render(chart, values), render(chart, cron)):
        words = shlex.split(scan_rayjob(docs)["entrypoint"])
        scan_args = words[words.index("scan") + 1:]
        assert scan_args[1:3] == ["s3://line-1/images/{date:%Y/%m/%d}", "s3://scans/{date}"]
        assert words[words.index("--timezone") + 1] == "Europe/Berlin"
    assert "--timezone" not in scan_rayjob(render(chart))["entrypoint"]


def test_raycronjob_replaces_the_cronjob(chart):
    docs = render(chart, RAYCRONJOB)
    assert not by_kind(docs, "CronJob") and not by_kind(docs, "Role") and not by_kind(docs, "ServiceAccount")
    rcj = one(docs, "RayCronJob")
    spec = rcj["spec"]
    assert (spec["schedule"], spec["timeZone"], spec["suspend"]) == ("0 2 * * *", "Etc/UTC", False)
    assert " scan s3://ray-inspect/models/fabric " in rcj["spec"]["jobTemplate"]["entrypoint"]


def test_cpu_only_has_no_gpu_anywhere(chart):
    docs = render(chart, CPU_ONLY)
    text = json.dumps(docs + [e for d in docs for e in kv.embedded_rayjobs(d)])
    assert "nvidia.com/gpu" not in text and ":0.1.0-cpu" in text
    assert " --no-gpu " in one(docs, "RayJob")["spec"]["entrypoint"]
    assert " --gpus-per-worker 0 " in scan_rayjob(docs)["entrypoint"]
    _, workers = containers(one(docs, "RayJob")["spec"]["rayClusterSpec"])
    assert list(workers) == ["cpu"]


def test_placement_values_reach_the_pods(chart):
    docs = render(chart, COMBINATIONS["placement-and-registry"])
    job = one(docs, "RayJob")
    assert job["metadata"]["name"] == "inspect-train"
    head, workers = containers(job["spec"]["rayClusterSpec"])
    gpu_pod = workers["gpu"]["template"]["spec"]
    assert gpu_pod["nodeSelector"] == {"accelerator": "a100"}
    assert gpu_pod["containers"][0]["resources"]["limits"]["amd.com/gpu"] == 2
    assert "nodeAffinity" in gpu_pod["affinity"]
    assert gpu_pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert job["spec"]["submitterPodTemplate"]["spec"]["imagePullSecrets"] == [{"name": "regcred"}]
    assert head["image"] == "registry.example.com/qa/ray-inspect:0.1.0-cu126"
    entry = job["spec"]["entrypoint"]
    assert " --no-gpu " in entry and entry.endswith(" --run-name fabric-v2 --latent 128")
    assert "--pushgateway http://pushgateway.monitoring:9091 " in entry
    assert {"name": "RAY_INSPECT_PIPELINE", "value": "line-1"} in head["env"]
    scan = scan_rayjob(docs)["entrypoint"]
    assert " --gpus-per-worker 0.5 " in scan and scan.endswith(" --force") and "||" not in scan


def test_monitoring_objects(chart):
    docs = render(chart)
    pm = one(docs, "PodMonitor")
    head, workers = containers(one(docs, "RayJob")["spec"]["rayClusterSpec"])
    head_group = one(docs, "RayJob")["spec"]["rayClusterSpec"]["headGroupSpec"]
    pod_labels = head_group["template"]["metadata"]["labels"]
    assert pm["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    ports = {p["name"] for p in head["ports"]}
    assert {e["port"] for e in pm["spec"]["podMetricsEndpoints"]} == {"metrics", "inspect-metrics"} <= ports
    dash = next(d for d in by_kind(docs, "ConfigMap")
                if d["metadata"]["labels"].get("grafana_dashboard") == "1")
    shipped = json.loads((CHART / "files/grafana-dashboard.json").read_text())
    rendered = json.loads(dash["data"]["ray-inspect.json"])
    assert {k: v for k, v in rendered.items() if k not in ("uid", "title")} == \
        {k: v for k, v in shipped.items() if k not in ("uid", "title")}
    assert rendered["title"] == "ray-inspect: inspect/ri" and len(rendered["uid"]) <= 40
    rules = yaml.safe_load((CHART / "files/alert-rules.yaml").read_text())
    groups = one(docs, "PrometheusRule")["spec"]["groups"]
    assert groups[:-1] == rules["groups"]                  # the shipped rules, then the release's own
    assert groups[-1]["name"] == "ray-inspect-inspect-ri-nightly"
    assert 'cronjob="ri-ray-inspect-nightly"' in groups[-1]["rules"][0]["expr"]
    rcj = one(render(chart, RAYCRONJOB), "PrometheusRule")["spec"]["groups"]
    assert rcj == rules["groups"]                          # no CronJob to watch


def test_monitoring_switches(chart):
    for key, kind in [("podMonitor", "PodMonitor"), ("prometheusRule", "PrometheusRule")]:
        docs = render(chart, {"monitoring": {key: {"enabled": False}}})
        assert not by_kind(docs, kind)
    docs = render(chart, {"monitoring": {"grafanaDashboard": {"enabled": False}}})
    assert not [d for d in by_kind(docs, "ConfigMap") if "grafana_dashboard" in d["metadata"]["labels"]]


@pytest.mark.parametrize("values, message", [
    ({"training": {"epoch": 3}}, "epoch"),                                    # misspelt key
    ({"s3": {"accessKeyId": "AKIAEXAMPLE"}}, "accessKeyId"),                  # no credentials in values
    ({"scan": {"scheduler": "Cron"}}, "scheduler"),
    ({"training": {"patches": "s3://b/p.zarr; rm -rf /"}}, "patches"),        # not one shell word
    ({"telemetry": {"metricsPort": 8080}}, "metricsPort"),                    # Ray's own metrics port
    ({"scan": {"source": "s3://b/{data}"}}, "source"),                        # only {date} placeholders
    ({"pods": {"extraEnv": [{"name": "AWS_SECRET_ACCESS_KEY", "value": "x"}]}}, "extraEnv"),  # literal secret
    ({"workers": {"gpu": {"extraEnv": [{"name": "RAY_AUTH_TOKEN", "value": "x"}]}}}, "extraEnv"),
    ({"pods": {"serviceAccount": "x"}}, "serviceAccount"),                     # misspelt key
    ({"pods": {"envFrom": [{"secretRef": {}}]}}, "envFrom"),                   # no name
    ({"submitter": {"volumeMounts": [{"name": "ca"}]}}, "volumeMounts"),       # no mountPath
    ({"cluster": {"head": {"runtimeClassName": "Nvidia GPU"}}}, "runtimeClassName"),
    ({"pods": {"labels": {"tier": 1}}}, "labels"),                             # label values are strings
    ({"cluster": {"auth": {"mode": "none", "secretName": ""}}}, "mode"),
    ({"networkPolicy": {"operatorNamespaceSelector": {"team": 5}}}, "operatorNamespaceSelector"),
    ({"scan": {"out": "s3://b/{date:%Y,%m}"}}, "out"),                        # a comma: bash brace expansion
])
def test_values_schema_rejects(chart, values, message):
    with pytest.raises(helm.HelmValuesError, match=message):
        chart.render(values, name="ri")


def test_values_schema_is_valid_and_covers_the_defaults():
    import jsonschema

    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    jsonschema.Draft7Validator(schema).validate(yaml.safe_load((CHART / "values.yaml").read_text()))


def test_large_integers_stay_integers(chart):
    """Helm reads numbers as floats; without `| int` 1000000 would render as 1e+06."""
    job = one(render(chart, {"training": {"activeDeadlineSeconds": 1000000, "epochs": 10000000}}), "RayJob")
    assert job["spec"]["activeDeadlineSeconds"] == 1000000
    assert " --epochs 10000000 " in job["spec"]["entrypoint"]


def test_replica_bounds_are_checked(chart):
    with pytest.raises(helm.HelmRenderError, match="minReplicas <= replicas <= maxReplicas"):
        chart.render({"workers": {"gpu": {"replicas": 5}}}, name="ri")


def test_no_worker_group_fails(chart):
    with pytest.raises(helm.HelmRenderError, match="at least one worker group"):
        chart.render({"workers": {"gpu": {"enabled": False}}}, name="ri")


def test_misspelt_rayjob_field_fails_validation(chart):
    """The validator can fail: a misspelt field anywhere in a RayJob is an error."""
    job = one(render(chart), "RayJob")
    broken = copy.deepcopy(job)
    broken["spec"]["shutdownAfterJobFinish"] = broken["spec"].pop("shutdownAfterJobFinishes")
    with pytest.raises(kv.ManifestError, match="shutdownAfterJobFinish"):
        kv.validate([broken])
    broken = copy.deepcopy(job)
    head = broken["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    head["resource"] = head.pop("resources")
    with pytest.raises(kv.ManifestError, match="'resource' was unexpected"):
        kv.validate([broken])


def test_misspelt_field_in_a_value_fails_validation(chart):
    """A typo inside a pass-through value (a toleration) renders, and the RayJob schema rejects it."""
    docs = render(chart, {"workers": {"gpu": {"tolerations": [{"key": "gpu", "operater": "Exists"}]}}})
    with pytest.raises(kv.ManifestError, match="'operater' was unexpected") as err:
        kv.validate(docs)
    assert "RayJob/ri-ray-inspect-train" in str(err.value)


def test_entrypoints_match_the_cli(chart):
    """Every entrypoint the chart writes parses with the real click command line."""
    entrypoints = []
    for values in ({}, CPU_ONLY, COMBINATIONS["placement-and-registry"]):
        docs = render(chart, values)
        entrypoints += [one(docs, "RayJob")["spec"]["entrypoint"], scan_rayjob(docs)["entrypoint"]]
    for entry in entrypoints:
        kv.parse_entrypoint(entry)


def _all_env(doc) -> list[dict]:
    found = []

    def walk(node):
        if isinstance(node, dict):
            if node.get("name") and isinstance(node.get("env"), list):
                found.extend(node["env"])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(doc)
    return found


FAKE_KUBECTL = r"""#!/bin/bash
# A stand-in for kubectl: records calls, "creates" from stdin, answers gets from $FAKE/statuses.
echo "$*" >> "$FAKE/calls"
shift 2                                  # --namespace NS
case "$1" in
  get)
    [ -f "$FAKE/created" ] || exit 1
    case "$*" in
      *"-o name"*) echo rayjob/x ;;
      *message*) echo "the scan failed" ;;
      *) n=$(( $(cat "$FAKE/n" 2>/dev/null || echo 0) + 1 ))
         echo $n > "$FAKE/n"
         sed -n "${n}p" "$FAKE/statuses" ;;
    esac ;;
  create) cat > "$FAKE/created" ;;
esac
"""


@pytest.mark.parametrize("statuses, exists, code", [
    (["/", "Running/RUNNING", "Complete/SUCCEEDED"], False, 0),
    (["Running/RUNNING", "Failed/FAILED"], False, 1),
    (["Complete/SUCCEEDED"], True, 0),                  # a retried pod re-attaches, creates nothing
])
def test_cronjob_script_creates_one_rayjob_and_waits(chart, tmp_path, statuses, exists, code):
    import os
    import subprocess

    cm = next(d for d in by_kind(render(chart), "ConfigMap") if "rayjob.yaml" in d["data"])
    (tmp_path / "rayjob.yaml").write_text(cm["data"]["rayjob.yaml"])
    (tmp_path / "kubectl").write_text(FAKE_KUBECTL)
    (tmp_path / "kubectl").chmod(0o755)
    (tmp_path / "statuses").write_text("\n".join(statuses) + "\n")
    if exists:
        (tmp_path / "created").write_text("existing")
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "FAKE": str(tmp_path),
           "CRONJOB_JOB_NAME": "ri-ray-inspect-nightly-29000000", "RAYJOB_PREFIX": "ri-ray-inspect-scan",
           "POD_NAMESPACE": "inspect", "POLL_SECONDS": "0",
           "RAYJOB_TEMPLATE": str(tmp_path / "rayjob.yaml")}
    res = subprocess.run(["bash", "-c", cm["data"]["submit-scan.sh"]], env=env, capture_output=True,
                         text=True, timeout=30)
    assert res.returncode == code, res.stderr
    calls = (tmp_path / "calls").read_text().splitlines()
    assert all(c.startswith("--namespace inspect ") for c in calls)
    assert any(" create " in f" {c} " for c in calls) is not exists
    if not exists:
        created = kv.load_documents((tmp_path / "created").read_text())
        assert created[0]["metadata"]["name"] == "ri-ray-inspect-scan-29000000"
        kv.validate(created)
    if code:
        assert "the scan failed" in res.stderr


def test_runbook_label_selectors_select_what_the_chart_creates(chart):
    """Every `kubectl get KINDS -l SELECTOR` of docs/deploy.md's runbook (release "qa") matches the
    labels the chart puts on those objects; the RayCronJob's RayJobs are found by its name."""
    import re

    text = (CHART.parents[1] / "docs" / "deploy.md").read_text()
    runbook = text[text.index("## 9. Runbook"):]
    commands = re.findall(r"kubectl -n inspect get (\S+) -l (\S+)", runbook)
    assert len(commands) == 2
    docs = [d for path, t in sorted(chart.render({}, name="qa", namespace="inspect").items())
            if path.endswith(".yaml") for d in kv.load_documents(t)]
    cron = one(docs, "CronJob")["spec"]["jobTemplate"]
    cm = next(d for d in by_kind(docs, "ConfigMap") if "rayjob.yaml" in d["data"])
    labels = {"rayjobs": [kv.embedded_rayjobs(cm)[0]["metadata"]["labels"]],
              "jobs": [cron["metadata"]["labels"]], "pods": [cron["spec"]["template"]["metadata"]["labels"]]}
    for kinds, selector in commands:
        wanted = dict(term.split("=", 1) for term in selector.split(","))
        for kind in kinds.split(","):
            assert any(wanted.items() <= have.items() for have in labels[kind]), (kind, selector)
    rcj = one(render(chart, {"scan": {"scheduler": "RayCronJob"}}), "RayCronJob")
    assert rcj["metadata"]["name"].replace("ri-", "qa-") + "-" in runbook


def test_two_releases_get_dashboards_of_their_own(chart):
    """Grafana keys dashboards by uid across the whole instance: each release (namespace and name)
    renders its own, so two production lines do not overwrite each other's."""
    def uid(name, namespace):
        out = chart.render({}, name=name, namespace=namespace)
        docs = [d for path, t in sorted(out.items()) if path.endswith(".yaml") for d in kv.load_documents(t)]
        cm = next(d for d in by_kind(docs, "ConfigMap") if d["metadata"]["labels"].get("grafana_dashboard"))
        return json.loads(cm["data"]["ray-inspect.json"])["uid"]

    uids = {uid("line-1", "inspect"), uid("line-2", "inspect"), uid("line-1", "other")}
    assert len(uids) == 3 and all(u.startswith("ray-inspect-") and len(u) <= 40 for u in uids)
    assert uid("line-1", "inspect") == uid("line-1", "inspect")          # stable across upgrades
