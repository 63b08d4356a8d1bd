"""The PyTorch run of a qlora recipe (transformers + peft + bitsandbytes), for the side-by-side
comparison of issue 13 (SmolLM2-135M-Instruct on the `words` task; dev/data/README.md).

    python dev/data/smollm2_torch.py --model build/smollm2 --train X.train.tok --val X.val.tok \\
        --steps 300 --batch 8 --seq 128 --lr 5e-4 --warmup 20 --eval-every 50 --jsonl torch.jsonl
    python dev/data/smollm2_torch.py --parse-qlora qlora.log --jsonl qlora.jsonl     # ./qlora's output as JSON lines
    python dev/data/smollm2_torch.py --compare qlora.jsonl torch.jsonl               # the two side by side

The recipe is ./qlora's, step for step:
  model     AutoModelForCausalLM with BitsAndBytesConfig NF4, double quantization, blocks of 64 (the
            decoder linears; embeddings, norms and the tied lm_head stay dense), compute dtype bf16
            (--dtype fp32: fp32, the dtype of ./qlora_cpu). --model may also be a 4-bit checkpoint
            that `./qlora_cpu quantize` wrote: loaded as it is. On the CPU that is the way to get the
            trainer's frozen weights bit for bit: bitsandbytes' CPU quantizer gives the same 4-bit
            codes as its CUDA kernel (and ./qlora), but about 0.2% of the double-quantized absmax
            codes land one code away
  LoRA      peft LoraConfig(r, alpha, dropout, the same target modules), the adapter in fp32. Its
            initial values are ./qlora's (qlora.h lora_init: A ~ U(-1/sqrt(in), 1/sqrt(in)) from the
            counter RNG of qlora.h, B = 0), computed here bit for bit (--adapter DIR: start from a
            PEFT adapter instead, e.g. the one `./qlora_cpu --steps 0 --out DIR` writes)
  data      the token files of dev/data/prepare.py, packed by a copy of dataloader.h's Loader: the
            same Fisher-Yates order per epoch from the same seed, the same rows of --seq tokens,
            documents split across rows as it splits them, the same targets (the next token where
            the loss mask is 1). Each segment of a row (a document or a piece of one) is run as its
            own sequence from position 0, which is what the packed row computes (attention never
            crosses a segment, positions restart): right-padded, so no mask is needed
  loss      the sum of the cross-entropies of the batch's targets over their count
  optimizer torch.optim.AdamW (betas 0.9/0.999, eps 1e-8, --weight-decay, foreach off) after
            clip_grad_norm_(--clip); the learning rate of qlora.h lr_schedule (linear warmup, then a
            cosine down to --min-lr-frac of --lr), set before every step
  report    validation loss (every target of --val, each document alone) and greedy exact-match
            accuracy (each prompt continued for as many tokens as its answer; right if equal), before,
            every --eval-every steps and after, as ./qlora reports them

Output: the report and step lines as ./qlora prints them, and with --jsonl FILE one JSON object a
line: {"kind": "report", "when": "before"|"after", "val_loss", "right", "total", "seconds"},
{"kind": "step", "step", "loss", "lr", "norm", "seconds"}, {"kind": "eval", "step", "val_loss",
"right", "total"}, {"kind": "run", ...} (the recipe, times).
Needs torch, transformers, peft, bitsandbytes (4-bit kernels on CUDA; bitsandbytes >= 0.49 also on
the CPU), numpy. --parse-qlora and --compare need only the standard library.
"""
import argparse, json, math, os, re, struct, sys, time

PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]   # qlora.h Proj order
MODULE = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
          "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
M64 = (1 << 64) - 1


# ---- qlora.h's counter RNG and LoRA init -----------------------------------------------------------

def mix64(z):
    """splitmix64's finaliser on a Python int (mod 2^64), as qlora.h mix64."""
    z = (z + 0x9E3779B97F4A7C15) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def mix64_np(z):
    """mix64 on a numpy uint64 array (wrapping arithmetic)."""
    import numpy as np
    z = z + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def rng_u32(seed, stream, index):
    return mix64((mix64(seed ^ mix64(stream)) + index) & M64) >> 32


def rng_uniform_np(seed, stream, n):
    """rng_uniform(seed, stream, i) for i = 0..n-1: float32 in [0, 1) with 24 random bits."""
    import numpy as np
    key = np.uint64(mix64(seed ^ mix64(stream)))
    with np.errstate(over="ignore"):
        u = mix64_np(np.arange(n, dtype=np.uint64) + key) >> np.uint64(32)
    return (u >> np.uint64(8)).astype(np.float32) * np.float32(1.0 / 16777216.0)


def lora_init_np(layer, p, rank, fan_in, seed):
    """qlora.h lora_init's A (rank, in) of projection p in layer `layer`, float32, bit for bit."""
    import numpy as np
    bound = np.float32(1.0) / np.sqrt(np.float32(fan_in))
    u = rng_uniform_np(seed, layer * len(PROJ) + p, rank * fan_in)
    return ((np.float32(2.0) * u - np.float32(1.0)) * bound).reshape(rank, fan_in)


def lr_schedule(step, steps, warmup, lr, min_frac):
    """qlora.h lr_schedule in float32: linear warmup over `warmup` steps, then cosine to min_frac * lr."""
    import numpy as np
    f = np.float32
    lr, min_frac = f(lr), f(min_frac)
    if step < warmup:
        return float(lr * f(step + 1) / f(warmup))
    p = f(step - warmup) / f(steps - warmup) if steps > warmup else f(1.0)
    c = f(math.cos(float(f(math.pi) * p)))
    return float(lr * (min_frac + (f(1) - min_frac) * f(0.5) * (f(1) + c)))


# ---- token files and dataloader.h's Loader -----------------------------------------------------------

class TokenFile:
    """dataloader.h's format: 64-byte header, u32 tokens, u8 mask (flags bit 0), pad to 8, u64 docs."""

    def __init__(self, path):
        import numpy as np
        d = open(path, "rb").read()
        if d[:8] != b"QLTOKENS":
            sys.exit(f"{path}: not a qlora token file")
        version, header, n, nd, vocab, flags = struct.unpack("<IIQQII", d[8:40])
        if version != 1 or header != 64:
            sys.exit(f"{path}: token file version {version}, header {header}: expected 1, 64")
        self.n_tokens, self.n_docs, self.vocab = n, nd, vocab
        self.tok = np.frombuffer(d, dtype="<u4", count=n, offset=64).astype(np.int64)
        at = 64 + 4 * n
        self.mask = np.frombuffer(d, dtype="u1", count=n, offset=at).astype(bool) if flags & 1 else np.ones(n, bool)
        at = (at + (n if flags & 1 else 0) + 7) // 8 * 8
        self.docs = np.frombuffer(d, dtype="<u8", count=nd + 1, offset=at).astype(np.int64)
        if at + 8 * (nd + 1) != len(d) or self.docs[0] != 0 or self.docs[-1] != n:
            sys.exit(f"{path}: corrupt (sizes or document offsets)")
        self.has_mask = bool(flags & 1)

    def target(self, i):
        return self.mask[i]


class Loader:
    """dataloader.h Loader (world size 1), line for line: the batches ./qlora and ./qlora_cpu train on."""

    def __init__(self, f, seed, shuffle=True):
        self.f, self.seed, self.shuffle = f, seed, shuffle
        self.epoch = self.cursor = self.offset = 0
        self.make_order()

    def make_order(self):
        n = self.f.n_docs
        order = list(range(n))
        if self.shuffle:
            stream = 5000 + self.epoch
            for i in range(n - 1, 0, -1):
                j = rng_u32(self.seed, stream, i) % (i + 1)
                order[i], order[j] = order[j], order[i]
        self.order = order

    def advance_doc(self):
        self.offset = 0
        self.cursor += 1
        if self.cursor == self.f.n_docs:
            self.cursor = 0
            self.epoch += 1
            self.make_order()

    def next(self, B, T):
        """ids, targets (-1: none), pos, doc_start: (B, T) int lists, as Loader::next fills them."""
        f = self.f
        ids = [[0] * T for _ in range(B)]
        tg = [[-1] * T for _ in range(B)]
        pos = [[0] * T for _ in range(B)]
        ds = [[0] * T for _ in range(B)]
        for r in range(B):
            t = 0
            while t < T:
                d = self.order[self.cursor]
                beg = int(f.docs[d])
                ln = int(f.docs[d + 1]) - beg
                if self.offset >= ln:
                    self.advance_doc()
                    continue
                k = min(ln - self.offset, T - t)
                for i in range(k):
                    src = beg + self.offset + i
                    ids[r][t + i] = int(f.tok[src])
                    pos[r][t + i] = i
                    ds[r][t + i] = t
                    if self.offset + i + 1 < ln and f.mask[src + 1]:
                        tg[r][t + i] = int(f.tok[src + 1])
                t += k
                self.offset += k
                if self.offset == ln:
                    self.advance_doc()
        return ids, tg, pos, ds


def segments_of_batch(ids, tg, ds):
    """The segments of packed rows: (ids, targets) of each run of one doc_start, in row order."""
    segs = []
    for r in range(len(ids)):
        T, t = len(ids[r]), 0
        while t < T:
            e = t + 1
            while e < T and ds[r][e] == ds[r][t]:
                e += 1
            segs.append((ids[r][t:e], tg[r][t:e]))
            t = e
    return segs


def eval_segments(f, T):
    """Every document of f as a segment (pieces of T tokens if longer), targets as eval_batches sets them."""
    segs = []
    for d in range(f.n_docs):
        s, e = int(f.docs[d]), int(f.docs[d + 1])
        while s < e:
            ln = min(e - s, T)
            ids = [int(x) for x in f.tok[s:s + ln]]
            tg = [int(f.tok[s + i + 1]) if s + i + 1 < e and f.mask[s + i + 1] else -1 for i in range(ln)]
            segs.append((ids, tg))
            s += ln
    return segs


def examples_of(f):
    """dataloader.h examples_of: each document's prompt (up to its first target) and answer (the targets after it)."""
    ex = []
    if not f.has_mask:
        return ex
    for d in range(f.n_docs):
        b, e = int(f.docs[d]), int(f.docs[d + 1])
        a = b + 1
        while a < e and not f.mask[a]:
            a += 1
        if a >= e:
            continue
        z = a
        while z < e and f.mask[z]:
            z += 1
        ex.append(([int(x) for x in f.tok[b:a]], [int(x) for x in f.tok[a:z]]))
    return ex


# ---- the model ------------------------------------------------------------------------------------

def load_model(a, torch):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from peft import LoraConfig, get_peft_model, PeftModel
    dt = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=dt, bnb_4bit_quant_storage=torch.uint8)
    prequantized = "quantization_config" in json.load(open(os.path.join(a.model, "config.json")))
    kw = {} if prequantized else {"quantization_config": q}   # a 4-bit checkpoint (./qlora quantize) is loaded as saved
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=dt, device_map={"": a.device}, attn_implementation=a.attn, **kw)
    model.config.use_cache = False
    for m in model.modules():
        # bitsandbytes on a CPU with AVX512-BF16 repacks a Linear4bit's weight for its inference kernel the
        # first time it runs in eval mode without grad (our "before" report), and that kernel has no
        # backward: every later training step would lose the gradient through the frozen linears (found
        # on the CPU: the step-1 norm 0.74 against ./qlora_cpu's 8.78). Kept off: the differentiable path.
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
        if hasattr(m, "compute_type_is_set"):   # a Linear4bit: --dtype, whatever a saved config says
            m.compute_dtype, m.compute_type_is_set = dt, True
    if a.adapter:
        model = PeftModel.from_pretrained(model, a.adapter, is_trainable=True)
    else:
        targets = [p for p in PROJ if p in a.targets.split(",") or p[:-5] in a.targets.split(",")]
        lc = LoraConfig(r=a.rank, lora_alpha=a.alpha, lora_dropout=a.dropout, target_modules=targets, bias="none",
                        task_type="CAUSAL_LM", use_rslora=a.rslora)
        model = get_peft_model(model, lc)
        init_like_qlora(model, a.seed, torch)
    for n, p in model.named_parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()   # the adapter in fp32, as ./qlora keeps its master copy
    return model


def init_like_qlora(model, seed, torch):
    """Overwrites every LoRA A with qlora.h lora_init's values and every B with 0."""
    pat = re.compile(r"layers\.(\d+)\.(self_attn|mlp)\.(\w+_proj)\.lora_([AB])\.default\.weight$")
    done = 0
    with torch.no_grad():
        for n, p in model.named_parameters():
            m = pat.search(n)
            if not m:
                continue
            layer, proj, ab = int(m.group(1)), m.group(3), m.group(4)
            if ab == "A":
                r, fan_in = p.shape
                p.copy_(torch.from_numpy(lora_init_np(layer, PROJ.index(proj), r, fan_in, seed)))
            else:
                p.zero_()
            done += 1
    if not done:
        sys.exit("smollm2_torch.py: no LoRA parameters found to initialize")


def seg_tensors(segs, torch, device):
    """Right-padded (S, L) inputs and targets (-100 where none)."""
    L = max(len(s[0]) for s in segs)
    x = torch.zeros((len(segs), L), dtype=torch.long)
    y = torch.full((len(segs), L), -100, dtype=torch.long)
    for i, (ids, tg) in enumerate(segs):
        x[i, :len(ids)] = torch.tensor(ids)
        y[i, :len(tg)] = torch.tensor([t if t >= 0 else -100 for t in tg])
    return x.to(device), y.to(device)


def loss_sum(model, segs, torch, device, chunk):
    """Sum of the targets' cross-entropies (fp32 log-softmax of the logits) over segs, in chunks of segments."""
    import torch.nn.functional as F
    total = None
    for c in range(0, len(segs), chunk):
        x, y = seg_tensors(segs[c:c + chunk], torch, device)
        logits = model(input_ids=x, use_cache=False).logits
        l = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=-100, reduction="sum")
        total = l if total is None else total + l
    return total


def accuracy(model, ex, torch, device, max_group=64):
    """Greedy exact match: prompts of one length decoded together with a KV cache (no padding), each for
    as many tokens as its answer; right if the tokens equal the answer. Returns (right, generations)."""
    groups = {}
    for i, (p, ans) in enumerate(ex):
        groups.setdefault(len(p), []).append(i)
    gen = [None] * len(ex)
    with torch.no_grad():
        for _, idx in sorted(groups.items()):
            for c in range(0, len(idx), max_group):
                part = idx[c:c + max_group]
                x = torch.tensor([ex[i][0] for i in part], device=device)
                n_new = max(len(ex[i][1]) for i in part)
                out = model(input_ids=x, use_cache=True)
                cache, toks = out.past_key_values, []
                nxt = out.logits[:, -1].argmax(-1)
                for s in range(n_new):
                    toks.append(nxt)
                    if s + 1 == n_new:
                        break
                    out = model(input_ids=nxt[:, None], past_key_values=cache, use_cache=True)
                    cache, nxt = out.past_key_values, out.logits[:, -1].argmax(-1)
                toks = torch.stack(toks, 1).tolist()
                for j, i in enumerate(part):
                    gen[i] = toks[j][:len(ex[i][1])]
    right = sum(g == ans for g, (_, ans) in zip(gen, ex))
    return right, gen


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="Hugging Face checkpoint directory (dev/data/smollm2.py)")
    ap.add_argument("--train"), ap.add_argument("--val")
    ap.add_argument("--steps", type=int, default=20), ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512), ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--warmup", type=int, default=0), ap.add_argument("--min-lr-frac", type=float, default=0.1)
    ap.add_argument("--weight-decay", type=float, default=0.0), ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--rank", type=int, default=16), ap.add_argument("--alpha", type=float, default=32.0)
    ap.add_argument("--dropout", type=float, default=0.0), ap.add_argument("--rslora", action="store_true")
    ap.add_argument("--targets", default="q,k,v,o,gate,up,down")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--adapter", help="start from this PEFT adapter instead of qlora's init")
    ap.add_argument("--eval-every", type=int, default=0), ap.add_argument("--eval-examples", type=int, default=0)
    ap.add_argument("--log-every", type=int, default=1)
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda if there is one)")
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="compute dtype (default: bf16 on cuda, fp32 on cpu)")
    ap.add_argument("--attn", default="sdpa", help="attn_implementation (sdpa, eager)")
    ap.add_argument("--chunk", type=int, default=64, help="segments per forward pass")
    ap.add_argument("--samples", type=int, default=3)
    ap.add_argument("--jsonl", help="write the JSON lines here")
    ap.add_argument("--parse-qlora", metavar="LOG", help="turn ./qlora's or ./qlora_cpu's printed output into --jsonl")
    ap.add_argument("--compare", nargs=2, metavar=("OURS", "TORCH"), help="two --jsonl files side by side")
    a = ap.parse_args()
    if a.parse_qlora:
        return parse_qlora(a.parse_qlora, a.jsonl)
    if a.compare:
        return compare(*a.compare)
    if not a.model or not a.val or (a.steps and not a.train):
        ap.error("--model, --val and (with --steps > 0) --train are needed")

    import numpy as np, torch
    a.device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    a.dtype = a.dtype or ("bf16" if a.device.startswith("cuda") else "fp32")
    torch.manual_seed(a.seed)
    out = open(a.jsonl, "w") if a.jsonl else None

    def emit(obj):
        if out:
            out.write(json.dumps(obj) + "\n")
            out.flush()

    t_load = time.time()
    model = load_model(a, torch)
    params = [p for p in model.parameters() if p.requires_grad]
    n_train = sum(p.numel() for p in params)
    load_s = time.time() - t_load
    import transformers, peft, bitsandbytes
    versions = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
                "bitsandbytes": bitsandbytes.__version__}
    dev_name = torch.cuda.get_device_name() if a.device.startswith("cuda") else "cpu"
    print(f"smollm2_torch: {a.model} | NF4 double-quant, compute {a.dtype} on {dev_name} | LoRA r {a.rank} alpha {a.alpha:g} "
          f"on {a.targets} | {n_train / 1e6:.3f} M trainable (fp32) | "
          + ", ".join(f"{k} {v}" for k, v in versions.items()) + f" | loaded in {load_s:.1f} s")
    emit({"kind": "run", "trainer": "pytorch", "device": dev_name, "dtype": a.dtype, "steps": a.steps, "batch": a.batch,
          "seq": a.seq, "lr": a.lr, "warmup": a.warmup, "min_lr_frac": a.min_lr_frac, "weight_decay": a.weight_decay,
          "clip": a.clip, "rank": a.rank, "alpha": a.alpha, "dropout": a.dropout, "targets": a.targets, "seed": a.seed,
          "init": a.adapter or "qlora", "trainable": n_train, "load_seconds": round(load_s, 2), **versions})

    val = TokenFile(a.val)
    ex = examples_of(val)
    if a.eval_examples:
        ex = ex[:a.eval_examples]
    vsegs = eval_segments(val, a.seq)
    n_vt = sum(t >= 0 for _, tg in vsegs for t in tg)
    tok = None
    try:
        from tokenizers import Tokenizer
        tok = Tokenizer.from_file(os.path.join(a.model, "tokenizer.json"))
    except Exception:
        pass

    def report(when, step=None):
        t0 = time.time()
        model.eval()
        with torch.no_grad():
            vl = float(loss_sum(model, vsegs, torch, a.device, a.chunk)) / max(n_vt, 1)
        right, gen = accuracy(model, ex, torch, a.device)
        model.train()
        dt = time.time() - t0
        if step is None:
            print(f"{when}: val loss {vl:.4f} | accuracy {right}/{len(ex)} = {100.0 * right / max(len(ex), 1):.1f}% "
                  f"(greedy, exact match) ({dt:.1f} s)")
            for i in range(min(a.samples, len(ex))):
                if tok:
                    show = lambda ids: tok.decode(ids, skip_special_tokens=True).replace("\n", " ").strip()
                    print(f"  {show(ex[i][0])[-60:]!r} -> {show(gen[i])!r}  (expected {show(ex[i][1])!r}) "
                          f"{'right' if gen[i] == ex[i][1] else 'wrong'}")
            emit({"kind": "report", "when": when, "val_loss": vl, "right": right, "total": len(ex), "seconds": round(dt, 2)})
        else:
            print(f"eval  {step:5d} | val loss {vl:.4f} | accuracy {right}/{len(ex)} ({dt:.1f} s)")
            emit({"kind": "eval", "step": step, "val_loss": vl, "right": right, "total": len(ex), "seconds": round(dt, 2)})
        sys.stdout.flush()

    report("before")
    if a.steps:
        train = TokenFile(a.train)
        loader = Loader(train, a.seed)
        opt = torch.optim.AdamW(params, lr=a.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=a.weight_decay, foreach=False)
        model.train()
        t_train, times = time.time(), []
        for step in range(a.steps):
            t0 = time.time()
            ids, tg, pos, ds = loader.next(a.batch, a.seq)
            segs = segments_of_batch(ids, tg, ds)
            count = sum(t >= 0 for r in tg for t in r)
            lr = lr_schedule(step, a.steps, a.warmup, a.lr, a.min_lr_frac)
            for g in opt.param_groups:
                g["lr"] = lr
            opt.zero_grad(set_to_none=True)
            loss = loss_sum(model, segs, torch, a.device, a.chunk) / count
            loss.backward()
            norm = float(torch.nn.utils.clip_grad_norm_(params, a.clip if a.clip > 0 else float("inf")))
            opt.step()
            lv = float(loss.detach())
            dt = time.time() - t0
            times.append(dt)
            if (step + 1) % a.log_every == 0 or step == 0 or step + 1 == a.steps:
                print(f"step {step + 1:5d}/{a.steps} | loss {lv:.9g} | lr {lr:.3e} | norm {norm:.4f} | "
                      f"{a.batch * a.seq / dt:.0f} tok/s")
                sys.stdout.flush()
            emit({"kind": "step", "step": step + 1, "loss": lv, "lr": lr, "norm": norm, "seconds": round(dt, 4)})
            if a.eval_every and (step + 1) % a.eval_every == 0 and step + 1 < a.steps:
                report("eval", step + 1)
        train_s = time.time() - t_train
        med = sorted(times)[len(times) // 2]
        print(f"trained {a.steps} steps in {train_s:.1f} s (median step {med:.4f} s, {a.batch * a.seq / med:.0f} tok/s)")
        emit({"kind": "run", "train_seconds": round(train_s, 2), "median_step_seconds": round(med, 4)})
        report("after")
    if out:
        out.close()


# ---- ./qlora's output as JSON lines, and the comparison ------------------------------------------------

def parse_qlora(log, jsonl):
    rx_step = re.compile(r"^step\s+(\d+)/(\d+) \| loss (\S+) \| lr (\S+) \| norm (\S+)")
    rx_eval = re.compile(r"^eval\s+(\d+) \| val loss (\S+)(?: \| accuracy (\d+)/(\d+))?")
    rx_rep = re.compile(r"^(before|after): val loss (\S+) \| accuracy (\d+)/(\d+) .*\((\S+) s\)$")
    rx_med = re.compile(r"^median step (\S+) s")
    rx_trained = re.compile(r"^trained (\d+) steps in (\S+) s")
    rows = []
    for line in open(log, errors="replace"):
        line = line.rstrip("\n")
        if m := rx_step.match(line):
            rows.append({"kind": "step", "step": int(m[1]), "loss": float(m[3]), "lr": float(m[4]), "norm": float(m[5])})
        elif m := rx_eval.match(line):
            r = {"kind": "eval", "step": int(m[1]), "val_loss": float(m[2])}
            if m[3]:
                r.update(right=int(m[3]), total=int(m[4]))
            rows.append(r)
        elif m := rx_rep.match(line):
            rows.append({"kind": "report", "when": m[1], "val_loss": float(m[2]), "right": int(m[3]), "total": int(m[4]),
                         "seconds": float(m[5])})
        elif m := rx_med.match(line):
            rows.append({"kind": "run", "median_step_seconds": float(m[1])})
        elif m := rx_trained.match(line):
            rows.append({"kind": "run", "train_seconds": float(m[2])})
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if jsonl:
        open(jsonl, "w").write(text)
    else:
        sys.stdout.write(text)


def compare(ours, theirs):
    def load(p):
        return [json.loads(l) for l in open(p) if l.strip()]
    A, B = load(ours), load(theirs)
    steps = lambda R: {r["step"]: r for r in R if r["kind"] == "step"}
    evals = lambda R: {r["step"]: r for r in R if r["kind"] == "eval"}
    reps = lambda R: {r["when"]: r for r in R if r["kind"] == "report"}
    sa, sb = steps(A), steps(B)
    common = sorted(set(sa) & set(sb))
    acc = lambda r: f"{r['right']}/{r['total']}" if "right" in r else "-"
    print(f"{'':8} | {'qlora':>22} | {'pytorch':>22}")
    for w in ("before", "after"):
        ra, rb = reps(A).get(w), reps(B).get(w)
        if ra and rb:
            print(f"{w:8} | val loss {ra['val_loss']:.4f} {acc(ra):>6} | val loss {rb['val_loss']:.4f} {acc(rb):>6}")
    ea, eb = evals(A), evals(B)
    for s in sorted(set(ea) & set(eb)):
        print(f"eval {s:4d}| val loss {ea[s]['val_loss']:.4f} {acc(ea[s]):>6} | val loss {eb[s]['val_loss']:.4f} {acc(eb[s]):>6}")
    if not common:
        print("no common steps")
        return
    d = [sa[s]["loss"] - sb[s]["loss"] for s in common]
    rel = [abs(x) / max(abs(sb[s]["loss"]), 1e-9) for x, s in zip(d, common)]
    print(f"{len(common)} steps: training loss |qlora - pytorch| mean {sum(map(abs, d)) / len(d):.4f}, max {max(map(abs, d)):.4f} "
          f"(relative: mean {sum(rel) / len(rel):.2%}, max {max(rel):.2%}); mean signed diff {sum(d) / len(d):+.4f}")
    every = max(1, len(common) // 12)
    for s in common[::every] + ([common[-1]] if (len(common) - 1) % every else []):
        print(f"  step {s:4d}: loss {sa[s]['loss']:.4f} vs {sb[s]['loss']:.4f} | norm {sa[s]['norm']:.3f} vs {sb[s]['norm']:.3f}")
    # windowed means: the curves with the per-batch noise averaged out
    W = max(1, len(common) // 10)
    wins = [common[i:i + W] for i in range(0, len(common), W)]
    print("  mean loss per window of %d steps (qlora / pytorch): " % W
          + "  ".join(f"{w[0]}-{w[-1]}: {sum(sa[s]['loss'] for s in w) / len(w):.4f}/{sum(sb[s]['loss'] for s in w) / len(w):.4f}"
                      for w in wins))


if __name__ == "__main__":
    main()
