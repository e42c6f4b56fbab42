"""Copies the architecture diagram's source (docs/architecture.mmd) into README.md's ```mermaid block.

    python deploy/tools/readme_diagram.py           # rewrite the block in README.md (`make diagram`)
    python deploy/tools/readme_diagram.py --check   # exit 1 if the block differs from the source

GitHub renders a ```mermaid block inline, so the README shows the picture with nothing rendered or
committed beside it; the block sits between two marker comments, and tests/unit/test_architecture_diagram.py
fails while it differs from the source.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "docs" / "architecture.mmd"
README = ROOT / "README.md"
BEGIN = "<!-- begin docs/architecture.mmd: edit that file, then `make diagram` -->"
END = "<!-- end docs/architecture.mmd -->"


def block(source: str) -> str:
    """The README's text between the markers for this diagram source."""
    return f"{BEGIN}\n```mermaid\n{source.rstrip()}\n```\n{END}"


def embedded(readme: str) -> str:
    """The README's diagram block, markers included; ValueError if the markers are missing."""
    start, stop = readme.find(BEGIN), readme.find(END)
    if start < 0 or stop < start:
        raise ValueError(f"README.md has no diagram block ({BEGIN} ... {END})")
    return readme[start : stop + len(END)]


def synced(readme: str, source: str) -> str:
    """The README with its diagram block replaced by the source's."""
    return readme.replace(embedded(readme), block(source), 1)


def main() -> int:
    """Command line entry point."""
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--check", action="store_true", help="only check; exit 1 if README.md is stale")
    args = parser.parse_args()
    readme, source = README.read_text(), SOURCE.read_text()
    fresh = synced(readme, source)
    if args.check:
        if fresh != readme:
            print("README.md's diagram differs from docs/architecture.mmd: `make diagram`", file=sys.stderr)
            return 1
        return 0
    if fresh != readme:
        README.write_text(fresh)
        print("README.md: diagram updated from docs/architecture.mmd")
    return 0


if __name__ == "__main__":
    sys.exit(main())
