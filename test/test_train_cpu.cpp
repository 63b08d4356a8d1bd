// test_train_cpu.cpp: the pieces of the CPU trainer (qlora_cpu.cpp) that `make train` relies on.
//   - the vocabulary table: a round trip, and every corruption ends in a clean error naming the file;
//   - options: defaults and clean errors;
//   - greedy decoding and exact-match accuracy on a hand-made model whose next token is known;
//   - validation loss counts every target of the file once, whole documents, whatever the batch shape;
//   - a step spread over 2 threads equals the same step on 1, with LoRA dropout too (3 threads);
//   - evaluation runs without dropout;
//   - the shipped data: the token files and vocabulary that dev/data/prepare.py made decode to the
//     task's text, a short run on them lowers the validation loss, and its PEFT adapter reads back
//     bit for bit (no Python needed);
//   - the run as ./qlora_cpu makes it: the memory plan (refused with advice when short), inputs
//     without targets or that would hang (a FIFO), Ctrl-C + --resume == the straight run bit for
//     bit, a resume with other options refused, --out locked and replaced whole (a full disk
//     mid-save leaves the previous set), NaN/Inf steps skipped and K in a row stopping the run, no
//     NaN adapter written or merged, --adapter, `qlora_cpu sample`, merge's vocab.bin, the ETA.
#define QLORA_TESTING
#include "../qlora_cpu.cpp"  // defines: Vocab, vocab_parse, CpuTrainer, train_step, evaluate_loss, generate, accuracy
#include "test.h"            // defines: check, check_close, expect_error, test_summary
#include <sys/stat.h>        // defines: mkfifo

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

// ---------------------------------------------------------------------------------------------
// the run as `./qlora_cpu` makes it (train_run, sample_run): checkpoints, resume, signals, bad steps,
// the memory plan, bad inputs

// "--flag value ..." (split at spaces) + extra arguments (which may hold spaces) -> Options
static Options args_of(const std::string& line, std::vector<std::string> extra = {}, unsigned mode = TRAIN) {
    std::vector<std::string> w = {"qlora_cpu"};
    for (size_t a = 0, b; a < line.size(); a = b + 1) { b = line.find(' ', a); if (b == std::string::npos) b = line.size(); if (b > a) w.push_back(line.substr(a, b - a)); }
    w.insert(w.end(), extra.begin(), extra.end());
    std::vector<char*> p; for (auto& x : w) p.push_back(&x[0]);
    return parse_args((int)p.size(), p.data(), mode);
}
static std::vector<uint8_t> bytes_of(const std::string& p) { return file_exists(p) ? read_file(p) : std::vector<uint8_t>(); }
static const std::string RUN = "--model data/base --train data/task/reverse.train.tok --batch 2 --seq 32 --rank 4 --lr 3e-3 --warmup 2 "
                               "--dropout 0.1 --threads 2 --log-every 100 --seed 5";
static bool no_siblings(const std::string& dir) {
    bool none = true;
    for (const std::string& e : dir_entries(parent_dir(dir))) none &= !out_sibling_of(e, base_name(dir), "new") && !out_sibling_of(e, base_name(dir), "old");
    return none;
}

// 8 steps straight == 3 steps, Ctrl-C (the step finishes, the run saves and returns 0), --resume, 5
// steps: every loss and the final adapter and state, bit for bit
static void test_resume() {
    std::string full = TMP_DIR + "/full", part = TMP_DIR + "/part";
    RunResult a, b, c;
    int rc_a = train_run(args_of(RUN + " --steps 8 --out " + full), &a);
    int rc_b = train_run(args_of(RUN + " --steps 8 --out " + part), &b, [](int step) { if (step == 2) raise(SIGINT); });
    SafeTensors st = st_open(part + "/state.safetensors");
    check(rc_a == 0 && rc_b == 0 && b.step == 3 && b.losses.size() == 3 && st.metadata["step"] == "3" && file_exists(part + "/adapter_model.safetensors"),
          "SIGINT after step 3 of 8: the run finishes the step, saves adapter + state (step %s) and returns %d", st.metadata["step"].c_str(), rc_b);
    int rc_c = train_run(args_of(RUN + " --steps 8 --resume " + part + " --out " + part), &c);
    std::vector<float> joined = b.losses; joined.insert(joined.end(), c.losses.begin(), c.losses.end());
    check(rc_c == 0 && c.step == 8 && joined.size() == a.losses.size(), "resumed at step 3, ran to step %d", c.step);
    check_bytes("3 steps + resume + 5 steps == 8 steps: losses", joined.data(), a.losses.data(), 4 * std::min(joined.size(), a.losses.size()));
    std::vector<uint8_t> fa = bytes_of(full + "/adapter_model.safetensors"), fb = bytes_of(part + "/adapter_model.safetensors");
    std::vector<uint8_t> sa = bytes_of(full + "/state.safetensors"), sb = bytes_of(part + "/state.safetensors");
    check(!fa.empty() && fa.size() == fb.size() && !sa.empty() && sa.size() == sb.size(), "both runs wrote an adapter and a state of the same size");
    if (fa.size() == fb.size() && sa.size() == sb.size()) {
        check_bytes("resumed == straight: adapter_model.safetensors", fb.data(), fa.data(), fa.size());
        check_bytes("resumed == straight: state.safetensors", sb.data(), sa.data(), sa.size());
    }
    expect_error("resume with another --batch", [part] { exit(train_run(args_of(RUN + " --steps 8 --batch 3 --resume " + part))); },
                 {part + "/state.safetensors was saved by a different run", "batch=2", "batch=3"});
    expect_error("resume with another --rank", [part] { exit(train_run(args_of(RUN + " --steps 8 --rank 8 --resume " + part))); },
                 {"saved by a different run", "rank=4", "rank=8"});
    expect_error("resume from a directory without state", [] { exit(train_run(args_of(RUN + " --steps 8 --resume data/base"))); },
                 {"--resume data/base: no state.safetensors"});
    // a second signal ends the process at once (exit 130)
    fflush(stdout);
    pid_t pid = fork();
    if (pid == 0) { freopen("/dev/null", "w", stdout); train_run(args_of(RUN + " --steps 8"), nullptr, [](int) { raise(SIGINT); raise(SIGINT); }); _exit(0); }
    int status = 0; waitpid(pid, &status, 0);
    check(WIFEXITED(status) && WEXITSTATUS(status) == 130, "a second SIGINT exits at once (status %d)", WIFEXITED(status) ? WEXITSTATUS(status) : -1);
}

// The output directory: checked before any work, locked, and every save switched in whole.
static void test_out_dir() {
    std::string d = TMP_DIR + "/disk";
    check(train_run(args_of(RUN + " --steps 2 --out " + d)) == 0, "a 2-step run, rank 4, saved to %s", d.c_str());
    const char* files[] = {"adapter_model.safetensors", "adapter_config.json", "state.safetensors"};
    std::vector<std::vector<uint8_t>> before;
    for (const char* f : files) before.push_back(bytes_of(d + "/" + f));
    // the same run at rank 16 on a disk that fills up after the weights: nothing of it may land beside the rank-4 files
    size_t room = 314888 + 100;   // adapter_model.safetensors of rank 16 on data/base, and a little
    expect_error("a save fails half-way (disk full)", [d, room] {
        ql_error_mode().fail_writes_after = (long long)room;
        exit(train_run(args_of(RUN + " --steps 2 --rank 16 --out " + d)));
    }, {"disk full?", d + " keeps its previous files"});
    bool same = true;
    for (size_t i = 0; i < 3; i++) same &= !before[i].empty() && bytes_of(d + "/" + files[i]) == before[i];
    check(same && no_siblings(d), "after the failed save: %s holds the previous adapter and state, byte for byte (no rank-16 weights beside \"r\": 4)", d.c_str());
    LoraConfig lc; std::vector<float> w; Config c = load_config("data/base/config.json");
    peft_adapter_read(d, c, lc, w);
    check(lc.rank == 4, "and it loads: r %d", lc.rank);
    // --out a regular file: refused before any work
    write_bytes(TMP_DIR + "/a_file", {1, 2, 3});
    expect_error("--out is a regular file", [] { exit(train_run(args_of(RUN + " --steps 2 --out " + TMP_DIR + "/a_file"))); },
                 {"--out " + TMP_DIR + "/a_file exists and is not a directory"});
    // a second run writing the same --out is refused, naming the first
    out_lock(d);
    long me = (long)getpid();
    expect_error("a second run writing --out", [d] { out_locks().clear(); exit(train_run(args_of(RUN + " --steps 2 --out " + d))); },
                 {d + " is being written by another qlora run (pid " + std::to_string(me) + ")"});
}

// A non-finite loss or gradient: the update is skipped with a warning naming the tensor; K in a row
// stop the run with the last good state intact; a non-finite adapter is never written, nor merged.
static void test_nonfinite() {
    std::vector<uint32_t> tok; std::vector<uint64_t> starts;
    for (int d = 0; d < 12; d++) { starts.push_back(tok.size()); for (int i = 0; i < 9; i++) tok.push_back(rng_u32(8, d, i) % 24); }
    std::string path = TMP_DIR + "/nan.tok";
    token_file_write(path, tok, nullptr, starts, 24);
    TokenFile f; token_file_open(f, path, 24);
    CpuTrainer t; random_trainer(t, 2);
    t.o.inject_nan = 1; t.o.inject_nan_steps = 1;
    Loader ld; ld.init(&f, 3, true);
    Batch b; float norm; bool ok0, ok1, ok2;
    ld.next(b, 4, 16); train_step(t, b, 0, 1e-2f, &norm, &ok0);
    std::vector<float> p = t.lora, m = t.adam_m, v = t.adam_v;
    ld.next(b, 4, 16); train_step(t, b, 1, 1e-2f, &norm, &ok1);
    bool kept = t.lora == p && t.adam_m == m && t.adam_v == v;
    ld.next(b, 4, 16); train_step(t, b, 2, 1e-2f, &norm, &ok2);
    check(ok0 && !ok1 && kept && ok2 && t.lora != p, "a NaN gradient at step 2: ok=%d, update skipped (parameters and moments unchanged: %d), step 3 updates again",
          (int)ok1, (int)kept);
    std::string d = TMP_DIR + "/nanrun";
    expect_error("3 NaN steps in a row", [d] { exit(train_run(args_of(RUN + " --steps 12 --inject-nan 3 100 --max-bad-steps 3 --save-every 2 --out " + d))); },
                 {"step 4: loss", "non-finite gradient in model.layers.0.self_attn.q_proj.lora_A", "3 steps in a row", "last good state is in " + d});
    SafeTensors st = st_open(d + "/state.safetensors");
    std::vector<float> lora = st_f32(*st.find("lora"));
    bool finite = true; for (float x : lora) finite &= std::isfinite(x);
    check(st.metadata["step"] == "2" && finite && no_siblings(d), "the state saved at step %s is intact and finite", st.metadata["step"].c_str());
    RunResult r;
    check(train_run(args_of(RUN + " --steps 6 --inject-nan 2 1"), &r) == 0 && r.step == 6, "one NaN step: skipped, the run completes");

    // the writer and the readers refuse NaN/Inf, naming the tensor
    Config c = load_config("data/base/config.json");
    LoraConfig lc; std::vector<float> w;
    peft_adapter_read(d, c, lc, w);
    std::vector<uint8_t> prev = bytes_of(d + "/adapter_model.safetensors");
    LoraSlot sl = lora_slot(c, lc, 1, P_DOWN);
    w[sl.b + 5] = INFINITY;
    expect_error("write an adapter holding Inf", [&] { peft_adapter_write(d, c, lc, w.data(), "data/base"); },
                 {"not writing the adapter to " + d, "model.layers.1.mlp.down_proj.lora_B", "non-finite"});
    check(bytes_of(d + "/adapter_model.safetensors") == prev, "the adapter on disk is unchanged");
    std::string bad = TMP_DIR + "/nan_adapter";   // written past the writer's check, as a diverged run elsewhere might
    make_dirs(bad);
    write_text_file(bad + "/adapter_config.json", text_of_file(d + "/adapter_config.json"));
    SafeTensors a = st_open(d + "/adapter_model.safetensors");
    std::vector<std::vector<float>> keep; std::vector<STOut> ts;
    for (auto& kv : a.tensors) {
        keep.push_back(st_f32(kv.second));
        if (kv.first.find("layers.1.mlp.down_proj.lora_B") != std::string::npos) keep.back()[5] = NAN;
        ts.push_back({kv.first, DT_F32, kv.second.shape, keep.back().data()});
    }
    st_write(bad + "/adapter_model.safetensors", ts);
    std::string merged = TMP_DIR + "/nan_merged";
    expect_error("merge an adapter holding NaN", [bad, merged] {
        exit(tool_main(MERGE, args_of("--model data/base --adapter " + bad + " --out " + merged, {}, MERGE), "./qlora_cpu"));
    }, {bad + "/adapter_model.safetensors", "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight", "NaN/Inf", "merge"});
    check(!file_exists(merged), "nothing merged");
}

// The memory plan: the sizes ref_acts_alloc allocates, added up first; too much is refused with advice.
static void test_memory_plan() {
    Config c = load_config("data/base/config.json");
    LoraConfig lc; lc.rank = 16;
    RefActs<float> a; ref_acts_alloc(a, c, lc, 3, 20);
    size_t n = a.resid.size() + a.rstd1.size() + a.n1.size() + a.q.size() + a.k.size() + a.v.size() + a.att.size() + a.o.size() +
               a.resid2.size() + a.rstd2.size() + a.n2.size() + a.gate.size() + a.up.size() + a.act.size() + a.lora_u.size() +
               a.rstdf.size() + a.hL.size() + a.logits.size() + a.losses.size();
    CpuMemPlan p = cpu_memory_plan(c, lc, 6, 20, 2);
    check(p.acts == 2.0 * 4 * n && p.rows == 3 && p.model == 4.0 * 407168 && p.lora == 4.0 * 77824 * 6,
          "memory plan of 2 threads x 3 rows x 20 tokens: activations %.0f bytes = what ref_acts_alloc allocates, model %.0f, LoRA state %.0f",
          p.acts, p.model, p.lora);
    CpuMemPlan big = cpu_memory_plan(c, lc, 4096, 256, 2);
    check(big.total() > 20 * 1073741824.0, "--batch 4096 --seq 256 on data/base: %.1f GiB (the std::bad_alloc of issue 12)", big.total() / 1073741824.0);
    int fits = 0; for (int bsz = 1; bsz <= 4096; bsz++) if (cpu_memory_plan(c, lc, bsz, 256, 2).total() <= 8 * 1073741824.0) fits = bsz;
    Options o = args_of("--model data/base --train x --batch 4096 --seq 256 --threads 2");
    expect_error("a plan above the memory available", [&] { cpu_memory_check(c, lc, o, 8 * 1073741824.0); },
                 {"needs about", "--batch 4096 --seq 256", "8.00 GiB this machine has available", "--batch " + std::to_string(fits) + " fits"});
    // end to end, before any weight is read: a config alone, a batch no machine holds
    std::string d = TMP_DIR + "/config_only";
    make_dirs(d);
    write_text_file(d + "/config.json", json_text_set(text_of_file("data/base/config.json"), "max_position_embeddings", "1048576", "config"));
    expect_error("--batch 4096 --seq 65536", [d] { CpuTrainer t; trainer_init(t, args_of("--model " + d + " --train x --batch 4096 --seq 65536")); },
                 {"needs about", "not even --batch 1 fits with --seq 65536: lower --seq"});
}

// Inputs that used to train on nothing, report nothing, or hang.
static void test_bad_inputs() {
    std::vector<uint32_t> tok(40); std::vector<uint8_t> zero(40, 0); std::vector<uint64_t> starts = {0, 10, 20, 30};
    for (int i = 0; i < 40; i++) tok[i] = (uint32_t)(i % 50);
    std::string nomask = TMP_DIR + "/no_targets.tok", ones = TMP_DIR + "/one_token_docs.tok";
    token_file_write(nomask, tok, &zero, starts, 104);
    token_file_write(ones, {5, 6, 7}, nullptr, {0, 1, 2}, 104);
    expect_error("--train whose loss mask is all 0", [nomask] { exit(train_run(args_of(RUN + " --steps 2 --train " + nomask))); },
                 {"--train " + nomask + ": no token is a training target", "loss mask is 0"});
    expect_error("--val without targets", [nomask] { exit(train_run(args_of(RUN + " --steps 2 --val " + nomask))); },
                 {"--val " + nomask + ": no token is a training target", "validation loss"});
    expect_error("--val of one-token documents", [ones] { exit(train_run(args_of(RUN + " --steps 2 --val " + ones))); },
                 {"--val " + ones, "every document is a single token"});
    std::string fifo = TMP_DIR + "/train.fifo";
    ql_assert(mkfifo(fifo.c_str(), 0644) == 0, "mkfifo %s", fifo.c_str());
    expect_error("--train is a FIFO", [fifo] { alarm(20); exit(train_run(args_of(RUN + " --steps 2 --train " + fifo))); },
                 {fifo, "not a regular file", "FIFO"});
    Options o = args_of("--model data/base/ --train x --out build/x/ --adapter a//");
    check(o.model == "data/base" && o.vocab == "data/base/vocab.bin" && o.out == "build/x" && o.adapter == "a",
          "trailing slashes dropped: --model %s, vocab %s (not data/base//vocab.bin)", o.model.c_str(), o.vocab.c_str());
}

// --adapter (start from / sample with a PEFT adapter), `qlora_cpu sample`, merge's vocab.bin, the ETA
static void test_adapter_and_sample() {
    std::string d = TMP_DIR + "/disk";   // test_out_dir's rank-4 adapter
    CpuTrainer t; trainer_init(t, args_of("--model data/base --train x --seq 64 --adapter " + d + " --threads 2 --dropout 0.05"));
    LoraConfig lc; std::vector<float> w; peft_adapter_read(d, t.m.cfg, lc, w);
    check(t.lc.rank == 4 && t.lc.targets == lc.targets && t.lc.dropout == 0.05f && t.lora == w,
          "--adapter: training starts from its weights and its r (%d), alpha, targets; dropout from the options", t.lc.rank);
    std::vector<std::string> prompt = {"--prompt", "<|user|>reverse: abc<|end|><|assistant|>"};
    Options s = args_of("--model data/base --adapter " + d + " --max-new 6 --temperature 0.8 --top-p 0.9 --seed 3", prompt, SAMPLE);
    check(sample_run(s) == 0, "qlora_cpu sample --adapter DIR --prompt TEXT --temperature 0.8 --top-p 0.9");
    check(sample_run(args_of("--model data/base --val data/task/reverse.val.tok --eval-examples 4 --samples 2", {}, SAMPLE)) == 0,
          "qlora_cpu sample --val FILE (the base model alone): accuracy and samples");
    Vocab v; vocab_load(v, "data/base/vocab.bin");
    std::vector<int> ids = prompt_ids(prompt[1], &v);
    CpuTrainer g; trainer_init(g, args_of("--model data/base --train x --seq 64 --adapter " + d + " --threads 1"));
    GenSettings gs; gs.temperature = 0.8f; gs.top_p = 0.9f; gs.seed = 3;
    std::vector<int> x1 = generate(g.m, g.lc, g.lora.data(), g.acts[0], ids, 6, -1, nullptr, gs, 0);
    std::vector<int> x2 = generate(g.m, g.lc, g.lora.data(), g.acts[0], ids, 6, -1, nullptr, gs, 0);
    std::vector<int> greedy = generate(g.m, g.lc, g.lora.data(), g.acts[0], ids, 6, -1), t0 = generate(g.m, g.lc, g.lora.data(), g.acts[0], ids, 6, -1, nullptr, GenSettings(), 0);
    check(x1 == x2 && x1.size() == 6 && greedy == t0 && ids[0] == (int)v.bos, "sampling: the same seed gives the same tokens; temperature 0 is greedy; bos first");
    expect_error("sample without a prompt", [] { sample_run(args_of("--model data/base", {}, SAMPLE)); }, {"needs --prompt TEXT"});
    expect_error("a sample flag in training", [] { args_of("--max-new 4"); }, {"--max-new is not a flag of qlora_cpu train"});

    std::string merged = TMP_DIR + "/merged";
    check(tool_main(MERGE, args_of("--model data/base --adapter " + d + " --out " + merged, {}, MERGE), "./qlora_cpu") == 0 &&
          bytes_of(merged + "/vocab.bin") == bytes_of("data/base/vocab.bin"), "merge copies vocab.bin beside the merged checkpoint (its samples decode)");
    check(eta_text(3725) == "ETA 1h02m" && eta_text(185) == "ETA 3m05s" && eta_text(12.4) == "ETA 12s" && eta_text(NAN) == "ETA 0s",
          "step lines' ETA: %s, %s, %s", eta_text(3725).c_str(), eta_text(185).c_str(), eta_text(12.4).c_str());
}

int main() {
    ql_assert(system(("rm -rf " + TMP_DIR + " && mkdir -p " + TMP_DIR).c_str()) == 0, "mkdir %s", TMP_DIR.c_str());
    test_options();
    test_vocab();
    test_greedy();
    test_choose_and_encode();
    test_loss_and_threads();
    test_shipped();
    test_memory_plan();
    test_bad_inputs();
    test_resume();
    test_out_dir();
    test_nonfinite();
    test_adapter_and_sample();
    return test_summary();
}
