// dev/cuda/rmsnorm.cu: playground for RMSNorm forward, forward fused with the residual add, and
// backward (kernels/rmsnorm.cuh), at N = 8192 rows (llama3-8b's 4 x 2048 tokens) of the model widths
// we run, C in {2048, 3072, 4096, 5120, 8192}, and Qwen's per-head QK norm (C = head_dim = 128 on
// N = 8192 x 32 heads rows; head_dim 64 on N = 8192 x 64).
//
//   nvcc -std=c++17 -O3 -lineinfo -gencode arch=compute_90a,code=sm_90a -Xptxas -v -I. dev/cuda/rmsnorm.cu -o build/gpu/pg_rmsnorm
//   ./build/gpu/pg_rmsnorm
//
// v1  kernels/rmsnorm.cuh's kernel1: one warp a row, a loop over the row per pass; the second pass
//     re-reads the row from L1/L2. The trainer's for C > 8192.
// v2  kernels/rmsnorm.cuh's kernel2: the lane's slice of the row kept on chip between the passes;
//     the trainer's for C <= 8192 (the header's comment has its design and why its bits are kernel1's).
//     It moved there before it had run on a GPU: this program is its first check on one.
// Bits: v2 must equal v1 bit for bit (y, rstd, h_out, dx with accumulate false and true) on every
// shape; mismatches are printed per tensor and the exit code is 1 if there are any.
// Time: median of 20 (timing.h) with inputs and outputs rotating over 3 buffer sets, so no run finds
// its operands in L2 (50 MB) from the run before, as in training, where a norm's input was written
// a layer earlier. Bytes moved once (each tensor read or written once; w (2C) and rstd (4N) counted
// too): forward 4NC, fused 8NC, backward 6NC, accumulating 8NC. "% copy" is against a 1 GiB
// cudaMemcpy device to device measured here: (bytes read + written) / time.
//
// Prediction (written before any run; H100 SXM, N = 8192, C = 4096): copy ~2.8 TB/s. v1 runs at
// ~2.0 TB/s of bytes-once (17.0 ms a step for 64 norms x (fused forward + accumulating backward)
// = 0.265 ms a pair = 536 MB / 0.265 ms), v2 at ~90% of copy, ~2.5 TB/s:
//   forward          v1 ~0.067 ms   v2 ~0.054 ms
//   fused forward    v1 ~0.134 ms   v2 ~0.107 ms
//   backward         v1 ~0.100 ms   v2 ~0.080 ms
//   backward acc     v1 ~0.134 ms   v2 ~0.107 ms
// so 17.0 -> ~13.7 ms a llama3-8b step. C = 128 (QK norm, N = 262144): v1 uses 16 of 32 lanes, one
// 256-byte access a warp per pass; v2 packs 2 rows a warp: forward ~0.070 -> ~0.055 ms.
// Measured (H100 80GB HBM3, 2026-12-07, one run; copy 2,991 GB/s; us, v1 / v2, N = 8192, C = 4096): forward
// 80.0 / 58.9, fused 125.5 / 103.9, backward 121.8 / 75.4, accumulating 145.7 / 96.9 (v2 at 76-93% of copy);
// QK-norm rows (C = 128, N = 262144) forward 66.5 / 52.1, (C = 64) 122.8 / 53.6. v2 == v1 bit for bit on every
// shape. In the trainer: RMSNorm 17.0 -> 12.5 ms a llama3-8b step (--profile).
#include <cstdio>                        // defines: printf
#include <cstring>                       // defines: memcmp
#include <vector>                        // defines: std::vector
#include "../../kernels/rmsnorm.cuh"     // defines: rmsnorm_forward{1,2}_launch, rmsnorm_backward{1,2}_launch, rmsnorm_switch, bf16
#include "timing.h"                      // defines: median_ms

// ---------------------------------------------------------------------------------------------
// the versions, by launcher (each kernel's own, whatever C: the trainer's rmsnorm_forward picks by C)

enum Version { V1, V2 };
static const char* vname(Version v) { return v == V1 ? "v1" : "v2"; }

static void fwd(Version v, bf16* y, float* r, const bf16* x, const bf16* w, int N, int C) {
    if (v == V2) rmsnorm_forward2_launch<false>(y, r, nullptr, x, nullptr, w, N, C, 1e-5f, 0);
    else rmsnorm_forward1_launch<false>(y, r, nullptr, x, nullptr, w, N, C, 1e-5f, 0);
}
static void fused(Version v, bf16* h_out, bf16* y, float* r, const bf16* h, const bf16* d, const bf16* w, int N, int C) {
    if (v == V2) rmsnorm_forward2_launch<true>(y, r, h_out, h, d, w, N, C, 1e-5f, 0);
    else rmsnorm_forward1_launch<true>(y, r, h_out, h, d, w, N, C, 1e-5f, 0);
}
static void bwd(Version v, bf16* dx, const bf16* dy, const bf16* x, const bf16* w, const float* r, int N, int C, bool acc) {
    if (v == V2) rmsnorm_backward2_launch(dx, dy, x, w, r, N, C, acc, 0);
    else rmsnorm_backward1_launch(dx, dy, x, w, r, N, C, acc, 0);
}

// ---------------------------------------------------------------------------------------------
// data

// x[i] = mean + scale * (u1 + u2 + u3 - 1.5), u uniform from a hash of (seed, i): roughly normal
__device__ __forceinline__ float hash_uniform(uint64_t seed, uint64_t i) {
    uint64_t z = seed * 0x9E3779B97F4A7C15ull + i * 0xBF58476D1CE4E5B9ull + 0x94D049BB133111EBull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull; z = (z ^ (z >> 27)) * 0x94D049BB133111EBull; z ^= z >> 31;
    return (float)(z >> 40) * (1.0f / 16777216.0f);
}
__global__ void fill_kernel(bf16* x, size_t n, float mean, float scale, uint64_t seed) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        x[i] = f2bf(mean + scale * (hash_uniform(seed, 3 * i) + hash_uniform(seed, 3 * i + 1) + hash_uniform(seed, 3 * i + 2) - 1.5f));
}
static void fill(bf16* x, size_t n, float mean, float scale, uint64_t seed) {
    fill_kernel<<<1024, 256>>>(x, n, mean, scale, seed);
    cudaCheck(cudaGetLastError());
}

struct Set {         // one case's operands; 3 of them rotate in the timings
    bf16 *a, *b;     // (N, C): x (the forward's input, h when fused), and delta (fused) or dy (backward)
    bf16 *o1, *o2;   // (N, C): y or dx, and h_out (fused) or dx (accumulating backward)
    float* r;        // (N) rstd
};

template <class T> static std::vector<T> down(const T* d, size_t n) {
    std::vector<T> h(n); cudaCheck(cudaMemcpy(h.data(), d, n * sizeof(T), cudaMemcpyDeviceToHost)); return h;
}
template <class T> static size_t ndiff(const std::vector<T>& a, const std::vector<T>& b) {
    size_t n = 0; for (size_t i = 0; i < a.size(); i++) n += memcmp(&a[i], &b[i], sizeof(T)) != 0; return n;
}

static size_t g_mismatches = 0;
static void report(const char* what, Version v, size_t diff, size_t n) {
    if (diff) printf("    MISMATCH %-26s %-16s %zu of %zu differ from v1\n", what, vname(v), diff, n);
    g_mismatches += diff;
}

// ---------------------------------------------------------------------------------------------

static void run_case(int N, int C, double copy_gbs) {
    size_t nc = (size_t)N * C;
    const int NS = 3;
    Set sets[NS];
    bf16 *w, *dx0;
    cudaCheck(cudaMalloc(&w, 2 * (size_t)C)); cudaCheck(cudaMalloc(&dx0, 2 * nc));
    fill(w, C, 1.0f, 0.2f, 1);
    fill(dx0, nc, 0.0f, 0.6f, 2);
    for (int s = 0; s < NS; s++) {
        Set& S = sets[s];
        cudaCheck(cudaMalloc(&S.a, 2 * nc)); cudaCheck(cudaMalloc(&S.b, 2 * nc));
        cudaCheck(cudaMalloc(&S.o1, 2 * nc)); cudaCheck(cudaMalloc(&S.o2, 2 * nc)); cudaCheck(cudaMalloc(&S.r, 4 * (size_t)N));
        fill(S.a, nc, 0.0f, 2.0f, 10 + s);
        fill(S.b, nc, 0.0f, 1.0f, 20 + s);
    }
    int vpl = 0, lpr = 0;
    rmsnorm_switch(C, [&](auto v, auto l) { vpl = decltype(v)::value; lpr = decltype(l)::value; });
    printf("N=%d C=%d  (kernel2: VPL %d, LPR %d)\n", N, C, vpl, lpr);

    // bits, on set 0: every version from the same inputs, outputs poisoned (0xff) before each run
    Set& S = sets[0];
    auto poison = [&] {
        cudaCheck(cudaMemset(S.o1, 0xff, 2 * nc)); cudaCheck(cudaMemset(S.o2, 0xff, 2 * nc)); cudaCheck(cudaMemset(S.r, 0xff, 4 * (size_t)N));
    };
    size_t before = g_mismatches;
    std::vector<uint16_t> y1, yf1, h1, dxa1, dxb1;   // v1's outputs
    std::vector<float> r1, rf1;
    for (Version v : {V1, V2}) {
        poison(); fwd(v, S.o1, S.r, S.a, w, N, C);
        std::vector<uint16_t> y = down((const uint16_t*)S.o1, nc); std::vector<float> r = down(S.r, N);
        if (v == V1) { y1 = y; r1 = r; }
        else { report("forward y", v, ndiff(y, y1), nc); report("forward rstd", v, ndiff(r, r1), N); }

        poison(); fused(v, S.o2, S.o1, S.r, S.a, S.b, w, N, C);
        std::vector<uint16_t> yf = down((const uint16_t*)S.o1, nc), hf = down((const uint16_t*)S.o2, nc); std::vector<float> rf = down(S.r, N);
        if (v == V1) { yf1 = yf; rf1 = rf; h1 = hf; }
        else {
            report("fused h_out", v, ndiff(hf, h1), nc); report("fused y", v, ndiff(yf, yf1), nc); report("fused rstd", v, ndiff(rf, rf1), N);
        }

        // backward from v1's rstd of the plain forward (dy = b, x = a): overwrite, then accumulate into dx0
        cudaCheck(cudaMemcpy(S.r, r1.data(), 4 * (size_t)N, cudaMemcpyHostToDevice));
        cudaCheck(cudaMemset(S.o1, 0xff, 2 * nc));
        bwd(v, S.o1, S.b, S.a, w, S.r, N, C, false);
        std::vector<uint16_t> dxa = down((const uint16_t*)S.o1, nc);
        cudaCheck(cudaMemcpy(S.o2, dx0, 2 * nc, cudaMemcpyDeviceToDevice));
        bwd(v, S.o2, S.b, S.a, w, S.r, N, C, true);
        std::vector<uint16_t> dxb = down((const uint16_t*)S.o2, nc);
        if (v == V1) { dxa1 = dxa; dxb1 = dxb; }
        else { report("backward dx", v, ndiff(dxa, dxa1), nc); report("backward dx (accumulate)", v, ndiff(dxb, dxb1), nc); }
    }
    printf("  bits: v2 vs v1 over y, rstd, h_out, dx, dx accumulated: %s\n",
           g_mismatches > before ? "MISMATCHES (above)" : "0 mismatches");

    // time
    for (int s = 0; s < NS; s++) fwd(V2, sets[s].o1, sets[s].r, sets[s].a, w, N, C);   // rstd for the backward
    double tb = 2.0 * nc, row = 4.0 * N + 2.0 * C;   // bytes of one (N, C) bf16 tensor; rstd and w
    struct Op { const char* name; double bytes; int which; };
    const Op ops[] = {{"forward", 2 * tb + row, 0}, {"fused forward", 4 * tb + row, 1}, {"backward", 3 * tb + row, 2},
                      {"backward accumulate", 4 * tb + row, 3}};
    printf("  %-20s %8s | %9s %8s %6s | %9s %8s %6s | %6s\n", "", "MB", "v1 us", "GB/s", "%copy", "v2 us", "GB/s", "%copy", "v1/v2");
    for (const Op& op : ops) {
        float ms[2];
        for (Version v : {V1, V2}) {
            int k = 0;
            ms[v] = median_ms([&] {
                Set& T = sets[k++ % NS];
                if (op.which == 0) fwd(v, T.o1, T.r, T.a, w, N, C);
                else if (op.which == 1) fused(v, T.o2, T.o1, T.r, T.a, T.b, w, N, C);
                else bwd(v, op.which == 3 ? T.o2 : T.o1, T.b, T.a, w, T.r, N, C, op.which == 3);
            });
        }
        double g1 = op.bytes / (ms[0] * 1e6), g2 = op.bytes / (ms[1] * 1e6);
        printf("  %-20s %8.1f | %9.1f %8.0f %5.0f%% | %9.1f %8.0f %5.0f%% | %6.2f\n", op.name, op.bytes / 1e6, 1e3 * ms[0], g1,
               100 * g1 / copy_gbs, 1e3 * ms[1], g2, 100 * g2 / copy_gbs, ms[0] / ms[1]);
    }
    for (Set& T : sets) { cudaFree(T.a); cudaFree(T.b); cudaFree(T.o1); cudaFree(T.o2); cudaFree(T.r); }
    cudaFree(w); cudaFree(dx0);
}

int main() {
    cudaDeviceProp prop; cudaCheck(cudaGetDeviceProperties(&prop, 0));
    printf("%s, %d SMs, L2 %d MB\n", prop.name, prop.multiProcessorCount, prop.l2CacheSize >> 20);
    // the copy peak: 1 GiB device to device, bytes read + written
    size_t cb = (size_t)1 << 30;
    void *src, *dst; cudaCheck(cudaMalloc(&src, cb)); cudaCheck(cudaMalloc(&dst, cb));
    cudaCheck(cudaMemset(src, 1, cb));
    float cms = median_ms([&] { cudaCheck(cudaMemcpyAsync(dst, src, cb, cudaMemcpyDeviceToDevice)); });
    double copy_gbs = 2.0 * cb / (cms * 1e6);
    printf("copy peak: cudaMemcpy D2D of 1 GiB, %.3f ms, %.0f GB/s (read + written)\n\n", cms, copy_gbs);
    cudaFree(src); cudaFree(dst);

    const int shapes[][2] = {{8192, 2048}, {8192, 3072}, {8192, 4096}, {8192, 5120}, {8192, 8192}, {8192 * 32, 128}, {8192 * 64, 64}};
    for (auto& s : shapes) run_case(s[0], s[1], copy_gbs);
    printf("\n%s: %zu bit mismatches against v1 in all\n", g_mismatches ? "FAIL" : "ok", g_mismatches);
    return g_mismatches ? 1 : 0;
}
