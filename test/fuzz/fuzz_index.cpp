// test/fuzz/fuzz_index.cpp: libFuzzer entry point for st_parse_index + shards + st_check_index (a sharded checkpoint).
// The body is fuzz_index() in targets.h, which test/test_fuzz_regress.cpp replays. Run: make fuzz
#include "targets.h"  // defines: fuzz_index

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) { return fuzz_index(data, size); }
