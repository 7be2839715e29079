"""Which installed distribution provides the `groundingdino` module, read from package metadata (no import).

The module comes from several distributions that share its top-level name: groundingdino-py 0.4.0,
rf-groundingdino 0.3.0 (Roboflow's maintained rename), an editable or plain install of IDEA-Research's
repository (distribution `groundingdino`), or a source folder on `sys.path` that no distribution owns.
`find_provider()` says which one `import groundingdino` would load: the folder `importlib.util.find_spec`
finds, and the distribution(s) whose RECORD lists files in that folder (what
`importlib.metadata.packages_distributions()` reads, restricted to the folder's own site-packages so it
costs milliseconds, not a scan of every installed distribution). Distributions of the module that live
further down `sys.path` are shadowed and only noted.

Two distributions whose RECORDs both list files in the one folder mean pip installed one over the other:
the files are a mix (each install overwrote the other's) and uninstalling either deletes files the other
needs. `require()` refuses that with `MixedProvidersError`, naming both distributions and how many files
on disk are each one's (RECORD sha256), instead of an ImportError from deep inside groundingdino.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import importlib.metadata as md
import importlib.util
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from nanscope.errors import ConfigError

MODULE = "groundingdino"
EXTRA = "nanscope[groundingdino]"  # the extra that installs groundingdino-py for users with no provider yet
KNOWN = ("groundingdino-py", "rf-groundingdino", "groundingdino")  # named in messages; any other works too


class NoProviderError(ConfigError, ImportError):
    """No `groundingdino` module is installed. An ImportError too, so stack detection skips the family."""


class MixedProvidersError(ConfigError):
    """Two distributions' files are mixed in one `groundingdino` folder."""


@dataclass(frozen=True)
class Owner:
    """One distribution whose RECORD lists files of the module's folder."""

    name: str  # as its metadata spells it: "groundingdino-py", "rf-groundingdino", "groundingdino"
    version: str
    files: int  # files under groundingdino/ its RECORD lists
    matching: int  # of those, files on disk whose sha256 is the one its RECORD holds

    @property
    def label(self) -> str:
        return f"{self.name} {self.version}"


@dataclass(frozen=True)
class Provider:
    """What `import groundingdino` loads."""

    location: Path  # the package folder
    owners: tuple[Owner, ...]  # distributions whose RECORD claims that folder (normally exactly one)
    editable: str | None = None  # the distribution of an editable install whose source folder this is
    editable_version: str | None = None
    shadowed: tuple[str, ...] = ()  # other distributions of the module, further down sys.path (not loaded)

    @property
    def mixed(self) -> bool:
        return len(self.owners) > 1

    @property
    def distribution(self) -> str | None:
        """The owning distribution's name; None for a source folder no distribution owns (or a mix)."""
        if self.editable is not None:
            return self.editable
        return self.owners[0].name if len(self.owners) == 1 else None

    @property
    def version(self) -> str | None:
        if self.editable is not None:
            return self.editable_version
        if len(self.owners) == 1:
            return self.owners[0].version
        return _version_file(self.location)

    @property
    def label(self) -> str:
        """For reports: 'rf-groundingdino 0.3.0', 'groundingdino 0.1.0 (editable, /src/GroundingDINO)', ..."""
        if self.mixed:
            return "mixed: " + " + ".join(o.label for o in self.owners)
        if self.editable is not None:
            return f"{self.editable} {self.editable_version} (editable, {self.location.parent})"
        if self.owners:
            return self.owners[0].label
        version = self.version
        return f"source folder {self.location}" + (f" (version.py: {version})" if version else "")


def find_provider() -> Provider | None:
    """The provider of `groundingdino` that an import would load, or None when there is none. Imports nothing."""
    module = sys.modules.get(MODULE)
    spec = module.__spec__ if module is not None and module.__spec__ is not None else None
    if spec is None:
        try:
            spec = importlib.util.find_spec(MODULE)
        except (ImportError, ValueError):
            spec = None
    if spec is None or not spec.submodule_search_locations:
        return None
    return _provider_at(Path(next(iter(spec.submodule_search_locations))).resolve())


@functools.lru_cache(maxsize=8)
def _provider_at(location: Path) -> Provider:
    """The metadata read for one folder, once per process (a stack build asks several times)."""
    owners = tuple(_owners(location))
    editable, editable_version = (None, None) if owners else _editable_owner(location)
    claimed = {o.name for o in owners} | ({editable} if editable else set())
    shadowed = tuple(sorted(_other_distributions(location) - claimed))
    return Provider(location, owners, editable, editable_version, shadowed)


def require() -> Provider:
    """The provider, or a one-paragraph error: none installed (how to install one), or two mixed in one folder."""
    provider = find_provider()
    if provider is None:
        raise NoProviderError(
            "the groundingdino-py stack needs a `groundingdino` module and none is installed (nanscope's core "
            "install leaves it out, so that it can sit beside the one you already have). Install one provider: "
            f"`pip install '{EXTRA}'` (groundingdino-py 0.4.0), or `pip install rf-groundingdino` (Roboflow's "
            "maintained rename), or `pip install -e .` in a clone of IDEA-Research/GroundingDINO. Models of "
            "transformers' GroundingDinoForObjectDetection need none: pass --stack hf"
        )
    if provider.mixed:
        names = [o.name for o in provider.owners]
        counts = "; ".join(f"{o.matching} of the {o.files} files {o.label} installed are as it installed them"
                           for o in provider.owners)
        raise MixedProvidersError(
            f"the `groundingdino` folder {str(provider.location)!r} holds the files of {len(names)} distributions "
            f"at once, {' and '.join(o.label for o in provider.owners)}: one was installed over the other, so "
            f"the module is a mix of both ({counts}) and uninstalling either would delete files the other needs. "
            f"Keep one: `pip uninstall -y {' '.join(names)}` then `pip install {names[-1]}` (or "
            f"`pip install '{EXTRA}'` for groundingdino-py)"
        )
    return provider


def environment_fields() -> dict[str, str | None]:
    """`groundingdino` (version) and `groundingdino_provider` (who installed it) for a result's environment."""
    provider = find_provider()
    if provider is None:
        return {"groundingdino": None, "groundingdino_provider": None}
    return {"groundingdino": provider.version, "groundingdino_provider": provider.label}


def _dist_infos(site: Path) -> list[md.Distribution]:
    try:
        return list(md.distributions(path=[str(site)]))
    except OSError:
        return []


def _owners(location: Path) -> list[Owner]:
    """Distributions in the folder's own site-packages whose RECORD lists files under `groundingdino/`."""
    prefix = f"{MODULE}/"
    found: dict[str, Owner] = {}
    for dist in _dist_infos(location.parent):
        record = dist.read_text("RECORD") or ""
        if prefix not in record:  # cheap text test before parsing the RECORD
            continue
        mine = [f for f in dist.files or () if f.as_posix().startswith(prefix)]
        if not mine or Path(dist.locate_file(mine[0])).resolve().parent.parts[:len(location.parts)] != location.parts:
            continue
        name = _normalized(dist.metadata["Name"])
        found.setdefault(name, Owner(name, dist.version, len(mine), sum(_matches(dist, f) for f in mine)))
    return sorted(found.values(), key=lambda o: o.name)


def _matches(dist: md.Distribution, path: md.PackagePath) -> bool:
    """True when the file on disk has the sha256 the distribution's RECORD holds for it."""
    if path.hash is None or path.hash.mode != "sha256":
        return False
    try:
        data = Path(dist.locate_file(path)).read_bytes()
    except OSError:
        return False
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return digest == path.hash.value


def _editable_owner(location: Path) -> tuple[str | None, str | None]:
    """(name, version) of an editable install (PEP 610 direct_url.json) whose folder holds `location`."""
    for dist in md.distributions():
        try:
            direct = json.loads(dist.read_text("direct_url.json") or "{}")
        except ValueError:
            continue
        url = str(direct.get("url", ""))
        if not (direct.get("dir_info", {}).get("editable") and url.startswith("file://")):
            continue
        root = Path(url.removeprefix("file://")).resolve()
        if location == root or root in location.parents:
            return _normalized(dist.metadata["Name"]), dist.version
    return None, None


def _other_distributions(location: Path) -> set[str]:
    """Distributions elsewhere on sys.path that also declare the module (pip installs into other venvs)."""
    names: set[str] = set()
    for entry in sys.path:
        site = Path(entry or ".").resolve() if entry else Path.cwd()
        if site == location.parent or not (site / MODULE).is_dir():
            continue
        for dist in _dist_infos(site):
            if f"{MODULE}/" in (dist.read_text("RECORD") or ""):
                names.add(_normalized(dist.metadata["Name"]))
    return names


def _normalized(name: str | None) -> str:
    """A distribution name as pip spells it (PEP 503): rf-groundingdino's metadata says 'rf_groundingdino'."""
    return re.sub(r"[-_.]+", "-", name).lower() if name else "?"


def _version_file(location: Path) -> str | None:
    """`__version__` from groundingdino/version.py, read as text (IDEA-Research's setup.py writes it)."""
    try:
        text = (location / "version.py").read_text(encoding="utf-8")
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("__version__"):
            return line.partition("=")[2].strip().strip("'\"") or None
    return None
