// dev/cuda/attention_backward.cu: playground for the causal GQA flash-attention backward (bf16, H100).
//
//   nvcc -std=c++17 -O3 -gencode arch=compute_90a,code=sm_90a -Xptxas -v dev/cuda/attention_backward.cu -o attention_backward
//   ./attention_backward           check every variant against an fp64 CPU reference, then time them
//   ./attention_backward 1a        one variant
//
// FLOPs: 2.5x the forward's (5 matmuls instead of 2), i.e. 10 * hd * nh * (allowed (i, j) pairs).
// "total" times the three launches (preprocess: D and zeroing of dq_accum; main; dq convert),
// "main" the main kernel alone.
//
// Versions (the number stays with the kernel when it moves to kernels/attention.cuh):
//   kernel1: one CTA per (kv head, 128-key tile), 16 keys per warp, loops over the GQA group's
//            query heads and 64-row query tiles; dK/dV in registers, dQ by 16-byte fp32 atomics.
//            Letters are tile/occupancy variants (see VARIANTS).
//
// Two numbers, llama3-8b (B=4 T=2048 nh=32 nkv=8 hd=128): 344 GFLOP -> 0.45 ms at ~760 TFLOP/s.
// Bytes: q, k, v, out, dout read (176 MB), dq, dk, dv written (96 MB), dq_accum zeroed, read back and
// hit by ~1.1 GB of float4 atomics (L2, not DRAM) -> ~0.2 ms of DRAM traffic. Compute-bound on paper.
//
// Measured on one H100 80GB HBM3 (2026-11-23, two runs agreed within 1%), ms and TFLOP/s, total (three
// launches) / main kernel:
//   shape (B, T)             1a Bc128 Br64          1e Bc128 Br32          1b Bc64 2CTA/SM
//   llama3-8b (4, 2048)      1.93 178 / 1.72 200    1.92 179 / 1.75 197    2.36 146 / 2.19 157
//   hd128 (1, 16384)         24.9 220 / 24.7 222    25.5 215 / 25.2 218    31.9 172 / 31.5 175
//   hd128 (1, 16384) docs 2k 3.78 182 / 3.43 200    3.82 180 / 3.51 196    4.52 152 / 4.18 164
//                            1c Bc128 Br64          1d Bc64 2CTA/SM        1f Bc128 Br32
//   llama3-1b (4, 2048)      1.06 161 / 0.98 176    1.08 159 / 1.00 172    1.20 143 / 1.10 156
// The preprocess (D, zeroing dq_accum) and the dq convert cost 0.2 ms at llama3-8b, about what their
// ~0.45 GB of DRAM traffic costs; Bc=64 halves the keys per dQ atomic and loses 20%.
//
// Profile (ncu --clock-control none, 1a on llama3-8b, 1.75 ms): memory 66% (L1/shared 68%, L2 47%,
// DRAM 31%), SM 32%, issue slots 22.5%, 8.6 cycles between a warp's instructions, a third of them
// short-scoreboard (ldmatrix) stalls; 8 warps/SM (255 registers: dK and dV take 128, S^T and dP^T 64;
// ptxas spills 32 bytes, which ncu flags as local loads); dk/dv epilogue stores use half of each sector.
// Next: wgmma with dK/dV accumulators split over a warpgroup (FA3 layout), dQ through smem and a TMA
// reduce-add (cp.reduce.async.bulk) instead of per-lane atomics.
#include <cuda_runtime.h>                  // defines: cudaEvent_t
#include <stdio.h>                         // defines: printf
#include <string.h>                        // defines: strcmp
#include <math.h>                          // defines: exp, sqrt
#include <vector>                          // defines: std::vector
#include <algorithm>                       // defines: std::sort
#include "../../qlora.h"                   // defines: f32_to_bf16, bf16_to_f32, rng_uniform
#include "../../kernels/attention.cuh"     // defines: attention_backward_hd, attention_backward_launch, attention_forward

typedef void (*BwdAll)(bf16*, bf16*, bf16*, float*, const bf16*, const bf16*, const bf16*, const bf16*, const bf16*,
                       const float*, const int*, int, int, int, int, cudaStream_t);
typedef void (*BwdMain)(const AttnBwdParams&, cudaStream_t);
struct Variant { const char* name; int hd; BwdAll all; BwdMain main; const char* what; };
static const Variant VARIANTS[] = {
    {"1a", 128, attention_backward_hd<128, 128, 64, 1>, attention_backward_launch<128, 128, 64, 1>, "hd128 Bc128 Br64, 8 warps, 1 CTA/SM (production)"},
    {"1b", 128, attention_backward_hd<128, 64, 64, 2>, attention_backward_launch<128, 64, 64, 2>, "hd128 Bc64 Br64, 4 warps, 2 CTA/SM"},
    {"1e", 128, attention_backward_hd<128, 128, 32, 1>, attention_backward_launch<128, 128, 32, 1>, "hd128 Bc128 Br32, 8 warps, 1 CTA/SM"},
    {"1c", 64, attention_backward_hd<64, 128, 64, 1>, attention_backward_launch<64, 128, 64, 1>, "hd64 Bc128 Br64, 8 warps, 1 CTA/SM (production)"},
    {"1d", 64, attention_backward_hd<64, 64, 64, 2>, attention_backward_launch<64, 64, 64, 2>, "hd64 Bc64 Br64, 4 warps, 2 CTA/SM"},
    {"1f", 64, attention_backward_hd<64, 128, 32, 1>, attention_backward_launch<64, 128, 32, 1>, "hd64 Bc128 Br32, 8 warps, 1 CTA/SM"},
};

// ---------------------------------------------------------------------------------------------
// fp64 CPU reference from the same bf16 inputs (out and lse as the GPU forward produced them)

static void attention_backward_cpu(double* dq, double* dk, double* dv, const float* dout, const float* q, const float* k,
                                   const float* v, const float* out, const float* lse, const int* doc,
                                   int B, int T, int nh, int nkv, int hd) {
    const double scale = 1.0 / sqrt((double)hd);
    memset(dq, 0, sizeof(double) * B * T * nh * hd);
    memset(dk, 0, sizeof(double) * B * T * nkv * hd);
    memset(dv, 0, sizeof(double) * B * T * nkv * hd);
    for (int b = 0; b < B; b++)
        for (int h = 0; h < nh; h++)
            for (int i = 0; i < T; i++) {
                const size_t qo = (((size_t)b * T + i) * nh + h) * hd;
                double D = 0;
                for (int c = 0; c < hd; c++) D += (double)dout[qo + c] * out[qo + c];
                const double L = lse[((size_t)b * nh + h) * T + i];
                const int j0 = doc ? doc[b * T + i] : 0, kvh = h / (nh / nkv);
                for (int j = j0; j <= i; j++) {
                    const size_t ko = (((size_t)b * T + j) * nkv + kvh) * hd;
                    double s = 0, dp = 0;
                    for (int c = 0; c < hd; c++) { s += (double)q[qo + c] * k[ko + c]; dp += (double)dout[qo + c] * v[ko + c]; }
                    const double p = exp(s * scale - L), ds = p * (dp - D);
                    for (int c = 0; c < hd; c++) {
                        dq[qo + c] += scale * ds * k[ko + c];
                        dk[ko + c] += scale * ds * q[qo + c];
                        dv[ko + c] += p * dout[qo + c];
                    }
                }
            }
}

// ---------------------------------------------------------------------------------------------

struct Problem {
    int B, T, nh, nkv, hd, doc_len;
    size_t nq = 0, nk = 0, nl = 0;
    std::vector<uint16_t> h[4];  // q, k, v, dout
    std::vector<int> doc;
    bf16 *d_q = nullptr, *d_k = nullptr, *d_v = nullptr, *d_do = nullptr, *d_out = nullptr;
    bf16 *d_dq = nullptr, *d_dk = nullptr, *d_dv = nullptr;
    float *d_lse = nullptr, *d_scratch = nullptr;
    int* d_doc = nullptr;
    double pairs = 0;
};

static void make_problem(Problem& P, uint64_t seed) {
    P.nq = (size_t)P.B * P.T * P.nh * P.hd; P.nk = (size_t)P.B * P.T * P.nkv * P.hd; P.nl = (size_t)P.B * P.nh * P.T;
    const size_t n[4] = {P.nq, P.nk, P.nk, P.nq};
    const float amp[4] = {2.f, 2.f, 1.f, 1.f};
    bf16** d[4] = {&P.d_q, &P.d_k, &P.d_v, &P.d_do};
    for (int t = 0; t < 4; t++) {
        P.h[t].resize(n[t]);
        for (size_t i = 0; i < n[t]; i++) P.h[t][i] = f32_to_bf16((2.f * rng_uniform(seed, t + 1, i) - 1.f) * amp[t]);
        cudaCheck(cudaMalloc(d[t], n[t] * 2));
        cudaCheck(cudaMemcpy(*d[t], P.h[t].data(), n[t] * 2, cudaMemcpyHostToDevice));
    }
    P.pairs = 0;
    if (P.doc_len > 0) {
        P.doc.resize((size_t)P.B * P.T);
        for (int b = 0; b < P.B; b++)
            for (int i = 0; i < P.T; i++) { P.doc[(size_t)b * P.T + i] = i / P.doc_len * P.doc_len; P.pairs += i - P.doc[(size_t)b * P.T + i] + 1; }
        cudaCheck(cudaMalloc(&P.d_doc, P.doc.size() * 4));
        cudaCheck(cudaMemcpy(P.d_doc, P.doc.data(), P.doc.size() * 4, cudaMemcpyHostToDevice));
    } else P.pairs = (double)P.B * P.T * (P.T + 1.0) / 2;
    cudaCheck(cudaMalloc(&P.d_out, P.nq * 2)); cudaCheck(cudaMalloc(&P.d_lse, P.nl * 4));
    cudaCheck(cudaMalloc(&P.d_dq, P.nq * 2)); cudaCheck(cudaMalloc(&P.d_dk, P.nk * 2)); cudaCheck(cudaMalloc(&P.d_dv, P.nk * 2));
    cudaCheck(cudaMalloc(&P.d_scratch, attention_backward_scratch_bytes(P.B, P.T, P.nh, P.hd)));
    attention_forward(P.d_out, P.d_lse, P.d_q, P.d_k, P.d_v, P.d_doc, P.B, P.T, P.nh, P.nkv, P.hd, 0);
    cudaCheck(cudaDeviceSynchronize());
}
static void free_problem(Problem& P) {
    for (void* p : {(void*)P.d_q, (void*)P.d_k, (void*)P.d_v, (void*)P.d_do, (void*)P.d_out, (void*)P.d_dq, (void*)P.d_dk,
                    (void*)P.d_dv, (void*)P.d_lse, (void*)P.d_scratch, (void*)P.d_doc})
        if (p) cudaCheck(cudaFree(p));
}
static void run_all(const Variant& V, Problem& P) {
    V.all(P.d_dq, P.d_dk, P.d_dv, P.d_scratch, P.d_do, P.d_q, P.d_k, P.d_v, P.d_out, P.d_lse, P.d_doc, P.B, P.T, P.nh, P.nkv, 0);
}

static double compare(const char* what, const std::vector<uint16_t>& got, const std::vector<double>& ref, double* max_abs) {
    double num = 0, den = 0, mx = 0;
    for (size_t i = 0; i < ref.size(); i++) {
        const double d = bf16_to_f32(got[i]) - ref[i];
        num += d * d; den += ref[i] * ref[i];
        mx = fmax(mx, isnan(d) ? INFINITY : fabs(d));
    }
    (void)what;
    *max_abs = mx;
    return isnan(num) ? INFINITY : sqrt(num / den);
}

static bool check_variant(const Variant& V, Problem& P, const std::vector<double> ref[3]) {
    cudaCheck(cudaMemset(P.d_dq, 0xff, P.nq * 2)); cudaCheck(cudaMemset(P.d_dk, 0xff, P.nk * 2));
    cudaCheck(cudaMemset(P.d_dv, 0xff, P.nk * 2));
    cudaCheck(cudaMemset(P.d_scratch, 0xff, attention_backward_scratch_bytes(P.B, P.T, P.nh, P.hd)));
    run_all(V, P);
    cudaCheck(cudaDeviceSynchronize());
    const char* names[3] = {"dq", "dk", "dv"};
    bf16* src[3] = {P.d_dq, P.d_dk, P.d_dv};
    const size_t n[3] = {P.nq, P.nk, P.nk};
    bool ok = true;
    printf("  %-3s T=%-5d docs=%-4d", V.name, P.T, P.doc_len);
    for (int t = 0; t < 3; t++) {
        std::vector<uint16_t> got(n[t]);
        cudaCheck(cudaMemcpy(got.data(), src[t], n[t] * 2, cudaMemcpyDeviceToHost));
        double mx, rel = compare(names[t], got, ref[t], &mx);
        double ref_max = 0;
        for (double x : ref[t]) ref_max = fmax(ref_max, fabs(x));
        const bool tok = rel < 1e-2 && mx < 2e-2 * ref_max;
        ok &= tok;
        printf("  %s rel_l2 %.2e max_abs %.2e (max |ref| %.2e)%s", names[t], rel, mx, ref_max, tok ? "" : " FAIL");
    }
    printf("  %s\n", ok ? "ok" : "FAIL");
    return ok;
}

static float time_ms(const Variant& V, Problem& P, bool main_only, int reps) {
    const float scale = 1.0f / sqrtf((float)P.hd);
    AttnBwdParams p{P.d_scratch, P.d_dk, P.d_dv, P.d_scratch + P.nq, P.d_do, P.d_q, P.d_k, P.d_v, P.d_lse, P.d_doc,
                    P.B, P.T, P.nh, P.nkv, scale, scale * 1.4426950408889634f};
    cudaEvent_t e0, e1;
    cudaCheck(cudaEventCreate(&e0)); cudaCheck(cudaEventCreate(&e1));
    std::vector<float> ms;
    for (int r = 0; r < reps + 1; r++) {  // groups of 10 back-to-back launches hide the launch gaps
        cudaCheck(cudaEventRecord(e0));
        for (int k = 0; k < 10; k++) { if (main_only) V.main(p, 0); else run_all(V, P); }
        cudaCheck(cudaEventRecord(e1));
        cudaCheck(cudaEventSynchronize(e1));
        float t; cudaCheck(cudaEventElapsedTime(&t, e0, e1));
        if (r >= 1) ms.push_back(t / 10);  // the first group is warm-up
    }
    cudaCheck(cudaEventDestroy(e0)); cudaCheck(cudaEventDestroy(e1));
    std::sort(ms.begin(), ms.end());
    return ms[ms.size() / 2];
}

int main(int argc, char** argv) {
    const char* only = argc > 1 ? argv[1] : nullptr;
    const bool once = argc > 2 && !strcmp(argv[2], "once");  // one launch of the first matching shape (for ncu)
    int ndev = 0;
    if (cudaGetDeviceCount(&ndev) != cudaSuccess || ndev == 0) { printf("no CUDA device\n"); return 0; }
    cudaDeviceProp prop; cudaCheck(cudaGetDeviceProperties(&prop, 0));
    printf("device: %s, %d SMs\n", prop.name, prop.multiProcessorCount);
    bool all_ok = true;

    if (!once) printf("correctness vs fp64 CPU (B=1 T=777 nh=8 nkv=2):\n");
    for (int hd : {64, 128})
        for (int doc_len : {0, 100}) {
            if (once) break;
            Problem P{1, 777, 8, 2, hd, doc_len};
            make_problem(P, 99 + hd + doc_len);
            std::vector<float> f[4];
            for (int t = 0; t < 4; t++) { f[t].resize(P.h[t].size()); for (size_t i = 0; i < f[t].size(); i++) f[t][i] = bf16_to_f32(P.h[t][i]); }
            std::vector<uint16_t> ob(P.nq);
            std::vector<float> o(P.nq), lse(P.nl);
            cudaCheck(cudaMemcpy(ob.data(), P.d_out, P.nq * 2, cudaMemcpyDeviceToHost));
            cudaCheck(cudaMemcpy(lse.data(), P.d_lse, P.nl * 4, cudaMemcpyDeviceToHost));
            for (size_t i = 0; i < P.nq; i++) o[i] = bf16_to_f32(ob[i]);
            std::vector<double> ref[3] = {std::vector<double>(P.nq), std::vector<double>(P.nk), std::vector<double>(P.nk)};
            attention_backward_cpu(ref[0].data(), ref[1].data(), ref[2].data(), f[3].data(), f[0].data(), f[1].data(), f[2].data(),
                                   o.data(), lse.data(), doc_len ? P.doc.data() : nullptr, P.B, P.T, P.nh, P.nkv, hd);
            for (const Variant& V : VARIANTS)
                if (V.hd == hd && (!only || !strcmp(only, V.name))) all_ok &= check_variant(V, P, ref);
            free_problem(P);
        }

    struct Shape { const char* name; int B, T, nh, nkv, hd, doc_len; };
    const Shape shapes[] = {
        {"llama3-8b", 4, 2048, 32, 8, 128, 0},
        {"llama3-1b", 4, 2048, 32, 8, 64, 0},
        {"8b long", 1, 16384, 32, 8, 128, 0},
        {"8b long packed 2k", 1, 16384, 32, 8, 128, 2048},
    };
    printf("\n%-18s %-4s %9s %9s %9s %9s   %s\n", "shape", "var", "total ms", "TFLOP/s", "main ms", "TFLOP/s", "variant");
    for (const Shape& S : shapes) {
        Problem P{S.B, S.T, S.nh, S.nkv, S.hd, S.doc_len};
        make_problem(P, 7);
        const double flops = 10.0 * S.hd * S.nh * P.pairs;
        for (const Variant& V : VARIANTS) {
            if (V.hd != S.hd || (only && strcmp(only, V.name))) continue;
            if (once) { run_all(V, P); cudaCheck(cudaDeviceSynchronize()); free_problem(P); return 0; }
            const float all = time_ms(V, P, false, 5), main_ms = time_ms(V, P, true, 5);
            printf("%-18s %-4s %9.4f %9.1f %9.4f %9.1f   %s\n", S.name, V.name, all, flops / (all * 1e-3) / 1e12, main_ms,
                   flops / (main_ms * 1e-3) / 1e12, V.what);
        }
        free_problem(P);
    }
    printf("%s\n", all_ok ? "all variants correct" : "SOME VARIANTS FAILED");
    return all_ok ? 0 : 1;
}
