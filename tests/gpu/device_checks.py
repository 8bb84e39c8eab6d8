"""GPU kernel checks: every Triton kernel against its PyTorch reference through the ahead-of-time
launcher (cubins compiled here for this GPU's sm, as an engine build does) and, for the NLD-8B
shape, through Triton's JIT; the fp8 GEMM's speed against a bf16 GEMM at decode sizes; the
attention kernel's decode bandwidth. Run by run_device_checks.sh (model_checks.py does the
engine-level checks).

checkpoint ──builder (compiles kernels)──▶ engine dir ──runtime (AOT launcher)──▶ Triton

Each check draws fresh random inputs (the seed is printed), poisons outputs before the kernel
runs (NaN) so an unwritten element fails, and compares by relative error
||out - ref|| / ||ref|| against a stated threshold. Results go to $OUT/device_checks.json.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from check_report import Report, rel

from nemodiff.builder.convert import quantize_fp8
from nemodiff.engine_format import ModelConfig, RopeConfig
from nemodiff.plugins import activation, aot, fp8_gemm, norm, registry
from nemodiff.plugins.launch import JitLauncher
from nemodiff.plugins.ops import gpu_sm

REPORT = Report("device_checks")
record = REPORT.record
DEV = torch.device("cuda")
LIMITS = {torch.bfloat16: 1e-2, torch.float16: 2e-3}
# NLD-8B, and a small odd shape (GQA ratio 8, head_dim 64, hidden not a power of two)
SHAPES = {"nld-8b": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                         head_dim=128),
          "odd": dict(hidden_size=1536, intermediate_size=1100, num_attention_heads=8, num_key_value_heads=1,
                      head_dim=64)}




def config_of(name: str) -> ModelConfig:
    return ModelConfig(vocab_size=1024, num_hidden_layers=1, rms_norm_eps=1e-5, max_position_embeddings=262144,
                       block_size=32, mask_token_id=100, bos_token_id=1, eos_token_ids=[2],
                       rope=RopeConfig(rope_type="yarn", rope_theta=1e6, factor=16.0, mscale=1.0, mscale_all_dim=1.0,
                                       original_max_position_embeddings=16384, llama_4_scaling_beta=0.1),
                       **SHAPES[name])


def nan(*shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype, device=DEV)


def check_norm(tag: str, launcher, cfg: ModelConfig, dtype, gen) -> None:
    for tokens in (1, 37, 1056):
        residual = (torch.randn(tokens, cfg.hidden_size, generator=gen) * 3).to(DEV, dtype)
        delta = torch.randn(tokens, cfg.hidden_size, generator=gen).to(DEV, dtype)
        weight = (1 + 0.1 * torch.randn(cfg.hidden_size, generator=gen)).to(DEV, dtype)
        want_sum, want = norm.reference_add_rmsnorm(residual, delta, weight, cfg.rms_norm_eps)
        out = nan(tokens, cfg.hidden_size, dtype=dtype)
        norm.add_rmsnorm(launcher, residual, delta, weight, cfg.rms_norm_eps, out=out)
        torch.cuda.synchronize()
        exact_add = torch.equal(residual, want_sum)
        same = (out == want).float().mean().item()
        err = rel(out, want)
        record(f"{tag} add_rmsnorm {str(dtype)[6:]} H={cfg.hidden_size} T={tokens}",
               exact_add and err <= LIMITS[dtype] and same >= 0.99,
               f"add bit-exact {exact_add}, norm rel {err:.1e}, {100 * same:.2f}% bit-identical")
        out = nan(tokens, cfg.hidden_size, dtype=dtype)
        norm.rms_norm(launcher, residual, weight, cfg.rms_norm_eps, out=out)
        err = rel(out, norm.reference_add_rmsnorm(residual, None, weight, cfg.rms_norm_eps)[1])
        record(f"{tag} rms_norm {str(dtype)[6:]} T={tokens}", err <= LIMITS[dtype], f"rel {err:.1e}")


def check_silu(tag: str, launcher, cfg: ModelConfig, dtype, gen) -> None:
    for tokens in (1, 1056):
        gate_up = (torch.randn(tokens, 2 * cfg.intermediate_size, generator=gen) * 3).to(DEV, dtype)
        out = nan(tokens, cfg.intermediate_size, dtype=dtype)
        activation.silu_mul(launcher, gate_up, out=out)
        err = rel(out, activation.reference_silu_mul(gate_up))
        record(f"{tag} silu_mul {str(dtype)[6:]} I={cfg.intermediate_size} T={tokens}", err <= LIMITS[dtype],
               f"rel {err:.1e}")


def check_fp8(tag: str, launcher, cfg: ModelConfig, gen, num_sms: int) -> None:
    """Against the dequantised weights at decode and prefill sizes; and every row of a 300-row product
    bit-identical to the same row alone (fp8 means one thing at every M)."""
    for n, k in fp8_gemm.linear_shapes(cfg):
        weight, scale = quantize_fp8(torch.randn(n, k, generator=gen).to(DEV))
        x_all = torch.randn(1056, k, generator=gen).to(DEV, torch.bfloat16)
        for m in (1, 8, 16, 32, 64, 100, 300, 1056):
            x = x_all[:m]
            out = nan(m, n, dtype=torch.bfloat16)
            fp8_gemm.fp8_linear(launcher, x, weight, scale, num_sms=num_sms, out=out)
            err = rel(out, x.float() @ (weight.float() * scale[:, None]).T)
            chunks, _, parallel = fp8_gemm.plan(m, n, k, num_sms)
            record(f"{tag} fp8_gemm M={m} N={n} K={k}", err <= 1e-2,
                   f"rel {err:.1e} ({chunks} K chunks, {'split programs' if parallel else 'serial'})")
            if m == 300:
                rows = [0, 1, 17, 150, 299]
                alone = torch.cat([fp8_gemm.fp8_linear(launcher, x[i:i + 1], weight, scale, num_sms=num_sms)
                                   for i in rows])
                same = torch.equal(alone, out[rows])
                record(f"{tag} fp8_gemm rows alone = rows of M=300, N={n} K={k}", same, f"bit-identical {same}")


def time_ms(fn, *args, iters: int = 50) -> float:
    fn(*args)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn(*args)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def check_fp8_speed(launcher, cfg: ModelConfig, gen, num_sms: int) -> None:
    """Weight-only fp8 must beat a bf16 GEMM at decode sizes by reading half the bytes (docs/design.md §7)."""
    from nemodiff.plugins.scratch import Counters

    counters = Counters()  # as the kernel library holds them: no zeroing launch per call
    for n, k in fp8_gemm.linear_shapes(cfg):
        weight, scale = quantize_fp8(torch.randn(n, k, generator=gen).to(DEV))
        dense = (weight.float() * scale[:, None]).to(torch.bfloat16)
        for m in (1, 16, 64):
            x = torch.randn(m, k, generator=gen).to(DEV, torch.bfloat16)
            fp8 = time_ms(fp8_gemm.fp8_linear, launcher, x, weight, scale, num_sms, None, counters)
            bf16 = time_ms(torch.matmul, x, dense.T)
            bandwidth = n * k / (fp8 * 1e-3) / 1e12
            record(f"fp8 speed M={m} N={n} K={k}", fp8 < bf16 or m > 16,
                   f"fp8 {1e3 * fp8:.1f} us ({bandwidth:.2f} TB/s of weights) vs bf16 {1e3 * bf16:.1f} us"
                   + ("" if m <= 16 else " (informational above M=16)"))


def compile_for_this_gpu(sm: str, out_dir: Path) -> aot.AotLauncher:
    variants = {}
    for name in SHAPES:
        for dtype in ("bf16", "fp16", "fp8"):
            for variant in registry.engine_variants(config_of(name), dtype):
                variants.setdefault(variant.key, variant)
    start = time.time()
    aot.compile_variants(list(variants.values()), sm, out_dir)
    record("compile", True, f"{len(variants)} variants for {sm} in {time.time() - start:.1f} s")
    return aot.AotLauncher(out_dir)


def check_kernels(launcher, tag: str, gen, num_sms: int) -> None:
    for name in SHAPES:
        cfg = config_of(name)
        for dtype in (torch.bfloat16, torch.float16):
            check_norm(tag, launcher, cfg, dtype, gen)
            check_silu(tag, launcher, cfg, dtype, gen)
        check_fp8(tag, launcher, cfg, gen, num_sms)


def check_attention(launcher, tag: str, shapes: list[str], dtypes) -> None:
    """Mixed batches (decode, verify, draft, QuadraticSpec, prefill, explicit mask) over shuffled pages from a
    random qkv, outputs, workspaces and unowned cache slots poisoned with NaN; several split counts. The
    kernel's output against RoPE + cache write + attention in PyTorch, and the cache it wrote against the
    reference write (untouched slots bit for bit)."""
    from attention_cases import make_case

    from nemodiff.plugins.attention import CAUSAL, FULL, MASK, segment_attention
    from nemodiff.runtime.model.segments import quadratic_mask

    mask = torch.rand(40, 40) > 0.5
    mask[:, 0] = True
    segments = [(1, 1000, CAUSAL, None), (32, 517, CAUSAL, None), (32, 300, FULL, None),
                (72, 64, MASK, quadratic_mask(8)), (300, 0, CAUSAL, None), (40, 33, MASK, mask), (1, 0, CAUSAL, None)]
    for name in shapes:
        cfg = config_of(name)
        for dtype in dtypes:
            case = make_case(segments, heads=cfg.num_attention_heads, kv_heads=cfg.num_key_value_heads,
                             head_dim=cfg.head_dim, page_size=16, dtype=dtype, device="cuda",
                             seed=int(torch.randint(0, 2**31, (1,))))
            want, want_k, want_v = case.reference()
            written = case.write_slots[case.write_slots >= 0]
            untouched = torch.ones(case.k_cache.shape[0], dtype=torch.bool, device=DEV)
            untouched[written] = False
            for splits in (1, 3, 8):
                out = nan(case.qkv.shape[0], cfg.num_attention_heads, cfg.head_dim, dtype=dtype)
                k_cache, v_cache = case.k_cache.clone(), case.v_cache.clone()
                segment_attention(launcher, *case.inputs(), k_cache, v_cache, case.meta(splits), cfg.head_dim ** -0.5,
                                  *case.shape(), out=out)
                torch.cuda.synchronize()
                err, k_err = rel(out, want), rel(k_cache[written], want_k[written])
                kept = (torch.equal(k_cache[untouched].view(torch.int16), case.k_cache[untouched].view(torch.int16))
                        and torch.equal(v_cache[untouched].view(torch.int16), case.v_cache[untouched].view(torch.int16))
                        and torch.equal(v_cache[written], want_v[written]))
                record(f"{tag} attention {str(dtype)[6:]} {name} splits {splits}",
                       err <= LIMITS[dtype] and k_err <= LIMITS[dtype] and kept,
                       f"rel {err:.1e}, cached k rel {k_err:.1e}, v and untouched slots exact {kept}")


def attention_bandwidth() -> None:
    """Decode attention at the NLD-8B shape against the copy bandwidth (informational)."""
    from check_attention import benchmarks

    for row in benchmarks():
        record("attention speed", True, row)


def main() -> int:
    out_dir = Path(os.environ.get("OUT") or tempfile.mkdtemp())
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 2
    sm = gpu_sm(DEV)
    num_sms = torch.cuda.get_device_properties(DEV).multi_processor_count
    import triton

    print(f"device {torch.cuda.get_device_name(DEV)} ({sm}, {num_sms} SMs), torch {torch.__version__}, "
          f"triton {triton.__version__}", flush=True)
    seed = int(time.time())
    print(f"seed {seed}", flush=True)
    gen = torch.Generator().manual_seed(seed)  # fresh inputs every run
    torch.manual_seed(seed)
    half = (torch.bfloat16, torch.float16)
    aot_dir = out_dir / "kernels" / sm
    steps = [("aot", lambda: check_kernels(compile_for_this_gpu(sm, aot_dir), "aot", gen, num_sms)),
             ("attention aot", lambda: check_attention(aot.AotLauncher(aot_dir), "aot", list(SHAPES), half)),
             ("jit", lambda: check_attention(JitLauncher(), "jit", ["nld-8b"], (torch.bfloat16,))),
             ("fp8 speed", lambda: check_fp8_speed(aot.AotLauncher(aot_dir), config_of("nld-8b"), gen, num_sms)),
             ("attention speed", attention_bandwidth)]
    REPORT.run(steps)
    return REPORT.finish()


if __name__ == "__main__":
    sys.exit(main())
