"""Read a Llama-family checkpoint into plain tensors under Hugging Face parameter names.

Two formats, both read without pickle:
- a Hugging Face directory: config.json plus model.safetensors, or shards listed in
  model.safetensors.index.json;
- a GGUF file (llama.cpp), or a directory holding exactly one: every tensor is dequantized to
  float32, renamed, and q/k rows are put back in Hugging Face order (see `_unpermute_rope`).
The result is a `Checkpoint`; engine/builder.py maps it into our model.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

SUPPORTED_MODEL_TYPES = ("llama", "mistral")
REQUIRED_KEYS = (
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "rms_norm_eps", "max_position_embeddings", "vocab_size",
)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, or not a model we can load."""


@dataclass
class Checkpoint:
    config: dict  # LlamaConfig-style keys, see `_normalize_config`
    tensors: dict[str, torch.Tensor]  # Hugging Face names; no lm_head.weight when tied
    source: str  # the path read


def read_checkpoint(path: str | os.PathLike, progress: bool = True) -> Checkpoint:
    """Read a Hugging Face safetensors directory, a .gguf file, or a directory with one .gguf."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint path {path} does not exist")
    if path.is_file():
        if path.suffix == ".gguf":
            return _read_gguf(path, progress)
        _refuse_file(path)
    gguf = _single_gguf(path)
    if gguf is not None:
        return _read_gguf(gguf, progress)
    return _read_hf_dir(path, progress)


def save_tokenizer(path: str | os.PathLike, out_dir: str | os.PathLike) -> None:
    """Write the checkpoint's tokenizer as Hugging Face files (tokenizer.json, tokenizer_config.json)."""
    from transformers import AutoTokenizer  # heavy import, only needed here

    path = Path(path)
    gguf = path if path.is_file() and path.suffix == ".gguf" else (_single_gguf(path) if path.is_dir() else None)
    if gguf is None and not path.is_dir():
        raise CheckpointError(f"{path}: not a Hugging Face directory or a .gguf file")
    if gguf is None and not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise CheckpointError(f"{path}: no tokenizer files (none of {', '.join(TOKENIZER_FILES)})")
    try:
        if gguf is not None:
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        else:
            tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: cannot load its tokenizer: {e}") from e
    # save_jinja_files=False keeps the chat template inside tokenizer_config.json, where every
    # transformers version (and other readers) look, instead of a separate chat_template.jinja.
    tok.save_pretrained(str(out_dir), save_jinja_files=False)


# ---------------------------------------------------------------------------------------------
# Hugging Face directories

def _refuse_file(path: Path) -> None:
    if path.suffix in PICKLE_SUFFIXES:
        raise CheckpointError(
            f"{path}: pickle checkpoints ({path.suffix}) are not supported, only safetensors and GGUF "
            "(convert it to safetensors first)"
        )
    if path.suffix == ".safetensors":
        raise CheckpointError(f"{path}: pass the directory holding it and its config.json, not the file")
    raise CheckpointError(f"{path}: not a checkpoint (expected a directory or a .gguf file)")


def _single_gguf(path: Path) -> Path | None:
    """The one .gguf file in a directory without config.json; None when it is not such a directory."""
    if not path.is_dir() or (path / "config.json").exists():
        return None
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) > 1:
        raise CheckpointError(f"{path} holds {len(ggufs)} .gguf files ({', '.join(p.name for p in ggufs)}); pass one")
    return ggufs[0] if ggufs else None


def _read_hf_dir(path: Path, progress: bool) -> Checkpoint:
    config_path = path / "config.json"
    if not config_path.is_file():
        pickles = [p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES]
        if pickles and not list(path.glob("*.safetensors")):
            _refuse_file(path / pickles[0])
        raise CheckpointError(f"{path}: no config.json (not a Hugging Face checkpoint directory, and no .gguf file)")
    try:
        raw = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{config_path} is not valid JSON: {e}") from e
    config = _normalize_config(raw, config_path)
    _merge_generation_eos(path, config)

    # Which tensor lives in which file: the index for sharded checkpoints, else the one file.
    index_path = path / INDEX_FILE
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index_path} is corrupt (no weight_map): {e}") from e
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise CheckpointError(f"{index_path} names missing shard file(s): {', '.join(missing)}")
    elif (path / SINGLE_FILE).is_file():
        shards, weight_map = [SINGLE_FILE], None
    else:
        if any(p.suffix in PICKLE_SUFFIXES for p in path.iterdir()):
            raise CheckpointError(
                f"{path}: holds only pickle weights (.bin/.pt); only safetensors and GGUF are supported"
            )
        raise CheckpointError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE}")

    tensors = {}
    with tqdm(total=len(weight_map) if weight_map else None, desc="Loading safetensors",
              unit="tensor", disable=not progress) as bar:
        for shard in shards:
            tensors.update(_read_safetensors(path / shard, bar))
    if weight_map:
        absent = sorted(set(weight_map) - set(tensors))
        if absent:
            raise CheckpointError(f"{index_path} lists tensors its shards lack: {', '.join(absent[:5])}")
    _check_tensors(config, tensors, path)
    return Checkpoint(config=config, tensors=tensors, source=str(path))


def _read_safetensors(file: Path, bar) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError, safe_open

    out = {}
    try:
        # safe_open checks the header against the file size, so truncation fails here, not later.
        with safe_open(str(file), framework="pt") as f:
            names = list(f.keys())
            if bar.total is None:  # a single file: its count is known only once it is open
                bar.total = len(names)
                bar.refresh()
            for name in names:
                out[name] = f.get_tensor(name)
                bar.update(1)
    except (SafetensorError, OSError, RuntimeError) as e:
        raise CheckpointError(f"{file} is not a valid safetensors file (corrupt or truncated?): {e}") from e
    return out


def _merge_generation_eos(path: Path, config: dict) -> None:
    # generation_config.json often lists more end tokens (e.g. end-of-turn) than config.json,
    # and it is what generation stops on.
    gen = path / "generation_config.json"
    if gen.is_file():
        try:
            eos = json.loads(gen.read_text()).get("eos_token_id")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            return
        if eos is not None:
            config["eos_token_id"] = eos


def _normalize_config(raw: dict, where) -> dict:
    """A Hugging Face config.json dict -> exactly the keys Checkpoint.config promises."""
    if not isinstance(raw, dict):
        raise CheckpointError(f"{where}: config is not a JSON object")
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(
            f"{where}: model_type {model_type!r} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    # Our model has no bias terms; a biased checkpoint would load and silently compute wrong.
    for key in ("attention_bias", "mlp_bias"):
        if raw.get(key):
            raise CheckpointError(f"{where}: {key}=true is not supported (the model has no bias terms)")
    missing = [k for k in REQUIRED_KEYS if raw.get(k) is None]
    if missing:
        raise CheckpointError(f"{where}: config is missing required key(s): {', '.join(missing)}")
    heads = raw["num_attention_heads"]
    # transformers >= 5 writes rope settings as one `rope_parameters` dict instead.
    rope = raw.get("rope_parameters") or {}
    rope_scaling = raw.get("rope_scaling")
    if rope_scaling is None and rope.get("rope_type", "default") != "default":
        rope_scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    return {
        "hidden_size": raw["hidden_size"],
        "intermediate_size": raw["intermediate_size"],
        "num_hidden_layers": raw["num_hidden_layers"],
        "num_attention_heads": heads,
        "num_key_value_heads": raw.get("num_key_value_heads") or heads,
        "head_dim": raw.get("head_dim") or raw["hidden_size"] // heads,
        "rms_norm_eps": raw["rms_norm_eps"],
        "rope_theta": raw.get("rope_theta") or rope.get("rope_theta") or 10000.0,
        "rope_scaling": rope_scaling,
        "max_position_embeddings": raw["max_position_embeddings"],
        "vocab_size": raw["vocab_size"],
        "tie_word_embeddings": bool(raw.get("tie_word_embeddings", False)),
        "bos_token_id": raw.get("bos_token_id"),
        "eos_token_id": raw.get("eos_token_id"),
    }


def _expected_shapes(c: dict) -> dict[str, tuple[int, ...]]:
    h, i, d, v = c["hidden_size"], c["intermediate_size"], c["head_dim"], c["vocab_size"]
    q, kv = c["num_attention_heads"] * d, c["num_key_value_heads"] * d
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    if not c["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (v, h)
    for n in range(c["num_hidden_layers"]):
        p = f"model.layers.{n}."
        shapes.update({
            p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i),
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
        })
    return shapes


def _check_tensors(config: dict, tensors: dict[str, torch.Tensor], where) -> None:
    """Fail here, naming the tensor, rather than with a shape error deep inside the model."""
    expected = _expected_shapes(config)
    missing = [n for n in expected if n not in tensors]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise CheckpointError(f"{where}: missing tensor(s) {', '.join(missing[:5])}{more}")
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise CheckpointError(f"{where}: tensor {name} has shape {tuple(tensors[name].shape)}, expected {shape}")
    # A tied checkpoint may still store lm_head (a copy of the embedding); drop it as promised.
    if config["tie_word_embeddings"]:
        tensors.pop("lm_head.weight", None)


# ---------------------------------------------------------------------------------------------
# GGUF

# GGUF tensor name -> Hugging Face name ({} is the layer index).
GGUF_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{}.attn_q.weight": "model.layers.{}.self_attn.q_proj.weight",
    "blk.{}.attn_k.weight": "model.layers.{}.self_attn.k_proj.weight",
    "blk.{}.attn_v.weight": "model.layers.{}.self_attn.v_proj.weight",
    "blk.{}.attn_output.weight": "model.layers.{}.self_attn.o_proj.weight",
    "blk.{}.ffn_gate.weight": "model.layers.{}.mlp.gate_proj.weight",
    "blk.{}.ffn_up.weight": "model.layers.{}.mlp.up_proj.weight",
    "blk.{}.ffn_down.weight": "model.layers.{}.mlp.down_proj.weight",
    "blk.{}.attn_norm.weight": "model.layers.{}.input_layernorm.weight",
    "blk.{}.ffn_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
}
_LAYER = re.compile(r"^blk\.(\d+)\.")


def _hf_name(gguf_name: str, file: Path) -> str:
    m = _LAYER.match(gguf_name)
    key = _LAYER.sub("blk.{}.", gguf_name) if m else gguf_name
    if key not in GGUF_NAMES:
        # e.g. rope_freqs.weight (Llama 3 rope scaling) or biases: ignoring them would give a
        # model that loads but computes something else.
        raise CheckpointError(f"{file}: unsupported GGUF tensor {gguf_name!r}")
    return GGUF_NAMES[key].format(m.group(1)) if m else GGUF_NAMES[key]


def _unpermute_rope(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation.

    Hugging Face Llama rotates pairs (j, j + head_dim/2) of each head ("rotate_half");
    llama.cpp rotates adjacent pairs (2j, 2j + 1), so its converter reorders each head's rows
    from [x_0..x_{d/2-1}, y_0..y_{d/2-1}] to [x_0, y_0, x_1, y_1, ...]: GGUF row (h, j, t)
    holds Hugging Face row (h, t, j). Reading the rows as (head, d/2, 2) and swapping the last
    two axes restores Hugging Face order.
    """
    rows, cols = w.shape
    return w.reshape(n_head, rows // n_head // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def _read_gguf(file: Path, progress: bool) -> Checkpoint:
    import gguf

    try:
        reader = gguf.GGUFReader(str(file))
    except Exception as e:  # the reader raises ValueError, struct/IndexError, ... on bad input
        raise CheckpointError(f"{file} is not a valid GGUF file (bad magic or truncated?): {e}") from e

    def meta(key, default=None):
        field = reader.fields.get(key)
        return default if field is None else field.contents()

    if (meta("split.count") or meta("general.split_count") or 1) > 1:
        raise CheckpointError(f"{file}: split GGUF files are not supported; merge them with llama-gguf-split")
    arch = meta("general.architecture")
    if arch != "llama":
        raise CheckpointError(f"{file}: GGUF architecture {arch!r} is not supported (only 'llama')")

    config = _gguf_config(meta, reader, file)
    n_heads = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}
    tensors = {}
    for t in tqdm(reader.tensors, desc="Dequantizing GGUF", unit="tensor", disable=not progress):
        name = _hf_name(t.name, file)
        try:
            data = gguf.quants.dequantize(t.data, t.tensor_type)
        except (NotImplementedError, ValueError) as e:
            raise CheckpointError(f"{file}: cannot dequantize {t.name} ({t.tensor_type.name}): {e}") from e
        # GGUF lists dimensions innermost first; reversed they are PyTorch's [rows, cols].
        shape = tuple(int(n) for n in reversed(t.shape.tolist()))
        w = torch.from_numpy(np.array(data, dtype=np.float32).reshape(shape))  # np.array copies off the mmap
        proj = name.split(".")[-2]
        if proj in n_heads:
            w = _unpermute_rope(w, n_heads[proj])
        tensors[name] = w
    # llama.cpp omits output.weight when the head shares the embedding.
    config["tie_word_embeddings"] = "lm_head.weight" not in tensors
    _check_tensors(config, tensors, file)
    return Checkpoint(config=config, tensors=tensors, source=str(file))


def _gguf_config(meta, reader, file: Path) -> dict:
    p = "llama."
    required = {
        "hidden_size": p + "embedding_length", "intermediate_size": p + "feed_forward_length",
        "num_hidden_layers": p + "block_count", "num_attention_heads": p + "attention.head_count",
        "rms_norm_eps": p + "attention.layer_norm_rms_epsilon", "max_position_embeddings": p + "context_length",
    }
    values = {k: meta(key) for k, key in required.items()}
    missing = [required[k] for k, v in values.items() if v is None]
    if missing:
        raise CheckpointError(f"{file}: GGUF metadata is missing {', '.join(missing)}")
    heads = values["num_attention_heads"]
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = meta(p + "vocab_size") or (len(tokens.data) if tokens is not None else None)
    if vocab is None:
        embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
        vocab = int(embd.shape[-1]) if embd is not None else None
    scaling = None
    kind = meta(p + "rope.scaling.type")
    if kind not in (None, "none"):
        scaling = {"rope_type": kind, "factor": meta(p + "rope.scaling.factor")}
        if meta(p + "rope.scaling.original_context_length"):
            scaling["original_max_position_embeddings"] = meta(p + "rope.scaling.original_context_length")
    return {
        **values,
        "num_key_value_heads": meta(p + "attention.head_count_kv") or heads,
        "head_dim": meta(p + "attention.key_length") or values["hidden_size"] // heads,
        "rope_theta": meta(p + "rope.freq_base") or 10000.0,
        "rope_scaling": scaling,
        "vocab_size": vocab,
        "tie_word_embeddings": False,  # set from the tensors by the caller
        "bos_token_id": meta("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta("tokenizer.ggml.eos_token_id"),
    }
