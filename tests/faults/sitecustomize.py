"""Engine faults for the serving tests, injected into a real server through PYTHONPATH.

checkpoint ──builder──▶ engine dir ──runtime──▶ [Triton: faults injected here, for tests only]

`nemodiff serve` runs with PYTHONPATH pointing here; the Triton model applies PYTHONPATH and
runs this file before it imports nemodiff (see nemodiff/model_repo/nemodiff/1/model.py). When
`nemodiff.runtime.engine.loop` is imported, `Engine.launch` is wrapped:

- a request whose prompt starts with FAIL_ONE gets a strategy that raises once it has output:
  the engine must end that request alone with its error while its step goes on for the others;
- a request whose prompt starts with FAIL_LOOP makes the step itself raise (the engine loop dies).

`Engine.grammars` is wrapped too: the regular expression SLOW_REGEX takes SLOW_COMPILE_S longer to
compile (as a huge schema would in xgrammar), for what happens while a grammar compiles.
"""

import importlib.abc
import importlib.machinery
import sys
import time

FAIL_ONE = [1, 13, 13, 13]
FAIL_LOOP = [1, 17, 17, 17]
SLOW_REGEX = "slow-compile [0-9]+"
SLOW_COMPILE_S = 60.0
TARGET = "nemodiff.runtime.engine.loop"


def _wrap(engine_class) -> None:
    real_launch = engine_class.launch

    def broken_consume(decider):
        raise RuntimeError("injected failure in this request's decoding")

    def launch(self):
        sequences = list(self.scheduler.running) + list(self.scheduler.waiting)
        if any(seq.request.prompt_ids[:4] == FAIL_LOOP for seq in sequences):
            raise RuntimeError("injected engine failure")
        for seq in sequences:
            if seq.request.prompt_ids[:4] == FAIL_ONE and seq.request.output_ids:
                seq.strategy.consume = broken_consume
        return real_launch(self)

    engine_class.launch = launch
    real_grammars = engine_class.grammars

    def grammars(self):
        made = real_grammars(self)
        if not getattr(made, "_slowed", False):
            real_compile = made._compile

            def compile_(guide):
                if guide.kind == "regex" and guide.text == SLOW_REGEX:
                    time.sleep(SLOW_COMPILE_S)
                return real_compile(guide)

            made._compile, made._slowed = compile_, True
        return made

    engine_class.grammars = grammars


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
