"""Output paths that must stay inside a folder edgeship owns.

Names from specs and targets become folder names (``build/<spec>/<target>``). The names are
validated when the files load (pipeline.spec.SafeName); :func:`contained` is the second line:
every place that joins a name onto an output root checks the result with it, so a name that
slipped past validation (or a future field that forgot it) still cannot write elsewhere.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from pipeline.errors import SpecError


def project_home(cwd: Path | None = None) -> Path:
    """Where this project's edgeship state lives: the stage cache and the ``local`` device.

    ``$EDGESHIP_HOME`` when set, else ``.edgeship`` at the git root of the current directory (or in
    the current directory outside a repository). Per project, because one folder shared by every
    clone let a fresh clone reuse another's cache and switch that clone's deployed release. Found by
    looking for ``.git`` (a folder, or a file in worktrees and submodules): no git process to start.
    """
    env = os.environ.get("EDGESHIP_HOME")
    if env:
        return Path(env).expanduser()
    here = (cwd or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / ".git").exists():
            return folder / ".edgeship"
    return here / ".edgeship"


def contained(path: Path, root: Path, what: str, fix: str = "use a plain name (letters, digits, '.', '_', '-')") -> Path:
    """``path`` unchanged if it lies strictly inside ``root``; otherwise a SpecError naming ``what``.

    The check is lexical (``..`` and absolute components are resolved, symlinks are not), so a
    build folder that is itself a symlink the user made keeps working.
    """
    full = Path(os.path.normpath(os.path.abspath(path)))
    base = Path(os.path.normpath(os.path.abspath(root)))
    if full == base or not full.is_relative_to(base):
        raise SpecError(f"{what}: output folder {path} lies outside {root}; {fix}")
    return path


def replace_dir(new: Path, final: Path) -> None:
    """Swap ``new`` into ``final``: the old folder is kept until the new one is in place."""
    final.parent.mkdir(parents=True, exist_ok=True)
    old = None
    if final.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{final.name}-old-", dir=final.parent))
        old.rmdir()
        final.rename(old)
    new.rename(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
