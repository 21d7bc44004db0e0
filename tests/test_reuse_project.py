"""Run quotas' own tests in the reuse project (tests/reuse: Django + Channels + quotas, no
ducke), as another project installing the app would."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The quotas tests that need nothing of DUCK-E: rules, limiter, decorator and check, client
# identity, the spend engine and its property test, the Realtime meter and text estimate,
# plus tests/reuse itself (neutral defaults, the README's examples, guard, admin, checks,
# migrations).
REUSE_TESTS = (
    "tests/reuse",
    "tests/test_api.py",
    "tests/test_clientip.py",
    "tests/test_limiter_windows.py",
    "tests/test_spend.py",
    "tests/test_spend_engine.py",
    "tests/test_meter.py",
    "tests/test_text_tokens.py",
)


def test_quotas_tests_pass_in_a_project_without_ducke():
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    env.pop("DATABASE_URL", None)  # the reuse project keeps its ledger in SQLite
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:randomly",
        "-p",
        "no:cacheprovider",
        "--ds=tests.reuse.settings",
        # Only tests/conftest.py: the root conftest's DUCK-E fixtures stay out.
        "--confcutdir=tests",
        "-p",
        "tests.fixtures.redis_server",
        "-p",
        "tests.fixtures.o200k",
        *REUSE_TESTS,
    ]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    tail = result.stdout[-4000:] + result.stderr[-2000:]
    assert result.returncode == 0, tail
    summary = re.search(r"(\d+) passed", result.stdout)
    assert summary and int(summary.group(1)) >= 200, tail
    assert " failed" not in result.stdout.splitlines()[-1], tail
