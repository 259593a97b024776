"""`spotd controller` (or simulate-reclaim) where its libraries are not installed, as in the agent image
(no boto3, botocore or aiohttp): one line saying what is missing and where the command runs, exit 1, no
traceback. The libraries are made unimportable in a real `python -m spotd` by a sitecustomize on
PYTHONPATH, as an image without them would answer `import boto3`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from spotd.cli.main import missing_dependency

BLOCKER = '''
import os, sys

_BLOCKED = set(os.environ["SPOTD_TEST_UNINSTALLED"].split(","))


class _NotInstalled:
    """Answers an import of a blocked package as Python does for one that is not installed."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in _BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, _NotInstalled())
'''

AGENT_IMAGE_LACKS = "boto3,botocore,aiohttp"


def run_spotd(tmp_path: Path, uninstalled: str, *args: str) -> subprocess.CompletedProcess[str]:
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(BLOCKER)
    pythonpath = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": pythonpath, "SPOTD_TEST_UNINSTALLED": uninstalled}
    return subprocess.run(
        [sys.executable, "-m", "spotd", *args], capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path
    )


@pytest.mark.parametrize(
    ("uninstalled", "args", "missing", "package"),
    [
        (AGENT_IMAGE_LACKS, ("controller",), "boto3", "spotd[aws]"),
        ("boto3,botocore", ("controller", "--kubeconfig", "/nonexistent"), "boto3", "spotd[aws]"),
        (AGENT_IMAGE_LACKS, ("simulate-reclaim", "--help"), "aiohttp", "spotd"),
    ],
)
def test_a_command_without_its_libraries_says_so_in_one_line(
    tmp_path: Path, uninstalled: str, args: tuple[str, ...], missing: str, package: str
) -> None:
    result = run_spotd(tmp_path, uninstalled, *args)
    assert result.returncode == 1, result.stderr
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1, result.stderr  # one line, no traceback
    assert result.stderr == (
        f"spotd {args[0]}: error: {missing} is not installed here, and this command needs it (the agent image "
        f"ghcr.io/spotd/spotd-agent holds `spotd agent` only: use ghcr.io/spotd/spotd, or install {package})\n"
    )


def test_the_agent_runs_without_them(tmp_path: Path) -> None:
    result = run_spotd(tmp_path, AGENT_IMAGE_LACKS, "agent", "--help")
    assert result.returncode == 0, result.stderr
    assert "--node-name" in result.stdout
    result = run_spotd(tmp_path, AGENT_IMAGE_LACKS, "status", "--help")  # read-only, lightkube only
    assert result.returncode == 0, result.stderr


def test_a_missing_module_of_spotd_itself_is_no_missing_library() -> None:
    assert missing_dependency("controller", ModuleNotFoundError("x", name="spotd.capacity.sources.gone")) is None
    assert missing_dependency("controller", ModuleNotFoundError("x")) is None
    line = missing_dependency(None, ModuleNotFoundError("x", name="botocore.exceptions"))
    assert line is not None and line.startswith("spotd: error: botocore is not installed here")
