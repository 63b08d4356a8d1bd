// test_formats.cpp: config.json (llama, mistral, qwen2, qwen3), the weights each implies
// (for_each_weight), safetensors (single and sharded) and JSON, good and hostile.
// Good files load with the values transformers would use; every broken file must end the process
// with exit code 1 and a message that names the file and the tensor (or key): never a crash, never
// a silent wrong number. Each bad case runs in a forked child so its exit can be observed.
#include "../formats.h" // defines: json_parse, load_config, st_open_model, st_write, checkpoint_view
#include "test.h"       // defines: check, test_summary

static const std::string TMP = "build/tmp_formats";

static void write_bytes(const std::string& path, const std::vector<uint8_t>& b) {
    FILE* f = fopen(path.c_str(), "wb"); ql_assert(f && fwrite(b.data(), 1, b.size(), f) == b.size() && fclose(f) == 0, "write %s", path.c_str());
}
static void write_text(const std::string& path, const std::string& s) { write_bytes(path, std::vector<uint8_t>(s.begin(), s.end())); }
// a raw safetensors file: given header text and data size
static std::string raw_st(const std::string& name, const std::string& header, size_t data) {
    std::vector<uint8_t> b(8 + header.size() + data, 0x3c);
    uint64_t n = header.size(); for (int k = 0; k < 8; k++) b[k] = (uint8_t)(n >> (8 * k));
    memcpy(&b[8], header.data(), header.size());
    std::string p = TMP + "/" + name + ".safetensors";
    write_bytes(p, b);
    return p;
}
// a model directory: config text + tensors (a copy of the tied checkpoint, edited by `edit`)
static std::string model_dir(const std::string& name, const std::string& config, std::function<void(std::vector<STOut>&)> edit) {
    static SafeTensors src = st_open_model("test/ref/tied");
    std::string d = TMP + "/" + name;
    ql_assert(system(("mkdir -p " + d).c_str()) == 0, "mkdir");
    write_text(d + "/config.json", config);
    std::vector<STOut> ts;
    for (auto& kv : src.tensors) ts.push_back({kv.first, kv.second.dtype, kv.second.shape, kv.second.data});
    edit(ts);
    st_write(d + "/model.safetensors", ts);
    return d;
}
static void load_model(const std::string& d) { Config c = load_config(d + "/config.json"); SafeTensors st = st_open_model(d); checkpoint_view(c, st); }
static std::string replace(std::string s, const std::string& a, const std::string& b) { size_t i = s.find(a); ql_assert(i != std::string::npos, "replace %s", a.c_str()); return s.replace(i, a.size(), b); }

static void test_json() {
    const char* doc = "{\"a\": \"\\u00e9\\ud83d\\ude00\\n\", \"b\": [1, 2.5, -3e2, 18446744073709551615], \"c\": null, \"d\": {\"e\": true}}  ";
    Json j; std::string err;
    bool ok = json_parse(doc, strlen(doc), j, err);
    check(ok && j.get("a")->str == "\xc3\xa9\xf0\x9f\x98\x80\n" && j.get("b")->arr[1].num == 2.5 && j.get("b")->arr[2].num == -300 &&
          j.get("b")->arr[3].is_uint && j.get("b")->arr[3].u == UINT64_MAX && j.get("c")->type == Json::NUL && j.get("d")->get("e")->b,
          "JSON: strings with escapes and surrogate pairs, numbers, nesting");
    auto bad = [&](const char* name, const std::string& s, const char* want) {
        Json x; std::string e;
        bool r = json_parse(s.data(), s.size(), x, e);
        check(!r && e.find(want) != std::string::npos, "JSON rejects %-24s: %s", name, e.c_str());
    };
    bad("trailing garbage", "{} x", "trailing");
    bad("duplicate keys", "{\"a\":1,\"a\":2}", "duplicate key");
    bad("deep nesting", std::string(100, '[') + std::string(100, ']'), "too deep");
    bad("unterminated string", "{\"a\":\"abc", "unterminated");
    bad("lone surrogate", "\"\\ud800\"", "surrogate");
    bad("leading zero", "[01]", "expected");
    bad("control char", "\"a\x01\"", "control");
    bad("truncated", "{\"a\": [1, 2", "unterminated");
    bad("empty", "", "unexpected end");
    std::string many = "[0";
    for (size_t k = 1; k < JsonParser::MAX_VALUES - 1; k++) many += ",0";   // the array and its elements: MAX_VALUES values
    many += "]";
    Json big; std::string e;
    check(json_parse(many.data(), many.size(), big, e) && big.arr.size() == JsonParser::MAX_VALUES - 1, "JSON takes %zu values", JsonParser::MAX_VALUES);
    many.insert(many.size() - 1, ",0");
    bad("one value too many", many, "more than 1048576 values");
}

static void test_configs() {
    Config t = load_config("test/ref/tied/config.json"), u = load_config("test/ref/untied/config.json");
    check(t.dim == 128 && t.hidden_dim == 256 && t.n_layers == 2 && t.n_heads == 2 && t.n_kv_heads == 1 && t.head_dim == 64 &&
          t.vocab_size == 512 && t.tied && t.rope_type == ROPE_DEFAULT && t.rope_theta == 10000.0f && t.norm_eps == 1e-5f && t.dtype == DT_BF16,
          "config tied: GQA, tied embeddings, default RoPE from rope_parameters, dtype");
    check(u.n_heads == 4 && u.n_kv_heads == 2 && u.head_dim == 64 && u.q_dim() == 256 && u.dim == 128 && !u.tied && u.rope_type == ROPE_LLAMA3 &&
          u.rope_factor == 8.0f && u.rope_low_freq == 1.0f && u.rope_high_freq == 4.0f && u.rope_orig_max == 64 && u.rope_theta == 500000.0f,
          "config untied: head_dim != H/nh, llama3 RoPE scaling");
    // the older form: rope_theta + rope_scaling with "type", torch_dtype
    std::string old = "{\"model_type\":\"llama\",\"hidden_size\":64,\"intermediate_size\":96,\"num_hidden_layers\":1,\"num_attention_heads\":4,"
                      "\"vocab_size\":10,\"rope_theta\":500000.0,\"rope_scaling\":{\"type\":\"llama3\",\"factor\":32.0,\"low_freq_factor\":1.0,"
                      "\"high_freq_factor\":4.0,\"original_max_position_embeddings\":8192},\"torch_dtype\":\"float16\",\"tie_word_embeddings\":true}";
    write_text(TMP + "/old.json", old);
    Config o = load_config(TMP + "/old.json");
    check(o.rope_type == ROPE_LLAMA3 && o.rope_factor == 32.0f && o.rope_theta == 500000.0f && o.n_kv_heads == 4 && o.head_dim == 16 &&
          o.dtype == DT_F16 && o.tied, "config old form: rope_theta + rope_scaling{type}, torch_dtype, defaults for nkv and head_dim");
    auto bad = [&](const char* name, const std::string& a, const std::string& b, std::vector<std::string> want) {
        std::string p = TMP + "/bad_" + std::to_string(g_pass + g_fail) + ".json";
        write_text(p, replace(old, a, b));
        want.push_back(p);
        expect_error(name, [p] { load_config(p); }, want);
    };
    bad("config: unknown model_type", "\"llama\"", "\"gpt2\"", {"model_type \"gpt2\""});
    bad("config: hidden_act", "\"vocab_size\"", "\"hidden_act\":\"gelu\",\"vocab_size\"", {"hidden_act \"gelu\""});
    bad("config: mlp_bias", "\"vocab_size\"", "\"mlp_bias\":true,\"vocab_size\"", {"mlp_bias"});
    bad("config: rope type yarn", "\"type\":\"llama3\"", "\"type\":\"yarn\"", {"rope type \"yarn\""});
    bad("config: heads vs kv heads", "\"num_attention_heads\":4", "\"num_attention_heads\":4,\"num_key_value_heads\":3", {"num_key_value_heads"});
    bad("config: missing hidden_size", "\"hidden_size\":64,", "", {"missing \"hidden_size\""});
    bad("config: negative size", "\"intermediate_size\":96", "\"intermediate_size\":-96", {"intermediate_size"});
    bad("config: dtype", "\"float16\"", "\"int8\"", {"dtype \"int8\""});
    bad("config: invalid JSON", "}", "", {"invalid JSON"});
}

// Qwen/Qwen2.5-7B's and Qwen/Qwen3-8B's config.json as published (transformers 4.43 / 4.51 era)
static const std::string QWEN25_7B = R"({
  "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151643,
  "hidden_act": "silu", "hidden_size": 3584, "initializer_range": 0.02, "intermediate_size": 18944,
  "max_position_embeddings": 131072, "max_window_layers": 28, "model_type": "qwen2", "num_attention_heads": 28,
  "num_hidden_layers": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
  "sliding_window": 131072, "tie_word_embeddings": false, "torch_dtype": "bfloat16", "transformers_version": "4.43.1",
  "use_cache": true, "use_mrope": false, "use_sliding_window": false, "vocab_size": 152064
})";
static const std::string QWEN3_8B = R"({
  "architectures": ["Qwen3ForCausalLM"], "attention_bias": false, "attention_dropout": 0.0, "bos_token_id": 151643,
  "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
  "intermediate_size": 12288, "max_position_embeddings": 40960, "max_window_layers": 36, "model_type": "qwen3",
  "num_attention_heads": 32, "num_hidden_layers": 36, "num_key_value_heads": 8, "rms_norm_eps": 1e-06,
  "rope_scaling": null, "rope_theta": 1000000, "sliding_window": null, "tie_word_embeddings": false,
  "torch_dtype": "bfloat16", "transformers_version": "4.51.0", "use_cache": true, "use_sliding_window": false,
  "vocab_size": 151936
})";
static Config config_of(const std::string& name, const std::string& text) {
    std::string p = TMP + "/" + name + ".json";
    write_text(p, text);
    return load_config(p);
}

// qwen2/qwen3 configs as transformers reads them: biases, QK-norm, head_dim, the sliding-window keys, the
// defaults of each class; what other families mean is refused by name
static void test_qwen_configs() {
    Config a = config_of("qwen25_7b", QWEN25_7B);
    check(a.dim == 3584 && a.hidden_dim == 18944 && a.n_layers == 28 && a.n_heads == 28 && a.n_kv_heads == 4 && a.head_dim == 128 &&
          a.vocab_size == 152064 && !a.tied && a.rope_theta == 1e6f && a.norm_eps == 1e-6f && a.rope_type == ROPE_DEFAULT && a.max_seq_len == 131072,
          "config Qwen2.5-7B: H 3584 I 18944 L 28 heads 28/4 hd 128 V 152064 untied, theta 1e6, eps 1e-6");
    check(a.qkv_bias && !a.o_bias && !a.qk_norm && a.sliding_window == 0,
          "config Qwen2.5-7B: q/k/v biases, none on o, no QK-norm; sliding_window 131072 unused (use_sliding_window false)");
    Config b = config_of("qwen3_8b", QWEN3_8B);
    check(b.dim == 4096 && b.hidden_dim == 12288 && b.n_layers == 36 && b.n_heads == 32 && b.n_kv_heads == 8 && b.head_dim == 128 &&
          b.vocab_size == 151936 && !b.tied && b.rope_theta == 1e6f && b.norm_eps == 1e-6f && b.max_seq_len == 40960,
          "config Qwen3-8B: H 4096 I 12288 L 36 heads 32/8 hd 128 V 151936 untied, theta 1e6");
    check(b.qk_norm && !b.qkv_bias && !b.o_bias && b.sliding_window == 0, "config Qwen3-8B: QK-norm, no biases (attention_bias false), no sliding window");
    auto edit = [&](const char* name, const std::string& base, std::vector<std::pair<std::string, std::string>> subs) {
        std::string t = base;
        for (auto& ab : subs) t = replace(t, ab.first, ab.second);
        return config_of(name, t);
    };
    Config c = edit("qwen3_bias", QWEN3_8B, {{"\"attention_bias\": false", "\"attention_bias\": true"}});
    check(c.qkv_bias && c.o_bias && c.qk_norm, "qwen3 attention_bias true: biases on q, k, v and o");
    c = edit("qwen3_hd", QWEN3_8B, {{"\"head_dim\": 128, ", ""}, {"\"hidden_size\": 4096", "\"hidden_size\": 1024"}});
    check(c.head_dim == 128 && c.q_dim() == 4096, "qwen3 without head_dim: 128 (Qwen3Config's default), not H/nh = 32");
    c = edit("qwen3_nokv", QWEN3_8B, {{"\"num_key_value_heads\": 8, ", ""}});
    check(c.n_kv_heads == 32, "qwen3 without num_key_value_heads: 32 (the class default)");
    c = edit("qwen2_attn_bias", QWEN25_7B, {{"\"use_cache\"", "\"attention_bias\": false, \"use_cache\""}});
    check(c.qkv_bias && !c.o_bias, "qwen2 ignores attention_bias (Qwen2Attention hard-codes q/k/v biases, none on o)");
    c = edit("llama_bias", QWEN25_7B, {{"\"qwen2\"", "\"llama\""}, {"\"use_cache\"", "\"attention_bias\": true, \"use_cache\""}});
    check(c.qkv_bias && c.o_bias && !c.qk_norm && c.max_seq_len == 131072, "llama attention_bias true: biases on q, k, v and o");
    c = edit("mistral_bias", QWEN25_7B, {{"\"qwen2\"", "\"mistral\""}, {"\"use_cache\"", "\"attention_bias\": true, \"use_cache\""}});
    check(!c.qkv_bias && !c.o_bias && c.sliding_window == 131072, "mistral: no biases whatever attention_bias says; sliding_window applies");
    c = edit("mistral_nowindow", QWEN25_7B, {{"\"qwen2\"", "\"mistral\""}, {"\"sliding_window\": 131072, ", ""}});
    check(c.sliding_window == 4096, "mistral without sliding_window: 4096 (MistralConfig's default)");
    // sliding windows: only with use_sliding_window, only if some layer slides
    c = edit("qwen2_sw_none", QWEN25_7B, {{"\"use_sliding_window\": false", "\"use_sliding_window\": true"}});
    check(c.sliding_window == 0, "qwen2 use_sliding_window, max_window_layers 28 of 28 layers: no layer slides");
    c = edit("qwen2_sw", QWEN25_7B, {{"\"use_sliding_window\": false", "\"use_sliding_window\": true"}, {"\"max_window_layers\": 28", "\"max_window_layers\": 20"},
                                     {"\"sliding_window\": 131072", "\"sliding_window\": 4096"}});
    check(c.sliding_window == 4096, "qwen2 use_sliding_window, layers 20..27 slide: window 4096 (the trainer refuses --seq > 4096)");
    std::string lt = "\"layer_types\": [\"full_attention\"";
    for (int l = 1; l < 28; l++) lt += l == 27 ? ", \"sliding_attention\"" : ", \"full_attention\"";
    c = edit("qwen2_lt", QWEN25_7B, {{"\"use_sliding_window\": false", "\"use_sliding_window\": true"}, {"\"use_cache\"", lt + "], \"use_cache\""}});
    check(c.sliding_window == 131072, "qwen2 layer_types with one sliding_attention layer: window 131072 (layer_types wins over max_window_layers)");
    c = edit("qwen2_lt_off", QWEN25_7B, {{"\"use_cache\"", lt + "], \"use_cache\""}});
    check(c.sliding_window == 0, "qwen2 layer_types sliding but use_sliding_window false: no window (Qwen2Config sets it to None)");
    auto bad = [&](const char* name, const std::string& base, const std::string& a, const std::string& b, std::vector<std::string> want) {
        std::string p = TMP + "/bad_qwen_" + std::to_string(g_pass + g_fail) + ".json";
        write_text(p, replace(base, a, b));
        want.push_back(p);
        expect_error(name, [p] { load_config(p); }, want);
    };
    std::string on = replace(QWEN25_7B, "\"use_sliding_window\": false", "\"use_sliding_window\": true");
    bad("qwen2: layer_types too short", on, "\"use_cache\"", "\"layer_types\": [\"full_attention\"], \"use_cache\"", {"layer_types", "28"});
    std::string chunked = "\"layer_types\": [";
    for (int l = 0; l < 28; l++) chunked += std::string(l ? ", " : "") + (l == 3 ? "\"chunked_attention\"" : "\"full_attention\"");
    bad("qwen2: layer_types name", on, "\"use_cache\"", chunked + "], \"use_cache\"", {"layer_types", "chunked_attention"});
    bad("qwen2: use_sliding_window 1", QWEN25_7B, "\"use_sliding_window\": false", "\"use_sliding_window\": 1", {"use_sliding_window", "true or false"});
    bad("qwen3: odd head_dim", QWEN3_8B, "\"head_dim\": 128", "\"head_dim\": 127", {"head_dim 127"});
    bad("qwen2_moe refused", QWEN25_7B, "\"qwen2\"", "\"qwen2_moe\"", {"model_type \"qwen2_moe\"", "mixture of experts"});
    bad("qwen3_moe refused", QWEN3_8B, "\"qwen3\"", "\"qwen3_moe\"", {"model_type \"qwen3_moe\"", "mixture of experts"});
    bad("gemma2 refused", QWEN25_7B, "\"qwen2\"", "\"gemma2\"", {"model_type \"gemma2\"", "(1 + weight)"});
    bad("phi3 refused", QWEN25_7B, "\"qwen2\"", "\"phi3\"", {"model_type \"phi3\"", "qkv_proj"});
    bad("qwen2_vl refused", QWEN25_7B, "\"qwen2\"", "\"qwen2_vl\"", {"model_type \"qwen2_vl\"", "llama, mistral, qwen2, qwen3"});
}

// The weights each config implies: names and shapes as Hugging Face writes them, biases right after
// their linear, QK-norms with the layer's norms, nothing extra for Llama
static void test_weights() {
    struct Seen { std::vector<Weight> all; int bias = 0, qk = 0, linear = 0; };
    auto walk = [](const Config& c) { Seen s; for_each_weight(c, [&](const Weight& w) { s.all.push_back(w); s.bias += w.bias(); s.qk += w.id == W_Q_NORM || w.id == W_K_NORM; s.linear += w.linear(); }); return s; };
    auto find = [](const Seen& s, const std::string& name) -> const Weight* { for (auto& w : s.all) if (w.name == name) return &w; return nullptr; };
    auto after = [](const Seen& s, const std::string& a, const std::string& b) {   // b comes right after a
        for (size_t i = 0; i + 1 < s.all.size(); i++) if (s.all[i].name == a) return s.all[i + 1].name == b;
        return false;
    };
    Seen q2 = walk(config_of("w_qwen2", QWEN25_7B));
    const Weight *qb = find(q2, "model.layers.0.self_attn.q_proj.bias"), *kb = find(q2, "model.layers.27.self_attn.k_proj.bias"),
                 *vb = find(q2, "model.layers.3.self_attn.v_proj.bias");
    check(qb && kb && vb && qb->shape == std::vector<int64_t>{3584} && kb->shape == std::vector<int64_t>{512} && vb->shape == std::vector<int64_t>{512} &&
          qb->id == W_Q_BIAS && kb->id == W_K_BIAS && kb->layer == 27 && vb->id == W_V_BIAS && !find(q2, "model.layers.0.self_attn.o_proj.bias") &&
          q2.bias == 3 * 28 && q2.qk == 0 && q2.linear == 7 * 28 && q2.all.size() == (size_t)(2 + 28 * (2 + 7 + 3) + 1) &&
          after(q2, "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.q_proj.bias"),
          "Qwen2.5-7B weights: q/k/v_proj.bias [3584]/[512]/[512] after their linear, no o_proj.bias, %zu tensors", q2.all.size());
    Seen q3 = walk(config_of("w_qwen3", QWEN3_8B));
    const Weight *qn = find(q3, "model.layers.0.self_attn.q_norm.weight"), *kn = find(q3, "model.layers.35.self_attn.k_norm.weight"),
                 *qp = find(q3, "model.layers.0.self_attn.q_proj.weight"), *op = find(q3, "model.layers.0.self_attn.o_proj.weight");
    check(qn && kn && qn->shape == std::vector<int64_t>{128} && kn->shape == std::vector<int64_t>{128} && qn->id == W_Q_NORM && kn->id == W_K_NORM &&
          qp && qp->shape == (std::vector<int64_t>{4096, 4096}) && op && op->shape == (std::vector<int64_t>{4096, 4096}) &&
          q3.bias == 0 && q3.qk == 2 * 36 && q3.all.size() == (size_t)(3 + 36 * (2 + 2 + 7)) &&
          find(q3, "lm_head.weight") && find(q3, "lm_head.weight")->shape == (std::vector<int64_t>{151936, 4096}),
          "Qwen3-8B weights: q_norm/k_norm.weight [128] per layer, no biases, lm_head [151936, 4096], %zu tensors", q3.all.size());
    Config cb = config_of("w_qwen3b", replace(QWEN3_8B, "\"attention_bias\": false", "\"attention_bias\": true"));
    Seen q3b = walk(cb);
    const Weight* ob = find(q3b, "model.layers.0.self_attn.o_proj.bias");
    check(ob && ob->shape == std::vector<int64_t>{4096} && ob->id == W_O_BIAS && q3b.bias == 4 * 36 && proj_bias_id(P_O) == W_O_BIAS && proj_bias_id(P_GATE) < 0,
          "Qwen3 attention_bias: o_proj.bias [4096] too (4 biases a layer); gate/up/down never");
    Seen ll = walk(load_config("test/ref/untied/config.json"));
    check(ll.bias == 0 && ll.qk == 0 && ll.all.size() == (size_t)(2 + 2 * 9 + 1), "Llama (test/ref/untied): no bias, no QK-norm, %zu tensors", ll.all.size());

    // checkpoint_view on a tiny qwen3 checkpoint with attention_bias: every tensor found, a missing
    // k_norm or a bias of the wrong shape refused by name
    std::string cfg = R"({"model_type": "qwen3", "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 2, "num_attention_heads": 2,
        "num_key_value_heads": 1, "head_dim": 8, "vocab_size": 10, "attention_bias": true, "tie_word_embeddings": true})";
    Config tc = config_of("tiny_qwen3", cfg);
    static std::vector<float> zeros(16 * 24, 0.0f);
    auto tiny = [&](const char* name, std::function<void(std::vector<STOut>&)> ed) {
        std::string d = TMP + "/" + name;
        ql_assert(system(("mkdir -p " + d).c_str()) == 0, "mkdir");
        write_text(d + "/config.json", cfg);
        std::vector<STOut> ts;
        for_each_weight(tc, [&](const Weight& w) { ts.push_back({w.name, DT_F32, w.shape, zeros.data()}); });
        ed(ts);
        st_write(d + "/model.safetensors", ts);
        return d;
    };
    std::string d = tiny("tiny_qwen3_ok", [](std::vector<STOut>&) {});
    SafeTensors st = st_open_model(d);
    CheckpointView v = checkpoint_view(tc, st);
    check(v.at(W_Q_NORM, 1) == st.find("model.layers.1.self_attn.q_norm.weight") && v.at(W_O_BIAS, 0) == st.find("model.layers.0.self_attn.o_proj.bias") &&
          v.linear[1][P_K] == st.find("model.layers.1.self_attn.k_proj.weight") && st.tensors.size() == 1 + 2 * (2 + 2 + 7 + 4) + 1,
          "tiny qwen3 checkpoint: checkpoint_view finds q_norm, o_proj.bias, the linears (%zu tensors)", st.tensors.size());
    d = tiny("tiny_qwen3_nonorm", [](std::vector<STOut>& ts) { ts.erase(std::remove_if(ts.begin(), ts.end(), [](const STOut& x) { return x.name == "model.layers.1.self_attn.k_norm.weight"; }), ts.end()); });
    expect_error("qwen3 without k_norm", [d] { load_model(d); }, {"missing tensor \"model.layers.1.self_attn.k_norm.weight\""});
    d = tiny("tiny_qwen3_badbias", [](std::vector<STOut>& ts) { for (auto& x : ts) if (x.name == "model.layers.0.self_attn.v_proj.bias") x.shape = {16}; });
    expect_error("qwen3 v_proj.bias of q's shape", [d] { load_model(d); }, {"model.layers.0.self_attn.v_proj.bias", "[16]", "[8]"});
}

static void test_safetensors() {
    // good: the committed checkpoints, and a round trip through our writer
    SafeTensors t = st_open_model("test/ref/tied"), u = st_open_model("test/ref/untied");
    Config ct = load_config("test/ref/tied/config.json"), cu = load_config("test/ref/untied/config.json");
    CheckpointView vt = checkpoint_view(ct, t), vu = checkpoint_view(cu, u);
    check(!t.find("lm_head.weight") && vt.lm_head() == vt.at(W_EMBED), "tied checkpoint: no lm_head.weight, lm_head = embed_tokens");
    check(u.find("lm_head.weight") && vu.lm_head() != vu.at(W_EMBED), "untied checkpoint: lm_head.weight is its own tensor");
    std::string d = model_dir("roundtrip", "{}", [](std::vector<STOut>&) {});
    SafeTensors r = st_open(d + "/model.safetensors");
    bool same = r.tensors.size() == t.tensors.size() && r.metadata["format"] == "pt";
    for (auto& kv : t.tensors) { const STensor* x = r.find(kv.first); same = same && x && x->shape == kv.second.shape && x->nbytes == kv.second.nbytes && !memcmp(x->data, kv.second.data, x->nbytes); }
    uint64_t hn = 0; for (int k = 7; k >= 0; k--) hn = (hn << 8) | r.files[0]->data[k];
    check(same && hn % 8 == 0, "writer round trip: same tensors and bytes, header padded to 8 (%llu), __metadata__ format pt", (unsigned long long)hn);
    // sharded: two shards + index, as save_pretrained writes them
    std::string sd = TMP + "/sharded";
    ql_assert(system(("mkdir -p " + sd + " && cp test/ref/tied/config.json " + sd).c_str()) == 0, "mkdir");
    std::vector<STOut> a, b; std::string wm;
    for (auto& kv : t.tensors) {
        bool first = kv.first.find("layers.1.") == std::string::npos;
        (first ? a : b).push_back({kv.first, kv.second.dtype, kv.second.shape, kv.second.data});
        wm += (wm.empty() ? "" : ",") + json_quote(kv.first) + ":" + json_quote(first ? "model-00001-of-00002.safetensors" : "model-00002-of-00002.safetensors");
    }
    st_write(sd + "/model-00001-of-00002.safetensors", a); st_write(sd + "/model-00002-of-00002.safetensors", b);
    std::string index = "{\"metadata\":{\"total_size\":1},\"weight_map\":{" + wm + "}}";
    write_text(sd + "/model.safetensors.index.json", index);
    SafeTensors s = st_open_model(sd);
    checkpoint_view(ct, s);
    check(s.files.size() == 2 && s.tensors.size() == t.tensors.size(), "sharded checkpoint (index + 2 shards) loads: %zu tensors", s.tensors.size());
    write_text(sd + "/model.safetensors.index.json", replace(index, "model-00002-of-00002", "model-00003-of-00002"));
    expect_error("index: shard file missing", [sd] { st_open_model(sd); }, {"cannot open", "model-00003-of-00002.safetensors"});
    write_text(sd + "/model.safetensors.index.json", replace(index, "\"model-00002-of-00002.safetensors\"", "\"../model-00002-of-00002.safetensors\""));
    expect_error("index: path outside the dir", [sd] { st_open_model(sd); }, {"not a plain file name"});
    write_text(sd + "/model.safetensors.index.json", replace(index, "\"model-00002-of-00002.safetensors\"", "\"model-00002-of-00002.safetensors\\u0000.bak\""));
    expect_error("index: NUL in a shard name (the OS would open a shorter name)", [sd] { st_open_model(sd); }, {"not a plain file name"});
    write_text(sd + "/model.safetensors.index.json", replace(index, "\"weight_map\":{", "\"weight_map\":{\"model.extra.weight\":\"model-00001-of-00002.safetensors\","));
    expect_error("index: tensor not in shard", [sd] { st_open_model(sd); }, {"model.extra.weight", "does not contain"});

    // hostile headers (raw files)
    const std::string ok2 = "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,16]}}";
    std::string good = raw_st("good", ok2, 16);
    st_open(good);
    check(true, "raw two-tensor file loads");
    auto bad = [&](const char* name, const std::string& header, size_t data, std::vector<std::string> want) {
        std::string p = raw_st("bad" + std::to_string(g_pass + g_fail), header, data);
        want.push_back(p);
        expect_error(name, [p] { st_open(p); }, want);
    };
    bad("overlapping offsets", replace(ok2, "[8,16]", "[4,12]"), 12, {"\"b\"", "overlaps"});
    bad("hole between tensors", replace(ok2, "[8,16]", "[12,20]"), 20, {"\"b\"", "hole"});
    bad("bytes after last tensor", ok2, 24, {"8 bytes after the last tensor"});
    bad("truncated data", ok2, 12, {"\"b\"", "past the data"});
    bad("size != shape*dtype", replace(ok2, "\"shape\":[2],\"data_offsets\":[8,16]", "\"shape\":[3],\"data_offsets\":[8,16]"), 16, {"\"b\"", "needs 12"});
    bad("unknown dtype", replace(ok2, "\"F32\"", "\"X9\""), 16, {"\"a\"", "unknown dtype \"X9\""});
    bad("reversed offsets", replace(ok2, "[0,8]", "[8,0]"), 16, {"\"a\"", "reversed"});
    bad("negative shape", replace(ok2, "[2],\"data_offsets\":[0,8]", "[-2],\"data_offsets\":[0,8]"), 16, {"\"a\"", "shape"});
    bad("invalid header JSON", replace(ok2, "}}", "}"), 16, {"invalid header JSON"});
    bad("duplicate tensor name", replace(ok2, "\"b\"", "\"a\""), 16, {"duplicate key \"a\""});
    bad("metadata not strings", replace(ok2, "{\"a\"", "{\"__metadata__\":{\"x\":1},\"a\""), 16, {"__metadata__"});
    bad("sub-byte dtype", replace(ok2, "\"dtype\":\"F32\",\"shape\":[2]", "\"dtype\":\"F4\",\"shape\":[3]"), 16, {"whole bytes"});
    { std::vector<uint8_t> b(8 + 4, ' '); b[0] = 0xff; b[5] = 0x01; b[8] = '{';
      write_bytes(TMP + "/huge.safetensors", b);
      expect_error("header length 2^40", [] { st_open(TMP + "/huge.safetensors"); }, {"huge.safetensors", "100 MB limit"}); }
    { std::string p = raw_st("pastend", ok2, 16); std::vector<uint8_t> b = read_file(p); b[0] = 0xf0; b[1] = 0x0f; write_bytes(p, b);
      expect_error("header length past EOF", [p] { st_open(p); }, {p, "past the end"}); }
    write_bytes(TMP + "/tiny.safetensors", {1, 2, 3});
    expect_error("3-byte file", [] { st_open(TMP + "/tiny.safetensors"); }, {"tiny.safetensors", "not a safetensors file"});
    { std::vector<uint8_t> b = read_file("test/ref/tied/model.safetensors"); b.resize(b.size() - 1000);
      ql_assert(system(("mkdir -p " + TMP + "/trunc && cp test/ref/tied/config.json " + TMP + "/trunc").c_str()) == 0, "mkdir");
      write_bytes(TMP + "/trunc/model.safetensors", b);
      expect_error("truncated checkpoint", [] { load_model(TMP + "/trunc"); }, {"trunc/model.safetensors", "past the data"}); }

    // model-level: the checkpoint against its config
    std::string cfg = std::string((const char*)read_file("test/ref/tied/config.json").data(), read_file("test/ref/tied/config.json").size());
    std::string dd = model_dir("missing", cfg, [](std::vector<STOut>& ts) {
        ts.erase(std::remove_if(ts.begin(), ts.end(), [](const STOut& x) { return x.name == "model.layers.1.mlp.down_proj.weight"; }), ts.end()); });
    expect_error("missing tensor", [dd] { load_model(dd); }, {"missing tensor \"model.layers.1.mlp.down_proj.weight\"", dd});
    static std::vector<int32_t> ints(128 * 128, 7);
    dd = model_dir("wrongdtype", cfg, [](std::vector<STOut>& ts) { for (auto& x : ts) if (x.name == "model.layers.0.self_attn.q_proj.weight") x.dtype = DT_I32, x.data = ints.data(); });
    expect_error("wrong dtype", [dd] { load_model(dd); }, {"model.layers.0.self_attn.q_proj.weight", "dtype I32", dd});
    dd = model_dir("shape", replace(cfg, "\"intermediate_size\": 256", "\"intermediate_size\": 300"), [](std::vector<STOut>&) {});
    expect_error("config/shape mismatch", [dd] { load_model(dd); }, {"model.layers.0.mlp.gate_proj.weight", "[256, 128]", "[300, 128]", dd});
    dd = model_dir("untied_no_head", replace(cfg, "\"tie_word_embeddings\": true", "\"tie_word_embeddings\": false"), [](std::vector<STOut>&) {});
    expect_error("untied without lm_head", [dd] { load_model(dd); }, {"missing tensor \"lm_head.weight\""});
    expect_error("no checkpoint in dir", [] { st_open_model(TMP); }, {"no model.safetensors"});
}

// A save that fails part-way (full disk, simulated by the write hook) must leave the previous file
// intact and loadable, say what failed, and leave no temporary file behind.
static void test_failed_save() {
    std::string p = TMP + "/state.safetensors";
    std::vector<float> v1(1000, 1.0f), v2(1000, 2.0f);
    st_write(p, {{"lora", DT_F32, {1000}, v1.data()}}, {{"step", "100"}});
    for (long long after : {0LL, 10LL, 3000LL}) {
        expect_error(("save fails after " + std::to_string(after) + " bytes").c_str(), [&] {
            ql_error_mode().fail_writes_after = after;
            st_write(p, {{"lora", DT_F32, {1000}, v2.data()}}, {{"step", "200"}});
        }, {"disk full?", "previous", p});
        SafeTensors st = st_open(p);
        std::vector<float> back = st_f32(st.get("lora", {1000}, DT_F32));
        bool tmp_left = false;
        for (const std::string& n : dir_entries(TMP)) tmp_left |= n.rfind("state.safetensors.tmp", 0) == 0;
        check(back == v1 && st.metadata["step"] == "100" && !tmp_left,
              "after the failed save: the previous file is intact and loads (step %s), no temporary file left", st.metadata["step"].c_str());
    }
    // another writer's temporary file, half written: a save of the same file must not touch it (a
    // fixed name PATH.tmp made two runs write through one file and rename each other's bytes)
    write_text(p + ".tmp", "another run's half-written bytes");
    st_write(p, {{"lora", DT_F32, {1000}, v2.data()}}, {{"step", "300"}});
    check(file_exists(p + ".tmp") && text_of_file(p + ".tmp") == "another run's half-written bytes" && st_open(p).metadata["step"] == "300",
          "two writers of one file: each has its own temporary name (PATH.tmp.PID.N); the other's stays untouched");
}

// Non-regular files are refused by their stat, before an open that would block (a FIFO waits for a
// writer forever). Each case runs with an alarm: a hang fails the test instead of stalling it.
static void test_special_files() {
    std::string fifo = TMP + "/fifo", dir = TMP + "/fifo_model";
    ql_assert(mkfifo(fifo.c_str(), 0644) == 0 && system(("mkdir -p " + dir).c_str()) == 0 && mkfifo((dir + "/config.json").c_str(), 0644) == 0, "mkfifo");
    expect_error("read_file of a FIFO", [fifo] { alarm(5); read_file(fifo); }, {fifo, "not a regular file", "FIFO"});
    expect_error("st_open of a FIFO", [fifo] { alarm(5); st_open(fifo); }, {fifo, "not a regular file"});
    expect_error("config.json is a FIFO", [dir] { alarm(5); load_config(dir + "/config.json"); }, {dir + "/config.json", "not a regular file"});
    expect_error("a directory as a file", [] { alarm(5); st_open(TMP); }, {"not a regular file (a directory)"});
    check(file_exists(fifo) && file_exists(TMP), "file_exists: anything at the path (stat only, no open)");
}

// Output directories (formats.h §10b): one writer per directory, and every save switched in whole.
static std::string read_text(const std::string& p) { return file_exists(p) ? text_of_file(p) : "(missing)"; }
static void write_set(const std::string& dir, const std::string& tag) {
    out_write_set(dir, [&](const std::string& s) { write_text_file(s + "/adapter_config.json", "r " + tag); write_text_file(s + "/adapter_model.safetensors", "w " + tag); });
}
static bool no_siblings(const std::string& dir) {
    bool none = true;
    for (const std::string& e : dir_entries(parent_dir(dir))) none &= !out_sibling_of(e, base_name(dir), "new") && !out_sibling_of(e, base_name(dir), "old");
    return none;
}
static void test_out_dirs() {
    std::string d = TMP + "/out/run";
    write_set(d, "16");
    write_text(d + "/notes.txt", "the user's notes");
    write_set(d, "16b");
    check(read_text(d + "/adapter_config.json") == "r 16b" && read_text(d + "/adapter_model.safetensors") == "w 16b" &&
          read_text(d + "/notes.txt") == "the user's notes" && no_siblings(d),
          "a new set replaces the old one whole; a file qlora did not write stays; no sibling left behind");
    // a save that fails after its first file (a full disk): the previous set, complete
    expect_error("second file of a save fails", [d] {
        out_write_set(d, [&](const std::string& s) {
            write_text_file(s + "/adapter_model.safetensors", "w 4");
            ql_error_mode().fail_writes_after = 2;
            write_text_file(s + "/adapter_config.json", "r 4");
        });
    }, {"disk full?", d + " keeps its previous files"});
    check(read_text(d + "/adapter_config.json") == "r 16b" && read_text(d + "/adapter_model.safetensors") == "w 16b" && no_siblings(d),
          "after a save that failed half-way: DIR holds the whole previous set (not rank-4 weights beside \"r\": 16), no sibling left");
    // a kill after the switch, before the old set was removed: the next lock finishes the job
    std::string left = TMP + "/out/.run.new.999999.7";
    ql_assert(system(("mkdir -p " + left).c_str()) == 0, "mkdir");
    write_text(left + "/adapter_config.json", "r old"); write_text(left + "/todo.txt", "moved back");
    for (auto& kv : out_locks()) close(kv.second);   // as a fresh process: the lock taken again (it recovers)
    out_locks().clear();
    out_lock(d);
    check(!file_exists(left) && read_text(d + "/todo.txt") == "moved back" && read_text(d + "/adapter_config.json") == "r 16b",
          "a sibling a killed save left: retired at the next lock (qlora's files deleted, the user's moved into DIR)");
    // one writer at a time: a second process is refused, with the first's pid, after any number of switches
    write_set(d, "x");
    long me = (long)getpid();
    expect_error("a second writer of DIR", [d] { out_locks().clear(); out_lock(d); },
                 {d, "being written by another qlora run", "pid " + std::to_string(me), TMP + "/out/.run.lock"});
    expect_error("a second writer, other spelling", [d] { out_locks().clear(); out_lock(TMP + "/out/../out/run/"); }, {"pid " + std::to_string(me)});
    pid_t pid = fork();
    if (pid == 0) { out_locks().clear(); out_lock(TMP + "/out/free"); _exit(0); }
    int st = 0; waitpid(pid, &st, 0);
    out_lock(TMP + "/out/free");
    check(WIFEXITED(st) && WEXITSTATUS(st) == 0, "the lock goes with the process that held it: DIR can be locked again after it exits");
    expect_error("--out is a file", [] { write_text(TMP + "/out/file", "x"); out_lock(TMP + "/out/file"); }, {"exists and is not a directory"});
    expect_error("--out holds the working directory", [] { out_lock("."); }, {"is the working directory or holds it"});
    // a quote and a command substitution in the name are just characters (no shell)
    std::string odd = TMP + "/out/it's $(touch " + TMP + "/pwned)";
    write_set(odd, "q");
    check(read_text(odd + "/adapter_config.json") == "r q" && !file_exists(TMP + "/pwned"), "an --out name with a quote and $(...): written there, nothing run");
}

int main() {
    ql_assert(system(("rm -rf " + TMP + " && mkdir -p " + TMP).c_str()) == 0, "cannot create %s", TMP.c_str());
    test_json();
    test_configs();
    test_qwen_configs();
    test_weights();
    test_safetensors();
    test_failed_save();
    test_special_files();
    test_out_dirs();
    return test_summary();
}
