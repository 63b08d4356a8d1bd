// kernels/wgmma.cuh: Hopper warpgroup matrix multiply (wgmma, sm_90a) for bf16 tiles in shared memory.
//
// A warpgroup (4 consecutive warps, 128 threads) computes D (64 x N, fp32, registers) += A (64 x 16) B (16 x N)
// per instruction, asynchronously: issue, commit, wait. B always comes from shared memory through a 64-bit
// descriptor; A from shared memory too, or from registers (the mma.sync A-fragment layout per warp).
//
// Shared-memory tiles here use the 128-byte swizzle (CUTLASS's Swizzle<3,4,3>): a tile of R rows x 64 bf16
// (128 bytes a row) is stored row after row, and the 16-byte chunk c of row r sits at chunk c ^ (r % 8).
// Wider rows (hd 128) are split into column blocks of 64, each block R x 128 bytes, one after the other.
// Every block starts 1024-byte aligned (the swizzle works on address bits 4-6 xor 7-9).
// The same tile serves both ways:
//   K-major  (the contraction runs along the row, e.g. K in S = Q K^T): 8-row groups 1024 bytes apart (SBO);
//            the k-th 16-wide slice starts at block (k / 4), byte (k % 4) * 32 of it; LBO unused.
//   MN-major (the contraction runs down the rows, e.g. dO in dV = P^T dO, "transposed"): a k16 slice is 16
//            rows = two 8-row groups SBO = 1024 bytes apart, starting at row 16 k; N (or M) beyond 64 moves
//            to the next column block, LBO = R * 128 bytes.
//
// Accumulator layout (m64nN, fp32): thread = 128-lane warpgroup index; warp w = thread / 32, g = lane / 4,
// t = lane % 4; d[4 j + e] holds row 16 w + g + 8 (e >> 1), column 8 j + 2 t + (e & 1), j < N / 8.
// That is mma.sync's C layout per 16-row strip, so two n8 blocks of D pack into one k16 A fragment (FA2's trick).
// PTX ISA: "Asynchronous Warpgroup Level Matrix Multiply-Accumulate" (wgmma.mma_async, matrix descriptors).
#pragma once
#include <stdint.h>  // defines: uint32_t, uint64_t

// The PTX below exists on sm_90a only; other targets compile each helper to a trap (their launchers never run
// these kernels: attention_has_wgmma() picks the mma.sync ones).
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define WG_PTX(...) asm volatile(__VA_ARGS__)
#else
#define WG_PTX(...) __trap()
#endif

// byte offset of element (r, c) in a swizzled tile of R rows, c < 64 * blocks
template <int R>
__device__ __forceinline__ uint32_t wg_swz(int r, int c) {
    return (uint32_t)((c >> 6) * R * 128 + r * 128 + ((((c >> 3) & 7) ^ (r & 7)) << 4) + (c & 7) * 2);
}

// descriptor of a 128B-swizzled tile at shared address addr (bytes): LBO, SBO in bytes
__device__ __forceinline__ uint64_t wg_desc(uint32_t addr, uint32_t lbo, uint32_t sbo) {
    return (uint64_t)((addr & 0x3FFFF) >> 4) | ((uint64_t)(lbo >> 4) << 16) | ((uint64_t)(sbo >> 4) << 32) | (1ull << 62);
}

__device__ __forceinline__ void wg_fence() { WG_PTX("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wg_commit() { WG_PTX("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wg_wait() { WG_PTX("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory"); }
// ordinary shared-memory stores (st.shared, cp.async) become visible to wgmma's async proxy
__device__ __forceinline__ void wg_fence_proxy() { WG_PTX("fence.proxy.async.shared::cta;\n" ::: "memory"); }
// keeps the compiler from moving accumulator reads or writes across an async wgmma
template <int N>
__device__ __forceinline__ void wg_fence_regs(float (&d)[N]) {
#pragma unroll
    for (int i = 0; i < N; i++) asm volatile("" : "+f"(d[i])::"memory");
}

#define WG_R8(i) "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), "+f"(d[i + 6]), "+f"(d[i + 7])

// d (64 x 64) (+)= A (64 x 16, smem) B (16 x 64, smem); TA, TB: 1 = MN-major ("transposed"); acc 0 overwrites d
template <int TA, int TB>
__device__ __forceinline__ void wg_mma_64x64_ss(float (&d)[32], uint64_t da, uint64_t db, int acc) {
    WG_PTX(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
        "%32, %33, p, 1, 1, %35, %36;\n}\n"
        : WG_R8(0), WG_R8(8), WG_R8(16), WG_R8(24)
        : "l"(da), "l"(db), "r"(acc), "n"(TA), "n"(TB));
}

// d (64 x 128) (+)= A (64 x 16, smem) B (16 x 128, smem); as wg_mma_64x64_ss
template <int TA, int TB>
__device__ __forceinline__ void wg_mma_64x128_ss(float (&d)[64], uint64_t da, uint64_t db, int acc) {
    WG_PTX(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
        "%64, %65, p, 1, 1, %67, %68;\n}\n"
        : WG_R8(0), WG_R8(8), WG_R8(16), WG_R8(24), WG_R8(32), WG_R8(40), WG_R8(48), WG_R8(56)
        : "l"(da), "l"(db), "r"(acc), "n"(TA), "n"(TB));
}

// d (64 x 128) += A (64 x 16, registers: this warp's mma.sync A fragment) B (16 x 128, smem); TB as above
template <int TB>
__device__ __forceinline__ void wg_mma_64x128_rs(float (&d)[64], const uint32_t (&a)[4], uint64_t db) {
    WG_PTX(
        "{\n.reg .pred p;\nsetp.eq.u32 p, 1, 1;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
        "{%64, %65, %66, %67}, %68, p, 1, 1, %69;\n}\n"
        : WG_R8(0), WG_R8(8), WG_R8(16), WG_R8(24), WG_R8(32), WG_R8(40), WG_R8(48), WG_R8(56)
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "n"(TB));
}
// d (64 x 64) += A (64 x 16, registers) B (16 x 64, smem); as wg_mma_64x128_rs
template <int TB>
__device__ __forceinline__ void wg_mma_64x64_rs(float (&d)[32], const uint32_t (&a)[4], uint64_t db) {
    WG_PTX(
        "{\n.reg .pred p;\nsetp.eq.u32 p, 1, 1;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
        "{%32, %33, %34, %35}, %36, p, 1, 1, %37;\n}\n"
        : WG_R8(0), WG_R8(8), WG_R8(16), WG_R8(24)
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "n"(TB));
}

// d (64 x N) += A (64 x 16, registers) B (16 x N, smem), N = 64 or 128 by the accumulator's size
template <int TB, int NR>
__device__ __forceinline__ void wg_mma_rs(float (&d)[NR], const uint32_t (&a)[4], uint64_t db) {
    static_assert(NR == 32 || NR == 64, "wg_mma_rs: N = 64 or 128");
    if constexpr (NR == 32) wg_mma_64x64_rs<TB>(d, a, db);
    else wg_mma_64x128_rs<TB>(d, a, db);
}
#undef WG_R8
