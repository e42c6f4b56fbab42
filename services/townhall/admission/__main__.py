"""`python -m townhall.admission`: serve Rooms and Admission."""

from townhall.admission.app import build_app
from townhall.core.server import run_service

if __name__ == "__main__":
    run_service("admission", build_app, "admission")
