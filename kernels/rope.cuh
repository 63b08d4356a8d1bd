// kernels/rope.cuh: rotary position embedding, half-split (rotate_half) form, in place on q and k.
//
// transformers (formats.md §3.2 item 3), for i < d/2 with d = hd:
//   angle = pos * inv_freq[i]            fp32 (inv_freq from qlora.h's rope_inv_freq, llama3 scaling included)
//   c, s  = bf16(cos(angle)), bf16(sin(angle))       cast to the activation dtype
//   q'_i       = q_i * c - q_{i+d/2} * s    q'_{i+d/2} = q_{i+d/2} * c + q_i * s
// We round exactly where the bf16 module does: `q * cos + rotate_half(q) * sin` is two bf16 products
// (each exact in fp32, then rounded) and one bf16 add, so a bf16 checkpoint's q, k match HF bit for bit
// wherever our cosf/sinf (accurate, not __cosf) round to the same bf16 as torch's.
// Backward is the rotation by -angle, with autograd's roundings:
//   dq_i = bf16(dq'_i c) + bf16(dq'_{i+d/2} s)       dq_{i+d/2} = bf16(dq'_{i+d/2} c) - bf16(dq'_i s)
// A thread owns one token and 8 consecutive i, computes their 8 (c, s) once and applies them to a
// group of heads: 16-byte loads on both halves of each head.
#pragma once
#include "common.cuh"   // defines: bf16, x128, load128, store128, ptx_mul_rn, cudaCheck

static const int ROPE_HEADS_PER_THREAD = 8;

template <bool BACKWARD>
__global__ void rope_kernel1(bf16* q,                          // (N, nh, hd) bf16, in place
                             bf16* k,                          // (N, nkv, hd) bf16, in place
                             const float* __restrict__ inv_freq,   // (hd/2) fp32
                             const int* __restrict__ pos,      // (N) or nullptr: position t % T
                             int N, int T, int nh, int nkv, int hd) {
    int half = hd / 2, per_tok = half / 8;
    int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (int64_t)N * per_tok) return;
    int t = (int)(idx / per_tok), i0 = (int)(idx % per_tok) * 8;
    float p = (float)(pos ? pos[t] : t % T);
    float c[8], s[8];
    for (int j = 0; j < 8; j++) {
        float sn, cs;
        sincosf(ptx_mul_rn(p, inv_freq[i0 + j]), &sn, &cs);
        c[j] = bf16r(cs); s[j] = bf16r(sn);
    }
    int h0 = blockIdx.y * ROPE_HEADS_PER_THREAD;
    for (int h = h0; h < h0 + ROPE_HEADS_PER_THREAD && h < nh + nkv; h++) {
        bf16* base = h < nh ? q + ((size_t)t * nh + h) * hd : k + ((size_t)t * nkv + (h - nh)) * hd;
        x128 a = load128(base + i0), b = load128(base + half + i0), oa, ob;   // a: first half, b: second
        for (int j = 0; j < 8; j++) {
            float x1 = bf2f(a[j]), x2 = bf2f(b[j]);
            if (!BACKWARD) {
                oa[j] = f2bf(bf16r(x1 * c[j]) + bf16r(-x2 * s[j]));
                ob[j] = f2bf(bf16r(x2 * c[j]) + bf16r(x1 * s[j]));
            } else {
                oa[j] = f2bf(bf16r(x1 * c[j]) + bf16r(x2 * s[j]));
                ob[j] = f2bf(bf16r(x2 * c[j]) - bf16r(x1 * s[j]));
            }
        }
        store128(base + i0, oa); store128(base + half + i0, ob);
    }
}

inline void rope_launch(bool backward, bf16* q, bf16* k, const float* inv_freq, const int* pos, int N, int T, int nh,
                        int nkv, int hd, cudaStream_t stream) {
    kernel_assert(hd % 16 == 0, "rope: head_dim %d must be a multiple of 16 (8-wide vectors on each half)", hd);
    kernel_assert(is_aligned16(q) && is_aligned16(k), "rope: q and k must be 16-byte aligned");
    kernel_assert(pos || T > 0, "rope: need positions or a sequence length T");
    int64_t threads = (int64_t)N * (hd / 16);
    dim3 grid((unsigned)ceil_div<int64_t>(threads, 256), (unsigned)ceil_div(nh + nkv, ROPE_HEADS_PER_THREAD));
    if (backward) rope_kernel1<true><<<grid, 256, 0, stream>>>(q, k, inv_freq, pos, N, T, nh, nkv, hd);
    else rope_kernel1<false><<<grid, 256, 0, stream>>>(q, k, inv_freq, pos, N, T, nh, nkv, hd);
    cudaCheck(cudaGetLastError());
}
// q (N, nh, hd), k (N, nkv, hd) bf16 rotated in place; inv_freq (hd/2) fp32 on the device;
// pos (N) int positions, or nullptr for t % T (packed rows of length T)
inline void rope_forward(bf16* q, bf16* k, const float* inv_freq, const int* pos, int N, int T, int nh, int nkv, int hd,
                         cudaStream_t stream) {
    rope_launch(false, q, k, inv_freq, pos, N, T, nh, nkv, hd, stream);
}
// dq (N, nh, hd), dk (N, nkv, hd) bf16 rotated back in place (rotation by -angle)
inline void rope_backward(bf16* dq, bf16* dk, const float* inv_freq, const int* pos, int N, int T, int nh, int nkv, int hd,
                          cudaStream_t stream) {
    rope_launch(true, dq, dk, inv_freq, pos, N, T, nh, nkv, hd, stream);
}
