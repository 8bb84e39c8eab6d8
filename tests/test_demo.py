"""The core of `make demo`: build the bundled model's engine, serve it with Triton, stream every mode."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_demo_serves_every_mode_with_real_speculation(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "demo.py"), "--engine", str(tmp_path / "engine"),
                           "--max-tokens", "64"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    found = dict(re.findall(r"== ([a-z-]+): 64 tokens in \d+ forwards = ([\d.]+) tokens/forward", proc.stdout))
    assert set(found) == {"ar", "diffusion", "linear-spec", "quadratic-spec", "auto"}
    assert float(found["ar"]) == 1.0
    assert float(found["diffusion"]) >= 1.8
    assert float(found["linear-spec"]) >= 2.5 and float(found["quadratic-spec"]) >= 2.5
    texts = re.findall(r"tokens/s, \d+ streamed responses\n(.*)\n", proc.stdout)
    assert len(texts) == 5 and texts[0] == texts[2] == texts[3] == texts[4]  # spec modes and auto: AR's text
    assert float(found["auto"]) >= 1.0
    assert "server stopped (exit 0)" in proc.stdout
