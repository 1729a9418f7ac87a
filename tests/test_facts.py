"""Each fact has one home: the model name the Hydra config's `name`, the ports config.properties. Python reads them
there; the files that cannot (properties, YAML, the Dockerfile) carry copies, and this test holds every copy to its
home, naming the file and line to change."""

import re

from common.config import ROOT, load_config
from servers.torchserve import CONFIG_PROPERTIES, read_properties

PORTS = ("inference_address", "management_address", "metrics_address", "grpc_inference_port", "grpc_management_port")
DEPLOY = [  # cloudbuild.yaml and cloudbuild-gpu.yaml
    (r"_MODEL_NAME: (\w+)", "name"),
    (r"--env=PORT=(\d+)", "inference_address"),
    (r"http://smoke:(\d+)", "inference_address"),
    (r"--port=(\d+)", "inference_address"),
]
# file: [(a pattern whose group is a copy, the fact it copies)]; every pattern must match somewhere in its file
COPIES = {
    "docker/config.properties": [(rf"^{key}=(?:http://[\d.]+:)?(\d+)$", key) for key in PORTS],
    "monitoring/prometheus.yml": [(r'targets: \["[\d.]+:(\d+)"\]', "metrics_address")],
    "cloud/runmonitoring.yaml": [(r"^\s+- port: (\d+)$", "metrics_address")],
    "cloud/service.yaml": [
        (r"/(\w+):[\d.]+$", "name"),
        (r"containerPort: (\d+)$", "inference_address"),
        (r"^\s+port: (\d+)$", "inference_address"),
    ],
    "cloud/cloudbuild.yaml": DEPLOY,
    "cloud/cloudbuild-gpu.yaml": DEPLOY,
    "cloud/cloudbuild-train.yaml": [(r"_MODEL_NAME[:=] ?(\w+)", "name")],
    "cloud/vertex-job.yaml": [
        (r"(\w+)-train\b", "name"),
        (r"vertex-job\.(\w+)\.yaml", "name"),
        (r"/vertex/(\w+)$", "name"),
    ],
    "Dockerfile": [
        (r"MODEL_NAME=(\w+)", "name"),
        (r" -t (\w+)(?:-gpu)?:", "name"),
        (r"^EXPOSE (\d+)$", "inference_address"),
    ],
    "dvc.yaml": [(r"artifacts/(\w+)/", "name"), (r"robustness/(\w+)/", "name"), (r"model_store/(\w+)\.mar", "name")],
}


def homes() -> dict[str, tuple[str, str]]:
    """fact: (its value, where it lives)."""
    props = read_properties(CONFIG_PROPERTIES)
    facts = {"name": (load_config().name, "configs/config.yaml `name`")}
    for key in PORTS:
        facts[key] = (props[key].rsplit(":", 1)[-1], f"config.properties `{key}`")
    return facts


def stale(path: str, text: str, facts: dict[str, tuple[str, str]]) -> list[str]:
    """Each copy in `text` (the file at `path`) that differs from its home, each pattern that matches nothing, and
    each line holding a fact's value that no pattern reads."""
    lines, found, read = text.splitlines(), [], set()
    for pattern, fact in COPIES[path]:
        value, home = facts[fact]
        matches = [(n, m) for n, line in enumerate(lines, 1) for m in re.finditer(pattern, line)]
        if not matches:
            found.append(f"{path}: no line matches {pattern!r} (the copy of {home} moved: update tests/test_facts.py)")
        found += [f"{path}:{n}: {m.group(1)} -> {value} ({home})" for n, m in matches if m.group(1) != value]
        read |= {n for n, _ in matches}
    for n, line in enumerate(lines, 1):
        for value, home in facts.values():
            if n not in read and re.search(rf"\b{value}\b", line):
                found.append(f"{path}:{n}: {value} ({home}) where no pattern reads it: add one to tests/test_facts.py")
    return found


def test_every_copy_equals_its_home():
    facts = homes()
    found = [problem for path in COPIES for problem in stale(path, (ROOT / path).read_text(), facts)]
    assert not found, "copies that differ from their home, change them:\n" + "\n".join(found)


def test_a_stale_copy_is_named_by_file_and_line():
    facts = homes()
    path = "docker/config.properties"
    text = (ROOT / path).read_text()
    port = facts["metrics_address"][0]
    line = next(n for n, s in enumerate(text.splitlines(), 1) if s.startswith("metrics_address="))
    changed = text.replace(f"metrics_address=http://127.0.0.1:{port}", "metrics_address=http://127.0.0.1:1")
    assert stale(path, changed, facts) == [f"{path}:{line}: 1 -> {port} (config.properties `metrics_address`)"]
    moved = stale(path, text.replace("grpc_inference_port=", "grpc_port="), facts)
    assert moved[0].startswith(f"{path}: no line matches") and "where no pattern reads it" in moved[1]
