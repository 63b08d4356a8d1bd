// dev/cuda/pcie_copy.cu: the host link's rates, the number issue 15's offload arithmetic rests on (METHOD.md:
// predict the PCIe time per layer before building). Pinned host memory <-> device, one direction at a time
// and both at once (two streams, as the trainer's copy stream and a second would), per copy size from a
// residual checkpoint at llama3-8b 4 x 2048 (64 MiB) to a whole layer's saved activations (~1 GiB).
//
//   nvcc -std=c++17 -O3 -gencode arch=compute_90a,code=sm_90a dev/cuda/pcie_copy.cu -o build/pcie_copy
//   ./build/pcie_copy
//
// Prediction (H100 SXM on PCIe Gen5 x16, 64 GB/s raw a direction): ~50-55 GB/s one way, ~45-50 each way
// both at once (~100 total).
// Measured (H100 80GB HBM3, 2026-12-07): 55.4-55.6 GB/s H2D, 55.1-55.4 D2H, 49.5-50.9 each way both at once,
// the same from 64 MiB to 1 GiB.
#include <cstdio>
#include "timing.h"   // defines: median_ms, cudaCheck

int main() {
    cudaDeviceProp prop; cudaCheck(cudaGetDeviceProperties(&prop, 0));
    printf("%s, PCI bus %d, device %d\n", prop.name, prop.pciBusID, prop.pciDeviceID);
    const size_t max = (size_t)1 << 30;
    void *h, *d0, *d1, *h1;
    cudaCheck(cudaMallocHost(&h, max)); cudaCheck(cudaMallocHost(&h1, max));
    cudaCheck(cudaMalloc(&d0, max)); cudaCheck(cudaMalloc(&d1, max));
    cudaCheck(cudaMemset(d0, 1, max)); cudaCheck(cudaMemset(d1, 2, max));
    cudaStream_t s1; cudaCheck(cudaStreamCreateWithFlags(&s1, cudaStreamNonBlocking));
    cudaEvent_t fork, join; cudaCheck(cudaEventCreateWithFlags(&fork, cudaEventDisableTiming));
    cudaCheck(cudaEventCreateWithFlags(&join, cudaEventDisableTiming));
    printf("%10s %12s %12s %22s\n", "MiB", "H2D GB/s", "D2H GB/s", "both at once GB/s each");
    for (size_t n = (size_t)64 << 20; n <= max; n *= 4) {
        const float h2d = median_ms([&] { cudaCheck(cudaMemcpyAsync(d0, h, n, cudaMemcpyHostToDevice, 0)); }, 2, 10);
        const float d2h = median_ms([&] { cudaCheck(cudaMemcpyAsync(h, d0, n, cudaMemcpyDeviceToHost, 0)); }, 2, 10);
        const float both = median_ms([&] {   // D2H on the default stream, H2D on s1, joined back
            cudaCheck(cudaEventRecord(fork, 0)); cudaCheck(cudaStreamWaitEvent(s1, fork));
            cudaCheck(cudaMemcpyAsync(d1, h1, n, cudaMemcpyHostToDevice, s1));
            cudaCheck(cudaMemcpyAsync(h, d0, n, cudaMemcpyDeviceToHost, 0));
            cudaCheck(cudaEventRecord(join, s1)); cudaCheck(cudaStreamWaitEvent(0, join));
        }, 2, 10);
        printf("%10zu %12.1f %12.1f %22.1f\n", n >> 20, n / (h2d * 1e6), n / (d2h * 1e6), n / (both * 1e6));
    }
    cudaCheck(cudaFreeHost(h)); cudaCheck(cudaFreeHost(h1)); cudaCheck(cudaFree(d0)); cudaCheck(cudaFree(d1));
    return 0;
}
