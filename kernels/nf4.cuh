// kernels/nf4.cuh: NF4/FP4 blockwise 4-bit weights on the GPU, bit for bit as qlora.h's CPU
// reference (= bitsandbytes, ../shared/spec/nf4.md §1-3).
//
// Dequantize (every forward and backward, so it must run at memory speed; kernel 4 of
// dev/cuda/nf4_dequant.cu): a thread turns one 4-byte word of packed codes into 8 bf16 = one
// 16-byte store, so each store instruction of a warp writes 512 contiguous bytes (writes are 4/5 of
// the traffic; per-lane 64-byte runs measured 40% slower). DEQ_WORDS words per thread, all loads
// issued before the first use. Every allowed block size (32..4096) is a multiple of 8, so a word's
// elements share one absmax: with double quantization it is rebuilt inline from its 8-bit code (no
// extra launch, no fp32 absmax buffer). The 16-entry code table sits in shared memory: lanes that
// read different entries hit different banks, so the lookups never conflict.
// H100, 14336x4096, bs 64 (bytes = packed + absmax + bf16 out): 59.6 us = 2.52 TB/s with fp32
// absmax, 62-64 us = 2.31-2.36 TB/s nested; a device copy reaches 2.74-2.78 TB/s.
//   out[i] = bf16( fl32(LUT[q_i] * absmax[i / bs]) )                       (mul.ftz, then RNE)
//   nested: absmax[b] = fl32( fl32(DYN[q8[b]] * absmax2[b / 256]) + offset )  (two roundings)
//
// Quantize (once, at load time): one warp per quantization block; 1/absmax is rcp.approx.ftz.f32
// and y = x * inv is mul.ftz.f32, both as inline PTX (what bitsandbytes' --use_fast_math build
// produces), codes by the kernel thresholds' bit patterns (QL_NF4_THRESH / QL_FP4_THRESH), two codes
// per byte, even element in the high nibble. Double quantization: offset = mean(absmax), summed in
// double in a fixed order (one block; see absmax_mean_kernel for why this equals qlora.h's
// sequential sum), then absmax - offset in blocks of 256 with bitsandbytes' binary search over the
// dynamic map.
#pragma once
#include "common.cuh"      // defines: bf16, cudaCheck, ptx_mul_ftz, ptx_rcp_approx_ftz, block_reduce_*
#include "../qlora.h"      // defines: QL_NF4_LUT, QL_NF4_THRESH, QL_FP4_*, QL_DYN8, QT_NF4, DQ_BLOCK

// ---------------------------------------------------------------------------------------------
// device code tables, from the same macros as the host tables

__constant__ uint32_t c_nf4_lut[16] = {QL_NF4_LUT};
__constant__ uint32_t c_fp4_mag[8] = {QL_FP4_MAG};
__constant__ uint32_t c_dyn8[256] = {QL_DYN8};

// FP4 bucket -> code as a packed nibble table, built at compile time from QL_FP4_BUCKET.
QL_HD constexpr uint32_t fp4_bucket_nibbles() {
    constexpr uint8_t b[8] = {QL_FP4_BUCKET};
    uint32_t t = 0;
    for (int i = 0; i < 8; i++) t |= (uint32_t)b[i] << (4 * i);
    return t;
}

// The 16 decoded values of a 4-bit code, as code4_value() gives them (FP4 code 8 is -0.0).
__device__ __forceinline__ float code4_value_dev(int qt, int q) {
    if (qt == QT_NF4) return __uint_as_float(c_nf4_lut[q]);
    float v = __uint_as_float(c_fp4_mag[q & 7]);
    return (q & 8) ? -v : v;
}

// code(y) = #{k : y > T[k]}; NaN compares false everywhere -> 0. Thresholds become immediates.
__device__ __forceinline__ uint32_t nf4_code_dev(float y) {
    const uint32_t t[15] = {QL_NF4_THRESH};
    uint32_t c = 0;
#pragma unroll
    for (int k = 0; k < 15; k++) c += y > __uint_as_float(t[k]);
    return c;
}
__device__ __forceinline__ uint32_t fp4_code_dev(float y) {
    const uint32_t t[7] = {QL_FP4_THRESH};
    uint32_t sign = y < 0.0f ? 8u : 0u, b = 0;
    float a = fabsf(y);
#pragma unroll
    for (int j = 0; j < 7; j++) b += a > __uint_as_float(t[j]);
    constexpr uint32_t nib = fp4_bucket_nibbles();
    return sign | ((nib >> (4 * b)) & 7u);
}

// |x| with subnormals flushed to +0 (the kernel's FTZ on inputs); NaN stays NaN (ignored by fmaxf)
__device__ __forceinline__ float abs_ftz(float x) { float a = fabsf(x); return a < 1.17549435e-38f ? 0.0f : a; }

template <class T> __device__ __forceinline__ float to_f32(T x);
template <> __device__ __forceinline__ float to_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ float to_f32<bf16>(bf16 x) { return __bfloat162float(x); }
template <> __device__ __forceinline__ float to_f32<__half>(__half x) { return __half2float(x); }

// ---------------------------------------------------------------------------------------------
// dequantize

// Reconstruct one absmax from its double-quant code: fl32(fl32(DYN[q]*absmax2) + offset).
__device__ __forceinline__ float nested_absmax(const float* dyn_s, uint8_t q8, float absmax2, float offset) {
    return ptx_add_rn(ptx_mul_ftz(dyn_s[q8], absmax2), offset);
}

// Kernel 4 of dev/cuda/nf4_dequant.cu. U words (8 elements each) per thread, word-major across
// the block so each load and store instruction is coalesced. NESTED: absmax from (absmax_q, absmax2,
// offset). n % 8 != 0: the thread of word n/8 writes the last n % 8 elements one by one.
template <bool NESTED, int U>
__global__ void __launch_bounds__(256) dequantize_4bit_kernel4(
        bf16* __restrict__ out,                 // (n) bf16
        const uint8_t* __restrict__ packed,     // ((n+1)/2) codes, even element in the high nibble
        const float* __restrict__ absmax,       // (nb) fp32 (plain)
        const uint8_t* __restrict__ absmax_q,   // (nb) u8 codes (nested)
        const float* __restrict__ absmax2,      // (ceil(nb/256)) fp32 (nested)
        const float* __restrict__ offset,       // (1) fp32 (nested)
        int64_t n, int qt, int log2_bs8) {      // log2(bs / 8)
    __shared__ float lut_s[16];
    __shared__ float dyn_s[NESTED ? 256 : 1];
    if (threadIdx.x < 16) lut_s[threadIdx.x] = code4_value_dev(qt, threadIdx.x);
    if (NESTED) for (int i = threadIdx.x; i < 256; i += blockDim.x) dyn_s[i] = __uint_as_float(c_dyn8[i]);
    __syncthreads();
    float off = NESTED ? __ldg(offset) : 0.0f;
    int64_t nw = n >> 3;                                           // full 8-element words
    int64_t w0 = (int64_t)blockIdx.x * blockDim.x * U + threadIdx.x;
    uint32_t codes[U]; float am[U];
#pragma unroll
    for (int u = 0; u < U; u++) {                                 // issue every load first
        int64_t w = w0 + (int64_t)u * blockDim.x;
        if (w < nw) {
            codes[u] = __ldcs((const uint32_t*)packed + w);
            int64_t b = w >> log2_bs8;
            am[u] = NESTED ? nested_absmax(dyn_s, __ldg(absmax_q + b), __ldg(absmax2 + (b >> 8)), off) : __ldg(absmax + b);
        }
    }
#pragma unroll
    for (int u = 0; u < U; u++) {
        int64_t w = w0 + (int64_t)u * blockDim.x;
        if (w < nw) {
            x128 o;
#pragma unroll
            for (int k = 0; k < 4; k++) {                         // byte k of the word: elements 2k, 2k+1
                uint32_t byte = (codes[u] >> (8 * k)) & 0xffu;
                __nv_bfloat162 p = __floats2bfloat162_rn(ptx_mul_ftz(lut_s[byte >> 4], am[u]), ptx_mul_ftz(lut_s[byte & 15u], am[u]));
                o[2 * k] = p.x; o[2 * k + 1] = p.y;               // .x = high nibble = even element
            }
            store128(out + 8 * w, o);
        } else if (w == nw && (n & 7)) {                          // ragged tail
            int64_t b = w >> log2_bs8;
            float a = NESTED ? nested_absmax(dyn_s, absmax_q[b], absmax2[b >> 8], off) : absmax[b];
            for (int64_t i = 8 * w; i < n; i++) {
                uint8_t byte = packed[i >> 1];
                out[i] = __float2bfloat16_rn(ptx_mul_ftz(lut_s[(i & 1) ? byte & 15 : byte >> 4], a));
            }
        }
    }
}

// Rebuild the fp32 absmax from the double-quant state (e.g. once at load time).
__global__ void dequantize_absmax_kernel(float* __restrict__ absmax,          // (nb) fp32
                                         const uint8_t* __restrict__ absmax_q,  // (nb) u8
                                         const float* __restrict__ absmax2,     // (ceil(nb/256)) fp32
                                         const float* __restrict__ offset,      // (1)
                                         int64_t nb) {
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < nb) absmax[i] = ptx_add_rn(ptx_mul_ftz(__uint_as_float(c_dyn8[absmax_q[i]]), absmax2[i / DQ_BLOCK]), *offset);
}

// ---------------------------------------------------------------------------------------------
// quantize

// One warp per quantization block of bs elements; a lane handles pairs (2p, 2p+1) -> one byte.
template <class T>
__global__ void quantize_4bit_kernel(uint8_t* __restrict__ packed,    // ((n+1)/2)
                                     float* __restrict__ absmax,      // (nb) fp32
                                     const T* __restrict__ x,         // (n) bf16 / fp16 / fp32
                                     int64_t n, int qt, int bs) {
    int lane = threadIdx.x & 31;
    int64_t b = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    int64_t nb = (n + bs - 1) / bs;
    if (b >= nb) return;                                           // whole warp leaves together
    int64_t base = b * bs;
    float m = -3.40282347e38f;                                     // absmax: fmaxf from -FLT_MAX
    for (int i = lane; i < bs; i += 32) {
        int64_t e = base + i;
        m = fmaxf(m, e < n ? abs_ftz(to_f32(x[e])) : 0.0f);
    }
    m = warp_reduce_max(m);                                        // max is exact: any order
    if (lane == 0) absmax[b] = m;
    float inv = ptx_rcp_approx_ftz(m);
    for (int p = lane; p < bs / 2; p += 32) {
        int64_t e0 = base + 2 * p;
        if (e0 >= n) break;
        float y0 = ptx_mul_ftz(to_f32(x[e0]), inv);
        float y1 = ptx_mul_ftz(e0 + 1 < n ? to_f32(x[e0 + 1]) : 0.0f, inv);   // odd n: padding 0
        uint32_t c0 = qt == QT_NF4 ? nf4_code_dev(y0) : fp4_code_dev(y0);
        uint32_t c1 = qt == QT_NF4 ? nf4_code_dev(y1) : fp4_code_dev(y1);
        packed[e0 >> 1] = (uint8_t)((c0 << 4) | c1);
    }
}

// offset = (float)(sum_double(absmax) / nb), one block, fixed order (deterministic). qlora.h sums
// sequentially in double; both sums are exact, hence equal, whenever no partial sum needs more than
// 53 bits: absmax of bf16/fp16 weights carries 8/11 significant bits, so that holds unless the
// absmax values span more than ~2^(53-11-log2(nb)) in magnitude. For fp32 weights whose
// absmax spread breaks it, the two can differ by 1 ulp, as bitsandbytes' own torch.mean may.
__global__ void absmax_mean_kernel(float* __restrict__ offset,          // (1) out
                                   const float* __restrict__ absmax,    // (nb)
                                   const float* __restrict__ offset_in, // (1) or nullptr
                                   int64_t nb) {
    if (offset_in) { if (threadIdx.x == 0) *offset = *offset_in; return; }
    double s = 0.0;
    for (int64_t i = threadIdx.x; i < nb; i += blockDim.x) s += (double)absmax[i];
    s = block_reduce_sum(s);
    if (threadIdx.x == 0) *offset = (float)(s / (double)nb);
}

// dQuantize<0> of bitsandbytes (qlora.h dyn8_code): binary search from pivot 127, then the nearer
// of the bracketing entries by the fp32 midpoint (IEEE add, exact *0.5).
__device__ __forceinline__ uint8_t dyn8_code_dev(float x, const float* code) {
    int pivot = 127, upper_pivot = 255, lower_pivot = 0;
    float lower = -1.0f, upper = 1.0f, val = code[pivot];
    for (int i = 64; i > 0; i >>= 1) {
        if (x > val) { lower_pivot = pivot; lower = val; pivot += i; }
        else         { upper_pivot = pivot; upper = val; pivot -= i; }
        val = code[pivot];
    }
    if (upper_pivot == 255) upper = code[255];
    if (lower_pivot == 0) lower = code[0];
    if (x > val) return (uint8_t)(x > ptx_mul_rn(ptx_add_rn(upper, val), 0.5f) ? upper_pivot : pivot);
    return (uint8_t)(x < ptx_mul_rn(ptx_add_rn(lower, val), 0.5f) ? lower_pivot : pivot);
}

// One block of 256 threads per double-quant block: c = absmax - offset, absmax2 = max|c|,
// q8 = dyn8(c * rcp.approx(absmax2)).
__global__ void __launch_bounds__(DQ_BLOCK) quantize_absmax_kernel(
        uint8_t* __restrict__ absmax_q,       // (nb) u8
        float* __restrict__ absmax2,          // (ceil(nb/256)) fp32
        const float* __restrict__ absmax,     // (nb) fp32
        const float* __restrict__ offset,     // (1)
        int64_t nb) {
    __shared__ float dyn_s[256];
    dyn_s[threadIdx.x] = __uint_as_float(c_dyn8[threadIdx.x]);
    int64_t i = (int64_t)blockIdx.x * DQ_BLOCK + threadIdx.x;
    float c = i < nb ? ptx_sub_rn(absmax[i], *offset) : 0.0f;
    float m = block_reduce_max(fmaxf(-3.40282347e38f, abs_ftz(c)));   // syncs dyn_s too
    if (threadIdx.x == 0) absmax2[blockIdx.x] = m;
    if (i < nb) absmax_q[i] = dyn8_code_dev(ptx_mul_ftz(c, ptx_rcp_approx_ftz(m)), dyn_s);
}

// ---------------------------------------------------------------------------------------------
// launchers

inline int log2_exact(int v) { int l = 0; while ((1 << l) < v) l++; return (1 << l) == v ? l : -1; }

inline void dequantize_4bit_check(bf16* out, const uint8_t* packed, int qt, int bs) {
    kernel_assert(valid_blocksize_4bit(bs), "4-bit blocksize %d not supported (32, 64, ..., 4096)", bs);
    kernel_assert(qt == QT_NF4 || qt == QT_FP4, "unknown 4-bit quant type %d", qt);
    kernel_assert(is_aligned16(out) && is_aligned16(packed), "dequantize_4bit: out and packed must be 16-byte aligned");
}
static const int DEQ_WORDS = 4;   // 8-element words per thread (dev/cuda/nf4_dequant.cu: U=4)

// out (n) bf16 = dequant(packed, absmax)
inline void dequantize_4bit_gpu(bf16* out, const uint8_t* packed, const float* absmax, int64_t n, int qt, int bs,
                                cudaStream_t stream) {
    dequantize_4bit_check(out, packed, qt, bs);
    unsigned grid = (unsigned)ceil_div<int64_t>(ceil_div<int64_t>(n, 8), 256 * DEQ_WORDS);
    dequantize_4bit_kernel4<false, DEQ_WORDS><<<grid, 256, 0, stream>>>(out, packed, absmax, nullptr, nullptr, nullptr, n, qt, log2_exact(bs / 8));
    cudaCheck(cudaGetLastError());
}
// out (n) bf16 = dequant(packed, absmax rebuilt from absmax_q (nb) u8, absmax2 (ceil(nb/256)), offset (1))
inline void dequantize_4bit_nested_gpu(bf16* out, const uint8_t* packed, const uint8_t* absmax_q, const float* absmax2,
                                       const float* offset, int64_t n, int qt, int bs, cudaStream_t stream) {
    dequantize_4bit_check(out, packed, qt, bs);
    unsigned grid = (unsigned)ceil_div<int64_t>(ceil_div<int64_t>(n, 8), 256 * DEQ_WORDS);
    dequantize_4bit_kernel4<true, DEQ_WORDS><<<grid, 256, 0, stream>>>(out, packed, nullptr, absmax_q, absmax2, offset, n, qt, log2_exact(bs / 8));
    cudaCheck(cudaGetLastError());
}
// absmax (nb) fp32 = fl32(fl32(DYN[absmax_q]*absmax2) + offset)
inline void dequantize_absmax_gpu(float* absmax, const uint8_t* absmax_q, const float* absmax2, const float* offset,
                                  int64_t nb, cudaStream_t stream) {
    dequantize_absmax_kernel<<<(unsigned)ceil_div<int64_t>(nb, 256), 256, 0, stream>>>(absmax, absmax_q, absmax2, offset, nb);
    cudaCheck(cudaGetLastError());
}

// packed ((n+1)/2), absmax (ceil(n/bs)) fp32 = quantize(x (n)); T = bf16, __half or float
template <class T>
inline void quantize_4bit_gpu(uint8_t* packed, float* absmax, const T* x, int64_t n, int qt, int bs, cudaStream_t stream) {
    kernel_assert(valid_blocksize_4bit(bs), "4-bit blocksize %d not supported (32, 64, ..., 4096)", bs);
    kernel_assert(qt == QT_NF4 || qt == QT_FP4, "unknown 4-bit quant type %d", qt);
    int64_t nb = ceil_div<int64_t>(n, bs);
    quantize_4bit_kernel<T><<<(unsigned)ceil_div<int64_t>(nb, 8), 256, 0, stream>>>(packed, absmax, x, n, qt, bs);
    cudaCheck(cudaGetLastError());
}
// Double quantization of absmax (nb): offset (1) = mean (or *offset_in when given, to reproduce a
// checkpoint), absmax_q (nb) u8, absmax2 (ceil(nb/256)) fp32. absmax itself is left unchanged; call
// dequantize_absmax_gpu to replace it by the reconstruction the checkpoint implies.
inline void quantize_absmax_gpu(uint8_t* absmax_q, float* absmax2, float* offset, const float* absmax, int64_t nb,
                                const float* offset_in, cudaStream_t stream) {
    absmax_mean_kernel<<<1, 1024, 0, stream>>>(offset, absmax, offset_in, nb);
    cudaCheck(cudaGetLastError());
    quantize_absmax_kernel<<<(unsigned)ceil_div<int64_t>(nb, DQ_BLOCK), DQ_BLOCK, 0, stream>>>(absmax_q, absmax2, absmax, offset, nb);
    cudaCheck(cudaGetLastError());
}
