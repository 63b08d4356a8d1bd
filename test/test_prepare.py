#!/usr/bin/env python3
"""test_prepare.py: dev/data/prepare.py on the shipped model and task (needs `tokenizers` and
`jinja2`; without them it says it skipped and counts nothing, so `make test` passes anywhere).
  - the three input kinds: prompt/response JSONL and chat JSONL give the same token file; plain
    text gives every token trained, one document per line;
  - the loss mask covers the answer and its end-of-turn token, nothing of the prompt;
  - our jinja2 rendering of the chat template equals transformers' apply_chat_template (when
    transformers is importable);
  - bad rows are reported with their line numbers, counted and left out; --strict fails on them;
  - --max-len truncation is counted; the shipped token files and vocab.bin are what prepare.py
    makes today from the shipped JSONL (the data is reproducible).
"""
import os, struct, subprocess, sys, tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
passed = failed = 0


def check(ok, what):
    global passed, failed
    print(f"{'  ok  ' if ok else '  FAIL'} {what}")
    passed, failed = passed + bool(ok), failed + (not ok)


def read_tok(path):
    """(tokens, mask or None, doc offsets, vocab) from a token file (dataloader.h's format)."""
    b = open(path, "rb").read()
    assert b[:8] == b"QLTOKENS", path
    ver, hdr, n, nd, vocab, flags = struct.unpack_from("<IIQQII", b, 8)
    tokens = list(struct.unpack_from(f"<{n}I", b, hdr))
    mask = list(b[hdr + 4 * n: hdr + 5 * n]) if flags & 1 else None
    at = hdr + 4 * n + (n if flags & 1 else 0)
    at += -at % 8
    docs = list(struct.unpack_from(f"<{nd + 1}Q", b, at))
    assert at + 8 * (nd + 1) == len(b)
    return tokens, mask, docs, vocab


def prepare(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "dev/data/prepare.py"), "--model", os.path.join(ROOT, "data/base"), *args],
                          capture_output=True, text=True)


def main():
    try:
        import tokenizers, jinja2  # noqa: F401
    except ImportError as e:
        print(f"skipped test_prepare.py: {e.name} is not installed (pip install tokenizers jinja2)")
        print("0 passed, 0 failed")
        return 0
    sys.path.insert(0, os.path.join(ROOT, "dev/data"))
    from prepare import HFTokenizer
    task = os.path.join(ROOT, "data/task")
    tmp = tempfile.mkdtemp(prefix="qlora_prepare_")
    tk = HFTokenizer(os.path.join(ROOT, "data/base"))

    # the three kinds of input, on the shipped examples
    runs = {}
    for kind, ext in (("prompt", "jsonl"), ("chat", "chat.jsonl"), ("text", "txt")):
        r = prepare("--train", f"{task}/train.{ext}", "--val", f"{task}/val.{ext}", "--out", f"{tmp}/{kind}", "--vocab", f"{tmp}/{kind}.vocab")
        runs[kind] = r
        check(r.returncode == 0 and "0 bad rows" in r.stdout, f"{kind}: prepare.py runs clean ({r.stdout.splitlines()[0] if r.stdout else r.stderr[-200:]})")
    same = all(open(f"{tmp}/prompt.{s}.tok", "rb").read() == open(f"{tmp}/chat.{s}.tok", "rb").read() for s in ("train", "val"))
    check(same, "prompt/response JSONL and chat JSONL give identical token files")
    shipped = all(open(f"{tmp}/prompt.{s}.tok", "rb").read() == open(f"{task}/reverse.{s}.tok", "rb").read() for s in ("train", "val"))
    check(shipped, "the shipped data/task/reverse.{train,val}.tok are what prepare.py makes from the shipped JSONL")
    check(open(f"{tmp}/prompt.vocab", "rb").read() == open(os.path.join(ROOT, "data/base/vocab.bin"), "rb").read(),
          "the shipped data/base/vocab.bin is what prepare.py writes")

    # masks: the answer and its end of turn, nothing else
    tokens, mask, docs, vocab = read_tok(f"{tmp}/prompt.val.tok")
    rows = [l for l in open(f"{task}/val.jsonl")]
    import json
    good = vocab == tk.vocab_size and len(docs) - 1 == len(rows)
    for d, row in enumerate(rows):
        ids, m = tokens[docs[d]:docs[d + 1]], mask[docs[d]:docs[d + 1]]
        ex = json.loads(row)
        answer = tk.tok.decode([i for i, k in zip(ids, m) if k], skip_special_tokens=False)
        context = tk.tok.decode([i for i, k in zip(ids, m) if not k], skip_special_tokens=False)
        good &= answer == ex["response"] + "<|end|>" and context == f"<|bos|><|user|>{ex['prompt']}<|end|><|assistant|>"
    check(good, f"mask: on for the response + <|end|> of all {len(rows)} val examples, off for the prompt and the template")
    t_tokens, t_mask, t_docs, _ = read_tok(f"{tmp}/text.train.tok")
    first = open(f"{task}/train.txt").readline().rstrip("\n")
    check(t_mask is None and tk.tok.decode(t_tokens[t_docs[0]:t_docs[1]], skip_special_tokens=False) == f"<|bos|>{first}<|end|>",
          "text: no mask (every token trained), one document per line: bos + line + eos")

    try:
        from transformers import PreTrainedTokenizerFast
        hf = PreTrainedTokenizerFast(tokenizer_file=os.path.join(ROOT, "data/base/tokenizer.json"),
                                     **{k: tk.cfg[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")})
        hf.chat_template = tk.chat_template
        msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "reverse: abc"}, {"role": "assistant", "content": "cba"},
                {"role": "user", "content": "upper: x"}]
        same = all(hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=g) == tk.render(msgs, g) for g in (False, True))
        check(same, "chat template: our jinja2 rendering == transformers' apply_chat_template (with and without generation prompt)")
    except ImportError:
        print("  (transformers not installed: the chat template comparison with apply_chat_template is not run)")

    # bad rows: reported with line numbers, counted, left out; --strict fails
    bad = f"{tmp}/bad.jsonl"
    with open(bad, "w") as f:
        f.write('{"messages": [{"role": "user", "content": "reverse: ab"}, {"role": "assistant", "content": "ba"}]}\n')
        f.write('{"messages": [{"role": "user", "content": "hi"}\n')                                    # 2: invalid JSON
        f.write("\n")                                                                                  # 3: blank, not an example
        f.write('{"messages": [{"role": "user", "content": "hi"}]}\n')                                 # 4: no assistant turn
        f.write('{"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}\n')  # 5: unknown role
        f.write('{"messages": [{"role": "user", "content": 7}, {"role": "assistant", "content": "y"}]}\n')    # 6: content not a string
        f.write('{"messages": [{"role": "user", "content": "r\u00e9verse"}, {"role": "assistant", "content": "x"}]}\n')  # 7: unknown char
        f.write('[1, 2]\n')                                                                            # 8: not an object
    r = prepare("--train", bad, "--val-fraction", "0", "--out", f"{tmp}/bad", "--format", "chat", "--vocab", f"{tmp}/bad.vocab")
    err = r.stderr
    want = ["bad.jsonl:2: bad row, left out: invalid JSON", "bad.jsonl:4: bad row, left out: no assistant message",
            "bad.jsonl:5: bad row, left out: message 0: unknown role \"robot\"", "bad.jsonl:6: bad row, left out: message 0 must be",
            "bad.jsonl:7: 1 character(s) not in the vocabulary", "bad.jsonl:8: bad row, left out: expected a JSON object"]
    missing = [w for w in want if w not in err]
    check(r.returncode == 0 and not missing and "2 examples" in r.stdout and "5 bad rows left out" in r.stdout and ":3:" not in err,
          f"bad rows: each reported with its line number and counted, the rest written{' (missing: ' + repr(missing) + ')' if missing else ''}")
    r = prepare("--train", bad, "--val-fraction", "0", "--out", f"{tmp}/bad", "--format", "chat", "--strict", "--vocab", f"{tmp}/bad.vocab")
    check(r.returncode != 0 and "5 bad row(s) (--strict)" in r.stderr, "--strict: bad rows are an error")

    # truncation and the seeded val split
    r = prepare("--train", f"{task}/val.jsonl", "--val-fraction", "0.1", "--max-len", "20", "--out", f"{tmp}/short", "--vocab", f"{tmp}/s.vocab")
    tokens, mask, docs, _ = read_tok(f"{tmp}/short.train.tok")
    longest = max(b - a for a, b in zip(docs, docs[1:]))
    check(r.returncode == 0 and longest == 20 and " truncated to 20" in r.stdout and len(docs) - 1 == 180 and "short.val.tok: 20 examples" in r.stdout,
          f"--max-len 20 cuts examples (longest {longest}) and counts them; --val-fraction 0.1 splits 200 into 180 + 20")
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
