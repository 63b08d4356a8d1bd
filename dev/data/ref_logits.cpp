// ref_logits.cpp: the logits of the CPU reference (reference.h) for one token sequence, so that a
// script can hold them against another implementation's (dev/data/check_smollm2.py: transformers).
//   g++ -std=c++17 -O2 -pthread -I. -o build/ref_logits dev/data/ref_logits.cpp
//   build/ref_logits MODEL IDS.bin OUT.bin [--dense]
// IDS.bin: int32 token ids (one row). OUT.bin: float32 logits (T, V), row-major.
// Default: the model as the trainer sees it (decoder linears NF4-quantized as bitsandbytes does, then
// dequantized); --dense: every weight exactly as stored in the checkpoint (fp32 of its bf16).
// Run from the repository root (the NF4 path reads data/rcp_delta.bin).
#include "reference.h"   // defines: RefModel, ref_model_load, ref_model_alloc, ref_model_fill_dense, RefBatch, RefActs, ref_forward
#include <cstdio>        // defines: fopen, fread, fwrite
#include <cstring>       // defines: strcmp

int main(int argc, char** argv) {
    if (argc < 4 || argc > 5 || (argc == 5 && strcmp(argv[4], "--dense"))) {
        fprintf(stderr, "usage: ref_logits MODEL IDS.bin OUT.bin [--dense]\n");
        return 2;
    }
    bool dense = argc == 5;
    RefModel m;
    if (dense) ref_model_load_dense(m, argv[1]);
    else { rcp_table_load("data/rcp_delta.bin"); ref_model_load(m, argv[1]); }
    const Config& c = m.cfg;

    FILE* f = fopen(argv[2], "rb");
    ql_assert(f, "%s: cannot open", argv[2]);
    std::vector<int> ids;
    int32_t x;
    while (fread(&x, 4, 1, f) == 1) {
        ql_assert(x >= 0 && x < c.vocab_size, "%s: token id %d out of range (vocab %d)", argv[2], x, c.vocab_size);
        ids.push_back(x);
    }
    fclose(f);
    int T = (int)ids.size();
    ql_assert(T > 0 && T <= c.max_seq_len, "%s: %d tokens (1 to %d)", argv[2], T, c.max_seq_len);

    std::vector<int> no_targets(T, -1);
    RefBatch b; b.inputs = ids.data(); b.targets = no_targets.data(); b.B = 1; b.T = T;
    LoraConfig none; none.targets = 0;
    RefActs<float> a; ref_acts_alloc(a, c, none, 1, T);
    ref_forward(m, none, (const float*)nullptr, a, b);

    FILE* o = fopen(argv[3], "wb");
    ql_assert(o, "%s: cannot write", argv[3]);
    ql_assert(fwrite(a.logits.data(), sizeof(float), a.logits.size(), o) == a.logits.size(), "%s: write failed", argv[3]);
    fclose(o);
    printf("%s (%s): %d tokens -> %s (%d x %d float32)\n", argv[1], dense ? "dense" : "NF4", T, argv[3], T, c.vocab_size);
    return 0;
}
