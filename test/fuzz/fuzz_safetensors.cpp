// test/fuzz/fuzz_safetensors.cpp: libFuzzer entry point for st_parse (one safetensors file) and what a model load does with it.
// The body is fuzz_safetensors() in targets.h, which test/test_fuzz_regress.cpp replays. Run: make fuzz
#include "targets.h"  // defines: fuzz_safetensors

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) { return fuzz_safetensors(data, size); }
