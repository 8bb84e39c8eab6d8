"""GPU kernel checks: every Triton kernel against its PyTorch reference through the ahead-of-time
launcher (cubins compiled here for this GPU's sm, as an engine build does) and, for the NLD-8B
shape, attention through Triton's JIT; the fp8 GEMM's speed against a bf16 GEMM at decode sizes; the
attention kernel's decode bandwidth through the same cubins. Run by run_device_checks.sh
(model_checks.py does the engine-level checks).

checkpoint ──builder (compiles kernels)──▶ engine dir ──runtime (AOT launcher)──▶ Triton

Each check draws fresh random inputs (the seed is printed), poisons outputs before the kernel
runs (NaN) so an unwritten element fails, and compares by relative error
||out - ref|| / ||ref|| against a stated threshold. Results go to $OUT/device_checks.json after
every check. The cubins are compiled into $NEMODIFF_KERNEL_ROOT/kernels/<sm>/ (default: $OUT), where
`nemodiff bench --kernel-dir` finds them again. In the CPU dry run (check_report.Rig) the same checks
run on tiny shapes, the kernels compiled for sm_90a, checked and interpreted.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch
from check_report import Report, Rig, out_dir, rel

from nemodiff.bench.kernels import compile_for
from nemodiff.builder.convert import quantize_fp8
from nemodiff.engine_format import ModelConfig, RopeConfig
from nemodiff.plugins import activation, fp8_gemm, norm, registry
from nemodiff.plugins.scratch import Counters

REPORT = Report("device_checks")
record = REPORT.record
RIG = Rig()
DEV = RIG.device
LIMITS = {torch.bfloat16: 1e-2, torch.float16: 2e-3}
if RIG.dry:  # Triton's interpreter truncates float32 -> bfloat16 where the GPU rounds: about twice the error
    LIMITS[torch.bfloat16] = 2e-2
if not RIG.dry:
    # NLD-8B, and a small odd shape (GQA ratio 8, head_dim 64, hidden not a power of two)
    SHAPES = {"nld-8b": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                             head_dim=128),
              "odd": dict(hidden_size=1536, intermediate_size=1100, num_attention_heads=8, num_key_value_heads=1,
                          head_dim=64)}
    DTYPES, HALF = ("bf16", "fp16", "fp8"), (torch.bfloat16, torch.float16)
    NORM_TOKENS, SILU_TOKENS, FP8_ROWS, BIT_ROWS = (1, 37, 1056), (1, 1056), (1, 8, 16, 32, 64, 100, 300, 1056), 300
    SPEED_ROWS, SPLITS, CONTEXT = (1, 16, 64), (1, 3, 8), 1000
else:  # the test checkpoints' geometry (bench shape "micro"): the same cubins as the other dry-run steps
    SHAPES = {"micro": dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                            head_dim=16)}
    DTYPES, HALF = ("bf16", "fp8"), (torch.bfloat16,)
    NORM_TOKENS, SILU_TOKENS, FP8_ROWS, BIT_ROWS = (1, 5), (3,), (1, 5), 5
    SPEED_ROWS, SPLITS, CONTEXT = (1,), (1, 3), 40
BENCH_SHAPE = next(iter(SHAPES))  # the bench's shape: attention through the JIT, speed checks


def config_of(name: str) -> ModelConfig:
    return ModelConfig(vocab_size=1024, num_hidden_layers=1, rms_norm_eps=1e-5, max_position_embeddings=262144,
                       block_size=32, mask_token_id=100, bos_token_id=1, eos_token_ids=[2],
                       rope=RopeConfig(rope_type="yarn", rope_theta=1e6, factor=16.0, mscale=1.0, mscale_all_dim=1.0,
                                       original_max_position_embeddings=16384, llama_4_scaling_beta=0.1),
                       **SHAPES[name])


def nan(*shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype, device=DEV)


def check_norm(tag: str, launcher, cfg: ModelConfig, dtype, gen) -> None:
    for tokens in NORM_TOKENS:
        residual = (torch.randn(tokens, cfg.hidden_size, generator=gen) * 3).to(DEV, dtype)
        delta = torch.randn(tokens, cfg.hidden_size, generator=gen).to(DEV, dtype)
        weight = (1 + 0.1 * torch.randn(cfg.hidden_size, generator=gen)).to(DEV, dtype)
        want_sum, want = norm.reference_add_rmsnorm(residual, delta, weight, cfg.rms_norm_eps)
        out = nan(tokens, cfg.hidden_size, dtype=dtype)
        norm.add_rmsnorm(launcher, residual, delta, weight, cfg.rms_norm_eps, out=out)
        RIG.sync()
        exact_add = torch.equal(residual, want_sum)
        same = (out == want).float().mean().item()
        err = rel(out, want)
        # Triton's interpreter truncates float32 -> bfloat16 (the GPU rounds to nearest even): a dry run
        # cannot ask bf16 for bit-exactness
        loose = RIG.dry and dtype == torch.bfloat16
        record(f"{tag} add_rmsnorm {str(dtype)[6:]} H={cfg.hidden_size} T={tokens}",
               (exact_add and same >= 0.99 or loose) and err <= LIMITS[dtype],
               f"add bit-exact {exact_add}, norm rel {err:.1e}, {100 * same:.2f}% bit-identical"
               + (" (bit-exactness not required: the interpreter truncates bf16)" if loose else ""))
        out = nan(tokens, cfg.hidden_size, dtype=dtype)
        norm.rms_norm(launcher, residual, weight, cfg.rms_norm_eps, out=out)
        err = rel(out, norm.reference_add_rmsnorm(residual, None, weight, cfg.rms_norm_eps)[1])
        record(f"{tag} rms_norm {str(dtype)[6:]} T={tokens}", err <= LIMITS[dtype], f"rel {err:.1e}")


def check_silu(tag: str, launcher, cfg: ModelConfig, dtype, gen) -> None:
    for tokens in SILU_TOKENS:
        gate_up = (torch.randn(tokens, 2 * cfg.intermediate_size, generator=gen) * 3).to(DEV, dtype)
        out = nan(tokens, cfg.intermediate_size, dtype=dtype)
        activation.silu_mul(launcher, gate_up, out=out)
        err = rel(out, activation.reference_silu_mul(gate_up))
        record(f"{tag} silu_mul {str(dtype)[6:]} I={cfg.intermediate_size} T={tokens}", err <= LIMITS[dtype],
               f"rel {err:.1e}")


def check_fp8(tag: str, launcher, cfg: ModelConfig, gen) -> None:
    """Against the dequantised weights at decode and prefill sizes; and rows of a BIT_ROWS-row product
    bit-identical to the same rows alone (fp8 means one thing at every M)."""
    for n, k in fp8_gemm.linear_shapes(cfg):
        weight, scale = quantize_fp8(torch.randn(n, k, generator=gen).to(DEV))  # quantized on the device
        x_all = torch.randn(max(FP8_ROWS), k, generator=gen).to(DEV, torch.bfloat16)
        for m in FP8_ROWS:
            x = x_all[:m]
            out = nan(m, n, dtype=torch.bfloat16)
            fp8_gemm.fp8_linear(launcher, x, weight, scale, num_sms=RIG.num_sms, out=out)
            err = rel(out, x.float() @ (weight.float() * scale[:, None]).T)
            chunks, _, parallel = fp8_gemm.plan(m, n, k, RIG.num_sms)
            record(f"{tag} fp8_gemm M={m} N={n} K={k}", err <= 1e-2,
                   f"rel {err:.1e} ({chunks} K chunks, {'split programs' if parallel else 'serial'})")
            if m == BIT_ROWS:
                rows = sorted({0, 1, m // 2, m - 1})
                alone = torch.cat([fp8_gemm.fp8_linear(launcher, x[i:i + 1], weight, scale, num_sms=RIG.num_sms)
                                   for i in rows])
                same = torch.equal(alone, out[rows])
                record(f"{tag} fp8_gemm rows alone = rows of M={m}, N={n} K={k}", same, f"bit-identical {same}")


def check_fp8_speed(launcher, cfg: ModelConfig, gen) -> None:
    """Weight-only fp8 must beat a bf16 GEMM at decode sizes by reading half the bytes (docs/design.md §7)."""
    counters = Counters()  # as the kernel library holds them: no zeroing launch per call
    for n, k in fp8_gemm.linear_shapes(cfg):
        weight, scale = quantize_fp8(torch.randn(n, k, generator=gen).to(DEV))
        dense = (weight.float() * scale[:, None]).to(torch.bfloat16)
        for m in SPEED_ROWS:
            x = torch.randn(m, k, generator=gen).to(DEV, torch.bfloat16)
            fp8 = RIG.time_ms(lambda x=x, w=weight, s=scale: fp8_gemm.fp8_linear(launcher, x, w, s, RIG.num_sms, None,
                                                                               counters))
            bf16 = RIG.time_ms(lambda x=x, d=dense: torch.matmul(x, d.T))
            bandwidth = n * k / (fp8 * 1e-3) / 1e12
            note = " (dry run: host clock, not a speed)" if RIG.dry else \
                ("" if m <= 16 else " (informational above M=16)")
            record(f"fp8 speed M={m} N={n} K={k}", fp8 < bf16 or m > 16 or RIG.dry,
                   f"fp8 {1e3 * fp8:.1f} us ({bandwidth:.2f} TB/s of weights) vs bf16 {1e3 * bf16:.1f} us{note}")


def compile_for_this_gpu(root: Path) -> Path:
    """Every variant of every checked shape and dtype, compiled for this GPU's sm into root/kernels/<sm>/."""
    variants = {}
    for name in SHAPES:
        for dtype in DTYPES:
            for variant in registry.engine_variants(config_of(name), dtype):
                variants.setdefault(variant.key, variant)
    info = compile_for(list(variants.values()), RIG.sm, root)
    how = f"compiled in {info['compile_s']:.1f} s" if info["compiled"] else "reused"
    record("compile", True, f"{info['variants']} variants for {RIG.sm} ({how}) in {info['dir']}")
    return Path(info["dir"])


def check_kernels(launcher, tag: str, gen) -> None:
    for name in SHAPES:
        cfg = config_of(name)
        for dtype in HALF:
            check_norm(tag, launcher, cfg, dtype, gen)
            check_silu(tag, launcher, cfg, dtype, gen)
        check_fp8(tag, launcher, cfg, gen)


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
    if RIG.dry:
        segments = [(1, CONTEXT, CAUSAL, None), (8, 9, FULL, None), (6, 5, MASK, quadratic_mask(2)), (3, 0, CAUSAL, None)]
    else:
        segments = [(1, CONTEXT, CAUSAL, None), (32, 517, CAUSAL, None), (32, 300, FULL, None),
                    (72, 64, MASK, quadratic_mask(8)), (300, 0, CAUSAL, None), (40, 33, MASK, mask),
                    (1, 0, CAUSAL, None)]
    for name in shapes:
        cfg = config_of(name)
        for dtype in dtypes:
            case = make_case(segments, heads=cfg.num_attention_heads, kv_heads=cfg.num_key_value_heads,
                             head_dim=cfg.head_dim, page_size=16, dtype=dtype, device=DEV,
                             seed=int(torch.randint(0, 2**31, (1,))))
            want, want_k, want_v = case.reference()
            written = case.write_slots[case.write_slots >= 0]
            untouched = torch.ones(case.k_cache.shape[0], dtype=torch.bool, device=DEV)
            untouched[written] = False
            for splits in SPLITS:
                out = nan(case.qkv.shape[0], cfg.num_attention_heads, cfg.head_dim, dtype=dtype)
                k_cache, v_cache = case.k_cache.clone(), case.v_cache.clone()
                segment_attention(launcher, *case.inputs(), k_cache, v_cache, case.meta(splits), cfg.head_dim ** -0.5,
                                  *case.shape(), out=out)
                RIG.sync()
                err, k_err = rel(out, want), rel(k_cache[written], want_k[written])
                kept = (torch.equal(k_cache[untouched].view(torch.int16), case.k_cache[untouched].view(torch.int16))
                        and torch.equal(v_cache[untouched].view(torch.int16), case.v_cache[untouched].view(torch.int16))
                        and torch.equal(v_cache[written], want_v[written]))
                record(f"{tag} attention {str(dtype)[6:]} {name} splits {splits}",
                       err <= LIMITS[dtype] and k_err <= LIMITS[dtype] and kept,
                       f"rel {err:.1e}, cached k rel {k_err:.1e}, v and untouched slots exact {kept}")


def attention_bandwidth(launcher) -> None:
    """Decode attention at the bench shape against the copy bandwidth, through the cubins (informational)."""
    from check_attention import benchmarks

    cfg = config_of(BENCH_SHAPE)
    for row in benchmarks(launcher, RIG, heads=cfg.num_attention_heads, kv_heads=cfg.num_key_value_heads,
                          head_dim=cfg.head_dim, small=RIG.dry):
        record("attention speed", True, row + (" (dry run: host clock)" if RIG.dry else ""))


def main() -> int:
    root = Path(os.environ.get("NEMODIFF_KERNEL_ROOT") or out_dir())
    import triton

    print(f"device {RIG.name}, torch {torch.__version__}, triton {triton.__version__}", flush=True)
    seed = int(time.time())
    print(f"seed {seed}", flush=True)
    gen = torch.Generator().manual_seed(seed)  # fresh inputs every run
    torch.manual_seed(seed)
    aot_dir = root / "kernels" / RIG.sm
    steps = [("compile", lambda: compile_for_this_gpu(root)),
             ("aot", lambda: check_kernels(RIG.aot_launcher(aot_dir), "aot", gen)),
             ("attention aot", lambda: check_attention(RIG.aot_launcher(aot_dir), "aot", list(SHAPES), HALF)),
             ("jit", lambda: check_attention(RIG.jit_launcher(), "jit", [BENCH_SHAPE], (torch.bfloat16,))),
             ("fp8 speed", lambda: check_fp8_speed(RIG.aot_launcher(aot_dir), config_of(BENCH_SHAPE), gen)),
             ("attention speed", lambda: attention_bandwidth(RIG.aot_launcher(aot_dir)))]
    REPORT.run(steps)
    return REPORT.finish()


if __name__ == "__main__":
    sys.exit(main())
