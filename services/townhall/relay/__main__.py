"""`python -m townhall.relay`: serve the Relay service."""

from townhall.core.server import run_service
from townhall.relay.app import build_app

if __name__ == "__main__":
    run_service("relay", build_app, "relay")
