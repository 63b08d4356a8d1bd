// dev/cuda/rmsnorm.cu: playground for RMSNorm forward, forward fused with the residual add, and
// backward (kernels/rmsnorm.cuh), at N = 8192 rows (llama3-8b's 4 x 2048 tokens) of the model widths
// we run, C in {2048, 3072, 4096, 5120, 8192}, and Qwen's per-head QK norm (C = head_dim = 128 on
// N = 8192 x 32 heads rows; head_dim 64 on N = 8192 x 64).
//
//   nvcc -std=c++17 -O3 -lineinfo -gencode arch=compute_90a,code=sm_90a -Xptxas -v -I. dev/cuda/rmsnorm.cu -o build/gpu/pg_rmsnorm
//   ./build/gpu/pg_rmsnorm
//
// v1  kernels/rmsnorm.cuh's kernel1 (production): one warp a row, a loop over the row per pass; the
//     second pass re-reads the row from L1/L2.
// v2  kernel2, here until it has run on a GPU: the lane's slice of the row kept on chip between the
//     passes. The header's notes for it, to move there with it:
//   Both are bandwidth-bound (a few flops a byte): the aim is to move each byte once. Per row of C
//   bf16: forward 4C bytes (x in, y out), fused 8C (h, delta in; h_out, y out), backward 6C (dy, x in;
//   dx out), 8C when accumulating (dx in too); w (2C, from L1/L2) and rstd (4 B) are noise. At
//   llama3-8b's N = 8192, C = 4096: 134 / 268 / 201 / 268 MB, 45 / 90 / 67 / 90 us at 3 TB/s.
//
//   Both passes over a row (the reduction, then the elementwise part) need all of it. kernel1 reads
//   it twice, the second time from L1/L2 (17 ms a llama3-8b step against ~11 ms at one read).
//   v2 (C <= 8192) keeps each lane's slice of the row on chip between the passes: VPL 16-byte
//   vectors a lane, VPL = ceil(C / 256) a template parameter so the slice is an unrolled register
//   array (C = 4096: VPL = 16, 64 registers an input), held as raw bits (4 registers a vector, not
//   the 8 of an x128). Every load of a row is issued before its first store, most before the first
//   use. What does not fit in registers goes to shared memory by cp.async: the backward keeps dy and x,
//   128 registers at VPL 16 but 256 at VPL 32 (4096 < C <= 8192), so there x goes to shared memory
//   (512 B a lane), and so does the fused forward's delta; accumulating, the old dx goes there at every
//   VPL, since read in the second pass it would cost a DRAM latency per vector. Blocks use at most
//   32 KB, and 168 registers (12 warps an SM). Rows of C <= 128 (Qwen's per-head QK norm, C =
//   head_dim) take LPR = 8 or 16 lanes each, so a warp does 4 or 2 rows and no lane idles. kernel1,
//   a loop over the row per pass, serves C > 8192.
//
//   Bits: kernel2 computes what kernel1 computes, bit for bit. A row's lane l owns vectors l, l + LPR, .., as kernel1's lane l
//   does; each lane sums its terms in ascending c, then the same butterfly. kernel2 also sums zeros
//   (vectors past the row's end, read as zeros so the passes need no branches) and skips kernel1's
//   butterfly steps o >= LPR (which add the +0 of lanes past the row's end): adding +0 changes nothing,
//   because ss and dot start at +0 and a round-to-nearest sum is -0 only if both addends are. The fp32
//   arithmetic is spelled out in the rms_* helpers, with __fmaf_rn / __fmul_rn / __fadd_rn where
//   nvcc 13 -O3 fused (or did not fuse) kernel1's expressions (read off its sm_90a SASS), so what the
//   kernel keeps in registers cannot change which products get fused. (When it graduates, kernel1
//   should be written with the same helpers, so the two cannot drift apart under another compiler.)
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
// Measured: not yet run on a GPU.
#include <cstdio>                        // defines: printf
#include <cstring>                       // defines: memcmp
#include <vector>                        // defines: std::vector
#include <type_traits>                   // defines: std::integral_constant
#include "../../kernels/rmsnorm.cuh"     // defines: rmsnorm_forward, rmsnorm_residual_forward, rmsnorm_backward (v1), bf16, load128
#include "timing.h"                      // defines: median_ms

// ---------------------------------------------------------------------------------------------
// v2 (kernel2): the arithmetic, per element, on the fp32 values of bf16 inputs (one rounding per intrinsic)

__device__ __forceinline__ float rms_sumsq(float ss, float x) { return __fmaf_rn(x, x, ss); }               // ss + x²
__device__ __forceinline__ bf16 rms_residual(float h, float d) { return f2bf(__fadd_rn(h, d)); }           // bf16(h + delta)
__device__ __forceinline__ bf16 rms_y(float x, float w, float r) { return f2bf(__fmul_rn(w, bf16r(__fmul_rn(x, r)))); }  // bf16(w bf16(x r))
__device__ __forceinline__ float rms_dot(float dot, float g, float w, float x, float r) {                 // dot + (g w)(x r)
    return __fmaf_rn(__fmul_rn(g, w), __fmul_rn(x, r), dot);
}
// dx[k] of a vector: r * (g w - x̂ m), the difference fused as fma(g, w, -(x̂ m)). Accumulating,
// kernel1's SASS fuses the add of the old dx into fma(r, diff, old) for elements 1..7 but rounds
// r * diff first for element 0 (there the product is shared with the non-accumulating path): kept,
// so the bits stay kernel1's.
__device__ __forceinline__ bf16 rms_dx(float g, float w, float x, float r, float m, bool accumulate, float old, int k) {
    float diff = __fmaf_rn(g, w, -__fmul_rn(__fmul_rn(x, r), m));
    if (!accumulate) return f2bf(__fmul_rn(r, diff));
    return f2bf(k == 0 ? __fadd_rn(__fmul_rn(r, diff), old) : __fmaf_rn(r, diff, old));
}

// ---------------------------------------------------------------------------------------------
// kernel2: the row kept on chip between the passes. LPR lanes a row (8, 16 or 32: 32 / LPR rows a
// warp), VPL vectors a lane: lane l of a row owns its vectors l + i LPR, i < VPL. Slices are kept as
// raw int4 bits, 4 registers a vector (an x128 array kept across a loop takes one register per bf16),
// and widened to fp32 on use. Inputs that do not fit in registers go to shared memory by cp.async
// (no registers in between): the backward's x at VPL 32, the fused forward's delta at VPL 32, and the
// old dx when accumulating (read in the second pass, one vector at a time, it would wait a DRAM
// latency per vector). Vectors past the row's end (C < 256 VPL) and rows past N read as zeros, so
// the passes run without branches: a zero adds +0 to ss and dot, which changes nothing (see the top
// of the file); their stores are skipped.

// threads a block, from the shared memory a thread uses: 32 KB a block at most (6 blocks an SM)
__host__ __device__ constexpr int rms_threads(int smem_per_thread) { return smem_per_thread > 256 ? 32768 / smem_per_thread : 128; }
template <bool RESIDUAL, int VPL> __host__ __device__ constexpr int rms_fwd_smem() { return RESIDUAL && VPL > 16 ? 16 * VPL : 0; }
template <bool ACC, int VPL> __host__ __device__ constexpr int rms_bwd_smem() { return 16 * VPL * ((VPL > 16) + ACC); }
// __launch_bounds__: 12 warps an SM, so at most 168 registers (65536 / 384, rounded down to 8)
#define RMS_BOUNDS(threads) __launch_bounds__((threads), 384 / (threads))

// element k of a vector held as raw bits, in fp32 (bf2f: the bits shifted up)
__device__ __forceinline__ float rms_elt(const int4& v, int k) {
    int j = k >> 1;
    uint32_t u = (uint32_t)(j == 0 ? v.x : j == 1 ? v.y : j == 2 ? v.z : v.w);
    return __uint_as_float(k & 1 ? u & 0xffff0000u : u << 16);
}
// An empty asm that the compiler must assume changes v: it keeps the 4 packed words for the second
// pass instead of the 8 fp32 values it unpacked them into for the first (twice the registers).
__device__ __forceinline__ void rms_keep(int4& v) { asm("" : "+r"(v.x), "+r"(v.y), "+r"(v.z), "+r"(v.w)); }
__device__ __forceinline__ int4 rms_load(const bf16* p, bool in) { return in ? load128(p).bits() : make_int4(0, 0, 0, 0); }
__device__ __forceinline__ int4 rms_load_nc(const bf16* p, bool in) { return in ? load128_nc(p).bits() : make_int4(0, 0, 0, 0); }
// 16 bytes global -> shared without passing through registers; zeros when !in
__device__ __forceinline__ void rms_cp_async16(int4* dst, const bf16* src, bool in) {
    if (in) asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" :: "r"((uint32_t)__cvta_generic_to_shared(dst)), "l"(src));
    else *dst = make_int4(0, 0, 0, 0);
}
__device__ __forceinline__ void rms_cp_async_wait_all() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }
// Sum over the LPR lanes of a row: kernel1's warp_reduce_sum without its steps o >= LPR, which add
// the +0 of lanes past the row's end.
template <int LPR> __device__ __forceinline__ float rms_row_sum(float v) {
    for (int o = LPR / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

template <bool RESIDUAL, int VPL, int LPR>
__global__ void RMS_BOUNDS(rms_threads(rms_fwd_smem<RESIDUAL, VPL>()))
rmsnorm_forward_kernel2(bf16* y,                      // (N, C) bf16 out
                        float* rstd,                  // (N) fp32 out
                        bf16* h_out,                  // (N, C) bf16 out: h + delta (RESIDUAL; may alias h)
                        const bf16* h,                // (N, C) bf16 (the norm's input when !RESIDUAL)
                        const bf16* delta,            // (N, C) bf16 (RESIDUAL)
                        const bf16* __restrict__ w,   // (C) bf16
                        int N, int C, float eps) {
    constexpr bool DS = rms_fwd_smem<RESIDUAL, VPL>() > 0;   // delta through shared memory
    constexpr int THREADS = rms_threads(rms_fwd_smem<RESIDUAL, VPL>()), STEP = LPR * 8;   // STEP: one vector of a lane to the next
    __shared__ int4 ds[DS ? VPL : 1][THREADS];   // [i][thread]: conflict-free 16-byte accesses
    int lane = threadIdx.x % LPR, row = (blockIdx.x * THREADS + threadIdx.x) / LPR;
    bool live = row < N;   // a lane past the last row still takes part in the shuffles
    int nvl = live ? (C / 8 - lane + LPR - 1) / LPR : 0;   // the lane's vectors in the row, <= VPL
    size_t at = (live ? (size_t)row * C : 0) + lane * 8;   // the lane's first element
    int4 v[VPL], d[RESIDUAL && !DS ? VPL : 1];   // the lane's slice of the row: h, then h + delta
    // every load before the first store: h_out may alias h, so a store would pin later loads behind it
#pragma unroll
    for (int i = 0; i < VPL; i++) {
        v[i] = rms_load(h + at + i * STEP, i < nvl);
        if (DS) rms_cp_async16(&ds[i][threadIdx.x], delta + at + i * STEP, i < nvl);
        else if (RESIDUAL) d[i] = rms_load(delta + at + i * STEP, i < nvl);
    }
    if (DS) rms_cp_async_wait_all();   // each thread reads back only what it copied: no barrier
    float ss = 0.0f;
#pragma unroll
    for (int i = 0; i < VPL; i++) {
        if (RESIDUAL) {
            int4 dv = DS ? ds[i][threadIdx.x] : d[DS ? 0 : i];
            x128 o;
#pragma unroll
            for (int k = 0; k < 8; k++) o[k] = rms_residual(rms_elt(v[i], k), rms_elt(dv, k));
            if (i < nvl) store128(h_out + at + i * STEP, o);
            v[i] = o.bits();
            rms_keep(v[i]);
        }
#pragma unroll
        for (int k = 0; k < 8; k++) ss = rms_sumsq(ss, rms_elt(v[i], k));
    }
    ss = rms_row_sum<LPR>(ss);
    float r = 1.0f / sqrtf(ss / (float)C + eps);
    if (!live) return;
    if (lane == 0) rstd[row] = r;
#pragma unroll
    for (int i = 0; i < VPL; i++) {
        int4 wv = rms_load_nc(w + lane * 8 + i * STEP, i < nvl);
        x128 o;
#pragma unroll
        for (int k = 0; k < 8; k++) o[k] = rms_y(rms_elt(v[i], k), rms_elt(wv, k), r);
        if (i < nvl) store128(y + at + i * STEP, o);
    }
}

template <bool ACC, int VPL, int LPR>
__global__ void RMS_BOUNDS(rms_threads(rms_bwd_smem<ACC, VPL>()))
rmsnorm_backward_kernel2(bf16* dx,                        // (N, C) bf16 out (or += when ACC)
                         const bf16* dy,                  // (N, C) bf16 (may alias dx)
                         const bf16* __restrict__ x,      // (N, C) bf16, the forward's input
                         const bf16* __restrict__ w,      // (C) bf16
                         const float* __restrict__ rstd,  // (N) fp32
                         int N, int C) {
    constexpr bool XS = VPL > 16;   // x through shared memory
    constexpr int THREADS = rms_threads(rms_bwd_smem<ACC, VPL>()), STEP = LPR * 8;
    __shared__ int4 xs[XS ? VPL : 1][THREADS], olds[ACC ? VPL : 1][THREADS];   // olds: dx before (ACC)
    int lane = threadIdx.x % LPR, row = (blockIdx.x * THREADS + threadIdx.x) / LPR;
    bool live = row < N;
    int nvl = live ? (C / 8 - lane + LPR - 1) / LPR : 0;
    size_t at = (live ? (size_t)row * C : 0) + lane * 8;
    int4 g[VPL], xr[XS ? 1 : VPL];   // the lane's slices of dy and x
    // every load before the first store (dx may alias dy)
#pragma unroll
    for (int i = 0; i < VPL; i++) {
        if (XS) rms_cp_async16(&xs[i][threadIdx.x], x + at + i * STEP, i < nvl);
        else xr[i] = rms_load(x + at + i * STEP, i < nvl);
        if (ACC) rms_cp_async16(&olds[i][threadIdx.x], dx + at + i * STEP, i < nvl);
        g[i] = rms_load(dy + at + i * STEP, i < nvl);
    }
    if (XS) rms_cp_async_wait_all();   // each thread reads back only what it copied: no barrier
    float r = live ? rstd[row] : 0.0f, dot = 0.0f;
#pragma unroll
    for (int i = 0; i < VPL; i++) {
        int4 wv = rms_load_nc(w + lane * 8 + i * STEP, i < nvl), xv = XS ? xs[i][threadIdx.x] : xr[XS ? 0 : i];
#pragma unroll
        for (int k = 0; k < 8; k++) dot = rms_dot(dot, rms_elt(g[i], k), rms_elt(wv, k), rms_elt(xv, k), r);
    }
    float m = rms_row_sum<LPR>(dot) / (float)C;
    if (!live) return;
    if (ACC) rms_cp_async_wait_all();
#pragma unroll
    for (int i = 0; i < VPL; i++) {
        int4 wv = rms_load_nc(w + lane * 8 + i * STEP, i < nvl), xv = XS ? xs[i][threadIdx.x] : xr[XS ? 0 : i];
        int4 old = ACC ? olds[i][threadIdx.x] : make_int4(0, 0, 0, 0);
        x128 o;
#pragma unroll
        for (int k = 0; k < 8; k++) o[k] = rms_dx(rms_elt(g[i], k), rms_elt(wv, k), rms_elt(xv, k), r, m, ACC, rms_elt(old, k), k);
        if (i < nvl) store128(dx + at + i * STEP, o);
    }
}

template <int V> using RmsInt = std::integral_constant<int, V>;
// kernel2's instance for rows of C: the fewest lanes (LPR) and vectors a lane (VPL) that cover C / 8
// vectors; launch(RmsInt<VPL>, RmsInt<LPR>). false: C > 8192, kernel1's.
template <class F> inline bool rmsnorm_switch(int C, F&& launch) {
    int nv = C / 8;
    if (nv <= 8) launch(RmsInt<1>(), RmsInt<8>());
    else if (nv <= 16) launch(RmsInt<1>(), RmsInt<16>());
    else if (nv <= 32) launch(RmsInt<1>(), RmsInt<32>());
    else if (nv <= 64) launch(RmsInt<2>(), RmsInt<32>());
    else if (nv <= 128) launch(RmsInt<4>(), RmsInt<32>());
    else if (nv <= 256) launch(RmsInt<8>(), RmsInt<32>());
    else if (nv <= 512) launch(RmsInt<16>(), RmsInt<32>());
    else if (nv <= 1024) launch(RmsInt<32>(), RmsInt<32>());
    else return false;
    return true;
}

// kernel2's launchers (C <= 8192; the header's kernel1 serves wider rows)
template <bool RESIDUAL>
static void rmsnorm2_forward(bf16* y, float* rstd, bf16* h_out, const bf16* h, const bf16* delta, const bf16* w, int N, int C, float eps) {
    bool two = rmsnorm_switch(C, [&](auto vpl, auto lpr) {
        constexpr int VPL = decltype(vpl)::value, LPR = decltype(lpr)::value;
        constexpr int THREADS = rms_threads(rms_fwd_smem<RESIDUAL, VPL>());
        rmsnorm_forward_kernel2<RESIDUAL, VPL, LPR><<<ceil_div(N, THREADS / LPR), THREADS>>>(y, rstd, h_out, h, delta, w, N, C, eps);
    });
    kernel_assert(two, "rmsnorm2: C=%d > 8192", C);
    cudaCheck(cudaGetLastError());
}
static void rmsnorm2_backward(bf16* dx, const bf16* dy, const bf16* x, const bf16* w, const float* rstd, int N, int C, bool accumulate) {
    bool two = rmsnorm_switch(C, [&](auto vpl, auto lpr) {
        constexpr int VPL = decltype(vpl)::value, LPR = decltype(lpr)::value;
        constexpr int TA = rms_threads(rms_bwd_smem<true, VPL>()), TN = rms_threads(rms_bwd_smem<false, VPL>());
        if (accumulate) rmsnorm_backward_kernel2<true, VPL, LPR><<<ceil_div(N, TA / LPR), TA>>>(dx, dy, x, w, rstd, N, C);
        else rmsnorm_backward_kernel2<false, VPL, LPR><<<ceil_div(N, TN / LPR), TN>>>(dx, dy, x, w, rstd, N, C);
    });
    kernel_assert(two, "rmsnorm2: C=%d > 8192", C);
    cudaCheck(cudaGetLastError());
}

// ---------------------------------------------------------------------------------------------
// the versions, by launcher (v1: the header's kernel1 as the trainer launches it; v2: kernel2 above)

enum Version { V1, V2 };
static const char* vname(Version v) { return v == V1 ? "v1" : "v2"; }

static void fwd(Version v, bf16* y, float* r, const bf16* x, const bf16* w, int N, int C) {
    if (v == V2) return rmsnorm2_forward<false>(y, r, nullptr, x, nullptr, w, N, C, 1e-5f);
    rmsnorm_forward(y, r, x, w, N, C, 1e-5f, 0);
}
static void fused(Version v, bf16* h_out, bf16* y, float* r, const bf16* h, const bf16* d, const bf16* w, int N, int C) {
    if (v == V2) return rmsnorm2_forward<true>(y, r, h_out, h, d, w, N, C, 1e-5f);
    rmsnorm_residual_forward(h_out, y, r, h, d, w, N, C, 1e-5f, 0);
}
static void bwd(Version v, bf16* dx, const bf16* dy, const bf16* x, const bf16* w, const float* r, int N, int C, bool acc) {
    if (v == V2) return rmsnorm2_backward(dx, dy, x, w, r, N, C, acc);
    rmsnorm_backward(dx, dy, x, w, r, N, C, acc, 0);
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
    int nv = C / 8, lpr = nv <= 8 ? 8 : nv <= 16 ? 16 : 32, vpl = ceil_div(nv, lpr);
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
