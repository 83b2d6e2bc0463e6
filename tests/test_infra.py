"""Static checks of the container image (Dockerfile, .dockerignore) and the Kubernetes manifests (infra/).

No cluster, no Docker, no network: Kubernetes objects are validated against the OpenAPI schemas bundled with
`kubernetes-validate`; `kubectl kustomize` renders the local kustomizations when kubectl is installed.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import tomllib
from functools import cache
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"

# Oldest and newest Kubernetes minor versions the manifests are validated for.
K8S_VERSIONS = ("1.29", "1.37")
# Top-level source folders the Dockerfile may COPY before they exist (written later by others).
MAY_APPEAR_LATER = {"serving"}
# The namespaces objects may live in: sonogen's own, and the one standalone KFP runs pipeline pods in.
NAMESPACES = {"sonogen", "kubeflow"}
# Secrets referred to by name; created by hand (infra/README.md), never in git.
EXTERNAL_SECRETS = {"sonogen-s3", "sonogen-postgres"}
KUSTOMIZATION_KINDS = {"Kustomization", "Component"}
CLUSTER_SCOPED_KINDS = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition",
                        "PersistentVolume", "StorageClass", "PriorityClass"}
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "ReplicaSet"}
# API groups built into Kubernetes (schemas bundled with kubernetes-validate). Custom resources (KServe's
# InferenceService, serving.kserve.io) have no bundled schema: they get the structural and image checks only.
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
    """(workload, pod spec) for every workload."""
    specs = []
    for obj in objects():
        if obj["kind"] in WORKLOAD_KINDS:
            specs.append((obj, obj["spec"]["template"]["spec"]))
        elif obj["kind"] == "Pod":
            specs.append((obj, obj["spec"]))
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
@pytest.mark.parametrize("overlay", ["base", "overlays/local"])
def test_kustomize_renders_the_local_kustomizations(kubernetes_validate, overlay):
    if not (INFRA / overlay / "kustomization.yaml").is_file():
        pytest.skip(f"no infra/{overlay}")
    rendered = subprocess.run(["kubectl", "kustomize", str(INFRA / overlay)], capture_output=True, text=True,
                              timeout=60)
    assert rendered.returncode == 0, rendered.stderr
    objs = [d for d in yaml.safe_load_all(rendered.stdout) if d]
    names = {(o["kind"], namespace_of(o), o["metadata"]["name"]) for o in objs}
    assert names == {(o["kind"], namespace_of(o), o["metadata"]["name"]) for o in objects()}
    for obj in objs:
        if api_group(obj) in BUILTIN_API_GROUPS:
            kubernetes_validate.validate(obj, K8S_VERSIONS[-1], strict=True)
    def key(cm: dict) -> tuple:
        return namespace_of(cm), cm["metadata"]["name"]

    configmaps = {key(o): o["data"] for o in objs if o["kind"] == "ConfigMap"}
    expected = {key(cm): cm["data"] for cm in objects() if cm["kind"] == "ConfigMap"}
    overlay_path = INFRA / overlay / "kustomization.yaml"
    for cm in generated_configmaps(overlay_path, yaml.safe_load(overlay_path.read_text())):
        if cm["_behavior"] == "merge":
            expected[key(cm)] = expected[key(cm)] | cm["data"]
    assert configmaps == expected


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
        matches = [(obj, spec) for obj, spec in pod_specs() if namespace_of(obj) == namespace_of(svc)
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
    assert {"train", "serve"} <= set(stages())


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


@pytest.mark.parametrize("target", ["train", "serve"])
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
    assert "sonogen" in pyproject()["project"]["scripts"], "ENTRYPOINT sonogen needs the console script"


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
    for image in ("sonogen-train", "sonogen-serve"):
        tags = re.findall(rf"ghcr\.io/sonogen/{image}:([\w.${{}}<>-]+)", header)
        assert tags, f"the header does not name ghcr.io/sonogen/{image}"
        literal = [t.rstrip(".") for t in tags if not t.startswith(("$", "<"))]
        assert literal and set(literal) == {version}, f"{image} tags {literal} != pyproject version {version}"
        target = image.removeprefix("sonogen-")
        assert re.search(rf"docker build --target {target}\b.*-t ghcr\.io/sonogen/{image}:\$VERSION", header)
        assert f"docker push ghcr.io/sonogen/{image}:$VERSION" in header
    assert "SONOGEN_IMAGE" in header and "--image" in header
