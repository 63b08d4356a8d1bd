// test/fuzz/fuzz_vocab.cpp: libFuzzer entry point for vocab_parse and the text <-> ids round trip.
// The body is fuzz_vocab() in targets.h, which test/test_fuzz_regress.cpp replays. Run: make fuzz
#include "targets.h"  // defines: fuzz_vocab

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) { return fuzz_vocab(data, size); }
