import os

# Kernels run under Triton's interpreter on CPU. Triton reads this when it is first imported (its own
# helpers such as tl.sum are wrapped then), so it is set here, before any test module imports it.
os.environ["TRITON_INTERPRET"] = "1"

import sys  # noqa: E402
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from helpers import make_checkpoint, make_engine  # noqa: E402


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", lora_rank=8, eos_token_id=[2, 5])


@pytest.fixture(scope="session")
def engine_fp32(checkpoint, tmp_path_factory) -> Path:
    return make_engine(checkpoint, tmp_path_factory.mktemp("eng") / "fp32", dtype="fp32", kv_page_size=4)


@pytest.fixture(scope="session")
def served_engine(tmp_path_factory) -> Path:
    """The engine the OpenAI-port server modules serve (a draft adapter of rank 4, pages of 4, 256 tokens)."""
    root = tmp_path_factory.mktemp("served")
    return make_engine(make_checkpoint(root / "ckpt", lora_rank=4), root / "engine", kv_page_size=4, max_seq_len=256)


@pytest.fixture(scope="session")
def served_llm(served_engine):
    """`LLM` on the served engine: what the servers' answers must equal."""
    from nemodiff import LLM

    return LLM(served_engine, device="cpu")


@pytest.fixture(scope="session")
def gpu_engines(checkpoint, tmp_path_factory):
    """gpu_engines(arch, dtype): the tiny model built for a GPU arch with its kernels (pages of 4, blocks of 4,
    128 tokens), each built once per session: the aot-check modules share them."""
    root, built = tmp_path_factory.mktemp("aot-check"), {}

    def get(arch: str, dtype: str):
        if (arch, dtype) not in built:
            built[arch, dtype] = make_engine(checkpoint, root / f"{arch}-{dtype}", arch=arch, dtype=dtype,
                                             kernels=True, kv_page_size=4, block_length=4, max_seq_len=128)
        return built[arch, dtype]
    return get
