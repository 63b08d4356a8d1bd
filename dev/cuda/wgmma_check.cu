// dev/cuda/wgmma_check.cu: the three wgmma operand layouts the attention backward uses, each against a CPU matmul.
//
//   nvcc -std=c++17 -O3 -gencode arch=compute_90a,code=sm_90a dev/cuda/wgmma_check.cu -o wgmma_check && ./wgmma_check
//
//   ss_kk: D (64 x 64) = A (64 x 128) B^T, A and B stored row-major [m][k], [n][k]   (S^T = K Q^T: both K-major)
//   ss_tt: D (64 x 64) = A B, A stored [k][m] (128 x 64), B = columns 64..127 of [k][n] (128 x 128)
//                                                                                 (dQ = dS K: both MN-major)
//   rs_t : D (64 x 128) = A B, A in registers (64 x 64), B stored [k][n] (64 x 128)  (dV = P^T dO: B MN-major)
// One warpgroup each; the tiles go through wg_swz (kernels/wgmma.cuh), as the attention kernel stores them.
#include <cuda_runtime.h>            // defines: cudaMalloc
#include <stdio.h>                   // defines: printf
#include <math.h>                    // defines: fabs
#include <vector>                    // defines: std::vector
#include "../../qlora.h"             // defines: f32_to_bf16, bf16_to_f32, rng_uniform
#include "../../kernels/common.cuh"  // defines: bf16, cudaCheck
#include "../../kernels/wgmma.cuh"   // defines: wg_swz, wg_desc, wg_mma_64x64_ss, wg_mma_64x128_rs

// g: row-major (R, C) bf16 in global -> swizzled smem tile at s
template <int R, int C>
__device__ void load_tile(unsigned char* s, const bf16* g) {
    for (int e = threadIdx.x; e < R * C; e += blockDim.x) *reinterpret_cast<bf16*>(s + wg_swz<R>(e / C, e % C)) = g[e];
}
__device__ void store_d(float* out, const float* d, int n8s, int ldo) {  // accumulator layout -> row-major
    const int w = threadIdx.x / 32, l = threadIdx.x % 32, g = l / 4, t = l % 4;
    for (int j = 0; j < n8s; j++)
        for (int e = 0; e < 4; e++) out[(16 * w + g + 8 * (e >> 1)) * ldo + 8 * j + 2 * t + (e & 1)] = d[4 * j + e];
}
__device__ uint32_t smem_u32(const void* p) { return (uint32_t)__cvta_generic_to_shared(p); }

__global__ void ss_kk(float* out, const bf16* a, const bf16* b) {  // a (64, 128), b (64, 128)
    __shared__ __align__(1024) unsigned char sa[64 * 256], sb[64 * 256];
    load_tile<64, 128>(sa, a); load_tile<64, 128>(sb, b);
    wg_fence_proxy(); __syncthreads();
    float d[32];
    wg_fence();
    for (int kk = 0; kk < 8; kk++) {
        const uint32_t off = (kk / 4) * 64 * 128 + (kk % 4) * 32;
        wg_mma_64x64_ss<0, 0>(d, wg_desc(smem_u32(sa) + off, 16, 1024), wg_desc(smem_u32(sb) + off, 16, 1024), kk > 0);
    }
    wg_commit(); wg_wait<0>(); wg_fence_regs(d);
    store_d(out, d, 8, 64);
}
__global__ void ss_tt(float* out, const bf16* a, const bf16* b) {  // a (128 k, 64 m), b (128 k, 128 n); uses n 64..127
    __shared__ __align__(1024) unsigned char sa[128 * 128], sb[128 * 256];
    load_tile<128, 64>(sa, a); load_tile<128, 128>(sb, b);
    wg_fence_proxy(); __syncthreads();
    float d[32];
    wg_fence();
    for (int kk = 0; kk < 8; kk++)
        wg_mma_64x64_ss<1, 1>(d, wg_desc(smem_u32(sa) + kk * 2048, 64 * 128, 1024),
                              wg_desc(smem_u32(sb) + 128 * 128 + kk * 2048, 128 * 128, 1024), kk > 0);
    wg_commit(); wg_wait<0>(); wg_fence_regs(d);
    store_d(out, d, 8, 64);
}
__global__ void rs_t(float* out, const bf16* a, const bf16* b) {  // a (64 m, 64 k) row-major, b (64 k, 128 n)
    __shared__ __align__(1024) unsigned char sb[64 * 256];
    load_tile<64, 128>(sb, b);
    wg_fence_proxy(); __syncthreads();
    const int w = threadIdx.x / 32, l = threadIdx.x % 32, g = l / 4, t = l % 4;
    float d[64];
    for (int i = 0; i < 64; i++) d[i] = 0.f;
    wg_fence();
    for (int kc = 0; kc < 4; kc++) {
        auto pk = [&](int r, int c) {
            const bf16* p = a + (16 * w + r) * 64 + 16 * kc + c;
            return (uint32_t)__bfloat16_as_ushort(p[0]) | ((uint32_t)__bfloat16_as_ushort(p[1]) << 16);
        };
        const uint32_t fa[4] = {pk(g, 2 * t), pk(g + 8, 2 * t), pk(g, 2 * t + 8), pk(g + 8, 2 * t + 8)};
        wg_mma_64x128_rs<1>(d, fa, wg_desc(smem_u32(sb) + kc * 2048, 64 * 128, 1024));
    }
    wg_commit(); wg_wait<0>(); wg_fence_regs(d);
    store_d(out, d, 16, 128);
}

static bool check(const char* name, void (*k)(float*, const bf16*, const bf16*), int na, int nb, int M, int N, int K,
                  bool a_km, bool b_nk, int b_ld, int b_col0) {
    std::vector<uint16_t> ha(na), hb(nb);
    for (int i = 0; i < na; i++) ha[i] = f32_to_bf16(2.f * rng_uniform(1, 1, i) - 1.f);
    for (int i = 0; i < nb; i++) hb[i] = f32_to_bf16(2.f * rng_uniform(1, 2, i) - 1.f);
    bf16 *da, *db; float* dout;
    cudaCheck(cudaMalloc(&da, na * 2)); cudaCheck(cudaMalloc(&db, nb * 2)); cudaCheck(cudaMalloc(&dout, M * N * 4));
    cudaCheck(cudaMemcpy(da, ha.data(), na * 2, cudaMemcpyHostToDevice));
    cudaCheck(cudaMemcpy(db, hb.data(), nb * 2, cudaMemcpyHostToDevice));
    k<<<1, 128>>>(dout, da, db);
    cudaCheck(cudaGetLastError()); cudaCheck(cudaDeviceSynchronize());
    std::vector<float> got(M * N);
    cudaCheck(cudaMemcpy(got.data(), dout, M * N * 4, cudaMemcpyDeviceToHost));
    double mx = 0, mref = 0;
    for (int m = 0; m < M; m++)
        for (int n = 0; n < N; n++) {
            double s = 0;
            for (int kk = 0; kk < K; kk++) {
                const double av = bf16_to_f32(ha[a_km ? kk * M + m : m * K + kk]);
                const double bv = bf16_to_f32(hb[b_nk ? n * K + kk : kk * b_ld + b_col0 + n]);
                s += av * bv;
            }
            mx = fmax(mx, fabs(s - got[m * N + n])); mref = fmax(mref, fabs(s));
        }
    const bool ok = mx <= 1e-4 * mref;
    printf("%-6s max |diff| %.3g (max |ref| %.3g) %s\n", name, mx, mref, ok ? "ok" : "FAIL");
    cudaCheck(cudaFree(da)); cudaCheck(cudaFree(db)); cudaCheck(cudaFree(dout));
    return ok;
}

int main() {
    int ndev = 0;
    if (cudaGetDeviceCount(&ndev) != cudaSuccess || ndev == 0) { printf("no CUDA device\n"); return 0; }
    bool ok = check("ss_kk", ss_kk, 64 * 128, 64 * 128, 64, 64, 128, false, true, 0, 0);
    ok &= check("ss_tt", ss_tt, 128 * 64, 128 * 128, 64, 64, 128, true, false, 128, 64);
    ok &= check("rs_t", rs_t, 64 * 64, 64 * 128, 64, 128, 64, false, false, 128, 0);
    printf("%s\n", ok ? "all layouts correct" : "SOME LAYOUTS WRONG");
    return ok ? 0 : 1;
}
