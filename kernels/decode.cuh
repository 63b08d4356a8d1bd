// kernels/decode.cuh: attention for generation, one new token per sequence against a KV cache.
//
// Generation runs B sequences one token at a time. Each layer keeps the keys and values of every
// position so far, (B, Tmax, nkv, hd) bf16, so a step computes only its own token:
//   kv_cache_store     k_cache[b, pos[b]] = k[b], v_cache[b, pos[b]] = v[b]   (k, v after RoPE)
//   decode_attention   out[b, h] = softmax(q[b, h] · k_cache[b, 0..pos[b]]ᵀ / sqrt(hd)) · v_cache[b, 0..pos[b]]
//                      with kv head h / (nh / nkv) (GQA)
// The query is one row, so attention is two matrix-vector products over the cache: memory-bound,
// no tensor cores. One CTA per (head, sequence), 4 warps; warp w takes keys w, w+4, ...; a key row
// (hd bf16 = 128 or 256 bytes) is one coalesced load of the warp, each lane holding hd/32
// elements, and its score is a warp reduction. Each warp keeps an online softmax (running max m,
// denominator l, weighted sum of v); the 4 are merged through shared memory at the end.
//
// Numerics: scores, softmax and the weighted sum in fp32 (expf), one bf16 rounding of the output.
// The training kernel (attention.cuh) rounds P to bf16 before P·V and uses ex2.approx, so the two
// agree to bf16 noise, not bit for bit (test_qlora compares the logits of both paths).
// Sizes: hd in {64, 128}; positions must be < Tmax (the store traps otherwise: a silent write past
// the cache would corrupt another sequence).
#pragma once
#include "common.cuh"   // defines: bf16, x128, load128, store128, warp_reduce_sum, cudaCheck, kernel_assert

static const int DECODE_WARPS = 4;

__global__ void kv_cache_store_kernel1(bf16* k_cache,        // (B, Tmax, nkv, hd) bf16: row pos[b] written
                                       bf16* v_cache,        // (B, Tmax, nkv, hd) bf16: row pos[b] written
                                       const bf16* k,        // (B, nkv, hd) bf16, after RoPE
                                       const bf16* v,        // (B, nkv, hd) bf16
                                       const int* pos,       // (B) position of each sequence's new token
                                       int B, int Tmax, int kvd) {   // kvd = nkv * hd
    int64_t i = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) * 8;   // one 8-element vector
    if (i >= (int64_t)B * kvd) return;
    int b = (int)(i / kvd), c = (int)(i % kvd), p = pos[b];
    if (p < 0 || p >= Tmax) __trap();
    size_t at = ((size_t)b * Tmax + p) * kvd + c;
    store128(k_cache + at, load128(k + i));
    store128(v_cache + at, load128(v + i));
}

template <int HD>
__global__ void __launch_bounds__(DECODE_WARPS * 32) decode_attention_kernel1(
        bf16* out,                         // (B, nh, hd) bf16
        const bf16* __restrict__ q,        // (B, nh, hd) bf16, after RoPE
        const bf16* __restrict__ k_cache,  // (B, Tmax, nkv, hd) bf16
        const bf16* __restrict__ v_cache,  // (B, Tmax, nkv, hd) bf16
        const int* __restrict__ pos,       // (B) keys 0..pos[b] are attended
        int Tmax, int nh, int nkv, float scale) {
    constexpr int E = HD / 32;             // elements per lane: 2 or 4, contiguous
    int h = blockIdx.x, b = blockIdx.y, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    int kvh = h / (nh / nkv), n_keys = pos[b] + 1;
    if (n_keys < 1 || n_keys > Tmax) __trap();
    const bf16* qp = q + ((size_t)b * nh + h) * HD + lane * E;
    float qf[E], acc[E];
    for (int e = 0; e < E; e++) { qf[e] = bf2f(qp[e]) * scale; acc[e] = 0.0f; }
    float m = -INFINITY, l = 0.0f;
    size_t row = (size_t)nkv * HD;         // elements between consecutive positions of a sequence
    const bf16* kb = k_cache + (size_t)b * Tmax * row + (size_t)kvh * HD + lane * E;
    const bf16* vb = v_cache + (size_t)b * Tmax * row + (size_t)kvh * HD + lane * E;
    for (int j = warp; j < n_keys; j += DECODE_WARPS) {
        float s = 0.0f;
        for (int e = 0; e < E; e++) s += qf[e] * bf2f(kb[j * row + e]);
        s = warp_reduce_sum(s);            // every lane holds the score of key j
        float m_new = fmaxf(m, s), corr = expf(m - m_new), p = expf(s - m_new);
        l = l * corr + p;
        for (int e = 0; e < E; e++) acc[e] = acc[e] * corr + p * bf2f(vb[j * row + e]);
        m = m_new;
    }
    // merge the warps' partial softmaxes: out = Σ_w acc_w e^(m_w - M) / Σ_w l_w e^(m_w - M)
    __shared__ float sm[DECODE_WARPS], sl[DECODE_WARPS], sacc[DECODE_WARPS][HD];
    if (lane == 0) { sm[warp] = m; sl[warp] = l; }
    for (int e = 0; e < E; e++) sacc[warp][lane * E + e] = acc[e];
    __syncthreads();
    if (warp != 0) return;
    float M = -INFINITY;
    for (int w = 0; w < DECODE_WARPS; w++) M = fmaxf(M, sm[w]);
    float L = 0.0f, o[E] = {};
    for (int w = 0; w < DECODE_WARPS; w++) {
        if (sm[w] == -INFINITY) continue;  // a warp that saw no key (n_keys < DECODE_WARPS)
        float f = expf(sm[w] - M);
        L += sl[w] * f;
        for (int e = 0; e < E; e++) o[e] += sacc[w][lane * E + e] * f;
    }
    bf16* op = out + ((size_t)b * nh + h) * HD + lane * E;
    for (int e = 0; e < E; e++) op[e] = f2bf(o[e] / L);
}

// ---------------------------------------------------------------------------------------------
// launchers

// k_cache, v_cache (B, Tmax, nkv, hd): position pos[b] of sequence b <- k, v (B, nkv, hd)
inline void kv_cache_store(bf16* k_cache, bf16* v_cache, const bf16* k, const bf16* v, const int* pos, int B, int Tmax, int nkv, int hd,
                           cudaStream_t stream) {
    int kvd = nkv * hd;
    kernel_assert(kvd % 8 == 0, "kv_cache_store: nkv * hd = %d must be a multiple of 8", kvd);
    kernel_assert(is_aligned16(k_cache) && is_aligned16(v_cache) && is_aligned16(k) && is_aligned16(v), "kv_cache_store: pointers must be 16-byte aligned");
    int64_t vecs = (int64_t)B * kvd / 8;
    kv_cache_store_kernel1<<<(unsigned)ceil_div<int64_t>(vecs, 256), 256, 0, stream>>>(k_cache, v_cache, k, v, pos, B, Tmax, kvd);
    cudaCheck(cudaGetLastError());
}

// out (B, nh, hd) bf16 = attention of q (B, nh, hd) over keys/values 0..pos[b] of the caches (B, Tmax, nkv, hd)
inline void decode_attention(bf16* out, const bf16* q, const bf16* k_cache, const bf16* v_cache, const int* pos, int B, int Tmax,
                             int nh, int nkv, int hd, cudaStream_t stream) {
    kernel_assert(hd == 64 || hd == 128, "decode_attention: head_dim %d not supported (64 or 128)", hd);
    kernel_assert(B >= 1 && Tmax >= 1 && nkv >= 1 && nh % nkv == 0, "decode_attention: bad sizes B=%d Tmax=%d nh=%d nkv=%d", B, Tmax, nh, nkv);
    kernel_assert(B <= 65535, "decode_attention: B=%d sequences exceed the grid (65535)", B);
    dim3 grid(nh, B);
    float scale = 1.0f / sqrtf((float)hd);
    if (hd == 64) decode_attention_kernel1<64><<<grid, DECODE_WARPS * 32, 0, stream>>>(out, q, k_cache, v_cache, pos, Tmax, nh, nkv, scale);
    else decode_attention_kernel1<128><<<grid, DECODE_WARPS * 32, 0, stream>>>(out, q, k_cache, v_cache, pos, Tmax, nh, nkv, scale);
    cudaCheck(cudaGetLastError());
}
