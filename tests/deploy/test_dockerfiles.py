"""Static checks of deploy/docker/*.Dockerfile (no Docker engine runs here or in CI).

Each image: multi-stage, base images pinned to an exact tag (or a digest), a non-root
final user, a health check on the right endpoint, files copied from the build context
that exist and pass .dockerignore, and ``TETHER_*`` variables the settings read.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.deploy.env_names import ROOT, SETTINGS_BY_COMMAND, check_environment
from tether.cli import COMMANDS

DOCKER = ROOT / "deploy" / "docker"
#: image file -> (the tether subcommand it runs, what its health check must call)
IMAGES = {
    "edge-jetson.Dockerfile": ("edge", "/v2/health/ready"),
    "edge-cpu.Dockerfile": ("edge", "/v2/health/ready"),
    # The cloud worker speaks MQTT only; /metrics opens once its models are loaded.
    "cloud.Dockerfile": ("cloud", "/metrics"),
}
PINNED = re.compile(
    r"^(?P<repo>[a-z0-9][a-z0-9._/-]*(?::[0-9]+/[a-z0-9._/-]+)?)"
    r"(?::(?P<tag>[A-Za-z0-9_][A-Za-z0-9_.-]*))?(?:@sha256:(?P<digest>[0-9a-f]{64}))?$"
)


@dataclass
class Stage:
    image: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    lines: list[str] = []
    pending = ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        lines.append(pending + stripped)
        pending = ""
    assert not pending, "dangling line continuation"
    result = []
    for line in lines:
        keyword, _, rest = line.partition(" ")
        result.append((keyword.upper(), rest.strip()))
    return result


def stages(text: str) -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults and the stages, with base images resolved."""
    args: dict[str, str] = {}
    found: list[Stage] = []
    for keyword, rest in instructions(text):
        if keyword == "FROM":
            words = [w for w in rest.split() if not w.startswith("--platform")]
            image = re.sub(
                r"\$\{(\w+)\}|\$(\w+)", lambda m: args[m.group(1) or m.group(2)], words[0]
            )
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            found.append(Stage(image, name))
        elif keyword == "ARG" and not found:
            key, _, value = rest.partition("=")
            args[key] = value
        elif found:
            found[-1].instructions.append((keyword, rest))
    return args, found


def env_of(stage: Stage) -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, rest in stage.instructions:
        if keyword == "ENV":
            for word in shlex.split(rest):
                key, _, value = word.partition("=")
                env[key] = value
    return env


@pytest.fixture(params=sorted(IMAGES), ids=lambda p: p)
def dockerfile(request: pytest.FixtureRequest) -> Path:
    return DOCKER / request.param


def test_every_dockerfile_is_checked() -> None:
    assert sorted(p.name for p in DOCKER.glob("*.Dockerfile")) == sorted(IMAGES)


def test_multi_stage_and_pinned(dockerfile: Path) -> None:
    _, found = stages(dockerfile.read_text())
    assert len(found) >= 2, "multi-stage: a build stage and a runtime stage"
    assert all(stage.name for stage in found), "every stage is named"
    for stage in found:
        match = PINNED.match(stage.image)
        assert match, f"cannot parse base image {stage.image!r}"
        tag, digest = match.group("tag"), match.group("digest")
        assert digest or (tag and tag != "latest" and re.search(r"\d", tag)), (
            f"{stage.image}: pin an exact version tag or a digest"
        )
    final = found[-1]
    copies = [rest for keyword, rest in final.instructions if keyword == "COPY"]
    assert any(rest.startswith(f"--from={found[0].name}") for rest in copies), (
        "the runtime stage copies the build stage's result"
    )
    assert not any(k == "RUN" and "pip install" in r for k, r in final.instructions), (
        "no pip install in the runtime stage (it belongs to the build stage)"
    )


def test_runtime_user_is_not_root(dockerfile: Path) -> None:
    _, found = stages(dockerfile.read_text())
    users = [rest for keyword, rest in found[-1].instructions if keyword == "USER"]
    assert users, "the runtime stage sets USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), f"runs as {users[-1]}"


def test_healthcheck_and_entrypoint(dockerfile: Path) -> None:
    command, endpoint = IMAGES[dockerfile.name]
    _, found = stages(dockerfile.read_text())
    final = dict(found[-1].instructions)
    assert "HEALTHCHECK" in final and endpoint in final["HEALTHCHECK"]
    assert re.search(r"--start-period=\d+s", final["HEALTHCHECK"])
    assert final["ENTRYPOINT"] == '["tether"]'
    cmd = final["CMD"].strip('[]"').split('", "')
    assert cmd[0] == command and command in COMMANDS


def test_apt_hygiene(dockerfile: Path) -> None:
    for stage in stages(dockerfile.read_text())[1]:
        for keyword, rest in stage.instructions:
            if keyword == "RUN" and "apt-get install" in rest:
                assert "--no-install-recommends" in rest, rest
                assert "rm -rf /var/lib/apt/lists" in rest, rest
            assert not (keyword == "ADD" and "://" in rest), "no ADD from URLs"


def test_copied_paths_exist_and_pass_dockerignore(dockerfile: Path) -> None:
    allowed = {
        line[1:].rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    for stage in stages(dockerfile.read_text())[1]:
        for keyword, rest in stage.instructions:
            if keyword != "COPY" or rest.startswith("--from"):
                continue
            *sources, _target = rest.split()
            for source in sources:
                assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
                assert source.rstrip("/") in allowed, f"COPY {source}: excluded by .dockerignore"


def test_environment_is_known_to_the_settings(
    dockerfile: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    command, _ = IMAGES[dockerfile.name]
    env = env_of(stages(dockerfile.read_text())[1][-1])
    assert any(k.startswith("TETHER_") for k in env)
    if command == "edge":
        # The edge images listen on 0.0.0.0, so the agent refuses to start without API
        # tokens: the operator passes them at run time.
        assert env["TETHER_HTTP__HOST"] == "0.0.0.0"
        env["TETHER_API_TOKENS"] = "${TETHER_API_TOKENS:?}"
    check_environment(SETTINGS_BY_COMMAND[command], env, monkeypatch, dockerfile.name)


def test_dockerignore_keeps_models_out() -> None:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [line for line in lines if line and not line.startswith("#")]
    assert patterns[0] == "**", "exclude everything, then allow what the build needs"
    assert "models/repository/" in lines
