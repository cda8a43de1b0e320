"""deploy/k8s: the Kubernetes manifests, checked with no cluster and no network.

The kustomization is rendered the way `kubectl apply -k` renders it (`kubectl kustomize` when
kubectl is on PATH, else a small renderer here that handles exactly the kustomization features
the directory uses, and is checked against kubectl where both exist). Every rendered object is
validated against Kubernetes' own JSON schemas (PyPI `kubernetes-validate`, schemas shipped in
the package, strict: unknown fields fail); the KEDA ScaledObject, a CRD, is checked by hand, its
queries against the metric names the server really exports (and for PromQL syntax with
`promtool` when installed). Then the behaviour the manifests promise: a GPU per pod, the probes,
a grace period that outlasts the drain, the database URL from a Secret, HAProxy's rules, and
HAProxy accepting its configuration (`haproxy -c`) and discovering pods through DNS (a real
`haproxy`, a DNS server in this file, two servers on two loopback addresses).
"""
from __future__ import annotations

import copy
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path

import httpx
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
HAPROXY_DIR = ROOT / "deploy" / "haproxy"

# Kubernetes versions the manifests are validated against: the oldest they claim (README) and
# the newest kubernetes-validate 1.37.0 has schemas for.
K8S_VERSIONS = ("1.29.0", "1.37.0")
CRD_KINDS = {"ScaledObject"}
CLUSTER_SCOPED_KINDS = {"Namespace"}
HAPROXY_CFG_PATH = "/usr/local/etc/haproxy/haproxy.cfg"  # where the official image reads it


# -- rendering -------------------------------------------------------------------------------

RENDERER_KEYS = {"apiVersion", "kind", "namespace", "resources", "configMapGenerator", "images"}


def render_in_python(root: Path) -> list[dict]:
    """What `kubectl kustomize root` makes, for the features this kustomization uses (generated
    names without their hash suffix)."""
    spec = yaml.safe_load((root / "kustomization.yaml").read_text())
    assert set(spec) <= RENDERER_KEYS, f"kustomization.yaml uses {set(spec) - RENDERER_KEYS}: teach render_in_python"
    objects: list[dict] = []
    for entry in spec.get("resources", []):
        path = root / entry
        assert path.is_file(), f"{entry}: only plain files are rendered here"
        objects += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    for generator in spec.get("configMapGenerator", []):
        assert set(generator) <= {"name", "files"}, generator
        data = {}
        for entry in generator["files"]:
            key, _, path = entry.rpartition("=")
            data[key or Path(path).name] = (root / path).read_bytes().decode()  # CRLF kept, as kustomize does
        objects.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": generator["name"]},
                        "data": data})
    namespace = spec.get("namespace")
    for obj in objects:
        if namespace and obj["kind"] not in CLUSTER_SCOPED_KINDS:
            obj["metadata"]["namespace"] = namespace
    for image in spec.get("images", []):
        assert set(image) <= {"name", "newName", "newTag"}, image
        for obj in objects:
            for container in pod_containers(obj):
                name, tag = split_image(container["image"])
                if name == image["name"]:
                    name = image.get("newName", name)
                    tag = image.get("newTag", tag)
                    container["image"] = f"{name}:{tag}" if tag else name
    return objects


def split_image(image: str) -> tuple[str, str | None]:
    name, colon, tag = image.rpartition(":")
    if not colon or "/" in tag:
        return image, None
    return name, tag


def pod_containers(obj: dict) -> list[dict]:
    spec = obj.get("spec", {}).get("template", {}).get("spec", {})
    return spec.get("initContainers", []) + spec.get("containers", [])


def generator_names() -> list[str]:
    spec = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    return [g["name"] for g in spec.get("configMapGenerator", []) + spec.get("secretGenerator", [])]


def without_hash_suffixes(value, names: list[str]):
    """Generated names as written in kustomization.yaml: `haproxy-config-t7g76m2f68` → `haproxy-config`."""
    if isinstance(value, dict):
        return {k: without_hash_suffixes(v, names) for k, v in value.items()}
    if isinstance(value, list):
        return [without_hash_suffixes(v, names) for v in value]
    if isinstance(value, str):
        for name in names:
            if re.fullmatch(re.escape(name) + r"-[a-z0-9]{10}", value):
                return name
    return value


def render_with_kubectl() -> list[dict]:
    out = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return without_hash_suffixes([doc for doc in yaml.safe_load_all(out.stdout) if doc], generator_names())


@pytest.fixture(scope="module")
def objects() -> list[dict]:
    return render_with_kubectl() if shutil.which("kubectl") else render_in_python(K8S)


def one(objects: list[dict], kind: str, name: str) -> dict:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} objects"
    return found[0]


def kustomization() -> dict:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())


def container(deployment: dict, name: str) -> dict:
    return next(c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == name)


def args_value(args: list[str], flag: str) -> str:
    for i, arg in enumerate(args):
        if arg == flag:
            return args[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    raise AssertionError(f"{flag} is not in the args {args}")


def prestop_sleep(c: dict) -> float:
    """Seconds the preStop hook pauses before anything else."""
    command = c["lifecycle"]["preStop"]["exec"]["command"]
    if command[0] == "sleep":
        return float(command[1])
    match = re.match(r"sleep (\d+)", command[-1])
    assert command[:2] == ["/bin/sh", "-c"] and match, command
    return float(match.group(1))


def port_number(c: dict, port) -> int:
    if isinstance(port, int):
        return port
    return next(p["containerPort"] for p in c["ports"] if p["name"] == port)


def env_var(c: dict, name: str) -> dict:
    found = [e for e in c.get("env", []) if e["name"] == name]
    assert len(found) == 1, f"{name}: {len(found)} entries"
    return found[0]


def haproxy_sections(text: str) -> dict[str, list[str]]:
    """{'defaults': [lines], 'backend streamservers': [...], ...}: comments and blank lines dropped."""
    sections: dict[str, list[str]] = {}
    current = None
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].rstrip()
        if not line.strip():
            continue
        if not line[0].isspace():
            current = " ".join(line.split())
            sections[current] = []
        else:
            sections[current].append(" ".join(line.split()))
    return sections


def server_args(objects: list[dict]) -> list[str]:
    return container(one(objects, "Deployment", "streamserver"), "streamserver")["args"]


def parsed_server_args(objects: list[dict], monkeypatch):
    """The server's args through the server's own flag parser (no STREAMSERVER_* from this process)."""
    from streamserver.cli import parse_config

    for key in list(os.environ):
        if key.startswith("STREAMSERVER_"):
            monkeypatch.delenv(key)
    return parse_config(server_args(objects))


def haproxy_cfg(objects: list[dict]) -> str:
    return one(objects, "ConfigMap", "haproxy-config")["data"]["haproxy.cfg"]


# -- rendering and schemas ---------------------------------------------------------------------

@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_the_python_renderer_makes_what_kubectl_makes():
    """CI without kubectl renders with render_in_python: it must say what kubectl says."""
    key = lambda o: (o["kind"], o["metadata"]["name"])  # noqa: E731
    assert sorted(render_in_python(K8S), key=key) == sorted(render_with_kubectl(), key=key)


def test_the_kustomization_has_every_part(objects):
    kinds = sorted((o["kind"], o["metadata"]["name"]) for o in objects)
    assert kinds == sorted([
        ("Namespace", "streamserver"),
        ("Deployment", "streamserver"), ("Service", "streamserver"), ("PodDisruptionBudget", "streamserver"),
        ("ScaledObject", "streamserver"),
        ("Deployment", "haproxy"), ("Service", "haproxy"), ("PodDisruptionBudget", "haproxy"),
        ("ConfigMap", "haproxy-config"),
    ])
    namespace = kustomization()["namespace"]
    for obj in objects:
        expected = None if obj["kind"] in CLUSTER_SCOPED_KINDS else namespace
        assert obj["metadata"].get("namespace") == expected, obj["metadata"]


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_object_is_valid_kubernetes(objects, version):
    example = [d for d in yaml.safe_load_all((K8S / "secret.example.yaml").read_text()) if d]
    checked = 0
    for obj in objects + example:
        if obj["kind"] in CRD_KINDS:
            continue
        try:
            kubernetes_validate.validate(copy.deepcopy(obj), version, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} against Kubernetes {version}: {path}: {e.message}")
        checked += 1
    assert checked == len(objects) + len(example) - sum(o["kind"] in CRD_KINDS for o in objects)


# -- the server pods ----------------------------------------------------------------------------

def test_server_pods_take_one_gpu_and_listen_where_the_service_and_haproxy_look(objects, monkeypatch):
    config = parsed_server_args(objects, monkeypatch)
    deployment = one(objects, "Deployment", "streamserver")
    c = container(deployment, "streamserver")
    assert config.host == "0.0.0.0"
    assert config.refuse_when_full == "http"  # a full pod answers 503 before the upgrade: HAProxy retries
    assert int(c["resources"]["limits"]["nvidia.com/gpu"]) == 1
    assert port_number(c, "http") == config.port

    service = one(objects, "Service", "streamserver")
    assert service["spec"]["clusterIP"] == "None"  # headless: one DNS record per pod
    assert service["spec"]["publishNotReadyAddresses"] is True  # full pods keep their HAProxy slot
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()
    (port,) = service["spec"]["ports"]
    assert port_number(c, port["targetPort"]) == config.port

    pdb = one(objects, "PodDisruptionBudget", "streamserver")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["maxUnavailable"] == 1

    # Every STREAMSERVER_* variable is one the server reads (a flag's variable).
    from streamserver.cli import FLAGS

    known = {"STREAMSERVER_" + name.upper() for name, _, _ in FLAGS}
    for env in c["env"]:
        if env["name"].startswith("STREAMSERVER_"):
            assert env["name"] in known, env["name"]


def test_probes_ask_ready_and_health(objects):
    c = container(one(objects, "Deployment", "streamserver"), "streamserver")
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    assert c["startupProbe"]["httpGet"]["path"] == "/health"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert port_number(c, c[probe]["httpGet"]["port"]) == 8000


def test_a_pod_stops_only_after_its_streams_drained(objects, monkeypatch):
    from streamserver.cli import SHUTDOWN_BACKSTOP_SECONDS
    from streamserver.ops.drain import ABORT_WAIT_SECONDS

    deployment = one(objects, "Deployment", "streamserver")
    c = container(deployment, "streamserver")
    drain = float(args_value(c["args"], "--drain-seconds"))  # passed explicitly, not left to the default
    assert parsed_server_args(objects, monkeypatch).drain_seconds == drain
    pause = prestop_sleep(c)
    assert 0 < pause <= 30
    # SIGTERM comes after the preStop pause; then the drain, the cut streams' closes, uvicorn's stop.
    budget = pause + drain + ABORT_WAIT_SECONDS + SHUTDOWN_BACKSTOP_SECONDS
    assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > budget
    rolling = deployment["spec"]["strategy"]["rollingUpdate"]
    assert deployment["spec"]["strategy"]["type"] == "RollingUpdate"
    assert rolling["maxUnavailable"] == 0 and rolling["maxSurge"] >= 1
    assert "replicas" not in deployment["spec"]  # the ScaledObject's HPA owns the count


def test_the_database_url_and_the_token_come_from_a_secret_kept_out_of_the_manifests(objects):
    c = container(one(objects, "Deployment", "streamserver"), "streamserver")
    (secret,) = [d for d in yaml.safe_load_all((K8S / "secret.example.yaml").read_text()) if d]
    assert secret["kind"] == "Secret"
    assert secret["metadata"]["namespace"] == kustomization()["namespace"]

    db = env_var(c, "STREAMSERVER_JOBS_DB")["valueFrom"]["secretKeyRef"]
    assert db["name"] == secret["metadata"]["name"] and not db.get("optional", False)
    assert secret["stringData"][db["key"]].startswith("postgresql://")
    token = env_var(c, "STREAMSERVER_API_TOKEN")["valueFrom"]["secretKeyRef"]
    assert token["name"] == secret["metadata"]["name"] and token["key"] in secret["stringData"]
    assert not any(arg.startswith("--jobs-db") or arg.startswith("--api-token") for arg in c["args"])

    assert not [o for o in objects if o["kind"] == "Secret"]  # the real one is made by hand, not from git
    assert "postgresql://" not in json.dumps(objects)


def test_models_are_cached_on_a_pod_volume_and_prometheus_finds_the_pods(objects):
    deployment = one(objects, "Deployment", "streamserver")
    c = container(deployment, "streamserver")
    cache = env_var(c, "STREAMSERVER_CACHE_DIR")["value"]
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    mounts = [m for m in c["volumeMounts"] if Path(cache).is_relative_to(m["mountPath"])]
    assert len(mounts) == 1 and "emptyDir" in volumes[mounts[0]["name"]]

    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == port_number(c, "http")
    assert annotations["prometheus.io/path"] == "/metrics"


# -- autoscaling --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def exported_metrics(tmp_path_factory) -> set[str]:
    """Every metric and sample name a server's /metrics carries (built with fake GPUs)."""
    from streamserver.config import ServerConfig
    from streamserver.server import Server
    from tests.fakes import FakeNvml, fake_loader

    db = tmp_path_factory.mktemp("jobs") / "jobs.sqlite"
    server = Server.build(ServerConfig(jobs_db=str(db)), fake_loader, nvml_factory=lambda: FakeNvml(1, 16.0))
    try:
        names = set()
        for family in server.metrics.registry.collect():
            names.add(family.name)
            names.update(sample.name for sample in family.samples)
        return names
    finally:
        server.shutdown()


def test_the_scaled_object_scales_the_server_deployment_on_real_metrics(objects, exported_metrics, tmp_path):
    from streamserver.jobs.store import STATUSES

    scaled = one(objects, "ScaledObject", "streamserver")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    spec = scaled["spec"]
    target = spec["scaleTargetRef"]
    assert target["name"] == "streamserver" and target.get("kind", "Deployment") == "Deployment"
    assert target.get("apiVersion", "apps/v1") == "apps/v1"
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    assert set(spec) <= {"scaleTargetRef", "pollingInterval", "cooldownPeriod", "idleReplicaCount",
                         "minReplicaCount", "maxReplicaCount", "fallback", "advanced", "triggers"}

    namespace = kustomization()["namespace"]
    queries = {}
    for trigger in spec["triggers"]:
        assert set(trigger) <= {"type", "name", "metadata", "metricType", "authenticationRef", "useCachedMetrics"}
        assert trigger["type"] == "prometheus"
        assert trigger.get("metricType", "AverageValue") in {"AverageValue", "Value"}
        metadata = trigger["metadata"]
        assert all(isinstance(v, str) for v in metadata.values()), metadata  # the CRD: map of strings
        assert metadata["serverAddress"].startswith(("http://", "https://"))
        assert float(metadata["threshold"]) > 0
        query = metadata["query"]
        for metric in re.findall(r"\bstreamserver_\w+", query):
            assert metric in exported_metrics, f"{metric} is not a metric the server exports"
        for ns in re.findall(r'namespace="([^"]*)"', query):
            assert ns == namespace, "the query's namespace must follow kustomization.yaml"
        queries[trigger["name"]] = query

    slots = queries["slots"]
    assert "streamserver_max_connections" in slots and "streamserver_free_slots" in slots
    files = queries["files"]
    assert "streamserver_jobs" in files
    assert re.search(r'status="(\w+)"', files).group(1) == "queued" and "queued" in STATUSES
    assert files.startswith("max(")  # every pod reports the whole shared queue

    if shutil.which("promtool"):
        rules = {"groups": [{"name": "keda", "rules": [
            {"record": f"keda:{name}", "expr": query} for name, query in queries.items()]}]}
        path = tmp_path / "rules.yaml"
        path.write_text(yaml.safe_dump(rules))
        check = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True,
                               timeout=60)
        assert check.returncode == 0, check.stdout + check.stderr


# -- HAProxy ------------------------------------------------------------------------------------

def test_haproxy_keeps_the_rules_of_the_plain_haproxy_config(objects):
    sections = haproxy_sections(haproxy_cfg(objects))
    backend = sections["backend streamservers"]
    assert "balance leastconn" in backend
    assert "option httpchk GET /ready" in backend
    assert "http-check expect status 200" in backend
    defaults = sections["defaults"]
    assert any(re.fullmatch(r"retry-on .*\b503\b.*", line) for line in defaults)
    assert any(line.startswith("option redispatch") for line in defaults)
    assert any(line.startswith("timeout tunnel ") for line in defaults)
    # The same defaults as deploy/haproxy/haproxy.cfg, the error page aside.
    plain = haproxy_sections((HAPROXY_DIR / "haproxy.cfg").read_text())["defaults"]
    strip = lambda lines: [line for line in lines if not line.startswith("errorfile ")]  # noqa: E731
    assert strip(defaults) == strip(plain)


def test_haproxy_finds_every_server_pod_through_the_headless_service(objects, monkeypatch):
    sections = haproxy_sections(haproxy_cfg(objects))
    backend = sections["backend streamservers"]
    (template,) = [line for line in backend if line.startswith("server-template ")]
    _, prefix, count, address = template.split()[:4]
    service = one(objects, "Service", "streamserver")
    (port,) = service["spec"]["ports"]
    assert address == f"streamserver.{kustomization()['namespace']}.svc.cluster.local:{port['port']}"
    deployment = one(objects, "Deployment", "streamserver")
    scaled = one(objects, "ScaledObject", "streamserver")
    assert int(count) >= scaled["spec"]["maxReplicaCount"] + deployment["spec"]["strategy"]["rollingUpdate"]["maxSurge"]

    (default_server,) = [line.split() for line in backend if line.startswith("default-server ")]
    resolvers = default_server[default_server.index("resolvers") + 1]
    assert f"resolvers {resolvers}" in sections
    assert default_server[default_server.index("init-addr") + 1] == "none"  # start before DNS answers
    # maxconn per server = the pod's slots: per-GPU connections x its one GPU.
    config = parsed_server_args(objects, monkeypatch)
    gpus = int(container(deployment, "streamserver")["resources"]["limits"]["nvidia.com/gpu"])
    assert int(default_server[default_server.index("maxconn") + 1]) == config.max_connections_per_gpu * gpus


def test_haproxy_pods_mount_their_config_and_stop_softly(objects):
    deployment = one(objects, "Deployment", "haproxy")
    c = container(deployment, "haproxy")
    assert c["image"] == "haproxy:2.6"
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    (mount,) = [m for m in c["volumeMounts"] if volumes[m["name"]].get("configMap", {}).get("name") == "haproxy-config"]
    assert mount["mountPath"] == str(Path(HAPROXY_CFG_PATH).parent)

    data = one(objects, "ConfigMap", "haproxy-config")["data"]
    sections = haproxy_sections(data["haproxy.cfg"])
    (errorfile,) = [line.split()[2] for line in sections["defaults"] if line.startswith("errorfile 503 ")]
    assert Path(errorfile).parent == Path(mount["mountPath"])
    assert data[Path(errorfile).name] == (HAPROXY_DIR / "errors" / "streamserver-503.http").read_bytes().decode()

    # Soft stop after the pause, hard stop before the grace period ends.
    command = c["lifecycle"]["preStop"]["exec"]["command"]
    assert "kill -USR1 1" in command[-1]
    (hard,) = [line.split()[1] for line in sections["global"] if line.startswith("hard-stop-after ")]
    assert hard.endswith("s")
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > prestop_sleep(c) + float(hard[:-1])

    (bind,) = [line for line in sections["frontend asr"] if line.startswith("bind ")]
    service = one(objects, "Service", "haproxy")
    (port,) = service["spec"]["ports"]
    assert bind.split()[1].endswith(f":{port_number(c, port['targetPort'])}")
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    for probe in ("readinessProbe", "livenessProbe"):
        get = c[probe]["httpGet"]
        (stats_bind,) = [line for line in sections["frontend stats"] if line.startswith("bind ")]
        assert stats_bind.split()[1].endswith(f":{port_number(c, get['port'])}")
        assert f"monitor-uri {get['path']}" in sections["frontend stats"]


def local_haproxy_cfg(objects: list[dict], tmp: Path, nameserver: str | None = None,
                      listen: int | None = None, stats: int | None = None) -> tuple[Path, str]:
    """The ConfigMap's files in `tmp`, with this machine's paths (and, given, its DNS server and ports)."""
    data = one(objects, "ConfigMap", "haproxy-config")["data"]
    for name, text in data.items():
        (tmp / name).write_bytes(text.encode())
    text = data["haproxy.cfg"].replace(str(Path(HAPROXY_CFG_PATH).parent) + "/", f"{tmp}/")
    socket_path = str(tmp / "admin.sock")
    text = re.sub(r"stats socket \S+", f"stats socket {socket_path}", text)
    if nameserver:
        text = text.replace("parse-resolv-conf", f"nameserver test {nameserver}")
    if listen:
        text = text.replace("bind 0.0.0.0:8080", f"bind 127.0.0.1:{listen}")
    if stats:
        text = text.replace("bind 0.0.0.0:8404", f"bind 127.0.0.1:{stats}")
    path = tmp / "haproxy.cfg"
    path.write_text(text)
    return path, socket_path


@pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy is not installed (apt)")
def test_haproxy_accepts_its_config(objects, tmp_path):
    path, _ = local_haproxy_cfg(objects, tmp_path)
    check = subprocess.run(["haproxy", "-c", "-f", str(path)], capture_output=True, text=True, timeout=60)
    output = check.stdout + check.stderr
    assert check.returncode == 0, output
    assert "WARNING" not in output and "ALERT" not in output, output


# -- HAProxy with DNS discovery, for real -------------------------------------------------------

class TinyDNS:
    """Answers A queries for one name with the addresses in `self.addresses` (UDP, on 127.0.0.1)."""

    def __init__(self, name: str) -> None:
        self.name = name.rstrip(".").lower()
        self.addresses: list[str] = []
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.stopped = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopped:
            try:
                query, peer = self.sock.recvfrom(4096)
            except (TimeoutError, OSError):
                continue
            answer = self._answer(query)
            if answer:
                self.sock.sendto(answer, peer)

    def _answer(self, query: bytes) -> bytes | None:
        if len(query) < 12:
            return None
        ident, _flags, qdcount = struct.unpack(">HHH", query[:6])
        if qdcount != 1:
            return None
        labels, i = [], 12
        while query[i]:
            labels.append(query[i + 1:i + 1 + query[i]].decode().lower())
            i += 1 + query[i]
        qtype, _qclass = struct.unpack(">HH", query[i + 1:i + 5])
        question = query[12:i + 5]
        if ".".join(labels) != self.name:
            return struct.pack(">HHHHHH", ident, 0x8583, 1, 0, 0, 0) + question  # NXDOMAIN
        records = list(self.addresses) if qtype == 1 else []
        answers = b"".join(struct.pack(">HHHIH", 0xC00C, 1, 1, 1, 4) + socket.inet_aton(a) for a in records)
        return struct.pack(">HHHHHH", ident, 0x8580, 1, len(records), 0, 0) + question + answers

    def close(self) -> None:
        self.stopped = True
        self.thread.join(5)
        self.sock.close()


def start_fake_server(host: str, port: int, log: Path) -> subprocess.Popen:
    """`python -m tests.fake_server` (the real serve path, fake models) on host:port, 2 slots."""
    out = log.open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.fake_server", "--host", host, "--port", str(port), "--simulate-gpus", "1x16",
         "--max-connections-per-gpu", "2", "--refuse-when-full", "http", "--pcm-input", "--drain-seconds", "10"],
        cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=out, stderr=subprocess.STDOUT)
    out.close()
    return proc


def wait_until(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def slot_addresses(stats_socket: str) -> dict[str, str]:
    """{server address: status} for the template's slots that have an address."""
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(stats_socket)
        s.sendall(b"show servers state streamservers\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    rows = [line.split() for line in data.decode().splitlines() if len(line.split()) > 5 and not line.startswith("#")]
    # Columns: be_id be_name srv_id srv_name srv_addr srv_op_state ... (op_state 2: running)
    return {r[4]: r[5] for r in rows if r[4] not in ("-", "0.0.0.0")}


def connections(host: str, port: int) -> int:
    return httpx.get(f"http://{host}:{port}/gpu-status", timeout=5).json()["total_connections"]


@pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy is not installed (apt)")
@pytest.mark.skipif(sys.platform != "linux", reason="needs the 127.0.0.0/8 loopback addresses of Linux")
def test_haproxy_discovers_pods_by_dns_and_keeps_streams_of_a_pod_that_leaves(objects, tmp_path):
    from tests.live import drain_until_closed, open_asr, recv_json

    service = one(objects, "Service", "streamserver")
    (port,) = service["spec"]["ports"]
    name = f"streamserver.{kustomization()['namespace']}.svc.cluster.local"
    with socket.socket() as s:  # one port, free on every loopback address used below
        s.bind(("0.0.0.0", 0))
        server_port = s.getsockname()[1]
    pods = ["127.0.0.2", "127.0.0.3"]
    dns = TinyDNS(name)
    procs, haproxy = [], None
    try:
        procs = [start_fake_server(ip, server_port, tmp_path / f"{ip}.log") for ip in pods]
        for ip in pods:
            wait_until(lambda ip=ip: answers(f"http://{ip}:{server_port}/health"), 60)
        dns.addresses = list(pods)

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            listen = s.getsockname()[1]
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            stats_port = s.getsockname()[1]
        cfg, stats = local_haproxy_cfg(objects, tmp_path, nameserver=f"127.0.0.1:{dns.port}", listen=listen,
                                       stats=stats_port)
        cfg.write_text(cfg.read_text().replace(f"{name}:{port['port']}", f"{name}:{server_port}"))
        haproxy = subprocess.Popen(["haproxy", "-db", "-f", str(cfg)], stdout=(tmp_path / "haproxy.log").open("w"),
                                   stderr=subprocess.STDOUT)
        # Both pods get a slot from the DNS answer and pass the /ready check.
        wait_until(lambda: os.path.exists(stats) and slot_addresses(stats) == {ip: "2" for ip in pods})
        base = f"127.0.0.1:{listen}"
        first = open_asr(base)
        assert recv_json(first)["type"] == "config"
        second = open_asr(base)
        assert recv_json(second)["type"] == "config"
        assert [connections(ip, server_port) for ip in pods] == [1, 1]  # least connections

        # The second pod leaves the DNS answer (its Pod object is gone): no new streams go there,
        # and the stream it still has goes on to its normal end.
        dns.addresses = pods[:1]
        wait_until(lambda: set(slot_addresses(stats)) == {pods[0]})
        third = open_asr(base)
        assert recv_json(third)["type"] == "config"
        assert [connections(ip, server_port) for ip in pods] == [2, 1]
        for ws in (first, second):  # one of them on the pod that left
            ws.send(b"\x00\x00" * 1600)
            ws.send(b"")
            assert [m.get("type") for m in drain_until_closed(ws)][-1] == "ready_to_stop"
        third.close()
        wait_until(lambda: [connections(ip, server_port) for ip in pods] == [0, 0])
    finally:
        if haproxy is not None:
            haproxy.terminate()
            haproxy.wait(10)
        for proc in procs:
            proc.send_signal(signal.SIGINT)
        for proc in procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        dns.close()


# -- the image ----------------------------------------------------------------------------------

def test_the_dockerfile_installs_what_the_readme_installs():
    dockerfile = (ROOT / "Dockerfile").read_text()
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    (torch,) = [d for d in pyproject["project"]["dependencies"] if d.startswith("torch==")]
    assert f"pip install {torch}" in dockerfile.replace('${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} ', "")
    assert re.search(r'^RUN pip install "\.', dockerfile, re.M)
    assert re.search(r"^FROM \$\{PYTHON_IMAGE\}", dockerfile, re.M)
    assert "ARG PYTHON_IMAGE=python:3.11-slim-bookworm" in dockerfile
    assert re.search(r"^EXPOSE 8000$", dockerfile, re.M)
    assert re.search(r'^CMD \["streamserver", "--host", "0.0.0.0"\]$', dockerfile, re.M)

    # The build context keeps what `pip install .` needs: the packages and the readme.
    allowed = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert "*" in allowed
    assert f"!{pyproject['project']['readme']}" in allowed and "!pyproject.toml" in allowed
    for pattern in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]:
        top = pattern.rstrip("*")
        assert f"!{top}/" in allowed, f"{top}/ is kept out of the Docker build context"
