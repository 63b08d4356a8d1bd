// test/test_reference_grad.cpp: the CPU reference's backward against central differences of its own
// forward (run in double), on a tiny random Llama with LoRA on all seven projections, and on tiny
// Qwen2-like (q/k/v biases) and Qwen3-like (per-head QK-norm before RoPE, head_dim != H/nh, with and
// without attention_bias) models; then the properties the trainer relies on: fp32 == fp64 up to
// roundoff, gradient accumulation, packed == unpacked sequences, an empty batch, QK-norm's per-head
// scale invariance, clipping and AdamW as torch computes them, and that it trains.
//   g++ -std=c++17 -O2 -Wall -o /tmp/trg test/test_reference_grad.cpp && /tmp/trg
#include "../qlora.h"      // defines: Config, for_each_weight, proj_has_bias, LoraConfig, lora_slot, lora_init, rng_uniform
#include "../reference.h"  // defines: RefModel, RefBatch, RefActs, ref_forward, ref_backward, ref_clip_grad_norm, ref_adamw
#include "test.h"          // defines: check, check_close, test_summary
#include <vector>          // defines: std::vector

static const int B = 2, T = 7;
// (B, T) token ids; targets are the next token, -1 where masked (row ends and two "prompt" tokens)
static const int INPUTS[B * T] = {5, 17, 42, 9, 33, 61, 2, 48, 3, 27, 14, 59, 8, 36};
static const int TARGETS[B * T] = {-1, 42, 9, 33, 61, 2, -1, 3, 27, -1, 59, 8, 36, -1};
// two documents per row: row 0 = [0, 3) + [3, 7), row 1 = [0, 5) + [5, 7); positions restart
static const int DOC_START[B * T] = {0, 0, 0, 3, 3, 3, 3, 0, 0, 0, 0, 0, 5, 5};
static const int POS[B * T] = {0, 1, 2, 0, 1, 2, 3, 0, 1, 2, 3, 4, 0, 1};

// U(lo, hi) from the counter RNG: the same numbers on every machine
static void fill_uniform(float* x, size_t n, uint64_t stream, float lo, float hi) {
    for (size_t i = 0; i < n; i++) x[i] = lo + (hi - lo) * rng_uniform(1234, stream, i);
}

static Config tiny_config(int n_kv_heads, bool tied) {
    Config c;
    c.dim = 32; c.hidden_dim = 48; c.n_layers = 2; c.n_heads = 4; c.n_kv_heads = n_kv_heads; c.head_dim = 8;
    c.vocab_size = 64; c.max_seq_len = 64; c.norm_eps = 1e-5f; c.tied = tied;
    // llama3 scaling, hd = 8: wavelengths 6.3, 63, 628, 6283 -> kept, kept, smoothed, divided by the factor
    c.rope_type = ROPE_LLAMA3; c.rope_factor = 8.0f; c.rope_low_freq = 1.0f; c.rope_high_freq = 4.0f; c.rope_orig_max = 1024;
    return c;
}

// Qwen2: biases on q, k, v (none on o), default RoPE with theta 1e6, tied like the small Qwen2.5s
static Config qwen2_config() {
    Config c = tiny_config(2, true);
    c.qkv_bias = true;
    c.rope_type = ROPE_DEFAULT; c.rope_theta = 1e6f; c.norm_eps = 1e-6f;
    return c;
}
// Qwen3: q_norm/k_norm over each head, head_dim 12 (nh*hd = 48 != H = 32); attention_bias adds q, k, v and o biases
static Config qwen3_config(bool attention_bias) {
    Config c = tiny_config(2, false);
    c.qk_norm = true; c.head_dim = 12;
    c.qkv_bias = c.o_bias = attention_bias;
    c.rope_type = ROPE_DEFAULT; c.rope_theta = 1e6f; c.norm_eps = 1e-6f;
    return c;
}

static void make_model(RefModel& m, const Config& c) {
    ref_model_alloc(m, c);
    size_t H = c.dim, V = c.vocab_size;
    fill_uniform(m.w.at(W_EMBED), V * H, 1, -1.0f, 1.0f);
    if (!c.tied) fill_uniform(m.w.at(W_LM_HEAD), V * H, 2, -0.3f, 0.3f);
    fill_uniform(m.w.at(W_FINAL_NORM), H, 3, 0.8f, 1.2f);
    for (int l = 0; l < c.n_layers; l++) {
        fill_uniform(m.w.at(W_ATTN_NORM, l), H, 10 + 10 * l, 0.8f, 1.2f);
        fill_uniform(m.w.at(W_MLP_NORM, l), H, 11 + 10 * l, 0.8f, 1.2f);
        for (int p = 0; p < N_PROJ; p++) {
            float b = 1.0f / sqrtf((float)proj_in(c, p));
            fill_uniform(m.w.linear[l][p], (size_t)proj_out(c, p) * proj_in(c, p), 12 + 10 * l + p, -b, b);
        }
    }
    // biases about as large as x·Wᵀ, QK-norm weights far from 1, so that a wrong use of either shows
    for_each_weight(c, [&](const Weight& w) {
        if (w.bias()) fill_uniform(m.w.at(w.id, w.layer), w.numel(), 200 + 10 * w.layer + w.id, -0.5f, 0.5f);
        if (w.id == W_Q_NORM || w.id == W_K_NORM) fill_uniform(m.w.at(w.id, w.layer), w.numel(), 300 + 10 * w.layer + w.id, 0.5f, 1.5f);
    });
}

// A as PEFT initialises it; B random (not PEFT's 0) so that every dA is nonzero too
static std::vector<float> random_lora(const Config& c, const LoraConfig& lc) {
    std::vector<float> w(lora_num_params(c, lc));
    lora_init(w.data(), c, lc, 7);
    for (int l = 0; l < c.n_layers; l++)
        for (int p = 0; p < N_PROJ; p++)
            if (lc.has(p)) fill_uniform(w.data() + lora_slot(c, lc, l, p).b, (size_t)proj_out(c, p) * lc.rank, 100 + l * N_PROJ + p, -0.2f, 0.2f);
    return w;
}

static RefBatch make_batch(const int* inputs, const int* targets, int b, int t, float denom,
                           const int* pos = nullptr, const int* doc_start = nullptr, uint64_t seed = 0) {
    RefBatch bt;
    bt.inputs = inputs; bt.targets = targets; bt.B = b; bt.T = t; bt.denom = denom;
    bt.pos = pos; bt.doc_start = doc_start; bt.dropout_seed = seed;
    return bt;
}

template <typename F>
static std::vector<F> grads(const RefModel& m, const LoraConfig& lc, const std::vector<F>& w, const RefBatch& bt, F* loss = nullptr) {
    RefActs<F> a;
    ref_acts_alloc(a, m.cfg, lc, bt.B, bt.T);
    F l = ref_forward(m, lc, w.data(), a, bt);
    if (loss) *loss = l;
    std::vector<F> g(w.size(), 0);
    ref_backward(m, lc, w.data(), a, bt, g.data());
    return g;
}

// Every LoRA gradient (all layers, A and B) against central differences of the fp64 forward; one line
// per projection. Budget: the loss (~4) has fp64 roundoff ~1e-15, which /2h gives ~1e-10; the
// truncation error h²·f'''/6 is ~1e-10; so atol 1e-8 + rtol 1e-6 leaves headroom, while a wrong or
// missing term is an O(1) relative error. Then the fp32 instantiation against fp64: fp32 roundoff
// (6e-8) grows through ~30 ops with sums of <= 64 terms to ~1e-6 of the gradient scale, so the budget
// is 1e-5 of the largest gradient (entries that cancel) + 1e-4 relative.
static void fd_check(const char* name, const Config& c, const LoraConfig& lc, const RefBatch& bt) {
    RefModel m;
    make_model(m, c);
    std::vector<float> w32 = random_lora(c, lc);
    std::vector<double> w(w32.begin(), w32.end());
    std::vector<double> g = grads(m, lc, w, bt);
    RefActs<double> a;
    ref_acts_alloc(a, c, lc, bt.B, bt.T);
    const double h = 1e-5;
    std::vector<double> fd(w.size());
    for (size_t i = 0; i < w.size(); i++) {
        double w0 = w[i];
        w[i] = w0 + h; double up = ref_forward(m, lc, w.data(), a, bt);
        w[i] = w0 - h; double down = ref_forward(m, lc, w.data(), a, bt);
        w[i] = w0;
        fd[i] = (up - down) / (2 * h);
    }
    int zero_tensors = 0;
    for (int p = 0; p < N_PROJ; p++) {
        std::vector<double> got, ref;
        for (int l = 0; l < c.n_layers; l++) {
            LoraSlot s = lora_slot(c, lc, l, p);
            size_t na = (size_t)lc.rank * proj_in(c, p), nb = (size_t)proj_out(c, p) * lc.rank;
            for (auto [off, n] : {std::pair<size_t, size_t>{s.a, na}, {s.b, nb}}) {
                double norm = 0;
                for (size_t i = off; i < off + n; i++) { got.push_back(g[i]); ref.push_back(fd[i]); norm += fd[i] * fd[i]; }
                zero_tensors += norm == 0;
            }
        }
        char label[96];
        snprintf(label, sizeof label, "%s %s dA,dB vs FD", name, PROJ_NAME[p]);
        check_close(label, got.data(), ref.data(), got.size(), 1e-8, 1e-6);
    }
    char label[96];
    snprintf(label, sizeof label, "%s all grads nonzero", name);
    check(zero_tensors == 0, "%-44s %d of %d tensors all zero", label, zero_tensors, 2 * N_PROJ * c.n_layers);

    std::vector<float> g32 = grads(m, lc, w32, bt);
    double gmax = 0;
    for (double x : g) gmax = fmax(gmax, fabs(x));
    snprintf(label, sizeof label, "%s fp32 grads vs fp64", name);
    check_close(label, g32.data(), g.data(), g.size(), 1e-5 * gmax, 1e-4);
}

// Two half-batches with the shared denom accumulate to the full batch's gradient (fp32: only the
// order of the row sums differs, so a few ulps of the largest gradient).
static void accumulation_check(const Config& c, const LoraConfig& lc) {
    RefModel m;
    make_model(m, c);
    std::vector<float> w = random_lora(c, lc);
    float denom = (float)ref_count_targets(TARGETS, B * T), loss_full, loss0, loss1;
    std::vector<float> full = grads(m, lc, w, make_batch(INPUTS, TARGETS, B, T, denom), &loss_full);
    std::vector<float> acc = grads(m, lc, w, make_batch(INPUTS, TARGETS, 1, T, denom), &loss0);
    std::vector<float> g1 = grads(m, lc, w, make_batch(INPUTS + T, TARGETS + T, 1, T, denom), &loss1);
    for (size_t i = 0; i < acc.size(); i++) acc[i] += g1[i];
    float sum = loss0 + loss1;
    check_close("accumulation: loss(h0) + loss(h1) == loss", &sum, &loss_full, 1, 0, 1e-6);
    check_close("accumulation: grad(h0) + grad(h1) == grad", acc.data(), full.data(), acc.size(), 1e-7, 1e-5);
}

// Two documents packed into one row (doc_start + restarted positions) == each run on its own:
// every row's arithmetic is the same, in the same order, so logits and losses agree to the bit;
// the gradients differ only in the order of the row sums.
static void packing_check(const char* name, const Config& c, const LoraConfig& lc) {
    RefModel m;
    make_model(m, c);
    std::vector<float> w = random_lora(c, lc);
    const int n1 = 3, n2 = T - n1;
    int targets[T];  // row 0 of TARGETS, with doc 1's last target (which would be doc 2's first token) masked
    for (int t = 0; t < T; t++) targets[t] = t == n1 - 1 ? -1 : TARGETS[t];
    float denom = (float)ref_count_targets(targets, T);
    RefBatch packed = make_batch(INPUTS, targets, 1, T, denom, POS, DOC_START);
    RefBatch doc1 = make_batch(INPUTS, targets, 1, n1, denom), doc2 = make_batch(INPUTS + n1, targets + n1, 1, n2, denom);
    RefActs<float> ap, a1, a2;
    ref_acts_alloc(ap, c, lc, 1, T); ref_acts_alloc(a1, c, lc, 1, n1); ref_acts_alloc(a2, c, lc, 1, n2);
    ref_forward(m, lc, w.data(), ap, packed);
    ref_forward(m, lc, w.data(), a1, doc1);
    ref_forward(m, lc, w.data(), a2, doc2);
    size_t V = c.vocab_size;
    check_close((std::string(name) + " packed == separate: logits, doc 1").c_str(), ap.logits.data(), a1.logits.data(), n1 * V, 0, 0);
    check_close((std::string(name) + " packed == separate: logits, doc 2").c_str(), ap.logits.data() + n1 * V, a2.logits.data(), n2 * V, 0, 0);
    check_close((std::string(name) + " packed == separate: losses, doc 1").c_str(), ap.losses.data(), a1.losses.data(), n1, 0, 0);
    check_close((std::string(name) + " packed == separate: losses, doc 2").c_str(), ap.losses.data() + n1, a2.losses.data(), n2, 0, 0);
    std::vector<float> gp = grads(m, lc, w, packed), g1 = grads(m, lc, w, doc1), g2 = grads(m, lc, w, doc2);
    for (size_t i = 0; i < g1.size(); i++) g1[i] += g2[i];
    check_close((std::string(name) + " packed == separate: grads (summed)").c_str(), gp.data(), g1.data(), gp.size(), 1e-7, 1e-5);
}

// QK-norm is per head: scaling the q_proj (and k_proj) rows and bias of one head by 3 scales that
// head's q (k) before q_norm (k_norm), which undoes it (up to eps); without QK-norm the logits move.
// LoRA on v, o and the MLP only, so the scaled projections are the frozen weights alone.
static void qk_norm_scale_check(const Config& c, const char* name) {
    LoraConfig lc; lc.rank = 4; lc.alpha = 8.0f; lc.targets = (1u << P_V) | (1u << P_O) | (1u << P_GATE) | (1u << P_UP) | (1u << P_DOWN);
    RefModel m0, m1;
    make_model(m0, c); make_model(m1, c);
    for (int l = 0; l < c.n_layers; l++)
        for (int p : {P_Q, P_K}) {
            int head = p == P_Q ? c.n_heads - 1 : 0, in = proj_in(c, p);   // the last query head, the first KV head
            for (int r = head * c.head_dim; r < (head + 1) * c.head_dim; r++) {
                for (int i = 0; i < in; i++) m1.w.linear[l][p][(size_t)r * in + i] *= 3.0f;
                if (proj_has_bias(c, p)) m1.w.at(proj_bias_id(p), l)[r] *= 3.0f;
            }
        }
    std::vector<double> w(lora_num_params(c, lc));
    std::vector<float> w32 = random_lora(c, lc);
    std::copy(w32.begin(), w32.end(), w.begin());
    RefBatch bt = make_batch(INPUTS, TARGETS, B, T, (float)ref_count_targets(TARGETS, B * T));
    RefActs<double> a0, a1;
    ref_acts_alloc(a0, c, lc, B, T); ref_acts_alloc(a1, c, lc, B, T);
    ref_forward(m0, lc, w.data(), a0, bt); ref_forward(m1, lc, w.data(), a1, bt);
    double diff = 0, scale = 0;
    for (size_t i = 0; i < a0.logits.size(); i++) { diff = fmax(diff, fabs(a1.logits[i] - a0.logits[i])); scale = fmax(scale, fabs(a0.logits[i])); }
    if (c.qk_norm) check(diff <= 1e-5 * scale, "%-44s max |diff| %.2e (logit scale %.2f)", name, diff, scale);
    else check(diff > 1e-2 * scale, "%-44s max |diff| %.2e (logit scale %.2f)", name, diff, scale);
}

// A batch with no unmasked target: loss 0 and no gradient
static void empty_batch_check(const Config& c, const LoraConfig& lc) {
    RefModel m;
    make_model(m, c);
    std::vector<float> w = random_lora(c, lc);
    int none[B * T];
    for (int& t : none) t = -1;
    float loss = 1;
    std::vector<float> g = grads(m, lc, w, make_batch(INPUTS, none, B, T, (float)ref_count_targets(none, B * T)), &loss);
    float zero = 0;
    check_close("all targets masked: loss == 0", &loss, &zero, 1, 0, 0);
    std::vector<float> zeros(g.size(), 0.0f);
    check_close("all targets masked: grads == 0", g.data(), zeros.data(), g.size(), 0, 0);
}

// ref_clip_grad_norm and ref_adamw against the textbook formulas, in double
static void optimizer_check() {
    const size_t n = 1000;
    std::vector<float> g(n), p(n), m(n, 0.0f), v(n, 0.0f);
    fill_uniform(g.data(), n, 500, -1.0f, 1.0f);
    double ss = 0;
    for (float x : g) ss += (double)x * x;
    float norm = (float)sqrt(ss);
    std::vector<float> g2 = g;
    float total = ref_clip_grad_norm(g2.data(), n, 2 * norm);
    check(total == norm && g2 == g, "%-44s total=%.6f, not clipped when max_norm = 2*total", "clip_grad_norm_: returns the norm", total);
    ref_clip_grad_norm(g2.data(), n, 0.5f * norm);
    double ss2 = 0;
    for (float x : g2) ss2 += (double)x * x;
    double got = sqrt(ss2), want = 0.5 * norm;
    check_close("clip_grad_norm_: clipped norm == max_norm", &got, &want, 1, 0, 1e-5);

    // 3 AdamW steps: m = b1*m + (1-b1)*g, v = b2*v + (1-b2)*g², p -= lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps)
    const float lr = 1e-2f, b1 = 0.9f, b2 = 0.999f, eps = 1e-8f, wd = 0.1f;
    fill_uniform(p.data(), n, 501, -1.0f, 1.0f);
    std::vector<double> pd(p.begin(), p.end()), md(n, 0.0), vd(n, 0.0);
    for (int t = 1; t <= 3; t++) {
        fill_uniform(g.data(), n, 510 + t, -1.0f, 1.0f);
        ref_adamw(p.data(), g.data(), m.data(), v.data(), n, t, lr, b1, b2, eps, wd);
        double bc1 = 1 - pow((double)b1, t), bc2 = 1 - pow((double)b2, t);
        for (size_t i = 0; i < n; i++) {
            pd[i] *= 1 - (double)lr * wd;
            md[i] = b1 * md[i] + (1 - (double)b1) * g[i];
            vd[i] = b2 * vd[i] + (1 - (double)b2) * g[i] * g[i];
            pd[i] -= lr / bc1 * md[i] / (sqrt(vd[i]) / sqrt(bc2) + eps);
        }
    }
    check_close("adamw: 3 steps, params vs fp64 textbook", p.data(), pd.data(), n, 1e-7, 1e-5);
    check_close("adamw: 3 steps, exp_avg vs fp64 textbook", m.data(), md.data(), n, 1e-7, 1e-5);
    check_close("adamw: 3 steps, exp_avg_sq vs fp64 textbook", v.data(), vd.data(), n, 1e-9, 1e-5);
}

// 30 AdamW steps on one fixed batch from PEFT's init (B = 0) must memorise most of it
static void training_check(const Config& c, const LoraConfig& lc) {
    RefModel m;
    make_model(m, c);
    std::vector<float> w(lora_num_params(c, lc)), g(w.size()), mom(w.size(), 0.0f), vel(w.size(), 0.0f);
    lora_init(w.data(), c, lc, 42);
    RefBatch bt = make_batch(INPUTS, TARGETS, B, T, (float)ref_count_targets(TARGETS, B * T));
    RefActs<float> a;
    ref_acts_alloc(a, c, lc, B, T);
    float first = 0, loss = 0, norm = 0;
    for (int step = 1; step <= 30; step++) {
        loss = ref_forward(m, lc, w.data(), a, bt);
        if (step == 1) first = loss;
        std::fill(g.begin(), g.end(), 0.0f);
        ref_backward(m, lc, w.data(), a, bt, g.data());
        norm = ref_clip_grad_norm(g.data(), g.size(), 1.0f);
        ref_adamw(w.data(), g.data(), mom.data(), vel.data(), w.size(), step, 1e-2f, 0.9f, 0.999f, 1e-8f, 0.01f);
    }
    check(loss < 0.25f * first, "%-44s loss %.4f -> %.4f after 30 steps (last grad norm %.3f)", "it trains: loss falls below 1/4", first, loss, norm);
}

int main() {
    LoraConfig lc;
    lc.rank = 4; lc.alpha = 8.0f;
    float denom = (float)ref_count_targets(TARGETS, B * T);
    fd_check("mha", tiny_config(4, false), lc, make_batch(INPUTS, TARGETS, B, T, denom));
    fd_check("gqa tied", tiny_config(2, true), lc, make_batch(INPUTS, TARGETS, B, T, denom));
    LoraConfig lcd = lc;
    lcd.dropout = 0.25f; lcd.rslora = true;
    fd_check("gqa dropout rslora", tiny_config(2, false), lcd, make_batch(INPUTS, TARGETS, B, T, denom, nullptr, nullptr, 99));
    fd_check("gqa docs", tiny_config(2, false), lc, make_batch(INPUTS, TARGETS, B, T, denom, POS, DOC_START));
    fd_check("qwen2 qkv bias", qwen2_config(), lc, make_batch(INPUTS, TARGETS, B, T, denom));
    fd_check("qwen3 qk-norm hd 12", qwen3_config(false), lc, make_batch(INPUTS, TARGETS, B, T, denom, POS, DOC_START));
    fd_check("qwen3 qk-norm + attention_bias", qwen3_config(true), lcd, make_batch(INPUTS, TARGETS, B, T, denom, nullptr, nullptr, 99));
    qk_norm_scale_check(qwen3_config(true), "qk-norm: one head's q/k rows x3: logits same");
    qk_norm_scale_check(qwen2_config(), "no qk-norm (qwen2): the same change moves them");

    accumulation_check(tiny_config(2, false), lc);
    packing_check("llama", tiny_config(2, false), lc);
    packing_check("qwen3", qwen3_config(true), lc);
    empty_batch_check(tiny_config(2, false), lc);
    optimizer_check();
    training_check(tiny_config(2, false), lc);
    return test_summary();
}
