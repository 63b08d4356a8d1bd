// test/test_attention.cu: kernels/attention.cuh against a CPU reference, forward and backward.
// Shapes: B=2, T in {1, 17, 100, 128, 300}, nh=4, nkv in {4, 2, 1}, hd in {64, 128}, with and without
// document packing; and B=2, T=1000, nh=8 (8 key tiles), against the CPU where that is cheap. On a Hopper
// the small shapes run twice: the kernels it uses there (hd 128: forward kernel5, backward kernel6, whose
// TMA boxes of 64 or 128 rows run past T < 128; hd 64: the same kernels, 5a64 and 6f64), then (attention_wgmma_off) the
// mma.sync ones of every other GPU. Also on a Hopper: each variant of kernel5 (5a-5c) and kernel6 (6a-6f, and at
// hd 64 6a64-6h64) that the dispatch can pick must give the dispatched forward's and kernel4's bits; and at hd 64
// every case (in the wgmma pass) also runs kernel5's hd-64 variants by name: 5a64 against the CPU reference with the
// dispatched forward's budget (where the case has one; since 5a64 became the dispatch, a repeat of that check), 5b64
// and 5c64 bit for bit with 5a64.
// Inputs are seeded random bf16 values; outputs are poisoned (NaN) before each launch.
//
// Determinism: at T=300, T=1000 and the llama3-8b and -1b shapes (B=4, T=2048, nh=32, nkv=8, hd=128 and 64; several key
// tiles per query row, so several CTAs add to each dq element) the backward runs a second time on the same
// inputs, with outputs and scratch poisoned with other bytes, and dq, dk, dv must come out bit for bit the
// same (and so fully written).
//
// Error budget (per tensor, elementwise |gpu - ref| <= atol + rtol |ref|, ref in fp64 from the same bf16
// inputs): a CPU run in our precision plan (P and dS rounded to bf16 before their matmuls, outputs rounded
// to bf16; "sim") has an error e_sim = max |sim - ref|. The GPU differs from sim only in summation order,
// where the online softmax rounds P (against the running instead of the final max) and ex2.approx, so we
// allow atol = 2 e_sim and rtol = 2^-8 (one bf16 ulp); plus relative L2 error <= 1e-2 and <= 2x sim's + 1e-3
// (the FlashAttention test rule: ours vs fp64 within 2x a same-precision run's). lse is fp32: atol 1e-4.
//
//   nvcc -std=c++17 -O3 -gencode arch=compute_90a,code=sm_90a test/test_attention.cu -o test_attention
#include <cuda_runtime.h>            // defines: cudaMalloc, cudaGetDeviceCount
#include <vector>                    // defines: std::vector
#include <algorithm>                 // defines: std::max
#include "test.h"                    // defines: check, check_close, check_bytes, test_summary, test_skip
#include "../qlora.h"                // defines: f32_to_bf16, bf16_to_f32, rng_u32, rng_uniform
#include "../kernels/attention.cuh"  // defines: attention_forward, attention_backward, attention_backward_scratch_bytes,
                                     //   attention_forward5_launch, attention_backward_split_hd, attention_backward{4,6}_launch

// ---------------------------------------------------------------------------------------------
// CPU reference. sim = false: fp64 throughout, no rounding. sim = true: our precision plan.

struct Shape { int B, T, nh, nkv, hd; };

static inline double rnd(double x, bool sim) { return sim ? (double)bf16_round((float)x) : x; }

// out (B, T, nh, hd), lse (B, nh, T) from q (B, T, nh, hd), k, v (B, T, nkv, hd); doc (B, T) or null
static void attention_forward_cpu(std::vector<double>& out, std::vector<double>& lse, const std::vector<float>& q,
                                  const std::vector<float>& k, const std::vector<float>& v, const int* doc,
                                  Shape s, bool sim) {
    const int B = s.B, T = s.T, nh = s.nh, nkv = s.nkv, hd = s.hd;
    const double scale = 1.0 / sqrt((double)hd);
    out.assign((size_t)B * T * nh * hd, 0.0);
    lse.assign((size_t)B * nh * T, 0.0);
    std::vector<double> sc(T), acc(hd);
    for (int b = 0; b < B; b++)
        for (int h = 0; h < nh; h++) {
            const int kvh = h / (nh / nkv);
            for (int i = 0; i < T; i++) {
                const float* qi = &q[(((size_t)b * T + i) * nh + h) * hd];
                const int j0 = doc ? doc[b * T + i] : 0;
                double mx = -INFINITY;
                for (int j = j0; j <= i; j++) {
                    const float* kj = &k[(((size_t)b * T + j) * nkv + kvh) * hd];
                    double d = 0;
                    for (int c = 0; c < hd; c++) d += (double)qi[c] * kj[c];
                    sc[j] = d * scale;
                    mx = std::max(mx, sc[j]);
                }
                double l = 0;
                std::fill(acc.begin(), acc.end(), 0.0);
                for (int j = j0; j <= i; j++) {
                    const double pj = exp(sc[j] - mx);
                    l += pj;
                    const double pv = rnd(pj, sim);  // P cast to bf16 before P V
                    const float* vj = &v[(((size_t)b * T + j) * nkv + kvh) * hd];
                    for (int c = 0; c < hd; c++) acc[c] += pv * vj[c];
                }
                double* oi = &out[(((size_t)b * T + i) * nh + h) * hd];
                for (int c = 0; c < hd; c++) oi[c] = rnd(acc[c] / l, sim);
                lse[((size_t)b * nh + h) * T + i] = mx + log(l);
            }
        }
}

// dq (B, T, nh, hd), dk, dv (B, T, nkv, hd) from dout, q, k, v, out (bf16 values) and lse
static void attention_backward_cpu(std::vector<double>& dq, std::vector<double>& dk, std::vector<double>& dv,
                                   const std::vector<float>& dout, const std::vector<float>& q, const std::vector<float>& k,
                                   const std::vector<float>& v, const std::vector<float>& out, const std::vector<float>& lse,
                                   const int* doc, Shape s, bool sim) {
    const int B = s.B, T = s.T, nh = s.nh, nkv = s.nkv, hd = s.hd;
    const double scale = 1.0 / sqrt((double)hd);
    dq.assign((size_t)B * T * nh * hd, 0.0);
    dk.assign((size_t)B * T * nkv * hd, 0.0);
    dv.assign((size_t)B * T * nkv * hd, 0.0);
    for (int b = 0; b < B; b++)
        for (int h = 0; h < nh; h++) {
            const int kvh = h / (nh / nkv);
            for (int i = 0; i < T; i++) {
                const size_t qo = (((size_t)b * T + i) * nh + h) * hd;
                const float *qi = &q[qo], *doi = &dout[qo], *oi = &out[qo];
                double D = 0;
                for (int c = 0; c < hd; c++) D += (double)doi[c] * oi[c];
                const double L = lse[((size_t)b * nh + h) * T + i];
                const int j0 = doc ? doc[b * T + i] : 0;
                for (int j = j0; j <= i; j++) {
                    const size_t ko = (((size_t)b * T + j) * nkv + kvh) * hd;
                    const float *kj = &k[ko], *vj = &v[ko];
                    double sij = 0, dpij = 0;
                    for (int c = 0; c < hd; c++) { sij += (double)qi[c] * kj[c]; dpij += (double)doi[c] * vj[c]; }
                    const double p = exp(sij * scale - L);
                    const double ds = rnd(p * (dpij - D), sim), pr = rnd(p, sim);
                    for (int c = 0; c < hd; c++) {
                        dq[qo + c] += scale * ds * kj[c];
                        dk[ko + c] += scale * ds * qi[c];
                        dv[ko + c] += pr * doi[c];
                    }
                }
            }
        }
    if (sim) for (auto* t : {&dq, &dk, &dv}) for (double& x : *t) x = rnd(x, true);
}

// ---------------------------------------------------------------------------------------------
// helpers

static void fill_bf16(std::vector<uint16_t>& bits, std::vector<float>& vals, size_t n, float amp, uint64_t seed, uint64_t stream) {
    bits.resize(n); vals.resize(n);
    for (size_t i = 0; i < n; i++) {
        bits[i] = f32_to_bf16((2.0f * rng_uniform(seed, stream, i) - 1.0f) * amp);
        vals[i] = bf16_to_f32(bits[i]);
    }
}
static std::vector<float> bf16_vals(const std::vector<uint16_t>& bits) {
    std::vector<float> v(bits.size());
    for (size_t i = 0; i < bits.size(); i++) v[i] = bf16_to_f32(bits[i]);
    return v;
}
template <typename T> static T* to_device(const std::vector<T>& h) {
    T* d; cudaCheck(cudaMalloc(&d, h.size() * sizeof(T) + 16));
    cudaCheck(cudaMemcpy(d, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice));
    return d;
}
template <typename T> static T* poisoned(size_t n) {  // 0xff bytes: NaN as bf16 and as fp32
    T* d; cudaCheck(cudaMalloc(&d, n * sizeof(T) + 16));
    cudaCheck(cudaMemset(d, 0xff, n * sizeof(T) + 16));
    return d;
}
template <typename T> static std::vector<T> to_host(const T* d, size_t n) {
    std::vector<T> h(n);
    cudaCheck(cudaMemcpy(h.data(), d, n * sizeof(T), cudaMemcpyDeviceToHost));
    return h;
}
static double max_abs_diff(const std::vector<double>& a, const std::vector<double>& b) {
    double m = 0; for (size_t i = 0; i < a.size(); i++) m = std::max(m, fabs(a[i] - b[i])); return m;
}
template <typename A> static double rel_l2(const std::vector<A>& got, const std::vector<double>& ref) {
    double num = 0, den = 0;
    for (size_t i = 0; i < ref.size(); i++) { double d = (double)got[i] - ref[i]; num += d * d; den += ref[i] * ref[i]; }
    return den > 0 ? sqrt(num / den) : sqrt(num);
}

// one tensor: elementwise budget from sim's error, then the relative-L2 rule
static void check_tensor(const char* what, const char* cfg, const std::vector<float>& got, const std::vector<double>& ref,
                         const std::vector<double>& sim) {
    char name[128];
    snprintf(name, sizeof name, "%s %s", what, cfg);
    const double e_sim = max_abs_diff(sim, ref), r_sim = rel_l2(sim, ref), r_gpu = rel_l2(got, ref);
    check_close(name, got.data(), ref.data(), ref.size(), 2.0 * e_sim + 1e-6, 1.0 / 256);
    check(r_gpu <= 1e-2 && r_gpu <= 2.0 * r_sim + 1e-3, "%-44s rel_l2=%.3e (sim %.3e, budget min(1e-2, 2*sim+1e-3))", name, r_gpu, r_sim);
}

// Hopper, hd 64: kernel5 (5a64-5c64; the dispatch runs 5a64) on the case's device inputs. 5a64 against the
// CPU reference (when given) with the dispatched forward's budget; 5b64 and 5c64 differ from it only in schedule (ring
// depth, pingpong), so they must give its bits, poisoned with other bytes than 5a64's so an unwritten element differs.
typedef void (*FwdLaunch)(const AttnFwdParams&, cudaStream_t);
static void kernel5_hd64(const AttnFwdParams& p, const char* cfg, const std::vector<double>* out_ref,
                         const std::vector<double>* out_sim, const std::vector<double>* lse_ref) {
    const size_t nq = (size_t)p.B * p.T * p.nh * 64, nl = (size_t)p.B * p.nh * p.T;
    const struct { const char* name; FwdLaunch fn; } k5[] = {
        {"5a64", attention_forward5_launch<64, 128, 128, 2, true>},
        {"5b64", attention_forward5_launch<64, 128, 128, 3, true>},
        {"5c64", attention_forward5_launch<64, 128, 128, 2, false>},
    };
    std::vector<uint16_t> out_a;  // 5a64's out (B, T, nh, 64) bf16 bits
    std::vector<float> lse_a;     // and lse (B, nh, T)
    for (const auto& V : k5) {
        const bool first = &V == k5;
        cudaCheck(cudaMemset(p.out, first ? 0xff : 0x7f, nq * 2)); cudaCheck(cudaMemset(p.lse, first ? 0xff : 0x7f, nl * 4));
        V.fn(p, 0);
        cudaCheck(cudaDeviceSynchronize());
        const std::vector<uint16_t> out = to_host((const uint16_t*)p.out, nq);
        const std::vector<float> lse = to_host(p.lse, nl);
        char name[160];
        if (first) {
            if (out_ref) {
                snprintf(name, sizeof name, "%s %s", V.name, cfg);
                check_tensor("fwd out", name, bf16_vals(out), *out_ref, *out_sim);
                snprintf(name, sizeof name, "fwd lse %s %s", V.name, cfg);
                check_close(name, lse.data(), lse_ref->data(), nl, 1e-4, 1e-5);
            }
            out_a = out; lse_a = lse;
            continue;
        }
        snprintf(name, sizeof name, "fwd %s == 5a64 out %s", V.name, cfg);
        check_bytes(name, out.data(), out_a.data(), nq * 2);
        snprintf(name, sizeof name, "fwd %s == 5a64 lse %s", V.name, cfg);
        check_bytes(name, lse.data(), lse_a.data(), nl * 4);
    }
}

// ---------------------------------------------------------------------------------------------

// one case's inputs: q (B, T, nh, hd), k, v (B, T, nkv, hd), dout (B, T, nh, hd) as bf16 bits and their values;
// doc (B, T) doc_start rows when packed, else empty
struct Inputs {
    std::vector<uint16_t> qb, kb, vb, dob;
    std::vector<float> q, k, v, dout;
    std::vector<int> doc;
};
static Inputs make_inputs(Shape s, bool packed, uint64_t seed) {
    const int B = s.B, T = s.T;
    const size_t nq = (size_t)B * T * s.nh * s.hd, nk = (size_t)B * T * s.nkv * s.hd;
    Inputs in;
    fill_bf16(in.qb, in.q, nq, 2.0f, seed, 1);  // |q.k| / sqrt(hd) up to ~1.3 std: softmax neither flat nor one-hot
    fill_bf16(in.kb, in.k, nk, 2.0f, seed, 2);
    fill_bf16(in.vb, in.v, nk, 1.0f, seed, 3);
    fill_bf16(in.dob, in.dout, nq, 1.0f, seed, 4);
    if (packed) {  // documents of 1..T/4+8 tokens, so whole key tiles get skipped at T=300
        in.doc.resize((size_t)B * T);
        uint64_t ctr = 0;
        for (int b = 0; b < B; b++)
            for (int i = 0; i < T;) {
                const int len = 1 + (int)(rng_u32(seed, 5, ctr++) % (uint32_t)(T / 4 + 8));
                for (int j = i; j < std::min(T, i + len); j++) in.doc[(size_t)b * T + j] = i;
                i += len;
            }
    }
    return in;
}

// vs_cpu: check forward and backward against the CPU reference; repeat: run the backward twice, compare bits
static void run_case(Shape s, bool packed, uint64_t seed, bool vs_cpu, bool repeat) {
    const int B = s.B, T = s.T, nh = s.nh, nkv = s.nkv, hd = s.hd;
    char cfg[96];
    snprintf(cfg, sizeof cfg, "T=%d nh=%d nkv=%d hd=%d%s", T, nh, nkv, hd, packed ? " docs" : "");
    const size_t nq = (size_t)B * T * nh * hd, nk = (size_t)B * T * nkv * hd, nl = (size_t)B * nh * T;
    const Inputs in = make_inputs(s, packed, seed);
    const std::vector<float> &q = in.q, &k = in.k, &v = in.v, &dout = in.dout;
    const int* doc_h = packed ? in.doc.data() : nullptr;

    // forward
    bf16 *d_q = (bf16*)to_device(in.qb), *d_k = (bf16*)to_device(in.kb), *d_v = (bf16*)to_device(in.vb), *d_do = (bf16*)to_device(in.dob);
    int* d_doc = packed ? to_device(in.doc) : nullptr;
    bf16* d_out = poisoned<bf16>(nq);
    float* d_lse = poisoned<float>(nl);
    attention_forward(d_out, d_lse, d_q, d_k, d_v, d_doc, B, T, nh, nkv, hd, 0);
    cudaCheck(cudaDeviceSynchronize());
    std::vector<uint16_t> ob;
    std::vector<float> lse_in;
    std::vector<double> out_ref, lse_ref, out_sim, lse_sim;
    if (vs_cpu) {
        attention_forward_cpu(out_ref, lse_ref, q, k, v, doc_h, s, false);
        attention_forward_cpu(out_sim, lse_sim, q, k, v, doc_h, s, true);
        check_tensor("fwd out", cfg, bf16_vals(to_host((uint16_t*)d_out, nq)), out_ref, out_sim);
        const std::vector<float> lse_gpu = to_host(d_lse, nl);
        char name[128];
        snprintf(name, sizeof name, "fwd lse %s", cfg);
        check_close(name, lse_gpu.data(), lse_ref.data(), nl, 1e-4, 1e-5);
        // the backward is fed the reference forward (bf16 out, fp32 lse), so its errors are its own
        ob.resize(nq); lse_in.resize(nl);
        for (size_t i = 0; i < nq; i++) ob[i] = f32_to_bf16((float)out_ref[i]);
        for (size_t i = 0; i < nl; i++) lse_in[i] = (float)lse_ref[i];
    } else {  // only the repeat check: the GPU forward's out and lse do
        ob = to_host((uint16_t*)d_out, nq);
        lse_in = to_host(d_lse, nl);
    }
    if (hd == 64 && attention_has_wgmma())  // (after the above: it overwrites out and lse)
        kernel5_hd64(AttnFwdParams{d_out, d_lse, d_q, d_k, d_v, d_doc, B, T, nh, nkv, 1.4426950408889634f / sqrtf(64.f)}, cfg,
                     vs_cpu ? &out_ref : nullptr, vs_cpu ? &out_sim : nullptr, vs_cpu ? &lse_ref : nullptr);

    // backward
    bf16* d_o = (bf16*)to_device(ob);
    float* d_lse_in = to_device(lse_in);
    bf16 *d_dq = poisoned<bf16>(nq), *d_dk = poisoned<bf16>(nk), *d_dv = poisoned<bf16>(nk);
    const size_t scratch_bytes = attention_backward_scratch_bytes(B, T, nh, hd);
    float* d_scratch = poisoned<float>(scratch_bytes / sizeof(float));  // must not need zeroing by the caller
    attention_backward(d_dq, d_dk, d_dv, d_scratch, d_do, d_q, d_k, d_v, d_o, d_lse_in, d_doc, B, T, nh, nkv, hd, 0);
    cudaCheck(cudaDeviceSynchronize());
    const std::vector<uint16_t> dq1 = to_host((uint16_t*)d_dq, nq), dk1 = to_host((uint16_t*)d_dk, nk), dv1 = to_host((uint16_t*)d_dv, nk);
    if (vs_cpu) {
        const std::vector<float> o = bf16_vals(ob);
        std::vector<double> dq_ref, dk_ref, dv_ref, dq_sim, dk_sim, dv_sim;
        attention_backward_cpu(dq_ref, dk_ref, dv_ref, dout, q, k, v, o, lse_in, doc_h, s, false);
        attention_backward_cpu(dq_sim, dk_sim, dv_sim, dout, q, k, v, o, lse_in, doc_h, s, true);
        check_tensor("bwd dq", cfg, bf16_vals(dq1), dq_ref, dq_sim);
        check_tensor("bwd dk", cfg, bf16_vals(dk1), dk_ref, dk_sim);
        check_tensor("bwd dv", cfg, bf16_vals(dv1), dv_ref, dv_sim);
    }
    if (repeat) {  // same inputs again; other poison bytes, so an element written only once would differ
        cudaCheck(cudaMemset(d_dq, 0x7f, nq * 2)); cudaCheck(cudaMemset(d_dk, 0x7f, nk * 2)); cudaCheck(cudaMemset(d_dv, 0x7f, nk * 2));
        cudaCheck(cudaMemset(d_scratch, 0x55, scratch_bytes));
        attention_backward(d_dq, d_dk, d_dv, d_scratch, d_do, d_q, d_k, d_v, d_o, d_lse_in, d_doc, B, T, nh, nkv, hd, 0);
        cudaCheck(cudaDeviceSynchronize());
        const std::vector<uint16_t>* first[3] = {&dq1, &dk1, &dv1};
        const bf16* again[3] = {d_dq, d_dk, d_dv};
        const char* what[3] = {"dq", "dk", "dv"};
        for (int t = 0; t < 3; t++) {
            char name[128];
            snprintf(name, sizeof name, "bwd repeat %s %s", what[t], cfg);
            const std::vector<uint16_t> got = to_host((const uint16_t*)again[t], first[t]->size());
            check_bytes(name, got.data(), first[t]->data(), got.size() * 2);
        }
    }

    for (void* ptr : {(void*)d_q, (void*)d_k, (void*)d_v, (void*)d_do, (void*)d_doc, (void*)d_out, (void*)d_lse, (void*)d_o,
                      (void*)d_lse_in, (void*)d_dq, (void*)d_dk, (void*)d_dv, (void*)d_scratch})
        if (ptr) cudaCheck(cudaFree(ptr));
}

// ---------------------------------------------------------------------------------------------
// Hopper: every variant of kernel5 (hd 128) and kernel6 (hd 128 and 64) the dispatch can pick, bit for bit. kernel5's
// variants differ only in schedule (ring depth, pingpong), so 5a, 5b, 5c must give the dispatched forward's bits;
// kernel6 runs kernel4's operations in kernel4's order, so 6a-6f, 6a64-6h64 (and the dispatched backward) must give
// kernel4's at the same hd. At hd 64 kernel5's variants are checked in run_case (kernel5_hd64), not here.
// Each run's outputs are poisoned with other bytes than the reference's, so an element left unwritten differs.

typedef void (*BwdRun)(bf16*, bf16*, bf16*, float*, const bf16*, const bf16*, const bf16*, const bf16*, const bf16*,
                       const float*, const int*, int, int, int, int, cudaStream_t);
template <int HD>
static void dispatched_backward(bf16* dq, bf16* dk, bf16* dv, float* scratch, const bf16* dout, const bf16* q, const bf16* k,
                                const bf16* v, const bf16* out, const float* lse, const int* doc, int B, int T, int nh, int nkv,
                                cudaStream_t stream) {
    attention_backward(dq, dk, dv, scratch, dout, q, k, v, out, lse, doc, B, T, nh, nkv, HD, stream);
}

static void hopper_variants_identical(Shape s, bool packed, uint64_t seed) {
    const int B = s.B, T = s.T, nh = s.nh, nkv = s.nkv, hd = s.hd;
    char cfg[96];
    snprintf(cfg, sizeof cfg, "T=%d B=%d nh=%d nkv=%d hd=%d%s", T, B, nh, nkv, hd, packed ? " docs" : "");
    const size_t nq = (size_t)B * T * nh * hd, nk = (size_t)B * T * nkv * hd, nl = (size_t)B * nh * T;
    const Inputs in = make_inputs(s, packed, seed);
    bf16 *d_q = (bf16*)to_device(in.qb), *d_k = (bf16*)to_device(in.kb), *d_v = (bf16*)to_device(in.vb), *d_do = (bf16*)to_device(in.dob);
    int* d_doc = packed ? to_device(in.doc) : nullptr;
    bf16* d_out = poisoned<bf16>(nq);
    float* d_lse = poisoned<float>(nl);

    // forward: the dispatched kernel5 is the reference (hd 128); out (B, T, nh, hd) bf16, then lse (B, nh, T) fp32, as bytes
    auto fwd_bytes = [&]() {
        std::vector<uint8_t> h(nq * 2 + nl * 4);
        cudaCheck(cudaMemcpy(h.data(), d_out, nq * 2, cudaMemcpyDeviceToHost));
        cudaCheck(cudaMemcpy(h.data() + nq * 2, d_lse, nl * 4, cudaMemcpyDeviceToHost));
        return h;
    };
    attention_forward(d_out, d_lse, d_q, d_k, d_v, d_doc, B, T, nh, nkv, hd, 0);
    cudaCheck(cudaDeviceSynchronize());
    const std::vector<uint8_t> fwd_ref = fwd_bytes();
    const struct { const char* name; FwdLaunch fn; } fwd[] = {
        {"5a", attention_forward5_launch<128, 128, 128, 2, true>},
        {"5b", attention_forward5_launch<128, 128, 128, 3, true>},
        {"5c", attention_forward5_launch<128, 128, 128, 2, false>},
    };
    for (const auto& V : fwd) {
        if (hd != 128) break;  // kernel5 is hd 128 only
        cudaCheck(cudaMemset(d_out, 0x7f, nq * 2)); cudaCheck(cudaMemset(d_lse, 0x7f, nl * 4));
        V.fn(AttnFwdParams{d_out, d_lse, d_q, d_k, d_v, d_doc, B, T, nh, nkv, 1.4426950408889634f / sqrtf(128.f)}, 0);
        cudaCheck(cudaDeviceSynchronize());
        char name[160];
        snprintf(name, sizeof name, "fwd %s == dispatched out|lse %s", V.name, cfg);
        const std::vector<uint8_t> got = fwd_bytes();
        check_bytes(name, got.data(), fwd_ref.data(), got.size());
    }

    // backward, from the forward's out and lse: kernel4 is the reference; dq (B, T, nh, hd), dk, dv (B, T, nkv, hd)
    bf16 *d_dq = poisoned<bf16>(nq), *d_dk = poisoned<bf16>(nk), *d_dv = poisoned<bf16>(nk);
    const size_t scratch_bytes = attention_backward_scratch_bytes(B, T, nh, hd);  // D alone, as kernel4 and kernel6 need
    float* d_scratch = poisoned<float>(scratch_bytes / sizeof(float));
    auto bwd_bytes = [&](BwdRun run, uint8_t poison) {
        cudaCheck(cudaMemset(d_dq, poison, nq * 2)); cudaCheck(cudaMemset(d_dk, poison, nk * 2)); cudaCheck(cudaMemset(d_dv, poison, nk * 2));
        cudaCheck(cudaMemset(d_scratch, poison, scratch_bytes));
        run(d_dq, d_dk, d_dv, d_scratch, d_do, d_q, d_k, d_v, d_out, d_lse, d_doc, B, T, nh, nkv, 0);
        cudaCheck(cudaDeviceSynchronize());
        std::vector<uint8_t> h((nq + 2 * nk) * 2);
        cudaCheck(cudaMemcpy(h.data(), d_dq, nq * 2, cudaMemcpyDeviceToHost));
        cudaCheck(cudaMemcpy(h.data() + nq * 2, d_dk, nk * 2, cudaMemcpyDeviceToHost));
        cudaCheck(cudaMemcpy(h.data() + (nq + nk) * 2, d_dv, nk * 2, cudaMemcpyDeviceToHost));
        return h;
    };
    const std::vector<uint8_t> bwd_ref = bwd_bytes(hd == 64 ? attention_backward_split_hd<64, attention_backward4_launch<64>>
                                                            : attention_backward_split_hd<128, attention_backward4_launch<128>>, 0xff);
    const struct { int hd; const char* name; BwdRun fn; } bwd[] = {  // {stages, dq6, dkdv6, pingpong} as the dispatch's bwd6
        {128, "6a", attention_backward_split_hd<128, attention_backward6_launch<128, 2, true, true, false>>},
        {128, "6b", attention_backward_split_hd<128, attention_backward6_launch<128, 3, true, true, false>>},
        {128, "6c", attention_backward_split_hd<128, attention_backward6_launch<128, 2, false, true, false>>},
        {128, "6d", attention_backward_split_hd<128, attention_backward6_launch<128, 2, true, false, false>>},
        {128, "6e", attention_backward_split_hd<128, attention_backward6_launch<128, 2, true, true, true>>},
        {128, "6f", attention_backward_split_hd<128, attention_backward6_launch<128, 3, true, true, true>>},
        {128, "dispatched", dispatched_backward<128>},
        {64, "6a64", attention_backward_split_hd<64, attention_backward6_launch<64, 2, true, true, false>>},
        {64, "6b64", attention_backward_split_hd<64, attention_backward6_launch<64, 3, true, true, false>>},
        {64, "6c64", attention_backward_split_hd<64, attention_backward6_launch<64, 2, false, true, false>>},
        {64, "6d64", attention_backward_split_hd<64, attention_backward6_launch<64, 2, true, false, false>>},
        {64, "6e64", attention_backward_split_hd<64, attention_backward6_launch<64, 2, true, true, true>>},
        {64, "6f64", attention_backward_split_hd<64, attention_backward6_launch<64, 3, true, true, true>>},
        {64, "6g64", attention_backward_split_hd<64, attention_backward6_launch<64, 4, true, true, true>>},
        {64, "6h64", attention_backward_split_hd<64, attention_backward6_launch<64, 3, false, true, false>>},
        {64, "dispatched", dispatched_backward<64>},
    };
    for (const auto& V : bwd) {
        if (V.hd != hd) continue;
        char name[160];
        snprintf(name, sizeof name, "bwd %s == kernel4 dq|dk|dv %s", V.name, cfg);
        const std::vector<uint8_t> got = bwd_bytes(V.fn, 0x7f);
        check_bytes(name, got.data(), bwd_ref.data(), got.size());
    }
    for (void* ptr : {(void*)d_q, (void*)d_k, (void*)d_v, (void*)d_do, (void*)d_doc, (void*)d_out, (void*)d_lse, (void*)d_dq,
                      (void*)d_dk, (void*)d_dv, (void*)d_scratch})
        if (ptr) cudaCheck(cudaFree(ptr));
}

// test_attention [T]: all cases, or only those of one T (short runs under compute-sanitizer)
int main(int argc, char** argv) {
    int ndev = 0;
    if (cudaGetDeviceCount(&ndev) != cudaSuccess || ndev == 0) return test_skip("test_attention", "no CUDA device");
    const int only_T = argc > 1 ? atoi(argv[1]) : 0;
    uint64_t seed = 1234;
    // on a Hopper the small shapes twice: the wgmma kernels, then the mma.sync ones other GPUs run
    const bool hopper = attention_has_wgmma();
    for (int portable = 0; portable <= (int)hopper; portable++) {
        attention_wgmma_off = portable && hopper;
        if (hopper) printf("-- %s kernels\n", portable ? "mma.sync (other GPUs')" : "wgmma (Hopper's)");
        for (int hd : {64, 128})
            for (int T : {1, 17, 100, 128, 300})
                for (int nkv : {4, 2, 1})
                    for (int packed = 0; packed < 2; packed++, seed++)
                        if (!only_T || T == only_T) run_case(Shape{2, T, 4, nkv, hd}, packed, seed, true, T == 300);
    }
    attention_wgmma_off = false;
    // T=1000: 8 key tiles; without documents the CPU reference (seconds each) only for nkv=2
    for (int hd : {64, 128})
        for (int nkv : {4, 2, 1})
            for (int packed = 0; packed < 2; packed++, seed++)
                if (!only_T || only_T == 1000) run_case(Shape{2, 1000, 8, nkv, hd}, packed, seed, packed || nkv == 2, true);
    // llama3-8b, repeat only: at the small shapes few CTAs run at once, so even kernel1's float atomics
    // (dev/cuda/attention_backward.cu) came out the same twice; here they gave 177 different dq elements
    if (!only_T || only_T == 2048) run_case(Shape{4, 2048, 32, 8, 128}, false, seed, false, true);
    if (!only_T || only_T == 2048) run_case(Shape{4, 2048, 32, 8, 64}, false, seed, false, true);   // llama3-1b's heads
    // Hopper: kernel5's and kernel6's variants bit for bit, at tiles longer than T (TMA boxes past the tensor's end),
    // odd tails, packed rows, several key tiles, B = 4 (the batch coordinate of the copies); hd 128, then hd 64
    if (hopper)
        for (int hd : {128, 64}) {
            printf("-- %s variants (hd %d)\n", hd == 128 ? "kernel5, kernel6" : "kernel6", hd);
            const struct { Shape s; bool packed; } cases[] = {
                {{2, 1, 4, 1, hd}, false}, {{2, 17, 4, 2, hd}, true}, {{2, 100, 4, 4, hd}, false}, {{2, 300, 4, 1, hd}, true},
                {{2, 1000, 8, 2, hd}, false}, {{2, 1000, 8, 2, hd}, true}, {{4, 2048, 32, 8, hd}, false},
            };
            for (const auto& c : cases)
                if (!only_T || c.s.T == only_T) hopper_variants_identical(c.s, c.packed, seed++);
        }
    return test_summary();
}
