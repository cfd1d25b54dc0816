"""Checkpoint reading: Hugging Face safetensors directories and GGUF files.

The oracle for GGUF is transformers' own GGUF loader on the real default model (slow tests,
loaded once per module). Everything else uses small random checkpoints written here.
"""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from trtllm_kernels.engine.checkpoint import CheckpointError, read_checkpoint, save_tokenizer

CONFIG = {
    "model_type": "llama", "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 4, "rms_norm_eps": 1e-6,
    "rope_theta": 500000.0, "max_position_embeddings": 64, "vocab_size": 40,
    "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": [2, 3],
}


def random_tensors(config, dtype=torch.float32):
    h, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    d = config.get("head_dim") or h // config["num_attention_heads"]
    q = config["num_attention_heads"] * d
    kv = config.get("num_key_value_heads", config["num_attention_heads"]) * d
    t = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    if not config.get("tie_word_embeddings"):
        t["lm_head.weight"] = (v, h)
    for n in range(config["num_hidden_layers"]):
        p = f"model.layers.{n}."
        t.update({
            p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i),
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
        })
    return {k: torch.randn(s).to(dtype) for k, s in t.items()}


def write_hf_dir(path, config, tensors, shards=1):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    if shards == 1:
        save_file(tensors, path / "model.safetensors")
        return path
    names = sorted(tensors)
    weight_map = {}
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = names[s::shards]
        save_file({n: tensors[n] for n in part}, path / file)
        weight_map.update({n: file for n in part})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


# ---------------------------------------------------------------------------------------------
# Hugging Face directories

@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("shards", [1, 3])
def test_hf_dir_round_trip(tmp_path, tied, shards):
    config = {**CONFIG, "tie_word_embeddings": tied}
    tensors = random_tensors(config, torch.bfloat16)
    ckpt = read_checkpoint(write_hf_dir(tmp_path / "m", config, tensors, shards), progress=False)
    assert ckpt.source == str(tmp_path / "m")
    assert set(ckpt.tensors) == set(tensors)
    assert ("lm_head.weight" in ckpt.tensors) == (not tied)
    for name, t in tensors.items():
        assert ckpt.tensors[name].dtype == torch.bfloat16  # stored precision is kept
        assert torch.equal(ckpt.tensors[name], t), name
    assert ckpt.config == {k: v for k, v in config.items() if k != "model_type"} | {"rope_scaling": None}


def test_hf_dir_tied_with_stored_lm_head_drops_it(tmp_path):
    config = {**CONFIG, "tie_word_embeddings": True}
    tensors = random_tensors(config)
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    ckpt = read_checkpoint(write_hf_dir(tmp_path, config, tensors), progress=False)
    assert "lm_head.weight" not in ckpt.tensors


def test_hf_config_defaults(tmp_path):
    config = {k: v for k, v in CONFIG.items()
              if k not in ("head_dim", "num_key_value_heads", "rope_theta", "tie_word_embeddings")}
    config["model_type"] = "mistral"
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    ckpt = read_checkpoint(write_hf_dir(tmp_path, config, random_tensors(config)), progress=False)
    c = ckpt.config
    assert (c["head_dim"], c["num_key_value_heads"], c["rope_theta"]) == (4, 4, 10000.0)
    assert c["rope_scaling"] is None and c["tie_word_embeddings"] is False
    assert c["eos_token_id"] == [2, 7]  # generation_config.json wins: it is what generation stops on


def test_hf_config_rope_parameters(tmp_path):
    # transformers >= 5 writes rope settings as one dict
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0}
    config = {k: v for k, v in CONFIG.items() if k != "rope_theta"} | {"rope_parameters": rope}
    ckpt = read_checkpoint(write_hf_dir(tmp_path, config, random_tensors(config)), progress=False)
    assert ckpt.config["rope_theta"] == 500000.0
    assert ckpt.config["rope_scaling"] == {"rope_type": "llama3", "factor": 8.0}


@pytest.mark.slow
def test_hf_dir_saved_by_transformers(tmp_path):
    """A directory written by transformers' save_pretrained reads back to its state_dict."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_config = LlamaConfig(**{k: v for k, v in CONFIG.items() if k != "model_type"})
    model = LlamaForCausalLM(hf_config)
    model.save_pretrained(tmp_path)
    ckpt = read_checkpoint(tmp_path, progress=False)
    sd = model.state_dict()
    assert set(ckpt.tensors) == set(sd)
    for name, t in sd.items():
        assert torch.equal(ckpt.tensors[name], t), name
    for key in ("hidden_size", "num_key_value_heads", "head_dim", "rope_theta", "vocab_size"):
        assert ckpt.config[key] == CONFIG[key], key


# ---------------------------------------------------------------------------------------------
# GGUF written here (fast): name mapping, metadata, q/k permutation, tied head

def llama_cpp_permute(w, n_head):
    """What llama.cpp's converter does to q/k rows (HF rotate-half -> interleaved pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, config, tensors):
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(config["num_hidden_layers"])
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(config["num_attention_heads"])
    w.add_head_count_kv(config["num_key_value_heads"])
    w.add_rope_freq_base(config["rope_theta"])
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    w.add_vocab_size(config["vocab_size"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    names = {"embed_tokens": "token_embd", "norm": "output_norm", "q_proj": "attn_q", "k_proj": "attn_k",
             "v_proj": "attn_v", "o_proj": "attn_output", "gate_proj": "ffn_gate", "up_proj": "ffn_up",
             "down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for name, t in tensors.items():
        a = t.numpy()
        if name == "lm_head.weight":
            g = "output"
        else:
            parts = name.split(".")
            g = names[parts[-2]] if len(parts) == 3 else f"blk.{parts[2]}.{names[parts[-2]]}"
            if parts[-2] in ("q_proj", "k_proj"):
                a = llama_cpp_permute(a, config["num_attention_heads" if parts[-2] == "q_proj" else "num_key_value_heads"])
        w.add_tensor(g + ".weight", np.ascontiguousarray(a))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("tied", [False, True])
def test_gguf_written_here(tmp_path, tied):
    config = {**CONFIG, "tie_word_embeddings": tied, "rms_norm_eps": 0.5, "eos_token_id": 2}
    tensors = random_tensors(config)
    write_gguf(tmp_path / "m.gguf", config, tensors)
    for path in (tmp_path / "m.gguf", tmp_path):  # the file, or a directory holding just it
        ckpt = read_checkpoint(path, progress=False)
        assert ckpt.source == str(tmp_path / "m.gguf")
        assert set(ckpt.tensors) == set(tensors)
        for name, t in tensors.items():
            assert torch.equal(ckpt.tensors[name], t), name
        assert ckpt.config == {k: v for k, v in config.items() if k != "model_type"} | {"rope_scaling": None}


# ---------------------------------------------------------------------------------------------
# The real default model against transformers' GGUF loader

@pytest.fixture(scope="module")
def default_gguf():
    from trtllm_kernels.engine.default_model import default_checkpoint

    try:
        return default_checkpoint()
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def hf_reference(default_gguf):
    """transformers' state_dict and config from the same GGUF file (loaded once, ~10-30 s)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(default_gguf.parent), gguf_file=default_gguf.name)
    return model.state_dict(), model.config


@pytest.mark.slow
def test_gguf_matches_transformers(default_gguf, hf_reference):
    sd, hf_config = hf_reference
    ckpt = read_checkpoint(default_gguf, progress=False)
    # transformers lists the tied head as its own (shared) parameter; we leave it out.
    assert hf_config.tie_word_embeddings and ckpt.config["tie_word_embeddings"]
    assert set(sd) - {"lm_head.weight"} == set(ckpt.tensors)
    for name, t in ckpt.tensors.items():
        assert t.dtype == torch.float32
        assert torch.equal(t, sd[name]), name  # exact: same dequantization, q/k rows unpermuted

    c = ckpt.config
    rope_theta = getattr(hf_config, "rope_theta", None) or hf_config.rope_parameters["rope_theta"]
    assert c["rope_theta"] == rope_theta == 100000.0
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings",
                "vocab_size", "bos_token_id", "eos_token_id"):
        assert c[key] == getattr(hf_config, key), key
    assert (c["num_hidden_layers"], c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"],
            c["head_dim"], c["vocab_size"]) == (30, 576, 9, 3, 64, 49152)
    assert c["rope_scaling"] is None


@pytest.mark.slow
def test_save_tokenizer_from_gguf(default_gguf, tmp_path):
    from transformers import AutoTokenizer

    save_tokenizer(default_gguf, tmp_path / "tok")
    saved = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in saved["chat_template"]  # kept in tokenizer_config.json itself
    assert (tmp_path / "tok" / "tokenizer.json").is_file()

    original = AutoTokenizer.from_pretrained(str(default_gguf.parent), gguf_file=default_gguf.name)
    tok = AutoTokenizer.from_pretrained(tmp_path / "tok")
    text = "What is the capital of France?"
    assert tok.encode(text) == original.encode(text)
    assert (tok.eos_token, tok.eos_token_id) == ("<|im_end|>", 2)
    messages = [{"role": "user", "content": text}]
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == original.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\n" + text + "<|im_end|>\n<|im_start|>assistant\n")

    # and from a Hugging Face directory (the files just written)
    save_tokenizer(tmp_path / "tok", tmp_path / "tok2")
    again = AutoTokenizer.from_pretrained(tmp_path / "tok2")
    assert again.encode(text) == tok.encode(text) and again.chat_template == tok.chat_template
    assert again.eos_token == "<|im_end|>"


# ---------------------------------------------------------------------------------------------
# Bad input: CheckpointError naming the file and the problem

def expect_error(path, *fragments):
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(path, progress=False)
    for fragment in fragments:
        assert fragment in str(e.value), str(e.value)
    return e.value


def test_missing_path(tmp_path):
    expect_error(tmp_path / "nope", "does not exist", "nope")


def test_dir_without_config(tmp_path):
    save_file(random_tensors(CONFIG), tmp_path / "model.safetensors")
    expect_error(tmp_path, "no config.json", str(tmp_path))


def test_truncated_safetensors(tmp_path):
    write_hf_dir(tmp_path, CONFIG, random_tensors(CONFIG))
    file = tmp_path / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-100])
    expect_error(tmp_path, "model.safetensors", "not a valid safetensors file")


def test_garbage_safetensors(tmp_path):
    write_hf_dir(tmp_path, CONFIG, random_tensors(CONFIG))
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 64)
    expect_error(tmp_path, "model.safetensors", "not a valid safetensors file")


def test_index_names_missing_shard(tmp_path):
    write_hf_dir(tmp_path, CONFIG, random_tensors(CONFIG), shards=2)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    expect_error(tmp_path, "model.safetensors.index.json", "missing shard", "model-00002-of-00002.safetensors")


def test_missing_tensor(tmp_path):
    tensors = random_tensors(CONFIG)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    expect_error(write_hf_dir(tmp_path, CONFIG, tensors), "missing tensor", "model.layers.1.mlp.up_proj.weight")


def test_wrong_shape(tmp_path):
    tensors = random_tensors(CONFIG)
    tensors["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(16, 16)
    expect_error(write_hf_dir(tmp_path, CONFIG, tensors), "model.layers.0.self_attn.k_proj.weight", "shape")


def test_pickle_refused(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"not even read")
    expect_error(tmp_path / "pytorch_model.bin", "pytorch_model.bin", "only safetensors and GGUF")
    (tmp_path / "config.json").write_text(json.dumps(CONFIG))  # a HF dir with only .bin weights
    expect_error(tmp_path, "only safetensors and GGUF")


@pytest.mark.parametrize("content", [b"", b"this is not a gguf file at all" * 10, b"GGUF\x03\x00\x00\x00\x01"])
def test_garbage_gguf(tmp_path, content):
    (tmp_path / "bad.gguf").write_bytes(content)
    expect_error(tmp_path / "bad.gguf", "bad.gguf", "not a valid GGUF file")


def test_truncated_gguf(tmp_path):
    write_gguf(tmp_path / "m.gguf", CONFIG, random_tensors(CONFIG))
    data = (tmp_path / "m.gguf").read_bytes()
    (tmp_path / "m.gguf").write_bytes(data[: len(data) - 200])
    expect_error(tmp_path / "m.gguf", "m.gguf", "not a valid GGUF file")


def test_dir_with_two_ggufs(tmp_path):
    (tmp_path / "a.gguf").write_bytes(b"")
    (tmp_path / "b.gguf").write_bytes(b"")
    expect_error(tmp_path, "a.gguf", "b.gguf")


def test_unsupported_model_type(tmp_path):
    config = {**CONFIG, "model_type": "gpt2"}
    expect_error(write_hf_dir(tmp_path, config, random_tensors(CONFIG)), "config.json", "'gpt2'", "not supported")


def test_bias_refused(tmp_path):
    config = {**CONFIG, "attention_bias": True}
    expect_error(write_hf_dir(tmp_path, config, random_tensors(CONFIG)), "attention_bias")


def test_config_missing_keys(tmp_path):
    config = {k: v for k, v in CONFIG.items() if k not in ("vocab_size", "rms_norm_eps")}
    expect_error(write_hf_dir(tmp_path, config, random_tensors(CONFIG)), "config.json", "vocab_size", "rms_norm_eps")


def test_config_not_json(tmp_path):
    write_hf_dir(tmp_path, CONFIG, random_tensors(CONFIG))
    (tmp_path / "config.json").write_text("{")
    expect_error(tmp_path, "config.json", "not valid JSON")


def test_save_tokenizer_without_tokenizer(tmp_path):
    write_hf_dir(tmp_path, CONFIG, random_tensors(CONFIG))
    with pytest.raises(CheckpointError, match="no tokenizer files"):
        save_tokenizer(tmp_path, tmp_path / "out")
