// dev/cuda/attention_forward.cu: playground for the causal GQA flash-attention forward (bf16, H100).
//
//   nvcc -std=c++17 -O3 -gencode arch=compute_90a,code=sm_90a -Xptxas -v dev/cuda/attention_forward.cu -o attention_forward
//   ./attention_forward            check every variant against an fp64 CPU reference, then time them
//   ./attention_forward 1b,1h      only these variants
//
// FLOPs counted as FlashAttention does for causal attention: 4 * hd * nh * (allowed (i, j) pairs),
// i.e. 2 B nh T^2 hd for a plain causal row; packed rows count only their in-document pairs.
//
// Versions (the number stays with the kernel when it moves to kernels/attention.cuh):
//   kernel1: FlashAttention-2 on mma.sync m16n8k16 + ldmatrix + 2-stage cp.async; a warp owns 16 RT
//            query rows; letters are tile/occupancy variants of it (see VARIANTS below).
//   kernel2: kernel1's tiles on wgmma (sm_90a): two warpgroups of 64 query rows, 128-key tiles in
//            128B-swizzled smem, S = Q K^T and O += P V as m64n128k16 (P from registers). Production on Hopper
//            until kernel5 replaced it (session 10); kept here as 2a, the baseline kernel5 is checked against.
//   kernel3: kernel2 software-pipelined (FA3's intra-warpgroup overlap: S of tile t+1 issued before P V of
//            tile t, the softmax under P V). Slower; kept here, not used.
//   kernel5: FA3's schedule (TMA producer warpgroup, mbarrier ring, two consumer warpgroups in pingpong), in
//            kernels/attention.cuh: production on Hopper at hd 128 (5a, 2 stages) since session 10.
//
// Two numbers, llama3-8b (B=4 T=2048 nh=32 nkv=8 hd=128): 137 GFLOP (causal); at the ~760 TFLOP/s a
// cuBLAS bf16 GEMM reaches on this H100 that is 0.18 ms. Bytes: q, k, v, out = 160 MB -> 0.055 ms at
// 2.9 TB/s. So compute-bound; mma.sync itself tops out well under the wgmma rate.
//
// Measured on one H100 80GB HBM3 (2026-11-23, two runs agreed within 2%), ms and causal TFLOP/s:
//   shape (B, T)             1a 1CTA/SM   1b 2CTA/SM   1g Bc32      1c Br64
//   llama3-8b (4, 2048)      0.608 226    0.565 244    0.568 242    0.659 209
//   hd128 (1, 16384)         8.03  274    7.91  278    8.20  268    9.88  223
//   hd128 (1, 16384) docs 2k 1.20  230    1.11  247    1.15  238    1.34  206
//                            1d Bc64      1e Bc128     1f Br64
//   llama3-1b (4, 2048)      0.276 250    0.342 201    0.283 243
//   hd64 (1, 16384)          3.84  286    4.53  243    4.50  244
// 1b beats 1a: 16 warps/SM hide more ldmatrix latency than Q-in-registers saves (1b fits 128
// registers by spilling 40 bytes). Packed rows (2k documents in a 16k row) run at the dense rate on their own FLOPs:
// the skipped tiles cost nothing.
//
// Profile (ncu --clock-control none, 1b on llama3-8b, 567 us): SM 40%, L1/shared 68%, L2 41%, DRAM 14%;
// issue slots busy 37%, 10.5 cycles between a warp's instructions, 41% of them short-scoreboard
// stalls on MIO (ldmatrix); the tensor pipe ~40% busy. Reading: a warp owns 16 query rows, so each
// K/V element is fetched from smem once per 16 rows (16 FLOP per smem byte: at 128 B/clk/SM that caps
// mma.sync near half its peak), and its latency is exposed at 16 warps/SM.
// Next: wgmma (sm_90a) with 64-row warpgroup tiles reading K/V straight from smem, K/V by TMA, and
// FA3-style overlap of softmax with the next tile's Q K^T; cheaper step first: two m16 row tiles per
// warp sharing each B fragment (fits the register budget at hd 64 only).
//
// v4 (2026-11-23): the cheaper step, RT = 2 m16 row tiles per warp (32 rows), as FlashAttention-2 lays
// out its hd128 forward (Br128, 4 warps). Each K/V ldmatrix feeds 2 mmas, so smem bytes per FLOP drop
// from 2.25 to 1.25 KiB per query row per kv tile. It does fit at hd 128: ptxas 255 registers (O 128,
// S 64), 72 bytes spilled at Bc64, none at Bc32; 8 warps/SM as before 16. Prediction: ldmatrix-bound
// (41% MIO stalls), so ~1.5x fewer smem bytes -> +20-30%, less for the halved warp count.
// Measured, H100 80GB HBM3, ms and causal TFLOP/s (two runs agreed within 1.5%):
//   shape (B, T)             1b (v3)      1h RT2       1i RT2 Bc32  1j RT2 Br256
//   llama3-8b (4, 2048)      0.555 248    0.468 294    0.544 253    0.534 257
//   hd128 (1, 16384)         7.85  280    7.01  314    7.41  297    6.77  325
//   hd128 (1, 16384) docs 2k 1.09  251    0.929 296    1.00  275    1.08  255
//                            1d (v3)      1k RT2 Qsmem 1l RT2 Qreg  1m RT2 Br256
//   llama3-1b (4, 2048)      0.278 248    0.280 246    0.266 258    0.291 236
//   hd64 (1, 16384)          3.81  289    3.78  291    3.77  292    3.61  305
// 1h and 1l are production (+18% at llama3-8b, +4% at llama3-1b); 1j wins at 16k but loses at 2k (fewer,
// longer CTAs: the causal tail). hd 64 gains little: it was less ldmatrix-bound (Q in registers already).
// 1h's 72 spilled bytes did not stop it; the spill-free Bc32 (1i) loses to the doubled per-tile overhead.
//
// v5 (session 3, 2026-11-23): wgmma. Prediction: the ldmatrix bound above disappears (wgmma reads K and V
// from smem itself) and the tensor pipe is ~2x mma.sync's, so ~1.5x at llama3-8b. Measured (H100, ms and
// causal TFLOP/s; two runs within 2%):
//   shape (B, T)             1h (v4)      2a wgmma     3a pipelined
//   llama3-8b (4, 2048)      0.472 291    0.419 328    0.454 303
//   hd128 (1, 16384)         6.65  331    5.65  389    5.85  376
//   hd128 (1, 16384) docs 2k 0.939 293    0.803 342    0.846 325
// +13-17%, not 1.5x: both warpgroups wait at one barrier per key tile and the tensor pipe idles during each
// softmax (1 CTA/SM, 202 registers). 3a overlaps the softmax with P V inside a warpgroup and loses 4-8%;
// the overlap FA3 gets comes with its producer warp (TMA) and pingpong between the consumer warpgroups,
// not tried. ptxas serializes the wgmmas (C7514) when they are issued under a branch, so 3a peels the last
// tile out of its loop.
//
// kernel5 (session 8): FA3's schedule (below). A producer warpgroup (one thread) loads Q and then K, V tiles
// by TMA into a 2- or 3-stage ring (full/empty mbarriers, K and V apart); two consumer warpgroups of 64 rows
// (setmaxnreg 24 / 240) take turns on the tensor cores through two named barriers (pingpong): in its turn
// a warpgroup issues S(t) = Q K(t)^T and O += P(t-1) V(t-1), then runs softmax(t) under the other's wgmmas.
// Prediction (before running): the tensor pipe no longer idles during a softmax (the softmax of 64 x 128
// scores is ~500 cycles of ex2 alone against ~1000 for a turn's 16 wgmmas), and no __syncthreads; so
// +20-30% over kernel2: llama3-8b ~0.34 ms (~400 TFLOP/s), 16k ~4.5 ms (~480). 5c (no pingpong) near 3a.
// Built: 5a (2 stages), 5b (3 stages), 5c (5a without the named barriers, to separate the levers). ptxas:
// 168 registers at launch, 0 spills, no C75xx serialization warning. Not yet run: none of this session's
// calls got a device machine (starts failed or it was busy); correctness and timings are owed to the next
// session with a GPU: ./attention_forward 2a,3a,5a,5b,5c
// Session 10: kernel5 and its helpers (now kernels/tma.cuh) moved to kernels/attention.cuh and became the trainer's
// hd-128 forward on Hopper, kernel2 moved here. Measured (H100 80GB HBM3, 2026-12-07, one run; ms, causal TFLOP/s;
// 5a-5c == 2a bit for bit):
//   shape (B, T)             2a           5a           5b           5c
//   llama3-8b (4, 2048)      0.421 327    0.294 467    0.312 441    0.328 419
//   hd128 (1, 16384)         5.25  419    3.77  583    3.64  605    3.78  581
//   hd128 (1, 16384) docs 2k 0.811 339    0.568 484    0.600 458    0.620 443
// Beyond the prediction (0.34 / 4.5 ms): +43% at 2k. The pingpong is worth ~10% at 2k (5c), the third stage
// pays only on long rows (5b). Production: 5a below T = 8192, 5b from there.
//
// Session 11: kernel5 at hd 64 (5a64, 5b64, 5c64: 5a-5c's ring depth and pingpong; 1l was the trainer's hd-64 forward).
// A 64-dim row is one 128-byte swizzle atom, so each tile is one TMA box; S = Q K^T 4 k16 steps (8 at hd 128),
// O += P V m64n64k16; tiles (Bq 128, Bk 128), ring and schedule as at hd 128. ptxas: 168 registers at launch (setmaxnreg
// 24 / 240 as at hd 128), 0 spills, no C75xx warning; smem 81 KiB (2 stages), 113 KiB (3).
// Prediction (before any run): at hd 64 the exps tie with the wgmmas. Per 128 x 128 tile pair (both warpgroups) the
// wgmmas are 2 x (64 x 128 x 64 + 64 x 64 x 128) = 2.1 M FMA, at 2048 bf16 FMA a clock per SM 1024 cycles; the softmax
// takes 16384 ex2 at 16 a clock per SM (MUFU): 1024 cycles too (hd 128: 2048 against the same 1024, so its softmax
// hides). Tied pipes never both run flat out; say 1.25x: ~1280 cycles a tile pair against hd 128's ~2048, 0.625x the
// time for 0.5x the FLOPs. Scaling the measured hd-128 rates (467, 605) by 0.5 / 0.625: llama3-1b (4, 2048) ~375 TFLOP/s, ~0.185 ms
// (1l 0.266: ~1.45x; 16 layers ~3.0 ms against the trainer's 4.56); 1b long (1, 16384) ~485, ~2.3 ms (1l 3.77).
// 5b64 within 3% of 5a64 at 2k (loads are half hd 128's bytes). 5c64 5-10% behind 5a64 (hd 128: 10%): without the
// turns both softmaxes can land at once and fight over MUFU while the tensor pipe idles. Below ~300 TFLOP/s: the
// schedule is not overlapping MUFU and wgmma (profile the pipes); at ~375, the lever left is the exp itself (part of
// the ex2s as a polynomial on the FMA pipe, FlashAttention-4's trick); a larger Bk only amortises fixed per-tile costs.
// Measured (H100 80GB HBM3, 2026-12-07; ms, causal TFLOP/s; all correct, 5b64 and 5c64 == 5a64 bit for bit):
//   shape                 1l             5a64           5b64           5c64
//   llama3-1b (4, 2048)   0.2625 262     0.2142 321     0.2157 319     0.2148 320
//   1b long (1, 16384)    3.550  310     2.507  439     2.940  374     2.559  430
// Slower than predicted (0.185 ms / 375 at 2k; 2.3 / 485 long) and above the ~300 TFLOP/s that would mean no overlap:
// 1.23x 1l at 2k, 1.42x long. The pingpong gains nothing at 2k (5c64 equal) and 2% long; a 3rd stage loses long.
// 5a64 is the dispatch at hd 64 on Hopper now (trainer, llama3-1b: attention forward 4.56 -> 3.74 ms a step).
//   ./attention_forward 1l,5a64,5b64,5c64
// The check also compares 5a-5c's out and lse bits with 2a's (kernel2's order of operations: expected identical), and
// 5b64's and 5c64's with 5a64's (the same operations, other schedules); a difference fails the run (Variant::same_bits).
#include <cuda_runtime.h>                  // defines: cudaEvent_t
#include <stdio.h>                         // defines: printf
#include <string.h>                        // defines: strcmp, strstr, strlen, memcpy
#include <math.h>                          // defines: exp, sqrt
#include <vector>                          // defines: std::vector
#include <algorithm>                       // defines: std::sort
#include "../../qlora.h"                   // defines: f32_to_bf16, bf16_to_f32, rng_uniform, rng_u32
#include "../../kernels/attention.cuh"     // defines: attention_forward_launch (kernel1), attention_forward5_launch, AttnFwdParams

// ---------------------------------------------------------------------------------------------
// kernel2 (graduated, then replaced by kernel5, which kernels/attention.cuh runs at hd 128 on Hopper)

// kernel2 (hd 128, Hopper): kernel1's tiles and online softmax on wgmma. Two warpgroups of 64 query rows
// (BQ = 128), 128-key tiles double-buffered in 128B-swizzled smem (kernels/wgmma.cuh):
//   S = Q K^T   m64n128k16, A = this warpgroup's Q rows, B = the key tile       (both K-major)
//   O += P V    m64n128k16, A = P from registers (bf16), B = the value tile     (MN-major)
// Warp w still owns rows 16 w + g, + 8 (the accumulator layout is mma.sync's), so the softmax is kernel1's.
template <int HD, int BQ, int BK>
struct AttnFwdTile2 {
    static constexpr int THREADS = BQ / 64 * 128;
    static constexpr int QB = BQ * HD * 2, KB = BK * HD * 2;  // bytes: Q tile, K (or V) tile
    static constexpr size_t OFF_K = QB, OFF_V = OFF_K + 2 * KB, SMEM = OFF_V + 2 * KB;  // Q, K (2 stages), V (2 stages)
    static constexpr size_t SMEM_ALLOC = SMEM + 1024;  // the dynamic smem base is aligned up to 1024 bytes
    static_assert(HD == 128 && BQ == 128 && BK == 128, "attention_forward_kernel2: written for these (hd 64: kernel1 measured faster, 4.51 vs 5.01 ms at llama3-1b)");
};

template <int HD, int BQ, int BK>
__global__ void __launch_bounds__(BQ / 64 * 128, 1) attention_forward_kernel2(const AttnFwdParams p) {
    using C = AttnFwdTile2<HD, BQ, BK>;
    constexpr int NT = C::THREADS, CH = HD / 8;
    extern __shared__ unsigned char attn_smemf2[];
    unsigned char* sm = attn_smemf2 + ((1024 - (attn_smem_u32(attn_smemf2) & 1023)) & 1023);
    const uint32_t sQ = attn_smem_u32(sm), sK = sQ + C::OFF_K, sV = sQ + C::OFF_V;

    const int T = p.T, nh = p.nh, nkv = p.nkv;
    const int b = blockIdx.x / nh, h = blockIdx.x % nh, kvh = h / (nh / nkv);
    const int q0 = (gridDim.y - 1 - blockIdx.y) * BQ;  // heaviest (last) query tiles first
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t4 = lane & 3, wg = warp >> 2;
    const int q_last = min(q0 + BQ, T) - 1;
    const int* ds = p.doc_start ? p.doc_start + (int64_t)b * T : nullptr;
    const int ds_max = ds ? ds[q_last] : 0;  // doc_start is non-decreasing along the row
    const int t_lo = (ds ? ds[q0] : 0) / BK, t_hi = q_last / BK;
    const int64_t qstride = (int64_t)nh * HD, kstride = (int64_t)nkv * HD;
    const bf16* gQ = p.q + (int64_t)b * T * qstride + (int64_t)h * HD;
    const bf16* gK = p.k + (int64_t)b * T * kstride + (int64_t)kvh * HD;
    const bf16* gV = p.v + (int64_t)b * T * kstride + (int64_t)kvh * HD;

    for (int c = tid; c < BQ * CH; c += NT) {
        const int r = c / CH, cc = c % CH, i = q0 + r;
        attn_cp_async16(sQ + wg_swz<BQ>(r, cc * 8), gQ + (i < T ? i : 0) * qstride + cc * 8, i < T);
    }
    auto load_kv = [&](int st, int t) {
        for (int c = tid; c < BK * CH; c += NT) {
            const int r = c / CH, cc = c % CH, j = t * BK + r;
            const int64_t off = (j < T ? j : 0) * kstride + cc * 8;
            attn_cp_async16(sK + st * C::KB + wg_swz<BK>(r, cc * 8), gK + off, j < T);  // zero rows past T:
            attn_cp_async16(sV + st * C::KB + wg_swz<BK>(r, cc * 8), gV + off, j < T);  // 0 * garbage could be NaN
        }
    };
    load_kv(0, t_lo);
    attn_cp_async_commit();

    const int ia0 = q0 + warp * 16 + g;  // this lane's rows: ia0 and ia0 + 8
    int dsa[2];
#pragma unroll
    for (int r = 0; r < 2; r++) dsa[r] = ds ? ds[min(ia0 + 8 * r, T - 1)] : 0;
    const float sl2 = p.scale_log2;
    float o[HD / 2];  // (64 rows x HD) per warpgroup: [4 n + e] = row 16 warp + g + 8 (e >> 1), dim 8 n + 2 t4 + (e & 1)
#pragma unroll
    for (int n = 0; n < HD / 2; n++) o[n] = 0.f;
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};  // running max (raw score units), lane-partial sum
    const uint32_t qA = sQ + wg * 64 * 128;  // this warpgroup's 64 query rows, column block 0

    for (int t = t_lo; t <= t_hi; t++) {
        const int st = (t - t_lo) & 1, k0 = t * BK;
        attn_cp_async_wait_all();
        wg_fence_proxy();  // the cp.async stores, before wgmma reads them
        __syncthreads();   // tile t landed; both warpgroups are done with the other stage
        if (t < t_hi) { load_kv(st ^ 1, t + 1); attn_cp_async_commit(); }
        const uint32_t cK = sK + st * C::KB, cV = sV + st * C::KB;

        // S = Q K^T: (64 rows x BK keys) per warpgroup
        float s[BK / 2];
        wg_fence();
#pragma unroll
        for (int kk = 0; kk < HD / 16; kk++) {
            const uint32_t qo = (kk >> 2) * BQ * 128 + (kk & 3) * 32, ko = (kk >> 2) * BK * 128 + (kk & 3) * 32;
            wg_mma_64x128_ss<0, 0>(s, wg_desc(qA + qo, 16, 1024), wg_desc(cK + ko, 16, 1024), kk);
        }
        wg_commit();
        wg_wait<0>();
        wg_fence_regs(s);

        // mask only the tiles that cross the diagonal, the tail, or a document start
        if (!(k0 + BK - 1 <= q0 && k0 >= ds_max)) {
#pragma unroll
            for (int n = 0; n < BK / 8; n++)
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const int j = k0 + n * 8 + 2 * t4 + (e & 1), i = ia0 + (e >> 1) * 8;
                    if (j > i || j < dsa[e >> 1]) s[4 * n + e] = -INFINITY;
                }
        }
        // online softmax, two rows per lane; a row fully masked so far keeps m = -inf and p = 0
#pragma unroll
        for (int r = 0; r < 2; r++) {
            float mx = m[r];
#pragma unroll
            for (int n = 0; n < BK / 8; n++) mx = fmaxf(mx, fmaxf(s[4 * n + 2 * r], s[4 * n + 2 * r + 1]));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            const float msc = mx == -INFINITY ? 0.f : mx * sl2;
            const float alpha = attn_exp2(m[r] * sl2 - msc);  // exp2(-inf) = 0 on the first tile
            m[r] = mx;
            float sum = 0.f;
#pragma unroll
            for (int n = 0; n < BK / 8; n++) {
                s[4 * n + 2 * r] = attn_exp2(fmaf(s[4 * n + 2 * r], sl2, -msc));
                s[4 * n + 2 * r + 1] = attn_exp2(fmaf(s[4 * n + 2 * r + 1], sl2, -msc));
                sum += s[4 * n + 2 * r] + s[4 * n + 2 * r + 1];
            }
            l[r] = l[r] * alpha + sum;
#pragma unroll
            for (int n = 0; n < HD / 8; n++) { o[4 * n + 2 * r] *= alpha; o[4 * n + 2 * r + 1] *= alpha; }
        }
        // O += P V: the S accumulators of key blocks 2 kc, 2 kc + 1 are the A fragment of key chunk kc
        uint32_t pa[BK / 16][4];
#pragma unroll
        for (int kc = 0; kc < BK / 16; kc++)
#pragma unroll
            for (int hh = 0; hh < 4; hh++) {
                const int n = 2 * kc + (hh >> 1), e = (hh & 1) * 2;
                pa[kc][hh] = attn_pack_bf16(s[4 * n + e], s[4 * n + e + 1]);
            }
        wg_fence();
#pragma unroll
        for (int kc = 0; kc < BK / 16; kc++) wg_mma_rs<1>(o, pa[kc], wg_desc(cV + kc * 2048, BK * 128, 1024));
        wg_commit();
        wg_wait<0>();  // before the next tile's loads reuse this stage
        wg_fence_regs(o);
    }
    // epilogue: finish the row sums across the quad, normalise, store O and lse
#pragma unroll
    for (int r = 0; r < 2; r++) {
        float lr = l[r];
        lr += __shfl_xor_sync(0xffffffffu, lr, 1);
        lr += __shfl_xor_sync(0xffffffffu, lr, 2);
        const float inv = 1.f / lr;
        const int i = ia0 + 8 * r;
        if (i >= T) continue;
        bf16* dst = p.out + ((int64_t)b * T + i) * qstride + (int64_t)h * HD + 2 * t4;
#pragma unroll
        for (int n = 0; n < HD / 8; n++)
            *reinterpret_cast<uint32_t*>(dst + n * 8) = attn_pack_bf16(o[4 * n + 2 * r] * inv, o[4 * n + 2 * r + 1] * inv);
        if (t4 == 0) p.lse[((int64_t)b * nh + h) * T + i] = (m[r] * sl2 + __log2f(lr)) * 0.69314718056f;
    }
}
template <int HD, int BQ, int BK>
void attention_forward2_launch(const AttnFwdParams& p, cudaStream_t stream) {
    using C = AttnFwdTile2<HD, BQ, BK>;
    auto kernel = attention_forward_kernel2<HD, BQ, BK>;
    cudaCheck(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)C::SMEM_ALLOC));
    dim3 grid(p.B * p.nh, (p.T + BQ - 1) / BQ);
    kernel<<<grid, C::THREADS, C::SMEM_ALLOC, stream>>>(p);
    cudaCheck(cudaGetLastError());
}

// ---------------------------------------------------------------------------------------------
// kernel3 (tried, not kept: slower than kernel2, see the header)

// kernel3 (hd 128, Hopper): kernel1's tiles and online softmax on wgmma. Two warpgroups of 64 query rows
// (BQ = 128), 128-key tiles double-buffered in 128B-swizzled smem (kernels/wgmma.cuh):
//   S = Q K^T   m64n128k16, A = this warpgroup's Q rows, B = the key tile       (both K-major)
//   O += P V    m64n128k16, A = P from registers (bf16), B = the value tile     (MN-major)
// Warp w still owns rows 16 w + g, + 8 (the accumulator layout is mma.sync's), so the softmax is kernel1's.
// Pipelined (kernel2 above is the same without): the softmax of tile t + 1 runs while the
// tensor cores do P V of tile t.
template <int HD, int BQ, int BK>
struct AttnFwdTile3 {
    static constexpr int THREADS = BQ / 64 * 128;
    static constexpr int QB = BQ * HD * 2, KB = BK * HD * 2;  // bytes: Q tile, K (or V) tile
    static constexpr size_t OFF_K = QB, OFF_V = OFF_K + 2 * KB, SMEM = OFF_V + 2 * KB;  // Q, K (2 stages), V (2 stages)
    static constexpr size_t SMEM_ALLOC = SMEM + 1024;  // the dynamic smem base is aligned up to 1024 bytes
    static_assert(HD == 128 && BQ == 128 && BK == 128, "attention_forward_kernel3: written for these");
};

template <int HD, int BQ, int BK>
__global__ void __launch_bounds__(BQ / 64 * 128, 1) attention_forward_kernel3(const AttnFwdParams p) {
    using C = AttnFwdTile3<HD, BQ, BK>;
    constexpr int NT = C::THREADS, CH = HD / 8;
    extern __shared__ unsigned char attn_smemf3[];
    unsigned char* sm = attn_smemf3 + ((1024 - (attn_smem_u32(attn_smemf3) & 1023)) & 1023);
    const uint32_t sQ = attn_smem_u32(sm), sK = sQ + C::OFF_K, sV = sQ + C::OFF_V;

    const int T = p.T, nh = p.nh, nkv = p.nkv;
    const int b = blockIdx.x / nh, h = blockIdx.x % nh, kvh = h / (nh / nkv);
    const int q0 = (gridDim.y - 1 - blockIdx.y) * BQ;  // heaviest (last) query tiles first
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t4 = lane & 3, wg = warp >> 2;
    const int q_last = min(q0 + BQ, T) - 1;
    const int* ds = p.doc_start ? p.doc_start + (int64_t)b * T : nullptr;
    const int ds_max = ds ? ds[q_last] : 0;  // doc_start is non-decreasing along the row
    const int t_lo = (ds ? ds[q0] : 0) / BK, t_hi = q_last / BK;
    const int64_t qstride = (int64_t)nh * HD, kstride = (int64_t)nkv * HD;
    const bf16* gQ = p.q + (int64_t)b * T * qstride + (int64_t)h * HD;
    const bf16* gK = p.k + (int64_t)b * T * kstride + (int64_t)kvh * HD;
    const bf16* gV = p.v + (int64_t)b * T * kstride + (int64_t)kvh * HD;

    for (int c = tid; c < BQ * CH; c += NT) {
        const int r = c / CH, cc = c % CH, i = q0 + r;
        attn_cp_async16(sQ + wg_swz<BQ>(r, cc * 8), gQ + (i < T ? i : 0) * qstride + cc * 8, i < T);
    }
    auto load_kv = [&](int st, int t) {
        for (int c = tid; c < BK * CH; c += NT) {
            const int r = c / CH, cc = c % CH, j = t * BK + r;
            const int64_t off = (j < T ? j : 0) * kstride + cc * 8;
            attn_cp_async16(sK + st * C::KB + wg_swz<BK>(r, cc * 8), gK + off, j < T);  // zero rows past T:
            attn_cp_async16(sV + st * C::KB + wg_swz<BK>(r, cc * 8), gV + off, j < T);  // 0 * garbage could be NaN
        }
    };
    load_kv(0, t_lo);
    attn_cp_async_commit();

    const int ia0 = q0 + warp * 16 + g;  // this lane's rows: ia0 and ia0 + 8
    int dsa[2];
#pragma unroll
    for (int r = 0; r < 2; r++) dsa[r] = ds ? ds[min(ia0 + 8 * r, T - 1)] : 0;
    const float sl2 = p.scale_log2;
    float o[HD / 2];  // (64 rows x HD) per warpgroup: [4 n + e] = row 16 warp + g + 8 (e >> 1), dim 8 n + 2 t4 + (e & 1)
#pragma unroll
    for (int n = 0; n < HD / 2; n++) o[n] = 0.f;
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};  // running max (raw score units), lane-partial sum
    const uint32_t qA = sQ + wg * 64 * 128;  // this warpgroup's 64 query rows, column block 0

    float s[BK / 2];        // S (64 rows x BK keys) per warpgroup, then P
    uint32_t pa[BK / 16][4];  // P as bf16 A fragments (key blocks 2 kc, 2 kc + 1 -> key chunk kc)
    float alpha[2];
    auto issue_s = [&](int st) {  // S = Q K^T of the tile in stage st
        wg_fence();
#pragma unroll
        for (int kk = 0; kk < HD / 16; kk++) {
            const uint32_t qo = (kk >> 2) * BQ * 128 + (kk & 3) * 32, ko = (kk >> 2) * BK * 128 + (kk & 3) * 32;
            wg_mma_64x128_ss<0, 0>(s, wg_desc(qA + qo, 16, 1024), wg_desc(sK + st * C::KB + ko, 16, 1024), kk);
        }
        wg_commit();
    };
    auto softmax = [&](int t) {  // mask S of tile t, online softmax: S -> P, m and l updated, alpha for O
        const int k0 = t * BK;
        if (!(k0 + BK - 1 <= q0 && k0 >= ds_max)) {  // only tiles across the diagonal, the tail or a document start
#pragma unroll
            for (int n = 0; n < BK / 8; n++)
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const int j = k0 + n * 8 + 2 * t4 + (e & 1), i = ia0 + (e >> 1) * 8;
                    if (j > i || j < dsa[e >> 1]) s[4 * n + e] = -INFINITY;
                }
        }
#pragma unroll
        for (int r = 0; r < 2; r++) {  // a row fully masked so far keeps m = -inf and p = 0
            float mx = m[r];
#pragma unroll
            for (int n = 0; n < BK / 8; n++) mx = fmaxf(mx, fmaxf(s[4 * n + 2 * r], s[4 * n + 2 * r + 1]));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            const float msc = mx == -INFINITY ? 0.f : mx * sl2;
            alpha[r] = attn_exp2(m[r] * sl2 - msc);  // exp2(-inf) = 0 on the first tile
            m[r] = mx;
            float sum = 0.f;
#pragma unroll
            for (int n = 0; n < BK / 8; n++) {
                s[4 * n + 2 * r] = attn_exp2(fmaf(s[4 * n + 2 * r], sl2, -msc));
                s[4 * n + 2 * r + 1] = attn_exp2(fmaf(s[4 * n + 2 * r + 1], sl2, -msc));
                sum += s[4 * n + 2 * r] + s[4 * n + 2 * r + 1];
            }
            l[r] = l[r] * alpha[r] + sum;
        }
    };
    auto rescale_pack = [&]() {  // O *= alpha (once the last P V is done with O), P -> bf16 fragments
#pragma unroll
        for (int n = 0; n < HD / 8; n++) { o[4 * n] *= alpha[0]; o[4 * n + 1] *= alpha[0]; o[4 * n + 2] *= alpha[1]; o[4 * n + 3] *= alpha[1]; }
#pragma unroll
        for (int kc = 0; kc < BK / 16; kc++)
#pragma unroll
            for (int hh = 0; hh < 4; hh++) {
                const int n = 2 * kc + (hh >> 1), e = (hh & 1) * 2;
                pa[kc][hh] = attn_pack_bf16(s[4 * n + e], s[4 * n + e + 1]);
            }
    };

    // Software pipeline (FlashAttention-3's intra-warpgroup overlap): S of tile t + 1 is issued before P V of
    // tile t, and its softmax runs while the tensor cores do P V; O is rescaled once P V is done with it.
    attn_cp_async_wait_all();
    wg_fence_proxy();
    __syncthreads();  // Q and tile t_lo landed
    if (t_lo < t_hi) { load_kv(1, t_lo + 1); attn_cp_async_commit(); }
    issue_s(0);
    wg_wait<0>();
    wg_fence_regs(s);
    softmax(t_lo);
    rescale_pack();
    auto issue_pv = [&](int st) {  // O += P V of the tile in stage st
        wg_fence();
#pragma unroll
        for (int kc = 0; kc < BK / 16; kc++) wg_mma_64x128_rs<1>(o, pa[kc], wg_desc(sV + st * C::KB + kc * 2048, BK * 128, 1024));
        wg_commit();
    };
    for (int t = t_lo; t < t_hi; t++) {  // (branch-free around the wgmmas: ptxas serializes them otherwise)
        const int st = (t - t_lo) & 1;
        attn_cp_async_wait_all();
        wg_fence_proxy();
        __syncthreads();  // tile t + 1 landed
        issue_s(st ^ 1);
        issue_pv(st);
        wg_wait<1>();     // S of tile t + 1 (P V of tile t may still run)
        wg_fence_regs(s);
        softmax(t + 1);
        wg_wait<0>();
        wg_fence_regs(o);
        rescale_pack();
        __syncthreads();  // both warpgroups are done with stage st
        if (t + 2 <= t_hi) { load_kv(st, t + 2); attn_cp_async_commit(); }
    }
    issue_pv((t_hi - t_lo) & 1);
    wg_wait<0>();
    wg_fence_regs(o);
    // epilogue: finish the row sums across the quad, normalise, store O and lse
#pragma unroll
    for (int r = 0; r < 2; r++) {
        float lr = l[r];
        lr += __shfl_xor_sync(0xffffffffu, lr, 1);
        lr += __shfl_xor_sync(0xffffffffu, lr, 2);
        const float inv = 1.f / lr;
        const int i = ia0 + 8 * r;
        if (i >= T) continue;
        bf16* dst = p.out + ((int64_t)b * T + i) * qstride + (int64_t)h * HD + 2 * t4;
#pragma unroll
        for (int n = 0; n < HD / 8; n++)
            *reinterpret_cast<uint32_t*>(dst + n * 8) = attn_pack_bf16(o[4 * n + 2 * r] * inv, o[4 * n + 2 * r + 1] * inv);
        if (t4 == 0) p.lse[((int64_t)b * nh + h) * T + i] = (m[r] * sl2 + __log2f(lr)) * 0.69314718056f;
    }
}
template <int HD, int BQ, int BK>
void attention_forward3_launch(const AttnFwdParams& p, cudaStream_t stream) {
    using C = AttnFwdTile3<HD, BQ, BK>;
    auto kernel = attention_forward_kernel3<HD, BQ, BK>;
    cudaCheck(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)C::SMEM_ALLOC));
    dim3 grid(p.B * p.nh, (p.T + BQ - 1) / BQ);
    kernel<<<grid, C::THREADS, C::SMEM_ALLOC, stream>>>(p);
    cudaCheck(cudaGetLastError());
}

// ---------------------------------------------------------------------------------------------

typedef void (*FwdLaunch)(const AttnFwdParams&, cudaStream_t);
// same_bits: the variant whose out and lse bits this one must reproduce (the same operations in the same order), or null
struct Variant { const char* name; int hd; FwdLaunch fn; const char* what; const char* same_bits = nullptr; };
static const Variant VARIANTS[] = {
    {"1a", 128, attention_forward_launch<128, 128, 64, 1, 1, true>, "hd128 Br128 Bc64, 8 warps, Q in regs, 1 CTA/SM"},
    {"1b", 128, attention_forward_launch<128, 128, 64, 1, 2, false>, "hd128 Br128 Bc64, 8 warps, Q from smem, 2 CTA/SM (v3 production)"},
    {"1g", 128, attention_forward_launch<128, 128, 32, 1, 2, false>, "hd128 Br128 Bc32, 8 warps, Q from smem, 2 CTA/SM"},
    {"1c", 128, attention_forward_launch<128, 64, 64, 1, 3, true>, "hd128 Br64 Bc64, 4 warps, Q in regs, 3 CTA/SM"},
    {"1h", 128, attention_forward_launch<128, 128, 64, 2, 2, false>, "hd128 Br128 Bc64, 4 warps x 32 rows, Q from smem, 2 CTA/SM (production)"},
    {"1i", 128, attention_forward_launch<128, 128, 32, 2, 2, false>, "hd128 Br128 Bc32, 4 warps x 32 rows, Q from smem, 2 CTA/SM"},
    {"2a", 128, attention_forward2_launch<128, 128, 128>, "hd128 Bq128 Bk128, wgmma, 2 warpgroups, 1 CTA/SM (production on Hopper before kernel5)"},
    {"3a", 128, attention_forward3_launch<128, 128, 128>, "hd128 Bq128 Bk128, wgmma, 2 warpgroups, softmax under P V (not kept)"},
    {"5a", 128, attention_forward5_launch<128, 128, 128, 2, true>, "hd128 Bq128 Bk128, TMA producer + 2 consumer warpgroups, pingpong, 2 stages (production on Hopper)", "2a"},
    {"5b", 128, attention_forward5_launch<128, 128, 128, 3, true>, "hd128 Bq128 Bk128, TMA producer + 2 consumer warpgroups, pingpong, 3 stages", "2a"},
    {"5c", 128, attention_forward5_launch<128, 128, 128, 2, false>, "hd128 Bq128 Bk128, TMA producer + 2 consumer warpgroups, no pingpong, 2 stages", "2a"},
    {"1j", 128, attention_forward_launch<128, 256, 64, 2, 1, false>, "hd128 Br256 Bc64, 8 warps x 32 rows, Q from smem, 1 CTA/SM"},
    {"1d", 64, attention_forward_launch<64, 128, 64, 1, 2, true>, "hd64 Br128 Bc64, 8 warps, Q in regs, 2 CTA/SM (v3 production)"},
    {"1e", 64, attention_forward_launch<64, 128, 128, 1, 1, true>, "hd64 Br128 Bc128, 8 warps, Q in regs, 1 CTA/SM"},
    {"1f", 64, attention_forward_launch<64, 64, 64, 1, 4, true>, "hd64 Br64 Bc64, 4 warps, Q in regs, 4 CTA/SM"},
    {"1k", 64, attention_forward_launch<64, 128, 64, 2, 2, false>, "hd64 Br128 Bc64, 4 warps x 32 rows, Q from smem, 2 CTA/SM"},
    {"1l", 64, attention_forward_launch<64, 128, 64, 2, 2, true>, "hd64 Br128 Bc64, 4 warps x 32 rows, Q in regs, 2 CTA/SM (production off Hopper; on Hopper before 5a64)"},
    {"1m", 64, attention_forward_launch<64, 256, 64, 2, 1, true>, "hd64 Br256 Bc64, 8 warps x 32 rows, Q in regs, 1 CTA/SM"},
    {"5a64", 64, attention_forward5_launch<64, 128, 128, 2, true>, "hd64 Bq128 Bk128, TMA producer + 2 consumer warpgroups, pingpong, 2 stages (production on Hopper)"},
    {"5b64", 64, attention_forward5_launch<64, 128, 128, 3, true>, "hd64 Bq128 Bk128, TMA producer + 2 consumer warpgroups, pingpong, 3 stages", "5a64"},
    {"5c64", 64, attention_forward5_launch<64, 128, 128, 2, false>, "hd64 Bq128 Bk128, TMA producer + 2 consumer warpgroups, no pingpong, 2 stages", "5a64"},
};

// ---------------------------------------------------------------------------------------------
// fp64 CPU reference: out (B, T, nh, hd), lse (B, nh, T)

static void attention_forward_cpu(double* out, double* lse, const float* q, const float* k, const float* v,
                                  const int* doc, int B, int T, int nh, int nkv, int hd) {
    const double scale = 1.0 / sqrt((double)hd);
    std::vector<double> sc(T);
    for (int b = 0; b < B; b++)
        for (int h = 0; h < nh; h++)
            for (int i = 0; i < T; i++) {
                const float* qi = q + (((size_t)b * T + i) * nh + h) * hd;
                const int j0 = doc ? doc[b * T + i] : 0, kvh = h / (nh / nkv);
                double mx = -INFINITY, l = 0;
                for (int j = j0; j <= i; j++) {
                    const float* kj = k + (((size_t)b * T + j) * nkv + kvh) * hd;
                    double d = 0;
                    for (int c = 0; c < hd; c++) d += (double)qi[c] * kj[c];
                    sc[j] = d * scale;
                    mx = fmax(mx, sc[j]);
                }
                double* oi = out + (((size_t)b * T + i) * nh + h) * hd;
                for (int c = 0; c < hd; c++) oi[c] = 0;
                for (int j = j0; j <= i; j++) {
                    const double p = exp(sc[j] - mx);
                    l += p;
                    const float* vj = v + (((size_t)b * T + j) * nkv + kvh) * hd;
                    for (int c = 0; c < hd; c++) oi[c] += p * vj[c];
                }
                for (int c = 0; c < hd; c++) oi[c] /= l;
                lse[((size_t)b * nh + h) * T + i] = mx + log(l);
            }
}

// ---------------------------------------------------------------------------------------------

struct Problem {
    int B, T, nh, nkv, hd, doc_len;  // doc_len > 0: rows packed with documents of doc_len tokens
    std::vector<uint16_t> q, k, v;
    std::vector<int> doc;
    bf16 *d_q = nullptr, *d_k = nullptr, *d_v = nullptr, *d_out = nullptr;
    float* d_lse = nullptr;
    int* d_doc = nullptr;
    double pairs = 0;  // allowed (i, j) pairs per (b, h)... summed over b
};

static void make_problem(Problem& P, uint64_t seed) {
    const size_t nq = (size_t)P.B * P.T * P.nh * P.hd, nk = (size_t)P.B * P.T * P.nkv * P.hd;
    P.q.resize(nq); P.k.resize(nk); P.v.resize(nk);
    for (size_t i = 0; i < nq; i++) P.q[i] = f32_to_bf16(4.0f * rng_uniform(seed, 1, i) - 2.0f);
    for (size_t i = 0; i < nk; i++) P.k[i] = f32_to_bf16(4.0f * rng_uniform(seed, 2, i) - 2.0f);
    for (size_t i = 0; i < nk; i++) P.v[i] = f32_to_bf16(2.0f * rng_uniform(seed, 3, i) - 1.0f);
    P.pairs = 0;
    if (P.doc_len > 0) {
        P.doc.resize((size_t)P.B * P.T);
        for (int b = 0; b < P.B; b++)
            for (int i = 0; i < P.T; i++) { P.doc[(size_t)b * P.T + i] = i / P.doc_len * P.doc_len; P.pairs += i - P.doc[(size_t)b * P.T + i] + 1; }
    } else P.pairs = (double)P.B * P.T * (P.T + 1.0) / 2;
    cudaCheck(cudaMalloc(&P.d_q, nq * 2)); cudaCheck(cudaMalloc(&P.d_k, nk * 2)); cudaCheck(cudaMalloc(&P.d_v, nk * 2));
    cudaCheck(cudaMalloc(&P.d_out, nq * 2)); cudaCheck(cudaMalloc(&P.d_lse, (size_t)P.B * P.nh * P.T * 4));
    cudaCheck(cudaMemcpy(P.d_q, P.q.data(), nq * 2, cudaMemcpyHostToDevice));
    cudaCheck(cudaMemcpy(P.d_k, P.k.data(), nk * 2, cudaMemcpyHostToDevice));
    cudaCheck(cudaMemcpy(P.d_v, P.v.data(), nk * 2, cudaMemcpyHostToDevice));
    if (P.doc_len > 0) {
        cudaCheck(cudaMalloc(&P.d_doc, P.doc.size() * 4));
        cudaCheck(cudaMemcpy(P.d_doc, P.doc.data(), P.doc.size() * 4, cudaMemcpyHostToDevice));
    }
}
static void free_problem(Problem& P) {
    for (void* p : {(void*)P.d_q, (void*)P.d_k, (void*)P.d_v, (void*)P.d_out, (void*)P.d_lse, (void*)P.d_doc}) if (p) cudaCheck(cudaFree(p));
}
static AttnFwdParams params(const Problem& P) {
    return AttnFwdParams{P.d_out, P.d_lse, P.d_q, P.d_k, P.d_v, P.d_doc, P.B, P.T, P.nh, P.nkv, 1.4426950408889634f / sqrtf((float)P.hd)};
}

// check one variant: poisoned outputs, rel-L2 and max-abs against the fp64 reference; bits: out's, then lse's
static bool check_variant(const Variant& V, Problem& P, const std::vector<double>& out_ref, const std::vector<double>& lse_ref,
                          std::vector<uint16_t>& bits) {
    const size_t nq = out_ref.size(), nl = lse_ref.size();
    cudaCheck(cudaMemset(P.d_out, 0xff, nq * 2));
    cudaCheck(cudaMemset(P.d_lse, 0xff, nl * 4));
    V.fn(params(P), 0);
    cudaCheck(cudaDeviceSynchronize());
    std::vector<uint16_t> out(nq);
    std::vector<float> lse(nl);
    cudaCheck(cudaMemcpy(out.data(), P.d_out, nq * 2, cudaMemcpyDeviceToHost));
    cudaCheck(cudaMemcpy(lse.data(), P.d_lse, nl * 4, cudaMemcpyDeviceToHost));
    double num = 0, den = 0, max_abs = 0, lse_abs = 0;
    for (size_t i = 0; i < nq; i++) {
        const double d = bf16_to_f32(out[i]) - out_ref[i];
        num += d * d; den += out_ref[i] * out_ref[i];
        max_abs = fmax(max_abs, isnan(d) ? INFINITY : fabs(d));
    }
    for (size_t i = 0; i < nl; i++) lse_abs = fmax(lse_abs, isnan(lse[i]) ? INFINITY : fabs(lse[i] - lse_ref[i]));
    bits = out;
    bits.resize(nq + 2 * nl);
    memcpy(bits.data() + nq, lse.data(), nl * 4);
    const double rel = sqrt(num / den);
    const bool ok = rel < 1e-2 && max_abs < 2e-2 && lse_abs < 1e-4;
    printf("  %-3s %-5s T=%-5d docs=%-4d out rel_l2 %.2e max_abs %.2e  lse max_abs %.2e\n", V.name, ok ? "ok" : "FAIL",
           P.T, P.doc_len, rel, max_abs, lse_abs);
    return ok;
}

static float time_variant(const Variant& V, Problem& P, int reps) {
    cudaEvent_t e0, e1;
    cudaCheck(cudaEventCreate(&e0)); cudaCheck(cudaEventCreate(&e1));
    std::vector<float> ms;
    for (int r = 0; r < reps + 1; r++) {  // groups of 10 back-to-back launches hide the launch gaps
        cudaCheck(cudaEventRecord(e0));
        for (int k = 0; k < 10; k++) V.fn(params(P), 0);
        cudaCheck(cudaEventRecord(e1));
        cudaCheck(cudaEventSynchronize(e1));
        float t; cudaCheck(cudaEventElapsedTime(&t, e0, e1));
        if (r >= 1) ms.push_back(t / 10);  // the first group is warm-up
    }
    cudaCheck(cudaEventDestroy(e0)); cudaCheck(cudaEventDestroy(e1));
    std::sort(ms.begin(), ms.end());
    return ms[ms.size() / 2];
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

    // correctness: a tail (T not a multiple of any tile), GQA 4:1, with and without documents
    if (!once) printf("correctness vs fp64 CPU (B=1 T=777 nh=8 nkv=2):\n");
    for (int hd : {64, 128})
        for (int doc_len : {0, 100}) {
            if (once) break;
            Problem P{1, 777, 8, 2, hd, doc_len};
            make_problem(P, 42 + hd + doc_len);
            std::vector<float> q(P.q.size()), k(P.k.size()), v(P.v.size());
            for (size_t i = 0; i < q.size(); i++) q[i] = bf16_to_f32(P.q[i]);
            for (size_t i = 0; i < k.size(); i++) { k[i] = bf16_to_f32(P.k[i]); v[i] = bf16_to_f32(P.v[i]); }
            std::vector<double> out_ref(q.size()), lse_ref((size_t)P.B * P.nh * P.T);
            attention_forward_cpu(out_ref.data(), lse_ref.data(), q.data(), k.data(), v.data(), doc_len ? P.doc.data() : nullptr,
                                  P.B, P.T, P.nh, P.nkv, hd);
            // each variant's bits (out's, then lse's), for those that must reproduce an earlier one's (V.same_bits)
            std::vector<std::vector<uint16_t>> bits(sizeof VARIANTS / sizeof VARIANTS[0]);
            for (size_t vi = 0; vi < bits.size(); vi++) {
                const Variant& V = VARIANTS[vi];
                if (V.hd != hd || !selected(only, V.name)) continue;
                all_ok &= check_variant(V, P, out_ref, lse_ref, bits[vi]);
                for (size_t ri = 0; V.same_bits && ri < vi; ri++)
                    if (!strcmp(VARIANTS[ri].name, V.same_bits) && !bits[ri].empty()) {
                        size_t diff = 0;
                        for (size_t i = 0; i < bits[vi].size(); i++) diff += bits[vi][i] != bits[ri][i];
                        printf("      vs %s: %s (%zu of out's and lse's 16-bit halves differ)\n", V.same_bits,
                               diff ? "DIFFERS (expected the same bits)" : "bitwise identical", diff);
                        all_ok &= diff == 0;
                    }
            }
            free_problem(P);
        }

    // timing
    struct Shape { const char* name; int B, T, nh, nkv, hd, doc_len; };
    const Shape shapes[] = {
        {"llama3-8b", 4, 2048, 32, 8, 128, 0},
        {"llama3-1b", 4, 2048, 32, 8, 64, 0},
        {"8b long", 1, 16384, 32, 8, 128, 0},
        {"8b long packed 2k", 1, 16384, 32, 8, 128, 2048},
        {"1b long", 1, 16384, 32, 8, 64, 0},
    };
    printf("\n%-18s %-4s %10s %10s   %s\n", "shape", "var", "ms", "TFLOP/s", "variant");
    for (const Shape& S : shapes) {
        Problem P{S.B, S.T, S.nh, S.nkv, S.hd, S.doc_len};
        make_problem(P, 7);
        const double flops = 4.0 * S.hd * S.nh * P.pairs;
        for (const Variant& V : VARIANTS) {
            if (V.hd != S.hd || !selected(only, V.name)) continue;
            if (once) { V.fn(params(P), 0); cudaCheck(cudaDeviceSynchronize()); free_problem(P); return 0; }
            const float ms = time_variant(V, P, 10);
            printf("%-18s %-4s %10.4f %10.1f   %s\n", S.name, V.name, ms, flops / (ms * 1e-3) / 1e12, V.what);
        }
        free_problem(P);
    }
    printf("%s\n", all_ok ? "all variants correct" : "SOME VARIANTS FAILED");
    return all_ok ? 0 : 1;
}
