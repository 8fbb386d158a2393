"""The deployment manifests parse, carry the fields their kinds need, and name entry points and configs that exist."""

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from kit.jobs import REPO
from pipeline.config import load_config
from pipeline.serve.fanout import retriever_names
from tests.conftest import FAKE_CREDENTIALS

KUBERAY = REPO / "infra" / "kuberay"

# The fields of RayJobSpec and RayCronJobSpec in the ray.io/v1 CRDs of KubeRay v1.7.0 (ray-project/kuberay, Apache-2.0:
# ray-operator/config/crd/bases/ray.io_rayjobs.yaml and ray.io_raycronjobs.yaml). The CRDs are not vendored here; the
# raycronjobs one alone is 13k lines. The API server prunes or refuses an unknown field. For a RayCronJob this check
# catches CronJob habits it does not have (concurrencyPolicy, startingDeadlineSeconds, history limits).
RAYJOB_SPEC_FIELDS = {
    "activeDeadlineSeconds",
    "backoffLimit",
    "clusterSelector",
    "deletionStrategy",
    "entrypoint",
    "entrypointNumCpus",
    "entrypointNumGpus",
    "entrypointResources",
    "jobId",
    "managedBy",
    "metadata",
    "preRunningDeadlineSeconds",
    "rayClusterSpec",
    "runtimeEnvYAML",
    "shutdownAfterJobFinishes",
    "submissionMode",
    "submitterConfig",
    "submitterPodTemplate",
    "suspend",
    "ttlSecondsAfterFinished",
}
RAYCRONJOB_SPEC_FIELDS = {"jobTemplate", "schedule", "timeZone", "suspend"}
MAX_RAYCRONJOB_NAME = 36  # MaxRayCronJobNameLength: its RayJobs are named <name>-<minutes since the epoch>


def _documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _check_command(command: str) -> str:
    """`python -m jobs.<name> --config <file> [--set k=v ...]`: the job exists and the config loads with the sets."""
    words = shlex.split(command)
    assert words[:3] == ["python", "-m", words[2]] and words[2].startswith("jobs."), command
    job = words[2].removeprefix("jobs.")
    assert (REPO / "jobs" / f"{job}.py").is_file(), command
    assert words[3] == "--config"
    overrides = [words[i + 1] for i in range(4, len(words)) if words[i] == "--set"]
    load_config(REPO / words[4], overrides)
    return job


def _pod_specs(cluster: dict) -> list[dict]:
    groups = [cluster["headGroupSpec"], *cluster.get("workerGroupSpecs", [])]
    return [group["template"]["spec"] for group in groups]


def _check_cluster(cluster: dict) -> None:
    for spec in _pod_specs(cluster):
        assert spec["serviceAccountName"] == "dpr-pipeline"  # S3 through the role, no keys
        [container] = spec["containers"]
        assert container["image"] and container["workingDir"] == "/home/ray/dpr"
        for env in container.get("env", []):
            assert "value" not in env or not re.search(r"KEY|SECRET|TOKEN|PASSWORD", env["name"]), env
    for group in cluster.get("workerGroupSpecs", []):
        assert group["groupName"] and group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]


def _check_rayjob_spec(spec: dict, job: str) -> None:
    """A RayJob spec (a RayJob's, or a RayCronJob's jobTemplate) runs `jobs.<job>` on a cluster it shuts down."""
    assert set(spec) <= RAYJOB_SPEC_FIELDS, set(spec) - RAYJOB_SPEC_FIELDS
    assert _check_command(spec["entrypoint"]) == job.replace("-", "_")
    assert spec["shutdownAfterJobFinishes"] is True and spec["activeDeadlineSeconds"] > 0
    assert "runtimeEnvYAML" not in spec  # nothing (and no secret) rides in runtime_env env vars
    _check_cluster(spec["rayClusterSpec"])
    if job in ("encode", "nightly"):
        gpus = [
            g
            for g in spec["rayClusterSpec"]["workerGroupSpecs"]
            if g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")
        ]
        assert gpus, "encoding needs GPU workers"
    if job == "build-index":  # a worker group fits the training task, another the add tasks
        index = load_config(REPO / shlex.split(spec["entrypoint"])[4]).index
        limits = [
            g["template"]["spec"]["containers"][0]["resources"]["limits"]
            for g in spec["rayClusterSpec"]["workerGroupSpecs"]
        ]

        def fits(cpus: float, gpus: float) -> bool:
            return any(float(pod["cpu"]) >= cpus and float(pod.get("nvidia.com/gpu", 0)) >= gpus for pod in limits)

        assert fits(index.train_cpus, index.train_gpus) and fits(index.add_cpus, index.add_gpus)


@pytest.mark.parametrize("job", ["ingest", "encode", "build-index", "nightly"])
def test_rayjobs_submit_a_real_job_with_a_real_config(job):
    [doc] = _documents(KUBERAY / f"rayjob-{job}.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayJob")
    _check_rayjob_spec(doc["spec"], job)


@pytest.mark.parametrize("manifest", ["rayservice-qa.yaml", "rayservice-qa-sharded.yaml"])
def test_rayservice_serves_the_app_from_the_serve_config(manifest):
    [doc] = _documents(KUBERAY / manifest)
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayService")
    serve_config = yaml.safe_load(doc["spec"]["serveConfigV2"])
    local = yaml.safe_load((REPO / "configs" / "serve.yaml").read_text())
    [app] = serve_config["applications"]
    assert app["import_path"] == local["applications"][0]["import_path"] == "pipeline.serve.app:app"
    config = load_config(REPO / app["args"]["config"], app["args"].get("set", []))
    # the version in one place, LATEST when re-applied; no other deployment carries one
    versioned = {d["name"]: d["user_config"] for d in app["deployments"] if "user_config" in d}
    assert versioned == {"QAService": {"index_version": None}}
    assert set(retriever_names(config.serve.shards)) <= {d["name"] for d in app["deployments"]}
    import pipeline.serve.app as serve_app

    shards = set(retriever_names(config.serve.shards))
    assert all(hasattr(serve_app, d["name"]) or d["name"] in shards for d in app["deployments"])
    _check_cluster(doc["spec"]["rayClusterConfig"])
    keyed = [
        env
        for spec in _pod_specs(doc["spec"]["rayClusterConfig"])
        for env in spec["containers"][0].get("env", [])
        if env["name"] == config.serve.api_key_env
    ]
    assert keyed and all("secretKeyRef" in env["valueFrom"] for env in keyed)
    # the nightly job finds this service's dashboard and HTTP port by the names KubeRay gives them
    nightly = _documents(KUBERAY / "rayjob-nightly.yaml")[0]["spec"]["entrypoint"]
    assert f"http://{doc['metadata']['name']}-head-svc:8265" in nightly
    assert f"http://{doc['metadata']['name']}-serve-svc:8000" in nightly


@pytest.mark.parametrize("manifest", ["rayservice-qa.yaml", "rayservice-qa-sharded.yaml"])
def test_the_rayservice_autoscales_as_the_deployment_yaml_says(manifest):
    """Each deployment's autoscaling_config is `serve.autoscaling`'s for its part (the shards within their worker
    groups), and the cluster grows its pods with the replicas."""
    from pipeline.serve.app import replicas

    [doc] = _documents(KUBERAY / manifest)
    [app] = yaml.safe_load(doc["spec"]["serveConfigV2"])["applications"]
    serve = load_config(REPO / app["args"]["config"], app["args"].get("set", [])).serve
    assert doc["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] is True
    parts = {"QAService": "ingress", "QuestionEncoder": "encoder", "Retriever": "retriever", "Reader": "reader"}
    groups = {g["groupName"]: g for g in doc["spec"]["rayClusterConfig"]["workerGroupSpecs"]}
    scaled = {d["name"]: d["autoscaling_config"] for d in app["deployments"] if "autoscaling_config" in d}
    assert {"QAService", "QuestionEncoder", "Reader"} <= set(scaled)
    for name, given in scaled.items():
        assert "num_replicas" not in next(d for d in app["deployments"] if d["name"] == name)
        if name in parts:
            wanted = replicas(serve, parts[name], 1)["autoscaling_config"]
            assert given == {key: wanted[key] for key in given}, name
        else:  # a shard: Retriever<i>, on its own worker group
            assert given["max_replicas"] <= groups[f"shard{name.removeprefix('Retriever')}"]["maxReplicas"], name


def test_each_shard_has_a_worker_group_whose_resource_only_its_replicas_ask_for():
    [doc] = _documents(KUBERAY / "rayservice-qa-sharded.yaml")
    [app] = yaml.safe_load(doc["spec"]["serveConfigV2"])["applications"]
    serve = load_config(REPO / app["args"]["config"], app["args"]["set"]).serve
    groups = doc["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    # KubeRay passes rayStartParams.resources to `ray start --resources` as a quoted JSON string
    started = {g["groupName"]: json.loads(json.loads(g["rayStartParams"]["resources"])) for g in groups[1:]}
    assert serve.shards == len(serve.shard_resources) == len(started) == 4
    for shard, resources in enumerate(serve.shard_resources):
        [(name, amount)] = resources.items()
        assert name == f"shard{shard}"  # Retriever<i> asks for its own group's resource
        group = next(g for g in groups if g["groupName"] == name)
        assert started[name] == {name: amount}  # each pod holds one replica's worth
        assert group["minReplicas"] >= serve.retriever_replicas  # a lost pod costs no request
        assert not any(name in other for other_name, other in started.items() if other_name != name)


def test_cronjob_submits_the_nightly_rayjob_from_the_kustomized_configmap():
    [cron] = _documents(KUBERAY / "nightly-cronjob.yaml")
    assert (cron["apiVersion"], cron["kind"]) == ("batch/v1", "CronJob")
    assert len(cron["spec"]["schedule"].split()) == 5 and cron["spec"]["concurrencyPolicy"] == "Forbid"
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["command"][:3] == ["kubectl", "create", "-f"]
    manifest = Path(container["command"][3])
    configmap = next(v["configMap"]["name"] for v in pod["volumes"] if v["name"] == "manifests")
    kustomization = yaml.safe_load((KUBERAY / "kustomization.yaml").read_text())
    generated = next(g for g in kustomization["configMapGenerator"] if g["name"] == configmap)
    assert manifest.name in generated["files"] and (KUBERAY / manifest.name).is_file()
    assert all((KUBERAY / r).is_file() for r in kustomization["resources"])
    identities = _documents(KUBERAY / "service-account.yaml")
    assert pod["serviceAccountName"] in {d["metadata"]["name"] for d in identities if d["kind"] == "ServiceAccount"}
    role = next(d for d in identities if d["kind"] == "Role")
    assert role["rules"] == [{"apiGroups": ["ray.io"], "resources": ["rayjobs"], "verbs": ["create", "get", "list"]}]


def test_raycronjob_runs_the_nightly_rayjob_on_the_cronjobs_schedule():
    [doc] = _documents(KUBERAY / "raycronjob-nightly.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayCronJob")
    assert 0 < len(doc["metadata"]["name"]) <= MAX_RAYCRONJOB_NAME
    spec = doc["spec"]
    assert {"jobTemplate", "schedule"} <= set(spec) <= RAYCRONJOB_SPEC_FIELDS, set(spec) - RAYCRONJOB_SPEC_FIELDS
    _check_rayjob_spec(spec["jobTemplate"], "nightly")
    [nightly] = _documents(KUBERAY / "rayjob-nightly.yaml")
    assert spec["jobTemplate"] == nightly["spec"]  # one night, whichever scheduler creates it
    [cron] = _documents(KUBERAY / "nightly-cronjob.yaml")
    assert (spec["schedule"], spec.get("timeZone")) == (cron["spec"]["schedule"], cron["spec"]["timeZone"])
    assert "TZ" not in spec["schedule"]  # the controller refuses a TZ= prefix: the zone goes in timeZone
    assert spec.get("suspend") is not True
    # No concurrencyPolicy: once a day, an attempt ends (activeDeadlineSeconds) long before the next tick.
    minute, hour, *every = spec["schedule"].split()
    assert minute.isdigit() and hour.isdigit() and every == ["*", "*", "*"]
    assert 0 < spec["jobTemplate"]["activeDeadlineSeconds"] < 24 * 3600
    # It needs a feature gate and would double the CronJob's nights: it is not applied with -k
    kustomization = yaml.safe_load((KUBERAY / "kustomization.yaml").read_text())
    assert "raycronjob-nightly.yaml" not in kustomization["resources"]
    assert "nightly-cronjob.yaml" in kustomization["resources"]


def test_cluster_launcher_config_has_gpu_workers_and_a_role_not_keys():
    config = yaml.safe_load((REPO / "infra" / "ray-cluster-aws.yaml").read_text())
    assert config["provider"]["type"] == "aws" and config["head_node_type"] in config["available_node_types"]
    nodes = config["available_node_types"]
    assert any(node["resources"].get("GPU", 0) >= 1 for node in nodes.values())
    assert all("IamInstanceProfile" in node["node_config"] for node in nodes.values())
    assert sum(node["max_workers"] for node in nodes.values()) <= config["max_workers"]


def test_no_manifest_or_config_holds_a_credential():
    texts = {
        p: p.read_text() for p in [*(REPO / "infra").rglob("*"), *(REPO / "configs").glob("*.yaml")] if p.is_file()
    }
    for path, text in texts.items():
        assert not re.search(r"aws_secret_access_key|aws_access_key_id", text, re.IGNORECASE), path
        assert not re.search(r"\bAKIA[0-9A-Z]{12,}", text), path
        assert not any(value in text for value in FAKE_CREDENTIALS.values() if len(value) > 12), path
