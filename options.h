// options.h: the flags of both trainers (./qlora on the GPU, ./qlora_cpu) and of every mode (train,
// sample, quantize, merge), in one table: each flag's name, where it applies, its help line and the
// Options field it sets. An Options as constructed holds the defaults, which --help prints.
#pragma once
#include "qlora.h"      // defines: ql_assert, LoraConfig, lora_targets_parse, QT_NF4, NF4_BLOCKSIZE
#include <functional>   // defines: std::function (a flag's setter)

// where a flag applies: the modes, and for train/sample the binaries (quantize and merge are the
// same code in both)
enum FlagWhere : unsigned { TRAIN = 1, SAMPLE = 2, QUANTIZE = 4, MERGE = 8, GPU = 16, CPU = 32, BOTH = GPU | CPU };
inline const char* mode_name(unsigned mode) {
    return mode == TRAIN ? "train" : mode == SAMPLE ? "sample" : mode == QUANTIZE ? "quantize" : "merge";
}

struct Options {
    // model and data
    std::string model = "random:tiny";   // DIR (Hugging Face checkpoint) or random:NAME
    std::string train, val;              // token files (dev/data/prepare.py); no --train: synthetic data (GPU)
    std::string vocab;                   // vocabulary table (dev/data/prepare.py), default MODEL/vocab.bin
    std::string out;                     // adapter + resume state (train), the checkpoint (quantize, merge)
    std::string resume;                  // directory with state.safetensors (an earlier --out)
    std::string adapter;                 // PEFT adapter to start from / sample with / merge
    std::string log;                     // log file ("" = none)
    // the run
    int batch = 4;
    int seq = 512;
    int steps = 20;
    int grad_accum = 1;
    int warmup = 0;
    float lr = 2e-4f;
    float min_lr_frac = 0.1f;   // the cosine ends at min_lr_frac * lr
    float weight_decay = 0.0f;
    float clip = 1.0f;
    LoraConfig lora;   // --rank --alpha --dropout --rslora --targets; --adapter replaces it
    uint64_t seed = 1234;
    bool recompute = false;
    bool offload = false;    // residual stream checkpoints in pinned host memory (implies recompute)
    bool keep_weights = true;   // without recompute, the forward's dequantized weights serve the backward (the plan's choice)
    bool keep_attention = true;   // with recompute, every layer's attention output + LSE kept: a recompute skips attention (the plan's choice)
    double gpu_memory = 0;   // GiB the run may take (0: what the GPU has free)
    bool profile = false;
    double peak_tflops = 700.0;   // measured bf16 GEMM peak for MFU (../shared/bench/gemm_peak.py)
    int threads = 0;              // CPU trainer: 0 = every core
    std::string dist_init;        // data parallel: how the ranks meet (dist.h); "" = by the launcher
    double dist_timeout = 600;    // data parallel: seconds a rank waits for the others before giving up
    // reports and checkpoints
    int log_every = 1;   // step lines on stdout every N steps (the --log file gets every step)
    int eval_every = 0;
    int eval_batches = 0;    // validation loss over the first K batches (0: the whole file)
    int eval_examples = 0;   // accuracy on the first K examples (0: all)
    int samples = 3;         // generations printed before and after
    int save_every = 0;
    int max_bad_steps = 5;
    // sample
    std::vector<std::string> prompts;
    int max_new = 64;
    float temperature = 0.0f;   // 0: greedy
    float top_p = 1.0f;
    // quantize, merge
    int quant_type = QT_NF4;
    int blocksize = NF4_BLOCKSIZE;
    bool double_quant = true;
    bool requant = false;
    bool onto_original = false;
    // test hooks
    int inject_nan = -1;        // NaN gradients from this step ...
    int inject_nan_steps = 1;   // ... for this many steps
    int inject_oom = -1;        // a failing cudaMalloc (out of memory) at this step
};

// The command line, read one flag at a time: value() / read() consume the current flag's argument,
// with a clear error when it is missing, not a number, not an integer or out of range.
struct Args {
    int argc;
    char** argv;
    int i = 0;
    bool more() { return ++i < argc; }
    std::string flag() const { return argv[i]; }
    std::string value() {
        ql_assert(i + 1 < argc, "%s needs a value (see --help)", argv[i]);
        return argv[++i];
    }
    double number(double lo, double hi, bool integer) {
        std::string f = flag(), v = value();
        char* end;
        double d = strtod(v.c_str(), &end);
        ql_assert(!v.empty() && *end == 0 && d >= lo && d <= hi && (!integer || d == floor(d)), "%s %s: expected %s in [%g, %g]",
                  f.c_str(), v.c_str(), integer ? "an integer" : "a number", lo, hi);
        return d;
    }
    void read(int& x, double lo, double hi) { x = (int)number(lo, hi, true); }
    void read(uint64_t& x, double lo, double hi) { x = (uint64_t)number(lo, hi, true); }
    void read(float& x, double lo, double hi) { x = (float)number(lo, hi, false); }
    void read(double& x, double lo, double hi) { x = number(lo, hi, false); }
};

inline std::string show_value(int x) {
    return std::to_string(x);
}
inline std::string show_value(uint64_t x) {
    return std::to_string(x);
}
inline std::string show_value(double x) {
    char b[32];
    snprintf(b, sizeof b, "%g", x);
    return b;
}
inline std::string show_value(const std::string& s) {
    return s.empty() ? "" : s;
}

struct Flag {
    const char* name;
    const char* arg;   // the value's name in the help ("" for a switch)
    unsigned where;    // FlagWhere bits
    const char* help;
    std::function<void(Options&, Args&)> set;
    std::function<std::string(const Options&)> show;   // the default, for --help ("" : none shown)
};
#define QL_NUM(name, arg, where, field, lo, hi, help)                                                        \
    Flag {                                                                                                   \
        name, arg, where, help, [](Options& o, Args& a) { a.read(o.field, lo, hi); }, [](const Options& o) { \
            return show_value(o.field);                                                                      \
        }                                                                                                    \
    }
#define QL_STR(name, arg, where, field, help)                                                            \
    Flag {                                                                                               \
        name, arg, where, help, [](Options& o, Args& a) { o.field = a.value(); }, [](const Options& o) { \
            return show_value(o.field);                                                                  \
        }                                                                                                \
    }
#define QL_SWITCH(name, where, field, value, help)                                              \
    Flag {                                                                                      \
        name, "", where, help, [](Options& o, Args&) { o.field = value; }, [](const Options&) { \
            return std::string();                                                               \
        }                                                                                       \
    }

inline const std::vector<Flag>& flag_table() {
    static const std::vector<Flag> t = {
        QL_STR("--model", "DIR|random:NAME", TRAIN | SAMPLE | QUANTIZE | MERGE | BOTH, model,
               "Hugging Face checkpoint; random:NAME: random weights of a real shape (GPU; tiny, llama3-1b/3b/8b/70b/405b, "
               "qwen2.5-7b, qwen3-8b)"),
        QL_STR("--train", "FILE", TRAIN | BOTH, train, "token file (dev/data/prepare.py); ./qlora without it: random tokens"),
        QL_SWITCH("--synthetic-data", TRAIN | GPU, train, "", "random tokens (the default without --train)"),
        QL_STR("--val", "FILE", TRAIN | SAMPLE | BOTH, val,
               "validation token file: loss and task accuracy (greedy, exact match); sample: its prompts"),
        QL_STR("--vocab", "FILE", TRAIN | SAMPLE | BOTH, vocab, "vocabulary table for printed samples (default MODEL/vocab.bin)"),
        QL_STR("--out", "DIR", TRAIN | QUANTIZE | MERGE | BOTH, out,
               "train: the adapter (PEFT files) and the resume state; quantize, merge: the checkpoint. Locked for the run, "
               "replaced whole at each save"),
        QL_STR("--resume", "DIR", TRAIN | BOTH, resume, "continue the run saved in DIR (an earlier --out), bit for bit"),
        QL_NUM("--save-every", "N", TRAIN | BOTH, save_every, 0, 1e9, "save --out every N steps (0: at the end only)"),
        QL_STR("--adapter", "DIR", TRAIN | SAMPLE | MERGE | BOTH, adapter,
               "a PEFT LoRA adapter: start from it (its r, alpha, rslora, targets), sample with it, merge it"),
        QL_NUM("--batch", "N", TRAIN | BOTH, batch, 1, 4096, "sequences per micro-batch"),
        QL_NUM("--seq", "T", TRAIN | BOTH, seq, 2, 1 << 20, "tokens per sequence"),
        QL_NUM("--steps", "N", TRAIN | BOTH, steps, 0, 1e9, "optimizer steps"),
        QL_NUM("--grad-accum", "K", TRAIN | GPU, grad_accum, 1, 1 << 16, "micro-batches per optimizer step"),
        QL_NUM("--lr", "X", TRAIN | BOTH, lr, 0, 10, "peak learning rate"),
        QL_NUM("--warmup", "N", TRAIN | BOTH, warmup, 0, 1e9, "linear warmup steps, then cosine"),
        QL_NUM("--min-lr-frac", "X", TRAIN | BOTH, min_lr_frac, 0, 1, "the cosine ends at this fraction of --lr"),
        QL_NUM("--weight-decay", "X", TRAIN | BOTH, weight_decay, 0, 10, "AdamW weight decay"),
        QL_NUM("--clip", "X", TRAIN | BOTH, clip, 0, 1e9, "gradient norm clipping (0: none)"),
        QL_NUM("--rank", "R", TRAIN | BOTH, lora.rank, 1, 4096, "LoRA rank"),
        QL_NUM("--alpha", "A", TRAIN | BOTH, lora.alpha, 0, 1e6, "LoRA alpha (scale alpha/r)"),
        QL_NUM("--dropout", "P", TRAIN | BOTH, lora.dropout, 0, 0.99, "LoRA dropout"),
        QL_SWITCH("--rslora", TRAIN | BOTH, lora.rslora, true, "scale alpha/sqrt(r)"),
        Flag{"--targets", "LIST", TRAIN | BOTH, "LoRA on these projections (q,k,v,o,gate,up,down)",
             [](Options& o, Args& a) { o.lora.targets = lora_targets_parse(a.value()); },
             [](const Options& o) {
                 return lora_targets_text(o.lora.targets);
             }},
        QL_NUM("--seed", "S", TRAIN | SAMPLE | BOTH, seed, 0, 1e18, "LoRA init, data order, dropout; sampling"),
        QL_SWITCH("--recompute", TRAIN | GPU, recompute, true, "recompute each layer's activations in backward (less memory; each layer's attention output is kept, so "
                  "the recompute skips attention, unless --gpu-memory has no room for it)"),
        QL_SWITCH("--offload", TRAIN | GPU, offload, true,
                  "keep each layer's residual stream checkpoint in pinned host memory, copied out and back on a second "
                  "stream while other layers compute (implies --recompute)"),
        QL_NUM("--gpu-memory", "GiB", TRAIN | GPU, gpu_memory, 0, 1e6,
               "memory budget; the dequantized weights are dropped, then recompute and offload switched on, then the attention "
               "outputs recomputed too, when the run does not fit without them (0: what is free)"),
        QL_NUM("--threads", "N", TRAIN | SAMPLE | CPU, threads, 0, 1024, "CPU threads (0: every core)"),
        QL_STR(
            "--dist-init", "HOW", TRAIN | GPU, dist_init,
            "data parallel (mpirun/srun/torchrun): how the ranks meet: file:PATH, tcp:HOST:PORT or mpi (default: mpi under mpirun "
            "if built with MPI, tcp:MASTER_ADDR:MASTER_PORT+1 under torchrun)"),
        QL_NUM("--dist-timeout", "S", TRAIN | GPU, dist_timeout, 1, 1e7,
               "data parallel: seconds to wait for the other ranks before giving up"),
        QL_NUM("--eval-every", "N", TRAIN | BOTH, eval_every, 0, 1e9, "validation report every N steps (0: before and after only)"),
        QL_NUM("--eval-batches", "K", TRAIN | GPU, eval_batches, 0, 1e6, "validation loss over the first K batches (0: all)"),
        QL_NUM("--eval-examples", "K", TRAIN | SAMPLE | BOTH, eval_examples, 0, 1e9, "accuracy over the first K prompts (0: all)"),
        QL_NUM("--samples", "K", TRAIN | SAMPLE | BOTH, samples, 0, 1e6, "generations printed"),
        QL_NUM("--log-every", "N", TRAIN | BOTH, log_every, 1, 1e9, "a step line every N steps (and the first and last)"),
        QL_STR("--log", "FILE", TRAIN | GPU, log, "every step line also to FILE"),
        QL_NUM("--max-bad-steps", "K", TRAIN | BOTH, max_bad_steps, 1, 1e6, "stop after K non-finite steps in a row"),
        QL_NUM("--peak-tflops", "X", TRAIN | GPU, peak_tflops, 1, 1e6, "the GPU's bf16 GEMM peak, for MFU"),
        QL_SWITCH("--profile", TRAIN | GPU, profile, true, "GPU time per kind of op, printed at the end"),
        Flag{"--prompt", "TEXT", SAMPLE | BOTH, "a prompt to continue (repeatable; special tokens by name, e.g. <|user|>)",
             [](Options& o, Args& a) { o.prompts.push_back(a.value()); },
             [](const Options&) {
                 return std::string();
             }},
        QL_NUM("--max-new", "N", SAMPLE | BOTH, max_new, 1, 1 << 20, "new tokens at most"),
        QL_NUM("--temperature", "T", SAMPLE | BOTH, temperature, 0, 100, "0: greedy; else nucleus sampling"),
        QL_NUM("--top-p", "P", SAMPLE | BOTH, top_p, 0, 1, "nucleus sampling's probability mass"),
        Flag{"--quant-type", "nf4|fp4", QUANTIZE, "the 4-bit code",
             [](Options& o, Args& a) {
                 std::string v = a.value();
                 ql_assert(v == "nf4" || v == "fp4", "--quant-type %s: nf4 or fp4", v.c_str());
                 o.quant_type = v == "nf4" ? QT_NF4 : QT_FP4;
             },
             [](const Options& o) {
                 return std::string(quant_type_name(o.quant_type));
             }},
        QL_NUM("--blocksize", "N", QUANTIZE, blocksize, 32, 4096, "elements per absmax block (32, 64, ..., 4096)"),
        QL_SWITCH("--no-double-quant", QUANTIZE, double_quant, false, "keep absmax in fp32"),
        QL_SWITCH("--requant", MERGE, requant, true, "write the merged checkpoint in bitsandbytes 4-bit"),
        QL_SWITCH("--onto-original", MERGE, onto_original, true, "merge onto the stored weights, not their NF4 version"),
        Flag{"--inject-nan", "STEP K", TRAIN | BOTH, "(testing) NaN gradients at steps STEP..STEP+K-1",
             [](Options& o, Args& a) {
                 a.read(o.inject_nan, 0, 1e9);
                 a.read(o.inject_nan_steps, 1, 1e9);
             },
             [](const Options&) {
                 return std::string();
             }},
        QL_NUM("--inject-oom", "STEP", TRAIN | GPU, inject_oom, 0, 1e9, "(testing) a GPU allocation fails at STEP"),
    };
    return t;
}

// What a resume must share with the run it continues (formats.h §11b: state_write, state_read): the
// model, the LoRA layout, the batch shape, the seed and the data. Both trainers write the same text,
// so a state one of them saved resumes in the other.
inline std::string run_signature(const Options& o, const LoraConfig& lc) {
    char b[512];
    snprintf(b, sizeof b,
             "state v2 (LoRA layout: per layer A's then B's) model=%s rank=%d alpha=%.9g rslora=%d targets=%u batch=%d seq=%d "
             "accum=%d seed=%llu train=%s",
             o.model.c_str(), lc.rank, lc.alpha, (int)lc.rslora, lc.targets, o.batch, o.seq, o.grad_accum,
             (unsigned long long)o.seed, o.train.c_str());
    return b;
}

// whether a flag is taken by this mode of this binary (quantize and merge: either binary)
inline bool flag_applies(const Flag& f, unsigned mode, unsigned binary) {
    return (f.where & mode) && (mode == QUANTIZE || mode == MERGE || (f.where & binary));
}

inline void print_help(const char* prog, unsigned mode, unsigned binary) {
    static const char* what[] = {"",
                                 "fine-tune LoRA adapters on a 4-bit base model",
                                 "continue prompts with a model (+ adapter)",
                                 "",
                                 "write a bitsandbytes 4-bit checkpoint, as transformers saves one (CPU)",
                                 "",
                                 "",
                                 "",
                                 "write base + adapter as a bf16 checkpoint (--requant: 4-bit) (CPU)"};
    printf("usage: %s %s[flags]: %s\n", prog, mode == TRAIN ? "" : (std::string(mode_name(mode)) + " ").c_str(), what[mode]);
    if (mode == TRAIN) printf("       %s sample|quantize|merge --help: the other modes\n", prog);
    Options defaults;
    for (const Flag& f : flag_table()) {
        if (!flag_applies(f, mode, binary)) continue;
        std::string head = std::string(f.name) + (*f.arg ? " " : "") + f.arg, d = f.show(defaults);
        printf("  %-28s %s%s\n", head.c_str(), f.help, d.empty() ? "" : (" (" + d + ")").c_str());
    }
}

// Reads argv[first..] for `mode` of `binary`: an unknown flag, or one another mode or binary takes,
// is an error that says so.
inline Options parse_options(int argc, char** argv, unsigned mode, unsigned binary, const char* prog) {
    Options o;
    Args args{argc, argv};
    while (args.more()) {
        std::string a = args.flag();
        if (a == "--help" || a == "-h") {
            print_help(prog, mode, binary);
            exit(0);
        }
        const Flag* f = nullptr;
        for (const Flag& x : flag_table())
            if (a == x.name) f = &x;
        ql_assert(f, "unknown flag %s (see %s %s--help)", a.c_str(), prog,
                  mode == TRAIN ? "" : (std::string(mode_name(mode)) + " ").c_str());
        if (!flag_applies(*f, mode, binary)) {
            bool other_binary = (f->where & mode) != 0;
            ql_fail("%s is not a flag of %s %s%s", a.c_str(), prog, mode_name(mode),
                    other_binary
                        ? (binary == CPU ? " on the CPU (./qlora on a GPU takes it)" : " on the GPU (./qlora_cpu takes it)")
                        : "");
        }
        f->set(o, args);
    }
    // directories without their trailing slashes: "data/base/" would name "data/base//config.json"
    for (std::string* d : {&o.model, &o.out, &o.resume, &o.adapter})
        while (d->size() > 1 && d->back() == '/') d->pop_back();
    if (o.vocab.empty() && o.model.rfind("random:", 0) != 0) o.vocab = o.model + "/vocab.bin";
    return o;
}
