"""What an operator hits in the first hour: every spelling of a mode the docs promise (docs/modes.md), and one line (no
traceback) for every expected error of every command, run as the real console script."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import torch
from click.testing import CliRunner

from nemodiff.cli import main as nemodiff_cli

BIN = Path(sys.executable).parent


def one_line_error(*args, expect: str) -> str:
    proc = subprocess.run([str(BIN / "nemodiff"), *map(str, args)], capture_output=True, text=True, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[-1].startswith("Error: ") and expect in lines[-1], proc.stderr
    return lines[-1]


def generate(engine, *args):
    result = CliRunner().invoke(nemodiff_cli, ["generate", str(engine), "--prompt-ids", "1,200,201",
                                               "--max-new-tokens", "6", "--json", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.output.splitlines()[0])["output_ids"]


def test_every_mode_spelling_the_readme_promises_is_accepted(engine_fp32):
    assert generate(engine_fp32, "--mode", "linear_spec") == generate(engine_fp32, "--mode", "linear-spec")
    assert generate(engine_fp32, "--mode", "fastdiffuser") == generate(engine_fp32, "--mode", "diffusion")
    assert generate(engine_fp32, "--mode", "Quadratic_Spec") == generate(engine_fp32, "--mode", "quadratic-spec")
    result = CliRunner().invoke(nemodiff_cli, ["generate", str(engine_fp32), "--prompt-ids", "1", "--mode", "fast"])
    assert result.exit_code == 2 and "unknown decode mode 'fast'; choose one of ar, diffusion" in result.output


def test_serve_and_bench_take_the_same_spellings(engine_fp32, tmp_path):
    result = CliRunner().invoke(nemodiff_cli, ["serve", str(engine_fp32), "--default-mode", "linear_spec",
                                               "--tritonserver", str(tmp_path / "none")])
    assert "Invalid value" not in result.output and "--tritonserver" in result.output  # past the options
    result = CliRunner().invoke(nemodiff_cli, ["bench", str(engine_fp32), "--host-overhead", "--batch-sizes", "1",
                                               "--iters", "1", "--modes", "linear_spec,fastdiffuser"])
    assert result.exit_code == 0, result.output
    rows = [line.split()[0] for line in result.output.splitlines()[2:] if line.strip()]
    assert rows == ["linear-spec", "diffusion"], result.output


def test_kernel_and_device_errors_are_one_line_in_every_command(engine_fp32):
    one_line_error("generate", engine_fp32, "--prompt-ids", "1,2", "--kernels", "aot",
                   expect="ahead-of-time kernels need a CUDA GPU, not cpu")
    if not torch.cuda.is_available():
        one_line_error("bench", engine_fp32, "--device", "cuda", expect="device cuda: this torch")
        one_line_error("serve", engine_fp32, "--device", "cuda", expect="device cuda: this torch")


def test_a_checkpoint_given_as_an_engine_names_the_build_line(checkpoint):
    line = one_line_error("generate", checkpoint, "--prompt", "hi", expect="this is a Hugging Face checkpoint")
    assert f"nemodiff-build {checkpoint} -o {checkpoint}-engine" in line and "format version" not in line


def test_serve_refuses_a_broken_engine_before_triton_starts_with_its_reason_last(engine_fp32, tmp_path):
    engine = shutil.copytree(engine_fp32, tmp_path / "engine")
    data = bytearray((engine / "weights.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (engine / "weights.safetensors").write_bytes(bytes(data))
    one_line_error("serve", engine, "--tritonserver", "/bin/true",
                   expect="weights.safetensors: contents do not match manifest.json")


def test_serve_refuses_a_grammar_timeout_that_is_not_positive(engine_fp32):
    result = CliRunner().invoke(nemodiff_cli, ["serve", str(engine_fp32), "--grammar-timeout", "0"])
    assert result.exit_code == 2 and "--grammar-timeout" in result.output
    assert "must be a positive number of seconds" in result.output


def test_serve_refuses_a_taken_port_before_anything_starts(engine_fp32):
    from nemodiff.serving.cli import free_ports

    ports = dict(zip(("--http-port", "--grpc-port", "--metrics-port", "--openai-port"), free_ports(4)))
    args = [str(arg) for option, port in ports.items() for arg in (option, port)]
    serve = ["serve", str(engine_fp32), "--host", "127.0.0.1", "--instance-kind", "cpu", "--tritonserver", "/bin/true"]
    with socket.socket() as held:
        held.bind(("127.0.0.1", ports["--metrics-port"]))
        held.listen(1)
        result = CliRunner().invoke(nemodiff_cli, serve + args)
    assert result.exit_code == 1 and "ready" not in result.output, result.output
    assert result.output.strip().splitlines() == [
        f"Error: --metrics-port {ports['--metrics-port']} on 127.0.0.1: in use by pid {os.getpid()} "
        f"({Path(f'/proc/{os.getpid()}/comm').read_text().strip()}); stop that process or choose another port"]
    result = CliRunner().invoke(nemodiff_cli, serve + args[:6] + ["--openai-port", args[1]])
    assert result.exit_code == 1 and result.output.strip().splitlines() == [
        f"Error: --openai-port {args[1]}: the same port as --http-port; give each its own"], result.output
