"""Where the tests find the project's shared documents and fixtures: ../shared beside the repository (as in CI)."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
BEIT3_FIXTURE = SHARED / "fixtures" / "beit3-tiny"
