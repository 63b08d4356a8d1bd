// qlora.h: everything the CPU reference and the GPU trainer share (g++ and nvcc).
//   1. checked host helpers (errors name the file; no crash on bad input)
//   2. number formats: bf16/fp16 <-> fp32, counter-based RNG
//   3. the NF4/FP4 and dynamic-8-bit code tables, bit patterns from ../shared/spec/nf4.md
//   4. NF4/FP4 blockwise quantize/dequantize + double quantization, bit for bit as bitsandbytes
//   5. a small JSON reader
//   6. config.json -> Config (Llama family), RoPE inverse frequencies
//   7. safetensors reader (single file and sharded) and writer
//   8. LoRA configuration and parameter layout, PEFT init
#pragma once
#include <stdint.h>   // defines: fixed-width ints
#include <stdio.h>    // defines: FILE, fprintf
#include <stdlib.h>   // defines: malloc, exit
#include <string.h>   // defines: memcpy, strcmp
#include <math.h>     // defines: sqrtf, cosf
#include <string>     // defines: std::string
#include <vector>     // defines: std::vector
#include <map>        // defines: std::map (safetensors name index)
#include <set>        // defines: std::set (duplicate JSON keys, distinct shards)
#include <memory>     // defines: std::unique_ptr
#include <algorithm>  // defines: std::sort, std::find

#ifdef __CUDACC__
#define QL_HD __host__ __device__
#else
#define QL_HD
#endif

// ---------------------------------------------------------------------------------------------
// 1. checked host helpers

// Fatal error: print and exit(1). Every user-visible error goes through here so the message
// always says what to do or which file/tensor is wrong. The fuzzers (test/fuzz/) switch it to
// throwing QlError, silently, so one process can try millions of hostile inputs.
struct QlError {};
struct QlErrorMode {
    bool throw_instead = false, quiet = false;
    long long fail_writes_after = -1;   // test hook: file writes fail after this many bytes, as on a full disk
};
inline QlErrorMode& ql_error_mode() { static QlErrorMode m; return m; }
[[noreturn]] inline void ql_die() { if (ql_error_mode().throw_instead) throw QlError(); exit(1); }
#define ql_fail(...) do { if (!ql_error_mode().quiet) { fprintf(stderr, "qlora: error: "); fprintf(stderr, __VA_ARGS__); \
                          fprintf(stderr, "\n"); } ql_die(); } while (0)
#define ql_assert(cond, ...) do { if (!(cond)) ql_fail(__VA_ARGS__); } while (0)

inline void* ql_malloc(size_t n, const char* what) {
    void* p = malloc(n ? n : 1);
    ql_assert(p, "out of host memory allocating %zu bytes for %s", n, what);
    return p;
}

// Whole file into memory; bytes are owned by the caller (free()).
inline std::vector<uint8_t> read_file(const std::string& path) {
    FILE* f = fopen(path.c_str(), "rb");
    ql_assert(f, "cannot open %s", path.c_str());
    ql_assert(fseek(f, 0, SEEK_END) == 0, "cannot seek %s", path.c_str());
    long n = ftell(f);
    ql_assert(n >= 0 && fseek(f, 0, SEEK_SET) == 0, "cannot size %s", path.c_str());
    std::vector<uint8_t> buf((size_t)n);
    ql_assert(n == 0 || fread(buf.data(), 1, (size_t)n, f) == (size_t)n, "short read on %s", path.c_str());
    fclose(f);
    return buf;
}
inline bool file_exists(const std::string& path) { FILE* f = fopen(path.c_str(), "rb"); if (f) fclose(f); return f != nullptr; }

// ---------------------------------------------------------------------------------------------
// 2. number formats

QL_HD inline uint32_t f32_bits(float x) { uint32_t u; memcpy(&u, &x, 4); return u; }
QL_HD inline float bits_f32(uint32_t u) { float x; memcpy(&x, &u, 4); return x; }

// bf16 is the top half of an fp32; round to nearest even, NaN stays NaN (quiet).
QL_HD inline uint16_t f32_to_bf16(float x) {
    uint32_t u = f32_bits(x);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1)) >> 16);
}
QL_HD inline float bf16_to_f32(uint16_t h) { return bits_f32((uint32_t)h << 16); }
QL_HD inline float bf16_round(float x) { return bf16_to_f32(f32_to_bf16(x)); }

// IEEE binary16 -> fp32 (exact), fp32 -> binary16 (round to nearest even).
QL_HD inline float f16_to_f32(uint16_t h) {
    uint32_t s = (uint32_t)(h >> 15) << 31, e = (h >> 10) & 31, m = h & 1023;
    if (e == 31) return bits_f32(s | 0x7f800000u | (m << 13));
    if (e == 0) { float v = (float)m * (1.0f / 16777216.0f); return s ? -v : v; }  // m * 2^-24
    return bits_f32(s | ((e + 112) << 23) | (m << 13));
}
QL_HD inline uint16_t f32_to_f16(float x) {
    uint32_t u = f32_bits(x), s = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return (uint16_t)(s | 0x7fffu);                // NaN as CUDA's __float2half makes it
    if (a >= 0x477ff000u) return (uint16_t)(s | 0x7c00u);           // rounds to inf
    if (a < 0x38800000u) {                                            // subnormal or zero in f16
        float v = bits_f32(a) * 16777216.0f;                          // exact scale by 2^24
        return (uint16_t)(s | (uint32_t)lrintf(v));                   // RNE to an integer count of 2^-24
    }
    uint32_t r = a + 0xfffu + ((a >> 13) & 1);
    return (uint16_t)(s | ((r - 0x38000000u) >> 13));
}

// Counter-based RNG (splitmix64 finaliser): the same (seed, stream, index) gives the same number on
// the CPU and the GPU, so dropout masks and random init need no state and no ordering.
QL_HD inline uint64_t mix64(uint64_t z) {
    z += 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}
QL_HD inline uint32_t rng_u32(uint64_t seed, uint64_t stream, uint64_t index) {
    return (uint32_t)(mix64(mix64(seed ^ mix64(stream)) + index) >> 32);
}
// uniform in [0, 1) with 24 random bits
QL_HD inline float rng_uniform(uint64_t seed, uint64_t stream, uint64_t index) {
    return (float)(rng_u32(seed, stream, index) >> 8) * (1.0f / 16777216.0f);
}

// ---------------------------------------------------------------------------------------------
// 3. code tables, as fp32 bit patterns (../shared/spec/nf4.md §1.1, §1.2, §1.5, §1.6, App. A, C).
// Defined once as macros so host tables and __constant__ device tables share one source.

#define QL_NF4_LUT 0xbf800000u, 0xbf3239b1u, 0xbf066b30u, 0xbeca32a0u, 0xbe91a24du, 0xbe3d353fu, \
    0xbdba7871u, 0x00000000u, 0x3da2faffu, 0x3e24cae3u, 0x3e7c04ddu, 0x3ead033au, 0x3ee1a4b8u,      \
    0x3f1007abu, 0x3f3913b3u, 0x3f800000u
// kernel thresholds T0..T14: code = #{k : y > T[k]}. T0, T8, T12, T14 are 1 ulp off the fp32
// midpoints of the table: these are what nvcc makes of bitsandbytes' decimal literals.
#define QL_NF4_THRESH 0xbf591cd9u, 0xbf1c5270u, 0xbeeb8480u, 0xbeadea76u, 0xbe703cecu, 0xbe0d38bcu, \
    0xbd3a7871u, 0x3d22faffu, 0x3df64863u, 0x3e5067e0u, 0x3e9582d4u, 0x3ec753f9u, 0x3f006d03u,         \
    0x3f248dafu, 0x3f5c89d9u
// FP4: sign bit 8, low 3 bits index the magnitude; code 8 decodes to -0.0 (CUDA kernel).
#define QL_FP4_MAG 0x00000000u, 0x3baaaaabu, 0x3f2aaaabu, 0x3f800000u, 0x3eaaaaabu, 0x3f000000u, \
    0x3e2aaaabu, 0x3e800000u
#define QL_FP4_THRESH 0x3b2aaab9u, 0x3db00000u, 0x3e555555u, 0x3e955555u, 0x3ed55556u, 0x3f155550u, 0x3f555555u
#define QL_FP4_BUCKET 0, 1, 6, 7, 4, 5, 2, 3
// signed dynamic 8-bit map (create_dynamic_map()), used for the double-quantized absmax
#define QL_DYN8 \
    0xbf7e3333u,0xbf7a999au,0xbf770000u,0xbf736666u,0xbf6fcccdu,0xbf6c3333u,0xbf68999au,0xbf650000u, \
    0xbf616666u,0xbf5dcccdu,0xbf5a3333u,0xbf56999au,0xbf530000u,0xbf4f6666u,0xbf4bcccdu,0xbf483333u, \
    0xbf44999au,0xbf410000u,0xbf3d6666u,0xbf39cccdu,0xbf363334u,0xbf32999au,0xbf2f0000u,0xbf2b6666u, \
    0xbf27cccdu,0xbf243334u,0xbf20999au,0xbf1d0000u,0xbf196666u,0xbf15cccdu,0xbf123334u,0xbf0e999au, \
    0xbf0b0000u,0xbf076666u,0xbf03ccccu,0xbf003333u,0xbef93332u,0xbef20000u,0xbeeaccccu,0xbee3999au, \
    0xbedc6666u,0xbed53333u,0xbece0000u,0xbec6ccccu,0xbebf999au,0xbeb86666u,0xbeb13333u,0xbeaa0000u, \
    0xbea2ccccu,0xbe9b999au,0xbe946666u,0xbe8d3334u,0xbe860000u,0xbe7d9999u,0xbe6f3333u,0xbe60cccdu, \
    0xbe526666u,0xbe440000u,0xbe35999au,0xbe273333u,0xbe18cccdu,0xbe0a6666u,0xbdf80000u,0xbddb3334u, \
    0xbdc9eb85u,0xbdc428f7u,0xbdbe6667u,0xbdb8a3d7u,0xbdb2e148u,0xbdad1eb8u,0xbda75c2au,0xbda1999au, \
    0xbd9bd70au,0xbd96147bu,0xbd9051ebu,0xbd8a8f5du,0xbd84cccdu,0xbd7e147bu,0xbd728f5du,0xbd670a3du, \
    0xbd5b851fu,0xbd500000u,0xbd447ae1u,0xbd38f5c3u,0xbd2d70a3u,0xbd21eb85u,0xbd166667u,0xbd0ae148u, \
    0xbcfeb852u,0xbce7ae15u,0xbcd0a3d7u,0xbcb9999au,0xbca28f5du,0xbc8b851fu,0xbc68f5c3u,0xbc3ae148u, \
    0xbc1f3b64u,0xbc160418u,0xbc0ccccdu,0xbc039581u,0xbbf4bc6au,0xbbe24dd3u,0xbbcfdf3bu,0xbbbd70a4u, \
    0xbbab020du,0xbb989374u,0xbb8624ddu,0xbb676c8au,0xbb428f5cu,0xbb1db22du,0xbaf1a9fcu,0xbaa7ef9du, \
    0xba7765ffu,0xba59e83eu,0xba3c6a80u,0xba1eecc1u,0xba016f01u,0xb9c7e283u,0xb98ce705u,0xb923d70bu, \
    0xb8ba1f4bu,0xb88aefb3u,0xb8378034u,0xb7b24206u,0xb70205ffu,0xb65a1a94u,0xb513a3b7u,0x00000000u, \
    0x3513a3b7u,0x365a1a94u,0x370205ffu,0x37b24206u,0x38378034u,0x388aefb3u,0x38ba1f4bu,0x3923d70bu, \
    0x398ce705u,0x39c7e283u,0x3a016f01u,0x3a1eecc1u,0x3a3c6a80u,0x3a59e83eu,0x3a7765ffu,0x3aa7ef9du, \
    0x3af1a9fcu,0x3b1db22du,0x3b428f5cu,0x3b676c8au,0x3b8624ddu,0x3b989374u,0x3bab020du,0x3bbd70a4u, \
    0x3bcfdf3bu,0x3be24dd3u,0x3bf4bc6au,0x3c039581u,0x3c0ccccdu,0x3c160418u,0x3c1f3b64u,0x3c3ae148u, \
    0x3c68f5c3u,0x3c8b851fu,0x3ca28f5du,0x3cb9999au,0x3cd0a3d7u,0x3ce7ae15u,0x3cfeb852u,0x3d0ae148u, \
    0x3d166667u,0x3d21eb85u,0x3d2d70a3u,0x3d38f5c3u,0x3d447ae1u,0x3d500000u,0x3d5b851fu,0x3d670a3du, \
    0x3d728f5du,0x3d7e147bu,0x3d84cccdu,0x3d8a8f5du,0x3d9051ebu,0x3d96147bu,0x3d9bd70au,0x3da1999au, \
    0x3da75c2au,0x3dad1eb8u,0x3db2e148u,0x3db8a3d7u,0x3dbe6667u,0x3dc428f7u,0x3dc9eb85u,0x3ddb3334u, \
    0x3df80000u,0x3e0a6666u,0x3e18cccdu,0x3e273333u,0x3e35999au,0x3e440000u,0x3e526666u,0x3e60cccdu, \
    0x3e6f3333u,0x3e7d9999u,0x3e860000u,0x3e8d3334u,0x3e946666u,0x3e9b999au,0x3ea2ccccu,0x3eaa0000u, \
    0x3eb13333u,0x3eb86666u,0x3ebf999au,0x3ec6ccccu,0x3ece0000u,0x3ed53333u,0x3edc6666u,0x3ee3999au, \
    0x3eeaccccu,0x3ef20000u,0x3ef93332u,0x3f003333u,0x3f03ccccu,0x3f076666u,0x3f0b0000u,0x3f0e999au, \
    0x3f123334u,0x3f15cccdu,0x3f196666u,0x3f1d0000u,0x3f20999au,0x3f243334u,0x3f27cccdu,0x3f2b6666u, \
    0x3f2f0000u,0x3f32999au,0x3f363334u,0x3f39cccdu,0x3f3d6666u,0x3f410000u,0x3f44999au,0x3f483333u, \
    0x3f4bcccdu,0x3f4f6666u,0x3f530000u,0x3f56999au,0x3f5a3333u,0x3f5dcccdu,0x3f616666u,0x3f650000u, \
    0x3f68999au,0x3f6c3333u,0x3f6fcccdu,0x3f736666u,0x3f770000u,0x3f7a999au,0x3f7e3333u,0x3f800000u

static const uint32_t NF4_LUT_BITS[16] = {QL_NF4_LUT};
static const uint32_t NF4_THRESH_BITS[15] = {QL_NF4_THRESH};
static const uint32_t FP4_MAG_BITS[8] = {QL_FP4_MAG};
static const uint32_t FP4_THRESH_BITS[7] = {QL_FP4_THRESH};
static const uint8_t FP4_BUCKET_CODE[8] = {QL_FP4_BUCKET};
static const uint32_t DYN8_BITS[256] = {QL_DYN8};
static_assert(sizeof(NF4_LUT_BITS) == 64 && sizeof(DYN8_BITS) == 1024, "code tables");

enum QuantType { QT_NF4 = 0, QT_FP4 = 1 };
inline const char* quant_type_name(int qt) { return qt == QT_NF4 ? "nf4" : "fp4"; }
inline bool valid_blocksize_4bit(int bs) { for (int b = 32; b <= 4096; b *= 2) if (b == bs) return true; return false; }
QL_HD inline float code4_value(int qt, int q) {   // LUT[q] as the CUDA dequant kernel decodes it
    if (qt == QT_NF4) { const uint32_t t[16] = {QL_NF4_LUT}; return bits_f32(t[q & 15]); }
    const uint32_t m[8] = {QL_FP4_MAG}; float v = bits_f32(m[q & 7]);
    return (q & 8) ? -v : v;
}

// ---------------------------------------------------------------------------------------------
// 4. blockwise 4-bit quantization, bit for bit as bitsandbytes' CUDA kernels (nf4.md §1–3, §8.2)
//
// bitsandbytes is built with --use_fast_math: 1/absmax is rcp.approx.ftz.f32 and the products are
// mul.ftz.f32. On the CPU we emulate both: rcp.approx is IEEE 1/x plus a per-mantissa delta of
// -1/0/+1 ulp, read from a 2 MiB table that dev/cuda/rcp_table.cu measures on a GPU
// (data/rcp_delta.bin). Without the table, IEEE 1/x is used: still exact for NF4 from bf16/fp16
// weights (nf4.md §8.2, checked exhaustively), but not always for FP4, fp32 inputs or the nested
// 8-bit step, so we say so once.

struct RcpTable { std::vector<uint8_t> delta; bool warned = false; };  // 2 bits per mantissa
inline RcpTable& rcp_table() { static RcpTable t; return t; }
inline bool rcp_table_load(const std::string& path) {
    if (!file_exists(path)) return false;
    std::vector<uint8_t> d = read_file(path);
    ql_assert(d.size() == (1u << 21), "%s: expected 2097152 bytes (2 bits per fp32 mantissa), got %zu; "
              "regenerate it with dev/cuda/rcp_table.cu", path.c_str(), d.size());
    rcp_table().delta.swap(d);
    return true;
}
// rcp.approx.ftz.f32
inline float rcp_approx_ftz(float a) {
    uint32_t u = f32_bits(a), e = (u >> 23) & 255, m = u & 0x7fffffu, s = u & 0x80000000u;
    if (a != a) return a;
    if (e == 0) return bits_f32(s | 0x7f800000u);                  // 0 and subnormals -> inf
    if (e == 255) return bits_f32(s);                              // inf -> 0
    if (e > 253 || (e == 253 && m != 0)) return bits_f32(s);       // result subnormal -> flushed
    float r = 1.0f / a;
    RcpTable& t = rcp_table();
    if (t.delta.empty()) {
        if (!t.warned) { t.warned = true; fprintf(stderr, "qlora: note: data/rcp_delta.bin not loaded; CPU "
            "quantization uses IEEE 1/x (exact for NF4 from bf16/fp16, may differ from bitsandbytes elsewhere)\n"); }
        return r;
    }
    int d = (t.delta[m >> 2] >> (2 * (m & 3))) & 3;               // 0: equal, 1: +1 ulp, 3: -1 ulp
    return bits_f32(f32_bits(r) + (d == 1 ? 1 : d == 3 ? (uint32_t)-1 : 0));
}
// NVIDIA arithmetic returns this one NaN for every invalid operation (x86 returns -NaN, 0xffc00000)
inline float gpu_nan() { return bits_f32(0x7fffffffu); }
inline float gpu_add(float a, float b) { float r = a + b; return r != r ? gpu_nan() : r; }
// mul.ftz.f32: the exact product is formed in double (24x24 bits fit), flushed to signed zero
// if its magnitude is below 2^-126 before rounding, else rounded once to fp32.
inline float mul_ftz(float a, float b) {
    if (fabsf(a) < 1.17549435e-38f) a = copysignf(0.0f, a);       // ftz inputs
    if (fabsf(b) < 1.17549435e-38f) b = copysignf(0.0f, b);
    double p = (double)a * (double)b;
    if (p != p) return gpu_nan();
    if (fabs(p) < 1.1754943508222875e-38) return copysignf(0.0f, (float)p);
    return (float)p;
}
inline float ftz(float x) { return fabsf(x) < 1.17549435e-38f ? copysignf(0.0f, x) : x; }

inline uint8_t nf4_code(float y) { int c = 0; for (int k = 0; k < 15; k++) c += y > bits_f32(NF4_THRESH_BITS[k]); return (uint8_t)c; }
inline uint8_t fp4_code(float y) {
    uint8_t sign = y < 0 ? 8 : 0; float a = fabsf(y); int b = 0;
    for (int j = 0; j < 7; j++) b += a > bits_f32(FP4_THRESH_BITS[j]);
    return (uint8_t)(sign | FP4_BUCKET_CODE[b]);
}
// dQuantize<0> of bitsandbytes: binary search over the 256-entry map from pivot 127, then the
// nearest of the bracketing entries by fp32 midpoint. NaN ends at code 0.
inline uint8_t dyn8_code(float x) {
    float code[256]; for (int i = 0; i < 256; i++) code[i] = bits_f32(DYN8_BITS[i]);
    int pivot = 127, upper_pivot = 255, lower_pivot = 0;
    float lower = -1.0f, upper = 1.0f, val = code[pivot];
    for (int i = 64; i > 0; i >>= 1) {
        if (x > val) { lower_pivot = pivot; lower = val; pivot += i; }
        else         { upper_pivot = pivot; upper = val; pivot -= i; }
        val = code[pivot];
    }
    if (upper_pivot == 255) upper = code[255];
    if (lower_pivot == 0) lower = code[0];
    if (x > val) return (uint8_t)(x > (upper + val) * 0.5f ? upper_pivot : pivot);
    return (uint8_t)(x < (lower + val) * 0.5f ? lower_pivot : pivot);
}

// absmax over a block as the kernel computes it: fmaxf from -FLT_MAX (NaN ignored), inputs ftz'd,
// elements past n count as 0.
inline float block_absmax(const float* x, int64_t n, int64_t b, int bs) {
    float m = -3.40282347e38f;
    for (int64_t i = b * bs; i < (b + 1) * bs; i++) m = fmaxf(m, i < n ? fabsf(ftz(x[i])) : 0.0f);
    return m;
}

// x: n fp32 values (exact upcasts of bf16/fp16 weights, or fp32). packed: (n+1)/2 bytes, element
// 2i in the high nibble. absmax: ceil(n/bs) fp32.
inline void quantize_4bit(uint8_t* packed, float* absmax, const float* x, int64_t n, int qt, int bs) {
    int64_t nb = (n + bs - 1) / bs;
    memset(packed, 0, (size_t)((n + 1) / 2));
    for (int64_t b = 0; b < nb; b++) {
        float am = block_absmax(x, n, b, bs);
        absmax[b] = am;
        float inv = rcp_approx_ftz(am);
        for (int64_t i = b * bs; i < (b + 1) * bs && i < n + (n & 1); i++) {
            float y = mul_ftz(i < n ? x[i] : 0.0f, inv);
            uint8_t c = qt == QT_NF4 ? nf4_code(y) : fp4_code(y);
            packed[i >> 1] |= (i & 1) ? c : (uint8_t)(c << 4);
        }
    }
}
// out[i] = fl32(LUT[q] * absmax[i / bs]); the caller rounds to bf16/fp16 if that is the target.
inline void dequantize_4bit(float* out, const uint8_t* packed, const float* absmax, int64_t n, int qt, int bs) {
    for (int64_t i = 0; i < n; i++) {
        int q = (i & 1) ? packed[i >> 1] & 15 : packed[i >> 1] >> 4;
        out[i] = mul_ftz(code4_value(qt, q), absmax[i / bs]);
    }
}

// Double quantization (nf4.md §3): offset = mean(absmax); absmax - offset is 8-bit blockwise
// quantized with the dynamic map, blocks of 256. offset_in: use this offset (to reproduce a
// given checkpoint, whose torch.mean may be 1 ulp off the correctly rounded mean); else compute.
static const int DQ_BLOCK = 256;
inline float absmax_mean(const float* absmax, int64_t nb) {
    double s = 0; for (int64_t i = 0; i < nb; i++) s += absmax[i];
    return (float)(s / (double)nb);
}
inline void quantize_absmax(uint8_t* q8, float* absmax2, float* offset, const float* absmax, int64_t nb,
                            const float* offset_in = nullptr) {
    float off = offset_in ? *offset_in : absmax_mean(absmax, nb);
    *offset = off;
    std::vector<float> c((size_t)nb);
    for (int64_t i = 0; i < nb; i++) c[i] = gpu_add(absmax[i], -off);   // torch, on the GPU
    int64_t n2 = (nb + DQ_BLOCK - 1) / DQ_BLOCK;
    for (int64_t b = 0; b < n2; b++) {
        float am = block_absmax(c.data(), nb, b, DQ_BLOCK);
        absmax2[b] = am;
        float inv = rcp_approx_ftz(am);
        for (int64_t i = b * DQ_BLOCK; i < (b + 1) * DQ_BLOCK && i < nb; i++) q8[i] = dyn8_code(mul_ftz(ftz(c[i]), inv));
    }
}
// absmax[i] = fl32(fl32(DYN[q8[i]] * absmax2[i/256]) + offset): two roundings, no FMA
inline void dequantize_absmax(float* absmax, const uint8_t* q8, const float* absmax2, float offset, int64_t nb) {
    for (int64_t i = 0; i < nb; i++) {
        float p = mul_ftz(bits_f32(DYN8_BITS[q8[i]]), absmax2[i / DQ_BLOCK]);
        absmax[i] = gpu_add(p, offset);
    }
}

// One quantized weight in bitsandbytes' layout: what Linear4bit saves (nf4.md §4.1).
struct Quant4 {
    int qt = QT_NF4, bs = 64; bool nested = true;
    int64_t n = 0;                 // elements of the original [out, in] weight
    std::vector<uint8_t> packed;   // ((n+1)/2) codes, high nibble first
    std::vector<float> absmax;     // (n_blocks) fp32; when nested, reconstructed from the three below
    std::vector<uint8_t> absmax_q; // (n_blocks) 8-bit codes (nested only)
    std::vector<float> absmax2;    // (ceil(n_blocks/256)) (nested only)
    float offset = 0.0f;           // mean of the original absmax (nested only)
    int64_t n_blocks() const { return (n + bs - 1) / bs; }
};
inline Quant4 quantize_weight(const float* x, int64_t n, int qt = QT_NF4, int bs = 64, bool nested = true,
                              const float* offset_in = nullptr) {
    ql_assert(valid_blocksize_4bit(bs), "4-bit blocksize %d not supported (32, 64, ..., 4096)", bs);
    Quant4 q; q.qt = qt; q.bs = bs; q.nested = nested; q.n = n;
    q.packed.resize((size_t)((n + 1) / 2)); q.absmax.resize((size_t)q.n_blocks());
    quantize_4bit(q.packed.data(), q.absmax.data(), x, n, qt, bs);
    if (nested) {
        int64_t nb = q.n_blocks();
        q.absmax_q.resize((size_t)nb); q.absmax2.resize((size_t)((nb + DQ_BLOCK - 1) / DQ_BLOCK));
        quantize_absmax(q.absmax_q.data(), q.absmax2.data(), &q.offset, q.absmax.data(), nb, offset_in);
        dequantize_absmax(q.absmax.data(), q.absmax_q.data(), q.absmax2.data(), q.offset, nb);
    }
    return q;
}
// fp32 values of the dequantized weight (round with f32_to_bf16 for a bf16 model)
inline void dequantize_weight(float* out, const Quant4& q) { dequantize_4bit(out, q.packed.data(), q.absmax.data(), q.n, q.qt, q.bs); }

// ---------------------------------------------------------------------------------------------
// 5. JSON: a small DOM parser for config.json, safetensors headers, index files, adapter configs.
// Hostile input is the norm here: every read is bounds-checked, nesting is limited, duplicate
// object keys are rejected, and errors carry the byte offset.

struct Json {
    enum Type { NUL, BOOL, NUM, STR, ARR, OBJ } type = NUL;
    bool b = false;
    double num = 0; bool is_uint = false; uint64_t u = 0;   // is_uint: a plain non-negative integer literal
    std::string str;
    std::vector<Json> arr;
    std::vector<std::pair<std::string, Json>> obj;          // in file order
    const Json* get(const char* key) const {
        if (type != OBJ) return nullptr;
        for (auto& kv : obj) if (kv.first == key) return &kv.second;
        return nullptr;
    }
};

struct JsonParser {
    const char* s; size_t n, i = 0; std::string err;
    static const int MAX_DEPTH = 64;
    bool fail(const char* what) { if (err.empty()) { char b[160]; snprintf(b, sizeof b, "%s at byte %zu", what, i); err = b; } return false; }
    void ws() { while (i < n && (s[i] == ' ' || s[i] == '\t' || s[i] == '\n' || s[i] == '\r')) i++; }
    bool lit(const char* w) { size_t k = strlen(w); if (n - i < k || memcmp(s + i, w, k)) return fail("invalid literal"); i += k; return true; }
    bool hex4(uint32_t& v) {
        if (n - i < 4) return fail("truncated \\u escape");
        v = 0;
        for (int k = 0; k < 4; k++) {
            char c = s[i++]; v <<= 4;
            if (c >= '0' && c <= '9') v |= c - '0'; else if (c >= 'a' && c <= 'f') v |= c - 'a' + 10;
            else if (c >= 'A' && c <= 'F') v |= c - 'A' + 10; else return fail("bad \\u escape");
        }
        return true;
    }
    bool string(std::string& out) {
        if (i >= n || s[i] != '"') return fail("expected string");
        i++;
        while (true) {
            if (i >= n) return fail("unterminated string");
            unsigned char c = (unsigned char)s[i++];
            if (c == '"') return true;
            if (c < 0x20) return fail("control character in string");
            if (c != '\\') { out += (char)c; continue; }
            if (i >= n) return fail("unterminated escape");
            char e = s[i++];
            switch (e) {
                case '"': out += '"'; break; case '\\': out += '\\'; break; case '/': out += '/'; break;
                case 'b': out += '\b'; break; case 'f': out += '\f'; break; case 'n': out += '\n'; break;
                case 'r': out += '\r'; break; case 't': out += '\t'; break;
                case 'u': {
                    uint32_t cp; if (!hex4(cp)) return false;
                    if (cp >= 0xd800 && cp < 0xdc00) {                     // surrogate pair
                        uint32_t lo;
                        if (n - i < 2 || s[i] != '\\' || s[i + 1] != 'u') return fail("lone surrogate");
                        i += 2; if (!hex4(lo)) return false;
                        if (lo < 0xdc00 || lo >= 0xe000) return fail("bad surrogate pair");
                        cp = 0x10000 + ((cp - 0xd800) << 10) + (lo - 0xdc00);
                    } else if (cp >= 0xdc00 && cp < 0xe000) return fail("lone surrogate");
                    if (cp < 0x80) out += (char)cp;
                    else if (cp < 0x800) { out += (char)(0xc0 | (cp >> 6)); out += (char)(0x80 | (cp & 63)); }
                    else if (cp < 0x10000) { out += (char)(0xe0 | (cp >> 12)); out += (char)(0x80 | ((cp >> 6) & 63)); out += (char)(0x80 | (cp & 63)); }
                    else { out += (char)(0xf0 | (cp >> 18)); out += (char)(0x80 | ((cp >> 12) & 63)); out += (char)(0x80 | ((cp >> 6) & 63)); out += (char)(0x80 | (cp & 63)); }
                    break;
                }
                default: return fail("bad escape");
            }
        }
    }
    bool number(Json& v) {
        size_t st = i;
        if (i < n && s[i] == '-') i++;
        if (i >= n || !(s[i] >= '0' && s[i] <= '9')) return fail("bad number");
        if (s[i] == '0') i++; else while (i < n && s[i] >= '0' && s[i] <= '9') i++;
        bool integer = true;
        if (i < n && s[i] == '.') { integer = false; i++; if (i >= n || !(s[i] >= '0' && s[i] <= '9')) return fail("bad number"); while (i < n && s[i] >= '0' && s[i] <= '9') i++; }
        if (i < n && (s[i] == 'e' || s[i] == 'E')) {
            integer = false; i++;
            if (i < n && (s[i] == '+' || s[i] == '-')) i++;
            if (i >= n || !(s[i] >= '0' && s[i] <= '9')) return fail("bad number");
            while (i < n && s[i] >= '0' && s[i] <= '9') i++;
        }
        if (i - st > 400) return fail("number too long");
        std::string t(s + st, i - st);
        v.type = Json::NUM; v.num = strtod(t.c_str(), nullptr);
        if (integer && s[st] != '-') {
            uint64_t u = 0; bool ovf = false;
            for (char c : t) { uint64_t d = (uint64_t)(c - '0'); if (u > (UINT64_MAX - d) / 10) ovf = true; u = u * 10 + d; }
            if (!ovf) { v.is_uint = true; v.u = u; }
        }
        return true;
    }
    bool value(Json& v, int depth) {
        if (depth > MAX_DEPTH) return fail("nesting too deep");
        ws();
        if (i >= n) return fail("unexpected end");
        char c = s[i];
        if (c == '{') {
            v.type = Json::OBJ; i++; ws();
            if (i < n && s[i] == '}') { i++; return true; }
            std::set<std::string> keys;   // not a scan of v.obj: a hostile header has millions of keys
            while (true) {
                ws(); std::string k; if (!string(k)) return false;
                if (!keys.insert(k).second) return fail(("duplicate key \"" + k.substr(0, 64) + "\"").c_str());
                ws(); if (i >= n || s[i] != ':') return fail("expected ':'");
                i++;
                v.obj.emplace_back(std::move(k), Json());
                if (!value(v.obj.back().second, depth + 1)) return false;
                ws(); if (i >= n) return fail("unterminated object");
                if (s[i] == ',') { i++; continue; }
                if (s[i] == '}') { i++; return true; }
                return fail("expected ',' or '}'");
            }
        }
        if (c == '[') {
            v.type = Json::ARR; i++; ws();
            if (i < n && s[i] == ']') { i++; return true; }
            while (true) {
                v.arr.emplace_back();
                if (!value(v.arr.back(), depth + 1)) return false;
                ws(); if (i >= n) return fail("unterminated array");
                if (s[i] == ',') { i++; continue; }
                if (s[i] == ']') { i++; return true; }
                return fail("expected ',' or ']'");
            }
        }
        if (c == '"') { v.type = Json::STR; return string(v.str); }
        if (c == 't') { v.type = Json::BOOL; v.b = true; return lit("true"); }
        if (c == 'f') { v.type = Json::BOOL; v.b = false; return lit("false"); }
        if (c == 'n') { v.type = Json::NUL; return lit("null"); }
        return number(v);
    }
};
// Parse a whole document (trailing whitespace allowed). On failure err says what and where.
inline bool json_parse(const char* s, size_t n, Json& out, std::string& err) {
    JsonParser p{s, n, 0, {}};
    out = Json();
    if (!p.value(out, 0)) { err = p.err; return false; }
    p.ws();
    if (p.i != n) { p.fail("trailing characters"); err = p.err; return false; }
    return true;
}
inline Json json_load(const std::string& path) {
    std::vector<uint8_t> b = read_file(path);
    Json j; std::string err;
    ql_assert(json_parse((const char*)b.data(), b.size(), j, err), "%s: invalid JSON: %s", path.c_str(), err.c_str());
    return j;
}
// JSON text out: strings escaped, numbers with shortest round-trip precision where needed
inline std::string json_quote(const std::string& s) {
    std::string o = "\"";
    for (unsigned char c : s) {
        if (c == '"' || c == '\\') { o += '\\'; o += (char)c; }
        else if (c < 0x20) { char b[8]; snprintf(b, sizeof b, "\\u%04x", c); o += b; }
        else o += (char)c;
    }
    return o + "\"";
}

// ---------------------------------------------------------------------------------------------
// 6. model configuration (Llama family), filled from config.json by load_config() below

enum RopeType { ROPE_DEFAULT = 0, ROPE_LINEAR = 1, ROPE_LLAMA3 = 2 };
enum DType { DT_BF16 = 0, DT_F16 = 1, DT_F32 = 2, DT_U8 = 3, DT_I32 = 4, DT_I64 = 5, DT_NONE = 6 };

struct Config {
    int dim = 0;          // H   hidden_size
    int hidden_dim = 0;   // I   intermediate_size
    int n_layers = 0;     // L   num_hidden_layers
    int n_heads = 0;      // nh  num_attention_heads
    int n_kv_heads = 0;   // nkv num_key_value_heads
    int head_dim = 0;     // hd  head_dim (H/nh when absent)
    int vocab_size = 0;   // V
    int max_seq_len = 0;  // max_position_embeddings
    float norm_eps = 1e-6f;
    float rope_theta = 10000.0f;
    int rope_type = ROPE_DEFAULT;
    float rope_factor = 1.0f, rope_low_freq = 1.0f, rope_high_freq = 4.0f;  // linear / llama3
    int rope_orig_max = 8192;                                               // llama3
    bool tied = false;    // tie_word_embeddings: lm_head is embed_tokens
    int dtype = DT_BF16;  // torch_dtype / dtype of the checkpoint
    int sliding_window = 0; // mistral: > 0 bands the causal mask (only matters beyond the window)
    int q_dim() const { return n_heads * head_dim; }
    int kv_dim() const { return n_kv_heads * head_dim; }
};

// the seven decoder linears of a layer, in this order everywhere (layouts, files, loops)
enum Proj { P_Q = 0, P_K, P_V, P_O, P_GATE, P_UP, P_DOWN, N_PROJ };
static const char* const PROJ_NAME[N_PROJ] = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};
static const char* const PROJ_MODULE[N_PROJ] = {"self_attn", "self_attn", "self_attn", "self_attn", "mlp", "mlp", "mlp"};
inline int proj_in(const Config& c, int p) { return p == P_O ? c.q_dim() : p == P_DOWN ? c.hidden_dim : c.dim; }
inline int proj_out(const Config& c, int p) {
    switch (p) { case P_Q: return c.q_dim(); case P_K: case P_V: return c.kv_dim(); case P_O: case P_DOWN: return c.dim; default: return c.hidden_dim; }
}

// RoPE inverse frequencies, as transformers computes them (formats.md §3.2, item 3):
// inv[j] = 1 / theta^(2j/d) in fp32, then llama3 or linear scaling.
inline void rope_inv_freq(float* inv /* (hd/2) */, const Config& c) {
    int d = c.head_dim;
    for (int j = 0; j < d / 2; j++) {
        float e = (float)(2 * j) / (float)d;                     // arange(0, d, 2).float() / d
        float f = 1.0f / powf(c.rope_theta, e);                  // 1.0 / base ** e, fp32
        if (c.rope_type == ROPE_LINEAR) f = f / c.rope_factor;
        if (c.rope_type == ROPE_LLAMA3) {
            float lo_wl = (float)c.rope_orig_max / c.rope_low_freq, hi_wl = (float)c.rope_orig_max / c.rope_high_freq;
            float wl = 2.0f * (float)M_PI / f;
            if (wl > lo_wl) f = f / c.rope_factor;
            else if (wl >= hi_wl) {
                float s = ((float)c.rope_orig_max / wl - c.rope_low_freq) / (c.rope_high_freq - c.rope_low_freq);
                f = (1.0f - s) * f / c.rope_factor + s * f;
            }
        }
        inv[j] = f;
    }
}

// ---------------------------------------------------------------------------------------------
// 6b. config.json -> Config (formats.md §2). Reads `rope_parameters` (transformers v5) first, else
// rope_theta + rope_scaling; `dtype` or `torch_dtype`. Anything we would compute wrongly is refused.

inline int dtype_from_torch_name(const std::string& s) {
    if (s == "bfloat16") return DT_BF16;
    if (s == "float16") return DT_F16;
    if (s == "float32") return DT_F32;
    return DT_NONE;
}
inline Config config_from_json(const Json& j, const std::string& path) {
    const char* p = path.c_str();
    ql_assert(j.type == Json::OBJ, "%s: expected a JSON object", p);
    auto num = [&](const char* k, double def, bool required) -> double {
        const Json* v = j.get(k);
        if (!v || v->type == Json::NUL) { ql_assert(!required, "%s: missing \"%s\"", p, k); return def; }
        ql_assert(v->type == Json::NUM, "%s: \"%s\" must be a number", p, k);
        return v->num;
    };
    auto integer = [&](const char* k, int def, bool required, int lo, int hi) -> int {
        double d = num(k, def, required);
        ql_assert(d == floor(d) && d >= lo && d <= hi, "%s: \"%s\" = %g is not an integer in [%d, %d]", p, k, d, lo, hi);
        return (int)d;
    };
    auto f32 = [&](double v, const char* k) -> float {   // checked first: a double beyond FLT_MAX has no float
        ql_assert(fabs(v) <= 3.4028234663852886e38, "%s: \"%s\" = %g is out of fp32 range", p, k, v);
        return (float)v;
    };
    auto flag = [&](const char* k, bool def) -> bool {
        const Json* v = j.get(k);
        if (!v || v->type == Json::NUL) return def;
        ql_assert(v->type == Json::BOOL, "%s: \"%s\" must be true or false", p, k);
        return v->b;
    };
    auto str = [&](const Json* o, const char* k) -> std::string {
        const Json* v = o ? o->get(k) : nullptr;
        if (!v || v->type == Json::NUL) return "";
        ql_assert(v->type == Json::STR, "%s: \"%s\" must be a string", p, k);
        return v->str;
    };
    std::string mt = str(&j, "model_type");
    ql_assert(mt == "llama" || mt == "mistral", "%s: model_type \"%s\" is not supported (llama, mistral)%s", p, mt.c_str(),
              mt == "qwen2" ? ": qwen2 has q/k/v biases, which qlora does not implement yet" : "");
    std::string act = str(&j, "hidden_act");
    ql_assert(act.empty() || act == "silu", "%s: hidden_act \"%s\" is not supported (silu only)", p, act.c_str());
    ql_assert(!flag("attention_bias", false), "%s: attention_bias = true is not supported (no biases on q/k/v/o)", p);
    ql_assert(!flag("mlp_bias", false), "%s: mlp_bias = true is not supported (no biases on gate/up/down)", p);
    Config c;
    c.dim = integer("hidden_size", 4096, true, 1, 1 << 17);
    c.hidden_dim = integer("intermediate_size", 11008, true, 1, 1 << 19);
    c.n_layers = integer("num_hidden_layers", 32, true, 1, 1024);
    c.n_heads = integer("num_attention_heads", 32, true, 1, 4096);
    c.n_kv_heads = integer("num_key_value_heads", c.n_heads, false, 1, 4096);
    ql_assert(c.n_heads % c.n_kv_heads == 0, "%s: num_attention_heads (%d) is not a multiple of num_key_value_heads (%d)", p, c.n_heads, c.n_kv_heads);
    ql_assert(c.dim % c.n_heads == 0 || j.get("head_dim"), "%s: hidden_size %d not divisible by num_attention_heads %d and no head_dim", p, c.dim, c.n_heads);
    c.head_dim = integer("head_dim", c.dim / c.n_heads, false, 2, 1024);
    ql_assert(c.head_dim % 2 == 0, "%s: head_dim %d must be even (RoPE rotates halves)", p, c.head_dim);
    c.vocab_size = integer("vocab_size", 32000, true, 1, 1 << 24);
    c.max_seq_len = integer("max_position_embeddings", 2048, false, 1, 1 << 24);
    c.norm_eps = f32(num("rms_norm_eps", 1e-6, false), "rms_norm_eps");
    ql_assert(c.norm_eps > 0 && c.norm_eps < 1, "%s: rms_norm_eps %g out of range", p, c.norm_eps);
    c.tied = flag("tie_word_embeddings", false);
    std::string dt = str(&j, "dtype"); if (dt.empty()) dt = str(&j, "torch_dtype");
    c.dtype = dt.empty() ? DT_BF16 : dtype_from_torch_name(dt);
    ql_assert(c.dtype != DT_NONE, "%s: dtype \"%s\" is not supported (bfloat16, float16, float32)", p, dt.c_str());
    const Json* sw = j.get("sliding_window");
    if (sw && sw->type == Json::NUM) c.sliding_window = integer("sliding_window", 0, false, 0, INT32_MAX);
    // RoPE: v5 rope_parameters, else rope_theta + rope_scaling ("type" is an alias of "rope_type")
    const Json* rp = j.get("rope_parameters");
    const Json* rs = (rp && rp->type == Json::OBJ) ? rp : j.get("rope_scaling");
    if (rs && rs->type != Json::NUL) ql_assert(rs->type == Json::OBJ, "%s: rope_scaling must be an object or null", p);
    if (rs && rs->type != Json::OBJ) rs = nullptr;
    const Json* th = (rp && rp->type == Json::OBJ && rp->get("rope_theta")) ? rp->get("rope_theta") : j.get("rope_theta");
    if (th && th->type != Json::NUL) { ql_assert(th->type == Json::NUM && th->num > 1, "%s: bad rope_theta", p); c.rope_theta = f32(th->num, "rope_theta"); }
    std::string rt = str(rs, "rope_type"); if (rt.empty()) rt = str(rs, "type");
    auto rnum = [&](const char* k, double def) -> double {
        const Json* v = rs ? rs->get(k) : nullptr;
        if (!v || v->type == Json::NUL) return def;
        ql_assert(v->type == Json::NUM, "%s: rope parameter \"%s\" must be a number", p, k);
        return v->num;
    };
    if (rt.empty() || rt == "default") c.rope_type = ROPE_DEFAULT;
    else if (rt == "linear") { c.rope_type = ROPE_LINEAR; c.rope_factor = f32(rnum("factor", 1.0), "factor"); }
    else if (rt == "llama3") {
        c.rope_type = ROPE_LLAMA3;
        ql_assert(rs->get("factor") && rs->get("low_freq_factor") && rs->get("high_freq_factor") && rs->get("original_max_position_embeddings"),
                  "%s: llama3 rope scaling needs factor, low_freq_factor, high_freq_factor, original_max_position_embeddings", p);
        c.rope_factor = f32(rnum("factor", 8), "factor"); c.rope_low_freq = f32(rnum("low_freq_factor", 1), "low_freq_factor");
        c.rope_high_freq = f32(rnum("high_freq_factor", 4), "high_freq_factor");
        double om = rnum("original_max_position_embeddings", 8192);   // range-checked before the cast to int
        ql_assert(om == floor(om) && om >= 1 && om <= (1 << 24), "%s: original_max_position_embeddings = %g is not an integer in [1, %d]", p, om, 1 << 24);
        c.rope_orig_max = (int)om;
        ql_assert(c.rope_high_freq > c.rope_low_freq, "%s: inconsistent llama3 rope scaling", p);
    } else ql_fail("%s: rope type \"%s\" is not supported (default, linear, llama3)", p, rt.c_str());
    ql_assert(c.rope_factor > 0, "%s: rope factor must be positive", p);
    return c;
}
inline Config load_config(const std::string& path) { return config_from_json(json_load(path), path); }

// ---------------------------------------------------------------------------------------------
// 7. safetensors (formats.md §1): `u64 N | N bytes JSON header | data`. Files are memory-mapped;
// the header is validated like the Rust reader: size limits, known dtypes, nbytes == numel*bits/8,
// tensors tile the data exactly (no holes, no overlap), nothing after the last tensor.
struct DTypeInfo { const char* name; int bits; int dt; };
static const DTypeInfo ST_DTYPES[] = {
    {"BF16", 16, DT_BF16}, {"F16", 16, DT_F16}, {"F32", 32, DT_F32}, {"U8", 8, DT_U8}, {"I32", 32, DT_I32},
    {"I64", 64, DT_I64}, {"BOOL", 8, DT_NONE}, {"I8", 8, DT_NONE}, {"I16", 16, DT_NONE}, {"U16", 16, DT_NONE},
    {"U32", 32, DT_NONE}, {"U64", 64, DT_NONE}, {"F64", 64, DT_NONE}, {"C64", 64, DT_NONE}, {"F8_E5M2", 8, DT_NONE},
    {"F8_E4M3", 8, DT_NONE}, {"F8_E8M0", 8, DT_NONE}, {"F8_E4M3FNUZ", 8, DT_NONE}, {"F8_E5M2FNUZ", 8, DT_NONE},
    {"F4", 4, DT_NONE}, {"F6_E2M3", 6, DT_NONE}, {"F6_E3M2", 6, DT_NONE}};
inline const char* dtype_name(int dt) { for (auto& d : ST_DTYPES) if (d.dt == dt) return d.name; return "?"; }
inline int dtype_bytes(int dt) { for (auto& d : ST_DTYPES) if (d.dt == dt) return d.bits / 8; return 0; }

struct MappedFile {   // read-only mmap of a whole file
    std::string path; const uint8_t* data = nullptr; size_t size = 0;
    MappedFile(const std::string& p);
    ~MappedFile();
    MappedFile(const MappedFile&) = delete; MappedFile& operator=(const MappedFile&) = delete;
};
#include <sys/mman.h>  // defines: mmap
#include <sys/stat.h>  // defines: fstat
#include <fcntl.h>     // defines: open
#include <unistd.h>    // defines: close, fsync
inline MappedFile::MappedFile(const std::string& p) : path(p) {
    int fd = open(p.c_str(), O_RDONLY);
    ql_assert(fd >= 0, "cannot open %s", p.c_str());
    struct stat sb;   // fd closed before any error: in throw mode (ql_error_mode) a failure must not leak it
    bool regular = fstat(fd, &sb) == 0 && S_ISREG(sb.st_mode);
    size = regular ? (size_t)sb.st_size : 0;
    void* m = size > 0 ? mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0) : nullptr;
    close(fd);
    ql_assert(regular, "%s: not a regular file", p.c_str());
    ql_assert(m != MAP_FAILED, "cannot map %s", p.c_str());
    data = (const uint8_t*)m;
}
inline MappedFile::~MappedFile() { if (data) munmap((void*)data, size); }

struct STensor {
    std::string name, file;          // file: the path it lives in, for error messages
    int dtype = DT_NONE; std::string dtype_str;
    std::vector<int64_t> shape;
    size_t nbytes = 0;
    const uint8_t* data = nullptr;   // into the mapped file
    int64_t numel() const { int64_t n = 1; for (int64_t d : shape) n *= d; return n; }
    std::string shape_str() const { std::string s = "["; for (size_t i = 0; i < shape.size(); i++) s += (i ? ", " : "") + std::to_string(shape[i]); return s + "]"; }
};

struct SafeTensors {
    std::vector<std::unique_ptr<MappedFile>> files;
    std::map<std::string, STensor> tensors;
    std::map<std::string, std::string> metadata;   // __metadata__ of the (first) file
    int n_parsed = 0;                              // files parsed so far (st_parse)
    const STensor* find(const std::string& name) const { auto it = tensors.find(name); return it == tensors.end() ? nullptr : &it->second; }
    // The tensor, which must exist with exactly this shape; dtype one of the float types unless given.
    const STensor& get(const std::string& name, std::vector<int64_t> shape, int want_dtype = -1) const {
        const STensor* t = find(name);
        ql_assert(t, "checkpoint is missing tensor \"%s\"%s", name.c_str(), files.empty() ? "" : (" (looked in " + files[0]->path + (files.size() > 1 ? " and its shards)" : ")")).c_str());
        ql_assert(t->shape == shape, "%s: tensor \"%s\" has shape %s, the config implies [%s]", t->file.c_str(), name.c_str(),
                  t->shape_str().c_str(), [&] { std::string s; for (size_t i = 0; i < shape.size(); i++) s += (i ? ", " : "") + std::to_string(shape[i]); return s; }().c_str());
        if (want_dtype >= 0) ql_assert(t->dtype == want_dtype, "%s: tensor \"%s\" has dtype %s, expected %s", t->file.c_str(), name.c_str(), t->dtype_str.c_str(), dtype_name(want_dtype));
        else ql_assert(t->dtype == DT_BF16 || t->dtype == DT_F16 || t->dtype == DT_F32, "%s: tensor \"%s\" has dtype %s; weights must be BF16, F16 or F32",
                       t->file.c_str(), name.c_str(), t->dtype_str.c_str());
        return *t;
    }
};

// Validate one file's header and add its tensors. err-free on success; on any violation, exit with a
// message naming the file and the tensor. `data` (size bytes, the whole file) must outlive st: the
// tensors point into it. `path` names the file in messages and in STensor::file.
inline void st_parse(SafeTensors& st, const uint8_t* data, size_t size, const std::string& path) {
    const bool first = st.n_parsed++ == 0;
    const char* p = path.c_str();
    ql_assert(size >= 8, "%s: not a safetensors file (%zu bytes, shorter than the 8-byte header length)", p, size);
    uint64_t hn = 0; for (int k = 7; k >= 0; k--) hn = (hn << 8) | data[k];
    ql_assert(hn <= 100000000ull, "%s: header length %llu exceeds the 100 MB limit (corrupt file?)", p, (unsigned long long)hn);
    ql_assert(8 + hn <= size, "%s: header length %llu runs past the end of the %zu-byte file (truncated?)", p, (unsigned long long)hn, size);
    ql_assert(hn >= 2 && data[8] == '{', "%s: header does not start with '{'", p);
    size_t hlen = (size_t)hn; while (hlen > 0 && data[8 + hlen - 1] == ' ') hlen--;  // trailing space padding
    Json h; std::string err;
    ql_assert(json_parse((const char*)data + 8, hlen, h, err), "%s: invalid header JSON: %s", p, err.c_str());
    ql_assert(h.type == Json::OBJ, "%s: header is not a JSON object", p);
    const uint64_t data_size = size - 8 - hn;
    struct Span { uint64_t b, e; std::string name; };
    std::vector<Span> spans;
    for (auto& kv : h.obj) {
        const std::string& name = kv.first; const Json& t = kv.second;
        if (name == "__metadata__") {
            ql_assert(t.type == Json::OBJ, "%s: __metadata__ must be an object", p);
            for (auto& m : t.obj) { ql_assert(m.second.type == Json::STR, "%s: __metadata__[\"%s\"] must be a string", p, m.first.c_str());
                                    if (first) st.metadata[m.first] = m.second.str; }
            continue;
        }
        const char* tn = name.c_str();
        ql_assert(t.type == Json::OBJ, "%s: tensor \"%s\": entry is not an object", p, tn);
        const Json *jd = t.get("dtype"), *js = t.get("shape"), *jo = t.get("data_offsets");
        ql_assert(jd && jd->type == Json::STR, "%s: tensor \"%s\": missing dtype", p, tn);
        ql_assert(js && js->type == Json::ARR, "%s: tensor \"%s\": missing shape", p, tn);
        ql_assert(jo && jo->type == Json::ARR && jo->arr.size() == 2 && jo->arr[0].is_uint && jo->arr[1].is_uint,
                  "%s: tensor \"%s\": data_offsets must be two non-negative integers", p, tn);
        STensor s; s.name = name; s.file = path; s.dtype_str = jd->str;
        int bits = 0;
        for (auto& d : ST_DTYPES) if (jd->str == d.name) { bits = d.bits; s.dtype = d.dt; }
        ql_assert(bits, "%s: tensor \"%s\": unknown dtype \"%s\"", p, tn, jd->str.c_str());
        uint64_t numel = 1;
        for (auto& d : js->arr) {
            ql_assert(d.is_uint && d.u < (1ull << 40), "%s: tensor \"%s\": shape entries must be non-negative integers", p, tn);
            s.shape.push_back((int64_t)d.u);
            ql_assert(d.u == 0 || numel <= (1ull << 50) / d.u, "%s: tensor \"%s\": shape too large", p, tn);
            numel *= d.u;
        }
        uint64_t b = jo->arr[0].u, e = jo->arr[1].u;
        ql_assert(b <= e, "%s: tensor \"%s\": data_offsets [%llu, %llu] are reversed", p, tn, (unsigned long long)b, (unsigned long long)e);
        ql_assert(numel * bits % 8 == 0, "%s: tensor \"%s\": %llu elements of %s do not fill whole bytes", p, tn, (unsigned long long)numel, jd->str.c_str());
        ql_assert(e - b == numel * bits / 8, "%s: tensor \"%s\": data_offsets span %llu bytes but shape %s of %s needs %llu",
                  p, tn, (unsigned long long)(e - b), s.shape_str().c_str(), jd->str.c_str(), (unsigned long long)(numel * bits / 8));
        ql_assert(e <= data_size, "%s: tensor \"%s\": data_offsets end %llu is past the data (%llu bytes; truncated file?)",
                  p, tn, (unsigned long long)e, (unsigned long long)data_size);
        ql_assert(!st.find(name), "%s: tensor \"%s\" appears in two files", p, tn);
        s.nbytes = (size_t)(e - b);
        s.data = data + 8 + hn + b;
        spans.push_back({b, e, name});
        st.tensors[name] = s;
    }
    std::sort(spans.begin(), spans.end(), [](const Span& x, const Span& y) { return x.b != y.b ? x.b < y.b : x.e < y.e; });
    uint64_t at = 0;
    for (auto& sp : spans) {
        ql_assert(sp.b == at, "%s: tensor \"%s\" starts at byte %llu of the data, expected %llu (%s)", p, sp.name.c_str(),
                  (unsigned long long)sp.b, (unsigned long long)at, sp.b < at ? "overlaps the previous tensor" : "a hole before it");
        at = sp.e;
    }
    ql_assert(at == data_size, "%s: %llu bytes after the last tensor (expected none)", p, (unsigned long long)(data_size - at));
}
inline void st_add_file(SafeTensors& st, const std::string& path) {
    st.files.emplace_back(new MappedFile(path));
    st_parse(st, st.files.back()->data, st.files.back()->size, path);
}
inline SafeTensors st_open(const std::string& path) { SafeTensors st; st_add_file(st, path); return st; }

// A sharded checkpoint's model.safetensors.index.json: which file holds each tensor.
struct STIndex {
    std::vector<std::pair<std::string, std::string>> weight_map;   // (tensor, shard file name), in file order
    std::vector<std::string> shards;                               // distinct shard file names, first-seen order
};
inline STIndex st_parse_index(const uint8_t* data, size_t size, const std::string& index) {
    Json j; std::string err;
    ql_assert(json_parse((const char*)data, size, j, err), "%s: invalid JSON: %s", index.c_str(), err.c_str());
    const Json* wm = j.get("weight_map");
    ql_assert(wm && wm->type == Json::OBJ, "%s: missing \"weight_map\" object", index.c_str());
    STIndex ix;
    std::set<std::string> seen;
    for (auto& kv : wm->obj) {
        ql_assert(kv.second.type == Json::STR, "%s: weight_map[\"%s\"] must be a file name", index.c_str(), kv.first.c_str());
        const std::string& fn = kv.second.str;
        ql_assert(!fn.empty() && fn.find('/') == std::string::npos && fn != "." && fn != "..",
                  "%s: weight_map[\"%s\"] = \"%s\" is not a plain file name", index.c_str(), kv.first.c_str(), fn.c_str());
        if (seen.insert(fn).second) ix.shards.push_back(fn);
        ix.weight_map.emplace_back(kv.first, fn);
    }
    return ix;
}
// Every tensor the index lists must be in the shard it names (st holds the shards, read from dir).
inline void st_check_index(const SafeTensors& st, const STIndex& ix, const std::string& dir, const std::string& index) {
    for (auto& kv : ix.weight_map) {
        const STensor* t = st.find(kv.first);
        ql_assert(t, "%s: index lists tensor \"%s\" in %s, but that file does not contain it", index.c_str(), kv.first.c_str(), kv.second.c_str());
        ql_assert(t->file == dir + "/" + kv.second, "%s: tensor \"%s\" is listed in %s but found in %s", index.c_str(), kv.first.c_str(), kv.second.c_str(), t->file.c_str());
    }
}
// A Hugging Face model directory: model.safetensors, or model.safetensors.index.json + shards.
inline SafeTensors st_open_model(const std::string& dir) {
    std::string single = dir + "/model.safetensors", index = dir + "/model.safetensors.index.json";
    if (!file_exists(index)) {
        ql_assert(file_exists(single), "%s: no model.safetensors or model.safetensors.index.json (is this a Hugging Face checkpoint directory?)", dir.c_str());
        return st_open(single);
    }
    std::vector<uint8_t> text = read_file(index);
    STIndex ix = st_parse_index(text.data(), text.size(), index);
    SafeTensors st;
    for (auto& fn : ix.shards) st_add_file(st, dir + "/" + fn);
    st_check_index(st, ix, dir, index);
    return st;
}

// Tensor -> fp32 (BF16, F16, F32 exactly), and integer tensors -> int32 (range-checked).
inline void st_to_f32(float* out, const STensor& t) {
    int64_t n = t.numel();
    for (int64_t i = 0; i < n; i++) {
        const uint8_t* q = t.data + i * dtype_bytes(t.dtype);
        if (t.dtype == DT_F32) { float v; memcpy(&v, q, 4); out[i] = v; }
        else if (t.dtype == DT_BF16) out[i] = bf16_to_f32((uint16_t)(q[0] | q[1] << 8));
        else if (t.dtype == DT_F16) out[i] = f16_to_f32((uint16_t)(q[0] | q[1] << 8));
        else ql_fail("%s: tensor \"%s\" has dtype %s, expected BF16, F16 or F32", t.file.c_str(), t.name.c_str(), t.dtype_str.c_str());
    }
}
inline std::vector<float> st_f32(const STensor& t) { std::vector<float> v((size_t)t.numel()); st_to_f32(v.data(), t); return v; }
inline std::vector<int32_t> st_i32(const STensor& t) {
    std::vector<int32_t> v((size_t)t.numel());
    for (size_t i = 0; i < v.size(); i++) {
        if (t.dtype == DT_I32) memcpy(&v[i], t.data + 4 * i, 4);
        else if (t.dtype == DT_I64) { int64_t x; memcpy(&x, t.data + 8 * i, 8);
            ql_assert(x >= INT32_MIN && x <= INT32_MAX, "%s: tensor \"%s\": value out of int32 range", t.file.c_str(), t.name.c_str()); v[i] = (int32_t)x; }
        else ql_fail("%s: tensor \"%s\" has dtype %s, expected I32 or I64", t.file.c_str(), t.name.c_str(), t.dtype_str.c_str());
    }
    return v;
}

// Writer: header padded with spaces to a multiple of 8, __metadata__ {"format": "pt"} always, tensors
// packed back to back in name order. Atomic: written to PATH.tmp, fsynced, renamed over PATH, so a
// crash or a full disk leaves the previous file intact.
struct STOut { std::string name; int dtype; std::vector<int64_t> shape; const void* data; };
inline bool write_all(FILE* f, const void* p, size_t n) {
    long long& budget = ql_error_mode().fail_writes_after;
    if (budget >= 0) { size_t k = n < (size_t)budget ? n : (size_t)budget; budget -= (long long)k; if (k < n) { if (k) fwrite(p, 1, k, f); return false; } }
    return n == 0 || fwrite(p, 1, n, f) == n;
}
inline void atomic_write(const std::string& path, const std::vector<std::pair<const void*, size_t>>& parts) {
    std::string tmp = path + ".tmp";
    FILE* f = fopen(tmp.c_str(), "wb");
    ql_assert(f, "cannot create %s (directory missing or not writable?)", tmp.c_str());
    bool ok = true;
    for (auto& pt : parts) ok = ok && write_all(f, pt.first, pt.second);
    ok = ok && fflush(f) == 0 && fsync(fileno(f)) == 0;
    ok = (fclose(f) == 0) && ok;
    if (!ok) { remove(tmp.c_str()); ql_fail("writing %s failed (disk full?); the previous %s is unchanged", tmp.c_str(), path.c_str()); }
    ql_assert(rename(tmp.c_str(), path.c_str()) == 0, "cannot rename %s to %s", tmp.c_str(), path.c_str());
}
inline void st_write(const std::string& path, std::vector<STOut> ts, std::map<std::string, std::string> meta = {}) {
    std::sort(ts.begin(), ts.end(), [](const STOut& a, const STOut& b) { return a.name < b.name; });
    meta["format"] = "pt";
    std::string h = "{\"__metadata__\":{";
    bool first = true;
    for (auto& m : meta) { h += (first ? "" : ",") + json_quote(m.first) + ":" + json_quote(m.second); first = false; }
    h += "}";
    uint64_t off = 0;
    std::vector<size_t> sizes;
    for (auto& t : ts) {
        size_t n = (size_t)dtype_bytes(t.dtype); for (int64_t d : t.shape) n *= (size_t)d;
        sizes.push_back(n);
        h += "," + json_quote(t.name) + ":{\"dtype\":\"" + dtype_name(t.dtype) + "\",\"shape\":[";
        for (size_t i = 0; i < t.shape.size(); i++) h += (i ? "," : "") + std::to_string(t.shape[i]);
        h += "],\"data_offsets\":[" + std::to_string(off) + "," + std::to_string(off + n) + "]}";
        off += n;
    }
    h += "}";
    while (h.size() % 8) h += ' ';
    uint8_t len[8]; for (int k = 0; k < 8; k++) len[k] = (uint8_t)((uint64_t)h.size() >> (8 * k));
    std::vector<std::pair<const void*, size_t>> parts = {{len, 8}, {h.data(), h.size()}};
    for (size_t i = 0; i < ts.size(); i++) parts.push_back({ts[i].data, sizes[i]});
    atomic_write(path, parts);
}

// Hugging Face tensor names (formats.md §3.1)
inline std::string hf_linear_name(int l, int p) { return "model.layers." + std::to_string(l) + "." + PROJ_MODULE[p] + "." + PROJ_NAME[p] + ".weight"; }
inline std::string hf_layer_name(int l, const char* what) { return "model.layers." + std::to_string(l) + "." + what + ".weight"; }
// ---------------------------------------------------------------------------------------------
// 8. LoRA: configuration and the one flat parameter layout shared by CPU, GPU and the files

struct LoraConfig {
    int rank = 16;
    float alpha = 32.0f;
    float dropout = 0.0f;
    bool rslora = false;
    unsigned targets = (1u << N_PROJ) - 1;   // bit p set: LoRA on projection p (default all seven)
    float scale() const { return rslora ? alpha / sqrtf((float)rank) : alpha / (float)rank; }
    bool has(int p) const { return (targets >> p) & 1; }
};

// Flat layout: for each layer l, for each targeted projection p (in Proj order): A (r, in), then B (out, r).
struct LoraSlot { size_t a, b; };  // element offsets of A and B
inline LoraSlot lora_slot(const Config& c, const LoraConfig& lc, int l, int p) {
    size_t off = 0;
    for (int ll = 0; ll <= l; ll++)
        for (int pp = 0; pp < N_PROJ; pp++) {
            if (!lc.has(pp)) continue;
            size_t na = (size_t)lc.rank * proj_in(c, pp), nb = (size_t)proj_out(c, pp) * lc.rank;
            if (ll == l && pp == p) return {off, off + na};
            off += na + nb;
        }
    return {(size_t)-1, (size_t)-1};
}
inline size_t lora_num_params(const Config& c, const LoraConfig& lc) {
    size_t per = 0;
    for (int p = 0; p < N_PROJ; p++) if (lc.has(p)) per += (size_t)lc.rank * (proj_in(c, p) + proj_out(c, p));
    return per * (size_t)c.n_layers;
}
// PEFT's init (formats.md §4.1): A ~ kaiming_uniform_(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)), B = 0.
// Our RNG, not torch's: the same seed gives the same adapter on the CPU and the GPU.
inline void lora_init(float* params, const Config& c, const LoraConfig& lc, uint64_t seed) {
    for (int l = 0; l < c.n_layers; l++)
        for (int p = 0; p < N_PROJ; p++) {
            if (!lc.has(p)) continue;
            LoraSlot s = lora_slot(c, lc, l, p);
            int in = proj_in(c, p), out = proj_out(c, p);
            float bound = 1.0f / sqrtf((float)in);
            for (size_t i = 0; i < (size_t)lc.rank * in; i++)
                params[s.a + i] = (2.0f * rng_uniform(seed, (uint64_t)(l * N_PROJ + p), i) - 1.0f) * bound;
            memset(params + s.b, 0, sizeof(float) * (size_t)out * lc.rank);
        }
}


// ---------------------------------------------------------------------------------------------
// 9. the checkpoint as the model sees it: every tensor it needs, shape-checked against the config
// up front, so a bad file fails before anything is allocated, naming the file and the tensor.

struct CheckpointView {
    const STensor* embed = nullptr;       // (V, H)
    const STensor* lm_head = nullptr;     // (V, H); == embed when tied
    const STensor* final_norm = nullptr;  // (H)
    std::vector<const STensor*> attn_norm, mlp_norm;        // (L) x (H)
    std::vector<std::vector<const STensor*>> w;             // (L) x (N_PROJ) x (out, in)
};
inline CheckpointView checkpoint_view(const Config& c, const SafeTensors& st) {
    CheckpointView v;
    int64_t V = c.vocab_size, H = c.dim;
    v.embed = &st.get("model.embed_tokens.weight", {V, H});
    // tied: lm_head is usually absent; some fine-tunes carry both, and embed_tokens wins (formats.md §2)
    v.lm_head = c.tied ? v.embed : &st.get("lm_head.weight", {V, H});
    v.final_norm = &st.get("model.norm.weight", {H});
    for (int l = 0; l < c.n_layers; l++) {
        v.attn_norm.push_back(&st.get(hf_layer_name(l, "input_layernorm"), {H}));
        v.mlp_norm.push_back(&st.get(hf_layer_name(l, "post_attention_layernorm"), {H}));
        v.w.emplace_back();
        for (int p = 0; p < N_PROJ; p++) v.w[l].push_back(&st.get(hf_linear_name(l, p), {proj_out(c, p), proj_in(c, p)}));
    }
    return v;
}
