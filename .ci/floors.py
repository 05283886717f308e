"""The dependency floors of pyproject.toml, for `.ci/min-deps`.

``python .ci/floors.py EXTRA...`` prints ``name==floor`` for every requirement of pyproject.toml (core and
the extras named, which must exist). `.ci/min-deps` installs the project with these as pip constraints,
so the test suite runs against the oldest versions the package claims to work with: a floor that is not
true fails CI. ``python .ci/floors.py --check FILE`` then checks that the installed versions are those
floors. Every requirement needs a floor (``>=X``, ``~=X`` or ``==X``); a requirement without one, or an
extra that pyproject.toml does not define, is an error that says what to write: nothing is left out
silently.
"""

from __future__ import annotations

import importlib.metadata as md
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version


class FloorError(ValueError):
    """A requirement of pyproject.toml whose floor CI cannot install."""


def _floor(text: str) -> Version:
    req = Requirement(text)
    lows = []
    for spec in req.specifier:
        if spec.operator in (">=", "~=", "==", "==="):
            version = spec.version[:-2] if spec.version.endswith(".*") else spec.version  # ==1.4.* -> 1.4
            try:
                lows.append(Version(version))
            except InvalidVersion:
                raise FloorError(
                    f"{text!r} in pyproject.toml: {spec} is not a version pip can install"
                ) from None
    if not lows:
        raise FloorError(
            f"{text!r} in pyproject.toml has no floor: declare the oldest version it works with (>=X)"
        )
    return max(lows)


def floors(pyproject: Path, extras: list[str]) -> dict[str, Version]:
    """``{distribution: floor}`` for the core requirements and the given extras (the highest floor wins
    when a distribution is named more than once; requirements whose marker is false here are left out,
    as pip leaves them out)."""
    project = tomllib.loads(pyproject.read_text("utf-8"))["project"]
    optional = project.get("optional-dependencies", {})
    unknown = [e for e in extras if e not in optional]
    if unknown:
        raise FloorError(
            f"extra {', '.join(map(repr, unknown))} is not in pyproject.toml's [project.optional-dependencies]"
            f" (it has: {', '.join(sorted(optional))}): fix .ci/extras"
        )
    out: dict[str, Version] = {}
    for extra, reqs in [("", project.get("dependencies", []))] + [(e, optional[e]) for e in extras]:
        for text in reqs:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate({"extra": extra}):
                continue
            name = canonicalize_name(req.name)
            out[name] = max(out.get(name, Version("0")), _floor(text))
    return dict(sorted(out.items()))


def check_installed(constraints: Path) -> list[str]:
    """The floors in ``constraints`` (as printed by this script) that are not the installed version."""
    bad = []
    for line in constraints.read_text("utf-8").split():
        name, want = line.split("==")
        try:
            have = md.version(name)
        except md.PackageNotFoundError:
            bad.append(f"{name}: floor {want}, not installed")
            continue
        if Version(Version(have).base_version) != Version(want):  # 2.13.0+cpu is torch 2.13
            bad.append(f"{name}: floor {want}, installed {have}")
    return bad


def main(argv: list[str]) -> int:
    root = Path(__file__).resolve().parent.parent
    if argv[:1] == ["--check"]:
        bad = check_installed(Path(argv[1]))
        if bad:
            print("floors not installed as declared:\n" + "\n".join(bad), file=sys.stderr)
            return 1
        return 0
    try:
        found = floors(root / "pyproject.toml", argv)
    except FloorError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print("\n".join(f"{k}=={v}" for k, v in found.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
