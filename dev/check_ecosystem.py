"""qlora's files against the Python ecosystem (transformers, peft, bitsandbytes), on a CUDA machine.

Needs torch, transformers, peft, bitsandbytes and safetensors, and a CUDA GPU (bitsandbytes quantizes
on the GPU). Run from anywhere; it works in the repository root. First build and run the CPU tests,
which write build/ecosystem/ (an adapter written by qlora, the CPU reference's logits with it, a
merged checkpoint) and build the helpers this script calls:

    make && make test            # or at least: make build/test_ecosystem qlora && build/test_ecosystem
    python dev/check_ecosystem.py all

Parts (each one also runs alone, and does not need the others to have run):
    peft-4bit   (a) qlora's adapter on transformers' bitsandbytes NF4 base (PeftModel.from_pretrained):
                    logits vs the CPU reference's (fp32 compute, tight), and the bf16-compute run (loose)
    peft-bf16   (b) the same adapter on the unquantized base
    peft-write  (c) PEFT writes adapters (all-linear; a subset with rsLoRA saved in BF16) and their
                    logits; build/test_ecosystem peft reads them and recomputes the logits
    bnb-save    (d) transformers saves the model loaded in 4 bits (nf4 nested, nf4, fp4 nested);
                    build/test_ecosystem bnb reads it and checks every byte against qlora's quantizer
    quantize    (e) ./qlora quantize vs transformers' save of the same model, tensor by tensor and the
                    JSON blobs; transformers loads qlora's output and gives the same logits
    merge       (f) ./qlora merge output (bf16, and --requant) loaded by transformers: logits vs the
                    CPU reference's on the merged weights, and vs transformers' own 4-bit load
    gpu-train   (g) ./qlora (GPU) trains on the checkpoint; PEFT loads its adapter (4-bit and bf16 base)
                    and the CPU reference reproduces PEFT's logits; transformers' 4-bit save of the
                    checkpoint trains with the same losses, bit for bit

Every check prints one PASS/FAIL line with its max difference and budget; the last line counts them
and the exit status is 1 if anything failed. Outputs go under --work (default build/ecosystem_py).
"""
import argparse, json, os, shutil, struct, subprocess, sys, traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = []   # (ok, line)


def report(ok, name, detail=""):
    line = f"{'PASS' if ok else 'FAIL'} {name}" + (f": {detail}" if detail else "")
    print(line, flush=True)
    RESULTS.append((bool(ok), line))
    return ok


def info(msg):
    print(f"     {msg}", flush=True)


# ---------------------------------------------------------------------------------------------
# helpers

def torch_mods():
    import torch
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    assert torch.cuda.is_available(), "a CUDA GPU is needed (bitsandbytes quantizes on the GPU)"
    return torch


def dtype_kw(dtype):
    """transformers >= 4.56 takes dtype=, older versions torch_dtype= (an unknown kwarg would be silently
    stored in the config, so pick by version instead of trying)."""
    import transformers
    from packaging import version
    key = "dtype" if version.parse(transformers.__version__) >= version.parse("4.56.0") else "torch_dtype"
    return {key: dtype}


def bnb_config(quant_type="nf4", double_quant=True, compute=None):
    torch = torch_mods()
    from transformers import BitsAndBytesConfig
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=double_quant,
                              bnb_4bit_compute_dtype=compute or torch.bfloat16)


def load_model(path, dtype, quant=None):
    """A CausalLM on GPU 0, eager attention (closest to the CPU reference), eval mode. quant: a
    BitsAndBytesConfig to quantize on load; None loads as stored (a pre-quantized checkpoint stays 4-bit)."""
    from transformers import AutoModelForCausalLM
    kw = dict(dtype_kw(dtype), device_map={"": 0}, attn_implementation="eager")
    if quant is not None:
        kw["quantization_config"] = quant
    return AutoModelForCausalLM.from_pretrained(path, **kw).eval()


def logits_of(model, ids):
    torch = torch_mods()
    with torch.no_grad():
        return model(input_ids=ids.to("cuda")).logits.float().cpu()


def free():
    """After the caller's `del model`: give the GPU memory back."""
    import gc
    torch = torch_mods()
    gc.collect()
    torch.cuda.empty_cache()


def maxdiff(a, b):
    return (a.double() - b.double()).abs().max().item()


def scale_of(t):
    return t.abs().max().item()


def read_ckpt(d):
    """Every tensor of a Hugging Face checkpoint directory (single file or sharded)."""
    from safetensors.torch import load_file
    idx = os.path.join(d, "model.safetensors.index.json")
    files = sorted(set(json.load(open(idx))["weight_map"].values())) if os.path.exists(idx) else ["model.safetensors"]
    out = {}
    for f in files:
        out.update(load_file(os.path.join(d, f)))
    return out


def f32_ulps(a, b):
    ia = struct.unpack("<i", struct.pack("<f", a))[0]
    ib = struct.unpack("<i", struct.pack("<f", b))[0]
    return abs(ia - ib)


def run_tool(cmd, name):
    """Run one of qlora's binaries; PASS if it exits 0. Its output is shown indented."""
    exe = cmd[0]
    if not os.path.exists(exe):
        return report(False, name, f"{exe} not found: run `make` in {REPO} first")
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    for line in (p.stdout + p.stderr).rstrip().splitlines():
        print("     | " + line)
    return report(p.returncode == 0, name, f"`{' '.join(cmd)}` exited {p.returncode}")


def check_close_scaled(name, got, ref, rel, extra=""):
    """max |got - ref| <= rel * max|ref|"""
    d, s = maxdiff(got, ref), scale_of(ref)
    return report(d <= rel * s, name, f"max |diff| {d:.3e}, budget {rel:g} x scale {s:.3e} = {rel * s:.3e}{extra}")


def check_adapter_loaded(pm, adapter_dir, name):
    """PEFT really loaded the file: its adapter state dict equals the file's tensors, key for key."""
    torch = torch_mods()
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file
    sd = {k: v.detach().float().cpu() for k, v in get_peft_model_state_dict(pm).items()}
    fd = {k: v.float() for k, v in load_file(os.path.join(adapter_dir, "adapter_model.safetensors")).items()}
    missing, extra = sorted(set(fd) - set(sd)), sorted(set(sd) - set(fd))
    bad = [k for k in fd if k in sd and not torch.equal(sd[k], fd[k])]
    return report(not missing and not extra and not bad, name,
                  f"{len(fd)} tensors; not in the model: {missing[:3]}; not in the file: {extra[:3]}; values differ: {bad[:3]}")


FP32_REL = 2e-4   # fp32 vs fp32 (CPU reference vs PyTorch): summation order and libm only (test_reference.cpp uses ~1e-4)


# ---------------------------------------------------------------------------------------------
# (a), (b): an adapter qlora wrote, applied by PEFT

def part_peft_load(a, quantized):
    torch = torch_mods()
    from peft import PeftModel
    from safetensors.torch import load_file
    tag = "peft-4bit" if quantized else "peft-bf16"
    ref = load_file(a.logits)
    ids = ref["inputs"].long()
    key = "logits_nf4" if quantized else "logits_base"
    cfg = json.load(open(os.path.join(a.adapter, "adapter_config.json")))
    info(f"adapter {a.adapter}: r {cfg['r']} alpha {cfg['lora_alpha']} rslora {cfg['use_rslora']} targets {cfg['target_modules']}")
    # fp32 compute: tight against the CPU reference
    quant = bnb_config("nf4", True, torch.float32) if quantized else None
    base = load_model(a.model, torch.float32, quant)
    if quantized:
        cls = type(base.model.layers[0].self_attn.q_proj).__name__
        report(cls == "Linear4bit", f"{tag}: transformers loaded the decoder linears as bitsandbytes Linear4bit", cls)
    l0 = logits_of(base, ids)
    check_close_scaled(f"{tag}: base logits (no adapter), fp32 compute, vs CPU reference", l0, ref[key + "_noadapter"], FP32_REL,
                       " (qlora's NF4 == bitsandbytes')" if quantized else "")
    pm = PeftModel.from_pretrained(base, a.adapter).eval()
    check_adapter_loaded(pm, a.adapter, f"{tag}: PeftModel.from_pretrained maps every key of qlora's adapter_model.safetensors")
    r, alpha, rs = cfg["r"], cfg["lora_alpha"], cfg["use_rslora"]
    want_s = alpha / (r ** 0.5) if rs else alpha / r
    layer = pm.base_model.model.model.layers[0].self_attn.q_proj
    got_s = layer.scaling["default"] if hasattr(layer, "scaling") else None
    report(got_s is not None and abs(got_s - want_s) < 1e-9, f"{tag}: PEFT's scaling is {got_s} (qlora's: {want_s})")
    l1 = logits_of(pm, ids)
    effect = maxdiff(l1, l0)
    check_close_scaled(f"{tag}: logits with qlora's adapter, fp32 compute, vs CPU reference", l1, ref[key], FP32_REL,
                       f"; the adapter moves the logits by {effect:.3e}")
    report(effect > 20 * FP32_REL * scale_of(ref[key]), f"{tag}: the adapter is applied (effect {effect:.3e} >> budget)")
    del pm, base; free()
    # bf16 compute (the QLoRA recipe): our fp32 logits vs PEFT's bf16 run, within 2x PyTorch's own bf16 error
    quant = bnb_config("nf4", True, torch.bfloat16) if quantized else None
    base = load_model(a.model, torch.bfloat16, quant)
    pm = PeftModel.from_pretrained(base, a.adapter).eval()
    lb = logits_of(pm, ids)
    d, yard, s = maxdiff(lb, ref[key]), maxdiff(lb, l1), scale_of(ref[key])
    report(d <= 2 * yard + 1e-3 * s, f"{tag}: bf16 compute (PEFT) vs CPU reference fp32",
           f"max |diff| {d:.3e}; PyTorch bf16 vs its own fp32 run {yard:.3e}; budget 2x that + 1e-3 x scale = {2 * yard + 1e-3 * s:.3e}")
    del pm, base; free()


# ---------------------------------------------------------------------------------------------
# (c): adapters PEFT writes, read by qlora

def part_peft_write(a):
    torch = torch_mods()
    from peft import LoraConfig, PeftModel, get_peft_model
    from safetensors.torch import save_file
    from transformers import AutoConfig
    V = AutoConfig.from_pretrained(a.model).vocab_size
    g = torch.Generator().manual_seed(4321)
    ids = torch.randint(0, V, (2, 32), generator=g)
    variants = [
        ("all_linear", dict(r=8, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear"), torch.float32),
        ("subset_rslora_bf16", dict(r=2, lora_alpha=5, use_rslora=True, target_modules=["k_proj", "gate_proj"]), torch.bfloat16),
    ]
    for name, kw, save_dtype in variants:
        d = os.path.join(a.work, "peft_written", name)
        shutil.rmtree(d, ignore_errors=True)
        base = load_model(a.model, torch.float32, bnb_config("nf4", True, torch.float32))
        pm = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", **kw))
        with torch.no_grad():   # PEFT inits B = 0; a nonzero B makes the adapter do something
            for n, p in pm.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
                if "lora_" in n and save_dtype != torch.float32:
                    p.data = p.data.to(save_dtype)
        pm.save_pretrained(d)
        del pm, base; free()
        peft_logits(a, d, ids)
        info(f"{d}: {sorted(os.listdir(d))}; adapter_config target_modules = {json.load(open(os.path.join(d, 'adapter_config.json')))['target_modules']}")
        run_tool([a.checker, "peft", d, a.model], f"peft-write: qlora reads PEFT's {name} adapter and reproduces PEFT's logits")


def peft_logits(a, d, ids):
    """PeftModel.from_pretrained(adapter d) on the bitsandbytes NF4 base and on the bf16 base (fp32 compute):
    its logits for ids, written to d/logits.safetensors for `build/test_ecosystem peft d MODEL`."""
    torch = torch_mods()
    from peft import PeftModel
    from safetensors.torch import save_file
    out = {"inputs": ids.to(torch.int32).contiguous()}
    for key, quant in (("logits_nf4", bnb_config("nf4", True, torch.float32)), ("logits_base", None)):
        base = load_model(a.model, torch.float32, quant)
        pm = PeftModel.from_pretrained(base, d).eval()   # logits of the adapter as saved (BF16 values included)
        out[key] = logits_of(pm, ids).contiguous()
        del pm, base; free()
    save_file(out, os.path.join(d, "logits.safetensors"), metadata={"model": a.model, "compute": "fp32"})


# ---------------------------------------------------------------------------------------------
# (g): the GPU trainer's own adapter in PEFT, and a pre-quantized checkpoint trained like its source

def part_gpu_train(a):
    """./qlora trains a few steps on the transformers-saved checkpoint (GPU, random tokens); PEFT loads the
    adapter it wrote onto that checkpoint quantized by bitsandbytes and onto the bf16 one, and the CPU
    reference on the same adapter reproduces PEFT's logits (fp32 both sides, tight). Then transformers'
    own 4-bit save of the checkpoint trains in ./qlora with the same losses, bit for bit, as the bf16
    checkpoint that ./qlora quantizes while loading (the same NF4 bytes)."""
    torch = torch_mods()
    from transformers import AutoConfig
    d = os.path.join(a.work, "gpu_trained")
    shutil.rmtree(d, ignore_errors=True)
    train = [a.qlora, "--batch", "2", "--seq", "32", "--steps", "6", "--lr", "1e-2", "--rank", "8", "--alpha", "16", "--seed", "5"]
    if not run_tool(train + ["--model", a.model, "--out", d, "--log", d + ".log"],
                    "gpu-train: ./qlora trains 6 steps on the transformers-saved checkpoint and writes a PEFT adapter"):
        return
    V = AutoConfig.from_pretrained(a.model).vocab_size
    ids = torch.randint(0, V, (2, 32), generator=torch.Generator().manual_seed(99))
    peft_logits(a, d, ids)
    run_tool([a.checker, "peft", d, a.model], "gpu-train: PEFT loads the GPU-trained adapter (4-bit and bf16 base); the CPU reference reproduces its logits")
    q = os.path.join(a.work, "hf_bnb", "nf4_dq")
    if not os.path.exists(os.path.join(q, "config.json")):
        q = hf_bnb_save(a, "nf4_dq", "nf4", True)
    run_tool(train + ["--model", q, "--log", d + "_prequant.log"], "gpu-train: ./qlora trains transformers' 4-bit save of the checkpoint")
    losses = lambda f: [l.split("|")[1].strip() for l in open(f) if l.startswith("step")]
    a_l, b_l = losses(d + ".log"), losses(d + "_prequant.log")
    report(a_l == b_l and len(a_l) == 6, "gpu-train: the pre-quantized checkpoint gives the same losses, bit for bit, as the bf16 one",
           f"{a_l} vs {b_l}")


# ---------------------------------------------------------------------------------------------
# (d): transformers' 4-bit save, read by qlora

BNB_VARIANTS = [("nf4_dq", "nf4", True), ("nf4", "nf4", False), ("fp4_dq", "fp4", True)]


def hf_bnb_save(a, tag, qt, dq):
    """save_pretrained of the model loaded in 4 bits (bf16 compute, bf16 storage dtype)."""
    torch = torch_mods()
    d = os.path.join(a.work, "hf_bnb", tag)
    shutil.rmtree(d, ignore_errors=True)
    m = load_model(a.model, torch.bfloat16, bnb_config(qt, dq, torch.bfloat16))
    m.save_pretrained(d)
    del m; free()
    return d


def part_bnb_save(a):
    for tag, qt, dq in BNB_VARIANTS:
        d = hf_bnb_save(a, tag, qt, dq)
        t = read_ckpt(d)
        w = "model.layers.0.self_attn.q_proj.weight"
        info(f"{d}: {len(t)} tensors; {w}*: " + ", ".join(f"{k[len(w):] or 'weight'} {str(v.dtype)[6:]} {list(v.shape)}" for k, v in sorted(t.items()) if k.startswith(w)))
        run_tool([a.checker, "bnb", d, a.model], f"bnb-save: qlora reads transformers' {tag} checkpoint byte for byte")


# ---------------------------------------------------------------------------------------------
# (e): qlora quantize vs transformers

def compare_bnb_ckpts(ours_dir, hf_dir, tag):
    torch = torch_mods()
    ours, hf = read_ckpt(ours_dir), read_ckpt(hf_dir)
    only_ours, only_hf = sorted(set(ours) - set(hf)), sorted(set(hf) - set(ours))
    report(not only_ours and not only_hf, f"quantize {tag}: same tensor names ({len(hf)})", f"only in qlora's: {only_ours[:4]}; only in transformers': {only_hf[:4]}")
    meta_bad, differ, offsets, worst = [], [], 0, 0
    blob_bad = []
    for k in sorted(set(ours) & set(hf)):
        x, y = ours[k], hf[k]
        if x.dtype != y.dtype or list(x.shape) != list(y.shape):
            meta_bad.append(f"{k}: {x.dtype}{list(x.shape)} vs {y.dtype}{list(y.shape)}")
            continue
        if ".quant_state." in k:
            bx, by = bytes(x.numpy().tobytes()), bytes(y.numpy().tobytes())
            if bx != by:
                jx, jy = json.loads(bx), json.loads(by)
                ox, oy = jx.pop("nested_offset", None), jy.pop("nested_offset", None)
                u = f32_ulps(ox, oy) if ox is not None and oy is not None else None
                if jx != jy or u is None or u > 2 or list(json.loads(bx).keys()) != list(json.loads(by).keys()):
                    blob_bad.append(f"{k}:\n       ours {bx.decode()}\n       hf   {by.decode()}")
                else:
                    offsets += 1
                    worst = max(worst, u)
            continue
        if not torch.equal(x, y):
            differ.append(k)
    report(not meta_bad, f"quantize {tag}: same dtype and shape for every tensor", "; ".join(meta_bad[:3]))
    report(not blob_bad, f"quantize {tag}: quant_state JSON blobs byte-identical, or differing only in a nested_offset within 2 ulp of torch.mean's",
           f"{offsets} blobs with a different offset (worst {worst} ulp)" + ("".join("\n     " + b for b in blob_bad[:3])))
    # where the offset differs, the nested codes (absmax) and nested_absmax may differ; nothing else may
    unexplained = [k for k in differ if not (k.endswith(".absmax") or k.endswith(".nested_absmax"))]
    report(not unexplained, f"quantize {tag}: every other tensor byte-identical (packed codes, quant maps, embeddings, norms)",
           f"{len(differ)} differ: {differ[:4]}")
    if differ:
        info(f"{len(differ)} absmax/nested_absmax tensors differ, all beside an offset torch.mean rounded differently")


def part_quantize(a):
    torch = torch_mods()
    from transformers import AutoConfig
    V = AutoConfig.from_pretrained(a.model).vocab_size
    ids = torch.randint(0, V, (2, 32), generator=torch.Generator().manual_seed(99))
    for tag, qt, dq in BNB_VARIANTS:
        ours = os.path.join(a.work, "qlora_quantized", tag)
        shutil.rmtree(ours, ignore_errors=True)
        cmd = [a.qlora, "quantize", "--model", a.model, "--out", ours, "--quant-type", qt] + ([] if dq else ["--no-double-quant"])
        if not run_tool(cmd, f"quantize {tag}: ./qlora quantize"):
            continue
        hf = hf_bnb_save(a, tag, qt, dq)
        compare_bnb_ckpts(ours, hf, tag)
        qc_o = json.load(open(os.path.join(ours, "config.json")))["quantization_config"]
        qc_h = json.load(open(os.path.join(hf, "config.json")))["quantization_config"]
        keys = ["quant_method", "load_in_4bit", "load_in_8bit", "bnb_4bit_quant_type", "bnb_4bit_use_double_quant", "bnb_4bit_quant_storage", "bnb_4bit_compute_dtype"]
        bad = {k: (qc_o.get(k), qc_h.get(k)) for k in keys if qc_o.get(k) != qc_h.get(k)}
        report(not bad, f"quantize {tag}: config.json quantization_config agrees with transformers' on {', '.join(keys)}", str(bad))
        extra = sorted(set(qc_h) ^ set(qc_o))
        if extra:
            info(f"keys in only one of the two quantization_configs (informational): {extra}")
        # transformers loads qlora's checkpoint as pre-quantized: same 4-bit modules, same logits as its own save
        m_o = load_model(ours, torch.bfloat16)
        cls = type(m_o.model.layers[0].mlp.down_proj).__name__
        report(cls == "Linear4bit" and getattr(m_o.model.layers[0].mlp.down_proj.weight, "quant_state", None) is not None,
               f"quantize {tag}: transformers loads qlora's output as bitsandbytes Linear4bit", cls)
        lo = logits_of(m_o, ids)
        del m_o; free()
        m_h = load_model(hf, torch.bfloat16)
        lh = logits_of(m_h, ids)
        del m_h; free()
        d, s = maxdiff(lo, lh), scale_of(lh)
        report(d <= 2e-3 * s, f"quantize {tag}: logits of qlora's checkpoint vs transformers' own (bf16 compute)",
               f"max |diff| {d:.3e} (0 when every byte agrees; budget 2e-3 x scale {s:.3e} for offsets 1-2 ulp apart)")


# ---------------------------------------------------------------------------------------------
# (f): qlora merge, loaded by transformers

def part_merge(a):
    torch = torch_mods()
    from safetensors.torch import load_file
    ref = load_file(a.logits)
    ids = ref["inputs"].long()
    out = os.path.join(a.work, "qlora_merged")
    shutil.rmtree(out, ignore_errors=True)
    if not run_tool([a.qlora, "merge", "--model", a.model, "--adapter", a.adapter, "--out", out], "merge: ./qlora merge (bf16)"):
        return
    m = load_model(out, torch.float32)
    lm = logits_of(m, ids)
    del m; free()
    check_close_scaled("merge: transformers on the merged bf16 checkpoint (fp32 compute) vs CPU reference on the same weights", lm, ref["logits_merged"], FP32_REL)
    d, s = maxdiff(lm, ref["logits_nf4"]), scale_of(ref["logits_nf4"])
    info(f"merged bf16 model vs NF4 base + adapter (CPU reference): max |diff| {d:.3e} of scale {s:.3e} (bf16 rounding of the merged weights)")
    outq = os.path.join(a.work, "qlora_merged_requant")
    shutil.rmtree(outq, ignore_errors=True)
    if not run_tool([a.qlora, "merge", "--model", a.model, "--adapter", a.adapter, "--out", outq, "--requant"], "merge: ./qlora merge --requant"):
        return
    mq = load_model(outq, torch.bfloat16)
    report(type(mq.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit", "merge --requant: transformers loads it as bitsandbytes Linear4bit")
    lq = logits_of(mq, ids)
    del mq; free()
    mh = load_model(out, torch.bfloat16, bnb_config("nf4", True, torch.bfloat16))   # transformers quantizing the merged bf16 itself
    lh = logits_of(mh, ids)
    del mh; free()
    d, s = maxdiff(lq, lh), scale_of(lh)
    report(d <= 2e-3 * s, "merge --requant vs transformers loading the merged bf16 checkpoint in 4 bits (bf16 compute)",
           f"max |diff| {d:.3e}, budget 2e-3 x scale {s:.3e}")


# ---------------------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("part", choices=["all", "peft-4bit", "peft-bf16", "peft-write", "bnb-save", "quantize", "merge", "gpu-train"])
    ap.add_argument("--model", default="test/ref/tied", help="the bf16 Hugging Face checkpoint (default test/ref/tied)")
    ap.add_argument("--adapter", default="build/ecosystem/qlora_adapter", help="an adapter written by qlora (build/test_ecosystem writes this one)")
    ap.add_argument("--logits", default="build/ecosystem/qlora_logits.safetensors",
                    help="inputs + the CPU reference's logits for --adapter (build/test_ecosystem writes it)")
    ap.add_argument("--checker", default="build/test_ecosystem", help="qlora's CPU checker binary (make builds it)")
    ap.add_argument("--qlora", default="./qlora", help="the qlora binary (make builds it)")
    ap.add_argument("--work", default="build/ecosystem_py", help="where this script writes")
    a = ap.parse_args()
    os.chdir(REPO)
    os.makedirs(a.work, exist_ok=True)
    try:
        import torch, transformers, peft, bitsandbytes
        print(f"torch {torch.__version__} | transformers {transformers.__version__} | peft {peft.__version__} | "
              f"bitsandbytes {bitsandbytes.__version__} | {torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}")
    except Exception as e:
        report(False, "imports", repr(e))
    needs_ref = {"peft-4bit", "peft-bf16", "merge"}
    if (a.part == "all" or a.part in needs_ref) and not (os.path.exists(a.logits) and os.path.exists(a.adapter)):
        run_tool([a.checker], "build/test_ecosystem (writes build/ecosystem/)")
    parts = {"peft-4bit": lambda: part_peft_load(a, True), "peft-bf16": lambda: part_peft_load(a, False),
             "peft-write": lambda: part_peft_write(a), "bnb-save": lambda: part_bnb_save(a),
             "quantize": lambda: part_quantize(a), "merge": lambda: part_merge(a), "gpu-train": lambda: part_gpu_train(a)}
    for name, fn in parts.items():
        if a.part not in ("all", name):
            continue
        print(f"=== {name}", flush=True)
        try:
            fn()
        except Exception:
            traceback.print_exc()
            report(False, f"{name}: raised an exception (traceback above)")
    n_fail = sum(1 for ok, _ in RESULTS if not ok)
    print(f"=== {len(RESULTS) - n_fail} PASS, {n_fail} FAIL")
    for ok, line in RESULTS:
        if not ok:
            print("  " + line.splitlines()[0])
    sys.exit(1 if n_fail else 0)


if __name__ == "__main__":
    main()
