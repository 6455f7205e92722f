"""The image, run for real: what `nodewise render` writes, started from the built image as
Kubernetes would start it, on network-namespace hosts of this machine (no cluster here).

Needs root, buildah and an image built by scripts/build-image.sh (default nodewise:<version>).
One run, three namespace hosts on a bridge (testkit/hosts.py), an `mlflow server` on this machine's
bridge address with its artifacts served through it (`mlflow-artifacts:`), the demo LM and the
digits model registered there, then:

1. **MPIJob.** `nodewise render --multi-node mpijob` plans the LM over two nodes too small for one
   copy. What the MPI Operator (kubeflow/mpi-operator v2beta1) does is done by hand, from its
   source: a key pair mounted at the MPIJob's ``sshAuthMountPath`` (id_rsa, id_rsa.pub,
   authorized_keys) in every pod, a hostfile ``NAME-worker-I.NAME.NAMESPACE.svc slots=N`` at
   /etc/mpi/hostfile, the launcher's environment (OMPI_MCA_orte_default_hostfile,
   OMPI_MCA_orte_keep_fqdn_hostnames, OMPI_MCA_plm_rsh_args), the workers' names resolvable
   (here an /etc/hosts, there the Job's headless Service). Each worker host runs the image with
   the rendered worker args (`sshd`); the launcher host runs the rendered launcher command,
   unchanged. Timed: launcher start -> rank 0's /ping 200 -> first /generate answer.
2. **RayService.** `nodewise render` of the digits model; a Ray head (the rendered
   ``rayStartParams``) and a worker (``--num-cpus``/``--memory`` from the rendered worker
   container, as KubeRay derives them) from the image on two hosts, the rendered
   ``serveConfigV2`` PUT to the head's dashboard (what KubeRay does). Timed: head start ->
   config accepted -> first /invocations answer.

Containers run with ``buildah run --isolation chroot --network host`` inside each namespace (OCI
runtimes cannot set rlimits on these machines). Everything is stopped and removed at the end.

Usage: .venv/bin/python benchmarks/image_run.py [--image localhost/nodewise:0.1.0]
(last line: one JSON object)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from testkit.hosts import Host, Hosts, hosts  # noqa: E402

MPI_OPERATOR_ENV = {  # kubeflow/mpi-operator v2beta1, pkg/controller/mpi_job_controller.go: ompiEnvVars
    "OMPI_MCA_orte_keep_fqdn_hostnames": "true",
    "OMPI_MCA_orte_default_hostfile": "/etc/mpi/hostfile",
    "OMPI_MCA_plm_rsh_args": "-o ConnectionAttempts=10",
    "K_MPI_JOB_ROLE": "launcher",
}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class Containers:
    """Working containers of one image, each run inside a namespace host; all removed at the end."""

    def __init__(self, image: str, folder: Path) -> None:
        self.image, self.folder = image, folder
        self.made: list[str] = []
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(
        self, host: Host, argv: list[str], mounts: dict[str, str], env: dict[str, str], log_name: str
    ) -> subprocess.Popen[bytes]:
        name = subprocess.run(
            ["buildah", "from", "--quiet", self.image], check=True, capture_output=True, text=True
        ).stdout.strip()
        self.made.append(name)
        cmd = ["buildah", "run", "--isolation", "chroot", "--network", "host", "--no-hosts"]
        for source, target in mounts.items():
            cmd += ["--volume", f"{source}:{target}"]
        for key, value in {**env, "TINI_SUBREAPER": "1"}.items():  # tini is not PID 1 under buildah run
            cmd += ["--env", f"{key}={value}"]
        # buildah run ignores the image's ENTRYPOINT: run it as Kubernetes would (tini, then ours)
        cmd += [name, "--", "/usr/bin/tini", "--", "/usr/local/bin/nodewise-entrypoint", *argv]
        out = open(self.folder / f"{log_name}.log", "wb")  # noqa: SIM115 - closed with the process
        proc = host.popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        for name in self.made:
            subprocess.run(["buildah", "rm", name], capture_output=True, check=False, timeout=120)


@contextlib.contextmanager
def mlflow_server(lan: Hosts, folder: Path) -> Iterator[str]:
    """An `mlflow server` on this machine's bridge address, artifacts served through it."""
    port = 5055
    url = f"http://{lan.this_host}:{port}"
    cmd = [
        str(Path(sys.executable).parent / "mlflow"), "server", "--host", lan.this_host, "--port", str(port),
        "--backend-store-uri", f"sqlite:///{folder}/mlflow.db", "--serve-artifacts",
        "--artifacts-destination", str(folder / "artifacts"), "--workers", "1",
        "--allowed-hosts", f"{lan.this_host}:{port},{lan.this_host}",
    ]  # fmt: skip
    out = open(folder / "mlflow-server.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_http(f"{url}/health", 120, proc)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)


def wait_http(url: str, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited ({proc.returncode}) before {url} answered")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                return time.monotonic() - start
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer 200 within {timeout} s")


def render(model_uri: str, inventory: str, out: Path, env: dict[str, str], multi_node: str | None = None) -> dict:
    cmd = [str(Path(sys.executable).parent / "nodewise"), "render", model_uri, "--out", str(out)]
    cmd += ["--inventory", inventory] + (["--multi-node", multi_node] if multi_node else [])
    done = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True, timeout=600, cwd=ROOT)
    if done.returncode:
        raise RuntimeError(f"render failed: {done.stderr.strip()[-2000:]}")
    log(done.stdout.strip().splitlines()[-1])
    objects: dict[str, Any] = {}
    for path in sorted(out.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                objects[f"{doc['kind']}/{doc['metadata']['name']}"] = doc
    return objects


def register(url: str, state: Path, inventories: Path) -> dict[str, str]:
    """The demo LM and digits model, registered on the server with served artifacts."""
    os.environ["MLFLOW_TRACKING_URI"] = url
    from mlflow import MlflowClient

    from nodewise.core.settings import Settings
    from nodewise.demo_models import (
        DEMO_EXPERIMENT,
        DEMO_LM,
        DEMO_MODEL,
        register_demo_lm,
        register_demo_model,
        too_small_inventory,
    )
    from tasks.planning.profile_models import profile_with_cache
    from tasks.planning.registry import resolve_model

    client = MlflowClient(url)
    if client.get_experiment_by_name(DEMO_EXPERIMENT) is None:
        client.create_experiment(DEMO_EXPERIMENT)  # the server's default root: mlflow-artifacts:/
    register_demo_lm(str(state / "artifacts"))
    register_demo_model(str(state / "artifacts"))
    settings = Settings(state_dir=state)
    model = resolve_model(f"models:/{DEMO_LM}@champion", client)
    log(f"demo LM artifacts at {model.artifact_uri}")
    profile = profile_with_cache(model, batch_size=settings.serve.max_batch_size, device="cpu")
    names = ["w0", "w1"]  # the addresses do not matter to the render: Kubernetes places the pods
    lm_inventory = too_small_inventory(
        inventories / "two-small.yaml", profile.total_bytes, profile.per_rank_bytes(2),
        settings.placement.headroom_fraction, names,
    )  # fmt: skip
    one = inventories / "one.yaml"
    one.write_text(yaml.safe_dump({"nodes": [{"name": "node-0", "cpus": 2, "host_memory": 8 * 2**30}]}))
    return {"lm": f"models:/{DEMO_LM}@champion", "digits": f"models:/{DEMO_MODEL}@champion",
            "lm_inventory": lm_inventory, "one_inventory": str(one)}  # fmt: skip


def ssh_keys(folder: Path) -> Path:
    """What the operator mounts at sshAuthMountPath: id_rsa (an ECDSA key), id_rsa.pub, authorized_keys."""
    keys = folder / "ssh"
    keys.mkdir(mode=0o700)
    subprocess.run(["ssh-keygen", "-q", "-t", "ecdsa", "-N", "", "-f", str(keys / "id_rsa")], check=True)
    shutil.copy(keys / "id_rsa.pub", keys / "authorized_keys")
    for path in [keys, *keys.iterdir()]:
        os.chown(path, 1000, 1000)  # the image's user; the operator's Secret volume is the pod user's
    return keys


def run_mpijob(objects: dict, lan: Hosts, ctrs: Containers, folder: Path) -> dict[str, Any]:
    job = next(o for o in objects.values() if o["kind"] == "MPIJob")
    config = next(o for o in objects.values() if o["kind"] == "ConfigMap")
    name, namespace, spec = job["metadata"]["name"], job["metadata"]["namespace"], job["spec"]
    workers = spec["mpiReplicaSpecs"]["Worker"]["replicas"]
    slots = spec["slotsPerWorker"]
    launcher = spec["mpiReplicaSpecs"]["Launcher"]["template"]["spec"]["containers"][0]
    worker = spec["mpiReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]
    etc = folder / "etc-nodewise"
    etc.mkdir()
    (etc / "spec.json").write_text(config["data"]["spec.json"])
    rank_spec = json.loads(config["data"]["spec.json"])
    names = [f"{name}-worker-{i}.{name}.{namespace}.svc" for i in range(workers)]
    (folder / "hostfile").write_text("".join(f"{n} slots={slots}\n" for n in names))
    etc_hosts = folder / "hosts"
    etc_hosts.write_text("127.0.0.1 localhost\n" + "".join(f"{lan[1 + i].address} {n}\n" for i, n in enumerate(names)))
    keys = ssh_keys(folder)
    home_ssh = spec["sshAuthMountPath"]
    mounts = {str(keys): home_ssh, str(etc_hosts): "/etc/hosts:ro", str(etc): "/etc/nodewise:ro"}
    env = {e["name"]: e["value"] for e in worker.get("env", [])}
    for i in range(workers):
        ctrs.start(lan[1 + i], list(worker["args"]), mounts, env, f"mpijob-worker-{i}")
    for i in range(workers):  # the operator starts the launcher once the workers are running
        deadline = time.monotonic() + 60
        while "2222" not in lan[1 + i].run(["ss", "-ltn"]).stdout:
            if time.monotonic() > deadline:
                raise TimeoutError(f"worker {i}'s sshd did not listen on 2222")
            time.sleep(0.5)
    launcher_mounts = {**mounts, str(folder / "hostfile"): "/etc/mpi/hostfile:ro"}
    launcher_env = {**{e["name"]: e["value"] for e in launcher.get("env", [])}, **MPI_OPERATOR_ENV}
    log(f"launcher: {' '.join(launcher['command'])}")
    start = time.monotonic()
    proc = ctrs.start(lan[0], launcher["command"], launcher_mounts, launcher_env, "mpijob-launcher")
    endpoint = f"http://{lan[1].address}:{rank_spec['port']}"
    ready_s = wait_http(f"{endpoint}/ping", 900, proc)
    body = {"prompt": "nodewise serves", "max_new_tokens": 12}
    answer = httpx.post(f"{endpoint}/generate", json=body, timeout=120)
    first_answer_s = time.monotonic() - start
    answer.raise_for_status()
    text = answer.json()["generated_text"][0]
    log(f"MPIJob: ranks ready in {ready_s:.1f} s, first answer {first_answer_s:.1f} s: {text!r}")
    ranks = (folder / "mpijob-launcher.log").read_text(errors="replace")
    return {
        "launcher_command": launcher["command"],
        "hostfile": (folder / "hostfile").read_text().splitlines(),
        "ranks": rank_spec.get("world_size") or workers * slots,
        "seconds_to_ready": round(ready_s, 1),
        "seconds_to_first_answer": round(first_answer_s, 1),
        "answer": text,
        "launcher_log_tail": ranks.splitlines()[-5:],
    }


def _cpus(value: str) -> str:
    return str(int(value[:-1]) / 1000) if value.endswith("m") else value


def _bytes(value: str) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
    return int(value[:-2]) * units[value[-2:]] if value[-2:] in units else int(value)


def run_rayservice(objects: dict, lan: Hosts, ctrs: Containers, folder: Path) -> dict[str, Any]:
    service = next(o for o in objects.values() if o["kind"] == "RayService")
    cluster = service["spec"]["rayClusterConfig"]
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    group = cluster["workerGroupSpecs"][0]
    worker = group["template"]["spec"]["containers"][0]
    head_params = cluster["headGroupSpec"]["rayStartParams"]
    head_cmd = ["ray", "start", "--head", "--block", "--port=6379", f"--node-ip-address={lan[0].address}"]
    head_cmd += [f"--{key}={value}" for key, value in head_params.items()]
    head_cmd += ["--dashboard-port=8265", "--disable-usage-stats"]
    limits, requests = worker["resources"]["limits"], worker["resources"]["requests"]
    worker_cmd = ["ray", "start", "--block", f"--address={lan[0].address}:6379"]
    worker_cmd += [f"--node-ip-address={lan[1].address}", f"--num-cpus={_cpus(requests['cpu'])}"]
    worker_cmd += [f"--memory={_bytes(limits['memory'])}"]  # KubeRay: --memory from the memory limit
    worker_cmd += [f"--{key}={value}" for key, value in group["rayStartParams"].items()]
    env = lambda c: {e["name"]: e["value"] for e in c.get("env", [])}  # noqa: E731
    start = time.monotonic()
    proc = ctrs.start(lan[0], head_cmd, {}, env(head), "ray-head")
    dashboard = f"http://{lan[0].address}:8265"
    wait_http(f"{dashboard}/api/version", 300, proc)
    head_s = time.monotonic() - start
    ctrs.start(lan[1], worker_cmd, {}, env(worker), "ray-worker")
    config = json.loads(service["spec"]["serveConfigV2"])
    put = httpx.put(f"{dashboard}/api/serve/applications/", json=config, timeout=60)
    put.raise_for_status()
    accepted_s = time.monotonic() - start
    app = config["applications"][0]
    url = f"http://{lan[0].address}:8000{app['route_prefix'].rstrip('/')}/invocations"
    from nodewise.demo_models import digits_split

    _, _, x_test, y_test = digits_split()
    body = {"inputs": [[round(float(v), 4) for v in x_test[0]]]}
    deadline = time.monotonic() + 600
    while True:
        with contextlib.suppress(httpx.HTTPError):
            answer = httpx.post(url, json=body, timeout=10)
            if answer.status_code == 200:
                break
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not answer within 600 s")
        time.sleep(0.5)
    first_answer_s = time.monotonic() - start
    logits = answer.json()["predictions"][0]
    predicted = max(range(len(logits)), key=logits.__getitem__)
    log(f"RayService: head {head_s:.1f} s, config accepted {accepted_s:.1f} s, first answer {first_answer_s:.1f} s")
    status = httpx.get(f"{dashboard}/api/serve/applications/", timeout=30).json()
    nodes = {
        d["node_ip"]
        for a in status.get("applications", {}).values()
        for dep in a.get("deployments", {}).values()
        for d in dep.get("replicas", [])
    }
    return {
        "head_command": head_cmd,
        "worker_command": worker_cmd,
        "seconds_to_head": round(head_s, 1),
        "seconds_to_config_accepted": round(accepted_s, 1),
        "seconds_to_first_answer": round(first_answer_s, 1),
        "predicted": predicted,
        "label": int(y_test[0]),
        "replica_nodes": sorted(nodes),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    version = next(
        line.split('"')[1] for line in (ROOT / "pyproject.toml").read_text().splitlines() if line.startswith("version")
    )
    parser.add_argument("--image", default=f"localhost/nodewise:{version}")
    parser.add_argument("--only", choices=["mpijob", "rayservice"], default=None)
    args = parser.parse_args()
    if os.geteuid() != 0 or not shutil.which("buildah"):
        sys.exit("error: needs root and buildah (apt-get install buildah), and an image from scripts/build-image.sh")
    if subprocess.run(["buildah", "inspect", "--type", "image", args.image], capture_output=True).returncode:
        sys.exit(f"error: image {args.image} not found; build it with scripts/build-image.sh")
    folder = Path(tempfile.mkdtemp(prefix="nw-image-run-"))
    os.chmod(folder, 0o755)
    state = folder / "state"
    result: dict[str, Any] = {"image": args.image}
    ctrs = Containers(args.image, folder)
    try:
        with hosts(3) as lan, mlflow_server(lan, folder) as url:
            result["tracking_uri"] = url
            models = register(url, state, folder)
            env = {
                "NODEWISE_STATE_DIR": str(state),
                "MLFLOW_TRACKING_URI": url,
                "NODEWISE_MLFLOW__TRACKING_URI": url,
                "NODEWISE_KUBERNETES__IMAGE": args.image,
            }
            if args.only in (None, "mpijob"):
                objects = render(models["lm"], models["lm_inventory"], folder / "mpijob", env, "mpijob")
                result["mpijob"] = run_mpijob(objects, lan, ctrs, folder)
                ctrs.close()
                ctrs = Containers(args.image, folder)
            if args.only in (None, "rayservice"):
                objects = render(models["digits"], models["one_inventory"], folder / "rayservice", env)
                result["rayservice"] = run_rayservice(objects, lan, ctrs, folder)
    except Exception:
        log(f"failed; logs kept in {folder}")
        ctrs.close()
        raise
    ctrs.close()
    shutil.rmtree(folder, ignore_errors=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
