// kernels/matmul.cuh: bf16 GEMMs through cuBLASLt, fp32 accumulation, row-major semantics.
//
//   C (M, N) = alpha * op(A) · op(B) + beta * C        op(A) (M, K), op(B) (K, N)
//   A is stored (M, K) row-major, or (K, M) when trans_a;  B is stored (K, N), or (N, K) when trans_b
//   C is bf16 or fp32 (beta = 1 accumulates into it: gradient accumulation into fp32 grads)
//
// Row-major onto cuBLAS's column-major: a row-major (R, C) matrix is the column-major (C, R)
// matrix with the same bytes, i.e. its transpose. So we ask cuBLASLt for Cᵀ (N, M) = op(B)ᵀ · op(A)ᵀ:
// its first operand is our B (column-major (N, K) with ld N when !trans_b, or the transpose of the
// column-major (K, N), ld K, when trans_b), its second is our A likewise, and ld(C) = N. No copies.
//
// The callers (N tokens, in/out features, r = LoRA rank, s = LoRA scale), through the named
// wrappers at the end of this file:
//   frozen forward   y  = x·Wᵀ          gemm_forward(y, x, W, N, out, in)
//   input grad       dx = dy·W          gemm_input_grad(dx, dy, W, N, in, out)
//   LoRA down        u  = x·Aᵀ          A (r, in): trans_b
//   LoRA up          y  = s·u·Bᵀ        B (out, r): trans_b, alpha = s; then the frozen GEMM adds
//                                       x·Wᵀ into it with beta = 1 (u: a column slice, lda = g·r)
//   grad B           dB += s·dyᵀ·u      (out, r) fp32: gemm_weight_grad (trans_a, beta = 1)
//   grad A           dA += s·(dy·B)ᵀ·x  (r, in) fp32: t = dy·B first, then gemm_weight_grad
//
// Rounding: with a bf16 C and beta != 0, cuBLASLt rounds alpha·op(A)·op(B) to bf16 before adding
// beta·C (measured on an H100, cuBLAS 13.0: 7104 of 7104 outputs bit-equal to bf16(bf16(a·AB) + C)):
// for `y += s·u·Bᵀ` that is exactly PEFT's `result + lora_out.to(bf16)`. fp32 C: one fp32 epilogue.
// Determinism: the algorithm for a shape is chosen once (the heuristic's first answer) and cached
// with its descriptors; split-K is allowed only with partial sums kept in fp32 in the workspace and
// reduced in a separate fixed step (CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE), which is also what keeps
// bf16 outputs from being accumulated in bf16. Same inputs, same bits, every call.
#pragma once
#include <map>              // defines: std::map (plan cache)
#include <tuple>            // defines: std::tuple (plan key)
#include "common.cuh"       // defines: bf16, cudaCheck, cublasCheck

enum MatmulOut { MM_BF16 = 0, MM_F32 = 1 };

struct MatmulPlan {
    cublasLtMatmulDesc_t op = nullptr;
    cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;   // cuBLAS's A (our B), B (our A), C
    cublasLtMatmulAlgo_t algo;
};

// One per stream that issues GEMMs: handle, workspace and the per-shape plans. Passed explicitly.
struct MatmulCtx {
    cublasLtHandle_t handle = nullptr;
    void* workspace = nullptr;                // (32 MiB) split-K partials
    size_t workspace_bytes = 0;
    cudaStream_t stream = 0;
    std::map<std::tuple<int, int, int, int, int, int, int, int, int, int, int, int>, MatmulPlan> plans;
};
static const size_t MATMUL_WORKSPACE_BYTES = 32u << 20;

inline void matmul_init(MatmulCtx& ctx, cudaStream_t stream) {
    cublasCheck(cublasLtCreate(&ctx.handle));
    ctx.workspace_bytes = MATMUL_WORKSPACE_BYTES;
    cudaCheck(cudaMalloc(&ctx.workspace, ctx.workspace_bytes));
    ctx.stream = stream;
}
inline void matmul_destroy(MatmulCtx& ctx) {
    for (auto& kv : ctx.plans) {
        MatmulPlan& p = kv.second;
        cublasCheck(cublasLtMatrixLayoutDestroy(p.a)); cublasCheck(cublasLtMatrixLayoutDestroy(p.b));
        cublasCheck(cublasLtMatrixLayoutDestroy(p.c)); cublasCheck(cublasLtMatmulDescDestroy(p.op));
    }
    ctx.plans.clear();
    if (ctx.workspace) cudaCheck(cudaFree(ctx.workspace));
    if (ctx.handle) cublasCheck(cublasLtDestroy(ctx.handle));
    ctx.workspace = nullptr; ctx.handle = nullptr;
}

// Largest power of two (up to 16) dividing the address and the row pitch: cuBLASLt picks kernels
// by the alignment it is promised, so the plan is keyed by it (odd LoRA ranks, chunk offsets).
inline uint32_t matmul_alignment(const void* p, int ld, int esize) {
    uint32_t a = 16;
    while (a > 1 && (((uintptr_t)p % a) != 0 || ((size_t)ld * esize) % a != 0)) a >>= 1;
    return a;
}

inline MatmulPlan& matmul_plan(MatmulCtx& ctx, int M, int N, int K, bool trans_a, bool trans_b, int out, bool accumulate,
                               uint32_t align, int lda, int ldb, int ldc, bool bias) {
    auto key = std::make_tuple(M, N, K, (int)trans_a, (int)trans_b, out, (int)accumulate, (int)align, lda, ldb, ldc, (int)bias);
    auto it = ctx.plans.find(key);
    if (it != ctx.plans.end()) return it->second;
    MatmulPlan p;
    cudaDataType_t ct = out == MM_F32 ? CUDA_R_32F : CUDA_R_16BF;
    cublasCheck(cublasLtMatmulDescCreate(&p.op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    cublasOperation_t opa = trans_b ? CUBLAS_OP_T : CUBLAS_OP_N, opb = trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
    cublasCheck(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_TRANSA, &opa, sizeof(opa)));
    cublasCheck(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_TRANSB, &opb, sizeof(opb)));
    if (bias) {   // + a bias per output feature (cuBLAS's rows), in the fp32 epilogue before the one rounding
        cublasLtEpilogue_t epi = CUBLASLT_EPILOGUE_BIAS;
        cudaDataType_t bt = CUDA_R_16BF;
        cublasCheck(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_EPILOGUE, &epi, sizeof(epi)));
        cublasCheck(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &bt, sizeof(bt)));
    }
    // column-major shapes of the stored matrices: our B is (N, K) [or (K, N) when trans_b], our A is
    // (K, M) [or (M, K) when trans_a], C is (N, M)
    cublasCheck(cublasLtMatrixLayoutCreate(&p.a, CUDA_R_16BF, trans_b ? K : N, trans_b ? N : K, ldb));
    cublasCheck(cublasLtMatrixLayoutCreate(&p.b, CUDA_R_16BF, trans_a ? M : K, trans_a ? K : M, lda));
    cublasCheck(cublasLtMatrixLayoutCreate(&p.c, ct, N, M, ldc));
    cublasLtMatmulPreference_t pref;
    cublasCheck(cublasLtMatmulPreferenceCreate(&pref));
    cublasCheck(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ctx.workspace_bytes, sizeof(size_t)));
    uint32_t scheme = CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE;
    cublasCheck(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK, &scheme, sizeof(scheme)));
    cublasCheck(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &align, sizeof(align)));
    cublasCheck(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &align, sizeof(align)));
    cublasCheck(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &align, sizeof(align)));
    cublasCheck(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &align, sizeof(align)));
    cublasLtMatmulHeuristicResult_t res; int found = 0;
    cublasCheck(cublasLtMatmulAlgoGetHeuristic(ctx.handle, p.op, p.a, p.b, p.c, p.c, pref, 1, &res, &found));
    cublasCheck(cublasLtMatmulPreferenceDestroy(pref));
    kernel_assert(found > 0, "cuBLASLt has no algorithm for M=%d N=%d K=%d trans_a=%d trans_b=%d out=%s",
                  M, N, K, trans_a, trans_b, out == MM_F32 ? "fp32" : "bf16");
    p.algo = res.algo;
    return ctx.plans.emplace(key, p).first->second;
}

// C (M, N) [bf16 or fp32, by out] = alpha * op(A) · op(B) + beta * C; A, B bf16. See the top of the file.
// lda, ldb, ldc: row pitches in elements of the stored matrices, 0 = packed (a column slice of a
// wider matrix, e.g. one projection's u inside the (N, 3r) u of q|k|v, passes the wide pitch).
// bias (N) bf16, optional: added to each row of alpha·op(A)·op(B) in fp32, before the rounding (F.linear's bias).
inline void matmul(MatmulCtx& ctx, void* C, int out, const bf16* A, const bf16* B, int M, int N, int K,
                   bool trans_a, bool trans_b, float alpha = 1.0f, float beta = 0.0f, int lda = 0, int ldb = 0, int ldc = 0,
                   const bf16* bias = nullptr) {
    kernel_assert(M > 0 && N > 0 && K > 0, "matmul: empty shape M=%d N=%d K=%d", M, N, K);
    kernel_assert(out == MM_BF16 || out == MM_F32, "matmul: unknown output type %d", out);
    int pa = trans_a ? M : K, pb = trans_b ? K : N;   // packed pitches
    lda = lda ? lda : pa; ldb = ldb ? ldb : pb; ldc = ldc ? ldc : N;
    kernel_assert(lda >= pa && ldb >= pb && ldc >= N, "matmul: pitch smaller than a row (lda %d ldb %d ldc %d)", lda, ldb, ldc);
    uint32_t align = matmul_alignment(A, lda, 2);
    uint32_t ab = matmul_alignment(B, ldb, 2), ac = matmul_alignment(C, ldc, out == MM_F32 ? 4 : 2);
    align = align < ab ? align : ab; align = align < ac ? align : ac;
    kernel_assert(align >= 2, "matmul: operands must be at least element-aligned");
    MatmulPlan& p = matmul_plan(ctx, M, N, K, trans_a, trans_b, out, beta != 0.0f, align, lda, ldb, ldc, bias != nullptr);
    if (bias) cublasCheck(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof(bias)));
    cublasCheck(cublasLtMatmul(ctx.handle, p.op, &alpha, B, p.a, A, p.b, &beta, C, p.c, C, p.c, &p.algo,
                               ctx.workspace, ctx.workspace_bytes, ctx.stream));
}

// ---------------------------------------------------------------------------------------------
// The three products of a linear layer y = x·Wᵀ, by name (N rows of tokens; W (out, in) as nn.Linear
// stores it; fp32 accumulation). Operands are row-major; a column slice of a wider matrix (one
// projection's u inside the (N, 3r) u of q|k|v) is passed as {pointer, pitch of the wide matrix}.
struct MatIn {
    const bf16* p;
    int ld;   // row pitch in elements, 0: packed
    MatIn(const bf16* p_, int ld_ = 0) : p(p_), ld(ld_) {}
};
struct MatOut {
    void* p;
    int ld;     // row pitch in elements, 0: packed
    int type;   // MM_BF16 or MM_F32, from the pointer's type
    MatOut(bf16* p_, int ld_ = 0) : p(p_), ld(ld_), type(MM_BF16) {}
    MatOut(float* p_, int ld_ = 0) : p(p_), ld(ld_), type(MM_F32) {}
};
// y (N, out) = alpha·x·Wᵀ (+ bias, in fp32 before the rounding) + beta·y      x (N, in), W (out, in), bias (out)
inline void gemm_forward(MatmulCtx& ctx, MatOut y, MatIn x, MatIn W, int N, int out, int in, float alpha = 1.0f, float beta = 0.0f,
                         const bf16* bias = nullptr) {
    matmul(ctx, y.p, y.type, x.p, W.p, N, out, in, false, true, alpha, beta, x.ld, W.ld, y.ld, bias);
}
// dx (N, in) = alpha·dy·W + beta·dx               dy (N, out), W (out, in)
inline void gemm_input_grad(MatmulCtx& ctx, MatOut dx, MatIn dy, MatIn W, int N, int in, int out, float alpha = 1.0f,
                            float beta = 0.0f) {
    matmul(ctx, dx.p, dx.type, dy.p, W.p, N, in, out, false, false, alpha, beta, dy.ld, W.ld, dx.ld);
}
// dW (out, in) fp32 += alpha·dyᵀ·x                dy (N, out), x (N, in)
inline void gemm_weight_grad(MatmulCtx& ctx, float* dW, MatIn dy, MatIn x, int out, int in, int N, float alpha = 1.0f) {
    matmul(ctx, dW, MM_F32, dy.p, x.p, out, in, N, true, false, alpha, 1.0f, dy.ld, x.ld);
}
