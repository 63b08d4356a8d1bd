// qlora.h: the core every part of qlora shares, the GPU kernels included (g++ and nvcc):
//   1. checked host helpers (errors name the file; no crash on bad input)
//   2. number formats: bf16/fp16 <-> fp32, counter-based RNG
//   3. the NF4/FP4 and dynamic-8-bit code tables, bit patterns from ../shared/spec/nf4.md
//   4. NF4/FP4 blockwise quantize/dequantize + double quantization, bit for bit as bitsandbytes
//   6. the model configuration (Config; config.json is read in formats.h) and RoPE frequencies
//   7. the model definition: every weight tensor, listed once (for_each_weight, WeightTable)
//   8. LoRA configuration and parameter layout, PEFT init, the learning-rate schedule
// The file formats are in formats.h, the checkpoint tools (quantize, merge) in tools.h, the flags of
// both trainers in options.h.
#pragma once
#include <stdint.h>     // defines: fixed-width ints
#include <stdio.h>      // defines: FILE, fprintf
#include <stdlib.h>     // defines: malloc, exit
#include <string.h>     // defines: memcpy, strcmp
#include <math.h>       // defines: sqrtf, cosf
#include <string>       // defines: std::string
#include <vector>       // defines: std::vector
#include <array>        // defines: std::array (WeightTable)
#include <memory>       // defines: std::unique_ptr
#include <sys/stat.h>   // defines: fstat, stat, S_ISREG
#include <unistd.h>     // defines: sysconf
#include <algorithm>    // defines: std::sort, std::find

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
inline QlErrorMode& ql_error_mode() {
    static QlErrorMode m;
    return m;
}
[[noreturn]] inline void ql_die() {
    if (ql_error_mode().throw_instead) throw QlError();
    exit(1);
}
#define ql_fail(...)                           \
    do {                                       \
        if (!ql_error_mode().quiet) {          \
            fprintf(stderr, "qlora: error: "); \
            fprintf(stderr, __VA_ARGS__);      \
            fprintf(stderr, "\n");             \
        }                                      \
        ql_die();                              \
    } while (0)
#define ql_assert(cond, ...)               \
    do {                                   \
        if (!(cond)) ql_fail(__VA_ARGS__); \
    } while (0)

// Refuses anything but a regular file by its stat, before it is opened: opening a FIFO for reading
// waits for a writer (forever), a directory opens and then sizes as LONG_MAX, a device never ends.
inline void require_regular_file(const std::string& path) {
    struct stat sb;
    ql_assert(stat(path.c_str(), &sb) == 0, "cannot open %s (no such file?)", path.c_str());
    ql_assert(S_ISREG(sb.st_mode), "%s: not a regular file (%s)", path.c_str(),
              S_ISDIR(sb.st_mode)    ? "a directory"
              : S_ISFIFO(sb.st_mode) ? "a FIFO: it would block until something writes to it"
                                     : "a device, socket or FIFO");
}

// Whole file into memory.
inline std::vector<uint8_t> read_file(const std::string& path) {
    require_regular_file(path);
    std::unique_ptr<FILE, int (*)(FILE*)> f(fopen(path.c_str(), "rb"), fclose);   // closed on a throwing ql_assert too
    ql_assert(f, "cannot open %s", path.c_str());
    struct stat sb;   // replaced between the stat and the open: checked again
    ql_assert(fstat(fileno(f.get()), &sb) == 0 && S_ISREG(sb.st_mode), "%s: not a regular file", path.c_str());
    ql_assert(fseek(f.get(), 0, SEEK_END) == 0, "cannot seek %s", path.c_str());
    long n = ftell(f.get());
    ql_assert(n >= 0 && fseek(f.get(), 0, SEEK_SET) == 0, "cannot size %s", path.c_str());
    std::vector<uint8_t> buf((size_t)n);
    ql_assert(n == 0 || fread(buf.data(), 1, (size_t)n, f.get()) == (size_t)n, "short read on %s", path.c_str());
    return buf;
}
// Something (file, directory, FIFO, ...) is at path: stat only, never an open (a FIFO would block).
inline bool file_exists(const std::string& path) {
    struct stat sb;
    return stat(path.c_str(), &sb) == 0;
}

// Bytes this process may still allocate on the host: /proc/meminfo's MemAvailable, or less under a
// cgroup (v2) limit. Both trainers plan their host memory against it.
inline double memory_available() {
    double avail = (double)sysconf(_SC_AVPHYS_PAGES) * (double)sysconf(_SC_PAGESIZE);
    if (FILE* f = fopen("/proc/meminfo", "r")) {
        char line[256];
        unsigned long long kb;
        while (fgets(line, sizeof line, f))
            if (sscanf(line, "MemAvailable: %llu kB", &kb) == 1) avail = 1024.0 * kb;
        fclose(f);
    }
    unsigned long long max_b = 0, cur_b = 0;
    FILE* m = fopen("/sys/fs/cgroup/memory.max", "r");
    FILE* c = fopen("/sys/fs/cgroup/memory.current", "r");
    if (m && c && fscanf(m, "%llu", &max_b) == 1 && fscanf(c, "%llu", &cur_b) == 1 && max_b > cur_b)
        avail = std::min(avail, (double)(max_b - cur_b));
    if (m) fclose(m);
    if (c) fclose(c);
    return avail;
}
// This process's peak resident host memory so far (VmHWM), in bytes; 0 if unknown.
inline double host_peak_rss() {
    double b = 0;
    if (FILE* f = fopen("/proc/self/status", "r")) {
        char line[256];
        unsigned long long kb;
        while (fgets(line, sizeof line, f))
            if (sscanf(line, "VmHWM: %llu kB", &kb) == 1) b = 1024.0 * kb;
        fclose(f);
    }
    return b;
}

// ---------------------------------------------------------------------------------------------
// 2. number formats

QL_HD inline uint32_t f32_bits(float x) {
    uint32_t u;
    memcpy(&u, &x, 4);
    return u;
}
QL_HD inline float bits_f32(uint32_t u) {
    float x;
    memcpy(&x, &u, 4);
    return x;
}

// bf16 is the top half of an fp32; round to nearest even, NaN stays NaN (quiet).
QL_HD inline uint16_t f32_to_bf16(float x) {
    uint32_t u = f32_bits(x);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1)) >> 16);
}
QL_HD inline float bf16_to_f32(uint16_t h) {
    return bits_f32((uint32_t)h << 16);
}
QL_HD inline float bf16_round(float x) {
    return bf16_to_f32(f32_to_bf16(x));
}

// IEEE binary16 -> fp32 (exact), fp32 -> binary16 (round to nearest even).
QL_HD inline float f16_to_f32(uint16_t h) {
    uint32_t s = (uint32_t)(h >> 15) << 31, e = (h >> 10) & 31, m = h & 1023;
    if (e == 31) return bits_f32(s | 0x7f800000u | (m << 13));
    if (e == 0) {
        float v = (float)m * (1.0f / 16777216.0f);
        return s ? -v : v;
    }   // m * 2^-24
    return bits_f32(s | ((e + 112) << 23) | (m << 13));
}
QL_HD inline uint16_t f32_to_f16(float x) {
    uint32_t u = f32_bits(x), s = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return (uint16_t)(s | 0x7fffu);    // NaN as CUDA's __float2half makes it
    if (a >= 0x477ff000u) return (uint16_t)(s | 0x7c00u);   // rounds to inf
    if (a < 0x38800000u) {                                  // subnormal or zero in f16
        float v = bits_f32(a) * 16777216.0f;                // exact scale by 2^24
        return (uint16_t)(s | (uint32_t)lrintf(v));         // RNE to an integer count of 2^-24
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

#define QL_NF4_LUT                                                                                                       \
    0xbf800000u, 0xbf3239b1u, 0xbf066b30u, 0xbeca32a0u, 0xbe91a24du, 0xbe3d353fu, 0xbdba7871u, 0x00000000u, 0x3da2faffu, \
        0x3e24cae3u, 0x3e7c04ddu, 0x3ead033au, 0x3ee1a4b8u, 0x3f1007abu, 0x3f3913b3u, 0x3f800000u
// kernel thresholds T0..T14: code = #{k : y > T[k]}. T0, T8, T12, T14 are 1 ulp off the fp32
// midpoints of the table: these are what nvcc makes of bitsandbytes' decimal literals.
#define QL_NF4_THRESH                                                                                                    \
    0xbf591cd9u, 0xbf1c5270u, 0xbeeb8480u, 0xbeadea76u, 0xbe703cecu, 0xbe0d38bcu, 0xbd3a7871u, 0x3d22faffu, 0x3df64863u, \
        0x3e5067e0u, 0x3e9582d4u, 0x3ec753f9u, 0x3f006d03u, 0x3f248dafu, 0x3f5c89d9u
// FP4: sign bit 8, low 3 bits index the magnitude; code 8 decodes to -0.0 (CUDA kernel).
#define QL_FP4_MAG    0x00000000u, 0x3baaaaabu, 0x3f2aaaabu, 0x3f800000u, 0x3eaaaaabu, 0x3f000000u, 0x3e2aaaabu, 0x3e800000u
#define QL_FP4_THRESH 0x3b2aaab9u, 0x3db00000u, 0x3e555555u, 0x3e955555u, 0x3ed55556u, 0x3f155550u, 0x3f555555u
#define QL_FP4_BUCKET 0, 1, 6, 7, 4, 5, 2, 3
// signed dynamic 8-bit map (create_dynamic_map()), used for the double-quantized absmax
#define QL_DYN8                                                                                                              \
    0xbf7e3333u, 0xbf7a999au, 0xbf770000u, 0xbf736666u, 0xbf6fcccdu, 0xbf6c3333u, 0xbf68999au, 0xbf650000u, 0xbf616666u,     \
        0xbf5dcccdu, 0xbf5a3333u, 0xbf56999au, 0xbf530000u, 0xbf4f6666u, 0xbf4bcccdu, 0xbf483333u, 0xbf44999au, 0xbf410000u, \
        0xbf3d6666u, 0xbf39cccdu, 0xbf363334u, 0xbf32999au, 0xbf2f0000u, 0xbf2b6666u, 0xbf27cccdu, 0xbf243334u, 0xbf20999au, \
        0xbf1d0000u, 0xbf196666u, 0xbf15cccdu, 0xbf123334u, 0xbf0e999au, 0xbf0b0000u, 0xbf076666u, 0xbf03ccccu, 0xbf003333u, \
        0xbef93332u, 0xbef20000u, 0xbeeaccccu, 0xbee3999au, 0xbedc6666u, 0xbed53333u, 0xbece0000u, 0xbec6ccccu, 0xbebf999au, \
        0xbeb86666u, 0xbeb13333u, 0xbeaa0000u, 0xbea2ccccu, 0xbe9b999au, 0xbe946666u, 0xbe8d3334u, 0xbe860000u, 0xbe7d9999u, \
        0xbe6f3333u, 0xbe60cccdu, 0xbe526666u, 0xbe440000u, 0xbe35999au, 0xbe273333u, 0xbe18cccdu, 0xbe0a6666u, 0xbdf80000u, \
        0xbddb3334u, 0xbdc9eb85u, 0xbdc428f7u, 0xbdbe6667u, 0xbdb8a3d7u, 0xbdb2e148u, 0xbdad1eb8u, 0xbda75c2au, 0xbda1999au, \
        0xbd9bd70au, 0xbd96147bu, 0xbd9051ebu, 0xbd8a8f5du, 0xbd84cccdu, 0xbd7e147bu, 0xbd728f5du, 0xbd670a3du, 0xbd5b851fu, \
        0xbd500000u, 0xbd447ae1u, 0xbd38f5c3u, 0xbd2d70a3u, 0xbd21eb85u, 0xbd166667u, 0xbd0ae148u, 0xbcfeb852u, 0xbce7ae15u, \
        0xbcd0a3d7u, 0xbcb9999au, 0xbca28f5du, 0xbc8b851fu, 0xbc68f5c3u, 0xbc3ae148u, 0xbc1f3b64u, 0xbc160418u, 0xbc0ccccdu, \
        0xbc039581u, 0xbbf4bc6au, 0xbbe24dd3u, 0xbbcfdf3bu, 0xbbbd70a4u, 0xbbab020du, 0xbb989374u, 0xbb8624ddu, 0xbb676c8au, \
        0xbb428f5cu, 0xbb1db22du, 0xbaf1a9fcu, 0xbaa7ef9du, 0xba7765ffu, 0xba59e83eu, 0xba3c6a80u, 0xba1eecc1u, 0xba016f01u, \
        0xb9c7e283u, 0xb98ce705u, 0xb923d70bu, 0xb8ba1f4bu, 0xb88aefb3u, 0xb8378034u, 0xb7b24206u, 0xb70205ffu, 0xb65a1a94u, \
        0xb513a3b7u, 0x00000000u, 0x3513a3b7u, 0x365a1a94u, 0x370205ffu, 0x37b24206u, 0x38378034u, 0x388aefb3u, 0x38ba1f4bu, \
        0x3923d70bu, 0x398ce705u, 0x39c7e283u, 0x3a016f01u, 0x3a1eecc1u, 0x3a3c6a80u, 0x3a59e83eu, 0x3a7765ffu, 0x3aa7ef9du, \
        0x3af1a9fcu, 0x3b1db22du, 0x3b428f5cu, 0x3b676c8au, 0x3b8624ddu, 0x3b989374u, 0x3bab020du, 0x3bbd70a4u, 0x3bcfdf3bu, \
        0x3be24dd3u, 0x3bf4bc6au, 0x3c039581u, 0x3c0ccccdu, 0x3c160418u, 0x3c1f3b64u, 0x3c3ae148u, 0x3c68f5c3u, 0x3c8b851fu, \
        0x3ca28f5du, 0x3cb9999au, 0x3cd0a3d7u, 0x3ce7ae15u, 0x3cfeb852u, 0x3d0ae148u, 0x3d166667u, 0x3d21eb85u, 0x3d2d70a3u, \
        0x3d38f5c3u, 0x3d447ae1u, 0x3d500000u, 0x3d5b851fu, 0x3d670a3du, 0x3d728f5du, 0x3d7e147bu, 0x3d84cccdu, 0x3d8a8f5du, \
        0x3d9051ebu, 0x3d96147bu, 0x3d9bd70au, 0x3da1999au, 0x3da75c2au, 0x3dad1eb8u, 0x3db2e148u, 0x3db8a3d7u, 0x3dbe6667u, \
        0x3dc428f7u, 0x3dc9eb85u, 0x3ddb3334u, 0x3df80000u, 0x3e0a6666u, 0x3e18cccdu, 0x3e273333u, 0x3e35999au, 0x3e440000u, \
        0x3e526666u, 0x3e60cccdu, 0x3e6f3333u, 0x3e7d9999u, 0x3e860000u, 0x3e8d3334u, 0x3e946666u, 0x3e9b999au, 0x3ea2ccccu, \
        0x3eaa0000u, 0x3eb13333u, 0x3eb86666u, 0x3ebf999au, 0x3ec6ccccu, 0x3ece0000u, 0x3ed53333u, 0x3edc6666u, 0x3ee3999au, \
        0x3eeaccccu, 0x3ef20000u, 0x3ef93332u, 0x3f003333u, 0x3f03ccccu, 0x3f076666u, 0x3f0b0000u, 0x3f0e999au, 0x3f123334u, \
        0x3f15cccdu, 0x3f196666u, 0x3f1d0000u, 0x3f20999au, 0x3f243334u, 0x3f27cccdu, 0x3f2b6666u, 0x3f2f0000u, 0x3f32999au, \
        0x3f363334u, 0x3f39cccdu, 0x3f3d6666u, 0x3f410000u, 0x3f44999au, 0x3f483333u, 0x3f4bcccdu, 0x3f4f6666u, 0x3f530000u, \
        0x3f56999au, 0x3f5a3333u, 0x3f5dcccdu, 0x3f616666u, 0x3f650000u, 0x3f68999au, 0x3f6c3333u, 0x3f6fcccdu, 0x3f736666u, \
        0x3f770000u, 0x3f7a999au, 0x3f7e3333u, 0x3f800000u

static const uint32_t NF4_LUT_BITS[16] = {QL_NF4_LUT};
static const uint32_t NF4_THRESH_BITS[15] = {QL_NF4_THRESH};
static const uint32_t FP4_MAG_BITS[8] = {QL_FP4_MAG};
static const uint32_t FP4_THRESH_BITS[7] = {QL_FP4_THRESH};
static const uint8_t FP4_BUCKET_CODE[8] = {QL_FP4_BUCKET};
static const uint32_t DYN8_BITS[256] = {QL_DYN8};
static_assert(sizeof(NF4_LUT_BITS) == 64 && sizeof(DYN8_BITS) == 1024, "code tables");

enum QuantType { QT_NF4 = 0, QT_FP4 = 1 };
// the trainer's 4-bit format: NF4 in blocks of 64 (bitsandbytes' default), double-quantized
static const int NF4_BLOCKSIZE = 64;
inline const char* quant_type_name(int qt) {
    return qt == QT_NF4 ? "nf4" : "fp4";
}
inline bool valid_blocksize_4bit(int bs) {
    for (int b = 32; b <= 4096; b *= 2)
        if (b == bs) return true;
    return false;
}
QL_HD inline float code4_value(int qt, int q) {   // LUT[q] as the CUDA dequant kernel decodes it
    if (qt == QT_NF4) {
        const uint32_t t[16] = {QL_NF4_LUT};
        return bits_f32(t[q & 15]);
    }
    const uint32_t m[8] = {QL_FP4_MAG};
    float v = bits_f32(m[q & 7]);
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

struct RcpTable {
    std::vector<uint8_t> delta;
    bool warned = false;
};   // 2 bits per mantissa
inline RcpTable& rcp_table() {
    static RcpTable t;
    return t;
}
inline bool rcp_table_load(const std::string& path) {
    if (!file_exists(path)) return false;
    std::vector<uint8_t> d = read_file(path);
    ql_assert(d.size() == (1u << 21),
              "%s: expected 2097152 bytes (2 bits per fp32 mantissa), got %zu; "
              "regenerate it with dev/cuda/rcp_table.cu",
              path.c_str(), d.size());
    rcp_table().delta.swap(d);
    return true;
}
// rcp.approx.ftz.f32
inline float rcp_approx_ftz(float a) {
    uint32_t u = f32_bits(a), e = (u >> 23) & 255, m = u & 0x7fffffu, s = u & 0x80000000u;
    if (a != a) return a;
    if (e == 0) return bits_f32(s | 0x7f800000u);              // 0 and subnormals -> inf
    if (e == 255) return bits_f32(s);                          // inf -> 0
    if (e > 253 || (e == 253 && m != 0)) return bits_f32(s);   // result subnormal -> flushed
    float r = 1.0f / a;
    RcpTable& t = rcp_table();
    if (t.delta.empty()) {
        if (!t.warned) {
            t.warned = true;
            fprintf(stderr,
                    "qlora: note: data/rcp_delta.bin not loaded; CPU "
                    "quantization uses IEEE 1/x (exact for NF4 from bf16/fp16, may differ from bitsandbytes elsewhere)\n");
        }
        return r;
    }
    int d = (t.delta[m >> 2] >> (2 * (m & 3))) & 3;   // 0: equal, 1: +1 ulp, 3: -1 ulp
    return bits_f32(f32_bits(r) + (d == 1 ? 1 : d == 3 ? (uint32_t)-1 : 0));
}
// NVIDIA arithmetic returns this one NaN for every invalid operation (x86 returns -NaN, 0xffc00000)
inline float gpu_nan() {
    return bits_f32(0x7fffffffu);
}
inline float gpu_add(float a, float b) {
    float r = a + b;
    return r != r ? gpu_nan() : r;
}
// mul.ftz.f32: the exact product is formed in double (24x24 bits fit), flushed to signed zero
// if its magnitude is below 2^-126 before rounding, else rounded once to fp32.
inline float mul_ftz(float a, float b) {
    if (fabsf(a) < 1.17549435e-38f) a = copysignf(0.0f, a);   // ftz inputs
    if (fabsf(b) < 1.17549435e-38f) b = copysignf(0.0f, b);
    double p = (double)a * (double)b;
    if (p != p) return gpu_nan();
    if (fabs(p) < 1.1754943508222875e-38) return copysignf(0.0f, (float)p);
    return (float)p;
}
inline float ftz(float x) {
    return fabsf(x) < 1.17549435e-38f ? copysignf(0.0f, x) : x;
}

inline uint8_t nf4_code(float y) {
    int c = 0;
    for (int k = 0; k < 15; k++) c += y > bits_f32(NF4_THRESH_BITS[k]);
    return (uint8_t)c;
}
inline uint8_t fp4_code(float y) {
    uint8_t sign = y < 0 ? 8 : 0;
    float a = fabsf(y);
    int b = 0;
    for (int j = 0; j < 7; j++) b += a > bits_f32(FP4_THRESH_BITS[j]);
    return (uint8_t)(sign | FP4_BUCKET_CODE[b]);
}
// dQuantize<0> of bitsandbytes: binary search over the 256-entry map from pivot 127, then the
// nearest of the bracketing entries by fp32 midpoint. NaN ends at code 0.
inline uint8_t dyn8_code(float x) {
    float code[256];
    for (int i = 0; i < 256; i++) code[i] = bits_f32(DYN8_BITS[i]);
    int pivot = 127, upper_pivot = 255, lower_pivot = 0;
    float lower = -1.0f, upper = 1.0f, val = code[pivot];
    for (int i = 64; i > 0; i >>= 1) {
        if (x > val) {
            lower_pivot = pivot;
            lower = val;
            pivot += i;
        } else {
            upper_pivot = pivot;
            upper = val;
            pivot -= i;
        }
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
    double s = 0;
    for (int64_t i = 0; i < nb; i++) s += absmax[i];
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
    int qt = QT_NF4, bs = NF4_BLOCKSIZE;
    bool nested = true;
    int64_t n = 0;                   // elements of the original [out, in] weight
    std::vector<uint8_t> packed;     // ((n+1)/2) codes, high nibble first
    std::vector<float> absmax;       // (n_blocks) fp32; when nested, reconstructed from the three below
    std::vector<uint8_t> absmax_q;   // (n_blocks) 8-bit codes (nested only)
    std::vector<float> absmax2;      // (ceil(n_blocks/256)) (nested only)
    float offset = 0.0f;             // mean of the original absmax (nested only)
    int64_t n_blocks() const { return (n + bs - 1) / bs; }
};
inline Quant4 quantize_weight(const float* x, int64_t n, int qt = QT_NF4, int bs = NF4_BLOCKSIZE, bool nested = true,
                              const float* offset_in = nullptr) {
    ql_assert(valid_blocksize_4bit(bs), "4-bit blocksize %d not supported (32, 64, ..., 4096)", bs);
    Quant4 q;
    q.qt = qt;
    q.bs = bs;
    q.nested = nested;
    q.n = n;
    q.packed.resize((size_t)((n + 1) / 2));
    q.absmax.resize((size_t)q.n_blocks());
    quantize_4bit(q.packed.data(), q.absmax.data(), x, n, qt, bs);
    if (nested) {
        int64_t nb = q.n_blocks();
        q.absmax_q.resize((size_t)nb);
        q.absmax2.resize((size_t)((nb + DQ_BLOCK - 1) / DQ_BLOCK));
        quantize_absmax(q.absmax_q.data(), q.absmax2.data(), &q.offset, q.absmax.data(), nb, offset_in);
        dequantize_absmax(q.absmax.data(), q.absmax_q.data(), q.absmax2.data(), q.offset, nb);
    }
    return q;
}
// fp32 values of the dequantized weight (round with f32_to_bf16 for a bf16 model)
inline void dequantize_weight(float* out, const Quant4& q) {
    dequantize_4bit(out, q.packed.data(), q.absmax.data(), q.n, q.qt, q.bs);
}

// ---------------------------------------------------------------------------------------------
// ---------------------------------------------------------------------------------------------
// 6. model configuration (Llama family: llama, mistral, qwen2, qwen3), filled from config.json by load_config() (formats.h)

enum RopeType { ROPE_DEFAULT = 0, ROPE_LINEAR = 1, ROPE_LLAMA3 = 2 };
enum DType { DT_BF16 = 0, DT_F16 = 1, DT_F32 = 2, DT_U8 = 3, DT_I32 = 4, DT_I64 = 5, DT_NONE = 6 };

struct Config {
    int dim = 0;           // H   hidden_size
    int hidden_dim = 0;    // I   intermediate_size
    int n_layers = 0;      // L   num_hidden_layers
    int n_heads = 0;       // nh  num_attention_heads
    int n_kv_heads = 0;    // nkv num_key_value_heads
    int head_dim = 0;      // hd  head_dim (H/nh when absent)
    int vocab_size = 0;    // V
    int max_seq_len = 0;   // max_position_embeddings
    float norm_eps = 1e-6f;
    float rope_theta = 10000.0f;
    int rope_type = ROPE_DEFAULT;
    float rope_factor = 1.0f, rope_low_freq = 1.0f, rope_high_freq = 4.0f;   // linear / llama3
    int rope_orig_max = 8192;                                                // llama3
    bool tied = false;                                                       // tie_word_embeddings: lm_head is embed_tokens
    int dtype = DT_BF16;                                                     // torch_dtype / dtype of the checkpoint
    int sliding_window = 0;   // mistral, qwen2/3: > 0 bands the causal mask (only matters beyond the window)
    bool qkv_bias = false;    // q_proj, k_proj, v_proj add a bias: qwen2 always; llama/qwen3 attention_bias
    bool o_bias = false;      // o_proj adds a bias: llama/qwen3 attention_bias (never qwen2)
    bool qk_norm = false;     // qwen3: q_norm/k_norm, an RMSNorm over head_dim of each head of q and k, before RoPE
    int q_dim() const { return n_heads * head_dim; }
    int kv_dim() const { return n_kv_heads * head_dim; }
};

// what the model line prints after the sizes: " tied qkv-bias o-bias qk-norm", those that apply
inline std::string config_tags(const Config& c) {
    std::string s;
    if (c.tied) s += " tied";
    if (c.qkv_bias) s += " qkv-bias";
    if (c.o_bias) s += " o-bias";
    if (c.qk_norm) s += " qk-norm";
    return s;
}

// the seven decoder linears of a layer, in this order everywhere (layouts, files, loops)
enum Proj { P_Q = 0, P_K, P_V, P_O, P_GATE, P_UP, P_DOWN, N_PROJ };
static const char* const PROJ_NAME[N_PROJ] = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};
static const char* const PROJ_MODULE[N_PROJ] = {"self_attn", "self_attn", "self_attn", "self_attn", "mlp", "mlp", "mlp"};
// y = x·Wᵀ + b: which projections carry a bias (qwen2: q, k, v; attention_bias: q, k, v, o; gate/up/down never)
inline bool proj_has_bias(const Config& c, int p) {
    return p <= P_V ? c.qkv_bias : p == P_O ? c.o_bias : false;
}
inline int proj_in(const Config& c, int p) {
    return p == P_O ? c.q_dim() : p == P_DOWN ? c.hidden_dim : c.dim;
}
inline int proj_out(const Config& c, int p) {
    switch (p) {
        case P_Q:
            return c.q_dim();
        case P_K:
        case P_V:
            return c.kv_dim();
        case P_O:
        case P_DOWN:
            return c.dim;
        default:
            return c.hidden_dim;
    }
}

// RoPE inverse frequencies, as transformers computes them (formats.md §3.2, item 3):
// inv[j] = 1 / theta^(2j/d) in fp32, then llama3 or linear scaling.
inline void rope_inv_freq(float* inv /* (hd/2) */, const Config& c) {
    int d = c.head_dim;
    for (int j = 0; j < d / 2; j++) {
        float e = (float)(2 * j) / (float)d;      // arange(0, d, 2).float() / d
        float f = 1.0f / powf(c.rope_theta, e);   // 1.0 / base ** e, fp32
        if (c.rope_type == ROPE_LINEAR) f = f / c.rope_factor;
        if (c.rope_type == ROPE_LLAMA3) {
            float lo_wl = (float)c.rope_orig_max / c.rope_low_freq, hi_wl = (float)c.rope_orig_max / c.rope_high_freq;
            float wl = 2.0f * (float)M_PI / f;
            if (wl > lo_wl)
                f = f / c.rope_factor;
            else if (wl >= hi_wl) {
                float s = ((float)c.rope_orig_max / wl - c.rope_low_freq) / (c.rope_high_freq - c.rope_low_freq);
                f = (1.0f - s) * f / c.rope_factor + s * f;
            }
        }
        inv[j] = f;
    }
}

// ---------------------------------------------------------------------------------------------
// 7. the model definition: every weight tensor of the model, listed once
//
// for_each_weight(c, fn) calls fn(w) for each weight of the model: embed_tokens; per layer its norms
// (with qwen3's q_norm/k_norm), then its seven linears, each followed by its bias if it has one; the
// final norm; lm_head (not when tied). The checkpoint readers and writers, the memory plan, the GPU
// loader and the CPU reference all walk this one list and keep what it names in a WeightTable. A new
// tensor (a QK-norm, a bias) is a WeightId and a line in for_each_weight, plus the ops that read it.

// The dense tensors (kept as stored, in bf16 on the GPU and fp32 on the CPU): the model's own, then
// each layer's. The decoder linears (frozen, 4-bit, LoRA targets) are the Proj values above. Biases
// are dense too: copied as stored, never quantized, never trained (PEFT's bias="none").
enum WeightId {
    W_EMBED,
    W_FINAL_NORM,
    W_LM_HEAD,   // layer -1
    W_ATTN_NORM,
    W_MLP_NORM,   // in every layer
    W_Q_BIAS,
    W_K_BIAS,
    W_V_BIAS,
    W_O_BIAS,   // (q_dim), (kv_dim), (kv_dim), (H): where proj_has_bias
    W_Q_NORM,
    W_K_NORM,   // (hd) each: where qk_norm
    N_WEIGHT_IDS
};
inline int proj_bias_id(int p) {
    return p <= P_O ? W_Q_BIAS + p : -1;
}   // the WeightId of projection p's bias
static_assert(W_Q_BIAS + P_K == W_K_BIAS && W_Q_BIAS + P_V == W_V_BIAS && W_Q_BIAS + P_O == W_O_BIAS, "bias ids follow Proj order");

struct Weight {
    int layer;                    // 0..L-1, or -1: outside the layers
    int id;                       // WeightId of a dense tensor, or -1 for a linear
    int proj;                     // Proj of a decoder linear, or -1
    std::string name;             // Hugging Face tensor name
    std::vector<int64_t> shape;   // (out, in) of a linear; (H) of a norm; (V, H) of the embeddings
    bool linear() const { return proj >= 0; }
    bool bias() const { return id >= W_Q_BIAS && id <= W_O_BIAS; }   // random init: 0 (norms 1, matrices N(0, 0.02))
    int64_t numel() const {
        int64_t n = 1;
        for (int64_t d : shape) n *= d;
        return n;
    }
};

// Hugging Face tensor names (formats.md §3.1)
inline std::string hf_layer_prefix(int l) {
    return "model.layers." + std::to_string(l) + ".";
}
inline std::string hf_linear_name(int l, int p) {
    return hf_layer_prefix(l) + PROJ_MODULE[p] + "." + PROJ_NAME[p] + ".weight";
}

template <class F>
void for_each_weight(const Config& c, F fn) {
    int64_t V = c.vocab_size, H = c.dim;
    auto dense = [&](int l, int id, const std::string& name, std::vector<int64_t> shape) {
        fn(Weight{l, id, -1, (l < 0 ? "" : hf_layer_prefix(l)) + name, shape});
    };
    dense(-1, W_EMBED, "model.embed_tokens.weight", {V, H});
    for (int l = 0; l < c.n_layers; l++) {
        dense(l, W_ATTN_NORM, "input_layernorm.weight", {H});
        dense(l, W_MLP_NORM, "post_attention_layernorm.weight", {H});
        if (c.qk_norm) {
            dense(l, W_Q_NORM, "self_attn.q_norm.weight", {c.head_dim});
            dense(l, W_K_NORM, "self_attn.k_norm.weight", {c.head_dim});
        }
        for (int p = 0; p < N_PROJ; p++) {
            fn(Weight{l, -1, p, hf_linear_name(l, p), {proj_out(c, p), proj_in(c, p)}});
            if (proj_has_bias(c, p))
                dense(l, proj_bias_id(p), std::string(PROJ_MODULE[p]) + "." + PROJ_NAME[p] + ".bias", {proj_out(c, p)});
        }
    }
    dense(-1, W_FINAL_NORM, "model.norm.weight", {H});
    if (!c.tied) dense(-1, W_LM_HEAD, "lm_head.weight", {V, H});   // tied: lm_head is embed_tokens
}

// What a reader or a device keeps of each weight: D per dense tensor, Q per linear.
template <class D, class Q>
struct WeightTable {
    bool tied = false;
    std::vector<std::array<D, N_WEIGHT_IDS>> dense;   // (L+1): [0] the model's own, [1 + l] layer l's
    std::vector<std::array<Q, N_PROJ>> linear;        // (L) x 7
    // fd(w, D&) / fq(w, Q&) for every weight of for_each_weight, each with its own slot
    template <class FD, class FQ>
    void fill(const Config& c, FD fd, FQ fq) {
        tied = c.tied;
        dense.assign((size_t)c.n_layers + 1, {});
        linear.assign((size_t)c.n_layers, {});
        for_each_weight(c, [&](const Weight& w) {
            if (w.linear())
                fq(w, linear[w.layer][w.proj]);
            else
                fd(w, dense[w.layer + 1][w.id]);
        });
    }
    D& at(int id, int layer = -1) { return dense[layer + 1][id]; }
    const D& at(int id, int layer = -1) const { return dense[layer + 1][id]; }
    const D& lm_head() const { return at(tied ? W_EMBED : W_LM_HEAD); }   // (V, H): embed_tokens when tied
};

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

// --targets "q,k,v,o,gate,up,down" (short or full names, each once) -> LoraConfig::targets bits
inline unsigned lora_targets_parse(const std::string& s) {
    unsigned t = 0;
    size_t a = 0;
    while (a <= s.size()) {
        size_t b = s.find(',', a);
        if (b == std::string::npos) b = s.size();
        std::string name = s.substr(a, b - a);
        int p = -1;
        for (int k = 0; k < N_PROJ; k++)
            if (name == PROJ_NAME[k] || name + "_proj" == PROJ_NAME[k]) p = k;
        ql_assert(p >= 0, "--targets: unknown projection \"%s\" (q,k,v,o,gate,up,down)", name.c_str());
        ql_assert(!(t >> p & 1), "--targets %s: %s is named twice", s.c_str(), PROJ_NAME[p]);
        t |= 1u << p;
        a = b + 1;
    }
    return t;
}
inline std::string lora_targets_text(unsigned targets) {   // "q_proj,k_proj,..."
    std::string s;
    for (int p = 0; p < N_PROJ; p++)
        if (targets >> p & 1) s += (s.empty() ? "" : ",") + std::string(PROJ_NAME[p]);
    return s;
}
// learning rate at step (0-based): linear warmup over `warmup` steps, then cosine down to min_frac*lr
inline float lr_schedule(int step, int steps, int warmup, float lr, float min_frac) {
    if (step < warmup) return lr * (step + 1) / warmup;
    float p = steps > warmup ? (float)(step - warmup) / (float)(steps - warmup) : 1.0f;
    return lr * (min_frac + (1 - min_frac) * 0.5f * (1 + cosf((float)M_PI * p)));
}

// Flat layout: for each layer l, the A (r, in) of every targeted projection in Proj order, then
// their B (out, r). The A's of projections that read the same input (q|k|v, gate|up) are adjacent,
// so they form one (g*r, in) matrix: one GEMM computes x·Aᵀ for the whole group.
struct LoraSlot {
    size_t a, b;
};   // element offsets of A and B
inline LoraSlot lora_slot(const Config& c, const LoraConfig& lc, int l, int p) {
    if (!lc.has(p)) return {(size_t)-1, (size_t)-1};
    size_t a = 0, b = 0, all_a = 0, per = 0;
    for (int pp = 0; pp < N_PROJ; pp++) {
        if (!lc.has(pp)) continue;
        size_t na = (size_t)lc.rank * proj_in(c, pp), nb = (size_t)proj_out(c, pp) * lc.rank;
        if (pp < p) {
            a += na;
            b += nb;
        }
        all_a += na;
        per += na + nb;
    }
    size_t base = per * (size_t)l;
    return {base + a, base + all_a + b};
}
inline size_t lora_num_params(const Config& c, const LoraConfig& lc) {
    size_t per = 0;
    for (int p = 0; p < N_PROJ; p++)
        if (lc.has(p)) per += (size_t)lc.rank * (proj_in(c, p) + proj_out(c, p));
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
