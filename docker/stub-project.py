"""Create empty top-level packages for an editable install of dependencies only.

The Dockerfile installs `pip install -c constraints.txt -e ".[all,dev]"` (the Makefile's
command) before the source is copied, so that the heavy dependency layer depends only on
pyproject.toml + constraints.txt (+ local wheels) and survives source edits. setuptools' editable
finder records the top-level packages it finds at install time; an empty `__init__.py` per
`[tool.setuptools.packages.find] include` pattern gives it the right ones, and the real source
copied later over the same folder is what gets imported.
"""

import pathlib
import tomllib

project = tomllib.loads(pathlib.Path("pyproject.toml").read_text())
find = project.get("tool", {}).get("setuptools", {}).get("packages", {}).get("find", {})
for pattern in find.get("include", []):
    top = pattern.split(".")[0].rstrip("*")
    if top and top.isidentifier():
        pkg = pathlib.Path(top)
        pkg.mkdir(exist_ok=True)
        (pkg / "__init__.py").touch()
readme = project.get("project", {}).get("readme")
if isinstance(readme, str):
    pathlib.Path(readme).touch()  # setuptools wants the file to exist; its text is metadata only
