// test/fuzz/targets.h: one function per reader, fuzz_<name>(data, size), shared by the libFuzzer
// entry points (test/fuzz/fuzz_<name>.cpp, `make fuzz`) and the replay test (test/test_fuzz_regress.cpp).
// Errors run in throw mode (ql_error_mode), so a rejected input is a QlError caught here; anything
// else (a crash, a sanitizer report, another exception, a broken invariant, a hang) is a bug.
// Beyond "no crash", the targets check what a reader promises: JSON strings survive json_quote, an
// accepted config is within the ranges the trainer assumes, accepted tensors lie inside the buffer.
// Inputs: test/fuzz/corpus/<target>/ seeds (make_corpus.cpp), regress/<target>/ inputs that broke a
// reader and were fixed (replayed by make test), open/<target>/ inputs that still break one (not
// replayed; move them to regress/ with the fix).
#pragma once
#include "../../formats.h"     // defines: json_parse, config_from_json, st_parse, st_parse_index, checkpoint_view
#include "../../dataloader.h"  // defines: token_file_parse, Loader
#include "../../generate.h"    // defines: Vocab, vocab_parse
#include <dirent.h>            // defines: opendir (stale scratch directories)
#include <signal.h>            // defines: kill (is a scratch directory's process alive)

// The replay test sets this to format every error message once (stderr goes to /dev/null there);
// the fuzzers leave it off: quiet, and the message arguments are not evaluated.
static bool g_fuzz_messages = false;
inline void fuzz_mode() { ql_error_mode().throw_instead = true; ql_error_mode().quiet = !g_fuzz_messages; }

// A broken promise of a reader: report and abort, which libFuzzer (and the replay test) count as a crash.
#define FUZZ_CHECK(cond) do { if (!(cond)) { fprintf(stderr, "fuzz: invariant failed: %s (%s:%d)\n", #cond, __FILE__, __LINE__); abort(); } } while (0)

// ---- JSON: parse; on success every string and key must survive json_quote -> json_parse, and the
// whole document must survive a dump -> parse round trip unchanged (numbers bit for bit).
inline void fuzz_json_dump(const Json& v, std::string& o) {
    switch (v.type) {
        case Json::NUL: o += "null"; break;
        case Json::BOOL: o += v.b ? "true" : "false"; break;
        case Json::NUM: {
            char b[40];
            if (v.is_uint) snprintf(b, sizeof b, "%llu", (unsigned long long)v.u);
            else if (isinf(v.num)) snprintf(b, sizeof b, "%s", v.num > 0 ? "1e999" : "-1e999");
            else { snprintf(b, sizeof b, "%.17g", v.num); if (!strpbrk(b, ".e")) strcat(b, ".0"); }   // stays a non-uint
            o += b; break;
        }
        case Json::STR: o += json_quote(v.str); break;
        case Json::ARR: o += '['; for (size_t i = 0; i < v.arr.size(); i++) { if (i) o += ','; fuzz_json_dump(v.arr[i], o); } o += ']'; break;
        case Json::OBJ: o += '{';
            for (size_t i = 0; i < v.obj.size(); i++) { if (i) o += ','; o += json_quote(v.obj[i].first) + ':'; fuzz_json_dump(v.obj[i].second, o); }
            o += '}'; break;
    }
}
inline bool fuzz_json_same(const Json& a, const Json& b) {
    if (a.type != b.type || a.b != b.b || a.is_uint != b.is_uint || a.u != b.u || a.str != b.str) return false;
    if (memcmp(&a.num, &b.num, sizeof a.num) || a.arr.size() != b.arr.size() || a.obj.size() != b.obj.size()) return false;
    for (size_t i = 0; i < a.arr.size(); i++) if (!fuzz_json_same(a.arr[i], b.arr[i])) return false;
    for (size_t i = 0; i < a.obj.size(); i++) if (a.obj[i].first != b.obj[i].first || !fuzz_json_same(a.obj[i].second, b.obj[i].second)) return false;
    return true;
}
inline int fuzz_json(const uint8_t* data, size_t size) {
    fuzz_mode();
    Json j; std::string err;
    if (!json_parse((const char*)data, size, j, err)) { FUZZ_CHECK(!err.empty()); return 0; }
    std::string text; fuzz_json_dump(j, text);
    Json k; std::string err2;
    FUZZ_CHECK(json_parse(text.data(), text.size(), k, err2));
    FUZZ_CHECK(fuzz_json_same(j, k));
    return 0;
}

// ---- config.json: an accepted config is one the trainer can size its buffers from.
inline int fuzz_config(const uint8_t* data, size_t size) {
    fuzz_mode();
    Json j; std::string err;
    if (!json_parse((const char*)data, size, j, err)) return 0;
    try {
        Config c = config_from_json(j, "fuzz/config.json");
        FUZZ_CHECK(c.dim > 0 && c.hidden_dim > 0 && c.n_layers > 0 && c.n_heads > 0 && c.n_kv_heads > 0 && c.vocab_size > 0 && c.max_seq_len > 0);
        FUZZ_CHECK(c.n_heads % c.n_kv_heads == 0 && c.head_dim >= 2 && c.head_dim % 2 == 0 && c.sliding_window >= 0);
        FUZZ_CHECK(c.norm_eps > 0 && c.norm_eps < 1 && c.rope_factor > 0 && isfinite(c.rope_theta) && c.rope_theta > 1);
        FUZZ_CHECK(c.dtype == DT_BF16 || c.dtype == DT_F16 || c.dtype == DT_F32);
        std::vector<float> inv((size_t)c.head_dim / 2);
        rope_inv_freq(inv.data(), c);
        LoraConfig lc;
        (void)lora_num_params(c, lc);
    } catch (const QlError&) {}
    return 0;
}

// ---- safetensors: what a model load does with an accepted file. FUZZ_CFG is a tiny Llama whose
// checkpoint (the seeds made by make_corpus.cpp) is a few hundred bytes, so the fuzzer reaches
// checkpoint_view with valid files and mutates from there.
inline Config fuzz_config_tiny(bool tied) {
    Config c;
    c.dim = 4; c.hidden_dim = 8; c.n_layers = 2; c.n_heads = 2; c.n_kv_heads = 1; c.head_dim = 2; c.vocab_size = 8;
    c.max_seq_len = 16; c.tied = tied;
    return c;
}
inline void fuzz_use(const SafeTensors& st, const uint8_t* lo, const uint8_t* hi) {
    for (auto& kv : st.tensors) {
        const STensor& t = kv.second;
        FUZZ_CHECK(t.name == kv.first && t.data >= lo && t.data + t.nbytes <= hi);
        if (t.dtype == DT_BF16 || t.dtype == DT_F16 || t.dtype == DT_F32) {
            FUZZ_CHECK((size_t)t.numel() * dtype_bytes(t.dtype) == t.nbytes);
            (void)st_f32(t);
        } else if (t.dtype == DT_I32 || t.dtype == DT_I64) {
            FUZZ_CHECK((size_t)t.numel() * dtype_bytes(t.dtype) == t.nbytes);
            try { (void)st_i32(t); } catch (const QlError&) {}   // an I64 out of int32 range
        }
    }
    checkpoint_view(fuzz_config_tiny(!st.find("lm_head.weight")), st);
}
inline int fuzz_safetensors(const uint8_t* data, size_t size) {
    fuzz_mode();
    try {
        SafeTensors st;
        st_parse(st, data, size, "fuzz/model.safetensors");
        fuzz_use(st, data, data + size);
    } catch (const QlError&) {}
    return 0;
}

// ---- sharded checkpoint: the input is the index JSON, then each shard (in first-seen order of the
// index) after a FUZZ_SHARD_SEP line. A shard the input lacks is a missing file.
static const char FUZZ_SHARD_SEP[] = "\n#### shard\n";
inline int fuzz_index(const uint8_t* data, size_t size) {
    fuzz_mode();
    std::vector<std::pair<const uint8_t*, size_t>> parts;   // index, shard 0, shard 1, ...
    const size_t sl = sizeof FUZZ_SHARD_SEP - 1;
    const uint8_t* at = data; size_t left = size;
    while (true) {
        const uint8_t* s = (const uint8_t*)memmem(at, left, FUZZ_SHARD_SEP, sl);
        if (!s) { parts.push_back({at, left}); break; }
        parts.push_back({at, (size_t)(s - at)});
        left -= (size_t)(s - at) + sl; at = s + sl;
    }
    const std::string dir = "fuzz", index = dir + "/model.safetensors.index.json";
    try {
        STIndex ix = st_parse_index(parts[0].first, parts[0].second, index);
        SafeTensors st;
        for (size_t k = 0; k < ix.shards.size(); k++) {
            std::string path = dir + "/" + ix.shards[k];
            if (k + 1 >= parts.size()) ql_fail("cannot open %s", path.c_str());   // as MappedFile says it
            st_parse(st, parts[k + 1].first, parts[k + 1].second, path);
        }
        st_check_index(st, ix, dir, index);
        FUZZ_CHECK(st.n_parsed == (int)ix.shards.size());
        for (auto& kv : ix.weight_map) FUZZ_CHECK(st.find(kv.first));
        fuzz_use(st, data, data + size);
    } catch (const QlError&) {}
    return 0;
}

// ---- token files: parse against a model vocabulary, then draw a few packed batches.
inline int fuzz_tokens(const uint8_t* data, size_t size) {
    fuzz_mode();
    try {
        TokenFile f;
        token_file_parse(f, data, size, "fuzz/train.tokens", 1 << 20);
        if (f.n_tokens == 0 || f.n_docs == 0) return 0;
        Loader ld; ld.init(&f, 1234, true);
        Batch b;
        for (int step = 0; step < 4; step++) {
            ld.next(b, 2, 8);
            for (size_t i = 0; i < b.ids.size(); i++) FUZZ_CHECK(b.ids[i] >= 0 && (uint32_t)b.ids[i] < f.vocab && b.targets[i] < (int)f.vocab);
        }
    } catch (const QlError&) {}
    return 0;
}

// ---- vocabulary table (generate.h): parse; on success, text made of tokens' bytes that encode()
// accepts must decode back to itself (specials shown), and out-of-range ids decode without a crash.
inline int fuzz_vocab(const uint8_t* data, size_t size) {
    fuzz_mode();
    try {
        Vocab v;
        vocab_parse(v, data, size, "fuzz/vocab.bin");
        FUZZ_CHECK(v.str.size() == v.special.size() && !v.str.empty());
        std::string text;
        for (size_t i = 0; i < v.str.size() && i < 64; i++) text += v.str[(i * 7919) % v.str.size()];
        std::vector<int> ids;
        try { ids = v.encode(text); } catch (const QlError&) { return 0; }   // greedy longest match can get stuck
        FUZZ_CHECK(v.decode(ids, true) == text);
        ids.push_back(-1); ids.push_back((int)v.str.size());
        v.decode(ids);
    } catch (const QlError&) {}
    return 0;
}

// ---- bitsandbytes 4-bit checkpoint (qlora.h §12): the validation a pre-quantized load does, then
// every linear's bytes loaded and dequantized, as the trainer and `qlora merge` use them.
inline int fuzz_bnb(const uint8_t* data, size_t size) {
    fuzz_mode();
    try {
        SafeTensors st;
        st_parse(st, data, size, "fuzz/model.safetensors");
        Config c = fuzz_config_tiny(!st.find("lm_head.weight"));
        BnbCheckpointView v = bnb_checkpoint_validate(c, st);
        for (auto& row : v.w.linear)
            for (auto& b : row) {
                Quant4 q; bnb_linear_load(b, q);
                FUZZ_CHECK(q.n == b.out * b.in && (int64_t)q.packed.size() == (q.n + 1) / 2);
                std::vector<float> x((size_t)q.n);
                dequantize_weight(x.data(), q);
            }
    } catch (const QlError&) {}
    return 0;
}

// ---- PEFT adapter (qlora.h §11): adapter_config.json, then FUZZ_SHARD_SEP, then
// adapter_model.safetensors. peft_adapter_read takes a directory, so both go to a scratch one,
// one per process; those of processes that died (a crash skips atexit) are removed first.
inline std::string fuzz_scratch_dir() {
    static std::string d;
    if (d.empty()) {
        std::string root = access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp", stem = "qlora_fuzz_peft.";
        if (DIR* r = opendir(root.c_str())) {
            while (dirent* e = readdir(r)) {
                if (strncmp(e->d_name, stem.c_str(), stem.size())) continue;
                long pid = atol(e->d_name + stem.size());
                if (pid <= 0 || kill((pid_t)pid, 0) == 0 || errno != ESRCH) continue;
                std::string old = root + "/" + e->d_name;
                for (const char* f : {"/adapter_config.json", "/adapter_model.safetensors", ""}) remove((old + f).c_str());
            }
            closedir(r);
        }
        d = root + "/" + stem + std::to_string(getpid());
        make_dirs(d);
        atexit([] { for (const char* f : {"/adapter_config.json", "/adapter_model.safetensors", ""}) remove((d + f).c_str()); });
    }
    return d;
}
inline int fuzz_peft(const uint8_t* data, size_t size) {
    fuzz_mode();
    const size_t sl = sizeof FUZZ_SHARD_SEP - 1;
    const uint8_t* s = size ? (const uint8_t*)memmem(data, size, FUZZ_SHARD_SEP, sl) : nullptr;
    size_t nc = s ? (size_t)(s - data) : size;
    std::string d = fuzz_scratch_dir();
    auto put = [](const std::string& p, const uint8_t* b, size_t n) {
        FILE* f = fopen(p.c_str(), "wb"); if (!f) abort();
        if (n && fwrite(b, 1, n, f) != n) abort();
        fclose(f);
    };
    put(d + "/adapter_config.json", data, nc);
    if (s) put(d + "/adapter_model.safetensors", s + sl, size - nc - sl); else remove((d + "/adapter_model.safetensors").c_str());
    try {
        LoraConfig lc; std::vector<float> lora;
        Config c = fuzz_config_tiny(true);
        peft_adapter_read(d, c, lc, lora);
        FUZZ_CHECK(lc.rank >= 1 && lc.targets && lora.size() == lora_num_params(c, lc));
    } catch (const QlError&) {}
    return 0;
}
