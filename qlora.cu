// qlora.cu: the GPU trainer. LoRA adapters (bf16 compute, fp32 masters and AdamW state) on a Llama
// whose seven decoder linears per layer are NF4 (bitsandbytes' bytes, double quant), on one GPU.
//   make && ./qlora --model DIR|random:NAME --train FILE|--synthetic-data --batch 4 --seq 2048 --steps 20
// forward() and backward() mirror reference.h; every op is one launcher call from kernels/.
#include "qlora.h"                 // defines: Config, for_each_weight, WeightTable, LoraConfig, NF4_BLOCKSIZE
#include "formats.h"               // defines: checkpoint_view, bnb_checkpoint_validate, st_f32, peft_adapter_read/write, st_write
#include "tools.h"                 // defines: Options, parse_options, tool_dispatch (quantize, merge)
#include "dataloader.h"            // defines: TokenFile, Loader, Batch, eval_batches, Example, examples_of
#include "kernels/common.cuh"      // defines: bf16, cudaCheck, kernel_assert
#include "kernels/matmul.cuh"      // defines: MatmulCtx, matmul
#include "kernels/nf4.cuh"         // defines: quantize_4bit_gpu, quantize_absmax_gpu, dequantize_4bit_nested_gpu
#include "kernels/embedding.cuh"   // defines: embedding_forward, fill_normal
#include "kernels/rmsnorm.cuh"     // defines: rmsnorm_forward, rmsnorm_residual_forward, rmsnorm_backward
#include "kernels/rope.cuh"        // defines: rope_forward, rope_backward
#include "kernels/attention.cuh"   // defines: attention_forward, attention_backward
#include "kernels/swiglu.cuh"      // defines: swiglu_forward, swiglu_backward
#include "kernels/crossentropy.cuh"   // defines: fused_classifier
#include "kernels/adamw.cuh"          // defines: grad_norm, adamw_update
#include "kernels/lora.cuh"           // defines: lora_dropout_forward, lora_dropout_backward_add, cast_f32_to_bf16
#include "kernels/decode.cuh"         // defines: kv_cache_store, decode_attention (generation)
#include "generate.h"                 // defines: Vocab, choose_token, exact_match, print_sample, print_report
#include "dist.h"                     // defines: Dist (data parallel over NCCL: rank, all_reduce, sum, sync)
#include <chrono>                     // defines: steady_clock (tokens/s)
#include <array>                      // defines: std::array
#include <signal.h>                   // defines: sigaction (SIGINT/SIGTERM: save and exit)

// Real models' shapes for benchmarks without a checkpoint (their dimensions, random weights)
static Config random_config(const std::string& name) {
    struct Shape {
        const char* name;
        int dim, hidden, layers, heads, kv_heads, head_dim, vocab;
        bool tied;
    };
    static const Shape shapes[] = {
        {"tiny", 256, 768, 4, 4, 2, 64, 4096, true},
        {"llama3-1b", 2048, 8192, 16, 32, 8, 64, 128256, true},
        {"llama3-3b", 3072, 8192, 28, 24, 8, 128, 128256, true},
        {"llama3-8b", 4096, 14336, 32, 32, 8, 128, 128256, false},
        {"llama3-70b", 8192, 28672, 80, 64, 8, 128, 128256, false},
        {"llama3-405b", 16384, 53248, 126, 128, 8, 128, 128256, false},
        {"qwen2.5-7b", 3584, 18944, 28, 28, 4, 128, 152064, false},
        {"qwen3-8b", 4096, 12288, 36, 32, 8, 128, 151936, false},
    };
    std::string known;
    for (const Shape& sh : shapes) {
        known += std::string(known.empty() ? "" : ", ") + sh.name;
        if (name != sh.name) continue;
        Config c;
        c.dim = sh.dim;
        c.hidden_dim = sh.hidden;
        c.n_layers = sh.layers;
        c.n_heads = sh.heads;
        c.n_kv_heads = sh.kv_heads;
        c.head_dim = sh.head_dim;
        c.vocab_size = sh.vocab;
        c.tied = sh.tied;
        c.norm_eps = 1e-5f;
        if (name == "tiny") {
            c.max_seq_len = 4096;
        } else if (name.rfind("llama3", 0) == 0) {   // rope llama3 scaling: 32 for the 1b/3b, 8 for the rest
            c.max_seq_len = 131072;
            c.rope_theta = 500000.0f;
            c.rope_type = ROPE_LLAMA3;
            c.rope_factor = sh.tied ? 32.0f : 8.0f;
        } else {   // Qwen: theta 1e6, eps 1e-6
            c.max_seq_len = name == "qwen3-8b" ? 40960 : 131072;
            c.rope_theta = 1e6f;
            c.norm_eps = 1e-6f;
            c.qkv_bias = name == "qwen2.5-7b";
            c.qk_norm = name == "qwen3-8b";
        }
        return c;
    }
    ql_fail("--model random:%s: unknown shape (%s)", name.c_str(), known.c_str());
}

// ---------------------------------------------------------------------------------------------
// device memory: one allocation per role, carved into named buffers from one size table

struct Arena {
    const char* role;
    size_t bytes = 0;
    char* base = nullptr;
    std::vector<std::pair<void**, size_t>> wants;
    template <class T>
    void want(T** p, size_t n) {
        wants.push_back({(void**)p, (n * sizeof(T) + 255) & ~(size_t)255});
        bytes += wants.back().second;
    }
    void alloc() {
        if (!bytes) return;
        cudaCheck(cudaMalloc(&base, bytes));
        size_t off = 0;
        for (auto& w : wants) {
            *w.first = base + off;
            off += w.second;
        }
    }
};

// ---------------------------------------------------------------------------------------------
// the model on the GPU

struct QWeight {         // one decoder linear, NF4 blocksize 64 + double quant (bitsandbytes layout)
    uint8_t* packed;     // (out*in/2)
    uint8_t* absmax_q;   // (out*in/64) 8-bit codes
    float* absmax2;      // (ceil(out*in/64/256))
    float* offset;       // (1)
};

struct Model {
    Config cfg;
    LoraConfig lc;
    WeightTable<bf16*, QWeight> w;   // every weight of for_each_weight: dense bf16 (embeddings
                                     // (V, H), norms (H)), linears NF4
    float* inv_freq;                 // (hd/2) RoPE
    size_t n_lora;
    float* lora;       // (n_lora) fp32 master LoRA parameters
    float* grad;       // (n_lora) fp32 their gradients
    float* adam_m;     // (n_lora) fp32 AdamW first moments
    float* adam_v;     // (n_lora) fp32 AdamW second moments
    bf16* lora_bf16;   // (n_lora) compute copy
};

// Per-layer activations and dequantized weights kept for backward (the weights unless the plan drops
// them: Acts::keep_w). With --recompute only h, down_proj's LoRA u and (unless the plan drops them:
// Acts::keep_att) the attention output and LSE survive per layer; the rest is one set of buffers that
// every layer reuses, refilled by re-running the layer's forward in backward (without its attention
// when that output was kept). u = x·[A..]ᵀ of a group (k LoRA'd projections:
// (N, k·r)) is kept from the forward for backward's dB, so backward does not read x again for it.
struct Acts {
    int B, T, N;            // batch rows, sequence length, N = B·T tokens
    std::vector<bf16*> h;   // (L+1) x (N, H) residual stream entering layer l; h[L] before the final norm
    // --offload: h[0..L-1] are kept in pinned host memory; on the GPU h[l] is ring[l % 2], which holds
    // layer l's checkpoint while layer l runs (forward: written there and copied out on the copy stream
    // while the next layer computes; backward: copied back in while layer l+1 runs). h[L] stays.
    struct Offload {
        bool on = false;
        bf16* host = nullptr;        // (L, N, H) pinned
        bf16* ring[2];               // 2 x (N, H) on the GPU: a.h[l] == ring[l % 2]
        int holds[2] = {-1, -1};     // the layer whose h each slot holds
        cudaStream_t copy;           // the copies' own stream
        cudaEvent_t used[2];         // compute stream: done with the slot's content
        cudaEvent_t copied[2];       // copy stream: the slot's last copy (out or in) is done
    } off;
    struct Layer {          // one layer's activations, kept for backward
        bf16* n1;           // (N, H)   input_layernorm(h[l]): input of q/k/v_proj
        bf16* q;            // (N, qd)  q_proj (or q_norm(q_pre)), then RoPE in place
        bf16* k;            // (N, kvd) k_proj (or k_norm(k_pre)), then RoPE in place
        bf16* q_pre;        // (N, qd)  QK-norm only: q_proj before q_norm
        bf16* k_pre;        // (N, kvd) QK-norm only: k_proj before k_norm
        float* rstd_q;      // (N, nh)  QK-norm only: 1/rms of each head of q_pre
        float* rstd_k;      // (N, nkv) QK-norm only: 1/rms of each head of k_pre
        bf16* v;            // (N, kvd) v_proj
        bf16* h_mid;        // (N, H)   h[l] + o_proj(att)
        bf16* n2;           // (N, H)   post_attention_layernorm(h_mid): input of gate/up_proj
        bf16* gate;         // (N, I)   gate_proj; its gradient in place in backward
        bf16* up;           // (N, I)   up_proj; its gradient in place in backward
        bf16* uqkv;         // (N, k·r) LoRA u = n1·[A_q|A_k|A_v]ᵀ of the LoRA'd ones among q, k, v
        bf16* uo;           // (N, k·r) LoRA u of o_proj
        bf16* ugu;          // (N, k·r) LoRA u of gate|up
        float* rstd1;       // (N)      1/rms of h[l]
        float* rstd2;       // (N)      1/rms of h_mid
    };
    std::vector<Layer> l;   // (L), or (1) shared with --recompute
    std::vector<bf16*>
        udown;   // (L) x (N, k·r) LoRA u of down_proj, per layer also with --recompute (a recompute stops before down_proj)
    bool keep_w;   // the forward's dequantized weights serve the backward
    bool w_ready;  // keep_w: every layer's weights are dequantized (by the first forward); later passes reuse them
    bool keep_att;   // with recompute: every layer's attention output and LSE kept, so a recompute skips attention
    std::vector<bf16*> att;    // (L, or 1 when a recompute re-runs attention) x (N, qd) attention output: input of o_proj
    std::vector<float*> lse;   // (L, or 1 likewise) x (B, nh, T) attention's log-sum-exp per query row
    std::vector<std::array<bf16*, N_PROJ>>
        wdq;   // dequantized weights (out, in): keep_w (L) x 7, else (1) x 7 that each layer refills (forward, backward)
    bf16* hf;       // (N, H) final norm output
    float* rstdf;   // (N)    its 1/rms
    // scratch (one purpose each)
    bf16* delta;   // (N, H) o_proj / down_proj output before the residual add
    bf16* act;     // (N, I) swiglu output: input of down_proj
    bf16* t[2];    // (N, 3r) a group's [dy·B..] in backward; two, so that one group's weight gradients
                   // (GradLane) read one while the next group writes the other
    bf16* u;       // (N, r) one projection's xd·Aᵀ (dropout > 0 only)
    bf16* xdrop;   // (N, max in) its dropped-out LoRA input xd (dropout > 0 only)
    // gradients; d gate and d up overwrite gate and up in place
    bf16* dres;            // (N, H)   of the residual stream
    bf16* dn;              // (N, H)   of a norm's output
    bf16* datt;            // (N, qd)  of the attention output
    bf16* dq;              // (N, qd)
    bf16* dk;              // (N, kvd)
    bf16* dv;              // (N, kvd)
    bf16* dq_pre;          // (N, qd)  of q_pre (QK-norm only)
    bf16* dk_pre;          // (N, kvd) of k_pre (QK-norm only)
    bf16* dact;            // (N, I)   of the swiglu output
    float* attn_scratch;   // attention backward scratch (attention_backward_scratch_bytes)
    void* ce_scratch;      // lm_head + CE chunk: ce_rows rows of logits
    size_t ce_bytes;
    int ce_rows;
    void* norm_scratch;      // grad norm partial sums
    int* ids;                // (N) tokens
    int* targets;            // (N) targets (-1 ignored)
    int* pos;                // (N) positions (packed rows)
    int* doc_start;          // (N) row-relative start of each token's document (packed rows)
    int* flags;              // (2): bad token, bad target
    bool packed = false;     // this batch has segments (pos, doc_start used)
    bool training = false;   // LoRA dropout only while training, never in evaluation
    float* losses;           // (N) per-token loss
    float* loss_sum;         // (1)
    float* norm;             // (1) the gradient norm
};

// --profile: where the GPU time goes. A ProfileScope charges the GPU time from its start to its end
// to its kind of op; to() switches the kind for the rest of the scope, an inner scope takes over
// and hands back. Events on the one stream tile the step, so the time between scopes (launch gaps,
// uploads) is counted too, as "host gaps, uploads". The first step (plans, caches) is not counted.
struct Profiler {
    bool on = false;
    cudaStream_t s = 0;
    std::vector<cudaEvent_t> ev;     // events recorded this step ...
    std::vector<const char*> kind;   // ... and the kind of the interval that each starts
    size_t n = 0;
    std::vector<const char*> open;   // kinds of the open scopes, innermost last
    std::map<std::string, double> ms;
    int steps = 0;
    bool warm = false;
    void mark(const char* k) {
        if (n == ev.size()) {
            ev.emplace_back();
            cudaCheck(cudaEventCreate(&ev.back()));
            kind.push_back(nullptr);
        }
        cudaCheck(cudaEventRecord(ev[n], s));
        kind[n++] = k;
    }
    // end of a step: close the last interval and add the intervals up
    void step() {
        if (!on) return;
        mark(nullptr);
        bool count = warm;
        warm = true;
        cudaCheck(cudaEventSynchronize(ev[n - 1]));
        for (size_t i = 0; count && i + 1 < n; i++) {
            float t;
            cudaCheck(cudaEventElapsedTime(&t, ev[i], ev[i + 1]));
            ms[kind[i]] += t;
        }
        n = 0;
        steps += count;
    }
    void print() const {
        if (!on || !steps) return;
        std::vector<std::pair<double, std::string>> rows;
        double total = 0;
        for (auto& kv : ms) {
            rows.push_back({kv.second / steps, kv.first});
            total += kv.second / steps;
        }
        std::sort(rows.rbegin(), rows.rend());
        printf("GPU time per step by kind of op (mean of %d steps, CUDA events between ops):\n", steps);
        for (auto& r : rows) printf("  %-28s %9.2f ms %5.1f%%\n", r.second.c_str(), r.first, 100 * r.first / total);
        printf("  %-28s %9.2f ms\n", "total", total);
    }
};
struct ProfileScope {
    Profiler& p;
    ProfileScope(Profiler& p_, const char* k) : p(p_) {
        if (!p.on) return;
        p.open.push_back(k);
        p.mark(k);
    }
    void to(const char* k) {
        if (!p.on) return;
        p.open.back() = k;
        p.mark(k);
    }
    ~ProfileScope() {
        if (!p.on) return;
        p.open.pop_back();
        p.mark(p.open.empty() ? "host gaps, uploads" : p.open.back());
    }
};

// A group's LoRA weight gradients (dB += s·dyᵀ·u, dA += s·tᵀ·x) feed only AdamW: they run on a second
// stream beside the next group's input-gradient GEMMs (memory-bound beside compute-bound). The main
// stream waits for a group's at the end of the next group's linears_backward, before anything can
// overwrite their inputs (rmsnorm_backward writes dres after gate/up's and o's), and for all of them
// before a recompute refills the shared layer buffers and at the end of backward. Under --profile the
// lane is the main stream, so each op's time is its own. Same GEMMs, same algorithms: same bits.
struct GradLane {
    cudaStream_t s = 0;
    MatmulCtx mm;            // its own cuBLASLt workspace: two streams must not share one
    cudaEvent_t ready;       // main -> lane: a group's inputs are written
    cudaEvent_t done[2];     // lane -> main: a group's gradients are accumulated
    int n = 0;               // groups launched on the lane; t[n % 2] is the free t buffer
    int pending = -1;        // done[] slot of the group in flight, -1: none
};

struct Trainer {
    Model m;
    Acts a;
    MatmulCtx mm;
    GradLane lane;
    cudaStream_t s;
    Options o;
    Profiler prof;
    Dist dist;   // data parallel: this process's rank (off: one GPU, every call the single-GPU behaviour)
};

// LoRA pointers of (l, p) inside the flat layout of qlora.h
static const bf16* lA(const Model& m, int l, int p) {
    return m.lora_bf16 + lora_slot(m.cfg, m.lc, l, p).a;
}
static const bf16* lB(const Model& m, int l, int p) {
    return m.lora_bf16 + lora_slot(m.cfg, m.lc, l, p).b;
}

// The projections that read one input: q|k|v, o, gate|up, down. Their A's are adjacent in the
// LoRA layout (qlora.h §8), so without dropout x·Aᵀ of a group is one GEMM with k·r columns.
struct Group {
    int first, n;
};
static const Group G_QKV = {P_Q, 3}, G_O = {P_O, 1}, G_GATE_UP = {P_GATE, 2}, G_DOWN = {P_DOWN, 1};
static int group_lora(const LoraConfig& lc, Group g, int* first) {   // LoRA'd projections in g, and the first of them
    int k = 0;
    *first = -1;
    for (int p = g.first; p < g.first + g.n; p++)
        if (lc.has(p)) {
            if (!k) *first = p;
            k++;
        }
    return k;
}

// the forward's dequantized weights are kept for the backward unless a recompute re-runs the forward
// anyway or the plan dropped them for memory (Options::keep_weights)
static bool a_keep_w(const Trainer& t) {
    return !t.o.recompute && t.o.keep_weights;
}

// with recompute, every layer's attention output and LSE are kept (a recompute then skips attention)
// unless the plan dropped them for memory (Options::keep_attention)
static bool a_keep_att(const Trainer& t) {
    return t.o.recompute && t.o.keep_attention;
}

// plan every allocation; print the table; exit cleanly if it does not fit
static void plan_memory(Trainer& t, std::vector<Arena>& ar) {
    const Config& c = t.m.cfg;
    const Options& o = t.o;
    size_t H = c.dim, I = c.hidden_dim, V = c.vocab_size, L = c.n_layers, q = c.q_dim(), kv = c.kv_dim(),
           N = (size_t)o.batch * o.seq, r = t.m.lc.rank;
    ar.assign(8, Arena());
    Arena &W = ar[0], &D = ar[1], &P = ar[2], &A = ar[3], &K = ar[4], &U = ar[5], &S = ar[6], &G = ar[7];
    W.role = "frozen weights (NF4 + bf16 embeddings/norms)";
    P.role = "LoRA params, grads, AdamW";
    A.role = o.offload ? "activations (residual stream: 2 layers + the last)" : "activations";
    D.role = a_keep_w(t) ? "dequantized weights, all layers, for backward" : "dequantized weights, one layer at a time";
    K.role = !o.recompute || a_keep_att(t) ? "attention outputs + LSE, every layer, for backward" : "attention output + LSE, one layer";
    U.role = "LoRA u = x A^T per group, kept for backward";
    S.role = "scratch (CE, attention)";
    G.role = "gradients of activations";
    Model& m = t.m;
    Acts& a = t.a;
    m.w.fill(
        c, [&](const Weight& w, bf16*& p) { W.want(&p, (size_t)w.numel()); },
        [&](const Weight& w, QWeight& q) {
            size_t n = (size_t)w.numel(), nb = n / NF4_BLOCKSIZE;
            W.want(&q.packed, n / 2);
            W.want(&q.absmax_q, nb);
            W.want(&q.absmax2, (nb + DQ_BLOCK - 1) / DQ_BLOCK);
            W.want(&q.offset, 1);
        });
    W.want(&m.inv_freq, (size_t)c.head_dim / 2);
    m.n_lora = lora_num_params(c, m.lc);
    P.want(&m.lora, m.n_lora);
    P.want(&m.grad, m.n_lora);
    P.want(&m.adam_m, m.n_lora);
    P.want(&m.adam_v, m.n_lora);
    P.want(&m.lora_bf16, m.n_lora);
    a.B = o.batch;
    a.T = o.seq;
    a.N = (int)N;
    a.h.resize(L + 1);
    a.off.on = o.offload;
    if (o.offload) {   // two slots and h[L] on the GPU; the (L, N, H) checkpoints in host memory (host_bytes)
        A.want(&a.off.ring[0], N * H);
        A.want(&a.off.ring[1], N * H);
        A.want(&a.h[L], N * H);
    } else
        for (size_t l = 0; l <= L; l++) A.want(&a.h[l], N * H);
    a.l.resize(o.recompute ? 1 : L);
    a.keep_w = a_keep_w(t);
    a.w_ready = false;
    a.keep_att = a_keep_att(t);
    a.wdq.resize(a.keep_w ? L : 1);
    for (auto& w : a.wdq)
        for (int p = 0; p < N_PROJ; p++) D.want(&w[p], (size_t)proj_out(c, p) * proj_in(c, p));
    auto ku = [&](Group g) {
        int first;
        return N * r * group_lora(m.lc, g, &first);
    };                                                               // elements of a group's u (N, k·r)
    using Rows = std::initializer_list<std::pair<bf16**, size_t>>;   // (buffer, its row width): N rows each
    for (auto& ly : a.l) {
        for (auto [p, width] : Rows{{&ly.n1, H},
                                    {&ly.q, q},
                                    {&ly.k, kv},
                                    {&ly.v, kv},
                                    {&ly.h_mid, H},
                                    {&ly.n2, H},
                                    {&ly.gate, I},
                                    {&ly.up, I}})
            A.want(p, N * width);
        A.want(&ly.rstd1, N);
        A.want(&ly.rstd2, N);
        U.want(&ly.uqkv, ku(G_QKV));
        U.want(&ly.uo, ku(G_O));
        U.want(&ly.ugu, ku(G_GATE_UP));
        ly.q_pre = ly.k_pre = nullptr;
        ly.rstd_q = ly.rstd_k = nullptr;
        if (c.qk_norm) {
            A.want(&ly.q_pre, N * q);
            A.want(&ly.k_pre, N * kv);
            A.want(&ly.rstd_q, N * c.n_heads);
            A.want(&ly.rstd_k, N * c.n_kv_heads);
        }
    }
    a.att.resize(!o.recompute || a.keep_att ? L : 1);
    a.lse.resize(a.att.size());
    for (size_t l = 0; l < a.att.size(); l++) {
        K.want(&a.att[l], N * q);
        K.want(&a.lse[l], (size_t)o.batch * c.n_heads * o.seq);
    }
    a.udown.resize(L);
    for (size_t l = 0; l < L; l++) U.want(&a.udown[l], ku(G_DOWN));
    A.want(&a.hf, N * H);
    A.want(&a.rstdf, N);
    S.want(&a.delta, N * H);
    S.want(&a.act, N * I);
    S.want(&a.t[0], N * r * 3);
    S.want(&a.t[1], N * r * 3);
    a.u = a.xdrop = nullptr;
    if (t.m.lc.dropout > 0) {
        S.want(&a.u, N * r);
        S.want(&a.xdrop, N * std::max({I, q, H}));
    }
    S.want(&a.attn_scratch, attention_backward_scratch_bytes(o.batch, o.seq, c.n_heads, c.head_dim) / sizeof(float));
    // lm_head + CE in chunks of ce_rows rows (254 MiB of logits at V = 128256)
    a.ce_rows = ce_default_rows((int)V);
    a.ce_bytes = ce_scratch_bytes(a.ce_rows, (int)V);
    S.want((char**)&a.ce_scratch, a.ce_bytes);
    S.want((char**)&a.norm_scratch, grad_norm_scratch_bytes());
    S.want(&a.ids, N);
    S.want(&a.targets, N);
    S.want(&a.pos, N);
    S.want(&a.doc_start, N);
    S.want(&a.flags, 2);
    S.want(&a.losses, N);
    S.want(&a.loss_sum, 1);
    S.want(&a.norm, 1);
    for (auto [p, width] : Rows{{&a.dres, H}, {&a.dn, H}, {&a.datt, q}, {&a.dq, q}, {&a.dk, kv}, {&a.dv, kv}, {&a.dact, I}})
        G.want(p, N * width);
    a.dq_pre = a.dk_pre = nullptr;
    if (c.qk_norm) {
        G.want(&a.dq_pre, N * q);
        G.want(&a.dk_pre, N * kv);
    }
}

static size_t arena_total(const std::vector<Arena>& ar) {
    size_t total = 0;
    for (const Arena& x : ar) total += x.bytes;
    return total;
}

// --offload: the residual stream checkpoints h[0..L-1] in pinned host memory
static size_t offload_host_bytes(const Trainer& t) {
    return (size_t)t.m.cfg.n_layers * t.o.batch * t.o.seq * t.m.cfg.dim * sizeof(bf16);
}
static void offload_alloc(Trainer& t) {
    Acts& a = t.a;
    auto t0 = std::chrono::steady_clock::now();
    cudaCheck(cudaHostAlloc((void**)&a.off.host, offload_host_bytes(t), cudaHostAllocDefault));
    cudaCheck(cudaStreamCreateWithFlags(&a.off.copy, cudaStreamNonBlocking));
    for (int s = 0; s < 2; s++) {
        cudaCheck(cudaEventCreateWithFlags(&a.off.used[s], cudaEventDisableTiming));
        cudaCheck(cudaEventCreateWithFlags(&a.off.copied[s], cudaEventDisableTiming));
    }
    for (int l = 0; l < t.m.cfg.n_layers; l++) a.h[l] = a.off.ring[l % 2];
    printf("offload: %.2f GiB of pinned host memory for the residual stream (%.1f s)\n", offload_host_bytes(t) / 1073741824.0,
           std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
}

// Plans every allocation within the budget (--gpu-memory GiB, else what the GPU has free, less
// 768 MiB for cuBLASLt's workspaces and the CUDA context). What does not fit is traded for time, in
// this order: the forward's dequantized weights (re-dequantized in backward, a layer at a time),
// recompute (each layer re-run in backward, but for its attention, whose output and LSE stay), offload
// (the residual stream's checkpoints to pinned host memory, if the host has room), then the kept
// attention outputs (a recompute re-runs attention too); prints the plan and what it chose and why;
// stops with advice if nothing fits.
static void plan_and_alloc(Trainer& t, std::vector<Arena>& ar) {
    Options& o = t.o;
    size_t free_b = 0, total_b = 0, headroom = (size_t)768 << 20;
    cudaCheck(cudaMemGetInfo(&free_b, &total_b));
    size_t asked = (size_t)(o.gpu_memory * 1073741824.0);   // (under the headroom: a budget of 0, refused below, not a wrap-around)
    size_t budget = o.gpu_memory > 0 ? asked - std::min(asked, headroom) : free_b - std::min(free_b, headroom);
    budget = std::min(budget, free_b - std::min(free_b, headroom));
    double host_avail = memory_available();
    if (o.offload) o.recompute = true;   // the checkpoints are what a recompute starts from
    plan_memory(t, ar);
    std::string why;
    char b[200];
    if (!o.recompute && o.keep_weights && arena_total(ar) > budget) {
        snprintf(b, sizeof b, "; dequantized weights not kept (a layer at a time): kept, the run needs %.2f GiB",
                 arena_total(ar) / 1073741824.0);
        why += b;
        o.keep_weights = false;
        plan_memory(t, ar);
    }
    if (!o.recompute && arena_total(ar) > budget) {
        snprintf(b, sizeof b, "; recompute chosen: without it the run needs %.2f GiB", arena_total(ar) / 1073741824.0);
        why += b;
        o.recompute = true;
        plan_memory(t, ar);
    }
    const bool offload_asked = o.offload;
    if (!o.offload && arena_total(ar) > budget && offload_host_bytes(t) < 0.8 * host_avail) {
        snprintf(b, sizeof b, "; offload chosen: with the residual stream on the GPU the run needs %.2f GiB",
                 arena_total(ar) / 1073741824.0);
        why += b;
        o.offload = true;
        plan_memory(t, ar);
    }
    if (t.a.keep_att && arena_total(ar) > budget) {
        snprintf(b, sizeof b, "; attention recomputed too: with every layer's output kept the run needs %.2f GiB",
                 arena_total(ar) / 1073741824.0);
        why += b;
        o.keep_attention = false;
        plan_memory(t, ar);
        if (o.offload && !offload_asked) {   // the offload chosen above may be needless now: the residual stream back on the GPU
            o.offload = false;
            plan_memory(t, ar);
            if (arena_total(ar) > budget) { o.offload = true; plan_memory(t, ar); }
            else why += " (so no offload)";
        }
    }
    size_t total = arena_total(ar);
    printf("memory plan (batch %d x seq %d, dequantized weights %s, recompute %s, offload %s%s):\n", o.batch, o.seq,
           a_keep_w(t) ? "kept" : "not kept", !o.recompute ? "off" : t.a.keep_att ? "on (attention kept)" : "on (attention too)",
           o.offload ? "on" : "off", why.c_str());
    for (auto& x : ar) printf("  %-52s %9.2f GiB\n", x.role, x.bytes / 1073741824.0);
    printf("  %-52s %9.2f GiB (budget %.2f GiB%s; the GPU has %.2f GiB free of %.2f)\n", "total on the GPU", total / 1073741824.0,
           budget / 1073741824.0, o.gpu_memory > 0 ? ", --gpu-memory" : "", free_b / 1073741824.0, total_b / 1073741824.0);
    if (o.offload)
        printf("  %-52s %9.2f GiB (the host has %.2f GiB available)\n", "residual stream checkpoints, pinned host memory",
               offload_host_bytes(t) / 1073741824.0, host_avail / 1073741824.0);
    if (total > budget) {
        size_t weights = ar[0].bytes;
        if (weights + headroom > total_b)
            ql_fail(
                "the model does not fit one GPU: its 4-bit weights alone need %.2f GiB and this GPU has %.2f GiB; "
                "it needs several GPUs, which qlora cannot split a model over yet",
                weights / 1073741824.0, total_b / 1073741824.0);
        ql_fail("this run needs %.2f GiB but the budget is %.2f GiB. Try --batch %d, or a shorter --seq%s.", total / 1073741824.0,
                budget / 1073741824.0, o.batch > 1 ? o.batch / 2 : 1,
                o.offload ? "" : " (--offload needs more host memory than is available)");
    }
    ql_assert(!o.offload || offload_host_bytes(t) < 0.9 * host_avail,
              "--offload needs %.2f GiB of pinned host memory and the host has %.2f GiB available: try a smaller --batch or "
              "--seq, or run without --offload",
              offload_host_bytes(t) / 1073741824.0, host_avail / 1073741824.0);
    for (auto& x : ar) x.alloc();
    if (o.offload) offload_alloc(t);
}

// ---------------------------------------------------------------------------------------------
// loading: one tensor at a time through a staging buffer. Decoder linears go up in the file's own
// dtype and are quantized to NF4 on the GPU from exactly those values (as bitsandbytes quantizes a
// model loaded in its own dtype, and as the CPU reference does), so the model never sits on the GPU
// whole; embeddings and norms are kept in bf16.

template <class T>
static void quantize_into(QWeight& q, const T* w, int64_t n, float* absmax_tmp, cudaStream_t s) {
    quantize_4bit_gpu<T>(q.packed, absmax_tmp, w, n, QT_NF4, NF4_BLOCKSIZE, s);
    quantize_absmax_gpu(q.absmax_q, q.absmax2, q.offset, absmax_tmp, n / NF4_BLOCKSIZE, nullptr, s);
}

static void upload_quant4(QWeight& w, const Quant4& q) {
    cudaCheck(cudaMemcpy(w.packed, q.packed.data(), q.packed.size(), cudaMemcpyHostToDevice));
    cudaCheck(cudaMemcpy(w.absmax_q, q.absmax_q.data(), q.absmax_q.size(), cudaMemcpyHostToDevice));
    cudaCheck(cudaMemcpy(w.absmax2, q.absmax2.data(), q.absmax2.size() * 4, cudaMemcpyHostToDevice));
    cudaCheck(cudaMemcpy(w.offset, &q.offset, 4, cudaMemcpyHostToDevice));
}

// Every weight of for_each_weight, from the checkpoint (or random: embeddings N(0, 0.02), norms 1,
// linears N(0, 0.02) quantized on the GPU).
static void load_model(Trainer& t) {
    auto t0 = std::chrono::steady_clock::now();
    Model& m = t.m;
    const Config& c = m.cfg;
    size_t biggest = 0;
    for_each_weight(c, [&](const Weight& w) {
        if (w.linear()) biggest = std::max(biggest, (size_t)w.numel());
    });
    void* stage;
    float* absmax_tmp;   // stage: one linear in its file dtype (up to fp32); dense tensors go to their place
    cudaCheck(cudaMalloc(&stage, biggest * sizeof(float)));
    cudaCheck(cudaMalloc(&absmax_tmp, biggest / NF4_BLOCKSIZE * sizeof(float)));
    bool random = t.o.model.rfind("random:", 0) == 0, bnb = !random && config_is_bnb4(t.o.model + "/config.json");
    SafeTensors st;
    CheckpointView v;       // the checkpoint's tensors (bf16/f16/f32)
    BnbCheckpointView bv;   // or a bitsandbytes 4-bit checkpoint's
    if (!random) st = st_open_model(t.o.model);
    if (bnb)
        bv = bnb_checkpoint_validate(c, st);
    else if (!random)
        v = checkpoint_view(c, st);
    bool same = bv.qt == QT_NF4 && bv.bs == NF4_BLOCKSIZE && bv.nested;
    if (bnb)
        printf("pre-quantized checkpoint: %s blocksize %d%s%s\n", quant_type_name(bv.qt), bv.bs, bv.nested ? ", double quant" : "",
               same ? "" : " -> converted to NF4 blocksize 64 double quant (lossy: the trainer has one format)");
    for_each_weight(c, [&](const Weight& w) {
        int64_t n = w.numel();
        if (!w.linear()) {   // dense -> bf16; random: embeddings N(0, 0.02) (RNG streams 1, 2), norms 1
            bf16* dst = m.w.at(w.id, w.layer);
            if (random && w.shape.size() == 2) {
                fill_normal(dst, n, 0.02f, t.o.seed, w.id == W_EMBED ? 1 : 2, t.s);
                return;
            }
            const STensor* ts = random ? nullptr : bnb ? bv.w.at(w.id, w.layer) : v.at(w.id, w.layer);
            if (ts && ts->dtype == DT_BF16) {   // straight from the mapped file: no host copy of a (V, H) embedding
                cudaCheck(cudaMemcpy(dst, ts->data, n * 2, cudaMemcpyHostToDevice));
                mapped_release(ts->data, ts->nbytes);
                return;
            }
            std::vector<uint16_t> h((size_t)n, f32_to_bf16(w.bias() ? 0.0f : 1.0f));   // random: biases 0, norms 1
            if (ts) {
                std::vector<float> f = st_f32(*ts);
                for (int64_t i = 0; i < n; i++) h[i] = f32_to_bf16(f[i]);
                mapped_release(ts->data, ts->nbytes);
            }
            cudaCheck(cudaMemcpy(dst, h.data(), n * 2, cudaMemcpyHostToDevice));
            return;
        }
        QWeight& q = m.w.linear[w.layer][w.proj];
        if (bnb) {   // a checkpoint saved by transformers with bitsandbytes 4-bit: its bytes go up as they are
            const BnbLinear& b = bv.w.linear[w.layer][w.proj];
            Quant4 q4;
            bnb_linear_load(b, q4);
            if (!same) q4 = quant4_convert(q4, b.dtype, QT_NF4, NF4_BLOCKSIZE, true);
            upload_quant4(q, q4);
        } else if (random) {
            fill_normal((bf16*)stage, n, 0.02f, t.o.seed, 1000 + (uint64_t)w.layer * N_PROJ + w.proj, t.s);
            quantize_into(q, (const bf16*)stage, n, absmax_tmp, t.s);
        } else {   // checkpoint_view has checked shape and dtype (BF16, F16 or F32)
            const STensor* ts = v.linear[w.layer][w.proj];
            cudaCheck(cudaMemcpy(stage, ts->data, ts->nbytes, cudaMemcpyHostToDevice));
            if (ts->dtype == DT_BF16)
                quantize_into(q, (const bf16*)stage, n, absmax_tmp, t.s);
            else if (ts->dtype == DT_F16)
                quantize_into(q, (const __half*)stage, n, absmax_tmp, t.s);
            else
                quantize_into(q, (const float*)stage, n, absmax_tmp, t.s);
        }
        cudaCheck(cudaStreamSynchronize(t.s));
        if (!random && !bnb) mapped_release(v.linear[w.layer][w.proj]->data, v.linear[w.layer][w.proj]->nbytes);
        if (!random && w.proj == N_PROJ - 1) {
            printf("\rloading %s: layer %d/%d", t.o.model.c_str(), w.layer + 1, c.n_layers);
            fflush(stdout);
        }
    });
    if (!random)
        printf("\nloaded in %.1f s; host memory peak so far %.2f GiB\n",
               std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(), host_peak_rss() / 1073741824.0);
    std::vector<float> inv((size_t)c.head_dim / 2);
    rope_inv_freq(inv.data(), c);
    cudaCheck(cudaMemcpy(m.inv_freq, inv.data(), inv.size() * 4, cudaMemcpyHostToDevice));
    cudaCheck(cudaStreamSynchronize(t.s));
    cudaCheck(cudaFree(stage));
    cudaCheck(cudaFree(absmax_tmp));
}

// LoRA init (PEFT's: A kaiming-uniform, B = 0) on the host from the counter RNG, then the bf16 copy
static void set_lora(Trainer& t, const float* host) {
    Model& m = t.m;
    cudaCheck(cudaMemcpy(m.lora, host, m.n_lora * 4, cudaMemcpyHostToDevice));
    cast_f32_to_bf16(m.lora_bf16, m.lora, m.n_lora, t.s);
    cudaCheck(cudaMemset(m.adam_m, 0, m.n_lora * 4));
    cudaCheck(cudaMemset(m.adam_v, 0, m.n_lora * 4));
}

// ---------------------------------------------------------------------------------------------
// forward and backward

// layer l's buffers: its own without --recompute, the one shared set with it
static Acts::Layer& acts(Trainer& t, int l) {
    return t.a.l[t.o.recompute ? 0 : l];
}
// layer l's attention output and LSE: its own, or the one set that a recompute of each layer refills
static bf16* att_out(Trainer& t, int l) {
    return t.a.att[t.a.att.size() > 1 ? l : 0];
}
static float* att_lse(Trainer& t, int l) {
    return t.a.lse[t.a.lse.size() > 1 ? l : 0];
}
// layer l's dequantized weights: its own when kept, else the one set that each layer refills
static bf16* const* wdq(Trainer& t, int l) {
    return t.a.wdq[t.a.keep_w ? l : 0].data();
}

// --offload, the ring of two residual slots (a.h[l] == ring[l % 2] for l < L). Every copy runs on
// the copy stream between two events: it starts once the compute stream is done with the slot
// (used), and the compute stream waits for it (copied) before touching the slot again.
static void offload_copy(Trainer& t, int l, cudaMemcpyKind dir) {
    Acts::Offload& f = t.a.off;
    int s = l % 2;
    size_t n = (size_t)t.a.N * t.m.cfg.dim;
    bf16* host = f.host + (size_t)l * n;
    cudaCheck(cudaEventRecord(f.used[s], t.s));
    cudaCheck(cudaStreamWaitEvent(f.copy, f.used[s]));
    cudaCheck(cudaMemcpyAsync(dir == cudaMemcpyDeviceToHost ? (void*)host : (void*)f.ring[s],
                              dir == cudaMemcpyDeviceToHost ? (const void*)f.ring[s] : (const void*)host, n * sizeof(bf16), dir,
                              f.copy));
    cudaCheck(cudaEventRecord(f.copied[s], f.copy));
    f.holds[s] = l;
}
// forward: before h[l] is written into its slot, the slot's last copy (h[l-2] going out) is done
static void offload_before_write(Trainer& t, int l) {
    if (t.a.off.on && l < t.m.cfg.n_layers) cudaCheck(cudaStreamWaitEvent(t.s, t.a.off.copied[l % 2]));
}
// forward: layer l is done with h[l]: it goes out while the next layer computes
static void offload_out(Trainer& t, int l) {
    if (t.a.off.on) offload_copy(t, l, cudaMemcpyDeviceToHost);
}
// backward, before layer l: h[l] in its slot (normally prefetched), and h[l-1] on its way into the
// other slot, whose last reader (layer l+1's backward) is done
static void offload_in(Trainer& t, int l) {
    Acts::Offload& f = t.a.off;
    if (!f.on) return;
    if (f.holds[l % 2] != l) offload_copy(t, l, cudaMemcpyHostToDevice);
    cudaCheck(cudaStreamWaitEvent(t.s, f.copied[l % 2]));
    if (l > 0 && f.holds[(l - 1) % 2] != l - 1) offload_copy(t, l - 1, cudaMemcpyHostToDevice);
}

// w[p] (out, in) = layer l's seven NF4 linears, dequantized to bf16
static void dequantize_layer(Trainer& t, bf16* const* w, int l) {
    const Config& c = t.m.cfg;
    ProfileScope prof(t.prof, "NF4 dequantize");
    for (int p = 0; p < N_PROJ; p++) {
        const QWeight& q = t.m.w.linear[l][p];
        int64_t n = (int64_t)proj_out(c, p) * proj_in(c, p);
        dequantize_4bit_nested_gpu(w[p], q.packed, q.absmax_q, q.absmax2, q.offset, n, QT_NF4, NF4_BLOCKSIZE, t.s);
    }
}

// What the linears of one pass compute with: the training forward/backward, or one decoding step.
struct LinearRun {
    int N;            // rows (tokens)
    bf16* const* w;   // (N_PROJ) the layer's dequantized weights (out, in)
    bool lora;        // false: the base model alone (generation without an adapter)
    bool dropout;     // LoRA dropout: only while training
};
static LinearRun training_run(Trainer& t, int l) {
    return {t.a.N, wdq(t, l), true, t.m.lc.dropout > 0 && t.a.training};
}

// ys[i] (N, out) = x·Wᵀ + s·(dropout(x)·Aᵀ)·Bᵀ for each projection of the group (PEFT's
// Linear4bit.forward). Without dropout u (N, k·r) = x·[A..]ᵀ is one GEMM, kept for linears_backward's
// dB. Each y is first written as s·u·Bᵀ by the skinny GEMM, then the frozen GEMM adds x·Wᵀ into it
// (beta = 1): bf16(bf16(x·Wᵀ) + bf16(s·u·Bᵀ)), PEFT's `result + lora_out` rounding, and y is written
// once by a memory-bound kernel instead of re-read and re-written after the big one.
static void linears_forward(Trainer& t, const LinearRun& run, Group g, bf16* const* ys, const bf16* x, bf16* u, int l,
                            uint64_t drop_seed) {
    const Config& c = t.m.cfg;
    const LoraConfig& lc = t.m.lc;
    const Model& m = t.m;
    int N = run.N, in = proj_in(c, g.first), r = lc.rank, first;
    int k = run.lora ? group_lora(lc, g, &first) : 0;
    ProfileScope prof(t.prof, "LoRA GEMMs");
    if (k && !run.dropout) gemm_forward(t.mm, u, x, lA(m, l, first), N, k * r, in);   // u = x·[A..]ᵀ (N, k·r)
    for (int i = 0, j = 0; i < g.n; i++) {
        int p = g.first + i, out = proj_out(c, p);
        bool lora = run.lora && lc.has(p);
        const bf16* bias = proj_has_bias(c, p) ? m.w.at(proj_bias_id(p), l) : nullptr;
        if (bias) {   // y = bf16(x·Wᵀ + b) first (F.linear: the bias in the fp32 epilogue); LoRA's term is added to it
            prof.to("frozen GEMMs");
            gemm_forward(t.mm, ys[i], x, run.w[p], N, out, in, 1.0f, 0.0f, bias);
        }
        if (lora) {
            MatIn uj(u + j * r, k * r);   // (N, r): columns j·r.. of u
            if (run.dropout) {            // each projection its own mask: its own x·Aᵀ
                prof.to("LoRA dropout");
                lora_dropout_forward(t.a.xdrop, x, (int64_t)N * in, lc.dropout, drop_seed, l, p, t.s);
                prof.to("LoRA GEMMs");
                gemm_forward(t.mm, t.a.u, t.a.xdrop, lA(m, l, p), N, r, in);
                uj = MatIn(t.a.u);
            }
            prof.to("LoRA GEMMs");
            gemm_forward(t.mm, ys[i], uj, lB(m, l, p), N, out, r, lc.scale(), bias ? 1.0f : 0.0f);   // y (+)= s·u·Bᵀ
            j++;
        }
        if (bias) continue;
        prof.to("frozen GEMMs");
        gemm_forward(t.mm, ys[i], x, run.w[p], N, out, in, 1.0f, lora ? 1.0f : 0.0f);   // y += x·Wᵀ
    }
}

// The main stream waits for the lane's group in flight (GradLane).
static void lane_drain(Trainer& t) {
    GradLane& ln = t.lane;
    if (ln.pending >= 0) cudaCheck(cudaStreamWaitEvent(t.s, ln.done[ln.pending]));
    ln.pending = -1;
}

// dx (N, in) = Σ dy_i·W_i + s·Σ mask(dy_i·B_i·A_i); LoRA grads (fp32, accumulated over micro-batches):
// dB_i += s·dy_iᵀ·u_i, dA_i += s·(dy_i·B_i)ᵀ·x. First what needs no x: t = [dy_i·B_i] (N, k·r), dx
// (without dropout the LoRA part is one GEMM with K = k·r, written first, and the frozen
// input-gradient GEMMs add into it with beta = 1). Then make_x, if given, produces x (down_proj's
// input, recomputed by the SwiGLU backward that needs this dx), then dB from u (N, k·r) = x·[A..]ᵀ as
// linears_forward kept it and dA (one GEMM for the group), on the GradLane; with dropout each
// projection's xd·Aᵀ is recomputed and its dB, dA run on the main stream. Last, the main stream
// waits for the previous group's lane work.
template <class MakeX>
static void linears_backward(Trainer& t, const LinearRun& run, Group g, bf16* dx, bf16* const* dys, const bf16* x, const bf16* u,
                             int l, uint64_t drop_seed, MakeX make_x) {
    const Config& c = t.m.cfg;
    const LoraConfig& lc = t.m.lc;
    Model& m = t.m;
    GradLane& ln = t.lane;
    int N = run.N, in = proj_in(c, g.first), r = lc.rank, first, k = group_lora(lc, g, &first);
    float scale = lc.scale();
    bool fused = k && !run.dropout;   // the group's LoRA dx is one GEMM
    bf16* tb = t.a.t[ln.n % 2];       // (N, k·r) [dy_i·B_i]; the other buffer may be read by the lane
    ProfileScope prof(t.prof, "LoRA GEMMs");
    for (int p = g.first, j = 0; p < g.first + g.n; p++) {
        if (!lc.has(p)) continue;
        gemm_input_grad(t.mm, {tb + j * r, k * r}, dys[p - g.first], lB(m, l, p), N, r, proj_out(c, p));   // t_j = dy·B
        j++;
    }
    if (fused) gemm_input_grad(t.mm, dx, tb, lA(m, l, first), N, in, k * r, scale);   // dx = s·t·[A..]
    prof.to("frozen GEMMs");
    for (int i = 0; i < g.n; i++) {   // dx += dy·W
        int p = g.first + i;
        gemm_input_grad(t.mm, dx, dys[i], run.w[p], N, in, proj_out(c, p), 1.0f, fused || i ? 1.0f : 0.0f);
    }
    for (int p = g.first, j = 0; run.dropout && p < g.first + g.n; p++) {   // dropout: each mask regenerated
        if (!lc.has(p)) continue;
        prof.to("LoRA GEMMs");
        gemm_input_grad(t.mm, t.a.xdrop, {tb + j * r, k * r}, lA(m, l, p), N, in, r, scale);   // s·t·A
        prof.to("LoRA dropout");
        lora_dropout_backward_add(dx, t.a.xdrop, (int64_t)N * in, lc.dropout, drop_seed, l, p, t.s);   // dx += mask(s·t·A)
        j++;
    }
    make_x();
    prof.to("LoRA GEMMs");
    int prev = ln.pending;
    if (fused) {   // on the lane, after what the main stream has queued so far
        cudaCheck(cudaEventRecord(ln.ready, t.s));
        cudaCheck(cudaStreamWaitEvent(ln.mm.stream, ln.ready));
        for (int p = g.first, j = 0; p < g.first + g.n; p++) {
            if (!lc.has(p)) continue;
            float* dB = m.grad + lora_slot(c, lc, l, p).b;
            gemm_weight_grad(ln.mm, dB, dys[p - g.first], {u + j * r, k * r}, proj_out(c, p), r, N, scale);   // dB += s·dyᵀ·u
            j++;
        }
        gemm_weight_grad(ln.mm, m.grad + lora_slot(c, lc, l, first).a, tb, x, k * r, in, N, scale);   // dA.. += s·tᵀ·x
        ln.pending = ln.n % 2;
        cudaCheck(cudaEventRecord(ln.done[ln.pending], ln.mm.stream));
        ln.n++;
    }
    if (prev >= 0) {   // the previous group's inputs may be overwritten after this group
        cudaCheck(cudaStreamWaitEvent(t.s, ln.done[prev]));
        if (!fused) ln.pending = -1;
    }
    for (int p = g.first, j = 0; k && !fused && p < g.first + g.n; p++) {
        if (!lc.has(p)) continue;
        LoraSlot sl = lora_slot(c, lc, l, p);
        prof.to("LoRA dropout");
        lora_dropout_forward(t.a.xdrop, x, (int64_t)N * in, lc.dropout, drop_seed, l, p, t.s);   // xd = dropout(x)
        prof.to("LoRA GEMMs");
        gemm_forward(t.mm, t.a.u, t.a.xdrop, lA(m, l, p), N, r, in);                                   // u = xd·Aᵀ
        gemm_weight_grad(t.mm, m.grad + sl.b, dys[p - g.first], t.a.u, proj_out(c, p), r, N, scale);   // dB += s·dyᵀ·u
        gemm_weight_grad(t.mm, m.grad + sl.a, {tb + j * r, k * r}, t.a.xdrop, r, in, N, scale);        // dA += s·tᵀ·xd
        j++;
    }
}
static void linears_backward(Trainer& t, const LinearRun& run, Group g, bf16* dx, bf16* const* dys, const bf16* x, const bf16* u,
                             int l, uint64_t drop_seed) {
    linears_backward(t, run, g, dx, dys, x, u, l, drop_seed, [] {});
}

// q, k = RoPE(q_norm(q_pre)), RoPE(k_norm(k_pre)) (Qwen3: an RMSNorm over each head's head_dim,
// rows of hd); without QK-norm the projections wrote q, k themselves and RoPE runs on them in place.
struct QK {
    bf16* q;             // (N, qd)
    bf16* k;             // (N, kvd)
    const bf16* q_pre;   // (N, qd)  QK-norm only
    const bf16* k_pre;   // (N, kvd) QK-norm only
    float* rstd_q;       // (N, nh)  QK-norm only
    float* rstd_k;       // (N, nkv) QK-norm only
};
static void qk_norm_rope(Trainer& t, int l, const QK& qk, const int* pos, int N, int T) {
    const Config& c = t.m.cfg;
    const Model& m = t.m;
    ProfileScope prof(t.prof, "RoPE (+ QK-norm)");
    if (c.qk_norm) {
        rmsnorm_forward(qk.q, qk.rstd_q, qk.q_pre, m.w.at(W_Q_NORM, l), N * c.n_heads, c.head_dim, c.norm_eps, t.s);
        rmsnorm_forward(qk.k, qk.rstd_k, qk.k_pre, m.w.at(W_K_NORM, l), N * c.n_kv_heads, c.head_dim, c.norm_eps, t.s);
    }
    rope_forward(qk.q, qk.k, m.inv_freq, pos, N, T, c.n_heads, c.n_kv_heads, c.head_dim, t.s);
}

// One decoder layer. fresh: in the forward pass, where the residual h[l] = h_mid[l-1] + mlp_out[l-1]
// is formed here, fused with input_layernorm; in a recompute (backward) h[l] is already stored.
static void layer_forward(Trainer& t, int l, bool fresh, uint64_t drop_seed) {
    const Config& c = t.m.cfg;
    const Model& m = t.m;
    Acts& a = t.a;
    Acts::Layer& y = acts(t, l);
    int N = a.N;
    const int* pos = a.packed ? a.pos : nullptr;
    const int* doc_start = a.packed ? a.doc_start : nullptr;
    ProfileScope prof(t.prof, "RMSNorm (+ residual)");
    if (l > 0 && fresh) offload_before_write(t, l);
    if (l > 0 && fresh)   // h[l] = h_mid + down_proj(...) of layer l-1 (still in delta); n1 = input_layernorm(h[l])
        rmsnorm_residual_forward(a.h[l], y.n1, y.rstd1, acts(t, l - 1).h_mid, a.delta, m.w.at(W_ATTN_NORM, l), N, c.dim, c.norm_eps,
                                 t.s);
    else
        rmsnorm_forward(y.n1, y.rstd1, a.h[l], m.w.at(W_ATTN_NORM, l), N, c.dim, c.norm_eps, t.s);
    if (fresh && !a.w_ready) dequantize_layer(t, wdq(t, l), l);   // (a recompute's backward has dequantized them already)
    LinearRun run = training_run(t, l);
    bf16* qkv[3] = {c.qk_norm ? y.q_pre : y.q, c.qk_norm ? y.k_pre : y.k, y.v};
    linears_forward(t, run, G_QKV, qkv, y.n1, y.uqkv, l, drop_seed);   // q, k, v = q_proj(n1), k_proj(n1), v_proj(n1)
    qk_norm_rope(t, l, {y.q, y.k, y.q_pre, y.k_pre, y.rstd_q, y.rstd_k}, pos, N, a.T);
    if (fresh || !a.keep_att) {   // a recompute of a layer whose attention output was kept skips attention
        prof.to("attention forward");
        attention_forward(att_out(t, l), att_lse(t, l), y.q, y.k, y.v, doc_start, a.B, a.T, c.n_heads, c.n_kv_heads, c.head_dim, t.s);
    }
    linears_forward(t, run, G_O, &a.delta, att_out(t, l), y.uo, l, drop_seed);   // o_proj(att)
    // h_mid = h + o_proj(att); n2 = post_attention_layernorm(h_mid)
    prof.to("RMSNorm (+ residual)");
    rmsnorm_residual_forward(y.h_mid, y.n2, y.rstd2, a.h[l], a.delta, m.w.at(W_MLP_NORM, l), N, c.dim, c.norm_eps, t.s);
    if (fresh) offload_out(t, l);   // the forward's last read of h[l]
    bf16* gu[2] = {y.gate, y.up};
    linears_forward(t, run, G_GATE_UP, gu, y.n2, y.ugu, l, drop_seed);   // gate_proj(n2), up_proj(n2)
    if (!fresh) return;   // a recompute stops here: backward forms act itself and needs no down_proj output
    prof.to("SwiGLU");
    swiglu_forward(a.act, y.gate, y.up, (int64_t)N * c.hidden_dim, t.s);          // silu(gate) * up
    linears_forward(t, run, G_DOWN, &a.delta, a.act, a.udown[l], l, drop_seed);   // down_proj(...), added to h_mid by the next op
}

// Forward to the loss (and dh of the loss when grad): the loss sum lands in a.loss_sum.
static void forward(Trainer& t, float dloss, bool grad, uint64_t drop_seed) {
    const Config& c = t.m.cfg;
    const Model& m = t.m;
    Acts& a = t.a;
    a.training = grad;
    {
        ProfileScope prof(t.prof, "embedding");
        offload_before_write(t, 0);
        embedding_forward(a.h[0], &a.flags[0], a.ids, m.w.at(W_EMBED), a.N, c.dim, c.vocab_size, t.s);   // h0 = embed_tokens(ids)
    }
    for (int l = 0; l < c.n_layers; l++) layer_forward(t, l, true, drop_seed);
    a.w_ready = a.keep_w;   // kept weights are frozen: dequantized once, by the first forward
    // h[L] = h_mid + mlp_out of the last layer; hf = norm(h[L]); logits = hf·lm_headᵀ, CE, dh
    ProfileScope prof(t.prof, "RMSNorm (+ residual)");
    const bf16* h_mid = acts(t, c.n_layers - 1).h_mid;
    rmsnorm_residual_forward(a.h[c.n_layers], a.hf, a.rstdf, h_mid, a.delta, m.w.at(W_FINAL_NORM), a.N, c.dim, c.norm_eps, t.s);
    prof.to("lm_head + cross-entropy");
    fused_classifier(a.loss_sum, a.losses, grad ? a.dres : nullptr, &a.flags[1], a.hf, m.w.lm_head(), a.targets, dloss, a.N, c.dim,
                     c.vocab_size, a.ce_scratch, a.ce_bytes, a.ce_rows, t.mm);
}

static void backward(Trainer& t, uint64_t drop_seed) {
    const Config& c = t.m.cfg;
    const Model& m = t.m;
    Acts& a = t.a;
    int N = a.N;
    const int* pos = a.packed ? a.pos : nullptr;
    const int* doc_start = a.packed ? a.doc_start : nullptr;
    // d h[L] = final norm backward of dh (dres holds dL/dhf from the classifier)
    ProfileScope prof(t.prof, "RMSNorm backward");
    rmsnorm_backward(a.dn, a.dres, a.h[c.n_layers], m.w.at(W_FINAL_NORM), a.rstdf, N, c.dim, false, t.s);
    std::swap(a.dres, a.dn);
    for (int l = c.n_layers - 1; l >= 0; l--) {
        offload_in(t, l);   // --offload: h[l] back in its slot, h[l-1] on its way
        if (!a.keep_w && l < c.n_layers - 1)   // weights not kept (recompute, or dropped for memory): layer l's again
            dequantize_layer(t, wdq(t, l), l);  // into the one set (the last layer's is still there from the forward)
        if (t.o.recompute) {   // without, layer l's activations are the forward's
            lane_drain(t);     // layer l+1's q|k|v weight gradients read the buffers it refills (not the weights)
            layer_forward(t, l, false, drop_seed);
        }
        Acts::Layer& y = acts(t, l);
        LinearRun run = training_run(t, l);
        // MLP: h[l+1] = h_mid + down(silu(gate(n2)) * up(n2))
        // d act, then d gate and d up (in place over gate and up) and act itself again, which the
        // LoRA of down_proj needs for dA (dB has u from the forward): one pass over gate and up for both
        linears_backward(t, run, G_DOWN, a.dact, &a.dres, a.act, a.udown[l], l, drop_seed, [&] {
            ProfileScope swiglu(t.prof, "SwiGLU");
            swiglu_backward(y.gate, y.up, a.dact, y.gate, y.up, (int64_t)N * c.hidden_dim, t.s, a.act);
        });
        bf16* dgu[2] = {y.gate, y.up};
        linears_backward(t, run, G_GATE_UP, a.dn, dgu, y.n2, y.ugu, l, drop_seed);   // d n2
        prof.to("RMSNorm backward");
        rmsnorm_backward(a.dres, a.dn, y.h_mid, m.w.at(W_MLP_NORM, l), y.rstd2, N, c.dim, true, t.s);   // d h_mid
        // attention: h_mid = h + o_proj(attn(rope(q), rope(k), v))
        linears_backward(t, run, G_O, a.datt, &a.dres, att_out(t, l), y.uo, l, drop_seed);
        prof.to("attention backward");
        attention_backward(a.dq, a.dk, a.dv, a.attn_scratch, a.datt, y.q, y.k, y.v, att_out(t, l), att_lse(t, l), doc_start, a.B, a.T, c.n_heads,
                           c.n_kv_heads, c.head_dim, t.s);
        prof.to("RoPE (+ QK-norm)");
        rope_backward(a.dq, a.dk, m.inv_freq, pos, N, a.T, c.n_heads, c.n_kv_heads, c.head_dim, t.s);
        if (c.qk_norm) {   // d q_pre, d k_pre through each head's RMSNorm (its weight is frozen)
            rmsnorm_backward(a.dq_pre, a.dq, y.q_pre, m.w.at(W_Q_NORM, l), y.rstd_q, N * c.n_heads, c.head_dim, false, t.s);
            rmsnorm_backward(a.dk_pre, a.dk, y.k_pre, m.w.at(W_K_NORM, l), y.rstd_k, N * c.n_kv_heads, c.head_dim, false, t.s);
        }
        bf16* dqkv[3] = {c.qk_norm ? a.dq_pre : a.dq, c.qk_norm ? a.dk_pre : a.dk, a.dv};
        linears_backward(t, run, G_QKV, a.dn, dqkv, y.n1, y.uqkv, l, drop_seed);   // d n1
        prof.to("RMSNorm backward");
        rmsnorm_backward(a.dres, a.dn, a.h[l], m.w.at(W_ATTN_NORM, l), y.rstd1, N, c.dim, true, t.s);   // d h[l]
    }
    lane_drain(t);   // the gradients are whole; the next micro-batch may overwrite the activations
}

// ---------------------------------------------------------------------------------------------
// adapters out, in PEFT's own files (formats.md §4.3, §4.4): F32 A (r, in) and B (out, r)

static void save_adapter(Trainer& t, const std::string& dir) {
    std::vector<float> host(t.m.n_lora);
    cudaCheck(cudaMemcpy(host.data(), t.m.lora, host.size() * 4, cudaMemcpyDeviceToHost));
    peft_adapter_write(dir, t.m.cfg, t.m.lc, host.data(), t.o.model);
}

// ---------------------------------------------------------------------------------------------
// setup and the training loop

static void trainer_init(Trainer& t, const Options& o) {
    t.o = o;
    int ndev = 0;
    ql_assert(cudaGetDeviceCount(&ndev) == cudaSuccess && ndev > 0, "no CUDA device found");
    t.dist.init(o.dist_init, o.dist_timeout);   // selects this rank's GPU: before any other CUDA call
    cudaCheck(cudaStreamCreate(&t.s));
    matmul_init(t.mm, t.s);
    t.prof.on = o.profile;
    if (!t.prof.on) cudaCheck(cudaStreamCreateWithFlags(&t.lane.s, cudaStreamNonBlocking));
    matmul_init(t.lane.mm, t.prof.on ? t.s : t.lane.s);
    cudaCheck(cudaEventCreateWithFlags(&t.lane.ready, cudaEventDisableTiming));
    for (cudaEvent_t& e : t.lane.done) cudaCheck(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
    t.prof.s = t.s;
    bool random = o.model.rfind("random:", 0) == 0;
    Config c = random ? random_config(o.model.substr(7)) : load_config(o.model + "/config.json");
    ql_assert(c.head_dim == 64 || c.head_dim == 128, "head_dim %d: the attention kernel supports 64 and 128", c.head_dim);
    ql_assert(o.seq <= c.max_seq_len || random, "--seq %d is longer than the model allows (max_position_embeddings %d)", o.seq,
              c.max_seq_len);
    if (o.seq > c.max_seq_len)   // random weights were never trained at any length: a benchmark of memory and speed
        printf("note: --seq %d is beyond %s's %d positions (allowed for random weights only: RoPE goes on as it is)\n", o.seq,
               o.model.c_str(), c.max_seq_len);
    ql_assert(c.sliding_window == 0 || o.seq <= c.sliding_window,
              "--seq %d exceeds the model's sliding_window %d, which qlora does not implement", o.seq, c.sliding_window);
    for (int p = 0; p < N_PROJ; p++)
        ql_assert(((size_t)proj_out(c, p) * proj_in(c, p)) % NF4_BLOCKSIZE == 0,
                  "%s: %d x %d is not a whole number of %d-element NF4 blocks", PROJ_NAME[p], proj_out(c, p), proj_in(c, p),
                  NF4_BLOCKSIZE);
    ql_assert(c.dim % 8 == 0 && c.hidden_dim % 8 == 0 && c.vocab_size % 8 == 0,
              "hidden_size, intermediate_size and vocab_size must be multiples of 8");
    t.m.cfg = c;
    t.m.lc = o.lora;
    std::vector<float> adapter;   // --adapter: its LoRA configuration replaces the options, its weights the init
    if (!o.adapter.empty()) {
        peft_adapter_read(o.adapter, c, t.m.lc, adapter);
        t.m.lc.dropout = o.lora.dropout;
    }
    printf("model %s: H %d I %d L %d heads %d/%d hd %d V %d%s | LoRA r %d alpha %g on %s%s | %.1f M trainable\n", o.model.c_str(),
           c.dim, c.hidden_dim, c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim, c.vocab_size, config_tags(c).c_str(), t.m.lc.rank,
           t.m.lc.alpha, lora_targets_text(t.m.lc.targets).c_str(), o.adapter.empty() ? "" : (" from " + o.adapter).c_str(),
           lora_num_params(c, t.m.lc) / 1e6);
    std::vector<Arena> arenas;
    plan_and_alloc(t, arenas);
    load_model(t);
    std::vector<float> init(t.m.n_lora);
    if (!o.adapter.empty())
        init = adapter;
    else
        lora_init(init.data(), c, t.m.lc, o.seed);
    set_lora(t, init.data());
}

// model FLOPs per token, as ../shared/bench/hf_qlora.py counts them: forward 2N + input grad 2N over
// the quantized linears and the head, attention forward + backward (causal)
static double flops_per_token(const Config& c, int seq) {
    double lin = 0;
    for (int p = 0; p < N_PROJ; p++) lin += (double)proj_out(c, p) * proj_in(c, p);
    lin *= c.n_layers;
    double attn = 4.0 * seq * c.n_heads * c.head_dim * c.n_layers / 2;
    return 4 * (lin + (double)c.vocab_size * c.dim) + 3 * attn;
}

// what --recompute adds on top (hardware FLOPs, not model FLOPs): the re-run forward of every linear
// but down_proj (the recompute stops before it) and, unless its output was kept (Acts::keep_att), of attention
static double recompute_flops_per_token(const Config& c, int seq, bool attention) {
    double lin = 0;
    for (int p = 0; p < N_PROJ; p++)
        if (p != P_DOWN) lin += (double)proj_out(c, p) * proj_in(c, p);
    return 2 * lin * c.n_layers + (attention ? 4.0 * seq * c.n_heads * c.head_dim * c.n_layers / 2 : 0.0);
}

static float lr_at(const Options& o, int step) {
    return lr_schedule(step, o.steps, o.warmup, o.lr, o.min_lr_frac);
}

// ---------------------------------------------------------------------------------------------
// data, evaluation, the resume state, and the training loop

// synthetic data: random tokens, labels = ids (hf_qlora.py's recipe), shifted within each row
static void synthetic_batch(Batch& b, const Options& o, int V, uint64_t micro) {
    int N = o.batch * o.seq;
    b.B = o.batch;
    b.T = o.seq;
    b.ids.resize(N);
    b.targets.resize(N);
    b.pos.clear();
    b.doc_start.clear();
    for (int i = 0; i < N; i++) b.ids[i] = (int)(rng_u32(o.seed, 77, micro * (uint64_t)N + i) % (uint32_t)V);
    for (int i = 0; i < N; i++) b.targets[i] = (i % o.seq == o.seq - 1) ? -1 : b.ids[i + 1];
}

static void upload(Trainer& t, const Batch& b) {
    Acts& a = t.a;
    cudaCheck(cudaMemcpyAsync(a.ids, b.ids.data(), a.N * 4, cudaMemcpyHostToDevice, t.s));
    cudaCheck(cudaMemcpyAsync(a.targets, b.targets.data(), a.N * 4, cudaMemcpyHostToDevice, t.s));
    a.packed = !b.pos.empty();
    if (a.packed) {
        cudaCheck(cudaMemcpyAsync(a.pos, b.pos.data(), a.N * 4, cudaMemcpyHostToDevice, t.s));
        cudaCheck(cudaMemcpyAsync(a.doc_start, b.doc_start.data(), a.N * 4, cudaMemcpyHostToDevice, t.s));
    }
    cudaCheck(cudaMemsetAsync(a.flags, 0, 8, t.s));
}
// the loss sum of the last forward, after checking the ids the kernels flagged
static float read_loss_sum(Trainer& t, const char* what, int step) {
    float ls;
    int flags[2];
    cudaCheck(cudaMemcpyAsync(&ls, t.a.loss_sum, 4, cudaMemcpyDeviceToHost, t.s));
    cudaCheck(cudaMemcpyAsync(flags, t.a.flags, 8, cudaMemcpyDeviceToHost, t.s));
    cudaCheck(cudaStreamSynchronize(t.s));
    ql_assert(!flags[0] && !flags[1], "%s at step %d: a token or target id is outside the model's vocabulary (%d)", what, step,
              t.m.cfg.vocab_size);
    return ls;
}

struct Data {
    TokenFile train, val;
    Loader loader;
    bool file = false;
};

// Name what went non-finite: the loss, or the first LoRA gradient tensor holding a NaN/inf.
static void warn_nonfinite(Trainer& t, int step, float loss) {
    const Config& c = t.m.cfg;
    const LoraConfig& lc = t.m.lc;
    std::vector<float> g(t.m.n_lora);
    cudaCheck(cudaMemcpy(g.data(), t.m.grad, g.size() * 4, cudaMemcpyDeviceToHost));
    size_t bad = 0, first = g.size();
    for (size_t i = 0; i < g.size(); i++)
        if (!std::isfinite(g[i])) {
            bad++;
            if (first == g.size()) first = i;
        }
    std::string where = "no gradient (the loss itself)";
    for (int l = 0; l < c.n_layers && bad; l++)
        for (int p = 0; p < N_PROJ; p++) {
            if (!lc.has(p)) continue;
            LoraSlot s = lora_slot(c, lc, l, p);
            bool in_a = first >= s.a && first < s.a + (size_t)lc.rank * proj_in(c, p);
            bool in_b = first >= s.b && first < s.b + (size_t)proj_out(c, p) * lc.rank;
            if (in_a || in_b) {
                std::string k = hf_linear_name(l, p);
                k.resize(k.size() - 7);
                where = k + (in_a ? ".lora_A" : ".lora_B") + " (" + std::to_string(bad) + " non-finite values in all)";
            }
        }
    fprintf(stderr, "qlora: warning: step %d: loss %g, non-finite gradient in %s; update skipped\n", step + 1, loss, where.c_str());
}

// one optimizer step over grad_accum micro-batches; returns the loss (mean over unmasked targets);
// *ok = false if the gradients were not finite (the update is skipped)
static float train_step(Trainer& t, Data& d, int step, float lr, float* norm_out, bool* ok) {
    const Options& o = t.o;
    Model& m = t.m;
    Acts& a = t.a;
    std::vector<Batch> bs(o.grad_accum);
    long denom = 0;   // unmasked targets of the whole step: every micro-batch's loss is divided by it
    for (int k = 0; k < o.grad_accum; k++) {
        uint64_t micro =
            ((uint64_t)step * o.grad_accum + k) * t.dist.world + t.dist.rank;   // this rank's rows of the world's batch
        if (d.file)
            d.loader.next(bs[k], o.batch, o.seq);
        else
            synthetic_batch(bs[k], o, m.cfg.vocab_size, micro);
        denom += bs[k].count_targets();
    }
    denom = (long)t.dist.sum((double)denom, t.s, "the token count");   // every rank's: the loss is the mean over the world's batch
    t.prof.n = 0;                 // marks of an evaluation since the last step are not this step's
    if (step == o.inject_oom) {   // test hook: a GPU fault mid-run
        void* p;
        cudaCheck(cudaMalloc(&p, (size_t)1 << 50));
    }
    float loss = 0;
    int nonfinite = 0;
    {
        ProfileScope prof(t.prof, "host gaps, uploads");
        cudaCheck(cudaMemsetAsync(m.grad, 0, m.n_lora * 4, t.s));
        for (int k = 0; k < o.grad_accum; k++) {
            upload(t, bs[k]);
            uint64_t drop_seed = mix64(o.seed ^ ((uint64_t)step * o.grad_accum + k));
            if (t.dist.rank) drop_seed = mix64(drop_seed ^ (uint64_t)t.dist.rank);   // each rank its own dropout masks
            forward(t, denom ? 1.0f / (float)denom : 0.0f, true, drop_seed);
            backward(t, drop_seed);
            loss += denom ? read_loss_sum(t, "training", step) / (float)denom : 0.0f;
        }
        if (step >= o.inject_nan && step < o.inject_nan + o.inject_nan_steps && o.inject_nan >= 0)
            cudaCheck(cudaMemsetAsync(m.grad, 0xff, 4, t.s));   // one NaN (0xffffffff) gradient
        if (t.dist.on) {   // the sum over ranks: every rank clips and steps on the same gradients
            prof.to("gradient all-reduce");
            t.dist.all_reduce(m.grad, m.n_lora, t.s, "the LoRA gradient all-reduce");
            t.dist.sync(t.s,
                        "the LoRA gradient all-reduce");   // waits under the deadline (the copies below would wait without one)
        }
        AdamWConfig ac;
        ac.lr = lr;
        ac.weight_decay = o.weight_decay;
        cudaCheck(cudaMemsetAsync(a.flags, 0, 4, t.s));
        prof.to("grad norm + AdamW");
        grad_norm(a.norm, a.flags, m.grad, m.n_lora, a.norm_scratch, t.s);
        adamw_update(m.lora, m.lora_bf16, m.adam_m, m.adam_v, m.grad, a.norm, o.clip, m.n_lora, ac, step + 1, t.s);
        cudaCheck(cudaMemcpyAsync(norm_out, a.norm, 4, cudaMemcpyDeviceToHost, t.s));
        cudaCheck(cudaMemcpyAsync(&nonfinite, a.flags, 4, cudaMemcpyDeviceToHost, t.s));
    }
    t.prof.step();
    cudaCheck(cudaStreamSynchronize(t.s));
    loss = (float)t.dist.sum(loss, t.s, "the loss");   // the world's loss; a non-finite one on any rank skips the step on all
    *ok = !nonfinite && std::isfinite(loss);
    if (!*ok) warn_nonfinite(t, step, loss);
    return loss;
}

// Validation loss over the whole --val file (or its first --eval-batches batches), forward only.
// Whole documents per row (eval_batches: none split across rows, so every answer keeps its prompt
// and the loss is each document's own, as the CPU reference computes it).
static float evaluate(Trainer& t, Data& d) {
    double sum = 0;
    long n = 0;
    int i = 0;
    for (const Batch& b : eval_batches(d.val, t.o.batch, t.o.seq, t.o.eval_batches)) {
        upload(t, b);
        forward(t, 1.0f, false, 0);
        sum += read_loss_sum(t, "evaluation", i++);
        n += b.count_targets();
    }
    return n ? (float)(sum / n) : 0.0f;
}

// ---------------------------------------------------------------------------------------------
// generation: B sequences one token at a time with a KV cache per layer (kernels/decode.cuh), the
// same kernels as forward() otherwise; the choice of each next token on the host (generate.h)

// Decoding buffers, one allocation for one call of generate(): rows sequences of up to Tmax tokens.
struct Decoder {
    int B = 0, Tmax = 0;
    bool lora = true;   // false: the base model alone
    Arena mem;
    std::vector<bf16*> kc, vc;   // (L) x (B, Tmax, nkv, hd) keys (after RoPE) and values of every position so far
    bf16* x;                     // (B, H)   residual stream
    bf16* n;                     // (B, H)   normed
    bf16* q;                     // (B, qd)
    bf16* k;                     // (B, kvd)
    bf16* v;                     // (B, kvd)
    bf16* q_pre;                 // (B, qd)  QK-norm only: q_proj before q_norm
    bf16* k_pre;                 // (B, kvd) QK-norm only
    float* rstd_qk;              // (B, nh + nkv) QK-norm only
    bf16* att;                   // (B, qd)  attention output
    bf16* delta;                 // (B, H)   o_proj / down_proj output
    bf16* gate;                  // (B, I)
    bf16* up;                    // (B, I)
    bf16* act;                   // (B, I)   silu(gate) * up
    bf16* u;                     // (B, 3r)  a group's LoRA u = x·[A..]ᵀ
    bf16* wdq[N_PROJ];           // one layer's dequantized weights (out, in) (the trainer's stay untouched)
    float* rstd;                 // (B)
    float* logits;               // (B, V) fp32: the next token's logits
    int* ids;                    // (B) token of each sequence this step
    int* pos;                    // (B) its position
    int* flags;                  // (1) bad token id
};

static void decoder_init(Trainer& t, Decoder& d, int B, int Tmax, bool lora) {
    const Config& c = t.m.cfg;
    size_t H = c.dim, I = c.hidden_dim, q = c.q_dim(), kv = c.kv_dim(), r = t.m.lc.rank;
    d.B = B;
    d.Tmax = Tmax;
    d.lora = lora;
    d.mem = Arena();
    d.mem.role = "generation (KV cache, one token per sequence)";
    d.kc.resize(c.n_layers);
    d.vc.resize(c.n_layers);
    for (int l = 0; l < c.n_layers; l++) {
        d.mem.want(&d.kc[l], (size_t)B * Tmax * kv);
        d.mem.want(&d.vc[l], (size_t)B * Tmax * kv);
    }
    for (bf16** p : {&d.x, &d.n, &d.delta}) d.mem.want(p, B * H);
    for (bf16** p : {&d.q, &d.att, &d.q_pre}) d.mem.want(p, B * q);
    for (bf16** p : {&d.k, &d.v, &d.k_pre}) d.mem.want(p, B * kv);
    d.mem.want(&d.rstd_qk, (size_t)B * (c.n_heads + c.n_kv_heads));
    for (bf16** p : {&d.gate, &d.up, &d.act}) d.mem.want(p, B * I);
    d.mem.want(&d.u, B * 3 * r);
    for (int p = 0; p < N_PROJ; p++) d.mem.want(&d.wdq[p], (size_t)proj_out(c, p) * proj_in(c, p));
    d.mem.want(&d.rstd, B);
    d.mem.want(&d.logits, (size_t)B * c.vocab_size);
    for (int** p : {&d.ids, &d.pos}) d.mem.want(p, B);
    d.mem.want(&d.flags, 1);
    d.mem.alloc();
}
static void decoder_free(Decoder& d) {
    if (d.mem.base) cudaCheck(cudaFree(d.mem.base));
    d.mem.base = nullptr;
}

// One step: token d.ids[b] at position d.pos[b] of sequence b goes through every layer (its k, v
// join the cache) and d.logits (B, V) fp32 become the logits of the token after it. The layer is
// the training forward's for T = 1 (linears_forward, the same norms and RoPE), with the keys and
// values of earlier positions read from the cache.
static void decode_step(Trainer& t, Decoder& d) {
    const Config& c = t.m.cfg;
    const Model& m = t.m;
    int B = d.B, L = c.n_layers;
    LinearRun run = {B, d.wdq, d.lora, false};
    embedding_forward(d.x, d.flags, d.ids, m.w.at(W_EMBED), B, c.dim, c.vocab_size, t.s);   // x = embed_tokens(ids)
    rmsnorm_forward(d.n, d.rstd, d.x, m.w.at(W_ATTN_NORM, 0), B, c.dim, c.norm_eps, t.s);   // n = input_layernorm(x)
    for (int l = 0; l < L; l++) {
        dequantize_layer(t, d.wdq, l);
        bf16* qkv[3] = {c.qk_norm ? d.q_pre : d.q, c.qk_norm ? d.k_pre : d.k, d.v};
        linears_forward(t, run, G_QKV, qkv, d.n, d.u, l, 0);   // q, k, v = q_proj(n), k_proj(n), v_proj(n)
        float* rstd_k = d.rstd_qk + (size_t)B * c.n_heads;
        qk_norm_rope(t, l, {d.q, d.k, d.q_pre, d.k_pre, d.rstd_qk, rstd_k}, d.pos, B, 1);   // at each sequence's position
        kv_cache_store(d.kc[l], d.vc[l], d.k, d.v, d.pos, B, d.Tmax, c.n_kv_heads, c.head_dim, t.s);
        decode_attention(d.att, d.q, d.kc[l], d.vc[l], d.pos, B, d.Tmax, c.n_heads, c.n_kv_heads, c.head_dim, t.s);   // keys 0..pos
        linears_forward(t, run, G_O, &d.delta, d.att, d.u, l, 0);
        // x = x + o_proj(att); n = post_attention_layernorm(x)
        rmsnorm_residual_forward(d.x, d.n, d.rstd, d.x, d.delta, m.w.at(W_MLP_NORM, l), B, c.dim, c.norm_eps, t.s);
        bf16* gu[2] = {d.gate, d.up};
        linears_forward(t, run, G_GATE_UP, gu, d.n, d.u, l, 0);
        swiglu_forward(d.act, d.gate, d.up, (int64_t)B * c.hidden_dim, t.s);   // silu(gate) * up
        linears_forward(t, run, G_DOWN, &d.delta, d.act, d.u, l, 0);
        // x = x + down_proj(...); n = the next layer's input_layernorm(x), or the final norm
        const bf16* norm = l + 1 < L ? m.w.at(W_ATTN_NORM, l + 1) : m.w.at(W_FINAL_NORM);
        rmsnorm_residual_forward(d.x, d.n, d.rstd, d.x, d.delta, norm, B, c.dim, c.norm_eps, t.s);
    }
    gemm_forward(t.mm, d.logits, d.n, m.w.lm_head(), B, c.vocab_size, c.dim);   // logits = lm_head(n), fp32
}

struct GenSettings {
    float temperature = 0.0f, top_p = 1.0f;
    uint64_t seed = 0;   // temperature 0: greedy
    int eos = -1;        // stop after this token (-1: never)
    bool lora = true;    // false: the base model alone
};

// Continues every prompt by up to max_new[i] tokens: stops after gs.eos, or at max_position_embeddings
// (as qlora_cpu's generate). Sequences run rows at a time, each fed one token per step (its prompt,
// then its own choices), all at the same position, so a step is one decode_step. logits_out (tests):
// for each prompt, the logits (fp32, V per token) each of its new tokens was chosen from.
static std::vector<std::vector<int>> generate(Trainer& t, const std::vector<std::vector<int>>& prompts,
                                              const std::vector<int>& max_new, const GenSettings& gs,
                                              std::vector<std::vector<float>>* logits_out = nullptr) {
    const Config& c = t.m.cfg;
    int V = c.vocab_size, n = (int)prompts.size();
    std::vector<std::vector<int>> out(n);
    if (logits_out) logits_out->assign(n, {});
    // a sequence fills positions 0 .. len + max_new - 2 (the last new token is not fed back)
    auto last_pos = [&](int i) {
        return std::min((int)prompts[i].size() + max_new[i] - 1, c.max_seq_len - 1);
    };
    std::vector<int> todo;
    int Tmax = 1;
    for (int i = 0; i < n; i++)
        if (!prompts[i].empty() && (int)prompts[i].size() < c.max_seq_len && max_new[i] > 0) {
            todo.push_back(i);
            Tmax = std::max(Tmax, last_pos(i));
        }
    if (todo.empty()) return out;
    // rows per pass: all prompts, or as many as fit in half the free memory (the KV cache dominates)
    size_t free_b, total_b;
    cudaCheck(cudaMemGetInfo(&free_b, &total_b));
    size_t per_row =
        2 * (size_t)c.n_layers * Tmax * c.kv_dim() * 2 + (size_t)V * 4 + 8 * (size_t)(c.dim + c.hidden_dim + c.q_dim());
    size_t weights = 0;
    for (int p = 0; p < N_PROJ; p++) weights += (size_t)proj_out(c, p) * proj_in(c, p) * 2;
    int rows = (int)std::min<size_t>(todo.size(), 4096);
    while (rows > 1 && weights + rows * per_row > free_b / 2) rows /= 2;
    Decoder d;
    decoder_init(t, d, rows, Tmax, gs.lora);
    std::vector<int> ids(rows), pos(rows);
    std::vector<float> logits((size_t)rows * V);
    for (size_t r0 = 0; r0 < todo.size(); r0 += rows) {
        int nb = (int)std::min<size_t>(rows, todo.size() - r0);
        std::vector<char> done(rows, 1);
        for (int b = 0; b < nb; b++) done[b] = 0;
        for (int s = 0; s < Tmax && std::count(done.begin(), done.end(), 0); s++) {
            for (int b = 0; b < rows; b++) {
                int i = b < nb ? todo[r0 + b] : todo[r0];   // rows past the last prompt: a copy, ignored
                const std::vector<int>& pr = prompts[i];
                ids[b] = s < (int)pr.size() ? pr[s] : (out[i].empty() ? pr.back() : out[i].back());
                pos[b] = s;
            }
            cudaCheck(cudaMemcpyAsync(d.ids, ids.data(), rows * 4, cudaMemcpyHostToDevice, t.s));
            cudaCheck(cudaMemcpyAsync(d.pos, pos.data(), rows * 4, cudaMemcpyHostToDevice, t.s));
            cudaCheck(cudaMemsetAsync(d.flags, 0, 4, t.s));
            decode_step(t, d);
            int bad = 0;
            cudaCheck(cudaMemcpyAsync(logits.data(), d.logits, logits.size() * 4, cudaMemcpyDeviceToHost, t.s));
            cudaCheck(cudaMemcpyAsync(&bad, d.flags, 4, cudaMemcpyDeviceToHost, t.s));
            cudaCheck(cudaStreamSynchronize(t.s));
            ql_assert(!bad, "generation: a prompt token id is outside the model's vocabulary (%d)", V);
            for (int b = 0; b < nb; b++) {
                int i = todo[r0 + b];
                if (done[b] || s < (int)prompts[i].size() - 1) continue;   // still reading the prompt
                const float* z = &logits[(size_t)b * V];
                int next = choose_token(z, V, gs.temperature, gs.top_p, rng_uniform(gs.seed, 7000 + (uint64_t)i, out[i].size()));
                out[i].push_back(next);
                if (logits_out) (*logits_out)[i].insert((*logits_out)[i].end(), z, z + V);
                done[b] =
                    next == gs.eos || (int)out[i].size() == max_new[i] || (int)(prompts[i].size() + out[i].size()) >= c.max_seq_len;
            }
        }
    }
    decoder_free(d);
    return out;
}

// What `make train` reports on the validation prompts: the examples, and the table to print them.
struct TaskEval {
    std::vector<Example> ex;   // the --val file's prompts and answers (the first --eval-examples)
    Vocab vocab;
    bool have_vocab = false;
    const Vocab* v() const { return have_vocab ? &vocab : nullptr; }
};
static void task_eval_init(Trainer& t, Data& d, TaskEval& e) {
    e.ex = examples_of(d.val);
    if (t.o.eval_examples && (int)e.ex.size() > t.o.eval_examples) e.ex.resize(t.o.eval_examples);
    e.have_vocab = !t.o.vocab.empty() && file_exists(t.o.vocab);
    if (e.have_vocab)
        vocab_load(e.vocab, t.o.vocab);
    else if (t.o.samples)
        printf("note: no vocabulary table %s (dev/data/prepare.py writes it): samples shown as token ids\n",
               t.o.vocab.empty() ? "(--vocab FILE)" : t.o.vocab.c_str());
}

// Exact-match accuracy: each prompt's greedy continuation, |answer| tokens long, is its answer.
static int accuracy(Trainer& t, const std::vector<Example>& ex, bool lora = true) {
    std::vector<std::vector<int>> prompts;
    std::vector<int> max_new;
    for (const Example& x : ex) {
        prompts.push_back(x.prompt);
        max_new.push_back((int)x.answer.size());
    }
    GenSettings gs;
    gs.lora = lora;
    std::vector<std::vector<int>> got = generate(t, prompts, max_new, gs);
    int right = 0;
    for (size_t i = 0; i < ex.size(); i++) right += exact_match(got[i], ex[i].answer);
    return right;
}

// The first k examples continued greedily (up to |answer| + 8 tokens, to the end of turn), printed.
static void print_samples(Trainer& t, const TaskEval& e, int k, const GenSettings& gs) {
    std::vector<std::vector<int>> prompts;
    std::vector<int> max_new;
    for (int i = 0; i < k && i < (int)e.ex.size(); i++) {
        prompts.push_back(e.ex[i].prompt);
        max_new.push_back((int)e.ex[i].answer.size() + 8);
    }
    std::vector<std::vector<int>> got = generate(t, prompts, max_new, gs);
    for (size_t i = 0; i < got.size(); i++) print_sample(e.v(), prompts[i], got[i], &e.ex[i].answer);
}

// Validation loss and exact-match accuracy (greedy) on the --val file, timed.
struct Report {
    float loss;
    int right, total;
    double seconds;
};
static Report task_report(Trainer& t, Data& d, const TaskEval& e) {
    auto t0 = std::chrono::steady_clock::now();
    Report r;
    r.loss = evaluate(t, d);
    r.right = accuracy(t, e.ex);
    r.total = (int)e.ex.size();
    r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    return r;
}
// `before: val loss .. | accuracy ..` and the samples, as qlora_cpu prints them
static void report(Trainer& t, Data& d, const TaskEval& e, const char* when) {
    Report r = task_report(t, d, e);
    print_report(when, r.loss, r.right, r.total, r.seconds);
    GenSettings gs;
    gs.eos = e.have_vocab && e.vocab.eos != VOCAB_NONE ? (int)e.vocab.eos : -1;
    print_samples(t, e, t.o.samples, gs);
    fflush(stdout);
}

// qlora sample: the base model (or base + --adapter) continues --prompt texts or the prompts of a
// --val file (first --samples K, with their expected answers; greedy: the accuracy over
// --eval-examples too).
static int sample_mode(Options o) {
    ql_assert(o.prompts.empty() != o.val.empty(),
              "qlora sample needs --prompt TEXT (one or more) or --val FILE, not both (see --help)");
    o.batch = 1;
    o.seq = 1;
    o.steps = 0;
    o.train.clear();
    o.recompute = true;   // the trainer's buffers at their smallest (one layer's weights): generation has its own
    o.keep_attention = false;
    Trainer t;
    trainer_init(t, o);
    Vocab vocab;
    bool have_vocab = !o.vocab.empty() && file_exists(o.vocab);
    if (have_vocab) vocab_load(vocab, o.vocab);
    const Vocab* v = have_vocab ? &vocab : nullptr;
    GenSettings gs;
    gs.temperature = o.temperature;
    gs.top_p = o.top_p;
    gs.seed = o.seed;
    gs.lora = !o.adapter.empty();
    gs.eos = v && vocab.eos != VOCAB_NONE ? (int)vocab.eos : -1;
    char how[96] = "greedy";
    if (o.temperature > 0)
        snprintf(how, sizeof how, "temperature %g, top-p %g, seed %llu", o.temperature, o.top_p, (unsigned long long)o.seed);
    printf("sample: %s%s | %s | up to %d new tokens%s\n", o.model.c_str(),
           gs.lora ? (" + " + o.adapter).c_str() : " (base model alone)", how, o.max_new,
           v ? "" : " | no vocabulary table: token ids");
    std::vector<std::vector<int>> prompts;
    std::vector<Example> ex;
    if (!o.val.empty()) {
        TokenFile f;
        token_file_open(f, o.val, t.m.cfg.vocab_size);
        ex = examples_of(f);
        ql_assert(!ex.empty(), "%s has no prompts (no loss mask): use --prompt TEXT", o.val.c_str());
        if (o.temperature == 0) {
            std::vector<Example> scored(ex.begin(),
                                        ex.begin() + (o.eval_examples ? std::min<size_t>(o.eval_examples, ex.size()) : ex.size()));
            int right = accuracy(t, scored, gs.lora);
            printf("accuracy %d/%zu = %.1f%% (greedy, exact match) on %s\n", right, scored.size(), 100.0 * right / scored.size(),
                   o.val.c_str());
        }
        ex.resize(std::min<size_t>(o.samples, ex.size()));
        for (const Example& x : ex) prompts.push_back(x.prompt);
    } else
        for (const std::string& p : o.prompts) prompts.push_back(prompt_ids(p, v));
    std::vector<std::vector<int>> got = generate(t, prompts, std::vector<int>(prompts.size(), o.max_new), gs);
    for (size_t i = 0; i < got.size(); i++) print_sample(v, prompts[i], got[i], ex.empty() ? nullptr : &ex[i].answer);
    return 0;
}

// The resume state (formats.h §11b: state.safetensors beside the adapter), and the adapter, written
// as one set: out_write_set switches the new files in whole, or leaves the previous ones.
static std::string state_signature(const Trainer& t) {   // + the world size of a data-parallel run
    std::string s = run_signature(t.o, t.m.lc);
    return t.dist.world > 1 ? s + " world=" + std::to_string(t.dist.world) : s;
}
static void save_state(Trainer& t, const Data& d, int step, const std::string& dir) {
    size_t n = t.m.n_lora;
    ResumeState s;
    s.step = step;
    s.epoch = d.loader.st.epoch;
    s.cursor = d.loader.st.cursor;
    s.offset = d.loader.st.offset;
    s.lora.resize(n);
    s.adam_m.resize(n);
    s.adam_v.resize(n);
    cudaCheck(cudaMemcpy(s.lora.data(), t.m.lora, n * 4, cudaMemcpyDeviceToHost));
    cudaCheck(cudaMemcpy(s.adam_m.data(), t.m.adam_m, n * 4, cudaMemcpyDeviceToHost));
    cudaCheck(cudaMemcpy(s.adam_v.data(), t.m.adam_v, n * 4, cudaMemcpyDeviceToHost));
    out_write_set(dir, [&](const std::string& stage) {
        save_adapter(t, stage);
        state_write(stage, s, state_signature(t));
    });
}
static int load_state(Trainer& t, Data& d, const std::string& dir) {
    size_t n = t.m.n_lora;
    ResumeState s = state_read(dir, state_signature(t), n);
    set_lora(t, s.lora.data());
    cudaCheck(cudaMemcpy(t.m.adam_m, s.adam_m.data(), n * 4, cudaMemcpyHostToDevice));
    cudaCheck(cudaMemcpy(t.m.adam_v, s.adam_v.data(), n * 4, cudaMemcpyHostToDevice));
    if (d.file) d.loader.init(&d.train, t.o.seed, true, {s.epoch, s.cursor, s.offset});
    return s.step;
}

// SIGINT/SIGTERM: the first finishes the current step, saves and exits 0; a second exits at once
// (a save is switched in whole, out_write_set: nothing is left half-written).
static volatile sig_atomic_t g_stop = 0;
static void on_signal(int) {
    if (g_stop) _exit(130);
    g_stop = 1;
}

static void data_init(Trainer& t, Data& d) {
    d.file = !t.o.train.empty();
    d.loader.rank = t.dist.rank;
    d.loader.world = t.dist.world;
    if (d.file) {
        token_file_open(d.train, t.o.train, t.m.cfg.vocab_size);
        token_file_require_targets(d.train, t.o.train, "--train");
        d.loader.init(&d.train, t.o.seed, true);
    }
    if (!t.o.val.empty()) {
        token_file_open(d.val, t.o.val, t.m.cfg.vocab_size);
        token_file_require_targets(d.val, t.o.val, "--val");
    }
    printf("data: %s", d.file ? t.o.train.c_str() : "synthetic (random tokens)");
    if (d.file) printf(" (%llu tokens, %llu documents)", (unsigned long long)d.train.n_tokens, (unsigned long long)d.train.n_docs);
    if (!t.o.val.empty()) printf(", validation %s (%llu tokens)", t.o.val.c_str(), (unsigned long long)d.val.n_tokens);
    printf("\n");
}

#ifndef QLORA_TESTING
int main(int argc, char** argv) {
    int rc = tool_dispatch(argc, argv, GPU, "qlora");
    if (rc >= 0) return rc;
    if (argc > 1 && !strcmp(argv[1], "sample")) return sample_mode(parse_options(argc - 1, argv + 1, SAMPLE, GPU, "qlora"));
    Options o = parse_options(argc, argv, TRAIN, GPU, "qlora");
    if (!o.out.empty()) out_lock(o.out);   // before any work: not a file, and no other run writing it
    Trainer t;
    trainer_init(t, o);
    if (t.dist.rank > 0) {
        o.log.clear();
        o.out.clear();
    }   // rank 0 logs and saves for all: the adapters are the same
    Data d;
    data_init(t, d);
    int start = o.resume.empty() ? 0 : load_state(t, d, o.resume);
    if (start) printf("resumed from %s at step %d\n", o.resume.c_str(), start);
    TaskEval te;
    if (!o.val.empty()) {
        task_eval_init(t, d, te);
        report(t, d, te, start ? "at resume" : "before");
    }
    FILE* logf = o.log.empty() ? nullptr : fopen(o.log.c_str(), start ? "a" : "w");
    ql_assert(o.log.empty() || logf, "cannot open log file %s", o.log.c_str());
    struct sigaction sa = {};
    sa.sa_handler = on_signal;
    sigaction(SIGINT, &sa, nullptr);
    sigaction(SIGTERM, &sa, nullptr);
    double fpt = flops_per_token(t.m.cfg, o.seq), tok_per_step = (double)o.batch * o.seq * o.grad_accum;
    size_t free_b, total_b, peak = 0;
    std::vector<double> times;
    int bad = 0, step = start;
    double run_s = 0;   // this run's steps so far, for the ETA
    auto log = [&](const char* line, bool show = true) {
        if (show) {
            printf("%s\n", line);
            fflush(stdout);
        }
        if (logf) {
            fprintf(logf, "%s\n", line);
            fflush(logf);
        }
    };
    for (; step < o.steps && !(g_stop = t.dist.any(g_stop, t.s, "the stop flag")); step++) {   // a Ctrl-C on any rank stops all
        auto t0 = std::chrono::steady_clock::now();
        float lr = lr_at(o, step), norm = 0;
        bool ok;
        float loss = train_step(t, d, step, lr, &norm, &ok);
        double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        if (step > start || o.steps - start == 1) times.push_back(dt);   // the first step is warm-up, unless it is the only one
        cudaCheck(cudaMemGetInfo(&free_b, &total_b));
        peak = std::max(peak, total_b - free_b);
        double tps = tok_per_step / dt, mfu = 100.0 * tps * fpt / (o.peak_tflops * 1e12);
        run_s += dt;
        char line[352];
        snprintf(line, sizeof line,
                 "step %5d/%d | loss %.9g | lr %.3e | norm %.4f | %.0f tok/s | MFU %.1f%% | GPU mem %.2f GiB | %s%s", step + 1,
                 o.steps, loss, lr, norm, tps, mfu, (total_b - free_b) / 1073741824.0,
                 eta_text(run_s / (step + 1 - start) * (o.steps - step - 1)).c_str(),
                 ok ? "" : " | SKIPPED: non-finite loss or gradient");
        log(line, !ok || (step + 1) % o.log_every == 0 || step == start || step + 1 == o.steps);
        bad = ok ? 0 : bad + 1;
        if (bad >= o.max_bad_steps) {
            fprintf(stderr,
                    "qlora: error: %d steps in a row with non-finite loss or gradients (last: step %d); stopping. "
                    "The last good state is in %s\n",
                    bad, step + 1, o.out.empty() ? "(no --out given)" : o.out.c_str());
            return 1;
        }
        if (o.eval_every && !o.val.empty() && (step + 1) % o.eval_every == 0 && step + 1 < o.steps) {
            Report r = task_report(t, d, te);
            snprintf(line, sizeof line, "eval  %5d | val loss %.4f | accuracy %d/%d (%.1f s)", step + 1, r.loss, r.right, r.total,
                     r.seconds);
            log(line);
        }
        if (!o.out.empty() && o.save_every && (step + 1) % o.save_every == 0 && ok) save_state(t, d, step + 1, o.out);
    }
    if (g_stop) printf("interrupted: saving at step %d\n", step);
    ql_assert(t.dist.identical(t.m.lora, t.m.n_lora * sizeof(float), t.s, "comparing the adapters"),
              "rank %d: the ranks' LoRA weights differ after step %d: a bug in data parallelism, please report it", t.dist.rank,
              step);
    if (!times.empty()) {
        std::sort(times.begin(), times.end());
        double med = times[times.size() / 2], tps = tok_per_step / med;
        double hfpt = fpt + (t.o.recompute ? recompute_flops_per_token(t.m.cfg, o.seq, !t.a.keep_att) : 0);
        printf("median step %.4f s | %.0f tok/s | MFU %.1f%% of %.0f TFLOP/s (HFU %.1f%%, recompute counted) | peak GPU memory "
               "(driver) %.2f GiB%s\n",
               med, tps, 100.0 * tps * fpt / (o.peak_tflops * 1e12), o.peak_tflops, 100.0 * tps * hfpt / (o.peak_tflops * 1e12),
               peak / 1073741824.0, o.steps - start == 1 ? " (one step, warm-up included)" : "");
    }
    if (!o.val.empty() && !g_stop && step > start) report(t, d, te, "after");   // --steps 0: "before" is the report
    if (!o.out.empty()) {
        save_state(t, d, step, o.out);
        printf("adapter and resume state saved to %s (PEFT format)\n", o.out.c_str());
    }
    t.prof.print();
    if (logf) fclose(logf);
    t.dist.finish();
    return 0;
}
#endif
