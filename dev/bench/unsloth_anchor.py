"""The Unsloth anchor for the shapes ../shared/bench/unsloth_qlora.py lacks (qwen2.5-7b, qwen3-8b, and
the test shapes of hf_anchor.py): this script makes the random-init checkpoint of the shape itself and
then runs unsloth_qlora.py's own main() on it, so the method and the JSON line are unsloth_qlora.py's.

The checkpoint is hf_anchor.py's model (seed 0, made on the GPU in bf16: the weights the HF anchor
quantizes), saved with save_pretrained next to a tiny word-level tokenizer and unsloth_qlora.py's
marker file, in --workdir/ckpt-SHAPE (reused when there), by a subprocess that imports transformers
only (Unsloth must be imported before transformers). Where unsloth_qlora.py lives: $UNSLOTH_QLORA,
else ../shared/bench/unsloth_qlora.py beside the repository. Same flags as unsloth_qlora.py.
A failure before unsloth_qlora.py takes over prints {"system": "unsloth", "error": ..., "stage": "build"}."""
import importlib.util, json, os, subprocess, sys, tempfile, time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import hf_anchor  # noqa: E402  (torch only at import: transformers is imported in the build subprocess)

MARKER = "bench_shape.json"  # unsloth_qlora.py's: a checkpoint with it (and the shape's name) is reused


def arg(flag, default):
    return sys.argv[sys.argv.index(flag) + 1] if flag in sys.argv[:-1] else default


def build(shape, path):
    """The bf16 random-init model of `shape` as hf_anchor.py makes it, saved with a tokenizer."""
    import torch
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers
    s = hf_anchor.SHAPES[shape]
    model = hf_anchor.build(s, "cuda" if torch.cuda.is_available() else "cpu")
    tmp = path + ".partial"
    subprocess.run(["rm", "-rf", tmp], check=True)
    os.makedirs(tmp)
    model.save_pretrained(tmp)
    words = ["<unk>", "<s>", "</s>", "<pad>"] + [f"t{i}" for i in range(60)]
    tk = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                            unk_token="<unk>", model_max_length=hf_anchor.EXTRA[s["arch"]]["max_position_embeddings"]
                            ).save_pretrained(tmp)
    with open(os.path.join(tmp, MARKER), "w") as f:
        json.dump(dict(shape=shape, **s), f)
    subprocess.run(["rm", "-rf", path], check=True)
    os.replace(tmp, path)


def main():
    shape = hf_anchor.ALIASES.get(arg("--shape", "qwen3-8b"), arg("--shape", "qwen3-8b"))
    if "--_build" in sys.argv:
        build(shape, arg("--_build", ""))
        return
    res = dict(system="unsloth", shape=shape, stage="build")
    try:
        uq_path = os.environ.get("UNSLOTH_QLORA") or os.path.join(HERE, "..", "..", "..", "shared", "bench",
                                                                  "unsloth_qlora.py")
        spec = importlib.util.spec_from_file_location("unsloth_qlora", uq_path)
        uq = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(uq)  # no torch/transformers at its import
        if shape not in hf_anchor.SHAPES:
            raise ValueError(f"unknown shape {shape}")
        uq.SHAPES[shape] = {k: v for k, v in hf_anchor.SHAPES[shape].items() if k != "arch"}
        workdir = arg("--workdir", os.environ.get("UNSLOTH_BENCH_DIR", os.path.join(tempfile.gettempdir(), "unsloth_bench")))
        path = os.path.join(workdir, f"ckpt-{shape}")
        try:
            with open(os.path.join(path, MARKER)) as f:
                ready = json.load(f).get("shape") == shape
        except (OSError, ValueError):
            ready = False
        if not ready:
            os.makedirs(workdir, exist_ok=True)
            t0 = time.perf_counter()
            timeout = int(arg("--timeout", "0")) or None
            p = subprocess.run([sys.executable, os.path.abspath(__file__), "--_build", path, "--shape", shape],
                               capture_output=True, text=True, timeout=timeout)
            if p.returncode != 0 or not os.path.exists(os.path.join(path, MARKER)):
                raise RuntimeError(f"checkpoint build failed (rc {p.returncode}): {(p.stderr or p.stdout)[-2000:]}")
            took = time.perf_counter() - t0
            print(f"checkpoint {path} built in {took:.1f} s", file=sys.stderr)
            if timeout:  # unsloth_qlora.py's watchdog gets what is left
                sys.argv[sys.argv.index("--timeout") + 1] = str(max(1, int(timeout - took)))
    except BaseException as e:  # noqa: B902 -- one JSON line whatever happens
        res["error"] = f"{type(e).__name__}: {e}"[:2000]
        print(json.dumps(res), flush=True)
        sys.exit(1)
    if "--shape" in sys.argv[:-1]:
        sys.argv[sys.argv.index("--shape") + 1] = shape
    uq.main()  # prints the JSON line and exits


if __name__ == "__main__":
    main()
