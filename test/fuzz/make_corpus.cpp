// test/fuzz/make_corpus.cpp: writes the seed corpora test/fuzz/corpus/<target>/ from the project's
// own files. Seeds stay small: safetensors seeds keep the real headers with the data cut off (the
// header is what the reader parses), plus a complete tiny checkpoint for fuzz_config_tiny() so the
// fuzzer starts from files that load all the way through checkpoint_view.
//   g++ -std=c++17 -o build/make_corpus test/fuzz/make_corpus.cpp && build/make_corpus
#include "targets.h"   // defines: fuzz_config_tiny, FUZZ_SHARD_SEP, st_write, token_file_write
#include "../../tools.h"  // defines: bnb_write_checkpoint (the bnb seed checkpoint)

static const std::string OUT = "test/fuzz/corpus";

static void put(const std::string& target, const std::string& name, const std::string& bytes) {
    std::string p = OUT + "/" + target + "/" + name;
    FILE* f = fopen(p.c_str(), "wb");
    ql_assert(f && fwrite(bytes.data(), 1, bytes.size(), f) == bytes.size() && fclose(f) == 0, "cannot write %s", p.c_str());
}
static std::string slurp(const std::string& path) { std::vector<uint8_t> b = read_file(path); return std::string(b.begin(), b.end()); }
static std::string header_of(const std::string& st) { uint64_t n = 0; for (int k = 7; k >= 0; k--) n = (n << 8) | (uint8_t)st[k]; return st.substr(8, n); }
static std::string raw_st(const std::string& header, size_t data) {
    std::string b(8, '\0');
    for (int k = 0; k < 8; k++) b[k] = (char)(header.size() >> (8 * k));
    return b + header + std::string(data, '\x3c');
}

// the tiny checkpoint (or the tensors of layer `only`, -1 = all; -2 = the non-layer tensors)
static std::vector<STOut> tiny_tensors(bool tied, int only) {
    static std::vector<uint16_t> bf(64, 0x3f80);   // 1.0 in bf16, enough for the largest tensor
    Config c = fuzz_config_tiny(tied);
    std::vector<STOut> ts;
    for_each_weight(c, [&](const Weight& w) {
        if (only == -1 || (only == -2 ? w.layer < 0 : only == w.layer)) ts.push_back({w.name, DT_BF16, w.shape, bf.data()});
    });
    return ts;
}
static std::string written(const std::vector<STOut>& ts, std::map<std::string, std::string> meta = {}) {
    st_write("build/make_corpus.tmp", ts, meta);
    std::string b = slurp("build/make_corpus.tmp");
    remove("build/make_corpus.tmp");
    // vocab: the shipped model's table (dev/data/prepare.py), whole and cut short
    std::string vb = slurp("data/base/vocab.bin");
    put("vocab", "base", vb);
    put("vocab", "truncated", vb.substr(0, 300));
    return b;
}

// qwen2 with a sliding window on its last layer (layer_types); qwen3 with attention_bias and no head_dim (128)
static const char* QWEN2_SEED = "{\"model_type\":\"qwen2\",\"hidden_size\":64,\"intermediate_size\":96,\"num_hidden_layers\":2,\"num_attention_heads\":4,"
    "\"num_key_value_heads\":2,\"vocab_size\":10,\"use_sliding_window\":true,\"sliding_window\":64,\"max_window_layers\":1,"
    "\"layer_types\":[\"full_attention\",\"sliding_attention\"],\"rope_theta\":1000000.0,\"rms_norm_eps\":1e-06,\"tie_word_embeddings\":true}";
static const char* QWEN3_SEED = "{\"model_type\":\"qwen3\",\"hidden_size\":64,\"intermediate_size\":96,\"num_hidden_layers\":2,\"num_attention_heads\":4,"
    "\"num_key_value_heads\":2,\"vocab_size\":10,\"attention_bias\":true,\"use_sliding_window\":false,\"sliding_window\":null,"
    "\"rope_theta\":1000000,\"rms_norm_eps\":1e-06,\"max_position_embeddings\":40960}";

int main() {
    ql_assert(system(("mkdir -p build " + OUT + "/json " + OUT + "/config " + OUT + "/safetensors " + OUT + "/index " + OUT + "/tokens " + OUT + "/bnb " + OUT + "/peft " + OUT + "/vocab").c_str()) == 0, "mkdir");
    const char* models[] = {"tied", "untied"};
    const char* files[] = {"model", "quant", "debug_fp32", "debug_bf16"};

    // json: configs, real safetensors headers, and the escapes and numbers the parser handles
    for (auto m : models) {
        put("json", std::string(m) + "_config.json", slurp(std::string("test/ref/") + m + "/config.json"));
        put("json", std::string(m) + "_generation_config.json", slurp(std::string("test/ref/") + m + "/generation_config.json"));
    }
    put("json", "tied_model_header.json", header_of(slurp("test/ref/tied/model.safetensors")));
    put("json", "escapes.json", "{\"a\": \"\\u00e9\\ud83d\\ude00\\n\\t\\\\\\/\\\"\", \"b\": [1, 2.5, -3e2, 18446744073709551615, 18446744073709551616, -0, 1e999, 0.1e-400], \"c\": null, \"d\": {\"e\": true, \"f\": false}}  ");

    // config: the two reference configs, the older rope_scaling form, mistral, qwen2, qwen3, linear RoPE
    for (auto m : models) put("config", std::string(m) + ".json", slurp(std::string("test/ref/") + m + "/config.json"));
    put("config", "old_form.json", "{\"model_type\":\"llama\",\"hidden_size\":64,\"intermediate_size\":96,\"num_hidden_layers\":1,\"num_attention_heads\":4,"
        "\"vocab_size\":10,\"rope_theta\":500000.0,\"rope_scaling\":{\"type\":\"llama3\",\"factor\":32.0,\"low_freq_factor\":1.0,"
        "\"high_freq_factor\":4.0,\"original_max_position_embeddings\":8192},\"torch_dtype\":\"float16\",\"tie_word_embeddings\":true}");
    put("config", "mistral.json", "{\"model_type\":\"mistral\",\"hidden_size\":64,\"intermediate_size\":96,\"num_hidden_layers\":2,\"num_attention_heads\":4,"
        "\"num_key_value_heads\":2,\"vocab_size\":10,\"sliding_window\":4096,\"rms_norm_eps\":1e-5,\"max_position_embeddings\":32768,\"dtype\":\"float32\"}");
    put("config", "qwen2.json", QWEN2_SEED);
    put("config", "qwen3.json", QWEN3_SEED);
    put("config", "linear_rope.json", "{\"model_type\":\"llama\",\"hidden_size\":48,\"head_dim\":8,\"intermediate_size\":96,\"num_hidden_layers\":1,\"num_attention_heads\":4,"
        "\"vocab_size\":10,\"rope_parameters\":{\"rope_type\":\"linear\",\"factor\":2.0,\"rope_theta\":10000},\"hidden_act\":\"silu\",\"attention_bias\":false,\"mlp_bias\":false}");

    // safetensors: every reference header with its data cut off; the tiny checkpoint, tied and
    // untied, complete; one tensor of each dtype
    for (auto m : models)
        for (auto f : files) put("safetensors", std::string(m) + "_" + f + "_header", raw_st(header_of(slurp(std::string("test/ref/") + m + "/" + f + ".safetensors")), 0));
    put("safetensors", "tiny_tied", written(tiny_tensors(true, -1)));
    put("safetensors", "tiny_untied", written(tiny_tensors(false, -1), {{"note", "untied"}}));
    std::string h = "{";
    size_t off = 0;
    for (auto& d : ST_DTYPES) {
        size_t nb = 2 * (size_t)d.bits;   // 16 elements
        if (h.size() > 1) h += ",";
        h += "\"t_" + std::string(d.name) + "\":{\"dtype\":\"" + d.name + "\",\"shape\":[4,4],\"data_offsets\":[" + std::to_string(off) + "," + std::to_string(off + nb) + "]}";
        off += nb;
    }
    put("safetensors", "every_dtype", raw_st(h + ",\"__metadata__\":{\"format\":\"pt\"}}", off));

    // index: the tiny checkpoint in two shards (layer 1 in the second), and in one
    std::string s1 = "model-00001-of-00002.safetensors", s2 = "model-00002-of-00002.safetensors", wm;
    for (auto& t : tiny_tensors(true, -1)) wm += (wm.empty() ? "" : ",") + json_quote(t.name) + ":" + json_quote(t.name.find("layers.1.") == std::string::npos ? s1 : s2);
    std::vector<STOut> a = tiny_tensors(true, -2), l0 = tiny_tensors(true, 0);
    a.insert(a.end(), l0.begin(), l0.end());
    put("index", "two_shards", "{\"metadata\":{\"total_size\":1},\"weight_map\":{" + wm + "}}" + FUZZ_SHARD_SEP + written(a) + FUZZ_SHARD_SEP + written(tiny_tensors(true, 1)));
    std::string wm1;
    for (auto& t : tiny_tensors(false, -1)) wm1 += (wm1.empty() ? "" : ",") + json_quote(t.name) + ":\"model.safetensors\"";
    put("index", "one_shard", "{\"weight_map\":{" + wm1 + "}}" + FUZZ_SHARD_SEP + written(tiny_tensors(false, -1)));

    // tokens: two small files, with and without a loss mask
    std::vector<uint32_t> toks = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 3, 2, 1};
    std::vector<uint8_t> mask = {0, 0, 1, 1, 1, 0, 1, 1, 1, 1, 0, 1, 1, 1};
    token_file_write("build/make_corpus.tmp", toks, nullptr, {0, 5, 5, 9}, 16);
    put("tokens", "four_docs", slurp("build/make_corpus.tmp"));
    token_file_write("build/make_corpus.tmp", toks, &mask, {0, 13}, 12);
    put("tokens", "masked", slurp("build/make_corpus.tmp"));
    remove("build/make_corpus.tmp");
    // bnb: the tiny checkpoint quantized by qlora's own bitsandbytes writer (NF4 nested, FP4 plain)
    const std::string src = "build/make_corpus_src", dst = "build/make_corpus_bnb";
    ql_assert(system(("rm -rf " + src + " " + dst + " && mkdir -p " + src).c_str()) == 0, "mkdir");
    auto tiny_config = [](bool tied) {
        Config c = fuzz_config_tiny(tied);
        return "{\"model_type\":\"llama\",\"hidden_size\":" + std::to_string(c.dim) + ",\"intermediate_size\":" + std::to_string(c.hidden_dim) +
               ",\"num_hidden_layers\":" + std::to_string(c.n_layers) + ",\"num_attention_heads\":" + std::to_string(c.n_heads) +
               ",\"num_key_value_heads\":" + std::to_string(c.n_kv_heads) + ",\"head_dim\":" + std::to_string(c.head_dim) +
               ",\"vocab_size\":" + std::to_string(c.vocab_size) + ",\"tie_word_embeddings\":" + (tied ? "true" : "false") + "}";
    };
    struct { const char* name; bool tied; int qt, bs; bool nested; } bnbs[] = {{"tiny_nf4_nested", true, QT_NF4, 64, true}, {"tiny_fp4_untied", false, QT_FP4, 32, false}};
    for (auto& b : bnbs) {
        write_text_file(src + "/config.json", tiny_config(b.tied));
        st_write(src + "/model.safetensors", tiny_tensors(b.tied, -1));
        bnb_write_checkpoint(src, dst, b.qt, b.bs, b.nested);
        put("bnb", b.name, slurp(dst + "/model.safetensors"));
    }
    put("bnb", "tiny_unquantized", written(tiny_tensors(true, -1)));

    // peft: adapters for the tiny model from qlora's own PEFT writer; a regex target_modules
    struct { const char* name; int rank; unsigned targets; bool rslora; } pefts[] = {{"all_linear_r2", 2, (1u << N_PROJ) - 1, false}, {"qv_r1_rslora", 1, 0b101, true}};
    for (auto& a : pefts) {
        Config c = fuzz_config_tiny(true);
        LoraConfig lc; lc.rank = a.rank; lc.targets = a.targets; lc.rslora = a.rslora;
        std::vector<float> lora(lora_num_params(c, lc));
        lora_init(lora.data(), c, lc, 7);
        ql_assert(system(("rm -rf " + dst).c_str()) == 0, "rm");
        peft_adapter_write(dst, c, lc, lora.data(), "tiny");
        std::string cfg = slurp(dst + "/adapter_config.json"), w = slurp(dst + "/adapter_model.safetensors");
        put("peft", a.name, cfg + FUZZ_SHARD_SEP + w);
        if (a.rank == 1) {
            size_t b = cfg.find("\"target_modules\": ["), e = cfg.find("]", b);
            put("peft", "qv_regex", cfg.substr(0, b) + "\"target_modules\": \"model\\\\.layers\\\\.\\\\d+\\\\.self_attn\\\\.(q|v)_proj\"" + cfg.substr(e + 1) + FUZZ_SHARD_SEP + w);
        }
    }
    ql_assert(system(("rm -rf " + src + " " + dst).c_str()) == 0, "rm");
    printf("seed corpora written to %s/\n", OUT.c_str());
    return 0;
}
