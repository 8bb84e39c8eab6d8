"""nemodiff's Triton model: finds the nemodiff installation, then runs `nemodiff.triton_model`.

checkpoint ──builder──▶ engine dir ──runtime──▶ [Triton: model_repo/nemodiff]

Triton's Python backend embeds an interpreter whose `sys.path` is that of the base Python
it was built against, not of the venv (or user site) nemodiff was installed in, and which
may start in any working directory. `nemodiff serve` therefore writes the site directories
and import path of the interpreter it runs under into the `python_site_dirs` and
`python_path` parameters; they are added here (site directories with their `.pth` files,
which editable installs rely on) before nemodiff is imported, and the working directory is
dropped from the import path so that a source checkout cannot shadow the installed package.
Inside NVIDIA's Triton container the parameters may be empty: nemodiff is then installed
for the container's own Python.
"""

import json
import os
import site
import sys

import triton_python_backend_utils as pb_utils  # noqa: F401  (loaded by the backend before this file)


def _use_installation(parameters: dict) -> None:
    def listed(key: str) -> list[str]:
        value = parameters.get(key, {}).get("string_value", "").strip()
        return json.loads(value) if value else []

    cwd = os.getcwd()
    sys.path[:] = [p for p in sys.path if p not in ("", ".", cwd)]
    for directory in listed("python_site_dirs"):
        if os.path.isdir(directory) and directory not in sys.path:
            site.addsitedir(directory)
    for directory in listed("python_path"):
        if directory not in sys.path:
            sys.path.append(directory)
    for name in [m for m in sys.modules if m == "nemodiff" or m.startswith("nemodiff.")]:
        del sys.modules[name]  # anything imported from elsewhere before this point


class TritonPythonModel:
    def initialize(self, args):
        _use_installation(json.loads(args["model_config"]).get("parameters", {}))
        from nemodiff.triton_model import NemodiffModel

        self.model = NemodiffModel(args)

    def execute(self, requests):
        return self.model.execute(requests)

    def finalize(self):
        self.model.finalize()
