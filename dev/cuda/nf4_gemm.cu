// dev/cuda/nf4_gemm.cu: playground for a fused NF4-dequantize x bf16 GEMM on wgmma (issue 14's first lever):
//   y (M, N) = x (M, K) · Wᵀ,  W (N, K) NF4 (packed codes + one fp32 absmax per 64-element block)
// read as 4-bit codes from global memory and dequantized into shared memory next to the wgmma, so no
// bf16 copy of W is written, read back or kept.
//
//   nvcc -std=c++17 -O3 -gencode arch=compute_90a,code=sm_90a -o build/nf4_gemm dev/cuda/nf4_gemm.cu -lcublas
//   ./build/nf4_gemm
//
// Check: a 256 x 384 x 1024 problem with fp32 output against a double-precision CPU product over qlora.h's
// dequantized weights (rounded to bf16, as the trainer's dequantize kernel writes them). The budget per
// output is K * 2^-24 * Σ_k |x_k w_k| (fp32 accumulation's worst case); one wrong weight moves an output by
// ~0.1 absmax, ~6x that budget at K = 1024, so a wrong code, nibble order or absmax is caught. The bf16-output
// kernel is then compared with cuBLAS on the same bf16 weights: each side may round its fp32 sum to bf16
// (2^-9 relative) after a different summation order, so the budget is 2^-8 |y| + 2 K 2^-24 Σ|x w|.
// Time: llama3-8b's and llama3-1b's frozen GEMM shapes at M = 8192 (4 x 2048 tokens), median of 20, against
// cuBLAS on already-dequantized bf16 weights (the floor: what the trainer runs when it keeps the weights)
// and the trainer's dequantize kernel + cuBLAS (what it runs with --recompute).
//
//   v1  2 warpgroups x 64 rows, 128 x 128 tile, BK 64 (one quantization block per row per k-tile), two
//       stages: x by cp.async, W's 16 packed bytes per thread loaded into registers one k-tile ahead and
//       dequantized into the swizzled tile before the barrier; 4 m64n128k16 wgmmas per k-tile, waited
//       at once (no overlap of the wgmma with the next tile's dequantize yet).
// Predicted for v1 (not yet run on a GPU): the dequantize is ~32 FMUL + 32 LUT reads per thread per
// k-tile against 4 x 128 x 128 x 64 x 2 / 256 = 16k FLOP per thread of wgmma; the waits and the barrier
// per k-tile leave the tensor cores idle for the dequantize: ~50-60% of cuBLAS's TFLOP/s. The next
// versions: wgmma overlapped with the next tile's dequantize (wait<1>, 3 stages), then producer warps.
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

// y (M, N) = x (M, K) · dequant(W)ᵀ; M, N multiples of 128, K of 64; absmax per 64 elements of W's rows
template <typename OutT>
__global__ void __launch_bounds__(256) nf4_gemm_kernel1(OutT* __restrict__ y, const bf16* __restrict__ x,
                                                       const uint8_t* __restrict__ packed, const float* __restrict__ absmax,
                                                       int M, int N, int K) {
    extern __shared__ unsigned char smem_raw[];
    __shared__ float lut[16];
    const uint32_t base = (smem_u32(smem_raw) + 1023) & ~1023u;  // stage s: x tile at base + 2 s TILE, W tile TILE after it
    const int tid = threadIdx.x, wg = tid / 128, m0 = blockIdx.y * BM, n0 = blockIdx.x * BN, nk = K / BK;
    if (tid < 16) lut[tid] = __uint_as_float(c_nf4_lut[tid]);

    auto load_x = [&](int s, int kt) {  // 128 rows x 8 chunks of 16 bytes: 4 per thread
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const int c = tid + 256 * i, r = c >> 3, cc = c & 7;
            cp_async16(base + 2 * s * TILE + wg_swz<128>(r, cc * 8), x + (size_t)(m0 + r) * K + kt * BK + cc * 8);
        }
    };
    // W: thread -> row r = tid / 2 of the tile, half h = tid % 2 of its 64 codes: 32 codes = 16 packed bytes
    const int wr = tid >> 1, wh = tid & 1;
    uint4 wq;
    float wa;
    auto fetch_w = [&](int kt) {
        const size_t e = (size_t)(n0 + wr) * K + (size_t)kt * BK + wh * 32;  // first element; one absmax block
        wq = *(const uint4*)(packed + e / 2);
        wa = absmax[e / 64];
    };
    auto store_w = [&](int s) {  // byte j of a word: elements 2j (high nibble) and 2j + 1 (low nibble)
        const uint32_t words[4] = {wq.x, wq.y, wq.z, wq.w};
#pragma unroll
        for (int c = 0; c < 4; c++) {
            uint32_t o[4];
#pragma unroll
            for (int j = 0; j < 4; j++) {
                const uint32_t b = (words[c] >> (8 * j)) & 0xff;
                o[j] = pack_bf16x2(ptx_mul_ftz(lut[b >> 4], wa), ptx_mul_ftz(lut[b & 15], wa));
            }
            st_shared_v4(base + (2 * s + 1) * TILE + wg_swz<128>(wr, wh * 32 + c * 8), o[0], o[1], o[2], o[3]);
        }
    };

    float d[64];  // (64 x 128) per warpgroup, wgmma's accumulator layout (kernels/wgmma.cuh)
#pragma unroll
    for (int i = 0; i < 64; i++) d[i] = 0.f;
    load_x(0, 0);
    cp_async_commit();
    fetch_w(0);
    __syncthreads();  // lut
    for (int kt = 0; kt < nk; kt++) {
        const int s = kt & 1;
        store_w(s);
        cp_async_wait_all();
        wg_fence_proxy();  // st.shared and cp.async writes, before wgmma reads them
        __syncthreads();   // stage s complete; both warpgroups are done with stage s ^ 1
        if (kt + 1 < nk) {
            load_x(s ^ 1, kt + 1);
            cp_async_commit();
            fetch_w(kt + 1);
        }
        const uint32_t xa = base + 2 * s * TILE + wg * 64 * 128, wb = base + (2 * s + 1) * TILE;
        wg_fence();
#pragma unroll
        for (int kk = 0; kk < BK / 16; kk++) wg_mma_64x128_ss<0, 0>(d, wg_desc(xa + kk * 32, 16, 1024), wg_desc(wb + kk * 32, 16, 1024), 1);
        wg_commit();
        wg_wait<0>();
        wg_fence_regs(d);
    }
    const int l = tid % 128, warp = l / 32, g = (l % 32) / 4, t = l % 4;
#pragma unroll
    for (int j = 0; j < 16; j++)
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const int row = m0 + wg * 64 + 16 * warp + g + 8 * h, col = n0 + 8 * j + 2 * t;
            store_out(y + (size_t)row * N + col, d[4 * j + 2 * h], d[4 * j + 2 * h + 1]);
        }
}
static const size_t SMEM1 = 4 * TILE + 1024;  // two stages of x and W tiles, plus the 1024-byte alignment

template <typename OutT>
static void nf4_gemm1(OutT* y, const bf16* x, const uint8_t* packed, const float* absmax, int M, int N, int K) {
    if (M % BM || N % BN || K % BK) { fprintf(stderr, "nf4_gemm1: M %d, N %d must be multiples of 128, K %d of 64\n", M, N, K); exit(1); }
    static bool attr = false;
    if (!attr) { cudaCheck(cudaFuncSetAttribute(nf4_gemm_kernel1<OutT>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)SMEM1)); attr = true; }
    nf4_gemm_kernel1<OutT><<<dim3(N / BN, M / BM), 256, SMEM1>>>(y, x, packed, absmax, M, N, K);
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
    {   // correctness
        Problem p = make_problem(256, 384, 1024);
        const int M = p.M, N = p.N, K = p.K;
        nf4_gemm1(p.d_yf, p.d_x, p.d_packed, p.d_absmax, M, N, K);
        nf4_gemm1(p.d_y, p.d_x, p.d_packed, p.d_absmax, M, N, K);
        std::vector<float> yf((size_t)M * N);
        std::vector<uint16_t> yb((size_t)M * N), yc((size_t)M * N);
        cudaCheck(cudaMemcpy(yf.data(), p.d_yf, 4 * yf.size(), cudaMemcpyDeviceToHost));
        cudaCheck(cudaMemcpy(yb.data(), p.d_y, 2 * yb.size(), cudaMemcpyDeviceToHost));
        cublas_gemm(h, p.d_y, p.d_x, p.d_w, M, N, K);
        cudaCheck(cudaMemcpy(yc.data(), p.d_y, 2 * yc.size(), cudaMemcpyDeviceToHost));
        double worst = 0, maxd = 0;
        size_t bad = 0;
        double worst_b = 0;
        for (int i = 0; i < M; i++)
            for (int n = 0; n < N; n++) {
                double s = 0, a = 0;
                for (int k = 0; k < K; k++) {
                    double v = (double)bf16_to_f32(p.x[(size_t)i * K + k]) * bf16_to_f32(p.wb[(size_t)n * K + k]);
                    s += v; a += fabs(v);
                }
                const size_t o = (size_t)i * N + n;
                double diff = fabs(yf[o] - s), budget = K * 0x1p-24 * a + 1e-30;
                maxd = fmax(maxd, diff); worst = fmax(worst, diff / budget); bad += diff > budget;
                double db = fabs((double)bf16_to_f32(yb[o]) - bf16_to_f32(yc[o]));
                worst_b = fmax(worst_b, db / (0x1p-8 * fabs(s) + 2 * K * 0x1p-24 * a + 1e-30));
            }
        printf("check 256x384x1024, fp32 out vs fp64 over the dequantized weights: max |diff| %.3g, %.1f%% of budget, %zu outside: %s\n",
               maxd, 100 * worst, bad, bad ? "FAIL" : "ok");
        printf("check bf16 out vs cuBLAS on the same bf16 weights: %.1f%% of budget: %s\n", 100 * worst_b, worst_b <= 1 ? "ok" : "FAIL");
        fails += (bad > 0) + (worst_b > 1);
        free_problem(p);
    }
    printf("%-26s %12s %12s %12s   TFLOP/s: cuBLAS, dequant+cuBLAS, fused v1\n", "shape M x N x K", "cuBLAS us", "deq+cuBLAS", "v1 us");
    const int shapes[][3] = {{8192, 4096, 4096}, {8192, 14336, 4096}, {8192, 4096, 14336}, {8192, 2048, 2048}, {8192, 8192, 2048}, {8192, 2048, 8192}};
    for (auto& sh : shapes) {
        Problem p = make_problem(sh[0], sh[1], sh[2]);
        const int M = p.M, N = p.N, K = p.K;
        const double fl = 2.0 * M * N * K;
        float t0 = median_ms([&] { cublas_gemm(h, p.d_y, p.d_x, p.d_w, M, N, K); });
        float t1 = median_ms([&] { dequantize_4bit_gpu(p.d_w, p.d_packed, p.d_absmax, (int64_t)N * K, QT_NF4, 64, 0); cublas_gemm(h, p.d_y, p.d_x, p.d_w, M, N, K); });
        float t2 = median_ms([&] { nf4_gemm1(p.d_y, p.d_x, p.d_packed, p.d_absmax, M, N, K); });
        char name[48];
        snprintf(name, sizeof name, "%d x %d x %d", M, N, K);
        printf("%-26s %12.1f %12.1f %12.1f   %.0f, %.0f, %.0f\n", name, 1e3 * t0, 1e3 * t1, 1e3 * t2, fl / (t0 * 1e9), fl / (t1 * 1e9), fl / (t2 * 1e9));
        free_problem(p);
    }
    printf("%d failed\n", fails);
    return fails ? 1 : 0;
}
