// kernels/adamw.cuh: global gradient norm (clipping, NaN/inf detection) and the AdamW update.
//
// torch.optim.AdamW (foreach off; _single_tensor_adamw) after clip_grad_norm_, per fp32 element:
//   g  = g * min(max_norm / (norm + 1e-6), 1)      clip_grad_norm_ (folded in as a grad scale)
//   p *= 1 - lr*wd
//   m  = m.lerp(g, 1-b1)  = m + (1-b1)*(g - m)      (torch's lerp; FMA as torch's kernel compiles it)
//   v  = v*b2 + (1-b2)*g*g                           (mul_ then addcmul_)
//   denom = sqrt(v) / sqrt(1 - b2^t) + eps
//   p  = p - (lr / (1 - b1^t)) * (m / denom)        (addcdiv_)
//   p_bf16 = bf16(p)                                 (the copy the forward uses)
// The step scalars are formed on the host in double, as Python does, then rounded to fp32.
// The norm is a deterministic two-pass reduction: a fixed number of blocks (independent of the GPU)
// each sum a fixed strided slice into a double partial, one block sums the partials in order.
// No float atomics, so the same grads give the same bits every run. A NaN/inf anywhere in the grads
// makes the norm non-finite: *nonfinite is set and adamw_update leaves every state untouched, so
// the caller can report the step and skip it.
#pragma once
#include <math.h>        // defines: pow, sqrt (host, double)
#include "common.cuh"    // defines: bf16, block_reduce_sum, cudaCheck

static const int NORM_BLOCKS = 1024, NORM_THREADS = 256;

// Hyperparameters as Python holds them (double): 1 - 0.999 in double rounds to 0.001f, while
// 1 - 0.999f would not, so the fp32 step scalars are derived from these.
struct AdamWConfig { double lr = 2e-4, beta1 = 0.9, beta2 = 0.999, eps = 1e-8, weight_decay = 0.0; };

__global__ void __launch_bounds__(NORM_THREADS) grad_norm_partial_kernel(double* __restrict__ partial,   // (NORM_BLOCKS)
                                                                          const float* __restrict__ g,   // (n)
                                                                          size_t n) {
    float s = 0.0f;
    for (size_t i = (size_t)blockIdx.x * NORM_THREADS + threadIdx.x; i < n; i += (size_t)NORM_BLOCKS * NORM_THREADS)
        s += g[i] * g[i];
    double b = block_reduce_sum((double)s);
    if (threadIdx.x == 0) partial[blockIdx.x] = b;
}
__global__ void grad_norm_final_kernel(float* __restrict__ norm, int* __restrict__ nonfinite, const double* __restrict__ partial) {
    double s = 0.0;
    for (int i = threadIdx.x; i < NORM_BLOCKS; i += blockDim.x) s += partial[i];
    s = block_reduce_sum(s);
    if (threadIdx.x == 0) {
        float r = (float)sqrt(s);
        *norm = r;
        if (!isfinite(r)) *nonfinite = 1;
    }
}

struct AdamWStep {   // per-step scalars, fp32 as the torch kernels see them
    float lr_decay;  // 1 - lr*wd
    float w1;        // 1 - b1 (lerp weight)
    float b2, w2;    // b2, 1 - b2
    float step_size; // lr / (1 - b1^t)
    float bc2_sqrt;  // sqrt(1 - b2^t)
    float eps, max_norm;
};

__global__ void adamw_kernel(float* __restrict__ p,          // (n) fp32 master params
                             bf16* __restrict__ p_bf16,      // (n) bf16 copy, or nullptr
                             float* __restrict__ m,          // (n) fp32 first moment
                             float* __restrict__ v,          // (n) fp32 second moment
                             const float* __restrict__ g,    // (n) fp32 grads
                             const float* __restrict__ norm, // (1) global grad norm, or nullptr (no clipping)
                             size_t n, AdamWStep s) {
    float scale = 1.0f;
    if (norm) {
        float nv = *norm;
        if (!isfinite(nv)) return;                             // flagged by grad_norm: skip the step
        if (s.max_norm > 0.0f) { float c = s.max_norm / (nv + 1e-6f); if (c < 1.0f) scale = c; }
    }
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        float gi = scale != 1.0f ? g[i] * scale : g[i];
        float pi = p[i] * s.lr_decay;
        float mi = m[i], vi = v[i];
        mi = s.w1 < 0.5f ? fmaf(s.w1, gi - mi, mi) : fmaf(-(gi - mi), 1.0f - s.w1, gi);   // at::lerp
        vi = fmaf(s.w2 * gi, gi, vi * s.b2);
        float denom = sqrtf(vi) / s.bc2_sqrt + s.eps;
        pi = fmaf(-s.step_size, mi / denom, pi);
        p[i] = pi; m[i] = mi; v[i] = vi;
        if (p_bf16) p_bf16[i] = f2bf(pi);
    }
}

// ---------------------------------------------------------------------------------------------
// launchers

inline size_t grad_norm_scratch_bytes() { return NORM_BLOCKS * sizeof(double); }

// norm (1) fp32 = ||g (n)||_2; nonfinite (1) int set to 1 if the norm is NaN/inf (never cleared here);
// scratch: grad_norm_scratch_bytes()
inline void grad_norm(float* norm, int* nonfinite, const float* g, size_t n, void* scratch, cudaStream_t stream) {
    grad_norm_partial_kernel<<<NORM_BLOCKS, NORM_THREADS, 0, stream>>>((double*)scratch, g, n);
    cudaCheck(cudaGetLastError());
    grad_norm_final_kernel<<<1, 1024, 0, stream>>>(norm, nonfinite, (const double*)scratch);
    cudaCheck(cudaGetLastError());
}

// One AdamW step t (1-based) over n params; norm (device, from grad_norm) or nullptr; max_norm <= 0
// disables clipping (the norm still gates a non-finite step).
inline void adamw_update(float* p, bf16* p_bf16, float* m, float* v, const float* g, const float* norm, float max_norm,
                         size_t n, const AdamWConfig& cfg, int t, cudaStream_t stream) {
    kernel_assert(t >= 1, "adamw_update: step %d must be >= 1", t);
    double lr = cfg.lr, b1 = cfg.beta1, b2 = cfg.beta2;
    AdamWStep s;
    s.lr_decay = (float)(1.0 - lr * cfg.weight_decay);
    s.w1 = (float)(1.0 - b1);
    s.b2 = (float)b2; s.w2 = (float)(1.0 - b2);
    s.step_size = (float)(lr / (1.0 - pow(b1, (double)t)));
    s.bc2_sqrt = (float)sqrt(1.0 - pow(b2, (double)t));
    s.eps = (float)cfg.eps; s.max_norm = max_norm;
    int grid = (int)ceil_div<size_t>(n, 256);
    if (grid > 2048) grid = 2048;                               // grid-stride beyond that
    if (grid < 1) grid = 1;
    adamw_kernel<<<grid, 256, 0, stream>>>(p, p_bf16, m, v, g, norm, n, s);
    cudaCheck(cudaGetLastError());
}
