"""Kubernetes manifests from placement plans, validated strictly offline (tests/k8s_schema.py):
the official CRDs for RayService, MPIJob, LeaderWorkerSet and PodMonitor, the core schemas for the rest
(Services, ConfigMap, RBAC, the DeepSpeed front's Deployment)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest

from nodewise.core.settings import DeepSpeedSettings, KubernetesSettings, Settings
from serving.spec import DeepSpeedSpec
from tasks.k8s.render import FRONT_PROBE, REPLICA_METRICS_PORT, render
from tasks.planning.inventory import Device, Inventory, Node
from tasks.planning.placement import plan_placement
from tasks.planning.profiling import MemoryProfile
from tasks.rayserve.apps import build_spec
from tests.k8s_schema import validate
from tests.unit.factories import resolved_model

GIB = 2**30
ROOT = Path(__file__).resolve().parents[2]
K8S = KubernetesSettings(namespace="serving", image="registry.example/nodewise:0.1")
WITH_SECRET = K8S.model_copy(update={"credentials_secret": "nodewise-mlflow"})


def gpu_nodes(count: int, gpus: int, gib: int) -> Inventory:
    devices = [Device(kind="gpu", name="NVIDIA H100 80GB HBM3", memory_bytes=gib * GIB) for _ in range(gpus)]
    return Inventory(
        source="test",
        nodes=[Node(name=f"g{i}", cpus=32, host_memory_bytes=512 * GIB, gpus=devices) for i in range(count)],
    )


def serve_manifests(
    weights_gib: float,
    inventory: Inventory,
    replicas: int = 2,
    max_replicas: int | None = None,
    min_replicas: int | None = None,
) -> tuple[list[dict], object, object]:
    plan = plan_placement(
        MemoryProfile(method="analytic", weight_bytes=int(weights_gib * GIB), attention_heads=32),
        inventory,
        desired_replicas=replicas,
    )
    assert plan.backend == "ray_serve"
    serve = {"replicas": replicas} if max_replicas is None else {"max_replicas": max_replicas}
    settings = Settings(serve=serve if min_replicas is None else {**serve, "min_replicas": min_replicas})
    spec = build_spec(resolved_model(flavor="pytorch", flavors=["pytorch"]), plan, settings)
    return render(spec, plan, K8S), spec, plan


def multi_node(
    multi: str = "mpijob",
    gpus: int = 2,
    k8s: KubernetesSettings = K8S,
    deepspeed: DeepSpeedSettings | None = None,
    app_name: str = "llama-70b",
) -> tuple[list[dict], object]:
    plan = plan_placement(
        MemoryProfile(method="analytic", weight_bytes=200 * GIB, attention_heads=32), gpu_nodes(4, gpus, 80)
    )
    assert plan.backend == "deepspeed_mpi"
    spec = DeepSpeedSpec(
        app_name=app_name,
        model_uri="models:/llama-70b/3",
        model_name="llama-70b",
        model_version="3",
        tracking_uri="http://mlflow.mlops:5000",
        registry_uri="http://mlflow.mlops:5000",
        flavor="transformers",
        tp_size=plan.ranks,
        device="cuda",
        dtype="float16",
    )
    return render(spec, plan, k8s, multi_node=multi, deepspeed=deepspeed), plan


def by_kind(objects: list[dict]) -> dict[str, dict]:
    return {o["kind"]: o for o in objects}


def named(objects: list[dict], name: str) -> dict:
    [found] = [o for o in objects if o["metadata"]["name"] == name and o["kind"] in ("Service", "PodMonitor")]
    return found


NO_FRONT = DeepSpeedSettings(front=False)


CASES = {
    "rayservice-cpu": lambda: serve_manifests(
        0.05, Inventory(source="t", nodes=[Node(name="n", cpus=8, host_memory_bytes=32 * GIB)])
    )[0],
    "rayservice-gpu-shared": lambda: serve_manifests(5, gpu_nodes(2, 4, 80), replicas=4)[0],
    "rayservice-gpu-tp": lambda: serve_manifests(100, gpu_nodes(1, 8, 80), replicas=1)[0],
    "rayservice-autoscaling": lambda: serve_manifests(60, gpu_nodes(4, 1, 80), replicas=1, max_replicas=4)[0],
    "rayservice-scale-to-zero": lambda: serve_manifests(60, gpu_nodes(4, 1, 80), 1, max_replicas=4, min_replicas=0)[0],
    "mpijob": lambda: multi_node("mpijob")[0],
    "mpijob-credentials-secret": lambda: multi_node("mpijob", k8s=WITH_SECRET)[0],
    "leaderworkerset-credentials-secret": lambda: multi_node("lws", k8s=WITH_SECRET)[0],
    "leaderworkerset": lambda: multi_node("lws")[0],
    "leaderworkerset-one-gpu-per-pod": lambda: multi_node("lws", gpus=1)[0],
    "mpijob-no-front": lambda: multi_node("mpijob", deepspeed=NO_FRONT)[0],
    "leaderworkerset-no-front": lambda: multi_node("lws", deepspeed=NO_FRONT)[0],
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_rendered_manifest_validates_strictly(case: str) -> None:
    objects = CASES[case]()
    kinds = [o["kind"] for o in objects]
    assert kinds[:3] == ["ServiceAccount", "Role", "RoleBinding"]
    assert kinds[-1] == "PodMonitor"
    assert len([o for o in objects if o["metadata"]["name"].endswith("-endpoint")]) == 1  # the one users call
    for manifest in objects:
        validate(manifest)
        assert manifest["metadata"]["namespace"] == "serving"


def test_strict_validation_rejects_unknown_fields_and_unquoted_quantities() -> None:
    objects = by_kind(multi_node()[0])
    job = json.loads(json.dumps(objects["MPIJob"]))
    job["spec"]["slotsPerWorkr"] = 2  # a typo the API server's strict validation refuses
    with pytest.raises(jsonschema.ValidationError, match="slotsPerWorkr"):
        validate(job)
    service = json.loads(json.dumps(objects["Service"]))
    service["spec"]["ports"][0]["prot"] = 1
    with pytest.raises(Exception, match="prot"):
        validate(service)


def test_rayservice_serves_the_local_spec_from_workers_with_gpu_quantities_as_strings() -> None:
    objects, spec, _ = serve_manifests(5, gpu_nodes(2, 4, 80), replicas=4)
    service = by_kind(objects)["RayService"]
    config = json.loads(service["spec"]["serveConfigV2"])
    [app] = config["applications"]
    assert (app["name"], app["route_prefix"], app["import_path"]) == (
        spec.app_name,
        spec.route_prefix,
        "serving.app:from_config",
    )
    # the same spec as a local deploy, but the replica's metrics port, which the pod declares
    assert app["args"]["spec"] == {**spec.model_dump(mode="json"), "metrics_port": REPLICA_METRICS_PORT}
    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # no replica on the head
    [group] = cluster["workerGroupSpecs"]
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "1"  # a string quantity
    # Each replica takes a share of one GPU: a worker pod holds 1/num_gpus replicas.
    per_pod = round(1 / spec.num_gpus)
    assert group["replicas"] == group["minReplicas"] == -(-spec.min_replicas // per_pod)


def test_an_autoscaled_model_turns_on_kuberays_autoscaler_with_the_plans_bounds() -> None:
    objects, spec, _ = serve_manifests(60, gpu_nodes(4, 1, 80), replicas=1, max_replicas=8)
    cluster = by_kind(objects)["RayService"]["spec"]["rayClusterConfig"]
    assert (spec.min_replicas, spec.max_replicas) == (1, 4)  # capped at what the inventory holds
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["autoscalerOptions"]["idleTimeoutSeconds"] == 60
    [group] = cluster["workerGroupSpecs"]
    assert (group["replicas"], group["minReplicas"], group["maxReplicas"]) == (1, 1, 4)  # one GPU replica a pod
    [app] = json.loads(by_kind(objects)["RayService"]["spec"]["serveConfigV2"])["applications"]
    assert (app["args"]["spec"]["min_replicas"], app["args"]["spec"]["max_replicas"]) == (1, 4)
    fixed, _, _ = serve_manifests(60, gpu_nodes(4, 1, 80), replicas=2)  # a fixed count
    assert "enableInTreeAutoscaling" not in by_kind(fixed)["RayService"]["spec"]["rayClusterConfig"]


def test_a_model_that_scales_to_zero_starts_one_worker_pod_and_may_release_it() -> None:
    objects, spec, _ = serve_manifests(60, gpu_nodes(4, 1, 80), replicas=1, max_replicas=4, min_replicas=0)
    assert (spec.min_replicas, spec.max_replicas) == (0, 4)
    cluster = by_kind(objects)["RayService"]["spec"]["rayClusterConfig"]
    [group] = cluster["workerGroupSpecs"]
    assert (group["replicas"], group["minReplicas"], group["maxReplicas"]) == (1, 0, 4)
    assert cluster["enableInTreeAutoscaling"] is True
    # every replica samples its load every 1.2 s and sends it every 1 s, as the local instance's do
    [env] = [c["env"] for c in group["template"]["spec"]["containers"]]
    assert {"name": "RAY_SERVE_AUTOSCALING_METRIC_RECORD_INTERVAL_FACTOR", "value": "0.1"} in env
    [app] = json.loads(by_kind(objects)["RayService"]["spec"]["serveConfigV2"])["applications"]
    assert app["args"]["spec"]["metrics_push_interval_s"] == 1.0


def test_tensor_parallel_replica_gets_a_pod_with_all_its_gpus() -> None:
    objects, spec, _ = serve_manifests(100, gpu_nodes(1, 8, 80), replicas=1)
    assert spec.tp_size > 1
    [group] = by_kind(objects)["RayService"]["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == str(spec.tp_size)


def test_the_serve_config_builds_the_same_app() -> None:
    from serving.app import from_config

    objects, _spec, _ = serve_manifests(
        0.05, Inventory(source="t", nodes=[Node(name="n", cpus=8, host_memory_bytes=32 * GIB)])
    )
    [app] = json.loads(by_kind(objects)["RayService"]["spec"]["serveConfigV2"])["applications"]
    built = from_config(app["args"])
    assert type(built).__name__ == "Application"


def test_mpijob_runs_every_rank_with_no_hand_set_environment() -> None:
    objects, plan = multi_node("mpijob")
    kinds = by_kind(objects)
    job = kinds["MPIJob"]["spec"]
    assert job["slotsPerWorker"] == plan.devices_per_node
    assert job["mpiReplicaSpecs"]["Worker"]["replicas"] == plan.nodes
    command = job["mpiReplicaSpecs"]["Launcher"]["template"]["spec"]["containers"][0]["command"]
    # rank 0's host comes from the operator's hostfile, read in the launcher (the only pod that has it)
    assert command[:4] == ["python", "-m", "serving.mpijob_launcher", "mpirun"]
    assert command[command.index("-np") + 1] == str(plan.ranks)
    assert command[command.index("MASTER_ADDR") - 1] == "-x"  # passed on by name, never a value
    assert command[-3:] == ["-m", "serving.deepspeed_worker", "/etc/nodewise/spec.json"]
    assert "LD_LIBRARY_PATH" in command  # a CUDA plan: the driver's libraries reach the ranks
    text = json.dumps(kinds["MPIJob"])
    for variable in ("RANK", "LOCAL_RANK", "LOCAL_SIZE", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        assert f'"name": "{variable}"' not in text  # no pod sets them: each rank derives them (serving/dist_env.py)
        assert f"{variable}=" not in text
    worker = job["mpiReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == str(plan.devices_per_node)
    spec = json.loads(kinds["ConfigMap"]["data"]["spec.json"])
    assert (spec["host"], spec["tp_size"]) == ("0.0.0.0", plan.ranks)
    assert named(objects, "llama-70b-rank0")["spec"]["selector"]["training.kubeflow.org/replica-index"] == "0"


def test_leaderworkerset_recreates_the_whole_group_and_starts_ranks_per_device() -> None:
    objects, plan = multi_node("lws", gpus=2)
    template = by_kind(objects)["LeaderWorkerSet"]["spec"]["leaderWorkerTemplate"]
    assert (template["size"], template["restartPolicy"]) == (plan.nodes, "RecreateGroupOnPodRestart")
    command = template["workerTemplate"]["spec"]["containers"][0]["command"]
    assert command[:2] == ["sh", "-c"]
    assert f"--nproc-per-node={plan.devices_per_node}" in command[2]
    one, _ = multi_node("lws", gpus=1)
    single = by_kind(one)["LeaderWorkerSet"]["spec"]["leaderWorkerTemplate"]["leaderTemplate"]
    assert single["spec"]["containers"][0]["command"] == [
        "python",
        "-m",
        "serving.deepspeed_worker",
        "/etc/nodewise/spec.json",
    ]


def test_the_watchdog_role_is_least_privilege() -> None:
    role = by_kind(multi_node()[0])["Role"]
    for rule in role["rules"]:
        assert "*" not in rule["verbs"]
        assert "*" not in rule["resources"]
        assert not {"create", "update"} & set(rule["verbs"])
        assert "secrets" not in rule["resources"]
    pods = next(r for r in role["rules"] if r["resources"] == ["pods"])
    assert "delete" in pods["verbs"]  # a sick replica or a whole rank group is restarted by deleting pods


@pytest.mark.parametrize(
    ("uri", "local"),
    [
        ("sqlite:////home/me/.nodewise/mlflow.db", True),
        ("/home/me/mlruns", True),
        ("file:///home/me/mlruns/1/abc/artifacts", True),
        ("http://127.0.0.1:5000", True),
        ("http://localhost:5000", True),
        ("postgresql://me:secret@localhost/mlflow", True),
        ("http://mlflow.serving.svc:5000", False),
        ("https://mlflow.example.com", False),
        ("postgresql+psycopg2://me:secret@db.internal/mlflow", False),
        ("mlflow-artifacts:/1/abc/artifacts", False),
        ("s3://bucket/models/1", False),
        ("gs://bucket/models/1", False),
    ],
)
def test_what_only_this_machine_can_read_is_told_apart(uri: str, local: bool) -> None:
    from tasks.k8s.deploy import local_location

    assert local_location(uri) is local


def test_a_local_tracking_uri_is_refused_naming_the_fix_without_its_password() -> None:
    from nodewise.core.errors import InvalidInput
    from tasks.k8s.deploy import refuse_local_artifacts, refuse_local_tracking

    local = Settings(mlflow={"tracking_uri": "postgresql://me:hunter2@127.0.0.1/mlflow"})
    with pytest.raises(InvalidInput) as refused:
        refuse_local_tracking(local)
    message = str(refused.value)
    assert "hunter2" not in message
    assert "NODEWISE_MLFLOW__TRACKING_URI" in message
    assert "--allow-local" in message
    refuse_local_tracking(Settings(mlflow={"tracking_uri": "http://mlflow.serving.svc:5000"}))
    with pytest.raises(InvalidInput, match="mlflow-artifacts"):
        refuse_local_artifacts("file:///home/me/mlruns/1/abc/artifacts", "models:/fraud/3")
    refuse_local_artifacts("mlflow-artifacts:/1/abc/artifacts", "models:/fraud/3")


def containers(objects: list[dict]) -> list[dict]:
    """Every container of every pod template in ``objects``, however deep the template sits."""
    found: list[dict] = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("containers"), list):
                found.extend(node["containers"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(objects)
    return found


def test_credentials_reach_every_pod_by_reference_to_a_secret_never_by_value() -> None:
    for objects in (multi_node("mpijob", k8s=WITH_SECRET)[0], multi_node("lws", k8s=WITH_SECRET)[0]):
        pods = [c for c in containers(objects) if c["name"] != "front"]
        assert pods
        assert all(c["envFrom"] == [{"secretRef": {"name": "nodewise-mlflow"}}] for c in pods)
        [front] = [c for c in containers(objects) if c["name"] == "front"]
        assert "envFrom" not in front  # the front reads no registry: it never gets the credentials
    [launcher] = [c for c in containers(multi_node("mpijob", k8s=WITH_SECRET)[0]) if c["name"] == "launcher"]
    command = launcher["command"]
    assert command[command.index("MLFLOW_TRACKING_URI") - 1] == "-x"  # mpirun hands it to the ranks
    assert all("envFrom" not in c for c in containers(multi_node("mpijob")[0]))  # none asked for


def test_a_password_is_refused_unless_a_secret_carries_it() -> None:
    from nodewise.core.errors import InvalidInput
    from tasks.k8s.deploy import require_secret_reference

    tracking = {"tracking_uri": "postgresql://me:hunter2@db.internal/mlflow"}
    with pytest.raises(InvalidInput) as refused:
        require_secret_reference(Settings(mlflow=tracking))
    assert "hunter2" not in str(refused.value)
    assert "NODEWISE_KUBERNETES__CREDENTIALS_SECRET" in str(refused.value)
    require_secret_reference(Settings(mlflow=tracking, kubernetes={"credentials_secret": "nodewise-mlflow"}))
    require_secret_reference(Settings(mlflow={"tracking_uri": "http://mlflow.mlops:5000"}))


def test_mlflows_credential_variables_need_the_secret_too(monkeypatch: pytest.MonkeyPatch) -> None:
    from nodewise.core.errors import InvalidInput
    from tasks.k8s.deploy import require_secret_reference

    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "tok-123")
    with pytest.raises(InvalidInput, match="MLFLOW_TRACKING_TOKEN is set") as refused:
        require_secret_reference(Settings(mlflow={"tracking_uri": "http://mlflow.mlops:5000"}))
    assert "tok-123" not in str(refused.value)


def test_mpijob_workers_run_the_images_sshd_where_the_operator_mounts_its_key() -> None:
    job = by_kind(multi_node("mpijob")[0])["MPIJob"]["spec"]
    assert job["sshAuthMountPath"] == "/home/nodewise/.ssh"  # the image's user (deployments/image)
    [worker] = job["mpiReplicaSpecs"]["Worker"]["template"]["spec"]["containers"]
    assert worker["args"] == ["sshd"]  # deployments/image/entrypoint.sh
    assert "command" not in worker  # the image's entry point stays
    entry = (ROOT / "deployments" / "image" / "entrypoint.sh").read_text()
    assert 'if [ "$1" = "sshd" ]' in entry
    assert '"$HOME/.ssh/id_rsa"' in entry


def test_no_credential_reaches_a_rendered_file(tmp_path: Path) -> None:
    from tasks.k8s.deploy import write_manifests
    from tasks.mpi.deploy import build_deepspeed_spec

    settings = Settings(
        mlflow={"tracking_uri": "https://me:hunter2@mlflow.mlops:5000"},
        kubernetes={"credentials_secret": "nodewise-mlflow"},
    )
    model = resolved_model(flavor="transformers", flavors=["transformers"])
    serve_plan = plan_placement(
        MemoryProfile(method="analytic", weight_bytes=GIB, attention_heads=32), gpu_nodes(1, 1, 80)
    )
    serve = build_spec(model, serve_plan, settings)
    big = plan_placement(
        MemoryProfile(method="analytic", weight_bytes=200 * GIB, attention_heads=32), gpu_nodes(4, 2, 80)
    )
    ranks = build_deepspeed_spec(model, big, settings)
    objects = render(serve, serve_plan, settings.kubernetes)
    objects += render(ranks, big, settings.kubernetes, multi_node="mpijob")
    objects += render(ranks, big, settings.kubernetes, multi_node="lws")
    written = write_manifests(objects, tmp_path)
    assert written
    for path in written:
        text = Path(path).read_text()
        assert "hunter2" not in text, path
        if "containers:" in text and "-deployment-" not in path.name:  # every workload but the front names the Secret
            assert "secretRef:\n" in text, path
            assert "name: nodewise-mlflow" in text, path
    for spec in (serve, ranks):
        assert spec.tracking_uri == "https://me:***@mlflow.mlops:5000"  # the pods read the real one from the Secret


def pod_templates(workload: dict) -> dict[str, dict]:
    """A workload's pod templates by role."""
    spec = workload["spec"]
    if workload["kind"] == "RayService":
        cluster = spec["rayClusterConfig"]
        return {"head": cluster["headGroupSpec"]["template"], "worker": cluster["workerGroupSpecs"][0]["template"]}
    if workload["kind"] == "MPIJob":
        return {role.lower(): s["template"] for role, s in spec["mpiReplicaSpecs"].items()}
    template = spec["leaderWorkerTemplate"]
    return {"leader": template["leaderTemplate"], "worker": template["workerTemplate"]}


def scraped(monitor: dict, template: dict) -> list[dict]:
    """The container ports of ``template`` that ``monitor``'s endpoints name, where its selector
    picks the pod (its labels as the operators add them are taken for granted: see the callers)."""
    names = {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]}
    return [p for c in template["spec"]["containers"] for p in c.get("ports", []) if p["name"] in names]


def test_a_pod_monitor_scrapes_each_ray_serve_worker_pod_on_its_metrics_port() -> None:
    objects, spec, _ = serve_manifests(5, gpu_nodes(2, 4, 80), replicas=4)
    kinds = by_kind(objects)
    monitor, templates = kinds["PodMonitor"], pod_templates(kinds["RayService"])
    validate(monitor)
    name = kinds["RayService"]["metadata"]["name"]
    assert monitor["spec"]["selector"]["matchLabels"] == {"nodewise.dev/app": name, "ray.io/node-type": "worker"}
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["serving"]}
    assert scraped(monitor, templates["worker"]) == [{"containerPort": 9500, "name": "nw-metrics"}]
    assert scraped(monitor, templates["head"]) == []  # the head runs no replica
    [endpoint] = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["path"] == "/metrics"
    labels = {r["targetLabel"]: r["replacement"] for r in endpoint["relabelings"]}
    assert labels == {"job": "nodewise-serving", "app": spec.app_name, "backend": "ray_serve"}  # as local discovery
    assert templates["worker"]["metadata"]["annotations"] == {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": "9500",
        "prometheus.io/path": "/metrics",
    }


@pytest.mark.parametrize("multi", ["mpijob", "lws"])
def test_a_pod_monitor_scrapes_rank_0_on_its_serving_port_and_no_other_rank(multi: str) -> None:
    objects, _ = multi_node(multi)
    kinds = by_kind(objects)
    monitor, service = named(objects, "llama-70b-metrics"), named(objects, "llama-70b-rank0")
    workload = kinds["MPIJob" if multi == "mpijob" else "LeaderWorkerSet"]
    port = service["spec"]["ports"][0]["port"]
    # the same pod as the endpoint's Service: rank 0's (worker 0 of an MPIJob, an LWS group's leader)
    assert monitor["spec"]["selector"]["matchLabels"] == service["spec"]["selector"]
    [endpoint] = monitor["spec"]["podMetricsEndpoints"]
    assert (endpoint["port"], endpoint["path"]) == ("http", "/metrics")
    labels = {r["targetLabel"]: r["replacement"] for r in endpoint["relabelings"]}
    assert labels == {"job": "nodewise-serving", "app": "llama-70b", "backend": "deepspeed_mpi"}
    templates = pod_templates(workload)
    rank0 = templates["worker" if multi == "mpijob" else "leader"]
    assert scraped(monitor, rank0) == [{"containerPort": port, "name": "http"}]
    annotated = {role for role, t in templates.items() if "annotations" in t["metadata"]}
    # an MPIJob's worker template is every rank's: annotating it would make each rank a target; the
    # LWS leader is not annotated behind a front (which repeats its metrics: see the front's test)
    assert annotated == set()
    without = pod_templates(by_kind(multi_node(multi, deepspeed=NO_FRONT)[0])[workload["kind"]])
    annotated = {role for role, t in without.items() if "annotations" in t["metadata"]}
    assert annotated == (set() if multi == "mpijob" else {"leader"})
    if multi == "lws":
        assert without["leader"]["metadata"]["annotations"]["prometheus.io/port"] == str(port)


def test_the_pod_monitor_schema_is_strict() -> None:
    monitor = json.loads(json.dumps(by_kind(multi_node()[0])["PodMonitor"]))
    validate(monitor)
    monitor["spec"]["podMetricsEndpoints"][0]["paht"] = "/metrics"
    with pytest.raises(jsonschema.ValidationError, match="paht"):
        validate(monitor)


# -- the DeepSpeed front ---------------------------------------------------------------------------
def front_deployment(objects: list[dict]) -> dict:
    [deployment] = [o for o in objects if o["kind"] == "Deployment"]
    return deployment


@pytest.mark.parametrize("multi", ["mpijob", "lws"])
def test_a_deepspeed_group_gets_its_front_as_a_deployment_behind_the_users_service(multi: str) -> None:
    ds = DeepSpeedSettings(port=8200, hold_timeout_s=45, max_held=64)
    objects, _ = multi_node(multi, k8s=WITH_SECRET, deepspeed=ds)
    deployment = front_deployment(objects)
    for manifest in objects:
        validate(manifest)  # the Deployment and both Services against the core schemas, strictly
    assert deployment["metadata"]["name"] == "llama-70b-front"
    template = deployment["spec"]["template"]
    assert deployment["spec"]["selector"]["matchLabels"] == template["metadata"]["labels"]
    # the name users call selects the front's pod, on the front's port
    users, rank0 = named(objects, "llama-70b-endpoint"), named(objects, "llama-70b-rank0")
    assert users["spec"]["selector"] == template["metadata"]["labels"]
    [container] = template["spec"]["containers"]
    assert users["spec"]["ports"] == [{"name": "http", "port": 8200, "targetPort": 8200, "protocol": "TCP"}]
    assert container["ports"] == [{"containerPort": 8200, "name": "http"}]
    # rank 0 has a Service of its own, the one the front's --upstream names by its cluster DNS name
    assert rank0["spec"]["selector"] == named(objects, "llama-70b-metrics")["spec"]["selector"]["matchLabels"]
    command = container["command"]
    assert command[:3] == ["python", "-m", "serving.front"]
    rank0_port = rank0["spec"]["ports"][0]["port"]
    arg = lambda flag: command[command.index(flag) + 1]  # noqa: E731
    assert arg("--upstream") == f"http://llama-70b-rank0.serving.svc:{rank0_port}"
    assert (arg("--host"), arg("--port"), arg("--app")) == ("0.0.0.0", "8200", "llama-70b")
    assert (arg("--hold-timeout-s"), arg("--max-held")) == ("45.0", "64")
    # probed on /front, which stays 200 while the group restarts (see the test below)
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": FRONT_PROBE, "port": 8200}
    assert "envFrom" not in container
    assert template["spec"]["automountServiceAccountToken"] is False
    # the front's pods are none of the group's: the workload's pod templates lack the front's role
    workload = by_kind(objects)["MPIJob" if multi == "mpijob" else "LeaderWorkerSet"]
    for rank_template in pod_templates(workload).values():
        labels = rank_template["metadata"]["labels"]
        assert not set(deployment["spec"]["selector"]["matchLabels"].items()) <= set(labels.items())


def test_the_front_is_scraped_for_its_own_series_and_annotated_as_the_groups_one_target() -> None:
    from serving.metrics import SCHEMA

    objects, _ = multi_node("lws")
    deployment = front_deployment(objects)
    template = deployment["spec"]["template"]
    monitor = named(objects, "llama-70b-front-metrics")
    validate(monitor)
    assert monitor["spec"]["selector"]["matchLabels"] == template["metadata"]["labels"]
    assert scraped(monitor, template) == [{"containerPort": 8100, "name": "http"}]
    [endpoint] = monitor["spec"]["podMetricsEndpoints"]
    labels = {r["targetLabel"]: r["replacement"] for r in endpoint["relabelings"]}
    assert labels == {"job": "nodewise-serving", "app": "llama-70b", "backend": "deepspeed_mpi"}
    # its /metrics repeats rank 0's (scraped from rank 0 already): the monitor keeps the front's only
    [keep] = endpoint["metricRelabelings"]
    assert (keep["action"], keep["sourceLabels"]) == ("keep", ["__name__"])
    pattern = re.compile(keep["regex"])
    for metric in SCHEMA:  # Prometheus anchors the regex: a full match
        assert bool(pattern.fullmatch(metric.name)) is (metric.scope == "front"), metric.name
    assert template["metadata"]["annotations"]["prometheus.io/port"] == "8100"


def test_the_fronts_probe_stays_200_while_the_group_is_down() -> None:
    """Kubernetes must not take the front out of its Service while the group restarts: its probe
    path answers 200 with rank 0 down, where /ping says 503."""
    import httpx

    from nodewise.core.procs import free_port_block
    from serving.front import Front, FrontConfig, build_app
    from serving.http_server import HttpServer

    down = free_port_block(1)  # nothing listens there: the group is down
    front = Front(FrontConfig(f"http://127.0.0.1:{down}", app="t", poll_s=0.05, hold_timeout_s=0.5))
    server = HttpServer(build_app(front), "127.0.0.1", 0, lifespan=True)
    server.start_in_thread()
    try:
        url = f"http://127.0.0.1:{server.port}"
        assert httpx.get(f"{url}/ping", timeout=10).status_code == 503
        probe = httpx.get(f"{url}{FRONT_PROBE}", timeout=10)
        assert (probe.status_code, probe.json()["ready"]) == (200, False)
    finally:
        server.shutdown()


@pytest.mark.parametrize("multi", ["mpijob", "lws"])
def test_with_the_front_off_the_users_service_selects_rank_0_as_before(multi: str) -> None:
    objects, _ = multi_node(multi, deepspeed=NO_FRONT)
    workload = "MPIJob" if multi == "mpijob" else "LeaderWorkerSet"
    base = ["ServiceAccount", "Role", "RoleBinding", "ConfigMap", workload, "Service", "PodMonitor"]
    assert [o["kind"] for o in objects] == base
    assert [o["metadata"]["name"] for o in objects[-2:]] == ["llama-70b-endpoint", "llama-70b-metrics"]
    assert objects[-2]["spec"]["selector"] == objects[-1]["spec"]["selector"]["matchLabels"]  # rank 0's pod


def test_every_name_stays_within_dns_limits_for_the_longest_app_name() -> None:
    for multi in ("mpijob", "lws"):
        objects, _ = multi_node(multi, app_name="a-very-long-model-name-" * 4)
        for manifest in objects:
            validate(manifest)
            assert len(manifest["metadata"]["name"]) <= 63, manifest["metadata"]["name"]
        upstream = front_deployment(objects)["spec"]["template"]["spec"]["containers"][0]["command"][4]
        assert len(upstream.split("//")[1].split(".")[0]) <= 63  # a DNS label: the rank-0 Service's name
