"""Engine faults for the serving tests, injected into a real server through PYTHONPATH.

checkpoint ──builder──▶ engine dir ──runtime──▶ [Triton: faults injected here, for tests only]

`nemodiff serve` runs with PYTHONPATH pointing here; the Triton model applies PYTHONPATH and
runs this file before it imports nemodiff (see model_repo/nemodiff/1/model.py). When
`nemodiff.runtime.engine` is imported, `Engine.step` is wrapped:

- a request whose prompt starts with FAIL_ONE fails alone inside the step, the way the
  engine reports a per-request failure: `finish_reason == "error"` and `request.error`;
- a request whose prompt starts with FAIL_LOOP makes the step itself raise (the engine loop dies).
"""

import importlib.abc
import importlib.machinery
import sys

FAIL_ONE = [1, 13, 13, 13]
FAIL_LOOP = [1, 17, 17, 17]
TARGET = "nemodiff.runtime.engine"


def _wrap(engine_class) -> None:
    real_step = engine_class.step

    def step(self):
        prompts = [seq.request for seq in list(self.scheduler.running) + list(self.scheduler.waiting)]
        if any(r.prompt_ids[:4] == FAIL_LOOP for r in prompts):
            raise RuntimeError("injected engine failure")
        finished = real_step(self)
        for request in prompts:
            if request.prompt_ids[:4] == FAIL_ONE and request.output_ids and not request.finished:
                request.error = "injected failure in this request's decoding"
                request._finish("error")
                self.abort(request, "error")
                finished.append(request)
        return finished

    engine_class.step = step


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None:
            return None
        real_exec = spec.loader.exec_module

        def exec_module(module):
            real_exec(module)
            _wrap(module.Engine)

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _Finder())
