// test_dataloader.cpp: token files (dataloader.h) and the packing loader.
//   - the packed rows hold the documents in the shuffled order, split across rows where needed,
//     with positions restarting per segment and targets = next token of the same document;
//   - packed equals unpacked: per-token losses of the CPU reference on a packed row are those of
//     each document run alone;
//   - resume: a loader restarted from a saved position continues with identical batches;
//   - hostile files: every corruption ends in a clean error naming the file.
#include "../qlora.h"       // defines: Config, LoraConfig, lora_init
#include "../dataloader.h"  // defines: TokenFile, Loader, token_file_write
#include "../reference.h"   // defines: RefModel, ref_forward
#include "test.h"           // defines: check, expect_error, test_summary

static const std::string TMP_DIR = "build/tmp_dataloader";

int main() {
    ql_assert(system(("rm -rf " + TMP_DIR + " && mkdir -p " + TMP_DIR).c_str()) == 0, "mkdir %s", TMP_DIR.c_str());
    // 5 documents of lengths 3, 0, 7, 2, 5 (one empty); mask: the first token of each document is context
    std::vector<uint64_t> starts = {0, 3, 3, 10, 12};
    std::vector<uint32_t> tok; std::vector<uint8_t> mask;
    for (uint32_t i = 0; i < 17; i++) tok.push_back(10 + i);
    for (uint64_t i = 0; i < 17; i++) mask.push_back(std::find(starts.begin(), starts.end(), i) == starts.end());
    std::string path = TMP_DIR + "/a.tok";
    token_file_write(path, tok, &mask, starts, 64);
    TokenFile f; token_file_open(f, path, 64);
    check(f.n_tokens == 17 && f.n_docs == 5 && f.vocab == 64 && f.mask, "token file round trip: 17 tokens, 5 documents, mask");

    // unshuffled packing: rows of T=6, B=2 -> the stream 10..26 cut into segments
    Loader ld; ld.init(&f, 1, false);
    Batch b; ld.next(b, 2, 6);
    std::vector<int> ids = {10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21};
    std::vector<int> pos = {0, 1, 2, 0, 1, 2, 0, 1, 2, 3, 0, 1};                 // doc 2 (13..19) split: the rest restarts at 0
    std::vector<int> ds = {0, 0, 0, 3, 3, 3, 0, 0, 0, 0, 4, 4};
    std::vector<int> tg = {11, 12, -1, 14, 15, 16, 17, 18, 19, -1, 21, -1};      // 13, 20, 22 are first tokens: context only
    check(b.ids == ids && b.pos == pos && b.doc_start == ds && b.targets == tg,
          "packing: documents back to back, split across rows, positions restart, targets cross the split");
    ld.next(b, 2, 6);
    check(b.ids[0] == 22 && b.ids[4] == 26 && b.ids[5] == 10 && b.pos[5] == 0 && b.doc_start[5] == 5 && ld.st.epoch == 1,
          "packing wraps into the next epoch (ids %d..%d then %d)", b.ids[0], b.ids[4], b.ids[5]);

    // shuffled: deterministic per (seed, epoch), different across epochs, and resumable
    Loader s1; s1.init(&f, 42, true);
    std::vector<Batch> run(8); LoaderState at;
    for (int i = 0; i < 8; i++) { if (i == 3) at = s1.st; s1.next(run[i], 2, 5); }
    Loader s2; s2.init(&f, 42, true, at);
    bool same = true; for (int i = 3; i < 8; i++) { Batch x; s2.next(x, 2, 5); same &= x.ids == run[i].ids && x.targets == run[i].targets && x.pos == run[i].pos; }
    check(same, "resume: a loader started from the saved position (epoch %llu, cursor %llu, offset %llu) gives the same batches",
          (unsigned long long)at.epoch, (unsigned long long)at.cursor, (unsigned long long)at.offset);
    Loader e0; e0.init(&f, 42, true); std::vector<uint64_t> o0 = e0.order; e0.st.epoch = 1; e0.make_order();
    Loader e1; e1.init(&f, 42, true);
    check(o0 == e1.order && o0 != e0.order, "shuffle: same seed same order, next epoch a new order");

    // packed == unpacked through the CPU reference: one row with docs 2 and 4 vs each alone
    Config c; c.dim = 32; c.hidden_dim = 48; c.n_layers = 2; c.n_heads = 4; c.n_kv_heads = 2; c.head_dim = 8; c.vocab_size = 64; c.max_seq_len = 64;
    c.norm_eps = 1e-5f;
    RefModel m; ref_model_alloc(m, c);
    for (size_t i = 0; i < m.mem.size(); i++) m.mem[i] = 0.1f * (2.0f * rng_uniform(9, 0, i) - 1.0f);
    for_each_weight(c, [&](const Weight& w) { if (w.shape.size() == 1) std::fill_n(m.w.at(w.id, w.layer), w.numel(), 1.0f); });   // norms 1
    LoraConfig lc; lc.rank = 4; std::vector<float> lora(lora_num_params(c, lc)); lora_init(lora.data(), c, lc, 3);
    for (int l = 0; l < c.n_layers; l++) for (int p = 0; p < N_PROJ; p++) { LoraSlot s = lora_slot(c, lc, l, p);
        for (int i = 0; i < proj_out(c, p) * lc.rank; i++) lora[s.b + i] = 0.05f * (rng_uniform(4, p, i) - 0.5f); }
    std::vector<uint64_t> st2 = {0, 7};
    std::vector<uint32_t> t2(tok.begin() + 3, tok.begin() + 10); t2.insert(t2.end(), tok.begin() + 12, tok.end());
    token_file_write(TMP_DIR + "/b.tok", t2, nullptr, st2, 64);
    TokenFile fb; token_file_open(fb, TMP_DIR + "/b.tok", 64);
    Loader lp; lp.init(&fb, 0, false); Batch packed; lp.next(packed, 1, 12);
    auto run_ref = [&](const Batch& x) {
        RefActs<float> a; ref_acts_alloc(a, c, lc, x.B, x.T);
        RefBatch rb; rb.inputs = x.ids.data(); rb.targets = x.targets.data(); rb.B = x.B; rb.T = x.T; rb.denom = 1.0f;
        rb.pos = x.pos.data(); rb.doc_start = x.doc_start.data();
        ref_forward(m, lc, lora.data(), a, rb);
        return a.losses;
    };
    std::vector<float> lp_losses = run_ref(packed), alone;
    for (int d = 0; d < 2; d++) {
        Batch x; x.B = 1; x.T = d ? 5 : 7;
        for (int i = 0; i < x.T; i++) { int src = (d ? 7 : 0) + i; x.ids.push_back((int)t2[src]); x.pos.push_back(i); x.doc_start.push_back(0);
                                        x.targets.push_back(i + 1 < x.T ? (int)t2[src + 1] : -1); }
        std::vector<float> l = run_ref(x); alone.insert(alone.end(), l.begin(), l.end());
    }
    check_close("packed row == documents alone (per-token loss)", lp_losses.data(), alone.data(), alone.size(), 0.0, 0.0);

    // hostile files
    std::vector<uint8_t> good = read_file(path);
    auto bad = [&](const char* name, std::function<void(std::vector<uint8_t>&)> edit, std::vector<std::string> want) {
        std::vector<uint8_t> b2 = good; edit(b2);
        std::string p2 = TMP_DIR + "/bad" + std::to_string(g_pass + g_fail) + ".tok";
        FILE* fp = fopen(p2.c_str(), "wb"); ql_assert(fp && fwrite(b2.data(), 1, b2.size(), fp) == b2.size() && fclose(fp) == 0, "write");
        want.push_back(p2);
        expect_error(name, [p2] { TokenFile t; token_file_open(t, p2, 64); }, want);
    };
    bad("bad magic", [](std::vector<uint8_t>& x) { x[0] = 'X'; }, {"not a qlora token file"});
    bad("newer version", [](std::vector<uint8_t>& x) { x[8] = 2; }, {"version 2"});
    bad("truncated", [](std::vector<uint8_t>& x) { x.resize(x.size() - 9); }, {"truncated or corrupt"});
    bad("token count overflow", [](std::vector<uint8_t>& x) { x[23] = 0x40; }, {"implausible sizes"});
    bad("token >= vocab", [](std::vector<uint8_t>& x) { x[64 + 4 * 5] = 200; }, {"token 5 is 200"});
    bad("documents out of order", [&](std::vector<uint8_t>& x) { size_t at = x.size() - 8 * 6 + 8 * 2; x[at] = 11; }, {"ends before it starts"});
    bad("vocab larger than model", [](std::vector<uint8_t>& x) { x[33] = 1; }, {"the model has 64"});
    return test_summary();
}
