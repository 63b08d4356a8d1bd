// dev/cuda/nf4_gemm.cu: playground for a fused NF4-dequantize x bf16 GEMM on wgmma (issue 14's first lever):
//   y (M, N) = x (M, K) · Wᵀ,  W (N, K) NF4 (packed codes + one fp32 absmax per 64-element block)
// read as 4-bit codes from global memory and dequantized into shared memory next to the wgmma, so no
// bf16 copy of W is written, read back or kept.
//
//   nvcc -std=c++17 -O3 -gencode arch=compute_90a,code=sm_90a -o build/nf4_gemm dev/cuda/nf4_gemm.cu -lcublas
//   ./build/nf4_gemm
//
// Check: every version with fp32 output against a double-precision CPU product over qlora.h's dequantized
// weights (rounded to bf16, as the trainer's dequantize kernel writes them; the program first checks that
// kernel against qlora.h bit for bit), on 256 x 384 x 1024 and on one k-tile (128 x 128 x 64). The budget per
// output is K * 2^-24 * Σ_k |x_k w_k| (fp32 accumulation's worst case); one wrong weight moves an output by
// ~0.1 absmax, ~6x that budget at K = 1024, so a wrong code, nibble order or absmax is caught. With bf16
// output against cuBLAS on the same bf16 weights: each side rounds its fp32 sum to bf16 (2^-9 relative) after
// its own summation order, so the budget is 2^-8 |y| + 2 K 2^-24 Σ|x w|. Outputs are preset to NaN, so one
// left unwritten fails.
// Time: llama3-8b's and llama3-1b's frozen GEMM shapes at M = 8192 (4 x 2048 tokens), median of 20, against
// cuBLAS on already-dequantized bf16 weights (the floor: what the trainer runs when it keeps the weights)
// and the trainer's dequantize kernel + cuBLAS (what it runs with --recompute).
//
//   v1  2 warpgroups x 64 rows, 128 x 128 tile, BK 64 (one quantization block per row per k-tile), two
//       stages: x by cp.async, W's 16 packed bytes per thread loaded into registers one k-tile ahead and
//       dequantized into the swizzled tile before the barrier; 4 m64n128k16 wgmmas per k-tile, waited
//       at once (the dequantize and the wgmma of one CTA never overlap).
//   v2  the wgmma of k-tile t runs while the same threads dequantize tile t + 1 into the other W stage
//       and fetch the codes of t + 2; x in three stages, its cp.async two tiles ahead.
// Predicted (neither has run on a GPU yet): v1 ~50-60% of cuBLAS's TFLOP/s (only a second CTA per SM
// hides its dequantize), v2 ~70-80% (the dequantize, 32 multiplies and 32 table reads per thread per
// k-tile, hides under ~0.3 us of wgmma). Next: producer warps that dequantize while two consumer
// warpgroups multiply (FA3's split), 128 x 256 tiles.
#include <vector>                     // defines: std::vector
#include <cublas_v2.h>                // defines: cublasGemmEx
#include "../../kernels/nf4.cuh"      // defines: dequantize_4bit_gpu, ptx_mul_ftz, c_nf4_lut; qlora.h: dequantize_4bit, rng_*
#include "../../kernels/wgmma.cuh"    // defines: wg_swz, wg_desc, wg_mma_64x128_ss, wg_fence*, wg_commit, wg_wait
#include "timing.h"                   // defines: median_ms

static const int BM = 128, BN = 128, BK = 64, TILE = 128 * 128;  // TILE: bytes of one 128-row x 64-column bf16 tile

__device__ __forceinline__ uint32_t smem_u32(const void* p) { return (uint32_t)__cvta_generic_to_shared(p); }
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(src));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }
__device__ __forceinline__ void st_shared_v4(uint32_t addr, uint32_t a, uint32_t b, uint32_t c, uint32_t d) {
    asm volatile("st.shared.v4.b32 [%0], {%1, %2, %3, %4};\n" ::"r"(addr), "r"(a), "r"(b), "r"(c), "r"(d) : "memory");
}
// two bf16 (RNE) in one word, lo at the lower address
__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
    return (uint32_t)__bfloat16_as_ushort(__float2bfloat16_rn(lo)) | ((uint32_t)__bfloat16_as_ushort(__float2bfloat16_rn(hi)) << 16);
}
__device__ __forceinline__ void store_out(float* y, float a, float b) { *(float2*)y = make_float2(a, b); }
__device__ __forceinline__ void store_out(bf16* y, float a, float b) { *(__nv_bfloat162*)y = __floats2bfloat162_rn(a, b); }

__device__ __forceinline__ void cp_async_wait_1() { asm volatile("cp.async.wait_group 1;\n" ::: "memory"); }

// The pieces every version uses. x tile: 128 rows x 64 columns of x (rows m0.., k-tile kt) into a swizzled
// tile at dst by cp.async, 4 chunks of 16 bytes a thread.
__device__ __forceinline__ void x_tile_load(uint32_t dst, const bf16* x, int m0, int K, int kt, int tid) {
#pragma unroll
    for (int i = 0; i < 4; i++) {
        const int c = tid + 256 * i, r = c >> 3, cc = c & 7;
        cp_async16(dst + wg_swz<128>(r, cc * 8), x + (size_t)(m0 + r) * K + kt * BK + cc * 8);
    }
}
// W tile: thread -> row tid / 2 of the tile, half tid % 2 of the row's 64 codes: 32 codes = 16 packed bytes,
// all in one absmax block (BK = the blocksize)
struct WRegs { uint4 q; float a; };
__device__ __forceinline__ WRegs w_fetch(const uint8_t* packed, const float* absmax, int n0, int K, int kt, int tid) {
    const size_t e = (size_t)(n0 + (tid >> 1)) * K + (size_t)kt * BK + (tid & 1) * 32;  // the first element
    return {*(const uint4*)(packed + e / 2), absmax[e / 64]};
}
// dequantized as kernels/nf4.cuh does it (mul.ftz, then RNE to bf16) into the swizzled tile at dst;
// byte j of a word holds elements 2j (high nibble) and 2j + 1 (low nibble)
__device__ __forceinline__ void w_tile_store(uint32_t dst, const WRegs& w, const float* lut, int tid) {
    const uint32_t words[4] = {w.q.x, w.q.y, w.q.z, w.q.w};
#pragma unroll
    for (int c = 0; c < 4; c++) {
        uint32_t o[4];
#pragma unroll
        for (int j = 0; j < 4; j++) {
            const uint32_t b = (words[c] >> (8 * j)) & 0xff;
            o[j] = pack_bf16x2(ptx_mul_ftz(lut[b >> 4], w.a), ptx_mul_ftz(lut[b & 15], w.a));
        }
        st_shared_v4(dst + wg_swz<128>(tid >> 1, (tid & 1) * 32 + c * 8), o[0], o[1], o[2], o[3]);
    }
}
// d (64 x 128) += this warpgroup's 64 rows of the x tile at xa · the W tile at wb ᵀ: 4 k16 steps, issued
// and committed, not waited
__device__ __forceinline__ void mma_k_tile(float (&d)[64], uint32_t xa, uint32_t wb) {
    wg_fence();
#pragma unroll
    for (int kk = 0; kk < BK / 16; kk++) wg_mma_64x128_ss<0, 0>(d, wg_desc(xa + kk * 32, 16, 1024), wg_desc(wb + kk * 32, 16, 1024), 1);
    wg_commit();
}
// this warpgroup's 64 x 128 accumulator to y (wgmma's layout: kernels/wgmma.cuh)
template <typename OutT>
__device__ __forceinline__ void y_tile_store(OutT* y, const float (&d)[64], int m0, int n0, int N, int tid) {
    const int wg = tid / 128, l = tid % 128, warp = l / 32, g = (l % 32) / 4, t = l % 4;
#pragma unroll
    for (int j = 0; j < 16; j++)
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const int row = m0 + wg * 64 + 16 * warp + g + 8 * h, col = n0 + 8 * j + 2 * t;
            store_out(y + (size_t)row * N + col, d[4 * j + 2 * h], d[4 * j + 2 * h + 1]);
        }
}
__device__ __forceinline__ uint32_t smem_base(unsigned char* raw) { return (smem_u32(raw) + 1023) & ~1023u; }

// v1. y (M, N) = x (M, K) · dequant(W)ᵀ; M, N multiples of 128, K of 64; absmax per 64 elements of W's rows.
// Stage s: x tile at base + 2 s TILE, W tile at base + (2 s + 1) TILE.
template <typename OutT>
__global__ void __launch_bounds__(256) nf4_gemm_kernel1(OutT* __restrict__ y, const bf16* __restrict__ x,
                                                       const uint8_t* __restrict__ packed, const float* __restrict__ absmax,
                                                       int M, int N, int K) {
    extern __shared__ unsigned char smem_raw[];
    __shared__ float lut[16];
    const uint32_t base = smem_base(smem_raw);
    const int tid = threadIdx.x, m0 = blockIdx.y * BM, n0 = blockIdx.x * BN, nk = K / BK;
    if (tid < 16) lut[tid] = __uint_as_float(c_nf4_lut[tid]);
    float d[64];
#pragma unroll
    for (int i = 0; i < 64; i++) d[i] = 0.f;
    x_tile_load(base, x, m0, K, 0, tid);
    cp_async_commit();
    WRegs w = w_fetch(packed, absmax, n0, K, 0, tid);
    __syncthreads();  // lut
    for (int kt = 0; kt < nk; kt++) {
        const int s = kt & 1;
        w_tile_store(base + (2 * s + 1) * TILE, w, lut, tid);
        cp_async_wait_all();
        wg_fence_proxy();  // st.shared and cp.async writes, before wgmma reads them
        __syncthreads();   // stage s complete; both warpgroups are done with stage s ^ 1
        if (kt + 1 < nk) {
            x_tile_load(base + 2 * (s ^ 1) * TILE, x, m0, K, kt + 1, tid);
            cp_async_commit();
            w = w_fetch(packed, absmax, n0, K, kt + 1, tid);
        }
        mma_k_tile(d, base + 2 * s * TILE + (tid / 128) * 64 * 128, base + (2 * s + 1) * TILE);
        wg_wait<0>();
        wg_fence_regs(d);
    }
    y_tile_store(y, d, m0, n0, N, tid);
}

// v2: the wgmma of k-tile t runs while the threads dequantize tile t + 1 (and fetch the codes of t + 2);
// x in three stages (its cp.async two tiles ahead), W in two. x stage s at base + s TILE (s < 3), W stage
// s at base + (3 + s) TILE.
template <typename OutT>
__global__ void __launch_bounds__(256) nf4_gemm_kernel2(OutT* __restrict__ y, const bf16* __restrict__ x,
                                                       const uint8_t* __restrict__ packed, const float* __restrict__ absmax,
                                                       int M, int N, int K) {
    extern __shared__ unsigned char smem_raw[];
    __shared__ float lut[16];
    const uint32_t base = smem_base(smem_raw);
    const int tid = threadIdx.x, m0 = blockIdx.y * BM, n0 = blockIdx.x * BN, nk = K / BK;
    if (tid < 16) lut[tid] = __uint_as_float(c_nf4_lut[tid]);
    float d[64];
#pragma unroll
    for (int i = 0; i < 64; i++) d[i] = 0.f;
    x_tile_load(base, x, m0, K, 0, tid);
    cp_async_commit();
    if (nk > 1) x_tile_load(base + TILE, x, m0, K, 1, tid);
    cp_async_commit();  // (an empty group when nk == 1: the wait counts below stay uniform)
    WRegs w = w_fetch(packed, absmax, n0, K, 0, tid);
    __syncthreads();  // lut
    w_tile_store(base + 3 * TILE, w, lut, tid);
    if (nk > 1) w = w_fetch(packed, absmax, n0, K, 1, tid);
    cp_async_wait_1();  // x tile 0 landed (tile 1 may be in flight)
    wg_fence_proxy();
    __syncthreads();
    for (int kt = 0; kt < nk; kt++) {
        mma_k_tile(d, base + (kt % 3) * TILE + (tid / 128) * 64 * 128, base + (3 + (kt & 1)) * TILE);
        // while it runs: x tile kt + 2 into the stage tile kt - 1 used, W tile kt + 1 into the other W stage
        // (both free: every wgmma of kt - 1 was waited before the barrier that ended it)
        if (kt + 2 < nk) x_tile_load(base + ((kt + 2) % 3) * TILE, x, m0, K, kt + 2, tid);
        cp_async_commit();
        if (kt + 1 < nk) {
            w_tile_store(base + (3 + ((kt + 1) & 1)) * TILE, w, lut, tid);
            if (kt + 2 < nk) w = w_fetch(packed, absmax, n0, K, kt + 2, tid);
        }
        wg_wait<0>();
        wg_fence_regs(d);
        cp_async_wait_1();  // x tile kt + 1 landed
        wg_fence_proxy();
        __syncthreads();
    }
    y_tile_store(y, d, m0, n0, N, tid);
}

// shared memory of each version: its tiles plus the 1024-byte alignment
static const size_t SMEM[3] = {0, 4 * TILE + 1024, 5 * TILE + 1024};

template <int V, typename OutT>
static void nf4_gemm(OutT* y, const bf16* x, const uint8_t* packed, const float* absmax, int M, int N, int K) {
    if (M % BM || N % BN || K % BK) { fprintf(stderr, "nf4_gemm: M %d, N %d must be multiples of 128, K %d of 64\n", M, N, K); exit(1); }
    auto kernel = V == 1 ? nf4_gemm_kernel1<OutT> : nf4_gemm_kernel2<OutT>;
    static bool attr = false;
    if (!attr) { cudaCheck(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)SMEM[V])); attr = true; }
    kernel<<<dim3(N / BN, M / BM), 256, SMEM[V]>>>(y, x, packed, absmax, M, N, K);
    cudaCheck(cudaGetLastError());
}

// cuBLAS: y (M, N) row-major = x (M, K) · w (N, K)ᵀ, i.e. yᵀ = w · xᵀ in column-major terms
static void cublas_gemm(cublasHandle_t h, bf16* y, const bf16* x, const bf16* w, int M, int N, int K) {
    const float one = 1.f, zero = 0.f;
    if (cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, N, M, K, &one, w, CUDA_R_16BF, K, x, CUDA_R_16BF, K, &zero, y, CUDA_R_16BF, N,
                     CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT) != CUBLAS_STATUS_SUCCESS) { fprintf(stderr, "cublasGemmEx failed\n"); exit(1); }
}

// A random problem: x uniform in [-1, 1) (bf16), W's codes random, absmax in [0.01, 0.03)
struct Problem {
    int M, N, K;
    std::vector<uint16_t> x, wb;   // bf16 bits: x (M, K), W dequantized (N, K)
    std::vector<uint8_t> packed;   // (N K / 2)
    std::vector<float> absmax;     // (N K / 64)
    bf16 *d_x, *d_w, *d_y;
    uint8_t* d_packed;
    float *d_absmax, *d_yf;
};
static Problem make_problem(int M, int N, int K) {
    Problem p{M, N, K};
    const size_t nw = (size_t)N * K;
    p.x.resize((size_t)M * K); p.packed.resize(nw / 2); p.absmax.resize(nw / 64); p.wb.resize(nw);
    for (size_t i = 0; i < p.x.size(); i++) p.x[i] = f32_to_bf16(2 * rng_uniform(5, 1, i) - 1);
    for (size_t i = 0; i < p.packed.size(); i++) p.packed[i] = (uint8_t)(rng_u32(5, 2, i) >> 24);
    for (size_t i = 0; i < p.absmax.size(); i++) p.absmax[i] = 0.01f + 0.02f * rng_uniform(5, 3, i);
    std::vector<float> w(nw);
    dequantize_4bit(w.data(), p.packed.data(), p.absmax.data(), (int64_t)nw, QT_NF4, 64);
    for (size_t i = 0; i < nw; i++) p.wb[i] = f32_to_bf16(w[i]);
    cudaCheck(cudaMalloc(&p.d_x, 2 * p.x.size())); cudaCheck(cudaMalloc(&p.d_w, 2 * nw)); cudaCheck(cudaMalloc(&p.d_y, 2 * (size_t)M * N));
    cudaCheck(cudaMalloc(&p.d_yf, 4 * (size_t)M * N));
    cudaCheck(cudaMalloc(&p.d_packed, p.packed.size())); cudaCheck(cudaMalloc(&p.d_absmax, 4 * p.absmax.size()));
    cudaCheck(cudaMemcpy(p.d_x, p.x.data(), 2 * p.x.size(), cudaMemcpyHostToDevice));
    cudaCheck(cudaMemcpy(p.d_packed, p.packed.data(), p.packed.size(), cudaMemcpyHostToDevice));
    cudaCheck(cudaMemcpy(p.d_absmax, p.absmax.data(), 4 * p.absmax.size(), cudaMemcpyHostToDevice));
    dequantize_4bit_gpu(p.d_w, p.d_packed, p.d_absmax, (int64_t)nw, QT_NF4, 64, 0);  // the trainer's kernel
    cudaCheck(cudaDeviceSynchronize());
    std::vector<uint16_t> gw(nw);
    cudaCheck(cudaMemcpy(gw.data(), p.d_w, 2 * nw, cudaMemcpyDeviceToHost));
    if (gw != p.wb) { fprintf(stderr, "the trainer's dequantize kernel differs from qlora.h's: the check below would mean nothing\n"); exit(1); }
    return p;
}
static void free_problem(Problem& p) {
    for (void* q : {(void*)p.d_x, (void*)p.d_w, (void*)p.d_y, (void*)p.d_yf, (void*)p.d_packed, (void*)p.d_absmax}) cudaCheck(cudaFree(q));
}

int main() {
    cublasHandle_t h;
    if (cublasCreate(&h) != CUBLAS_STATUS_SUCCESS) { fprintf(stderr, "cublasCreate failed\n"); return 1; }
    int fails = 0;
    // correctness: every version, fp32 and bf16 output, on a multi-tile problem and on one k-tile (K = 64)
    const int checks[][3] = {{256, 384, 1024}, {128, 128, 64}};
    for (auto& sh : checks) {
        Problem p = make_problem(sh[0], sh[1], sh[2]);
        const int M = p.M, N = p.N, K = p.K;
        std::vector<double> ref((size_t)M * N), mag((size_t)M * N);  // Σ x w in fp64, Σ |x w|
        for (int i = 0; i < M; i++)
            for (int n = 0; n < N; n++) {
                double s = 0, a = 0;
                for (int k = 0; k < K; k++) {
                    double v = (double)bf16_to_f32(p.x[(size_t)i * K + k]) * bf16_to_f32(p.wb[(size_t)n * K + k]);
                    s += v; a += fabs(v);
                }
                ref[(size_t)i * N + n] = s; mag[(size_t)i * N + n] = a;
            }
        std::vector<float> yf((size_t)M * N);
        std::vector<uint16_t> yb((size_t)M * N), yc((size_t)M * N);
        cublas_gemm(h, p.d_y, p.d_x, p.d_w, M, N, K);
        cudaCheck(cudaMemcpy(yc.data(), p.d_y, 2 * yc.size(), cudaMemcpyDeviceToHost));
        for (int v = 1; v <= 2; v++) {
            cudaCheck(cudaMemset(p.d_yf, 0xff, 4 * yf.size()));
            cudaCheck(cudaMemset(p.d_y, 0xff, 2 * yb.size()));
            if (v == 1) { nf4_gemm<1>(p.d_yf, p.d_x, p.d_packed, p.d_absmax, M, N, K); nf4_gemm<1>(p.d_y, p.d_x, p.d_packed, p.d_absmax, M, N, K); }
            else        { nf4_gemm<2>(p.d_yf, p.d_x, p.d_packed, p.d_absmax, M, N, K); nf4_gemm<2>(p.d_y, p.d_x, p.d_packed, p.d_absmax, M, N, K); }
            cudaCheck(cudaMemcpy(yf.data(), p.d_yf, 4 * yf.size(), cudaMemcpyDeviceToHost));
            cudaCheck(cudaMemcpy(yb.data(), p.d_y, 2 * yb.size(), cudaMemcpyDeviceToHost));
            double worst = 0, maxd = 0, worst_b = 0;
            size_t bad = 0, bad_b = 0;
            for (size_t o = 0; o < ref.size(); o++) {
                double diff = fabs(yf[o] - ref[o]), budget = K * 0x1p-24 * mag[o] + 1e-30;  // NaN (unwritten) counts as outside
                maxd = fmax(maxd, diff); worst = fmax(worst, diff / budget); bad += !(diff <= budget);
                double db = fabs((double)bf16_to_f32(yb[o]) - bf16_to_f32(yc[o])), bb = 0x1p-8 * fabs(ref[o]) + 2 * K * 0x1p-24 * mag[o] + 1e-30;
                worst_b = fmax(worst_b, db / bb); bad_b += !(db <= bb);
            }
            printf("v%d %dx%dx%d: fp32 out vs fp64: max |diff| %.3g, %.1f%% of budget, %zu outside | bf16 out vs cuBLAS: %.1f%% of budget, %zu outside: %s\n",
                   v, M, N, K, maxd, 100 * worst, bad, 100 * worst_b, bad_b, bad + bad_b ? "FAIL" : "ok");
            fails += bad + bad_b > 0;
        }
        free_problem(p);
    }
    printf("%-22s %10s %10s %10s %10s   TFLOP/s: cuBLAS, dequant+cuBLAS, v1, v2\n", "M x N x K", "cuBLAS us", "deq+cuBLAS", "v1 us", "v2 us");
    const int shapes[][3] = {{8192, 4096, 4096}, {8192, 14336, 4096}, {8192, 4096, 14336}, {8192, 2048, 2048}, {8192, 8192, 2048}, {8192, 2048, 8192}};
    for (auto& sh : shapes) {
        Problem p = make_problem(sh[0], sh[1], sh[2]);
        const int M = p.M, N = p.N, K = p.K;
        const double fl = 2.0 * M * N * K / 1e9;
        float t0 = median_ms([&] { cublas_gemm(h, p.d_y, p.d_x, p.d_w, M, N, K); });
        float t1 = median_ms([&] { dequantize_4bit_gpu(p.d_w, p.d_packed, p.d_absmax, (int64_t)N * K, QT_NF4, 64, 0); cublas_gemm(h, p.d_y, p.d_x, p.d_w, M, N, K); });
        float t2 = median_ms([&] { nf4_gemm<1>(p.d_y, p.d_x, p.d_packed, p.d_absmax, M, N, K); });
        float t3 = median_ms([&] { nf4_gemm<2>(p.d_y, p.d_x, p.d_packed, p.d_absmax, M, N, K); });
        char name[48];
        snprintf(name, sizeof name, "%d x %d x %d", M, N, K);
        printf("%-22s %10.1f %10.1f %10.1f %10.1f   %.0f, %.0f, %.0f, %.0f\n", name, 1e3 * t0, 1e3 * t1, 1e3 * t2, 1e3 * t3,
               fl / t0, fl / t1, fl / t2, fl / t3);
        free_problem(p);
    }
    printf("%d failed\n", fails);
    return fails ? 1 : 0;
}
