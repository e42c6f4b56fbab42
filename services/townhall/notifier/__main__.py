"""`python -m townhall.notifier`: serves Graph and Inbox and runs the fan-out worker."""

from townhall.core.server import run_service
from townhall.notifier.app import build_app

if __name__ == "__main__":
    run_service("notifier", build_app, "notifier")
