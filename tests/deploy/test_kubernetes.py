"""The Kustomize overlays: they render, validate against Kubernetes 1.32's schemas, and say
what the deployment needs (non-root, gRPC probes, headless upstreams, who may reach whom, each
service on its own image, the shared store a bounded cache that only its users reach)."""

from __future__ import annotations

import copy
import re
import shlex
import shutil
import subprocess
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate  # type: ignore[import-untyped]  # no py.typed
import pytest
import yaml  # type: ignore[import-untyped]  # types-PyYAML is not a dev dependency

from services.common.config import (
    BlendingConfig,
    FeaturesConfig,
    GatewayConfig,
    ReconstructionConfig,
    ServiceConfig,
)
from tests.deploy.test_docker import SERVICE_TARGETS, WHOLE_TARGETS, pyproject, stages

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ("cpu", "gpu")
# The schemas of the Kubernetes that the installed kubectl (v1.32, kustomize v5.5) speaks.
KUBERNETES_VERSION = "1.32.0"
SERVICES = ("gateway", "features", "blending", "reconstruction")
INTERNAL = ("features", "blending", "reconstruction")
GPU_SERVICES = ("features", "reconstruction")
GPU = "nvidia.com/gpu"
CONFIGS: dict[str, type[ServiceConfig]] = {
    "gateway": GatewayConfig,
    "features": FeaturesConfig,
    "blending": BlendingConfig,
    "reconstruction": ReconstructionConfig,
}
# Every call the code makes between the pods: (caller, callee), on the callee's gRPC port.
# The gateway sends keys and weights; blending fetches the sources' tensors from features
# (FetchTensors) and reconstruction its targets from blending (FetchTargets).
CALLS = {
    ("gateway", "features"),
    ("gateway", "blending"),
    ("gateway", "reconstruction"),
    ("blending", "features"),
    ("reconstruction", "blending"),
}
REGISTRY = "registry.example.com/styleblend"
# The shared store (STYLEBLEND_STORE): a Redis-protocol server in the cluster that the gateway
# (uploads), features (images sent, feature tensors) and blending (images sent) use.
# Reconstruction uses none, and the store calls no one.
STORE = "redis"
STORE_PORT = 6379
STORE_USERS = ("gateway", "features", "blending")
STORE_CALLS = {(user, STORE) for user in STORE_USERS}
CONFIG_MAP = "styleblend-config"  # the services' settings; kustomize appends a hash

Doc = dict[str, Any]
KUBECTL = shutil.which("kubectl")
pytestmark = pytest.mark.skipif(KUBECTL is None, reason="kubectl (with kustomize) is not installed")


@cache
def render(target: str) -> tuple[Doc, ...]:
    """`kubectl kustomize` of an overlay (or "base"), as parsed documents."""
    folder = K8S / "base" if target == "base" else K8S / "overlays" / target
    assert KUBECTL is not None
    out = subprocess.run(
        [KUBECTL, "kustomize", str(folder)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, f"kubectl kustomize {folder} failed:\n{out.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(out.stdout) if doc)


def of_kind(docs: tuple[Doc, ...], kind: str) -> dict[str, Doc]:
    return {doc["metadata"]["name"]: doc for doc in docs if doc["kind"] == kind}


def pod_specs(docs: tuple[Doc, ...]) -> Iterator[tuple[str, Doc]]:
    for doc in docs:
        if doc["kind"] in ("Deployment", "Job"):
            yield f"{doc['kind']}/{doc['metadata']['name']}", doc["spec"]["template"]["spec"]


def main_container(deployment: Doc) -> Doc:
    name = deployment["metadata"]["name"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["name"] == name
    return container


def generated(docs: tuple[Doc, ...], name: str) -> Doc:
    """The ConfigMap a configMapGenerator made from `name` (its name is `name-HASH`)."""
    (config_map,) = [
        doc
        for doc in of_kind(docs, "ConfigMap").values()
        if doc["metadata"]["name"].rsplit("-", 1)[0] == name
    ]
    return config_map


def config(docs: tuple[Doc, ...]) -> dict[str, str]:
    data: dict[str, str] = generated(docs, CONFIG_MAP)["data"]
    return data


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def pod_labels(deployment: Doc) -> dict[str, str]:
    labels: dict[str, str] = deployment["spec"]["template"]["metadata"]["labels"]
    return labels


def grpc_port(deployment: Doc) -> int:
    (port,) = [p for p in main_container(deployment)["ports"] if p["name"] == "grpc"]
    number: int = port["containerPort"]
    return number


def environment(docs: tuple[Doc, ...], container: Doc) -> dict[str, str]:
    """The container's plain variables: the ConfigMap's (envFrom), then its own `env` values."""
    name = generated(docs, CONFIG_MAP)["metadata"]["name"]
    assert {"configMapRef": {"name": name}} in container["envFrom"], container["name"]
    env = dict(config(docs))
    env.update({e["name"]: e["value"] for e in container.get("env", []) if "value" in e})
    return env


def mebibytes(quantity: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(Mi|Gi)", quantity)
    assert match is not None, quantity
    return float(match.group(1)) * (1024 if match.group(2) == "Gi" else 1)


def services_of(docs: tuple[Doc, ...]) -> dict[str, Doc]:
    """The four services' Deployments (not the store's)."""
    deployments = of_kind(docs, "Deployment")
    return {name: deployments[name] for name in SERVICES}


# --- rendering and schemas ------------------------------------------------------------------


@pytest.mark.parametrize("target", ["base", *OVERLAYS])
def test_every_document_validates_strictly(target: str) -> None:
    docs = render(target)
    assert {"Deployment", "Service", "NetworkPolicy", "PodDisruptionBudget"} <= {
        doc["kind"] for doc in docs
    }
    for doc in docs:
        where = f"{target}: {doc['kind']}/{doc['metadata']['name']}"
        try:
            version = kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as error:
            path = ".".join(str(part) for part in error.path)
            pytest.fail(f"{where}: {path}: {error.message}")
        assert version == "1.32", f"{where} was checked against {version}, not 1.32"


def test_strict_validation_rejects_a_misspelt_field() -> None:
    """The check above can fail: a field Kubernetes does not know is refused."""
    deployment = copy.deepcopy(of_kind(render("cpu"), "Deployment")["features"])
    kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


# --- pods -------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", OVERLAYS)
def test_every_container_is_non_root_with_a_read_only_root(target: str) -> None:
    specs = dict(pod_specs(render(target)))
    assert set(specs) == {f"Deployment/{name}" for name in (*SERVICES, STORE)} | {
        "Job/model-export"
    }
    for where, spec in specs.items():
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True, where
        assert pod["runAsUser"] > 0, where
        assert spec["automountServiceAccountToken"] is False, where
        volumes = {volume["name"]: volume for volume in spec["volumes"]}
        for container in spec.get("initContainers", []) + spec["containers"]:
            name = f"{where} {container['name']}"
            security = container["securityContext"]
            assert security["readOnlyRootFilesystem"] is True, name
            assert security["allowPrivilegeEscalation"] is False, name
            assert security["capabilities"]["drop"] == ["ALL"], name
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container["resources"][bound]), (name, bound)
        if where == f"Deployment/{STORE}":
            continue  # not Python; what it may write is test_the_store_is_a_bounded_cache's
        for container in spec["containers"]:  # Python needs a writable /tmp
            (tmp,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
            assert "emptyDir" in volumes[tmp["name"]], where


@pytest.mark.parametrize("target", OVERLAYS)
def test_deployments_run_their_service_with_grpc_probes_on_the_grpc_port(target: str) -> None:
    docs = render(target)
    assert set(of_kind(docs, "Deployment")) == {*SERVICES, STORE}
    settings = config(docs)
    for name, deployment in services_of(docs).items():
        assert selects(deployment["spec"]["selector"]["matchLabels"], pod_labels(deployment))
        container = main_container(deployment)
        assert container["args"] == [name]  # the image's entry point is `python -m services`
        port = grpc_port(deployment)
        assert port == int(settings[f"STYLEBLEND_{name.upper()}_PORT"]), name
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"] == {"port": port}, (name, probe)
        config_map = generated(docs, CONFIG_MAP)["metadata"]["name"]
        assert {"configMapRef": {"name": config_map}} in container["envFrom"], name


@pytest.mark.parametrize("target", OVERLAYS)
def test_config_names_only_real_settings_and_listens_everywhere(target: str) -> None:
    settings = config(render(target))
    known = {
        f"STYLEBLEND_{field.upper()}"
        for cls in (GatewayConfig, FeaturesConfig, BlendingConfig, ReconstructionConfig)
        for field in cls.model_fields
    }
    assert set(settings) - known == set(), "ConfigMap keys that no service reads"
    assert settings["STYLEBLEND_HOST"] == "0.0.0.0"


@pytest.mark.parametrize("target", OVERLAYS)
def test_gateway_token_comes_from_a_secret(target: str) -> None:
    gateway = main_container(of_kind(render(target), "Deployment")["gateway"])
    (token,) = [env for env in gateway["env"] if env["name"] == "STYLEBLEND_GATEWAY_TOKEN"]
    reference = token["valueFrom"]["secretKeyRef"]
    assert reference["name"] and reference["key"]
    assert not reference.get("optional", False), "a missing Secret must stop the pod"


@pytest.mark.parametrize("target", OVERLAYS)
def test_the_gateway_and_the_services_share_the_internal_secret(target: str) -> None:
    """The internal services listen on every interface (STYLEBLEND_HOST=0.0.0.0), so they
    refuse to start without a credential; the gateway sends the same one."""
    deployments = of_kind(render(target), "Deployment")
    references = []
    for name in SERVICES:
        container = main_container(deployments[name])
        (secret,) = [
            env for env in container.get("env", []) if env["name"] == "STYLEBLEND_INTERNAL_TOKEN"
        ]
        reference = secret["valueFrom"]["secretKeyRef"]
        assert not reference.get("optional", False), f"{name}: a missing Secret must stop the pod"
        references.append((reference["name"], reference["key"]))
    assert len(set(references)) == 1, references
    (public,) = [
        env
        for env in main_container(deployments["gateway"])["env"]
        if env["name"] == "STYLEBLEND_GATEWAY_TOKEN"
    ]
    assert references[0][0] != public["valueFrom"]["secretKeyRef"]["name"], "not the public one"


@pytest.mark.parametrize("target", OVERLAYS)
def test_replicas_that_keep_references_advertise_their_own_address(target: str) -> None:
    """features and blending keep what they made, and a fetch must reach the replica that
    made it: each advertises its pod IP and gRPC port, which travel with its references."""
    deployments = of_kind(render(target), "Deployment")
    for name in ("features", "blending"):
        container = main_container(deployments[name])
        env = {e["name"]: e for e in container["env"]}
        assert env["POD_IP"]["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}, name
        names = [e["name"] for e in container["env"]]
        assert names.index("POD_IP") < names.index("STYLEBLEND_ADVERTISE_ADDRESS"), name
        port = grpc_port(deployments[name])
        assert env["STYLEBLEND_ADVERTISE_ADDRESS"]["value"] == f"$(POD_IP):{port}", name
    for name in ("gateway", "reconstruction"):  # they keep nothing others fetch
        others = {e["name"] for e in main_container(deployments[name]).get("env", [])}
        assert "STYLEBLEND_ADVERTISE_ADDRESS" not in others, name


# --- load balancing ---------------------------------------------------------------------------


@pytest.mark.parametrize("target", OVERLAYS)
def test_callers_dial_headless_services_of_what_they_call(target: str) -> None:
    """The gateway dials all three; blending dials features and reconstruction blending, with
    the same variables (the ConfigMap gives them to every container)."""
    docs = render(target)
    services = of_kind(docs, "Service")
    deployments = of_kind(docs, "Deployment")
    for caller, callee in sorted(CALLS):
        variable = f"STYLEBLEND_{callee.upper()}_ADDRESS"
        assert f"{callee}_address" in CONFIGS[caller].model_fields, f"{caller} reads no {variable}"
        address = environment(docs, main_container(deployments[caller]))[variable]
        assert address.startswith("dns:///"), address
        host, port = address.removeprefix("dns:///").rsplit(":", 1)
        service = services[host]
        assert service["spec"].get("clusterIP") == "None", f"{host} is not headless"
        assert selects(service["spec"]["selector"], pod_labels(deployments[callee]))
        ports = [p for p in service["spec"]["ports"] if p["port"] == int(port)]
        assert len(ports) == 1, f"{host} has no port {port}"
        assert ports[0]["targetPort"] == "grpc"
        # Headless: DNS gives pod addresses, so the dialled port must be the container's.
        assert grpc_port(deployments[callee]) == int(port)


@pytest.mark.parametrize("target", OVERLAYS)
def test_every_service_selects_a_deployment(target: str) -> None:
    docs = render(target)
    deployments = of_kind(docs, "Deployment")
    for name, service in of_kind(docs, "Service").items():
        chosen = [
            d
            for d, deployment in deployments.items()
            if selects(service["spec"]["selector"], pod_labels(deployment))
        ]
        assert len(chosen) == 1, (name, chosen)
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in {
                p["name"] for p in main_container(deployments[chosen[0]])["ports"]
            }, name


# --- who may reach whom -----------------------------------------------------------------------

OUTSIDE: dict[str, str] = {}  # a client outside the namespace: no labels any selector matches
NAMESPACE = {"kubernetes.io/metadata.name": "styleblend"}  # what Kubernetes labels ours with


def _peer_matches(peer: Doc, labels: dict[str, str]) -> bool:
    if "ipBlock" in peer:
        return not labels  # an address range: only ever outside traffic here
    if not labels:
        # The outside is no pod of ours and in no namespace named here (monitoring is not
        # it); only a peer of every namespace and every pod in it takes it in.
        return "namespaceSelector" in peer and not (
            peer["namespaceSelector"].get("matchLabels")
            or peer.get("podSelector", {}).get("matchLabels")
        )
    # A namespace selector names another namespace (cluster DNS, monitoring), or takes in ours.
    namespaces = peer.get("namespaceSelector", {}).get("matchLabels", {})
    if not selects(namespaces, NAMESPACE):
        return False
    return selects(peer.get("podSelector", {}).get("matchLabels", {}), labels)


def _ports_match(rule: Doc, port: int, names: set[str]) -> bool:
    """`names`: what the pod on the receiving end calls `port` (a rule may name it)."""
    if "ports" not in rule:
        return True
    for entry in rule["ports"]:
        given = entry.get("port")
        if given is None or given in names:  # no port: all of them
            return True
        if isinstance(given, int) and given <= port <= entry.get("endPort", given):
            return True
    return False


def allowed(docs: tuple[Doc, ...], source: dict[str, str], target: str, port: int) -> bool:
    """NetworkPolicy semantics: a direction is open only if every side that some policy
    isolates admits the connection through one of its rules."""
    deployments = of_kind(docs, "Deployment")
    policies = list(of_kind(docs, "NetworkPolicy").values())
    target_labels = pod_labels(deployments[target])
    names = {
        p["name"]
        for p in main_container(deployments[target])["ports"]
        if p["containerPort"] == port
    }

    def admitted(labels: dict[str, str], direction: str, peer: dict[str, str]) -> bool:
        chosen = [
            p
            for p in policies
            if direction in p["spec"]["policyTypes"]
            and selects(p["spec"]["podSelector"].get("matchLabels", {}), labels)
        ]
        if not chosen:
            return True  # not isolated in this direction
        key, peers = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
        for policy in chosen:
            for rule in policy["spec"].get(key, []):
                # No peers listed: any peer; otherwise one of them must match.
                if _ports_match(rule, port, names) and (
                    not rule.get(peers) or any(_peer_matches(p, peer) for p in rule[peers])
                ):
                    return True
        return False

    ingress = admitted(target_labels, "Ingress", source)
    egress = not source or admitted(source, "Egress", target_labels)
    return ingress and egress


@pytest.mark.parametrize("target", OVERLAYS)
def test_only_the_gateway_is_reachable_from_outside(target: str) -> None:
    docs = render(target)
    assert allowed(docs, OUTSIDE, "gateway", 50051)
    assert allowed(docs, OUTSIDE, "gateway", 8080)
    assert not allowed(docs, OUTSIDE, "gateway", 50052)
    for upstream in INTERNAL:
        port = grpc_port(of_kind(docs, "Deployment")[upstream])
        assert not allowed(docs, OUTSIDE, upstream, port), upstream
    assert not allowed(docs, OUTSIDE, STORE, STORE_PORT)


@pytest.mark.parametrize("target", OVERLAYS)
def test_each_pod_reaches_exactly_what_it_calls(target: str) -> None:
    """Inside the namespace a connection is open only for a call the code makes, on the
    callee's gRPC port (the store's port for the store): not the other way round, not to
    another port, not from the Job, and nothing from the store."""
    docs = render(target)
    deployments = of_kind(docs, "Deployment")
    job = of_kind(docs, "Job")["model-export"]["spec"]["template"]["metadata"]["labels"]
    sources = {name: pod_labels(deployment) for name, deployment in deployments.items()}
    sources["model-export"] = job
    for source, labels in sources.items():
        for callee, deployment in deployments.items():
            for port in main_container(deployment)["ports"]:
                number = port["containerPort"]
                expected = ((source, callee) in CALLS and port["name"] == "grpc") or (
                    (source, callee) in STORE_CALLS and number == STORE_PORT
                )
                assert allowed(docs, labels, callee, number) == expected, (source, callee, number)


@pytest.mark.parametrize("target", OVERLAYS)
def test_the_callers_and_only_they_may_resolve_names(target: str) -> None:
    """A caller dials a Service's DNS name (a headless one, or the store's `redis`), so it
    needs cluster DNS; the others (the store, the Job) send nothing at all."""
    docs = render(target)
    callers = {caller for caller, _ in CALLS | STORE_CALLS}
    egress = [
        p for p in of_kind(docs, "NetworkPolicy").values() if "Egress" in p["spec"]["policyTypes"]
    ]
    for name, labels in {
        **{n: pod_labels(d) for n, d in of_kind(docs, "Deployment").items()},
        "model-export": of_kind(docs, "Job")["model-export"]["spec"]["template"]["metadata"][
            "labels"
        ],
    }.items():
        rules = [
            rule
            for policy in egress
            if selects(policy["spec"]["podSelector"].get("matchLabels", {}), labels)
            for rule in policy["spec"].get("egress", [])
        ]
        dns = [
            rule
            for rule in rules
            if any(
                peer.get("podSelector", {}).get("matchLabels") == {"k8s-app": "kube-dns"}
                for peer in rule.get("to", [])
            )
        ]
        if name in callers:
            assert dns, f"{name} cannot resolve the Services it calls"
            assert all({p["port"] for p in rule["ports"]} == {53} for rule in dns), name
        else:
            assert not rules, f"{name} calls no one, yet may send"


def test_the_reachability_model_can_say_yes_and_no() -> None:
    """Without the policies everything is open; with a deny-all nothing is."""
    docs = render("cpu")
    open_docs = tuple(d for d in docs if d["kind"] != "NetworkPolicy")
    assert allowed(open_docs, OUTSIDE, "features", 50052)
    deny = {
        "kind": "NetworkPolicy",
        "metadata": {"name": "deny"},
        "spec": {"podSelector": {}, "policyTypes": ["Ingress"]},
    }
    assert not allowed((*open_docs, deny), OUTSIDE, "gateway", 50051)


# --- the shared store -------------------------------------------------------------------------

Settings = dict[str, list[str]]


def _store_config_file(docs: tuple[Doc, ...]) -> tuple[Doc, str]:
    """The ConfigMap and key of the file the store's server is started with (its first
    argument, a path inside a mounted ConfigMap)."""
    deployment = of_kind(docs, "Deployment")[STORE]
    container = main_container(deployment)
    folder, _, key = container["args"][0].rpartition("/")
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == folder]
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    return of_kind(docs, "ConfigMap")[volumes[mount["name"]]["configMap"]["name"]], key


def _setting(settings: Settings, name: str, values: list[str]) -> None:
    """As the server reads a directive: each `save` schedule adds to the last, `save ""`
    clears them, anything else replaces what came before."""
    if name == "save" and values != [""]:
        kept = [] if settings.get("save") == [""] else settings.get("save", [])
        settings["save"] = kept + values
    else:
        settings[name] = values


def store_settings(docs: tuple[Doc, ...]) -> Settings:
    """The store's configuration as it would run: its config file, then the `--name value`
    arguments after the file's path, which override it."""
    config_map, key = _store_config_file(docs)
    settings: Settings = {}
    for line in config_map["data"][key].splitlines():
        if line.strip() and not line.strip().startswith("#"):
            name, *values = shlex.split(line)
            _setting(settings, name.lower(), values)
    for argument in " ".join(main_container(of_kind(docs, "Deployment")[STORE])["args"][1:]).split(
        "--"
    )[1:]:
        name, *values = shlex.split(argument) or [""]
        _setting(settings, name.lower(), values or [""])
    return settings


def redis_bytes(text: str) -> int:
    """A Redis memory size: 1gb is 2**30 bytes, 1g 10**9; a bare number is bytes."""
    match = re.fullmatch(r"(\d+)(b|k|kb|m|mb|g|gb)?", text.lower())
    assert match is not None, text
    units = {"b": 1, "k": 10**3, "kb": 2**10, "m": 10**6, "mb": 2**20, "g": 10**9, "gb": 2**30}
    return int(match.group(1)) * units[match.group(2) or "b"]


def store_problems(docs: tuple[Doc, ...]) -> list[str]:
    """What would make the store other than one bounded cache that keeps nothing on disk."""
    problems = []
    deployment = of_kind(docs, "Deployment")[STORE]
    settings = store_settings(docs)
    maxmemory = redis_bytes(settings.get("maxmemory", ["0"])[0])
    if maxmemory <= 0:
        problems.append("no maxmemory: nothing bounds the store")
    limit = main_container(deployment)["resources"]["limits"]["memory"]
    if mebibytes(limit) * 2**20 <= maxmemory:
        problems.append(f"memory limit {limit} is not above maxmemory: killed before evicting")
    if settings.get("maxmemory-policy") != ["allkeys-lru"]:
        problems.append(f"maxmemory-policy {settings.get('maxmemory-policy')}, not allkeys-lru")
    if settings.get("save") != [""]:  # no `save` at all: the server's default snapshots
        problems.append(f"snapshots: save {settings.get('save', 'by default')}")
    if settings.get("appendonly", ["no"]) != ["no"]:
        problems.append("an append-only file")
    for volume in deployment["spec"]["template"]["spec"]["volumes"]:
        if not {"emptyDir", "configMap"} & set(volume):
            problems.append(f"volume {volume['name']} outlives the pod")
    if deployment["spec"].get("replicas", 1) != 1:
        problems.append("more than one server: the keys would be split between them")
    if deployment["spec"].get("strategy", {}).get("type") != "Recreate":
        problems.append("a rollout would run two servers at once")
    return problems


@pytest.mark.parametrize("target", OVERLAYS)
def test_the_store_is_a_bounded_cache_that_keeps_nothing(target: str) -> None:
    """maxmemory with allkeys-lru below the container's limit, no snapshots, no append-only
    file, no volume that outlives the pod, one server: a cache, as the services expect (a
    key gone is recomputed or refused in words)."""
    docs = render(target)
    assert store_problems(docs) == []
    settings = store_settings(docs)
    assert settings["maxmemory"] == ["1gb"] and settings["maxmemory-policy"] == ["allkeys-lru"]


def _conf(docs: tuple[Doc, ...], change: Callable[[str], str]) -> None:
    config_map, key = _store_config_file(docs)
    config_map["data"][key] = change(config_map["data"][key])


def _store_container(docs: tuple[Doc, ...]) -> Doc:
    return main_container(of_kind(docs, "Deployment")[STORE])


def _store_pod(docs: tuple[Doc, ...]) -> Doc:
    spec: Doc = of_kind(docs, "Deployment")[STORE]["spec"]["template"]["spec"]
    return spec


STORE_FAULTS: dict[str, Callable[[tuple[Doc, ...]], object]] = {
    "no maxmemory": lambda docs: _conf(docs, lambda t: re.sub(r"(?m)^maxmemory .*$", "", t)),
    "volatile-lru": lambda docs: _conf(docs, lambda t: t.replace("allkeys-lru", "volatile-lru")),
    "default snapshots": lambda docs: _conf(docs, lambda t: t.replace('save ""', "")),
    "a snapshot schedule": lambda docs: _conf(docs, lambda t: t + "save 900 1\n"),
    "append-only file": lambda docs: _conf(
        docs, lambda t: t.replace("appendonly no", "appendonly yes")
    ),
    "append-only argument": lambda docs: _store_container(docs)["args"].extend(
        ["--appendonly", "yes"]
    ),
    "limit under maxmemory": lambda docs: _store_container(docs)["resources"]["limits"].update(
        memory="1Gi"
    ),
    "a persistent volume": lambda docs: _store_pod(docs)["volumes"].append(
        {"name": "disk", "persistentVolumeClaim": {"claimName": "redis"}}
    ),
    "two servers": lambda docs: of_kind(docs, "Deployment")[STORE]["spec"].update(replicas=2),
}


@pytest.mark.parametrize("fault", sorted(STORE_FAULTS))
def test_the_store_check_finds_each_fault(fault: str) -> None:
    docs = copy.deepcopy(render("cpu"))
    STORE_FAULTS[fault](docs)
    assert store_problems(docs), fault


@pytest.mark.parametrize("target", OVERLAYS)
def test_the_store_is_probed_on_its_port(target: str) -> None:
    container = _store_container(render(target))
    (port,) = container["ports"]
    assert port["containerPort"] == STORE_PORT
    for probe in ("readinessProbe", "livenessProbe"):
        command = " ".join(container[probe]["exec"]["command"])
        assert f"-p {STORE_PORT} ping" in command and "PONG" in command, (probe, command)


def store_address_problems(docs: tuple[Doc, ...]) -> list[str]:
    """Each user of the store must reach the store's Service, by name and port, through a
    setting its own config accepts; the values live STYLEBLEND_STORE_TTL_S seconds."""
    problems = []
    deployments = of_kind(docs, "Deployment")
    services = of_kind(docs, "Service")
    store = main_container(deployments[STORE])
    for name in STORE_USERS:
        env = environment(docs, main_container(deployments[name]))
        url = env.get("STYLEBLEND_STORE", "memory")
        address = urlsplit(url)
        if address.scheme != "redis":
            problems.append(f"{name}: STYLEBLEND_STORE={url}, not the cluster's store")
            continue
        service = services.get(address.hostname or "")
        if service is None or not selects(
            service["spec"]["selector"], pod_labels(deployments[STORE])
        ):
            problems.append(f"{name}: {address.hostname} is not the store's Service")
            continue
        ports = [p for p in service["spec"]["ports"] if p["port"] == (address.port or 6379)]
        targets = {
            p["containerPort"]
            for p in store["ports"]
            for given in ports
            if given["targetPort"] in (p["name"], p["containerPort"])
        }
        if targets != {STORE_PORT}:
            problems.append(f"{name}: {url} reaches no store port ({targets})")
        try:
            settings = CONFIGS[name](store=url, store_ttl_s=env.get("STYLEBLEND_STORE_TTL_S"))
        except ValueError as error:
            problems.append(f"{name}: its config refuses {url}: {error}")
            continue
        if settings.store_ttl_s <= 0:
            problems.append(f"{name}: store_ttl_s {settings.store_ttl_s}")
    return problems


@pytest.mark.parametrize("target", OVERLAYS)
def test_the_stores_users_dial_its_service(target: str) -> None:
    """The gateway, features and blending read STYLEBLEND_STORE (the ConfigMap's, which no
    container overrides): redis://redis:6379/0, the store's Service on its port."""
    docs = render(target)
    assert store_address_problems(docs) == []
    settings = config(docs)
    assert settings["STYLEBLEND_STORE"] == f"redis://{STORE}:{STORE_PORT}/0"
    assert float(settings["STYLEBLEND_STORE_TTL_S"]) > 0


def _override(docs: tuple[Doc, ...], service: str, value: str) -> None:
    container = main_container(of_kind(docs, "Deployment")[service])
    container.setdefault("env", []).append({"name": "STYLEBLEND_STORE", "value": value})


ADDRESS_FAULTS: dict[str, Callable[[tuple[Doc, ...]], object]] = {
    "memory": lambda docs: config(docs).update(STYLEBLEND_STORE="memory"),
    "unset": lambda docs: config(docs).pop("STYLEBLEND_STORE"),
    "another port": lambda docs: config(docs).update(STYLEBLEND_STORE="redis://redis:6380/0"),
    "another host": lambda docs: config(docs).update(STYLEBLEND_STORE="redis://valkey:6379/0"),
    "not a url": lambda docs: config(docs).update(STYLEBLEND_STORE="redis:6379"),
    "one pod in memory": lambda docs: _override(docs, "features", "memory"),
}


@pytest.mark.parametrize("fault", sorted(ADDRESS_FAULTS))
def test_the_store_address_check_finds_each_fault(fault: str) -> None:
    docs = copy.deepcopy(render("cpu"))
    ADDRESS_FAULTS[fault](docs)
    assert store_address_problems(docs), fault


def store_reach(docs: tuple[Doc, ...]) -> tuple[set[str], set[tuple[str, int]]]:
    """Who may open a connection to any of the store's ports (pods by name, the Job,
    "outside"), and what the store itself may reach (every pod's every port)."""
    deployments = of_kind(docs, "Deployment")
    sources = {name: pod_labels(deployment) for name, deployment in deployments.items()}
    sources["model-export"] = of_kind(docs, "Job")["model-export"]["spec"]["template"]["metadata"][
        "labels"
    ]
    sources["outside"] = OUTSIDE
    ports = [p["containerPort"] for p in main_container(deployments[STORE])["ports"]]
    reaching = {
        source
        for source, labels in sources.items()
        if source != STORE and any(allowed(docs, labels, STORE, port) for port in ports)
    }
    sent = {
        (callee, port["containerPort"])
        for callee, deployment in deployments.items()
        for port in main_container(deployment)["ports"]
        if callee != STORE and allowed(docs, sources[STORE], callee, port["containerPort"])
    }
    return reaching, sent


@pytest.mark.parametrize("target", OVERLAYS)
def test_only_the_stores_users_reach_it_and_it_reaches_no_one(target: str) -> None:
    """Redis has no password: the NetworkPolicies are its fence. The gateway, features and
    blending reach it; reconstruction, the Job and the outside do not; it sends nothing."""
    assert store_reach(render(target)) == (set(STORE_USERS), set())


def _policy(name: str, selected: str, direction: str, rule: Doc) -> Doc:
    key = "ingress" if direction == "Ingress" else "egress"
    return {
        "kind": "NetworkPolicy",
        "metadata": {"name": name},
        "spec": {
            "podSelector": {"matchLabels": {"app.kubernetes.io/name": selected}},
            "policyTypes": [direction],
            key: [rule],
        },
    }


def _to(name: str, port: int | str) -> Doc:
    return {
        "to": [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": name}}}],
        "ports": [{"protocol": "TCP", "port": port}],
    }


def _from(name: str, port: int | str) -> Doc:
    return {
        "from": [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": name}}}],
        "ports": [{"protocol": "TCP", "port": port}],
    }


REACH_FAULTS: dict[str, tuple[tuple[Doc, ...], tuple[set[str], set[tuple[str, int]]]]] = {
    "reconstruction to redis": (
        (
            _policy("reconstruction-to-redis", "reconstruction", "Egress", _to(STORE, 6379)),
            _policy("redis-from-reconstruction", STORE, "Ingress", _from("reconstruction", 6379)),
        ),
        ({*STORE_USERS, "reconstruction"}, set()),
    ),
    "by the port's name": (
        (
            _policy("reconstruction-to-redis", "reconstruction", "Egress", _to(STORE, "redis")),
            _policy(
                "redis-from-reconstruction", STORE, "Ingress", _from("reconstruction", "redis")
            ),
        ),
        ({*STORE_USERS, "reconstruction"}, set()),
    ),
    "redis from anywhere": (
        (_policy("redis-from-anywhere", STORE, "Ingress", {"ports": [{"port": 6379}]}),),
        ({*STORE_USERS, "outside"}, set()),
    ),
    "redis from every namespace": (
        (_policy("redis-from-all", STORE, "Ingress", {"from": [{"namespaceSelector": {}}]}),),
        ({*STORE_USERS, "outside"}, set()),
    ),
    "redis to features": (
        (
            _policy("redis-to-features", STORE, "Egress", _to("features", 50052)),
            _policy("features-from-redis", "features", "Ingress", _from(STORE, 50052)),
        ),
        (set(STORE_USERS), {("features", 50052)}),
    ),
}


@pytest.mark.parametrize("fault", sorted(REACH_FAULTS))
def test_the_store_reach_check_sees_each_new_way_in_or_out(fault: str) -> None:
    extra, expected = REACH_FAULTS[fault]
    assert store_reach((*render("cpu"), *extra)) == expected


@pytest.mark.parametrize("target", OVERLAYS)
def test_the_gateway_service_has_no_session_affinity(target: str) -> None:
    """Uploads are in the shared store, so any gateway pod serves any client's next request;
    a session is one connection and stays on its pod by itself."""
    gateway = of_kind(render(target), "Service")["gateway"]
    assert gateway["spec"].get("sessionAffinity", "None") == "None"


# --- availability and scaling -----------------------------------------------------------------


@pytest.mark.parametrize("target", OVERLAYS)
def test_every_service_has_a_disruption_budget(target: str) -> None:
    """The store has none: one replica of a cache, which a drain may restart elsewhere."""
    docs = render(target)
    budgets = list(of_kind(docs, "PodDisruptionBudget").values())
    for name, deployment in services_of(docs).items():
        covering = [
            b
            for b in budgets
            if selects(b["spec"]["selector"]["matchLabels"], pod_labels(deployment))
        ]
        assert len(covering) == 1, name
        assert covering[0]["spec"].get("maxUnavailable") == 1, name


@pytest.mark.parametrize("target", OVERLAYS)
def test_reconstruction_scales_by_its_autoscaler(target: str) -> None:
    docs = render(target)
    (hpa,) = of_kind(docs, "HorizontalPodAutoscaler").values()
    scaled = hpa["spec"]["scaleTargetRef"]
    assert (scaled["kind"], scaled["name"]) == ("Deployment", "reconstruction")
    deployment = of_kind(docs, "Deployment")["reconstruction"]
    assert "replicas" not in deployment["spec"], "an apply would reset the autoscaler's count"
    assert 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    (metric,) = hpa["spec"]["metrics"]
    # Utilisation is a share of the request: without one the autoscaler cannot act.
    assert metric["resource"]["name"] in main_container(deployment)["resources"]["requests"]


# Idle, from its own install (`python -m services NAME`, no call yet): about 80 MiB for the
# gateway and blending (deploy/README.md); the request leaves at least this over the stores.
PROCESS_MIB = 96


@pytest.mark.parametrize("target", OVERLAYS)
def test_memory_requests_hold_each_services_stores(target: str) -> None:
    """A service's request covers the memory budgets its config gives its stores and caches
    (STYLEBLEND_*_STORE_BYTES, *_CACHE_BYTES), and the gateway, without PyTorch, asks for
    little."""
    docs = render(target)
    settings = config(docs)
    for name, deployment in services_of(docs).items():
        budgets = 0
        for field, info in CONFIGS[name].model_fields.items():
            if re.search(r"(^|_)(store|cache)_bytes$", field):
                budgets += int(settings.get(f"STYLEBLEND_{field.upper()}", info.default))
        request = mebibytes(main_container(deployment)["resources"]["requests"]["memory"])
        assert request >= budgets / 2**20 + PROCESS_MIB, (name, request, budgets / 2**20)
        if name in ("gateway", "blending"):  # neither PyTorch nor ONNX Runtime
            assert request <= 1024, (name, request)
    gateway = main_container(of_kind(docs, "Deployment")["gateway"])
    assert mebibytes(gateway["resources"]["requests"]["memory"]) <= 512


# --- volumes ----------------------------------------------------------------------------------


def _mount(container: Doc, volumes: dict[str, Doc], path: str) -> tuple[Doc, Doc]:
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == path]
    return mount, volumes[mount["name"]]


@pytest.mark.parametrize("target", OVERLAYS)
def test_services_read_the_exported_model_that_the_job_writes(target: str) -> None:
    docs = render(target)
    settings = config(docs)
    claims = of_kind(docs, "PersistentVolumeClaim")
    model_dir = settings["STYLEBLEND_MODEL_DIR"]
    job = of_kind(docs, "Job")["model-export"]["spec"]["template"]["spec"]
    (export,) = job["containers"]
    mount, volume = _mount(export, {v["name"]: v for v in job["volumes"]}, model_dir)
    assert not mount.get("readOnly", False)
    claim = volume["persistentVolumeClaim"]["claimName"]
    assert claim in claims
    for name in GPU_SERVICES:
        spec = of_kind(docs, "Deployment")[name]["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in spec["volumes"]}
        for container in [main_container(of_kind(docs, "Deployment")[name])] + spec[
            "initContainers"
        ]:
            mount, volume = _mount(container, volumes, model_dir)
            assert mount["readOnly"] is True, name
            assert volume["persistentVolumeClaim"] == {"claimName": claim, "readOnly": True}


# --- overlays ---------------------------------------------------------------------------------


def image_target(image: str) -> str:
    """The Dockerfile target an image was built from: tags are VERSION-TARGET."""
    name, tag = image.rsplit(":", 1)
    assert name == REGISTRY, image
    version = pyproject()["version"]
    assert tag.startswith(f"{version}-"), f"{image}: not the project's version {version}"
    return tag.removeprefix(f"{version}-")


@pytest.mark.parametrize("target", OVERLAYS)
def test_each_service_runs_its_own_image(target: str) -> None:
    """Each Deployment runs (and waits for its model in) the image of its own Dockerfile
    target, which installs that service's extra only (tests/deploy/test_docker.py); the Job
    runs the whole project's CPU image; the store a public image at a fixed version."""
    docs = render(target)
    targets = set(stages())
    for name, deployment in services_of(docs).items():
        spec = deployment["spec"]["template"]["spec"]
        for container in spec.get("initContainers", []) + spec["containers"]:
            built = image_target(container["image"])
            assert built in targets, (name, built)
            assert SERVICE_TARGETS[built] == name, (name, container["name"], built)
            assert built.endswith("-gpu") == (target == "gpu" and name in GPU_SERVICES), built
    (export,) = of_kind(docs, "Job")["model-export"]["spec"]["template"]["spec"]["containers"]
    assert image_target(export["image"]) == "cpu" and "cpu" in WHOLE_TARGETS
    store = main_container(of_kind(docs, "Deployment")[STORE])["image"]
    name, _, tag = store.rpartition(":")
    assert name and not name.startswith(REGISTRY), f"{store}: the overlay maps no public image"
    assert re.fullmatch(r"\d+\.\d+\.\d+(-[a-z0-9.]+)?", tag), f"{store}: not a pinned version"


def test_cpu_overlay_runs_on_cpus_only() -> None:
    docs = render("cpu")
    settings = config(docs)
    assert settings["STYLEBLEND_PROVIDERS"] == "CPUExecutionProvider"
    assert settings["STYLEBLEND_DEVICE"] == "cpu"
    for where, spec in pod_specs(docs):
        assert "nodeSelector" not in spec, where
        for container in spec["containers"]:
            assert GPU not in container["resources"]["limits"], where
            if where != f"Deployment/{STORE}":  # a public image, not one of the targets
                assert not image_target(container["image"]).endswith("gpu"), where


def test_gpu_overlay_puts_features_and_reconstruction_on_gpus() -> None:
    docs = render("gpu")
    settings = config(docs)
    assert settings["STYLEBLEND_PROVIDERS"].split(",") == [
        "TensorrtExecutionProvider",
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    ]
    assert settings["STYLEBLEND_DEVICE"] == "cuda"
    deployments = of_kind(docs, "Deployment")
    for name in GPU_SERVICES:
        spec = deployments[name]["spec"]["template"]["spec"]
        container = main_container(deployments[name])
        assert container["resources"]["requests"][GPU] == 1, name
        assert container["resources"]["limits"][GPU] == 1, name
        assert spec["nodeSelector"], name
        assert any(t["key"] == GPU and t["effect"] == "NoSchedule" for t in spec["tolerations"])
        for each in spec["initContainers"] + spec["containers"]:
            assert image_target(each["image"]) == f"{name}-gpu", (name, each["name"])
    for name in ("gateway", "blending"):
        container = main_container(deployments[name])
        assert GPU not in container["resources"]["limits"], name
        assert image_target(container["image"]) == name, name


def test_gpu_overlay_keeps_tensorrt_engines_on_a_volume() -> None:
    docs = render("gpu")
    features = of_kind(docs, "Deployment")["features"]
    volumes = {v["name"]: v for v in features["spec"]["template"]["spec"]["volumes"]}
    cache_dir = config(docs)["STYLEBLEND_TRT_ENGINE_CACHE_DIR"]
    mount, volume = _mount(main_container(features), volumes, cache_dir)
    assert not mount.get("readOnly", False)
    assert set(volume) == {"name", "persistentVolumeClaim"}
    assert volume["persistentVolumeClaim"]["claimName"] in of_kind(docs, "PersistentVolumeClaim")


@pytest.mark.parametrize("target", OVERLAYS)
def test_every_service_serves_metrics_on_its_own_port_closed_to_the_outside(target: str) -> None:
    docs = render(target)
    settings = config(docs)
    for name, deployment in services_of(docs).items():
        ports = [p for p in main_container(deployment)["ports"] if p["name"] == "metrics"]
        assert len(ports) == 1, name
        port = ports[0]["containerPort"]
        assert settings[f"STYLEBLEND_{name.upper()}_METRICS_PORT"] == str(port)
        annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        assert annotations == {"prometheus.io/scrape": "true", "prometheus.io/port": str(port)}
        assert not allowed(docs, OUTSIDE, name, port), name
