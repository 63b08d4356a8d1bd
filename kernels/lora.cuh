// kernels/lora.cuh: the LoRA path's small kernels; its GEMMs are matmul.cuh calls.
//
// PEFT: y = base(x) + s * B(A(dropout(x))). Dropout needs a mask in the forward and the same mask in
// the backward; we store none: element i of projection p in layer l is kept iff
//   rng_uniform(seed, 1000003*(l*N_PROJ + p) + 7, i) >= p_drop          (qlora.h, the same on the CPU)
// with i the flat index into that projection's (N, in) input, and kept values are scaled by
// 1/(1 - p_drop). The backward regenerates the mask from the counter and adds the masked gradient
// into the residual-path dx directly: bf16(dx + bf16(d * mask * scale)), autograd's two roundings.
// Also here: the fp32 -> bf16 cast of the master LoRA weights (at init; AdamW writes it afterwards).
#pragma once
#include "common.cuh"   // defines: bf16, x128, load128, store128, cudaCheck
#include "../qlora.h"   // defines: rng_uniform, N_PROJ

// the RNG stream of (layer, projection)'s dropout mask
QL_HD inline uint64_t lora_dropout_stream(int layer, int proj) { return 1000003ull * (uint64_t)(layer * N_PROJ + proj) + 7ull; }
// the scale of kept elements: the fp32 constant of reference.h's ref_lora_dropout
inline float lora_dropout_scale(float p_drop) { return 1.0f / (1.0f - p_drop); }

template <bool ADD>
__global__ void lora_dropout_kernel1(bf16* out,                       // (n) bf16: out = or += dropout(x)
                                     const bf16* __restrict__ x,      // (n) bf16
                                     int64_t n, float p_drop, float scale, uint64_t seed, uint64_t stream) {
    int64_t i = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) * 8;
    if (i >= n) return;
    x128 xv = load128(x + i), o;
    x128 old = ADD ? load128(out + i) : x128();
    for (int k = 0; k < 8; k++) {
        bool keep = rng_uniform(seed, stream, (uint64_t)(i + k)) >= p_drop;
        float d = keep ? bf16r(bf2f(xv[k]) * scale) : 0.0f;
        o[k] = ADD ? f2bf(bf2f(old[k]) + d) : f2bf(d);
    }
    store128(out + i, o);
}

__global__ void cast_f32_to_bf16_kernel(bf16* __restrict__ out, const float* __restrict__ in, size_t n) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) out[i] = f2bf(in[i]);
}

// ---------------------------------------------------------------------------------------------
// launchers

inline void lora_dropout_launch(bool add, bf16* out, const bf16* x, int64_t n, float p_drop, uint64_t seed, int layer,
                                int proj, cudaStream_t stream) {
    kernel_assert(n % 8 == 0, "lora_dropout: N*in = %lld must be a multiple of 8", (long long)n);
    kernel_assert(is_aligned16(out) && is_aligned16(x), "lora_dropout: pointers must be 16-byte aligned");
    kernel_assert(p_drop > 0.0f && p_drop < 1.0f, "lora_dropout: p_drop=%g must be in (0, 1) (skip the call for 0)", p_drop);
    unsigned grid = (unsigned)ceil_div<int64_t>(n / 8, 256);
    uint64_t st = lora_dropout_stream(layer, proj);
    if (add) lora_dropout_kernel1<true><<<grid, 256, 0, stream>>>(out, x, n, p_drop, lora_dropout_scale(p_drop), seed, st);
    else lora_dropout_kernel1<false><<<grid, 256, 0, stream>>>(out, x, n, p_drop, lora_dropout_scale(p_drop), seed, st);
    cudaCheck(cudaGetLastError());
}
// out (N, in) bf16 = dropout(x (N, in)) for projection proj of layer layer; n = N * in
inline void lora_dropout_forward(bf16* out, const bf16* x, int64_t n, float p_drop, uint64_t seed, int layer, int proj,
                                 cudaStream_t stream) {
    lora_dropout_launch(false, out, x, n, p_drop, seed, layer, proj, stream);
}
// dx (N, in) bf16 += dropout'(d (N, in)): the LoRA branch's input gradient, masked like the forward
inline void lora_dropout_backward_add(bf16* dx, const bf16* d, int64_t n, float p_drop, uint64_t seed, int layer, int proj,
                                      cudaStream_t stream) {
    lora_dropout_launch(true, dx, d, n, p_drop, seed, layer, proj, stream);
}
// out (n) bf16 = in (n) fp32, round to nearest even
inline void cast_f32_to_bf16(bf16* out, const float* in, size_t n, cudaStream_t stream) {
    unsigned grid = (unsigned)ceil_div<size_t>(n, 256);
    if (grid > 4096) grid = 4096;
    if (grid < 1) grid = 1;
    cast_f32_to_bf16_kernel<<<grid, 256, 0, stream>>>(out, in, n);
    cudaCheck(cudaGetLastError());
}
