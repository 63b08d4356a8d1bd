// kernels/bias.cuh: a frozen linear's bias, y (N, C) = bf16(y + b), b (C) broadcast over the rows
// (Qwen2's q/k/v_proj; attention_bias). The frozen GEMM has written y = bf16(x·Wᵀ); PyTorch's
// F.linear adds the bias in the GEMM's fp32 epilogue before its one rounding, so ours is rounded
// twice: at most 1 bf16 ulp from it, inside the bf16 budgets of test_qlora's qwen2 variant. PEFT
// adds the LoRA output after (result + lora_out), as linears_forward does.
// Elementwise, 8 per thread with 16-byte vectors.
#pragma once
#include "common.cuh"   // defines: bf16, x128, load128, store128, cudaCheck, kernel_assert, is_aligned16

__global__ void add_bias_kernel1(bf16* y,         // (N, C) bf16 in and out
                                 const bf16* b,   // (C) bf16
                                 int64_t n, int C) {
    int64_t i = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) * 8;
    if (i >= n) return;
    x128 yv = load128(y + i), bv = load128(b + i % C), o;
    for (int k = 0; k < 8; k++) o[k] = f2bf(bf2f(yv[k]) + bf2f(bv[k]));
    store128(y + i, o);
}

inline void add_bias(bf16* y, const bf16* b, int N, int C, cudaStream_t stream) {
    kernel_assert(C % 8 == 0 && is_aligned16(y) && is_aligned16(b), "add_bias: C=%d must be a multiple of 8, pointers 16-byte aligned", C);
    int64_t n = (int64_t)N * C;
    int threads = 256;
    int64_t blocks = (n / 8 + threads - 1) / threads;
    add_bias_kernel1<<<(unsigned)blocks, threads, 0, stream>>>(y, b, n, C);
    cudaCheck(cudaGetLastError());
}
