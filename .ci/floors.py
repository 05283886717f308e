"""Print ``name==floor`` for every requirement in pyproject.toml (core and the extras CI installs).

`.ci/min-deps` installs the project with these as pip constraints, so the test suite runs against the
oldest versions the package claims to work with: a floor that is not true fails CI.
Exceptions (a floor CI cannot install on this machine) are listed in ``NOT_INSTALLABLE`` with the reason.
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

#: torch's Linux wheels on PyPI are CUDA builds of several GB; CI installs the CPU build that lies on its
#: disk (2.13.0+cpu), which is also the floor declared in pyproject.toml.
NOT_INSTALLABLE: dict[str, str] = {}


def floors(pyproject: Path, extras: list[str]) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in extras:
        reqs += project.get("optional-dependencies", {}).get(extra, [])
    out: dict[str, str] = {}
    for text in reqs:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate():
            continue
        lows = [s.version for s in req.specifier if s.operator in (">=", "==", "~=")]
        if not lows:
            sys.exit(
                f"{text!r} in pyproject.toml has no floor (>=X): declare the oldest version it works with"
            )
        name = req.name.lower().replace("_", "-")
        if name in NOT_INSTALLABLE:
            continue
        out[name] = str(max(Version(v) for v in lows))
    return [f"{k}=={v}" for k, v in sorted(out.items())]


if __name__ == "__main__":
    root = Path(__file__).resolve().parent.parent
    print("\n".join(floors(root / "pyproject.toml", sys.argv[1:] or ["test"])))
