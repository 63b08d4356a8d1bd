// dev/cuda/timing.h: the playgrounds' timer: median of `reps` runs of f (CUDA events on the default
// stream) after `warmup` untimed ones, in milliseconds.
#pragma once
#include <algorithm>                // defines: std::sort
#include <vector>                   // defines: std::vector
#include "../../kernels/common.cuh" // defines: cudaCheck

template <class F>
inline float median_ms(F&& f, int warmup = 3, int reps = 20) {
    static cudaEvent_t e0 = nullptr, e1 = nullptr;
    if (!e0) { cudaCheck(cudaEventCreate(&e0)); cudaCheck(cudaEventCreate(&e1)); }
    for (int i = 0; i < warmup; i++) f();
    std::vector<float> ts;
    for (int i = 0; i < reps; i++) {
        cudaCheck(cudaEventRecord(e0)); f(); cudaCheck(cudaEventRecord(e1)); cudaCheck(cudaEventSynchronize(e1));
        float ms; cudaCheck(cudaEventElapsedTime(&ms, e0, e1)); ts.push_back(ms);
    }
    std::sort(ts.begin(), ts.end());
    return ts[ts.size() / 2];
}
