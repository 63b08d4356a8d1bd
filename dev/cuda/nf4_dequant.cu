// dev/cuda/nf4_dequant.cu: playground for NF4 dequantization to bf16 (kernels/nf4.cuh).
// Every version is checked bit for bit against qlora.h's CPU dequantize, then timed on a 14336x4096
// weight (Llama-3-8B's gate/up projection), blocksize 64, plain and double-quantized absmax.
//
//   nvcc -std=c++17 -O3 -gencode arch=compute_90a,code=sm_90a -o build/nf4_dequant dev/cuda/nf4_dequant.cu
//   ./build/nf4_dequant
//
// Bytes that must move: packed n/2 + absmax (4*n/64 plain, or n/64 + 4*n/16384 nested) + bf16 out 2n
// = 150 MB (plain 154 MB). At the ~3.0 TB/s a device copy reaches on an H100 that is ~50 us.
//   v1  one thread per packed byte, LUT in __constant__ (divergent reads serialise), 2-byte stores
//   v2  bitsandbytes' shape: 8 packed bytes per thread (8-byte load), 16 outputs, shared-memory LUT
//   v3  16 packed bytes per thread (16-byte load), 32 outputs = 4 16-byte stores, CH chunks per
//       thread with every load issued first; nested absmax rebuilt inline
//   v4  (kernels/nf4.cuh) 4-byte loads, one 16-byte store per word, so each store instruction of a
//       warp writes 512 contiguous bytes (v3's stores are 64 bytes apart per lane); U words/thread
//   v5  v4 with evict-first (st.global.cs) stores
// H100, 2026-11-23, median of 20, TB/s effective, fp32 absmax / nested (two runs, on two machines):
//   copy 2.78, 2.74 (read + write)        v1 0.58 / 0.55      v2 2.19 / 1.07
//   v3 CH=1, 2, 4: 1.62, 1.43, 1.37 / 1.62, 1.40, 1.43     (64-byte runs per lane: stores suffer)
//   v4 U=2, 4, 8: 2.53, 2.52, 2.51 / 2.36, 2.31-2.39, 2.30 -> graduated with U=4
//   v5 U=4, 8:    2.58, 2.60 / 2.45, 2.33   (evict-first stores: +2-5% here, but the GEMM that
//                 reads a 4096x4096 weight right after may lose its L2 hits; try it in the trainer)
#include "../../kernels/nf4.cuh"      // defines: dequantize_4bit_kernel4, nested_absmax, code4_value_dev
#include "timing.h"                   // defines: median_ms

template <bool NESTED>
__global__ void dequantize_4bit_kernel1(bf16* out, const uint8_t* packed, const float* absmax, const uint8_t* absmax_q,
                                        const float* absmax2, const float* offset, int64_t n, int qt, int bs) {
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;   // byte
    if (2 * i >= n) return;
    int64_t b = 2 * i / bs;
    float am = NESTED ? ptx_add_rn(ptx_mul_ftz(__uint_as_float(c_dyn8[absmax_q[b]]), absmax2[b >> 8]), *offset) : absmax[b];
    uint8_t byte = packed[i];
    out[2 * i] = __float2bfloat16_rn(ptx_mul_ftz(code4_value_dev(qt, byte >> 4), am));
    if (2 * i + 1 < n) out[2 * i + 1] = __float2bfloat16_rn(ptx_mul_ftz(code4_value_dev(qt, byte & 15), am));
}

template <bool NESTED>
__global__ void dequantize_4bit_kernel2(bf16* out, const uint8_t* packed, const float* absmax, const uint8_t* absmax_q,
                                        const float* absmax2, const float* offset, int64_t n, int qt, int log2_bs16) {
    __shared__ float lut_s[16], dyn_s[256];
    if (threadIdx.x < 16) lut_s[threadIdx.x] = code4_value_dev(qt, threadIdx.x);
    if (NESTED) for (int i = threadIdx.x; i < 256; i += blockDim.x) dyn_s[i] = __uint_as_float(c_dyn8[i]);
    __syncthreads();
    int64_t c = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;   // 16-element chunk (n % 16 == 0 here)
    if (16 * c >= n) return;
    uint2 w = __ldcs((const uint2*)packed + c);
    int64_t b = c >> log2_bs16;
    float am = NESTED ? nested_absmax(dyn_s, absmax_q[b], absmax2[b >> 8], *offset) : __ldg(absmax + b);
    uint32_t ws[2] = {w.x, w.y};
    for (int s = 0; s < 2; s++) {
        x128 o;
        for (int k = 0; k < 4; k++) {
            uint32_t byte = (ws[s] >> (8 * k)) & 0xffu;
            o[2 * k] = __float2bfloat16_rn(ptx_mul_ftz(lut_s[byte >> 4], am));
            o[2 * k + 1] = __float2bfloat16_rn(ptx_mul_ftz(lut_s[byte & 15u], am));
        }
        store128(out + 16 * c + 8 * s, o);
    }
}

// 32 elements from 16 packed bytes: 4 stores of 8 bf16, 64 contiguous bytes per lane
__device__ __forceinline__ void dequant32(bf16* out, uint4 codes, float am, const float* lut_s) {
    uint32_t w[4] = {codes.x, codes.y, codes.z, codes.w};
    for (int s = 0; s < 4; s++) {
        x128 o;
        for (int k = 0; k < 4; k++) {
            uint32_t byte = (w[s] >> (8 * k)) & 0xffu;
            __nv_bfloat162 p = __floats2bfloat162_rn(ptx_mul_ftz(lut_s[byte >> 4], am), ptx_mul_ftz(lut_s[byte & 15u], am));
            o[2 * k] = p.x; o[2 * k + 1] = p.y;
        }
        store128(out + 8 * s, o);
    }
}
template <bool NESTED, int CH>
__global__ void __launch_bounds__(256) dequantize_4bit_kernel3(bf16* out, const uint8_t* packed, const float* absmax,
        const uint8_t* absmax_q, const float* absmax2, const float* offset, int64_t n, int qt, int log2_bs32) {
    __shared__ float lut_s[16], dyn_s[256];
    if (threadIdx.x < 16) lut_s[threadIdx.x] = code4_value_dev(qt, threadIdx.x);
    if (NESTED) for (int i = threadIdx.x; i < 256; i += blockDim.x) dyn_s[i] = __uint_as_float(c_dyn8[i]);
    __syncthreads();
    float off = NESTED ? *offset : 0.0f;
    int64_t n_full = n >> 5, c0 = (int64_t)blockIdx.x * blockDim.x * CH + threadIdx.x;   // n % 32 == 0 here
    uint4 codes[CH]; float am[CH];
    for (int j = 0; j < CH; j++) {
        int64_t c = c0 + (int64_t)j * blockDim.x;
        if (c < n_full) {
            codes[j] = __ldcs((const uint4*)packed + c);
            int64_t b = c >> log2_bs32;
            am[j] = NESTED ? nested_absmax(dyn_s, __ldg(absmax_q + b), __ldg(absmax2 + (b >> 8)), off) : __ldg(absmax + b);
        }
    }
    for (int j = 0; j < CH; j++) {
        int64_t c = c0 + (int64_t)j * blockDim.x;
        if (c < n_full) dequant32(out + 32 * c, codes[j], am[j], lut_s);
    }
}

// v4 with evict-first stores (n % 8 == 0 here)
template <bool NESTED, int U>
__global__ void __launch_bounds__(256) dequantize_4bit_kernel5(bf16* out, const uint8_t* packed, const float* absmax,
        const uint8_t* absmax_q, const float* absmax2, const float* offset, int64_t n, int qt, int log2_bs8) {
    __shared__ float lut_s[16], dyn_s[256];
    if (threadIdx.x < 16) lut_s[threadIdx.x] = code4_value_dev(qt, threadIdx.x);
    if (NESTED) for (int i = threadIdx.x; i < 256; i += blockDim.x) dyn_s[i] = __uint_as_float(c_dyn8[i]);
    __syncthreads();
    float off = NESTED ? *offset : 0.0f;
    int64_t nw = n >> 3, w0 = (int64_t)blockIdx.x * blockDim.x * U + threadIdx.x;
    uint32_t wv[U]; float am[U];
#pragma unroll
    for (int u = 0; u < U; u++) {
        int64_t w = w0 + (int64_t)u * blockDim.x;
        if (w < nw) {
            wv[u] = __ldcs((const uint32_t*)packed + w);
            int64_t b = w >> log2_bs8;
            am[u] = NESTED ? nested_absmax(dyn_s, __ldg(absmax_q + b), __ldg(absmax2 + (b >> 8)), off) : __ldg(absmax + b);
        }
    }
#pragma unroll
    for (int u = 0; u < U; u++) {
        int64_t w = w0 + (int64_t)u * blockDim.x;
        if (w >= nw) break;
        x128 o;
        for (int k = 0; k < 4; k++) {
            uint32_t byte = (wv[u] >> (8 * k)) & 0xffu;
            __nv_bfloat162 p = __floats2bfloat162_rn(ptx_mul_ftz(lut_s[byte >> 4], am[u]), ptx_mul_ftz(lut_s[byte & 15u], am[u]));
            o[2 * k] = p.x; o[2 * k + 1] = p.y;
        }
        store128cs(out + 8 * w, o);
    }
}

struct QWeight { const uint8_t* packed; const float* absmax; const uint8_t* q8; const float* a2; const float* off; int64_t n; int bs; };

static void run(int version, bool nested, const QWeight& w, bf16* out) {
    int qt = QT_NF4;
    const float* am = nested ? nullptr : w.absmax;
    switch (version) {
    case 1: {
        unsigned g = (unsigned)ceil_div<int64_t>((w.n + 1) / 2, 256);
        if (nested) dequantize_4bit_kernel1<true><<<g, 256>>>(out, w.packed, am, w.q8, w.a2, w.off, w.n, qt, w.bs);
        else dequantize_4bit_kernel1<false><<<g, 256>>>(out, w.packed, am, w.q8, w.a2, w.off, w.n, qt, w.bs);
        break; }
    case 2: {
        unsigned g = (unsigned)ceil_div<int64_t>(w.n / 16, 64);
        if (nested) dequantize_4bit_kernel2<true><<<g, 64>>>(out, w.packed, am, w.q8, w.a2, w.off, w.n, qt, log2_exact(w.bs / 16));
        else dequantize_4bit_kernel2<false><<<g, 64>>>(out, w.packed, am, w.q8, w.a2, w.off, w.n, qt, log2_exact(w.bs / 16));
        break; }
    case 31: case 32: case 34: {
        int l = log2_exact(w.bs / 32);
        int64_t chunks = ceil_div<int64_t>(w.n, 32);
#define V3(CH) { unsigned g = (unsigned)ceil_div<int64_t>(chunks, 256 * CH); \
        if (nested) dequantize_4bit_kernel3<true, CH><<<g, 256>>>(out, w.packed, am, w.q8, w.a2, w.off, w.n, qt, l); \
        else dequantize_4bit_kernel3<false, CH><<<g, 256>>>(out, w.packed, am, w.q8, w.a2, w.off, w.n, qt, l); }
        if (version == 31) V3(1) else if (version == 32) V3(2) else V3(4)
#undef V3
        break; }
    case 42: case 44: case 48: case 54: case 58: {
        int l = log2_exact(w.bs / 8);
        int64_t words = w.n / 8;
#define V45(K, U) { unsigned g = (unsigned)ceil_div<int64_t>(words, 256 * U); \
        if (nested) dequantize_4bit_kernel##K<true, U><<<g, 256>>>(out, w.packed, am, w.q8, w.a2, w.off, w.n, qt, l); \
        else dequantize_4bit_kernel##K<false, U><<<g, 256>>>(out, w.packed, am, w.q8, w.a2, w.off, w.n, qt, l); }
        if (version == 42) V45(4, 2) else if (version == 44) V45(4, 4) else if (version == 48) V45(4, 8)
        else if (version == 54) V45(5, 4) else V45(5, 8)
#undef V45
        break; }
    }
    cudaCheck(cudaGetLastError());
}

int main() {
    const int64_t rows = 14336, cols = 4096, n = rows * cols;
    const int bs = 64;
    int64_t nb = n / bs, n2 = (nb + 255) / 256;
    // a valid random quantized state: random codes, random 8-bit absmax codes around the offset
    std::vector<uint8_t> packed((size_t)n / 2), q8((size_t)nb);
    std::vector<float> a2((size_t)n2), absmax((size_t)nb);
    float offset = 0.031f;
    for (size_t i = 0; i < packed.size(); i++) packed[i] = (uint8_t)(rng_u32(1, 1, i) >> 24);
    for (size_t i = 0; i < q8.size(); i++) q8[i] = (uint8_t)(rng_u32(1, 2, i) >> 24);
    for (size_t i = 0; i < a2.size(); i++) a2[i] = 0.01f + 0.02f * rng_uniform(1, 3, i);
    dequantize_absmax(absmax.data(), q8.data(), a2.data(), offset, nb);
    std::vector<uint16_t> ref((size_t)n);
    {
        std::vector<float> f((size_t)n);
        dequantize_4bit(f.data(), packed.data(), absmax.data(), n, QT_NF4, bs);
        for (int64_t i = 0; i < n; i++) ref[i] = f32_to_bf16(f[i]);
    }
    uint8_t *d_packed, *d_q8; float *d_absmax, *d_a2, *d_off; bf16* d_out; void* d_copy;
    cudaCheck(cudaMalloc(&d_packed, packed.size())); cudaCheck(cudaMalloc(&d_q8, q8.size()));
    cudaCheck(cudaMalloc(&d_absmax, 4 * nb)); cudaCheck(cudaMalloc(&d_a2, 4 * n2)); cudaCheck(cudaMalloc(&d_off, 4));
    cudaCheck(cudaMalloc(&d_out, 2 * n)); cudaCheck(cudaMalloc(&d_copy, 2 * n));
    cudaCheck(cudaMemcpy(d_packed, packed.data(), packed.size(), cudaMemcpyHostToDevice));
    cudaCheck(cudaMemcpy(d_q8, q8.data(), q8.size(), cudaMemcpyHostToDevice));
    cudaCheck(cudaMemcpy(d_absmax, absmax.data(), 4 * nb, cudaMemcpyHostToDevice));
    cudaCheck(cudaMemcpy(d_a2, a2.data(), 4 * n2, cudaMemcpyHostToDevice));
    cudaCheck(cudaMemcpy(d_off, &offset, 4, cudaMemcpyHostToDevice));
    QWeight w{d_packed, d_absmax, d_q8, d_a2, d_off, n, bs};

    float copy_ms = median_ms([&] { cudaCheck(cudaMemcpyAsync(d_copy, d_out, 2 * n, cudaMemcpyDeviceToDevice)); });
    printf("device copy of %.0f MB: %.1f us = %.2f TB/s (read + write)\n", 2.0 * n / 1e6, 1e3 * copy_ms, 4.0 * n / (copy_ms * 1e9));
    printf("%-10s %-8s %10s %10s  %s\n", "version", "absmax", "us", "TB/s", "bit-exact");
    std::vector<uint16_t> got((size_t)n);
    for (int version : {1, 2, 32, 42, 44, 48, 54, 58})
        for (bool nested : {false, true}) {
            cudaCheck(cudaMemset(d_out, 0xff, 2 * n));
            run(version, nested, w, d_out);
            cudaCheck(cudaDeviceSynchronize());
            cudaCheck(cudaMemcpy(got.data(), d_out, 2 * n, cudaMemcpyDeviceToHost));
            bool ok = memcmp(got.data(), ref.data(), 2 * n) == 0;
            float ms = median_ms([&] { run(version, nested, w, d_out); });
            double bytes = n / 2.0 + 2.0 * n + (nested ? nb + 4.0 * n2 : 4.0 * nb);
            char vn[16];
            if (version < 10) snprintf(vn, sizeof vn, "v%d", version);
            else snprintf(vn, sizeof vn, "v%d %s=%d", version / 10, version < 40 ? "CH" : "U", version % 10);
            printf("%-10s %-8s %10.1f %10.2f  %s\n", vn, nested ? "nested" : "fp32", 1e3 * ms, bytes / (ms * 1e9), ok ? "yes" : "NO");
        }
    return 0;
}
