"""The Hugging Face QLoRA anchor for every shape `./qlora --model random:NAME` knows (issue 13).

The method of ../shared/bench/hf_qlora.py (which is Llama-only and read-only), extended to the Qwen
shapes: a randomly initialised model of the named shape (seed 0, made on the GPU in bf16), every
nn.Linear but lm_head replaced by a bitsandbytes Linear4bit (NF4, double quant, bf16 compute) that
keeps the Linear's bias (Qwen2's q/k/v), LoRA r / alpha 2r on all linear layers (peft
"all-linear"), `--upcast 1` = peft's prepare_model_for_kbit_training (fp32 norms, embeddings and
head, the usual recipe) or `--upcast 0` = everything kept in bf16, `--ckpt` = gradient
checkpointing, random tokens (seed 1) with labels = ids, torch AdamW, the median step after
`--warmup` steps. Prints one JSON line, the fields of hf_qlora.py's plus arch and
flops_per_token; peak_gib is torch.cuda.max_memory_allocated. On an exception the line carries
"error" (prefixed "OOM: " for an out-of-memory) and the exit code is 1.

Model FLOPs are counted as qlora.cu's flops_per_token counts them (and hf_qlora.py): forward 2N
plus input gradient 2N over the quantized linears and the head (N = their weights; biases,
norms and the QK-norm are not counted), plus causal attention forward and backward."""
import argparse, json, statistics, sys, time, traceback
import torch

# the shapes of qlora.cu's random_config (dim, hidden, layers, heads, kv heads, head_dim, vocab, tied);
# the llama ones are hf_qlora.py's SHAPES, number for number
SHAPES = {
    "llama-1b": dict(arch="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                     vocab_size=128256, tie_word_embeddings=True),
    "llama-3b": dict(arch="llama", hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                     num_attention_heads=24, num_key_value_heads=8, head_dim=128,
                     vocab_size=128256, tie_word_embeddings=True),
    "llama-8b": dict(arch="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                     vocab_size=128256, tie_word_embeddings=False),
    # Qwen2ForCausalLM: q/k/v carry a bias, head_dim = hidden / heads (Qwen2Config has no head_dim)
    "qwen2.5-7b": dict(arch="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, head_dim=128,
                       vocab_size=152064, tie_word_embeddings=False),
    # Qwen3ForCausalLM: RMSNorm on each head of q and k, no biases
    "qwen3-8b": dict(arch="qwen3", hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                     vocab_size=151936, tie_word_embeddings=False),
    # tests only (seconds, `--device cpu` too): not anchor shapes
    "llama-tiny": dict(arch="llama", hidden_size=256, intermediate_size=768, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                       vocab_size=4096, tie_word_embeddings=True),
    "qwen2-tiny": dict(arch="qwen2", hidden_size=256, intermediate_size=768, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                       vocab_size=4096, tie_word_embeddings=False),
    "qwen3-tiny": dict(arch="qwen3", hidden_size=256, intermediate_size=768, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                       vocab_size=4096, tie_word_embeddings=False),
}
ALIASES = {"llama3-1b": "llama-1b", "llama3-3b": "llama-3b", "llama3-8b": "llama-8b"}  # qlora's names
EXTRA = {  # rope theta and norm eps as qlora.cu's random_config sets them
    "llama": dict(rope_theta=500000.0, max_position_embeddings=8192, rms_norm_eps=1e-5),
    "qwen2": dict(rope_theta=1e6, max_position_embeddings=32768, rms_norm_eps=1e-6),
    "qwen3": dict(rope_theta=1e6, max_position_embeddings=40960, rms_norm_eps=1e-6),
}


def flops_per_token(s, seq):
    """qlora.cu's flops_per_token: 4 (linears + head) + 3 causal attention, per token."""
    h, i, L, nh, kv, hd, V = (s[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                              "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size"))
    per_layer = h * nh * hd + 2 * h * kv * hd + nh * hd * h + 3 * h * i  # q, k+v, o, gate+up+down
    attn = 4 * seq * nh * hd * L / 2
    return 4 * (L * per_layer + h * V) + 3 * attn


def build(s, device):
    """The random-init bf16 model of shape s, seed 0, made directly on `device`."""
    import transformers as tf
    arch = s["arch"]
    kw = {k: v for k, v in s.items() if k != "arch"}
    if arch == "qwen2":  # head_dim is implied; check it rather than pass a field the config lacks
        assert kw["hidden_size"] // kw["num_attention_heads"] == kw.pop("head_dim")
    Config, Model = {"llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
                     "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
                     "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM)}[arch]
    cfg = Config(**kw, **EXTRA[arch])
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = Model(cfg)
    finally:
        torch.set_default_dtype(torch.float32)
    try:
        model.config._attn_implementation = "sdpa"
    except Exception:
        pass
    return model


def quantize(model, device):
    """Every nn.Linear but lm_head -> bnb Linear4bit NF4 double quant, bf16 compute, bias kept.
    Returns the number of layers swapped and how many of them carry a bias."""
    import bitsandbytes as bnb
    n = nb = 0
    for _, mod in list(model.named_modules()):
        for cname, child in list(mod.named_children()):
            if not isinstance(child, torch.nn.Linear) or cname == "lm_head":
                continue
            has_bias = child.bias is not None
            q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=has_bias,
                                  compute_dtype=torch.bfloat16, compress_statistics=True,
                                  quant_type="nf4", device="meta")
            q.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, compress_statistics=True,
                                         quant_type="nf4", module=q).to(device)
            if has_bias:  # the bf16 bias as it is (the swap would otherwise leave a meta tensor)
                q.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
                nb += 1
            setattr(mod, cname, q)
            n += 1
    model.is_loaded_in_4bit = True
    model.config.quantization_config = None
    return n, nb


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama-1b", choices=list(SHAPES) + list(ALIASES))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--ckpt", type=int, default=1, help="gradient checkpointing")
    ap.add_argument("--quant", default="nf4", choices=["nf4", "none"])
    ap.add_argument("--upcast", type=int, default=1,
                    help="1: peft prepare_model_for_kbit_training (fp32 norms/embeddings/head, the usual recipe); 0: keep bf16")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # cpu: a test of the code path only
    a = ap.parse_args()
    shape = ALIASES.get(a.shape, a.shape)
    s = SHAPES[shape]
    cuda = a.device.startswith("cuda")
    res = dict(system="hf-peft-bnb", shape=shape, arch=s["arch"], quant=a.quant, upcast=a.upcast, batch=a.batch,
               seq=a.seq, rank=a.rank, ckpt=a.ckpt)
    try:
        run(a, s, cuda, res)
    except BaseException as e:  # one JSON line whatever happens
        msg = f"{type(e).__name__}: {e}"
        if type(e).__name__ == "OutOfMemoryError" or "out of memory" in str(e).lower():
            msg = "OOM: " + msg
        res["error"] = msg[:1000]
        if cuda and torch.cuda.is_available():
            res["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        traceback.print_exc(file=sys.stderr)
        print(json.dumps(res), flush=True)
        sys.exit(1)
    print(json.dumps(res), flush=True)


def run(a, s, cuda, res):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    model = build(s, a.device)
    if a.quant == "nf4":
        res["linear4bit"], res["biases"] = quantize(model, a.device)
        if cuda:
            torch.cuda.empty_cache()
        if a.upcast:
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=bool(a.ckpt))
        elif a.ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
    elif a.ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    lcfg = LoraConfig(r=a.rank, lora_alpha=2 * a.rank, lora_dropout=0.0, bias="none",
                      target_modules="all-linear", task_type="CAUSAL_LM")
    model = get_peft_model(model, lcfg)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    g = torch.Generator(device=a.device).manual_seed(1)
    times, losses = [], []
    for step in range(a.warmup + a.steps):
        ids = torch.randint(0, s["vocab_size"], (a.batch, a.seq), device=a.device, generator=g)
        sync(); t0 = time.perf_counter()
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step(); opt.zero_grad(set_to_none=True)
        sync(); t1 = time.perf_counter()
        losses.append(out.loss.item())
        if step >= a.warmup:
            times.append(t1 - t0)
    med = statistics.median(times)
    tok = a.batch * a.seq
    fpt = flops_per_token(s, a.seq)
    res.update(trainable=trainable, step_s=round(med, 4), step_s_min=round(min(times), 4),
               tok_s=round(tok / med, 1), tflops=round(tok * fpt / med / 1e12, 1), flops_per_token=fpt,
               peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else 0.0,
               loss_first=round(losses[0], 3), loss_last=round(losses[-1], 3),
               attn=getattr(model.config, "_attn_implementation", "?"),
               gpu=torch.cuda.get_device_name() if cuda else "cpu")


if __name__ == "__main__":
    main()
