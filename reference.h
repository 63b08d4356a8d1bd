// reference.h: the CPU reference trainer in plain loops, readable top to bottom; the spec the GPU
// code must match (../shared/spec/formats.md §3.2 for the model, §4.2 for LoRA).
//   1. RefModel (frozen fp32 weights), RefBatch (one micro-batch), RefActs (saved activations)
//   2. ops, each forward next to its backward: matmul, RMSNorm, RoPE, LoRA dropout, LoRA linear,
//      attention, SwiGLU, cross entropy
//   3. ref_forward: Llama decoder (Qwen2's q/k/v biases, Qwen3's QK-norm) + PEFT LoRA + causal-LM loss
//   4. ref_backward: gradients of the LoRA parameters (+=, so accumulation is calling it again)
//   5. ref_clip_grad_norm, ref_adamw: torch.nn.utils.clip_grad_norm_, torch.optim.AdamW
// Templated on the scalar F of activations, LoRA parameters and gradients: F = float is the spec,
// F = double runs the very same code for finite-difference checks. Frozen weights are always fp32:
// they are dequantized NF4 values, exact in fp32.
#pragma once
#include "formats.h" // defines: Config, WeightTable, LoraConfig, lora_slot, rng_uniform, checkpoint_view, bnb_checkpoint_validate
#include <cmath>     // defines: std::exp, std::log, std::sqrt, std::cos, std::sin for float and double
#include <vector>    // defines: std::vector
#include <algorithm> // defines: std::fill, std::copy, std::max

// ---------------------------------------------------------------------------------------------
// 1. structs

struct RefModel {
    Config cfg;
    std::vector<float> mem;                // every weight, one allocation
    WeightTable<float*, float*> w;         // into mem: each weight of for_each_weight (qlora.h §7), fp32;
                                           // a linear (out, in) is NF4 dequantized, nn.Linear layout y = x·Wᵀ
    RefModel() = default;
    RefModel(const RefModel&) = delete;    // the pointers point into mem
    RefModel& operator=(const RefModel&) = delete;
};

// Carves mem into the weights (zeros); the loader or a test fills them.
inline void ref_model_alloc(RefModel& m, const Config& c) {
    size_t total = 0;
    for_each_weight(c, [&](const Weight& w) { total += (size_t)w.numel(); });
    m.cfg = c;
    m.mem.assign(total, 0.0f);
    float* next = m.mem.data();
    auto take = [&](const Weight& w, float*& p) {
        p = next;
        next += w.numel();
    };
    m.w.fill(c, take, take);
}

// Load a Hugging Face checkpoint the way the trainer does: embeddings and norms as stored (exact in
// fp32), every decoder linear quantized to NF4 (blocksize 64, double quant, as bitsandbytes does)
// and dequantized back to fp32: the frozen weights the model really computes with. A checkpoint
// saved with bitsandbytes 4-bit is dequantized from its own bytes.
// The dense tensors (embeddings, norms) are the same either way; only the linears differ.
template <class View> inline void ref_model_fill_dense(RefModel& m, const Config& c, const View& v) {
    for_each_weight(c, [&](const Weight& w) {
        if (!w.linear()) st_to_f32(m.w.at(w.id, w.layer), *v.at(w.id, w.layer));
    });
}
inline void ref_model_load(RefModel& m, const std::string& dir) {
    Config c = load_config(dir + "/config.json");
    SafeTensors st = st_open_model(dir);   // every tensor is validated before anything is allocated
    if (config_is_bnb4(dir + "/config.json")) {   // saved with bitsandbytes 4-bit: dequantize its own bytes
        BnbCheckpointView v = bnb_checkpoint_validate(c, st);
        ref_model_alloc(m, c);
        ref_model_fill_dense(m, c, v.w);
        for (int l = 0; l < c.n_layers; l++)
            for (int p = 0; p < N_PROJ; p++) {
                Quant4 q;
                bnb_linear_load(v.w.linear[l][p], q);
                dequantize_weight(m.w.linear[l][p], q);
            }
        return;
    }
    CheckpointView v = checkpoint_view(c, st);
    ref_model_alloc(m, c);
    ref_model_fill_dense(m, c, v);
    for (int l = 0; l < c.n_layers; l++)
        for (int p = 0; p < N_PROJ; p++) {
            std::vector<float> w = st_f32(*v.linear[l][p]);
            dequantize_weight(m.w.linear[l][p], quantize_weight(w.data(), (int64_t)w.size()));
        }
}

// The checkpoint with its linears exactly as stored (no NF4 round trip), for checks against dense
// models (merge, a converted checkpoint's logits).
inline void ref_model_load_dense(RefModel& m, const std::string& dir) {
    Config c = load_config(dir + "/config.json");
    SafeTensors st = st_open_model(dir);
    CheckpointView v = checkpoint_view(c, st);
    ref_model_alloc(m, c);
    ref_model_fill_dense(m, c, v);
    for (int l = 0; l < c.n_layers; l++)
        for (int p = 0; p < N_PROJ; p++) st_to_f32(m.w.linear[l][p], *v.linear[l][p]);
}

// One micro-batch. Rows are r = b*T + t.
struct RefBatch {
    const int* inputs = nullptr;     // (B, T) token ids
    const int* targets = nullptr;    // (B, T) already shifted: targets[r] should follow inputs[r]; < 0 = ignored
    int B = 0, T = 0;
    float denom = 0;                 // unmasked targets of the whole accumulated batch (sum of ref_count_targets)
    const int* pos = nullptr;        // (B, T) position ids; nullptr = 0..T-1 in every row
    const int* doc_start = nullptr;  // (B, T) index within its row of the first token of r's document:
                                     // query t sees keys doc_start[r] <= j <= t; nullptr = plain causal
    uint64_t dropout_seed = 0;       // LoRA dropout masks (ref_lora_dropout); use a new one per micro-batch
    int row0 = 0;                    // these rows' first row in the whole batch: the masks index the whole batch,
                                     // so a batch split in row slices (threads) draws the same ones
    int position(int r) const { return pos ? pos[r] : r % T; }
    int first_key(int r) const { return doc_start ? doc_start[r] : 0; }
};

inline int ref_count_targets(const int* targets, int n) { int c = 0; for (int i = 0; i < n; i++) c += targets[i] >= 0; return c; }

// What backward needs, for one (B, T). BT = B*T, qd = nh*hd, kvd = nkv*hd.
template <typename F> struct RefActs {
    int B = 0, T = 0;
    std::vector<F> resid;   // (L+1, BT, H) residual stream entering layer l; [L] goes to the final norm
    std::vector<F> rstd1;   // (L, BT)      1/rms of resid[l]
    std::vector<F> n1;      // (L, BT, H)   input_layernorm output: input of q/k/v_proj
    std::vector<F> q_pre;   // (L, BT, qd)  qk_norm only: q_proj output, input of q_norm (else empty)
    std::vector<F> k_pre;   // (L, BT, kvd) qk_norm only: k_proj output, input of k_norm
    std::vector<F> rstd_q;  // (L, BT, nh)  qk_norm only: 1/rms of each head of q_pre
    std::vector<F> rstd_k;  // (L, BT, nkv)
    std::vector<F> q;       // (L, BT, qd)  after RoPE
    std::vector<F> k;       // (L, BT, kvd) after RoPE
    std::vector<F> v;       // (L, BT, kvd)
    std::vector<F> att;     // (L, B, nh, T, T) softmax probabilities, 0 outside the mask
    std::vector<F> o;       // (L, BT, qd)  attention output: input of o_proj
    std::vector<F> resid2;  // (L, BT, H)   residual after attention
    std::vector<F> rstd2;   // (L, BT)
    std::vector<F> n2;      // (L, BT, H)   post_attention_layernorm output: input of gate/up_proj
    std::vector<F> gate;    // (L, BT, I)
    std::vector<F> up;      // (L, BT, I)
    std::vector<F> act;     // (L, BT, I)   silu(gate) * up: input of down_proj
    std::vector<F> lora_u;  // (L, N_PROJ, BT, r) dropout(x)·Aᵀ of each targeted projection
    std::vector<F> rstdf;   // (BT)
    std::vector<F> hL;      // (BT, H)      final norm output
    std::vector<F> logits;  // (BT, V)
    std::vector<F> losses;  // (BT)         -log_softmax(logits)[target] per row, 0 where ignored
};

// Every activation buffer and its element count for (B, T): ref_acts_alloc allocates exactly these,
// and qlora_cpu's memory plan adds them up before anything is allocated. Counts in double: the plan
// must see (and refuse) a --batch x --seq whose attention probabilities would overflow size_t.
template <typename F> using RefActsSizes = std::vector<std::pair<std::vector<F> RefActs<F>::*, double>>;
template <typename F> RefActsSizes<F> ref_acts_sizes(const Config& c, const LoraConfig& lc, int B, int T) {
    double L = c.n_layers, BT = (double)B * T, H = c.dim, I = c.hidden_dim;
    double qk = c.qk_norm ? L * BT : 0;   // QK-norm's saved inputs and 1/rms, per layer
    using A = RefActs<F>;
    return {{&A::resid, (L + 1) * BT * H}, {&A::rstd1, L * BT}, {&A::n1, L * BT * H}, {&A::q, L * BT * c.q_dim()},
            {&A::k, L * BT * c.kv_dim()}, {&A::v, L * BT * c.kv_dim()}, {&A::att, L * B * c.n_heads * (double)T * T},
            {&A::o, L * BT * c.q_dim()}, {&A::resid2, L * BT * H}, {&A::rstd2, L * BT}, {&A::n2, L * BT * H},
            {&A::gate, L * BT * I}, {&A::up, L * BT * I}, {&A::act, L * BT * I}, {&A::lora_u, L * N_PROJ * BT * lc.rank},
            {&A::rstdf, BT}, {&A::hL, BT * H}, {&A::logits, BT * c.vocab_size}, {&A::losses, BT},
            {&A::q_pre, qk * c.q_dim()}, {&A::k_pre, qk * c.kv_dim()}, {&A::rstd_q, qk * c.n_heads}, {&A::rstd_k, qk * c.n_kv_heads}};
}
template <typename F> double ref_acts_bytes(const Config& c, const LoraConfig& lc, int B, int T) {
    double n = 0;
    for (auto& s : ref_acts_sizes<F>(c, lc, B, T)) n += s.second;
    return n * sizeof(F);
}
template <typename F>
void ref_acts_alloc(RefActs<F>& a, const Config& c, const LoraConfig& lc, int B, int T) {
    a.B = B; a.T = T;
    for (auto& s : ref_acts_sizes<F>(c, lc, B, T)) (a.*s.first).assign((size_t)s.second, 0);
}

// ---------------------------------------------------------------------------------------------
// 2. ops. n = rows (BT). Backward functions accumulate (+=) into their input gradients.

// The loops are ordered for the cache and the vector units, but every output is the same sum in the
// same order as the textbook loop (y: over j ascending; dx: over o; dw: over i, each from 0 and added
// to the output last), so the results are bit for bit those of the naive triple loop.

// y[k] += a·x[k] for k < n: the inner loop of all three (restrict: y is no view of x, so it vectorizes)
template <typename F, typename W>
inline void ref_axpy(F* __restrict y, F a, const W* __restrict x, int n) {
    for (int k = 0; k < n; k++) y[k] += a * (F)x[k];
}
// y (n, out) = x (n, in) · wᵀ, w (out, in)                          F.linear(x, w)
// W is transposed a block of OB outputs at a time (in x OB scratch, not a copy of W: a lm_head is large)
template <typename F, typename W>
void ref_matmul(F* y, const F* x, const W* w, int n, int in, int out) {
    constexpr int OB = 64;
    std::vector<F> wt((size_t)in * OB), s(OB);  // (in, ob) this block of wᵀ; (ob) one row's sums
    for (int o0 = 0; o0 < out; o0 += OB) {
        const int ob = std::min(OB, out - o0);
        for (int o = 0; o < ob; o++)
            for (int j = 0; j < in; j++) wt[(size_t)j * ob + o] = (F)w[(size_t)(o0 + o) * in + j];
        for (int i = 0; i < n; i++) {
            std::fill(s.begin(), s.begin() + ob, (F)0);
            for (int j = 0; j < in; j++) ref_axpy(s.data(), x[(size_t)i * in + j], wt.data() + (size_t)j * ob, ob);
            std::copy(s.begin(), s.begin() + ob, y + (size_t)i * out + o0);
        }
    }
}
// dx (n, in) += dy (n, out) · w
template <typename F, typename W>
void ref_matmul_dx(F* dx, const F* dy, const W* w, int n, int in, int out) {
    std::vector<F> s(in);  // (in) one row's sums
    for (int i = 0; i < n; i++) {
        std::fill(s.begin(), s.end(), (F)0);
        for (int o = 0; o < out; o++) ref_axpy(s.data(), dy[(size_t)i * out + o], w + (size_t)o * in, in);
        for (int j = 0; j < in; j++) dx[(size_t)i * in + j] += s[j];
    }
}
// dw (out, in) += dyᵀ · x
template <typename F>
void ref_matmul_dw(F* dw, const F* dy, const F* x, int n, int in, int out) {
    std::vector<F> s((size_t)out * in, (F)0);  // (out, in) the sums
    for (int i = 0; i < n; i++)
        for (int o = 0; o < out; o++) ref_axpy(s.data() + (size_t)o * in, dy[(size_t)i * out + o], x + (size_t)i * in, in);
    for (size_t k = 0; k < s.size(); k++) dw[k] += s[k];
}

// y = w * (x * rsqrt(mean(x²) + eps)) over rows of H               LlamaRMSNorm.forward
// (Qwen3's q_norm/k_norm are the same op over rows of hd: (BT, nh*hd) is (BT*nh, hd))
template <typename F>
void ref_rmsnorm_forward(F* y, F* rstd, const F* x, const float* w, int n, int H, float eps) {
    for (int i = 0; i < n; i++) {
        const F* xi = x + (size_t)i * H;
        F ss = 0;
        for (int j = 0; j < H; j++) ss += xi[j] * xi[j];
        F r = 1 / std::sqrt(ss / H + (F)eps);
        rstd[i] = r;
        for (int j = 0; j < H; j++) y[(size_t)i * H + j] = (F)w[j] * (xi[j] * r);
    }
}
// weight frozen: dx += r·(w⊙dy) − r³/H · x · Σ_j (w⊙dy⊙x)_j   (r depends on every x_j)
template <typename F>
void ref_rmsnorm_backward(F* dx, const F* dy, const F* x, const float* w, const F* rstd, int n, int H) {
    for (int i = 0; i < n; i++) {
        const F *xi = x + (size_t)i * H, *dyi = dy + (size_t)i * H;
        F r = rstd[i], dot = 0;
        for (int j = 0; j < H; j++) dot += (F)w[j] * dyi[j] * xi[j];
        for (int j = 0; j < H; j++) dx[(size_t)i * H + j] += r * (F)w[j] * dyi[j] - r * r * r / H * xi[j] * dot;
    }
}

// One token's heads x (n_heads, hd), in place: x*cos + rotate_half(x)*sin   apply_rotary_pos_emb
// angle = pos * inv[j] in fp32 (autocast off in transformers), cos/sin of it in F.
// sign = -1 rotates by -angle: the transpose of the rotation, i.e. RoPE's backward.
template <typename F>
void ref_rope(F* x, int n_heads, int hd, const float* inv /* (hd/2) */, int pos, F sign) {
    int h2 = hd / 2;
    for (int j = 0; j < h2; j++) {
        float angle = (float)pos * inv[j];
        F c = std::cos((F)angle), s = sign * std::sin((F)angle);
        for (int h = 0; h < n_heads; h++) {
            F* xh = x + h * hd;
            F x1 = xh[j], x2 = xh[j + h2];
            xh[j] = x1 * c - x2 * s;        // q_j·c_j − q_{j+d/2}·s_j
            xh[j + h2] = x2 * c + x1 * s;   // q_{j+d/2}·c_j + q_j·s_j
        }
    }
}

// LoRA dropout (nn.Dropout(p) on the LoRA input only), the exact rule the GPU reproduces bit for bit.
// For layer l, projection p and that projection's input x (n, in) of the whole batch, element i = row*in + col is
//     kept   iff  rng_uniform(seed, stream, i) >= p_drop,   stream = 1000003 * (l*N_PROJ + p) + 7
// and a kept element is multiplied by the fp32 constant 1.0f / (1.0f - p_drop) (inverted dropout);
// seed = RefBatch::dropout_seed; x may be a slice of rows whose first element is the batch's i0.
// The map is diagonal, so its backward is itself: y may alias x.
inline uint64_t ref_dropout_stream(int l, int p) { return 1000003ull * (uint64_t)(l * N_PROJ + p) + 7; }
template <typename F>
void ref_lora_dropout(F* y, const F* x, size_t count, const LoraConfig& lc, int l, int p, uint64_t seed, size_t i0 = 0) {
    if (lc.dropout <= 0.0f) { if (y != x) std::copy(x, x + count, y); return; }
    const float keep_scale = 1.0f / (1.0f - lc.dropout);
    uint64_t stream = ref_dropout_stream(l, p);
    for (size_t i = 0; i < count; i++) y[i] = rng_uniform(seed, stream, i0 + i) >= lc.dropout ? x[i] * (F)keep_scale : (F)0;
}

// Projection p of layer l, with its bias if it has one and LoRA if targeted:
// y (n, out) = x·Wᵀ + b + s·(dropout(x)·Aᵀ)·Bᵀ      result = base_layer(x); result + lora_B(lora_A(dropout(x))) * scaling
// u (n, r) = dropout(x)·Aᵀ is saved for dB. lora: the flat parameter buffer (lora_slot layout).
template <typename F>
void ref_lora_linear_forward(F* y, F* u, const F* x, const RefModel& m, const LoraConfig& lc, const F* lora,
                             int l, int p, int n, uint64_t seed, size_t tok0) {
    int in = proj_in(m.cfg, p), out = proj_out(m.cfg, p), r = lc.rank;
    ref_matmul(y, x, m.w.linear[l][p], n, in, out);
    if (proj_has_bias(m.cfg, p)) {   // (out) frozen, like W
        const float* b = m.w.at(proj_bias_id(p), l);
        for (int i = 0; i < n; i++)
            for (int o = 0; o < out; o++) y[(size_t)i * out + o] += (F)b[o];
    }
    if (!lc.has(p)) return;
    LoraSlot s = lora_slot(m.cfg, lc, l, p);
    const F *A = lora + s.a, *Bm = lora + s.b;  // A (r, in), B (out, r)
    std::vector<F> xd((size_t)n * in);          // (n, in) dropout(x)
    ref_lora_dropout(xd.data(), x, xd.size(), lc, l, p, seed, tok0 * in);
    ref_matmul(u, xd.data(), A, n, in, r);
    for (int i = 0; i < n; i++)
        for (int o = 0; o < out; o++) {
            F b = 0;
            for (int k = 0; k < r; k++) b += u[(size_t)i * r + k] * Bm[(size_t)o * r + k];
            y[(size_t)i * out + o] += b * (F)lc.scale();
        }
}
// dx += dy·W + dropout(g·B·A);  dB += gᵀ·u;  dA += (g·B)ᵀ·dropout(x);  with g = s·dy  (the bias is frozen: no gradient)
template <typename F>
void ref_lora_linear_backward(F* dx, F* dlora, const F* dy, const F* x, const F* u, const RefModel& m,
                              const LoraConfig& lc, const F* lora, int l, int p, int n, uint64_t seed, size_t tok0) {
    int in = proj_in(m.cfg, p), out = proj_out(m.cfg, p), r = lc.rank;
    ref_matmul_dx(dx, dy, m.w.linear[l][p], n, in, out);  // frozen base: only dx
    if (!lc.has(p)) return;
    LoraSlot s = lora_slot(m.cfg, lc, l, p);
    const F *A = lora + s.a, *Bm = lora + s.b;
    std::vector<F> g((size_t)n * out), du((size_t)n * r, 0), xd((size_t)n * in), dxd((size_t)n * in, 0);
    for (size_t i = 0; i < g.size(); i++) g[i] = dy[i] * (F)lc.scale();  // (n, out) grad of lora_B's output
    ref_matmul_dw(dlora + s.b, g.data(), u, n, r, out);                     // dB (out, r)
    ref_matmul_dx(du.data(), g.data(), Bm, n, r, out);                      // du (n, r)
    ref_lora_dropout(xd.data(), x, xd.size(), lc, l, p, seed, tok0 * in);
    ref_matmul_dw(dlora + s.a, du.data(), xd.data(), n, in, r);             // dA (r, in)
    ref_matmul_dx(dxd.data(), du.data(), A, n, in, r);                      // (n, in) grad of dropout(x)
    ref_lora_dropout(dxd.data(), dxd.data(), dxd.size(), lc, l, p, seed, tok0 * in);
    for (size_t i = 0; i < dxd.size(); i++) dx[i] += dxd[i];
}

// att = softmax(q·kᵀ · hd^-0.5 + mask), o = att·v                  eager_attention_forward
// q, o (BT, nh*hd); k, v (BT, nkv*hd); att (B, nh, T, T). Query head h reads KV head h / (nh/nkv)
// (repeat_kv). Query t of row b sees keys first_key(r) <= j <= t.
template <typename F>
void ref_attention_forward(F* o, F* att, const F* q, const F* k, const F* v, const RefBatch& bt,
                           int nh, int nkv, int hd) {
    int B = bt.B, T = bt.T, qd = nh * hd, kvd = nkv * hd, rep = nh / nkv;
    F scale = (F)(1.0 / std::sqrt((double)hd));
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++) {
            int r = b * T + t, j0 = bt.first_key(r);
            ql_assert(0 <= j0 && j0 <= t, "doc_start[%d] = %d is not in [0, %d]", r, j0, t);
            for (int h = 0; h < nh; h++) {
                const F* qh = q + (size_t)r * qd + h * hd;
                F* a = att + (((size_t)b * nh + h) * T + t) * T;
                std::fill(a, a + T, (F)0);
                F mx = -INFINITY;
                for (int j = j0; j <= t; j++) {
                    const F* kh = k + (size_t)(b * T + j) * kvd + (h / rep) * hd;
                    F s = 0;
                    for (int d = 0; d < hd; d++) s += qh[d] * kh[d];
                    a[j] = s * scale;
                    mx = std::max(mx, a[j]);
                }
                F sum = 0;
                for (int j = j0; j <= t; j++) { a[j] = std::exp(a[j] - mx); sum += a[j]; }
                for (int j = j0; j <= t; j++) a[j] /= sum;
                F* oh = o + (size_t)r * qd + h * hd;
                for (int d = 0; d < hd; d++) oh[d] = 0;
                for (int j = j0; j <= t; j++) {
                    const F* vh = v + (size_t)(b * T + j) * kvd + (h / rep) * hd;
                    for (int d = 0; d < hd; d++) oh[d] += a[j] * vh[d];
                }
            }
        }
}
// dP_j = do·v_j;  dv_j += P_j·do;  dS_j = P_j·(dP_j − Σ_k P_k·dP_k);  dq += dS_j·scale·k_j;  dk_j += dS_j·scale·q
template <typename F>
void ref_attention_backward(F* dq, F* dk, F* dv, const F* dout, const F* att, const F* q, const F* k, const F* v,
                            const RefBatch& bt, int nh, int nkv, int hd) {
    int B = bt.B, T = bt.T, qd = nh * hd, kvd = nkv * hd, rep = nh / nkv;
    F scale = (F)(1.0 / std::sqrt((double)hd));
    std::vector<F> dp(T);  // (T) grad of one row of att
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++) {
            int r = b * T + t, j0 = bt.first_key(r);
            for (int h = 0; h < nh; h++) {
                const F *a = att + (((size_t)b * nh + h) * T + t) * T, *doh = dout + (size_t)r * qd + h * hd;
                const F* qh = q + (size_t)r * qd + h * hd;
                F* dqh = dq + (size_t)r * qd + h * hd;
                F sum = 0;
                for (int j = j0; j <= t; j++) {
                    size_t kv = (size_t)(b * T + j) * kvd + (h / rep) * hd;
                    dp[j] = 0;
                    for (int d = 0; d < hd; d++) { dp[j] += doh[d] * v[kv + d]; dv[kv + d] += a[j] * doh[d]; }
                    sum += a[j] * dp[j];
                }
                for (int j = j0; j <= t; j++) {
                    size_t kv = (size_t)(b * T + j) * kvd + (h / rep) * hd;
                    F ds = a[j] * (dp[j] - sum) * scale;
                    for (int d = 0; d < hd; d++) { dqh[d] += ds * k[kv + d]; dk[kv + d] += ds * qh[d]; }
                }
            }
        }
}

// act = silu(gate) * up, silu(z) = z / (1 + exp(-z))                LlamaMLP: act_fn(gate_proj(x)) * up_proj(x)
template <typename F>
void ref_swiglu_forward(F* act, const F* gate, const F* up, size_t count) {
    for (size_t i = 0; i < count; i++) act[i] = gate[i] / (1 + std::exp(-gate[i])) * up[i];
}
// silu'(z) = σ(z)·(1 + z·(1 − σ(z)))
template <typename F>
void ref_swiglu_backward(F* dgate, F* dup, const F* dact, const F* gate, const F* up, size_t count) {
    for (size_t i = 0; i < count; i++) {
        F sg = 1 / (1 + std::exp(-gate[i]));
        dgate[i] += dact[i] * up[i] * sg * (1 + gate[i] * (1 - sg));
        dup[i] += dact[i] * gate[i] * sg;
    }
}

// losses[i] = -log_softmax(logits[i])[targets[i]], 0 where targets[i] < 0; returns their sum.
//                                                     F.cross_entropy(logits.float(), t, reduction="sum")
template <typename F>
F ref_cross_entropy_forward(F* losses, const F* logits, const int* targets, int n, int V) {
    F total = 0;
    for (int i = 0; i < n; i++) {
        losses[i] = 0;
        if (targets[i] < 0) continue;
        ql_assert(targets[i] < V, "target %d at row %d is outside the vocabulary (%d)", targets[i], i, V);
        const F* z = logits + (size_t)i * V;
        F mx = z[0], se = 0;
        for (int j = 1; j < V; j++) mx = std::max(mx, z[j]);
        for (int j = 0; j < V; j++) se += std::exp(z[j] - mx);
        losses[i] = -((z[targets[i]] - mx) - std::log(se));
        total += losses[i];
    }
    return total;
}
// dlogits[i] = (softmax(logits[i]) − onehot(targets[i])) / denom, 0 where targets[i] < 0
template <typename F>
void ref_cross_entropy_backward(F* dlogits, const F* logits, const int* targets, int n, int V, F denom) {
    for (int i = 0; i < n; i++) {
        const F* z = logits + (size_t)i * V;
        F* dz = dlogits + (size_t)i * V;
        if (targets[i] < 0) { std::fill(dz, dz + V, (F)0); continue; }
        F mx = z[0], se = 0;
        for (int j = 1; j < V; j++) mx = std::max(mx, z[j]);
        for (int j = 0; j < V; j++) se += std::exp(z[j] - mx);
        for (int j = 0; j < V; j++) dz[j] = (std::exp(z[j] - mx) / se - (j == targets[i])) / denom;
    }
}

// ---------------------------------------------------------------------------------------------
// 3. forward: fills a (logits and per-row losses included) and returns
//    loss = Σ_{unmasked r} -log p(targets[r]) / denom   (0 when denom == 0)

template <typename F>
F ref_forward(const RefModel& m, const LoraConfig& lc, const F* lora, RefActs<F>& a, const RefBatch& bt) {
    const Config& c = m.cfg;
    int BT = bt.B * bt.T, H = c.dim, I = c.hidden_dim, qd = c.q_dim(), kvd = c.kv_dim(), hd = c.head_dim, r = lc.rank;
    ql_assert(a.B == bt.B && a.T == bt.T, "RefActs sized for (%d, %d), batch is (%d, %d)", a.B, a.T, bt.B, bt.T);
    std::vector<float> inv(hd / 2);  // (hd/2) RoPE inverse frequencies
    rope_inv_freq(inv.data(), c);

    // h = embed_tokens(input_ids)
    for (int i = 0; i < BT; i++) {
        ql_assert(bt.inputs[i] >= 0 && bt.inputs[i] < c.vocab_size, "token %d at row %d is outside the vocabulary", bt.inputs[i], i);
        for (int j = 0; j < H; j++) a.resid[(size_t)i * H + j] = (F)m.w.at(W_EMBED)[(size_t)bt.inputs[i] * H + j];
    }
    for (int l = 0; l < c.n_layers; l++) {
        F* l_x = &a.resid[(size_t)l * BT * H];
        F* l_xout = &a.resid[(size_t)(l + 1) * BT * H];
        F *l_rstd1 = &a.rstd1[(size_t)l * BT], *l_n1 = &a.n1[(size_t)l * BT * H];
        F *l_q = &a.q[(size_t)l * BT * qd], *l_k = &a.k[(size_t)l * BT * kvd], *l_v = &a.v[(size_t)l * BT * kvd];
        F *l_att = &a.att[(size_t)l * BT * c.n_heads * bt.T], *l_o = &a.o[(size_t)l * BT * qd];
        F *l_x2 = &a.resid2[(size_t)l * BT * H], *l_rstd2 = &a.rstd2[(size_t)l * BT], *l_n2 = &a.n2[(size_t)l * BT * H];
        F *l_gate = &a.gate[(size_t)l * BT * I], *l_up = &a.up[(size_t)l * BT * I], *l_act = &a.act[(size_t)l * BT * I];
        auto proj = [&](int p, F* y, const F* x) {
            ref_lora_linear_forward(y, &a.lora_u[((size_t)l * N_PROJ + p) * BT * r], x, m, lc, lora, l, p, BT, bt.dropout_seed, (size_t)bt.row0 * bt.T);
        };
        // n = input_layernorm(h)
        ref_rmsnorm_forward(l_n1, l_rstd1, l_x, m.w.at(W_ATTN_NORM, l), BT, H, c.norm_eps);
        // q, k, v = q_proj(n), k_proj(n), v_proj(n)                      (+ bias: Qwen2; attention_bias)
        if (c.qk_norm) {
            F *l_qp = &a.q_pre[(size_t)l * BT * qd], *l_kp = &a.k_pre[(size_t)l * BT * kvd];
            proj(P_Q, l_qp, l_n1); proj(P_K, l_kp, l_n1);
            // q, k = q_norm(q.view(.., nh, hd)), k_norm(k.view(.., nkv, hd))   Qwen3Attention: per head, before RoPE
            ref_rmsnorm_forward(l_q, &a.rstd_q[(size_t)l * BT * c.n_heads], l_qp, m.w.at(W_Q_NORM, l), BT * c.n_heads, hd, c.norm_eps);
            ref_rmsnorm_forward(l_k, &a.rstd_k[(size_t)l * BT * c.n_kv_heads], l_kp, m.w.at(W_K_NORM, l), BT * c.n_kv_heads, hd, c.norm_eps);
        } else { proj(P_Q, l_q, l_n1); proj(P_K, l_k, l_n1); }
        proj(P_V, l_v, l_n1);
        // q, k = apply_rotary_pos_emb(q, k, cos, sin)
        for (int i = 0; i < BT; i++) {
            ref_rope(l_q + (size_t)i * qd, c.n_heads, hd, inv.data(), bt.position(i), (F)1);
            ref_rope(l_k + (size_t)i * kvd, c.n_kv_heads, hd, inv.data(), bt.position(i), (F)1);
        }
        // o = softmax(q·kᵀ/sqrt(hd) + mask)·v
        ref_attention_forward(l_o, l_att, l_q, l_k, l_v, bt, c.n_heads, c.n_kv_heads, hd);
        // h = h + o_proj(o)
        proj(P_O, l_x2, l_o);
        for (size_t i = 0; i < (size_t)BT * H; i++) l_x2[i] += l_x[i];
        // n2 = post_attention_layernorm(h)
        ref_rmsnorm_forward(l_n2, l_rstd2, l_x2, m.w.at(W_MLP_NORM, l), BT, H, c.norm_eps);
        // h = h + down_proj(silu(gate_proj(n2)) * up_proj(n2))
        proj(P_GATE, l_gate, l_n2); proj(P_UP, l_up, l_n2);
        ref_swiglu_forward(l_act, l_gate, l_up, (size_t)BT * I);
        proj(P_DOWN, l_xout, l_act);
        for (size_t i = 0; i < (size_t)BT * H; i++) l_xout[i] += l_x2[i];
    }
    // logits = lm_head(norm(h))
    ref_rmsnorm_forward(a.hL.data(), a.rstdf.data(), &a.resid[(size_t)c.n_layers * BT * H], m.w.at(W_FINAL_NORM), BT, H, c.norm_eps);
    ref_matmul(a.logits.data(), a.hL.data(), m.w.lm_head(), BT, H, c.vocab_size);
    // loss = cross_entropy(logits, targets, reduction="sum") / num_items_in_batch
    F total = ref_cross_entropy_forward(a.losses.data(), a.logits.data(), bt.targets, BT, c.vocab_size);
    return bt.denom > 0 ? total / (F)bt.denom : (F)0;
}

// ---------------------------------------------------------------------------------------------
// 4. backward: dlora (lora_slot layout) += d loss / d lora, from the activations of ref_forward on
//    the same batch. Everything else is frozen: activation gradients only, no weight gradients.

template <typename F>
void ref_backward(const RefModel& m, const LoraConfig& lc, const F* lora, const RefActs<F>& a, const RefBatch& bt, F* dlora) {
    if (bt.denom <= 0) return;  // loss is identically 0
    const Config& c = m.cfg;
    int BT = bt.B * bt.T, H = c.dim, I = c.hidden_dim, qd = c.q_dim(), kvd = c.kv_dim(), hd = c.head_dim, r = lc.rank, V = c.vocab_size;
    std::vector<float> inv(hd / 2);  // (hd/2)
    rope_inv_freq(inv.data(), c);
    // activation gradients, reused by every layer
    std::vector<F> dlogits((size_t)BT * V);  // (BT, V)
    std::vector<F> dres((size_t)BT * H, 0);  // (BT, H) grad of the residual stream, carried down the layers
    std::vector<F> dn((size_t)BT * H);       // (BT, H) grad of a norm output (hL, n2, n1)
    std::vector<F> dact((size_t)BT * I), dgate((size_t)BT * I), dup((size_t)BT * I);            // (BT, I)
    std::vector<F> dout((size_t)BT * qd), dq((size_t)BT * qd), dk((size_t)BT * kvd), dv((size_t)BT * kvd);
    std::vector<F> dq_pre(c.qk_norm ? (size_t)BT * qd : 0), dk_pre(c.qk_norm ? (size_t)BT * kvd : 0);   // grads of q_norm/k_norm inputs
    auto zero = [](std::vector<F>& t) { std::fill(t.begin(), t.end(), (F)0); };

    // loss = cross_entropy(logits, targets, reduction="sum") / denom
    ref_cross_entropy_backward(dlogits.data(), a.logits.data(), bt.targets, BT, V, (F)bt.denom);
    // logits = hL·lm_headᵀ
    zero(dn); ref_matmul_dx(dn.data(), dlogits.data(), m.w.lm_head(), BT, H, V);
    // hL = norm(h)
    ref_rmsnorm_backward(dres.data(), dn.data(), &a.resid[(size_t)c.n_layers * BT * H], m.w.at(W_FINAL_NORM), a.rstdf.data(), BT, H);
    for (int l = c.n_layers - 1; l >= 0; l--) {
        const F* l_x = &a.resid[(size_t)l * BT * H];
        const F *l_rstd1 = &a.rstd1[(size_t)l * BT], *l_n1 = &a.n1[(size_t)l * BT * H];
        const F *l_q = &a.q[(size_t)l * BT * qd], *l_k = &a.k[(size_t)l * BT * kvd], *l_v = &a.v[(size_t)l * BT * kvd];
        const F *l_att = &a.att[(size_t)l * BT * c.n_heads * bt.T], *l_o = &a.o[(size_t)l * BT * qd];
        const F *l_x2 = &a.resid2[(size_t)l * BT * H], *l_rstd2 = &a.rstd2[(size_t)l * BT], *l_n2 = &a.n2[(size_t)l * BT * H];
        const F *l_gate = &a.gate[(size_t)l * BT * I], *l_up = &a.up[(size_t)l * BT * I], *l_act = &a.act[(size_t)l * BT * I];
        auto proj_bwd = [&](int p, F* dx, const F* dy, const F* x) {
            ref_lora_linear_backward(dx, dlora, dy, x, &a.lora_u[((size_t)l * N_PROJ + p) * BT * r], m, lc, lora, l, p, BT, bt.dropout_seed, (size_t)bt.row0 * bt.T);
        };
        // h = h2 + down_proj(act): dres passes to h2 unchanged and into the MLP
        zero(dact); proj_bwd(P_DOWN, dact.data(), dres.data(), l_act);
        // act = silu(gate) * up
        zero(dgate); zero(dup); ref_swiglu_backward(dgate.data(), dup.data(), dact.data(), l_gate, l_up, (size_t)BT * I);
        // gate, up = gate_proj(n2), up_proj(n2)
        zero(dn); proj_bwd(P_GATE, dn.data(), dgate.data(), l_n2); proj_bwd(P_UP, dn.data(), dup.data(), l_n2);
        // n2 = post_attention_layernorm(h2)
        ref_rmsnorm_backward(dres.data(), dn.data(), l_x2, m.w.at(W_MLP_NORM, l), l_rstd2, BT, H);
        // h2 = h + o_proj(o)
        zero(dout); proj_bwd(P_O, dout.data(), dres.data(), l_o);
        // o = softmax(q·kᵀ/sqrt(hd) + mask)·v
        zero(dq); zero(dk); zero(dv);
        ref_attention_backward(dq.data(), dk.data(), dv.data(), dout.data(), l_att, l_q, l_k, l_v, bt, c.n_heads, c.n_kv_heads, hd);
        // q, k = apply_rotary_pos_emb(q, k, cos, sin): backward rotates by -angle
        for (int i = 0; i < BT; i++) {
            ref_rope(dq.data() + (size_t)i * qd, c.n_heads, hd, inv.data(), bt.position(i), (F)-1);
            ref_rope(dk.data() + (size_t)i * kvd, c.n_kv_heads, hd, inv.data(), bt.position(i), (F)-1);
        }
        // q, k = q_norm(q_pre), k_norm(k_pre): weights frozen, gradient to their inputs only
        const F *dq_in = dq.data(), *dk_in = dk.data();   // grads of the q_proj, k_proj outputs
        if (c.qk_norm) {
            zero(dq_pre); zero(dk_pre);
            ref_rmsnorm_backward(dq_pre.data(), dq.data(), &a.q_pre[(size_t)l * BT * qd], m.w.at(W_Q_NORM, l),
                                 &a.rstd_q[(size_t)l * BT * c.n_heads], BT * c.n_heads, hd);
            ref_rmsnorm_backward(dk_pre.data(), dk.data(), &a.k_pre[(size_t)l * BT * kvd], m.w.at(W_K_NORM, l),
                                 &a.rstd_k[(size_t)l * BT * c.n_kv_heads], BT * c.n_kv_heads, hd);
            dq_in = dq_pre.data(); dk_in = dk_pre.data();
        }
        // q, k, v = q_proj(n), k_proj(n), v_proj(n)
        zero(dn);
        proj_bwd(P_Q, dn.data(), dq_in, l_n1); proj_bwd(P_K, dn.data(), dk_in, l_n1); proj_bwd(P_V, dn.data(), dv.data(), l_n1);
        // n = input_layernorm(h)
        ref_rmsnorm_backward(dres.data(), dn.data(), l_x, m.w.at(W_ATTN_NORM, l), l_rstd1, BT, H);
    }
    // h = embed_tokens(input_ids): frozen, nothing to accumulate
}

// ---------------------------------------------------------------------------------------------
// 5. optimizer, on the fp32 master LoRA parameters (all of them one param group)

// torch.nn.utils.clip_grad_norm_(params, max_norm): total = ||g||₂ over every gradient,
// coef = max_norm / (total + 1e-6), g *= coef when coef < 1. Returns total (before clipping).
inline float ref_clip_grad_norm(float* g, size_t n, float max_norm) {
    double ss = 0;
    for (size_t i = 0; i < n; i++) ss += (double)g[i] * g[i];
    float total = (float)std::sqrt(ss);
    float coef = max_norm / (total + 1e-6f);
    if (coef < 1.0f) for (size_t i = 0; i < n; i++) g[i] *= coef;
    return total;
}

// torch.optim.AdamW(foreach=False), step t (1-based). Scalars in double as Python computes them,
// rounded to fp32 where torch hands them to the fp32 kernels; elementwise math in fp32, in torch's order:
//   param.mul_(1 - lr*wd)
//   exp_avg.lerp_(grad, 1 - b1)                          m + w·(g − m) (w < 0.5 branch of lerp) = b1·m + (1−b1)·g
//   exp_avg_sq.mul_(b2).addcmul_(grad, grad, value=1 - b2)
//   denom = (exp_avg_sq.sqrt() / sqrt(1 - b2^t)).add_(eps)
//   param.addcdiv_(exp_avg, denom, value=-lr / (1 - b1^t))
// Hyper-parameters in double, as Python holds them: torch forms 1 - 0.9 in double, then fp32.
inline void ref_adamw(float* p, const float* g, float* m, float* v, size_t n, int t, double lr, double b1, double b2,
                      double eps, double wd) {
    float decay = (float)(1.0 - lr * wd), w1 = (float)(1.0 - b1), w2 = (float)(1.0 - b2), b2f = (float)b2, epsf = (float)eps;
    float bc2_sqrt = (float)std::sqrt(1.0 - std::pow(b2, t));
    float step = (float)(-lr / (1.0 - std::pow(b1, t)));
    for (size_t i = 0; i < n; i++) {
        p[i] *= decay;
        m[i] = w1 < 0.5f ? m[i] + w1 * (g[i] - m[i]) : g[i] - (g[i] - m[i]) * (1.0f - w1);
        v[i] = v[i] * b2f + w2 * g[i] * g[i];
        float denom = std::sqrt(v[i]) / bc2_sqrt + epsf;
        p[i] += step * (m[i] / denom);
    }
}
