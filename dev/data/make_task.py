"""The synthetic instruction tasks of `make train`, with a fixed seed.

The fine-tuning task is `reverse`: "reverse: kqmfa" -> "afmqk". The base model (train_base.py) is
pretrained on plain generated English and on the *other* tasks below (repeat, upper, length,
first), so it knows the characters and the chat format, but has never seen a string reversed: it
answers a reverse prompt by copying (accuracy about 0). A short LoRA run teaches it. The metric
is exact match of the greedy answer, crisp for every length.

    python dev/data/make_task.py --out data/task

writes, for each split (train, val), the same examples three ways:
    SPLIT.jsonl        {"prompt": "reverse: kqmfa", "response": "afmqk"}
    SPLIT.chat.jsonl   {"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}
    SPLIT.txt          one example a line: "reverse: kqmfa => afmqk"
No string of the val split appears in train.
"""
import argparse, json, os, random

LETTERS = "abcdefghijklmnopqrstuvwxyz"
TARGET = "reverse"


def random_word(rng, lo=3, hi=7):
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(lo, hi)))


# one (prompt, response) per call; every task reads a random lowercase string
TASKS = {
    "reverse": lambda w: (f"reverse: {w}", w[::-1]),      # the fine-tuning task
    "repeat": lambda w: (f"repeat: {w}", w),              # the rest: pretraining only
    "upper": lambda w: (f"upper: {w}", w.upper()),
    "length": lambda w: (f"length: {w}", str(len(w))),
    "first": lambda w: (f"first: {w}", w[0]),
}


def examples(task, n, rng, exclude=()):
    out, seen = [], set(exclude)
    while len(out) < n:
        w = random_word(rng)
        if w in seen:
            continue
        seen.add(w)
        out.append(TASKS[task](w))
    return out, seen


def write_split(out_dir, split, rows):
    with open(os.path.join(out_dir, f"{split}.jsonl"), "w") as f:
        for p, r in rows:
            f.write(json.dumps({"prompt": p, "response": r}) + "\n")
    with open(os.path.join(out_dir, f"{split}.chat.jsonl"), "w") as f:
        for p, r in rows:
            f.write(json.dumps({"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": r}]}) + "\n")
    with open(os.path.join(out_dir, f"{split}.txt"), "w") as f:
        for p, r in rows:
            f.write(f"{p} => {r}\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="data/task")
    ap.add_argument("--train", type=int, default=16000)
    ap.add_argument("--val", type=int, default=200)
    ap.add_argument("--seed", type=int, default=5)
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    rng = random.Random(a.seed)
    val, seen = examples(TARGET, a.val, rng)          # val first, so train can exclude its strings
    train, _ = examples(TARGET, a.train, rng, exclude=seen)
    write_split(a.out, "train", train)
    write_split(a.out, "val", val)
    print(f"{a.out}: task {TARGET!r}, {len(train)} train and {len(val)} val examples (seed {a.seed}), "
          f"as .jsonl (prompt/response), .chat.jsonl (messages) and .txt")


if __name__ == "__main__":
    main()
