// kernels/rmsnorm.cuh: LlamaRMSNorm forward (optionally fused with the residual add) and backward.
//
// Forward, as transformers computes it for a bf16 model (formats.md §3.2 item 2):
//   xf = x.float(); r = rsqrt(mean(xf²) + eps); y = w * (xf * r).to(bf16)    (bf16 * bf16 -> rounded)
// so y = bf16( w * bf16(x * r) ), and r (N) fp32 is saved for the backward. The fused variant first
// forms the residual stream h = bf16(h + delta) (the decoder layer's `residual + hidden_states`),
// writes it, and normalises it: one read of h and delta instead of two kernels' worth of traffic.
//
// Backward (the norm weight is frozen, so no dw): with g = dy * w and x̂ = x * r,
//   dx = r * (g - x̂ * mean(g * x̂))
// treating the bf16 rounding of x̂ as identity (as autograd does). accumulate adds into dx, which is
// how the residual stream's gradient picks up the norm branch.
//
// Both are bandwidth-bound (a few flops a byte): the aim is to move each byte once. Per row of C
// bf16: forward 4C bytes (x in, y out), fused 8C (h, delta in; h_out, y out), backward 6C (dy, x in;
// dx out), 8C when accumulating (dx in too); w (2C, from L1/L2) and rstd (4 B) are noise. At
// llama3-8b's N = 8192, C = 4096: 134 / 268 / 201 / 268 MB, 45 / 90 / 67 / 90 us at 3 TB/s.
//
// Both passes over a row (the reduction, then the elementwise part) need all of it. kernel1 (one warp
// a row, 16-byte vectors, a loop over the row per pass) reads it twice, the second time from L1/L2
// (17 ms a llama3-8b step against ~11 ms at one read). kernel2 (C <= 8192) keeps each lane's slice of
// the row on chip between the passes: VPL 16-byte vectors a lane, VPL = ceil(C / 256) a template
// parameter so the slice is an unrolled register array (C = 4096: VPL = 16, 64 registers an input),
// held as raw bits (4 registers a vector, not the 8 of an x128). Every load of a row is issued before
// its first store, most before the first use. What does not fit in registers goes to shared memory by
// cp.async: the backward keeps dy and x, 128 registers at VPL 16 but 256 at VPL 32 (4096 < C <= 8192),
// so there x goes to shared memory (512 B a lane), and so does the fused forward's delta; accumulating,
// the old dx goes there at every VPL, since read in the second pass it would cost a DRAM latency per
// vector. Blocks use at most 32 KB, and 168 registers (12 warps an SM). Rows of C <= 128 (Qwen's
// per-head QK norm, C = head_dim) take LPR = 8 or 16 lanes each, so a warp does 4 or 2 rows and no
// lane idles. kernel1 serves C > 8192. dev/cuda/rmsnorm.cu times the two (predicted at N = 8192,
// C = 4096, H100: kernel2 17-38% faster, 76-93% of the copy rate) and checks their bits.
//
// Bits: kernel2 computes what kernel1 computes, bit for bit. A row's lane l owns vectors l, l + LPR, ..,
// as kernel1's lane l does; each lane sums its terms in ascending c, then the same butterfly. kernel2
// also sums zeros (vectors past the row's end, read as zeros so the passes need no branches) and skips
// kernel1's butterfly steps o >= LPR (which add the +0 of lanes past the row's end): adding +0 changes
// nothing, because ss and dot start at +0 and a round-to-nearest sum is -0 only if both addends are.
// The fp32 arithmetic of both kernels is spelled out in the rms_* helpers below, with __fmaf_rn /
// __fmul_rn / __fadd_rn where nvcc 13 -O3 fused (or did not fuse) kernel1's plain expressions before
// kernel2 came, read off its sm_90a SASS. Rewritten with them, kernel1's SASS is the same: the forward
// instruction for instruction, the backward the same FFMA/FMUL/FADD dataflow, rescheduled. So neither
// what kernel2 keeps in registers nor another compiler can change which products get fused.
#pragma once
#include <type_traits>  // defines: std::integral_constant
#include "common.cuh"   // defines: bf16, x128, load128, store128, warp_reduce_sum, cudaCheck, kernel_assert

// ---------------------------------------------------------------------------------------------
// the arithmetic, per element, on the fp32 values of bf16 inputs (one rounding per intrinsic)

__device__ __forceinline__ float rms_sumsq(float ss, float x) { return __fmaf_rn(x, x, ss); }               // ss + x²
__device__ __forceinline__ float rms_rstd(float ss, int C, float eps) { return 1.0f / sqrtf(ss / (float)C + eps); }  // IEEE div, sqrt: nothing to fuse
__device__ __forceinline__ bf16 rms_residual(float h, float d) { return f2bf(__fadd_rn(h, d)); }           // bf16(h + delta)
__device__ __forceinline__ bf16 rms_y(float x, float w, float r) { return f2bf(__fmul_rn(w, bf16r(__fmul_rn(x, r)))); }  // bf16(w bf16(x r))
__device__ __forceinline__ float rms_dot(float dot, float g, float w, float x, float r) {                 // dot + (g w)(x r)
    return __fmaf_rn(__fmul_rn(g, w), __fmul_rn(x, r), dot);
}
// dx[k] of a vector: r * (g w - x̂ m), the difference fused as fma(g, w, -(x̂ m)). Accumulating,
// kernel1's SASS fused the add of the old dx into fma(r, diff, old) for elements 1..7 but rounded
// r * diff first for element 0 (there the product is shared with the non-accumulating path): kept,
// so the bits stay what they were.
__device__ __forceinline__ bf16 rms_dx(float g, float w, float x, float r, float m, bool accumulate, float old, int k) {
    float diff = __fmaf_rn(g, w, -__fmul_rn(__fmul_rn(x, r), m));
    if (!accumulate) return f2bf(__fmul_rn(r, diff));
    return f2bf(k == 0 ? __fadd_rn(__fmul_rn(r, diff), old) : __fmaf_rn(r, diff, old));
}

// ---------------------------------------------------------------------------------------------
// kernel1: one warp a row, any C; a loop over the row per pass, the second re-reading it from L1/L2

template <bool RESIDUAL>
__global__ void rmsnorm_forward_kernel1(bf16* y,              // (N, C) bf16 out
                                        float* rstd,          // (N) fp32 out
                                        bf16* h_out,          // (N, C) bf16 out: h + delta (RESIDUAL; may alias h)
                                        const bf16* h,        // (N, C) bf16 (the norm's input when !RESIDUAL)
                                        const bf16* delta,    // (N, C) bf16 (RESIDUAL)
                                        const bf16* __restrict__ w,   // (C) bf16
                                        int N, int C, float eps) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x & 31;
    if (row >= N) return;
    size_t off = (size_t)row * C;
    const bf16* x = RESIDUAL ? h_out + off : h + off;   // what is normalised
    float ss = 0.0f;
    for (int c = lane * 8; c < C; c += 32 * 8) {
        x128 v = load128(h + off + c);
        if (RESIDUAL) {
            x128 d = load128(delta + off + c);
            for (int k = 0; k < 8; k++) v[k] = rms_residual(bf2f(v[k]), bf2f(d[k]));
            store128(h_out + off + c, v);                 // same lane re-reads it below
        }
        for (int k = 0; k < 8; k++) ss = rms_sumsq(ss, bf2f(v[k]));
    }
    ss = warp_reduce_sum(ss);
    float r = rms_rstd(ss, C, eps);
    if (lane == 0) rstd[row] = r;
    for (int c = lane * 8; c < C; c += 32 * 8) {
        x128 v = load128(x + c), wv = load128_nc(w + c), o;
        for (int k = 0; k < 8; k++) o[k] = rms_y(bf2f(v[k]), bf2f(wv[k]), r);
        store128(y + off + c, o);
    }
}

__global__ void rmsnorm_backward_kernel1(bf16* dx,                        // (N, C) bf16 out (or += when accumulate)
                                         const bf16* dy,                  // (N, C) bf16 (may alias dx)
                                         const bf16* __restrict__ x,      // (N, C) bf16, the forward's input
                                         const bf16* __restrict__ w,      // (C) bf16
                                         const float* __restrict__ rstd,  // (N) fp32
                                         int N, int C, bool accumulate) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x & 31;
    if (row >= N) return;
    size_t off = (size_t)row * C;
    float r = rstd[row], dot = 0.0f;
    for (int c = lane * 8; c < C; c += 32 * 8) {
        x128 g = load128(dy + off + c), xv = load128(x + off + c), wv = load128_nc(w + c);
        for (int k = 0; k < 8; k++) dot = rms_dot(dot, bf2f(g[k]), bf2f(wv[k]), bf2f(xv[k]), r);
    }
    float m = warp_reduce_sum(dot) / (float)C;
    for (int c = lane * 8; c < C; c += 32 * 8) {
        x128 g = load128(dy + off + c), xv = load128(x + off + c), wv = load128_nc(w + c), o;
        x128 old = accumulate ? load128(dx + off + c) : x128();
        for (int k = 0; k < 8; k++) o[k] = rms_dx(bf2f(g[k]), bf2f(wv[k]), bf2f(xv[k]), r, m, accumulate, bf2f(old[k]), k);
        store128(dx + off + c, o);
    }
}

// ---------------------------------------------------------------------------------------------
// kernel2 (C <= 8192): the row kept on chip between the passes. LPR lanes a row (8, 16 or 32: 32 / LPR
// rows a warp), VPL vectors a lane: lane l of a row owns its vectors l + i LPR, i < VPL. Slices are
// kept as raw int4 bits, 4 registers a vector (an x128 array kept across a loop takes one register per
// bf16), and widened to fp32 on use. Inputs that do not fit in registers go to shared memory by
// cp.async (no registers in between): the backward's x at VPL 32, the fused forward's delta at VPL 32,
// and the old dx when accumulating (read in the second pass, one vector at a time, it would wait a
// DRAM latency per vector). Vectors past the row's end (C < 256 VPL) and rows past N read as zeros, so
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
    float r = rms_rstd(ss, C, eps);
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

// ---------------------------------------------------------------------------------------------
// launchers

static const int RMSNORM2_MAX_C = 8192;   // kernel2's widest row: 32 vectors a lane, 32 lanes
template <int V> using RmsInt = std::integral_constant<int, V>;
// kernel2's instance for rows of C <= RMSNORM2_MAX_C: the fewest lanes (LPR) and vectors a lane (VPL)
// that cover C / 8 vectors; calls launch(RmsInt<VPL>(), RmsInt<LPR>()).
template <class F> inline void rmsnorm_switch(int C, F&& launch) {
    int nv = C / 8;
    if (nv <= 8) launch(RmsInt<1>(), RmsInt<8>());
    else if (nv <= 16) launch(RmsInt<1>(), RmsInt<16>());
    else if (nv <= 32) launch(RmsInt<1>(), RmsInt<32>());
    else if (nv <= 64) launch(RmsInt<2>(), RmsInt<32>());
    else if (nv <= 128) launch(RmsInt<4>(), RmsInt<32>());
    else if (nv <= 256) launch(RmsInt<8>(), RmsInt<32>());
    else if (nv <= 512) launch(RmsInt<16>(), RmsInt<32>());
    else if (nv <= 1024) launch(RmsInt<32>(), RmsInt<32>());
    else kernel_assert(false, "rmsnorm kernel2: C=%d > %d (kernel1's)", C, RMSNORM2_MAX_C);
}

// One launcher a kernel (the playground and test_kernels call them directly), then the trainer's,
// which check their arguments and pick kernel2 for C <= RMSNORM2_MAX_C, kernel1 past it.
template <bool RESIDUAL>
inline void rmsnorm_forward1_launch(bf16* y, float* rstd, bf16* h_out, const bf16* h, const bf16* delta, const bf16* w,
                                    int N, int C, float eps, cudaStream_t stream) {
    rmsnorm_forward_kernel1<RESIDUAL><<<ceil_div(N, 8), 256, 0, stream>>>(y, rstd, h_out, h, delta, w, N, C, eps);
    cudaCheck(cudaGetLastError());
}
template <bool RESIDUAL>
inline void rmsnorm_forward2_launch(bf16* y, float* rstd, bf16* h_out, const bf16* h, const bf16* delta, const bf16* w,
                                    int N, int C, float eps, cudaStream_t stream) {
    rmsnorm_switch(C, [&](auto vpl, auto lpr) {
        constexpr int VPL = decltype(vpl)::value, LPR = decltype(lpr)::value;
        constexpr int THREADS = rms_threads(rms_fwd_smem<RESIDUAL, VPL>());
        rmsnorm_forward_kernel2<RESIDUAL, VPL, LPR><<<ceil_div(N, THREADS / LPR), THREADS, 0, stream>>>(y, rstd, h_out, h, delta, w, N, C, eps);
    });
    cudaCheck(cudaGetLastError());
}
inline void rmsnorm_backward1_launch(bf16* dx, const bf16* dy, const bf16* x, const bf16* w, const float* rstd, int N, int C,
                                     bool accumulate, cudaStream_t stream) {
    rmsnorm_backward_kernel1<<<ceil_div(N, 8), 256, 0, stream>>>(dx, dy, x, w, rstd, N, C, accumulate);
    cudaCheck(cudaGetLastError());
}
inline void rmsnorm_backward2_launch(bf16* dx, const bf16* dy, const bf16* x, const bf16* w, const float* rstd, int N, int C,
                                     bool accumulate, cudaStream_t stream) {
    rmsnorm_switch(C, [&](auto vpl, auto lpr) {
        constexpr int VPL = decltype(vpl)::value, LPR = decltype(lpr)::value;
        constexpr int TA = rms_threads(rms_bwd_smem<true, VPL>()), TN = rms_threads(rms_bwd_smem<false, VPL>());
        if (accumulate) rmsnorm_backward_kernel2<true, VPL, LPR><<<ceil_div(N, TA / LPR), TA, 0, stream>>>(dx, dy, x, w, rstd, N, C);
        else rmsnorm_backward_kernel2<false, VPL, LPR><<<ceil_div(N, TN / LPR), TN, 0, stream>>>(dx, dy, x, w, rstd, N, C);
    });
    cudaCheck(cudaGetLastError());
}

inline void rmsnorm_check(const void* a, const void* b, const void* c, int C) {
    kernel_assert(C % 8 == 0, "rmsnorm: C=%d must be a multiple of 8 (16-byte vectors)", C);
    kernel_assert(is_aligned16(a) && is_aligned16(b) && is_aligned16(c), "rmsnorm: pointers must be 16-byte aligned");
}
// y (N, C) bf16, rstd (N) fp32 = RMSNorm(x (N, C) bf16) with weight w (C) bf16
inline void rmsnorm_forward(bf16* y, float* rstd, const bf16* x, const bf16* w, int N, int C, float eps, cudaStream_t stream) {
    rmsnorm_check(y, x, w, C);
    if (C <= RMSNORM2_MAX_C) rmsnorm_forward2_launch<false>(y, rstd, nullptr, x, nullptr, w, N, C, eps, stream);
    else rmsnorm_forward1_launch<false>(y, rstd, nullptr, x, nullptr, w, N, C, eps, stream);
}
// h_out (N, C) = bf16(h + delta) (h_out may be h: in place), then y, rstd = RMSNorm(h_out)
inline void rmsnorm_residual_forward(bf16* h_out, bf16* y, float* rstd, const bf16* h, const bf16* delta, const bf16* w,
                                     int N, int C, float eps, cudaStream_t stream) {
    rmsnorm_check(y, h, w, C);
    rmsnorm_check(h_out, delta, w, C);
    if (C <= RMSNORM2_MAX_C) rmsnorm_forward2_launch<true>(y, rstd, h_out, h, delta, w, N, C, eps, stream);
    else rmsnorm_forward1_launch<true>(y, rstd, h_out, h, delta, w, N, C, eps, stream);
}
// dx (N, C) bf16 (= or +=, by accumulate) from dy (N, C), the forward input x (N, C), w (C), rstd (N)
inline void rmsnorm_backward(bf16* dx, const bf16* dy, const bf16* x, const bf16* w, const float* rstd, int N, int C,
                             bool accumulate, cudaStream_t stream) {
    rmsnorm_check(dx, dy, x, C);
    kernel_assert(is_aligned16(w), "rmsnorm: w must be 16-byte aligned");
    if (C <= RMSNORM2_MAX_C) rmsnorm_backward2_launch(dx, dy, x, w, rstd, N, C, accumulate, stream);
    else rmsnorm_backward1_launch(dx, dy, x, w, rstd, N, C, accumulate, stream);
}
