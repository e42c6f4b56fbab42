"""The broker image (deploy/kafka), read as text: official bases by default, a non-root runtime without build
tools, and a bin/ script for every one the chart calls, each running a class that is in the jars."""

from __future__ import annotations

import re
import zipfile

import pytest

from tests.chart.helpers import CHART, REPO
from tests.chart.test_image import instructions
from townhall_tools.devtools.kafka_broker import fetch_jars

KAFKA = REPO / "deploy" / "kafka"
DOCKERFILE = (KAFKA / "Dockerfile").read_text()
STAGES = re.split(r"(?m)^FROM ", DOCKERFILE)[1:]
BIN = KAFKA / "bin"


def main_class(script: str) -> str:
    """The class a bin/ script hands to kafka-run-class.sh."""
    found = re.search(r'kafka-run-class\.sh" ([\w.$]+)', (BIN / script).read_text())
    assert found, f"{script} does not run a class through kafka-run-class.sh"
    return found.group(1)


def test_bases_default_to_official_images_and_can_be_replaced() -> None:
    args = dict(re.findall(r"(?m)^ARG (\w+)=(\S+)$", DOCKERFILE))
    assert re.fullmatch(r"maven:3\.9\.\d+-eclipse-temurin-17", args["KAFKA_BUILD_IMAGE"])
    assert re.fullmatch(r"eclipse-temurin:17\.\d+\.\d+_\d+-jre(-\w+)?", args["JAVA_IMAGE"])
    assert [stage.split()[0] for stage in STAGES] == ["${KAFKA_BUILD_IMAGE}", "${JAVA_IMAGE}"]


def test_runtime_is_the_jars_and_scripts_run_by_appuser_without_build_tools() -> None:
    runtime = "\n".join(instructions(STAGES[-1]))
    for tool in ("mvn", "apt-get install", "gcc", "javac", "jdk"):
        assert tool not in runtime
    assert "COPY --from=jars /opt/kafka/libs /opt/kafka/libs" in runtime
    assert "COPY bin /opt/kafka/bin" in runtime
    # uid 1000, as apache/kafka: the chart's securityContext runs the broker and the topics Job as 1000.
    users = re.findall(r"(?m)^USER (\S+)$", runtime)
    assert users and users[-1].split(":")[0] == "1000"
    assert "useradd --uid 1000 --gid 1000" in runtime


def test_every_script_the_chart_calls_is_in_the_image() -> None:
    called = set()
    for template in (CHART / "templates").glob("*.yaml"):
        called |= set(re.findall(r"\b(kafka-[a-z-]+\.sh)\b", template.read_text()))
    assert {"kafka-storage.sh", "kafka-server-start.sh", "kafka-topics.sh"} <= called
    missing = {name for name in called if not (BIN / name).is_file()}
    assert not missing, f"the chart calls scripts the image lacks: {sorted(missing)}"
    assert all((BIN / name).stat().st_mode & 0o111 for name in called)


@pytest.mark.kafka
def test_every_script_runs_a_class_that_is_in_the_jars() -> None:
    classes: set[str] = set()
    for jar in fetch_jars().glob("*.jar"):
        with zipfile.ZipFile(jar) as archive:
            classes |= {n.removesuffix(".class").replace("/", ".") for n in archive.namelist()}
    scripts = sorted(p.name for p in BIN.glob("*.sh") if p.name != "kafka-run-class.sh")
    assert len(scripts) >= 5
    wrong = {s: main_class(s) for s in scripts if main_class(s) not in classes}
    assert not wrong, f"scripts naming classes that are not in the jars: {wrong}"
    # docker/run's converter of KAFKA_* variables (apache/kafka's) ships in the broker jar.
    assert "kafka.docker.KafkaDockerWrapper" in (KAFKA / "docker" / "run").read_text()
    assert "kafka.docker.KafkaDockerWrapper" in classes
