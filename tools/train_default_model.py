"""Trains the project's default model, a tiny NLD checkpoint, from a corpus it generates itself.

[checkpoint: made here] ──builder──▶ engine dir ──runtime──▶ Triton

    python tools/train_default_model.py --out models/nld-tiny           # the shipped model
    python tools/train_default_model.py --out /some/dir --quick         # a short smoke run

Steps: generate the templated corpus (tools/default_corpus.py), train the byte-level BPE
tokenizer on it (the NLD special-token block, mask id 100), train `TinyNLD` with the joint
AR + block-diffusion objective of docs/design.md §6, write the checkpoint in the upstream Hugging
Face layout (config.json, model.safetensors, tokenizer.json, tokenizer_config.json), then
build an fp32 engine, check the runtime's causal logits against the training module, and
measure tokens per forward of every decoding mode on held-out prompts
(training_log.json). Seeds are fixed: the same torch version, thread count and CPU give
the same bytes.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))

import default_corpus  # noqa: E402
import nld_eval  # noqa: E402
from tiny_nld import TinyNLD, joint_loss, joint_mask  # noqa: E402

from nemodiff.builder.random_checkpoint import RandomCheckpointSpec, hf_config_dict, write_tokenizer  # noqa: E402

EOS_ID = 2
MASK_ID = 100


def model_spec(args) -> RandomCheckpointSpec:
    """Architecture of the default model: the Ministral3 layout at a tiny size, upstream YaRN RoPE."""
    return RandomCheckpointSpec(
        vocab_size=args.vocab_size, hidden_size=args.hidden_size, intermediate_size=args.intermediate_size,
        num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
        head_dim=args.hidden_size // 4, max_position_embeddings=1024, block_size=args.block_size,
        eos_token_id=EOS_ID, seed=args.seed,
    )


def build_batches(args, tokenizer) -> torch.Tensor:
    """[steps, batch, seq_len] training sequences, each starting at a document's <s> (as prompts do
    at inference) and filled with whole `<s> text </s>` documents; the last one is cut at seq_len."""
    need = args.steps * args.batch_size
    sequences, current, chunk, seed = [], [], 20000, args.seed
    while len(sequences) < need:
        for enc in tokenizer.encode_batch(default_corpus.training_documents(chunk, seed=seed)):
            current += enc.ids + [EOS_ID]
            if len(current) >= args.seq_len:
                sequences.append(current[:args.seq_len])
                current = []
        seed += 1_000_003
    data = torch.tensor(sequences[:need], dtype=torch.long)
    return data.view(args.steps, args.batch_size, args.seq_len)


def lr_at(step: int, args) -> float:
    warmup = max(1, int(0.05 * args.steps))
    if step < warmup:
        return args.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, args.steps - warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(args, cfg: dict, batches: torch.Tensor) -> tuple[TinyNLD, dict]:
    torch.manual_seed(args.seed)
    model = TinyNLD(cfg)
    model.init_weights(torch.Generator().manual_seed(args.seed))
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))
    mask = joint_mask(args.seq_len, args.block_size)
    noise = torch.Generator().manual_seed(args.seed + 1)
    history, start = [], time.perf_counter()
    window = max(1, min(50, args.steps // 10))
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        loss, diffusion, ar = joint_loss(model, batches[step], mask, MASK_ID, args.alpha, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        history.append((float(loss.detach()), diffusion, ar))
        if step % args.log_every == 0 or step == args.steps - 1:
            recent = history[-window:]
            avg = [sum(h[i] for h in recent) / len(recent) for i in range(3)]
            print(f"step {step + 1:5d}/{args.steps}  loss {avg[0]:.4f}  diffusion {avg[1]:.4f}  ar {avg[2]:.4f}  "
                  f"lr {lr_at(step, args):.2e}  {time.perf_counter() - start:7.1f}s", flush=True)
    recent = history[-window:]
    losses = {name: round(sum(h[i] for h in recent) / len(recent), 4)
              for i, name in enumerate(("total", "diffusion", "ar"))}
    return model, {"final_loss": losses, "train_seconds": round(time.perf_counter() - start, 1)}


def save_checkpoint(out: Path, model: TinyNLD, cfg: dict, dtype: str) -> None:
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    cfg = dict(cfg, torch_dtype={"fp32": "float32", "bf16": "bfloat16"}[dtype])
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    weights = {k: v.to(torch_dtype) for k, v in model.hf_state_dict().items()}
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})


def evaluate(args, out: Path, model: TinyNLD, tokenizer) -> dict:
    model.load_hf_state_dict(load_file(str(out / "model.safetensors")))  # exactly the shipped weights
    model.eval()
    prompts = default_corpus.held_out_prompts()
    references = [opening + rest for _, opening, rest in default_corpus.held_out_examples()]
    with tempfile.TemporaryDirectory() as tmp:
        engine = nld_eval.build_fp32_engine(out, Path(tmp) / "engine")
        parity = nld_eval.runtime_parity(model, engine, tokenizer.encode(references[0]).ids)
        print(f"runtime parity (causal logits, fp32 engine): max relative error {parity:.2e}", flush=True)
        results = nld_eval.measure_modes(engine, prompts, args.eval_tokens)
    ar_ids = results["ar"]["output_ids"]
    lossless = {m: results[m]["output_ids"] == ar_ids for m in ("linear-spec", "quadratic-spec")}
    matches = []
    for prompt, ref, ids in zip(prompts, references, ar_ids):
        want = tokenizer.encode(ref).ids[len(tokenizer.encode(prompt).ids):] + [EOS_ID]
        got = ids[:len(want)]
        matches.append(sum(a == b for a, b in zip(got, want)) / len(got))
    for mode, res in results.items():
        print(f"{mode:15s} tokens/forward {res['tokens_per_forward']:.3f}  per prompt {res['per_prompt']}")
    print(f"spec outputs equal AR: {lossless}; AR matches the template continuation: "
          f"{sum(matches) / len(matches):.3f}")
    print("sample:", prompts[0], "→", results["ar"]["texts"][0])
    return {
        "runtime_parity_max_rel_error": parity,
        "eval_prompts": prompts,
        "eval_max_new_tokens": args.eval_tokens,
        "tokens_per_forward": {m: round(r["tokens_per_forward"], 3) for m, r in results.items()},
        "tokens_per_forward_per_prompt": {m: r["per_prompt"] for m, r in results.items()},
        "spec_equals_ar": lossless,
        "ar_template_match": round(sum(matches) / len(matches), 4),
        "samples": {m: r["texts"][:2] for m, r in results.items()},
    }


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="checkpoint folder to write")
    p.add_argument("--quick", action="store_true", help="smoke run: few steps, short evaluation")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--alpha", type=float, default=1.0, help="weight of the causal (AR) loss")
    p.add_argument("--vocab-size", type=int, default=768)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--intermediate-size", type=int, default=384)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--save-dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--eval-tokens", type=int, default=64)
    p.add_argument("--log-every", type=int, default=25)
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.eval_tokens, args.log_every = 40, 32, 10
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    began = time.perf_counter()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    spec = model_spec(args)
    cfg = hf_config_dict(spec)
    tokenizer = write_tokenizer(out, spec.vocab_size, default_corpus.training_documents(20000, seed=args.seed))
    batches = build_batches(args, tokenizer)
    print(f"corpus: {batches.numel():,} training tokens in {batches.shape[0]} steps of "
          f"{batches.shape[1]} x {batches.shape[2]}", flush=True)
    model, log = train(args, cfg, batches)
    save_checkpoint(out, model, cfg, args.save_dtype)
    log["num_parameters"] = sum(p.numel() for p in model.parameters())
    log |= evaluate(args, out, model, tokenizer)
    log["total_seconds"] = round(time.perf_counter() - began, 1)
    log["torch_version"] = torch.__version__
    log["args"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "out"}
    (out / "training_log.json").write_text(json.dumps(log, indent=2) + "\n")
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(f"wrote {out} ({size / 1e6:.2f} MB) in {log['total_seconds']:.0f}s")


if __name__ == "__main__":
    main()
