// qlora_cpu.cpp: the CPU trainer. The training ./qlora does (LoRA on a Llama whose decoder linears
// are NF4, packed token files, AdamW, clipping, the same LR schedule), computed by reference.h in
// fp32 plain loops: slow, but it runs anywhere, and it is the spec. Before and after training it
// prints the validation loss, the task accuracy (greedy decoding of every validation prompt, exact
// match with its answer) and a few generations decoded to text; the adapter is saved in PEFT format.
//   make && ./qlora_cpu --model data/base --train data/task/reverse.train.tok --val data/task/reverse.val.tok
#include "reference.h"   // defines: RefModel, ref_model_load, RefBatch, RefActs, ref_forward, ref_backward, ref_clip_grad_norm, ref_adamw
#include "dataloader.h"  // defines: TokenFile, token_file_open, Loader, Batch, eval_batches, Example, examples_of
#include "generate.h"    // defines: Vocab, vocab_load, greedy_token, exact_match, print_sample, print_report
#include "tools.h"       // defines: Options, parse_options, tool_dispatch (quantize, merge)
#include <chrono>        // defines: steady_clock (tokens/s)
#include <thread>        // defines: std::thread (micro-batches and prompts spread over the cores)

// ---------------------------------------------------------------------------------------------
// options: ./qlora's flags (options.h), those of the CPU trainer

static Options parse_args(int argc, char** argv) {
    Options o = parse_options(argc, argv, TRAIN, CPU, "qlora_cpu");
    ql_assert(!o.train.empty() || o.steps == 0, "--train FILE is needed (make one with dev/data/prepare.py)");
    ql_assert(o.model.rfind("random:", 0) != 0, "--model %s: the CPU trainer needs a checkpoint directory (random: is ./qlora's)",
              o.model.c_str());
    if (o.threads == 0) o.threads = (int)std::max(1u, std::thread::hardware_concurrency());
    o.threads = std::min(o.threads, o.batch);
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

static void trainer_init(CpuTrainer& t, const Options& o) {
    t.o = o;
    rcp_table_load("data/rcp_delta.bin");   // bitsandbytes' 1/absmax, where the repository is the working directory
    ref_model_load(t.m, o.model);           // decoder linears NF4-quantized as bitsandbytes does, then dequantized
    const Config& c = t.m.cfg;
    ql_assert(o.seq <= c.max_seq_len, "--seq %d is longer than the model allows (max_position_embeddings %d)", o.seq, c.max_seq_len);
    ql_assert(c.sliding_window == 0 || o.seq <= c.sliding_window, "--seq %d exceeds the model's sliding_window %d, which qlora does not implement",
              o.seq, c.sliding_window);
    t.lc = o.lora;
    size_t n = lora_num_params(c, t.lc);
    t.lora.resize(n); lora_init(t.lora.data(), c, t.lc, o.seed);   // B = 0: the adapter starts as the identity
    t.adam_m.assign(n, 0); t.adam_v.assign(n, 0); t.grad.assign(n, 0);
    t.grads.assign(o.threads, std::vector<float>(n));
    t.acts.resize(o.threads);
    printf("model %s: H %d I %d L %d heads %d/%d hd %d V %d%s | NF4 frozen linears | LoRA r %d alpha %g on %s | %.3f M trainable\n",
           o.model.c_str(), c.dim, c.hidden_dim, c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim, c.vocab_size, config_tags(c).c_str(),
           t.lc.rank, t.lc.alpha, lora_targets_text(t.lc.targets).c_str(), n / 1e6);
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
static float train_step(CpuTrainer& t, const Batch& b, int step, float lr, float* norm) {
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
    *norm = ref_clip_grad_norm(t.grad.data(), n, o.clip);
    ref_adamw(t.lora.data(), t.grad.data(), t.adam_m.data(), t.adam_v.data(), n, step + 1, lr, 0.9, 0.999, 1e-8, o.weight_decay);
    float loss = 0; for (float x : part) loss += x;
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

// The most likely next token after ids: one full forward over the whole sequence (no KV cache on
// the CPU: simple, and cheap at these lengths); ties go to the lower id.
static int greedy_next(const RefModel& m, const LoraConfig& lc, const float* lora, RefActs<float>& a, const std::vector<int>& ids) {
    int T = (int)ids.size(), V = m.cfg.vocab_size;
    std::vector<int> no_targets(T, -1);
    RefBatch b; b.inputs = ids.data(); b.targets = no_targets.data(); b.B = 1; b.T = T;
    ref_acts_alloc(a, m.cfg, lc, 1, T);
    ref_forward(m, lc, lora, a, b);
    return greedy_token(&a.logits[(size_t)(T - 1) * V], V);
}

// Greedy continuation of prompt: stops after the end-of-turn token `eos` or max_new tokens, or at
// max_seq_len. want (optional): stop at the first token that differs from it (enough for exact match).
static std::vector<int> generate(const RefModel& m, const LoraConfig& lc, const float* lora, RefActs<float>& a, const std::vector<int>& prompt,
                                 int max_new, int eos, const std::vector<int>* want = nullptr) {
    std::vector<int> ids = prompt, out;
    while ((int)out.size() < max_new && (int)ids.size() < m.cfg.max_seq_len) {
        int next = greedy_next(m, lc, lora, a, ids);
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

#ifndef QLORA_TESTING
int main(int argc, char** argv) {
    int rc = tool_dispatch(argc, argv, CPU, "qlora_cpu");
    if (rc >= 0) return rc;
    Options o = parse_args(argc, argv);
    printf("qlora_cpu: the CPU reference trainer (reference.h, fp32 loops, %d threads): ./qlora's training, slower\n", o.threads);
    CpuTrainer t;
    trainer_init(t, o);
    TokenFile train, val;
    if (!o.train.empty()) token_file_open(train, o.train, t.m.cfg.vocab_size);
    if (!o.val.empty()) token_file_open(val, o.val, t.m.cfg.vocab_size);
    Vocab vocab; bool have_vocab = file_exists(o.vocab);
    if (have_vocab) vocab_load(vocab, o.vocab);
    else printf("note: no vocabulary table %s (dev/data/prepare.py writes it): samples shown as token ids\n", o.vocab.c_str());
    std::vector<Example> ex = o.val.empty() ? std::vector<Example>() : examples_of(val);
    if (o.eval_examples && (int)ex.size() > o.eval_examples) ex.resize(o.eval_examples);
    if (!o.train.empty()) printf("data: %s (%llu tokens, %llu examples)", o.train.c_str(), (unsigned long long)train.n_tokens, (unsigned long long)train.n_docs);
    if (!o.val.empty()) printf(", validation %s (%llu tokens, %zu prompts)", o.val.c_str(), (unsigned long long)val.n_tokens, ex.size());
    printf("\n");

    auto t_start = std::chrono::steady_clock::now();
    if (!o.val.empty()) report(t, "before", val, ex, have_vocab ? &vocab : nullptr);
    Loader loader;
    if (o.steps) loader.init(&train, o.seed, true);
    Batch b; double tokens = 0, seconds = 0;
    for (int step = 0; step < o.steps; step++) {
        auto t0 = std::chrono::steady_clock::now();
        loader.next(b, o.batch, o.seq);
        float lr = lr_at(o, step), norm = 0;
        float loss = train_step(t, b, step, lr, &norm);
        double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        tokens += (double)o.batch * o.seq; seconds += dt;
        if ((step + 1) % o.log_every == 0 || step == 0 || step + 1 == o.steps)
            printf("step %5d/%d | loss %.4f | lr %.3e | norm %.4f | %.0f tok/s\n", step + 1, o.steps, loss, lr, norm, o.batch * o.seq / dt);
        if (o.eval_every && !o.val.empty() && (step + 1) % o.eval_every == 0 && step + 1 < o.steps)
            printf("eval  %5d | val loss %.4f\n", step + 1, evaluate_loss(t, val));
        fflush(stdout);
    }
    if (o.steps) printf("trained %d steps in %.1f s (%.0f tok/s)\n", o.steps, seconds, tokens / seconds);
    if (!o.val.empty()) report(t, "after", val, ex, have_vocab ? &vocab : nullptr);
    if (!o.out.empty()) {
        peft_adapter_write(o.out, t.m.cfg, t.lc, t.lora.data(), o.model);
        printf("adapter saved to %s (PEFT format)\n", o.out.c_str());
    }
    printf("total %.1f s\n", std::chrono::duration<double>(std::chrono::steady_clock::now() - t_start).count());
    return 0;
}
#endif
