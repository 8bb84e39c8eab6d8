"""nemodiff's Triton model: finds the nemodiff installation, then runs `nemodiff.serving.triton.model`.

checkpoint ──builder──▶ engine dir ──runtime──▶ [Triton: nemodiff/model_repo/nemodiff]

Triton's Python backend embeds an interpreter whose `sys.path` is that of the base Python
it was built against, not of the venv (or user site) nemodiff was installed in, and which
may start in any working directory; it also ignores PYTHONPATH. `nemodiff serve` therefore
writes the PYTHONPATH, site directories and import path of the interpreter it runs under
into the `python_env_path`, `python_site_dirs` and `python_path` parameters; they are
applied here in that order (site directories with their `.pth` files, which editable
installs rely on, and a `sitecustomize` found on PYTHONPATH, as `python` itself would run
it) before nemodiff is imported. The working directory is dropped from the import path so
that a source checkout cannot shadow the installed package.
Inside NVIDIA's Triton container the parameters may be empty: nemodiff is then installed
for the container's own Python.
"""

import importlib.util
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
    env_path = [p for p in listed("python_env_path") if p not in sys.path]
    sys.path[:0] = env_path
    for directory in listed("python_site_dirs"):
        if os.path.isdir(directory) and directory not in sys.path:
            site.addsitedir(directory)
    for directory in listed("python_path"):
        if directory not in sys.path:
            sys.path.append(directory)
    for name in [m for m in sys.modules if m == "nemodiff" or m.startswith("nemodiff.")]:
        del sys.modules[name]  # anything imported from elsewhere before this point
    for directory in env_path:
        path = os.path.join(directory, "sitecustomize.py")
        if os.path.isfile(path):
            spec = importlib.util.spec_from_file_location("sitecustomize", path)
            module = importlib.util.module_from_spec(spec)
            sys.modules["sitecustomize"] = module
            spec.loader.exec_module(module)
            break


class TritonPythonModel:
    def initialize(self, args):
        _use_installation(json.loads(args["model_config"]).get("parameters", {}))
        from nemodiff.serving.triton.model import NemodiffModel

        self.model = NemodiffModel(args)

    def execute(self, requests):
        return self.model.execute(requests)

    def finalize(self):
        self.model.finalize()
