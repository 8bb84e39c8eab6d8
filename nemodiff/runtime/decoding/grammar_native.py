"""Structured output, native: the temperature-0 grammar walks of a step in C++ (grammar_walk.cc).

checkpoint ──builder──▶ engine dir ──[runtime: decide ▶ grammar walks]──▶ Triton

grammar_batch.py walks guided requests' rows in Python rounds; per walked row that is a few µs of
interpreter work around a fraction of a µs in xgrammar. Where the logits are float32 host memory, the
greedy jobs (VERIFY, WALK, DIFFUSE at temperature 0) are walked by `walk` here instead: one call into
grammar_walk.cc for all of them, which calls xgrammar's matcher through the TVM FFI (the C ABI xgrammar's
own Python bindings use) and decides every row by grammar_batch.py's rules. tests/test_grammar_batch.py
runs both walkers on the same jobs against the per-row reference.

The library is compiled on first use with the system C++ compiler ($CXX, else c++ or g++) against the
installed tvm-ffi headers, and cached under $XDG_CACHE_HOME/nemodiff (default ~/.cache/nemodiff; the
temporary folder where that cannot be written), keyed by the source, the compiler and tvm-ffi's version.
Without a compiler the Python walk runs (one warning).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("grammar_walk.cc")
KINDS = {"verify": 1, "walk": 2, "diffuse": 3}  # grammar_jobs.py's kinds the native walk takes
# grammar_walk.cc's plan columns
(KIND, ROW, DEPTH, WALK, COUNT, BASE, AFTER_OFF, AFTER_LEN, DRAFT_OFF, DRAFT_LEN, STOP_OFF, STOP_LEN, TOPK, LAST,
 ONLY, THEN_FIRST, THEN_STRIDE, THEN_COUNT, THEN_WALK, SETTLED, TAKEN, PICKS, STATE, COLUMNS) = range(24)
KEEPS = ("verify", "diffuse")  # kinds whose own decided tokens stay accepted (the matcher's ahead)
_NO_FOLLOW_UP = (-1, 0, 0, 0)
_LOADED: list = []  # [the walk function, or None where it cannot be built], after the first `walker()`


def cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "nemodiff"


def build(cache: Path | None = None) -> Path:
    """Compile grammar_walk.cc (once per source, compiler and tvm-ffi version); returns the library's path."""
    import tvm_ffi
    from tvm_ffi import libinfo

    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not compiler:
        raise RuntimeError("no C++ compiler found (set CXX, or install c++ / g++)")
    lib = Path(libinfo.find_libtvm_ffi())
    flags = ["-O3", "-std=c++17", "-shared", "-fPIC", f"-I{libinfo.find_include_path()}",
             f"-I{libinfo.find_dlpack_include_path()}"]
    key = hashlib.sha256(SOURCE.read_bytes() + f"{compiler} {flags} {tvm_ffi.__version__}".encode()).hexdigest()[:16]
    target = (cache or cache_dir()) / f"grammar_walk-{key}.so"
    if target.exists():
        return target
    for folder in (target.parent, Path(tempfile.gettempdir()) / "nemodiff"):  # the cache, else a temporary one
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(folder, os.W_OK):
            target = folder / target.name
            break
    if target.exists():
        return target
    partial = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    done = subprocess.run([compiler, *flags, str(SOURCE), "-o", str(partial), f"-L{lib.parent}", "-ltvm_ffi",
                           f"-Wl,-rpath,{lib.parent}"], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{compiler} could not compile {SOURCE.name}:\n{done.stderr[-2000:]}")
    os.replace(partial, target)  # atomic: processes building at once each install a whole library
    return target


def walker():
    """grammar_walk.cc's `walk` function, built and loaded on the first call; None (after one warning)
    where it cannot be built or does not match the installed xgrammar."""
    if not _LOADED:
        try:
            import tvm_ffi
            import xgrammar  # noqa: F401  (its library registers the matcher type whose methods the walk calls)

            module = tvm_ffi.load_module(str(build()))
            if module.columns() != COLUMNS:
                raise RuntimeError(f"{SOURCE.name} has {module.columns()} plan columns, expected {COLUMNS}")
            module.ready()  # the xgrammar matcher methods it calls exist
            _LOADED.append(module.walk)
        except Exception as exc:  # no compiler, or an xgrammar without the matcher methods
            log.warning("structured output walks in Python (slower): the native walk is unavailable: %s", exc)
            _LOADED.append(None)
    return _LOADED[0]


def takes(job) -> bool:
    """Whether the native walk decides this job's rows (greedy rows: not MASKS, not sampled denoising)."""
    d = job.diffuse
    return job.kind in KINDS and (d is None or d.temperature <= 0)


def walk(function, jobs: list, logits, out: np.ndarray, forced: np.ndarray, picked: np.ndarray, apply: bool) -> None:
    """Walk the jobs (all `takes`, their `after` tokens not yet accepted) and their follow-ups over float32
    host logits [rows, vocab] in one native call. Afterwards each matcher stands after its output and its
    `ahead` (the accepted `after` tokens and a verification's or denoising step's own decided tokens: the
    rest of the look-ahead is rolled back natively); forced[job.base + row] holds the token each row allows
    (-1: every token), picked every decided row's token (scratch); a job's depth, picks and failure are set.
    apply: the logits' one-token rows are left their token's logit alone, in place (grammar.py apply_only),
    and are then no longer listed in forced."""
    rows, ints, taus = [], [], []
    stops_at: dict[int, tuple[int, int]] = {}
    for job in jobs:
        stops = job.guide.stops
        if id(stops) not in stops_at:
            stops_at[id(stops)] = (len(ints), len(stops))
            ints += stops
        after, drafts, d, then = job.after, job.drafts, job.diffuse, job.then
        at = len(ints)
        ints += after
        ints += drafts
        rows.append((KINDS[job.kind], job.row, job.depth, job.walk, job.count, job.base, at, len(after), at + len(after),
                     len(drafts), *stops_at[id(stops)], 0 if d is None else d.k, d is not None and d.last,
                     -1 if job.only is None else job.only,
                     *(_NO_FOLLOW_UP if then is None else (then.first, then.stride, then.count, then.walk))))
        taus.append(np.nan if d is None else -1.0 if d.tau is None else d.tau)
    plan = np.zeros((len(jobs), COLUMNS), dtype=np.int64)
    plan[:, :SETTLED] = rows
    never = jobs[0].guide._never.view(np.uint8)
    function([job.guide.handle for job in jobs], plan, np.array(ints, dtype=np.int64), np.array(taus), never, logits,
             out, forced, picked, apply)
    results = zip(jobs, plan[:, DEPTH].tolist(), plan[:, SETTLED].tolist(), plan[:, PICKS].tolist(),
                  plan[:, STATE].tolist())  # columns, not rows: a few lists instead of one per job
    for job, depth, settled, count, state in results:
        first = job.base + job.depth
        picks = picked[first: first + count].tolist() if count else []
        job.picks += picks
        job.depth, job.then, job.settled = depth, None, settled
        job.guide.ahead += job.after[:settled] + picks if state == 0 and job.kind in KEEPS else job.after[:settled]
        if state == 2:
            log.error("a grammar walk failed (xgrammar, or rows outside the step's); its request's rows are left "
                      "unmasked")
            job.failed = True
