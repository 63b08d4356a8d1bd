// kernels/crossentropy.cuh: lm_head + cross entropy, fused and chunked so the (N, V) logits never
// exist in memory at once (for Llama 3, V = 128256: 2 GiB of bf16 per 8192 tokens, twice that in fp32).
//
// For each chunk of rows:
//   logits (rows, V) bf16 = h_chunk · Wᵀ              (matmul.cuh; bf16 like HF's logits, then .float())
//   per row, in fp32:  lse = log Σ exp(logits);  loss = lse - logits[target]      (target >= 0)
//   in place:          logits <- dlogits = (softmax - onehot(target)) * dloss    (bf16; 0 when ignored)
//   dh_chunk (rows, C) = dlogits · W                   (matmul.cuh)
// dloss is the caller's 1/denominator (1 / number of non-ignored targets of the whole optimizer step,
// transformers' num_items_in_batch), so the gradient needs no second pass.
//
// The row kernel: one 1024-thread block per row and one block per SM, so the ~130 rows in flight
// (33 MiB for V = 128256) stay in L2 between the two passes over a row; 4 independent 16-byte loads
// per thread in flight; an online max/sum-of-exp (exp2 with the log2(e) scale folded into one FMA)
// in pass 1, softmax and the gradient in pass 2. Per-row losses go to losses (N); their sum is taken
// by one block in a fixed order in double, so the loss is bitwise reproducible (no float atomics).
// Targets >= V are not read: the row counts as ignored and *bad_target records (max) row + 1.
// H100, V = 128256: the row kernel takes 244 us per 1040-row chunk (2.19 TB/s counting one read
// and one write of the logits); the whole classifier, N = 8192, C = 4096, runs at 709 TFLOP/s,
// i.e. at the speed of its two GEMMs (dev/cuda/crossentropy.cu).
#pragma once
#include "common.cuh"    // defines: bf16, x128, load128, store128, cudaCheck
#include "matmul.cuh"    // defines: MatmulCtx, matmul

static const float CE_LOG2E = 1.4426950408889634f;
static const int CE_THREADS = 1024, CE_UNROLL = 4;
static const size_t CE_DEFAULT_SCRATCH = 256u << 20;   // 256 MiB of bf16 logits per chunk

struct MaxSum { float m, s; };   // running max and Σ exp(x - m)
__device__ __forceinline__ MaxSum maxsum_combine(MaxSum a, MaxSum b) {
    float m = fmaxf(a.m, b.m);
    if (m == -INFINITY) return {m, 0.0f};
    return {m, a.s * exp2f((a.m - m) * CE_LOG2E) + b.s * exp2f((b.m - m) * CE_LOG2E)};
}
__device__ __forceinline__ MaxSum block_reduce_maxsum(MaxSum v) {
    __shared__ float sm[32], ss[32];
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int o = 16; o > 0; o >>= 1)
        v = maxsum_combine(v, {__shfl_xor_sync(0xffffffffu, v.m, o), __shfl_xor_sync(0xffffffffu, v.s, o)});
    if (lane == 0) { sm[warp] = v.m; ss[warp] = v.s; }
    __syncthreads();
    v = lane < (int)(blockDim.x >> 5) ? MaxSum{sm[lane], ss[lane]} : MaxSum{-INFINITY, 0.0f};
    for (int o = 16; o > 0; o >>= 1)
        v = maxsum_combine(v, {__shfl_xor_sync(0xffffffffu, v.m, o), __shfl_xor_sync(0xffffffffu, v.s, o)});
    return v;
}

// Kernel 2 of dev/cuda/crossentropy.cu. One block per row; V % 8 == 0.
template <bool GRAD>
__global__ void __launch_bounds__(CE_THREADS, 1) crossentropy_kernel2(
        bf16* logits,                        // (rows, V) bf16 in: logits, out: dlogits (GRAD)
        float* __restrict__ losses,          // (rows) fp32 out: -log softmax[target], 0 if ignored
        int* __restrict__ bad_target,        // (1) out: max(row + 1) over rows with target >= V
        const int* __restrict__ targets,     // (rows) target id, < 0 = ignored
        float dloss, int V, int row0) {      // row0: index of this chunk's first row (for bad_target)
    int row = blockIdx.x;
    bf16* x = logits + (size_t)row * V;
    int target = targets[row];
    if (target >= V) { if (threadIdx.x == 0) atomicMax(bad_target, row0 + row + 1); target = -1; }
    int nv = V / 8;

    MaxSum acc = {-INFINITY, 0.0f};
    for (int v0 = threadIdx.x; v0 < nv; v0 += CE_THREADS * CE_UNROLL) {
        x128 buf[CE_UNROLL];
#pragma unroll
        for (int u = 0; u < CE_UNROLL; u++) if (v0 + u * CE_THREADS < nv) buf[u] = load128(x + 8 * (v0 + u * CE_THREADS));
#pragma unroll
        for (int u = 0; u < CE_UNROLL; u++) {
            if (v0 + u * CE_THREADS >= nv) break;
            float m = acc.m;
            for (int k = 0; k < 8; k++) m = fmaxf(m, bf2f(buf[u][k]));
            float ml = m * CE_LOG2E, s = acc.s * exp2f(acc.m * CE_LOG2E - ml);
            if (acc.m == -INFINITY) s = 0.0f;
            for (int k = 0; k < 8; k++) s += exp2f(fmaf(bf2f(buf[u][k]), CE_LOG2E, -ml));
            acc = {m, s};
        }
    }
    acc = block_reduce_maxsum(acc);
    float lse = acc.m + logf(acc.s);
    if (threadIdx.x == 0) losses[row] = target >= 0 ? lse - bf2f(x[target]) : 0.0f;
    if (!GRAD) return;
    __syncthreads();                                   // x[target] is read before anyone overwrites it
    float lsel = lse * CE_LOG2E, scale = target >= 0 ? dloss : 0.0f;
    for (int v0 = threadIdx.x; v0 < nv; v0 += CE_THREADS * CE_UNROLL) {
        x128 buf[CE_UNROLL];
#pragma unroll
        for (int u = 0; u < CE_UNROLL; u++) if (v0 + u * CE_THREADS < nv) buf[u] = load128(x + 8 * (v0 + u * CE_THREADS));
#pragma unroll
        for (int u = 0; u < CE_UNROLL; u++) {
            int v = v0 + u * CE_THREADS;
            if (v >= nv) break;
            x128 o;
            for (int k = 0; k < 8; k++) {
                float p = exp2f(fmaf(bf2f(buf[u][k]), CE_LOG2E, -lsel));
                o[k] = f2bf((p - (8 * v + k == target ? 1.0f : 0.0f)) * scale);
            }
            store128(x + 8 * v, o);
        }
    }
}

// loss_sum (1) = Σ losses (N), in double, in a fixed order
__global__ void loss_sum_kernel(float* __restrict__ loss_sum, const float* __restrict__ losses, int N) {
    double s = 0.0;
    for (int i = threadIdx.x; i < N; i += blockDim.x) s += (double)losses[i];
    s = block_reduce_sum(s);
    if (threadIdx.x == 0) *loss_sum = (float)s;
}

// ---------------------------------------------------------------------------------------------
// launchers

// bytes of scratch for a chunk of rows_per_chunk rows: the bf16 logits
inline size_t ce_scratch_bytes(int rows_per_chunk, int V) { return ((size_t)rows_per_chunk * V * sizeof(bf16) + 255) & ~(size_t)255; }
// rows per chunk so that the scratch stays within CE_DEFAULT_SCRATCH (1040 rows, 254 MiB, for V = 128256)
inline int ce_default_rows(int V) { int r = (int)(CE_DEFAULT_SCRATCH / ((size_t)V * sizeof(bf16))) / 8 * 8; return r < 8 ? 8 : r; }

// losses (rows) fp32 and, in place, logits (rows, V) -> dlogits when grad; bad_target as above
inline void crossentropy_forward_backward(bf16* logits, float* losses, int* bad_target, const int* targets, float dloss,
                                          int rows, int V, int row0, bool grad, cudaStream_t stream) {
    kernel_assert(V % 8 == 0, "crossentropy: vocab size %d must be a multiple of 8 (pad the lm_head)", V);
    kernel_assert(is_aligned16(logits), "crossentropy: logits must be 16-byte aligned");
    if (grad) crossentropy_kernel2<true><<<rows, CE_THREADS, 0, stream>>>(logits, losses, bad_target, targets, dloss, V, row0);
    else crossentropy_kernel2<false><<<rows, CE_THREADS, 0, stream>>>(logits, losses, bad_target, targets, dloss, V, row0);
    cudaCheck(cudaGetLastError());
}

// The fused classifier, on ctx.stream:
//   loss_sum (1) fp32      Σ over rows of losses (not divided: the caller knows the denominator)
//   losses (N) fp32        per-row loss, 0 where targets < 0
//   dh (N, C) bf16         d(Σ loss * dloss)/dh, or nullptr for a forward-only (eval) pass
//   bad_target (1) int     set to (max) row + 1 of any target >= V; the caller zeroes it and checks it
//   h (N, C) bf16, W (V, C) bf16 (lm_head), targets (N) int, dloss = 1 / denominator
//   scratch: ce_scratch_bytes(rows_per_chunk, V) bytes; rows_per_chunk = ce_default_rows(V) if <= 0
inline void fused_classifier(float* loss_sum, float* losses, bf16* dh, int* bad_target,
                             const bf16* h, const bf16* W, const int* targets, float dloss,
                             int N, int C, int V, void* scratch, size_t scratch_bytes, int rows_per_chunk, MatmulCtx& ctx) {
    if (rows_per_chunk <= 0) rows_per_chunk = ce_default_rows(V);
    kernel_assert(ce_scratch_bytes(rows_per_chunk, V) <= scratch_bytes, "fused_classifier: scratch of %zu bytes is too "
                  "small for %d rows of V=%d (need ce_scratch_bytes = %zu)", scratch_bytes, rows_per_chunk, V,
                  ce_scratch_bytes(rows_per_chunk, V));
    kernel_assert(C % 8 == 0, "fused_classifier: C=%d must be a multiple of 8", C);
    bf16* logits = (bf16*)scratch;                        // (rows_per_chunk, V): logits, then dlogits
    for (int r0 = 0; r0 < N; r0 += rows_per_chunk) {
        int rows = N - r0 < rows_per_chunk ? N - r0 : rows_per_chunk;
        gemm_forward(ctx, logits, h + (size_t)r0 * C, W, rows, V, C);                        // logits = h·Wᵀ
        crossentropy_forward_backward(logits, losses + r0, bad_target, targets + r0, dloss, rows, V, r0, dh != nullptr, ctx.stream);
        if (dh) gemm_input_grad(ctx, dh + (size_t)r0 * C, logits, W, rows, C, V);           // dh = dlogits·W
    }
    loss_sum_kernel<<<1, 1024, 0, ctx.stream>>>(loss_sum, losses, N);
    cudaCheck(cudaGetLastError());
}
