// dev/cuda/lora_concat.cu: playground for folding the LoRA GEMMs of a group into the frozen GEMMs by
// concatenation, with cuBLAS doing all the work (issue 14: LoRA was 14.3 ms of llama3-1b's 106 ms step):
//
//   forward, today   u = x·[A..]ᵀ (N, k·r);  y_p = s·u_p·B_pᵀ;  y_p += x·W_pᵀ (beta = 1: y_p written, read back)
//   forward, concat  x_ext = [x | u] (N, in + k·r), u written into its trailing columns by the first GEMM;
//                    W_cat_p = [W_p | 0 .. s·B_p .. 0] (out_p, in + k·r);  y_p = x_ext·W_cat_pᵀ  (one GEMM, K + k·r)
//   backward, today  t_p = dy_p·B_p (N, r) (reads dy_p);  dx = s·t·[A..];  dx += dy_p·W_p (beta = 1)
//   backward, concat [dx | s·t] (N, in + k·r) = Σ_p dy_p·W_cat_p  (t comes out of the frozen GEMMs' extra
//                    columns, dy_p read once);  dx += (s·t)·[A..]  (K = k·r, beta = 1)
//   lane (dB, dA)    the same GEMMs in both; with concat they read u, s·t and x at the wide pitch.
//
//   nvcc -std=c++17 -O3 -gencode arch=compute_90a,code=sm_90a -o build/lora_concat dev/cuda/lora_concat.cu -lcublasLt -lcublas
//   ./build/lora_concat
//
// Check: y_p and dx of the two ways against each other, bf16 outputs. Today rounds the LoRA term and
// then the sum (2^-9 of each), concat rounds the sum once but multiplies by bf16(s·B) (2^-9 of each
// term of u·sBᵀ); with terms up to ~2 max |y| here (s = 2, LoRA as large as the frozen part) that is up
// to ~4 x 2^-9 per side: the budget is 2^-6 of max |y|. Measured (H100, session 8): 3.3e-3 to 1.25e-2.
// Time: llama3-8b's and llama3-1b's four groups at N = 8192 (4 x 2048 tokens), r = 16, median of 20,
// with the frozen GEMMs alone as the floor.
#include <cmath>                        // defines: fabsf
#include <cstdio>                       // defines: printf
#include <vector>                       // defines: std::vector
#include "../../kernels/matmul.cuh"     // defines: MatmulCtx, gemm_forward, gemm_input_grad, gemm_weight_grad
#include "timing.h"                     // defines: median_ms

static uint32_t g_rng = 12345;
static float frand() { g_rng = g_rng * 1664525u + 1013904223u; return (g_rng >> 8) * (1.0f / 16777216.0f) * 2.0f - 1.0f; }
static bf16* dev_rand(size_t n, float scale) {
    std::vector<bf16> h(n);
    for (auto& v : h) v = __float2bfloat16(frand() * scale);
    bf16* d; cudaCheck(cudaMalloc(&d, n * 2)); cudaCheck(cudaMemcpy(d, h.data(), n * 2, cudaMemcpyHostToDevice));
    return d;
}
static bf16* dev_zeros(size_t n) { bf16* d; cudaCheck(cudaMalloc(&d, n * 2)); cudaCheck(cudaMemset(d, 0, n * 2)); return d; }
static std::vector<float> host(const bf16* d, int rows, int cols, int ld) {
    std::vector<bf16> h((size_t)rows * ld);
    cudaCheck(cudaMemcpy(h.data(), d, h.size() * 2, cudaMemcpyDeviceToHost));
    std::vector<float> f((size_t)rows * cols);
    for (int i = 0; i < rows; i++) for (int j = 0; j < cols; j++) f[(size_t)i * cols + j] = __bfloat162float(h[(size_t)i * ld + j]);
    return f;
}
static double rel_diff(const std::vector<float>& a, const std::vector<float>& b) {
    double m = 0, d = 0;
    for (size_t i = 0; i < a.size(); i++) { m = std::max(m, (double)fabsf(a[i])); d = std::max(d, (double)fabsf(a[i] - b[i])); }
    return d / m;
}
// W_cat_p rows: [W_p (in) | slot j of k: s·B_p (r), zeros elsewhere]
__global__ void build_wcat(bf16* wc, const bf16* w, const bf16* b, int out, int in, int r, int k, int j, float s) {
    int ld = in + k * r;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < (int64_t)out * ld; i += (int64_t)gridDim.x * blockDim.x) {
        int o = i / ld, c = i % ld;
        float v = 0.f;
        if (c < in) v = __bfloat162float(w[(size_t)o * in + c]);
        else if ((c - in) / r == j) v = s * __bfloat162float(b[(size_t)o * r + (c - in) % r]);
        wc[i] = __float2bfloat16(v);
    }
}
__global__ void copy_cols(bf16* dst, int ldd, const bf16* src, int lds, int rows, int cols) {   // x into x_ext
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < (int64_t)rows * cols; i += (int64_t)gridDim.x * blockDim.x)
        dst[(i / cols) * ldd + i % cols] = src[(i / cols) * lds + i % cols];
}

struct GroupShape { const char* name; int in, k, out[3]; };

int main() {
    cudaStream_t s0 = 0;
    MatmulCtx mm; matmul_init(mm, s0);
    const int N = 8192, r = 16;
    const float s = 2.0f;
    const struct { const char* model; int H, I, qd, kvd; } models[] = {{"8b", 4096, 14336, 4096, 1024}, {"1b", 2048, 8192, 2048, 512}};
    int fails = 0;
    printf("%-10s %9s %9s %9s | %9s %9s %9s | %9s %9s   (us; frozen = the frozen GEMMs alone)\n", "group", "fwd now", "concat",
           "frozen", "bwd now", "concat", "frozen", "lane now", "concat");
    for (auto& md : models) {
        double tot[8] = {0};
        const GroupShape groups[] = {{"q|k|v", md.H, 3, {md.qd, md.kvd, md.kvd}}, {"o", md.qd, 1, {md.H}},
                                     {"gate|up", md.H, 2, {md.I, md.I}}, {"down", md.I, 1, {md.H}}};
        for (auto& g : groups) {
            const int in = g.in, k = g.k, kr = k * r, ldx = in + kr;
            bf16* x = dev_rand((size_t)N * in, 1.0f);
            bf16* xe = dev_zeros((size_t)N * ldx);
            bf16* acat = dev_rand((size_t)kr * in, 1.0f / sqrtf(in));
            bf16* u = dev_zeros((size_t)N * kr);
            bf16* t = dev_zeros((size_t)N * kr);
            bf16* dx = dev_zeros((size_t)N * in);
            bf16* dxe = dev_zeros((size_t)N * ldx);
            float* dB; cudaCheck(cudaMalloc(&dB, (size_t)16384 * r * 4)); float* dA; cudaCheck(cudaMalloc(&dA, (size_t)kr * in * 4));
            bf16 *w[3], *b[3], *wc[3], *y[3], *yc[3], *dy[3];
            for (int p = 0; p < k; p++) {
                w[p] = dev_rand((size_t)g.out[p] * in, 1.0f / sqrtf(in));
                b[p] = dev_rand((size_t)g.out[p] * r, 0.5f / sqrtf(r));
                wc[p] = dev_zeros((size_t)g.out[p] * ldx);
                build_wcat<<<1024, 256>>>(wc[p], w[p], b[p], g.out[p], in, r, k, p, s);
                cudaCheck(cudaGetLastError());
                y[p] = dev_zeros((size_t)N * g.out[p]); yc[p] = dev_zeros((size_t)N * g.out[p]);
                dy[p] = dev_rand((size_t)N * g.out[p], 1.0f);
            }
            copy_cols<<<1024, 256>>>(xe, ldx, x, in, N, in);
            cudaCheck(cudaGetLastError());
            auto fwd_now = [&] {
                gemm_forward(mm, u, x, acat, N, kr, in);
                for (int p = 0; p < k; p++) gemm_forward(mm, y[p], {u + p * r, kr}, b[p], N, g.out[p], r, s);
                for (int p = 0; p < k; p++) gemm_forward(mm, y[p], x, w[p], N, g.out[p], in, 1.0f, 1.0f);
            };
            auto fwd_cat = [&] {
                gemm_forward(mm, {xe + in, ldx}, {xe, ldx}, acat, N, kr, in);
                for (int p = 0; p < k; p++) gemm_forward(mm, yc[p], {xe, ldx}, {wc[p], ldx}, N, g.out[p], ldx);
            };
            auto fwd_frozen = [&] { for (int p = 0; p < k; p++) gemm_forward(mm, y[p], x, w[p], N, g.out[p], in); };
            auto bwd_now = [&] {
                for (int p = 0; p < k; p++) gemm_input_grad(mm, {t + p * r, kr}, dy[p], b[p], N, r, g.out[p]);
                gemm_input_grad(mm, dx, t, acat, N, in, kr, s);
                for (int p = 0; p < k; p++) gemm_input_grad(mm, dx, dy[p], w[p], N, in, g.out[p], 1.0f, 1.0f);
            };
            auto bwd_cat = [&] {
                for (int p = 0; p < k; p++) gemm_input_grad(mm, {dxe, ldx}, dy[p], {wc[p], ldx}, N, ldx, g.out[p], 1.0f, p ? 1.0f : 0.0f);
                gemm_input_grad(mm, {dxe, ldx}, {dxe + in, ldx}, acat, N, in, kr, 1.0f, 1.0f);
            };
            auto bwd_frozen = [&] { for (int p = 0; p < k; p++) gemm_input_grad(mm, dx, dy[p], w[p], N, in, g.out[p], 1.0f, p ? 1.0f : 0.0f); };
            auto lane_now = [&] {
                for (int p = 0; p < k; p++) gemm_weight_grad(mm, dB, dy[p], {u + p * r, kr}, g.out[p], r, N, s);
                gemm_weight_grad(mm, dA, t, x, kr, in, N, s);
            };
            auto lane_cat = [&] {
                for (int p = 0; p < k; p++) gemm_weight_grad(mm, dB, dy[p], {xe + in + p * r, ldx}, g.out[p], r, N, s);
                gemm_weight_grad(mm, dA, {dxe + in, ldx}, {xe, ldx}, kr, in, N, 1.0f);
            };
            // check once: y_p and dx, the two ways
            fwd_now(); fwd_cat(); bwd_now(); bwd_cat();
            cudaCheck(cudaDeviceSynchronize());
            double worst = 0;
            for (int p = 0; p < k; p++) worst = std::max(worst, rel_diff(host(y[p], N, g.out[p], g.out[p]), host(yc[p], N, g.out[p], g.out[p])));
            worst = std::max(worst, rel_diff(host(dx, N, in, in), host(dxe, N, in, ldx)));
            bool ok = worst <= 1.0 / 64;
            fails += !ok;
            float tm[8] = {median_ms(fwd_now), median_ms(fwd_cat), median_ms(fwd_frozen), median_ms(bwd_now), median_ms(bwd_cat),
                           median_ms(bwd_frozen), median_ms(lane_now), median_ms(lane_cat)};
            char name[32]; snprintf(name, sizeof name, "%s %s", md.model, g.name);
            printf("%-10s %9.1f %9.1f %9.1f | %9.1f %9.1f %9.1f | %9.1f %9.1f   max diff %.2e of max |y| (%s)\n", name, 1e3 * tm[0],
                   1e3 * tm[1], 1e3 * tm[2], 1e3 * tm[3], 1e3 * tm[4], 1e3 * tm[5], 1e3 * tm[6], 1e3 * tm[7], worst, ok ? "ok" : "FAIL");
            for (int i = 0; i < 8; i++) tot[i] += tm[i];
            for (int p = 0; p < k; p++) { cudaFree(w[p]); cudaFree(b[p]); cudaFree(wc[p]); cudaFree(y[p]); cudaFree(yc[p]); cudaFree(dy[p]); }
            cudaFree(x); cudaFree(xe); cudaFree(acat); cudaFree(u); cudaFree(t); cudaFree(dx); cudaFree(dxe); cudaFree(dB); cudaFree(dA);
        }
        printf("%-10s %9.1f %9.1f %9.1f | %9.1f %9.1f %9.1f | %9.1f %9.1f   per layer\n", md.model, 1e3 * tot[0], 1e3 * tot[1],
               1e3 * tot[2], 1e3 * tot[3], 1e3 * tot[4], 1e3 * tot[5], 1e3 * tot[6], 1e3 * tot[7]);
    }
    matmul_destroy(mm);
    printf("%d failed\n", fails);
    return fails ? 1 : 0;
}
