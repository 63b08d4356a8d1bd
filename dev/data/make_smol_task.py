"""Instruction tasks in plain English for a real small instruct model (SmolLM2-135M-Instruct, made by
dev/data/smollm2.py), with a fixed seed and an exact-match answer.

    python dev/data/make_smol_task.py --task words --out build/smoltask

Tasks (--task):
  words   "Reverse the order of these words: red apple sky" -> "sky apple red"
          (3-6 common English words, each drawn at random; no word repeats within an example)
  add     "What is 47 + 38? Answer with the number only." -> "85" (two 2-digit numbers)
  snake   "Convert to snake_case: Quick Red Fox" -> "quick_red_fox" (2-4 capitalized words)

writes OUT/SPLIT.jsonl ({"prompt": ..., "response": ...}) for SPLIT in train, val; no val prompt is in
train. Tokenize with prepare.py and the model's own chat template:

    python dev/data/prepare.py --model build/smollm2 --train OUT/train.jsonl --val OUT/val.jsonl --out OUT/words
"""
import argparse, json, os, random

WORDS = """apple river stone cloud green table window garden yellow orange happy quiet dog cat horse bird
fish tree flower house road city night morning summer winter water fire earth light dark small large
red blue white black brown silver golden music paper book letter pencil chair door bread milk cheese
honey sugar salt rain snow wind storm sea lake mountain hill forest field island bridge tower castle
king queen child mother father friend doctor teacher farmer baker sailor soldier painter singer
coffee tea juice apple banana cherry grape lemon melon peach pear plum tomato potato carrot onion
rice soup cake cookie candy shoe shirt hat coat dress ring watch phone camera radio clock lamp bed
train plane boat car bike bus truck ship rocket star moon sun planet sky ocean desert valley cave
soft hard warm cold fast slow early late new old young tall short strong brave calm bright loud""".split()
WORDS = sorted(set(WORDS))


def task_words(rng):
    ws = rng.sample(WORDS, rng.randint(3, 6))
    return f"Reverse the order of these words: {' '.join(ws)}", " ".join(reversed(ws))


def task_add(rng):
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return f"What is {a} + {b}? Answer with the number only.", str(a + b)


def task_snake(rng):
    ws = rng.sample(WORDS, rng.randint(2, 4))
    return f"Convert to snake_case: {' '.join(w.capitalize() for w in ws)}", "_".join(ws)


TASKS = {"words": task_words, "add": task_add, "snake": task_snake}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", choices=sorted(TASKS), default="words")
    ap.add_argument("--out", required=True)
    ap.add_argument("--train", type=int, default=4000)
    ap.add_argument("--val", type=int, default=200)
    ap.add_argument("--seed", type=int, default=1234)
    a = ap.parse_args()
    rng, make = random.Random(a.seed), TASKS[a.task]
    seen, rows = set(), []
    while len(rows) < a.val + a.train:   # val first, so that train never holds a val prompt
        p, r = make(rng)
        if p in seen:
            continue
        seen.add(p)
        rows.append((p, r))
    os.makedirs(a.out, exist_ok=True)
    for split, part in (("val", rows[:a.val]), ("train", rows[a.val:])):
        path = os.path.join(a.out, f"{split}.jsonl")
        with open(path, "w") as f:
            for p, r in part:
                f.write(json.dumps({"prompt": p, "response": r}) + "\n")
        print(f"{path}: {len(part)} examples, e.g. {part[0][0]!r} -> {part[0][1]!r}")


if __name__ == "__main__":
    main()
