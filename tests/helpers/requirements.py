"""Optional tools some tests need: a skip outside CI, a failure under it."""

from __future__ import annotations

import pytest

from conftest import IN_CI


def require(found: bool, what: str) -> None:
  """Skips the test when ``what`` is missing, or fails it under CI=true
  (where .ci/run installs everything the tests need)."""
  if found:
    return
  if IN_CI:
    pytest.fail(f'{what} is missing; under CI=true this test needs it '
                '(.ci/run installs it)')
  pytest.skip(f'{what} is not installed (pip install -e ".[test]"; '
              'apt-get install chromium)')
