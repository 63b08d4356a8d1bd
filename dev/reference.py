"""The PyTorch reference: writes the debug states that qlora's C/CUDA tests diff against.

Needs a CUDA GPU with torch, transformers, peft and bitsandbytes (bitsandbytes quantizes on the GPU).

    python dev/reference.py --out test/ref                          # every variant
    python dev/reference.py --out test/ref --variants qwen2,qwen3   # only these
    python dev/reference.py --out /tmp/ref --device cpu             # no GPU: to look at, never to commit

--device cpu runs the same script on bitsandbytes' CPU kernels: its quantization is not the GPU's (no
rcp.approx: some nested absmax codes differ, torch_nf4_mismatches says which) and a CPU bf16 run is
not the GPU's, so the committed states come from the GPU.

For each variant (a small random model; all use GQA):
  tied    llama  H 128, I 256, L 2, nh 2, nkv 1, hd 64, V 512, tie_word_embeddings, default RoPE
  untied  llama  H 128, I 320, L 2, nh 4, nkv 2, hd 64 (nh*hd != H), V 384, llama3 RoPE scaling
  qwen2   qwen2  H 256, I 384, L 2, nh 4, nkv 2, hd 64, V 448, tied, theta 1e6: biases on q/k/v (none on o)
  qwen3   qwen3  H 128, I 320, L 2, nh 4, nkv 2, hd 64 (nh*hd != H), V 384, untied, theta 1e6: q_norm/k_norm
                 (RMSNorm over each head of q and k, before RoPE), no biases
transformers initialises biases to 0 and norm weights to 1; the qwen variants draw every bias and norm
weight at random instead, so that a bias or a norm weight used wrongly (or not at all) shows.
it writes test/ref/<variant>/:
  config.json, model.safetensors   the Hugging Face checkpoint (bf16, save_pretrained)
  quant.safetensors                 bitsandbytes' NF4 + double-quant tensors of every decoder linear:
                                    q.{l}.{proj}.packed/absmax_q/absmax2/offset/absmax/deq
  debug_fp32.safetensors            fp32 compute: inputs, targets, lora.{l}.{proj}.A/B (initial),
  debug_bf16.safetensors            logits, loss, grad.{l}.{proj}.A/B, losses (N AdamW steps),
  debug_bf16_sdpa.safetensors       grad_norms; hyper-parameters in __metadata__
The bf16 runs keep the model in bf16, LoRA master weights in fp32 and run under torch.autocast(bf16):
the regime qlora's GPU trainer implements. fp32 and bf16 use eager attention (softmax(q·kᵀ)·v, the
spec); bf16_sdpa is the same bf16 run with transformers' default attention, SDPA, which on the GPU is
a flash-attention kernel. Its backward forms dS = P∘(dP − D) with D = rowsum(dO∘O) from the bf16 O,
as qlora's attention does; eager sums P·dP instead. Σⱼ dSⱼ = 0 only in exact arithmetic, and the rest
(δD·Σⱼ Pⱼkⱼ) grows with q/k biases: in qwen2, layer 1's q_proj/k_proj gradients get about twice
eager's bf16 error from it (PyTorch's own SDPA on the CPU: grad 1.q_proj.A 2.85% of its scale vs
eager's 1.09%). So the GPU test's yardstick is the worse of the two bf16 runs. A pure-PyTorch NF4 quantizer (IEEE reciprocal, the kernel
thresholds) is checked against bitsandbytes on every weight; the result goes in the metadata.
"""
import argparse, json, os, re
import torch
from safetensors.torch import save_file

VARIANTS = {  # name -> (model_type, config keyword arguments)
    "tied": ("llama", dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=64, vocab_size=512, tie_word_embeddings=True,
                 rope_theta=10000.0, rms_norm_eps=1e-5, max_position_embeddings=256)),
    "untied": ("llama", dict(hidden_size=128, intermediate_size=320, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=64, vocab_size=384, tie_word_embeddings=False,
                   rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=256,
                   rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                     high_freq_factor=4.0, original_max_position_embeddings=64))),
    "qwen2": ("qwen2", dict(hidden_size=256, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=448, tie_word_embeddings=True, rope_theta=1000000.0,
                            rms_norm_eps=1e-6, max_position_embeddings=256)),
    "qwen3": ("qwen3", dict(hidden_size=128, intermediate_size=320, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=64, vocab_size=384, tie_word_embeddings=False,
                            attention_bias=False, rope_theta=1000000.0, rms_norm_eps=1e-6, max_position_embeddings=256)),
}
CLASSES = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
           "qwen3": ("Qwen3Config", "Qwen3ForCausalLM")}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
HP = dict(rank=4, alpha=8, lr=5e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, clip=1.0, steps=8,
          batch=2, seq=32, seed=1234)
DEVICE = "cuda"   # --device
NAME_RE = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+_proj)\.lora_([AB])")

# ---- pure-PyTorch NF4 (nf4.md §8.2): IEEE 1/absmax is exact for NF4 from bf16/fp16 weights ----
NF4_T = [0xbf591cd9, 0xbf1c5270, 0xbeeb8480, 0xbeadea76, 0xbe703cec, 0xbe0d38bc, 0xbd3a7871, 0x3d22faff,
         0x3df64863, 0x3e5067e0, 0x3e9582d4, 0x3ec753f9, 0x3f006d03, 0x3f248daf, 0x3f5c89d9]
NF4_LUT = [0xbf800000, 0xbf3239b1, 0xbf066b30, 0xbeca32a0, 0xbe91a24d, 0xbe3d353f, 0xbdba7871, 0x00000000,
           0x3da2faff, 0x3e24cae3, 0x3e7c04dd, 0x3ead033a, 0x3ee1a4b8, 0x3f1007ab, 0x3f3913b3, 0x3f800000]

def from_bits(bits):
    return torch.tensor(bits, dtype=torch.int64).to(torch.int32).view(torch.float32)

def torch_nf4(w, bs=64):
    x = w.float().reshape(-1)
    n = x.numel()
    x = torch.cat([x, x.new_zeros((-n) % bs)]).reshape(-1, bs)
    x = torch.where(x.abs() < 2.0 ** -126, torch.zeros_like(x), x)
    absmax = torch.nan_to_num(x.abs(), nan=-3.4028235e38).amax(1)
    y = x * torch.reciprocal(absmax)[:, None]
    codes = torch.searchsorted(from_bits(NF4_T).to(x.device), y.contiguous(), side="left").reshape(-1)
    codes = torch.where(torch.isnan(y.reshape(-1)), torch.zeros_like(codes), codes)[: n + n % 2].to(torch.uint8)
    packed = (codes[0::2] << 4) | codes[1::2]
    return packed, absmax

def torch_dq(absmax, offset, code):
    c = absmax - offset
    nb = c.numel()
    cp = torch.cat([c, c.new_zeros((-nb) % 256)]).reshape(-1, 256)
    a2 = cp.abs().amax(1)
    y = (cp * torch.reciprocal(a2)[:, None]).reshape(-1)[:nb]
    mid = (code[:-1] + code[1:]) * 0.5
    idx = torch.searchsorted(mid, y.contiguous(), side="left")
    tie = (idx < 255) & (mid[idx.clamp(max=254)] == y)
    idx = torch.where(tie & (idx % 2 == 1), idx + 1, idx)
    return idx.to(torch.uint8), a2

def build_checkpoint(dirname, model_type, spec):
    import transformers
    config_cls, model_cls = (getattr(transformers, n) for n in CLASSES[model_type])
    torch.manual_seed(HP["seed"])
    cfg = config_cls(**spec)
    model = model_cls(cfg)
    if model_type != "llama":   # random biases (about as large as x.W^T) and norm weights in [0.5, 1.5)
        g = torch.Generator().manual_seed(HP["seed"] + 3)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(".bias"):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
                elif p.ndim == 1:
                    p.copy_(0.5 + torch.rand(p.shape, generator=g))
    model.to(torch.bfloat16).save_pretrained(dirname)

def load_quantized(dirname, dtype, attn="eager"):
    """The checkpoint with every decoder linear replaced by bnb Linear4bit (NF4, double quant); a bias
    (qwen2's q/k/v) stays as stored, unquantized, as transformers' bitsandbytes loading keeps it."""
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(dirname, dtype=dtype, attn_implementation=attn).to(DEVICE)
    for _, mod in list(model.named_modules()):
        for cname, child in list(mod.named_children()):
            if isinstance(child, torch.nn.Linear) and cname in TARGETS:
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=dtype, compress_statistics=True, quant_type="nf4", device="meta")
                q.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, compress_statistics=True,
                                             quant_type="nf4", module=q).to(DEVICE)
                if child.bias is not None:
                    q.bias = torch.nn.Parameter(child.bias.data.clone(), requires_grad=False)
                setattr(mod, cname, q)
    model.is_loaded_in_4bit = True
    model.config.quantization_config = None
    return model

def lora_key(name):
    m = NAME_RE.search(name)
    return f"{m.group(1)}.{m.group(2)}.{m.group(3)}" if m else None

def run(dirname, dtype, init, inputs, labels, attn="eager"):
    """One compute regime: forward, backward, N AdamW steps. Returns the debug tensors."""
    from peft import LoraConfig, get_peft_model
    model = load_quantized(dirname, dtype, attn)
    lcfg = LoraConfig(r=HP["rank"], lora_alpha=HP["alpha"], lora_dropout=0.0, bias="none",
                      target_modules=TARGETS, task_type="CAUSAL_LM")
    model = get_peft_model(model, lcfg)
    params = {lora_key(n): p for n, p in model.named_parameters() if p.requires_grad}
    assert all(k is not None for k in params) and len(params) == 2 * 7 * model.config.num_hidden_layers
    g = torch.Generator().manual_seed(HP["seed"] + 1)
    with torch.no_grad():
        for k, p in sorted(params.items()):
            if init is not None:
                p.copy_(init[k])
            elif k.endswith("B"):   # PEFT inits B = 0; make it nonzero so every gradient is nonzero
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    init_out = {k: p.detach().float().cpu().clone() for k, p in params.items()}
    plist = [params[k] for k in sorted(params)]
    opt = torch.optim.AdamW(plist, lr=HP["lr"], betas=(HP["beta1"], HP["beta2"]), eps=HP["eps"],
                            weight_decay=HP["weight_decay"], foreach=False)
    model.train()
    losses, norms, out = [], [], {}
    for step in range(HP["steps"]):
        opt.zero_grad(set_to_none=True)
        with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            res = model(input_ids=inputs, labels=labels)
        res.loss.backward()
        if step == 0:
            out["logits"] = res.logits.detach().float().cpu().contiguous()
            out["loss"] = res.loss.detach().float().reshape(1).cpu()
            for k, p in params.items():
                out["grad." + k] = p.grad.detach().float().cpu().contiguous()
        norms.append(torch.nn.utils.clip_grad_norm_(plist, HP["clip"], foreach=False).item())
        losses.append(res.loss.item())
        opt.step()
    out["losses"] = torch.tensor(losses, dtype=torch.float32)
    out["grad_norms"] = torch.tensor(norms, dtype=torch.float32)
    out.update({"lora." + k: v for k, v in init_out.items()})
    return out, init_out, model

def quant_tensors(model):
    """bitsandbytes' tensors of every decoder linear (NF4, blocksize 64, double quant)."""
    import bitsandbytes.functional as F
    out = {}
    for name, mod in model.named_modules():
        m = re.search(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+_proj)$", name)
        if not m or not hasattr(mod, "weight") or not hasattr(mod.weight, "quant_state"):
            continue
        key = f"q.{m.group(1)}.{m.group(2)}"
        w, st = mod.weight, mod.weight.quant_state
        out[key + ".packed"] = w.data.reshape(-1).cpu().contiguous()
        out[key + ".absmax_q"] = st.absmax.cpu().contiguous()
        out[key + ".absmax2"] = st.state2.absmax.float().cpu().contiguous()
        out[key + ".offset"] = st.offset.reshape(1).float().cpu()
        absmax = (F.dequantize_blockwise(st.absmax, st.state2) + st.offset).float()
        out[key + ".absmax"] = absmax.cpu().contiguous()
        out[key + ".deq"] = F.dequantize_4bit(w.data, st).float().cpu().contiguous()
    return out

def torch_vs_bnb(dirname):
    """Quantize every decoder weight of the checkpoint with bitsandbytes and with torch_nf4 / torch_dq."""
    import bitsandbytes.functional as F
    from safetensors.torch import load_file
    sd = load_file(os.path.join(dirname, "model.safetensors"))
    code = F.create_dynamic_map().float().to(DEVICE)
    n_w, bad = 0, []
    for k, w in sd.items():
        if not any(k.endswith(t + ".weight") for t in TARGETS):   # the linears' weights, not their biases
            continue
        w = w.to(DEVICE)
        q0, st0 = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
        q1, st1 = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
        pk, am = torch_nf4(w)
        q8, a2 = torch_dq(am, st1.offset, code)
        deq = (from_bits(NF4_LUT).to(DEVICE)[torch.stack([pk >> 4, pk & 15], 1).reshape(-1)[: w.numel()].long()]
               * am.repeat_interleave(64)[: w.numel()]).to(torch.bfloat16)
        checks = {"packed": torch.equal(pk, q0.reshape(-1)), "absmax": torch.equal(am, st0.absmax),
                  "nested_codes": torch.equal(q8, st1.absmax), "absmax2": torch.equal(a2, st1.state2.absmax),
                  "dequant": torch.equal(deq, F.dequantize_4bit(q0, st0).reshape(-1))}
        bad += [f"{k}:{c}" for c, ok in checks.items() if not ok]
        n_w += 1
    return n_w, bad

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="test/ref")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS))
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                    help="cpu: for looking, not for committing (a CPU bf16 run is not the GPU's)")
    a = ap.parse_args()
    global DEVICE
    DEVICE = a.device
    names = a.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        ap.error(f"unknown variant(s) {','.join(unknown)}: choose from {','.join(VARIANTS)}")
    import bitsandbytes, transformers, peft
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    for vname in names:
        model_type, spec = VARIANTS[vname]
        d = os.path.join(a.out, vname)
        os.makedirs(d, exist_ok=True)
        build_checkpoint(d, model_type, spec)
        g = torch.Generator().manual_seed(HP["seed"] + 2)
        B, T, V = HP["batch"], HP["seq"], spec["vocab_size"]
        inputs = torch.randint(0, V, (B, T), generator=g)
        labels = inputs.clone()
        labels[0, :8] = -100          # a "prompt" that is not trained on
        labels[1, 20:25] = -100
        targets = torch.cat([labels[:, 1:], torch.full((B, 1), -100)], 1)   # shifted, as the loss sees them
        n_w, bad = torch_vs_bnb(d)
        meta = {k: str(v) for k, v in HP.items()}
        meta.update(targets=",".join(TARGETS), bitsandbytes=bitsandbytes.__version__,
                    transformers=transformers.__version__, peft=peft.__version__, torch=torch.__version__,
                    gpu=torch.cuda.get_device_name() if DEVICE == "cuda" else "none (cpu)", torch_nf4_weights=str(n_w),
                    torch_nf4_mismatches=";".join(bad) or "none", made_by="dev/reference.py")
        init = None
        for tag, dt, attn in (("fp32", torch.float32, "eager"), ("bf16", torch.bfloat16, "eager"),
                              ("bf16_sdpa", torch.bfloat16, "sdpa")):
            out, init_out, model = run(d, dt, init, inputs.to(DEVICE), labels.to(DEVICE), attn)
            init = init if init is not None else init_out
            out["inputs"] = inputs.to(torch.int32).contiguous()
            out["targets"] = targets.to(torch.int32).contiguous()
            save_file(out, os.path.join(d, f"debug_{tag}.safetensors"), metadata=dict(meta, compute=tag))
            if tag == "fp32":
                save_file(quant_tensors(model), os.path.join(d, "quant.safetensors"), metadata=meta)
            print(vname, tag, "loss", round(out["loss"].item(), 6), "losses", [round(x, 5) for x in out["losses"].tolist()])
        print(vname, "torch NF4 vs bitsandbytes:", n_w, "weights,", "mismatches:", meta["torch_nf4_mismatches"])

if __name__ == "__main__":
    main()
