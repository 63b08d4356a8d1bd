// test/fuzz/fuzz_bnb.cpp: libFuzzer entry point for bnb_checkpoint_validate + bnb_linear_load (a bitsandbytes 4-bit checkpoint).
// The body is fuzz_bnb() in targets.h, which test/test_fuzz_regress.cpp replays. Run: make fuzz
#include "targets.h"  // defines: fuzz_bnb

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) { return fuzz_bnb(data, size); }
