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
// kernel against qlora.h bit for bit), on 256 x 384 x 1024 and on one k-tile (128 x 128 x 64; v3 128 x 64 x 128). The budget per
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
//   v3  v2 for the backward's input gradient dx (M, K) = dy (M, N) · W: the W tile is 64 rows of the
//       contraction x 128 output columns, read MN-major (wgmma's transpose bit, as V in O = P V).
//   v4  warp-specialised (forward only): a producer warpgroup (cp.async of x, dequantize of W) and two
//       consumer warpgroups, 256 x 128 tiles, four stages, mbarriers; two wgmma groups in flight. Below.
//   v5  v4 on the already-dequantized bf16 W (cp.async beside x): the GEMM alone, against cuBLAS.
// Measured (H100, session 7): v1-v3 pass every check and run 270-368 TFLOP/s, 40-47% of cuBLAS's 650-800 (the
// prediction was 50-60% for v1, 70-80% for v2); v2 gains almost nothing over v1, so the dequantize was not
// their limit: every k-tile ends in wgmma.wait_group 0 and a barrier, and the tensor cores idle at each turn.
// v4 is that fix; predicted (not yet run): 60-75% of cuBLAS, limited by the one producer warpgroup's
// dequantize (64 weights a thread a k-tile, ~250 instructions, against ~1000 cycles of wgmma).
#include <algorithm>                  // defines: std::max
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
__device__ __forceinline__ void dequant8_store(uint32_t addr, uint32_t word, float a, const float* lut) {
    uint32_t o[4];
#pragma unroll
    for (int j = 0; j < 4; j++) {
        const uint32_t b = (word >> (8 * j)) & 0xff;
        o[j] = pack_bf16x2(ptx_mul_ftz(lut[b >> 4], a), ptx_mul_ftz(lut[b & 15], a));
    }
    st_shared_v4(addr, o[0], o[1], o[2], o[3]);
}
__device__ __forceinline__ void w_tile_store(uint32_t dst, const WRegs& w, const float* lut, int tid) {
    const uint32_t words[4] = {w.q.x, w.q.y, w.q.z, w.q.w};
#pragma unroll
    for (int c = 0; c < 4; c++) dequant8_store(dst + wg_swz<128>(tid >> 1, (tid & 1) * 32 + c * 8), words[c], w.a, lut);
}
// The backward's W tile (dx = dy·W: the contraction runs down W's rows): 64 rows of W (n0.., k-tile kt of N)
// x 128 columns (k0..): thread -> row tid / 4, quarter tid % 4 = 32 codes in one absmax block (k0 is a
// multiple of 128). Stored 64 rows x 2 column blocks, read MN-major.
__device__ __forceinline__ WRegs wt_fetch(const uint8_t* packed, const float* absmax, int k0, int K, int kt, int tid) {
    const size_t e = (size_t)(kt * BK + (tid >> 2)) * K + k0 + (tid & 3) * 32;
    return {*(const uint4*)(packed + e / 2), absmax[e / 64]};
}
__device__ __forceinline__ void wt_tile_store(uint32_t dst, const WRegs& w, const float* lut, int tid) {
    const uint32_t words[4] = {w.q.x, w.q.y, w.q.z, w.q.w};
#pragma unroll
    for (int c = 0; c < 4; c++) dequant8_store(dst + wg_swz<64>(tid >> 2, (tid & 3) * 32 + c * 8), words[c], w.a, lut);
}
// d (64 x 128) += this warpgroup's 64 rows of the x tile at xa · the W tile at wb ᵀ: 4 k16 steps, issued
// and committed, not waited
__device__ __forceinline__ void mma_k_tile(float (&d)[64], uint32_t xa, uint32_t wb) {
    wg_fence();
#pragma unroll
    for (int kk = 0; kk < BK / 16; kk++) wg_mma_64x128_ss<0, 0>(d, wg_desc(xa + kk * 32, 16, 1024), wg_desc(wb + kk * 32, 16, 1024), 1);
    wg_commit();
}
// the backward's: B = the W tile read MN-major (a k16 slice is 16 rows, 2048 bytes; column block 64 x 128 bytes)
__device__ __forceinline__ void mma_k_tile_t(float (&d)[64], uint32_t xa, uint32_t wb) {
    wg_fence();
#pragma unroll
    for (int kk = 0; kk < BK / 16; kk++) wg_mma_64x128_ss<0, 1>(d, wg_desc(xa + kk * 32, 16, 1024), wg_desc(wb + kk * 2048, BK * 128, 1024), 1);
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
// s at base + (3 + s) TILE. W (N, K) as above; DX = false: y (M, N) = x (M, K) · Wᵀ (the forward);
// DX = true: y (M, K) = x (M, N) · W (the backward's input gradient, x = dy).
template <bool DX, typename OutT>
__global__ void __launch_bounds__(256) nf4_gemm_kernel2(OutT* __restrict__ y, const bf16* __restrict__ x,
                                                       const uint8_t* __restrict__ packed, const float* __restrict__ absmax,
                                                       int M, int N, int K) {
    extern __shared__ unsigned char smem_raw[];
    __shared__ float lut[16];
    const uint32_t base = smem_base(smem_raw);
    const int C = DX ? N : K, O = DX ? K : N;  // contraction, output width
    const int tid = threadIdx.x, m0 = blockIdx.y * BM, c0 = blockIdx.x * BN, nk = C / BK;
    if (tid < 16) lut[tid] = __uint_as_float(c_nf4_lut[tid]);
    auto fetch = [&](int kt) { return DX ? wt_fetch(packed, absmax, c0, K, kt, tid) : w_fetch(packed, absmax, c0, K, kt, tid); };
    auto store = [&](int s, const WRegs& w) {
        if (DX) wt_tile_store(base + (3 + s) * TILE, w, lut, tid);
        else w_tile_store(base + (3 + s) * TILE, w, lut, tid);
    };
    float d[64];
#pragma unroll
    for (int i = 0; i < 64; i++) d[i] = 0.f;
    x_tile_load(base, x, m0, C, 0, tid);
    cp_async_commit();
    if (nk > 1) x_tile_load(base + TILE, x, m0, C, 1, tid);
    cp_async_commit();  // (an empty group when nk == 1: the wait counts below stay uniform)
    WRegs w = fetch(0);
    __syncthreads();  // lut
    store(0, w);
    if (nk > 1) w = fetch(1);
    cp_async_wait_1();  // x tile 0 landed (tile 1 may be in flight)
    wg_fence_proxy();
    __syncthreads();
    for (int kt = 0; kt < nk; kt++) {
        const uint32_t xa = base + (kt % 3) * TILE + (tid / 128) * 64 * 128, wb = base + (3 + (kt & 1)) * TILE;
        if (DX) mma_k_tile_t(d, xa, wb);
        else mma_k_tile(d, xa, wb);
        // while it runs: x tile kt + 2 into the stage tile kt - 1 used, W tile kt + 1 into the other W stage
        // (both free: every wgmma of kt - 1 was waited before the barrier that ended it)
        if (kt + 2 < nk) x_tile_load(base + ((kt + 2) % 3) * TILE, x, m0, C, kt + 2, tid);
        cp_async_commit();
        if (kt + 1 < nk) {
            store((kt + 1) & 1, w);
            if (kt + 2 < nk) w = fetch(kt + 2);
        }
        wg_wait<0>();
        wg_fence_regs(d);
        cp_async_wait_1();  // x tile kt + 1 landed
        wg_fence_proxy();
        __syncthreads();
    }
    y_tile_store(y, d, m0, c0, O, tid);
}

// v4 (forward only): warp-specialised, FA3's / CUTLASS's sm90 split. 384 threads: warpgroup 0 produces,
// warpgroups 1 and 2 consume. Tile 256 (M) x 128 (N), BK 64; S4 stages of x (256 x 64, 32 KB) and W
// (128 x 64, 16 KB), 192 KB. The 256 x 128 tile halves the dequantize work per FLOP against 128 x 256.
//   producer, per k-tile kt (stage s = kt % S4): waits until the stage of kt + 1 is empty and issues the
//     cp.async of x tile kt + 1 (one tile ahead), dequantizes W tile kt (one row of 64 codes a thread)
//     into stage s, waits for x tile kt's copies (cp.async.wait_group 1), fences its writes for the async
//     proxy and arrives on full[s] (128 arrivals);
//   consumers (128 rows each, two m64 halves): wait full[s], issue 8 wgmmas (2 halves x 4 k16) as one group,
//     wait for the group before it (wgmma.wait_group 1) and release that group's stage (one arrival per
//     warpgroup on empty[]): two groups in flight, the tensor cores never wait for a barrier turn.
// setmaxnreg: producer 96 registers, consumers 200 (2 x 64 accumulators a thread); with 56 for the producer
// its unrolled copies spilled (ptxas: 164 bytes), from 96 on nothing does.
static const int S4 = 4, BM4 = 256, XT4 = BM4 * BK * 2, WT4 = BN * BK * 2, ST4 = XT4 + WT4;  // bytes: x, W tiles, stage

__device__ __forceinline__ void mbar_init(uint32_t a, int n) { asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(a), "r"(n) : "memory"); }
__device__ __forceinline__ void mbar_arrive(uint32_t a) { asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(a) : "memory"); }
__device__ __forceinline__ void mbar_wait(uint32_t a, int parity) {
    asm volatile("{\n.reg .pred p;\nWAIT:\nmbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n@!p bra WAIT;\n}\n" ::"r"(a), "r"(parity) : "memory");
}

// DEQ = false (v5): the same kernel on an already-dequantized bf16 W (wb), copied by cp.async beside x:
// the GEMM alone, to hold against cuBLAS before any epilogue fusion is built on it.
template <bool DEQ, typename OutT>
__global__ void __launch_bounds__(384, 1) nf4_gemm_kernel4(OutT* __restrict__ y, const bf16* __restrict__ x,
                                                          const uint8_t* __restrict__ packed, const float* __restrict__ absmax,
                                                          const bf16* __restrict__ wb, int M, int N, int K) {
    extern __shared__ unsigned char smem_raw[];
    __shared__ float lut[16];
    __shared__ __align__(8) uint64_t bars[2 * S4];  // full[S4], empty[S4]
    const uint32_t base = smem_base(smem_raw), full0 = smem_u32(&bars[0]), empty0 = smem_u32(&bars[S4]);
    const int tid = threadIdx.x, wg = tid / 128, l = tid % 128, m0 = blockIdx.y * BM4, n0 = blockIdx.x * BN, nk = K / BK;
    if (tid < 16) lut[tid] = __uint_as_float(c_nf4_lut[tid]);
    if (tid == 0)
        for (int s = 0; s < S4; s++) { mbar_init(full0 + 8 * s, 128); mbar_init(empty0 + 8 * s, 2); }
    __syncthreads();

    if (wg == 0) {  // producer
        asm volatile("setmaxnreg.dec.sync.aligned.u32 96;\n" ::: "memory");
        auto load_x = [&](int kt) {  // x tile kt: 2048 chunks of 16 bytes, 16 a thread (v5: W's 1024 too, 8 a thread)
            const int s = kt % S4, round = kt / S4;
            if (round > 0) mbar_wait(empty0 + 8 * s, (round - 1) & 1);
            const uint32_t dst = base + s * ST4;
#pragma unroll
            for (int i = 0; i < 16; i++) {
                const int c = l + 128 * i, r = c >> 3, cc = c & 7;
                cp_async16(dst + wg_swz<BM4>(r, cc * 8), x + (size_t)(m0 + r) * K + kt * BK + cc * 8);
            }
            if (!DEQ)
#pragma unroll
                for (int i = 0; i < 8; i++) {
                    const int c = l + 128 * i, r = c >> 3, cc = c & 7;
                    cp_async16(dst + XT4 + wg_swz<BN>(r, cc * 8), wb + (size_t)(n0 + r) * K + kt * BK + cc * 8);
                }
        };
        load_x(0);
        cp_async_commit();
        for (int kt = 0; kt < nk; kt++) {
            const int s = kt % S4;
            uint4 q0 = {}, q1 = {};
            float a = 0.f;
            if (DEQ) {
                const size_t e = (size_t)(n0 + l) * K + (size_t)kt * BK;  // row n0 + l of W, columns kt·64..
                q0 = *(const uint4*)(packed + e / 2); q1 = *(const uint4*)(packed + e / 2 + 16);
                a = absmax[e / 64];
            }
            if (kt + 1 < nk) load_x(kt + 1);  // waits for its stage to be empty first
            cp_async_commit();                // (empty at the end: the wait below stays uniform)
            if (DEQ) {
                const uint32_t w = base + s * ST4 + XT4, words[8] = {q0.x, q0.y, q0.z, q0.w, q1.x, q1.y, q1.z, q1.w};
#pragma unroll
                for (int c = 0; c < 8; c++) dequant8_store(w + wg_swz<BN>(l, c * 8), words[c], a, lut);
            }
            cp_async_wait_1();  // x tile kt landed (kt + 1 may be in flight)
            wg_fence_proxy();   // this thread's st.shared and cp.async writes, before wgmma reads them
            mbar_arrive(full0 + 8 * s);
        }
        return;
    }
    asm volatile("setmaxnreg.inc.sync.aligned.u32 200;\n" ::: "memory");
    float d[2][64];
#pragma unroll
    for (int h = 0; h < 2; h++)
#pragma unroll
        for (int i = 0; i < 64; i++) d[h][i] = 0.f;
    const int c = wg - 1;  // consumer index: rows 128 c.. of the tile
    for (int kt = 0; kt < nk; kt++) {
        const int s = kt % S4;
        mbar_wait(full0 + 8 * s, (kt / S4) & 1);
        const uint32_t xa = base + s * ST4 + c * 128 * 128, wb = base + s * ST4 + XT4;
        wg_fence();
#pragma unroll
        for (int h = 0; h < 2; h++)
#pragma unroll
            for (int kk = 0; kk < BK / 16; kk++)
                wg_mma_64x128_ss<0, 0>(d[h], wg_desc(xa + h * 64 * 128 + kk * 32, 16, 1024), wg_desc(wb + kk * 32, 16, 1024), 1);
        wg_commit();
        if (kt > 0) {
            wg_wait<1>();  // the group of kt - 1 is done with its stage
            if (l == 0) mbar_arrive(empty0 + 8 * ((kt - 1) % S4));
        }
    }
    wg_wait<0>();
    wg_fence_regs(d[0]); wg_fence_regs(d[1]);
    const int warp = l / 32, g = (l % 32) / 4, t = l % 4;
#pragma unroll
    for (int h = 0; h < 2; h++)
#pragma unroll
        for (int j = 0; j < 16; j++)
#pragma unroll
            for (int e = 0; e < 2; e++) {
                const int row = m0 + 128 * c + 64 * h + 16 * warp + g + 8 * e, col = n0 + 8 * j + 2 * t;
                store_out(y + (size_t)row * N + col, d[h][4 * j + 2 * e], d[h][4 * j + 2 * e + 1]);
            }
}

// shared memory of each version: its tiles plus the 1024-byte alignment
static const size_t SMEM[6] = {0, 4 * TILE + 1024, 5 * TILE + 1024, 5 * TILE + 1024, S4 * ST4 + 1024, S4 * ST4 + 1024};

// V = 1, 2, 4: y (M, N) = x (M, K) · Wᵀ; V = 3 (v2 with DX): y (M, K) = x (M, N) · W; V = 5: v4 on the bf16 W wb
template <int V, typename OutT>
static void nf4_gemm(OutT* y, const bf16* x, const uint8_t* packed, const float* absmax, const bf16* wb, int M, int N, int K) {
    const int C = V == 3 ? N : K, O = V == 3 ? K : N, bm = V >= 4 ? BM4 : BM;
    if (M % bm || O % BN || C % BK) { fprintf(stderr, "nf4_gemm v%d: M %d (of %d), the output width %d (of 128), the contraction %d (of 64)\n", V, M, bm, O, C); exit(1); }
    static bool attr = false;
    if constexpr (V >= 4) {
        auto kernel = nf4_gemm_kernel4<V == 4, OutT>;
        if (!attr) { cudaCheck(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)SMEM[V])); attr = true; }
        kernel<<<dim3(O / BN, M / bm), 384, SMEM[V]>>>(y, x, packed, absmax, wb, M, N, K);
    } else {
        auto kernel = V == 1 ? nf4_gemm_kernel1<OutT> : V == 2 ? nf4_gemm_kernel2<false, OutT> : nf4_gemm_kernel2<true, OutT>;
        if (!attr) { cudaCheck(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)SMEM[V])); attr = true; }
        kernel<<<dim3(O / BN, M / bm), 256, SMEM[V]>>>(y, x, packed, absmax, M, N, K);
    }
    cudaCheck(cudaGetLastError());
}

// cuBLAS on the dequantized bf16 W. Forward: y (M, N) = x (M, K) · Wᵀ, i.e. yᵀ = W · xᵀ column-major.
// Backward (dx): y (M, K) = x (M, N) · W, i.e. yᵀ = Wᵀ · xᵀ column-major.
static void cublas_gemm(cublasHandle_t h, bool dx, bf16* y, const bf16* x, const bf16* w, int M, int N, int K) {
    const float one = 1.f, zero = 0.f;
    cublasStatus_t st = dx ? cublasGemmEx(h, CUBLAS_OP_N, CUBLAS_OP_N, K, M, N, &one, w, CUDA_R_16BF, K, x, CUDA_R_16BF, N, &zero, y,
                                          CUDA_R_16BF, K, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT)
                           : cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, N, M, K, &one, w, CUDA_R_16BF, K, x, CUDA_R_16BF, K, &zero, y,
                                          CUDA_R_16BF, N, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
    if (st != CUBLAS_STATUS_SUCCESS) { fprintf(stderr, "cublasGemmEx failed (%d)\n", (int)st); exit(1); }
}
// version v of the fused kernel (3: the backward)
template <typename OutT>
static void fused(int v, OutT* y, const bf16* x, const uint8_t* packed, const float* absmax, const bf16* wb, int M, int N, int K) {
    if (v == 1) nf4_gemm<1>(y, x, packed, absmax, wb, M, N, K);
    else if (v == 2) nf4_gemm<2>(y, x, packed, absmax, wb, M, N, K);
    else if (v == 3) nf4_gemm<3>(y, x, packed, absmax, wb, M, N, K);
    else if (v == 4) nf4_gemm<4>(y, x, packed, absmax, wb, M, N, K);
    else nf4_gemm<5>(y, x, packed, absmax, wb, M, N, K);
}
static bool fits(int v, int M, int N, int K) {
    return v == 3 ? M % BM == 0 && K % BN == 0 && N % BK == 0 : M % (v >= 4 ? BM4 : BM) == 0 && N % BN == 0 && K % BK == 0;
}

// A random problem: x (M, K) and dy (M, N) uniform in [-1, 1) (bf16), W's codes random, absmax in [0.01, 0.03)
struct Problem {
    int M, N, K;
    std::vector<uint16_t> x, dy, wb;  // bf16 bits: x (M, K), dy (M, N), W dequantized (N, K)
    std::vector<uint8_t> packed;      // (N K / 2)
    std::vector<float> absmax;        // (N K / 64)
    bf16 *d_x, *d_dy, *d_w, *d_y;     // d_y: (M, max(N, K)), either direction's output
    uint8_t* d_packed;
    float *d_absmax, *d_yf;
};
static bf16* upload(const std::vector<uint16_t>& v) {
    bf16* d;
    cudaCheck(cudaMalloc(&d, 2 * v.size()));
    cudaCheck(cudaMemcpy(d, v.data(), 2 * v.size(), cudaMemcpyHostToDevice));
    return d;
}
static Problem make_problem(int M, int N, int K) {
    Problem p{M, N, K};
    const size_t nw = (size_t)N * K, ny = (size_t)M * std::max(N, K);
    p.x.resize((size_t)M * K); p.dy.resize((size_t)M * N); p.packed.resize(nw / 2); p.absmax.resize(nw / 64); p.wb.resize(nw);
    for (size_t i = 0; i < p.x.size(); i++) p.x[i] = f32_to_bf16(2 * rng_uniform(5, 1, i) - 1);
    for (size_t i = 0; i < p.dy.size(); i++) p.dy[i] = f32_to_bf16(2 * rng_uniform(5, 4, i) - 1);
    for (size_t i = 0; i < p.packed.size(); i++) p.packed[i] = (uint8_t)(rng_u32(5, 2, i) >> 24);
    for (size_t i = 0; i < p.absmax.size(); i++) p.absmax[i] = 0.01f + 0.02f * rng_uniform(5, 3, i);
    std::vector<float> w(nw);
    dequantize_4bit(w.data(), p.packed.data(), p.absmax.data(), (int64_t)nw, QT_NF4, 64);
    for (size_t i = 0; i < nw; i++) p.wb[i] = f32_to_bf16(w[i]);
    p.d_x = upload(p.x); p.d_dy = upload(p.dy);
    cudaCheck(cudaMalloc(&p.d_w, 2 * nw)); cudaCheck(cudaMalloc(&p.d_y, 2 * ny)); cudaCheck(cudaMalloc(&p.d_yf, 4 * ny));
    cudaCheck(cudaMalloc(&p.d_packed, p.packed.size())); cudaCheck(cudaMalloc(&p.d_absmax, 4 * p.absmax.size()));
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
    for (void* q : {(void*)p.d_x, (void*)p.d_dy, (void*)p.d_w, (void*)p.d_y, (void*)p.d_yf, (void*)p.d_packed, (void*)p.d_absmax})
        cudaCheck(cudaFree(q));
}

// Version v against fp64 (fp32 output) and cuBLAS (bf16 output, yc); returns whether it passed.
static bool check(int v, Problem& p, const std::vector<double>& ref, const std::vector<double>& mag, const std::vector<uint16_t>& yc) {
    const bool dx = v == 3;
    const int M = p.M, N = p.N, K = p.K, C = dx ? N : K;
    const bf16* in = dx ? p.d_dy : p.d_x;
    std::vector<float> yf(ref.size());
    std::vector<uint16_t> yb(ref.size());
    cudaCheck(cudaMemset(p.d_yf, 0xff, 4 * yf.size()));  // NaN: an output never written fails
    cudaCheck(cudaMemset(p.d_y, 0xff, 2 * yb.size()));
    fused(v, p.d_yf, in, p.d_packed, p.d_absmax, p.d_w, M, N, K);
    fused(v, p.d_y, in, p.d_packed, p.d_absmax, p.d_w, M, N, K);
    cudaCheck(cudaMemcpy(yf.data(), p.d_yf, 4 * yf.size(), cudaMemcpyDeviceToHost));
    cudaCheck(cudaMemcpy(yb.data(), p.d_y, 2 * yb.size(), cudaMemcpyDeviceToHost));
    double worst = 0, maxd = 0, worst_b = 0;
    size_t bad = 0, bad_b = 0;
    for (size_t o = 0; o < ref.size(); o++) {
        double diff = fabs(yf[o] - ref[o]), budget = C * 0x1p-24 * mag[o] + 1e-30;
        maxd = fmax(maxd, diff); worst = fmax(worst, diff / budget); bad += !(diff <= budget);
        double db = fabs((double)bf16_to_f32(yb[o]) - bf16_to_f32(yc[o])), bb = 0x1p-8 * fabs(ref[o]) + 2 * C * 0x1p-24 * mag[o] + 1e-30;
        worst_b = fmax(worst_b, db / bb); bad_b += !(db <= bb);
    }
    printf("v%d %s %dx%dx%d: fp32 out vs fp64: max |diff| %.3g, %.1f%% of budget, %zu outside | bf16 out vs cuBLAS: %.1f%% of budget, %zu outside: %s\n",
           v, dx ? "dx = dy·W " : "y = x·Wᵀ", M, N, K, maxd, 100 * worst, bad, 100 * worst_b, bad_b, bad + bad_b ? "FAIL" : "ok");
    return bad + bad_b == 0;
}

int main() {
    cublasHandle_t h;
    if (cublasCreate(&h) != CUBLAS_STATUS_SUCCESS) { fprintf(stderr, "cublasCreate failed\n"); return 1; }
    int fails = 0;
    // correctness: every version that fits the shape, fp32 and bf16 output; one k-tile cases too
    const int checks[][3] = {{256, 384, 1024}, {128, 128, 64}, {128, 64, 128}, {512, 256, 64}, {512, 256, 640}};
    for (auto& sh : checks) {
        Problem p = make_problem(sh[0], sh[1], sh[2]);
        const int M = p.M, N = p.N, K = p.K;
        for (bool dx : {false, true}) {
            if (!fits(dx ? 3 : 1, M, N, K)) continue;
            const int O = dx ? K : N, C = dx ? N : K;
            std::vector<double> ref((size_t)M * O), mag((size_t)M * O);  // Σ in fp64, Σ |terms|
            for (int i = 0; i < M; i++)
                for (int o = 0; o < O; o++) {
                    double s = 0, a = 0;
                    for (int c = 0; c < C; c++) {
                        double v = dx ? (double)bf16_to_f32(p.dy[(size_t)i * N + c]) * bf16_to_f32(p.wb[(size_t)c * K + o])
                                      : (double)bf16_to_f32(p.x[(size_t)i * K + c]) * bf16_to_f32(p.wb[(size_t)o * K + c]);
                        s += v; a += fabs(v);
                    }
                    ref[(size_t)i * O + o] = s; mag[(size_t)i * O + o] = a;
                }
            std::vector<uint16_t> yc(ref.size());
            cublas_gemm(h, dx, p.d_y, dx ? p.d_dy : p.d_x, p.d_w, M, N, K);
            cudaCheck(cudaMemcpy(yc.data(), p.d_y, 2 * yc.size(), cudaMemcpyDeviceToHost));
            for (int v : dx ? std::vector<int>{3} : std::vector<int>{1, 2, 4, 5})
                if (fits(v, M, N, K)) fails += !check(v, p, ref, mag, yc);
        }
        free_problem(p);
    }
    // time: W (N, K) of llama3-8b's and llama3-1b's linears, 4 x 2048 tokens; forward y = x·Wᵀ, backward dx = dy·W
    printf("%-24s %10s %10s %10s %10s %10s %10s   TFLOP/s: cuBLAS, dequant+cuBLAS, fused\n", "W (N x K), M 8192", "cuBLAS us", "deq+cuBLAS", "fused us", "(v2/v3)", "v4 us", "v5 bf16 us");
    const int shapes[][3] = {{8192, 4096, 4096}, {8192, 14336, 4096}, {8192, 4096, 14336}, {8192, 2048, 2048}, {8192, 8192, 2048}, {8192, 2048, 8192}};
    for (auto& sh : shapes) {
        Problem p = make_problem(sh[0], sh[1], sh[2]);
        const int M = p.M, N = p.N, K = p.K;
        const double fl = 2.0 * M * N * K / 1e9;
        for (bool dx : {false, true}) {
            const bf16* in = dx ? p.d_dy : p.d_x;
            float t0 = median_ms([&] { cublas_gemm(h, dx, p.d_y, in, p.d_w, M, N, K); });
            float t1 = median_ms([&] { dequantize_4bit_gpu(p.d_w, p.d_packed, p.d_absmax, (int64_t)N * K, QT_NF4, 64, 0); cublas_gemm(h, dx, p.d_y, in, p.d_w, M, N, K); });
            float ta = median_ms([&] { fused(dx ? 3 : 1, p.d_y, in, p.d_packed, p.d_absmax, p.d_w, M, N, K); });
            float tb = dx ? ta : median_ms([&] { fused(2, p.d_y, in, p.d_packed, p.d_absmax, p.d_w, M, N, K); });
            float t4 = dx ? 0.f : median_ms([&] { fused(4, p.d_y, in, p.d_packed, p.d_absmax, p.d_w, M, N, K); });
            float t5 = dx ? 0.f : median_ms([&] { fused(5, p.d_y, in, p.d_packed, p.d_absmax, p.d_w, M, N, K); });
            char name[48];
            snprintf(name, sizeof name, "%s %d x %d", dx ? "dx" : "y ", N, K);
            printf("%-24s %10.1f %10.1f %10.1f %10.1f %10.1f %10.1f   %.0f, %.0f, %s %.0f, %.0f, v4 %.0f, v5 %.0f\n", name, 1e3 * t0, 1e3 * t1,
                   1e3 * ta, 1e3 * tb, 1e3 * t4, 1e3 * t5, fl / t0, fl / t1, dx ? "v3" : "v1", fl / ta, fl / tb, dx ? 0.0 : fl / t4,
                   dx ? 0.0 : fl / t5);
        }
        free_problem(p);
    }
    printf("%d failed\n", fails);
    return fails ? 1 : 0;
}
