"""Static checks of the container image (Dockerfile, .dockerignore) and the Kubernetes manifests (infra/).

No cluster, no Docker, no network: Kubernetes objects are validated against the OpenAPI schemas bundled with
`kubernetes-validate`; `kubectl kustomize` renders the local kustomizations when kubectl is installed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import tomllib
from functools import cache
from importlib.metadata import version as installed_version
from importlib.resources import files
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
SERVING = INFRA / "serving"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"

# Oldest and newest Kubernetes minor versions the manifests are validated for.
K8S_VERSIONS = ("1.29", "1.37")
# Top-level source folders the Dockerfile may COPY before they exist (written later by others).
MAY_APPEAR_LATER = {"serving"}
# The namespaces objects may live in: sonogen's own, and the one standalone KFP runs pipeline pods in.
NAMESPACES = {"sonogen", "kubeflow"}
# Secrets referred to by name; created by hand (infra/README.md), never in git.
EXTERNAL_SECRETS = {"sonogen-s3", "sonogen-postgres", "sonogen-serve"}
KUSTOMIZATION_KINDS = {"Kustomization", "Component"}
CLUSTER_SCOPED_KINDS = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition",
                        "PersistentVolume", "StorageClass", "PriorityClass"}
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "ReplicaSet"}
# The components of a KServe InferenceService; each embeds a PodSpec (containers, securityContext, ...).
ISVC_COMPONENTS = ("predictor", "transformer", "explainer")
# API groups built into Kubernetes (schemas bundled with kubernetes-validate). Custom resources (KServe's
# InferenceService, serving.kserve.io) have no bundled schema: they get the structural and image checks there, and an
# InferenceService the checks of its own section (KServe SDK types, its PodSpec part validated as a Pod).
BUILTIN_API_GROUPS = {"", "apps", "batch", "autoscaling", "policy", "rbac.authorization.k8s.io", "networking.k8s.io",
                      "storage.k8s.io", "scheduling.k8s.io", "coordination.k8s.io", "discovery.k8s.io",
                      "node.k8s.io", "apiextensions.k8s.io", "admissionregistration.k8s.io"}


# ------------------------------------------------------------------------------------------------ helpers --

def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


@cache
def lock_pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version.strip()
    return pins


def yaml_files() -> list[Path]:
    return sorted(p for p in INFRA.rglob("*") if p.suffix in {".yaml", ".yml"} and p.is_file())


@cache
def documents() -> tuple[tuple[Path, dict], ...]:
    docs = []
    for path in yaml_files():
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                docs.append((path, doc))
    return tuple(docs)


def kustomizations() -> list[tuple[Path, dict]]:
    return [(p, d) for p, d in documents() if d.get("kind") in KUSTOMIZATION_KINDS]


def is_remote(resource: str) -> bool:
    return "://" in resource or resource.startswith(("github.com/", "gitlab.com/", "bitbucket.org/", "git@"))


def parse_env_file(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"{path}: not KEY=VALUE: {line!r}"
            env[key.strip()] = value
    return env


def generated_configmaps(kust_path: Path, kust: dict) -> list[dict]:
    """The ConfigMaps a kustomization's configMapGenerator renders (literals and env files)."""
    out = []
    for gen in kust.get("configMapGenerator", []):
        data = {}
        for env in gen.get("envs", []):
            data.update(parse_env_file(kust_path.parent / env))
        for literal in gen.get("literals", []):
            key, _, value = literal.partition("=")
            data[key] = value
        out.append({"apiVersion": "v1", "kind": "ConfigMap",
                    "metadata": {"name": gen["name"], "namespace": gen.get("namespace", kust.get("namespace"))},
                    "data": data, "_behavior": gen.get("behavior", "create")})
    return out


@cache
def objects() -> tuple[dict, ...]:
    """Every Kubernetes object of infra/: manifests plus the ConfigMaps of infra/base's generators."""
    objs = [d for _, d in documents() if "apiVersion" in d and "kind" in d and d["kind"] not in KUSTOMIZATION_KINDS]
    base = INFRA / "base" / "kustomization.yaml"
    for cm in generated_configmaps(base, yaml.safe_load(base.read_text())):
        cm.pop("_behavior")
        objs.append(cm)
    return tuple(objs)


def namespace_of(obj: dict) -> str | None:
    return obj.get("metadata", {}).get("namespace")


def find(kind: str, name: str, namespace: str | None = None) -> dict | None:
    for obj in objects():
        if obj["kind"] == kind and obj["metadata"]["name"] == name and (
                namespace is None or namespace_of(obj) == namespace):
            return obj
    return None


def pod_specs() -> list[tuple[dict, dict]]:
    """(object, pod spec) for every workload, every component of a KServe InferenceService and every job of a Kubeflow
    TrainingRuntime (which embed PodSpecs): the policy checks below (Secrets, ConfigMaps, images, non-root,
    requests) apply to all."""
    specs = []
    for obj in objects():
        if obj["kind"] in WORKLOAD_KINDS:
            specs.append((obj, obj["spec"]["template"]["spec"]))
        elif obj["kind"] == "Pod":
            specs.append((obj, obj["spec"]))
        elif obj["kind"] == "InferenceService":
            specs += [(obj, obj["spec"][c]) for c in ISVC_COMPONENTS if c in obj["spec"]]
        elif obj["kind"] == "TrainingRuntime":  # Kubeflow Trainer: a JobSet template of pod templates
            specs += [(obj, job["template"]["spec"]["template"]["spec"])
                      for job in obj["spec"]["template"]["spec"]["replicatedJobs"]]
    return specs


def api_group(obj: dict) -> str:
    return obj["apiVersion"].rpartition("/")[0]


def images(node, path: str = "") -> list[tuple[str, str]]:
    """(where, image) for every `image` field anywhere in an object (workloads and custom resources alike)."""
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "image" and isinstance(value, str):
                found.append((f"{path}.image", value))
            else:
                found += images(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found += images(value, f"{path}[{i}]")
    return found


def containers(spec: dict) -> list[dict]:
    return spec.get("initContainers", []) + spec.get("containers", [])


def assert_pinned(image: str, where: str) -> None:
    name, _, digest = image.partition("@")
    last = name.rsplit("/", 1)[-1]
    assert ":" in last or digest, f"{where}: image {image!r} has no tag"
    tag = last.partition(":")[2]
    assert tag != "latest" and not tag.startswith("latest-"), f"{where}: image {image!r} is not pinned"
    assert "$" not in image, f"{where}: image {image!r} is not resolved"


def readme_secret_commands() -> dict[tuple[str, str], set[str]]:
    """(secret, namespace) -> keys, from `kubectl create secret generic` commands in infra/README.md."""
    text = (INFRA / "README.md").read_text().replace("\\\n", " ")
    found: dict[tuple[str, str], set[str]] = {}
    for line in text.splitlines():
        if "kubectl create secret generic" not in line:
            continue
        words = shlex.split(line[line.index("kubectl"):], comments=True)
        name = words[4]
        namespace = "default"
        for i, word in enumerate(words):
            if word in ("-n", "--namespace"):
                namespace = words[i + 1]
            elif word.startswith("--namespace="):
                namespace = word.split("=", 1)[1]
        keys = {w.split("=", 2)[1] for w in words if w.startswith("--from-literal=")}
        found.setdefault((name, namespace), set()).update(keys)
    return found


def kustomized(directory: Path) -> tuple[list[dict], dict[tuple[str, str], dict]]:
    """What `kubectl kustomize DIRECTORY` renders, as far as local files go: the objects of its local resources
    (recursively, moved to its `namespace` if it sets one) and its generated ConfigMaps' data, (namespace, name) ->
    data, with `behavior: merge` applied."""
    kust = yaml.safe_load((directory / "kustomization.yaml").read_text())
    objs: list[dict] = []
    configmaps: dict[tuple[str, str], dict] = {}
    for resource in kust.get("resources", []):
        if is_remote(resource):
            continue
        target = directory / resource
        if (target / "kustomization.yaml").is_file():
            sub_objs, sub_configmaps = kustomized(target)
            objs += sub_objs
            configmaps |= sub_configmaps
        else:
            objs += [d for d in yaml.safe_load_all(target.read_text()) if d]
    if kust.get("namespace"):
        for obj in objs:
            if obj["kind"] not in CLUSTER_SCOPED_KINDS:
                obj["metadata"]["namespace"] = kust["namespace"]
    for cm in generated_configmaps(directory / "kustomization.yaml", kust):
        key = (cm["metadata"]["namespace"], cm["metadata"]["name"])
        configmaps[key] = configmaps.get(key, {}) | cm["data"] if cm["_behavior"] == "merge" else cm["data"]
    return objs, configmaps


# ------------------------------------------------------------------------------------------------- YAML --

def test_every_yaml_file_parses():
    assert yaml_files(), "no YAML under infra/"
    for path in yaml_files():
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert docs, f"{path} is empty"
        for doc in docs:
            assert isinstance(doc, dict), f"{path}: a document is not a mapping"


def test_kustomizations_resources_exist_and_remote_ones_are_pinned():
    assert {p.relative_to(INFRA).as_posix() for p, _ in kustomizations()} >= {
        "base/kustomization.yaml", "kfp/kustomization.yaml"}
    allowed = {"apiVersion", "kind", "resources", "components", "namespace", "namePrefix", "nameSuffix", "labels",
               "commonLabels", "commonAnnotations", "configMapGenerator", "generatorOptions", "patches", "images",
               "replacements", "replicas", "metadata"}
    for path, kust in kustomizations():
        assert path.name == "kustomization.yaml", path
        assert kust["apiVersion"] == "kustomize.config.k8s.io/v1beta1", path
        assert set(kust) <= allowed, f"{path}: unknown fields {set(kust) - allowed}"
        assert kust.get("resources") or kust.get("configMapGenerator"), f"{path} has nothing"
        for resource in kust.get("resources", []):
            if is_remote(resource):
                ref = re.search(r"[?&]ref=([^&]+)", resource)
                assert ref, f"{path}: remote resource not pinned with ?ref=: {resource}"
                assert re.fullmatch(r"v?\d+\.\d+\.\d+|[0-9a-f]{40}", ref.group(1)), (
                    f"{path}: ?ref= must be a release tag or commit, not {ref.group(1)!r}")
            else:
                target = (path.parent / resource).resolve()
                assert target.is_file() or (target / "kustomization.yaml").is_file(), (
                    f"{path}: resource {resource} does not exist")
                assert INFRA.resolve() in target.parents, f"{path}: {resource} is outside infra/"
        for gen in kust.get("configMapGenerator", []):
            for env in gen.get("envs", []):
                assert (path.parent / env).is_file(), f"{path}: {env} does not exist"


def test_every_manifest_is_in_a_kustomization():
    """Every manifest under infra/ is applied by some kustomization (no file that `kubectl apply -k` never sees)."""
    included = set()
    for path, kust in kustomizations():
        included |= {(path.parent / r).resolve() for r in kust.get("resources", []) if not is_remote(r)}
    for path in yaml_files():
        if path.name != "kustomization.yaml":
            assert path.resolve() in included, f"{path.relative_to(ROOT)} is in no kustomization's resources"


def test_kfp_is_the_pinned_upstream_install():
    kust = yaml.safe_load((INFRA / "kfp" / "kustomization.yaml").read_text())
    resources = kust["resources"]
    refs = {re.search(r"\?ref=(.+)$", r).group(1) for r in resources}
    assert len(refs) == 1, f"infra/kfp: all refs must be equal, got {refs}"
    paths = {r.split("?")[0] for r in resources}
    assert paths == {"github.com/kubeflow/pipelines/manifests/kustomize/cluster-scoped-resources",
                     "github.com/kubeflow/pipelines/manifests/kustomize/env/platform-agnostic"}
    ref = refs.pop()
    readme_refs = set(re.findall(r"github\.com/kubeflow/pipelines/\S*\?ref=([\w.]+)", (INFRA / "README.md").read_text()))
    assert readme_refs == {ref}, f"infra/README.md installs KFP {readme_refs}, infra/kfp pins {ref}"


def test_trainer_is_the_pinned_upstream_release_of_the_api_the_sdk_speaks():
    kust = yaml.safe_load((INFRA / "trainer" / "kustomization.yaml").read_text())
    remote = [r for r in kust["resources"] if is_remote(r)]
    assert [r.split("?")[0] for r in remote] == ["github.com/kubeflow/trainer/manifests/overlays/manager"]
    ref = re.search(r"\?ref=(.+)$", remote[0]).group(1)
    readme_refs = set(re.findall(r"github\.com/kubeflow/trainer/\S*\?ref=([\w.]+)", (INFRA / "README.md").read_text()))
    assert readme_refs == {ref}, f"infra/README.md installs Trainer {readme_refs}, infra/trainer pins {ref}"
    api = lock_pins()["kubeflow-trainer-api"]
    assert ref.lstrip("v").split(".")[:2] == api.split(".")[:2], f"Trainer {ref} but kubeflow-trainer-api {api}"
    assert "runtime.yaml" in kust["resources"]


def test_base_has_the_serving_slot_and_no_namespace_override():
    text = (INFRA / "base" / "kustomization.yaml").read_text()
    kust = yaml.safe_load(text)
    assert "namespace" not in kust, "a top-level namespace would move the kubeflow objects into one namespace"
    has_isvc = any(o["kind"] == "InferenceService" for o in objects())
    assert has_isvc or re.search(r"^\s*# .*InferenceService", text, re.M), (
        "neither a KServe InferenceService nor the comment marking its place in infra/base/kustomization.yaml")


# --------------------------------------------------------------------------------------------- schemas --

@pytest.fixture(scope="module")
def kubernetes_validate():
    # Bundles the Kubernetes JSON schemas: no network. Must be in requirements.lock.
    import kubernetes_validate

    return kubernetes_validate


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_objects_validate_against_kubernetes_schemas(kubernetes_validate, version):
    objs = objects()
    assert {o["kind"] for o in objs} >= {"Namespace", "ServiceAccount", "Role", "RoleBinding", "ConfigMap",
                                         "Deployment", "Service", "StatefulSet"}
    for obj in objs:
        where = f"{obj['kind']}/{obj['metadata'].get('name')}"
        if api_group(obj) not in BUILTIN_API_GROUPS:
            assert obj["metadata"].get("name") and isinstance(obj.get("spec"), dict), f"{where} is incomplete"
            continue
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{where} is invalid for Kubernetes {version}: {exc.message} at {list(exc.path)}")


def test_the_validator_rejects_bad_objects(kubernetes_validate):
    deployment = json.loads(json.dumps(find("Deployment", "mlflow")))
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[-1], strict=True)
    del deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"]
    del deployment["spec"]["selector"]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[-1], strict=True)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
@pytest.mark.parametrize("overlay", ["base", "overlays/local", "serving"])
def test_kustomize_renders_the_local_kustomizations(kubernetes_validate, overlay):
    if not (INFRA / overlay / "kustomization.yaml").is_file():
        pytest.skip(f"no infra/{overlay}")
    rendered = subprocess.run(["kubectl", "kustomize", str(INFRA / overlay)], capture_output=True, text=True,
                              timeout=60)
    assert rendered.returncode == 0, rendered.stderr
    objs = [d for d in yaml.safe_load_all(rendered.stdout) if d]
    expected_objs, expected_configmaps = kustomized(INFRA / overlay)
    names = {(o["kind"], namespace_of(o), o["metadata"]["name"]) for o in objs}
    assert names == {(o["kind"], namespace_of(o), o["metadata"]["name"]) for o in expected_objs} | {
        ("ConfigMap", namespace, name) for namespace, name in expected_configmaps}
    sources = {(o["kind"], namespace_of(o), o["metadata"]["name"]): o for o in expected_objs}
    for obj in objs:
        if api_group(obj) in BUILTIN_API_GROUPS:
            kubernetes_validate.validate(obj, K8S_VERSIONS[-1], strict=True)
        else:
            # kustomize knows no custom resource's schema: it must leave the spec alone (labels go to metadata only).
            assert obj["spec"] == sources[(obj["kind"], namespace_of(obj), obj["metadata"]["name"])]["spec"]
    configmaps = {(namespace_of(o), o["metadata"]["name"]): o["data"] for o in objs if o["kind"] == "ConfigMap"}
    assert configmaps == expected_configmaps


# ------------------------------------------------------------------------------------ references, policy --

def test_objects_are_namespaced_explicitly():
    for obj in objects():
        if obj["kind"] in CLUSTER_SCOPED_KINDS:
            assert namespace_of(obj) is None, obj["metadata"]
            continue
        assert namespace_of(obj) in NAMESPACES, f"{obj['kind']}/{obj['metadata']['name']} has no namespace"
        if namespace_of(obj) == "sonogen":
            assert find("Namespace", "sonogen"), "namespace sonogen is not defined"


def test_no_secret_data_in_git():
    for path, doc in documents():
        assert doc.get("kind") != "Secret", f"{path} defines a Secret: create it with kubectl (infra/README.md)"
        assert "secretGenerator" not in doc, f"{path} has a secretGenerator: Secret data would be in git"
    for _, spec in pod_specs():
        for c in containers(spec):
            for env in c.get("env", []):
                if re.search(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY", env["name"]):
                    assert "value" not in env, f"{c['name']}: {env['name']} is a literal"
    for env_file in INFRA.rglob("*.env"):
        for key in parse_env_file(env_file):
            assert not re.search(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY", key), f"{env_file}: {key} looks secret"


def test_secret_references_match_the_readme_commands():
    commands = readme_secret_commands()
    referenced: set[tuple[str, str, str]] = set()
    for obj, spec in pod_specs():
        for c in containers(spec):
            for env in c.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    referenced.add((ref["name"], namespace_of(obj), ref["key"]))
            for source in c.get("envFrom", []):
                assert "secretRef" not in source, f"{c['name']}: use secretKeyRef with explicit keys"
    assert referenced, "no secretKeyRef at all"
    for name, namespace, key in referenced:
        assert name in EXTERNAL_SECRETS, name
        assert key in commands.get((name, namespace), set()), (
            f"infra/README.md does not create Secret {name} with key {key} in namespace {namespace}")
    # The pipeline pods (namespace kubeflow) get the S3 credentials as env: the README must create that Secret too.
    assert commands.get(("sonogen-s3", "kubeflow")) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}


def test_configmap_references_exist():
    for obj, spec in pod_specs():
        for c in containers(spec):
            for source in c.get("envFrom", []):
                if "configMapRef" in source:
                    name = source["configMapRef"]["name"]
                    assert find("ConfigMap", name, namespace_of(obj)), (
                        f"{c['name']}: envFrom ConfigMap {name} is not in namespace {namespace_of(obj)}")
            for env in c.get("env", []):
                ref = env.get("valueFrom", {}).get("configMapKeyRef")
                if ref:
                    cm = find("ConfigMap", ref["name"], namespace_of(obj))
                    assert cm, f"ConfigMap {ref['name']} is not in namespace {namespace_of(obj)}"
                    assert ref["key"] in cm["data"], f"ConfigMap {ref['name']} has no key {ref['key']}"


def test_sonogen_env_settings():
    for namespace in NAMESPACES:
        cm = find("ConfigMap", "sonogen-env", namespace)
        assert cm, f"no ConfigMap sonogen-env in {namespace}"
        data = cm["data"]
        assert data["MLFLOW_TRACKING_URI"] == "http://mlflow.sonogen.svc:5000"
        # botocore reads AWS_ENDPOINT_URL (empty: AWS); MLflow would take an empty MLFLOW_S3_ENDPOINT_URL literally.
        assert data["AWS_ENDPOINT_URL"] == "" or re.fullmatch(r"https?://[\w.-]+(:\d+)?/?", data["AWS_ENDPOINT_URL"])
        assert "MLFLOW_S3_ENDPOINT_URL" not in data
        assert data["SONOGEN_DVC_REMOTE_URL"].startswith(f"s3://{data['SONOGEN_S3_DATA_BUCKET']}/")
    # The tracking URI names a Service that exists, on a port it has.
    uri = find("ConfigMap", "sonogen-env", "kubeflow")["data"]["MLFLOW_TRACKING_URI"]
    host, port = re.fullmatch(r"http://([^:/]+):(\d+)", uri).groups()
    name, namespace, _ = host.split(".", 2)
    service = find("Service", name, namespace)
    assert service and int(port) in {p["port"] for p in service["spec"]["ports"]}


def test_pipeline_env_and_secret_keys_exist():
    """The keys pipelines/training.py maps from sonogen-env and sonogen-s3 are keys these objects have."""
    import ast

    source = ROOT / "pipelines" / "training.py"
    if not source.is_file():
        pytest.skip("no pipelines/training.py")
    names = {}  # module-level constants, `A = ...` and `A, B = ..., ...`
    for node in ast.parse(source.read_text()).body:
        if not isinstance(node, ast.Assign) or len(node.targets) != 1:
            continue
        target, value = node.targets[0], node.value
        if isinstance(target, ast.Tuple) and isinstance(value, ast.Tuple):
            pairs = list(zip(target.elts, value.elts))
        else:
            pairs = [(target, value)]
        for name, expr in pairs:
            if isinstance(name, ast.Name):
                try:
                    names[name.id] = ast.literal_eval(expr)
                except ValueError:
                    pass
    if "ENV_KEYS" not in names or "S3_SECRET_KEYS" not in names:
        pytest.skip("pipelines/training.py names its keys differently")
    assert names.get("ENV_CONFIG_MAP", "sonogen-env") == "sonogen-env"
    assert names.get("S3_SECRET", "sonogen-s3") == "sonogen-s3"
    for namespace in NAMESPACES:
        env = find("ConfigMap", "sonogen-env", namespace)["data"]
        missing = set(names["ENV_KEYS"]) - env.keys()
        assert not missing, f"pipelines/training.py reads {missing}, not in sonogen-env ({namespace})"
    missing = set(names["S3_SECRET_KEYS"]) - readme_secret_commands()[("sonogen-s3", "kubeflow")]
    assert not missing, f"pipelines/training.py reads {missing}, not in the Secret sonogen-s3 of infra/README.md"


def test_readme_lists_the_sonogen_env_keys():
    readme = (INFRA / "README.md").read_text()
    listed = re.search(r"SONOGEN_ENV_KEYS = \[([^\]]*)\]", readme)
    assert listed, "infra/README.md: the SONOGEN_ENV_KEYS example is gone"
    assert set(re.findall(r'"(\w+)"', listed.group(1))) == set(parse_env_file(INFRA / "base" / "sonogen.env"))


def test_services_select_pods_and_ports():
    for svc in (o for o in objects() if o["kind"] == "Service"):
        selector = svc["spec"]["selector"]
        matches = [(obj, spec) for obj, spec in pod_specs() if obj["kind"] in WORKLOAD_KINDS
                   and namespace_of(obj) == namespace_of(svc)
                   and selector.items() <= obj["spec"]["template"]["metadata"]["labels"].items()]
        assert len(matches) == 1, f"Service {svc['metadata']['name']} selects {len(matches)} workloads"
        ports = {(p.get("name"), p["containerPort"]) for c in matches[0][1]["containers"] for p in c.get("ports", [])}
        for port in svc["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            assert any(target in pair for pair in ports), f"Service {svc['metadata']['name']}: no port {target}"
    for sts in (o for o in objects() if o["kind"] == "StatefulSet"):
        governing = find("Service", sts["spec"]["serviceName"], namespace_of(sts))
        assert governing and governing["spec"].get("clusterIP") == "None", "a StatefulSet needs a headless Service"


def test_every_image_is_pinned():
    found = [(f"{obj['kind']}/{obj['metadata']['name']}{where}", image) for obj in objects()
             for where, image in images(obj)]
    assert len(found) >= 3
    for where, image in found:
        assert_pinned(image, where)


def test_workloads_are_pinned_non_root_and_have_requests():
    assert pod_specs()
    for obj, spec in pod_specs():
        pod_ctx = spec.get("securityContext", {})
        for c in containers(spec):
            where = f"{obj['kind']}/{obj['metadata']['name']}/{c['name']}"
            assert_pinned(c["image"], where)
            ctx = c.get("securityContext", {})
            assert ctx.get("runAsNonRoot", pod_ctx.get("runAsNonRoot")) is True, f"{where} may run as root"
            assert ctx.get("runAsUser", pod_ctx.get("runAsUser", 1)) != 0, f"{where} runs as root"
            assert ctx.get("allowPrivilegeEscalation") is False, where
            assert c.get("resources", {}).get("requests"), f"{where} has no resource requests"
            assert c["resources"]["requests"].keys() >= {"cpu", "memory"}, where


def test_mlflow_server():
    deployment = find("Deployment", "mlflow", "sonogen")
    server = next(c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "mlflow")
    # Server and clients on the same MLflow release.
    assert re.fullmatch(rf"ghcr\.io/mlflow/mlflow:v{re.escape(lock_pins()['mlflow'])}(-full)?", server["image"])
    command = server.get("command", []) + server["args"]
    assert command[:2] == ["mlflow", "server"]
    args = dict(zip(command[2::2], command[3::2]))
    assert args["--host"] == "0.0.0.0" and args["--port"] == "5000"
    bucket = find("ConfigMap", "sonogen-env", "sonogen")["data"]["SONOGEN_S3_MLFLOW_BUCKET"]
    assert args["--artifacts-destination"] == f"s3://{bucket}/artifacts"
    allowed = args["--allowed-hosts"].split(",")
    assert "mlflow.sonogen.svc:5000" in allowed
    env = {e["name"]: e for e in server["env"]}
    # The backend store: Postgres, with the password from the Secret, never literal.
    store = env["MLFLOW_BACKEND_STORE_URI"]["value"]
    assert re.fullmatch(r"postgresql://mlflow:\$\(POSTGRES_PASSWORD\)@postgres\.sonogen\.svc:5432/mlflow", store)
    assert env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "sonogen-postgres"
    assert [e["name"] for e in server["env"]].index("POSTGRES_PASSWORD") < [
        e["name"] for e in server["env"]].index("MLFLOW_BACKEND_STORE_URI"), "$(VAR) needs VAR defined earlier"
    assert server["readinessProbe"]["httpGet"]["path"] == "/health"
    assert server["resources"]["requests"]
    postgres = find("StatefulSet", "postgres", "sonogen")
    assert postgres["spec"]["volumeClaimTemplates"], "Postgres keeps its data on a PVC"
    pg = postgres["spec"]["template"]["spec"]["containers"][0]
    assert pg["image"] == "postgres:16.6"
    pg_env = {e["name"]: e for e in pg["env"]}
    assert pg_env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "sonogen-postgres", "key": "password"}


def test_pipeline_runner_rbac_is_least_privilege():
    sa = find("ServiceAccount", "sonogen-pipeline-runner", "kubeflow")
    role = find("Role", "sonogen-pipeline-runner", "kubeflow")
    binding = find("RoleBinding", "sonogen-pipeline-runner", "kubeflow")
    assert sa and role and binding
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": "sonogen-pipeline-runner"}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "sonogen-pipeline-runner",
                                    "namespace": "kubeflow"}]
    assert not any(o["kind"] in {"ClusterRole", "ClusterRoleBinding"} for o in objects())
    for rule in role["rules"]:
        for field in ("apiGroups", "resources", "verbs"):
            assert "*" not in rule[field], f"wildcard in {rule}"
        if "secrets" in rule["resources"]:
            assert set(rule["verbs"]) == {"get"} and rule.get("resourceNames"), "secrets: get by name only"
        if "pods" in rule["resources"]:
            assert not set(rule["verbs"]) & {"create", "update", "patch", "delete", "deletecollection"}
        assert not set(rule["resources"]) & {"pods/exec", "roles", "rolebindings", "serviceaccounts/token"}
    for obj in objects():
        if obj["kind"] in {"RoleBinding"}:
            for subject in obj["subjects"]:
                assert find(subject["kind"], subject["name"], subject.get("namespace")), subject


# ------------------------------------------------------------------------------------------- Dockerfile --

def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comment lines dropped."""
    instructions, current = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if current and stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        keyword, _, args = current.partition(" ")
        instructions.append((keyword.upper(), args.strip()))
        current = ""
    assert not current, "Dockerfile ends in a continuation line"
    return instructions


def substitute(text: str, variables: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: variables.get(m.group(1) or m.group(2), m.group(0)), text)


@cache
def stages() -> dict[str, dict]:
    """Stage name -> {"from": base (image or stage name), "instructions": [...]} with global ARGs substituted."""
    global_args: dict[str, str] = {}
    result: dict[str, dict] = {}
    current = None
    for keyword, args in dockerfile_instructions():
        if keyword == "ARG" and current is None:
            name, _, default = args.partition("=")
            global_args[name] = substitute(default.strip('"'), global_args)
        elif keyword == "FROM":
            words = [w for w in args.split() if not w.startswith("--platform")]
            base = substitute(words[0], global_args)
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else f"stage{len(result)}"
            current = result[name] = {"from": base, "instructions": []}
        else:
            assert current is not None, f"{keyword} before the first FROM"
            current["instructions"].append((keyword, args))
    return result


def stage_chain(target: str) -> list[str]:
    """The target and the stages it is built FROM, target first."""
    chain = [target]
    while stages()[chain[-1]]["from"] in stages():
        chain.append(stages()[chain[-1]]["from"])
    return chain


def last_in_chain(target: str, keyword: str) -> str | None:
    for stage in stage_chain(target):
        values = [args for kw, args in stages()[stage]["instructions"] if kw == keyword]
        if values:
            return values[-1]
    return None


def runs(target: str) -> str:
    return "\n".join(args for stage in stage_chain(target) for kw, args in stages()[stage]["instructions"]
                     if kw == "RUN")


def env_of(target: str) -> dict[str, str]:
    env = {}
    for stage in reversed(stage_chain(target)):
        for kw, args in stages()[stage]["instructions"]:
            if kw == "ENV":
                for word in shlex.split(args):
                    key, _, value = word.partition("=")
                    env[key] = value
    return env


def dockerignore_patterns() -> list[tuple[bool, re.Pattern]]:
    patterns = []
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        regex = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif pattern[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif pattern[i] == "?":
                regex, i = regex + "[^/]", i + 1
            elif pattern[i] == "[":
                end = pattern.index("]", i)
                regex, i = regex + pattern[i:end + 1], end + 1
            else:
                regex, i = regex + re.escape(pattern[i]), i + 1
        patterns.append((negate, re.compile(regex)))
    return patterns


def dockerignored(relative: str) -> bool:
    """Docker's rule: the last matching pattern wins; a path is excluded when it or a parent folder is."""
    parts = relative.split("/")
    excluded = False
    for negate, regex in dockerignore_patterns():
        if any(regex.fullmatch("/".join(parts[:n])) for n in range(1, len(parts) + 1)):
            excluded = not negate
    return excluded


def test_dockerfile_has_train_and_serve_targets():
    assert dockerfile_instructions()
    assert DOCKERFILE.read_text().startswith("# syntax=docker/dockerfile:1"), "BuildKit syntax (RUN --mount)"
    assert {"train", "serve", "serve-gpu"} <= set(stages())


def test_dockerfile_base_images_are_pinned():
    for name, stage in stages().items():
        if stage["from"] not in stages():
            assert_pinned(stage["from"], f"Dockerfile stage {name}")
    assert re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-\w+(-\w+)*-ubuntu\d+\.\d+", stages()[stage_chain("train")[-1]]["from"])
    assert re.fullmatch(r"python:3\.11(\.\d+)?-slim(-\w+)?", stages()[stage_chain("serve")[-1]]["from"])
    # COPY --from=X and RUN --mount=...,from=X name a stage or a pinned image.
    for name, stage in stages().items():
        for kw, args in stage["instructions"]:
            options = [w for w in args.split() if w.startswith("--")]
            sources = [o.split("=", 1)[1] for o in options if o.startswith("--from=")]
            for mount in (o.removeprefix("--mount=") for o in options if o.startswith("--mount=")):
                sources += [kv.split("=", 1)[1] for kv in mount.split(",") if kv.startswith("from=")]
            for source in sources:
                if source not in stages():
                    assert_pinned(source, f"Dockerfile stage {name}: {kw} from {source}")


@pytest.mark.parametrize("target", ["train", "serve", "serve-gpu"])
def test_dockerfile_targets_run_as_non_root(target):
    user = last_in_chain(target, "USER")
    assert user, f"{target} sets no USER: it would run as root"
    # Numeric uid, so that Kubernetes' runAsNonRoot can verify it.
    assert re.fullmatch(r"1000(:1000)?", user), f"{target} runs as {user!r}, not uid 1000"
    # USER comes after the last RUN/COPY of the target stage that needs root.
    instructions = stages()[target]["instructions"]
    assert max(i for i, (kw, _) in enumerate(instructions) if kw == "USER") > max(
        i for i, (kw, _) in enumerate(instructions) if kw == "RUN")
    assert last_in_chain(target, "WORKDIR"), f"{target} has no WORKDIR"


def test_dockerfile_entrypoints():
    assert json.loads(last_in_chain("train", "ENTRYPOINT")) == ["sonogen"]
    assert json.loads(last_in_chain("serve", "ENTRYPOINT")) == ["python", "-m", "serving"]
    assert json.loads(last_in_chain("serve-gpu", "ENTRYPOINT")) == ["python", "-m", "serving"]
    assert "sonogen" in pyproject()["project"]["scripts"], "ENTRYPOINT sonogen needs the console script"


def test_dockerfile_serve_gpu_serves_every_family_on_cuda():
    assert stage_chain("serve-gpu") == ["serve-gpu", "train"]  # on the CUDA train image: CUDA torch, diffusers
    serve_gpu = "\n".join(args for kw, args in stages()["serve-gpu"]["instructions"] if kw == "RUN")
    # the lock's onnxruntime release, as the GPU build, in its place
    assert "sed -n 's/^onnxruntime==//p' requirements.lock" in serve_gpu and "onnxruntime-gpu==${ORT_VERSION}" in serve_gpu
    assert "pip uninstall --yes onnxruntime" in serve_gpu
    for check in ("'CUDAExecutionProvider' in onnxruntime.get_available_providers()", "torch.version.cuda",
                  "import onnxruntime, torch, diffusers, peft, kserve, serving.predictor"):
        assert check in serve_gpu, f"serve-gpu's smoke checks miss {check}"
    assert env_of("serve-gpu")["NVIDIA_DRIVER_CAPABILITIES"].split(",") >= ["compute"]


def test_dockerfile_train_environment():
    env = env_of("train")
    assert env["MLFLOW_DISABLE_TELEMETRY"] == "true"
    assert env["HF_HUB_OFFLINE"] == "1"
    assert env_of("serve")["NVIDIA_DRIVER_CAPABILITIES"].split(",") >= ["compute"]


def test_dockerfile_copy_sources_exist():
    copies = [(name, args) for name, stage in stages().items() for kw, args in stage["instructions"] if kw == "COPY"]
    assert copies
    for stage, args in copies:
        words = [w for w in (json.loads(args) if args.startswith("[") else args.split())]
        if any(w.startswith("--from=") for w in words):
            continue
        sources = [w for w in words if not w.startswith("--")][:-1]
        assert sources, f"{stage}: COPY {args}"
        for source in sources:
            source = source.rstrip("/") or "."
            if source == ".":
                continue
            exists = any(ROOT.glob(source)) if any(ch in source for ch in "*?[") else (ROOT / source).exists()
            if not exists:
                assert source.split("/")[0] in MAY_APPEAR_LATER, f"{stage}: COPY source {source} does not exist"
            else:
                assert not dockerignored(source), f"{stage}: COPY source {source} is excluded by .dockerignore"


def test_dockerignore_keeps_the_package_and_drops_the_rest():
    packages = [p.strip("*") for p in pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]]
    needed = ["pyproject.toml", "requirements.lock", pyproject()["project"]["readme"]]
    for package in {p.split(".")[0] for p in packages} | {"components", "pipelines", "serving"}:
        needed += [p.relative_to(ROOT).as_posix() for p in (ROOT / package).rglob("*.py")
                   if "__pycache__" not in p.parts]
    needed += ["configs/dcgan-paper.yaml", "params.yaml", "dvc.yaml", "serving/__main__.py"]
    for path in needed:
        assert not dockerignored(path), f".dockerignore drops {path}, which the image build needs"
    for path in [".git/HEAD", ".venv/bin/python", "mlflow.db", "mlruns/0/meta.yaml", "data/raw/x.png",
                 "dvc-storage/ab/cd", ".dvc/cache/files/md5/ab", ".dvc/config.local", "models/dcgan/weights.safetensors",
                 "tests/test_infra.py", "infra/base/sonogen.env", ".env", "sonogen/__pycache__/cli.cpython-311.pyc",
                 "sonogen.egg-info/PKG-INFO", "Dockerfile"]:
        assert dockerignored(path), f".dockerignore lets {path} into the build context"


def test_dockerfile_installs_the_lock_with_cuda_torch():
    train = runs("train")
    assert re.search(r"pip install [^\n]*-r requirements\.lock", train), "train must install requirements.lock"
    index = re.search(r"--extra-index-url \"?https://download\.pytorch\.org/whl/(?:\$\{?(\w+)\}?|(cu\d+))", train)
    assert index, "train must add PyTorch's CUDA wheel index"
    cuda_wheels = index.group(2) or next(
        args.partition("=")[2] for kw, args in stages()["train"]["instructions"]
        if kw == "ARG" and args.startswith(f"{index.group(1)}="))
    # The wheels' CUDA version is the base image's (cu130 <-> nvidia/cuda:13.0.x).
    cuda = re.match(r"nvidia/cuda:(\d+)\.(\d+)", stages()[stage_chain("train")[-1]]["from"])
    assert cuda_wheels == f"cu{cuda.group(1)}{cuda.group(2)}", (cuda_wheels, cuda.group(0))
    assert "pip install --no-deps ." in train
    # Every torch pin in the Dockerfile is the lock's; no CPU build.
    text = DOCKERFILE.read_text()
    for pin in re.findall(r"torch==([\w.+]+)", text):
        assert pin.split("+")[0] == lock_pins()["torch"], f"Dockerfile pins torch {pin}, the lock {lock_pins()['torch']}"
    assert "+cpu" not in text and "whl/cpu" not in text
    assert "torch.version.cuda" in train, "the build must fail on a CPU-only torch"


def test_dockerfile_serve_is_slim_and_follows_the_lock():
    serve = runs("serve")
    assert "torch" not in serve.replace("pytorch", ""), "serve installs no torch"
    assert re.search(r"pip install -c requirements\.lock", serve), "serve takes the lock's versions as constraints"
    assert "pip install --no-deps ." in serve
    pins = dict(re.findall(r"\"?([\w-]+)(?:\[[\w,]+\])?==([\w.]+)\"?", serve))
    assert {"kserve", "onnxruntime-gpu"} <= pins.keys()
    lock = lock_pins()
    if "kserve" in lock:
        assert pins["kserve"] == lock["kserve"]
    if "onnxruntime" in lock:
        assert pins["onnxruntime-gpu"] == lock["onnxruntime"], "onnxruntime-gpu must be the lock's onnxruntime release"


def test_dockerfile_header_documents_build_push_and_tags():
    header = DOCKERFILE.read_text().split("\nARG ", 1)[0]
    version = pyproject()["project"]["version"]
    for image in ("sonogen-train", "sonogen-serve", "sonogen-serve-gpu"):
        tags = re.findall(rf"ghcr\.io/sonogen/{image}:([\w.${{}}<>-]+)", header)
        assert tags, f"the header does not name ghcr.io/sonogen/{image}"
        literal = [t.rstrip(".") for t in tags if not t.startswith(("$", "<"))]
        assert literal and set(literal) == {version}, f"{image} tags {literal} != pyproject version {version}"
        target = image.removeprefix("sonogen-")
        assert re.search(rf"docker build --target {target}\b.*-t ghcr\.io/sonogen/{image}:\$VERSION", header)
        assert f"docker push ghcr.io/sonogen/{image}:$VERSION" in header
    assert "SONOGEN_IMAGE" in header and "--image" in header


# --------------------------------------------------------------------------- KServe InferenceService --

def inference_services() -> list[dict]:
    services = [o for o in objects() if o["kind"] == "InferenceService"]
    assert services, "no KServe InferenceService under infra/"
    return services


def served_container(isvc: dict) -> dict:
    """The predictor's model-server container: the only one, named as KServe names its own."""
    [container] = isvc["spec"]["predictor"]["containers"]
    assert container["name"] == "kserve-container", "KServe expects the model server in `kserve-container`"
    return container


def container_port(container: dict, port: int | str) -> int:
    """A probe's port (number or name) as the container port it targets; fails if the container has no such port."""
    ports = {p.get("name"): p["containerPort"] for p in container.get("ports", [])}
    assert port in ports.values() or port in ports, f"{container['name']}: no container port {port!r}"
    return port if isinstance(port, int) else ports[port]


@pytest.fixture(scope="module")
def kserve_models():
    """The KServe SDK's v1beta1 types: the InferenceService CRD's schema as the kserve release of the lock has it."""
    import kserve.models

    assert installed_version("kserve") == lock_pins()["kserve"], "the installed kserve SDK is not the lock's"
    return kserve.models


def check_kserve_type(value, type_name: str, where: str, models) -> None:
    """`value` against a KServe SDK type (its `openapi_types` and JSON `attribute_map`), recursively: no unknown
    field anywhere in KServe's own types, and scalars of the right type. Kubernetes' core types inside (V1Container,
    V1ObjectMeta, ...) are left to the Pod validation against the Kubernetes schemas."""
    if type_name.startswith("list["):
        assert isinstance(value, list), f"{where}: expected a list"
        for i, item in enumerate(value):
            check_kserve_type(item, type_name[5:-1], f"{where}[{i}]", models)
    elif type_name.startswith("dict("):
        assert isinstance(value, dict) and all(isinstance(k, str) for k in value), f"{where}: expected a mapping"
        for key, item in value.items():
            check_kserve_type(item, type_name[5:-1].split(", ", 1)[1], f"{where}.{key}", models)
    elif type_name in ("str", "int", "bool", "float"):
        types = {"str": str, "int": int, "bool": bool, "float": (int, float)}[type_name]
        assert isinstance(value, types) and (type_name == "bool" or not isinstance(value, bool)), (
            f"{where}: expected {type_name}, got {value!r}")
    elif re.match(r"V1(alpha|beta)\d+", type_name):
        cls = getattr(models, type_name)
        assert isinstance(value, dict), f"{where}: expected an object ({type_name})"
        fields = {json_name: attr for attr, json_name in cls.attribute_map.items()}
        unknown = set(value) - fields.keys()
        assert not unknown, f"{where}: {sorted(unknown)} are not fields of KServe's {type_name}"
        for key, item in value.items():
            check_kserve_type(item, cls.openapi_types[fields[key]], f"{where}.{key}", models)


def pod_spec_fields(version: str) -> set[str]:
    """The fields of a core/v1 PodSpec in the schemas kubernetes-validate bundles for Kubernetes `version`."""
    schemas = files("kubernetes_validate") / "kubernetes-json-schema"
    [folder] = [f for f in schemas.iterdir() if re.fullmatch(rf"v{re.escape(version)}\.\d+-local-strict", f.name)]
    return set(json.loads((folder / "podspec-v1.json").read_text())["properties"])


def parse_serve_args(container: dict, monkeypatch, capsys) -> argparse.Namespace:
    """The container's args as `python -m serving` parses them: serving/__main__.py's `main`, with its own parser,
    stopped right after parsing (before it imports a model server or touches a registry). The container's literal
    SONOGEN_SERVE_* variables are the parser's environment, as in the pod."""
    import serving.__main__

    for name in [n for n in os.environ if n.startswith("SONOGEN_SERVE_")]:
        monkeypatch.delenv(name)
    for env in container.get("env", []):
        if env["name"].startswith("SONOGEN_SERVE_") and "value" in env:
            monkeypatch.setenv(env["name"], env["value"])

    class Parsed(Exception):
        pass

    parse_args = argparse.ArgumentParser.parse_args

    def parse_and_stop(self, args=None, namespace=None):
        raise Parsed(parse_args(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_and_stop)
    try:
        serving.__main__.main(list(container.get("args", [])))
    except Parsed as parsed:
        return parsed.args[0]
    except SystemExit:
        pytest.fail(f"python -m serving rejects {container.get('args')}: {capsys.readouterr().err.strip()}")
    pytest.fail("serving.__main__.main() did not parse its arguments")


def test_serving_kustomization():
    kust = yaml.safe_load((SERVING / "kustomization.yaml").read_text())
    assert kust["namespace"] == "sonogen"
    assert kust["resources"] == ["inferenceservice.yaml"]
    assert "configMapGenerator" not in kust, "sonogen-env comes from infra/base; a second generator would clash"
    docs = [d for d in yaml.safe_load_all((SERVING / "inferenceservice.yaml").read_text()) if d]
    assert [(d["apiVersion"], d["kind"]) for d in docs] == [("serving.kserve.io/v1beta1", "InferenceService")]
    assert namespace_of(docs[0]) == kust["namespace"]


def test_inference_service_matches_kserve_v1beta1(kserve_models):
    for isvc in inference_services():
        where = f"InferenceService/{isvc['metadata']['name']}"
        assert isvc["apiVersion"] == "serving.kserve.io/v1beta1"
        assert "status" not in isvc, f"{where}: status is the controller's"
        assert "predictor" in isvc["spec"], f"{where}: the CRD requires spec.predictor"
        check_kserve_type(isvc, "V1beta1InferenceService", where, kserve_models)
        # The negative case: the walk does catch a misplaced field.
        broken = json.loads(json.dumps(isvc))
        broken["spec"]["predictor"]["minReplica"] = 1
        with pytest.raises(AssertionError, match="minReplica"):
            check_kserve_type(broken, "V1beta1InferenceService", where, kserve_models)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_inference_service_pod_spec_validates_as_a_pod(kubernetes_validate, kserve_models, version):
    """Each component's PodSpec fields, wrapped into a Pod, validate strictly; the rest are KServe's own fields."""
    pod_fields = pod_spec_fields(version)
    extension_fields = set(kserve_models.V1beta1ComponentExtensionSpec.attribute_map.values())
    for isvc in inference_services():
        for component in (c for c in ISVC_COMPONENTS if c in isvc["spec"]):
            spec = isvc["spec"][component]
            where = f"InferenceService/{isvc['metadata']['name']}.spec.{component}"
            assert not set(spec) & pod_fields & extension_fields
            pod = {"apiVersion": "v1", "kind": "Pod", "metadata": isvc["metadata"],
                   "spec": {k: v for k, v in spec.items() if k in pod_fields}}
            try:
                kubernetes_validate.validate(pod, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{where} is not a valid PodSpec for Kubernetes {version}: {exc.message} "
                            f"at {list(exc.path)}")


def test_inference_service_runs_the_serve_image_of_this_version():
    sonogen_version = installed_version("sonogen")
    assert sonogen_version == pyproject()["project"]["version"], "installed sonogen is stale: reinstall the project"
    for isvc in inference_services():
        container = served_container(isvc)
        assert container["image"] == f"ghcr.io/sonogen/sonogen-serve:{sonogen_version}", (
            f"{container['image']} is not the serve image of sonogen {sonogen_version}")
        # The image's ENTRYPOINT (python -m serving) runs: the manifest gives its arguments only.
        assert "command" not in container
        assert json.loads(last_in_chain("serve", "ENTRYPOINT")) == ["python", "-m", "serving"]


def test_inference_service_args_parse_with_the_serving_parser(monkeypatch, capsys):
    from serving.app import model_uri
    from sonogen.registry import model_name_of

    for isvc in inference_services():
        container = served_container(isvc)
        args = parse_serve_args(container, monkeypatch, capsys)
        name = isvc["metadata"]["name"]
        # The served name (the URL path /v1/models/NAME) is the registered model's, and the object's name.
        assert args.model == name and model_name_of(model_uri(args.model, args.alias, args.version)) == name
        assert args.alias == "champion" and args.version is None, "serve the champion alias, not a fixed version"
        assert args.watch > 0, "without --watch a promotion is not picked up"
        [port] = container["ports"]
        assert port["containerPort"] == args.http_port == 8080
    # The parser does reject what it does not know (the stop above is after parsing, not instead of it).
    with pytest.raises(pytest.fail.Exception, match="unrecognized arguments"):
        parse_serve_args({"args": ["--model", "x", "--watch-seconds", "60"]}, monkeypatch, capsys)


def test_inference_service_resources_and_scaling():
    for isvc in inference_services():
        predictor = isvc["spec"]["predictor"]
        resources = served_container(isvc)["resources"]
        assert str(resources.get("limits", {}).get("nvidia.com/gpu")) == "1", "one GPU per replica"
        if "nvidia.com/gpu" in resources.get("requests", {}):
            assert str(resources["requests"]["nvidia.com/gpu"]) == "1", "extended resources: request == limit"
        assert resources["requests"].keys() >= {"cpu", "memory"} and "memory" in resources["limits"]
        assert isinstance(predictor["minReplicas"], int) and predictor["minReplicas"] >= 1, (
            "at least one warm replica: a GPU cold start is slow, and the alias watcher runs only in a live pod")
        assert predictor["maxReplicas"] >= predictor["minReplicas"]


def test_inference_service_env_references():
    base = INFRA / "base" / "kustomization.yaml"
    generated = {(namespace_of(cm), cm["metadata"]["name"]): cm["data"]
                 for cm in generated_configmaps(base, yaml.safe_load(base.read_text()))}
    for isvc in inference_services():
        namespace, container = namespace_of(isvc), served_container(isvc)
        config_maps = [s["configMapRef"]["name"] for s in container.get("envFrom", []) if "configMapRef" in s]
        assert config_maps == ["sonogen-env"]
        assert "MLFLOW_TRACKING_URI" in generated[(namespace, "sonogen-env")], "infra/base renders no sonogen-env here"
        secret_keys = {(e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
                       for e in container.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})}
        assert secret_keys == {("sonogen-s3", "AWS_ACCESS_KEY_ID"), ("sonogen-s3", "AWS_SECRET_ACCESS_KEY"),
                               ("sonogen-serve", "SONOGEN_SERVE_TOKEN")}
        for secret in {name for name, _ in secret_keys}:
            assert secret in EXTERNAL_SECRETS
            assert readme_secret_commands()[(secret, namespace)] >= {k for s, k in secret_keys if s == secret}


def test_inference_service_probes_and_security():
    from serving.app import OPEN_PATHS

    uid = last_in_chain("serve", "USER").split(":")[0]
    for isvc in inference_services():
        container = served_container(isvc)
        [exposed] = [p["containerPort"] for p in container["ports"]]
        probes = {"readinessProbe": "/v2/health/ready", "livenessProbe": "/v2/health/live"}
        for probe, path in probes.items():
            get = container[probe]["httpGet"]
            assert get["path"] == path, f"{probe} checks {get['path']}, not {path}"
            assert get["path"] in OPEN_PATHS, f"{probe}: {get['path']} would need a token"
            assert container_port(container, get["port"]) == exposed, f"{probe} probes another port"
        context = container["securityContext"]
        assert context["runAsNonRoot"] is True and str(context["runAsUser"]) == uid, "the image's USER"
        assert context["capabilities"]["drop"] == ["ALL"]
        # Knative (KServe's serverless mode) rejects a pod-level securityContext unless a feature flag allows it.
        assert "securityContext" not in isvc["spec"]["predictor"], "set it per container, not for the pod"


def test_serving_readme():
    readme = (SERVING / "README.md").read_text()
    assert "kubectl apply -k infra/serving" in readme
    assert "Dockerfile" in readme and "docker build --target serve" in readme
    for isvc in inference_services():
        name = isvc["metadata"]["name"]
        args = served_container(isvc)["args"]
        watch = args[args.index("--watch") + 1]
        for text in (f"--watch {watch}", f"sonogen registry promote {name}", "--to champion",
                     f"/v1/models/{name}:predict", f"/v2/models/{name}/infer", f"--model {name}"):
            assert text in readme, f"infra/serving/README.md does not mention {text!r}"
    assert "| `serving/` |" in (INFRA / "README.md").read_text(), "infra/README.md's table has no serving/ row"
