// kernels/common.cuh: what every kernel header shares.
//   - bf16 typedef and fp32 <-> bf16 conversions (round to nearest even, like qlora.h's f32_to_bf16)
//   - cudaCheck / cublasCheck: every fallible CUDA or cuBLAS call, reported with file:line
//   - ceil_div, warp and block reductions (fixed order, so every reduction is bitwise deterministic)
//   - 16-byte vector loads/stores (Packed128), the unit of every memory-bound kernel here
//   - exact-rounding PTX helpers for code that must match the CPU reference bit for bit
// Numerics note: these kernels rely on IEEE sqrtf/division/sincosf/expf; --use_fast_math would
// silently change them (and the NF4 code, which spells out its fast-math PTX itself, needs none).
#pragma once
#include <stdio.h>          // defines: fprintf
#include <stdlib.h>         // defines: exit
#include <stdint.h>         // defines: uint8_t, int64_t
#include <string.h>         // defines: memcpy
#include <math.h>           // defines: INFINITY
#include <cuda_runtime.h>   // defines: cudaError_t, cudaStream_t
#include <cuda_bf16.h>      // defines: __nv_bfloat16, __float2bfloat16_rn
#include <cublasLt.h>       // defines: cublasStatus_t

#ifdef __USE_FAST_MATH__
#error "qlora kernels need IEEE math (accurate sincosf/expf/sqrtf/division): build without --use_fast_math"
#endif

typedef __nv_bfloat16 bf16;

// ---------------------------------------------------------------------------------------------
// error checking

inline void cuda_check(cudaError_t err, const char* file, int line) {
    if (err != cudaSuccess) {
        fprintf(stderr, "qlora: CUDA error at %s:%d: %s (%s)\n", file, line, cudaGetErrorString(err), cudaGetErrorName(err));
        if (err == cudaErrorMemoryAllocation)
            fprintf(stderr, "qlora: the GPU ran out of memory (another process using it? the plan printed at the start is all qlora\n"
                            "       allocates itself). Try --recompute, a smaller --batch or --seq. Checkpoints already written are\n"
                            "       intact (every save goes to a temporary file and is renamed).\n");
        exit(1);
    }
}
#define cudaCheck(err) cuda_check((err), __FILE__, __LINE__)

inline void cublas_check(cublasStatus_t status, const char* file, int line) {
    if (status != CUBLAS_STATUS_SUCCESS) {
        fprintf(stderr, "qlora: cuBLAS error %d at %s:%d\n", (int)status, file, line);
        exit(1);
    }
}
#define cublasCheck(status) cublas_check((status), __FILE__, __LINE__)

// A launcher's assumption about its arguments (divisibility, alignment), checked on the host.
#define kernel_assert(cond, ...) do { if (!(cond)) { fprintf(stderr, "qlora: kernel argument error at %s:%d: ", \
    __FILE__, __LINE__); fprintf(stderr, __VA_ARGS__); fprintf(stderr, "\n"); exit(1); } } while (0)

template <class T> __host__ __device__ constexpr T ceil_div(T a, T b) { return (a + b - 1) / b; }
inline bool is_aligned16(const void* p) { return ((uintptr_t)p & 15) == 0; }

// ---------------------------------------------------------------------------------------------
// conversions (cuda_bf16's intrinsics round to nearest even and keep NaN, as f32_to_bf16 does)

__device__ __forceinline__ float bf2f(bf16 x) { return __bfloat162float(x); }
__device__ __forceinline__ bf16 f2bf(float x) { return __float2bfloat16_rn(x); }
__device__ __forceinline__ float bf16r(float x) { return __bfloat162float(__float2bfloat16_rn(x)); }  // round through bf16

// Exact PTX arithmetic: inline asm cannot be contracted into an FMA and spells out the FTZ mode,
// whatever flags the file is built with.
// (Named ptx_* so they do not collide with qlora.h's host emulations mul_ftz / rcp_approx_ftz.)
__device__ __forceinline__ float ptx_mul_rn(float a, float b) { float r; asm("mul.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b)); return r; }
__device__ __forceinline__ float ptx_add_rn(float a, float b) { float r; asm("add.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b)); return r; }
__device__ __forceinline__ float ptx_sub_rn(float a, float b) { float r; asm("sub.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b)); return r; }
__device__ __forceinline__ float ptx_mul_ftz(float a, float b) { float r; asm("mul.rn.ftz.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b)); return r; }
__device__ __forceinline__ float ptx_rcp_approx_ftz(float a) { float r; asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(a)); return r; }

// ---------------------------------------------------------------------------------------------
// reductions. Butterfly shuffles: every lane ends with the same value, computed in a fixed order.

__device__ __forceinline__ float warp_reduce_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ double warp_reduce_sum(double v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_reduce_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
// Block-wide reductions: blockDim.x a multiple of 32 and at most 1024; every thread gets the
// result. Two __syncthreads, so consecutive calls may reuse the same scratch.
template <class T, class Op>
__device__ __forceinline__ T block_reduce(T v, Op op, T identity) {
    __shared__ T partial[32];
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
    for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
    __syncthreads();                       // partial[] may still be read by a previous call
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    v = lane < n_warps ? partial[lane] : identity;
    for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
struct SumOp { template <class T> __device__ T operator()(T a, T b) const { return a + b; } };
struct MaxOp { __device__ float operator()(float a, float b) const { return fmaxf(a, b); } };
__device__ __forceinline__ float block_reduce_sum(float v) { return block_reduce(v, SumOp(), 0.0f); }
__device__ __forceinline__ double block_reduce_sum(double v) { return block_reduce(v, SumOp(), 0.0); }
__device__ __forceinline__ float block_reduce_max(float v) { return block_reduce(v, MaxOp(), -INFINITY); }

// ---------------------------------------------------------------------------------------------
// 16-byte vectors (llm.c's Packed128): 8 bf16 or 4 floats per load/store instruction

template <class T>
struct alignas(16) Packed128 {
    static constexpr int size = 16 / sizeof(T);
    T v[size];
    Packed128() = default;
    __device__ explicit Packed128(int4 bits) { memcpy(v, &bits, 16); }
    __device__ int4 bits() const { int4 b; memcpy(&b, v, 16); return b; }
    __device__ T& operator[](int i) { return v[i]; }
    __device__ const T& operator[](int i) const { return v[i]; }
};
typedef Packed128<bf16> x128;   // 8 bf16
typedef Packed128<float> f128;  // 4 floats

template <class T> __device__ __forceinline__ Packed128<T> load128(const T* p) { return Packed128<T>(*(const int4*)p); }
// read-only through the non-coherent cache; use only for data no kernel writes in the same launch
template <class T> __device__ __forceinline__ Packed128<T> load128_nc(const T* p) { return Packed128<T>(__ldg((const int4*)p)); }
// streaming: evict-first, for data read exactly once
template <class T> __device__ __forceinline__ void store128(T* p, Packed128<T> x) { *(int4*)p = x.bits(); }
template <class T> __device__ __forceinline__ void store128cs(T* p, Packed128<T> x) { __stcs((int4*)p, x.bits()); }
