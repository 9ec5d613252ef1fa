"""Put the QGIS plugin where QGIS finds it: a profile's ``python/plugins/cdkd_processing`` or a ZIP file.

QGIS keeps user plugins per profile, under the profiles folder of each platform:

- Linux: ``~/.local/share/QGIS/QGIS3/profiles/<profile>`` (``$XDG_DATA_HOME`` when set);
- macOS: ``~/Library/Application Support/QGIS/QGIS3/profiles/<profile>``;
- Windows: ``%APPDATA%\\QGIS\\QGIS3\\profiles\\<profile>``;
- anywhere: ``$QGIS_CUSTOM_CONFIG_PATH/profiles/<profile>`` when QGIS runs with that variable (or
  ``--profiles-path``), which ``config_root`` stands for here.

The plugin itself never imports cdkd (QGIS's Python has no torch); it runs a ``cdkd`` executable. Installing
records which one, in ``cdkd_processing.json`` beside the plugin: the ``cdkd`` that runs the install (its
console script, else ``python -m cli.main`` of the same interpreter) and the environment variables it needs
that QGIS would not pass on (``PYTHONPATH``, GDAL and PROJ data folders of this shell). It also enables the
plugin in the profile's ``QGIS/QGIS3.ini``, so QGIS and ``qgis_process`` load it without a visit to the plugin
manager.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import cdkd
from cdkd.errors import CdkdIOError, CdkdValueError, OutputExistsError
from cdkd.utils.atomic import atomic_path, atomic_write_text

PLUGIN_NAME = "cdkd_processing"  # the plugin's folder name in QGIS (its Python package name there)
CONFIG_NAME = "cdkd_processing.json"  # = plugin/runner.py CONFIG_NAME
# variables of the installing shell that cdkd may need and QGIS would not pass on (plugin/runner.py FOREIGN_ENV)
RECORDED_ENV = ("PYTHONPATH", "GDAL_DATA", "GDAL_DRIVER_PATH", "PROJ_LIB", "PROJ_DATA")
_SKIP = shutil.ignore_patterns("__pycache__", "*.pyc", CONFIG_NAME)


@dataclass(frozen=True)
class InstallResult:
    plugin_dir: Path
    config_file: Path
    settings: Path | None  # the QGIS3.ini that enables the plugin (None: not enabled)
    command: tuple[str, ...]


def plugin_source() -> Path:
    """The plugin's folder in this package (copied as is into QGIS)."""
    return Path(__file__).resolve().parent / "plugin"


def profiles_root(
    config_root: str | Path | None = None, platform: str = sys.platform, environ: Mapping[str, str] | None = None
) -> Path:
    """QGIS's profiles folder: ``config_root/profiles`` when given (or ``$QGIS_CUSTOM_CONFIG_PATH``), else the
    platform's default (see the module docstring)."""
    environ = os.environ if environ is None else environ
    custom = config_root or environ.get("QGIS_CUSTOM_CONFIG_PATH")
    if custom:
        return Path(custom).expanduser() / "profiles"
    home = Path(environ.get("HOME") or Path.home())
    if platform.startswith("win"):
        appdata = environ.get("APPDATA")
        if not appdata:
            raise CdkdValueError("%APPDATA% is not set; give the QGIS settings folder with --config-path")
        return Path(appdata) / "QGIS" / "QGIS3" / "profiles"
    if platform == "darwin":
        return home / "Library" / "Application Support" / "QGIS" / "QGIS3" / "profiles"
    data = Path(environ["XDG_DATA_HOME"]) if environ.get("XDG_DATA_HOME") else home / ".local" / "share"
    return data / "QGIS" / "QGIS3" / "profiles"


def cdkd_command() -> tuple[str, ...]:
    """How QGIS should start this cdkd: the ``cdkd`` script that is running (or the one beside this Python),
    as an absolute path; else ``python -m cli.main`` with this interpreter."""
    names = ("cdkd", "cdkd.exe")
    argv0 = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
    if argv0 is not None and argv0.name in names:
        found = argv0 if argv0.parent != Path() else shutil.which(str(argv0))
        if found and Path(found).is_file():
            return (str(Path(found).absolute()),)
    scripts = Path(sys.executable).parent
    for name in names:
        if (scripts / name).is_file():
            return (str(scripts / name),)
    return (str(Path(sys.executable).absolute()), "-m", "cli.main")


def recorded_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    environ = os.environ if environ is None else environ
    return {k: environ[k] for k in RECORDED_ENV if environ.get(k)}


def install_plugin(
    profile: str = "default",
    config_root: str | Path | None = None,
    command: Sequence[str] | None = None,
    env: Mapping[str, str] | None = None,
    enable: bool = True,
) -> InstallResult:
    """Copy the plugin into QGIS profile ``profile`` (replacing an earlier cdkd plugin there), record ``command``
    (default ``cdkd_command()``) and ``env`` (default: ``RECORDED_ENV`` of this shell), and enable it."""
    if not profile or any(sep in profile for sep in ("/", "\\")) or profile in (".", ".."):
        raise CdkdValueError(f"--profile {profile!r} is not a QGIS profile name (e.g. default)")
    profile_dir = profiles_root(config_root) / profile
    target = profile_dir / "python" / "plugins" / PLUGIN_NAME
    if target.exists() and not _is_cdkd_plugin(target):
        raise OutputExistsError(f"{target}: exists and is not the cdkd plugin; move it away first")
    target.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(prefix=f".{PLUGIN_NAME}.", dir=target.parent))
    try:
        copy = staged / PLUGIN_NAME
        shutil.copytree(plugin_source(), copy, ignore=_SKIP)
        config = write_config(copy, command, env)
        if target.exists():
            shutil.rmtree(target)
        os.replace(copy, target)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    settings = enable_plugin(profile_dir / "QGIS" / "QGIS3.ini") if enable else None
    return InstallResult(target, target / config.name, settings, tuple(config_command(target)))


def write_config(plugin_dir: Path, command: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> Path:
    """``cdkd_processing.json`` in ``plugin_dir``: the command that starts cdkd and the variables it needs."""
    record = {
        "command": list(command or cdkd_command()),
        "env": dict(recorded_env() if env is None else env),
        "cdkd_version": cdkd.__version__,
    }
    path = plugin_dir / CONFIG_NAME
    atomic_write_text(path, json.dumps(record, indent=2) + "\n")
    return path


def config_command(plugin_dir: Path) -> list[str]:
    return json.loads((plugin_dir / CONFIG_NAME).read_text())["command"]


def enable_plugin(ini: Path, name: str = PLUGIN_NAME) -> Path:
    """Set ``[PythonPlugins] name=true`` in the QGIS settings file ``ini``, leaving every other line as it is.

    Edited as text: QGIS writes the file with Qt's QSettings, whose escapes (``@Variant(...)``, ``\\x..``) a
    generic INI parser would rewrite.
    """
    lines = ini.read_text(encoding="utf-8").splitlines() if ini.is_file() else []
    key = f"{name}="
    section = next((i for i, ln in enumerate(lines) if ln.strip() == "[PythonPlugins]"), None)
    if section is None:
        lines += ([""] if lines and lines[-1].strip() else []) + ["[PythonPlugins]", f"{key}true"]
    else:
        end = next((i for i in range(section + 1, len(lines)) if lines[i].startswith("[")), len(lines))
        at = next((i for i in range(section + 1, end) if lines[i].startswith(key)), None)
        if at is None:
            lines.insert(section + 1, f"{key}true")
        else:
            lines[at] = f"{key}true"
    ini.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(ini, "\n".join(lines) + "\n")
    return ini


def zip_plugin(
    out: str | Path, command: Sequence[str] | None = None, env: Mapping[str, str] | None = None, overwrite: bool = False
) -> Path:
    """The plugin as a ZIP for QGIS's "Plugins > Manage and Install > Install from ZIP" (one top folder,
    ``cdkd_processing/``), with ``cdkd_processing.json`` naming this cdkd (``command``; edit it, or set
    ``$CDKD_EXECUTABLE``, when the ZIP goes to another machine)."""
    out = Path(out)
    if out.suffix.lower() != ".zip":
        raise CdkdValueError(f"{out}: QGIS installs plugins from a .zip; name the output .zip")
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out}: already exists; pass --overwrite to replace it")
    source = plugin_source()
    with tempfile.TemporaryDirectory() as tmp, atomic_path(out) as tmp_zip:
        config = write_config(Path(tmp), command, env)
        with zipfile.ZipFile(tmp_zip, "w", zipfile.ZIP_DEFLATED) as zf:
            for path in sorted(_plugin_files(source)):
                zf.write(path, f"{PLUGIN_NAME}/{path.relative_to(source).as_posix()}")
            zf.write(config, f"{PLUGIN_NAME}/{CONFIG_NAME}")
    return out


def _plugin_files(source: Path) -> list[Path]:
    return [
        p
        for p in source.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc" and p.name != CONFIG_NAME
    ]


def _is_cdkd_plugin(folder: Path) -> bool:
    metadata = folder / "metadata.txt"
    try:
        return metadata.is_file() and "cdkd" in metadata.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise CdkdIOError(f"{metadata}: unreadable ({e.strerror})") from None
