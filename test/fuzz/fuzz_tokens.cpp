// test/fuzz/fuzz_tokens.cpp: libFuzzer entry point for token_file_parse and the packing Loader.
// The body is fuzz_tokens() in targets.h, which test/test_fuzz_regress.cpp replays. Run: make fuzz
#include "targets.h"  // defines: fuzz_tokens

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) { return fuzz_tokens(data, size); }
