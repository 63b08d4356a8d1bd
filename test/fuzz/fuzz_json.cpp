// test/fuzz/fuzz_json.cpp: libFuzzer entry point for json_parse.
// The body is fuzz_json() in targets.h, which test/test_fuzz_regress.cpp replays. Run: make fuzz
#include "targets.h"  // defines: fuzz_json

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) { return fuzz_json(data, size); }
