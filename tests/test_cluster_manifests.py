"""The KubeRay manifests in cluster/: valid for the API server, and consistent with the repository.

Plain unit tests: no Ray, no Kubernetes. Every YAML document in cluster/*.yaml whose kind is
RayCluster, RayJob or RayService is checked

- against the KubeRay CRD schemas (`spec.versions[name=v1].schema.openAPIV3Schema`) read from
  ../shared/kuberay/ with `jsonschema`, treated the way the API server treats them: fields marked
  `x-kubernetes-int-or-string` take an integer or a string (not a float), and a field a schema
  does not list is an error (kubectl's default strict field validation rejects it; otherwise it
  would be dropped silently). Where ../shared/kuberay is absent (a user's checkout), those tests
  skip and only the subset of the CRDs that this file encodes itself (BUILTIN_SPECS: required
  fields and types of what the manifests use) is checked;
- against the repository: one image, the one cluster/Dockerfile builds, tagged with the project
  version; every repo path the manifests name exists; the Serve import paths name builder
  functions defined in the repo (read with `ast`, never imported); the cluster sizes fit the
  config the job runs (teacher tensor parallelism, Ray Train bundles); token auth everywhere,
  a bearer token for the Serve proxy, nothing exposed outside the cluster.
"""

from __future__ import annotations

import ast
import copy
import json
import re
import shlex
from functools import lru_cache
from pathlib import Path

import jsonschema
import pytest
import yaml
from conftest import ROOT

CLUSTER = ROOT / "cluster"
CRD_DIR = ROOT.parent / "shared" / "kuberay"
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml",
             "RayService": "ray.io_rayservices.yaml"}
CRDS_ABSENT = ("KubeRay CRD schemas not found at ../shared/kuberay/ (a checkout without the shared "
               "folder): the manifests are checked only against the subset of the CRDs encoded in "
               "this test (test_manifests_match_the_builtin_subset_of_the_crds)")
GPU = "nvidia.com/gpu"
SERVE_APPS = {  # the contract with compeffdist_ray.serving: name -> (import path, route prefix, required args,
    #              optional args)
    "teacher": ("compeffdist_ray.serving:build_teacher_app", "/teacher", {"config"}, {"overrides"}),
    "proxy": ("compeffdist_ray.serving:build_proxy_app", "/proxy", {"model"}, {"config", "overrides"}),
}
REPO_PATH = re.compile(r"(?<![\w/.-])((?:jobs|configs|cluster)/[\w./-]+?\.(?:py|ya?ml))(?![\w/.-])")
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _StrictLoader(_Loader):
    """PyYAML keeps the last of two equal keys; kubectl refuses the manifest: so do we."""


def _mapping_without_duplicates(loader, node, deep=False):
    keys = [loader.construct_object(k, deep=deep) for k, _ in node.value]
    dup = sorted({str(k) for k in keys if keys.count(k) > 1})
    if dup:
        raise yaml.constructor.ConstructorError(None, None, f"duplicate keys {dup}", node.start_mark)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


# ----------------------------------------------------------------------------------- loading
def _manifest_documents() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(CLUSTER.glob("*.yaml")):
        for i, doc in enumerate(yaml.load_all(path.read_text(encoding="utf-8"), Loader=_StrictLoader)):
            if isinstance(doc, dict) and doc.get("kind") in CRD_FILES:
                docs.append((f"{path.name}#{i}:{doc['kind']}", doc))
    return docs


DOCS = _manifest_documents()
DOC_IDS = [name for name, _ in DOCS]


def _docs(kind: str) -> list[dict]:
    return [copy.deepcopy(doc) for _, doc in DOCS if doc["kind"] == kind]


def _one(kind: str) -> dict:
    found = _docs(kind)
    assert len(found) == 1, f"expected one {kind} in cluster/*.yaml, found {len(found)}"
    return found[0]


def _cluster_specs() -> list[tuple[str, dict]]:
    """(label, RayCluster spec) for the RayCluster, the RayJob's cluster and the RayService's cluster."""
    out = []
    for name, doc in DOCS:
        spec = doc.get("spec", {})
        cluster = {"RayCluster": spec, "RayJob": spec.get("rayClusterSpec"),
                   "RayService": spec.get("rayClusterConfig")}[doc["kind"]]
        if cluster is not None:
            out.append((name, cluster))
    return out


def _groups(cluster: dict) -> list[tuple[str, dict]]:
    """(name, group) for the head group and every worker group."""
    return [("head", cluster["headGroupSpec"])] + [(g["groupName"], g) for g in cluster.get("workerGroupSpecs", [])]


def _ray_container(group: dict) -> dict:
    return group["template"]["spec"]["containers"][0]  # KubeRay's Ray container is the first one


def _all_containers(doc: dict):
    """Every container and init container of every pod template in a manifest, with a label."""
    def walk(node, path):
        if isinstance(node, dict):
            if "containers" in node and isinstance(node["containers"], list):
                for key in ("initContainers", "containers"):
                    for i, c in enumerate(node.get(key) or []):
                        yield f"{path}.{key}[{i}]", c
            for k, v in node.items():
                yield from walk(v, f"{path}.{k}" if path else k)
        elif isinstance(node, list):
            for i, v in enumerate(node):
                yield from walk(v, f"{path}[{i}]")
    yield from walk(doc, "")


def _int_quantity(value) -> int:
    assert isinstance(value, (int, str)) and re.fullmatch(r"\d+", str(value)), f"not a whole number: {value!r}"
    return int(value)


def _cpu_quantity(value) -> float:
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _custom_resources(params: dict) -> dict:
    """Parse rayStartParams.resources the way the KubeRay autoscaler does: '"{\\"name\\": 1}"'."""
    text = params.get("resources")
    if text is None:
        return {}
    assert len(text) > 2 and text[0] == text[-1] == '"', f"resources must be wrapped in double quotes: {text!r}"
    resources = json.loads(text[1:-1].replace("\\", ""))
    assert isinstance(resources, dict) and all(isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)
                                               for k, v in resources.items()), resources
    return resources


def _project_version() -> str:
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    project = text.split("[project]", 1)[1].split("\n[", 1)[0]
    return re.search(r'^version\s*=\s*"([^"]+)"', project, re.M).group(1)


def _dockerfile() -> str:
    return (CLUSTER / "Dockerfile").read_text(encoding="utf-8")


def _dockerfile_labels() -> dict[str, str]:
    text = _dockerfile().replace("\\\n", " ")
    return dict(re.findall(r'(org\.opencontainers\.image\.[a-z.]+)="([^"]*)"', text))


def _serve_config(doc: dict) -> dict:
    return yaml.safe_load(doc["spec"]["serveConfigV2"])


# ------------------------------------------------------------------ Kubernetes-flavoured validation
OBJECT_NAME = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"  # DNS-1035 label: KubeRay derives Service names from it
_NUM = r"(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))"
QUANTITY = rf"^(\+|-)?{_NUM}(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?{_NUM}))?$"  # as in the CRDs


def kubernetes_schema(schema: dict, *, strict: bool) -> dict:
    """A CRD's openAPIV3Schema made into a JSON Schema that judges a manifest as the API server does.

    - `x-kubernetes-int-or-string: true`: an integer or a string, nothing else (a float is refused),
      whatever `type` the node carries;
    - `nullable: true`: null is allowed besides the type;
    - `x-kubernetes-embedded-resource`: apiVersion, kind and metadata are implied;
    - strict: an object schema that lists `properties`, says nothing of `additionalProperties` and
      does not preserve unknown fields accepts no other field (the API server would prune it, and
      kubectl's strict field validation refuses it).
    """
    if isinstance(schema, bool):
        return schema
    out = dict(schema)
    for key in ("properties", "patternProperties", "definitions"):
        if isinstance(out.get(key), dict):
            out[key] = {name: kubernetes_schema(sub, strict=strict) for name, sub in out[key].items()}
    for key in ("items", "additionalProperties", "not"):
        if isinstance(out.get(key), dict):
            out[key] = kubernetes_schema(out[key], strict=strict)
    for key in ("anyOf", "allOf", "oneOf"):
        if isinstance(out.get(key), list):
            out[key] = [kubernetes_schema(sub, strict=strict) for sub in out[key]]
    if out.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if out.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    if out.get("x-kubernetes-embedded-resource"):
        props = out.setdefault("properties", {})
        props.setdefault("apiVersion", {"type": "string"})
        props.setdefault("kind", {"type": "string"})
        props.setdefault("metadata", {"type": "object"})
    if (strict and "properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


def object_schema(kind: str, spec_schema: dict, *, spec_required: bool) -> dict:
    """What every ray.io/v1 object needs besides its spec (the API server checks metadata itself)."""
    return {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata"] + (["spec"] if spec_required else []),
        "properties": {
            "apiVersion": {"enum": ["ray.io/v1"]},
            "kind": {"enum": [kind]},
            "metadata": {
                "type": "object", "required": ["name"], "additionalProperties": True,
                "properties": {
                    "name": {"type": "string", "pattern": OBJECT_NAME, "maxLength": 63},
                    "namespace": {"type": "string"},
                    "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                    "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
                },
            },
            "spec": spec_schema,
            "status": {"type": "object"},
        },
    }


@lru_cache(maxsize=None)
def crd_schema(kind: str) -> dict:
    crd = yaml.load((CRD_DIR / CRD_FILES[kind]).read_text(encoding="utf-8"), Loader=_Loader)
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    root = version["schema"]["openAPIV3Schema"]
    spec = kubernetes_schema(root["properties"]["spec"], strict=True)
    return object_schema(kind, spec, spec_required=True)


# The fallback: the fields and types of the CRDs (checked against them by
# test_builtin_subset_agrees_with_the_crds) that the manifests use, without strictness, since it
# does not list every field.
_STR = {"type": "string"}
_STR_MAP = {"type": "object", "additionalProperties": _STR}
_QTY = {"x-kubernetes-int-or-string": True, "pattern": QUANTITY}
_CONTAINER = {
    "type": "object", "required": ["name"],
    "properties": {
        "name": _STR, "image": _STR, "imagePullPolicy": _STR, "workingDir": _STR,
        "command": {"type": "array", "items": _STR}, "args": {"type": "array", "items": _STR},
        "env": {"type": "array", "items": {"type": "object", "required": ["name"], "properties": {
            "name": _STR, "value": _STR, "valueFrom": {"type": "object", "properties": {
                "secretKeyRef": {"type": "object", "required": ["key"], "properties": {
                    "name": _STR, "key": _STR, "optional": {"type": "boolean"}}}}}}}},
        "envFrom": {"type": "array", "items": {"type": "object", "properties": {
            "secretRef": {"type": "object", "properties": {"name": _STR, "optional": {"type": "boolean"}}}}}},
        "ports": {"type": "array", "items": {"type": "object", "required": ["containerPort"], "properties": {
            "containerPort": {"type": "integer"}, "name": _STR, "protocol": _STR}}},
        "resources": {"type": "object", "properties": {
            "requests": {"type": "object", "additionalProperties": _QTY},
            "limits": {"type": "object", "additionalProperties": _QTY}}},
        "volumeMounts": {"type": "array", "items": {"type": "object", "required": ["name", "mountPath"],
                                                    "properties": {"name": _STR, "mountPath": _STR}}},
    },
}
_POD_TEMPLATE = {
    "type": "object",
    "properties": {
        "metadata": {"type": "object", "properties": {"labels": _STR_MAP, "annotations": _STR_MAP}},
        "spec": {"type": "object", "required": ["containers"], "properties": {
            "containers": {"type": "array", "items": _CONTAINER},
            "initContainers": {"type": "array", "items": _CONTAINER},
            "volumes": {"type": "array", "items": {"type": "object", "required": ["name"],
                                                   "properties": {"name": _STR}}},
            "tolerations": {"type": "array", "items": {"type": "object", "properties": {
                "key": _STR, "operator": _STR, "effect": _STR, "value": _STR}}},
            "nodeSelector": _STR_MAP, "serviceAccountName": _STR,
        }},
    },
}
_CLUSTER_SPEC = {
    "type": "object", "required": ["headGroupSpec"],
    "properties": {
        "rayVersion": _STR,
        "enableInTreeAutoscaling": {"type": "boolean"},
        "authOptions": {"type": "object", "properties": {"mode": {"enum": ["disabled", "token"]}}},
        "autoscalerOptions": {"type": "object", "properties": {
            "idleTimeoutSeconds": {"type": "integer"},
            "upscalingMode": {"enum": ["Default", "Aggressive", "Conservative"]},
            "image": _STR,
            "resources": {"type": "object", "properties": {
                "requests": {"type": "object", "additionalProperties": _QTY},
                "limits": {"type": "object", "additionalProperties": _QTY}}}}},
        "headGroupSpec": {"type": "object", "required": ["template"], "properties": {
            "serviceType": _STR, "enableIngress": {"type": "boolean"},
            "rayStartParams": _STR_MAP, "template": _POD_TEMPLATE}},
        "workerGroupSpecs": {"type": "array", "items": {
            "type": "object", "required": ["groupName", "maxReplicas", "minReplicas", "template"],
            "properties": {
                "groupName": _STR, "replicas": {"type": "integer"},
                "minReplicas": {"type": "integer"}, "maxReplicas": {"type": "integer"},
                "idleTimeoutSeconds": {"type": "integer"}, "suspend": {"type": "boolean"},
                "rayStartParams": _STR_MAP, "template": _POD_TEMPLATE}}},
    },
}
BUILTIN_SPECS = {
    "RayCluster": (_CLUSTER_SPEC, True),
    "RayJob": ({"type": "object", "properties": {
        "entrypoint": _STR, "runtimeEnvYAML": _STR, "submissionMode": _STR, "jobId": _STR,
        "shutdownAfterJobFinishes": {"type": "boolean"}, "ttlSecondsAfterFinished": {"type": "integer"},
        "activeDeadlineSeconds": {"type": "integer"}, "backoffLimit": {"type": "integer"},
        "suspend": {"type": "boolean"}, "entrypointNumCpus": {"type": "number"},
        "entrypointNumGpus": {"type": "number"}, "clusterSelector": _STR_MAP,
        "rayClusterSpec": _CLUSTER_SPEC}}, False),
    "RayService": ({"type": "object", "required": ["rayClusterConfig"], "properties": {
        "serveConfigV2": _STR, "excludeHeadPodFromServeSvc": {"type": "boolean"},
        "upgradeStrategy": {"type": "object", "properties": {"type": _STR}},
        "rayClusterConfig": _CLUSTER_SPEC}}, True),
}


@lru_cache(maxsize=None)
def builtin_schema(kind: str) -> dict:
    spec, required = BUILTIN_SPECS[kind]
    return object_schema(kind, kubernetes_schema(spec, strict=False), spec_required=required)


def _path(parts) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<root>"


def _describe(error: jsonschema.ValidationError) -> list[str]:
    parts = list(error.absolute_path)
    if error.validator == "required":
        match = re.match(r"^'(.+)' is a required property$", error.message)
        missing = match.group(1) if match else "?"
        return [f"{_path(parts + [missing])}: required field is missing"]
    if error.validator == "additionalProperties" and error.validator_value is False:
        known = set(error.schema.get("properties", {}))
        return [f"{_path(parts + [extra])}: unknown field (the CRD has no such field)"
                for extra in sorted(set(error.instance) - known)]
    if error.validator == "anyOf" and error.schema.get("x-kubernetes-int-or-string"):
        return [f"{_path(parts)}: must be an integer or a string (int-or-string), "
                f"got {type(error.instance).__name__} {error.instance!r}"]
    if error.validator == "pattern" and error.schema.get("x-kubernetes-int-or-string"):
        return [f"{_path(parts)}: {error.instance!r} is not a Kubernetes quantity"]
    return [f"{_path(parts)}: {error.message}"]


def validate(doc: dict, schema: dict) -> list[str]:
    """Every problem of `doc` under `schema`, one line each: '<field path>: <what is wrong>'."""
    validator = jsonschema.Draft7Validator(schema)
    return sorted(line for error in validator.iter_errors(doc) for line in _describe(error))


VALIDATORS = {"crd": crd_schema, "builtin": builtin_schema}


def _schema_for(which: str, kind: str) -> dict:
    if which == "crd" and not CRD_DIR.is_dir():
        pytest.skip(CRDS_ABSENT)
    return VALIDATORS[which](kind)


# ------------------------------------------------------------------------------ schema tests
def test_the_three_kinds_are_there_with_unique_names():
    kinds = sorted(doc["kind"] for _, doc in DOCS)
    assert kinds == ["RayCluster", "RayJob", "RayService"], kinds
    names = [doc["metadata"]["name"] for _, doc in DOCS]
    assert len(set(names)) == len(names), names


@pytest.mark.parametrize("name", DOC_IDS)
def test_manifest_is_valid_under_the_kuberay_crd(name):
    if not CRD_DIR.is_dir():
        pytest.skip(CRDS_ABSENT)
    doc = dict(DOCS)[name]
    assert validate(doc, crd_schema(doc["kind"])) == []


@pytest.mark.parametrize("name", DOC_IDS)
def test_manifests_match_the_builtin_subset_of_the_crds(name):
    doc = dict(DOCS)[name]
    assert validate(doc, builtin_schema(doc["kind"])) == []


def test_crds_have_token_auth_and_the_fields_the_subset_assumes():
    """authOptions.mode: token exists (KubeRay >= 1.5.1), and the builtin subset names real fields."""
    if not CRD_DIR.is_dir():
        pytest.skip(CRDS_ABSENT)

    def check(sub: dict, full: dict, where: str):
        if "properties" in sub:
            for key, child in sub["properties"].items():
                assert key in full.get("properties", {}), f"{where}.{key}: not in the CRD"
                check(child, full["properties"][key], f"{where}.{key}")
        for key in ("items", "additionalProperties"):
            if isinstance(sub.get(key), dict) and isinstance(full.get(key), dict):
                check(sub[key], full[key], f"{where}[]")
        if "required" in sub:
            assert set(sub["required"]) <= set(full.get("required", [])), where
        if "type" in sub and "type" in full:
            assert sub["type"] == full["type"], f"{where}: {sub['type']} vs {full['type']}"

    for kind in CRD_FILES:
        spec = crd_schema(kind)["properties"]["spec"]
        key = {"RayCluster": None, "RayJob": "rayClusterSpec", "RayService": "rayClusterConfig"}[kind]
        cluster = spec["properties"][key] if key else spec
        assert "token" in cluster["properties"]["authOptions"]["properties"]["mode"]["enum"], kind
        assert cluster["properties"]["workerGroupSpecs"]["items"]["properties"]["rayStartParams"][
            "additionalProperties"] == {"type": "string"}, kind
        check(builtin_schema(kind)["properties"]["spec"], spec, f"{kind}.spec")


def _set(doc: dict, dotted: str, value) -> None:
    *parents, last = [int(p) if p.isdigit() else p for p in dotted.split(".")]
    node = doc
    for p in parents:
        node = node[p]
    if value is _DELETE:
        del node[last]
    else:
        node[last] = value


_DELETE = object()
_WORKER0 = "spec.workerGroupSpecs.0"
_RES = f"{_WORKER0}.template.spec.containers.0.resources"
MUTATIONS = [  # (kind, field to change, new value, the problem expected at that field's path)
    ("RayCluster", f"{_WORKER0}.maxReplicas", _DELETE,
     "spec.workerGroupSpecs[0].maxReplicas: required field is missing"),
    ("RayCluster", f"{_WORKER0}.groupName", _DELETE, "spec.workerGroupSpecs[0].groupName: required field is missing"),
    ("RayCluster", "spec.headGroupSpec.template", _DELETE, "spec.headGroupSpec.template: required field is missing"),
    ("RayCluster", f"{_WORKER0}.rayStartParams.num-gpus", 8,
     "spec.workerGroupSpecs[0].rayStartParams.num-gpus: 8 is not of type 'string'"),
    ("RayCluster", f"{_WORKER0}.minReplicas", "0",
     "spec.workerGroupSpecs[0].minReplicas: '0' is not of type 'integer'"),
    ("RayCluster", f"{_RES}.limits.cpu", 0.5,
     "spec.workerGroupSpecs[0].template.spec.containers[0].resources.limits.cpu: "
     "must be an integer or a string (int-or-string), got float 0.5"),
    ("RayCluster", f"{_RES}.limits.memory", "lots", "spec.workerGroupSpecs[0].template.spec.containers[0].resources"
     ".limits.memory: 'lots' is not a Kubernetes quantity"),
    ("RayCluster", "metadata.name", _DELETE, "metadata.name: required field is missing"),
    ("RayCluster", "apiVersion", "ray.io/v1alpha1", "apiVersion: 'ray.io/v1alpha1' is not one of ['ray.io/v1']"),
    ("RayJob", "spec.shutdownAfterJobFinishes", "yes", "spec.shutdownAfterJobFinishes: 'yes' is not of type 'boolean'"),
    ("RayJob", "spec.rayClusterSpec.workerGroupSpecs.0.minReplicas", _DELETE,
     "spec.rayClusterSpec.workerGroupSpecs[0].minReplicas: required field is missing"),
    ("RayService", "spec.rayClusterConfig", _DELETE, "spec.rayClusterConfig: required field is missing"),
    ("RayService", "spec.rayClusterConfig.headGroupSpec.rayStartParams.num-cpus", 0,
     "spec.rayClusterConfig.headGroupSpec.rayStartParams.num-cpus: 0 is not of type 'string'"),
]


@pytest.mark.parametrize("which", ["crd", "builtin"])
@pytest.mark.parametrize("kind,field,value,expected", MUTATIONS, ids=[f"{m[0]}:{m[1]}" for m in MUTATIONS])
def test_a_broken_manifest_is_reported_at_the_field(which, kind, field, value, expected):
    schema = _schema_for(which, kind)
    doc = _one(kind)
    assert validate(doc, schema) == []
    _set(doc, field, value)
    assert expected in validate(doc, schema)


@pytest.mark.parametrize("which", ["crd", "builtin"])
@pytest.mark.parametrize("quantity", [8, "8", "500m", "64Gi", "1e3"])
def test_int_or_string_quantities_accept_integers_and_strings(which, quantity):
    schema = _schema_for(which, "RayCluster")
    doc = _one("RayCluster")
    resources = doc["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]
    resources["requests"]["cpu"] = quantity
    resources["limits"][GPU] = quantity
    assert validate(doc, schema) == []


def test_a_duplicate_key_is_refused_when_the_manifests_are_read():
    text = (CLUSTER / "raycluster.yaml").read_text(encoding="utf-8")
    broken = text.replace("      minReplicas: 0\n", "      minReplicas: 0\n      minReplicas: 1\n", 1)
    assert broken != text
    with pytest.raises(yaml.YAMLError, match="duplicate keys"):
        list(yaml.load_all(broken, Loader=_StrictLoader))


def test_an_unknown_field_is_reported_by_the_crd_validator():
    """A typo would be pruned silently by the API server, or refused by kubectl's strict validation."""
    schema = _schema_for("crd", "RayCluster")
    doc = _one("RayCluster")
    group = doc["spec"]["workerGroupSpecs"][0]
    group["rayStartParam"] = group.pop("rayStartParams")
    doc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["resource"] = {}
    assert validate(doc, schema) == [
        "spec.headGroupSpec.template.spec.containers[0].resource: unknown field (the CRD has no such field)",
        "spec.workerGroupSpecs[0].rayStartParam: unknown field (the CRD has no such field)",
    ]


# --------------------------------------------------------------------------------- the image
def test_every_container_runs_the_image_that_cluster_dockerfile_builds():
    labels = _dockerfile_labels()
    version = _project_version()
    assert labels.get("org.opencontainers.image.version") == version, (labels, version)
    images = {c.get("image") for _, doc in DOCS for _, c in _all_containers(doc)}
    images |= {cluster.get("autoscalerOptions", {}).get("image") for _, cluster in _cluster_specs()} - {None}
    assert len(images) == 1, f"one image everywhere, found {sorted(map(str, images))}"
    image = images.pop()
    repository, _, tag = image.rpartition(":")
    assert tag == version, f"{image}: the tag must be the project version {version}"
    assert repository.rsplit("/", 1)[-1] == labels["org.opencontainers.image.title"], image
    assert f"-t {image} " in _dockerfile(), "the Dockerfile's build command must name the manifests' image"
    assert image in (CLUSTER / "README.md").read_text(encoding="utf-8")


def test_dockerfile_builds_on_ray_2_60_python_3_11_with_the_gpu_extra():
    text = _dockerfile()
    base = re.search(r"^ARG BASE_IMAGE=(\S+)$", text, re.M).group(1)
    assert re.fullmatch(r"rayproject/ray(-llm)?:2\.60\.0-py311-(gpu|cu\d+)", base), base
    assert re.search(r"^FROM \$\{BASE_IMAGE\}$", text, re.M)
    assert re.search(r'pip install [^\n]*\[gpu\]', text)
    workdir = re.findall(r"^WORKDIR (\S+)$", text, re.M)[-1]
    for sub in ("configs", "jobs"):
        assert re.search(rf"^COPY (--chown=\S+ )?{sub} \./{sub}$", text, re.M), f"{sub}/ is not copied into {workdir}"
    for name, doc in DOCS:  # relative paths in entrypoints and Serve args resolve against it
        for where, c in _all_containers(doc):
            assert c.get("workingDir") == workdir, f"{name} {where}: workingDir {c.get('workingDir')!r} != {workdir}"
    for label, cluster in _cluster_specs():
        assert cluster.get("rayVersion") == "2.60.0", label


# --------------------------------------------------------------------------- repository paths
def _strings(node):
    if isinstance(node, str):
        yield node
        if "\n" in node:  # embedded YAML: serveConfigV2, runtimeEnvYAML
            try:
                inner = yaml.safe_load(node)
            except yaml.YAMLError:
                return
            if not isinstance(inner, str):
                yield from _strings(inner)
    elif isinstance(node, dict):
        for v in node.values():
            yield from _strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from _strings(v)


def test_every_repo_path_the_manifests_name_exists():
    named = {m for _, doc in DOCS for s in _strings(doc) for m in REPO_PATH.findall(s)}
    assert {"jobs/run_pipeline.py", "configs/llama-70b-to-3b.yaml"} <= named, named
    missing = sorted(p for p in named if not (ROOT / p).is_file())
    assert not missing, f"named in cluster/*.yaml but not in the repository: {missing}"


# ----------------------------------------------------------------------------------- clusters
@pytest.mark.parametrize("label,cluster", _cluster_specs(), ids=[label for label, _ in _cluster_specs()])
def test_cluster_shape(label, cluster):
    assert cluster.get("authOptions", {}).get("mode") == "token", f"{label}: token authentication must be on"
    assert cluster.get("enableInTreeAutoscaling") is True, label
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"].get("num-gpus") == "0", f"{label}: the head must be CPU-only"
    assert GPU not in _ray_container(head).get("resources", {}).get("limits", {}), label
    names = [name for name, _ in _groups(cluster)]
    assert len(set(names)) == len(names), names
    for name, group in _groups(cluster):
        params = group.get("rayStartParams", {})
        bad = {k: v for k, v in params.items() if not isinstance(v, str)}
        assert not bad, f"{label} {name}: rayStartParams values must be strings: {bad}"
        _custom_resources(params)  # parses as the autoscaler will
        res = _ray_container(group).get("resources", {})
        requests, limits = res.get("requests", {}), res.get("limits", {})
        for key in ("cpu", "memory"):
            assert key in requests and key in limits, f"{label} {name}: set {key} requests and limits"
        gpus = _int_quantity(limits.get(GPU, 0))
        assert _int_quantity(requests.get(GPU, gpus)) == gpus, f"{label} {name}: GPU requests != limits"
        assert _int_quantity(params.get("num-gpus", "0")) == gpus, \
            f"{label} {name}: num-gpus {params.get('num-gpus')!r} != {GPU} {gpus}"
        if name != "head":
            lo, hi = group["minReplicas"], group["maxReplicas"]
            assert 0 <= lo <= hi, f"{label} {name}: minReplicas {lo} > maxReplicas {hi}"
            assert lo <= group.get("replicas", lo) <= hi, f"{label} {name}: replicas outside [min, max]"


def _gpus(group: dict) -> int:
    return _int_quantity(group.get("rayStartParams", {}).get("num-gpus", "0"))


def _teacher_group(label: str, cluster: dict, vllm) -> dict:
    """The worker group that hosts one vLLM teacher replica per pod."""
    workers = cluster.get("workerGroupSpecs", [])
    need = vllm.tensor_parallel_size * vllm.pipeline_parallel_size
    if vllm.accelerator_type:
        key = f"accelerator_type:{vllm.accelerator_type}"
        groups = [g for g in workers if _custom_resources(g.get("rayStartParams", {})).get(key)]
        assert len(groups) == 1, (f"{label}: exactly one worker group must declare the custom resource {key}: "
                                  f"the autoscaler cannot start a pod for a resource no group declares")
        assert _custom_resources(groups[0]["rayStartParams"])[key] == 1, label
    else:
        groups = [g for g in workers if _gpus(g) >= need]
        assert groups, f"{label}: no worker group has the {need} GPUs one teacher replica needs"
    group = groups[0]
    assert _gpus(group) == need == 8, f"{label} {group['groupName']}: {_gpus(group)} GPUs a pod; the 70B teacher " \
                                      f"takes {need} (tensor parallel) and the cluster is sized for 8"
    return group


def _job_config():
    from compeffdist_ray.cli import build_parser
    from compeffdist_ray.config import load_config

    job = _one("RayJob")
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["python", "jobs/run_pipeline.py"], argv
    args = build_parser().parse_args(["run", *argv[2:]])  # run_pipeline.py takes `compeffdist run`'s arguments
    assert args.config, "the entrypoint must name a --config"
    return load_config(ROOT / args.config, list(args.overrides or []))


def test_the_teacher_group_holds_one_vllm_replica_per_pod():
    cfg = _job_config()
    assert cfg.teacher.backend == "vllm"
    for label, cluster in _cluster_specs():
        group = _teacher_group(label, cluster, cfg.teacher.vllm)
        assert group["maxReplicas"] >= cfg.teacher.concurrency, label


def test_ray_train_bundles_fit_the_gpu_groups():
    cfg = _job_config()
    tc = cfg.train
    assert tc.use_gpu
    for label, cluster in _cluster_specs():
        if label.endswith("RayService"):
            continue  # serving only
        fits, capacity = [], 0
        for name, group in _groups(cluster)[1:]:
            gpus = _int_quantity(group["rayStartParams"].get("num-gpus", "0"))
            if not gpus:
                continue
            cpus = _cpu_quantity(_ray_container(group)["resources"]["limits"]["cpu"])
            per_pod = min(gpus // tc.gpus_per_worker, cpus // tc.cpus_per_worker)
            if per_pod:
                fits.append(name)
                capacity += per_pod * group["maxReplicas"]
        assert fits, (f"{label}: no GPU group fits a training worker "
                      f"({tc.gpus_per_worker} GPU, {tc.cpus_per_worker} CPU)")
        assert capacity >= tc.num_workers, \
            f"{label}: room for {capacity} training workers, the config asks {tc.num_workers}"


def test_nothing_is_exposed_outside_the_cluster():
    for label, cluster in _cluster_specs():
        head = cluster["headGroupSpec"]
        assert head.get("serviceType", "ClusterIP") == "ClusterIP", f"{label}: never expose 8265/6379/10001/8000"
        assert not head.get("enableIngress"), label
        for name, group in _groups(cluster):
            pod = group["template"]["spec"]
            assert not pod.get("hostNetwork"), f"{label} {name}"
            for c in pod["containers"]:
                assert not any("hostPort" in p for p in c.get("ports", [])), f"{label} {name}"
    service = _one("RayService")
    assert service["spec"].get("serveService", {}).get("spec", {}).get("type", "ClusterIP") == "ClusterIP"


# ---------------------------------------------------------------------------------- the job
def test_the_rayjob_runs_on_the_raycluster_and_cleans_up():
    job, cluster = _one("RayJob"), _one("RayCluster")
    assert job["spec"]["rayClusterSpec"] == cluster["spec"], \
        "spec.rayClusterSpec of cluster/rayjob.yaml must equal spec of cluster/raycluster.yaml"
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    assert job["spec"]["ttlSecondsAfterFinished"] >= 0


def test_the_rayjob_runtime_env_is_jobs_runtime_env():
    job = _one("RayJob")
    env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    shipped = yaml.safe_load((ROOT / "jobs" / "runtime_env.yaml").read_text(encoding="utf-8"))
    # working_dir / excludes describe an upload from a checkout; the image already holds the code.
    local_only = {"working_dir", "excludes"}
    assert "working_dir" not in env, "the RayJob runs the code in the image; a working_dir would upload the submitter's"
    assert {k: v for k, v in env.items() if k not in local_only} == \
        {k: v for k, v in shipped.items() if k not in local_only}


# ------------------------------------------------------------------------------- the service
def _module_file(module: str) -> Path | None:
    base = ROOT.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _find_function(module: str, name: str, seen: frozenset = frozenset()):
    """(file, FunctionDef) defining `name` in `module` of this repo, following `from x import name`."""
    path = _module_file(module)
    if path is None or (module, name) in seen:
        return None
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
            return path, node
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in tree.body:
        if isinstance(node, ast.ImportFrom):
            for alias in node.names:
                if (alias.asname or alias.name) == name:
                    if node.level:
                        base = package.split(".")[: len(package.split(".")) - node.level + 1]
                        source = ".".join(base + ([node.module] if node.module else []))
                    else:
                        source = node.module or ""
                    found = _find_function(source, alias.name, seen | {(module, name)})
                    if found:
                        return found
    return None


def test_the_rayservice_hosts_the_teacher_and_the_proxy():
    service = _one("RayService")
    serve = _serve_config(service)
    assert serve.get("http_options", {}).get("port", 8000) == 8000, "KubeRay's serve Service targets port 8000"
    apps = {app["name"]: app for app in serve["applications"]}
    assert set(apps) == set(SERVE_APPS), sorted(apps)
    for name, (import_path, prefix, required, optional) in SERVE_APPS.items():
        app = apps[name]
        assert app["import_path"] == import_path, name
        assert app["route_prefix"] == prefix, name
        assert required <= set(app.get("args", {})) <= required | optional, (name, sorted(app.get("args", {})))
        assert all(isinstance(app["args"][k], str) and app["args"][k] for k in required), name
    from compeffdist_ray.config import load_config

    teacher = apps["teacher"]["args"]
    assert (ROOT / teacher["config"]).is_file(), teacher["config"]
    cfg = load_config(ROOT / teacher["config"], teacher.get("overrides"))
    assert cfg.teacher.backend == "vllm"
    cluster = service["spec"]["rayClusterConfig"]
    group = _teacher_group("RayService", cluster, cfg.teacher.vllm)
    assert group["minReplicas"] >= 1, "a service keeps its teacher loaded"
    # The proxy replicas ask for what the other group's pods have (serve.num_gpus / num_cpus, per replica).
    proxy = apps["proxy"]["args"]
    proxy_cfg = load_config(ROOT / proxy["config"] if proxy.get("config") else None, proxy.get("overrides"))
    others = [g for g in cluster["workerGroupSpecs"] if g is not group]
    assert len(others) == 1, "one worker group for the proxy besides the teacher's"
    pod_gpus = _gpus(others[0])
    pod_cpus = _cpu_quantity(_ray_container(others[0])["resources"]["limits"]["cpu"])
    assert proxy_cfg.serve.num_gpus == pod_gpus, (f"proxy replicas take serve.num_gpus={proxy_cfg.serve.num_gpus} "
                                                  f"GPUs, {others[0]['groupName']} pods have {pod_gpus}")
    assert proxy_cfg.serve.num_cpus <= pod_cpus


@pytest.mark.parametrize("app", sorted(SERVE_APPS))
def test_serve_import_paths_name_builders_defined_in_the_repo(app):
    import_path = SERVE_APPS[app][0]
    assert import_path in {a["import_path"] for a in _serve_config(_one("RayService"))["applications"]}
    module, _, name = import_path.partition(":")
    assert _module_file(module) is not None, \
        f"{import_path}: no module file {module.replace('.', '/')}.py or {module.replace('.', '/')}/__init__.py"
    found = _find_function(module, name)
    assert found, f"{import_path}: {module} neither defines nor imports a function {name}"
    path, fn = found
    positional = fn.args.posonlyargs + fn.args.args
    assert positional or fn.args.vararg, f"{path}:{fn.lineno} {name} must take the Serve args dict"
    assert len(positional) - len(fn.args.defaults) <= 1, \
        f"{path}:{fn.lineno} {name}: a Serve application builder is called with one argument (the args dict)"


def test_the_serve_config_files_agree_with_the_rayservice():
    """cluster/serve/<app>.yaml (for `serve deploy`) serve the same builder with the same pipeline config.

    Route prefixes may differ: a file deploys its app alone (the teacher at `/`, the config's
    default), the RayService puts both apps behind one proxy at /teacher and /proxy.
    """
    apps = {a["name"]: a for a in _serve_config(_one("RayService"))["applications"]}
    for name in SERVE_APPS:
        path = CLUSTER / "serve" / f"{name}.yaml"
        assert path.is_file(), f"{path.relative_to(ROOT)} is missing"
        shipped = yaml.safe_load(path.read_text(encoding="utf-8"))
        mine = apps[name]
        match = [a for a in shipped.get("applications", []) if a.get("import_path") == mine["import_path"]]
        assert len(match) == 1, f"{path.name}: no application with import_path {mine['import_path']}"
        theirs = match[0]
        assert theirs.get("name") == name, f"{path.name}: application name {theirs.get('name')!r}"
        for key in ("config", "model"):
            if key in mine["args"] and key in theirs.get("args", {}):
                assert theirs["args"][key] == mine["args"][key], f"{path.name}: args.{key} differs"


def test_every_rayservice_container_gets_the_serve_token_from_a_secret():
    from compeffdist_ray.config import ServeConfig

    token_env = ServeConfig().token_env
    assert token_env == "COMPEFFDIST_SERVE_TOKEN"
    for where, container in _all_containers(_one("RayService")):
        env = {e["name"]: e for e in container.get("env", [])}
        assert token_env in env, f"{where}: {token_env} is not set"
        ref = env[token_env].get("valueFrom", {}).get("secretKeyRef")
        assert ref and ref.get("name") and ref.get("key"), f"{where}: {token_env} must come from a Secret"
        assert "value" not in env[token_env], f"{where}: never write the token into the manifest"
        assert not ref.get("optional"), f"{where}: without the Secret the service must not start"


def test_the_cluster_readme_covers_deployment_and_exposure():
    text = (CLUSTER / "README.md").read_text(encoding="utf-8")
    for needle in ("helm install", "raycluster.yaml", "rayjob.yaml", "rayservice.yaml", "RAY_AUTH_MODE=token",
                   "port-forward", "ray job submit", "compeffdist-serve-token", "Authorization: Bearer",
                   "CVE-2023-48022", "8265", "6379", "10001", "8000"):
        assert needle in text, f"cluster/README.md does not mention {needle!r}"
    version = re.search(r"--version (\d+)\.(\d+)\.(\d+)", text)
    assert version and tuple(map(int, version.groups())) >= (1, 5, 1), "install KubeRay >= 1.5.1"
