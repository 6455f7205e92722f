"""Kubernetes manifests from a placement plan: what a cluster needs to serve one model.

- a one-node plan: a KubeRay ``RayService`` (ray.io/v1) whose ``serveConfigV2`` builds the same
  Serve app as a local deploy (``serving.app:from_config`` with the same spec);
- a multi-node plan: a Kubeflow ``MPIJob`` (kubeflow.org/v2beta1), or a ``LeaderWorkerSet``
  (leaderworkerset.x-k8s.io/v1), whose ranks run ``python -m serving.deepspeed_worker`` and derive
  their distributed environment themselves (serving/dist_env.py): nothing is set by hand;
- a Service for the endpoint (``NAME-endpoint``, the name users call), and a ServiceAccount, Role and
  RoleBinding with what the watchdog needs and no more;
- for a multi-node plan with ``deepspeed.front`` on (the default), the group's front
  (serving/front.py) as a workload of its own: a Deployment ``NAME-front`` whose pod runs
  ``python -m serving.front`` on ``deepspeed.port``, proxying to rank 0 through a Service of rank
  0's own (``NAME-rank0``, whose cluster DNS name stays when the group is recreated);
  ``NAME-endpoint`` selects the front's pod, so a restarting group keeps its address and the front
  holds and repeats requests meanwhile. Its probes read ``GET /front``, which answers 200 while the
  group is down (``/ping`` would not, and the front would leave the Service just when it holds).
  With the front off, ``NAME-endpoint`` selects rank 0's pod, as before;
- a Prometheus Operator ``PodMonitor`` (monitoring.coreos.com/v1) for the pods that answer
  ``/metrics`` (serving/metrics.py), and ``prometheus.io/*`` annotations on their pod templates for
  Prometheus set-ups without the operator. Their targets get the labels a local instance's file-based
  discovery gives (``job="nodewise-serving"``, ``app``, ``backend``): the alert rules and the dashboard
  (deployments/prometheus, deployments/grafana) read both the same way.

Where metrics are read: DeepSpeed's rank 0 answers ``/metrics`` on its serving port (the MPIJob's
worker 0, the LeaderWorkerSet's leader; no other rank serves HTTP, so the MPIJob's worker template,
shared by every rank, carries no annotation). The front's ``/metrics`` is its own counters followed by
rank 0's: its PodMonitor keeps only the ``nodewise_front_*`` series (rank 0's own PodMonitor reads
the rest), and for discovery by annotation the front's pod is the one annotated (the LWS leader is
not, or rank 0's series would be counted twice). A Ray Serve replica answers on a port of its own (Serve's
``/<route>/metrics`` reaches one replica at random: no scrape target): a worker pod declares one,
``REPLICA_METRICS_PORT``, which its replica binds. Where a pod holds several replicas (they share
a GPU), only one of them can bind it: that one must serve the whole pod's metrics (prometheus_client's
multiprocess mode over a folder the pod's replicas share); one port per replica would leave ports
unbound in a pod that holds fewer replicas than it could, and each would read as a target down.

Manifests are plain dicts (quantities are strings); ``render`` returns them in apply order.
"""

from __future__ import annotations

import json
import math
from typing import Any, Literal

from nodewise.core.runtime import RECORD_INTERVAL_FACTOR
from nodewise.core.settings import DeepSpeedSettings, KubernetesSettings
from serving.spec import DeepSpeedSpec, ModelServeSpec
from tasks.planning.placement import PlacementPlan

MultiNode = Literal["mpijob", "lws"]
# What the credentials Secret must hold for an MPIJob (mpirun passes these on to the ranks).
CREDENTIAL_VARIABLES = ("MLFLOW_TRACKING_URI",)
IMAGE_SSH_DIR = "/home/nodewise/.ssh"  # deployments/image: its user's home
LABEL = "nodewise.dev/app"
ROLE = "nodewise.dev/role"  # "front" on the front's pods: never one of the group's (the watchdog skips it)
FRONT = "front"
FRONT_PROBE = "/front"  # the front's own state: 200 while the group is down (serving/front.py)
FRONT_SERIES = "nodewise_front_.*"  # what the front's PodMonitor keeps (the rest is rank 0's, scraped there)
SPEC_PATH = "/etc/nodewise/spec.json"
METRICS_PATH = "/metrics"
# A Ray Serve worker pod's metrics port (its replica's own /metrics; see above). Named apart from
# KubeRay's container port "metrics" (8080, Ray's own metrics, which KubeRay adds under that name).
REPLICA_METRICS_PORT = 9500
METRICS_PORT_NAME = "nw-metrics"
SERVING_JOB = "nodewise-serving"  # the job label of every serving target, as local discovery gives it


def render(
    spec: ModelServeSpec | DeepSpeedSpec,
    plan: PlacementPlan,
    k8s: KubernetesSettings,
    multi_node: MultiNode = "mpijob",
    deepspeed: DeepSpeedSettings | None = None,
) -> list[dict[str, Any]]:
    """Every manifest for ``spec`` as ``plan`` places it, in the order to apply them.

    ``deepspeed``: the front's settings for a multi-node plan (``front``, ``port``, ``hold_timeout_s``,
    ``max_held``); the defaults (a front) when not given."""
    name = _dns(spec.app_name)
    objects = _rbac(name, k8s)
    if isinstance(spec, ModelServeSpec):
        objects += [_ray_service(name, spec, plan, k8s), _service(endpoint_name(name), k8s, {}, 8000)]
        objects[-1]["spec"]["selector"] = {"ray.io/node-type": "head", "ray.io/cluster-name": name}  # _ray_service
        workers = {LABEL: name, "ray.io/node-type": "worker"}
        objects.append(_pod_monitor(name, spec.app_name, "ray_serve", workers, METRICS_PORT_NAME, k8s))
        return objects
    ds = deepspeed or DeepSpeedSettings()
    objects.append(_spec_config_map(name, spec, k8s))
    if multi_node == "lws":
        objects.append(_leader_worker_set(name, spec, plan, k8s, annotated=not ds.front))
        rank0 = {"leaderworkerset.sigs.k8s.io/name": name, "leaderworkerset.sigs.k8s.io/worker-index": "0"}
    else:
        objects.append(_mpi_job(name, spec, plan, k8s))
        rank0 = {
            "training.kubeflow.org/job-name": name,
            "training.kubeflow.org/job-role": "worker",
            "training.kubeflow.org/replica-index": "0",
        }
    monitor = _pod_monitor(name, spec.app_name, "deepspeed_mpi", rank0, "http", k8s)  # rank 0's pod
    if not ds.front:
        return [*objects, _service(endpoint_name(name), k8s, rank0, spec.port), monitor]
    return [*objects, *_front(name, spec, ds, k8s, rank0), monitor]


def endpoint_name(name: str) -> str:
    """The Service users call (``name``: the workload's)."""
    return f"{name}-endpoint"


# -- pieces ----------------------------------------------------------------------------------------
def _meta(name: str, k8s: KubernetesSettings, **extra: Any) -> dict[str, Any]:
    return {"name": name, "namespace": k8s.namespace, "labels": {LABEL: name}, **extra}


def _rbac(name: str, k8s: KubernetesSettings) -> list[dict[str, Any]]:
    """What the watchdog does on Kubernetes: read and delete pods (a sick replica or a whole
    rank group), read and patch its own workloads. Nothing cluster-wide, no secrets."""
    account = f"{name}-watchdog"
    rules = [
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch", "delete"]},
        {"apiGroups": [""], "resources": ["services", "configmaps"], "verbs": ["get", "list"]},
        {"apiGroups": ["ray.io"], "resources": ["rayservices"], "verbs": ["get", "list", "watch", "patch"]},
        {"apiGroups": ["kubeflow.org"], "resources": ["mpijobs"], "verbs": ["get", "list", "watch", "patch"]},
        {
            "apiGroups": ["leaderworkerset.x-k8s.io"],
            "resources": ["leaderworkersets"],
            "verbs": ["get", "list", "watch", "patch"],
        },
    ]
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _meta(account, k8s)},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": _meta(account, k8s), "rules": rules},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": _meta(account, k8s),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": account},
            "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": k8s.namespace}],
        },
    ]


def _service(service: str, k8s: KubernetesSettings, selector: dict[str, str], port: int) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(service, k8s),
        "spec": {
            "selector": dict(selector),
            "ports": [{"name": "http", "port": port, "targetPort": port, "protocol": "TCP"}],
        },
    }


def _pod_monitor(
    name: str, app: str, backend: str, selector: dict[str, str], port: str, k8s: KubernetesSettings
) -> dict[str, Any]:
    """Scrape ``/metrics`` on the port named ``port`` of the pods ``selector`` picks, labelled as
    local discovery labels its targets (job, app, backend)."""
    relabelings = [
        {"action": "replace", "targetLabel": "job", "replacement": SERVING_JOB},
        {"action": "replace", "targetLabel": "app", "replacement": app},
        {"action": "replace", "targetLabel": "backend", "replacement": backend},
    ]
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PodMonitor",
        "metadata": _meta(f"{name}-metrics", k8s),
        "spec": {
            "selector": {"matchLabels": dict(selector)},
            "namespaceSelector": {"matchNames": [k8s.namespace]},
            "podMetricsEndpoints": [{"port": port, "path": METRICS_PATH, "relabelings": relabelings}],
        },
    }


def _scrape_annotations(port: int) -> dict[str, str]:
    """For Prometheus set-ups that discover pods by annotation (one port per pod, by that convention)."""
    return {"prometheus.io/scrape": "true", "prometheus.io/port": str(port), "prometheus.io/path": METRICS_PATH}


def _container(
    name: str, k8s: KubernetesSettings, command: list[str] | None, resources: dict, credentials: bool = True
) -> dict[str, Any]:
    container: dict[str, Any] = {"name": name, "image": k8s.image, "imagePullPolicy": "IfNotPresent"}
    if command:
        container["command"] = command
    if credentials and k8s.credentials_secret:  # the registry's credentials, by reference: no value is ever rendered
        container["envFrom"] = [{"secretRef": {"name": k8s.credentials_secret}}]
    container["resources"] = resources
    return container


def _resources(cpus: float, memory_bytes: int, gpus: int, memory_limit_bytes: int | None = None) -> dict[str, Any]:
    requests = {"cpu": _cpu(cpus), "memory": _mib(memory_bytes)}
    limits = {"memory": _mib(memory_limit_bytes or memory_bytes)}
    if gpus:
        requests["nvidia.com/gpu"] = limits["nvidia.com/gpu"] = str(gpus)
    return {"requests": requests, "limits": limits}


def _ray_service(name: str, spec: ModelServeSpec, plan: PlacementPlan, k8s: KubernetesSettings) -> dict[str, Any]:
    """One Ray cluster (a head that runs no replica, workers that do) and the Serve app on it."""
    per_replica_gpus = spec.num_gpus  # a tensor-parallel replica's num_gpus already counts all its devices
    if per_replica_gpus and per_replica_gpus < 1:  # several replicas share one GPU: one pod holds them
        per_pod, pod_gpus = max(1, math.floor(1 / spec.num_gpus)), 1
    else:
        per_pod, pod_gpus = 1, math.ceil(per_replica_gpus)
    pods = math.ceil(spec.min_replicas / per_pod)  # 0 for a model that scales to zero
    max_pods = math.ceil(spec.max_replicas / per_pod)
    replica_bytes = plan.needed_bytes
    memory = per_pod * replica_bytes + 2**30  # the raylet and its agents take ~1 GiB
    limit = per_pod * (spec.memory_limit_bytes or 2 * replica_bytes) + 2**30
    cpus = max(1.0, per_pod * spec.num_cpus)
    env = [
        {"name": "RAY_SERVE_THROUGHPUT_OPTIMIZED", "value": "1" if k8s.serve_throughput_optimized else "0"},
        # read when Serve is imported: a replica samples its load every tenth of the look-back
        {"name": "RAY_SERVE_AUTOSCALING_METRIC_RECORD_INTERVAL_FACTOR", "value": str(RECORD_INTERVAL_FACTOR)},
    ]
    serve_config = {
        "applications": [
            {
                "name": spec.app_name,
                "route_prefix": spec.route_prefix,
                "import_path": "serving.app:from_config",
                "args": {
                    "spec": spec.model_copy(
                        update={
                            "metrics_port": REPLICA_METRICS_PORT,
                            "metrics_push_interval_s": k8s.serve_metrics_push_interval_s,
                        }
                    ).model_dump(mode="json")
                },
            }
        ]
    }
    head = _container("ray-head", k8s, None, _resources(1, 2 * 2**30, 0))
    head["env"] = env
    head["ports"] = [
        {"containerPort": 6379, "name": "gcs"},
        {"containerPort": 8265, "name": "dashboard"},
        {"containerPort": 8000, "name": "serve"},
    ]
    worker = _container("ray-worker", k8s, None, _resources(cpus, memory, pod_gpus, limit))
    worker["env"] = env
    worker["ports"] = [{"containerPort": REPLICA_METRICS_PORT, "name": METRICS_PORT_NAME}]  # see the docstring
    cluster: dict[str, Any] = {"rayVersion": k8s.ray_version}
    if max_pods > pods:
        # Serve's autoscaler asks for replicas; KubeRay's in-tree autoscaler (Ray's own) adds the
        # worker pods they need, up to maxReplicas, and removes pods idle for idleTimeoutSeconds.
        cluster["enableInTreeAutoscaling"] = True
        cluster["autoscalerOptions"] = {"upscalingMode": "Default", "idleTimeoutSeconds": k8s.idle_node_timeout_s}
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": _meta(name, k8s),
        "spec": {
            "serveConfigV2": json.dumps(serve_config, indent=2),
            "rayClusterConfig": {
                **cluster,
                "headGroupSpec": {
                    # The head schedules no replica: losing a worker never takes the GCS with it.
                    "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
                    "template": {
                        "metadata": {"labels": {LABEL: name}},
                        "spec": {"serviceAccountName": f"{name}-watchdog", "containers": [head]},
                    },
                },
                "workerGroupSpecs": [
                    {
                        "groupName": "replicas",
                        "replicas": max(1, pods),  # Serve starts at least one replica (serving/app.py)
                        "minReplicas": pods,
                        "maxReplicas": max_pods,
                        "rayStartParams": {},
                        "template": {
                            "metadata": {
                                "labels": {LABEL: name},
                                "annotations": _scrape_annotations(REPLICA_METRICS_PORT),
                            },
                            "spec": {"containers": [worker]},
                        },
                    }
                ],
            },
        },
    }


def _spec_config_map(name: str, spec: DeepSpeedSpec, k8s: KubernetesSettings) -> dict[str, Any]:
    """The spec every rank starts with; rank 0 binds all interfaces (the Service reaches it)."""
    body = spec.model_copy(update={"host": "0.0.0.0"}).model_dump(mode="json")
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(f"{name}-spec", k8s),
        "data": {"spec.json": json.dumps(body, indent=2)},
    }


def _rank_pod(name: str, container: dict[str, Any], port: int) -> dict[str, Any]:
    container["volumeMounts"] = [{"name": "spec", "mountPath": "/etc/nodewise", "readOnly": True}]
    container["ports"] = [{"containerPort": port, "name": "http"}]  # rank 0's HTTP port (the others leave it)
    return {
        "metadata": {"labels": {LABEL: name}},
        "spec": {
            "containers": [container],
            "volumes": [{"name": "spec", "configMap": {"name": f"{name}-spec"}}],
        },
    }


def _rank_resources(plan: PlacementPlan, spec: DeepSpeedSpec) -> dict[str, Any]:
    gpus = plan.devices_per_node if spec.device == "cuda" else 0
    per_node = plan.needed_bytes * plan.devices_per_node
    return _resources(max(1.0, float(plan.devices_per_node)), per_node + 2**30, gpus, 2 * per_node + 2**30)


def _worker_command(spec: DeepSpeedSpec) -> list[str]:
    return ["python", "-m", "serving.deepspeed_worker", SPEC_PATH]


def _lws_command(spec: DeepSpeedSpec, plan: PlacementPlan) -> list[str]:
    """One rank per pod reads LWS_* itself; several devices per pod start under torchrun, told
    the group from LWS's variables (the worker then reads torchrun's)."""
    if plan.devices_per_node == 1:
        return _worker_command(spec)
    launch = (
        f"exec torchrun --nnodes={plan.nodes} --nproc-per-node={plan.devices_per_node} "
        '--node-rank="$LWS_WORKER_INDEX" --master-addr="$LWS_LEADER_ADDRESS" --master-port=29500 '
        f"-m serving.deepspeed_worker {SPEC_PATH}"
    )
    return ["sh", "-c", launch]


def _mpi_job(name: str, spec: DeepSpeedSpec, plan: PlacementPlan, k8s: KubernetesSettings) -> dict[str, Any]:
    """mpirun in the launcher starts every rank on the workers (slotsPerWorker = devices per node);
    each rank derives RANK, LOCAL_RANK, MASTER_ADDR... from Open MPI and the MPIJob hostfile."""
    # The operator's hostfile is mounted in the launcher only: serving.mpijob_launcher reads rank
    # 0's host from it and mpirun passes it on (-x MASTER_ADDR); ranks over ssh see no pod env.
    mpirun = ["python", "-m", "serving.mpijob_launcher"]
    mpirun += ["mpirun", "--allow-run-as-root", "-np", str(plan.ranks), "--bind-to", "none", "--map-by", "slot"]
    mpirun += ["-x", "PATH", "-x", "MASTER_ADDR"]
    if spec.device == "cuda":  # the GPU driver's libraries, where the device plugin puts them
        mpirun += ["-x", "LD_LIBRARY_PATH"]
    if k8s.credentials_secret:  # ranks started over ssh do not see the worker pod's environment
        mpirun += [arg for key in CREDENTIAL_VARIABLES for arg in ("-x", key)]
    mpirun += _worker_command(spec)
    launcher = _container("launcher", k8s, mpirun, _resources(0.5, 512 * 2**20, 0))
    launcher["volumeMounts"] = [{"name": "spec", "mountPath": "/etc/nodewise", "readOnly": True}]
    worker = _container("worker", k8s, None, _rank_resources(plan, spec))
    # The image's entry point runs sshd for the launcher's mpirun (port 2222, as this user, with
    # the key the operator mounts at sshAuthMountPath: deployments/image/entrypoint.sh).
    worker["args"] = ["sshd"]
    launcher_pod = {
        "metadata": {"labels": {LABEL: name}},
        "spec": {
            "serviceAccountName": f"{name}-watchdog",
            "containers": [launcher],
            "volumes": [{"name": "spec", "configMap": {"name": f"{name}-spec"}}],
        },
    }
    return {
        "apiVersion": "kubeflow.org/v2beta1",
        "kind": "MPIJob",
        "metadata": _meta(name, k8s),
        "spec": {
            "slotsPerWorker": plan.devices_per_node,
            "mpiImplementation": "OpenMPI",
            "sshAuthMountPath": IMAGE_SSH_DIR,  # the image's user is not root
            "runPolicy": {"cleanPodPolicy": "Running", "backoffLimit": 0},
            "mpiReplicaSpecs": {
                "Launcher": {"replicas": 1, "restartPolicy": "Never", "template": launcher_pod},
                "Worker": {
                    "replicas": plan.nodes,
                    "restartPolicy": "Never",
                    "template": _rank_pod(name, worker, spec.port),
                },
            },
        },
    }


def _leader_worker_set(
    name: str, spec: DeepSpeedSpec, plan: PlacementPlan, k8s: KubernetesSettings, annotated: bool = True
) -> dict:
    """One group of ``plan.nodes`` pods, a rank per device; any pod's failure recreates the whole
    group (RecreateGroupOnPodRestart). ``annotated``: the leader carries the scrape annotations
    (not behind a front, which repeats its metrics)."""
    command = _lws_command(spec, plan)
    leader = _rank_pod(name, _container("rank", k8s, command, _rank_resources(plan, spec)), spec.port)
    if annotated:
        leader["metadata"]["annotations"] = _scrape_annotations(spec.port)  # rank 0 answers /metrics
    # The leader holds rank 0: its /ping is 200 only when every rank is ready and heard from.
    leader["spec"]["containers"][0]["readinessProbe"] = {
        "httpGet": {"path": "/ping", "port": spec.port},
        "periodSeconds": 10,
        "failureThreshold": 3,
    }
    worker = _rank_pod(name, _container("rank", k8s, list(command), _rank_resources(plan, spec)), spec.port)
    return {
        "apiVersion": "leaderworkerset.x-k8s.io/v1",
        "kind": "LeaderWorkerSet",
        "metadata": _meta(name, k8s),
        "spec": {
            "replicas": 1,
            "startupPolicy": "LeaderCreated",
            "leaderWorkerTemplate": {
                "size": plan.nodes,
                "restartPolicy": "RecreateGroupOnPodRestart",
                "leaderTemplate": leader,
                "workerTemplate": worker,
            },
        },
    }


def _front(
    name: str, spec: DeepSpeedSpec, ds: DeepSpeedSettings, k8s: KubernetesSettings, rank0: dict[str, str]
) -> list[dict[str, Any]]:
    """Rank 0's own Service, the front's Deployment, the endpoint's Service to the front, its PodMonitor."""
    front = {LABEL: name, ROLE: FRONT}
    rank0_service = _service(f"{name}-rank0", k8s, rank0, spec.port)
    upstream = f"http://{rank0_service['metadata']['name']}.{k8s.namespace}.svc:{spec.port}"
    monitor = _pod_monitor(f"{name}-front", spec.app_name, "deepspeed_mpi", front, "http", k8s)
    monitor["spec"]["podMetricsEndpoints"][0]["metricRelabelings"] = [
        {"action": "keep", "sourceLabels": ["__name__"], "regex": FRONT_SERIES}
    ]
    return [
        rank0_service,
        _front_deployment(name, spec.app_name, upstream, ds, k8s),
        _service(endpoint_name(name), k8s, front, ds.port),
        monitor,
    ]


def _front_deployment(name: str, app: str, upstream: str, ds: DeepSpeedSettings, k8s: KubernetesSettings) -> dict:
    """The group's front: one pod that outlives the group (serving/front.py), no credentials, no
    Kubernetes API access; probed on ``/front``, which answers while the group restarts."""
    command = ["python", "-m", "serving.front", "--upstream", upstream, "--host", "0.0.0.0", "--port", str(ds.port)]
    command += ["--app", app, "--hold-timeout-s", str(ds.hold_timeout_s), "--max-held", str(ds.max_held)]
    container = _container("front", k8s, command, _resources(0.5, 256 * 2**20, 0, 512 * 2**20), credentials=False)
    container["ports"] = [{"containerPort": ds.port, "name": "http"}]
    for probe, delay_s in (("readinessProbe", 0), ("livenessProbe", 10)):
        container[probe] = {"httpGet": {"path": FRONT_PROBE, "port": ds.port}, "periodSeconds": 10}
        container[probe] |= {"failureThreshold": 3, "initialDelaySeconds": delay_s}
    labels = {LABEL: name, ROLE: FRONT}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(f"{name}-front", k8s),
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": dict(labels)},
            "template": {
                "metadata": {"labels": dict(labels), "annotations": _scrape_annotations(ds.port)},
                "spec": {"automountServiceAccountToken": False, "containers": [container]},
            },
        },
    }


# -- formats ---------------------------------------------------------------------------------------
def _dns(name: str) -> str:
    """A DNS-1035 label from an app name (lowercase, [a-z0-9-], starts with a letter, <= 45 chars
    so that suffixes such as ``-watchdog`` and KubeRay's own stay under 63)."""
    import re

    label = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")
    if not label or not label[0].isalpha():
        label = f"m-{label}".rstrip("-")
    return label[:45].rstrip("-")


def _cpu(cpus: float) -> str:
    return str(int(cpus)) if float(cpus).is_integer() else f"{round(cpus * 1000)}m"


def _mib(size: int) -> str:
    return f"{math.ceil(size / 2**20)}Mi"
