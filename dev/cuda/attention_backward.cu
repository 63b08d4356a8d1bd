// dev/cuda/attention_backward.cu: playground for the causal GQA flash-attention backward (bf16, H100).
//
//   nvcc -std=c++17 -O3 -gencode arch=compute_90a,code=sm_90a -Xptxas -v dev/cuda/attention_backward.cu -o attention_backward
//   ./attention_backward             check every variant against an fp64 CPU reference, then time them
//   ./attention_backward 1a,2a       only these variants
//   ./attention_backward 2a once     one launch of the first matching shape (for ncu)
//
// FLOPs: 2.5x the forward's (5 matmuls instead of 2), i.e. 10 * hd * nh * (allowed (i, j) pairs).
// "total" times all launches of a backward, "main" the main kernel alone. "repeat" runs the whole
// backward twice on the same inputs (outputs and scratch poisoned differently) and compares the bits.
//
// Versions (the number stays with the kernel when it moves to kernels/attention.cuh):
//   kernel1: one CTA per (kv head, 128-key tile), 16 keys per warp, loops over the GQA group's
//            query heads and 64-row query tiles; dK/dV in registers, dQ by 16-byte fp32 atomics into
//            a zeroed fp32 scratch, then a convert pass. Three launches. Not deterministic: the atomics
//            of different key tiles land in a different order on every run, so dq's bits vary once a row
//            has more than one key tile (T > 128). Kept here; replaced by kernel2.
//   kernel2: kernel1 with the dQ adds ordered (kernels/attention.cuh says how): per query tile a
//            semaphore hands dq_accum from key tile to key tile in ascending order; the first stores, the
//            last writes bf16 dq. No zeroing pass, no convert pass: two launches. Query tiles are walked
//            from the last one down so each key tile trails its predecessor by about one item.
//            DQ_PF (2a, 2c) prefetches dq_accum into smem with cp.async under the dS K matmul; 2b, 2d
//            load it after the matmul (a register prefetch spilled 76 bytes at hd 128).
//   kernel3: kernel2 on wgmma (sm_90a; 2 warpgroups of 64 keys, 128B-swizzled tiles). Kept here; replaced by
//   kernel4: the backward split in a dK/dV kernel (kernel3 without dQ) and a dQ kernel (per 128 query rows,
//            recomputing S and dP): no dQ traffic, no semaphores. Production on Hopper at hd 64, and at hd 128
//            (4a) until kernel6 (session 10); 4b, its dQ kernel software-pipelined, is slower and kept here.
//   kernel6: kernel4's two kernels on the forward kernel5's schedule (TMA producer warpgroup, mbarrier ring, two
//            consumer warpgroups that never __syncthreads), hd 128; 6c, 6d pair one of its kernels with 4a's other;
//            6e: its dQ kernel's consumers in pingpong (kernel5's PINGPONG). In kernels/attention.cuh since session 10:
//            production on Hopper at hd 128 (6a; the dispatch's bwd6 constant picks any of 6a-6f).
//   Letters are tile/occupancy variants (see VARIANTS).
//
// Two numbers, llama3-8b (B=4 T=2048 nh=32 nkv=8 hd=128): 344 GFLOP -> 0.45 ms at ~760 TFLOP/s.
// Bytes: q, k, v, out, dout read (176 MB), dq, dk, dv written (96 MB); kernel1 also zeroes dq_accum, reads
// it back and hits it with ~1.1 GB of float4 atomics (L2, not DRAM) -> ~0.2 ms of DRAM traffic; kernel2
// writes and re-reads dq_accum in L2 (the same ~1.1 GB) but skips the zeroing and the convert pass.
// Compute-bound on paper.
//
// Measured on one H100 80GB HBM3 (2026-11-23, two runs agreed within 1%), ms and TFLOP/s, total (three
// launches) / main kernel:
//   shape (B, T)             1a Bc128 Br64          1e Bc128 Br32          1b Bc64 2CTA/SM
//   llama3-8b (4, 2048)      1.93 178 / 1.72 200    1.92 179 / 1.75 197    2.36 146 / 2.19 157
//   hd128 (1, 16384)         24.9 220 / 24.7 222    25.5 215 / 25.2 218    31.9 172 / 31.5 175
//   hd128 (1, 16384) docs 2k 3.78 182 / 3.43 200    3.82 180 / 3.51 196    4.52 152 / 4.18 164
//                            1c Bc128 Br64          1d Bc64 2CTA/SM        1f Bc128 Br32
//   llama3-1b (4, 2048)      1.06 161 / 0.98 176    1.08 159 / 1.00 172    1.20 143 / 1.10 156
// The preprocess (D, zeroing dq_accum) and the dq convert cost 0.2 ms at llama3-8b, about what their
// ~0.45 GB of DRAM traffic costs; Bc=64 halves the keys per dQ atomic and loses 20%.
//
// Profile (ncu --clock-control none, 1a on llama3-8b, 1.75 ms): memory 66% (L1/shared 68%, L2 47%,
// DRAM 31%), SM 32%, issue slots 22.5%, 8.6 cycles between a warp's instructions, a third of them
// short-scoreboard (ldmatrix) stalls; 8 warps/SM (255 registers: dK and dV take 128, S^T and dP^T 64;
// ptxas spills 32 bytes, which ncu flags as local loads); dk/dv epilogue stores use half of each sector.
// Next: wgmma with dK/dV accumulators split over a warpgroup (FA3 layout), dQ through smem and a TMA
// reduce-add (cp.reduce.async.bulk) instead of per-lane atomics.
//
// kernel2 (ptxas: 255 registers and 8 bytes spilled at hd 128, 248 and none at hd 64). Prediction: a
// wave model of the schedule (1 CTA/SM, blocks dispatched in order, tile kt waiting for kt - 1 per item)
// puts the ordering at under 1% of the main kernel when query tiles are walked top down (15% when walked
// bottom up: each tile then idles until its heavier predecessor is done); the RMW of dq_accum costs about
// what the atomics did; dropping the zeroing and the convert pass saves most of their 0.2 ms.
// Measured on one H100 80GB HBM3 (2026-11-23, one run), ms and TFLOP/s, total (two launches; kernel1's
// three) / main kernel; "repeat": elements of dq whose bits differed between two runs on the same inputs:
//   shape (B, T)             1a (atomics)                 2a (ordered, smem prefetch)  2b (ordered, load after)
//   llama3-8b (4, 2048)      1.93 178 / 1.72 199  dq 177  2.13 161 / 2.05 167  dq 0    2.66 129 / 2.58 133  dq 0
//   hd128 (1, 16384)         24.9 221 / 24.7 223  dq 3303 30.5 180 / 30.4 181  dq 0    37.6 146 / 37.5 147  dq 0
//   hd128 (1, 16384) docs 2k 3.77 182 / 3.44 200  dq 337  4.32 159 / 4.21 164  dq 0    5.20 132 / 5.09 135  dq 0
//                            1c (atomics)                 2c (ordered, smem prefetch)  2d (ordered, load after)
//   llama3-1b (4, 2048)      1.06 162 / 0.97 178  dq 75   1.32 131 / 1.29 134  dq 0    1.52 113 / 1.48 116  dq 0
// (At the T=777 B=1 correctness shape, 14 CTAs, kernel1 also came out identical twice: few CTAs rarely race.)
// The prediction missed: the main kernel is 19% slower at llama3-8b (23% at T=16384, 33% at hd 64), not
// ~0%. Per item (one key tile x one query tile x one head; 264 per SM at llama3-8b, 4003 at T=16384) the
// cost is a fixed ~1.25 us at llama3-8b, 1.4 us at T=16384, 1.2 us at hd 64, so it hurts more where items
// are short. 2b - 2a = 2.0 us per item, which reads as a dq_accum round trip to L2 under this load when
// nothing covers it; 2a covers it only with the dS K matmul (a fifth of an item's matmuls, ~1.3 us of a
// 6.5 us item). So the rest of the gap is most likely that uncovered latency (plus thread 0's fence), not
// waiting on the predecessor; not yet profiled (ncu would show it as long-scoreboard stalls at the wait).
// Next: start the load a whole phase earlier. Keep item n's dS K (fp32) in smem, and at item n+1's top
// acquire, cp.async dq_accum for item n, then add and store after n+1's S/dP matmuls (~2.6 us of cover;
// hd128 smem 188 -> 220 KiB); the handoff then trails by half an item, which the wave model says is free.
// Or items of 128 query rows, to halve their count. A separate dQ kernel (one CTA per query tile,
// recomputing S and dP) would cost 2 more matmuls per item, 7 instead of 5: on paper worse than this.
//
// Tried (v4, 2026-11-23, not kept): take the dQ turn and issue the dq_accum prefetch right after dS^T is
// in smem, before the dV and dK matmuls, so the prefetch is covered by 3 of the 5 matmuls instead of 1.
// Predicted: if the ~1.25 us per item were the dq_accum latency, main 2.05 -> ~1.8 ms. Measured (H100):
// llama3-8b main 2.066 -> 2.111 ms, llama3-1b 1.277 -> 1.284, 16k 30.30 -> 30.42: no gain, slightly
// worse. So the per-item cost is not the load latency the prefetch hides; the suspects left are thread
// 0's gpu-scope fence (the whole CTA waits for it at the barrier that follows) and the handoff chain.
// Needs an ncu look at the stall reasons around the turn before the next change.
//
// v5 (session 3, 2026-11-23): wgmma. H100, ms and TFLOP/s (5-matmul FLOPs), total / main kernel:
//   shape (B, T)             2a (v4)           3a wgmma          4a split          4b split, dQ pipelined
//   llama3-8b (4, 2048)      2.13 161/2.05 167 1.75 197/1.71 201 1.34 256/1.29 266 1.42 243/1.36 252
//   hd128 (1, 16384)         30.5 180          24.7 223          17.4 315          18.4 299
//   hd128 (1, 16384) docs 2k 4.35 158          3.51 196          2.67 258          2.71 254
// kernel3 prediction: ~1.1 ms from wgmma's rate. Two timing-only experiments found the rest: without the
// semaphore handoff 1.62 ms, without handoff and dq_accum read-modify-write 0.87 ms (397 TFLOP/s): the dQ
// traffic (64 KB per item, 2.2 GB a call through L2; dq_accum is 134 MB, more than L2) is half of kernel3.
// Bulk reduce-adds instead (cp.reduce.async.bulk .add.f32 from smem in key-tile order, a convert pass;
// deterministic): 2.21 ms, slower, not kept. kernel4 predicted ~1.2 ms from the 0.87 (7/5 of the matmuls,
// none of the traffic): 1.34 ms measured, errors against fp64 equal to kernel2's, bit-identical on repeat.
// Broken on purpose (test_attention on the H100): the dQ kernel's causal mask one key late -> 44 failures;
// dK without the softmax scale -> 49 failures (the forward kernel2's mask one key late -> 84).
//
// kernel6 (session 9): 4a's math in 4a's order of operations on kernel5's schedule (the comment above its code
// says how). Built: 6a (2 stages), 6b (3 stages), 6c (6a's dK/dV kernel + 4a's dQ kernel), 6d (4a's dK/dV kernel +
// 6a's dQ kernel). ptxas: both kernels 168 registers at launch (dK/dV setmaxnreg 40/232: at 24/240 its producer
// spilled 8 bytes across the split; dQ 24/240), 0 spills, no C75xx warning; dynamic smem with the 1 KiB alignment
// slack: dK/dV 130.5 KiB (6a) / 163.3 KiB (6b), dQ 129 / 161 KiB; 1 CTA/SM as 4a. Its mbarrier waits trap after
// 4 s, so a lost copy or a wrong parity shows as a launch error, not a hung device call. The check also compares
// 6x's output bits with 4a's (same wgmmas, same fp32 operations, same order: expected identical), at T=777 and
// at every timed shape (B=4 there: the batch coordinate of the TMA copies).
// Prediction (before running), per SM at llama3-8b: 264 dK/dV items (64 queries x 128 keys, 8.4 MFLOP of wgmma)
// and 264 dQ items (128 x 64, 6.3 MFLOP): at 4096 FLOP/clk (989 TFLOP/s at 1.83 GHz) 2048 + 1536 = 3584 cycles
// a pair, against ~8940 measured (4a main 1.29 ms / 264 at 1.83 GHz). kernel6 keeps the wgmmas (the same SS
// m64n64 shapes for S and dP, likely much of that gap) but takes off the per-item part where kernel4's tensor
// pipe idles: the P/dS arithmetic of both warpgroups at once (2 warps a sub-partition x ~350 instructions with
// 32 ex2: ~700 issue cycles), the next tile's cp.async issue (8 copies a thread and their int64 address math:
// ~250), the __syncthreads and the fill/drain of two wgmma batches (~400): ~1350 cycles an item, ~2700 a pair.
// Without pingpong the two consumer warpgroups drift apart on their own but need not settle half an item apart;
// taking half to three quarters of it as hidden: 1350-2000 of 8940 cycles, main 15-22% faster. So llama3-8b
// total 1.34 -> ~1.1 ms (1.05-1.15, ~310 TFLOP/s; the 0.05 ms preprocess unchanged), T=16384 17.4 -> ~14.3 ms
// (13.6-14.8, ~385), packed 2k 2.67 -> ~2.2. 6b within 2% of 6a (2 stages already cover the ~1 us TMA latency
// under a ~2.5 us item); 6c and 6d each about half of 6a's gain (the same per-item overheads in both kernels).
// kernel6: not yet run on a GPU. To run: ./attention_backward 4a,6a,6b,6c,6d
// 6e (session 9): 6a's dK/dV kernel + kernel6_dq<PINGPONG>: the dQ kernel's two consumer warpgroups take turns on
// the tensor cores as the forward kernel5's (named barriers 1 and 2, warpgroup 1 first, a final sync). In its
// turn a warpgroup issues dQ += dS(t-1) K(t-1), then S(t) and dP(t), back to back (one wgmma fill and drain per
// tile instead of two), hands the turn on, waits for dQ's group and hands stage t-1 back, then runs tile t's
// exp/mask/dS and packing while the other warpgroup's wgmmas run; the first S, dP and the last dQ are peeled
// (no wgmma under a branch). dQ still adds the tiles' dS K in key order, so dq should stay bit-identical to 4a's.
// ptxas: 168 registers at launch (24/240), ~190 used by a consumer (6a's dQ 152), 0 spills, no C75xx warning.
// Prediction (before running): the elementwise part (~350 issue cycles a warp a tile) is now hidden by
// construction instead of by drift, and a tile's wgmmas run as one batch; 6a's prediction already counts half to
// three quarters of that as hidden, so the rest is ~150-350 cycles of a ~3000-cycle dQ item, minus two named-
// barrier handoffs a tile (~50-100): at best the dQ half 5-10% faster than 6a's, the total 2-5% (llama3-8b ~1.1 ->
// ~1.06 ms). But dQ(t) now runs a turn after S(t), so a stage goes back half a tile later than in 6a and, with 2
// stages, the copy of tile t+1 gets ~half a dQ item (~0.5-0.8 us of a ~3000-cycle item; issuing dQ first in
// the turn is what leaves that much) against the ~1 us TMA latency assumed above: likely stalls of ~0.2-0.5 us a tile
// that eat the gain, so at 2 stages 6e's dQ half within -5%..+10% of 6a's; 3 stages (161 KiB, fits) should
// restore 6a's lead time and show the 5-10%. A 6e slower than 6a with the ring not waited on would point at
// the handoffs or at a single warpgroup's SS m64n64 wgmmas not filling the tensor pipe (smem-bound at 128 B/clk).
// 6f: 6e with a 3-stage ring, to tell ring stalls from the pingpong itself. 6e, 6f: not yet run on a GPU.
// To run: ./attention_backward 4a,6a,6b,6c,6d,6e,6f
// Session 10: kernel6 and attention_backward6_launch moved to kernels/attention.cuh (the trainer's hd-128 backward
// on Hopper), its helpers to kernels/tma.cuh; test_attention checks 6a-6f's bits against kernel4's.
// Measured (H100 80GB HBM3, 2026-12-07, one run; total ms and causal TFLOP/s; every variant == 4a bit for bit):
//   shape (B, T)             4a           6a           6b           6c           6d           6e           6f
//   llama3-8b (4, 2048)      1.363 252    1.163 296    1.131 304    1.221 282    1.285 268    1.188 290    1.060 324
//   hd128 (1, 16384)         17.45 315    14.65 375    14.36 383    15.41 357    16.43 335    14.83 371    13.82 398
//   hd128 (1, 16384) docs 2k 2.673 257    2.239 307    2.167 317    2.385 288    2.527 272    2.255 305    2.064 333
// 6a landed at its prediction (1.1 / 14.3 ms predicted). 6e at 2 stages loses to 6a, as predicted (the ring
// stalls); 6f, its 3-stage ring, is the fastest everywhere (-9% on 6a, -22% on 4a): the pingpong pays once the
// ring keeps up. 6f is production.
//
// Session 11: kernel6 at hd 64 (llama3-1b's heads), where the backward still runs kernel4 (4a64 here: 4a's kernels at
// hd 64, its dQ kernel at 2 CTAs/SM). The same tiles and code as at hd 128 (kernels/attention.cuh says what changes:
// one TMA box per row, m64n64 accumulators); 6a64-6f64 are 6a-6f's {stages, dq6, dkdv6, pingpong} at hd 64, 6g64
// is 6f64 with a 4-stage ring (smem: dK/dV 100 KiB, dQ 97), 6h64 pairs 6f64's dK/dV kernel with 4a64's dQ kernel
// (which runs 2 CTAs/SM where kernel6's runs 1). Each must give 4a64's bits (the check and the timed shape compare).
// ptxas: every hd-64 kernel6 168 registers at launch, 0 spills (setmaxnreg as at hd 128); 4a64: dK/dV 204, dQ 128.
// Prediction (before running), llama3-1b (B=4 T=2048 nh=32 nkv=8 hd=64), per layer: the same item counts as
// llama3-8b (same B, T, heads), half the matmul FLOPs per item, the same elementwise work per item. Per SM 264
// dK/dV + 264 dQ items at 1024 + 768 tensor cycles a pair at hd 64 (3584 at hd 128). Model a pair as matmul/e + X,
// X the per-item cost the tensor pipe does not cover. kernel4's two points (hd 128 main ~8940 cycles a pair, hd 64
// ~6380 from the trainer's 15.3 ms for 16 layers) give e = 0.70, X = 3820 if X is the same at both hd; e = 1 gives
// X = 5360 / 4590 (kernel4_dq's 2 CTAs/SM hide more at hd 64). 6f at hd 128 (~7070 a pair) then leaves X6 = 1950
// (e 0.70) to 3490 (e 1), and at hd 64 (1 CTA/SM, nothing gained from occupancy): 4510-5280 cycles a pair, main
// 0.65-0.76 ms, total ~0.74 ms (0.69-0.80) against ~0.96 for 4a64: ~230 TFLOP/s (215-250), -23% (-17..-28%);
// 16 layers 15.3 -> ~11.8 ms. About hd 128's -22%, not more although the matmuls are half: 4a64's dQ kernel already
// hides part of the per-item cost (four warpgroups an SM), and the dQ pingpong is balanced at hd 64 (one warpgroup's
// exp/mask/pack, ~350 issue cycles a warp a tile, against the other's 384 tensor cycles), so it hides less than at
// hd 128. 6h64 within 0-8% of 6f64 (either way); 6f64 10-15% faster than 6a64 (the pingpong matters more where the
// elementwise part is relatively larger); 6g64 within 2% of 6f64 (3 stages already lead by ~2 items of ~1.3-1.5 us
// against ~1 us of TMA latency); 6c64, 6d64 each about half of 6a64's gain.
// Measured (H100 80GB HBM3, 2026-12-07; llama3-1b, total ms and TFLOP/s; all correct, every variant == 4a64 bit for bit):
//   4a64 0.850 202   6a64 0.779 221   6b64 0.794 217   6c64 0.747 230   6d64 0.890 193   6e64 0.810 212
//   6f64 0.759 226   6g64 0.765 225   6h64 0.753 228
// 6f64 landed on its prediction (0.74, ~230; -11% against 4a64, not -23%: 4a64 ran 0.850 here, not the 0.96 the
// trainer's profile implied). 6c64 (kernel4's dQ kernel beside kernel6's dK/dV) is the fastest by 1.7%: at hd 64
// kernel4's dQ kernel, 2 CTAs/SM, is as good as kernel6's; the dK/dV kernel carries the gain (6d64 is slower than
// 4a64). 6f64 is the dispatch (the one the trainer was timed with: attention backward 15.26 -> 13.79 ms a step).
// To run: ./attention_backward 4a64,6a64,6b64,6c64,6d64,6e64,6f64,6g64,6h64
#include <cuda_runtime.h>                  // defines: cudaEvent_t
#include <stdio.h>                         // defines: printf
#include <string.h>                        // defines: strcmp, strstr
#include <math.h>                          // defines: exp, sqrt
#include <vector>                          // defines: std::vector
#include <algorithm>                       // defines: std::sort
#include "../../qlora.h"                   // defines: f32_to_bf16, bf16_to_f32, rng_uniform
#include "../../kernels/attention.cuh"     // defines: attention_backward_hd (kernel2), attention_backward_split_hd,
                                           //   attention_backward4_launch, attention_backward6_launch, AttnBwdParams, attention_forward

// ---------------------------------------------------------------------------------------------
// kernel1 (graduated, then replaced by kernel2 for determinism)

// D = rowsum(dout * out) per (b, h, i), and dq_accum <- 0 (same row layout as dout, fp32).
template <int HD>
__global__ void attention_backward_preprocess_kernel1(float* D, float* dq_accum, const bf16* out, const bf16* dout,
                                                      int B, int T, int nh) {
    constexpr int TPR = HD / 8;  // lanes per row, 8 elements (16 bytes) each
    const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    const int64_t row = idx / TPR, rows = (int64_t)B * T * nh;  // row = (b * T + i) * nh + h
    const int c = (int)(idx % TPR);
    float sum = 0.f;
    if (row < rows) {
        const int64_t off = row * HD + c * 8;
        const uint4 ov = *reinterpret_cast<const uint4*>(out + off);
        const uint4 dv = *reinterpret_cast<const uint4*>(dout + off);
        const __nv_bfloat162* o2 = reinterpret_cast<const __nv_bfloat162*>(&ov);
        const __nv_bfloat162* d2 = reinterpret_cast<const __nv_bfloat162*>(&dv);
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const float2 a = __bfloat1622float2(o2[e]), d = __bfloat1622float2(d2[e]);
            sum += a.x * d.x + a.y * d.y;
        }
        float4* z = reinterpret_cast<float4*>(dq_accum + off);
        z[0] = make_float4(0.f, 0.f, 0.f, 0.f);
        z[1] = make_float4(0.f, 0.f, 0.f, 0.f);
    }
#pragma unroll
    for (int off = TPR / 2; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
    if (row < rows && c == 0) {
        const int64_t bt = row / nh;
        const int h = (int)(row % nh), bi = (int)(bt / T), i = (int)(bt % T);
        D[((int64_t)bi * nh + h) * T + i] = sum;
    }
}

// dq = bf16(scale * dq_accum)
__global__ void attention_backward_dq_kernel1(bf16* dq, const float* dq_accum, float scale, int64_t n8) {
    const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= n8) return;
    const float4 a = reinterpret_cast<const float4*>(dq_accum)[2 * idx];
    const float4 c = reinterpret_cast<const float4*>(dq_accum)[2 * idx + 1];
    uint4 r;
    r.x = attn_pack_bf16(a.x * scale, a.y * scale); r.y = attn_pack_bf16(a.z * scale, a.w * scale);
    r.z = attn_pack_bf16(c.x * scale, c.y * scale); r.w = attn_pack_bf16(c.z * scale, c.w * scale);
    reinterpret_cast<uint4*>(dq)[idx] = r;
}


// One CTA: BC keys of one kv head (BC/16 warps, 16 key rows each, dK and dV in registers); loops over
// the nh/nkv query heads of the group and the query tiles that can see these keys. Per query tile:
//   S^T = K Q^T, P^T = exp(S^T * scale - lse), dV += P^T dO, dP^T = V dO^T, dS^T = P^T (dP^T - D),
//   dK += dS^T Q, and (dS^T through smem) dQ_accum += dS K with fp32 atomics (run-to-run order varies).
template <int HD, int BC, int BR, int MINB>
__global__ void __launch_bounds__(BC / 16 * 32, MINB) attention_backward_kernel1(const AttnBwdParams p) {
    using C = AttnBwdTile<HD, BC, BR>;
    constexpr int LD = C::LD, LDS = C::LDS, NT = C::THREADS, WARPS = C::WARPS, CH = HD / 8;
    constexpr int QW = BR / 16, DW = WARPS / QW, DCW = HD / DW;  // dQ: QW x DW warps of 16 rows x DCW cols
    static_assert(WARPS % QW == 0 && DCW % 16 == 0, "backward tile shape");
    extern __shared__ __align__(16) unsigned char attn_smem[];
    bf16* sK = reinterpret_cast<bf16*>(attn_smem);  // (BC, LD)
    bf16* sV = sK + BC * LD;                         // (BC, LD)
    bf16* sQ = sV + BC * LD;                         // (2, BR, LD)
    bf16* sdO = sQ + 2 * BR * LD;                    // (2, BR, LD)
    bf16* sdS = sdO + 2 * BR * LD;                   // (BC, LDS) dS^T, bf16
    float* sL = reinterpret_cast<float*>(sdS + BC * LDS);  // (2, BR) lse
    float* sD = sL + 2 * BR;                                // (2, BR) D
    int* sDs = reinterpret_cast<int*>(sD + 2 * BR);         // (2, BR) doc_start

    const int T = p.T, nh = p.nh, nkv = p.nkv, G = nh / nkv;
    const int b = blockIdx.x / nkv, kvh = blockIdx.x % nkv;
    const int k0 = blockIdx.y * BC, k_last = min(k0 + BC, T) - 1;  // tile 0 (most query tiles) first
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t4 = lane & 3;
    const int* ds = p.doc_start ? p.doc_start + (int64_t)b * T : nullptr;
    const int64_t qstride = (int64_t)nh * HD, kstride = (int64_t)nkv * HD;

    {
        const bf16* gK = p.k + (int64_t)b * T * kstride + (int64_t)kvh * HD;
        const bf16* gV = p.v + (int64_t)b * T * kstride + (int64_t)kvh * HD;
        for (int c = tid; c < BC * CH; c += NT) {
            const int r = c / CH, cc = c % CH, j = k0 + r;
            const int64_t off = (j < T ? j : 0) * kstride + cc * 8;
            attn_cp_async16(attn_smem_u32(sK + r * LD + cc * 8), gK + off, j < T);
            attn_cp_async16(attn_smem_u32(sV + r * LD + cc * 8), gV + off, j < T);
        }
        attn_cp_async_commit();
    }
    // last query that can see any of these keys: the largest i with doc_start[i] <= k_last
    // (doc_start is non-decreasing, so that set is a prefix); a block-wide 256-ary search.
    int i_max = T - 1;
    if (ds) {
        int lo = k_last, hi = T - 1;  // ds[lo] <= lo = k_last; the answer is in [lo, hi]
        while (lo < hi) {
            const int step = (hi - lo + NT - 1) / NT, pos = lo + (tid + 1) * step;
            const int n_ok = __syncthreads_count(pos <= hi && ds[pos] <= k_last);  // a prefix of the probes
            lo += n_ok * step;
            hi = min(hi, lo + step - 1);
        }
        i_max = lo;
    }
    const int qt_lo = k0 / BR, nq = i_max / BR - qt_lo + 1, n_iter = G * nq;

    auto load_q = [&](int st, int it) {
        const int hq = kvh * G + it / nq, q0 = (qt_lo + it % nq) * BR;
        const int64_t base = (int64_t)b * T * qstride + (int64_t)hq * HD;
        for (int c = tid; c < BR * CH; c += NT) {
            const int r = c / CH, cc = c % CH, i = q0 + r;
            const int64_t off = base + (i < T ? i : 0) * qstride + cc * 8;
            attn_cp_async16(attn_smem_u32(sQ + (st * BR + r) * LD + cc * 8), p.q + off, i < T);
            attn_cp_async16(attn_smem_u32(sdO + (st * BR + r) * LD + cc * 8), p.dout + off, i < T);
        }
        for (int c = tid; c < 3 * BR; c += NT) {  // lse, D, doc_start of the tile's rows
            const int which = c / BR, r = c % BR, i = q0 + r;
            const int64_t li = ((int64_t)b * nh + hq) * T + (i < T ? i : 0);
            if (which == 0) attn_cp_async4(attn_smem_u32(sL + st * BR + r), p.lse + li, i < T);
            else if (which == 1) attn_cp_async4(attn_smem_u32(sD + st * BR + r), p.D + li, i < T);
            else if (ds) attn_cp_async4(attn_smem_u32(sDs + st * BR + r), ds + (i < T ? i : 0), i < T);
            else sDs[st * BR + r] = 0;
        }
    };
    load_q(0, 0);
    attn_cp_async_commit();

    float dk[HD / 8][4], dv[HD / 8][4];
#pragma unroll
    for (int n = 0; n < HD / 8; n++)
#pragma unroll
        for (int e = 0; e < 4; e++) dk[n][e] = dv[n][e] = 0.f;
    const int kr0 = warp * 16;
    const float sl2 = p.scale_log2;
    const uint32_t kA = attn_smem_u32(sK + (kr0 + ATTN_A_ROW(lane)) * LD + ATTN_A_COL(lane));
    const uint32_t vA = attn_smem_u32(sV + (kr0 + ATTN_A_ROW(lane)) * LD + ATTN_A_COL(lane));
    const int qr0 = (warp % QW) * 16, dc0 = (warp / QW) * DCW;
    const uint32_t dsA = attn_smem_u32(sdS + ATTN_B_ROW(lane) * LDS + qr0 + ATTN_B_COL(lane));
    const uint32_t kT = attn_smem_u32(sK + ATTN_T_ROW(lane) * LD + dc0 + ATTN_T_COL(lane));

    for (int it = 0; it < n_iter; it++) {
        const int st = it & 1, hq = kvh * G + it / nq, q0 = (qt_lo + it % nq) * BR;
        attn_cp_async_wait_all();
        __syncthreads();  // stage st landed; every warp is done with stage st^1 and with sdS
        if (it + 1 < n_iter) { load_q(st ^ 1, it + 1); attn_cp_async_commit(); }
        const bf16* cQ = sQ + st * BR * LD;
        const bf16* cdO = sdO + st * BR * LD;
        const float* cL = sL + st * BR;
        const float* cD = sD + st * BR;
        const int* cDs = sDs + st * BR;

        // S^T = K Q^T and dP^T = V dO^T: (16 keys x BR queries) per warp
        float s[BR / 8][4], dp[BR / 8][4];
#pragma unroll
        for (int n = 0; n < BR / 8; n++)
#pragma unroll
            for (int e = 0; e < 4; e++) s[n][e] = dp[n][e] = 0.f;
        const uint32_t qB = attn_smem_u32(cQ + ATTN_B_ROW(lane) * LD + ATTN_B_COL(lane));
        const uint32_t oB = attn_smem_u32(cdO + ATTN_B_ROW(lane) * LD + ATTN_B_COL(lane));
#pragma unroll
        for (int kk = 0; kk < HD / 16; kk++) {
            uint32_t a[4], av[4];
            attn_ldsm_x4(a, kA + kk * 32);
            attn_ldsm_x4(av, vA + kk * 32);
#pragma unroll
            for (int np = 0; np < BR / 16; np++) {
                uint32_t bb[4];
                attn_ldsm_x4(bb, qB + (np * 16 * LD + kk * 16) * 2);
                attn_mma(s[2 * np], a, bb);
                attn_mma(s[2 * np + 1], a, bb + 2);
                attn_ldsm_x4(bb, oB + (np * 16 * LD + kk * 16) * 2);
                attn_mma(dp[2 * np], av, bb);
                attn_mma(dp[2 * np + 1], av, bb + 2);
            }
        }
        // P^T = exp2(S^T * scale * log2e - lse * log2e), masked to 0; dS^T = P^T (dP^T - D)
        const bool need_mask = k0 + BC - 1 > q0 || q0 + BR > T || (ds && k0 < cDs[BR - 1]);
#pragma unroll
        for (int n = 0; n < BR / 8; n++) {
            const float2 l2 = *reinterpret_cast<const float2*>(cL + n * 8 + 2 * t4);
            const float2 d2 = *reinterpret_cast<const float2*>(cD + n * 8 + 2 * t4);
#pragma unroll
            for (int e = 0; e < 4; e++) {
                float pt = attn_exp2(fmaf(s[n][e], sl2, -(e & 1 ? l2.y : l2.x) * 1.44269504089f));
                if (need_mask) {
                    const int qc = n * 8 + 2 * t4 + (e & 1), i = q0 + qc, j = k0 + kr0 + g + (e >> 1) * 8;
                    if (j > i || i >= T || j < cDs[qc]) pt = 0.f;
                }
                s[n][e] = pt;
                dp[n][e] = pt * (dp[n][e] - (e & 1 ? d2.y : d2.x));
            }
        }
        uint32_t pa[BR / 16][4], da[BR / 16][4];  // bf16 A fragments of P^T and dS^T (16 keys x 16 queries)
#pragma unroll
        for (int kc = 0; kc < BR / 16; kc++) {
            pa[kc][0] = attn_pack_bf16(s[2 * kc][0], s[2 * kc][1]);
            pa[kc][1] = attn_pack_bf16(s[2 * kc][2], s[2 * kc][3]);
            pa[kc][2] = attn_pack_bf16(s[2 * kc + 1][0], s[2 * kc + 1][1]);
            pa[kc][3] = attn_pack_bf16(s[2 * kc + 1][2], s[2 * kc + 1][3]);
            da[kc][0] = attn_pack_bf16(dp[2 * kc][0], dp[2 * kc][1]);
            da[kc][1] = attn_pack_bf16(dp[2 * kc][2], dp[2 * kc][3]);
            da[kc][2] = attn_pack_bf16(dp[2 * kc + 1][0], dp[2 * kc + 1][1]);
            da[kc][3] = attn_pack_bf16(dp[2 * kc + 1][2], dp[2 * kc + 1][3]);
            // dS^T rows kr0+g, kr0+g+8; cols 16kc + 2t4 (+8)
            uint32_t* row_g = reinterpret_cast<uint32_t*>(sdS + (kr0 + g) * LDS + kc * 16 + 2 * t4);
            uint32_t* row_g8 = reinterpret_cast<uint32_t*>(sdS + (kr0 + g + 8) * LDS + kc * 16 + 2 * t4);
            row_g[0] = da[kc][0]; row_g8[0] = da[kc][1]; row_g[4] = da[kc][2]; row_g8[4] = da[kc][3];
        }
        // dV += P^T dO
        const uint32_t oT = attn_smem_u32(cdO + ATTN_T_ROW(lane) * LD + ATTN_T_COL(lane));
        const uint32_t qT = attn_smem_u32(cQ + ATTN_T_ROW(lane) * LD + ATTN_T_COL(lane));
#pragma unroll
        for (int kc = 0; kc < BR / 16; kc++)
#pragma unroll
            for (int d = 0; d < HD / 16; d++) {
                uint32_t bb[4];
                attn_ldsm_x4_t(bb, oT + (kc * 16 * LD + d * 16) * 2);
                attn_mma(dv[2 * d], pa[kc], bb);
                attn_mma(dv[2 * d + 1], pa[kc], bb + 2);
            }
        // dK += dS^T Q
#pragma unroll
        for (int kc = 0; kc < BR / 16; kc++)
#pragma unroll
            for (int d = 0; d < HD / 16; d++) {
                uint32_t bb[4];
                attn_ldsm_x4_t(bb, qT + (kc * 16 * LD + d * 16) * 2);
                attn_mma(dk[2 * d], da[kc], bb);
                attn_mma(dk[2 * d + 1], da[kc], bb + 2);
            }
        __syncthreads();  // all of dS^T is in smem
        // dQ_accum[q0 + qr0 .. +16, dc0 .. +DCW] += dS K (contraction over the BC keys)
        float dq[DCW / 8][4];
#pragma unroll
        for (int n = 0; n < DCW / 8; n++) dq[n][0] = dq[n][1] = dq[n][2] = dq[n][3] = 0.f;
#pragma unroll
        for (int kc = 0; kc < BC / 16; kc++) {
            uint32_t a[4];
            attn_ldsm_x4_t(a, dsA + kc * 16 * LDS * 2);
#pragma unroll
            for (int d = 0; d < DCW / 16; d++) {
                uint32_t bb[4];
                attn_ldsm_x4_t(bb, kT + (kc * 16 * LD + d * 16) * 2);
                attn_mma(dq[2 * d], a, bb);
                attn_mma(dq[2 * d + 1], a, bb + 2);
            }
        }
        // one 16-byte atomic per lane per n8 block: even lanes take row g, odd lanes row g+8
        const bool odd = t4 & 1;
        const int i = q0 + qr0 + g + (odd ? 8 : 0);
        float* dst = p.dq_accum + ((int64_t)b * T + i) * qstride + (int64_t)hq * HD + dc0 + 2 * (t4 & 2);
#pragma unroll
        for (int n = 0; n < DCW / 8; n++) {
            const float x0 = __shfl_xor_sync(0xffffffffu, odd ? dq[n][0] : dq[n][2], 1);
            const float x1 = __shfl_xor_sync(0xffffffffu, odd ? dq[n][1] : dq[n][3], 1);
            const float4 v4 = odd ? make_float4(x0, x1, dq[n][2], dq[n][3]) : make_float4(dq[n][0], dq[n][1], x0, x1);
            if (i < T) atomicAdd(reinterpret_cast<float4*>(dst + n * 8), v4);
        }
    }

    // epilogue: dK (times the softmax scale) and dV, rows k0 + kr0 + g (+8)
#pragma unroll
    for (int r = 0; r < 2; r++) {
        const int j = k0 + kr0 + g + 8 * r;
        if (j >= T) continue;
        const int64_t off = ((int64_t)b * T + j) * kstride + (int64_t)kvh * HD + 2 * t4;
#pragma unroll
        for (int n = 0; n < HD / 8; n++) {
            *reinterpret_cast<uint32_t*>(p.dk + off + n * 8) = attn_pack_bf16(dk[n][2 * r] * p.scale, dk[n][2 * r + 1] * p.scale);
            *reinterpret_cast<uint32_t*>(p.dv + off + n * 8) = attn_pack_bf16(dv[n][2 * r], dv[n][2 * r + 1]);
        }
    }
}

template <int HD, int BC, int BR, int MINB>
void attention_backward1_launch(const AttnBwdParams& p, cudaStream_t stream) {
    using C = AttnBwdTile<HD, BC, BR>;
    auto kernel = attention_backward_kernel1<HD, BC, BR, MINB>;
    cudaCheck(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)C::SMEM));
    dim3 grid(p.B * p.nkv, (p.T + BC - 1) / BC);
    kernel<<<grid, C::THREADS, C::SMEM, stream>>>(p);
    cudaCheck(cudaGetLastError());
}

// The three backward launches around the main kernel: preprocess (D, zero dq_accum) and dq convert.
template <int HD, int BC, int BR, int MINB>
void attention_backward1_hd(bf16* dq, bf16* dk, bf16* dv, float* scratch, const bf16* dout, const bf16* q, const bf16* k,
                           const bf16* v, const bf16* out, const float* lse, const int* doc_start,
                           int B, int T, int nh, int nkv, cudaStream_t stream) {
    float* dq_accum = scratch;                      // (B, T, nh, HD)
    float* D = scratch + (size_t)B * T * nh * HD;   // (B, nh, T); 16-byte aligned since HD % 4 == 0
    const int64_t rows = (int64_t)B * T * nh;
    const int block = 256;
    attention_backward_preprocess_kernel1<HD><<<(unsigned)((rows * (HD / 8) + block - 1) / block), block, 0, stream>>>(
        D, dq_accum, out, dout, B, T, nh);
    cudaCheck(cudaGetLastError());
    const float scale = 1.0f / sqrtf((float)HD);
    AttnBwdParams p{nullptr, dk, dv, dq_accum, nullptr, D, dout, q, k, v, lse, doc_start, B, T, nh, nkv, scale, scale * 1.4426950408889634f};
    attention_backward1_launch<HD, BC, BR, MINB>(p, stream);
    const int64_t n8 = rows * HD / 8;
    attention_backward_dq_kernel1<<<(unsigned)((n8 + block - 1) / block), block, 0, stream>>>(dq, dq_accum, scale, n8);
    cudaCheck(cudaGetLastError());
}

// ---------------------------------------------------------------------------------------------
// kernel3 (graduated, then replaced by kernel4: the ordered dQ traffic was half its time)

// kernel3 (hd 128, Hopper): kernel2's schedule, items and ordered dQ, with the five matmuls on wgmma. Two
// warpgroups of 64 keys each (warp w still owns keys 16 w .. 16 w + 15, so the softmax, dS, the dQ handoff
// and the epilogue are kernel2's, fragment for fragment). Tiles live in 128B-swizzled smem (kernels/wgmma.cuh)
// and serve both as K-major and as "transposed" (MN-major) operands, so nothing goes through ldmatrix:
//   S^T = K Q^T, dP^T = V dO^T   m64n64k16, A = this warpgroup's 64 keys, B = the query tile   (both K-major)
//   dV += P^T dO, dK += dS^T Q   m64n128k16, A = P^T, dS^T from registers, B = dO, Q           (MN-major)
//   dQ = dS K                    m64n64k16, A = dS^T in smem, B = K's columns 64 wg ..        (both MN-major)
template <int HD, int BC, int BR>
struct AttnBwdTile3 {
    static constexpr int THREADS = BC / 16 * 32, CB = HD / 64;  // CB: 64-wide column blocks of a row
    static constexpr int KB = BC * HD * 2, QB = BR * HD * 2, SB = BC * BR * 2;  // bytes: K (or V), Q (or dO), dS^T tiles
    // K, V, Q (2 stages), dO (2 stages), dS^T, the dq_accum prefetch (BR x HD fp32), lse, D, doc_start (2 stages)
    static constexpr size_t OFF_V = KB, OFF_Q = 2 * KB, OFF_DO = OFF_Q + 2 * QB, OFF_DS = OFF_DO + 2 * QB,
                            OFF_ACC = OFF_DS + SB, OFF_L = OFF_ACC + (size_t)BR * HD * 4, SMEM = OFF_L + 2 * 3 * BR * 4;
    static constexpr size_t SMEM_ALLOC = SMEM + 1024;  // the dynamic smem base is aligned up to 1024 bytes
    static_assert(HD == 128 && BC == 128 && BR == 64, "kernel3: the warpgroup split below is written for these");
};

template <int HD, int BC, int BR>
__global__ void __launch_bounds__(BC / 16 * 32, 1) attention_backward_kernel3(const AttnBwdParams p) {
    using C = AttnBwdTile3<HD, BC, BR>;
    constexpr int NT = C::THREADS, CH = HD / 8, DCW = 64;
    extern __shared__ unsigned char attn_smem3[];
    unsigned char* sm = attn_smem3 + ((1024 - (attn_smem_u32(attn_smem3) & 1023)) & 1023);
    const uint32_t sK = attn_smem_u32(sm), sV = sK + C::OFF_V, sQ = sK + C::OFF_Q, sdO = sK + C::OFF_DO, sdS = sK + C::OFF_DS;
    float4* sAcc = reinterpret_cast<float4*>(sm + C::OFF_ACC);  // (8 warps, DCW/8, 32) lane-private dq_accum slots
    float* sL = reinterpret_cast<float*>(sm + C::OFF_L);       // (2, BR) lse
    float* sD = sL + 2 * BR;                                    // (2, BR) D
    int* sDs = reinterpret_cast<int*>(sD + 2 * BR);             // (2, BR) doc_start

    const int T = p.T, nh = p.nh, nkv = p.nkv, G = nh / nkv;
    const int b = blockIdx.x / nkv, kvh = blockIdx.x % nkv;
    const int kt = blockIdx.y, k0 = kt * BC, k_last = min(k0 + BC, T) - 1;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t4 = lane & 3, wg = warp >> 2;
    const int* ds = p.doc_start ? p.doc_start + (int64_t)b * T : nullptr;
    const int64_t qstride = (int64_t)nh * HD, kstride = (int64_t)nkv * HD;
    const int n_sem = (T + ATTN_SEM_ROWS - 1) / ATTN_SEM_ROWS;

    {
        const bf16* gK = p.k + (int64_t)b * T * kstride + (int64_t)kvh * HD;
        const bf16* gV = p.v + (int64_t)b * T * kstride + (int64_t)kvh * HD;
        for (int c = tid; c < BC * CH; c += NT) {
            const int r = c / CH, cc = c % CH, j = k0 + r;
            const int64_t off = (j < T ? j : 0) * kstride + cc * 8;
            attn_cp_async16(sK + wg_swz<BC>(r, cc * 8), gK + off, j < T);
            attn_cp_async16(sV + wg_swz<BC>(r, cc * 8), gV + off, j < T);
        }
        attn_cp_async_commit();
    }
    int i_max = T - 1;  // last query that can see any of these keys (kernel2's search)
    if (ds) {
        int lo = k_last, hi = T - 1;
        while (lo < hi) {
            const int step = (hi - lo + NT - 1) / NT, pos = lo + (tid + 1) * step;
            const int n_ok = __syncthreads_count(pos <= hi && ds[pos] <= k_last);
            lo += n_ok * step;
            hi = min(hi, lo + step - 1);
        }
        i_max = lo;
    }
    const int qt_lo = k0 / BR, qt_hi = i_max / BR, n_iter = G * (qt_hi - qt_lo + 1);

    auto load_q = [&](int st, int it) {
        const int hq = kvh * G + it % G, q0 = (qt_hi - it / G) * BR;
        const int64_t base = (int64_t)b * T * qstride + (int64_t)hq * HD;
        for (int c = tid; c < BR * CH; c += NT) {
            const int r = c / CH, cc = c % CH, i = q0 + r;
            const int64_t off = base + (i < T ? i : 0) * qstride + cc * 8;
            attn_cp_async16(sQ + st * C::QB + wg_swz<BR>(r, cc * 8), p.q + off, i < T);
            attn_cp_async16(sdO + st * C::QB + wg_swz<BR>(r, cc * 8), p.dout + off, i < T);
        }
        for (int c = tid; c < 3 * BR; c += NT) {
            const int which = c / BR, r = c % BR, i = q0 + r;
            const int64_t li = ((int64_t)b * nh + hq) * T + (i < T ? i : 0);
            if (which == 0) attn_cp_async4(attn_smem_u32(sL + st * BR + r), p.lse + li, i < T);
            else if (which == 1) attn_cp_async4(attn_smem_u32(sD + st * BR + r), p.D + li, i < T);
            else if (ds) attn_cp_async4(attn_smem_u32(sDs + st * BR + r), ds + (i < T ? i : 0), i < T);
            else sDs[st * BR + r] = 0;
        }
    };
    load_q(0, 0);
    attn_cp_async_commit();

    float dk[HD / 2], dv[HD / 2];  // (64 keys x HD) per warpgroup: [4 n + e] = key 16 warp + g + 8 (e >> 1), dim 8 n + 2 t4 + (e & 1)
#pragma unroll
    for (int n = 0; n < HD / 2; n++) dk[n] = dv[n] = 0.f;
    const int kr0 = warp * 16, qr0 = (warp & 3) * 16, dc0 = wg * DCW;
    const float sl2 = p.scale_log2;
    const uint32_t kA = sK + wg * 64 * 128, vA = sV + wg * 64 * 128;  // this warpgroup's 64 key rows, column block 0
    int* sem_done = nullptr;

    for (int it = 0; it < n_iter; it++) {
        const int st = it & 1, hq = kvh * G + it % G, qt = qt_hi - it / G, q0 = qt * BR;
        attn_cp_async_wait_all();
        wg_fence_proxy();  // the cp.async stores, and the last item's sAcc reads are done, before wgmma reads
        __syncthreads();
        if (it + 1 < n_iter) { load_q(st ^ 1, it + 1); attn_cp_async_commit(); }
        const uint32_t cQ = sQ + st * C::QB, cdO = sdO + st * C::QB;
        const float* cL = sL + st * BR;
        const float* cD = sD + st * BR;
        const int* cDs = sDs + st * BR;
        const int kt_first = cDs[0] / BC, kt_last = (min(q0 + BR, T) - 1) / BC;
        int* sem = p.dq_sem + ((int64_t)b * nh + hq) * n_sem + qt;
        int seen = 0;
        if (tid == 0 && kt > kt_first) seen = attn_ld_relaxed(sem);

        // S^T = K Q^T and dP^T = V dO^T: (64 keys x BR queries) per warpgroup
        float s[BR / 2], dp[BR / 2];
        wg_fence();
#pragma unroll
        for (int kk = 0; kk < HD / 16; kk++) {
            const uint32_t ko = (kk >> 2) * BC * 128 + (kk & 3) * 32, qo = (kk >> 2) * BR * 128 + (kk & 3) * 32;
            wg_mma_64x64_ss<0, 0>(s, wg_desc(kA + ko, 16, 1024), wg_desc(cQ + qo, 16, 1024), kk);
        }
#pragma unroll
        for (int kk = 0; kk < HD / 16; kk++) {
            const uint32_t ko = (kk >> 2) * BC * 128 + (kk & 3) * 32, qo = (kk >> 2) * BR * 128 + (kk & 3) * 32;
            wg_mma_64x64_ss<0, 0>(dp, wg_desc(vA + ko, 16, 1024), wg_desc(cdO + qo, 16, 1024), kk);
        }
        wg_commit();
        wg_wait<0>();
        wg_fence_regs(s); wg_fence_regs(dp);

        // P^T = exp2(S^T * scale * log2e - lse * log2e), masked to 0; dS^T = P^T (dP^T - D)
        const bool need_mask = k0 + BC - 1 > q0 || q0 + BR > T || (ds && k0 < cDs[BR - 1]);
#pragma unroll
        for (int n = 0; n < BR / 8; n++) {
            const float2 l2 = *reinterpret_cast<const float2*>(cL + n * 8 + 2 * t4);
            const float2 d2 = *reinterpret_cast<const float2*>(cD + n * 8 + 2 * t4);
#pragma unroll
            for (int e = 0; e < 4; e++) {
                float pt = attn_exp2(fmaf(s[4 * n + e], sl2, -(e & 1 ? l2.y : l2.x) * 1.44269504089f));
                if (need_mask) {
                    const int qc = n * 8 + 2 * t4 + (e & 1), i = q0 + qc, j = k0 + kr0 + g + (e >> 1) * 8;
                    if (j > i || i >= T || j < cDs[qc]) pt = 0.f;
                }
                s[4 * n + e] = pt;
                dp[4 * n + e] = pt * (dp[4 * n + e] - (e & 1 ? d2.y : d2.x));
            }
        }
        uint32_t pa[BR / 16][4], da[BR / 16][4];  // bf16 A fragments of P^T and dS^T (16 keys x 16 queries per warp)
#pragma unroll
        for (int kc = 0; kc < BR / 16; kc++) {
#pragma unroll
            for (int h = 0; h < 4; h++) {  // h: (row g | g + 8) x (cols 0-7 | 8-15) of the k16 block
                const int n = 2 * kc + (h >> 1), e = (h & 1) * 2;
                pa[kc][h] = attn_pack_bf16(s[4 * n + e], s[4 * n + e + 1]);
                da[kc][h] = attn_pack_bf16(dp[4 * n + e], dp[4 * n + e + 1]);
                // dS^T row kr0 + g (+8), cols 16 kc + 2 t4 (+8): the A operand of dS K, stored swizzled
                *reinterpret_cast<uint32_t*>(sm + C::OFF_DS + wg_swz<BC>(kr0 + g + 8 * (h & 1), 16 * kc + 8 * (h >> 1) + 2 * t4)) = da[kc][h];
            }
        }
        // dV += P^T dO, dK += dS^T Q
        wg_fence();
#pragma unroll
        for (int kc = 0; kc < BR / 16; kc++) wg_mma_64x128_rs<1>(dv, pa[kc], wg_desc(cdO + kc * 2048, BR * 128, 1024));
#pragma unroll
        for (int kc = 0; kc < BR / 16; kc++) wg_mma_64x128_rs<1>(dk, da[kc], wg_desc(cQ + kc * 2048, BR * 128, 1024));
        wg_commit();

        // our turn for dQ (kernel2's handoff; a hang traps without kernel2's message: any printf in the kernel makes
        // ptxas serialize every wgmma)
        bool stuck = false;
        if (tid == 0) {
            for (int polls = 0; kt > kt_first && seen < kt - kt_first; polls++) {
                if (polls == (1 << 24)) { stuck = true; break; }
                __nanosleep(32);
                seen = attn_ld_relaxed(sem);
            }
            if (kt > kt_first || sem_done) attn_fence_acq_rel();
            if (sem_done) attn_red_add1(sem_done);
        }
        wg_fence_proxy();  // this thread's dS^T stores, before the other warpgroup's wgmma reads them
        __syncthreads();   // all of dS^T is in smem, and it is our turn
        const bool first = kt == kt_first, last = kt == kt_last, odd = t4 & 1;
        const int i = q0 + qr0 + g + (odd ? 8 : 0);
        const int64_t qoff = ((int64_t)b * T + min(i, T - 1)) * qstride + (int64_t)hq * HD + dc0 + 2 * (t4 & 2);
        float4* acc = sAcc + warp * (DCW / 8) * 32 + lane;
        if (!first) {
#pragma unroll
            for (int n = 0; n < DCW / 8; n++) attn_cp_async16(attn_smem_u32(acc + n * 32), p.dq_accum + qoff + n * 8, i < T);
            attn_cp_async_commit();
        }
        // dS K: rows q0 .. +BR, cols dc0 .. +64 (contraction over the BC keys)
        float dq[DCW / 2];
        wg_fence();
#pragma unroll
        for (int kc = 0; kc < BC / 16; kc++)
            wg_mma_64x64_ss<1, 1>(dq, wg_desc(sdS + kc * 2048, BR * 128, 1024), wg_desc(sK + wg * BC * 128 + kc * 2048, BC * 128, 1024), kc);
        wg_commit();
        wg_wait<0>();
        wg_fence_regs(dq); wg_fence_regs(dk); wg_fence_regs(dv);
        if (stuck) __trap();
        if (!first) attn_cp_async_wait_all();
#pragma unroll
        for (int n = 0; n < DCW / 8; n++) {
            const float x0 = __shfl_xor_sync(0xffffffffu, odd ? dq[4 * n] : dq[4 * n + 2], 1);
            const float x1 = __shfl_xor_sync(0xffffffffu, odd ? dq[4 * n + 1] : dq[4 * n + 3], 1);
            float4 v4 = odd ? make_float4(x0, x1, dq[4 * n + 2], dq[4 * n + 3]) : make_float4(dq[4 * n], dq[4 * n + 1], x0, x1);
            if (i >= T) continue;
            if (!first) {
                const float4 a = acc[n * 32];
                v4 = make_float4(a.x + v4.x, a.y + v4.y, a.z + v4.z, a.w + v4.w);
            }
            if (last) {
                const float sc = p.scale;
                *reinterpret_cast<uint2*>(p.dq + qoff + n * 8) =
                    make_uint2(attn_pack_bf16(v4.x * sc, v4.y * sc), attn_pack_bf16(v4.z * sc, v4.w * sc));
            } else {
                __stcg(reinterpret_cast<float4*>(p.dq_accum + qoff + n * 8), v4);
            }
        }
        if (!last) sem_done = sem;
        else {
            sem_done = nullptr;
            if (tid == 0 && !first) *sem = 0;
        }
    }
    __syncthreads();
    if (tid == 0 && sem_done) { attn_fence_acq_rel(); attn_red_add1(sem_done); }

#pragma unroll
    for (int r = 0; r < 2; r++) {
        const int j = k0 + kr0 + g + 8 * r;
        if (j >= T) continue;
        const int64_t off = ((int64_t)b * T + j) * kstride + (int64_t)kvh * HD + 2 * t4;
#pragma unroll
        for (int n = 0; n < HD / 8; n++) {
            *reinterpret_cast<uint32_t*>(p.dk + off + n * 8) = attn_pack_bf16(dk[4 * n + 2 * r] * p.scale, dk[4 * n + 2 * r + 1] * p.scale);
            *reinterpret_cast<uint32_t*>(p.dv + off + n * 8) = attn_pack_bf16(dv[4 * n + 2 * r], dv[4 * n + 2 * r + 1]);
        }
    }
}


template <int HD, int BC, int BR>
void attention_backward3_launch(const AttnBwdParams& p, cudaStream_t stream) {
    using C = AttnBwdTile3<HD, BC, BR>;
    auto kernel = attention_backward_kernel3<HD, BC, BR>;
    cudaCheck(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)C::SMEM_ALLOC));
    dim3 grid(p.B * p.nkv, (p.T + BC - 1) / BC);  // as kernel2: key tile kt - 1 dispatched before kt
    kernel<<<grid, C::THREADS, C::SMEM_ALLOC, stream>>>(p);
    cudaCheck(cudaGetLastError());
}


// preprocess (kernel2's) + kernel3
template <int HD, int BC, int BR>
void attention_backward3_hd(bf16* dq, bf16* dk, bf16* dv, float* scratch, const bf16* dout, const bf16* q, const bf16* k,
                            const bf16* v, const bf16* out, const float* lse, const int* doc_start,
                            int B, int T, int nh, int nkv, cudaStream_t stream) {
    float* dq_accum = scratch;
    float* D = dq_accum + (size_t)B * T * nh * HD;
    int* dq_sem = reinterpret_cast<int*>(D + (size_t)B * nh * T);
    const int64_t rows = (int64_t)B * T * nh, n_sem = (int64_t)B * nh * ((T + ATTN_SEM_ROWS - 1) / ATTN_SEM_ROWS);
    attention_backward_preprocess_kernel2<HD><<<(unsigned)((rows * (HD / 8) + 255) / 256), 256, 0, stream>>>(D, dq_sem, out, dout, B, T, nh, n_sem);
    cudaCheck(cudaGetLastError());
    const float scale = 1.0f / sqrtf((float)HD);
    AttnBwdParams p{dq, dk, dv, dq_accum, dq_sem, D, dout, q, k, v, lse, doc_start, B, T, nh, nkv, scale, scale * 1.4426950408889634f};
    attention_backward3_launch<HD, BC, BR>(p, stream);
}

// ---------------------------------------------------------------------------------------------
// kernel4 v2 (4b): kernels/attention.cuh's dK/dV kernel with the dQ kernel software-pipelined

// kernel4_dq pipelined (4b, tried, not kept: slower): the next tile's dS is computed under this tile's dS K.

template <int HD, int BQ, int BK>
__global__ void __launch_bounds__(BQ / 64 * 128, 1) attention_backward_kernel4_dq_v2(const AttnBwdParams p) {
    using C = AttnBwdTile4q<HD, BQ, BK>;
    constexpr int NT = C::THREADS, CH = HD / 8;
    extern __shared__ unsigned char attn_smem4q2[];
    unsigned char* sm = attn_smem4q2 + ((1024 - (attn_smem_u32(attn_smem4q2) & 1023)) & 1023);
    const uint32_t sQ = attn_smem_u32(sm), sdO = sQ + C::OFF_DO, sK = sQ + C::OFF_K, sV = sQ + C::OFF_V;

    const int T = p.T, nh = p.nh, nkv = p.nkv, G = nh / nkv;
    const int b = blockIdx.x / nh, h = blockIdx.x % nh, kvh = h / G;
    const int q0 = (gridDim.y - 1 - blockIdx.y) * BQ;  // the heaviest (last) query tiles first
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t4 = lane & 3, wg = warp >> 2;
    const int* ds = p.doc_start ? p.doc_start + (int64_t)b * T : nullptr;
    const int64_t qstride = (int64_t)nh * HD, kstride = (int64_t)nkv * HD;
    const bf16* gK = p.k + (int64_t)b * T * kstride + (int64_t)kvh * HD;
    const bf16* gV = p.v + (int64_t)b * T * kstride + (int64_t)kvh * HD;

    {
        const int64_t base = (int64_t)b * T * qstride + (int64_t)h * HD;
        for (int c = tid; c < BQ * CH; c += NT) {
            const int r = c / CH, cc = c % CH, i = q0 + r;
            const int64_t off = base + (i < T ? i : 0) * qstride + cc * 8;
            attn_cp_async16(sQ + wg_swz<BQ>(r, cc * 8), p.q + off, i < T);
            attn_cp_async16(sdO + wg_swz<BQ>(r, cc * 8), p.dout + off, i < T);
        }
    }
    auto load_kv = [&](int st, int kt) {
        for (int c = tid; c < BK * CH; c += NT) {
            const int r = c / CH, cc = c % CH, j = kt * BK + r;
            const int64_t off = (j < T ? j : 0) * kstride + cc * 8;
            attn_cp_async16(sK + st * C::KB + wg_swz<BK>(r, cc * 8), gK + off, j < T);
            attn_cp_async16(sV + st * C::KB + wg_swz<BK>(r, cc * 8), gV + off, j < T);
        }
    };
    // key tiles: from the one holding the first row's document start to the last row's diagonal
    const int q_last = min(q0 + BQ, T) - 1, kt_lo = (ds ? ds[q0] : 0) / BK, kt_hi = q_last / BK;
    load_kv(0, kt_lo);
    attn_cp_async_commit();

    // this thread's two query rows (16 warp + g, + 8 within the tile): lse (pre-scaled by log2 e), D, doc_start
    const int qr0 = warp * 16 + g;
    float lse2[2], Dr[2];
    int dsr[2], qi[2];
#pragma unroll
    for (int r = 0; r < 2; r++) {
        qi[r] = q0 + qr0 + 8 * r;
        const int64_t li = ((int64_t)b * nh + h) * T + min(qi[r], T - 1);
        lse2[r] = p.lse[li] * 1.44269504089f;
        Dr[r] = p.D[li];
        dsr[r] = ds ? ds[min(qi[r], T - 1)] : 0;
    }
    float dq[HD / 2];  // (64 queries x HD) per warpgroup, the accumulator layout
#pragma unroll
    for (int n = 0; n < HD / 2; n++) dq[n] = 0.f;
    const float sl2 = p.scale_log2;
    const uint32_t qA = sQ + wg * 64 * 128, oA = sdO + wg * 64 * 128;  // this warpgroup's 64 query rows

    float s[BK / 2], dp[BK / 2];  // S, dP (64 queries x BK keys) per warpgroup
    uint32_t da[BK / 16][4];        // dS as bf16 A fragments (key blocks 2 kc, 2 kc + 1 -> key chunk kc)
    auto issue_sdp = [&](int st) {  // S = Q K^T, dP = dO V^T of the tile in stage st
        wg_fence();
#pragma unroll
        for (int kk = 0; kk < HD / 16; kk++) {
            const uint32_t qo = (kk >> 2) * BQ * 128 + (kk & 3) * 32, ko = (kk >> 2) * BK * 128 + (kk & 3) * 32;
            wg_mma_64x64_ss<0, 0>(s, wg_desc(qA + qo, 16, 1024), wg_desc(sK + st * C::KB + ko, 16, 1024), kk);
        }
#pragma unroll
        for (int kk = 0; kk < HD / 16; kk++) {
            const uint32_t qo = (kk >> 2) * BQ * 128 + (kk & 3) * 32, ko = (kk >> 2) * BK * 128 + (kk & 3) * 32;
            wg_mma_64x64_ss<0, 0>(dp, wg_desc(oA + qo, 16, 1024), wg_desc(sV + st * C::KB + ko, 16, 1024), kk);
        }
        wg_commit();
    };
    auto ds_tile = [&](int kt) {  // P = exp2(S * scale * log2e - lse * log2e), masked to 0; dS = P (dP - D), in dp
        const int k0 = kt * BK;
        const bool need_mask = k0 + BK - 1 > q0 || k0 + BK > T || q0 + BQ > T || (ds && k0 < ds[q_last]);
#pragma unroll
        for (int n = 0; n < BK / 8; n++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int r = e >> 1;
                float pr = attn_exp2(fmaf(s[4 * n + e], sl2, -lse2[r]));
                if (need_mask) {
                    const int j = k0 + n * 8 + 2 * t4 + (e & 1);
                    if (j > qi[r] || j >= T || qi[r] >= T || j < dsr[r]) pr = 0.f;
                }
                dp[4 * n + e] = pr * (dp[4 * n + e] - Dr[r]);
            }
    };
    auto pack_ds = [&]() {
#pragma unroll
        for (int kc = 0; kc < BK / 16; kc++)
#pragma unroll
            for (int hh = 0; hh < 4; hh++) {
                const int n = 2 * kc + (hh >> 1), e = (hh & 1) * 2;
                da[kc][hh] = attn_pack_bf16(dp[4 * n + e], dp[4 * n + e + 1]);
            }
    };
    auto issue_dq = [&](int st) {  // dQ += dS K (B = K, MN-major)
        wg_fence();
#pragma unroll
        for (int kc = 0; kc < BK / 16; kc++) wg_mma_64x128_rs<1>(dq, da[kc], wg_desc(sK + st * C::KB + kc * 2048, BK * 128, 1024));
        wg_commit();
    };

    // Software pipeline (as the forward's kernel3): S and dP of tile kt + 1 are issued before dS K of tile kt,
    // and the next dS is computed while the tensor cores do dS K. Branch-free around the wgmmas (ptxas
    // serializes them otherwise).
    attn_cp_async_wait_all();
    wg_fence_proxy();
    __syncthreads();  // Q, dO and tile kt_lo landed
    if (kt_lo < kt_hi) { load_kv(1, kt_lo + 1); attn_cp_async_commit(); }
    issue_sdp(0);
    wg_wait<0>();
    wg_fence_regs(s); wg_fence_regs(dp);
    ds_tile(kt_lo);
    pack_ds();
    for (int kt = kt_lo; kt < kt_hi; kt++) {
        const int st = (kt - kt_lo) & 1;
        attn_cp_async_wait_all();
        wg_fence_proxy();
        __syncthreads();  // tile kt + 1 landed
        issue_sdp(st ^ 1);
        issue_dq(st);
        wg_wait<1>();     // S, dP of tile kt + 1 (dS K of tile kt may still run)
        wg_fence_regs(s); wg_fence_regs(dp);
        ds_tile(kt + 1);
        wg_wait<0>();
        wg_fence_regs(dq);
        pack_ds();
        __syncthreads();  // both warpgroups are done with stage st
        if (kt + 2 <= kt_hi) { load_kv(st, kt + 2); attn_cp_async_commit(); }
    }
    issue_dq((kt_hi - kt_lo) & 1);
    wg_wait<0>();
    wg_fence_regs(dq);

#pragma unroll
    for (int r = 0; r < 2; r++) {
        if (qi[r] >= T) continue;
        const int64_t off = ((int64_t)b * T + qi[r]) * qstride + (int64_t)h * HD + 2 * t4;
#pragma unroll
        for (int n = 0; n < HD / 8; n++)
            *reinterpret_cast<uint32_t*>(p.dq + off + n * 8) = attn_pack_bf16(dq[4 * n + 2 * r] * p.scale, dq[4 * n + 2 * r + 1] * p.scale);
    }
}
template <int HD>
void attention_backward4v2_launch(const AttnBwdParams& p, cudaStream_t stream) {
    using C = AttnBwdTile4<HD, 128, 64>;
    using Cq = AttnBwdTile4q<HD, 128, 64>;
    auto kdkdv = attention_backward_kernel4_dkdv<HD, 128, 64>;
    auto kdq = attention_backward_kernel4_dq_v2<HD, 128, 64>;
    cudaCheck(cudaFuncSetAttribute(kdkdv, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)C::SMEM_ALLOC));
    cudaCheck(cudaFuncSetAttribute(kdq, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)Cq::SMEM_ALLOC));
    kdq<<<dim3(p.B * p.nh, (p.T + 127) / 128), Cq::THREADS, Cq::SMEM_ALLOC, stream>>>(p);
    cudaCheck(cudaGetLastError());
    kdkdv<<<dim3(p.B * p.nkv, (p.T + 127) / 128), C::THREADS, C::SMEM_ALLOC, stream>>>(p);
    cudaCheck(cudaGetLastError());
}
template <int HD>
void attention_backward4v2_hd(bf16* dq, bf16* dk, bf16* dv, float* scratch, const bf16* dout, const bf16* q, const bf16* k,
                              const bf16* v, const bf16* out, const float* lse, const int* doc_start,
                              int B, int T, int nh, int nkv, cudaStream_t stream) {
    float* D = scratch + (size_t)B * T * nh * HD;
    int* dq_sem = reinterpret_cast<int*>(D + (size_t)B * nh * T);
    const int64_t rows = (int64_t)B * T * nh, n_sem = (int64_t)B * nh * ((T + ATTN_SEM_ROWS - 1) / ATTN_SEM_ROWS);
    attention_backward_preprocess_kernel2<HD><<<(unsigned)((rows * (HD / 8) + 255) / 256), 256, 0, stream>>>(D, dq_sem, out, dout, B, T, nh, n_sem);
    cudaCheck(cudaGetLastError());
    const float scale = 1.0f / sqrtf((float)HD);
    AttnBwdParams p{dq, dk, dv, scratch, dq_sem, D, dout, q, k, v, lse, doc_start, B, T, nh, nkv, scale, scale * 1.4426950408889634f};
    attention_backward4v2_launch<HD>(p, stream);
}

// ---------------------------------------------------------------------------------------------
// kernel6 (graduated: kernels/attention.cuh, whose attention_backward6_launch runs each of 6a-6f)

// preprocess (D, at kernel2's place in the scratch, so that the "main" timing reads the D of the last full run) + kernel6
template <int HD, int STAGES, bool DQ6, bool DKDV6, bool PINGPONG = false>
void attention_backward6_hd(bf16* dq, bf16* dk, bf16* dv, float* scratch, const bf16* dout, const bf16* q, const bf16* k,
                            const bf16* v, const bf16* out, const float* lse, const int* doc_start,
                            int B, int T, int nh, int nkv, cudaStream_t stream) {
    float* D = scratch + (size_t)B * T * nh * HD;
    const int64_t rows = (int64_t)B * T * nh;
    attention_backward_preprocess_kernel2<HD><<<(unsigned)((rows * (HD / 8) + 255) / 256), 256, 0, stream>>>(D, nullptr, out, dout, B, T, nh, 0);
    cudaCheck(cudaGetLastError());
    const float scale = 1.0f / sqrtf((float)HD);
    AttnBwdParams p{dq, dk, dv, nullptr, nullptr, D, dout, q, k, v, lse, doc_start, B, T, nh, nkv, scale, scale * 1.4426950408889634f};
    attention_backward6_launch<HD, STAGES, DQ6, DKDV6, PINGPONG>(p, stream);
}

// ---------------------------------------------------------------------------------------------

typedef void (*BwdAll)(bf16*, bf16*, bf16*, float*, const bf16*, const bf16*, const bf16*, const bf16*, const bf16*,
                       const float*, const int*, int, int, int, int, cudaStream_t);
typedef void (*BwdMain)(const AttnBwdParams&, cudaStream_t);
struct Variant { const char* name; int hd; BwdAll all; BwdMain main; const char* what; };
static const Variant VARIANTS[] = {
    {"1a", 128, attention_backward1_hd<128, 128, 64, 1>, attention_backward1_launch<128, 128, 64, 1>, "hd128 Bc128 Br64, 8 warps, 1 CTA/SM, atomics"},
    {"1b", 128, attention_backward1_hd<128, 64, 64, 2>, attention_backward1_launch<128, 64, 64, 2>, "hd128 Bc64 Br64, 4 warps, 2 CTA/SM, atomics"},
    {"1e", 128, attention_backward1_hd<128, 128, 32, 1>, attention_backward1_launch<128, 128, 32, 1>, "hd128 Bc128 Br32, 8 warps, 1 CTA/SM, atomics"},
    {"2a", 128, attention_backward_hd<128, 128, 64, 1, true>, attention_backward_launch<128, 128, 64, 1, true>, "hd128 Bc128 Br64, ordered dQ, smem prefetch (production)"},
    {"3a", 128, attention_backward3_hd<128, 128, 64>, attention_backward3_launch<128, 128, 64>, "hd128 Bc128 Br64, ordered dQ, wgmma (2 warpgroups)"},
    {"4a", 128, attention_backward_split_hd<128, attention_backward4_launch<128>>, attention_backward4_launch<128>, "hd128 split: dK dV kernel + dQ kernel, wgmma, no dQ traffic (production on Hopper before kernel6)"},
    {"4b", 128, attention_backward4v2_hd<128>, attention_backward4v2_launch<128>, "4a with the dQ kernel pipelined (not kept)"},
    {"6a", 128, attention_backward6_hd<128, 2, true, true>, attention_backward6_launch<128, 2, true, true>, "kernel4 on kernel5's schedule: TMA producer warpgroup, 2-stage ring (production on Hopper before 6f)"},
    {"6b", 128, attention_backward6_hd<128, 3, true, true>, attention_backward6_launch<128, 3, true, true>, "6a with a 3-stage ring"},
    {"6c", 128, attention_backward6_hd<128, 2, false, true>, attention_backward6_launch<128, 2, false, true>, "6a's dK dV kernel + 4a's dQ kernel"},
    {"6d", 128, attention_backward6_hd<128, 2, true, false>, attention_backward6_launch<128, 2, true, false>, "4a's dK dV kernel + 6a's dQ kernel"},
    {"6e", 128, attention_backward6_hd<128, 2, true, true, true>, attention_backward6_launch<128, 2, true, true, true>, "6a with the dQ kernel's consumers in pingpong (kernel5's), dS K one tile behind"},
    {"6f", 128, attention_backward6_hd<128, 3, true, true, true>, attention_backward6_launch<128, 3, true, true, true>, "6e with a 3-stage ring (ring stalls vs the pingpong itself; production on Hopper)"},
    {"4a64", 64, attention_backward_split_hd<64, attention_backward4_launch<64>>, attention_backward4_launch<64>, "4a at hd 64 (production on Hopper at hd 64 before 6f64)"},
    {"6a64", 64, attention_backward6_hd<64, 2, true, true>, attention_backward6_launch<64, 2, true, true>, "6a at hd 64"},
    {"6b64", 64, attention_backward6_hd<64, 3, true, true>, attention_backward6_launch<64, 3, true, true>, "6b at hd 64"},
    {"6c64", 64, attention_backward6_hd<64, 2, false, true>, attention_backward6_launch<64, 2, false, true>, "6c at hd 64"},
    {"6d64", 64, attention_backward6_hd<64, 2, true, false>, attention_backward6_launch<64, 2, true, false>, "6d at hd 64"},
    {"6e64", 64, attention_backward6_hd<64, 2, true, true, true>, attention_backward6_launch<64, 2, true, true, true>, "6e at hd 64"},
    {"6f64", 64, attention_backward6_hd<64, 3, true, true, true>, attention_backward6_launch<64, 3, true, true, true>, "6f at hd 64 (production on Hopper at hd 64)"},
    {"6g64", 64, attention_backward6_hd<64, 4, true, true, true>, attention_backward6_launch<64, 4, true, true, true>, "6f64 with a 4-stage ring"},
    {"6h64", 64, attention_backward6_hd<64, 3, false, true>, attention_backward6_launch<64, 3, false, true>, "6f64's dK dV kernel + 4a64's dQ kernel (2 CTAs/SM)"},
    {"2b", 128, attention_backward_hd<128, 128, 64, 1, false>, attention_backward_launch<128, 128, 64, 1, false>, "hd128 Bc128 Br64, ordered dQ, load after matmul"},
    {"1c", 64, attention_backward1_hd<64, 128, 64, 1>, attention_backward1_launch<64, 128, 64, 1>, "hd64 Bc128 Br64, 8 warps, 1 CTA/SM, atomics"},
    {"1d", 64, attention_backward1_hd<64, 64, 64, 2>, attention_backward1_launch<64, 64, 64, 2>, "hd64 Bc64 Br64, 4 warps, 2 CTA/SM, atomics"},
    {"1f", 64, attention_backward1_hd<64, 128, 32, 1>, attention_backward1_launch<64, 128, 32, 1>, "hd64 Bc128 Br32, 8 warps, 1 CTA/SM, atomics"},
    {"2c", 64, attention_backward_hd<64, 128, 64, 1, true>, attention_backward_launch<64, 128, 64, 1, true>, "hd64 Bc128 Br64, ordered dQ, smem prefetch (production)"},
    {"2d", 64, attention_backward_hd<64, 128, 64, 1, false>, attention_backward_launch<64, 128, 64, 1, false>, "hd64 Bc128 Br64, ordered dQ, load after matmul"},
};

// ---------------------------------------------------------------------------------------------
// fp64 CPU reference from the same bf16 inputs (out and lse as the GPU forward produced them)

static void attention_backward_cpu(double* dq, double* dk, double* dv, const float* dout, const float* q, const float* k,
                                   const float* v, const float* out, const float* lse, const int* doc,
                                   int B, int T, int nh, int nkv, int hd) {
    const double scale = 1.0 / sqrt((double)hd);
    memset(dq, 0, sizeof(double) * B * T * nh * hd);
    memset(dk, 0, sizeof(double) * B * T * nkv * hd);
    memset(dv, 0, sizeof(double) * B * T * nkv * hd);
    for (int b = 0; b < B; b++)
        for (int h = 0; h < nh; h++)
            for (int i = 0; i < T; i++) {
                const size_t qo = (((size_t)b * T + i) * nh + h) * hd;
                double D = 0;
                for (int c = 0; c < hd; c++) D += (double)dout[qo + c] * out[qo + c];
                const double L = lse[((size_t)b * nh + h) * T + i];
                const int j0 = doc ? doc[b * T + i] : 0, kvh = h / (nh / nkv);
                for (int j = j0; j <= i; j++) {
                    const size_t ko = (((size_t)b * T + j) * nkv + kvh) * hd;
                    double s = 0, dp = 0;
                    for (int c = 0; c < hd; c++) { s += (double)q[qo + c] * k[ko + c]; dp += (double)dout[qo + c] * v[ko + c]; }
                    const double p = exp(s * scale - L), ds = p * (dp - D);
                    for (int c = 0; c < hd; c++) {
                        dq[qo + c] += scale * ds * k[ko + c];
                        dk[ko + c] += scale * ds * q[qo + c];
                        dv[ko + c] += p * dout[qo + c];
                    }
                }
            }
}

// ---------------------------------------------------------------------------------------------

struct Problem {
    int B, T, nh, nkv, hd, doc_len;
    size_t nq = 0, nk = 0, nl = 0;
    std::vector<uint16_t> h[4];  // q, k, v, dout
    std::vector<int> doc;
    bf16 *d_q = nullptr, *d_k = nullptr, *d_v = nullptr, *d_do = nullptr, *d_out = nullptr;
    bf16 *d_dq = nullptr, *d_dk = nullptr, *d_dv = nullptr;
    float *d_lse = nullptr, *d_scratch = nullptr;
    int* d_doc = nullptr;
    double pairs = 0;
};

static void make_problem(Problem& P, uint64_t seed) {
    P.nq = (size_t)P.B * P.T * P.nh * P.hd; P.nk = (size_t)P.B * P.T * P.nkv * P.hd; P.nl = (size_t)P.B * P.nh * P.T;
    const size_t n[4] = {P.nq, P.nk, P.nk, P.nq};
    const float amp[4] = {2.f, 2.f, 1.f, 1.f};
    bf16** d[4] = {&P.d_q, &P.d_k, &P.d_v, &P.d_do};
    for (int t = 0; t < 4; t++) {
        P.h[t].resize(n[t]);
        for (size_t i = 0; i < n[t]; i++) P.h[t][i] = f32_to_bf16((2.f * rng_uniform(seed, t + 1, i) - 1.f) * amp[t]);
        cudaCheck(cudaMalloc(d[t], n[t] * 2));
        cudaCheck(cudaMemcpy(*d[t], P.h[t].data(), n[t] * 2, cudaMemcpyHostToDevice));
    }
    P.pairs = 0;
    if (P.doc_len > 0) {
        P.doc.resize((size_t)P.B * P.T);
        for (int b = 0; b < P.B; b++)
            for (int i = 0; i < P.T; i++) { P.doc[(size_t)b * P.T + i] = i / P.doc_len * P.doc_len; P.pairs += i - P.doc[(size_t)b * P.T + i] + 1; }
        cudaCheck(cudaMalloc(&P.d_doc, P.doc.size() * 4));
        cudaCheck(cudaMemcpy(P.d_doc, P.doc.data(), P.doc.size() * 4, cudaMemcpyHostToDevice));
    } else P.pairs = (double)P.B * P.T * (P.T + 1.0) / 2;
    cudaCheck(cudaMalloc(&P.d_out, P.nq * 2)); cudaCheck(cudaMalloc(&P.d_lse, P.nl * 4));
    cudaCheck(cudaMalloc(&P.d_dq, P.nq * 2)); cudaCheck(cudaMalloc(&P.d_dk, P.nk * 2)); cudaCheck(cudaMalloc(&P.d_dv, P.nk * 2));
    cudaCheck(cudaMalloc(&P.d_scratch, attention_backward_kernel2_scratch_bytes(P.B, P.T, P.nh, P.hd)));
    attention_forward(P.d_out, P.d_lse, P.d_q, P.d_k, P.d_v, P.d_doc, P.B, P.T, P.nh, P.nkv, P.hd, 0);
    cudaCheck(cudaDeviceSynchronize());
}
static void free_problem(Problem& P) {
    for (void* p : {(void*)P.d_q, (void*)P.d_k, (void*)P.d_v, (void*)P.d_do, (void*)P.d_out, (void*)P.d_dq, (void*)P.d_dk,
                    (void*)P.d_dv, (void*)P.d_lse, (void*)P.d_scratch, (void*)P.d_doc})
        if (p) cudaCheck(cudaFree(p));
}
static void run_all(const Variant& V, Problem& P) {
    V.all(P.d_dq, P.d_dk, P.d_dv, P.d_scratch, P.d_do, P.d_q, P.d_k, P.d_v, P.d_out, P.d_lse, P.d_doc, P.B, P.T, P.nh, P.nkv, 0);
}

static double compare(const char* what, const std::vector<uint16_t>& got, const std::vector<double>& ref, double* max_abs) {
    double num = 0, den = 0, mx = 0;
    for (size_t i = 0; i < ref.size(); i++) {
        const double d = bf16_to_f32(got[i]) - ref[i];
        num += d * d; den += ref[i] * ref[i];
        mx = fmax(mx, isnan(d) ? INFINITY : fabs(d));
    }
    (void)what;
    *max_abs = mx;
    return isnan(num) ? INFINITY : sqrt(num / den);
}

// got: dq, dk, dv's bits as the variant wrote them
static bool check_variant(const Variant& V, Problem& P, const std::vector<double> ref[3], std::vector<uint16_t> got[3]) {
    cudaCheck(cudaMemset(P.d_dq, 0xff, P.nq * 2)); cudaCheck(cudaMemset(P.d_dk, 0xff, P.nk * 2));
    cudaCheck(cudaMemset(P.d_dv, 0xff, P.nk * 2));
    cudaCheck(cudaMemset(P.d_scratch, 0xff, attention_backward_kernel2_scratch_bytes(P.B, P.T, P.nh, P.hd)));
    run_all(V, P);
    cudaCheck(cudaDeviceSynchronize());
    const char* names[3] = {"dq", "dk", "dv"};
    bf16* src[3] = {P.d_dq, P.d_dk, P.d_dv};
    const size_t n[3] = {P.nq, P.nk, P.nk};
    bool ok = true;
    printf("  %-4s T=%-5d docs=%-4d", V.name, P.T, P.doc_len);
    for (int t = 0; t < 3; t++) {
        got[t].resize(n[t]);
        cudaCheck(cudaMemcpy(got[t].data(), src[t], n[t] * 2, cudaMemcpyDeviceToHost));
        double mx, rel = compare(names[t], got[t], ref[t], &mx);
        double ref_max = 0;
        for (double x : ref[t]) ref_max = fmax(ref_max, fabs(x));
        const bool tok = rel < 1e-2 && mx < 2e-2 * ref_max;
        ok &= tok;
        printf("  %s rel_l2 %.2e max_abs %.2e (max |ref| %.2e)%s", names[t], rel, mx, ref_max, tok ? "" : " FAIL");
    }
    printf("  %s\n", ok ? "ok" : "FAIL");
    return ok;
}

// both launches alone: the same scratch layout (kernel1 uses a prefix); kernel2 leaves its semaphores zeroed
static float time_ms(const Variant& V, Problem& P, bool main_only, int reps) {
    const float scale = 1.0f / sqrtf((float)P.hd);
    float* D = P.d_scratch + P.nq;
    AttnBwdParams p{P.d_dq, P.d_dk, P.d_dv, P.d_scratch, reinterpret_cast<int*>(D + P.nl), D, P.d_do, P.d_q, P.d_k, P.d_v,
                    P.d_lse, P.d_doc, P.B, P.T, P.nh, P.nkv, scale, scale * 1.4426950408889634f};
    cudaEvent_t e0, e1;
    cudaCheck(cudaEventCreate(&e0)); cudaCheck(cudaEventCreate(&e1));
    std::vector<float> ms;
    for (int r = 0; r < reps + 1; r++) {  // groups of 10 back-to-back launches hide the launch gaps
        cudaCheck(cudaEventRecord(e0));
        for (int k = 0; k < 10; k++) { if (main_only) V.main(p, 0); else run_all(V, P); }
        cudaCheck(cudaEventRecord(e1));
        cudaCheck(cudaEventSynchronize(e1));
        float t; cudaCheck(cudaEventElapsedTime(&t, e0, e1));
        if (r >= 1) ms.push_back(t / 10);  // the first group is warm-up
    }
    cudaCheck(cudaEventDestroy(e0)); cudaCheck(cudaEventDestroy(e1));
    std::sort(ms.begin(), ms.end());
    return ms[ms.size() / 2];
}

// run the whole backward twice on the same inputs, outputs and scratch poisoned with different bytes in
// between; returns how many of dq, dk, dv's elements differ in their bits (unwritten ones differ too)
static size_t repeat_diff(const Variant& V, Problem& P, size_t diff[3], std::vector<uint16_t> bits[3]) {
    bf16* src[3] = {P.d_dq, P.d_dk, P.d_dv};
    const size_t n[3] = {P.nq, P.nk, P.nk}, scratch = attention_backward_kernel2_scratch_bytes(P.B, P.T, P.nh, P.hd);
    std::vector<uint16_t> first[3];
    for (int r = 0; r < 2; r++) {
        for (int t = 0; t < 3; t++) cudaCheck(cudaMemset(src[t], r ? 0x7f : 0xff, n[t] * 2));
        cudaCheck(cudaMemset(P.d_scratch, r ? 0x55 : 0xff, scratch));
        run_all(V, P);
        cudaCheck(cudaDeviceSynchronize());
        for (int t = 0; t < 3; t++) {
            std::vector<uint16_t> got(n[t]);
            cudaCheck(cudaMemcpy(got.data(), src[t], n[t] * 2, cudaMemcpyDeviceToHost));
            if (r == 0) first[t] = got;
            else { diff[t] = 0; for (size_t i = 0; i < n[t]; i++) diff[t] += got[i] != first[t][i]; }
        }
    }
    for (int t = 0; t < 3; t++) bits[t].swap(first[t]);
    return diff[0] + diff[1] + diff[2];
}
// elements of dq, dk, dv whose bits differ between two variants' outputs
static size_t bits_diff(const std::vector<uint16_t> a[3], const std::vector<uint16_t> b[3], size_t diff[3]) {
    for (int t = 0; t < 3; t++) {
        diff[t] = 0;
        for (size_t i = 0; i < a[t].size(); i++) diff[t] += a[t][i] != b[t][i];
    }
    return diff[0] + diff[1] + diff[2];
}

static bool selected(const char* only, const char* name) {  // only: null or a comma-separated list
    if (!only) return true;
    for (const char* s = only; (s = strstr(s, name)) != nullptr; s++)
        if ((s == only || s[-1] == ',') && (s[strlen(name)] == ',' || s[strlen(name)] == 0)) return true;
    return false;
}

int main(int argc, char** argv) {
    const char* only = argc > 1 ? argv[1] : nullptr;
    const bool once = argc > 2 && !strcmp(argv[2], "once");  // one launch of the first matching shape (for ncu)
    int ndev = 0;
    if (cudaGetDeviceCount(&ndev) != cudaSuccess || ndev == 0) { printf("no CUDA device\n"); return 0; }
    cudaDeviceProp prop; cudaCheck(cudaGetDeviceProperties(&prop, 0));
    printf("device: %s, %d SMs\n", prop.name, prop.multiProcessorCount);
    bool all_ok = true;

    if (!once) printf("correctness vs fp64 CPU (B=1 T=777 nh=8 nkv=2):\n");
    for (int hd : {64, 128})
        for (int doc_len : {0, 100}) {
            if (once) break;
            Problem P{1, 777, 8, 2, hd, doc_len};
            make_problem(P, 99 + hd + doc_len);
            std::vector<float> f[4];
            for (int t = 0; t < 4; t++) { f[t].resize(P.h[t].size()); for (size_t i = 0; i < f[t].size(); i++) f[t][i] = bf16_to_f32(P.h[t][i]); }
            std::vector<uint16_t> ob(P.nq);
            std::vector<float> o(P.nq), lse(P.nl);
            cudaCheck(cudaMemcpy(ob.data(), P.d_out, P.nq * 2, cudaMemcpyDeviceToHost));
            cudaCheck(cudaMemcpy(lse.data(), P.d_lse, P.nl * 4, cudaMemcpyDeviceToHost));
            for (size_t i = 0; i < P.nq; i++) o[i] = bf16_to_f32(ob[i]);
            std::vector<double> ref[3] = {std::vector<double>(P.nq), std::vector<double>(P.nk), std::vector<double>(P.nk)};
            attention_backward_cpu(ref[0].data(), ref[1].data(), ref[2].data(), f[3].data(), f[0].data(), f[1].data(), f[2].data(),
                                   o.data(), lse.data(), doc_len ? P.doc.data() : nullptr, P.B, P.T, P.nh, P.nkv, hd);
            std::vector<uint16_t> bits4a[3];  // kernel6 runs 4a's (4a64's) operations in its order: expect the same bits
            for (const Variant& V : VARIANTS)
                if (V.hd == hd && selected(only, V.name)) {
                    std::vector<uint16_t> bits[3];
                    all_ok &= check_variant(V, P, ref, bits);
                    if (!strncmp(V.name, "4a", 2)) for (int t = 0; t < 3; t++) bits4a[t] = bits[t];  // 4a or 4a64
                    size_t diff[3];
                    if (V.name[0] == '6' && !bits4a[0].empty()) {
                        const bool id = bits_diff(bits, bits4a, diff) == 0;
                        all_ok &= id;
                        printf("      vs 4a%s: %s (dq %zu, dk %zu, dv %zu elements differ)\n", hd == 64 ? "64" : "", id ? "bitwise identical" : "DIFFERS (expected the same bits)", diff[0], diff[1], diff[2]);
                    }
                    const bool same = repeat_diff(V, P, diff, bits) == 0;
                    if (V.name[0] != '1') all_ok &= same;  // kernel1 is not deterministic
                    printf("      repeat: %s (dq %zu, dk %zu, dv %zu elements differ)\n", same ? "bitwise identical" : "DIFFERS", diff[0], diff[1], diff[2]);
                }
            free_problem(P);
        }

    struct Shape { const char* name; int B, T, nh, nkv, hd, doc_len; };
    const Shape shapes[] = {
        {"llama3-8b", 4, 2048, 32, 8, 128, 0},
        {"llama3-1b", 4, 2048, 32, 8, 64, 0},
        {"8b long", 1, 16384, 32, 8, 128, 0},
        {"8b long packed 2k", 1, 16384, 32, 8, 128, 2048},
    };
    printf("\n%-18s %-4s %9s %9s %9s %9s  %-22s %s\n", "shape", "var", "total ms", "TFLOP/s", "main ms", "TFLOP/s", "repeat (dq dk dv diff)", "variant");
    for (const Shape& S : shapes) {
        Problem P{S.B, S.T, S.nh, S.nkv, S.hd, S.doc_len};
        make_problem(P, 7);
        const double flops = 10.0 * S.hd * S.nh * P.pairs;
        std::vector<uint16_t> bits4a[3];  // as above, at every shape (B = 4: the batch coordinate of kernel6's copies)
        for (const Variant& V : VARIANTS) {
            if (V.hd != S.hd || !selected(only, V.name)) continue;
            if (once) { run_all(V, P); cudaCheck(cudaDeviceSynchronize()); free_problem(P); return 0; }
            const float all = time_ms(V, P, false, 5), main_ms = time_ms(V, P, true, 5);
            size_t diff[3];
            std::vector<uint16_t> bits[3];
            const bool same = repeat_diff(V, P, diff, bits) == 0;
            if (V.name[0] != '1') all_ok &= same;  // kernel1 is not deterministic, and says so
            char rep[96];
            int len = snprintf(rep, sizeof rep, "%s %zu %zu %zu", same ? "same" : "DIFF", diff[0], diff[1], diff[2]);
            if (!strncmp(V.name, "4a", 2)) for (int t = 0; t < 3; t++) bits4a[t].swap(bits[t]);  // 4a or 4a64
            if (V.name[0] == '6' && !bits4a[0].empty()) {
                const bool id = bits_diff(bits, bits4a, diff) == 0;
                all_ok &= id;
                snprintf(rep + len, sizeof rep - len, ", vs 4a%s %s %zu %zu %zu", S.hd == 64 ? "64" : "", id ? "same" : "DIFF", diff[0], diff[1], diff[2]);
            }
            printf("%-18s %-4s %9.4f %9.1f %9.4f %9.1f  %-22s %s\n", S.name, V.name, all, flops / (all * 1e-3) / 1e12, main_ms,
                   flops / (main_ms * 1e-3) / 1e12, rep, V.what);
        }
        free_problem(P);
    }
    printf("%s\n", all_ok ? "all variants correct" : "SOME VARIANTS FAILED");
    return all_ok ? 0 : 1;
}
