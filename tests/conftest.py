"""Shared fixtures. Real-data tests skip without data locally, but must not silently skip in CI."""
from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def cifar10_root() -> Path:
    """Folder holding ``cifar-10-batches-py``, taken from IPSD_DATA.

    Missing data: skip with the reason, except when env ``CI`` is set, where it fails.
    """
    env = os.environ.get("IPSD_DATA", "")
    root = Path(env).expanduser() if env else None
    if root is not None and (root / "cifar-10-batches-py").is_dir():
        return root
    reason = (f"IPSD_DATA={env!r} does not hold cifar-10-batches-py" if env
              else "IPSD_DATA is not set") + "; set IPSD_DATA to the folder containing cifar-10-batches-py"
    if os.environ.get("CI"):
        pytest.fail(f"CI is set but real CIFAR-10 is unavailable: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def ffcv_installed() -> None:
    """FFCV importable (the optional ``ffcv`` extra). Missing: skip, except under ``CI``, where it fails:
    `.ci/run` installs FFCV's system libraries so that `make test` installs the extra."""
    try:
        import ffcv  # noqa: F401
    except ImportError as e:
        reason = f"FFCV is not installed ({e}); `make env` installs it when libturbojpeg/opencv are present"
        if os.environ.get("CI"):
            pytest.fail(f"CI is set but {reason}", pytrace=False)
        pytest.skip(reason)
