// test/fuzz/fuzz_config.cpp: libFuzzer entry point for config_from_json on parsed JSON.
// The body is fuzz_config() in targets.h, which test/test_fuzz_regress.cpp replays. Run: make fuzz
#include "targets.h"  // defines: fuzz_config

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) { return fuzz_config(data, size); }
