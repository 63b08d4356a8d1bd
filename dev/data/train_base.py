"""Pretrains the small base model that `make train` fine-tunes, and saves it to data/base/.

A Llama (transformers' LlamaForCausalLM): hidden 128, 2 layers, 2 query heads and 1 KV head of
dim 64 (GQA), SwiGLU 384, tied embeddings, a character-level vocabulary of 104 tokens.
It learns from generated text only: English-like sentences from a small grammar, and chat
conversations of the instruction tasks of make_task.py *other than* the fine-tuning task
(repeat, upper, length, first). So it knows the characters and the chat format, and answers
"reverse: abc" the way it answers the tasks it knows (mostly by copying): accuracy about 0 on the
task, which a short LoRA run then fixes.

    python dev/data/train_base.py --out data/base           # about 15-25 minutes on 2 CPU cores

writes data/base/: config.json + model.safetensors (bf16, save_pretrained), tokenizer.json (a
`tokenizers` WordLevel model over single characters), tokenizer_config.json with the chat template.
Needs torch, transformers, tokenizers (CPU is fine). Seeded (the same torch build and thread count
should give the same weights; not checked bit for bit across machines). At its end it prints what
the model does with each task; for the shipped model (torch 2.15 CPU, transformers 5.23, 3000 steps):
    base model, task reverse : 0/50 right (the fine-tuning task); 'reverse: ccl' -> 'ccelo', 'reverse: xzvj' -> 'x'
    base model, task repeat  : 49/50 right; ...   upper: 47/50, length: 50/50, first: 50/50
"""
import argparse, json, os, random, sys, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_task import TASKS, TARGET, random_word  # noqa: E402

SPECIALS = ["<unk>", "<|bos|>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>", "<|pad|>", "<|reserved_0|>"]
CHARS = ["\n"] + [chr(c) for c in range(32, 127)]          # printable ASCII and newline
VOCAB = SPECIALS + CHARS                                  # 104 = 8 + 96, a multiple of 8
BOS, EOT = "<|bos|>", "<|end|>"                           # EOT ends every turn and every plain document

# One user turn and one assistant turn each end with <|end|>; a generation prompt is <|assistant|>.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{% if m['role'] not in ['system', 'user', 'assistant'] %}{{ raise_exception('unknown role: ' + m['role']) }}{% endif %}"
    "{{ '<|' + m['role'] + '|>' + m['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def build_tokenizer():
    from tokenizers import Tokenizer, Regex, decoders, models, pre_tokenizers
    from tokenizers import AddedToken
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(VOCAB)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")   # every character alone
    tok.decoder = decoders.Fuse()                                                        # ids -> text with no separators
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    return tok


def save_tokenizer(tok, out):
    tok.save(os.path.join(out, "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOT, "unk_token": "<unk>",
           "pad_token": "<|pad|>", "model_max_length": 256, "clean_up_tokenization_spaces": False,
           "chat_template": CHAT_TEMPLATE}
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f, indent=2)


# ---- the pretraining text ----------------------------------------------------------------------

SUBJ = ["the cat", "a dog", "my friend", "the old man", "she", "he", "the teacher", "a small bird", "the children",
        "our team", "the farmer", "a young girl", "the driver", "my sister", "the baker", "they", "we", "you", "i"]
VERB = ["sees", "likes", "finds", "wants", "makes", "reads", "opens", "helps", "paints", "carries", "brings",
        "watches", "moves", "cleans", "builds", "needs", "sells", "keeps"]
OBJ = ["the door", "a red ball", "the book", "some water", "the green box", "a letter", "the long road", "an apple",
       "the blue car", "a warm coat", "the garden", "a new song", "the window", "bread", "the map", "two chairs"]
TAIL = ["", "", "", " today", " in the morning", " at home", " very quickly", " again", " after lunch",
        " near the river", " every day", " at {n} o'clock", " with {n} friends", " for {n} hours"]


def sentence(rng):
    s = f"{rng.choice(SUBJ)} {rng.choice(VERB)} {rng.choice(OBJ)}{rng.choice(TAIL)}".format(n=rng.randint(2, 12))
    return s[0].upper() + s[1:] + rng.choice([".", ".", ".", "!", "?"])


def document(rng):
    """One pretraining document, as text with special tokens (the chat template rendered by hand)."""
    if rng.random() < 0.4:
        return BOS + " ".join(sentence(rng) for _ in range(rng.randint(1, 4))) + EOT
    turns = []
    for _ in range(rng.randint(1, 3)):
        task = rng.choice([t for t in TASKS if t != TARGET])
        p, r = TASKS[task](random_word(rng))
        turns.append(f"<|user|>{p}{EOT}<|assistant|>{r}{EOT}")
    return BOS + "".join(turns)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="data/base")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(a.seed)
    torch.set_num_threads(a.threads)
    rng = random.Random(a.seed)
    tok = build_tokenizer()
    V = tok.get_vocab_size()
    assert V == len(VOCAB) and V % 8 == 0, V
    cfg = LlamaConfig(vocab_size=V, hidden_size=128, intermediate_size=384, num_hidden_layers=a.layers,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=256,
                      rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True, attention_bias=False, mlp_bias=False,
                      bos_token_id=VOCAB.index(BOS), eos_token_id=VOCAB.index(EOT), pad_token_id=VOCAB.index("<|pad|>"))
    model = LlamaForCausalLM(cfg)
    print(f"base model: {sum(p.numel() for p in model.parameters()) / 1e6:.3f} M parameters, vocab {V}")

    # a token stream of documents back to back; each batch row is a random window (plain LM pretraining)
    stream = []
    while len(stream) < a.steps * a.batch * a.seq // 8 + a.seq + 1:
        stream += tok.encode(document(rng)).ids
    data = torch.tensor(stream, dtype=torch.long)
    print(f"pretraining text: {len(stream)} tokens; sample: {tok.decode(stream[:120], skip_special_tokens=False)!r}")

    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.95), weight_decay=0.1)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=a.lr, total_steps=a.steps, pct_start=0.05)
    t0 = time.time()
    for step in range(a.steps):
        ix = torch.randint(0, len(data) - a.seq - 1, (a.batch,))
        x = torch.stack([data[i:i + a.seq] for i in ix])
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(); sched.step()
        if step % 100 == 0 or step == a.steps - 1:
            print(f"step {step:5d} | loss {loss.item():.4f} | {time.time() - t0:.0f} s", flush=True)

    # what the base model does with each task (greedy, exact match), the fine-tuning task included
    model.eval()
    erng = random.Random(a.seed + 1)
    with torch.no_grad():
        for task in TASKS:
            right, shown = 0, []
            for _ in range(50):
                p, r = TASKS[task](random_word(erng))
                ids = tok.encode(f"{BOS}<|user|>{p}{EOT}<|assistant|>").ids
                out = model.generate(torch.tensor([ids]), max_new_tokens=len(r) + 4, do_sample=False,
                                     eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id)[0, len(ids):].tolist()
                got = tok.decode(out, skip_special_tokens=True)
                right += got == r and out[-1] == cfg.eos_token_id
                if len(shown) < 2:
                    shown.append(f"{p!r} -> {got!r}")
            print(f"base model, task {task:8s}: {right}/50 right{' (the fine-tuning task)' if task == TARGET else ''}; "
                  + ", ".join(shown))

    os.makedirs(a.out, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(a.out, safe_serialization=True)
    save_tokenizer(tok, a.out)
    print(f"saved {a.out}: " + ", ".join(f"{f} ({os.path.getsize(os.path.join(a.out, f))} bytes)" for f in sorted(os.listdir(a.out))))


if __name__ == "__main__":
    main()
