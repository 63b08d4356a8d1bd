// dev/cuda/attention_long.cu: the production attention at one long sequence (llama3-8b, B=1, T=131072).
//
//   nvcc -std=c++17 -O3 -gencode arch=compute_90a,code=sm_90a dev/cuda/attention_long.cu -o attention_long
//   ./attention_long [T]       default T = 131072
//
// What it checks that the other tests cannot (their CPU references stop at T ~ 16k): that the index math
// holds where B T nh hd = 2^29 elements (a 32-bit byte offset would overflow past 2^31) and the backward
// scratch is 2 GiB of dq_accum; that far-away rows are right, against an fp64 CPU reference for a few
// rows (out, lse, dq of query rows near the end; dk, dv of key rows near the end, which only the last
// few hundred queries see); that a second backward gives the same bits. Then one forward and one
// backward, timed. Inputs come from a hash on the GPU (the CPU would take half a minute to draw 2.6 G values).
#include <cuda_runtime.h>                  // defines: cudaEvent_t
#include <stdio.h>                         // defines: printf
#include <stdlib.h>                        // defines: atoi
#include <math.h>                          // defines: exp, sqrt
#include <vector>                          // defines: std::vector
#include "../../qlora.h"                   // defines: bf16_to_f32
#include "../../kernels/attention.cuh"     // defines: attention_forward, attention_backward, attention_backward_scratch_bytes

// x[i] = amp * (uniform in [-1, 1)) from a 64-bit hash of (seed, i)
__global__ void fill_hash_kernel(bf16* x, int64_t n, float amp, uint64_t seed) {
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        uint64_t z = (uint64_t)i * 0x9E3779B97F4A7C15ull + seed;
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        z ^= z >> 31;
        x[i] = __float2bfloat16(amp * ((float)(z >> 40) * (2.0f / 16777216.0f) - 1.0f));
    }
}
__global__ void count_diff_kernel(unsigned long long* n, const uint16_t* a, const uint16_t* b, int64_t len) {
    unsigned long long c = 0;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < len; i += (int64_t)gridDim.x * blockDim.x) c += a[i] != b[i];
    if (c) atomicAdd(n, c);
}
static unsigned long long count_diff(const bf16* a, const bf16* b, size_t len) {
    unsigned long long* d; unsigned long long h = 0;
    cudaCheck(cudaMalloc(&d, 8)); cudaCheck(cudaMemset(d, 0, 8));
    count_diff_kernel<<<1024, 256>>>(d, (const uint16_t*)a, (const uint16_t*)b, (int64_t)len);
    cudaCheck(cudaGetLastError());
    cudaCheck(cudaMemcpy(&h, d, 8, cudaMemcpyDeviceToHost)); cudaCheck(cudaFree(d));
    return h;
}
static std::vector<float> to_host_f(const bf16* d, size_t n) {
    std::vector<uint16_t> b(n); std::vector<float> f(n);
    cudaCheck(cudaMemcpy(b.data(), d, n * 2, cudaMemcpyDeviceToHost));
    for (size_t i = 0; i < n; i++) f[i] = bf16_to_f32(b[i]);
    return f;
}
static double rel(const std::vector<double>& ref, const float* got, int n) {
    double num = 0, den = 0;
    for (int c = 0; c < n; c++) { const double d = got[c] - ref[c]; num += d * d; den += ref[c] * ref[c]; }
    return isnan(num) ? INFINITY : sqrt(num / (den + 1e-30));
}

int main(int argc, char** argv) {
    int ndev = 0;
    if (cudaGetDeviceCount(&ndev) != cudaSuccess || ndev == 0) { printf("no CUDA device\n"); return 0; }
    const int B = 1, T = argc > 1 ? atoi(argv[1]) : 131072, nh = 32, nkv = 8, hd = 128, G = nh / nkv;
    const size_t nq = (size_t)B * T * nh * hd, nk = (size_t)B * T * nkv * hd, nl = (size_t)B * nh * T;
    const size_t scratch = attention_backward_scratch_bytes(B, T, nh, hd);
    printf("B=%d T=%d nh=%d nkv=%d hd=%d: q %.2f GiB, backward scratch %.2f GiB\n", B, T, nh, nkv, hd, nq * 2 / 1073741824.0,
           scratch / 1073741824.0);
    bf16 *q, *k, *v, *dout, *out, *dq, *dk, *dv, *dq1, *dk1, *dv1;
    float *lse, *scr;
    for (bf16** p : {&q, &dout, &out, &dq, &dq1}) cudaCheck(cudaMalloc(p, nq * 2));
    for (bf16** p : {&k, &v, &dk, &dv, &dk1, &dv1}) cudaCheck(cudaMalloc(p, nk * 2));
    cudaCheck(cudaMalloc(&lse, nl * 4)); cudaCheck(cudaMalloc(&scr, scratch));
    fill_hash_kernel<<<4096, 256>>>(q, nq, 2.f, 1); fill_hash_kernel<<<4096, 256>>>(k, nk, 2.f, 2);
    fill_hash_kernel<<<4096, 256>>>(v, nk, 1.f, 3); fill_hash_kernel<<<4096, 256>>>(dout, nq, 1.f, 4);
    cudaCheck(cudaGetLastError());
    cudaCheck(cudaMemset(out, 0xff, nq * 2)); cudaCheck(cudaMemset(lse, 0xff, nl * 4));
    cudaCheck(cudaMemset(scr, 0xff, scratch));
    for (bf16* p : {dq, dq1}) cudaCheck(cudaMemset(p, 0xff, nq * 2));
    for (bf16* p : {dk, dv, dk1, dv1}) cudaCheck(cudaMemset(p, 0xff, nk * 2));

    cudaEvent_t e[4];
    for (auto& x : e) cudaCheck(cudaEventCreate(&x));
    cudaCheck(cudaEventRecord(e[0]));
    attention_forward(out, lse, q, k, v, nullptr, B, T, nh, nkv, hd, 0);
    cudaCheck(cudaEventRecord(e[1]));
    attention_backward(dq1, dk1, dv1, scr, dout, q, k, v, out, lse, nullptr, B, T, nh, nkv, hd, 0);
    cudaCheck(cudaEventRecord(e[2]));
    cudaCheck(cudaMemset(scr, 0x55, scratch));
    attention_backward(dq, dk, dv, scr, dout, q, k, v, out, lse, nullptr, B, T, nh, nkv, hd, 0);
    cudaCheck(cudaEventRecord(e[3]));
    cudaCheck(cudaDeviceSynchronize());
    float ms[3];
    for (int i = 0; i < 3; i++) cudaCheck(cudaEventElapsedTime(&ms[i], e[i], e[i + 1]));
    const double pairs = (double)B * T * (T + 1.0) / 2, ff = 4.0 * hd * nh * pairs;
    printf("forward   %9.1f ms  %6.1f TFLOP/s (causal)\n", ms[0], ff / (ms[0] * 1e-3) / 1e12);
    printf("backward  %9.1f ms  %6.1f TFLOP/s (2.5x forward FLOPs); second run %.1f ms\n", ms[1], 2.5 * ff / (ms[1] * 1e-3) / 1e12, ms[2]);
    const unsigned long long d_dq = count_diff(dq, dq1, nq), d_dk = count_diff(dk, dk1, nk), d_dv = count_diff(dv, dv1, nk);
    printf("repeat: dq %llu, dk %llu, dv %llu elements differ\n", d_dq, d_dk, d_dv);
    bool ok = d_dq + d_dk + d_dv == 0;

    // fp64 reference for a few rows near the end (b = 0)
    const std::vector<float> hq = to_host_f(q, nq), hk = to_host_f(k, nk), hv = to_host_f(v, nk), hdo = to_host_f(dout, nq);
    const std::vector<float> ho = to_host_f(out, nq), hdq = to_host_f(dq, nq), hdk = to_host_f(dk, nk), hdv = to_host_f(dv, nk);
    std::vector<float> hl(nl);
    cudaCheck(cudaMemcpy(hl.data(), lse, nl * 4, cudaMemcpyDeviceToHost));
    const double scale = 1.0 / sqrt((double)hd);
    std::vector<double> sc(T), acc(hd), dqr(hd);
    double worst_out = 0, worst_lse = 0, worst_dq = 0, worst_dk = 0, worst_dv = 0;
    for (int i : {T - 1, T - 77, T / 2 + 5, 70000 % T})
        for (int h : {0, 13, 31}) {
            const size_t qo = ((size_t)i * nh + h) * hd;
            const int kvh = h / G;
            double mx = -INFINITY;
            for (int j = 0; j <= i; j++) {
                const float* kj = &hk[((size_t)j * nkv + kvh) * hd];
                double d = 0;
                for (int c = 0; c < hd; c++) d += (double)hq[qo + c] * kj[c];
                sc[j] = d * scale; mx = fmax(mx, sc[j]);
            }
            double l = 0;
            for (int c = 0; c < hd; c++) acc[c] = 0;
            for (int j = 0; j <= i; j++) {
                const double pj = exp(sc[j] - mx);
                l += pj;
                for (int c = 0; c < hd; c++) acc[c] += pj * hv[((size_t)j * nkv + kvh) * hd + c];
            }
            for (int c = 0; c < hd; c++) acc[c] /= l;
            worst_out = fmax(worst_out, rel(acc, &ho[qo], hd));
            worst_lse = fmax(worst_lse, fabs(mx + log(l) - hl[(size_t)h * T + i]));
            // dq_i = scale sum_j p_ij (dout_i . v_j - D_i) k_j, with the GPU's out and lse (as the backward sees them)
            double D = 0;
            for (int c = 0; c < hd; c++) D += (double)hdo[qo + c] * ho[qo + c];
            const double L = hl[(size_t)h * T + i];
            for (int c = 0; c < hd; c++) dqr[c] = 0;
            for (int j = 0; j <= i; j++) {
                const size_t ko = ((size_t)j * nkv + kvh) * hd;
                double dp = 0;
                for (int c = 0; c < hd; c++) dp += (double)hdo[qo + c] * hv[ko + c];
                const double ds = exp(sc[j] - L) * (dp - D);
                for (int c = 0; c < hd; c++) dqr[c] += scale * ds * hk[ko + c];
            }
            worst_dq = fmax(worst_dq, rel(dqr, &hdq[qo], hd));
        }
    // dk_j, dv_j for key rows near the end: the queries i >= j of the kv head's G query heads
    std::vector<double> dkr(hd), dvr(hd);
    for (int j : {T - 1, T - 300})
        for (int kvh : {0, 7}) {
            const size_t ko = ((size_t)j * nkv + kvh) * hd;
            for (int c = 0; c < hd; c++) dkr[c] = dvr[c] = 0;
            for (int h = kvh * G; h < kvh * G + G; h++)
                for (int i = j; i < T; i++) {
                    const size_t qo = ((size_t)i * nh + h) * hd;
                    double s = 0, dp = 0, D = 0;
                    for (int c = 0; c < hd; c++) { s += (double)hq[qo + c] * hk[ko + c]; dp += (double)hdo[qo + c] * hv[ko + c]; D += (double)hdo[qo + c] * ho[qo + c]; }
                    const double p = exp(s * scale - hl[(size_t)h * T + i]), ds = p * (dp - D);
                    for (int c = 0; c < hd; c++) { dkr[c] += scale * ds * hq[qo + c]; dvr[c] += p * hdo[qo + c]; }
                }
            worst_dk = fmax(worst_dk, rel(dkr, &hdk[ko], hd));
            worst_dv = fmax(worst_dv, rel(dvr, &hdv[ko], hd));
        }
    printf("vs fp64 on sampled rows: out rel_l2 %.2e, lse abs %.2e, dq %.2e, dk %.2e, dv %.2e\n", worst_out, worst_lse, worst_dq,
           worst_dk, worst_dv);
    ok &= worst_out < 1e-2 && worst_lse < 1e-3 && worst_dq < 2e-2 && worst_dk < 2e-2 && worst_dv < 2e-2;
    printf("%s\n", ok ? "long sequence OK" : "LONG SEQUENCE FAILED");
    return ok ? 0 : 1;
}
