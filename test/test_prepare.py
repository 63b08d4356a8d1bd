#!/usr/bin/env python3
"""test_prepare.py: dev/data/prepare.py on the shipped model and task (needs `tokenizers` and
`jinja2`: pip install -r dev/requirements.txt; without them it prints "SKIPPED test_prepare.py: why"
and counts nothing, so `make test` passes anywhere).
  - the three input kinds: prompt/response JSONL and chat JSONL give the same token file; plain
    text gives every token trained, one document per line;
  - the loss mask covers the answer and its end-of-turn token, nothing of the prompt;
  - our jinja2 rendering of the chat template equals transformers' apply_chat_template (when
    transformers is importable);
  - bad rows are reported with their line numbers, counted and left out; --strict fails on them;
  - --max-len truncation is counted; the shipped token files and vocab.bin are what prepare.py
    makes today from the shipped JSONL (the data is reproducible);
  - every way to call it wrong fails with one line "prepare.py: error: ..." (no traceback, non-zero
    exit) and writes nothing: a missing package, an empty or all-bad input, --val-fraction outside
    [0, 1), --max-len < 1, a missing, directory or non-UTF-8 input, a bad --model, a missing --out
    directory.
"""
import os, struct, subprocess, sys, tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREPARE = os.path.join(ROOT, "dev/data/prepare.py")
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


def prepare(*args, model=os.path.join(ROOT, "data/base"), without=None):
    """Runs prepare.py (from the repository root); without: a package to hide from it, as if not installed."""
    cmd = [sys.executable, PREPARE]
    if without:   # None in sys.modules makes `import without` raise ImportError
        cmd = [sys.executable, "-c", f"import runpy, sys; sys.modules[{without!r}] = None; sys.argv[0] = {PREPARE!r}; "
                                     f"runpy.run_path({PREPARE!r}, run_name='__main__')"]
    return subprocess.run(cmd + ["--model", model, *args], capture_output=True, text=True, cwd=ROOT)


def refused(r, out, *want, lines=1):
    """(ok, last stderr line): r exited non-zero without a traceback, its stderr is `lines` lines
    (None: any) ending in "prepare.py: error: ..." that contains every string of want, and nothing
    named OUT.* exists."""
    err = r.stderr.strip().splitlines()
    last = err[-1] if err else f"(no message; exit {r.returncode})"
    d, base = os.path.split(out)
    written = [f for f in os.listdir(d) if f.startswith(base + ".")]
    ok = (r.returncode != 0 and "Traceback" not in r.stderr and last.startswith("prepare.py: error: ")
          and all(w in last for w in want) and (lines is None or len(err) == lines) and not written)
    return ok, last + (f" [wrote {written}]" if written else "")


def errors(tmp, task):
    """Each wrong call: one clear line, a non-zero exit, no file written."""
    n = [0]

    def out():   # a fresh OUT prefix per case; --vocab beside it, so "nothing written" covers it too
        n[0] += 1
        o = f"{tmp}/err{n[0]}"
        return o, ["--out", o, "--vocab", f"{o}.vocab"]

    val = f"{task}/val.jsonl"
    for pkg in ("tokenizers", "jinja2"):
        o, oa = out()
        r = prepare("--train", val, *oa, without=pkg)
        ok, last = refused(r, o, pkg, "pip install -r dev/requirements.txt")
        check(ok and r.returncode == 2, f"{pkg} not installed: exit 2 ({r.returncode}), one line naming it and the requirements file ({last})")

    empty, blank, allbad = f"{tmp}/empty.jsonl", f"{tmp}/blank.txt", f"{tmp}/allbad.jsonl"
    open(empty, "w").close()
    open(blank, "w").write("\n  \n\n")
    open(allbad, "w").write('[1]\n{"prompt": "a"}\n\n{"prompt": "a", "response": ""}\n')
    for path, want in ((empty, "(empty)"), (blank, "(empty)")):
        o, oa = out()
        ok, last = refused(prepare("--train", path, *oa), o, "no examples in --train", os.path.basename(path), want)
        check(ok, f"{os.path.basename(path)}: no examples is an error ({last})")
    o, oa = out()
    ok, last = refused(prepare("--train", val, "--val", empty, *oa), o, "no examples in --val", "empty.jsonl")
    check(ok, f"an empty --val is an error, not a run without validation ({last})")
    o, oa = out()
    ok, last = refused(prepare("--train", allbad, *oa), o, "all 3 rows bad", lines=4)   # 3 bad-row reports, then the error
    check(ok, f"every row bad is an error ({last})")

    for v in ("1.5", "1.0", "1", "-0.1", "nan", "x"):
        o, oa = out()
        r = prepare("--train", val, "--val-fraction", v, *oa)
        ok, last = refused(r, o, "argument --val-fraction", v, lines=None)
        check(ok and r.returncode == 2 and "usage:" in r.stderr, f"--val-fraction {v}: argparse error, exit 2 ({last})")
    two = f"{tmp}/two.jsonl"
    open(two, "w").write(open(val).readline() * 2)
    r = prepare("--train", two, "--val-fraction", "0.9", "--out", f"{tmp}/two", "--vocab", f"{tmp}/two.vocab")
    check(r.returncode == 0 and "two.train.tok: 1 examples" in r.stdout and "two.val.tok: 1 examples" in r.stdout,
          "--val-fraction 0.9 of 2 examples keeps one to train on (1 + 1)")

    for v in ("0", "-3"):
        o, oa = out()
        r = prepare("--train", val, "--max-len", v, *oa)
        ok, last = refused(r, o, "argument --max-len", v, lines=None)
        check(ok and r.returncode == 2, f"--max-len {v}: argparse error, exit 2, not the model's 256 ({last})")

    latin = f"{tmp}/latin1.jsonl"
    open(latin, "wb").write(b'{"prompt": "a", "response": "b"}\n\n{"prompt": "caf\xe9", "response": "b"}\n')
    for path, want, what in ((f"{tmp}/missing.jsonl", "missing.jsonl: No such file", "a missing input file"),
                             (tmp, f"{tmp}: Is a directory", "a directory as input"),
                             (latin, "latin1.jsonl:3: not UTF-8", "non-UTF-8 input (file and line)")):
        o, oa = out()
        ok, last = refused(prepare("--train", path, *oa), o, want)
        check(ok, f"{what}: one line naming it ({last})")
    o, oa = out()
    ok, last = refused(prepare("--train", val, "--val", f"{tmp}/missing.txt", *oa), o, "missing.txt: No such file")
    check(ok, f"a missing --val file: one line naming it, train not written either ({last})")

    nodir, empty_model, bad_model = f"{tmp}/no_model", f"{tmp}/model_empty", f"{tmp}/model_bad"
    os.makedirs(empty_model); os.makedirs(bad_model)
    open(f"{bad_model}/tokenizer.json", "w").write('{"version": "1.0", "model": 7}')
    for model, want, what in ((nodir, "no such directory", "--model: a missing directory"),
                              (empty_model, "model_empty/tokenizer.json not found", "--model: no tokenizer.json"),
                              (bad_model, "model_bad/tokenizer.json: not a Hugging Face tokenizer", "--model: a broken tokenizer.json")):
        o, oa = out()
        ok, last = refused(prepare("--train", val, *oa, model=model), o, want)
        check(ok, f"{what}: one line ({last})")
    bad_cfg = f"{tmp}/model_badcfg"
    os.makedirs(bad_cfg)
    open(f"{bad_cfg}/tokenizer.json", "w").write(open(os.path.join(ROOT, "data/base/tokenizer.json")).read())
    open(f"{bad_cfg}/tokenizer_config.json", "w").write('{"bos_token": "<|bos|>",\n')
    o, oa = out()
    ok, last = refused(prepare("--train", val, *oa, model=bad_cfg), o, "model_badcfg/tokenizer_config.json:2: invalid JSON")
    check(ok, f"--model: a broken tokenizer_config.json: one line with the line number ({last})")

    r = prepare("--train", val, "--out", f"{tmp}/no_such_dir/x", "--vocab", f"{tmp}/nd.vocab")
    ok, last = refused(r, f"{tmp}/nd", "no_such_dir", "does not exist")
    check(ok, f"--out in a missing directory: one line, before any work ({last})")


def main():
    try:
        import tokenizers, jinja2  # noqa: F401
    except ImportError as e:
        print(f"SKIPPED test_prepare.py: {e.name} not installed: pip install -r dev/requirements.txt")
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

    errors(tmp, task)
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
