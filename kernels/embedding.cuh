// kernels/embedding.cuh: token embedding lookup, and the random weights of --model random:NAME.
//
// Lookup: h0[t] = E[ids[t]], one 16-byte vector per thread. An id outside [0, V) would read out of
// bounds, so the kernel writes zeros for it and raises *bad; the trainer checks ids on the host
// first and reports the file and position, this is the last line of defence.
// Random init: w = bf16(std * N(0,1)) from qlora.h's counter RNG (Box-Muller on two uniforms), so a
// random model is the same on every GPU and needs no host memory.
#pragma once
#include "common.cuh"     // defines: bf16, cudaCheck, kernel_assert, ceil_div
#include "../qlora.h"     // defines: rng_uniform

__global__ void embedding_forward_kernel1(bf16* out, int* bad, const int* ids, const bf16* E, int N, int C, int V) {
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;   // one 8-element vector
    int64_t per_row = C / 8;
    if (i >= (int64_t)N * per_row) return;
    int64_t t = i / per_row, c = (i % per_row) * 8;
    int id = ids[t];
    Packed128<bf16> v;
    if (id < 0 || id >= V) { if (c == 0) atomicExch(bad, 1); v = Packed128<bf16>(make_int4(0, 0, 0, 0)); }
    else v = load128_nc(E + (int64_t)id * C + c);
    store128(out + t * C + c, v);
}

__global__ void fill_normal_kernel1(bf16* w, int64_t n, float std, uint64_t seed, uint64_t stream) {
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float u1 = rng_uniform(seed, stream, 2 * i) + 1.0f / 16777216.0f;   // (0, 1]
    float u2 = rng_uniform(seed, stream, 2 * i + 1);
    w[i] = f2bf(std * sqrtf(-2.0f * logf(u1)) * cospif(2.0f * u2));
}

// out (N, C) bf16 = E[ids]; *bad set if any id is outside [0, V)
inline void embedding_forward(bf16* out, int* bad, const int* ids, const bf16* E, int N, int C, int V, cudaStream_t stream) {
    kernel_assert(C % 8 == 0 && is_aligned16(out) && is_aligned16(E), "embedding: C=%d must be a multiple of 8, pointers 16-byte aligned", C);
    embedding_forward_kernel1<<<(unsigned)ceil_div<int64_t>((int64_t)N * (C / 8), 256), 256, 0, stream>>>(out, bad, ids, E, N, C, V);
    cudaCheck(cudaGetLastError());
}
// w (n) bf16 ~ N(0, std^2), reproducible from (seed, stream)
inline void fill_normal(bf16* w, int64_t n, float std, uint64_t seed, uint64_t stream, cudaStream_t s) {
    fill_normal_kernel1<<<(unsigned)ceil_div<int64_t>(n, 256), 256, 0, s>>>(w, n, std, seed, stream);
    cudaCheck(cudaGetLastError());
}
