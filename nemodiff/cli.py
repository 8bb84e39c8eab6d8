"""`nemodiff`: run an engine from the command line (generate, inspect; serve and bench join from their packages).

checkpoint ──builder──▶ engine dir ──[runtime: CLI]──▶ Triton

Every subcommand runs inside `CommandGroup`, which turns the errors an operator can cause (a broken or
missing engine, a device or kernel mode this machine cannot run, bad parameters) into one `Error:` line
on stderr and exit status 1, never a traceback.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from nemodiff.device import DeviceError, KernelLaunchError
from nemodiff.engine_format import EngineFormatError, VisionConfig, open_engine, read_manifest
from nemodiff.runtime.request import mode_param

CONTEXT = {"show_default": True, "help_option_names": ["-h", "--help"]}
KERNEL_MODES = ["auto", "off", "interpret", "aot-check", "jit", "aot"]
SM_COUNT_HELP = ("Plan split-K and split-KV grids as on a GPU with this many SMs (132: H100/H200); with "
                 "--kernels aot-check the CPU runs that GPU's plans and merges [default: the device's own].")
KERNELS_HELP = ("auto: the engine's compiled kernels on a matching GPU, else the PyTorch reference path; "
                "interpret: the kernels' real code under Triton's interpreter on the CPU (slow; for verification); "
                "aot-check: on the CPU, the GPU launch path of an engine built for a GPU, every launch checked "
                "against its compiled kernel, then interpreted (slow; for verification); jit: Triton's compiler on "
                "a GPU; aot: the compiled kernels or an error; off: reference path.")


def one_line(exc: BaseException) -> str:
    return " | ".join(line.strip() for line in str(exc).strip().splitlines() if line.strip()) or type(exc).__name__


class CommandGroup(click.Group):
    """Expected errors of any subcommand become one line (click's `Error: ...`), not a traceback."""

    def invoke(self, ctx: click.Context):
        from nemodiff.runtime.parallel.comm import TensorParallelError

        try:
            return super().invoke(ctx)
        except (EngineFormatError, DeviceError, KernelLaunchError, TensorParallelError, ValueError, OSError) as exc:
            raise click.ClickException(one_line(exc)) from None


@click.group(cls=CommandGroup, context_settings=CONTEXT)
@click.version_option(package_name="nemodiff")
def main() -> None:
    """Run Nemotron-Labs-Diffusion engines built by nemodiff-build."""


def _parse_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise click.BadParameter("--prompt-ids wants comma-separated integers, e.g. 1,2,3") from None


def _parse_threshold(value: str) -> float | None:
    if value.lower() == "none":
        return None
    try:
        return float(value)
    except ValueError:
        raise click.BadParameter("--threshold wants a number in (0, 1] or 'none'") from None


@main.command(context_settings=CONTEXT)
@click.argument("engine_dir", type=click.Path(path_type=Path))
@click.option("--prompt", type=str, default=None, help="Prompt text.")
@click.option("--prompt-ids", type=str, default=None, help="Prompt as comma-separated token ids.")
@click.option("--mode", type=mode_param(), default="ar", help="Decoding mode (linear_spec, fastdiffuser, ... too); auto: the engine picks per step.")
@click.option("--max-new-tokens", type=int, default=64, help="Most tokens to generate.")
@click.option("--temperature", type=float, default=0.0, help="0 = greedy.")
@click.option("--top-p", type=float, default=1.0, help="Nucleus sampling mass.")
@click.option("--top-k", type=int, default=0, help="Keep the k most likely tokens (0 = all).")
@click.option("--seed", type=int, default=None, help="Sampling seed.")
@click.option("--stop", "stop", multiple=True, help="Stop string (repeatable).")
@click.option("--chat", is_flag=True, help="Apply the chat template to --prompt.")
@click.option("--image", "images", multiple=True, type=click.Path(path_type=Path),
              help="Image file (repeatable; VLM engines). An [IMG] in the prompt marks where each goes, else first.")
@click.option("--block-length", type=int, default=None, help="Block / draft length [default: engine's].")
@click.option("--threshold", type=str, default="0.9", help="Diffusion confidence threshold, or 'none'.")
@click.option("--draft-lora/--no-draft-lora", default=True, help="Use the draft adapter in linear-spec drafts.")
@click.option("--draft-threshold", type=float, default=None,
              help="linear-spec: redraft until every slot is this confident (iterative drafting).")
@click.option("--max-thinking-tokens", type=int, default=None, help="Force end-of-thinking after this many tokens.")
@click.option("--repetition-penalty", type=float, default=1.0,
              help="Divide positive / multiply negative logits of prompt and output tokens by it (1 = off).")
@click.option("--frequency-penalty", type=float, default=0.0, help="Subtract it times each token's output count.")
@click.option("--presence-penalty", type=float, default=0.0, help="Subtract it once from every token in the output.")
@click.option("--ignore-eos", is_flag=True, help="Go on past end-of-sequence tokens (up to --max-new-tokens).")
@click.option("--json-schema", type=str, default=None,
              help="Structured output: a JSON schema (a file, or the JSON itself); 'object' for any JSON object.")
@click.option("--regex", type=str, default=None, help="Structured output: the output matches this regular expression.")
@click.option("--choice", type=str, default=None, help="Structured output: one of these comma-separated strings.")
@click.option("--grammar", type=str, default=None, help="Structured output: an EBNF (GBNF) grammar (a file or text).")
@click.option("--device", type=str, default=None, help="torch device [default: cuda if available, else cpu].")
@click.option("--kernels", type=click.Choice(KERNEL_MODES), default="auto", help=KERNELS_HELP)
@click.option("--sm-count", type=click.IntRange(1, 1024), default=None, help=SM_COUNT_HELP)
@click.option("--tp", type=int, default=None,
              help="Tensor-parallel ranks; must match the engine's nemodiff-build --tp [default: the engine's].")
@click.option("--logprobs", type=click.IntRange(0, 20), default=None,
              help="Report each output token's log-probability and this many alternatives (--json).")
@click.option("--n", "n", type=click.IntRange(1, None), default=1,
              help="Completions of the prompt, each its own seed derived from --seed (--json: a list).")
@click.option("--prefix-cache/--no-prefix-cache", default=True,
              help="Reuse the KV of prompt prefixes (within this run: the n completions share the prompt's).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (a list of them with --n > 1).")
def generate(engine_dir: Path, prompt: str | None, prompt_ids: str | None, mode: str, max_new_tokens: int,
             temperature: float, top_p: float, top_k: int, seed: int | None, stop: tuple[str, ...], chat: bool,
             images: tuple[Path, ...],
             block_length: int | None, threshold: str, draft_lora: bool, draft_threshold: float | None,
             max_thinking_tokens: int | None, json_schema: str | None, regex: str | None, choice: str | None,
             grammar: str | None, device: str | None, kernels: str, sm_count: int | None, tp: int | None,
             logprobs: int | None, n: int, prefix_cache: bool, as_json: bool, repetition_penalty: float = 1.0,
             frequency_penalty: float = 0.0, presence_penalty: float = 0.0, ignore_eos: bool = False) -> None:
    """Generate a completion for one prompt."""
    from nemodiff import LLM, SamplingParams

    if (prompt is None) == (prompt_ids is None):
        raise click.UsageError("give exactly one of --prompt or --prompt-ids")
    params = SamplingParams(
        max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
        stop=list(stop), mode=mode, block_length=block_length, threshold=_parse_threshold(threshold),
        draft_lora=draft_lora, draft_threshold=draft_threshold, max_thinking_tokens=max_thinking_tokens,
        logprobs=logprobs, n=n, guide=_guide(json_schema, regex, choice, grammar),
        repetition_penalty=repetition_penalty, frequency_penalty=frequency_penalty, presence_penalty=presence_penalty,
        ignore_eos=ignore_eos,
    )
    source = prompt if prompt is not None else _parse_ids(prompt_ids)
    params.validate()
    with LLM(engine_dir, device=device, kernels=kernels, tp=tp, prefix_cache=prefix_cache, sm_count=sm_count) as llm:
        outputs = llm.generate([source], params, chat=chat, images=[list(images)])
    if as_json:
        dicts = [o.to_dict() | ({"index": o.index} if n > 1 else {}) for o in outputs]
        click.echo(json.dumps(dicts if n > 1 else dicts[0]))
        return
    for output in outputs:
        click.echo(output.text)
        click.echo(f"[{'' if n == 1 else f'choice {output.index}: '}{len(output.output_ids)} tokens, "
                   f"{output.num_forward_passes} forwards, {output.tokens_per_forward:.2f} tokens/forward, "
                   f"{output.seconds:.3f} s, finish: {output.finish_reason}]", err=True)


def _guide(json_schema: str | None, regex: str | None, choice: str | None, grammar: str | None):
    """The --json-schema / --regex / --choice / --grammar guide (at most one), or None."""
    from nemodiff.runtime.request import Guide

    given = [g for g in (json_schema, regex, choice, grammar) if g is not None]
    if len(given) > 1:
        raise click.UsageError("give at most one of --json-schema, --regex, --choice and --grammar")

    def text(value: str) -> str:  # a file's content, or the value itself
        path = Path(value)
        return path.read_text(encoding="utf-8") if len(value) < 4096 and path.is_file() else value

    if json_schema is not None:
        return Guide("json") if json_schema == "object" else Guide("json_schema", text(json_schema))
    if regex is not None:
        return Guide("regex", regex)
    if choice is not None:
        return Guide("choice", choices=tuple(c for c in choice.split(",") if c))
    return Guide("ebnf_grammar", text(grammar)) if grammar is not None else None


def describe_vision(vision: VisionConfig) -> str:
    return (f"Pixtral tower {vision.num_hidden_layers} layers, hidden {vision.hidden_size}, heads "
            f"{vision.num_attention_heads} x {vision.head_dim}, patch {vision.patch_size}, images up to "
            f"{vision.longest_edge} px; projector {vision.spatial_merge_size}x{vision.spatial_merge_size} merge -> "
            f"{vision.text_hidden_size}; image tokens {vision.image_token_id}/{vision.image_break_token_id}/"
            f"{vision.image_end_token_id}")


@main.command(context_settings=CONTEXT)
@click.argument("engine_dir", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--verify/--no-verify", default=True, help="Check file hashes against the manifest.")
def inspect(engine_dir: Path, as_json: bool, verify: bool) -> None:
    """Show an engine's model config, build settings and files."""
    from nemodiff.runtime.model.loader import check_engine
    from nemodiff.runtime.text.tokenizer import EngineTokenizer

    if verify:  # everything `nemodiff serve` checks before it starts, the tokenizer read included
        config, manifest = check_engine(engine_dir), read_manifest(engine_dir)
        EngineTokenizer(engine_dir, vocab_size=config.model.vocab_size)
    else:
        config, manifest = open_engine(engine_dir, verify=False)[0], read_manifest(engine_dir)
    info = config.to_dict() | {"files": manifest["files"], "verified": verify}
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    model, build = config.model, config.build
    click.echo(f"engine {engine_dir}")
    click.echo(f"  model   {model.num_hidden_layers} layers, hidden {model.hidden_size}, heads "
               f"{model.num_attention_heads}/{model.num_key_value_heads} x {model.head_dim}, vocab {model.vocab_size}")
    click.echo(f"  build   dtype {build.dtype}, arch {build.arch} ({build.sm or 'reference path'}), block "
               f"{build.block_length}, max seq {build.max_seq_len}, max batch {build.max_batch_size}, "
               f"KV page {build.kv_page_size}, draft LoRA {'r=%d' % build.lora.rank if build.lora else 'none'}"
               + (f", tensor parallel {build.tp} ranks" if build.tp > 1 else ""))
    if config.vision:
        click.echo(f"  vision  {describe_vision(config.vision)}")
    if build.kernels:
        names = sorted({k["kernel"] for k in build.kernels})
        click.echo(f"  kernels {len(build.kernels)} compiled for {build.sm} ({', '.join(names)})")
    else:
        click.echo("  kernels none (PyTorch reference path)")
    click.echo(f"  files   ({'hashes verified' if verify else 'not verified'})")
    for name, entry in manifest["files"].items():
        click.echo(f"    {name:32s} {entry['bytes']:>12,d} B  sha256 {entry['sha256'][:16]}")


from nemodiff.bench.cli import bench  # noqa: E402
from nemodiff.serving.cli import serve  # noqa: E402
from nemodiff.serving.dynamo.cli import worker  # noqa: E402

main.add_command(serve)
main.add_command(bench)
main.add_command(worker)


if __name__ == "__main__":
    main()
