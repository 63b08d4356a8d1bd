// test/fuzz/fuzz_peft.cpp: libFuzzer entry point for peft_adapter_read (adapter_config.json + adapter_model.safetensors).
// The body is fuzz_peft() in targets.h, which test/test_fuzz_regress.cpp replays. Run: make fuzz
#include "targets.h"  // defines: fuzz_peft

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) { return fuzz_peft(data, size); }
