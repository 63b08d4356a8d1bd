// test_ecosystem.cpp: the files qlora exchanges with the Python ecosystem (qlora.h §10-14), on the CPU.
//   - Python's float repr (the quant_state blob's nested_offset) where the layout changes, plus a
//     round-trip property over random fp32 values; config.json edited in place without reformatting;
//   - the quant_state JSON byte for byte (nf4.md §4.2's two examples);
//   - PEFT adapters: write -> read gives the same parameters; the forms PEFT writes (full module names,
//     all-linear, regex, exclude_modules, adapter names in keys, BF16/F16 tensors, the full field set)
//     read; every unsupported feature and inconsistent file is refused, naming the field or tensor;
//   - bitsandbytes 4-bit checkpoints: test/ref/* quantized (nf4/fp4, nested or not, blocksize 128,
//     single file and sharded) and read back byte for byte; bitsandbytes' own Linear4bit tensors
//     (quant.safetensors) match; hostile quant states are refused;
//   - merge: W' == bf16(dequant(W) + s·B·A) with keys and shapes of the source; re-quantized output ==
//     quantizing the bf16 output; merging from the 4-bit checkpoint == merging from the bf16 one; the
//     CPU reference on the merged model gives the logits of NF4 base + adapter.
//   - Qwen2 (q/k/v biases) and Qwen3 (QK-norm, attention_bias) checkpoints: quantize copies biases and
//     q/k norms byte for byte and loads back with the same frozen weights; merge keeps them; PEFT
//     adapter names are those of Llama.
// It also writes build/ecosystem/ for dev/check_ecosystem.py (an adapter written by qlora, the CPU
// reference's logits with it, a merged and a quantized checkpoint), and has two modes that script
// calls on a GPU machine:
//   build/test_ecosystem peft DIR MODEL   DIR: adapter + logits.safetensors written by PEFT; read, recompute, compare
//   build/test_ecosystem bnb DIR MODEL    DIR: transformers' save_pretrained of MODEL loaded in 4 bits; read byte for byte
#include "../tools.h"      // defines: peft_adapter_*, bnb_*, merge_write_checkpoint, py_float_repr
#include "../reference.h"  // defines: RefModel, ref_model_load, ref_forward
#include "test.h"          // defines: check, check_close, expect_error, test_summary
#include <float.h>         // defines: FLT_MAX, DBL_MAX
#include <set>             // defines: std::set (shard files of an index)

static const std::string TMP = "build/tmp_ecosystem", OUT = "build/ecosystem";
static const std::string TIED = "test/ref/tied", UNTIED = "test/ref/untied";
static const uint32_t OFFSET_ULPS = 2;   // our double-quant offset vs torch.mean's (test_nf4.cpp)

static uint32_t ulp_dist(float a, float b) { int32_t x = (int32_t)f32_bits(a), y = (int32_t)f32_bits(b); return (uint32_t)abs(x - y); }
static bool same_bytes(const STensor* a, const STensor* b) { return a && b && a->dtype == b->dtype && a->shape == b->shape && !memcmp(a->data, b->data, a->nbytes); }
static void mkdir_clean(const std::string& d) { ql_assert(system(("rm -rf '" + d + "' && mkdir -p '" + d + "'").c_str()) == 0, "mkdir %s", d.c_str()); }
static std::string replace(std::string s, const std::string& a, const std::string& b) {
    size_t i = s.find(a); ql_assert(i != std::string::npos, "test: replace: \"%s\" not found", a.c_str()); return s.replace(i, a.size(), b);
}
static std::vector<float> linear_f32(const SafeTensors& st, const Config& c, int l, int p) { return st_f32(st.get(hf_linear_name(l, p), {proj_out(c, p), proj_in(c, p)})); }

// ---------------------------------------------------------------------------------------------
// Python number text and config.json edits

static void test_repr() {
    struct { uint32_t bits; const char* want; } f32s[] = {   // repr(float(np.float32(x))), checked with CPython
        {0x3dcccccd, "0.10000000149011612"}, {0x3727c5ac, "9.999999747378752e-06"}, {0x47f12000, "123456.0"},
        {0x37fba882, "2.9999999242136255e-05"}, {0x3d7c4280, "0.061586856842041016"}, {0x38d1b717, "9.999999747378752e-05"},
        {0x38e6afcd, "0.00011000000085914508"}, {0x5a0e1bca, "1.0000000272564224e+16"}, {0x58635fa9, "999999986991104.0"},
        {0x4b800000, "16777216.0"}, {0x7f7fffff, "3.4028234663852886e+38"}, {0x00000001, "1.401298464324817e-45"},
        {0x00800000, "1.1754943508222875e-38"}, {0x00000000, "0.0"}, {0x80000000, "-0.0"}, {0x3eaaaaab, "0.3333333432674408"},
        {0xbf000000, "-0.5"}, {0x42c80000, "100.0"}};
    int bad = 0;
    for (auto& t : f32s) {
        std::string got = py_float_repr((double)bits_f32(t.bits));
        if (got != t.want) { bad++; printf("  repr(fp32 %08x) = %s, Python says %s\n", t.bits, got.c_str(), t.want); }
    }
    check(bad == 0, "py_float_repr of %zu fp32 values widened to double == CPython repr", sizeof f32s / sizeof f32s[0]);
    struct { double v; const char* want; } f64s[] = {
        {1e16, "1e+16"}, {1e-5, "1e-05"}, {1e22, "1e+22"}, {0.1, "0.1"}, {1e-4, "0.0001"}, {123.456, "123.456"}, {5e-324, "5e-324"},
        {DBL_MAX, "1.7976931348623157e+308"}, {1234567890123456.0, "1234567890123456.0"}, {12345678901234567.0, "1.2345678901234568e+16"},
        {2.5e-5, "2.5e-05"}, {1e100, "1e+100"}, {-1.5, "-1.5"}, {9.5, "9.5"}, {1e-300, "1e-300"}};
    bad = 0;
    for (auto& t : f64s) { std::string got = py_float_repr(t.v); if (got != t.want) { bad++; printf("  repr(%.17g) = %s, Python says %s\n", t.v, got.c_str(), t.want); } }
    check(bad == 0, "py_float_repr of %zu doubles (layout switches at 1e-4 and 1e16, exponent digits) == CPython repr", sizeof f64s / sizeof f64s[0]);
    check(py_float_repr_f32(0.05f) == "0.05" && py_float_repr_f32(1e-5f) == "1e-05" && py_float_repr_f32(32.0f) == "32.0" &&
          py_float_repr_f32(0.1f) == "0.1" && py_json_float(NAN) == "NaN" && py_json_float(-INFINITY) == "-Infinity",
          "py_float_repr_f32 gives the shortest fp32 digits (0.05f -> 0.05); json.dumps' NaN/-Infinity");
    // property: for random finite fp32 values the text reads back exactly, and is fixed-point iff 1e-4 <= |v| < 1e16
    int n = 0, bad_rt = 0, bad_layout = 0;
    for (uint64_t i = 0; n < 200000; i++) {
        float f = bits_f32(rng_u32(7, 8, i));
        if (!std::isfinite(f)) continue;
        n++;
        double v = (double)f; std::string s = py_float_repr(v);
        bad_rt += strtod(s.c_str(), nullptr) != v || (f == 0 && signbit(f) != (s[0] == '-'));
        bool fixed = s.find('e') == std::string::npos, want_fixed = v == 0 || (fabs(v) >= 1e-4 && fabs(v) < 1e16);
        bad_layout += fixed != want_fixed || (fixed && s.find('.') == std::string::npos);
    }
    check(bad_rt == 0 && bad_layout == 0, "py_float_repr on %d random fp32 values: %d fail to read back, %d with the wrong layout", n, bad_rt, bad_layout);
}

static void test_json_text() {
    std::string cfg = text_of_file(TIED + "/config.json"), what = "tied config";
    std::string q = config_with_bnb4(cfg, what, QT_NF4, true);
    Json j; std::string err;
    bool ok = json_parse(q.data(), q.size(), j, err) && j.get("quantization_config") && j.get("quantization_config")->get("bnb_4bit_use_double_quant")->b;
    check(ok && q.find("  \"pretraining_tp\": 1,\n  \"quantization_config\": {\n    \"_load_in_4bit\": true,\n") != std::string::npos &&
          q.find("    \"quant_method\": \"bitsandbytes\"\n  },\n  \"rms_norm_eps\": 1e-05,") != std::string::npos,
          "quantization_config inserted where json.dumps(sort_keys=True, indent=2) puts it, nested indent 4");
    check(json_text_remove(q, "quantization_config", what) == cfg, "removing it again gives config.json byte for byte");
    check(json_text_set(cfg, "dtype", "\"float32\"", what) == replace(cfg, "\"dtype\": \"bfloat16\"", "\"dtype\": \"float32\""), "a value replaced in place");
    std::string compact = "{\"b\":-1,\"a\":[1,2.50]}";
    check(json_text_set(compact, "c", "1e-05", what) == "{\"b\":-1,\"a\":[1,2.50],\"c\":1e-05}" &&
          json_text_set("{}", "x", "1", what) == "{\"x\": 1}" && json_text_remove(compact, "b", what) == "{\"a\":[1,2.50]}" &&
          json_text_remove(compact, "a", what) == "{\"b\":-1}",
          "compact, unsorted and empty objects: other values keep their spelling (-1, 2.50)");
}

static void test_quant_state_json() {
    Quant4 q; q.qt = QT_NF4; q.bs = 64; q.nested = true; q.offset = bits_f32(0x3d7c4280);
    std::string a = bnb_quant_state_json(q, DT_BF16, 128, 256);
    const char* want = "{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"bfloat16\", \"shape\": [128, 256], \"nested_blocksize\": 256, "
                       "\"nested_dtype\": \"float32\", \"nested_offset\": 0.061586856842041016}";
    check(a == want && a.size() == 171, "quant_state JSON, double quant: nf4.md §4.2's 171 bytes exactly");
    q.nested = false;
    std::string b = bnb_quant_state_json(q, DT_BF16, 128, 256);
    check(b == "{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"bfloat16\", \"shape\": [128, 256]}" && b.size() == 80,
          "quant_state JSON, no double quant: nf4.md §4.2's 80 bytes exactly");
}

// ---------------------------------------------------------------------------------------------
// PEFT adapters

static std::vector<float> random_lora(const Config& c, const LoraConfig& lc, uint64_t seed, float bscale) {
    std::vector<float> w(lora_num_params(c, lc));
    lora_init(w.data(), c, lc, seed);
    for (int l = 0; l < c.n_layers; l++)
        for (int p = 0; p < N_PROJ; p++) {
            if (!lc.has(p)) continue;
            LoraSlot s = lora_slot(c, lc, l, p);
            for (size_t i = 0; i < (size_t)proj_out(c, p) * lc.rank; i++) w[s.b + i] = (2 * rng_uniform(seed, 99 + l * N_PROJ + p, i) - 1) * bscale;
        }
    return w;
}
static LoraConfig test_lc() {   // rsLoRA (s = 6/sqrt(4) = 3, not 6/4), a subset of targets, dropout
    LoraConfig lc; lc.rank = 4; lc.alpha = 6; lc.rslora = true; lc.dropout = 0.05f;
    lc.targets = (1u << P_Q) | (1u << P_V) | (1u << P_O) | (1u << P_UP) | (1u << P_DOWN);
    return lc;
}
// the tensors of an adapter written by peft_adapter_write, renamed/recast/edited, with a config text
static std::string adapter_dir(const std::string& name, const std::string& config, const std::string& from,
                               std::function<void(std::vector<OutTensor>&)> edit) {
    std::string d = TMP + "/" + name;
    mkdir_clean(d);
    SafeTensors src = st_open(from + "/adapter_model.safetensors");
    std::vector<OutTensor> ts;
    for (auto& kv : src.tensors) ts.push_back(out_borrow(kv.second));
    edit(ts);
    st_write_hf(d + "/adapter_model.safetensors", ts);
    write_text_file(d + "/adapter_config.json", config);
    return d;
}
static OutTensor recast(const OutTensor& t, int dt) {   // F32 -> BF16 / F16
    OutTensor o; o.name = t.name; o.dtype = dt; o.shape = t.shape; o.own.resize(o.nbytes());
    for (size_t i = 0; i < o.own.size() / 2; i++) {
        float v; memcpy(&v, t.bytes() + 4 * i, 4);
        uint16_t h = dt == DT_BF16 ? f32_to_bf16(v) : f32_to_f16(v); memcpy(&o.own[2 * i], &h, 2);
    }
    return o;
}

static void test_peft() {
    printf("== PEFT adapters\n");
    Config c = load_config(TIED + "/config.json");
    LoraConfig lc = test_lc();
    std::vector<float> w = random_lora(c, lc, 5, 0.05f);
    std::string a1 = TMP + "/adapter";
    peft_adapter_write(a1, c, lc, w.data(), "test/ref/tied");
    LoraConfig got; std::vector<float> gw;
    peft_adapter_read(a1, c, got, gw);
    check(got.rank == lc.rank && got.alpha == lc.alpha && got.rslora == lc.rslora && got.dropout == lc.dropout && got.targets == lc.targets &&
          gw.size() == w.size() && !memcmp(gw.data(), w.data(), 4 * w.size()), "write -> read: r, alpha, rslora, dropout, targets and %zu params identical", w.size());
    std::string cj = text_of_file(a1 + "/adapter_config.json");
    check(cj.find("\"lora_alpha\": 6,") != std::string::npos && cj.find("\"lora_dropout\": 0.05,") != std::string::npos &&
          cj.find("\"target_modules\": [\n    \"q_proj\",\n    \"v_proj\",\n    \"o_proj\",\n    \"up_proj\",\n    \"down_proj\"\n  ],") != std::string::npos &&
          cj.find("\"use_rslora\": true") != std::string::npos, "adapter_config.json as PEFT writes it (int alpha, 0.05, one target per line)");
    {
        SafeTensors st = st_open(a1 + "/adapter_model.safetensors");
        const STensor* A = st.find("base_model.model.model.layers.1.mlp.down_proj.lora_A.weight");
        const STensor* B = st.find("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight");
        check(A && B && A->shape == (std::vector<int64_t>{4, c.hidden_dim}) && B->shape == (std::vector<int64_t>{c.q_dim(), 4}) && A->dtype == DT_F32 &&
              st.tensors.size() == (size_t)2 * 5 * c.n_layers && st.metadata["format"] == "pt",
              "adapter keys base_model.model.model.layers.N...lora_{A,B}.weight, F32 [r, in] / [out, r], format pt");
    }
    LoraConfig dl; std::vector<float> dw(lora_num_params(c, dl)); lora_init(dw.data(), c, dl, 3);
    peft_adapter_write(TMP + "/adapter_default", c, dl, dw.data(), "x");
    peft_adapter_read(TMP + "/adapter_default", c, got, gw);
    check(got.rank == 16 && got.alpha == 32 && !got.rslora && got.targets == 127 && gw == dw, "default LoraConfig (r 16, alpha 32, all seven) round trip");

    // the forms PEFT writes
    auto named = [](std::vector<OutTensor>& ts) { for (auto& t : ts) t.name = replace(t.name, ".weight", ".default.weight"); };
    std::string d = adapter_dir("a_default_bf16", cj, a1, [&](std::vector<OutTensor>& ts) { named(ts); for (auto& t : ts) t = recast(t, DT_BF16); });
    peft_adapter_read(d, c, got, gw);
    bool ok = gw.size() == w.size();
    for (size_t i = 0; ok && i < w.size(); i++) ok = gw[i] == bf16_round(w[i]);
    check(ok && got.targets == lc.targets, "keys with the adapter name (lora_A.default.weight), BF16 tensors: read as bf16 values");
    d = adapter_dir("a_f16", cj, a1, [&](std::vector<OutTensor>& ts) { for (auto& t : ts) t = recast(t, DT_F16); });
    peft_adapter_read(d, c, got, gw);
    ok = true; for (size_t i = 0; ok && i < w.size(); i++) ok = gw[i] == f16_to_f32(f32_to_f16(w[i]));
    check(ok, "F16 tensors: read as fp16 values");
    std::string full;
    for (int l = 0; l < c.n_layers; l++) for (int p = 0; p < N_PROJ; p++) if (lc.has(p))
        full += std::string(full.empty() ? "" : ", ") + "\"model.layers." + std::to_string(l) + "." + PROJ_MODULE[p] + "." + PROJ_NAME[p] + "\"";
    std::string tm_old = cj.substr(cj.find("\"target_modules\""), cj.find("],", cj.find("\"target_modules\"")) + 1 - cj.find("\"target_modules\""));
    d = adapter_dir("a_fullnames", replace(cj, tm_old, "\"target_modules\": [" + full + "]"), a1, [](std::vector<OutTensor>&) {});
    peft_adapter_read(d, c, got, gw);
    check(got.targets == lc.targets && gw == w, "target_modules as full module names (every layer)");
    d = adapter_dir("a_regex", replace(cj, tm_old, "\"target_modules\": \".*\\\\.(q_proj|v_proj|o_proj|up_proj|down_proj)\""), a1, [](std::vector<OutTensor>&) {});
    peft_adapter_read(d, c, got, gw);
    check(got.targets == lc.targets && gw == w, "target_modules as a regex string (full match)");
    std::string a7 = TMP + "/adapter_default";
    std::string cj7 = text_of_file(a7 + "/adapter_config.json");
    std::string tm7 = cj7.substr(cj7.find("\"target_modules\""), cj7.find("],", cj7.find("\"target_modules\"")) + 1 - cj7.find("\"target_modules\""));
    d = adapter_dir("a_alllinear", replace(cj7, tm7, "\"target_modules\": \"all-linear\""), a7, [](std::vector<OutTensor>&) {});
    peft_adapter_read(d, c, got, gw);
    check(got.targets == 127 && gw == dw, "target_modules \"all-linear\"");
    // the full field set of PEFT main, defaults, plus exclude_modules taking k_proj out of all-linear
    std::string peft_full = "{\n  \"alora_invocation_tokens\": null,\n  \"alpha_pattern\": {},\n  \"arrow_config\": null,\n  \"auto_mapping\": null,\n"
        "  \"base_model_name_or_path\": \"test/ref/tied\",\n  \"bias\": \"none\",\n  \"corda_config\": null,\n  \"ensure_weight_tying\": false,\n"
        "  \"eva_config\": null,\n  \"exclude_modules\": [\"k_proj\"],\n  \"fan_in_fan_out\": false,\n  \"inference_mode\": true,\n  \"init_lora_weights\": true,\n"
        "  \"layer_replication\": null,\n  \"layers_pattern\": null,\n  \"layers_to_transform\": null,\n  \"loftq_config\": {},\n  \"lora_alpha\": 32,\n"
        "  \"lora_bias\": false,\n  \"lora_dropout\": 0.1,\n  \"megatron_config\": null,\n  \"megatron_core\": \"megatron.core\",\n  \"modules_to_save\": null,\n"
        "  \"peft_type\": \"LORA\",\n  \"peft_version\": \"0.21.0\",\n  \"qalora_group_size\": 16,\n  \"r\": 16,\n  \"rank_pattern\": {},\n  \"revision\": null,\n"
        "  \"target_modules\": [\"down_proj\", \"gate_proj\", \"k_proj\", \"o_proj\", \"q_proj\", \"up_proj\", \"v_proj\"],\n  \"target_parameters\": null,\n"
        "  \"task_type\": \"CAUSAL_LM\",\n  \"trainable_token_indices\": null,\n  \"use_dora\": false,\n  \"use_qalora\": false,\n  \"use_rslora\": false\n}";
    d = adapter_dir("a_peftfull", peft_full, a7, [](std::vector<OutTensor>& ts) {
        ts.erase(std::remove_if(ts.begin(), ts.end(), [](const OutTensor& t) { return t.name.find("k_proj") != std::string::npos; }), ts.end()); });
    peft_adapter_read(d, c, got, gw);
    check(got.targets == (127u & ~(1u << P_K)) && got.rank == 16 && fabsf(got.dropout - 0.1f) == 0, "PEFT main's full adapter_config (every field at its default), exclude_modules");
    d = adapter_dir("a_notargets", replace(replace(cj, tm_old, "\"task_type\": null"), "\"task_type\": \"CAUSAL_LM\",\n", ""), a1,
                    [](std::vector<OutTensor>& ts) { ts.erase(std::remove_if(ts.begin(), ts.end(), [](const OutTensor& t) {
                        return t.name.find("q_proj") == std::string::npos && t.name.find("v_proj") == std::string::npos; }), ts.end()); });
    peft_adapter_read(d, c, got, gw);
    check(got.targets == ((1u << P_Q) | (1u << P_V)), "no target_modules: PEFT's Llama default (q_proj, v_proj)");

    // refused, naming the field or tensor
    auto bad_cfg = [&](const char* name, const std::string& from, const std::string& to, std::vector<std::string> want) {
        std::string dd = adapter_dir(std::string("bad_") + name, replace(cj, from, to), a1, [](std::vector<OutTensor>&) {});
        expect_error(name, [dd, c] { LoraConfig x; std::vector<float> y; peft_adapter_read(dd, c, x, y); }, want);
    };
    bad_cfg("peft_type IA3", "\"peft_type\": \"LORA\"", "\"peft_type\": \"IA3\"", {"adapter_config.json", "peft_type \"IA3\""});
    bad_cfg("use_dora", "\"use_dora\": false", "\"use_dora\": true", {"\"use_dora\"", "DoRA"});
    bad_cfg("rank_pattern", "\"rank_pattern\": {}", "\"rank_pattern\": {\"q_proj\": 8}", {"\"rank_pattern\"", "per-module ranks"});
    bad_cfg("alpha_pattern", "\"alpha_pattern\": {}", "\"alpha_pattern\": {\"q_proj\": 8}", {"\"alpha_pattern\""});
    bad_cfg("bias all", "\"bias\": \"none\"", "\"bias\": \"all\"", {"\"bias\"", "none"});
    bad_cfg("modules_to_save", "\"modules_to_save\": null", "\"modules_to_save\": [\"lm_head\"]", {"\"modules_to_save\""});
    bad_cfg("lora_bias", "\"use_dora\": false", "\"use_dora\": false, \"lora_bias\": true", {"\"lora_bias\""});
    bad_cfg("fan_in_fan_out", "\"fan_in_fan_out\": false", "\"fan_in_fan_out\": true", {"\"fan_in_fan_out\""});
    bad_cfg("layers_to_transform", "\"use_dora\": false", "\"use_dora\": false, \"layers_to_transform\": [0]", {"\"layers_to_transform\""});
    bad_cfg("target lm_head", tm_old, "\"target_modules\": [\"q_proj\", \"lm_head\"]", {"selects \"lm_head\""});
    bad_cfg("target one layer", tm_old, "\"target_modules\": [\"model.layers.0.self_attn.q_proj\"]", {"q_proj in 1 of 2 layers"});
    bad_cfg("target matches nothing", tm_old, "\"target_modules\": [\"c_attn\"]", {"selects none"});
    bad_cfg("r not an integer", "\"r\": 4", "\"r\": 4.5", {"\"r\"", "integer"});
    bad_cfg("r 8, tensors r 4", "\"r\": 4", "\"r\": 8", {"lora_A.weight", "shape [4, ", "expected [8, "});
    bad_cfg("bad regex", tm_old, "\"target_modules\": \"(q_proj\"", {"not a regular expression"});
    auto bad_ts = [&](const char* name, std::function<void(std::vector<OutTensor>&)> edit, std::vector<std::string> want) {
        std::string dd = adapter_dir(std::string("bad_") + name, cj, a1, edit);
        expect_error(name, [dd, c] { LoraConfig x; std::vector<float> y; peft_adapter_read(dd, c, x, y); }, want);
    };
    const std::string qB = "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight";
    bad_ts("missing tensor", [&](std::vector<OutTensor>& ts) { ts.erase(std::remove_if(ts.begin(), ts.end(), [&](const OutTensor& t) { return t.name == qB; }), ts.end()); },
           {"missing tensor \"" + qB + "\""});
    bad_ts("modules_to_save tensor", [&](std::vector<OutTensor>& ts) { OutTensor t = ts[0]; t.name = "base_model.model.lm_head.weight"; ts.push_back(t); },
           {"\"base_model.model.lm_head.weight\"", "modules_to_save"});
    bad_ts("DoRA magnitude", [&](std::vector<OutTensor>& ts) { OutTensor t = ts[0]; t.name = "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"; ts.push_back(t); },
           {"lora_magnitude_vector", "DoRA"});
    bad_ts("layer 7 of 2", [&](std::vector<OutTensor>& ts) { OutTensor t = ts[0]; t.name = replace(t.name, "layers.0.", "layers.7."); ts.push_back(t); },
           {"layers.7.", "layer 7, but the model has 2 layers"});
    bad_ts("k_proj not targeted", [&](std::vector<OutTensor>& ts) { OutTensor t = ts[0]; t.name = replace(t.name, "mlp.down_proj", "self_attn.k_proj"); ts.push_back(t); },
           {"self_attn.k_proj", "target_modules", "does not select"});
    bad_ts("twice (with adapter name)", [&](std::vector<OutTensor>& ts) { OutTensor t = ts[0]; t.name = replace(t.name, ".weight", ".default.weight"); ts.push_back(t); },
           {"appears twice"});
    bad_ts("I32 tensor", [&](std::vector<OutTensor>& ts) { ts[0].dtype = DT_I32; }, {"dtype I32"});
    bad_ts("no prefix", [&](std::vector<OutTensor>& ts) { ts[0].name = ts[0].name.substr(17); }, {"base_model.model."});
    std::string nobin = TMP + "/bad_bin_only"; mkdir_clean(nobin);
    write_text_file(nobin + "/adapter_config.json", cj); write_text_file(nobin + "/adapter_model.bin", "x");
    expect_error("adapter_model.bin only", [nobin, c] { LoraConfig x; std::vector<float> y; peft_adapter_read(nobin, c, x, y); }, {"adapter_model.bin", "pickle"});
    expect_error("no adapter_config.json", [c] { LoraConfig x; std::vector<float> y; peft_adapter_read(TMP, c, x, y); }, {"no adapter_config.json"});
}

// ---------------------------------------------------------------------------------------------
// bitsandbytes 4-bit checkpoints

// every decoder linear of `qdir` read back == quantize_weight of the source's weight, byte for byte;
// the quant_state blob == what bnb_quant_state_json writes; other tensors copied byte for byte
static void check_bnb_against_source(const std::string& qdir, const std::string& src, int qt, int bs, bool nested, const char* what) {
    Config c = load_config(src + "/config.json");
    int cqt = -1; bool cn = !nested;
    bool pre = config_is_bnb4(qdir + "/config.json", &cqt, &cn);
    SafeTensors q = st_open_model(qdir), s = st_open_model(src);
    BnbCheckpointView v = bnb_checkpoint_validate(c, q);
    int bad = 0, bad_json = 0, keys = 0;
    for (int l = 0; l < c.n_layers; l++)
        for (int p = 0; p < N_PROJ; p++) {
            std::vector<float> x = linear_f32(s, c, l, p);
            Quant4 want = quantize_weight(x.data(), (int64_t)x.size(), qt, bs, nested), got; int dt = -1;
            bnb_read_linear(q, hf_linear_name(l, p), proj_out(c, p), proj_in(c, p), got, &dt);
            bad += !(got.packed == want.packed && got.absmax_q == want.absmax_q && got.absmax2 == want.absmax2 && f32_bits(got.offset) == f32_bits(want.offset) &&
                     got.absmax == want.absmax && got.qt == qt && got.bs == bs && got.nested == nested && dt == s.find(hf_linear_name(l, p))->dtype);
            const STensor& js = *v.w.linear[l][p].quant_state;
            bad_json += std::string((const char*)js.data, js.nbytes) != bnb_quant_state_json(got, dt, proj_out(c, p), proj_in(c, p));
            keys += nested ? 6 : 4;
        }
    int copied = 0, bad_copy = 0;
    for (auto& kv : s.tensors) {
        if (kv.first.find("_proj.weight") != std::string::npos || (c.tied && kv.first == "lm_head.weight")) continue;
        copied++; bad_copy += !same_bytes(q.find(kv.first), &kv.second);
    }
    check(pre && cqt == qt && cn == nested && v.qt == qt && v.bs == bs && v.nested == nested && bad == 0 && bad_json == 0 && bad_copy == 0 &&
          q.tensors.size() == (size_t)(keys + copied),
          "%s: config says 4-bit %s%s; %d linears read back == quantize_weight (blocksize %d), blobs exact; %d tensors copied; %zu keys",
          what, quant_type_name(qt), nested ? " nested" : "", c.n_layers * N_PROJ - bad, bs, copied - bad_copy, q.tensors.size());
}

// bitsandbytes' own Linear4bit tensors of these weights (dev/reference.py -> quant.safetensors)
static void check_bnb_golden(const std::string& qdir, const std::string& src) {
    Config c = load_config(src + "/config.json");
    SafeTensors q = st_open_model(qdir), g = st_open(src + "/quant.safetensors");
    int ok = 0, total = 0; uint32_t worst = 0;
    for (int l = 0; l < c.n_layers; l++)
        for (int p = 0; p < N_PROJ; p++) {
            std::string k = "q." + std::to_string(l) + "." + PROJ_NAME[p];
            Quant4 got; bnb_read_linear(q, hf_linear_name(l, p), proj_out(c, p), proj_in(c, p), got);
            const STensor &pk = *g.find(k + ".packed"), &aq = *g.find(k + ".absmax_q");
            float off = st_f32(*g.find(k + ".offset"))[0];
            std::vector<float> a2 = st_f32(*g.find(k + ".absmax2"));
            bool codes;
            if (got.offset == off) codes = aq.nbytes == got.absmax_q.size() && !memcmp(aq.data, got.absmax_q.data(), aq.nbytes) && a2 == got.absmax2;
            else {   // torch.mean's offset differs by an ulp or two: the codes must match given its offset
                std::vector<float> x = linear_f32(st_open_model(src), c, l, p);
                Quant4 t = quantize_weight(x.data(), (int64_t)x.size(), QT_NF4, 64, true, &off);
                codes = !memcmp(aq.data, t.absmax_q.data(), aq.nbytes) && a2 == t.absmax2;
                printf("  note %s: offset %u ulp from torch.mean's; nested codes checked with bitsandbytes' offset\n", k.c_str(), ulp_dist(got.offset, off));
            }
            worst = std::max(worst, ulp_dist(got.offset, off));
            total++; ok += pk.nbytes == got.packed.size() && !memcmp(pk.data, got.packed.data(), pk.nbytes) && codes && ulp_dist(got.offset, off) <= OFFSET_ULPS;
        }
    check(ok == total, "%s vs bitsandbytes' Linear4bit (%s): %d/%d linears: packed bytes, absmax codes, absmax2 equal; offset within %u ulp (worst %u)",
          qdir.c_str(), (src + "/quant.safetensors").c_str(), ok, total, OFFSET_ULPS, worst);
}

// test/ref/tied split into two shards with an index, plus a tokenizer file
static std::string sharded_copy() {
    std::string d = TMP + "/tied_sharded";
    mkdir_clean(d);
    SafeTensors s = st_open_model(TIED);
    std::vector<OutTensor> a, b;
    std::string wm;
    for (auto& kv : s.tensors) {
        bool first = kv.first.find("layers.1.") == std::string::npos;
        (first ? a : b).push_back(out_borrow(kv.second));
        wm += std::string(wm.empty() ? "" : ",\n    ") + json_quote(kv.first) + ": \"model-0000" + (first ? "1" : "2") + "-of-00002.safetensors\"";
    }
    st_write_hf(d + "/model-00001-of-00002.safetensors", a);
    st_write_hf(d + "/model-00002-of-00002.safetensors", b);
    write_text_file(d + "/model.safetensors.index.json", "{\n  \"metadata\": {\n    \"total_size\": 0\n  },\n  \"weight_map\": {\n    " + wm + "\n  }\n}\n");
    write_text_file(d + "/config.json", text_of_file(TIED + "/config.json"));
    write_text_file(d + "/tokenizer.json", "{\"version\": \"1.0\"}");
    return d;
}

// a bnb checkpoint with one tensor or blob edited, for the hostile cases
static std::string bnb_edit(const std::string& name, const std::string& from, std::function<void(std::vector<OutTensor>&)> edit) {
    std::string d = TMP + "/" + name;
    mkdir_clean(d);
    SafeTensors s = st_open_model(from);
    std::vector<OutTensor> ts;
    for (auto& kv : s.tensors) ts.push_back(out_borrow(kv.second));
    edit(ts);
    st_write_hf(d + "/model.safetensors", ts);
    write_text_file(d + "/config.json", text_of_file(from + "/config.json"));
    return d;
}
static OutTensor* find_out(std::vector<OutTensor>& ts, const std::string& n) { for (auto& t : ts) if (t.name == n) return &t; ql_fail("test: no tensor %s", n.c_str()); }
static void set_blob(std::vector<OutTensor>& ts, const std::string& key, const std::string& js) {
    OutTensor* t = find_out(ts, key); t->borrowed = nullptr; t->own.assign(js.begin(), js.end()); t->shape = {(int64_t)js.size()};
}

static void test_bnb() {
    printf("== bitsandbytes 4-bit checkpoints\n");
    check(!config_is_bnb4(TIED + "/config.json"), "an unquantized config is not bnb 4-bit");
    std::string qn = TMP + "/q_nf4";
    bnb_write_checkpoint(TIED, qn);
    check(file_exists(qn + "/model.safetensors") && !file_exists(qn + "/model.safetensors.index.json") &&
          text_of_file(qn + "/generation_config.json") == text_of_file(TIED + "/generation_config.json") && !file_exists(qn + "/quant.safetensors"),
          "quantize test/ref/tied: model.safetensors (no index), generation_config.json copied, no other weight files");
    Config c = load_config(qn + "/config.json"), c0 = load_config(TIED + "/config.json");
    check(c.dim == c0.dim && c.n_layers == c0.n_layers && c.tied && c.norm_eps == c0.norm_eps, "its config.json still loads (quantization_config added)");
    check_bnb_against_source(qn, TIED, QT_NF4, 64, true, "nf4 nested");
    {
        SafeTensors q = st_open_model(qn);
        const std::string w = hf_linear_name(0, P_DOWN);
        const STensor *pk = q.find(w), *am = q.find(w + ".absmax"), *qm = q.find(w + ".quant_map"), *na = q.find(w + ".nested_absmax"),
                      *nq = q.find(w + ".nested_quant_map"), *js = q.find(w + ".quant_state.bitsandbytes__nf4");
        std::string blob = js ? std::string((const char*)js->data, js->nbytes) : "";
        check(pk && pk->dtype == DT_U8 && pk->shape == (std::vector<int64_t>{16384, 1}) && am && am->dtype == DT_U8 && am->shape == std::vector<int64_t>{512} &&
              qm && qm->dtype == DT_F32 && qm->shape == std::vector<int64_t>{16} && na && na->dtype == DT_F32 && na->shape == std::vector<int64_t>{2} &&
              nq && nq->shape == std::vector<int64_t>{256} && js && js->dtype == DT_U8 && !q.find("lm_head.weight") &&
              blob.rfind("{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"bfloat16\", \"shape\": [128, 256], \"nested_blocksize\": 256, "
                         "\"nested_dtype\": \"float32\", \"nested_offset\": 0.0", 0) == 0 && blob.size() >= 165,
              "down_proj [128, 256]: nf4.md §4.1's keys, dtypes, shapes ([16384, 1] U8, U8 [512], F32 [16], F32 [2], F32 [256]); no lm_head (tied)");
        printf("         %s\n", blob.c_str());
    }
    check_bnb_golden(qn, TIED);
    std::string qu = TMP + "/q_untied_nf4";
    bnb_write_checkpoint(UNTIED, qu);
    check_bnb_against_source(qu, UNTIED, QT_NF4, 64, true, "untied nf4 nested (lm_head kept)");
    check_bnb_golden(qu, UNTIED);
    std::string qf = TMP + "/q_fp4", qp = TMP + "/q_nf4_plain", q128 = TMP + "/q_nf4_bs128";
    bnb_write_checkpoint(TIED, qf, QT_FP4, 64, true);
    check_bnb_against_source(qf, TIED, QT_FP4, 64, true, "fp4 nested");
    {
        SafeTensors q = st_open_model(qf);
        const STensor* qm = q.find(hf_linear_name(0, P_Q) + ".quant_map");
        uint32_t e8; memcpy(&e8, qm->data + 32, 4);
        check(e8 == 0 && q.find(hf_linear_name(0, P_Q) + ".quant_state.bitsandbytes__fp4"), "fp4 quant_map[8] is +0.0 as Python lists it; key suffix __fp4");
    }
    bnb_write_checkpoint(TIED, qp, QT_NF4, 64, false);
    check_bnb_against_source(qp, TIED, QT_NF4, 64, false, "nf4 without double quant");
    bnb_write_checkpoint(TIED, q128, QT_NF4, 128, true);
    check_bnb_against_source(q128, TIED, QT_NF4, 128, true, "nf4 blocksize 128");
    // sharded source: same shard names, an index, tensors equal to the single-file output
    std::string sh = sharded_copy(), qs = TMP + "/q_sharded";
    bnb_write_checkpoint(sh, qs);
    {
        SafeTensors a = st_open_model(qs), b = st_open_model(qn);
        int same = 0; for (auto& kv : b.tensors) same += same_bytes(a.find(kv.first), &kv.second);
        Json idx = json_load(qs + "/model.safetensors.index.json");
        check(file_exists(qs + "/model-00001-of-00002.safetensors") && file_exists(qs + "/model-00002-of-00002.safetensors") && !file_exists(qs + "/model.safetensors") &&
              a.tensors.size() == b.tensors.size() && same == (int)b.tensors.size() && idx.get("weight_map")->obj.size() == b.tensors.size() &&
              text_of_file(qs + "/tokenizer.json") == "{\"version\": \"1.0\"}",
              "sharded source: 2 shards kept with an index of all %zu tensors, all equal to the single-file output; tokenizer.json copied", b.tensors.size());
    }
    expect_error("quantize a 4-bit checkpoint", [qn] { bnb_write_checkpoint(qn, TMP + "/qq"); }, {"already a bitsandbytes 4-bit checkpoint"});
    expect_error("quantize into the source", [] { bnb_write_checkpoint(TIED, TIED + "/"); }, {"is the input checkpoint"});
    expect_error("blocksize 48", [] { bnb_write_checkpoint(TIED, TMP + "/qq", QT_NF4, 48); }, {"blocksize 48"});

    // quantization_config
    std::string cfg = text_of_file(TIED + "/config.json");
    auto cfg_case = [&](const char* name, const std::string& qc, std::vector<std::string> want) {
        std::string d = TMP + "/cfg_" + std::to_string(std::hash<std::string>()(name)); mkdir_clean(d);
        write_text_file(d + "/config.json", json_text_set(cfg, "quantization_config", qc, "cfg"));
        expect_error(name, [d] { config_is_bnb4(d + "/config.json"); }, want);
    };
    cfg_case("quant_method gptq", "{\"quant_method\": \"gptq\", \"bits\": 4}", {"quant_method \"gptq\""});
    cfg_case("load_in_8bit", "{\"quant_method\": \"bitsandbytes\", \"load_in_8bit\": true, \"load_in_4bit\": false}", {"8-bit"});
    cfg_case("quant_storage bfloat16", "{\"quant_method\": \"bitsandbytes\", \"load_in_4bit\": true, \"bnb_4bit_quant_storage\": \"bfloat16\"}", {"bnb_4bit_quant_storage \"bfloat16\""});
    {
        std::string d = TMP + "/cfg_defaults"; mkdir_clean(d);
        write_text_file(d + "/config.json", json_text_set(cfg, "quantization_config", "{\"load_in_4bit\": true}", "cfg"));
        int qt = -1; bool n = true;
        check(config_is_bnb4(d + "/config.json", &qt, &n) && qt == QT_FP4 && !n, "quantization_config {load_in_4bit}: BitsAndBytesConfig's defaults (fp4, no double quant)");
    }

    // hostile quant states: each must be refused, naming the tensor
    const std::string w = hf_linear_name(1, P_UP), blob = w + ".quant_state.bitsandbytes__nf4";
    std::string js0;
    { SafeTensors q = st_open_model(qn); const STensor* t = q.find(blob); js0.assign((const char*)t->data, t->nbytes); }
    auto read_all = [](const std::string& d) { return [d] { Config cc = load_config(d + "/config.json"); SafeTensors st = st_open_model(d); bnb_checkpoint_validate(cc, st); }; };
    auto bad_blob = [&](const char* name, const std::string& from, const std::string& to, std::vector<std::string> want) {
        std::string js = replace(js0, from, to);
        expect_error(name, read_all(bnb_edit(std::string("bad_") + name, qn, [&](std::vector<OutTensor>& ts) { set_blob(ts, blob, js); })), want);
    };
    bad_blob("quant_state shape", "\"shape\": [256, 128]", "\"shape\": [256, 129]", {blob, "shape must be [256, 128]"});
    bad_blob("quant_state quant_type", "\"quant_type\": \"nf4\"", "\"quant_type\": \"fp4\"", {blob, "quant_type must be \"nf4\""});
    bad_blob("quant_state blocksize", "\"blocksize\": 64", "\"blocksize\": 48", {blob, "blocksize"});
    bad_blob("quant_state dtype", "\"dtype\": \"bfloat16\"", "\"dtype\": \"int8\"", {blob, "dtype must be"});
    bad_blob("unknown quant_state key", ", \"nested_offset\"", ", \"nested_offsetx\"", {blob, "unknown quant_state key \"nested_offsetx\""});
    bad_blob("nested keys incomplete", ", \"nested_dtype\": \"float32\"", "", {blob, "come together"});
    bad_blob("nested_blocksize", "\"nested_blocksize\": 256", "\"nested_blocksize\": 128", {blob, "nested_blocksize must be 256"});
    bad_blob("blob not JSON", "{", "[", {blob, "not a JSON object"});
    bad_blob("blob blocksize 128", "\"blocksize\": 64", "\"blocksize\": 128", {w + ".absmax", "expected U8 [256]"});
    auto bad_t = [&](const char* name, std::function<void(std::vector<OutTensor>&)> edit, std::vector<std::string> want) {
        expect_error(name, read_all(bnb_edit(std::string("bad_") + name, qn, edit)), want);
    };
    bad_t("absmax F32 when nested", [&](std::vector<OutTensor>& ts) { OutTensor* t = find_out(ts, w + ".absmax"); t->dtype = DT_F32; t->shape = {128}; },
          {w + ".absmax", "expected U8 [512]"});
    bad_t("quant_map altered", [&](std::vector<OutTensor>& ts) { OutTensor* t = find_out(ts, w + ".quant_map"); t->own.assign(t->borrowed, t->borrowed + 64); t->borrowed = nullptr; t->own[20] ^= 1; },
          {w + ".quant_map", "entry 5", "custom code table"});
    bad_t("nested_quant_map altered", [&](std::vector<OutTensor>& ts) { OutTensor* t = find_out(ts, w + ".nested_quant_map"); t->own.assign(t->borrowed, t->borrowed + 1024); t->borrowed = nullptr; t->own[400] ^= 1; },
          {w + ".nested_quant_map", "entry 100"});
    bad_t("nested_absmax missing", [&](std::vector<OutTensor>& ts) { ts.erase(ts.begin() + (find_out(ts, w + ".nested_absmax") - ts.data())); },
          {w, "nested_absmax"});
    bad_t("packed shape", [&](std::vector<OutTensor>& ts) { find_out(ts, w)->shape = {128, 128}; }, {w, "shape [128, 128]", "U8 [16384, 1]"});
    bad_t("weight BF16 with a quant_state", [&](std::vector<OutTensor>& ts) { OutTensor* t = find_out(ts, w); t->dtype = DT_BF16; t->shape = {8192, 1}; },
          {w, "is BF16", "U8"});
    bad_t("no quant_state", [&](std::vector<OutTensor>& ts) { ts.erase(ts.begin() + (find_out(ts, blob) - ts.data())); }, {w, "no \"" + w + ".quant_state.bitsandbytes__nf4\""});
    bad_t("two quant_states", [&](std::vector<OutTensor>& ts) { OutTensor t = *find_out(ts, blob); t.name = w + ".quant_state.bitsandbytes__fp4"; ts.push_back(t); },
          {"two quant_state tensors"});
    bad_t("unexpected sub-tensor", [&](std::vector<OutTensor>& ts) { OutTensor t = *find_out(ts, w + ".quant_map"); t.name = w + ".SCB"; ts.push_back(t); },
          {"unexpected tensor \"" + w + ".SCB\""});
    expect_error("lm_head quantized (untied)", read_all(bnb_edit("bad_lm_head", TMP + "/q_untied_nf4", [&](std::vector<OutTensor>& ts) {
                     OutTensor* lm = find_out(ts, "lm_head.weight"); *lm = *find_out(ts, w); lm->name = "lm_head.weight";
                     OutTensor b = *find_out(ts, w + ".absmax"); b.name = "lm_head.weight.absmax"; ts.push_back(b); })),
                 {"lm_head is 4-bit quantized"});
    // mixed formats and unquantized linears (llm_int8_skip_modules)
    std::string mixed = bnb_edit("bnb_mixed", qn, [&](std::vector<OutTensor>& ts) {
        SafeTensors fp = st_open_model(qf);
        std::string a = hf_linear_name(1, P_V);
        ts.erase(std::remove_if(ts.begin(), ts.end(), [&](const OutTensor& t) { return t.name.rfind(a, 0) == 0; }), ts.end());
        for (auto& kv : fp.tensors) if (kv.first.rfind(a, 0) == 0) { OutTensor t = out_borrow(kv.second); t.own.assign(t.borrowed, t.borrowed + t.nbytes()); t.borrowed = nullptr; ts.push_back(t); }
    });
    expect_error("nf4 and fp4 linears mixed", read_all(mixed), {hf_linear_name(1, P_V), "one 4-bit format"});
    std::string dense = bnb_edit("bnb_dense", qn, [&](std::vector<OutTensor>& ts) {
        SafeTensors s = st_open_model(TIED);
        std::string a = hf_linear_name(0, P_O);
        ts.erase(std::remove_if(ts.begin(), ts.end(), [&](const OutTensor& t) { return t.name.rfind(a, 0) == 0; }), ts.end());
        OutTensor t = out_borrow(*s.find(a)); t.own.assign(t.borrowed, t.borrowed + t.nbytes()); t.borrowed = nullptr; ts.push_back(t);
    });
    {
        Config cc = load_config(dense + "/config.json"); SafeTensors st = st_open_model(dense);
        BnbCheckpointView v = bnb_checkpoint_validate(cc, st);
        Quant4 got; bnb_linear_load(v.w.linear[0][P_O], got);
        std::vector<float> x = linear_f32(st_open_model(TIED), cc, 0, P_O);
        Quant4 want = quantize_weight(x.data(), (int64_t)x.size());
        check(v.n_dense == 1 && v.w.linear[0][P_O].dense && got.packed == want.packed && got.absmax_q == want.absmax_q,
              "a linear stored unquantized (llm_int8_skip_modules) is accepted and quantized on load with the checkpoint's format");
    }
    // reading a linear whose quant_state disagrees with the config's shape (another model)
    expect_error("linear of another shape", [qn] { SafeTensors st = st_open_model(qn); Quant4 q; bnb_read_linear(st, hf_linear_name(0, P_Q), 128, 256, q); },
                 {hf_linear_name(0, P_Q), "shape [8192, 1]", "U8 [16384, 1]"});
}

// ---------------------------------------------------------------------------------------------
// merge

struct Inputs { std::vector<int32_t> ids; int B, T; };
static Inputs ref_inputs() {
    SafeTensors d = st_open(TIED + "/debug_fp32.safetensors");
    const STensor& t = *d.find("inputs");
    return {st_i32(t), (int)t.shape[0], (int)t.shape[1]};
}
// eval-mode logits (no dropout) of model + adapter (lc.targets == 0: no adapter)
static std::vector<float> ref_logits(const RefModel& m, LoraConfig lc, const float* lora, const Inputs& in) {
    lc.dropout = 0;
    std::vector<int32_t> tg(in.ids.size(), -1);
    RefBatch bt; bt.inputs = in.ids.data(); bt.targets = tg.data(); bt.B = in.B; bt.T = in.T; bt.denom = 0;
    RefActs<float> a; ref_acts_alloc(a, m.cfg, lc, in.B, in.T);
    ref_forward(m, lc, lora, a, bt);
    return a.logits;
}
static double max_abs_diff(const std::vector<float>& a, const std::vector<float>& b) { double m = 0; for (size_t i = 0; i < a.size(); i++) m = fmax(m, fabs((double)a[i] - b[i])); return m; }
static double max_abs(const std::vector<float>& a) { double m = 0; for (float x : a) m = fmax(m, fabs(x)); return m; }

static void test_merge() {
    printf("== merge\n");
    Config c = load_config(TIED + "/config.json");
    LoraConfig lc = test_lc();
    std::vector<float> w = random_lora(c, lc, 11, 0.05f);
    std::string mg = TMP + "/merged";
    merge_write_checkpoint(TIED, c, lc, w.data(), mg, false);
    SafeTensors m = st_open_model(mg), s = st_open_model(TIED);
    bool keys = m.tensors.size() == s.tensors.size();
    for (auto& kv : s.tensors) { const STensor* t = m.find(kv.first); keys = keys && t && t->shape == kv.second.shape && t->dtype == DT_BF16; }
    Json cj = json_load(mg + "/config.json");
    check(keys && cj.get("dtype")->str == "bfloat16" && !cj.get("quantization_config") && text_of_file(mg + "/generation_config.json") == text_of_file(TIED + "/generation_config.json"),
          "merged checkpoint: the source's %zu keys and shapes, all BF16; config dtype bfloat16, no quantization_config; generation_config copied", s.tensors.size());
    int copied_ok = 0, n_copy = 0;
    for (auto& kv : s.tensors) if (kv.first.find("_proj.") == std::string::npos) { n_copy++; copied_ok += same_bytes(m.find(kv.first), &kv.second); }
    check(copied_ok == n_copy, "embeddings and norms (already bf16) byte for byte");
    // W' == bf16(bf16(deq NF4(bf16 W)) + s·B·A), the delta in double: within one bf16 ulp, nearly always equal
    size_t total = 0, equal = 0; double worst_rel = 0; int untouched_bad = 0;
    for (int l = 0; l < c.n_layers; l++)
        for (int p = 0; p < N_PROJ; p++) {
            std::vector<float> x = linear_f32(s, c, l, p), got = st_f32(*m.find(hf_linear_name(l, p)));
            std::vector<float> deq(x.size()); dequantize_weight(deq.data(), quantize_weight(x.data(), (int64_t)x.size()));
            int in = proj_in(c, p), out = proj_out(c, p);
            LoraSlot sl = lora_slot(c, lc, l, p);
            for (int o = 0; o < out; o++)
                for (int i = 0; i < in; i++) {
                    double base = bf16_round(deq[(size_t)o * in + i]), d = 0, mag = 0;
                    if (lc.has(p)) for (int k = 0; k < lc.rank; k++) {
                        double t = (double)w[sl.b + (size_t)o * lc.rank + k] * w[sl.a + (size_t)k * in + i]; d += t; mag += fabs(t); }
                    float want = bf16_round((float)(base + d * lc.scale())), g = got[(size_t)o * in + i];
                    if (!lc.has(p)) { untouched_bad += f32_bits(g) != f32_bits(want); continue; }
                    // one bf16 ulp of the result, plus the fp32 rounding of the terms (matters where W and ΔW cancel)
                    double budget = fabs(want) / 128 + (fabs(base) + mag * lc.scale()) * ldexp(1.0, -20);
                    total++; equal += f32_bits(g) == f32_bits(want);
                    worst_rel = fmax(worst_rel, fabs((double)g - want) / budget);
                }
        }
    check(untouched_bad == 0, "k_proj, gate_proj (not targeted): exactly bf16(dequant(NF4(W)))");
    check(worst_rel <= 1 && equal >= total * 99 / 100, "targeted: W' == bf16(deq + s*B*A (double)): %zu/%zu equal, the rest within 1 bf16 ulp + fp32 term rounding (%.0f%% of it)",
          equal, total, 100 * worst_rel);

    // the CPU reference on the merged bf16 model ~ NF4 base + adapter; budget: 3x what rounding the
    // dequantized base to bf16 alone does to the logits
    Inputs in = ref_inputs();
    RefModel nf4, merged, deqbf16;
    ref_model_load(nf4, TIED); ref_model_load_dense(merged, mg);
    ref_model_load(deqbf16, TIED);
    for (auto& ly : deqbf16.w.linear) for (int p = 0; p < N_PROJ; p++) for (size_t i = 0; i < (size_t)proj_out(c, p) * proj_in(c, p); i++) ly[p][i] = bf16_round(ly[p][i]);
    LoraConfig none; none.targets = 0;
    std::vector<float> l_ad = ref_logits(nf4, lc, w.data(), in), l_base = ref_logits(nf4, none, nullptr, in);
    std::vector<float> l_mg = ref_logits(merged, none, nullptr, in), l_bf = ref_logits(deqbf16, none, nullptr, in);
    double err = max_abs_diff(l_mg, l_ad), yard = max_abs_diff(l_bf, l_base), effect = max_abs_diff(l_ad, l_base);
    check(err <= 3 * yard + 1e-6 * max_abs(l_ad) && effect >= 10 * err, "logits of the merged model vs NF4 + adapter: max |diff| %.3e <= 3 x %.3e (bf16 rounding of the base); "
          "adapter effect %.3e (scale %.3e)", err, yard, effect, max_abs(l_ad));

    // re-quantized: == quantizing the merged bf16 checkpoint
    std::string mq = TMP + "/merged_requant", mq2 = TMP + "/merged_then_quantized";
    merge_write_checkpoint(TIED, c, lc, w.data(), mq, true);
    bnb_write_checkpoint(mg, mq2);
    {
        SafeTensors a = st_open_model(mq), b = st_open_model(mq2);
        int same = 0; for (auto& kv : b.tensors) same += same_bytes(a.find(kv.first), &kv.second);
        int qt = -1; bool n = false;
        check(config_is_bnb4(mq + "/config.json", &qt, &n) && qt == QT_NF4 && n && a.tensors.size() == b.tensors.size() && same == (int)b.tensors.size(),
              "--requant: nf4 nested, all %zu tensors == quantize(merged bf16 checkpoint)", b.tensors.size());
    }
    // from the pre-quantized checkpoint of the same model: the same base, so the same output
    std::string mp = TMP + "/merged_from_bnb";
    merge_write_checkpoint(TMP + "/q_nf4", c, lc, w.data(), mp, false);
    {
        SafeTensors a = st_open_model(mp);
        int same = 0; for (auto& kv : m.tensors) same += same_bytes(a.find(kv.first), &kv.second);
        check(a.tensors.size() == m.tensors.size() && same == (int)m.tensors.size() && !json_load(mp + "/config.json").get("quantization_config"),
              "merge from the bnb 4-bit checkpoint == merge from the bf16 one (%d/%zu tensors), quantization_config removed", same, m.tensors.size());
    }
    // sharded output (a small shard limit stands in for 5 GB)
    std::string ms = TMP + "/merged_sharded";
    merge_write_checkpoint(TIED, c, lc, w.data(), ms, false, false, 200000);
    {
        SafeTensors a = st_open_model(ms);
        int same = 0; for (auto& kv : m.tensors) same += same_bytes(a.find(kv.first), &kv.second);
        Json idx = json_load(ms + "/model.safetensors.index.json");
        std::set<std::string> files; for (auto& kv : idx.get("weight_map")->obj) files.insert(kv.second.str);
        bool ordered = idx.get("weight_map")->get("model.embed_tokens.weight")->str == shard_name(1, (int)files.size());
        check(files.size() >= 3 && a.files.size() == files.size() && same == (int)m.tensors.size() && !file_exists(ms + "/model.safetensors") && ordered,
              "sharded merge: %zu shards + index (embed_tokens in the first), tensors equal to the single-file merge", files.size());
    }
    std::string mo = TMP + "/merged_original";
    merge_write_checkpoint(TIED, c, lc, w.data(), mo, false, true);
    {
        SafeTensors a = st_open_model(mo);
        std::vector<float> x = linear_f32(s, c, 0, P_K), g = st_f32(*a.find(hf_linear_name(0, P_K)));
        check(x == g, "onto the original base: an untouched projection is the stored weight itself");
    }
    // a merge or a quantize that fails half-way (a full disk) leaves --out as it was: the previous
    // checkpoint whole, not new shards beside an old index or config
    auto snapshot = [](const std::string& d) {
        std::vector<std::pair<std::string, std::vector<uint8_t>>> v;
        for (auto& n : dir_entries(d)) v.push_back({n, read_file(d + "/" + n)});
        return v;
    };
    auto siblings = [](const std::string& d) { int k = 0; for (auto& e : dir_entries(parent_dir(d))) k += out_sibling_of(e, base_name(d), "new"); return k; };
    std::vector<float> w2 = random_lora(c, lc, 12, 0.05f);
    std::string mi = TMP + "/merged_interrupted", qi = TMP + "/quantized_interrupted";
    merge_write_checkpoint(TIED, c, lc, w.data(), mi, false, false, 200000);
    bnb_write_checkpoint(TIED, qi);
    auto m0 = snapshot(mi), q0 = snapshot(qi);
    // room for the weights, not for config.json after them
    long long merged_bytes = (long long)read_file(mg + "/model.safetensors").size(), quant_bytes = (long long)read_file(qi + "/model.safetensors").size();
    expect_error("merge fails half-way (disk full)", [&] {
        ql_error_mode().fail_writes_after = merged_bytes + 10;
        merge_write_checkpoint(TIED, c, lc, w2.data(), mi, false);
    }, {"disk full?", mi + " keeps its previous files"});
    expect_error("quantize fails half-way (disk full)", [&] {
        ql_error_mode().fail_writes_after = quant_bytes + 10;
        bnb_write_checkpoint(TIED, qi, QT_FP4);
    }, {"disk full?", qi + " keeps its previous files"});
    check(snapshot(mi) == m0 && m0.size() >= 4 && snapshot(qi) == q0 && siblings(mi) == 0 && siblings(qi) == 0,
          "after a merge and a quantize that failed half-way: both output directories hold their previous checkpoints, byte for byte (%zu and %zu files)",
          m0.size(), q0.size());
    merge_write_checkpoint(TIED, c, lc, w2.data(), mi, false);
    int stale = 0; for (auto& n : dir_entries(mi)) stale += n.rfind("model-", 0) == 0;
    check(file_exists(mi + "/model.safetensors") && !file_exists(mi + "/model.safetensors.index.json") && stale == 0,
          "a single-file merge over a sharded one: no stale index or shard is left beside it (%d shards)", stale);
    expect_error("merge onto original from 4-bit", [c, lc, w] { merge_write_checkpoint(TMP + "/q_nf4", c, lc, w.data(), TMP + "/x", false, true); }, {"no original base"});

    // files for dev/check_ecosystem.py: a qlora adapter, the CPU reference's logits, a merged and a quantized checkpoint
    mkdir_clean(OUT);
    peft_adapter_write(OUT + "/qlora_adapter", c, lc, w.data(), TIED);
    RefModel dense; ref_model_load_dense(dense, TIED);
    std::vector<float> l_dense = ref_logits(dense, lc, w.data(), in), l_dense0 = ref_logits(dense, none, nullptr, in);
    int64_t B = in.B, T = in.T, V = c.vocab_size;
    st_write(OUT + "/qlora_logits.safetensors", {
        {"inputs", DT_I32, {B, T}, in.ids.data()}, {"logits_nf4", DT_F32, {B, T, V}, l_ad.data()}, {"logits_nf4_noadapter", DT_F32, {B, T, V}, l_base.data()},
        {"logits_base", DT_F32, {B, T, V}, l_dense.data()}, {"logits_base_noadapter", DT_F32, {B, T, V}, l_dense0.data()},
        {"logits_merged", DT_F32, {B, T, V}, l_mg.data()}},
        {{"model", TIED}, {"adapter", OUT + "/qlora_adapter"}, {"merged", OUT + "/merged"}, {"compute", "fp32"}, {"made_by", "test/test_ecosystem.cpp (reference.h)"}});
    merge_write_checkpoint(TIED, c, lc, w.data(), OUT + "/merged", false);
    bnb_write_checkpoint(TIED, OUT + "/quantized");
    check(file_exists(OUT + "/qlora_adapter/adapter_model.safetensors") && file_exists(OUT + "/merged/model.safetensors") && file_exists(OUT + "/quantized/model.safetensors"),
          "wrote %s/ for dev/check_ecosystem.py (qlora_adapter, qlora_logits.safetensors, merged, quantized)", OUT.c_str());
}

// ---------------------------------------------------------------------------------------------
// Qwen checkpoints: the biases and QK-norms are dense tensors like the norms: never quantized, never
// trained, copied by quantize and merge

// a tiny random checkpoint of `cfg` (bf16): every tensor of for_each_weight, norms U(0.8, 1.2),
// biases and matrices U(-0.1, 0.1) (nonzero biases, so that dropping or zeroing one shows)
static std::string random_checkpoint(const std::string& name, const std::string& cfg) {
    std::string d = TMP + "/" + name;
    mkdir_clean(d);
    write_text_file(d + "/config.json", cfg);
    Config c = load_config(d + "/config.json");
    std::vector<OutTensor> ts;
    uint64_t stream = 0;
    for_each_weight(c, [&](const Weight& w) {
        std::vector<float> x((size_t)w.numel());
        bool norm = w.shape.size() == 1 && !w.bias();
        for (size_t i = 0; i < x.size(); i++) { float u = rng_uniform(77, stream, i); x[i] = norm ? 0.8f + 0.4f * u : 0.2f * u - 0.1f; }
        ts.push_back(out_bf16(w.name, w.shape, x.data()));
        stream++;
    });
    st_write_hf(d + "/model.safetensors", ts);
    return d;
}

static void test_qwen() {
    printf("== Qwen2 / Qwen3 checkpoints\n");
    std::string q2 = random_checkpoint("qwen2", R"({"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 40, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
        "tie_word_embeddings": true, "torch_dtype": "bfloat16", "use_sliding_window": false, "sliding_window": 32768, "max_window_layers": 21})");
    std::string q3 = random_checkpoint("qwen3", R"({"model_type": "qwen3", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "vocab_size": 40, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
        "attention_bias": true, "tie_word_embeddings": false, "torch_dtype": "bfloat16"})");
    for (const std::string& src : {q2, q3}) {
        Config c = load_config(src + "/config.json");
        std::string qd = src + "_nf4";
        bnb_write_checkpoint(src, qd);
        // linears as quantize_weight makes them, every other tensor (biases, norms, q/k norms) byte for byte
        check_bnb_against_source(qd, src, QT_NF4, 64, true, (base_name(src) + " quantized").c_str());
        SafeTensors q = st_open_model(qd), s = st_open_model(src);
        int dense = 0, same = 0;
        for_each_weight(c, [&](const Weight& w) { if (!w.linear() && !(c.tied && w.id == W_LM_HEAD)) { dense++; same += same_bytes(q.find(w.name), s.find(w.name)); } });
        const STensor* kb = q.find("model.layers.1.self_attn.k_proj.bias");
        check(same == dense && kb && kb->dtype == DT_BF16 && kb->shape == std::vector<int64_t>{c.kv_dim()} && !q.find("model.layers.1.self_attn.k_proj.bias.absmax"),
              "%s quantized: %d/%d dense tensors (biases%s) copied as stored, k_proj.bias BF16 [%d], never quantized",
              base_name(src).c_str(), same, dense, c.qk_norm ? ", q/k norms" : "", c.kv_dim());
        RefModel a, b; ref_model_load(a, src); ref_model_load(b, qd);
        check(a.mem == b.mem, "%s saved as bitsandbytes 4-bit loads with identical frozen weights, biases%s included (%zu values)",
              base_name(src).c_str(), c.qk_norm ? " and q/k norms" : "", a.mem.size());

        // merge: linears merged, everything else kept; the merged model computes NF4 base + adapter
        LoraConfig lc = test_lc();
        std::vector<float> w = random_lora(c, lc, 5, 0.05f);
        std::string mg = src + "_merged";
        merge_write_checkpoint(src, c, lc, w.data(), mg, false);
        SafeTensors m = st_open_model(mg);
        checkpoint_view(c, m);
        same = 0;
        for_each_weight(c, [&](const Weight& wt) { if (!wt.linear()) same += same_bytes(m.find(wt.name), s.find(wt.name)); });
        check(m.tensors.size() == s.tensors.size() && same == dense, "%s merged: the source's %zu tensors; biases%s byte for byte (%d/%d dense)",
              base_name(src).c_str(), s.tensors.size(), c.qk_norm ? ", q/k norms" : "", same, dense);
        // budget as in test_merge: 3x what rounding the dequantized base to bf16 alone does to the logits
        RefModel nf4, merged, deqbf16;
        ref_model_load(nf4, src); ref_model_load_dense(merged, mg); ref_model_load(deqbf16, src);
        for (auto& ly : deqbf16.w.linear) for (int p = 0; p < N_PROJ; p++) for (size_t i = 0; i < (size_t)proj_out(c, p) * proj_in(c, p); i++) ly[p][i] = bf16_round(ly[p][i]);
        Inputs in{{}, 2, 8};
        for (int i = 0; i < in.B * in.T; i++) in.ids.push_back((i * 7 + 3) % c.vocab_size);
        LoraConfig none; none.targets = 0;
        std::vector<float> l_ad = ref_logits(nf4, lc, w.data(), in), l_base = ref_logits(nf4, none, nullptr, in);
        std::vector<float> l_mg = ref_logits(merged, none, nullptr, in), l_bf = ref_logits(deqbf16, none, nullptr, in);
        double err = max_abs_diff(l_mg, l_ad), yard = max_abs_diff(l_bf, l_base), effect = max_abs_diff(l_ad, l_base);
        check(err <= 3 * yard + 1e-6 * max_abs(l_ad) && effect >= 10 * err, "%s: logits of the merged model vs NF4 + adapter: max |diff| %.3e <= 3 x %.3e "
              "(bf16 rounding of the base); adapter effect %.3e (scale %.3e)", base_name(src).c_str(), err, yard, effect, max_abs(l_ad));
        std::string mq = src + "_merged_requant", mq2 = src + "_merged_then_quantized";
        merge_write_checkpoint(src, c, lc, w.data(), mq, true);
        bnb_write_checkpoint(mg, mq2);
        SafeTensors x = st_open_model(mq), y = st_open_model(mq2);
        int eq = 0; for (auto& kv : y.tensors) eq += same_bytes(x.find(kv.first), &kv.second);
        check(x.tensors.size() == y.tensors.size() && eq == (int)y.tensors.size() && same_bytes(x.find("model.layers.0.self_attn.q_proj.bias"), s.find("model.layers.0.self_attn.q_proj.bias")),
              "%s --requant: all %zu tensors == quantize(merged bf16 checkpoint); q_proj.bias as stored", base_name(src).c_str(), y.tensors.size());

        // a PEFT adapter of a Qwen model: Llama's module names, no bias or norm tensors
        peft_adapter_write(TMP + "/" + base_name(src) + "_adapter", c, lc, w.data(), src);
        SafeTensors ad = st_open(TMP + "/" + base_name(src) + "_adapter/adapter_model.safetensors");
        bool names = ad.find("base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight") != nullptr;
        for (auto& kv : ad.tensors) names = names && kv.first.find("bias") == std::string::npos && kv.first.find("norm") == std::string::npos;
        LoraConfig back; std::vector<float> wb;
        peft_adapter_read(TMP + "/" + base_name(src) + "_adapter", c, back, wb);
        check(names && wb == w && back.targets == lc.targets, "%s adapter: Llama's PEFT names (%zu tensors), no bias/norm keys, reads back equal",
              base_name(src).c_str(), ad.tensors.size());
    }
}

// ---------------------------------------------------------------------------------------------
// modes for dev/check_ecosystem.py on a GPU machine

// DIR: an adapter PEFT saved, and DIR/logits.safetensors: inputs (B, T) and the logits PEFT computed
// with it in fp32: logits_nf4 (bitsandbytes NF4 double-quant base) and/or logits_base (unquantized base)
static int mode_peft(const std::string& dir, const std::string& model) {
    rcp_table_load("data/rcp_delta.bin");
    Config c = load_config(model + "/config.json");
    LoraConfig lc; std::vector<float> w;
    peft_adapter_read(dir, c, lc, w);
    printf("adapter %s: r %d alpha %g rslora %d targets 0x%02x dropout %g\n", dir.c_str(), lc.rank, lc.alpha, lc.rslora, lc.targets, lc.dropout);
    SafeTensors lg = st_open(dir + "/logits.safetensors");
    const STensor& ti = *lg.find("inputs");
    Inputs in{st_i32(ti), (int)ti.shape[0], (int)ti.shape[1]};
    LoraConfig none; none.targets = 0;
    for (const char* k : {"logits_nf4", "logits_base"}) {
        const STensor* t = lg.find(k);
        if (!t) continue;
        RefModel m;
        if (!strcmp(k, "logits_nf4")) ref_model_load(m, model); else ref_model_load_dense(m, model);
        std::vector<float> ref = st_f32(*t), ours = ref_logits(m, lc, w.data(), in), base = ref_logits(m, none, nullptr, in);
        double scale = max_abs(ref), effect = max_abs_diff(ref, base);
        std::string name = std::string(k) + " (PEFT, fp32) vs CPU reference";
        check_close(name.c_str(), ours.data(), ref.data(), ref.size(), 2e-4 * scale, 0.0);
        check(effect > 20 * 2e-4 * scale, "%s: the adapter changes the logits by %.3e (scale %.3e): it was applied", k, effect, scale);
    }
    return test_summary();
}
// DIR: save_pretrained of MODEL loaded with BitsAndBytesConfig(load_in_4bit) by transformers
static int mode_bnb(const std::string& dir, const std::string& model) {
    rcp_table_load("data/rcp_delta.bin");
    Config c = load_config(model + "/config.json");
    int qt = -1; bool nested = false;
    check(config_is_bnb4(dir + "/config.json", &qt, &nested), "%s/config.json: bitsandbytes 4-bit, %s%s", dir.c_str(), quant_type_name(qt), nested ? " nested" : "");
    SafeTensors q = st_open_model(dir), s = st_open_model(model);
    BnbCheckpointView v = bnb_checkpoint_validate(c, q);
    check(v.qt == qt && v.nested == nested && v.n_dense == 0, "every linear validated: %s blocksize %d%s", quant_type_name(v.qt), v.bs, v.nested ? " nested" : "");
    int ok_bytes = 0, ok_blob = 0, total = 0; uint32_t worst = 0;
    for (int l = 0; l < c.n_layers; l++)
        for (int p = 0; p < N_PROJ; p++) {
            std::string wn = hf_linear_name(l, p);
            Quant4 got; int dt = -1;
            bnb_read_linear(q, wn, proj_out(c, p), proj_in(c, p), got, &dt);
            std::vector<float> x = linear_f32(s, c, l, p);
            Quant4 own = quantize_weight(x.data(), (int64_t)x.size(), v.qt, v.bs, v.nested);
            Quant4 theirs = quantize_weight(x.data(), (int64_t)x.size(), v.qt, v.bs, v.nested, v.nested ? &got.offset : nullptr);
            bool ok = got.packed == theirs.packed && got.absmax_q == theirs.absmax_q && got.absmax2 == theirs.absmax2 && got.absmax == theirs.absmax &&
                      dt == s.find(wn)->dtype && (!v.nested || ulp_dist(own.offset, got.offset) <= OFFSET_ULPS);
            if (v.nested) worst = std::max(worst, ulp_dist(own.offset, got.offset));
            const STensor& js = *v.w.linear[l][p].quant_state;
            std::string blob((const char*)js.data, js.nbytes), mine = bnb_quant_state_json(got, dt, proj_out(c, p), proj_in(c, p));
            if (blob != mine) printf("  %s:\n    theirs %s\n    ours   %s\n", wn.c_str(), blob.c_str(), mine.c_str());
            if (!ok) printf("  %s: bytes differ from quantize_weight of the source\n", wn.c_str());
            total++; ok_bytes += ok; ok_blob += blob == mine;
        }
    check(ok_bytes == total, "%d/%d linears: packed codes, absmax (codes), absmax2 == qlora's quantizer given their offset; our offset within %u ulp (worst %u)",
          ok_bytes, total, OFFSET_ULPS, worst);
    check(ok_blob == total, "%d/%d quant_state blobs byte-identical to qlora's (Python repr of nested_offset)", ok_blob, total);
    // qlora's own output for the same settings, tensor by tensor
    std::string mine = TMP + "/bnb_mode_ours";
    bnb_write_checkpoint(model, mine, v.qt, v.bs, v.nested);
    SafeTensors o = st_open_model(mine);
    int same = 0, meta = 0; std::string missing;
    for (auto& kv : q.tensors) {
        const STensor* t = o.find(kv.first);
        if (!t) { missing += " " + kv.first; continue; }
        meta += t->dtype == kv.second.dtype && t->shape == kv.second.shape;
        same += same_bytes(t, &kv.second);
    }
    check(o.tensors.size() == q.tensors.size() && missing.empty() && meta == (int)q.tensors.size(),
          "qlora quantize writes the same %zu keys, dtypes and shapes as transformers%s%s", q.tensors.size(), missing.empty() ? "" : "; missing:", missing.c_str());
    printf("         %d/%zu tensors byte-identical (the rest differ only through torch.mean's offset)\n", same, q.tensors.size());
    return test_summary();
}

int main(int argc, char** argv) {
    if (argc == 4 && !strcmp(argv[1], "peft")) return mode_peft(argv[2], argv[3]);
    if (argc == 4 && !strcmp(argv[1], "bnb")) return mode_bnb(argv[2], argv[3]);
    ql_assert(argc == 1, "usage: test_ecosystem | test_ecosystem peft ADAPTER_DIR MODEL_DIR | test_ecosystem bnb BNB_DIR MODEL_DIR");
    check(rcp_table_load("data/rcp_delta.bin"), "rcp.approx delta table data/rcp_delta.bin loaded");
    mkdir_clean(TMP);
    test_repr();
    test_json_text();
    test_quant_state_json();
    test_peft();
    test_bnb();
    test_merge();
    test_qwen();
    return test_summary();
}
