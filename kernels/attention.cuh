// kernels/attention.cuh: causal GQA flash attention, forward and backward, bf16 in and out.
//
// The trick (FlashAttention-2, Dao 2023): never materialise the T x T score matrix. The forward
// keeps a 128-row query tile on chip, streams 64-row key/value tiles through shared memory
// (cp.async, two stages) and keeps, per query row, a running max m and denominator l (online
// softmax): O <- O * exp(m_old - m_new) + P V. Each warp owns 32 query rows (two m16 tiles that
// share every K and V fragment it reads: half the ldmatrix traffic of 16 rows per warp), so the
// softmax row reductions are 2 shuffles inside a quad of lanes, and P goes from the S accumulators
// into the A operand of the next mma without touching shared memory. The backward recomputes P from
// the saved log-sum-exp; one CTA owns a 128-row key/value tile of one kv head and loops over the
// query heads of its GQA group and over query tiles, so dK and dV are summed in registers (no
// atomics, no GQA reduction pass); dQ is summed in an fp32 scratch by the key tiles in a fixed
// order, handed on through a semaphore per query tile (FlashAttention-3's deterministic mode), so
// the backward is bitwise deterministic: no float atomics, every output a fixed chain of operations.
// Tensor cores through mma.sync m16n8k16 (bf16 in, fp32 accumulate) fed by ldmatrix.
//
// Numerics: scores and softmax in fp32, P rounded to bf16 before P V, dS rounded to bf16 before
// dS K and dS^T Q (as FlashAttention-2). exp via ex2.approx with log2(e) folded into the scale.
//
//   PyTorch: out = F.scaled_dot_product_attention(q, k.repeat_interleave(nh/nkv, 1), v..., is_causal=True)
//   with q (B, nh, T, hd) = our (B, T, nh, hd).transpose(1, 2); lse = logsumexp(q k^T / sqrt(hd), -1).
//
// Packed sequences: doc_start (B, T) int or nullptr; query i of a row attends keys j with
// doc_start[i] <= j <= i. Key tiles left of a query tile's first document are skipped, and
// query tiles right of a key tile's last document are skipped, so a packed row costs about the
// FLOPs of its documents (plus the diagonal tiles), not those of the whole causal triangle.
// doc_start must be non-decreasing along a row: the tile skipping and kernel2's dQ order rely
// on it (kernel2 traps after some seconds rather than hang if it is not).
//
// Sizes: hd in {64, 128} (templated), any T >= 1 (tails are zero-filled and masked), nh % nkv == 0.
// Offsets are int64 (T up to 131072 and beyond). Pointers must be 16-byte aligned (TMA's rule too).
//
// What runs where (attention_forward and attention_backward choose; the variant names are dev/cuda/'s):
//   hd 128, Hopper (sm_90a): forward kernel5 (5a; 5b from T = 8192), backward kernel6 (6f): FlashAttention-3's warp-specialised
//     schedule on wgmma (kernels/wgmma.cuh) and TMA (kernels/tma.cuh). A producer warpgroup copies tiles into
//     an mbarrier ring, two consumer warpgroups of 64 rows compute and never __syncthreads; in the forward they
//     take turns on the tensor cores (pingpong), so one's softmax runs under the other's wgmmas. kernel6 is
//     kernel4's two kernels (below) on that schedule, kernel4's operations in kernel4's order: the same bits.
//     Which variant (ring depth, pingpong) is chosen at each dispatch. H100, llama3-8b heads (session 10):
//     4 x 2048 forward 0.294 ms (467 TFLOP/s causal; kernel2 0.421), backward 1.060 ms (324; kernel4 1.363);
//     1 x 16384 forward 3.64 ms (605), backward 13.8 ms (398; kernel4 17.4). Bits equal kernel2's and kernel4's.
//   hd 64, Hopper (session 11): forward kernel5 (5a64), backward kernel6 (6f64), the same kernels at hd 64. H100,
//     llama3-1b heads, 4 x 2048, a layer: forward 0.214 ms (kernel1: 0.263), backward 0.759 (kernel4: 0.850); in
//     the trainer's profile 16 layers take 3.74 + 13.79 ms (4.56 + 15.26 before). kernel4, split in two kernels
//     (dK, dV per key tile; dQ per query tile, recomputing S and dP: 7 matmuls instead of 5 but no dQ traffic
//     between CTAs, deterministic without semaphores), is kernel6's reference: 6a64-6h64 give its bits.
//   Other GPUs (and attention_wgmma_off): forward kernel1, backward kernel2 (mma.sync).
//
// Scratch: attention_backward_scratch_bytes(B, T, nh, hd): D (B nh T fp32) for kernel4 and kernel6; kernel2 adds
// dq_accum (B T nh hd fp32) and the dQ semaphores; the backward initialises what it needs itself. H100, llama3-8b
// shapes (B=4, T=2048, nh=32, nkv=8, hd=128): mma.sync forward 0.47 ms (291 TFLOP/s causal), backward 2.13 ms
// (161); wgmma forward 0.42 ms (322-328, kernel2, now dev/cuda/'s 2a), backward 1.34 ms (255-256, kernel4).
// One 131072-token sequence (B=1, same heads): kernel2's scratch 2.02 GiB, backward ~1.9 s (dev/cuda/attention_long.cu).
// Version history, timings and profiles: dev/cuda/attention_forward.cu, dev/cuda/attention_backward.cu.
#pragma once
#include <cuda_runtime.h>  // defines: cudaStream_t, cudaFuncSetAttribute
#include <cuda_bf16.h>     // defines: __nv_bfloat16, __floats2bfloat162_rn
#include <stdint.h>        // defines: int64_t, uint32_t
#include <math.h>          // defines: sqrtf, INFINITY
#include "common.cuh"      // defines: bf16, cudaCheck, kernel_assert, is_aligned16
#include "wgmma.cuh"       // defines: wg_swz, wg_desc, wg_mma_64x64_ss, wg_mma_64x128_ss, wg_mma_64x128_rs, wg_mma_rs (kernels 4-6)
#include "tma.cuh"         // defines: attn5_mbar_*, attn5_tma_load, attn5_bar_*, attn5_setmaxnreg_*, attn5_tensor_map (kernels 5, 6)

// ---------------------------------------------------------------------------------------------
// parameters

struct AttnFwdParams {
    bf16* out;             // (B, T, nh, hd)
    float* lse;            // (B, nh, T) natural-log log-sum-exp of the scaled scores of each query row
    const bf16* q;         // (B, T, nh, hd)
    const bf16* k;         // (B, T, nkv, hd)
    const bf16* v;         // (B, T, nkv, hd)
    const int* doc_start;  // (B, T) or nullptr
    int B, T, nh, nkv;
    float scale_log2;      // log2(e) / sqrt(hd)
};

struct AttnBwdParams {
    bf16* dq;              // (B, T, nh, hd)
    bf16* dk;              // (B, T, nkv, hd)
    bf16* dv;              // (B, T, nkv, hd)
    float* dq_accum;       // (B, T, nh, hd) fp32 scratch: sum of dS K over the key tiles done so far, unscaled
    int* dq_sem;           // (B, nh, ceil(T/16)) scratch: per query tile, how many key tiles have added to dq_accum
    const float* D;        // (B, nh, T) rowsum(dout * out)
    const bf16* dout;      // (B, T, nh, hd)
    const bf16* q;         // (B, T, nh, hd)
    const bf16* k;         // (B, T, nkv, hd)
    const bf16* v;         // (B, T, nkv, hd)
    const float* lse;      // (B, nh, T)
    const int* doc_start;  // (B, T) or nullptr
    int B, T, nh, nkv;
    float scale, scale_log2;
};

// ---------------------------------------------------------------------------------------------
// device helpers: PTX for cp.async, ldmatrix, mma.sync

__device__ __forceinline__ uint32_t attn_smem_u32(const void* p) { return (uint32_t)__cvta_generic_to_shared(p); }

// 16-byte async copy; ok == false copies nothing and zero-fills (src must still be a valid address).
__device__ __forceinline__ void attn_cp_async16(uint32_t dst, const void* src, bool ok) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" :: "r"(dst), "l"(src), "r"(ok ? 16 : 0));
}
__device__ __forceinline__ void attn_cp_async4(uint32_t dst, const void* src, bool ok) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" :: "r"(dst), "l"(src), "r"(ok ? 4 : 0));
}
__device__ __forceinline__ void attn_cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void attn_cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }

__device__ __forceinline__ void attn_ldsm_x4(uint32_t* r, uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}
__device__ __forceinline__ void attn_ldsm_x4_t(uint32_t* r, uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}
// c (16x8 fp32) += a (16x16 bf16, row) * b (16x8 bf16, col)
__device__ __forceinline__ void attn_mma(float* c, const uint32_t* a, const uint32_t* b) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
__device__ __forceinline__ float attn_exp2(float x) { float y; asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x)); return y; }
__device__ __forceinline__ uint32_t attn_pack_bf16(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
}

// Fragment layouts (PTX ISA, mma.m16n8k16): lane = 4*g + t. A regs {a0..a3} hold rows (g, g+8) x
// cols (2t, 2t+1) for k-halves (0-7, 8-15); B regs {b0,b1} hold k = (2t, 2t+1) and (2t+8, 2t+9) at
// col n = g; C holds rows (g, g+8) x cols (2t, 2t+1). The per-lane ldmatrix row/col offsets below
// pick, for one x4 load of a 16x16 block at (r0, c0) of a row-major smem tile:
//   A_ROW/A_COL  (no trans): the A fragment of block rows = m, cols = k
//   B_ROW/B_COL  (no trans): B fragments of two n8 blocks when smem rows = n, cols = k  (K in Q K^T)
//                (trans)   : the A fragment when smem rows = k, cols = m                (dS^T in dS K)
//   T_ROW/T_COL  (trans)   : B fragments of two n8 blocks when smem rows = k, cols = n  (V in P V)
#define ATTN_A_ROW(l) ((l) & 15)
#define ATTN_A_COL(l) (((l) >> 4) << 3)
#define ATTN_B_ROW(l) (((l) & 7) + (((l) >> 4) << 3))
#define ATTN_B_COL(l) ((((l) >> 3) & 1) << 3)
#define ATTN_T_ROW(l) (((l) & 7) + ((((l) >> 3) & 1) << 3))
#define ATTN_T_COL(l) (((l) >> 4) << 3)

// ---------------------------------------------------------------------------------------------
// forward

template <int HD, int BR, int BC, int RT>
struct AttnFwdTile {
    static constexpr int WARPS = BR / (16 * RT), THREADS = WARPS * 32;
    static constexpr int LD = HD + 8;  // smem row pitch in elements: +16 bytes makes ldmatrix conflict-free
    static constexpr size_t SMEM = (size_t)(BR + 4 * BC) * LD * sizeof(bf16);  // Q + 2 stages of K and V
};

// One CTA: BR query rows of one head; a warp owns RT m16 row tiles (16 RT rows), so each K and V
// fragment it reads from smem feeds RT mmas (RT = 2 halves the ldmatrix traffic per FLOP, at the
// cost of twice the O and S accumulators); loops over BC-row kv tiles.
// QREG keeps the warp's Q fragments in registers (RT HD/4 regs) instead of re-reading smem per kv tile.
template <int HD, int BR, int BC, int RT, int MINB, bool QREG>
__global__ void __launch_bounds__(BR / (16 * RT) * 32, MINB) attention_forward_kernel1(const AttnFwdParams p) {
    using C = AttnFwdTile<HD, BR, BC, RT>;
    constexpr int LD = C::LD, NT = C::THREADS, CH = HD / 8;  // CH: 16-byte chunks per row
    static_assert(HD % 16 == 0 && BC % 16 == 0 && BR % (16 * RT) == 0, "tile sizes");
    extern __shared__ __align__(16) unsigned char attn_smem[];
    bf16* sQ = reinterpret_cast<bf16*>(attn_smem);  // (BR, LD)
    bf16* sK = sQ + BR * LD;                         // (2, BC, LD)
    bf16* sV = sK + 2 * BC * LD;                     // (2, BC, LD)

    const int T = p.T, nh = p.nh, nkv = p.nkv;
    const int b = blockIdx.x / nh, h = blockIdx.x % nh, kvh = h / (nh / nkv);
    const int q0 = (gridDim.y - 1 - blockIdx.y) * BR;  // heaviest (last) query tiles first
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t4 = lane & 3;
    const int q_last = min(q0 + BR, T) - 1;
    const int* ds = p.doc_start ? p.doc_start + (int64_t)b * T : nullptr;
    const int ds_max = ds ? ds[q_last] : 0;          // doc_start is non-decreasing along the row
    const int t_lo = (ds ? ds[q0] : 0) / BC, t_hi = q_last / BC;

    const int64_t qstride = (int64_t)nh * HD, kstride = (int64_t)nkv * HD;
    const bf16* gQ = p.q + (int64_t)b * T * qstride + (int64_t)h * HD;
    const bf16* gK = p.k + (int64_t)b * T * kstride + (int64_t)kvh * HD;
    const bf16* gV = p.v + (int64_t)b * T * kstride + (int64_t)kvh * HD;

    for (int c = tid; c < BR * CH; c += NT) {
        const int r = c / CH, cc = c % CH, i = q0 + r;
        attn_cp_async16(attn_smem_u32(sQ + r * LD + cc * 8), gQ + (i < T ? i : 0) * qstride + cc * 8, i < T);
    }
    auto load_kv = [&](int stage, int t) {
        bf16* dK = sK + stage * BC * LD;
        bf16* dV = sV + stage * BC * LD;
        for (int c = tid; c < BC * CH; c += NT) {
            const int r = c / CH, cc = c % CH, j = t * BC + r;
            const int64_t off = (j < T ? j : 0) * kstride + cc * 8;
            attn_cp_async16(attn_smem_u32(dK + r * LD + cc * 8), gK + off, j < T);  // zero rows past T:
            attn_cp_async16(attn_smem_u32(dV + r * LD + cc * 8), gV + off, j < T);  // 0 * garbage could be NaN
        }
    };
    load_kv(0, t_lo);
    attn_cp_async_commit();

    // this lane's rows in the tile: wr0 + 16 rt + g and + 8
    const int wr0 = warp * 16 * RT, ia0 = q0 + wr0 + g;
    int dsa[RT][2];
#pragma unroll
    for (int rt = 0; rt < RT; rt++)
#pragma unroll
        for (int r = 0; r < 2; r++) dsa[rt][r] = ds ? ds[min(ia0 + 16 * rt + 8 * r, T - 1)] : 0;
    const float sl2 = p.scale_log2;
    float o[RT][HD / 8][4];
#pragma unroll
    for (int rt = 0; rt < RT; rt++)
#pragma unroll
        for (int n = 0; n < HD / 8; n++) o[rt][n][0] = o[rt][n][1] = o[rt][n][2] = o[rt][n][3] = 0.f;
    float m[RT][2], l[RT][2];  // running max (raw score units), lane-partial sum
#pragma unroll
    for (int rt = 0; rt < RT; rt++) { m[rt][0] = m[rt][1] = -INFINITY; l[rt][0] = l[rt][1] = 0.f; }
    uint32_t qf[QREG ? RT : 1][QREG ? HD / 16 : 1][4];
    const uint32_t sQa = attn_smem_u32(sQ + (wr0 + ATTN_A_ROW(lane)) * LD + ATTN_A_COL(lane));

    for (int t = t_lo; t <= t_hi; t++) {
        const int stage = (t - t_lo) & 1;
        attn_cp_async_wait_all();
        __syncthreads();  // tile t landed for everyone, and every warp is done with tile t-1's stage
        if (t < t_hi) { load_kv(stage ^ 1, t + 1); attn_cp_async_commit(); }
        if (QREG && t == t_lo) {
#pragma unroll
            for (int rt = 0; rt < (QREG ? RT : 0); rt++)
#pragma unroll
                for (int kk = 0; kk < HD / 16; kk++) attn_ldsm_x4(qf[QREG ? rt : 0][QREG ? kk : 0], sQa + (rt * 16 * LD + kk * 16) * 2);
        }
        const bf16* cK = sK + stage * BC * LD;
        const bf16* cV = sV + stage * BC * LD;

        // S = Q K^T: (16 RT x BC) per warp; each K fragment feeds RT mmas
        float s[RT][BC / 8][4];
#pragma unroll
        for (int rt = 0; rt < RT; rt++)
#pragma unroll
            for (int n = 0; n < BC / 8; n++) s[rt][n][0] = s[rt][n][1] = s[rt][n][2] = s[rt][n][3] = 0.f;
        const uint32_t kb = attn_smem_u32(cK + ATTN_B_ROW(lane) * LD + ATTN_B_COL(lane));
#pragma unroll
        for (int kk = 0; kk < HD / 16; kk++) {
            uint32_t a[RT][4];
#pragma unroll
            for (int rt = 0; rt < RT; rt++) {
                if (QREG) {
#pragma unroll
                    for (int e = 0; e < 4; e++) a[rt][e] = qf[QREG ? rt : 0][QREG ? kk : 0][e];
                } else attn_ldsm_x4(a[rt], sQa + (rt * 16 * LD + kk * 16) * 2);
            }
#pragma unroll
            for (int np = 0; np < BC / 16; np++) {
                uint32_t bb[4];
                attn_ldsm_x4(bb, kb + (np * 16 * LD + kk * 16) * 2);
#pragma unroll
                for (int rt = 0; rt < RT; rt++) {
                    attn_mma(s[rt][2 * np], a[rt], bb);
                    attn_mma(s[rt][2 * np + 1], a[rt], bb + 2);
                }
            }
        }
        // mask only the tiles that cross the diagonal, the tail, or a document start
        const int k0 = t * BC;
        if (!(k0 + BC - 1 <= q0 && k0 >= ds_max)) {
#pragma unroll
            for (int rt = 0; rt < RT; rt++)
#pragma unroll
                for (int n = 0; n < BC / 8; n++)
#pragma unroll
                    for (int e = 0; e < 4; e++) {
                        const int j = k0 + n * 8 + 2 * t4 + (e & 1), i = ia0 + 16 * rt + (e >> 1) * 8;
                        if (j > i || j < dsa[rt][e >> 1]) s[rt][n][e] = -INFINITY;
                    }
        }
        // online softmax, two rows per lane and row tile; a row fully masked so far keeps m = -inf and p = 0
#pragma unroll
        for (int rt = 0; rt < RT; rt++)
#pragma unroll
            for (int r = 0; r < 2; r++) {
                float mx = m[rt][r];
#pragma unroll
                for (int n = 0; n < BC / 8; n++) mx = fmaxf(mx, fmaxf(s[rt][n][2 * r], s[rt][n][2 * r + 1]));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
                const float msc = mx == -INFINITY ? 0.f : mx * sl2;
                const float alpha = attn_exp2(m[rt][r] * sl2 - msc);  // exp2(-inf) = 0 on the first tile
                m[rt][r] = mx;
                float sum = 0.f;
#pragma unroll
                for (int n = 0; n < BC / 8; n++) {
                    s[rt][n][2 * r] = attn_exp2(fmaf(s[rt][n][2 * r], sl2, -msc));
                    s[rt][n][2 * r + 1] = attn_exp2(fmaf(s[rt][n][2 * r + 1], sl2, -msc));
                    sum += s[rt][n][2 * r] + s[rt][n][2 * r + 1];
                }
                l[rt][r] = l[rt][r] * alpha + sum;
#pragma unroll
                for (int n = 0; n < HD / 8; n++) { o[rt][n][2 * r] *= alpha; o[rt][n][2 * r + 1] *= alpha; }
            }
        // O += P V: the S accumulators of key blocks 2kc, 2kc+1 are the A fragment of key chunk kc
        const uint32_t vb = attn_smem_u32(cV + ATTN_T_ROW(lane) * LD + ATTN_T_COL(lane));
#pragma unroll
        for (int kc = 0; kc < BC / 16; kc++) {
            uint32_t a[RT][4];
#pragma unroll
            for (int rt = 0; rt < RT; rt++) {
                a[rt][0] = attn_pack_bf16(s[rt][2 * kc][0], s[rt][2 * kc][1]);
                a[rt][1] = attn_pack_bf16(s[rt][2 * kc][2], s[rt][2 * kc][3]);
                a[rt][2] = attn_pack_bf16(s[rt][2 * kc + 1][0], s[rt][2 * kc + 1][1]);
                a[rt][3] = attn_pack_bf16(s[rt][2 * kc + 1][2], s[rt][2 * kc + 1][3]);
            }
#pragma unroll
            for (int dp = 0; dp < HD / 16; dp++) {
                uint32_t bb[4];
                attn_ldsm_x4_t(bb, vb + (kc * 16 * LD + dp * 16) * 2);
#pragma unroll
                for (int rt = 0; rt < RT; rt++) {
                    attn_mma(o[rt][2 * dp], a[rt], bb);
                    attn_mma(o[rt][2 * dp + 1], a[rt], bb + 2);
                }
            }
        }
    }

    // epilogue: finish the row sums across the quad, normalise, store O and lse
#pragma unroll
    for (int rt = 0; rt < RT; rt++)
#pragma unroll
        for (int r = 0; r < 2; r++) {
            float lr = l[rt][r];
            lr += __shfl_xor_sync(0xffffffffu, lr, 1);
            lr += __shfl_xor_sync(0xffffffffu, lr, 2);
            const float inv = 1.f / lr;
            const int i = ia0 + 16 * rt + 8 * r;
            if (i >= T) continue;
            bf16* dst = p.out + ((int64_t)b * T + i) * qstride + (int64_t)h * HD + 2 * t4;
#pragma unroll
            for (int n = 0; n < HD / 8; n++)
                *reinterpret_cast<uint32_t*>(dst + n * 8) = attn_pack_bf16(o[rt][n][2 * r] * inv, o[rt][n][2 * r + 1] * inv);
            if (t4 == 0) p.lse[((int64_t)b * nh + h) * T + i] = (m[rt][r] * sl2 + __log2f(lr)) * 0.69314718056f;
        }
}

// kernel5 (session 8): FlashAttention-3's forward schedule, hd 128 (and 64, below), Hopper. 384 threads, 1 CTA/SM:
//   warpgroup 0 produces: one thread loads the Q tile (128 rows) and then K and V tiles (128 keys) by TMA
//     (cp.async.bulk.tensor, 128B swizzle = wg_swz's layout, rows past T zero-filled by the copy engine)
//     into a STAGES-deep ring, K and V with their own full (tx bytes) and empty (8 consumer warps) mbarriers;
//   warpgroups 1 and 2 consume, 64 query rows each, kernel2's math (kernel1's online softmax on wgmma;
//     kernel2 is dev/cuda/attention_forward.cu's 2a since kernel5 replaced it). Per key tile t a consumer
//     issues, in its turn, S(t) = Q K(t)^T and O += P(t-1) V(t-1) back to back, hands the turn on, and runs
//     the softmax of S(t) while the other warpgroup's wgmmas run (PINGPONG: named barriers 1 and 2, 256
//     threads; warpgroup 1 starts). O is rescaled by tile t's alpha once P(t-1) V(t-1) is done with it:
//     kernel2's order of operations on O, m and l, so the results should match kernel2's bit for bit.
// setmaxnreg: producer 24 registers, consumers 240 (O 64 + S 64 + P 32 a thread at hd 128).
// hd 64 (session 11, dispatched on Hopper: 5a64): a row is 128 bytes, one swizzle atom, so every tile is one column
//   block (one TMA box per tile); S = Q K^T takes 4 k16 steps instead of 8 and O += P V is m64n64k16 (wg_mma_rs by O's
//   size), O 32 registers a thread. Same tiles, ring and schedule: per key tile half the tensor work of hd 128 against
//   the same softmax (64 x 128 exps per warpgroup): the exps (MUFU) and the wgmmas tie, so the pingpong has less
//   wgmma time to hide each softmax under. H100, llama3-1b heads: 321 TFLOP/s at 4 x 2048 (1l 262), 439 at 1 x 16384.

template <int HD, int BQ, int BK, int STAGES>
struct AttnFwdTile5 {
    static constexpr int THREADS = 384;  // producer + 2 consumer warpgroups
    static constexpr int QB = BQ * HD * 2, KB = BK * HD * 2;  // bytes: Q tile, K (or V) tile
    static constexpr size_t OFF_K = QB, OFF_V = OFF_K + STAGES * KB, SMEM = OFF_V + STAGES * KB;
    static constexpr size_t SMEM_ALLOC = SMEM + 1024;  // the dynamic smem base is aligned up to 1024 bytes
    static_assert((HD == 64 || HD == 128) && BQ == 128 && BK == 128, "attention_forward_kernel5: written for these");
    static_assert(SMEM_ALLOC + 256 <= 227 * 1024, "attention_forward_kernel5: too many stages for 227 KB");
};

template <int HD, int BQ, int BK, int STAGES, bool PINGPONG>
__global__ void __launch_bounds__(384, 1) attention_forward_kernel5(const AttnFwdParams p, const __grid_constant__ CUtensorMap tm_q,
                                                                    const __grid_constant__ CUtensorMap tm_k,
                                                                    const __grid_constant__ CUtensorMap tm_v) {
    using C = AttnFwdTile5<HD, BQ, BK, STAGES>;
    extern __shared__ unsigned char attn_smemf5[];
    __shared__ __align__(8) uint64_t bars[1 + 4 * STAGES];  // q full, K full[S], V full[S], K empty[S], V empty[S]
    unsigned char* sm = attn_smemf5 + ((1024 - (attn_smem_u32(attn_smemf5) & 1023)) & 1023);
    const uint32_t sQ = attn_smem_u32(sm), sK = sQ + C::OFF_K, sV = sQ + C::OFF_V;
    const uint32_t bq = attn_smem_u32(&bars[0]), bkf = bq + 8, bvf = bkf + 8 * STAGES, bke = bvf + 8 * STAGES, bve = bke + 8 * STAGES;

    const int T = p.T, nh = p.nh, nkv = p.nkv;
    const int b = blockIdx.x / nh, h = blockIdx.x % nh, kvh = h / (nh / nkv);
    const int q0 = (gridDim.y - 1 - blockIdx.y) * BQ;  // heaviest (last) query tiles first
    const int tid = threadIdx.x;
    const int q_last = min(q0 + BQ, T) - 1;
    const int* ds = p.doc_start ? p.doc_start + (int64_t)b * T : nullptr;
    const int ds_max = ds ? ds[q_last] : 0;  // doc_start is non-decreasing along the row
    const int t_lo = (ds ? ds[q0] : 0) / BK, t_hi = q_last / BK;

    if (tid == 0) {
        attn5_mbar_init(bq, 1);
        for (int s = 0; s < STAGES; s++) {
            attn5_mbar_init(bkf + 8 * s, 1); attn5_mbar_init(bvf + 8 * s, 1);  // the producer's expect_tx
            attn5_mbar_init(bke + 8 * s, 8); attn5_mbar_init(bve + 8 * s, 8);  // lane 0 of each consumer warp
        }
        attn5_mbar_init_fence();
    }
    __syncthreads();

    if (tid < 128) {  // producer: one thread issues every copy
        attn5_setmaxnreg_dec<24>();
        if (tid == 0) {
            attn5_mbar_expect_tx(bq, C::QB);
            for (int cb = 0; cb < HD / 64; cb++) attn5_tma_load(sQ + cb * BQ * 128, &tm_q, cb * 64, h, q0, b, bq);
            for (int t = t_lo; t <= t_hi; t++) {
                const int n = t - t_lo, s = n % STAGES, u = n / STAGES;
                if (u > 0) attn5_mbar_wait(bke + 8 * s, (u - 1) & 1);  // both warpgroups are done with K(t - S)
                attn5_mbar_expect_tx(bkf + 8 * s, C::KB);
                for (int cb = 0; cb < HD / 64; cb++) attn5_tma_load(sK + s * C::KB + cb * BK * 128, &tm_k, cb * 64, kvh, t * BK, b, bkf + 8 * s);
                if (u > 0) attn5_mbar_wait(bve + 8 * s, (u - 1) & 1);
                attn5_mbar_expect_tx(bvf + 8 * s, C::KB);
                for (int cb = 0; cb < HD / 64; cb++) attn5_tma_load(sV + s * C::KB + cb * BK * 128, &tm_v, cb * 64, kvh, t * BK, b, bvf + 8 * s);
            }
        }
        return;
    }
    attn5_setmaxnreg_inc<240>();

    const int ct = tid - 128, cw = ct >> 7, warp = ct >> 5, lane = ct & 31, g = lane >> 2, t4 = lane & 3;
    const int ia0 = q0 + warp * 16 + g;  // this lane's rows: ia0 and ia0 + 8
    int dsa[2];
#pragma unroll
    for (int r = 0; r < 2; r++) dsa[r] = ds ? ds[min(ia0 + 8 * r, T - 1)] : 0;
    const float sl2 = p.scale_log2;
    float o[HD / 2];  // (64 rows x HD) per warpgroup: [4 n + e] = row 16 warp + g + 8 (e >> 1), dim 8 n + 2 t4 + (e & 1)
#pragma unroll
    for (int n = 0; n < HD / 2; n++) o[n] = 0.f;
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};  // running max (raw score units), lane-partial sum
    const uint32_t qA = sQ + cw * 64 * 128;  // this warpgroup's 64 query rows, column block 0
    const int bar_mine = 1 + cw, bar_other = 2 - cw;

    float s[BK / 2];          // S (64 rows x BK keys) per warpgroup, then P
    uint32_t pa[BK / 16][4];  // P as bf16 A fragments (key blocks 2 kc, 2 kc + 1 -> key chunk kc)
    float alpha[2];
    auto issue_s = [&](int st) {  // S = Q K^T of the key tile in stage st (no commit)
#pragma unroll
        for (int kk = 0; kk < HD / 16; kk++) {
            const uint32_t qo = (kk >> 2) * BQ * 128 + (kk & 3) * 32, ko = (kk >> 2) * BK * 128 + (kk & 3) * 32;
            wg_mma_64x128_ss<0, 0>(s, wg_desc(qA + qo, 16, 1024), wg_desc(sK + st * C::KB + ko, 16, 1024), kk);
        }
    };
    auto issue_pv = [&](int st) {  // O += P V of the value tile in stage st (no commit); m64nHDk16
#pragma unroll
        for (int kc = 0; kc < BK / 16; kc++) wg_mma_rs<1>(o, pa[kc], wg_desc(sV + st * C::KB + kc * 2048, BK * 128, 1024));
    };
    auto softmax = [&](int t) {  // kernel2's: mask S of tile t, online softmax: S -> P, m and l updated, alpha for O
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
    auto rescale_pack = [&]() {  // O *= alpha (P V of the tile before is done with O), P -> bf16 fragments
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
    auto fence_pa = [&]() {  // P stays in its registers until the wgmmas reading it are done
#pragma unroll
        for (int kc = 0; kc < BK / 16; kc++)
#pragma unroll
            for (int hh = 0; hh < 4; hh++) asm volatile("" : "+r"(pa[kc][hh])::"memory");
    };
    auto turn_begin = [&]() { if constexpr (PINGPONG) attn5_bar_sync(bar_mine); };
    auto turn_end = [&]() { if constexpr (PINGPONG) attn5_bar_arrive(bar_other); };

    // (branch-free around the wgmmas: ptxas serializes them otherwise; the first S and the last P V are peeled)
    if (PINGPONG && cw == 1) attn5_bar_arrive(1);  // warpgroup 1 (cw 0) takes the first turn
    attn5_mbar_wait(bq, 0);
    attn5_mbar_wait(bkf, 0);  // tile t_lo is in stage 0
    turn_begin();
    wg_fence();
    issue_s(0);
    wg_commit();
    turn_end();
    wg_wait<0>();
    wg_fence_regs(s);
    if (lane == 0) attn5_mbar_arrive(bke);
    softmax(t_lo);
    rescale_pack();
    for (int t = t_lo + 1; t <= t_hi; t++) {
        const int n = t - t_lo, st = n % STAGES, sp = (n - 1) % STAGES;
        attn5_mbar_wait(bkf + 8 * st, (n / STAGES) & 1);        // K(t) landed
        attn5_mbar_wait(bvf + 8 * sp, ((n - 1) / STAGES) & 1);  // V(t - 1) landed
        turn_begin();
        wg_fence();
        issue_s(st);
        wg_commit();
        issue_pv(sp);
        wg_commit();
        turn_end();
        wg_wait<1>();  // S(t) (P V of tile t - 1 may still run)
        wg_fence_regs(s);
        if (lane == 0) attn5_mbar_arrive(bke + 8 * st);
        softmax(t);
        wg_wait<0>();
        wg_fence_regs(o);
        fence_pa();
        if (lane == 0) attn5_mbar_arrive(bve + 8 * sp);
        rescale_pack();
    }
    {
        const int n = t_hi - t_lo, sp = n % STAGES;
        attn5_mbar_wait(bvf + 8 * sp, (n / STAGES) & 1);
        turn_begin();
        wg_fence();
        issue_pv(sp);
        wg_commit();
        turn_end();
        wg_wait<0>();
        wg_fence_regs(o);
        fence_pa();
    }
    if (PINGPONG && cw == 0) attn5_bar_sync(1);  // takes warpgroup 2's last arrival: no barrier left half-done

    // epilogue (kernel2's): finish the row sums across the quad, normalise, store O and lse
    const int64_t qstride = (int64_t)nh * HD;
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

// ---------------------------------------------------------------------------------------------
// backward

// D = rowsum(dout * out) per (b, h, i), and the dQ semaphores <- 0.
template <int HD>
__global__ void attention_backward_preprocess_kernel2(float* D, int* dq_sem, const bf16* out, const bf16* dout,
                                                      int B, int T, int nh, int64_t n_sem) {
    constexpr int TPR = HD / 8;  // lanes per row, 8 elements (16 bytes) each
    const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    const int64_t row = idx / TPR, rows = (int64_t)B * T * nh;  // row = (b * T + i) * nh + h
    const int c = (int)(idx % TPR);
    if (idx < n_sem) dq_sem[idx] = 0;  // n_sem < rows * TPR: the grid covers them
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
    }
#pragma unroll
    for (int off = TPR / 2; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
    if (row < rows && c == 0) {
        const int64_t bt = row / nh;
        const int h = (int)(row % nh), bi = (int)(bt / T), i = (int)(bt % T);
        D[((int64_t)bi * nh + h) * T + i] = sum;
    }
}

// gpu-scope handoff between CTAs (the PTX memory model's acquire and release patterns, as CUTLASS's
// GenericBarrier uses them): poll with relaxed loads, then a fence acquires; a fence, then a relaxed add releases.
__device__ __forceinline__ int attn_ld_relaxed(const int* p) {
    int v; asm volatile("ld.relaxed.gpu.global.b32 %0, [%1];\n" : "=r"(v) : "l"(p) : "memory"); return v;
}
__device__ __forceinline__ void attn_fence_acq_rel() { asm volatile("fence.acq_rel.gpu;\n" ::: "memory"); }
__device__ __forceinline__ void attn_red_add1(int* p) {
    asm volatile("red.relaxed.gpu.global.add.s32 [%0], 1;\n" :: "l"(p) : "memory");
}

template <int HD, int BC, int BR>
struct AttnBwdTile {
    static constexpr int WARPS = BC / 16, THREADS = WARPS * 32;
    static constexpr int LD = HD + 8, LDS = BR + 8;  // +16 bytes per row: conflict-free ldmatrix
    // K, V (BC rows); Q, dO (2 stages of BR rows); dS^T (BC x BR); lse, D, doc_start (2 stages of BR)
    static constexpr size_t SMEM = (size_t)(2 * BC * LD + 4 * BR * LD + BC * LDS) * sizeof(bf16) + 2 * 3 * BR * 4;
    static constexpr size_t SMEM_DQ = (size_t)BR * HD * sizeof(float);  // kernel2's dq_accum prefetch, after the above
    static_assert(SMEM % 16 == 0, "the dq_accum prefetch is float4-aligned");
};
constexpr int ATTN_SEM_ROWS = 16;  // the scratch holds one dQ semaphore per 16 query rows: enough for any BR >= 16

// One CTA: BC keys of one kv head (BC/16 warps, 16 key rows each, dK and dV in registers); loops over
// the nh/nkv query heads of the group and the query tiles that can see these keys. Per query tile:
//   S^T = K Q^T, P^T = exp(S^T * scale - lse), dV += P^T dO, dP^T = V dO^T, dS^T = P^T (dP^T - D),
//   dK += dS^T Q, and (dS^T through smem) dQ += dS K, added in a fixed order (below).
//
// Ordered dQ (as FlashAttention-3's deterministic mode): the key tiles kt_first..kt_last that see query
// tile qt of head hq add their dS K to dq_accum one after another, in ascending kt. A semaphore per
// (b, hq, qt) counts the tiles done; tile kt waits until it reads kt - kt_first. The first tile stores
// (no zeroing pass), the middle ones load, add and store, the last one adds, scales and writes bf16 dq
// (no convert pass) and sets the semaphore back to 0. So every dq element is the same chain of fp32 adds
// on every run. Progress: a CTA waits only on CTAs of its (b, kv head) with smaller blockIdx.y, which the
// hardware dispatches no later than it (blocks go out in order of linear index, which CUTLASS's serial
// split-K and FA3 rely on too), so the one it waits on is resident or done and never waits on it.
// Speed: every CTA walks its query tiles from the last one down (heads innermost), the same order as its
// predecessor, so tile kt trails tile kt - 1 by one item in a wavefront instead of idling until the heavier
// tile finishes. The semaphore is polled early, and thread 0's one fence per item (mid-item, when it has
// little in flight) both acquires this item's turn and releases the previous item's dQ. DQ_PF fetches
// dq_accum into smem (cp.async) under the dS K matmul instead of loading it after (into registers, the
// prefetch spills at hd 128). Cost against kernel1's atomics, measured: ~1.25 us per item, most likely the
// dq_accum latency the dS K matmul does not cover; 19% of the main kernel at llama3-8b, 33% at hd 64.
template <int HD, int BC, int BR, int MINB, bool DQ_PF>
__global__ void __launch_bounds__(BC / 16 * 32, MINB) attention_backward_kernel2(const AttnBwdParams p) {
    using C = AttnBwdTile<HD, BC, BR>;
    constexpr int LD = C::LD, LDS = C::LDS, NT = C::THREADS, WARPS = C::WARPS, CH = HD / 8;
    constexpr int QW = BR / 16, DW = WARPS / QW, DCW = HD / DW;  // dQ: QW x DW warps of 16 rows x DCW cols
    static_assert(WARPS % QW == 0 && DCW % 16 == 0, "backward tile shape");
    static_assert(BR % ATTN_SEM_ROWS == 0, "one semaphore per query tile");
    extern __shared__ __align__(16) unsigned char attn_smem[];
    bf16* sK = reinterpret_cast<bf16*>(attn_smem);  // (BC, LD)
    bf16* sV = sK + BC * LD;                         // (BC, LD)
    bf16* sQ = sV + BC * LD;                         // (2, BR, LD)
    bf16* sdO = sQ + 2 * BR * LD;                    // (2, BR, LD)
    bf16* sdS = sdO + 2 * BR * LD;                   // (BC, LDS) dS^T, bf16
    float* sL = reinterpret_cast<float*>(sdS + BC * LDS);  // (2, BR) lse
    float* sD = sL + 2 * BR;                                // (2, BR) D
    int* sDs = reinterpret_cast<int*>(sD + 2 * BR);         // (2, BR) doc_start
    float4* sAcc = reinterpret_cast<float4*>(attn_smem + C::SMEM);  // (WARPS, DCW/8, 32) lane-private dq_accum slots

    const int T = p.T, nh = p.nh, nkv = p.nkv, G = nh / nkv;
    const int b = blockIdx.x / nkv, kvh = blockIdx.x % nkv;
    const int kt = blockIdx.y, k0 = kt * BC, k_last = min(k0 + BC, T) - 1;  // tile 0 (most query tiles) first
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t4 = lane & 3;
    const int* ds = p.doc_start ? p.doc_start + (int64_t)b * T : nullptr;
    const int64_t qstride = (int64_t)nh * HD, kstride = (int64_t)nkv * HD;
    const int n_sem = (T + ATTN_SEM_ROWS - 1) / ATTN_SEM_ROWS;  // semaphores per (b, hq)

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
    // items: query tiles qt_hi down to qt_lo, and within each the G query heads of the group
    const int qt_lo = k0 / BR, qt_hi = i_max / BR, n_iter = G * (qt_hi - qt_lo + 1);

    auto load_q = [&](int st, int it) {
        const int hq = kvh * G + it % G, q0 = (qt_hi - it / G) * BR;
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
    int* sem_done = nullptr;  // the previous item's semaphore (if a later key tile waits on it), released mid-item

    for (int it = 0; it < n_iter; it++) {
        const int st = it & 1, hq = kvh * G + it % G, qt = qt_hi - it / G, q0 = qt * BR;
        attn_cp_async_wait_all();
        __syncthreads();  // stage st landed; every warp is done with stage st^1, with sdS and with the last dQ stores
        if (it + 1 < n_iter) { load_q(st ^ 1, it + 1); attn_cp_async_commit(); }
        const bf16* cQ = sQ + st * BR * LD;
        const bf16* cdO = sdO + st * BR * LD;
        const float* cL = sL + st * BR;
        const float* cD = sD + st * BR;
        const int* cDs = sDs + st * BR;
        // this tile's place among the key tiles that add to dQ of (b, hq, qt): kt_first sees the first
        // row's first key (doc_start is non-decreasing), kt_last holds the last row's diagonal
        const int kt_first = cDs[0] / BC, kt_last = (min(q0 + BR, T) - 1) / BC;
        int* sem = p.dq_sem + ((int64_t)b * nh + hq) * n_sem + qt;
        int seen = 0;
        if (tid == 0 && kt > kt_first) seen = attn_ld_relaxed(sem);  // early poll: latency hidden by the matmuls

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
        // our turn for dQ: key tile kt - 1 has added (a bound turns a hang, e.g. from a decreasing
        // doc_start, into an error after some seconds; a legal wait is about one item)
        if (tid == 0) {
            for (int polls = 0; kt > kt_first && seen < kt - kt_first; polls++) {
                if (polls == (1 << 24)) {
                    printf("attention_backward: dQ semaphore never came (is doc_start non-decreasing?)\n");
                    __trap();
                }
                __nanosleep(32);
                seen = attn_ld_relaxed(sem);
            }
            // acquires the earlier tiles' dq_accum stores (for the CTA, after the barrier), and releases the
            // previous item's stores (every thread issued them before this item's first barrier)
            if (kt > kt_first || sem_done) attn_fence_acq_rel();
            if (sem_done) attn_red_add1(sem_done);
        }
        __syncthreads();  // all of dS^T is in smem, and it is our turn
        // this lane's share of the dQ tile: one float4 per n8 block, even lanes row g, odd lanes row g+8
        const bool first = kt == kt_first, last = kt == kt_last, odd = t4 & 1;
        const int i = q0 + qr0 + g + (odd ? 8 : 0);
        const int64_t qoff = ((int64_t)b * T + min(i, T - 1)) * qstride + (int64_t)hq * HD + dc0 + 2 * (t4 & 2);
        // the earlier tiles' sum, from L2 (.cg: this SM's L1 may hold a stale copy)
        float4* acc = sAcc + warp * (DCW / 8) * 32 + lane;  // this lane's slots, 32 float4 apart
        if (DQ_PF && !first) {
#pragma unroll
            for (int n = 0; n < DCW / 8; n++) attn_cp_async16(attn_smem_u32(acc + n * 32), p.dq_accum + qoff + n * 8, i < T);
            attn_cp_async_commit();
        }
        // dS K for rows q0 + qr0 .. +16, cols dc0 .. +DCW (contraction over the BC keys)
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
        if (DQ_PF && !first) attn_cp_async_wait_all();  // (also waits for the next Q tile, issued long ago)
#pragma unroll
        for (int n = 0; n < DCW / 8; n++) {
            const float x0 = __shfl_xor_sync(0xffffffffu, odd ? dq[n][0] : dq[n][2], 1);
            const float x1 = __shfl_xor_sync(0xffffffffu, odd ? dq[n][1] : dq[n][3], 1);
            float4 v4 = odd ? make_float4(x0, x1, dq[n][2], dq[n][3]) : make_float4(dq[n][0], dq[n][1], x0, x1);
            if (i >= T) continue;
            if (!first) {
                const float4 a = DQ_PF ? acc[n * 32] : __ldcg(reinterpret_cast<const float4*>(p.dq_accum + qoff + n * 8));
                v4 = make_float4(a.x + v4.x, a.y + v4.y, a.z + v4.z, a.w + v4.w);  // earlier tiles + this one
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
            if (tid == 0 && !first) *sem = 0;  // nobody else touches it now: leave it zeroed for the next launch
        }
    }
    __syncthreads();  // the last item's dQ stores are issued
    if (tid == 0 && sem_done) { attn_fence_acq_rel(); attn_red_add1(sem_done); }

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

// kernel4 (hd 64 and 128, Hopper): the backward split in two kernels that share nothing but their inputs, so no dQ
// traffic between CTAs. kernel3 (dev/cuda/attention_backward.cu: kernel2's schedule and ordered dQ on wgmma)
// spent half its time on that traffic: 1.72 ms, 0.87 without the dq_accum adds. The split costs two more
// matmuls per (query, key) tile pair (S and dP again), 7 instead of 5, and is deterministic by construction.
//   kernel4_dkdv: one CTA per (kv head, 128-key tile), kernel3 without dQ: S^T, dP^T, dV += P^T dO, dK += dS^T Q
//   kernel4_dq:   one CTA per (query head, 128-query tile), two warpgroups of 64 queries; per 64-key tile:
//                 S = Q K^T, dP = dO V^T (m64n64k16, K-major), dS = P (dP - D), dQ += dS K (m64nHDk16, A = dS
//                 from registers, B = K MN-major); dV, dK likewise m64nHDk16 (wg_mma_rs)
template <int HD, int BC, int BR>
struct AttnBwdTile4 {
    static constexpr int THREADS = 256;
    static constexpr int KB = BC * HD * 2, QB = BR * HD * 2;  // bytes: K (or V) tile, Q (or dO) tile
    // K, V, Q (2 stages), dO (2 stages), lse, D, doc_start (2 stages)
    static constexpr size_t OFF_V = KB, OFF_Q = 2 * KB, OFF_DO = OFF_Q + 2 * QB, OFF_L = OFF_DO + 2 * QB, SMEM = OFF_L + 2 * 3 * BR * 4;
    static constexpr size_t SMEM_ALLOC = SMEM + 1024;  // the dynamic smem base is aligned up to 1024 bytes
    static_assert((HD == 64 || HD == 128) && BC == 128 && BR == 64, "kernel4_dkdv: the warpgroup split below is written for these");
};

template <int HD, int BC, int BR>
__global__ void __launch_bounds__(256, 1) attention_backward_kernel4_dkdv(const AttnBwdParams p) {
    using C = AttnBwdTile4<HD, BC, BR>;
    constexpr int NT = C::THREADS, CH = HD / 8;
    extern __shared__ unsigned char attn_smem4[];
    unsigned char* sm = attn_smem4 + ((1024 - (attn_smem_u32(attn_smem4) & 1023)) & 1023);
    const uint32_t sK = attn_smem_u32(sm), sV = sK + C::OFF_V, sQ = sK + C::OFF_Q, sdO = sK + C::OFF_DO;
    float* sL = reinterpret_cast<float*>(sm + C::OFF_L);  // (2, BR) lse
    float* sD = sL + 2 * BR;                               // (2, BR) D
    int* sDs = reinterpret_cast<int*>(sD + 2 * BR);        // (2, BR) doc_start

    const int T = p.T, nh = p.nh, nkv = p.nkv, G = nh / nkv;
    const int b = blockIdx.x / nkv, kvh = blockIdx.x % nkv;
    const int kt = blockIdx.y, k0 = kt * BC, k_last = min(k0 + BC, T) - 1;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t4 = lane & 3, wg = warp >> 2;
    const int* ds = p.doc_start ? p.doc_start + (int64_t)b * T : nullptr;
    const int64_t qstride = (int64_t)nh * HD, kstride = (int64_t)nkv * HD;

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
    const int kr0 = warp * 16;
    const float sl2 = p.scale_log2;
    const uint32_t kA = sK + wg * 64 * 128, vA = sV + wg * 64 * 128;  // this warpgroup's 64 key rows, column block 0

    for (int it = 0; it < n_iter; it++) {
        const int st = it & 1, q0 = (qt_hi - it / G) * BR;
        attn_cp_async_wait_all();
        wg_fence_proxy();  // the cp.async stores, before wgmma reads them
        __syncthreads();   // stage st landed; both warpgroups are done with stage st ^ 1
        if (it + 1 < n_iter) { load_q(st ^ 1, it + 1); attn_cp_async_commit(); }
        const uint32_t cQ = sQ + st * C::QB, cdO = sdO + st * C::QB;
        const float* cL = sL + st * BR;
        const float* cD = sD + st * BR;
        const int* cDs = sDs + st * BR;

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
        for (int kc = 0; kc < BR / 16; kc++)
#pragma unroll
            for (int h = 0; h < 4; h++) {  // h: (row g | g + 8) x (cols 0-7 | 8-15) of the k16 block
                const int n = 2 * kc + (h >> 1), e = (h & 1) * 2;
                pa[kc][h] = attn_pack_bf16(s[4 * n + e], s[4 * n + e + 1]);
                da[kc][h] = attn_pack_bf16(dp[4 * n + e], dp[4 * n + e + 1]);
            }
        // dV += P^T dO, dK += dS^T Q; complete before the next item's loads reuse this stage
        wg_fence();
#pragma unroll
        for (int kc = 0; kc < BR / 16; kc++) wg_mma_rs<1>(dv, pa[kc], wg_desc(cdO + kc * 2048, BR * 128, 1024));
#pragma unroll
        for (int kc = 0; kc < BR / 16; kc++) wg_mma_rs<1>(dk, da[kc], wg_desc(cQ + kc * 2048, BR * 128, 1024));
        wg_commit();
        wg_wait<0>();
        wg_fence_regs(dk); wg_fence_regs(dv);
    }

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

// kernel4_dq: BQ = 128 query rows of one head (warpgroup wg: rows 64 wg ..), 64-key tiles of its kv head,
// double-buffered; query tiles are dispatched last first (they see the most keys).
template <int HD, int BQ, int BK>
struct AttnBwdTile4q {
    static constexpr int THREADS = BQ / 64 * 128;
    static constexpr int QB = BQ * HD * 2, KB = BK * HD * 2;  // bytes: Q (or dO) tile, K (or V) tile
    static constexpr size_t OFF_DO = QB, OFF_K = 2 * QB, OFF_V = OFF_K + 2 * KB, SMEM = OFF_V + 2 * KB;  // Q, dO, K (2), V (2)
    static constexpr size_t SMEM_ALLOC = SMEM + 1024;
    static_assert((HD == 64 || HD == 128) && BQ == 128 && BK == 64, "kernel4_dq: the warpgroup split below is written for these");
};

// hd 64: two CTAs per SM within 128 registers, no spills (kernel4_dkdv and the forward's kernel2 would spill there)
template <int HD, int BQ, int BK>
__global__ void __launch_bounds__(BQ / 64 * 128, HD == 64 ? 2 : 1) attention_backward_kernel4_dq(const AttnBwdParams p) {
    using C = AttnBwdTile4q<HD, BQ, BK>;
    constexpr int NT = C::THREADS, CH = HD / 8;
    extern __shared__ unsigned char attn_smem4q[];
    unsigned char* sm = attn_smem4q + ((1024 - (attn_smem_u32(attn_smem4q) & 1023)) & 1023);
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

    for (int kt = kt_lo; kt <= kt_hi; kt++) {
        const int st = (kt - kt_lo) & 1, k0 = kt * BK;
        attn_cp_async_wait_all();
        wg_fence_proxy();
        __syncthreads();  // tile kt landed; both warpgroups are done with the other stage
        if (kt < kt_hi) { load_kv(st ^ 1, kt + 1); attn_cp_async_commit(); }
        const uint32_t cK = sK + st * C::KB, cV = sV + st * C::KB;

        // S = Q K^T, dP = dO V^T: (64 queries x BK keys) per warpgroup
        float s[BK / 2], dp[BK / 2];
        wg_fence();
#pragma unroll
        for (int kk = 0; kk < HD / 16; kk++) {
            const uint32_t qo = (kk >> 2) * BQ * 128 + (kk & 3) * 32, ko = (kk >> 2) * BK * 128 + (kk & 3) * 32;
            wg_mma_64x64_ss<0, 0>(s, wg_desc(qA + qo, 16, 1024), wg_desc(cK + ko, 16, 1024), kk);
        }
#pragma unroll
        for (int kk = 0; kk < HD / 16; kk++) {
            const uint32_t qo = (kk >> 2) * BQ * 128 + (kk & 3) * 32, ko = (kk >> 2) * BK * 128 + (kk & 3) * 32;
            wg_mma_64x64_ss<0, 0>(dp, wg_desc(oA + qo, 16, 1024), wg_desc(cV + ko, 16, 1024), kk);
        }
        wg_commit();
        wg_wait<0>();
        wg_fence_regs(s); wg_fence_regs(dp);

        // P = exp2(S * scale * log2e - lse * log2e), masked to 0; dS = P (dP - D), as bf16 A fragments
        const bool need_mask = k0 + BK - 1 > q0 || k0 + BK > T || q0 + BQ > T || (ds && k0 < ds[q_last]);
        uint32_t da[BK / 16][4];
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
#pragma unroll
        for (int kc = 0; kc < BK / 16; kc++)
#pragma unroll
            for (int hh = 0; hh < 4; hh++) {
                const int n = 2 * kc + (hh >> 1), e = (hh & 1) * 2;
                da[kc][hh] = attn_pack_bf16(dp[4 * n + e], dp[4 * n + e + 1]);
            }
        // dQ += dS K (B = K, MN-major); complete before the next tile's loads reuse this stage
        wg_fence();
#pragma unroll
        for (int kc = 0; kc < BK / 16; kc++) wg_mma_rs<1>(dq, da[kc], wg_desc(cK + kc * 2048, BK * 128, 1024));
        wg_commit();
        wg_wait<0>();
        wg_fence_regs(dq);
    }

#pragma unroll
    for (int r = 0; r < 2; r++) {
        if (qi[r] >= T) continue;
        const int64_t off = ((int64_t)b * T + qi[r]) * qstride + (int64_t)h * HD + 2 * t4;
#pragma unroll
        for (int n = 0; n < HD / 8; n++)
            *reinterpret_cast<uint32_t*>(p.dq + off + n * 8) = attn_pack_bf16(dq[4 * n + 2 * r] * p.scale, dq[4 * n + 2 * r + 1] * p.scale);
    }
}

// kernel6 (session 9, hd 128; hd 64 since session 11, Hopper): kernel4's two kernels on the forward kernel5's schedule. 384 threads,
// 1 CTA/SM: warpgroup 0 produces (TMA into a STAGES-deep ring of stages, each with a full and an empty mbarrier),
// warpgroups 1 and 2 consume with kernel4's math in kernel4's order of operations, so dq, dk and dv should come
// out bit-identical to 4a's. setmaxnreg: producer 40, consumers 232 in the dK/dV kernel (dK, dV, S^T, dP^T and
// the P^T, dS^T fragments: 230 used); 24 and 240 in the dQ kernel (152 used). No __syncthreads in the loops: a
// consumer warpgroup waits only for its next stage to be full, so the two drift apart and one's exp and packing
// can run under the other's wgmmas; nobody issues loads between the matmuls.
//   kernel6_dkdv: K and V of the CTA's 128 keys by TMA once; per item (query head, 64-row query tile, in
//     kernel4's order) warp 0 of the producer streams Q and dO (lane 0, TMA) and the tile's lse, D and
//     doc_start rows (all 32 lanes, 4-byte cp.async: a row of lse or D starts at (b nh + h) T floats, not
//     16-byte aligned for every T, so no bulk copy); the full barrier counts the expect_tx arrival and the
//     32 lanes' cp.async.mbarrier.arrive.noinc, and completes once the TMA bytes have landed too.
//   kernel6_dq: Q and dO of the CTA's 128 queries by TMA once; K and V tiles of 64 keys streamed (one thread).
//     PINGPONG (6e): its consumers take turns on the tensor cores (kernel5's), dS K one tile behind S and dP.
// The empty barriers count lane 0 of each of the 8 consumer warps, after its wgmmas on the stage are waited for.
// Rows past T land as zeros (TMA's out-of-bounds fill, cp.async's zero-fill) and are masked as in kernel4.
// hd 64 (session 11, dispatched: 6f64): the same tiles and code; a row of Q, K, V or dO is one 128-byte swizzle row, so one TMA box
// per tile instead of two (the HD / 64 loops), and the HD-wide accumulators (dK, dV, dQ) take m64n64 wgmmas
// (wg_mma_rs, as kernel4 at hd 64). ptxas: 168 registers at launch, 0 spills. Smem halves (dK/dV 83 KiB, dQ 81 at
// 3 stages), but registers keep 1 CTA/SM: tried, the dQ kernel at __launch_bounds__(384, 2) (80 at launch, 24/104
// by setmaxnreg) spilled 120 bytes with PINGPONG and 384 without (where ptxas also serialized the wgmmas, C7512).
// The consumers' loop bodies and stores are kernel4's text, copied rather than shared: factored into
// __forceinline__ helpers (session 10) they compiled to other SASS, and kernel4_dkdv at hd 128 went from 254
// registers to 255 plus 4 bytes of spill; sharing them wants a GPU run to time and check.

template <int HD, int BC, int BR, int STAGES>
struct AttnBwdTile6 {
    static constexpr int THREADS = 384;  // producer warpgroup + 2 consumer warpgroups of 64 keys
    static constexpr int KB = BC * HD * 2, QB = BR * HD * 2, RB = 3 * BR * 4;  // bytes: K (or V), Q (or dO), lse + D + doc_start
    // K, V, Q (STAGES), dO (STAGES), lse/D/doc_start rows (STAGES)
    static constexpr size_t OFF_V = KB, OFF_Q = 2 * KB, OFF_DO = OFF_Q + STAGES * QB, OFF_R = OFF_DO + STAGES * QB;
    static constexpr size_t SMEM = OFF_R + STAGES * RB, SMEM_ALLOC = SMEM + 1024;  // base aligned up to 1024 bytes
    static_assert((HD == 64 || HD == 128) && BC == 128 && BR == 64, "kernel6_dkdv: written for kernel4_dkdv's tiles");
    static_assert(SMEM_ALLOC + 256 <= 227 * 1024, "kernel6_dkdv: too many stages for 227 KB");
};

template <int HD, int BC, int BR, int STAGES>
__global__ void __launch_bounds__(384, 1) attention_backward_kernel6_dkdv(const AttnBwdParams p, const __grid_constant__ CUtensorMap tm_q,
                                                                         const __grid_constant__ CUtensorMap tm_do,
                                                                         const __grid_constant__ CUtensorMap tm_k,
                                                                         const __grid_constant__ CUtensorMap tm_v) {
    using C = AttnBwdTile6<HD, BC, BR, STAGES>;
    constexpr int NT = C::THREADS;
    extern __shared__ unsigned char attn_smem6[];
    __shared__ __align__(8) uint64_t bars[1 + 2 * STAGES];  // K and V landed; full[STAGES], empty[STAGES]
    unsigned char* sm = attn_smem6 + ((1024 - (attn_smem_u32(attn_smem6) & 1023)) & 1023);
    const uint32_t sK = attn_smem_u32(sm), sV = sK + C::OFF_V, sQ = sK + C::OFF_Q, sdO = sK + C::OFF_DO, sR = sK + C::OFF_R;
    const uint32_t bkv = attn_smem_u32(&bars[0]), bfull = bkv + 8, bempty = bfull + 8 * STAGES;

    const int T = p.T, nh = p.nh, nkv = p.nkv, G = nh / nkv;
    const int b = blockIdx.x / nkv, kvh = blockIdx.x % nkv;
    const int k0 = blockIdx.y * BC, k_last = min(k0 + BC, T) - 1;  // tile 0 (most query tiles) first
    const int tid = threadIdx.x;
    const int* ds = p.doc_start ? p.doc_start + (int64_t)b * T : nullptr;

    if (tid == 0) {
        attn5_mbar_init(bkv, 1);
        for (int s = 0; s < STAGES; s++) {
            attn5_mbar_init(bfull + 8 * s, 1 + 32);  // the producer's expect_tx + its warp's 32 cp.async arrivals
            attn5_mbar_init(bempty + 8 * s, 8);      // lane 0 of each consumer warp
        }
        attn5_mbar_init_fence();
    }
    __syncthreads();
    if (tid == 0) {  // this tile's K and V, once, under the search below
        attn5_mbar_expect_tx(bkv, 2 * C::KB);
        for (int cb = 0; cb < HD / 64; cb++) {
            attn5_tma_load(sK + cb * BC * 128, &tm_k, cb * 64, kvh, k0, b, bkv);
            attn5_tma_load(sV + cb * BC * 128, &tm_v, cb * 64, kvh, k0, b, bkv);
        }
    }
    int i_max = T - 1;  // last query that can see any of these keys (kernel4's search, by all 384 threads)
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
    // item it: query head kvh G + it % G, query tile qt_hi - it / G (kernel4's order, so dK and dV sum in its order)
    const int qt_lo = k0 / BR, qt_hi = i_max / BR, n_iter = G * (qt_hi - qt_lo + 1);

    if (tid < 128) {  // producer: warp 0 (lane 0 the TMA copies, every lane the lse, D and doc_start rows)
        attn5_setmaxnreg_dec<40>();  // at 24 it spilled 8 bytes across the split
        if (tid < 32) {
            for (int it = 0; it < n_iter; it++) {
                const int s = it % STAGES, u = it / STAGES, hq = kvh * G + it % G, q0 = (qt_hi - it / G) * BR;
                const uint32_t full = bfull + 8 * s;
                if (u > 0) attn5_mbar_wait(bempty + 8 * s, (u - 1) & 1);  // all 8 consumer warps are done with item it - STAGES
                if (tid == 0) {
                    attn5_mbar_expect_tx(full, 2 * C::QB);
                    for (int cb = 0; cb < HD / 64; cb++) {
                        attn5_tma_load(sQ + s * C::QB + cb * BR * 128, &tm_q, cb * 64, hq, q0, b, full);
                        attn5_tma_load(sdO + s * C::QB + cb * BR * 128, &tm_do, cb * 64, hq, q0, b, full);
                    }
                }
                const int64_t lrow = ((int64_t)b * nh + hq) * T;
#pragma unroll
                for (int c = tid; c < 3 * BR; c += 32) {  // (3, BR) lse, D, doc_start; zeros past T (doc_start also without documents)
                    const int which = c / BR, i = q0 + c % BR, ic = i < T ? i : 0;
                    const void* src = which == 0 ? (const void*)(p.lse + lrow + ic)
                                    : which == 1 ? (const void*)(p.D + lrow + ic) : ds ? (const void*)(ds + ic) : (const void*)p.lse;
                    attn_cp_async4(sR + s * C::RB + c * 4, src, i < T && (which < 2 || ds));
                }
                attn6_cp_async_mbar_arrive(full);
            }
            attn_cp_async_wait_all();
        }
        return;
    }
    attn5_setmaxnreg_inc<232>();  // 128 x 40 + 256 x 232 = 384 x 168

    // consumers: kernel4_dkdv's loop body; warp 0..7 of the consumers, warpgroup wg holds keys 64 wg ..
    const int ct = tid - 128, warp = ct >> 5, lane = ct & 31, g = lane >> 2, t4 = lane & 3, wg = warp >> 2;
    const int64_t kstride = (int64_t)nkv * HD;
    float dk[HD / 2], dv[HD / 2];  // (64 keys x HD) per warpgroup: [4 n + e] = key 16 warp + g + 8 (e >> 1), dim 8 n + 2 t4 + (e & 1)
#pragma unroll
    for (int n = 0; n < HD / 2; n++) dk[n] = dv[n] = 0.f;
    const int kr0 = warp * 16;
    const float sl2 = p.scale_log2;
    const uint32_t kA = sK + wg * 64 * 128, vA = sV + wg * 64 * 128;  // this warpgroup's 64 key rows, column block 0

    attn5_mbar_wait(bkv, 0);  // K and V landed
    for (int it = 0; it < n_iter; it++) {
        const int st = it % STAGES, q0 = (qt_hi - it / G) * BR;
        attn5_mbar_wait(bfull + 8 * st, (it / STAGES) & 1);  // Q, dO and the rows of item it landed
        const uint32_t cQ = sQ + st * C::QB, cdO = sdO + st * C::QB;
        const float* cL = reinterpret_cast<const float*>(sm + C::OFF_R + st * C::RB);
        const float* cD = cL + BR;
        const int* cDs = reinterpret_cast<const int*>(cD + BR);

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
        for (int kc = 0; kc < BR / 16; kc++)
#pragma unroll
            for (int h = 0; h < 4; h++) {  // h: (row g | g + 8) x (cols 0-7 | 8-15) of the k16 block
                const int n = 2 * kc + (h >> 1), e = (h & 1) * 2;
                pa[kc][h] = attn_pack_bf16(s[4 * n + e], s[4 * n + e + 1]);
                da[kc][h] = attn_pack_bf16(dp[4 * n + e], dp[4 * n + e + 1]);
            }
        // dV += P^T dO, dK += dS^T Q; waited for before this warp hands the stage back
        wg_fence();
#pragma unroll
        for (int kc = 0; kc < BR / 16; kc++) wg_mma_rs<1>(dv, pa[kc], wg_desc(cdO + kc * 2048, BR * 128, 1024));
#pragma unroll
        for (int kc = 0; kc < BR / 16; kc++) wg_mma_rs<1>(dk, da[kc], wg_desc(cQ + kc * 2048, BR * 128, 1024));
        wg_commit();
        wg_wait<0>();
        wg_fence_regs(dk); wg_fence_regs(dv);
        if (lane == 0) attn5_mbar_arrive(bempty + 8 * st);  // this warp is done with stage st (its rows read above)
    }

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

template <int HD, int BQ, int BK, int STAGES>
struct AttnBwdTile6q {
    static constexpr int THREADS = 384;  // producer warpgroup + 2 consumer warpgroups of 64 queries
    static constexpr int QB = BQ * HD * 2, KB = BK * HD * 2;  // bytes: Q (or dO) tile, K (or V) tile
    static constexpr size_t OFF_DO = QB, OFF_K = 2 * QB, OFF_V = OFF_K + STAGES * KB, SMEM = OFF_V + STAGES * KB;  // Q, dO, K (STAGES), V (STAGES)
    static constexpr size_t SMEM_ALLOC = SMEM + 1024;
    static_assert((HD == 64 || HD == 128) && BQ == 128 && BK == 64, "kernel6_dq: written for kernel4_dq's tiles");
    static_assert(SMEM_ALLOC + 256 <= 227 * 1024, "kernel6_dq: too many stages for 227 KB");
};

template <int HD, int BQ, int BK, int STAGES, bool PINGPONG>
__global__ void __launch_bounds__(384, 1) attention_backward_kernel6_dq(const AttnBwdParams p, const __grid_constant__ CUtensorMap tm_q,
                                                                       const __grid_constant__ CUtensorMap tm_do,
                                                                       const __grid_constant__ CUtensorMap tm_k,
                                                                       const __grid_constant__ CUtensorMap tm_v) {
    using C = AttnBwdTile6q<HD, BQ, BK, STAGES>;
    extern __shared__ unsigned char attn_smem6q[];
    __shared__ __align__(8) uint64_t bars[1 + 2 * STAGES];  // Q and dO landed; full[STAGES], empty[STAGES]
    unsigned char* sm = attn_smem6q + ((1024 - (attn_smem_u32(attn_smem6q) & 1023)) & 1023);
    const uint32_t sQ = attn_smem_u32(sm), sdO = sQ + C::OFF_DO, sK = sQ + C::OFF_K, sV = sQ + C::OFF_V;
    const uint32_t bq = attn_smem_u32(&bars[0]), bfull = bq + 8, bempty = bfull + 8 * STAGES;

    const int T = p.T, nh = p.nh, nkv = p.nkv, G = nh / nkv;
    const int b = blockIdx.x / nh, h = blockIdx.x % nh, kvh = h / G;
    const int q0 = (gridDim.y - 1 - blockIdx.y) * BQ;  // the heaviest (last) query tiles first
    const int tid = threadIdx.x;
    const int* ds = p.doc_start ? p.doc_start + (int64_t)b * T : nullptr;
    // key tiles: from the one holding the first row's document start to the last row's diagonal
    const int q_last = min(q0 + BQ, T) - 1, kt_lo = (ds ? ds[q0] : 0) / BK, kt_hi = q_last / BK;

    if (tid == 0) {
        attn5_mbar_init(bq, 1);
        for (int s = 0; s < STAGES; s++) {
            attn5_mbar_init(bfull + 8 * s, 1);  // the producer's expect_tx
            attn5_mbar_init(bempty + 8 * s, 8);  // lane 0 of each consumer warp
        }
        attn5_mbar_init_fence();
    }
    __syncthreads();

    if (tid < 128) {  // producer: one thread issues every copy
        attn5_setmaxnreg_dec<24>();
        if (tid == 0) {
            attn5_mbar_expect_tx(bq, 2 * C::QB);
            for (int cb = 0; cb < HD / 64; cb++) {
                attn5_tma_load(sQ + cb * BQ * 128, &tm_q, cb * 64, h, q0, b, bq);
                attn5_tma_load(sdO + cb * BQ * 128, &tm_do, cb * 64, h, q0, b, bq);
            }
            for (int kt = kt_lo; kt <= kt_hi; kt++) {
                const int n = kt - kt_lo, s = n % STAGES, u = n / STAGES;
                const uint32_t full = bfull + 8 * s;
                if (u > 0) attn5_mbar_wait(bempty + 8 * s, (u - 1) & 1);  // all 8 consumer warps are done with tile kt - STAGES
                attn5_mbar_expect_tx(full, 2 * C::KB);
                for (int cb = 0; cb < HD / 64; cb++) {
                    attn5_tma_load(sK + s * C::KB + cb * BK * 128, &tm_k, cb * 64, kvh, kt * BK, b, full);
                    attn5_tma_load(sV + s * C::KB + cb * BK * 128, &tm_v, cb * 64, kvh, kt * BK, b, full);
                }
            }
        }
        return;
    }
    attn5_setmaxnreg_inc<240>();

    // consumers: kernel4_dq's loop body; warp 0..7 of the consumers, warpgroup wg holds queries 64 wg ..
    const int ct = tid - 128, warp = ct >> 5, lane = ct & 31, g = lane >> 2, t4 = lane & 3, wg = warp >> 2;
    const int64_t qstride = (int64_t)nh * HD;
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
    const int ds_max = ds ? ds[q_last] : 0;  // doc_start is non-decreasing along the row
    float dq[HD / 2];  // (64 queries x HD) per warpgroup, the accumulator layout
#pragma unroll
    for (int n = 0; n < HD / 2; n++) dq[n] = 0.f;
    const float sl2 = p.scale_log2;
    const uint32_t qA = sQ + wg * 64 * 128, oA = sdO + wg * 64 * 128;  // this warpgroup's 64 query rows

    attn5_mbar_wait(bq, 0);  // Q and dO landed
    if constexpr (!PINGPONG) {  // 6a: a tile's three matmuls and its arithmetic in turn, each batch waited for (4a's loop body)
        for (int kt = kt_lo; kt <= kt_hi; kt++) {
            const int n_ = kt - kt_lo, st = n_ % STAGES, k0 = kt * BK;
            attn5_mbar_wait(bfull + 8 * st, (n_ / STAGES) & 1);  // K and V of tile kt landed
            const uint32_t cK = sK + st * C::KB, cV = sV + st * C::KB;

            // S = Q K^T, dP = dO V^T: (64 queries x BK keys) per warpgroup
            float s[BK / 2], dp[BK / 2];
            wg_fence();
#pragma unroll
            for (int kk = 0; kk < HD / 16; kk++) {
                const uint32_t qo = (kk >> 2) * BQ * 128 + (kk & 3) * 32, ko = (kk >> 2) * BK * 128 + (kk & 3) * 32;
                wg_mma_64x64_ss<0, 0>(s, wg_desc(qA + qo, 16, 1024), wg_desc(cK + ko, 16, 1024), kk);
            }
#pragma unroll
            for (int kk = 0; kk < HD / 16; kk++) {
                const uint32_t qo = (kk >> 2) * BQ * 128 + (kk & 3) * 32, ko = (kk >> 2) * BK * 128 + (kk & 3) * 32;
                wg_mma_64x64_ss<0, 0>(dp, wg_desc(oA + qo, 16, 1024), wg_desc(cV + ko, 16, 1024), kk);
            }
            wg_commit();
            wg_wait<0>();
            wg_fence_regs(s); wg_fence_regs(dp);

            // P = exp2(S * scale * log2e - lse * log2e), masked to 0; dS = P (dP - D), as bf16 A fragments
            const bool need_mask = k0 + BK - 1 > q0 || k0 + BK > T || q0 + BQ > T || (ds && k0 < ds_max);
            uint32_t da[BK / 16][4];
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
#pragma unroll
            for (int kc = 0; kc < BK / 16; kc++)
#pragma unroll
                for (int hh = 0; hh < 4; hh++) {
                    const int n = 2 * kc + (hh >> 1), e = (hh & 1) * 2;
                    da[kc][hh] = attn_pack_bf16(dp[4 * n + e], dp[4 * n + e + 1]);
                }
            // dQ += dS K (B = K, MN-major); waited for before this warp hands the stage back
            wg_fence();
#pragma unroll
            for (int kc = 0; kc < BK / 16; kc++) wg_mma_rs<1>(dq, da[kc], wg_desc(cK + kc * 2048, BK * 128, 1024));
            wg_commit();
            wg_wait<0>();
            wg_fence_regs(dq);
            if (lane == 0) attn5_mbar_arrive(bempty + 8 * st);  // this warp is done with stage st
        }
    } else {  // 6e: kernel5's pingpong, dQ += dS(t-1) K(t-1) one tile behind S(t), dP(t) (dQ's order unchanged)
        float s[BK / 2], dp[BK / 2];  // S, dP: (64 queries x BK keys) per warpgroup; dP becomes dS
        uint32_t da[BK / 16][4];       // dS as bf16 A fragments
        auto issue_sdp = [&](int st) {  // S = Q K^T, dP = dO V^T of the key tile in stage st (no commit)
            const uint32_t cK = sK + st * C::KB, cV = sV + st * C::KB;
#pragma unroll
            for (int kk = 0; kk < HD / 16; kk++) {
                const uint32_t qo = (kk >> 2) * BQ * 128 + (kk & 3) * 32, ko = (kk >> 2) * BK * 128 + (kk & 3) * 32;
                wg_mma_64x64_ss<0, 0>(s, wg_desc(qA + qo, 16, 1024), wg_desc(cK + ko, 16, 1024), kk);
            }
#pragma unroll
            for (int kk = 0; kk < HD / 16; kk++) {
                const uint32_t qo = (kk >> 2) * BQ * 128 + (kk & 3) * 32, ko = (kk >> 2) * BK * 128 + (kk & 3) * 32;
                wg_mma_64x64_ss<0, 0>(dp, wg_desc(oA + qo, 16, 1024), wg_desc(cV + ko, 16, 1024), kk);
            }
        };
        auto issue_dq = [&](int st) {  // dQ += dS K of the key tile in stage st (B = K, MN-major; no commit)
#pragma unroll
            for (int kc = 0; kc < BK / 16; kc++) wg_mma_rs<1>(dq, da[kc], wg_desc(sK + st * C::KB + kc * 2048, BK * 128, 1024));
        };
        auto ds_of = [&](int kt) {  // P = exp2(S * scale * log2e - lse * log2e), masked to 0; dP -> dS = P (dP - D)
            const int k0 = kt * BK;
            const bool need_mask = k0 + BK - 1 > q0 || k0 + BK > T || q0 + BQ > T || (ds && k0 < ds_max);
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
        auto pack_da = [&]() {  // dS -> bf16 A fragments (key blocks 2 kc, 2 kc + 1 -> key chunk kc)
#pragma unroll
            for (int kc = 0; kc < BK / 16; kc++)
#pragma unroll
                for (int hh = 0; hh < 4; hh++) {
                    const int n = 2 * kc + (hh >> 1), e = (hh & 1) * 2;
                    da[kc][hh] = attn_pack_bf16(dp[4 * n + e], dp[4 * n + e + 1]);
                }
        };
        auto fence_da = [&]() {  // dS stays in its registers until the wgmmas reading it are done
#pragma unroll
            for (int kc = 0; kc < BK / 16; kc++)
#pragma unroll
                for (int hh = 0; hh < 4; hh++) asm volatile("" : "+r"(da[kc][hh])::"memory");
        };
        const int bar_mine = 1 + wg, bar_other = 2 - wg;
        // (branch-free around the wgmmas: ptxas serializes them otherwise; the first S, dP and the last dQ are peeled)
        if (wg == 1) attn5_bar_arrive(1);  // warpgroup 1 (wg 0) takes the first turn
        attn5_mbar_wait(bfull, 0);  // tile kt_lo is in stage 0
        attn5_bar_sync(bar_mine);
        wg_fence();
        issue_sdp(0);
        wg_commit();
        attn5_bar_arrive(bar_other);
        wg_wait<0>();
        wg_fence_regs(s); wg_fence_regs(dp);
        ds_of(kt_lo);
        pack_da();
        for (int kt = kt_lo + 1; kt <= kt_hi; kt++) {
            const int n_ = kt - kt_lo, st = n_ % STAGES, sp = (n_ - 1) % STAGES;
            attn5_mbar_wait(bfull + 8 * st, (n_ / STAGES) & 1);  // K and V of tile kt landed
            attn5_bar_sync(bar_mine);
            wg_fence();
            issue_dq(sp);  // first, so that stage sp goes back before S(t), dP(t) are done (2 stages: see above)
            wg_commit();
            issue_sdp(st);
            wg_commit();
            attn5_bar_arrive(bar_other);
            wg_wait<1>();  // dQ += dS(t-1) K(t-1) (S(t), dP(t) may still run)
            wg_fence_regs(dq);
            fence_da();
            if (lane == 0) attn5_mbar_arrive(bempty + 8 * sp);  // K(t-1)'s last reader is done: stage sp back
            wg_wait<0>();
            wg_fence_regs(s); wg_fence_regs(dp);
            ds_of(kt);
            pack_da();
        }
        {
            const int sp = (kt_hi - kt_lo) % STAGES;
            attn5_bar_sync(bar_mine);
            wg_fence();
            issue_dq(sp);
            wg_commit();
            attn5_bar_arrive(bar_other);
            wg_wait<0>();
            wg_fence_regs(dq);
            fence_da();
            if (lane == 0) attn5_mbar_arrive(bempty + 8 * sp);  // (as 6a: every tile's stage handed back)
        }
        if (wg == 0) attn5_bar_sync(1);  // takes warpgroup 2's last arrival: no barrier left half-done
    }

#pragma unroll
    for (int r = 0; r < 2; r++) {
        if (qi[r] >= T) continue;
        const int64_t off = ((int64_t)b * T + qi[r]) * qstride + (int64_t)h * HD + 2 * t4;
#pragma unroll
        for (int n = 0; n < HD / 8; n++)
            *reinterpret_cast<uint32_t*>(p.dq + off + n * 8) = attn_pack_bf16(dq[4 * n + 2 * r] * p.scale, dq[4 * n + 2 * r + 1] * p.scale);
    }
}

// ---------------------------------------------------------------------------------------------
// launchers

inline void attention_check_args(const void* const* ptrs, int nptrs, int B, int T, int nh, int nkv, int hd) {
    kernel_assert(hd == 64 || hd == 128, "attention: head_dim %d not supported (64 or 128)", hd);
    kernel_assert(B >= 1 && T >= 1 && nh >= 1 && nkv >= 1, "attention: bad sizes B=%d T=%d nh=%d nkv=%d", B, T, nh, nkv);
    kernel_assert(nh % nkv == 0, "attention: nh=%d must be a multiple of nkv=%d (GQA groups)", nh, nkv);
    kernel_assert((T + 63) / 64 <= 65535, "attention: T=%d too long for the grid (max %d)", T, 65535 * 64);
    for (int i = 0; i < nptrs; i++) kernel_assert(is_aligned16(ptrs[i]), "attention: tensor argument %d is not 16-byte aligned", i);
}

// true: the mma.sync kernels (every GPU's) on a Hopper too; test_attention covers both paths with it
inline bool attention_wgmma_off = false;
// wgmma needs a Hopper GPU (compute capability 9.0) and this build's sm_90a code
inline bool attention_has_wgmma() {
    static int cc = -1;
    if (cc < 0) {
        int dev = 0, major = 0, minor = 0;
        cudaCheck(cudaGetDevice(&dev));
        cudaCheck(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
        cudaCheck(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev));
        cc = major * 10 + minor;
    }
    return cc == 90 && !attention_wgmma_off;
}

template <int HD, int BR, int BC, int RT, int MINB, bool QREG>
void attention_forward_launch(const AttnFwdParams& p, cudaStream_t stream) {
    using C = AttnFwdTile<HD, BR, BC, RT>;
    auto kernel = attention_forward_kernel1<HD, BR, BC, RT, MINB, QREG>;
    cudaCheck(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)C::SMEM));
    dim3 grid(p.B * p.nh, (p.T + BR - 1) / BR);
    kernel<<<grid, C::THREADS, C::SMEM, stream>>>(p);
    cudaCheck(cudaGetLastError());
}

// kernel5 (Hopper): STAGES, the depth of the K/V ring (2: variant 5a, 3: 5b); PINGPONG false: 5c; at hd 64 5a64-5c64
template <int HD, int BQ, int BK, int STAGES, bool PINGPONG>
void attention_forward5_launch(const AttnFwdParams& p, cudaStream_t stream) {
    using C = AttnFwdTile5<HD, BQ, BK, STAGES>;
    auto kernel = attention_forward_kernel5<HD, BQ, BK, STAGES, PINGPONG>;
    cudaCheck(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)C::SMEM_ALLOC));
    const CUtensorMap tq = attn5_tensor_map(p.q, p.B, p.T, p.nh, HD, BQ), tk = attn5_tensor_map(p.k, p.B, p.T, p.nkv, HD, BK),
                      tv = attn5_tensor_map(p.v, p.B, p.T, p.nkv, HD, BK);
    dim3 grid(p.B * p.nh, (p.T + BQ - 1) / BQ);
    kernel<<<grid, C::THREADS, C::SMEM_ALLOC, stream>>>(p, tq, tk, tv);
    cudaCheck(cudaGetLastError());
}

// out = softmax(causal(q k^T / sqrt(hd))) v per head (GQA: head h reads kv head h / (nh/nkv)); lse saved for backward.
inline void attention_forward(bf16* out, float* lse, const bf16* q, const bf16* k, const bf16* v, const int* doc_start,
                              int B, int T, int nh, int nkv, int hd, cudaStream_t stream) {
    const void* ptrs[] = {out, q, k, v};
    attention_check_args(ptrs, 4, B, T, nh, nkv, hd);
    AttnFwdParams p{out, lse, q, k, v, doc_start, B, T, nh, nkv, 1.4426950408889634f / sqrtf((float)hd)};
    // hd 128 on Hopper: kernel5 with a K/V ring of 2 stages (dev/cuda/attention_forward.cu's 5a) below T = 8192,
    // of 3 (5b) from there: H100, llama3-8b heads, 4 x 2048: 5a 0.294 ms, 5b 0.312; 1 x 16384: 5a 3.77, 5b 3.64 (session 10)
    // hd 64 on Hopper: kernel5 5a64 (session 11, H100, llama3-1b heads: 4 x 2048 0.214 ms against 1l's 0.263; 1 x 16384
    // 2.51 against 3.55; 5b64 0.216 / 2.94, 5c64 0.215 / 2.56)
    // elsewhere variants 1l (hd 64) and 1h (hd 128): the fastest measured on H100 at the llama3 shapes (4 warps of
    // 32 query rows each, 2 CTAs/SM)
    if (hd == 64 && attention_has_wgmma()) attention_forward5_launch<64, 128, 128, 2, true>(p, stream);
    else if (hd == 64) attention_forward_launch<64, 128, 64, 2, 2, true>(p, stream);
    else if (attention_has_wgmma() && T < 8192) attention_forward5_launch<128, 128, 128, 2, true>(p, stream);
    else if (attention_has_wgmma()) attention_forward5_launch<128, 128, 128, 3, true>(p, stream);
    else attention_forward_launch<128, 128, 64, 2, 2, false>(p, stream);
}

// kernel6 (hd 64 and 128), the dQ and dK/dV kernels apart, on Hopper; kernel2 otherwise
inline bool attention_backward_split(int hd) { return (hd == 64 || hd == 128) && attention_has_wgmma(); }
// kernel2's scratch, in bytes: dq_accum (B, T, nh, hd) fp32, D (B, nh, T) fp32, the dQ semaphores (B, nh, ceil(T / 16)) int
inline size_t attention_backward_kernel2_scratch_bytes(int B, int T, int nh, int hd) {
    const size_t n_sem = (size_t)B * nh * ((T + ATTN_SEM_ROWS - 1) / ATTN_SEM_ROWS);
    return ((size_t)B * T * nh * hd + (size_t)B * nh * T) * sizeof(float) + n_sem * sizeof(int);
}
// Scratch for attention_backward, in bytes: D (B, nh, T) fp32 alone for kernel4 and kernel6, or kernel2's.
// The backward initialises what it needs.
inline size_t attention_backward_scratch_bytes(int B, int T, int nh, int hd) {
    return attention_backward_split(hd) ? (size_t)B * nh * T * sizeof(float) : attention_backward_kernel2_scratch_bytes(B, T, nh, hd);
}

template <int HD, int BC, int BR, int MINB, bool DQ_PF>
void attention_backward_launch(const AttnBwdParams& p, cudaStream_t stream) {
    using C = AttnBwdTile<HD, BC, BR>;
    auto kernel = attention_backward_kernel2<HD, BC, BR, MINB, DQ_PF>;
    const size_t smem = C::SMEM + (DQ_PF ? C::SMEM_DQ : 0);
    cudaCheck(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
    // blockIdx.y is the key tile: the dQ order needs tile kt - 1's CTA dispatched before tile kt's
    dim3 grid(p.B * p.nkv, (p.T + BC - 1) / BC);
    kernel<<<grid, C::THREADS, smem, stream>>>(p);
    cudaCheck(cudaGetLastError());
}

template <int HD>
void attention_backward4_launch(const AttnBwdParams& p, cudaStream_t stream) {
    using C = AttnBwdTile4<HD, 128, 64>;
    using Cq = AttnBwdTile4q<HD, 128, 64>;
    auto kdkdv = attention_backward_kernel4_dkdv<HD, 128, 64>;
    auto kdq = attention_backward_kernel4_dq<HD, 128, 64>;
    cudaCheck(cudaFuncSetAttribute(kdkdv, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)C::SMEM_ALLOC));
    cudaCheck(cudaFuncSetAttribute(kdq, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)Cq::SMEM_ALLOC));
    kdq<<<dim3(p.B * p.nh, (p.T + 127) / 128), Cq::THREADS, Cq::SMEM_ALLOC, stream>>>(p);
    cudaCheck(cudaGetLastError());
    kdkdv<<<dim3(p.B * p.nkv, (p.T + 127) / 128), C::THREADS, C::SMEM_ALLOC, stream>>>(p);
    cudaCheck(cudaGetLastError());
}

// kernel6 (hd 64 or 128, Hopper), variants 6a-6f (hd 64: 6a64-6h64) of dev/cuda/attention_backward.cu: STAGES, the depth of both kernels' TMA
// rings; DQ6, DKDV6: kernel6's dQ, dK/dV kernel, or kernel4's (6c, 6d time one half of kernel6 against kernel4's
// other); PINGPONG: kernel6's dQ kernel with its consumer warpgroups taking turns on the tensor cores (6e, 6f).
// The tensor maps are encoded on the host at every call (a few microseconds; they hold the tensors' addresses).
template <int HD, int STAGES, bool DQ6, bool DKDV6, bool PINGPONG = false>
void attention_backward6_launch(const AttnBwdParams& p, cudaStream_t stream) {
    const dim3 grid_q(p.B * p.nh, (p.T + 127) / 128), grid_kv(p.B * p.nkv, (p.T + 127) / 128);
    if constexpr (DQ6) {
        using C = AttnBwdTile6q<HD, 128, 64, STAGES>;
        auto kdq = attention_backward_kernel6_dq<HD, 128, 64, STAGES, PINGPONG>;
        cudaCheck(cudaFuncSetAttribute(kdq, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)C::SMEM_ALLOC));
        const CUtensorMap tq = attn5_tensor_map(p.q, p.B, p.T, p.nh, HD, 128), tdo = attn5_tensor_map(p.dout, p.B, p.T, p.nh, HD, 128),
                          tk = attn5_tensor_map(p.k, p.B, p.T, p.nkv, HD, 64), tv = attn5_tensor_map(p.v, p.B, p.T, p.nkv, HD, 64);
        kdq<<<grid_q, C::THREADS, C::SMEM_ALLOC, stream>>>(p, tq, tdo, tk, tv);
    } else {
        using C = AttnBwdTile4q<HD, 128, 64>;
        auto kdq = attention_backward_kernel4_dq<HD, 128, 64>;
        cudaCheck(cudaFuncSetAttribute(kdq, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)C::SMEM_ALLOC));
        kdq<<<grid_q, C::THREADS, C::SMEM_ALLOC, stream>>>(p);
    }
    cudaCheck(cudaGetLastError());
    if constexpr (DKDV6) {
        using C = AttnBwdTile6<HD, 128, 64, STAGES>;
        auto kdkdv = attention_backward_kernel6_dkdv<HD, 128, 64, STAGES>;
        cudaCheck(cudaFuncSetAttribute(kdkdv, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)C::SMEM_ALLOC));
        const CUtensorMap tq = attn5_tensor_map(p.q, p.B, p.T, p.nh, HD, 64), tdo = attn5_tensor_map(p.dout, p.B, p.T, p.nh, HD, 64),
                          tk = attn5_tensor_map(p.k, p.B, p.T, p.nkv, HD, 128), tv = attn5_tensor_map(p.v, p.B, p.T, p.nkv, HD, 128);
        kdkdv<<<grid_kv, C::THREADS, C::SMEM_ALLOC, stream>>>(p, tq, tdo, tk, tv);
    } else {
        using C = AttnBwdTile4<HD, 128, 64>;
        auto kdkdv = attention_backward_kernel4_dkdv<HD, 128, 64>;
        cudaCheck(cudaFuncSetAttribute(kdkdv, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)C::SMEM_ALLOC));
        kdkdv<<<grid_kv, C::THREADS, C::SMEM_ALLOC, stream>>>(p);
    }
    cudaCheck(cudaGetLastError());
}

// D (B, nh, T) = rowsum(dout * out); n_sem of kernel2's dQ semaphores (0 for the split kernels) set to 0
template <int HD>
void attention_backward_preprocess(float* D, int* dq_sem, const bf16* out, const bf16* dout, int B, int T, int nh, int64_t n_sem,
                                   cudaStream_t stream) {
    const int64_t rows = (int64_t)B * T * nh;
    const int block = 256;
    attention_backward_preprocess_kernel2<HD><<<(unsigned)((rows * (HD / 8) + block - 1) / block), block, 0, stream>>>(
        D, dq_sem, out, dout, B, T, nh, n_sem);
    cudaCheck(cudaGetLastError());
}

// The backward on other GPUs: preprocess (D, the dQ semaphores zeroed), then kernel2. scratch: kernel2's.
template <int HD, int BC, int BR, int MINB, bool DQ_PF>
void attention_backward_hd(bf16* dq, bf16* dk, bf16* dv, float* scratch, const bf16* dout, const bf16* q, const bf16* k,
                           const bf16* v, const bf16* out, const float* lse, const int* doc_start,
                           int B, int T, int nh, int nkv, cudaStream_t stream) {
    float* dq_accum = scratch;                                     // (B, T, nh, HD)
    float* D = scratch + (size_t)B * T * nh * HD;                  // (B, nh, T)
    int* dq_sem = reinterpret_cast<int*>(D + (size_t)B * nh * T);  // (B, nh, ceil(T / 16))
    attention_backward_preprocess<HD>(D, dq_sem, out, dout, B, T, nh, (int64_t)B * nh * ((T + ATTN_SEM_ROWS - 1) / ATTN_SEM_ROWS), stream);
    const float scale = 1.0f / sqrtf((float)HD);
    AttnBwdParams p{dq, dk, dv, dq_accum, dq_sem, D, dout, q, k, v, lse, doc_start, B, T, nh, nkv, scale, scale * 1.4426950408889634f};
    attention_backward_launch<HD, BC, BR, MINB, DQ_PF>(p, stream);
}

// The backward on Hopper: preprocess (D), then LAUNCH's dQ and dK/dV kernels (kernel4's or kernel6's).
// scratch: D (B, nh, T) alone.
template <int HD, void (*LAUNCH)(const AttnBwdParams&, cudaStream_t)>
void attention_backward_split_hd(bf16* dq, bf16* dk, bf16* dv, float* scratch, const bf16* dout, const bf16* q, const bf16* k,
                                 const bf16* v, const bf16* out, const float* lse, const int* doc_start,
                                 int B, int T, int nh, int nkv, cudaStream_t stream) {
    attention_backward_preprocess<HD>(scratch, nullptr, out, dout, B, T, nh, 0, stream);
    const float scale = 1.0f / sqrtf((float)HD);
    AttnBwdParams p{dq, dk, dv, nullptr, nullptr, scratch, dout, q, k, v, lse, doc_start, B, T, nh, nkv, scale, scale * 1.4426950408889634f};
    LAUNCH(p, stream);
}

// dq, dk, dv from dout, the forward's inputs, out and lse. scratch: attention_backward_scratch_bytes().
// Bitwise deterministic: the same inputs give the same dq, dk, dv bits on every run.
inline void attention_backward(bf16* dq, bf16* dk, bf16* dv, float* scratch, const bf16* dout, const bf16* q,
                               const bf16* k, const bf16* v, const bf16* out, const float* lse, const int* doc_start,
                               int B, int T, int nh, int nkv, int hd, cudaStream_t stream) {
    const void* ptrs[] = {dq, dk, dv, scratch, dout, q, k, v, out};
    attention_check_args(ptrs, 9, B, T, nh, nkv, hd);
    // hd 128 on Hopper: kernel6 as dev/cuda/attention_backward.cu's variant {stages, dq6, dkdv6, pingpong}:
    //   6a {2, 1, 1, 0}  6b {3, 1, 1, 0}  6c {2, 0, 1, 0}  6d {2, 1, 0, 0}  6e {2, 1, 1, 1}  6f {3, 1, 1, 1}
    // 6f, the fastest measured (H100, session 10; ms at llama3-8b's heads, 4 x 2048 / 1 x 16384 / 16384 packed 2k):
    //   4a 1.363 / 17.45 / 2.673   6a 1.163 / 14.65 / 2.239   6b 1.131 / 14.36 / 2.167   6f 1.060 / 13.82 / 2.064
    struct Bwd6 { int stages; bool dq6, dkdv6, pingpong; };
    constexpr Bwd6 bwd6 = {3, true, true, true};  // 6f
    // hd 64 on Hopper: 6f too (6f64; session 11, H100, llama3-1b heads, 4 x 2048, ms: 4a64 0.850, 6a64 0.779, 6c64 0.747,
    // 6f64 0.759, 6h64 0.753: 6c64 is 1.7% ahead of 6f64, the one timed in the trainer); elsewhere variants 2a (hd 128)
    // and 2c (hd 64)
    if (attention_backward_split(hd) && hd == 64)
        attention_backward_split_hd<64, attention_backward6_launch<64, bwd6.stages, bwd6.dq6, bwd6.dkdv6, bwd6.pingpong>>(
            dq, dk, dv, scratch, dout, q, k, v, out, lse, doc_start, B, T, nh, nkv, stream);
    else if (attention_backward_split(hd))
        attention_backward_split_hd<128, attention_backward6_launch<128, bwd6.stages, bwd6.dq6, bwd6.dkdv6, bwd6.pingpong>>(
            dq, dk, dv, scratch, dout, q, k, v, out, lse, doc_start, B, T, nh, nkv, stream);
    else if (hd == 64) attention_backward_hd<64, 128, 64, 1, true>(dq, dk, dv, scratch, dout, q, k, v, out, lse, doc_start, B, T, nh, nkv, stream);
    else attention_backward_hd<128, 128, 64, 1, true>(dq, dk, dv, scratch, dout, q, k, v, out, lse, doc_start, B, T, nh, nkv, stream);
}
