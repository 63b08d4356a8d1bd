// qlora_cpu.cpp: the CPU trainer. The training ./qlora does (LoRA on a Llama whose decoder linears
// are NF4, packed token files, AdamW, clipping, the same LR schedule), computed by reference.h in
// fp32 plain loops: slow, but it runs anywhere, and it is the spec. Before and after training it
// prints the validation loss, the task accuracy (greedy decoding of every validation prompt, exact
// match with its answer) and a few generations decoded to text; the adapter is saved in PEFT format
// with the resume state, as ./qlora saves them (and `--resume` continues either's run).
//   make && ./qlora_cpu --model data/base --train data/task/reverse.train.tok --val data/task/reverse.val.tok
//   ./qlora_cpu sample --model data/base --adapter build/adapter --prompt '<|user|>reverse: hello<|end|><|assistant|>'
#include "reference.h"   // defines: RefModel, ref_model_load, RefBatch, RefActs, ref_acts_bytes, ref_forward, ref_backward, ref_clip_grad_norm, ref_adamw
#include "dataloader.h"  // defines: TokenFile, token_file_open, token_file_require_targets, Loader, Batch, eval_batches, Example, examples_of
#include "generate.h"    // defines: Vocab, vocab_load, choose_token, exact_match, print_sample, print_report, prompt_ids, eta_text
#include "tools.h"       // defines: Options, parse_options, run_signature, tool_dispatch (quantize, merge), out_lock, out_write_set, state_write/read
#include <chrono>        // defines: steady_clock (tokens/s)
#include <thread>        // defines: std::thread (micro-batches and prompts spread over the cores)
#include <signal.h>      // defines: sigaction (SIGINT/SIGTERM: save and exit)

// ---------------------------------------------------------------------------------------------
// options: ./qlora's flags (options.h), those of the CPU trainer

static Options parse_args(int argc, char** argv, unsigned mode = TRAIN) {
    Options o = parse_options(argc, argv, mode, CPU, "qlora_cpu");
    ql_assert(mode != TRAIN || !o.train.empty() || o.steps == 0, "--train FILE is needed (make one with dev/data/prepare.py)");
    ql_assert(o.model.rfind("random:", 0) != 0, "--model %s: the CPU trainer needs a checkpoint directory (random: is ./qlora's)",
              o.model.c_str());
    if (o.threads == 0) o.threads = (int)std::max(1u, std::thread::hardware_concurrency());
    if (mode == TRAIN) o.threads = std::min(o.threads, o.batch);
    return o;
}

// ---------------------------------------------------------------------------------------------
// the trainer: the frozen model, the LoRA parameters with their AdamW state, per-thread scratch

struct CpuTrainer {
    Options o;
    RefModel m;                                 // frozen: NF4 dequantized to fp32
    LoraConfig lc;
    std::vector<float> lora, adam_m, adam_v;    // (n_lora) fp32 master parameters and AdamW moments
    std::vector<float> grad;                    // (n_lora) the step's gradient, summed over threads
    std::vector<std::vector<float>> grads;      // (threads) x (n_lora) each thread's share of it
    std::vector<RefActs<float>> acts;           // (threads) activations of each thread's rows
};

// Runs f(w) for w = 0..n-1, each on its own thread (w = 0 on this one), and waits for all.
template <class F> static void parallel(int n, F f) {
    std::vector<std::thread> ts;
    for (int w = 1; w < n; w++) ts.emplace_back(f, w);
    f(0);
    for (auto& t : ts) t.join();
}

// ---------------------------------------------------------------------------------------------
// the memory plan: what a run will hold, added up from the config before anything is allocated, so
// that a batch too large for this machine stops with advice instead of std::bad_alloc mid-run

struct CpuMemPlan {
    double model = 0;    // the frozen weights, fp32
    double lora = 0;     // LoRA parameters, AdamW moments, the gradient and each thread's share of it
    double acts = 0;     // every thread's activations (ref_acts_sizes) for its rows of a batch
    double batch = 0;    // the packed batch (ids, targets, positions, segment starts)
    int threads = 1, rows = 1;
    double total() const { return model + lora + acts + batch; }
};
static CpuMemPlan cpu_memory_plan(const Config& c, const LoraConfig& lc, int batch, int seq, int threads) {
    CpuMemPlan p;
    for_each_weight(c, [&](const Weight& w) { p.model += 4.0 * w.numel(); });
    p.threads = std::max(1, std::min(threads, batch));
    p.rows = (batch + p.threads - 1) / p.threads;
    p.lora = 4.0 * lora_num_params(c, lc) * (4 + p.threads);
    p.acts = p.threads * ref_acts_bytes<float>(c, lc, p.rows, seq);
    p.batch = 16.0 * batch * seq;
    return p;
}
static std::string gib(double b) {
    char s[32];
    if (b >= 1073741824.0) snprintf(s, sizeof s, "%.2f GiB", b / 1073741824.0); else snprintf(s, sizeof s, "%.1f MiB", b / 1048576.0);
    return s;
}
// Prints the plan; refuses it, with the largest --batch that would fit, if it exceeds `available`.
static void cpu_memory_check(const Config& c, const LoraConfig& lc, const Options& o, double available) {
    CpuMemPlan p = cpu_memory_plan(c, lc, o.batch, o.seq, o.threads);
    printf("memory plan: model %s + LoRA and AdamW %s + activations %s (%d threads x %d rows x %d tokens) = %s of %s available\n",
           gib(p.model).c_str(), gib(p.lora).c_str(), gib(p.acts).c_str(), p.threads, p.rows, o.seq, gib(p.total()).c_str(), gib(available).c_str());
    if (p.total() <= available) return;
    int lo = 0, hi = o.batch;   // the largest batch that fits: lo fits (or is 0), hi does not
    while (hi - lo > 1) { int mid = (lo + hi) / 2; (cpu_memory_plan(c, lc, mid, o.seq, o.threads).total() <= available ? lo : hi) = mid; }
    std::string fits = lo > 0 ? "--batch " + std::to_string(lo) + " fits with --seq " + std::to_string(o.seq)
                              : "not even --batch 1 fits with --seq " + std::to_string(o.seq) + ": lower --seq";
    ql_fail("qlora_cpu needs about %s for --batch %d --seq %d (activations %s: they grow with batch x seq, attention with batch x seq^2), "
            "more than the %s this machine has available; %s (a larger batch on ./qlora: --grad-accum)",
            gib(p.total()).c_str(), o.batch, o.seq, gib(p.acts).c_str(), gib(available).c_str(), fits.c_str());
}

// The model and the LoRA parameters: from --adapter (its r, alpha, rslora and targets; dropout from
// the options) or PEFT's init. The memory plan is checked before the model is loaded.
static void trainer_init(CpuTrainer& t, const Options& o) {
    t.o = o;
    rcp_table_load("data/rcp_delta.bin");   // bitsandbytes' 1/absmax, where the repository is the working directory
    Config c = load_config(o.model + "/config.json");
    ql_assert(o.seq <= c.max_seq_len, "--seq %d is longer than the model allows (max_position_embeddings %d)", o.seq, c.max_seq_len);
    ql_assert(c.sliding_window == 0 || o.seq <= c.sliding_window, "--seq %d exceeds the model's sliding_window %d, which qlora does not implement",
              o.seq, c.sliding_window);
    t.lc = o.lora;
    std::vector<float> adapter;
    if (!o.adapter.empty()) { peft_adapter_read(o.adapter, c, t.lc, adapter); t.lc.dropout = o.lora.dropout; }
    cpu_memory_check(c, t.lc, o, memory_available());
    ref_model_load(t.m, o.model);           // decoder linears NF4-quantized as bitsandbytes does, then dequantized
    size_t n = lora_num_params(c, t.lc);
    if (o.adapter.empty()) { t.lora.resize(n); lora_init(t.lora.data(), c, t.lc, o.seed); }   // B = 0: the adapter starts as the identity
    else t.lora = adapter;
    t.adam_m.assign(n, 0); t.adam_v.assign(n, 0); t.grad.assign(n, 0);
    t.grads.assign(o.threads, std::vector<float>(n));
    t.acts.resize(o.threads);
    printf("model %s: H %d I %d L %d heads %d/%d hd %d V %d%s | NF4 frozen linears | LoRA r %d alpha %g on %s%s | %.3f M trainable\n",
           o.model.c_str(), c.dim, c.hidden_dim, c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim, c.vocab_size, config_tags(c).c_str(),
           t.lc.rank, t.lc.alpha, lora_targets_text(t.lc.targets).c_str(), o.adapter.empty() ? "" : (" from " + o.adapter).c_str(), n / 1e6);
}

// Rows [r0, r1) of a packed batch as a RefBatch.
static RefBatch rows_of(const Batch& b, int r0, int r1, float denom, uint64_t dropout_seed) {
    RefBatch rb;
    size_t at = (size_t)r0 * b.T;
    rb.inputs = b.ids.data() + at; rb.targets = b.targets.data() + at; rb.pos = b.pos.data() + at; rb.doc_start = b.doc_start.data() + at;
    rb.B = r1 - r0; rb.T = b.T; rb.denom = denom; rb.dropout_seed = dropout_seed; rb.row0 = r0;
    return rb;
}

// Evaluation and generation run the model as PEFT's eval() does: LoRA dropout off.
static LoraConfig eval_config(LoraConfig lc) { lc.dropout = 0.0f; return lc; }

// Σ -log p(target) over the batch's targets (forward only), its rows spread over the threads.
static double loss_sum(CpuTrainer& t, const Batch& b) {
    int nt = std::min(t.o.threads, b.B);
    std::vector<double> part(nt);
    parallel(nt, [&](int w) {
        int r0 = w * b.B / nt, r1 = (w + 1) * b.B / nt;
        ref_acts_alloc(t.acts[w], t.m.cfg, t.lc, r1 - r0, b.T);
        part[w] = ref_forward(t.m, eval_config(t.lc), t.lora.data(), t.acts[w], rows_of(b, r0, r1, 1.0f, 0));   // denom 1: the sum
    });
    double s = 0; for (double x : part) s += x;
    return s;
}

// One optimizer step on one packed batch: each thread takes a slice of the rows (gradient
// accumulation in parallel: every slice's loss is divided by the whole batch's target count),
// the slices' gradients are summed in a fixed order, clipped, and AdamW updates the parameters.
// A non-finite loss or gradient skips the update (*ok = false) with a warning naming the first LoRA
// tensor whose gradient holds one, as ./qlora does.
static float train_step(CpuTrainer& t, const Batch& b, int step, float lr, float* norm, bool* ok = nullptr) {
    const Options& o = t.o; int nt = o.threads;
    float denom = (float)b.count_targets();
    uint64_t drop_seed = mix64(o.seed ^ (uint64_t)step);   // --dropout > 0: the masks index the whole batch, whatever --threads
    std::vector<float> part(nt);
    parallel(nt, [&](int w) {
        int r0 = w * b.B / nt, r1 = (w + 1) * b.B / nt;
        RefBatch rb = rows_of(b, r0, r1, denom, drop_seed);
        ref_acts_alloc(t.acts[w], t.m.cfg, t.lc, rb.B, rb.T);
        std::fill(t.grads[w].begin(), t.grads[w].end(), 0.0f);
        part[w] = ref_forward(t.m, t.lc, t.lora.data(), t.acts[w], rb);
        ref_backward(t.m, t.lc, t.lora.data(), t.acts[w], rb, t.grads[w].data());
    });
    size_t n = t.grad.size();
    std::fill(t.grad.begin(), t.grad.end(), 0.0f);
    for (int w = 0; w < nt; w++) for (size_t i = 0; i < n; i++) t.grad[i] += t.grads[w][i];
    if (o.inject_nan >= 0 && step >= o.inject_nan && step < o.inject_nan + o.inject_nan_steps && n) t.grad[0] = NAN;   // test hook
    float loss = 0; for (float x : part) loss += x;
    size_t bad = 0;
    std::string where = lora_nonfinite(t.m.cfg, t.lc, t.grad.data(), &bad);
    bool finite = where.empty() && std::isfinite(loss);
    if (ok) *ok = finite;
    *norm = ref_clip_grad_norm(t.grad.data(), n, o.clip);
    if (!finite) {
        fprintf(stderr, "qlora: warning: step %d: loss %g, non-finite gradient in %s; update skipped\n", step + 1, loss,
                where.empty() ? "no gradient (the loss itself)" : (where + " (" + std::to_string(bad) + " non-finite values in all)").c_str());
        return loss;
    }
    ref_adamw(t.lora.data(), t.grad.data(), t.adam_m.data(), t.adam_v.data(), n, step + 1, lr, 0.9, 0.999, 1e-8, o.weight_decay);
    return loss;
}

static float lr_at(const Options& o, int step) { return lr_schedule(step, o.steps, o.warmup, o.lr, o.min_lr_frac); }

static float evaluate_loss(CpuTrainer& t, const TokenFile& f) {
    double sum = 0; long count = 0;
    for (const Batch& b : eval_batches(f, t.o.batch, t.o.seq)) { sum += loss_sum(t, b); count += b.count_targets(); }
    return count ? (float)(sum / count) : 0.0f;
}

// ---------------------------------------------------------------------------------------------
// generation and task accuracy

// How the next token is chosen (generate.h: choose_token): greedy unless temperature > 0.
struct GenSettings { float temperature = 0.0f, top_p = 1.0f; uint64_t seed = 0; };

// The logits of the token after ids: one full forward over the whole sequence (no KV cache on the
// CPU: simple, and cheap at these lengths).
static const float* next_logits(const RefModel& m, const LoraConfig& lc, const float* lora, RefActs<float>& a, const std::vector<int>& ids) {
    int T = (int)ids.size();
    std::vector<int> no_targets(T, -1);
    RefBatch b; b.inputs = ids.data(); b.targets = no_targets.data(); b.B = 1; b.T = T;
    ref_acts_alloc(a, m.cfg, lc, 1, T);
    ref_forward(m, lc, lora, a, b);
    return &a.logits[(size_t)(T - 1) * m.cfg.vocab_size];
}

// Continues prompt: stops after the end-of-turn token `eos` or max_new tokens, or at max_seq_len.
// want (optional): stop at the first token that differs from it (enough for exact match). Sampled
// draws as ./qlora's generate makes them: rng_uniform(seed, 7000 + stream, token index).
static std::vector<int> generate(const RefModel& m, const LoraConfig& lc, const float* lora, RefActs<float>& a, const std::vector<int>& prompt,
                                 int max_new, int eos, const std::vector<int>* want = nullptr, const GenSettings& gs = GenSettings(),
                                 uint64_t stream = 0) {
    std::vector<int> ids = prompt, out;
    while ((int)out.size() < max_new && (int)ids.size() < m.cfg.max_seq_len && !ids.empty()) {
        const float* z = next_logits(m, lc, lora, a, ids);
        int next = choose_token(z, m.cfg.vocab_size, gs.temperature, gs.top_p, rng_uniform(gs.seed, 7000 + stream, out.size()));
        out.push_back(next); ids.push_back(next);
        if (next == eos) break;
        if (want && (out.size() > want->size() || next != (*want)[out.size() - 1])) break;
    }
    return out;
}

// Exact-match accuracy: the greedy answer equals the reference answer token for token (end of turn
// included, so stopping in time counts too). Prompts are spread over the threads.
static int accuracy(CpuTrainer& t, const std::vector<Example>& ex) {
    int nt = std::min<int>(t.o.threads, std::max<size_t>(ex.size(), 1));
    std::vector<int> right(nt, 0);
    parallel(nt, [&](int w) {
        for (size_t i = w; i < ex.size(); i += nt) {
            const Example& x = ex[i];
            right[w] += exact_match(generate(t.m, eval_config(t.lc), t.lora.data(), t.acts[w], x.prompt, (int)x.answer.size(), -1, &x.answer), x.answer);
        }
    });
    int s = 0; for (int r : right) s += r;
    return s;
}

static void print_samples(CpuTrainer& t, const std::vector<Example>& ex, const Vocab* vocab) {
    int eos = vocab && vocab->eos != VOCAB_NONE ? (int)vocab->eos : -1;
    for (int i = 0; i < t.o.samples && i < (int)ex.size(); i++)
        print_sample(vocab, ex[i].prompt, generate(t.m, eval_config(t.lc), t.lora.data(), t.acts[0], ex[i].prompt, (int)ex[i].answer.size() + 8, eos), &ex[i].answer);
}

struct Report { float val_loss; int right, total; };
static Report report(CpuTrainer& t, const char* when, const TokenFile& val, const std::vector<Example>& ex, const Vocab* vocab) {
    auto t0 = std::chrono::steady_clock::now();
    Report r = {evaluate_loss(t, val), accuracy(t, ex), (int)ex.size()};
    double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    print_report(when, r.val_loss, r.right, r.total, dt);
    print_samples(t, ex, vocab);
    fflush(stdout);
    return r;
}

// ---------------------------------------------------------------------------------------------
// checkpoints: the adapter (PEFT files) and the resume state (formats.h §11b), the format ./qlora
// writes, switched into --out as one set (out_write_set)

static void save_state(CpuTrainer& t, const Loader& loader, int step, const std::string& dir) {
    ResumeState s;
    s.step = step; s.epoch = loader.st.epoch; s.cursor = loader.st.cursor; s.offset = loader.st.offset;
    s.lora = t.lora; s.adam_m = t.adam_m; s.adam_v = t.adam_v;
    out_write_set(dir, [&](const std::string& stage) {
        peft_adapter_write(stage, t.m.cfg, t.lc, t.lora.data(), t.o.model);
        state_write(stage, s, run_signature(t.o, t.lc));
    });
}
// The saved step; the parameters, both moments and the loader position as they were.
static int load_state(CpuTrainer& t, Loader& loader, const TokenFile* train, const std::string& dir) {
    ResumeState s = state_read(dir, run_signature(t.o, t.lc), t.lora.size());
    t.lora = s.lora; t.adam_m = s.adam_m; t.adam_v = s.adam_v;
    if (train) loader.init(train, t.o.seed, true, {s.epoch, s.cursor, s.offset});
    return s.step;
}

// SIGINT/SIGTERM: the first finishes the current step, saves and exits 0; a second exits at once
// (a save is switched in whole: nothing is left half-written).
static volatile sig_atomic_t g_stop = 0;
static void on_signal(int) { if (g_stop) _exit(130); g_stop = 1; }

// ---------------------------------------------------------------------------------------------
// the run: `./qlora_cpu [flags]` and `./qlora_cpu sample [flags]`

// What the tests look at besides the printed lines: every step's loss, and where the run stopped.
struct RunResult { std::vector<float> losses; int step = 0; };

// Trains as `./qlora_cpu` does; returns the exit status. after_step (tests): called after each step
// with its 0-based index.
static int train_run(const Options& o, RunResult* res = nullptr, const std::function<void(int)>& after_step = nullptr) {
    if (!o.out.empty()) out_lock(o.out);   // before any work: not a file, and no other run writing it
    printf("qlora_cpu: the CPU reference trainer (reference.h, fp32 loops, %d threads): ./qlora's training, slower\n", o.threads);
    CpuTrainer t;
    trainer_init(t, o);
    TokenFile train, val;
    if (!o.train.empty()) { token_file_open(train, o.train, t.m.cfg.vocab_size); token_file_require_targets(train, o.train, "--train"); }
    if (!o.val.empty()) { token_file_open(val, o.val, t.m.cfg.vocab_size); token_file_require_targets(val, o.val, "--val"); }
    Vocab vocab; bool have_vocab = file_exists(o.vocab);
    if (have_vocab) vocab_load(vocab, o.vocab);
    else printf("note: no vocabulary table %s (dev/data/prepare.py writes it): samples shown as token ids\n", o.vocab.c_str());
    std::vector<Example> ex = o.val.empty() ? std::vector<Example>() : examples_of(val);
    if (o.eval_examples && (int)ex.size() > o.eval_examples) ex.resize(o.eval_examples);
    if (!o.train.empty()) printf("data: %s (%llu tokens, %llu examples)", o.train.c_str(), (unsigned long long)train.n_tokens, (unsigned long long)train.n_docs);
    if (!o.val.empty()) printf(", validation %s (%llu tokens, %zu prompts)", o.val.c_str(), (unsigned long long)val.n_tokens, ex.size());
    printf("\n");

    auto t_start = std::chrono::steady_clock::now();
    Loader loader;
    if (!o.train.empty()) loader.init(&train, o.seed, true);
    int start = o.resume.empty() ? 0 : load_state(t, loader, o.train.empty() ? nullptr : &train, o.resume);
    if (start) printf("resumed from %s at step %d\n", o.resume.c_str(), start);
    if (!o.val.empty()) report(t, start ? "at resume" : "before", val, ex, have_vocab ? &vocab : nullptr);
    g_stop = 0;
    struct sigaction sa = {}; sa.sa_handler = on_signal; sigaction(SIGINT, &sa, nullptr); sigaction(SIGTERM, &sa, nullptr);
    Batch b; double tokens = 0, seconds = 0;
    int bad = 0, step = start;
    for (; step < o.steps && !g_stop; step++) {
        auto t0 = std::chrono::steady_clock::now();
        loader.next(b, o.batch, o.seq);
        float lr = lr_at(o, step), norm = 0; bool ok;
        float loss = train_step(t, b, step, lr, &norm, &ok);
        double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        tokens += (double)o.batch * o.seq; seconds += dt;
        if (res) res->losses.push_back(loss);
        if (!ok || (step + 1) % o.log_every == 0 || step == start || step + 1 == o.steps)
            printf("step %5d/%d | loss %.4f | lr %.3e | norm %.4f | %.0f tok/s | %s%s\n", step + 1, o.steps, loss, lr, norm, o.batch * o.seq / dt,
                   eta_text(seconds / (step + 1 - start) * (o.steps - step - 1)).c_str(), ok ? "" : " | SKIPPED: non-finite loss or gradient");
        bad = ok ? 0 : bad + 1;
        if (bad >= o.max_bad_steps) {
            fprintf(stderr, "qlora: error: %d steps in a row with non-finite loss or gradients (last: step %d); stopping. "
                    "The last good state is in %s\n", bad, step + 1, o.out.empty() ? "(no --out given)" : o.out.c_str());
            if (res) res->step = step + 1;
            return 1;
        }
        if (o.eval_every && !o.val.empty() && (step + 1) % o.eval_every == 0 && step + 1 < o.steps)
            printf("eval  %5d | val loss %.4f\n", step + 1, evaluate_loss(t, val));
        if (!o.out.empty() && o.save_every && (step + 1) % o.save_every == 0 && ok) save_state(t, loader, step + 1, o.out);
        fflush(stdout);
        if (after_step) after_step(step);
    }
    if (res) res->step = step;
    if (g_stop) printf("interrupted: saving at step %d\n", step);
    if (step > start) printf("trained %d steps in %.1f s (%.0f tok/s)\n", step - start, seconds, tokens / seconds);
    if (!o.val.empty() && !g_stop && step > start) report(t, "after", val, ex, have_vocab ? &vocab : nullptr);   // --steps 0: "before" is the report
    if (!o.out.empty()) {
        save_state(t, loader, step, o.out);
        printf("adapter and resume state saved to %s (PEFT format)\n", o.out.c_str());
    }
    printf("total %.1f s\n", std::chrono::duration<double>(std::chrono::steady_clock::now() - t_start).count());
    fflush(stdout);
    return 0;
}

// `qlora_cpu sample`, as `qlora sample`: the base model (or base + --adapter) continues --prompt
// texts or the prompts of a --val file (first --samples K, with their expected answers; greedy: the
// accuracy over --eval-examples too).
static int sample_run(Options o) {
    ql_assert(o.prompts.empty() != o.val.empty(), "qlora_cpu sample needs --prompt TEXT (one or more) or --val FILE, not both (see --help)");
    o.batch = 1; o.seq = 2; o.steps = 0; o.train.clear();   // the memory plan of one short row: generation sizes its own
    CpuTrainer t; trainer_init(t, o);
    Vocab vocab; bool have_vocab = !o.vocab.empty() && file_exists(o.vocab);
    if (have_vocab) vocab_load(vocab, o.vocab);
    const Vocab* v = have_vocab ? &vocab : nullptr;
    GenSettings gs; gs.temperature = o.temperature; gs.top_p = o.top_p; gs.seed = o.seed;
    int eos = v && vocab.eos != VOCAB_NONE ? (int)vocab.eos : -1;
    char how[96] = "greedy";
    if (o.temperature > 0) snprintf(how, sizeof how, "temperature %g, top-p %g, seed %llu", o.temperature, o.top_p, (unsigned long long)o.seed);
    printf("sample: %s%s | %s | up to %d new tokens%s\n", o.model.c_str(), o.adapter.empty() ? " (base model alone)" : (" + " + o.adapter).c_str(),
           how, o.max_new, v ? "" : " | no vocabulary table: token ids");
    std::vector<std::vector<int>> prompts; std::vector<Example> ex;
    if (!o.val.empty()) {
        TokenFile f; token_file_open(f, o.val, t.m.cfg.vocab_size);
        ex = examples_of(f);
        ql_assert(!ex.empty(), "%s has no prompts (no loss mask): use --prompt TEXT", o.val.c_str());
        if (o.temperature == 0) {
            std::vector<Example> scored(ex.begin(), ex.begin() + (o.eval_examples ? std::min<size_t>(o.eval_examples, ex.size()) : ex.size()));
            int right = accuracy(t, scored);
            printf("accuracy %d/%zu = %.1f%% (greedy, exact match) on %s\n", right, scored.size(), 100.0 * right / scored.size(), o.val.c_str());
        }
        ex.resize(std::min<size_t>(o.samples, ex.size()));
        for (const Example& x : ex) prompts.push_back(x.prompt);
    } else for (const std::string& p : o.prompts) prompts.push_back(prompt_ids(p, v));
    std::vector<std::vector<int>> got(prompts.size());
    int nt = std::min<int>(o.threads, std::max<size_t>(prompts.size(), 1));
    parallel(nt, [&](int w) {
        for (size_t i = w; i < prompts.size(); i += nt)
            got[i] = generate(t.m, eval_config(t.lc), t.lora.data(), t.acts[w], prompts[i], o.max_new, eos, nullptr, gs, i);
    });
    for (size_t i = 0; i < got.size(); i++) print_sample(v, prompts[i], got[i], ex.empty() ? nullptr : &ex[i].answer);
    return 0;
}

#ifndef QLORA_TESTING
int main(int argc, char** argv) {
    int rc = tool_dispatch(argc, argv, CPU, "qlora_cpu");
    if (rc >= 0) return rc;
    if (argc > 1 && !strcmp(argv[1], "sample")) return sample_run(parse_args(argc - 1, argv + 1, SAMPLE));
    return train_run(parse_args(argc, argv));
}
#endif
