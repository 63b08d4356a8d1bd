// kernels/tma.cuh: Hopper's asynchronous copies and barriers for the warp-specialised attention kernels
// (kernels/attention.cuh's forward kernel5 and backward kernel6): mbarriers (init, arrive, expect_tx, wait on a
// phase parity, a cp.async arrival), TMA tile loads (cp.async.bulk.tensor, 4-d) completing on an mbarrier, named
// barriers for two consumer warpgroups, setmaxnreg, and the tensor map of a (B, T, heads, hd) bf16 tensor.
// Like kernels/wgmma.cuh's, the PTX exists on sm_90a only (WG_PTX: a trap elsewhere, where nothing launches it).
// The tensor map is encoded through the runtime's driver entry point, so nothing links -lcuda.
#pragma once
#include <stdint.h>         // defines: uint32_t, uint64_t
#include <cuda_runtime.h>   // defines: cudaGetDriverEntryPointByVersion
#include <cuda.h>           // defines: CUtensorMap, cuTensorMapEncodeTiled's enums
#include <cudaTypedefs.h>   // defines: PFN_cuTensorMapEncodeTiled_v12000
#include "common.cuh"       // defines: bf16, cudaCheck, kernel_assert
#include "wgmma.cuh"        // defines: WG_PTX

__device__ __forceinline__ void attn5_mbar_init(uint32_t bar, int count) {
    WG_PTX("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
// after thread 0's inits, before the __syncthreads that publishes them to the other threads and the copy engine
__device__ __forceinline__ void attn5_mbar_init_fence() { WG_PTX("fence.mbarrier_init.release.cluster;\n" ::: "memory"); }
__device__ __forceinline__ void attn5_mbar_arrive(uint32_t bar) {
    WG_PTX("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
// one arrival that also raises the bytes the phase waits for (the TMA copies count them down)
__device__ __forceinline__ void attn5_mbar_expect_tx(uint32_t bar, uint32_t bytes) {
    WG_PTX("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
// one arrival on bar once this thread's earlier cp.asyncs have landed (.noinc: the barrier's count includes it)
__device__ __forceinline__ void attn6_cp_async_mbar_arrive(uint32_t bar) {
    WG_PTX("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(bar) : "memory");
}
// Wait for the phase of the given parity to complete. A wait of more than ~4 s (a lost copy or arrival, a
// wrong parity) traps, so such a bug shows as a launch error instead of a hung device. All in one asm
// block: with the loop and the trap in C++ (or a call, e.g. printf), ptxas dropped setmaxnreg and
// serialized the wgmmas (kernel6, session 9).
__device__ __forceinline__ void attn5_mbar_wait(uint32_t bar, int parity) {
    WG_PTX("{\n.reg .pred p;\n.reg .u64 t0, t;\n"
           "mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n@p bra DONE5;\n"
           "mov.u64 t0, %%globaltimer;\n"
           "WAIT5:\nmbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n@p bra DONE5;\n"
           "mov.u64 t, %%globaltimer;\nsub.u64 t, t, t0;\nsetp.gt.u64 p, t, 4000000000;\n@p trap;\nbra WAIT5;\n"
           "DONE5:\n}\n" ::"r"(bar), "r"(parity) : "memory");
}
// box (64 dims x rows) of a (B, T, heads, hd) tensor at (dim c0, head c1, row c2, batch c3) -> smem dst
__device__ __forceinline__ void attn5_tma_load(uint32_t dst, const CUtensorMap* map, int c0, int c1, int c2, int c3, uint32_t bar) {
    WG_PTX("cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, %5}], [%6];\n"
           ::"r"(dst), "l"((uint64_t)map), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(bar) : "memory");
}
// named barriers of the two consumer warpgroups (256 threads): sync waits for the other's arrive
__device__ __forceinline__ void attn5_bar_sync(int id) { WG_PTX("bar.sync %0, 256;\n" ::"r"(id) : "memory"); }
__device__ __forceinline__ void attn5_bar_arrive(int id) { WG_PTX("bar.arrive %0, 256;\n" ::"r"(id) : "memory"); }
// a warpgroup's registers per thread, handed between the producer (dec) and the consumers (inc)
template <int N> __device__ __forceinline__ void attn5_setmaxnreg_dec() { WG_PTX("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N) : "memory"); }
template <int N> __device__ __forceinline__ void attn5_setmaxnreg_inc() { WG_PTX("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N) : "memory"); }

// TMA descriptor of a (B, T, heads, hd) bf16 tensor read in boxes of 64 dims x rows rows, 128B-swizzled
// (wg_swz's layout for one column block); rows past T read as zeros, also where a box is longer than T.
// ptr 16-byte aligned (attention_check_args), so every stride below is a multiple of 16 bytes as TMA needs.
inline CUtensorMap attn5_tensor_map(const bf16* ptr, int B, int T, int heads, int hd, int rows) {
    static const PFN_cuTensorMapEncodeTiled_v12000 encode = [] {
        void* fn = nullptr;
        cudaDriverEntryPointQueryResult q;
        cudaCheck(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &q));
        kernel_assert(q == cudaDriverEntryPointSuccess && fn, "attention: cuTensorMapEncodeTiled not found (a driver older than CUDA 12?)");
        return (PFN_cuTensorMapEncodeTiled_v12000)fn;
    }();
    CUtensorMap map;
    const cuuint64_t dims[4] = {(cuuint64_t)hd, (cuuint64_t)heads, (cuuint64_t)T, (cuuint64_t)B};
    const cuuint64_t strides[3] = {(cuuint64_t)hd * 2, (cuuint64_t)heads * hd * 2, (cuuint64_t)T * heads * hd * 2};  // bytes, dims 1..3
    const cuuint32_t box[4] = {64, 1, (cuuint32_t)rows, 1}, estride[4] = {1, 1, 1, 1};
    const CUresult r = encode(&map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 4, (void*)ptr, dims, strides, box, estride, CU_TENSOR_MAP_INTERLEAVE_NONE,
                              CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
    kernel_assert(r == CUDA_SUCCESS, "attention: cuTensorMapEncodeTiled failed (CUresult %d) for B=%d T=%d heads=%d hd=%d box rows %d",
                  (int)r, B, T, heads, hd, rows);
    return map;
}
