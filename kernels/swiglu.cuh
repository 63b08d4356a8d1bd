// kernels/swiglu.cuh: the Llama MLP's gate, h = silu(g) * u, forward and backward.
//
// transformers computes `act_fn(gate_proj(x)) * up_proj(x)` in bf16: silu in fp32 rounded to bf16
// (a = bf16(g * sigmoid(g))), then a bf16 multiply. We round at the same two places:
//   h  = bf16( a * u )
// and autograd's backward of that graph:
//   du = bf16( dh * a )
//   dg = bf16( bf16(dh * u) * sigmoid(g) * (1 + g * (1 - sigmoid(g))) )
// The backward can also write h again (the trainer's backward needs it for the LoRA of down_proj).
// Elementwise, 8 per thread with 16-byte vectors. Every pointer may alias another of the same
// shape (each element is read before it is written by the same thread): h may overwrite g or u, and
// dg, du may overwrite g, u or dh, so the backward needs no extra (N, I) buffers.
#pragma once
#include "common.cuh"   // defines: bf16, x128, load128, store128, cudaCheck

__device__ __forceinline__ float silu_f32(float g) { return g / (1.0f + expf(-g)); }

__global__ void swiglu_forward_kernel1(bf16* h,          // (N, I) bf16 out
                                       const bf16* g,    // (N, I) bf16 gate_proj output
                                       const bf16* u,    // (N, I) bf16 up_proj output
                                       int64_t n) {
    int64_t i = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) * 8;
    if (i >= n) return;
    x128 gv = load128(g + i), uv = load128(u + i), o;
    for (int k = 0; k < 8; k++) o[k] = f2bf(bf16r(silu_f32(bf2f(gv[k]))) * bf2f(uv[k]));
    store128(h + i, o);
}

template <bool H>
__global__ void swiglu_backward_kernel1(bf16* dg,        // (N, I) bf16 out
                                        bf16* du,        // (N, I) bf16 out
                                        bf16* h,         // (N, I) bf16 out when H: the forward's h again
                                        const bf16* dh,  // (N, I) bf16
                                        const bf16* g,   // (N, I) bf16 forward input
                                        const bf16* u,   // (N, I) bf16 forward input
                                        int64_t n) {
    int64_t i = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) * 8;
    if (i >= n) return;
    x128 dhv = load128(dh + i), gv = load128(g + i), uv = load128(u + i), og, ou, oh;
    for (int k = 0; k < 8; k++) {
        float gf = bf2f(gv[k]), d = bf2f(dhv[k]);
        float sig = 1.0f / (1.0f + expf(-gf));
        float a = bf16r(silu_f32(gf));                    // the forward's a, bit for bit
        ou[k] = f2bf(d * a);
        og[k] = f2bf(bf16r(d * bf2f(uv[k])) * (sig * (1.0f + gf * (1.0f - sig))));
        if (H) oh[k] = f2bf(a * bf2f(uv[k]));             // the forward's h, bit for bit
    }
    store128(dg + i, og); store128(du + i, ou);
    if (H) store128(h + i, oh);
}

inline void swiglu_check(const void* a, const void* b, const void* c, int64_t n) {
    kernel_assert(n % 8 == 0, "swiglu: N*I = %lld must be a multiple of 8", (long long)n);
    kernel_assert(is_aligned16(a) && is_aligned16(b) && is_aligned16(c), "swiglu: pointers must be 16-byte aligned");
}
// h (N, I) = silu(g) * u, n = N * I elements (h may be g or u)
inline void swiglu_forward(bf16* h, const bf16* g, const bf16* u, int64_t n, cudaStream_t stream) {
    swiglu_check(h, g, u, n);
    swiglu_forward_kernel1<<<(unsigned)ceil_div<int64_t>(n / 8, 256), 256, 0, stream>>>(h, g, u, n);
    cudaCheck(cudaGetLastError());
}
// dg, du (N, I) from dh, g, u (N, I); in place allowed (dg = g, du = u, or either = dh). h: when not
// null, also the forward's h = silu(g) * u (a buffer of its own), for a backward that recomputes it:
// reading g and u once for both saves the separate forward pass (2 of its 3 (N, I) transfers).
inline void swiglu_backward(bf16* dg, bf16* du, const bf16* dh, const bf16* g, const bf16* u, int64_t n, cudaStream_t stream, bf16* h = nullptr) {
    swiglu_check(dg, du, dh, n);
    swiglu_check(g, u, dh, n);
    unsigned blocks = (unsigned)ceil_div<int64_t>(n / 8, 256);
    if (h) { swiglu_check(h, h, h, n); swiglu_backward_kernel1<true><<<blocks, 256, 0, stream>>>(dg, du, h, dh, g, u, n); }
    else swiglu_backward_kernel1<false><<<blocks, 256, 0, stream>>>(dg, du, nullptr, dh, g, u, n);
    cudaCheck(cudaGetLastError());
}
