// dev/cuda/lora_backward.cu: playground for a fused LoRA backward that reads dy once (issue 14's "LoRA:
// dy read twice"). Per projection with LoRA (rank r = 16, scale s = alpha / r), qlora.cu's linears_backward
// does today, through kernels/matmul.cuh (cuBLASLt, bf16 in, fp32 accumulation):
//
//   main stream  t  = dy·B             gemm_input_grad: t (N, r) bf16, one rounding, alpha 1, beta 0; t is a
//                                      column slice (pitch k·r) of the group's (N, k·r) t buffer; unscaled
//   GradLane     dB += s·dyᵀ·u         gemm_weight_grad: dB (out, r) fp32, alpha s, beta 1 (grads are zeroed
//                                      once a step and accumulate over micro-batches); u = x·Aᵀ (N, r) bf16,
//                                      kept by the forward, a column slice (pitch k·r) of the group's u
//                dA += s·tᵀ·x          (stays as it is: reads t and x, not dy)
//
// (with LoRA dropout the same GEMMs run on the main stream). dy (N, out) bf16 is read from DRAM twice: at
// llama3-8b, N = 8192 and out = 14336 (gate, up), 235 MB each time. Both products contract dy with a
// skinny (.., 16) operand, so one pass can do both:
//
//   kernel1  grid (Gc, Gr): CTA (c, g) owns the dy block of rows [g·Rb, g·Rb + Rb) x columns [512 c, 512 c + 512).
//            A producer warp streams it in stages of 16 rows (16 bulk copies of 1 KB, cp.async.bulk, L2
//            evict-first, plus the 16 rows of u) into an 8-deep mbarrier ring (133 KB, 1 CTA/SM); 8 consumer
//            warps own 64 columns each. Per stage a warp does, with mma.sync m16n8k16 (fp32 accumulation):
//              t  partial (16 x 16)  += dy (16 x 64, ldmatrix)     · B (64 x 16, registers for the whole kernel)
//              dB partial (64 x 16)  += dyᵀ (64 x 16, ldmatrix.trans) · u (16 x 16, ldmatrix.trans)
//            dB stays in registers over all the CTA's rows; t's 8 warp partials are summed in smem in warp
//            order each stage (one named barrier) and written: bf16 t when Gc = 1, else an fp32 partial.
//            Each CTA ends by writing its dB block: dB += s·acc when Gr = 1, else an fp32 partial.
//   reduce1  t = bf16(Σ_c tp[c]) and dB += s·Σ_g dp[g], each sum in ascending c or g from 0: a fixed order,
//            so the bits do not depend on which CTA finished first (no float atomics). Skipped if Gc = Gr = 1.
//   Grid: Gc = out / 512; Gr = min(SMs / Gc, N / 256) (one wave; Rb >= 256 rows keeps dB's partials under 1/8
//   of dy's bytes), Rb rounded up to 16 rows. The partials are 64 B x (Gc·N + Gr·out), written once and read
//   once: each way +7.8% of dy's bytes at out 14336, +12.5% at 4096, +19% at 1024 (llama3-8b, 132 SMs). The spin-free
//   separate reduce keeps every CTA independent (no waits on other CTAs: the lane's kernels share the GPU).
//
// Why mma and not FMA: 2·2·N·out·r = 7.5 GFLOP at out 14336 is 110 us of the H100's ~67 TFLOP/s fp32 FMA
// (plus the bf16 -> fp32 conversions), over the ~80 us that reading dy takes; on tensor cores it is ~10 us.
//
//   nvcc -std=c++17 -O3 -gencode arch=compute_90a,code=sm_90a -Xptxas -v dev/cuda/lora_backward.cu -lcublasLt -lcublas -o build/lora_backward
//   ./build/lora_backward
//
// Check: t and dB of both paths against an fp64 CPU reference (t = Σ_o dy·B, dB = dB0 + s·Σ_n dy·u, from the
// same bf16 inputs; dB0 random, standing for earlier micro-batches). Error = max |x - ref| / max |ref| per
// tensor. Budget (house rule): 2x the cuBLAS path's own error against the same reference. t is bf16: both
// paths round the fp32 sum once, so both errors are ~2^-9 and differ only where the fp32 sums straddle a
// rounding boundary. dB is fp32: both errors are fp32 summation-order noise (~1e-7), so 2x of it would fail on
// a reordering alone; its budget has a floor of 2^-14 of max |dB|, still far below what a bug looks like (a
// bf16-rounded intermediate: ~2^-9; a lost or doubled 16-row stage: ~sqrt(16 / N) = 4% of a column).
// Plus: kernel1 twice on the same inputs must give the same bits (t and dB); and small edge shapes (Gr = 1,
// Gc = 1, an uneven last row block) are checked, not timed.
// Time: median of 20 (timing.h), operands rotating over enough sets (>= 3 x L2 of dy) that no run finds dy in
// L2, as in training. GB/s counts bytes once (dy, u, B read, t written, dB read + written) for both paths, so
// it is an effective rate; "% copy" is against a 1 GiB cudaMemcpy D2D measured here.
//
// Prediction (written before any run; H100 SXM, copy ~2,990 GB/s as rmsnorm.cu measured; cuBLAS's skinny LoRA
// GEMMs at ~2.3 TB/s as dev/PERF.md's profile put them; kernel1 at ~85% of copy, ~2.54 TB/s on its bytes;
// reduce1 ~2.5 TB/s + ~2 us launch gap), N = 8192, r = 16:
//   shape (per layer)      dy MB   partials MB   cuBLAS t + dB      kernel1 + reduce1     saving
//   8b gate, up (x2)       234.9   18.4          ~102 + 102 us      ~100 + 8 + 2 us       ~94 us
//   8b q, o, down (x3)      67.1    8.4           ~29 + 29          ~30 + 4 + 2           ~23
//   8b k, v (x2)            16.8    3.1            ~8 + 8            ~8 + 1 + 2            ~3
//   1b gate, up (x2)       134.2   12.6           ~58 + 58          ~58 + 5 + 2           ~52
//   1b q, o, down (x3)      33.6    6.3           ~15 + 15          ~16 + 3 + 2           ~9
//   1b k, v (x2)             8.4    1.0            ~4 + 4 (+launch)  ~5 + 1 + 2            ~0
// llama3-8b: ~263 us a layer, ~8.4 ms a step (32 layers, 7 projections) of --profile's 47.5 ms of LoRA GEMMs;
// unprofiled, where the dB GEMMs ran on the GradLane (overlapping little, session 7), ~5-8 ms of the 487 ms
// step (1-1.7%). llama3-1b: ~131 us a layer, ~2.1 ms a step (16 layers) of 102 ms. In the trainer dB would
// move to the main stream with t; the lane keeps dA. dy's third read (the frozen dx += dy·W GEMM) stays.
// Bytes moved: cuBLAS 2 x dy; kernel1 + reduce1 dy + 2 x partials; both + t, u, B, dB (under 2 MB a case).
// Risks to the prediction: gate/up's grid is 28 x 4 = 112 CTAs on 132 SMs (each must pull ~23 GB/s, with 133 KB
// in flight); the per-stage named barrier lockstepping the 8 consumer warps; the reduce's launch gap (PDL would
// hide it). Next if the partials show: a cluster of CTAs along a row block summing t's partials in DSMEM.
//
// ptxas (nvcc 13.0, sm_90a): kernel1 96 registers, 0 spills; reduce1 40 registers, 0 spills.
// Before any GPU: the lane-level fragment mapping (ldmatrix / ldmatrix.trans / mma.m16n8k16 as the PTX ISA
// specifies them) and the grid's index arithmetic (partials, reduce, uneven last block, Gc = 1, Gr = 1) were
// emulated on the CPU against dy·B and dyᵀ·u, exactly. The mbarrier ring and the bulk copies were not.
// Measured (H100 80GB HBM3, 2026-12-07, copy 3,015 GB/s; us, cuBLAS t + dB serialized / kernel1 + reduce1):
//   8b gate, up 166.4 / 180.6 (0.92x)   8b q, o, down 59.1 / 53.7 (1.10x)   8b k, v 25.7 / 34.3 (0.75x)
//   1b gate, up 101.3 /  94.7 (1.07x)   1b q, o, down 34.9 / 33.5 (1.04x)   1b k, v 21.3 / 33.1 (0.64x)
// llama3-8b: -0.94 ms a step (a loss), llama3-1b: -0.10 ms. Every check passed (t at 50% of its budget, dB at
// 1-4%, repeats bit-identical). The prediction was wrong about kernel1's rate: it moves dy at 1,362 GB/s (45% of
// copy) at gate/up, not ~2,540. Not profiled; the likely bound is the consumers' per-stage work (16 mma a warp,
// the smem sum of t's eight partials, a named barrier), and the narrow shapes pay reduce1's launch. Not integrated
// (a helper built it into the trainer on a side branch, discarded unmerged). What would be needed: no per-stage t
// reduction (a warp owning whole rows of t: 16 rows x 512 columns, dB's accumulators then 8x larger or
// spilled to smem), or t left to cuBLAS and only dB fused into the frozen dx GEMM, which reads dy anyway.
#include <algorithm>                    // defines: std::max, std::min
#include <cmath>                        // defines: fabs, ldexp, std::isnan
#include <cstdio>                       // defines: printf
#include <cstring>                      // defines: memcmp
#include <vector>                       // defines: std::vector
#include "../../kernels/matmul.cuh"     // defines: MatmulCtx, matmul_init, gemm_input_grad, gemm_weight_grad, bf16, cudaCheck
#include "../../kernels/tma.cuh"        // defines: attn5_mbar_init/_init_fence/_expect_tx/_arrive/_wait, attn5_bar_sync, WG_PTX
#include "timing.h"                     // defines: median_ms

// ---------------------------------------------------------------------------------------------
// kernel1: one pass over dy for t = dy·B and the partials of dyᵀ·u

namespace lb {
constexpr int R = 16;                  // LoRA rank: the n of both products (two n8 mma tiles)
constexpr int CW = 8;                  // consumer warps
constexpr int WC = 64;                 // dy columns per consumer warp
constexpr int CR = CW * WC;            // 512 dy columns per CTA
constexpr int SR = 16;                 // dy rows per stage (one m16 tile of t, one k16 step of dB)
constexpr int STAGES = 8;              // ring depth: 8 x 17 KB in flight per SM
constexpr int LDY = CR + 8;            // smem pitch of a dy row in bf16: 1040 bytes, +16 makes ldmatrix conflict-free
constexpr int LDU = R + 8;             // smem pitch of a u row in bf16: 48 bytes, likewise
constexpr int THREADS = (CW + 1) * 32; // + the producer warp
constexpr int STAGE_TX = SR * (CR + R) * 2;   // bytes a stage's copies deliver
constexpr int SMEM = STAGES * SR * LDY * 2 + STAGES * SR * LDU * 2 + 2 * CW * SR * R * 4 + 2 * STAGES * 8;
static_assert(CW * 32 == SR * R, "one consumer thread per element of a stage's 16 x 16 t block");
static_assert(SR == 16, "the producer warp: lanes 0-15 copy the 16 dy rows of a stage, lanes 16-31 its 16 u rows");
}   // namespace lb

struct LoraBwdParams {
    const bf16* dy;   // (N, out)   gradient of the projection's output
    const bf16* B;    // (out, r)   PEFT lora_B
    const bf16* u;    // (N, ldu)   x·Aᵀ, this projection's r columns start here
    bf16* t;          // (N, ldt)   dy·B, this projection's r columns start here
    float* dB;        // (out, r)   fp32 gradient of lora_B, accumulated
    float* tp;        // (Gc, N, r) fp32 partials of t, Gc > 1
    float* dp;        // (Gr, out, r) fp32 partials of dyᵀ·u, Gr > 1
    int N, out, ldu, ldt;
    int Gc, Gr, Rb;   // grid: column blocks of 512, row blocks of Rb rows
    float s;
};

__device__ __forceinline__ uint32_t lb_smem(const void* p) { return (uint32_t)__cvta_generic_to_shared(p); }
__device__ __forceinline__ void lb_ldsm_x4(uint32_t* r, uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n" : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}
__device__ __forceinline__ void lb_ldsm_x4_t(uint32_t* r, uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}
// c (16x8 fp32) += a (16x16 bf16, row) · b (16x8 bf16, col)
__device__ __forceinline__ void lb_mma(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3]) : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
// bytes (a multiple of 16) from global to smem, completing on the mbarrier; with an L2 cache policy
__device__ __forceinline__ void lb_bulk_load(uint32_t dst, const void* src, uint32_t bytes, uint32_t bar, uint64_t policy) {
    WG_PTX("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1], %2, [%3], %4;\n"
           ::"r"(dst), "l"(src), "r"(bytes), "r"(bar), "l"(policy) : "memory");
}
__device__ __forceinline__ uint64_t lb_policy_evict_first() {
    uint64_t p = 0;
    WG_PTX("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(p));
    return p;
}
__device__ __forceinline__ uint64_t lb_policy_evict_normal() {
    uint64_t p = 0;
    WG_PTX("createpolicy.fractional.L2::evict_normal.b64 %0, 1.0;\n" : "=l"(p));
    return p;
}
__device__ __forceinline__ uint32_t lb_pack(bf16 lo, bf16 hi) {
    return (uint32_t)__bfloat16_as_ushort(lo) | ((uint32_t)__bfloat16_as_ushort(hi) << 16);
}

// Fragment layouts (PTX ISA, mma.m16n8k16): lane = 4 g + q. A regs hold rows (g, g+8) x cols (2q, 2q+1) for
// k-halves (0-7, 8-15); B regs hold k = (2q, 2q+1) and (2q+8, 2q+9) at col n = g; C rows (g, g+8) x cols
// (2q, 2q+1). ldmatrix x4 lane addresses for a 16 x 16 block of a row-major smem tile (kernels/attention.cuh's
// ATTN_A/B/T_ROW):
//   (no trans) rows = m, cols = k: the A fragment          row l & 15,                   col (l >> 4) 8
//   (trans)    rows = k, cols = m: the A fragment of its ᵀ row (l & 7) + (l >> 4) 8,     col ((l >> 3) & 1) 8
//   (trans)    rows = k, cols = n: B fragments, 2 n8 tiles row (l & 7) + ((l >> 3) & 1) 8, col (l >> 4) 8
__global__ void __launch_bounds__(lb::THREADS, 1) lora_backward_kernel1(const LoraBwdParams p) {
    using namespace lb;
    extern __shared__ __align__(128) uint8_t smem[];
    bf16* sdy = (bf16*)smem;                               // (STAGES, SR, LDY)
    bf16* su = sdy + STAGES * SR * LDY;                    // (STAGES, SR, LDU)
    float* tred = (float*)(su + STAGES * SR * LDU);        // (2, CW, SR, R): each warp's t partial, double-buffered
    uint64_t* full = (uint64_t*)(tred + 2 * CW * SR * R);  // (STAGES) copies landed
    uint64_t* empty = full + STAGES;                       // (STAGES) the CW consumer warps are done with the slot
    const int c = blockIdx.x, g = blockIdx.y, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int row0 = g * p.Rb, col0 = c * CR, nst = min(p.Rb, p.N - row0) / SR;
    if (threadIdx.x == 0) {
        for (int i = 0; i < STAGES; i++) {
            attn5_mbar_init(lb_smem(&full[i]), 1);
            attn5_mbar_init(lb_smem(&empty[i]), CW);
        }
        attn5_mbar_init_fence();
    }
    __syncthreads();   // the only CTA-wide barrier: the producer leaves early

    if (warp == CW) {   // producer: lanes 0-15 copy the stage's 16 dy rows, lanes 16-31 its 16 u rows
        const uint64_t pol = lane < 16 ? lb_policy_evict_first() : lb_policy_evict_normal();   // dy is read once
        const int r = lane & 15;
        for (int i = 0; i < nst; i++) {
            const int slot = i % STAGES, row = row0 + i * SR + r;
            if (i >= STAGES) attn5_mbar_wait(lb_smem(&empty[slot]), ((i / STAGES) - 1) & 1);
            if (lane == 0) attn5_mbar_expect_tx(lb_smem(&full[slot]), STAGE_TX);
            __syncwarp();   // the expected bytes are raised before any copy can complete
            if (lane < 16)
                lb_bulk_load(lb_smem(sdy + (slot * SR + r) * LDY), p.dy + (size_t)row * p.out + col0, CR * 2, lb_smem(&full[slot]), pol);
            else
                lb_bulk_load(lb_smem(su + (slot * SR + r) * LDU), p.u + (size_t)row * p.ldu, R * 2, lb_smem(&full[slot]), pol);
        }
        return;
    }

    // consumers. This warp's 64 columns of B as mma B fragments (k = out column, n = rank), kept all kernel.
    const int wc0 = warp * WC, gq = lane >> 2, q = lane & 3;
    uint32_t bw[WC / 16][2][2];
#pragma unroll
    for (int kk = 0; kk < WC / 16; kk++)
#pragma unroll
        for (int nt = 0; nt < 2; nt++) {
            const bf16* b = p.B + (size_t)(col0 + wc0 + kk * 16 + 2 * q) * R + nt * 8 + gq;
            bw[kk][nt][0] = lb_pack(b[0], b[R]);
            bw[kk][nt][1] = lb_pack(b[8 * R], b[9 * R]);
        }
    float dacc[WC / 16][2][4] = {};   // dyᵀ·u for columns wc0 + 16 kk + (g, g+8), rank 8 nt + (2q, 2q+1)
    const int a_row = lane & 15, a_col = (lane >> 4) << 3;                       // no trans, rows = m
    const int at_row = (lane & 7) + ((lane >> 4) << 3), at_col = ((lane >> 3) & 1) << 3;   // trans, rows = k
    const int b_row = (lane & 7) + (((lane >> 3) & 1) << 3), b_col = (lane >> 4) << 3;     // trans, rows = k, B
    for (int i = 0; i < nst; i++) {
        const int slot = i % STAGES;
        attn5_mbar_wait(lb_smem(&full[slot]), (i / STAGES) & 1);
        const bf16* ty = sdy + slot * SR * LDY;
        uint32_t ub[4];   // u (16 rows = k, 16 ranks = n): n-tile 0 in ub[0..1], n-tile 1 in ub[2..3]
        lb_ldsm_x4_t(ub, lb_smem(su + (slot * SR + b_row) * LDU + b_col));
        float tacc[2][4] = {};
#pragma unroll
        for (int kk = 0; kk < WC / 16; kk++) {
            const int cb = wc0 + kk * 16;
            uint32_t a[4], at[4];
            lb_ldsm_x4(a, lb_smem(ty + a_row * LDY + cb + a_col));      // dy (16 rows, 16 cols)
            lb_ldsm_x4_t(at, lb_smem(ty + at_row * LDY + cb + at_col)); // its transpose (16 cols, 16 rows)
            lb_mma(tacc[0], a, bw[kk][0][0], bw[kk][0][1]);
            lb_mma(tacc[1], a, bw[kk][1][0], bw[kk][1][1]);
            lb_mma(dacc[kk][0], at, ub[0], ub[1]);
            lb_mma(dacc[kk][1], at, ub[2], ub[3]);
        }
        __syncwarp();   // every lane's ldmatrix of the slot has returned (the mmas above consumed them)
        if (lane == 0) attn5_mbar_arrive(lb_smem(&empty[slot]));
        // t: the 8 warps' partials of these 16 rows, summed in warp order. Double-buffered: a warp writes stage
        // i + 2's partial only after the barrier of stage i + 1, which every thread reaches after its stage-i reads.
        float* tw = tred + ((i & 1) * CW + warp) * SR * R;
#pragma unroll
        for (int nt = 0; nt < 2; nt++) {
            *(float2*)&tw[gq * R + nt * 8 + 2 * q] = make_float2(tacc[nt][0], tacc[nt][1]);
            *(float2*)&tw[(gq + 8) * R + nt * 8 + 2 * q] = make_float2(tacc[nt][2], tacc[nt][3]);
        }
        attn5_bar_sync(1);   // the CW * 32 = 256 consumer threads
        const int e = threadIdx.x;   // element (e / R, e % R) of the stage's 16 x 16 block
        const float* te = tred + (i & 1) * CW * SR * R + e;
        float sum = 0.0f;
#pragma unroll
        for (int w = 0; w < CW; w++) sum += te[w * SR * R];
        const int row = row0 + i * SR + e / R;
        if (p.Gc == 1) p.t[(size_t)row * p.ldt + e % R] = f2bf(sum);
        else p.tp[((size_t)c * p.N + row) * R + e % R] = sum;
    }
    // dB: this CTA's rows of dyᵀ·u for its 512 columns
#pragma unroll
    for (int kk = 0; kk < WC / 16; kk++)
#pragma unroll
        for (int nt = 0; nt < 2; nt++)
#pragma unroll
            for (int h = 0; h < 2; h++) {
                const int o = col0 + wc0 + kk * 16 + gq + 8 * h, j = nt * 8 + 2 * q;
                const float v0 = dacc[kk][nt][2 * h], v1 = dacc[kk][nt][2 * h + 1];
                if (p.Gr == 1) {
                    float2* d = (float2*)&p.dB[(size_t)o * R + j];
                    float2 x = *d;
                    *d = make_float2(fmaf(p.s, v0, x.x), fmaf(p.s, v1, x.y));
                } else
                    *(float2*)&p.dp[((size_t)g * p.out + o) * R + j] = make_float2(v0, v1);
            }
}

// t = bf16(Σ_c tp[c]) (Gc > 1), dB += s·Σ_g dp[g] (Gr > 1): 4 outputs a thread, sums in ascending order from 0.
__global__ void lora_backward_reduce_kernel1(const LoraBwdParams p) {
    using lb::R;
    const int64_t nt = p.Gc > 1 ? (int64_t)p.N * R / 4 : 0, nd = p.Gr > 1 ? (int64_t)p.out * R / 4 : 0;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < nt + nd; i += (int64_t)gridDim.x * blockDim.x) {
        if (i < nt) {
            const int64_t n = i / 4;
            const int j = (int)(i % 4) * 4;
            float4 a = make_float4(0.f, 0.f, 0.f, 0.f);
            for (int c = 0; c < p.Gc; c++) {
                const float4 v = __ldcs((const float4*)&p.tp[((size_t)c * p.N + n) * R + j]);   // read once
                a.x += v.x; a.y += v.y; a.z += v.z; a.w += v.w;
            }
            __nv_bfloat162 lo = __floats2bfloat162_rn(a.x, a.y), hi = __floats2bfloat162_rn(a.z, a.w);
            uint2 w;
            w.x = *(uint32_t*)&lo;
            w.y = *(uint32_t*)&hi;
            *(uint2*)&p.t[(size_t)n * p.ldt + j] = w;
        } else {
            const int64_t k = i - nt, o = k / 4;
            const int j = (int)(k % 4) * 4;
            float4 a = make_float4(0.f, 0.f, 0.f, 0.f);
            for (int g = 0; g < p.Gr; g++) {
                const float4 v = __ldcs((const float4*)&p.dp[((size_t)g * p.out + o) * R + j]);
                a.x += v.x; a.y += v.y; a.z += v.z; a.w += v.w;
            }
            float4* d = (float4*)&p.dB[(size_t)o * R + j];
            float4 x = *d;
            *d = make_float4(fmaf(p.s, a.x, x.x), fmaf(p.s, a.y, x.y), fmaf(p.s, a.z, x.z), fmaf(p.s, a.w, x.w));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// launchers

struct LoraBwdGrid {
    int Gc, Gr, Rb;   // column blocks of 512, row blocks, rows a row block (the last may have fewer)
};
// Gc = out / 512; Gr: one wave (Gc·Gr <= SMs) with row blocks of at least 256 rows (dB's partials, 64 B a
// column a row block, stay under 1/8 of dy's 2·Rb bytes a column); Rb rounded up to whole 16-row stages
static LoraBwdGrid lora_backward_grid(int N, int out, int sms) {
    LoraBwdGrid g;
    g.Gc = out / lb::CR;
    g.Gr = std::max(1, std::min(sms / std::max(g.Gc, 1), N / 256));
    g.Rb = ceil_div(ceil_div(N, g.Gr), lb::SR) * lb::SR;
    g.Gr = ceil_div(N, g.Rb);
    return g;
}
// fp32 scratch for the partials: tp (Gc, N, r) when Gc > 1, then dp (Gr, out, r) when Gr > 1
static size_t lora_backward_scratch_floats(const LoraBwdGrid& g, int N, int out) {
    return (g.Gc > 1 ? (size_t)g.Gc * N * lb::R : 0) + (g.Gr > 1 ? (size_t)g.Gr * out * lb::R : 0);
}

static LoraBwdParams lora_backward_params(bf16* t, int ldt, float* dB, float* scratch, size_t scratch_floats, const bf16* dy,
                                          const bf16* B, const bf16* u, int ldu, int N, int out, float s, const LoraBwdGrid& g) {
    kernel_assert(out % lb::CR == 0, "lora_backward: out %d is not a multiple of %d (kernel1's columns a CTA)", out, lb::CR);
    kernel_assert(N % lb::SR == 0, "lora_backward: N %d is not a multiple of %d rows", N, lb::SR);
    kernel_assert(ldu % 8 == 0 && ldt % 4 == 0 && ldu >= lb::R && ldt >= lb::R, "lora_backward: pitches ldu %d ldt %d", ldu, ldt);
    kernel_assert(is_aligned16(dy) && is_aligned16(u) && is_aligned16(dB) && ((uintptr_t)t & 7) == 0 && is_aligned16(scratch),
                  "lora_backward: dy, u, dB, scratch 16-byte aligned, t 8-byte aligned");
    kernel_assert(lora_backward_scratch_floats(g, N, out) <= scratch_floats, "lora_backward: scratch %zu floats, needs %zu",
                  scratch_floats, lora_backward_scratch_floats(g, N, out));
    LoraBwdParams p;
    p.dy = dy; p.B = B; p.u = u; p.t = t; p.dB = dB;
    p.tp = scratch;
    p.dp = scratch + (g.Gc > 1 ? (size_t)g.Gc * N * lb::R : 0);
    p.N = N; p.out = out; p.ldu = ldu; p.ldt = ldt;
    p.Gc = g.Gc; p.Gr = g.Gr; p.Rb = g.Rb;
    p.s = s;
    return p;
}
static void lora_backward1_main(const LoraBwdParams& p, cudaStream_t stream) {
    static bool attr = false;
    if (!attr) {
        cudaCheck(cudaFuncSetAttribute(lora_backward_kernel1, cudaFuncAttributeMaxDynamicSharedMemorySize, lb::SMEM));
        attr = true;
    }
    lora_backward_kernel1<<<dim3(p.Gc, p.Gr), lb::THREADS, lb::SMEM, stream>>>(p);
    cudaCheck(cudaGetLastError());
}
static void lora_backward1_reduce(const LoraBwdParams& p, int sms, cudaStream_t stream) {
    const int64_t items = (p.Gc > 1 ? (int64_t)p.N * lb::R / 4 : 0) + (p.Gr > 1 ? (int64_t)p.out * lb::R / 4 : 0);
    if (!items) return;
    const int blocks = (int)std::min<int64_t>(ceil_div<int64_t>(items, 256), (int64_t)sms * 8);
    lora_backward_reduce_kernel1<<<blocks, 256, 0, stream>>>(p);
    cudaCheck(cudaGetLastError());
}
// t (N, r; pitch ldt) = bf16(dy·B); dB (out, r) += s·dyᵀ·u; u (N, r; pitch ldu). Two launches.
static void lora_backward1(bf16* t, int ldt, float* dB, float* scratch, size_t scratch_floats, const bf16* dy, const bf16* B,
                           const bf16* u, int ldu, int N, int out, float s, int sms, cudaStream_t stream) {
    const LoraBwdParams p = lora_backward_params(t, ldt, dB, scratch, scratch_floats, dy, B, u, ldu, N, out, s, lora_backward_grid(N, out, sms));
    lora_backward1_main(p, stream);
    lora_backward1_reduce(p, sms, stream);
}

// ---------------------------------------------------------------------------------------------
// data and the CPU reference

// x[i] = mean + scale * (u1 + u2 + u3 - 1.5), u uniform from a hash of (seed, i): roughly normal (rmsnorm.cu's)
__device__ __forceinline__ float hash_uniform(uint64_t seed, uint64_t i) {
    uint64_t z = seed * 0x9E3779B97F4A7C15ull + i * 0xBF58476D1CE4E5B9ull + 0x94D049BB133111EBull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull; z = (z ^ (z >> 27)) * 0x94D049BB133111EBull; z ^= z >> 31;
    return (float)(z >> 40) * (1.0f / 16777216.0f);
}
template <class T>
__global__ void fill_kernel(T* x, size_t n, float scale, uint64_t seed) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const float v = scale * (hash_uniform(seed, 3 * i) + hash_uniform(seed, 3 * i + 1) + hash_uniform(seed, 3 * i + 2) - 1.5f);
        if constexpr (sizeof(T) == 2) x[i] = f2bf(v); else x[i] = v;
    }
}
template <class T> static T* dev_fill(size_t n, float scale, uint64_t seed) {
    T* d; cudaCheck(cudaMalloc(&d, n * sizeof(T)));
    fill_kernel<<<1024, 256>>>(d, n, scale, seed);
    cudaCheck(cudaGetLastError());
    return d;
}
template <class T> static std::vector<T> down(const T* d, size_t n) {
    std::vector<T> h(n); cudaCheck(cudaMemcpy(h.data(), d, n * sizeof(T), cudaMemcpyDeviceToHost)); return h;
}

// fp64: t (N, r) = dy·B;  dB (out, r) = dB0 + s·dyᵀ·u   (one pass over dy's rows, like the kernel)
static void reference(std::vector<double>& t, std::vector<double>& dB, const std::vector<bf16>& dy, const std::vector<bf16>& B,
                      const std::vector<bf16>& u, int ldu, const std::vector<float>& dB0, int N, int out, double s) {
    const int R = lb::R;
    std::vector<double> Bd((size_t)out * R), acc((size_t)out * R, 0.0);
    for (size_t i = 0; i < Bd.size(); i++) Bd[i] = __bfloat162float(B[i]);
    t.assign((size_t)N * R, 0.0);
    for (int n = 0; n < N; n++) {
        double un[R], tn[R] = {};
        for (int j = 0; j < R; j++) un[j] = __bfloat162float(u[(size_t)n * ldu + j]);
        const bf16* row = &dy[(size_t)n * out];
        for (int o = 0; o < out; o++) {
            const double d = __bfloat162float(row[o]);
            const double* b = &Bd[(size_t)o * R];
            double* a = &acc[(size_t)o * R];
            for (int j = 0; j < R; j++) { tn[j] += d * b[j]; a[j] += d * un[j]; }
        }
        for (int j = 0; j < R; j++) t[(size_t)n * R + j] = tn[j];
    }
    dB.resize(acc.size());
    for (size_t i = 0; i < acc.size(); i++) dB[i] = dB0[i] + s * acc[i];
}
// max |x - ref| / max |ref|; infinite if any x is NaN (an output never written: t is poisoned with NaNs)
static double rel_err(const std::vector<float>& x, const std::vector<double>& ref) {
    double m = 0, d = 0;
    for (size_t i = 0; i < ref.size(); i++) {
        if (std::isnan(x[i])) return INFINITY;
        m = std::max(m, fabs(ref[i]));
        d = std::max(d, fabs((double)x[i] - ref[i]));
    }
    return d / m;
}
static std::vector<float> t_host(const bf16* t, int N, int ldt) {   // the r columns of a pitched t
    std::vector<bf16> h = down(t, (size_t)N * ldt);
    std::vector<float> f((size_t)N * lb::R);
    for (int n = 0; n < N; n++) for (int j = 0; j < lb::R; j++) f[(size_t)n * lb::R + j] = __bfloat162float(h[(size_t)n * ldt + j]);
    return f;
}

// ---------------------------------------------------------------------------------------------

struct Shape {
    const char* name;
    int N, out, k;   // k: LoRA'd projections in the group (t and u pitch k·r)
    int per_layer;   // projections of this width a layer (0: check only, not timed)
};
struct Set {       // one set of a case's operands; several rotate in the timings
    bf16 *dy, *u, *t;
    float* dB;
};

static int g_fail = 0;

// returns kernel1's saving in us over the cuBLAS path (0 for check-only shapes)
static double run_case(const Shape& sh, MatmulCtx& mm, int sms, size_t l2, double copy_gbs) {
    const int N = sh.N, out = sh.out, R = lb::R, ld = sh.k * R;
    const float s = 2.0f;   // alpha 32 / r 16, the trainer's default
    const LoraBwdGrid grid = lora_backward_grid(N, out, sms);
    const size_t sf = lora_backward_scratch_floats(grid, N, out), ny = (size_t)N * out;
    const double dy_mb = 2e-6 * ny, part_mb = 4e-6 * sf;
    const int NS = sh.per_layer ? std::max<int>(3, (int)ceil_div<size_t>(3 * l2, 2 * ny)) : 1;
    printf("%-16s N=%d out=%d  grid %d x %d (Rb %d, %d CTAs)  dy %.1f MB  partials %.1f MB (%.1f%%)  %d sets\n", sh.name, N, out,
           grid.Gc, grid.Gr, grid.Rb, grid.Gc * grid.Gr, dy_mb, part_mb, 100 * part_mb / dy_mb, NS);
    bf16* B = dev_fill<bf16>((size_t)out * R, 0.05f, 7);
    float* dB0 = dev_fill<float>((size_t)out * R, 1.0f, 8);   // earlier micro-batches' gradient
    float* scratch; cudaCheck(cudaMalloc(&scratch, std::max<size_t>(sf, 4) * 4));
    std::vector<Set> sets(NS);
    for (int i = 0; i < NS; i++) {
        sets[i].dy = dev_fill<bf16>(ny, 1.0f, 100 + i);
        sets[i].u = dev_fill<bf16>((size_t)N * ld, 1.0f, 200 + i);
        cudaCheck(cudaMalloc(&sets[i].t, (size_t)N * ld * 2)); cudaCheck(cudaMemset(sets[i].t, 0, (size_t)N * ld * 2));
        cudaCheck(cudaMalloc(&sets[i].dB, (size_t)out * R * 4));
        cudaCheck(cudaMemcpy(sets[i].dB, dB0, (size_t)out * R * 4, cudaMemcpyDeviceToDevice));
    }
    // the trainer's two GEMMs (linears_backward), serialized as under --profile
    auto cublas_t = [&](Set& S) { gemm_input_grad(mm, {S.t, ld}, S.dy, B, N, R, out); };              // t = dy·B
    auto cublas_dB = [&](Set& S) { gemm_weight_grad(mm, S.dB, S.dy, {S.u, ld}, out, R, N, s); };      // dB += s·dyᵀ·u
    auto fused = [&](Set& S) { lora_backward1(S.t, ld, S.dB, scratch, sf, S.dy, B, S.u, ld, N, out, s, sms, 0); };

    // check, on set 0: each path from dB = dB0, t poisoned
    Set& S = sets[0];
    auto reset = [&] {
        cudaCheck(cudaMemcpy(S.dB, dB0, (size_t)out * R * 4, cudaMemcpyDeviceToDevice));
        cudaCheck(cudaMemset(S.t, 0xff, (size_t)N * ld * 2));
    };
    reset(); cublas_t(S); cublas_dB(S);
    std::vector<float> tc = t_host(S.t, N, ld), dBc = down(S.dB, (size_t)out * R);
    reset(); fused(S);
    std::vector<float> tf = t_host(S.t, N, ld), dBf = down(S.dB, (size_t)out * R);
    reset(); fused(S);
    std::vector<float> tf2 = t_host(S.t, N, ld), dBf2 = down(S.dB, (size_t)out * R);
    const bool same = memcmp(tf.data(), tf2.data(), tf.size() * 4) == 0 && memcmp(dBf.data(), dBf2.data(), dBf.size() * 4) == 0;
    std::vector<double> tr, dBr;
    reference(tr, dBr, down(S.dy, ny), down(B, (size_t)out * R), down(S.u, (size_t)N * ld), ld, down(dB0, (size_t)out * R), N, out, s);
    const double et_c = rel_err(tc, tr), et_f = rel_err(tf, tr), ed_c = rel_err(dBc, dBr), ed_f = rel_err(dBf, dBr);
    const double bt = 2 * et_c, bd = std::max(2 * ed_c, ldexp(1.0, -14));
    const bool ok = same && et_f <= bt && ed_f <= bd;
    g_fail += !ok;
    printf("  check  t: cuBLAS %.2e, kernel1 %.2e (budget %.2e, %3.0f%%)   dB: cuBLAS %.2e, kernel1 %.2e (budget %.2e, %3.0f%%)   "
           "repeat %s  %s\n", et_c, et_f, bt, 100 * et_f / bt, ed_c, ed_f, bd, 100 * ed_f / bd, same ? "bit-identical" : "DIFFERS",
           ok ? "ok" : "FAIL");

    double saving = 0;
    if (sh.per_layer) {
        const LoraBwdParams pm = lora_backward_params(S.t, ld, S.dB, scratch, sf, S.dy, B, S.u, ld, N, out, s, grid);
        int k = 0;
        auto rot = [&]() -> Set& { return sets[k++ % NS]; };
        const float ms_t = median_ms([&] { cublas_t(rot()); });
        const float ms_d = median_ms([&] { cublas_dB(rot()); });
        const float ms_both = median_ms([&] { Set& T = rot(); cublas_t(T); cublas_dB(T); });
        const float ms_main = median_ms([&] {   // kernel1 alone (partials left unreduced)
            Set& T = rot();
            LoraBwdParams q = pm; q.dy = T.dy; q.u = T.u; q.t = T.t; q.dB = T.dB;
            lora_backward1_main(q, 0);
        });
        const float ms_f = median_ms([&] { fused(rot()); });
        // bytes once: dy, u (r of each row), B read; t written; dB read and written
        const double once = 2.0 * ny + 2.0 * N * R * 2 + 2.0 * out * R + 8.0 * out * R;
        auto gbs = [&](float ms) { return once / (ms * 1e6); };
        printf("  %-28s %9s %9s %7s\n", "", "us", "GB/s", "% copy");
        const struct { const char* what; float ms; } rows[] = {{"cuBLAS t = dy*B", ms_t}, {"cuBLAS dB += s*dy^T*u", ms_d},
                                                               {"cuBLAS both (trainer)", ms_both}, {"kernel1 alone", ms_main},
                                                               {"kernel1 + reduce1", ms_f}};
        for (auto& r : rows) printf("  %-28s %9.1f %9.0f %6.0f%%\n", r.what, 1e3 * r.ms, gbs(r.ms), 100 * gbs(r.ms) / copy_gbs);
        saving = 1e3 * (ms_both - ms_f);
        printf("  saving %.1f us a projection (%.2fx), %.1f us a layer (x%d)\n", saving, ms_both / ms_f, saving * sh.per_layer,
               sh.per_layer);
    }
    for (Set& T : sets) { cudaFree(T.dy); cudaFree(T.u); cudaFree(T.t); cudaFree(T.dB); }
    cudaFree(B); cudaFree(dB0); cudaFree(scratch);
    return saving * sh.per_layer;
}

int main() {
    cudaDeviceProp prop; cudaCheck(cudaGetDeviceProperties(&prop, 0));
    const int sms = prop.multiProcessorCount;
    printf("%s, %d SMs, L2 %d MB; kernel1: %d threads, %d bytes smem\n", prop.name, sms, prop.l2CacheSize >> 20, lb::THREADS, lb::SMEM);
    // the copy peak: 1 GiB device to device, bytes read + written
    const size_t cb = (size_t)1 << 30;
    void *src, *dst; cudaCheck(cudaMalloc(&src, cb)); cudaCheck(cudaMalloc(&dst, cb));
    cudaCheck(cudaMemset(src, 1, cb));
    const float cms = median_ms([&] { cudaCheck(cudaMemcpyAsync(dst, src, cb, cudaMemcpyDeviceToDevice)); });
    const double copy_gbs = 2.0 * cb / (cms * 1e6);
    printf("copy peak: cudaMemcpy D2D of 1 GiB, %.3f ms, %.0f GB/s (read + written)\n\n", cms, copy_gbs);
    cudaFree(src); cudaFree(dst);
    MatmulCtx mm; matmul_init(mm, 0);

    const Shape edges[] = {{"edge Gr=1", 256, 1024, 1, 0}, {"edge Gc=1 uneven", 4112, 512, 2, 0}, {"edge uneven", 8176, 4096, 1, 0}};
    for (const Shape& sh : edges) run_case(sh, mm, sms, prop.l2CacheSize, copy_gbs);
    const struct { const char* model; int layers; Shape shapes[3]; } models[] = {
        {"llama3-8b", 32, {{"8b gate, up", 8192, 14336, 2, 2}, {"8b q, o, down", 8192, 4096, 3, 3}, {"8b k, v", 8192, 1024, 3, 2}}},
        {"llama3-1b", 16, {{"1b gate, up", 8192, 8192, 2, 2}, {"1b q, o, down", 8192, 2048, 3, 3}, {"1b k, v", 8192, 512, 3, 2}}}};
    for (auto& md : models) {
        double layer = 0;
        printf("\n");
        for (const Shape& sh : md.shapes) layer += run_case(sh, mm, sms, prop.l2CacheSize, copy_gbs);
        printf("%s: kernel1 saves %.1f us a layer, %.2f ms a step (%d layers, 7 projections)\n", md.model, layer, layer * md.layers / 1e3,
               md.layers);
    }
    matmul_destroy(mm);
    printf("\n%d failed\n", g_fail);
    return g_fail ? 1 : 0;
}
