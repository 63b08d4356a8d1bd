// test_train_cpu.cpp: the pieces of the CPU trainer (qlora_cpu.cpp) that `make train` relies on.
//   - the vocabulary table: a round trip, and every corruption ends in a clean error naming the file;
//   - options: defaults and clean errors;
//   - greedy decoding and exact-match accuracy on a hand-made model whose next token is known;
//   - validation loss counts every target of the file once, whole documents, whatever the batch shape;
//   - a step spread over 2 threads equals the same step on 1, with LoRA dropout too (3 threads);
//   - evaluation runs without dropout;
//   - the shipped data: the token files and vocabulary that dev/data/prepare.py made decode to the
//     task's text, a short run on them lowers the validation loss, and its PEFT adapter reads back
//     bit for bit (no Python needed).
#define QLORA_TESTING
#include "../qlora_cpu.cpp"  // defines: Vocab, vocab_parse, CpuTrainer, train_step, evaluate_loss, generate, accuracy
#include "test.h"            // defines: check, check_close, expect_error, test_summary

static const std::string TMP_DIR = "build/tmp_train_cpu";

// a vocabulary table as dev/data/prepare.py writes it
static std::vector<uint8_t> vocab_bytes(const std::vector<std::string>& s, const std::vector<uint8_t>& special, uint32_t bos, uint32_t eos) {
    std::vector<uint8_t> b(VOCAB_HEADER, 0);
    uint32_t n = (uint32_t)s.size(), h[6] = {VOCAB_VERSION, VOCAB_HEADER, n, bos, eos, 0};
    memcpy(b.data(), VOCAB_MAGIC, 8); memcpy(b.data() + 8, h, sizeof h);
    uint32_t off = 0;
    for (uint32_t i = 0; i <= n; i++) { b.insert(b.end(), (uint8_t*)&off, (uint8_t*)&off + 4); if (i < n) off += (uint32_t)s[i].size(); }
    b.insert(b.end(), special.begin(), special.end());
    for (auto& x : s) b.insert(b.end(), x.begin(), x.end());
    return b;
}

static void write_bytes(const std::string& path, const std::vector<uint8_t>& b) {
    FILE* fp = fopen(path.c_str(), "wb");
    ql_assert(fp && fwrite(b.data(), 1, b.size(), fp) == b.size() && fclose(fp) == 0, "cannot write %s", path.c_str());
}

static void test_vocab() {
    std::vector<std::string> s = {"<unk>", "<|end|>", "a", "b", " ", "\xc3\xa9", ""};
    std::vector<uint8_t> sp = {1, 1, 0, 0, 0, 0, 0};
    std::vector<uint8_t> good = vocab_bytes(s, sp, VOCAB_NONE, 1);
    Vocab v; vocab_parse(v, good.data(), good.size(), "good");
    check(v.str == s && v.special == sp && v.bos == VOCAB_NONE && v.eos == 1, "vocab table round trip (7 tokens, one empty, UTF-8 bytes)");
    check(v.decode({2, 4, 3, 1, 5}) == "a b\xc3\xa9" && v.decode({2, 1}, true) == "a<|end|>" && v.decode({99}) == "<?99>",
          "decode: special tokens hidden (or shown), ids outside the table marked");
    auto bad = [&](const char* name, std::function<void(std::vector<uint8_t>&)> edit, std::vector<std::string> want) {
        std::vector<uint8_t> b = good; edit(b);
        std::string p = TMP_DIR + "/bad" + std::to_string(g_pass + g_fail) + ".vocab";
        write_bytes(p, b);
        want.push_back(p);
        expect_error(name, [p] { Vocab x; vocab_load(x, p); }, want);
    };
    bad("vocab: empty file", [](std::vector<uint8_t>& b) { b.clear(); }, {"not a qlora vocabulary table", "prepare.py"});
    bad("vocab: bad magic", [](std::vector<uint8_t>& b) { b[2] = 'X'; }, {"not a qlora vocabulary table"});
    bad("vocab: newer version", [](std::vector<uint8_t>& b) { b[8] = 2; }, {"version 2", "prepare.py"});
    bad("vocab: header size", [](std::vector<uint8_t>& b) { b[12] = 40; }, {"header size 40"});
    bad("vocab: huge count", [](std::vector<uint8_t>& b) { b[19] = 0xff; }, {"implausible vocabulary size"});
    bad("vocab: count too large", [](std::vector<uint8_t>& b) { b[16] = 200; }, {"too short for 200 tokens"});
    bad("vocab: eos not a token", [](std::vector<uint8_t>& b) { b[24] = 7; }, {"eos 7 is not a token id"});
    bad("vocab: reserved field", [](std::vector<uint8_t>& b) { b[28] = 1; }, {"reserved"});
    bad("vocab: truncated", [](std::vector<uint8_t>& b) { b.pop_back(); }, {"truncated or corrupt"});
    bad("vocab: trailing bytes", [](std::vector<uint8_t>& b) { b.push_back(0); }, {"truncated or corrupt"});
    bad("vocab: offsets go back", [](std::vector<uint8_t>& b) { b[VOCAB_HEADER + 4 * 3] = 10; }, {"token 2 ends before it starts"});
    bad("vocab: an offset past the strings", [](std::vector<uint8_t>& b) { b[VOCAB_HEADER + 4 * 1 + 2] = 1; }, {"token 0 ends at string byte", "past the"});
    bad("vocab: unknown flag", [](std::vector<uint8_t>& b) { b[VOCAB_HEADER + 4 * 8 + 3] = 4; }, {"token 3 has unknown flags"});
    expect_error("vocab: missing file", [] { Vocab x; vocab_load(x, TMP_DIR + "/nope.vocab"); }, {"cannot open", "nope.vocab"});
}

// A model whose greedy next token is (last + 1) mod V: every decoder linear 0 (so each layer adds
// nothing and the residual stream is the embedding), embed[x] = one-hot(x), lm_head[y] = one-hot(y-1).
static void toy_successor_model(RefModel& m) {
    Config c; c.dim = 64; c.hidden_dim = 64; c.n_layers = 1; c.n_heads = 1; c.n_kv_heads = 1; c.head_dim = 64; c.vocab_size = 16;
    c.max_seq_len = 32; c.norm_eps = 1e-5f; c.tied = false;
    ref_model_alloc(m, c);
    for (int x = 0; x < c.vocab_size; x++) { m.w.at(W_EMBED)[x * c.dim + x] = 1.0f; m.w.at(W_LM_HEAD)[x * c.dim + (x + c.vocab_size - 1) % c.vocab_size] = 1.0f; }
    for_each_weight(c, [&](const Weight& w) { if (w.shape.size() == 1) std::fill_n(m.w.at(w.id, w.layer), w.numel(), 1.0f); });   // norms 1
}

static void test_greedy() {
    CpuTrainer t; t.o.threads = 2;
    toy_successor_model(t.m);
    t.lc.rank = 2; t.lora.assign(lora_num_params(t.m.cfg, t.lc), 0.0f); t.acts.resize(2);
    std::vector<int> got = generate(t.m, t.lc, t.lora.data(), t.acts[0], {3, 7}, 5, -1);
    check(got == std::vector<int>({8, 9, 10, 11, 12}), "greedy decoding of the successor model: 7 -> 8 9 10 11 12");
    got = generate(t.m, t.lc, t.lora.data(), t.acts[0], {13}, 10, 15);
    check(got == std::vector<int>({14, 15}), "generation stops after the end-of-turn token");
    got = generate(t.m, t.lc, t.lora.data(), t.acts[0], {0}, 100, -1);
    check(got.size() == 31, "generation stops at max_position_embeddings (%zu new tokens after 1)", got.size());
    std::vector<Example> ex = {{{1, 2}, {3, 4, 5}}, {{9}, {10}}, {{4}, {5, 7}}, {{4}, {5, 6, 7, 8}}, {{6}, {7, 8, 9, 10, 11, 12, 13}}, {{0}, {2}}};
    int right = accuracy(t, ex);
    check(right == 4, "exact-match accuracy: %d of 6 right (expected 4: answers 2 and 5 differ from the greedy ones)", right);
}

// a small random model for the loss and thread tests (all seven projections random, LoRA B nonzero)
static void random_trainer(CpuTrainer& t, int threads) {
    Config c; c.dim = 32; c.hidden_dim = 64; c.n_layers = 2; c.n_heads = 2; c.n_kv_heads = 1; c.head_dim = 16; c.vocab_size = 24;
    c.max_seq_len = 64; c.norm_eps = 1e-5f; c.tied = true;
    ref_model_alloc(t.m, c);
    for (size_t i = 0; i < t.m.mem.size(); i++) t.m.mem[i] = 0.2f * (2.0f * rng_uniform(11, 0, i) - 1.0f);
    for_each_weight(c, [&](const Weight& w) { if (w.shape.size() == 1) std::fill_n(t.m.w.at(w.id, w.layer), w.numel(), 1.0f); });   // norms 1
    t.o.threads = threads; t.o.batch = 4; t.o.seq = 16; t.o.clip = 1.0f; t.o.lr = 1e-2f;
    t.lc.rank = 4;
    size_t n = lora_num_params(c, t.lc);
    t.lora.resize(n); lora_init(t.lora.data(), c, t.lc, 5);
    for (int l = 0; l < c.n_layers; l++) for (int p = 0; p < N_PROJ; p++) { LoraSlot s = lora_slot(c, t.lc, l, p);
        for (int i = 0; i < proj_out(c, p) * t.lc.rank; i++) t.lora[s.b + i] = 0.1f * (rng_uniform(6, p, i) - 0.5f); }
    t.adam_m.assign(n, 0); t.adam_v.assign(n, 0); t.grad.assign(n, 0);
    t.grads.assign(threads, std::vector<float>(n)); t.acts.resize(threads);
}

static void test_loss_and_threads() {
    // 9 documents of lengths 1..17, context first then answer, as prepare.py writes chat examples
    std::vector<uint32_t> tok; std::vector<uint8_t> mask; std::vector<uint64_t> starts;
    for (int d = 0; d < 9; d++) {
        starts.push_back(tok.size());
        int len = 1 + 2 * d;
        for (int i = 0; i < len; i++) { tok.push_back(rng_u32(7, d, i) % 24); mask.push_back(i >= len / 2); }
    }
    std::string path = TMP_DIR + "/docs.tok";
    token_file_write(path, tok, &mask, starts, 24);
    TokenFile f; token_file_open(f, path, 24);
    CpuTrainer t; random_trainer(t, 2);
    // reference: each document alone, summed in double
    double sum = 0; long count = 0;
    for (int d = 0; d < 9; d++) {
        uint64_t b = f.doc(d), e = f.doc(d + 1);
        int T = (int)(e - b);
        std::vector<int> ids, tg;
        for (uint64_t i = b; i < e; i++) { ids.push_back((int)f.token(i)); tg.push_back(i + 1 < e && f.target(i + 1) ? (int)f.token(i + 1) : -1); }
        RefActs<float> a; ref_acts_alloc(a, t.m.cfg, t.lc, 1, T);
        RefBatch rb; rb.inputs = ids.data(); rb.targets = tg.data(); rb.B = 1; rb.T = T; rb.denom = 1.0f;
        sum += ref_forward(t.m, t.lc, t.lora.data(), a, rb); count += ref_count_targets(tg.data(), T);
    }
    float want = (float)(sum / count);
    int shapes[][2] = {{1, 17}, {4, 17}, {3, 20}, {2, 64}};   // the longest document has 17 tokens
    for (auto& s : shapes) {
        t.o.batch = s[0]; t.o.seq = s[1];
        float got = evaluate_loss(t, f);
        check_close(("val loss over B=" + std::to_string(s[0]) + " T=" + std::to_string(s[1]) + " == documents alone").c_str(), &got, &want, 1, 0, 2e-6);
    }
    size_t all = eval_batches(f, 1, 17).size(), capped = eval_batches(f, 1, 17, 2).size();
    check(all == 6 && capped == 2, "eval_batches: documents of 1, 3, .., 17 tokens in 6 rows of 17, none split (%zu), --eval-batches 2 keeps %zu", all, capped);

    // one step on 2 threads (rows split 2 + 2) == the same step on 1 thread
    CpuTrainer t1, t2; random_trainer(t1, 1); random_trainer(t2, 2);
    Loader l1, l2; l1.init(&f, 3, true); l2.init(&f, 3, true);
    float loss1 = 0, loss2 = 0, n1 = 0, n2 = 0;
    for (int step = 0; step < 3; step++) {
        Batch b1, b2; l1.next(b1, 4, 16); l2.next(b2, 4, 16);
        loss1 = train_step(t1, b1, step, 1e-2f, &n1); loss2 = train_step(t2, b2, step, 1e-2f, &n2);
    }
    check_close("3 steps on 2 threads == on 1: loss", &loss2, &loss1, 1, 0, 1e-5);
    check_close("3 steps on 2 threads == on 1: grad norm", &n2, &n1, 1, 0, 1e-5);
    check_close("3 steps on 2 threads == on 1: LoRA params", t2.lora.data(), t1.lora.data(), t1.lora.size(), 1e-6, 1e-4);

    // the same with LoRA dropout: the masks index the whole batch, so each row draws the same ones
    // whatever slice (thread) it is in; 3 threads split the 4 rows unevenly (1 + 1 + 2)
    CpuTrainer d1, d3; random_trainer(d1, 1); random_trainer(d3, 3);
    d1.lc.dropout = d3.lc.dropout = 0.3f;
    Loader m1, m3; m1.init(&f, 3, true); m3.init(&f, 3, true);
    float dl1 = 0, dl3 = 0, dn1 = 0, dn3 = 0, nodrop = 0, nn = 0;
    CpuTrainer z; random_trainer(z, 1);
    Loader mz; mz.init(&f, 3, true);
    for (int step = 0; step < 3; step++) {
        Batch b1, b3, bz; m1.next(b1, 4, 16); m3.next(b3, 4, 16); mz.next(bz, 4, 16);
        dl1 = train_step(d1, b1, step, 1e-2f, &dn1); dl3 = train_step(d3, b3, step, 1e-2f, &dn3); nodrop = train_step(z, bz, step, 1e-2f, &nn);
    }
    check_close("dropout 0.3, 3 steps on 3 threads == on 1: loss", &dl3, &dl1, 1, 0, 1e-5);
    check_close("dropout 0.3, 3 steps on 3 threads == on 1: LoRA params", d3.lora.data(), d1.lora.data(), d1.lora.size(), 1e-6, 1e-4);
    check(fabs(dl1 - nodrop) > 1e-3f, "dropout 0.3 moves the loss (%.6f, without %.6f): the check above compares masks", dl1, nodrop);
    // evaluation runs without dropout (PEFT's eval()): the same loss as the same adapter with dropout 0
    float e_drop = evaluate_loss(d1, f);
    d1.lc.dropout = 0.0f;
    float e_none = evaluate_loss(d1, f);
    check(e_drop == e_none, "evaluation ignores --dropout: val loss %.7f with dropout 0.3, %.7f with 0", e_drop, e_none);
}

// The shipped data (data/: made by dev/data/*.py) through the C++ side alone.
static void test_shipped() {
    const std::string base = "data/base", trn = "data/task/reverse.train.tok", val = "data/task/reverse.val.tok";
    if (!file_exists(base + "/model.safetensors") || !file_exists(trn) || !file_exists(val) || !file_exists(base + "/vocab.bin")) {
        check(false, "shipped data missing (data/base, data/task/reverse.*.tok): regenerate with dev/data/README.md");
        return;
    }
    Vocab v; vocab_load(v, base + "/vocab.bin");
    TokenFile tf, vf; token_file_open(tf, trn, 0); token_file_open(vf, val, 0);
    std::vector<Example> ex = examples_of(vf);
    bool shaped = !ex.empty();
    for (auto& x : ex) shaped &= !x.answer.empty() && x.answer.back() == (int)v.eos && x.prompt[0] == (int)v.bos;
    check(shaped && ex.size() == vf.n_docs, "val: %zu examples, each prompt starts with bos, each answer ends with the end of turn", ex.size());
    std::string p = v.decode(ex[0].prompt), a = v.decode(ex[0].answer);
    std::string word = p.substr(p.find(": ") + 2), rev(word.rbegin(), word.rend());
    check(p.rfind("reverse: ", 0) == 0 && a == rev && v.decode(ex[0].prompt, true).find("<|assistant|>") != std::string::npos,
          "decoded: \"%s\" -> \"%s\" (the chat template's markers are special tokens)", p.c_str(), a.c_str());

    // a short run lowers the validation loss (half the val file, to stay fast)
    CpuTrainer t;
    Options o; o.model = base; o.batch = 4; o.seq = 64; o.steps = 8; o.warmup = 0; o.lr = 3e-3f; o.threads = 2; o.lora.rank = 8;
    trainer_init(t, o);
    std::vector<uint32_t> vt; std::vector<uint8_t> vm; std::vector<uint64_t> vs;
    for (uint64_t d = 0; d < vf.n_docs / 2; d++) { vs.push_back(vt.size()); for (uint64_t i = vf.doc(d); i < vf.doc(d + 1); i++) { vt.push_back(vf.token(i)); vm.push_back(vf.target(i)); } }
    token_file_write(TMP_DIR + "/val_half.tok", vt, &vm, vs, vf.vocab);
    TokenFile vh; token_file_open(vh, TMP_DIR + "/val_half.tok", t.m.cfg.vocab_size);
    std::vector<Example> ex4(ex.begin(), ex.begin() + 4);
    Report before = report(t, "before", vh, ex4, &v);
    Loader ld; ld.init(&tf, o.seed, true); Batch b; float norm;
    for (int s = 0; s < o.steps; s++) { ld.next(b, o.batch, o.seq); train_step(t, b, s, lr_at(o, s), &norm); }
    Report after = report(t, "after", vh, ex4, &v);
    check(after.val_loss < before.val_loss - 0.1f && before.total == 4, "8 steps on the shipped task: val loss %.4f -> %.4f",
          before.val_loss, after.val_loss);
    peft_adapter_write(TMP_DIR + "/adapter", t.m.cfg, t.lc, t.lora.data(), base);
    LoraConfig lc2; std::vector<float> back;
    peft_adapter_read(TMP_DIR + "/adapter", t.m.cfg, lc2, back);
    check(lc2.rank == t.lc.rank && lc2.alpha == t.lc.alpha && lc2.targets == t.lc.targets && back.size() == t.lora.size(),
          "the adapter reads back: rank %d, alpha %g, the same targets", lc2.rank, lc2.alpha);
    check_bytes("the adapter reads back: LoRA parameters", back.data(), t.lora.data(), 4 * t.lora.size());
}

// generate.h: the next-token choice and prompt encoding that qlora.cu's generation shares
static void test_choose_and_encode() {
    float z[5] = {1.0f, 3.0f, 3.0f, -2.0f, 0.5f};
    check(choose_token(z, 5, 0.0f, 1.0f, 0.7f) == 1, "greedy: the largest logit, ties to the lower id");
    check(choose_token(z, 5, 1.0f, 1e-6f, 0.99f) == 1, "top-p ~0: the nucleus is the single most likely token");
    // p = (0.5, 0.3, 0.2): top-p 1 draws all three in proportion; top-p 0.6 keeps 0.5 and the 0.3 that crosses 0.6
    float w[3] = {logf(0.5f), logf(0.3f), logf(0.2f)};
    int n = 40000, c1[3] = {0, 0, 0}, c2[3] = {0, 0, 0};
    for (int i = 0; i < n; i++) { c1[choose_token(w, 3, 1.0f, 1.0f, rng_uniform(3, 0, i))]++; c2[choose_token(w, 3, 1.0f, 0.6f, rng_uniform(3, 1, i))]++; }
    double sd = sqrt(0.25 / n);   // a share's standard deviation is at most this
    check(fabs(c1[0] / (double)n - 0.5) < 5 * sd && fabs(c1[1] / (double)n - 0.3) < 5 * sd && fabs(c1[2] / (double)n - 0.2) < 5 * sd,
          "temperature 1, top-p 1: shares %.3f %.3f %.3f of (0.5, 0.3, 0.2)", c1[0] / (double)n, c1[1] / (double)n, c1[2] / (double)n);
    check(c2[2] == 0 && fabs(c2[0] / (double)n - 0.625) < 5 * sd, "top-p 0.6: shares %.3f %.3f %.3f of (0.625, 0.375, 0)",
          c2[0] / (double)n, c2[1] / (double)n, c2[2] / (double)n);
    float hot[3]; for (int i = 0; i < 3; i++) hot[i] = w[i] / 0.01f;   // temperature 0.01 on w == temperature 1 on w / 0.01
    int first = 0; for (int i = 0; i < 1000; i++) first += choose_token(w, 3, 0.01f, 1.0f, rng_uniform(3, 2, i)) == 0;
    check(first == 1000 && choose_token(hot, 3, 1.0f, 1.0f, 0.999f) == 0, "low temperature: always the most likely token (%d of 1000)", first);
    std::vector<int> got = {5, 6, 2}, ans = {5, 6, 2};
    check(exact_match(got, ans) && !exact_match({5, 6}, ans) && !exact_match({5, 7, 2}, ans) && exact_match({5, 6, 2, 9}, ans),
          "exact match: the first |answer| tokens are the answer");
    const std::string base = "data/base", val = "data/task/reverse.val.tok";
    if (!file_exists(base + "/vocab.bin") || !file_exists(val)) { check(false, "shipped data missing (data/base/vocab.bin, %s)", val.c_str()); return; }
    Vocab v; vocab_load(v, base + "/vocab.bin");
    TokenFile vf; token_file_open(vf, val, 0);
    std::vector<Example> ex = examples_of(vf);
    bool same = true;
    for (auto& x : ex) same &= v.encode(v.decode(x.prompt, true)) == x.prompt && v.encode(v.decode(x.answer, true)) == x.answer;
    check(same, "encode(decode(ids)) == ids for the %zu validation prompts and answers (special tokens by name)", ex.size());
    expect_error("encode: a byte no token has", [&] { v.encode("reverse: \x01"); }, {"byte 0x01 at offset 9", "in no token"});
}

static void test_options() {
    const char* argv[] = {"qlora_cpu", "--model", "m", "--train", "a.tok", "--batch", "3", "--threads", "8", "--targets", "q,v", "--lr", "1e-3"};
    Options o = parse_args(13, (char**)argv);
    check(o.vocab == "m/vocab.bin" && o.threads == 3 && o.batch == 3 && o.lora.targets == 5 && o.lr == 1e-3f,
          "options: vocab defaults to MODEL/vocab.bin, threads capped at the batch, targets q,v");
    expect_error("option: unknown flag", [] { const char* a[] = {"x", "--bogus"}; parse_args(2, (char**)a); }, {"unknown flag --bogus"});
    expect_error("option: --steps 2.5", [] { const char* a[] = {"x", "--steps", "2.5"}; parse_args(3, (char**)a); },
                 {"--steps 2.5: expected an integer"});
    expect_error("option: --targets q,q", [] { lora_targets_parse("q,q"); }, {"q_proj is named twice"});
    expect_error("option: a GPU flag", [] { const char* a[] = {"x", "--recompute"}; parse_args(2, (char**)a); },
                 {"--recompute is not a flag of qlora_cpu train on the CPU"});
    expect_error("option: a quantize flag in training", [] { const char* a[] = {"x", "--blocksize", "64"}; parse_args(3, (char**)a); },
                 {"--blocksize is not a flag of qlora_cpu train"});
    expect_error("option: a training flag in merge", [] { const char* a[] = {"merge", "--batch", "4"}; parse_options(3, (char**)a, MERGE, CPU, "qlora_cpu"); },
                 {"--batch is not a flag of qlora_cpu merge"});
    expect_error("option: bad number", [] { const char* a[] = {"x", "--lr", "fast"}; parse_args(3, (char**)a); }, {"--lr fast: expected a number"});
    expect_error("option: missing value", [] { const char* a[] = {"x", "--steps"}; parse_args(2, (char**)a); }, {"--steps needs a value"});
    expect_error("option: no --train", [] { const char* a[] = {"x", "--steps", "5"}; parse_args(3, (char**)a); }, {"--train FILE is needed", "prepare.py"});
    expect_error("option: bad target", [] { lora_targets_parse("q,x"); }, {"unknown projection \"x\""});
}

int main() {
    ql_assert(system(("rm -rf " + TMP_DIR + " && mkdir -p " + TMP_DIR).c_str()) == 0, "mkdir %s", TMP_DIR.c_str());
    test_options();
    test_vocab();
    test_greedy();
    test_choose_and_encode();
    test_loss_and_threads();
    test_shipped();
    return test_summary();
}
