"""The Dockerfile, read as text (no container engine in CI): pinned bases, same codegen, slim non-root runtime."""

from __future__ import annotations

import re
import tomllib

from tests.chart.helpers import REPO

DOCKERFILE = (REPO / "deploy" / "Dockerfile").read_text()
STAGES = re.split(r"(?m)^FROM ", DOCKERFILE)[1:]


def instructions(stage: str) -> list[str]:
    """The stage's instructions with continuation lines joined."""
    lines = re.sub(r"\\\n\s*", " ", stage).splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def test_base_image_is_pinned_to_a_python_3_11_patch_release() -> None:
    base = re.search(r"(?m)^ARG PYTHON_IMAGE=(\S+)$", DOCKERFILE)
    assert base and re.fullmatch(r"python:3\.11\.\d+-slim(-\w+)?", base.group(1))
    assert all(stage.split()[0] == "${PYTHON_IMAGE}" for stage in STAGES)


def test_code_is_generated_by_the_makefiles_script() -> None:
    """The image generates the gRPC code with the one script `make proto` runs, so the two cannot differ."""
    makefile = (REPO / "Makefile").read_text()
    assert "deploy/tools/gen-proto.sh" in makefile and "grpc_tools.protoc" not in makefile
    builder = instructions(STAGES[0])
    assert "COPY deploy/tools/gen-proto.sh ./deploy/tools/gen-proto.sh" in builder
    assert any(line.startswith("RUN deploy/tools/gen-proto.sh ") for line in builder)
    assert not any("grpc_tools.protoc" in line for line in builder)


def test_runtime_is_slim_and_runs_as_a_fixed_non_root_user() -> None:
    runtime = "\n".join(instructions(STAGES[-1]))
    assert "grpcio-tools" not in runtime and "pip install" not in runtime
    assert "apt-get install" not in runtime and "gcc" not in runtime
    assert "COPY --from=builder /opt/townhall /opt/townhall" in runtime
    user = re.search(r"(?m)^USER (\S+)$", runtime)
    assert user and user.group(1).split(":")[0] == "10001"
    assert "ENTRYPOINT" not in runtime  # the chart passes `python -m townhall.<service>` as the command


def test_dockerignore_keeps_the_context_small() -> None:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    assert lines[lines.index("*")] == "*"
    for keep in ("!pyproject.toml", "!README.md", "!proto/", "!services/"):
        assert keep in lines


# What only the CLI, the benchmarks and the tools need: never in the runtime, nor in the image.
NOT_RUNTIME = ("rich", "psutil", "av", "matplotlib", "townhall-tools")


def _extra(name: str) -> set[str]:
    """The distributions pyproject.toml's extra `name` installs (townhall[...] self-references followed)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    found: set[str] = set()
    for requirement in [*project["dependencies"], *project["optional-dependencies"][name]]:
        dist = re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0].lower()
        if dist == "townhall":
            for extra in re.search(r"\[(.*)\]", requirement).group(1).split(","):  # type: ignore[union-attr]
                found |= _extra(extra.strip())
        else:
            found.add(dist)
    return found


def test_the_server_extra_is_the_runtime_only() -> None:
    server = _extra("server")
    assert {"grpcio", "aiokafka", "structlog", "prometheus-client", "pyjwt"} <= server
    assert not server & set(NOT_RUNTIME)
    # A client install is smaller still: no Kafka, no Kubernetes, no numpy.
    assert not _extra("client") & {"aiokafka", "kubernetes", "numpy", *NOT_RUNTIME}
    # The CLI brings its own packages, not the tools'.
    assert {"rich", "av"} <= _extra("cli") and not _extra("cli") & {"psutil", "matplotlib"}


def test_the_image_installs_the_server_extra_from_services_only() -> None:
    builder = "\n".join(instructions(STAGES[0]))
    assert "pip install '/src[server]'" in builder
    copies = [line for line in instructions(STAGES[0]) if line.startswith("COPY")]
    # The tooling distribution (tools/) is never copied in; deploy/tools/gen-proto.sh, the generator, is.
    assert "COPY services ./services" in copies
    assert not any(re.match(r"COPY (\./)?tools\b", line) for line in copies)
    # The build stops if anything of NOT_RUNTIME got in anyway.
    check = next(line for line in instructions(STAGES[0]) if "find_spec" in line)
    assert all(repr(m.replace("-", "_")) in check for m in NOT_RUNTIME)
    assert not any(line.startswith("!tools") for line in (REPO / ".dockerignore").read_text().splitlines())
