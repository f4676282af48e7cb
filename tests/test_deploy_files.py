"""The deployment files (not built here: no Docker engine, no GPU) say what they promise."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

DOCKER = Path(__file__).resolve().parents[1] / "docker"


def _load(name: str) -> dict:
    return yaml.safe_load((DOCKER / name).read_text())


def test_dockerfile_is_ngc_triton_with_cuda_onnxruntime():
    text = (DOCKER / "Dockerfile").read_text()
    assert re.search(r"^FROM nvcr\.io/nvidia/tritonserver:\$\{TRITON_VERSION\}-py3$", text, re.M)
    assert '".[gpu]"' in text and "pip uninstall -y onnxruntime" in text  # CUDA provider, not the CPU wheel
    assert "--device gpu" in text and "--out /models" in text
    assert 'CMD ["tritonserver", "--model-repository=/models"' in text
    assert "not built by this project's ci" in text.lower()


def test_dockerfile_copies_every_package_the_project_installs():
    pyproject = tomllib.loads((DOCKER.parent / "pyproject.toml").read_text())
    folders = pyproject["tool"]["setuptools"]["packages"]["find"]["where"]
    copied = re.findall(r"^COPY (\S+) \1$", (DOCKER / "Dockerfile").read_text(), re.M)
    assert set(folders) <= set(copied), set(folders) - set(copied)


def test_compose_reserves_a_gpu_and_checks_health():
    service = _load("compose.yaml")["services"]["specwhisper"]
    assert service["build"]["dockerfile"] == "docker/Dockerfile"
    assert service["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert "/v2/health/ready" in " ".join(service["healthcheck"]["test"])
    assert {"8001:8001", "8002:8002"} <= set(service["ports"])


def test_kubernetes_replicas_service_and_autoscaling_fit_together():
    deployment = _load("k8s/deployment.yaml")
    service = _load("k8s/service.yaml")
    autoscaler = _load("k8s/hpa.yaml")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"] == labels
    assert service["spec"]["selector"] == labels
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 8000, "grpc": 8001, "metrics": 8002}
    assert {p["targetPort"] for p in service["spec"]["ports"]} == set(ports)
    target = autoscaler["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert autoscaler["spec"]["minReplicas"] <= deployment["spec"]["replicas"] <= autoscaler["spec"]["maxReplicas"]
