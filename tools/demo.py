"""`make demo`: build the bundled model's engine, serve it with Triton, stream one completion
per decoding mode over gRPC, print text, tokens per forward and tokens/s, stop the server.

checkpoint (models/nld-tiny) ──builder──▶ engine dir ──runtime──▶ Triton ──▶ [this client]
"""

from __future__ import annotations

import argparse
import queue
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np

from nemodiff.runtime.request import MODES
from nemodiff.serving.cli import free_ports

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PROMPT = "Once upon a time there was a little fox named Max."


def build_engine(checkpoint: Path, engine: Path) -> None:
    if (engine / "manifest.json").is_file():
        print(f"engine: {engine} (already built)")
        return
    subprocess.run([str(Path(sys.executable).parent / "nemodiff-build"), str(checkpoint), "-o", str(engine),
                    "--dtype", "fp32", "--arch", "cpu", "--overwrite"], check=True)


def start_server(engine: Path, ports: list[int], log_path: Path) -> subprocess.Popen:
    http, grpc, metrics = ports
    log = open(log_path, "wb")
    process = subprocess.Popen([str(Path(sys.executable).parent / "nemodiff"), "serve", str(engine), "--host",
                                "127.0.0.1", "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port",
                                str(metrics), "--instance-kind", "cpu"], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 180
    while time.time() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"nemodiff serve exited ({process.returncode}); log: {log_path}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{http}/v2/health/ready", timeout=2) as reply:
                if reply.status == 200:
                    return process
        except OSError:
            pass
        time.sleep(0.5)
    process.send_signal(signal.SIGINT)
    raise SystemExit(f"the server did not become ready; log: {log_path}")


def stream_one(url: str, prompt: str, mode: str, max_tokens: int) -> dict:
    import tritonclient.grpc as grpcclient

    def tensor(name, array, dtype):
        t = grpcclient.InferInput(name, list(array.shape), dtype)
        t.set_data_from_numpy(array)
        return t

    inputs = [tensor("text_input", np.array([[prompt.encode()]], dtype=object), "BYTES"),
              tensor("max_tokens", np.array([[max_tokens]], dtype=np.int32), "INT32"),
              tensor("decode_mode", np.array([[mode.encode()]], dtype=object), "BYTES"),
              tensor("stream", np.array([[True]]), "BOOL")]
    responses: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    start = time.perf_counter()
    client.async_stream_infer("nemodiff", inputs, enable_empty_final_response=True)
    text, deltas, forwards, tokens = "", 0, 0, 0
    try:
        while True:
            result, error = responses.get(timeout=300)
            if error is not None:
                raise RuntimeError(error.message())
            if result.as_numpy("text_output") is not None:
                text += result.as_numpy("text_output").reshape(-1)[0].decode()
                deltas += 1
            if result.as_numpy("num_output_tokens") is not None:  # per response: they add up over a stream
                tokens += int(result.as_numpy("num_output_tokens").reshape(-1)[0])
            if result.as_numpy("num_forward_passes") is not None:
                forwards = int(result.as_numpy("num_forward_passes").reshape(-1)[0])
            if result.get_response().parameters["triton_final_response"].bool_param:
                break
    finally:
        client.stop_stream()
        client.close()
    seconds = time.perf_counter() - start
    return {"mode": mode, "text": text, "tokens": tokens, "forwards": forwards, "responses": deltas,
            "tokens_per_forward": tokens / max(forwards, 1), "tokens_per_s": tokens / seconds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=ROOT / "models" / "nld-tiny")
    parser.add_argument("--engine", type=Path, default=ROOT / "build" / "nld-tiny-engine")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--max-tokens", type=int, default=96)
    args = parser.parse_args(argv)
    build_engine(args.checkpoint, args.engine)
    ports = free_ports(3)
    log_path = args.engine.parent / "demo-server.log"
    print(f"starting nemodiff serve on 127.0.0.1 (HTTP {ports[0]}, gRPC {ports[1]}, metrics {ports[2]}) ...")
    server = start_server(args.engine, ports, log_path)
    results = []
    try:
        print(f"prompt: {args.prompt!r}\n")
        for mode in MODES:
            r = stream_one(f"127.0.0.1:{ports[1]}", args.prompt, mode, args.max_tokens)
            results.append(r)
            print(f"== {mode}: {r['tokens']} tokens in {r['forwards']} forwards = {r['tokens_per_forward']:.2f} "
                  f"tokens/forward, {r['tokens_per_s']:.1f} tokens/s, {r['responses']} streamed responses")
            print(f"{args.prompt}{r['text']}\n")
    finally:
        server.send_signal(signal.SIGINT)
        code = server.wait(timeout=60)
        print(f"server stopped (exit {code})")
    return 0 if all(r["tokens"] > 0 for r in results) and code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
