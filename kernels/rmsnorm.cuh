// kernels/rmsnorm.cuh: LlamaRMSNorm forward (optionally fused with the residual add) and backward.
//
// Forward, as transformers computes it for a bf16 model (formats.md §3.2 item 2):
//   xf = x.float(); r = rsqrt(mean(xf²) + eps); y = w * (xf * r).to(bf16)    (bf16 * bf16 -> rounded)
// so y = bf16( w * bf16(x * r) ), and r (N) fp32 is saved for the backward. One warp per row, 16-byte
// vectors, two passes over the row (the second hits L1/L2). The fused variant first forms the
// residual stream h = bf16(h + delta) (the decoder layer's `residual + hidden_states`), writes it,
// and normalises it: one read of h and delta instead of two kernels' worth of traffic.
//
// Backward (the norm weight is frozen, so no dw): with g = dy * w and x̂ = x * r,
//   dx = r * (g - x̂ * mean(g * x̂))
// treating the bf16 rounding of x̂ as identity (as autograd does). accumulate adds into dx, which is
// how the residual stream's gradient picks up the norm branch.
#pragma once
#include "common.cuh"   // defines: bf16, x128, load128, store128, warp_reduce_sum, cudaCheck

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
        if (RESIDUAL) {                                   // h = h + delta, rounded to bf16
            x128 d = load128(delta + off + c);
            for (int k = 0; k < 8; k++) v[k] = f2bf(bf2f(v[k]) + bf2f(d[k]));
            store128(h_out + off + c, v);                 // same lane re-reads it below
        }
        for (int k = 0; k < 8; k++) { float f = bf2f(v[k]); ss += f * f; }
    }
    ss = warp_reduce_sum(ss);
    float r = 1.0f / sqrtf(ss / (float)C + eps);
    if (lane == 0) rstd[row] = r;
    for (int c = lane * 8; c < C; c += 32 * 8) {
        x128 v = load128(x + c), wv = load128_nc(w + c), o;
        for (int k = 0; k < 8; k++) o[k] = f2bf(bf2f(wv[k]) * bf16r(bf2f(v[k]) * r));
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
        for (int k = 0; k < 8; k++) dot += bf2f(g[k]) * bf2f(wv[k]) * (bf2f(xv[k]) * r);
    }
    float m = warp_reduce_sum(dot) / (float)C;
    for (int c = lane * 8; c < C; c += 32 * 8) {
        x128 g = load128(dy + off + c), xv = load128(x + off + c), wv = load128_nc(w + c), o;
        x128 old = accumulate ? load128(dx + off + c) : x128();
        for (int k = 0; k < 8; k++) {
            float xh = bf2f(xv[k]) * r;
            float v = r * (bf2f(g[k]) * bf2f(wv[k]) - xh * m);
            o[k] = f2bf(accumulate ? bf2f(old[k]) + v : v);
        }
        store128(dx + off + c, o);
    }
}

// ---------------------------------------------------------------------------------------------
// launchers

inline void rmsnorm_check(const void* a, const void* b, const void* c, int C) {
    kernel_assert(C % 8 == 0, "rmsnorm: C=%d must be a multiple of 8 (16-byte vectors)", C);
    kernel_assert(is_aligned16(a) && is_aligned16(b) && is_aligned16(c), "rmsnorm: pointers must be 16-byte aligned");
}
// y (N, C) bf16, rstd (N) fp32 = RMSNorm(x (N, C) bf16) with weight w (C) bf16
inline void rmsnorm_forward(bf16* y, float* rstd, const bf16* x, const bf16* w, int N, int C, float eps, cudaStream_t stream) {
    rmsnorm_check(y, x, w, C);
    rmsnorm_forward_kernel1<false><<<ceil_div(N, 8), 256, 0, stream>>>(y, rstd, nullptr, x, nullptr, w, N, C, eps);
    cudaCheck(cudaGetLastError());
}
// h_out (N, C) = bf16(h + delta) (h_out may be h: in place), then y, rstd = RMSNorm(h_out)
inline void rmsnorm_residual_forward(bf16* h_out, bf16* y, float* rstd, const bf16* h, const bf16* delta, const bf16* w,
                                     int N, int C, float eps, cudaStream_t stream) {
    rmsnorm_check(y, h, w, C);
    rmsnorm_check(h_out, delta, w, C);
    rmsnorm_forward_kernel1<true><<<ceil_div(N, 8), 256, 0, stream>>>(y, rstd, h_out, h, delta, w, N, C, eps);
    cudaCheck(cudaGetLastError());
}
// dx (N, C) bf16 (= or +=, by accumulate) from dy (N, C), the forward input x (N, C), w (C), rstd (N)
inline void rmsnorm_backward(bf16* dx, const bf16* dy, const bf16* x, const bf16* w, const float* rstd, int N, int C,
                             bool accumulate, cudaStream_t stream) {
    rmsnorm_check(dx, dy, x, C);
    kernel_assert(is_aligned16(w), "rmsnorm: w must be 16-byte aligned");
    rmsnorm_backward_kernel1<<<ceil_div(N, 8), 256, 0, stream>>>(dx, dy, x, w, rstd, N, C, accumulate);
    cudaCheck(cudaGetLastError());
}
