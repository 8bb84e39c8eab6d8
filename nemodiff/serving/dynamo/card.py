"""The Hugging Face model card Dynamo's frontend reads: config.json with `architectures`, the tokenizer files.

checkpoint ──builder──▶ engine dir ──[serving: a model card for Dynamo]──▶ Dynamo's frontend

An engine directory's config.json is nemodiff's own; the frontend wants a Hugging Face one (for the
context length and the end-of-sequence ids) next to tokenizer.json and tokenizer_config.json (for
tokenization and the chat template). The card is written to a folder of its own from the engine's
files: the same tokenizer, the same chat template (chat_template.jinja included), so the frontend
tokenizes as `nemodiff generate` does.

Dynamo admits a second worker of a model only with the same card (its checksum covers where the card
lies), so every worker of an engine uses one folder: under the user's cache, named by the engine
manifest's digest, written once (atomically: a folder renamed into place) and then shared.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from nemodiff.engine_format import MANIFEST_FILE, EngineConfig
from nemodiff.runtime.text.tokenizer import TEMPLATE_FILE, TOKENIZER_CONFIG_FILE, TOKENIZER_FILE, EngineTokenizer

ARCHITECTURE = "NemotronLabsDiffusionModel"


def write_card(engine_dir: Path, config: EngineConfig, out: Path) -> Path:
    """Write the card of the engine at engine_dir into out (created); returns out."""
    out.mkdir(parents=True, exist_ok=True)
    model, build = config.model, config.build
    tokenizer = EngineTokenizer(engine_dir, vocab_size=model.vocab_size)
    card = {
        "architectures": [ARCHITECTURE], "model_type": "nemotron_labs_diffusion",
        "vocab_size": model.vocab_size, "hidden_size": model.hidden_size,
        "num_hidden_layers": model.num_hidden_layers, "num_attention_heads": model.num_attention_heads,
        "num_key_value_heads": model.num_key_value_heads, "max_position_embeddings": build.max_seq_len,
        "bos_token_id": model.bos_token_id, "eos_token_id": list(model.eos_token_ids),
    }
    (out / "config.json").write_text(json.dumps(card, indent=2))
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": model.bos_token_id, "eos_token_id": list(model.eos_token_ids)}, indent=2))
    shutil.copyfile(engine_dir / TOKENIZER_FILE, out / TOKENIZER_FILE)
    tok_config = dict(tokenizer.config)
    if tokenizer.chat_template:  # one template, in the file the frontend reads (a .jinja file included)
        tok_config["chat_template"] = tokenizer.chat_template
    (out / TOKENIZER_CONFIG_FILE).write_text(json.dumps(tok_config, indent=2))
    if (engine_dir / TEMPLATE_FILE).is_file():
        shutil.copyfile(engine_dir / TEMPLATE_FILE, out / TEMPLATE_FILE)
    return out


def card_dir(engine_dir: Path, root: Path | None = None) -> Path:
    """Where the card of this engine lies: the same folder for every worker of the same engine."""
    if root is None:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "nemodiff" / "dynamo-cards"
    digest = hashlib.sha256((Path(engine_dir) / MANIFEST_FILE).read_bytes()).hexdigest()[:16]
    return Path(root) / digest


def ensure_card(engine_dir: Path, config: EngineConfig, root: Path | None = None) -> Path:
    """The engine's card folder, written unless a worker wrote it before."""
    target = card_dir(engine_dir, root)
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".card-", dir=target.parent))
    try:
        write_card(engine_dir, config, staging)
        os.rename(staging, target)
    except OSError:
        if not (target / "config.json").is_file():  # not a neighbour that won the race
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
