"""Tokenizes a data set with a model's own Hugging Face tokenizer into qlora token files.

    python dev/data/prepare.py --model data/base --train data/task/train.jsonl --val data/task/val.jsonl \\
        --out data/task/reverse
    python dev/data/prepare.py --model DIR --train corpus.txt --val-fraction 0.05 --out data/mytext

writes OUT.train.tok and OUT.val.tok (the format of dataloader.h: header, u32 tokens, u8 loss mask,
u64 document offsets; one document per example) and the model's vocabulary table (--vocab, default
MODEL/vocab.bin, format below) for decoding in C.

Inputs, by extension or --format:
  text    (.txt)     one document per line (--text-unit paragraph: per blank-line-separated block);
                     bos + text + eos, every token trained (no mask in the file)
  prompt  (.jsonl)   {"prompt": ..., "response": ...} ("completion" is an alias of "response"),
                     rendered as one user turn and one assistant turn with the chat template
                     (--no-chat-template: bos + prompt + response + eos)
  chat    (.jsonl)   {"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}
                     rendered with the tokenizer's chat template
The loss mask is on for the assistant's tokens only, end-of-turn token included (--train-on-prompt:
on for every token). The chat template runs in jinja2 the way transformers runs it; the assistant's
tokens are found by rendering the conversation up to each assistant turn with and without it.
Each piece (context, answer) is tokenized on its own, so a merge across a boundary cannot blur it.
Examples longer than --max-len tokens are cut at the end and counted. A bad row (invalid JSON,
missing or mistyped fields, an unknown role, no assistant turn) is reported with its line number
and left out; --strict makes any bad row an error. Rows with characters the vocabulary lacks are
kept and reported.

Vocabulary table (vocab.bin), little-endian, validated by qlora_cpu.cpp's vocab_load:
  [0, 32)  header: magic "QLVOCAB\\0", u32 version 1, u32 header bytes 32, u32 n (tokens),
           u32 bos id, u32 eos id (end of turn: generation stops there), u32 0 (reserved);
           0xffffffff = none
  u32 offsets[n + 1]   byte offsets into the strings: offsets[0] = 0, non-decreasing
  u8  flags[n]         bit 0: special token (control text such as <|end|>, not shown when decoding)
  strings              offsets[n] bytes: token i is bytes [offsets[i], offsets[i+1]), the raw bytes it
                       decodes to (byte-level BPE unmapped, sentencepiece's U+2581 as a space,
                       <0xNN> byte fallback as the byte)
Needs `tokenizers` and `jinja2` (no torch): pip install -r dev/requirements.txt.

Errors (a missing package or input file, an unreadable or non-UTF-8 input, no usable example, a bad
option) are one line "prepare.py: error: ..." and a non-zero exit, with nothing written.
"""
import argparse, importlib, json, os, random, re, struct, sys

TOKEN_MAGIC, TOKEN_VERSION, TOKEN_HEADER = b"QLTOKENS", 1, 64
VOCAB_MAGIC, VOCAB_VERSION, VOCAB_HEADER, NONE = b"QLVOCAB\0", 1, 32, 0xFFFFFFFF
REQUIREMENTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "requirements.txt")


def die(msg, code=1):
    print(f"prepare.py: error: {msg}", file=sys.stderr)
    sys.exit(code)


def require_packages():
    """Both packages up front: a missing jinja2 would otherwise surface as a template error on every row."""
    for name in ("tokenizers", "jinja2"):
        try:
            importlib.import_module(name)
        except ImportError as e:
            die(f"cannot import the Python package {name} ({e}): pip install -r {os.path.relpath(REQUIREMENTS)}", 2)


def read_text(path):
    """The whole file as text, or a one-line error naming the file (and the line, for bad UTF-8)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        die(f"{path}: {e.strerror}")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        die(f"{path}:{line}: not UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start}); convert the file to UTF-8")


def read_json(path):
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as e:
        die(f"{path}:{e.lineno}: invalid JSON: {e.msg}")


# ---- the tokenizer and its chat template ----------------------------------------------------------

class HFTokenizer:
    def __init__(self, model_dir):
        from tokenizers import Tokenizer
        if not os.path.isdir(model_dir):
            die(f"--model {model_dir}: no such directory (a model directory with tokenizer.json is needed)")
        path = os.path.join(model_dir, "tokenizer.json")
        if not os.path.isfile(path):
            die(f"{path} not found (a Hugging Face tokenizer.json is needed)")
        try:
            self.tok = Tokenizer.from_str(read_text(path))
        except Exception as e:   # the Rust side's parse errors are plain Exceptions
            die(f"{path}: not a Hugging Face tokenizer ({str(e).splitlines()[0] if str(e) else type(e).__name__})")
        cfg_path = os.path.join(model_dir, "tokenizer_config.json")
        self.cfg = read_json(cfg_path) if os.path.exists(cfg_path) else {}
        if not isinstance(self.cfg, dict):
            die(f"{cfg_path}: expected a JSON object")
        tmpl = os.path.join(model_dir, "chat_template.jinja")   # transformers v5 may keep it beside the config
        self.chat_template = read_text(tmpl) if os.path.exists(tmpl) else self.cfg.get("chat_template")
        if isinstance(self.chat_template, list):                # [{"name": "default", "template": ...}, ...]
            self.chat_template = {t["name"]: t["template"] for t in self.chat_template}.get("default")
        self.bos, self.eos = self.special("bos_token"), self.special("eos_token")
        self.bos_id = self.tok.token_to_id(self.bos) if self.bos else None
        self.eos_id = self.tok.token_to_id(self.eos) if self.eos else None
        self.unk_id = self.tok.token_to_id(self.special("unk_token") or "<unk>")
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        mml = self.cfg.get("model_max_length")
        self.max_len = int(mml) if isinstance(mml, (int, float)) and 1 <= mml < 1e7 else None   # 1e30 = "no limit"
        self._template = None
        self._describe()

    def special(self, key):
        v = self.cfg.get(key)
        return v.get("content") if isinstance(v, dict) else v

    def encode(self, text):
        return self.tok.encode(text, add_special_tokens=False).ids

    def render(self, messages, add_generation_prompt):
        """tokenizer.apply_chat_template(messages, tokenize=False, ...), as transformers renders it."""
        if self._template is None:
            from jinja2.sandbox import ImmutableSandboxedEnvironment
            def raise_exception(msg):
                raise ValueError(msg)
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=["jinja2.ext.loopcontrols"])
            env.globals["raise_exception"] = raise_exception
            self._template = env.from_string(self.chat_template)
        extra = {k: self.special(k) for k in ("bos_token", "eos_token", "unk_token", "pad_token") if self.special(k)}
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt, **extra)

    def token_bytes(self, i):
        """The raw bytes token i stands for when decoding."""
        s = self.tok.id_to_token(i)
        if s is None:
            return b""
        if i in self.special_ids:
            return s.encode()
        if self.byte_level is not None:
            return bytes(self.byte_level[c] for c in s if c in self.byte_level)
        m = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", s)
        if m:
            return bytes([int(m.group(1), 16)])
        return s.replace("\u2581", " ").encode()

    def _describe(self):
        j = json.loads(self.tok.to_str())
        self.special_ids = {a["id"] for a in j.get("added_tokens", []) if a.get("special")}
        dec = j.get("decoder") or {}
        kinds = [dec.get("type")] + [d.get("type") for d in dec.get("decoders", [])]
        self.byte_level = byte_decoder() if "ByteLevel" in kinds else None


def byte_decoder():
    """GPT-2's bytes_to_unicode, inverted: the byte each character of a byte-level BPE token stands for."""
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b); cs.append(256 + n); n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def write_vocab(tk, path):
    special = tk.special_ids
    strings = [tk.token_bytes(i) for i in range(tk.vocab_size)]
    offsets = [0]
    for s in strings:
        offsets.append(offsets[-1] + len(s))
    header = VOCAB_MAGIC + struct.pack("<6I", VOCAB_VERSION, VOCAB_HEADER, tk.vocab_size,
                                       NONE if tk.bos_id is None else tk.bos_id, NONE if tk.eos_id is None else tk.eos_id, 0)
    assert len(header) == VOCAB_HEADER
    body = struct.pack(f"<{len(offsets)}I", *offsets) + bytes(1 if i in special else 0 for i in range(tk.vocab_size))
    write_atomic(path, header + body + b"".join(strings))


# ---- examples -> (tokens, mask) -----------------------------------------------------------------

class BadRow(Exception):
    pass


def pieces_of_chat(tk, messages):
    """[(text, trained)] whose concatenation is the rendered conversation; trained = an assistant turn."""
    if not isinstance(messages, list) or not messages:
        raise BadRow('"messages" must be a non-empty list')
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise BadRow(f'message {k} must be {{"role": string, "content": string}}')
        if m["role"] not in ("system", "user", "assistant"):
            raise BadRow(f'message {k}: unknown role "{m["role"]}" (system, user, assistant)')
    if not any(m["role"] == "assistant" for m in messages):
        raise BadRow("no assistant message (nothing to train on)")
    try:
        out, done = [], ""
        for k, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = tk.render(messages[:k], add_generation_prompt=True)
            through = tk.render(messages[:k + 1], add_generation_prompt=False)
            if not before.startswith(done) or not through.startswith(before):
                raise BadRow(f"the chat template does not render message {k} as a prefix-stable append; "
                             "cannot locate the assistant's tokens")
            out += [(before[len(done):], False), (through[len(before):], True)]
            done = through
        full = tk.render(messages, add_generation_prompt=False)
        if not full.startswith(done):
            raise BadRow("the chat template is not prefix-stable")
        return out + [(full[len(done):], False)]
    except BadRow:
        raise
    except Exception as e:   # jinja2 errors, raise_exception() in the template
        raise BadRow(f"chat template: {e}")


def example_pieces(tk, row, fmt, use_template):
    if fmt == "text":
        return [((tk.bos or "") + row + (tk.eos or ""), True)]
    try:
        obj = json.loads(row)
    except json.JSONDecodeError as e:
        raise BadRow(f"invalid JSON: {e}")
    if not isinstance(obj, dict):
        raise BadRow("expected a JSON object")
    if fmt == "chat":
        if "messages" not in obj:
            raise BadRow('missing "messages"')
        return pieces_of_chat(tk, obj["messages"])
    prompt, resp = obj.get("prompt"), obj.get("response", obj.get("completion"))
    if not isinstance(prompt, str) or not isinstance(resp, str):
        raise BadRow('"prompt" and "response" (or "completion") must be strings')
    if resp == "":
        raise BadRow('empty "response" (nothing to train on)')
    if use_template:
        return pieces_of_chat(tk, [{"role": "user", "content": prompt}, {"role": "assistant", "content": resp}])
    return [((tk.bos or "") + prompt, False), (resp + (tk.eos or ""), True)]


def read_rows(text, fmt, text_unit):
    """(line number, row text) for each example; blank lines are not examples."""
    lines = text.split("\n")
    if fmt == "text" and text_unit == "paragraph":
        block, start = [], 0
        for n, line in enumerate(lines + [""], 1):
            if line.strip():
                if not block:
                    start = n
                block.append(line)
            elif block:
                yield start, "\n".join(block)
                block = []
        return
    for n, line in enumerate(lines, 1):
        if line.strip():
            yield n, line


def detect_format(path, text):
    if not path.endswith(".jsonl"):
        return "text"
    for line in text.split("\n"):
        if line.strip():
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                break
            return "chat" if isinstance(obj, dict) and "messages" in obj else "prompt"
    return "prompt"


class Stats:
    def __init__(self):
        self.examples = self.tokens = self.masked = self.truncated = self.bad = self.unknown = self.no_target = 0


def tokenize_file(tk, path, a, stats, report):
    text = read_text(path)
    fmt = a.format or detect_format(path, text)
    use_template = fmt in ("prompt",) and tk.chat_template is not None and not a.no_chat_template
    if fmt == "chat" and tk.chat_template is None:
        die(f"{path} is chat JSONL but the tokenizer has no chat_template")
    out = []
    for line, row in read_rows(text, fmt, a.text_unit):
        try:
            pieces = example_pieces(tk, row, fmt, use_template)
        except BadRow as e:
            stats.bad += 1
            report(f"{path}:{line}: bad row, left out: {e}")
            continue
        ids, mask = [], []
        for text, trained in pieces:
            t = tk.encode(text)
            ids += t
            mask += [1 if (trained or a.train_on_prompt) else 0] * len(t)
        if tk.unk_id is not None and tk.unk_id in ids:
            stats.unknown += 1
            report(f"{path}:{line}: {ids.count(tk.unk_id)} character(s) not in the vocabulary became {tk.tok.id_to_token(tk.unk_id)}")
        if a.max_len and len(ids) > a.max_len:
            ids, mask = ids[:a.max_len], mask[:a.max_len]
            stats.truncated += 1
        if not any(mask[1:]):
            stats.no_target += 1
            report(f"{path}:{line}: no trained token left{' after truncation to --max-len' if a.max_len else ''}")
        out.append((ids, mask))
    return fmt, out


# ---- token files ----------------------------------------------------------------------------------

def write_atomic(path, data):
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        die(f"cannot write {path}: {e.strerror}")


def write_token_file(path, examples, vocab, with_mask):
    """dataloader.h's format, as token_file_write writes it."""
    tokens, mask, docs = [], [], [0]
    for ids, m in examples:
        tokens += ids; mask += m; docs.append(len(tokens))
    n = len(tokens)
    header = TOKEN_MAGIC + struct.pack("<IIQQII", TOKEN_VERSION, TOKEN_HEADER, n, len(examples), vocab, 1 if with_mask else 0)
    header += b"\0" * (TOKEN_HEADER - len(header))
    body = struct.pack(f"<{n}I", *tokens) + (bytes(mask) if with_mask else b"")
    body += b"\0" * (-(TOKEN_HEADER + len(body)) % 8)
    write_atomic(path, header + body + struct.pack(f"<{len(docs)}Q", *docs))


def fraction(s):
    """--val-fraction: in [0, 1); 1 would leave nothing to train on."""
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid float value: {s!r}")
    if not 0 <= v < 1:   # also false for nan
        raise argparse.ArgumentTypeError(f"{s} is not in [0, 1) (the share of --train held out for validation)")
    return v


def positive_int(s):
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {s!r}")
    if v < 1:
        raise argparse.ArgumentTypeError(f"{s} is not a positive number of tokens (leave it out for model_max_length)")
    return v


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="directory with tokenizer.json (and tokenizer_config.json)")
    ap.add_argument("--train", required=True, nargs="+", help="input files (.txt, .jsonl)")
    ap.add_argument("--val", nargs="*", default=[], help="validation input files; else --val-fraction of --train")
    ap.add_argument("--val-fraction", type=fraction, default=0.05, help="in [0, 1); ignored with --val")
    ap.add_argument("--out", required=True, help="writes OUT.train.tok and OUT.val.tok")
    ap.add_argument("--vocab", help="vocabulary table to write (default MODEL/vocab.bin)")
    ap.add_argument("--format", choices=["text", "prompt", "chat"], help="default: from the extension and first row")
    ap.add_argument("--text-unit", choices=["line", "paragraph"], default="line")
    ap.add_argument("--max-len", type=positive_int, help="cut examples to this many tokens (default: model_max_length)")
    ap.add_argument("--train-on-prompt", action="store_true", help="loss on every token, not just the answers")
    ap.add_argument("--no-chat-template", action="store_true", help="prompt/response rows as bos+prompt+response+eos")
    ap.add_argument("--strict", action="store_true", help="any bad row is an error")
    ap.add_argument("--seed", type=int, default=1234, help="for the --val-fraction split")
    a = ap.parse_args()
    require_packages()
    tk = HFTokenizer(a.model)
    vocab_path = a.vocab or os.path.join(a.model, "vocab.bin")
    for p in (a.out, vocab_path):   # fail before the tokenizing, not after it
        d = os.path.dirname(p) or "."
        if not os.path.isdir(d):
            die(f"{p}: the directory {d} does not exist")
    if a.max_len is None:   # not `or`: a 0 must not mean the default (positive_int refuses it anyway)
        a.max_len = tk.max_len
    shown = [0]

    def report(msg):
        shown[0] += 1
        if shown[0] <= 20:
            print(msg, file=sys.stderr)
        elif shown[0] == 21:
            print("(further messages not shown; see the counts below)", file=sys.stderr)

    splits = {}
    for name, paths in (("train", a.train), ("val", a.val)):
        stats, exs, fmts = Stats(), [], set()
        for p in paths:
            fmt, e = tokenize_file(tk, p, a, stats, report)
            fmts.add(fmt); exs += e
        splits[name] = [stats, exs, fmts]
        if paths and not exs:
            die(f"no examples in --{name} {' '.join(paths)}"
                + (f" (all {stats.bad} rows bad; see above)" if stats.bad else " (empty)"))
    if not a.val and a.val_fraction > 0:   # seeded split of the train examples
        exs = splits["train"][1]
        idx = list(range(len(exs))); random.Random(a.seed).shuffle(idx)
        k = min(max(1, int(round(len(exs) * a.val_fraction))), len(exs) - 1)   # at least one of each
        if k == 0:
            print(f"note: 1 example, kept for training: no {a.out}.val.tok written", file=sys.stderr)
        vset = set(idx[:k])
        splits["val"][1] = [e for i, e in enumerate(exs) if i in vset]
        splits["train"][1] = [e for i, e in enumerate(exs) if i not in vset]
        splits["val"][2] = splits["train"][2]
    bad = sum(s[0].bad for s in splits.values())
    if a.strict and bad:
        sys.exit(f"prepare.py: error: {bad} bad row(s) (--strict)")
    for name, (stats, exs, fmts) in splits.items():
        if not exs:
            continue
        path = f"{a.out}.{name}.tok"
        with_mask = any(m == 0 for _, ms in exs for m in ms)   # no mask in the file when every token trains
        write_token_file(path, exs, tk.vocab_size, with_mask)
        n = sum(len(ids) for ids, _ in exs)
        targets = sum(sum(m[1:]) for _, m in exs)   # the first token of a document is never a target
        line = (f"{path}: {len(exs)} examples, {n} tokens, {100.0 * targets / max(n, 1):.1f}% trained "
                f"({targets} target tokens), longest {max(len(i) for i, _ in exs)}")
        if name == "train" or a.val:
            line += (f" | {stats.truncated} truncated to {a.max_len}, {stats.no_target} without a target, "
                     f"{stats.unknown} with unknown characters, {stats.bad} bad rows left out")
        print(line)
    write_vocab(tk, vocab_path)
    print(f"{vocab_path}: {tk.vocab_size} tokens (bos {tk.bos_id}, eos {tk.eos_id})")


if __name__ == "__main__":
    main()
