// formats.h: the files qlora reads and writes, every one validated as hostile input (errors name the
// file and the tensor):
//   5. a small JSON reader
//   6b. config.json -> Config (Llama family)
//   7. safetensors reader (single file and sharded) and writer
//   9. checkpoint_view: every weight of the model definition, shape-checked against the config
//  10. text as Python writes it (float repr), config.json edited in place
//  10b. output directories: one writer at a time (a lock), every save switched in whole
//  11. PEFT LoRA adapters in and out
//  11b. the trainers' resume state (state.safetensors)
//  12. bitsandbytes 4-bit checkpoints in (pre-quantized models)
//  13. Hugging Face checkpoints out: sharded safetensors, bitsandbytes' 4-bit layout
#pragma once
#include "qlora.h"   // defines: ql_assert, read_file, Config, Quant4, for_each_weight, WeightTable, LoraConfig
#include <map>       // defines: std::map (safetensors name index)
#include <set>       // defines: std::set (duplicate JSON keys, distinct shards)

// ---------------------------------------------------------------------------------------------
// 5. JSON: a small DOM parser for config.json, safetensors headers, index files, adapter configs.
// Hostile input is the norm here: every read is bounds-checked, nesting and the number of values are
// limited, duplicate object keys are rejected, and errors carry the byte offset.

struct Json {
    enum Type { NUL, BOOL, NUM, STR, ARR, OBJ } type = NUL;
    bool b = false;
    double num = 0;
    bool is_uint = false;
    uint64_t u = 0;   // is_uint: a plain non-negative integer literal
    std::string str;
    std::vector<Json> arr;
    std::vector<std::pair<std::string, Json>> obj;   // in file order
    const Json* get(const char* key) const {
        if (type != OBJ) return nullptr;
        for (auto& kv : obj)
            if (kv.first == key) return &kv.second;
        return nullptr;
    }
};

struct JsonParser {
    const char* s;
    size_t n, i = 0;
    std::string err;
    size_t values = 0;
    static const int MAX_DEPTH = 64;
    static const size_t MAX_VALUES = 1u << 20;   // ~112 bytes each in memory: a 100 MB header of "0,0,.." would take 5.6 GB
    bool fail(const char* what) {
        if (err.empty()) {
            char b[160];
            snprintf(b, sizeof b, "%s at byte %zu", what, i);
            err = b;
        }
        return false;
    }
    // at '{' or '[': v becomes an object or array; true if it is empty (its `close` read too)
    bool opened_empty(Json& v, Json::Type type, char close) {
        v.type = type;
        i++;
        ws();
        if (i < n && s[i] == close) {
            i++;
            return true;
        }
        return false;
    }
    // after a member of an object or array: ',' (1: another member), `close` (0: the end), else fail (-1)
    int separator(char close, const char* what) {
        ws();
        if (i < n && (s[i] == ',' || s[i] == close)) return s[i++] == ',' ? 1 : 0;
        fail((i >= n ? std::string("unterminated ") + what : std::string("expected ',' or '") + close + "'").c_str());
        return -1;
    }
    void ws() {
        while (i < n && (s[i] == ' ' || s[i] == '\t' || s[i] == '\n' || s[i] == '\r')) i++;
    }
    bool lit(const char* w) {
        size_t k = strlen(w);
        if (n - i < k || memcmp(s + i, w, k)) return fail("invalid literal");
        i += k;
        return true;
    }
    bool hex4(uint32_t& v) {
        if (n - i < 4) return fail("truncated \\u escape");
        v = 0;
        for (int k = 0; k < 4; k++) {
            char c = s[i++];
            v <<= 4;
            if (c >= '0' && c <= '9')
                v |= c - '0';
            else if (c >= 'a' && c <= 'f')
                v |= c - 'a' + 10;
            else if (c >= 'A' && c <= 'F')
                v |= c - 'A' + 10;
            else
                return fail("bad \\u escape");
        }
        return true;
    }
    bool string(std::string& out) {
        if (i >= n || s[i] != '"') return fail("expected string");
        i++;
        while (true) {
            if (i >= n) return fail("unterminated string");
            unsigned char c = (unsigned char)s[i++];
            if (c == '"') return true;
            if (c < 0x20) return fail("control character in string");
            if (c != '\\') {
                out += (char)c;
                continue;
            }
            if (i >= n) return fail("unterminated escape");
            char e = s[i++];
            switch (e) {
                case '"':
                    out += '"';
                    break;
                case '\\':
                    out += '\\';
                    break;
                case '/':
                    out += '/';
                    break;
                case 'b':
                    out += '\b';
                    break;
                case 'f':
                    out += '\f';
                    break;
                case 'n':
                    out += '\n';
                    break;
                case 'r':
                    out += '\r';
                    break;
                case 't':
                    out += '\t';
                    break;
                case 'u': {
                    uint32_t cp;
                    if (!hex4(cp)) return false;
                    if (cp >= 0xd800 && cp < 0xdc00) {   // surrogate pair
                        uint32_t lo;
                        if (n - i < 2 || s[i] != '\\' || s[i + 1] != 'u') return fail("lone surrogate");
                        i += 2;
                        if (!hex4(lo)) return false;
                        if (lo < 0xdc00 || lo >= 0xe000) return fail("bad surrogate pair");
                        cp = 0x10000 + ((cp - 0xd800) << 10) + (lo - 0xdc00);
                    } else if (cp >= 0xdc00 && cp < 0xe000)
                        return fail("lone surrogate");
                    if (cp < 0x80)
                        out += (char)cp;
                    else if (cp < 0x800) {
                        out += (char)(0xc0 | (cp >> 6));
                        out += (char)(0x80 | (cp & 63));
                    } else if (cp < 0x10000) {
                        out += (char)(0xe0 | (cp >> 12));
                        out += (char)(0x80 | ((cp >> 6) & 63));
                        out += (char)(0x80 | (cp & 63));
                    } else {
                        out += (char)(0xf0 | (cp >> 18));
                        out += (char)(0x80 | ((cp >> 12) & 63));
                        out += (char)(0x80 | ((cp >> 6) & 63));
                        out += (char)(0x80 | (cp & 63));
                    }
                    break;
                }
                default:
                    return fail("bad escape");
            }
        }
    }
    bool number(Json& v) {
        size_t st = i;
        if (i < n && s[i] == '-') i++;
        if (i >= n || !(s[i] >= '0' && s[i] <= '9')) return fail("bad number");
        if (s[i] == '0')
            i++;
        else
            while (i < n && s[i] >= '0' && s[i] <= '9') i++;
        bool integer = true;
        if (i < n && s[i] == '.') {
            integer = false;
            i++;
            if (i >= n || !(s[i] >= '0' && s[i] <= '9')) return fail("bad number");
            while (i < n && s[i] >= '0' && s[i] <= '9') i++;
        }
        if (i < n && (s[i] == 'e' || s[i] == 'E')) {
            integer = false;
            i++;
            if (i < n && (s[i] == '+' || s[i] == '-')) i++;
            if (i >= n || !(s[i] >= '0' && s[i] <= '9')) return fail("bad number");
            while (i < n && s[i] >= '0' && s[i] <= '9') i++;
        }
        if (i - st > 400) return fail("number too long");
        std::string t(s + st, i - st);
        v.type = Json::NUM;
        v.num = strtod(t.c_str(), nullptr);
        if (integer && s[st] != '-') {
            uint64_t u = 0;
            bool ovf = false;
            for (char c : t) {
                uint64_t d = (uint64_t)(c - '0');
                if (u > (UINT64_MAX - d) / 10) ovf = true;
                u = u * 10 + d;
            }
            if (!ovf) {
                v.is_uint = true;
                v.u = u;
            }
        }
        return true;
    }
    bool value(Json& v, int depth) {
        if (depth > MAX_DEPTH) return fail("nesting too deep");
        if (++values > MAX_VALUES) return fail("more than 1048576 values");
        ws();
        if (i >= n) return fail("unexpected end");
        char c = s[i];
        if (c == '{') {
            if (opened_empty(v, Json::OBJ, '}')) return true;
            std::set<std::string> keys;   // not a scan of v.obj: a hostile header has millions of keys
            while (true) {
                ws();
                std::string k;
                if (!string(k)) return false;
                if (!keys.insert(k).second) return fail(("duplicate key \"" + k.substr(0, 64) + "\"").c_str());
                ws();
                if (i >= n || s[i] != ':') return fail("expected ':'");
                i++;
                v.obj.emplace_back(std::move(k), Json());
                if (!value(v.obj.back().second, depth + 1)) return false;
                int next = separator('}', "object");
                if (next <= 0) return next == 0;
            }
        }
        if (c == '[') {
            if (opened_empty(v, Json::ARR, ']')) return true;
            while (true) {
                v.arr.emplace_back();
                if (!value(v.arr.back(), depth + 1)) return false;
                int next = separator(']', "array");
                if (next <= 0) return next == 0;
            }
        }
        if (c == '"') {
            v.type = Json::STR;
            return string(v.str);
        }
        if (c == 't') {
            v.type = Json::BOOL;
            v.b = true;
            return lit("true");
        }
        if (c == 'f') {
            v.type = Json::BOOL;
            v.b = false;
            return lit("false");
        }
        if (c == 'n') {
            v.type = Json::NUL;
            return lit("null");
        }
        return number(v);
    }
};
// Parse a whole document (trailing whitespace allowed). On failure err says what and where.
inline bool json_parse(const char* s, size_t n, Json& out, std::string& err) {
    JsonParser p{s, n, 0, {}, 0};
    out = Json();
    if (!p.value(out, 0)) {
        err = p.err;
        return false;
    }
    p.ws();
    if (p.i != n) {
        p.fail("trailing characters");
        err = p.err;
        return false;
    }
    return true;
}
inline Json json_load(const std::string& path) {
    std::vector<uint8_t> b = read_file(path);
    Json j;
    std::string err;
    ql_assert(json_parse((const char*)b.data(), b.size(), j, err), "%s: invalid JSON: %s", path.c_str(), err.c_str());
    return j;
}
// JSON text out: strings escaped, numbers with shortest round-trip precision where needed
inline std::string json_quote(const std::string& s) {
    std::string o = "\"";
    for (unsigned char c : s) {
        if (c == '"' || c == '\\') {
            o += '\\';
            o += (char)c;
        } else if (c < 0x20) {
            char b[8];
            snprintf(b, sizeof b, "\\u%04x", c);
            o += b;
        } else
            o += (char)c;
    }
    return o + "\"";
}

// ---------------------------------------------------------------------------------------------
// 6b. config.json -> Config (formats.md §2): llama, mistral, qwen2, qwen3, with the defaults of each
// transformers config class. Reads `rope_parameters` (transformers v5) first, else rope_theta +
// rope_scaling; `dtype` or `torch_dtype`. Anything we would compute wrongly is refused.

inline int dtype_from_torch_name(const std::string& s) {
    if (s == "bfloat16") return DT_BF16;
    if (s == "float16") return DT_F16;
    if (s == "float32") return DT_F32;
    return DT_NONE;
}
// why a model_type we do not support would compute something else than the Llama block
inline const char* unsupported_model_hint(const std::string& mt) {
    if (mt == "mixtral" || mt.find("moe") != std::string::npos)
        return ": its MLP is a mixture of experts, which qlora does not implement";
    if (mt.rfind("gemma", 0) == 0)
        return ": Gemma's RMSNorm scales by (1 + weight), its MLP is GeLU and it scales the embeddings; not implemented";
    if (mt == "phi3") return ": phi3 fuses q/k/v into qkv_proj and gate/up into gate_up_proj, which qlora does not split";
    if (mt == "olmo2")
        return ": OLMo 2 normalises q and k over the whole projection and puts its norms after the sublayers; not implemented";
    return "";
}
inline Config config_from_json(const Json& j, const std::string& path) {
    const char* p = path.c_str();
    ql_assert(j.type == Json::OBJ, "%s: expected a JSON object", p);
    auto num = [&](const char* k, double def, bool required) -> double {
        const Json* v = j.get(k);
        if (!v || v->type == Json::NUL) {
            ql_assert(!required, "%s: missing \"%s\"", p, k);
            return def;
        }
        ql_assert(v->type == Json::NUM, "%s: \"%s\" must be a number", p, k);
        return v->num;
    };
    auto integer = [&](const char* k, int def, bool required, int lo, int hi) -> int {
        double d = num(k, def, required);
        ql_assert(d == floor(d) && d >= lo && d <= hi, "%s: \"%s\" = %g is not an integer in [%d, %d]", p, k, d, lo, hi);
        return (int)d;
    };
    auto f32 = [&](double v, const char* k) -> float {   // checked first: a double beyond FLT_MAX has no float
        ql_assert(fabs(v) <= 3.4028234663852886e38, "%s: \"%s\" = %g is out of fp32 range", p, k, v);
        return (float)v;
    };
    auto flag = [&](const char* k, bool def) -> bool {
        const Json* v = j.get(k);
        if (!v || v->type == Json::NUL) return def;
        ql_assert(v->type == Json::BOOL, "%s: \"%s\" must be true or false", p, k);
        return v->b;
    };
    auto str = [&](const Json* o, const char* k) -> std::string {
        const Json* v = o ? o->get(k) : nullptr;
        if (!v || v->type == Json::NUL) return "";
        ql_assert(v->type == Json::STR, "%s: \"%s\" must be a string", p, k);
        return v->str;
    };
    // the families, and what transformers' classes do with each key (formats.md §2.2): Qwen2Attention
    // hard-codes bias on q/k/v (none on o) and ignores attention_bias; Mistral never has biases;
    // Llama and Qwen3 put attention_bias on q, k, v and o; only Llama reads mlp_bias.
    std::string mt = str(&j, "model_type");
    bool llama = mt == "llama", mistral = mt == "mistral", qwen2 = mt == "qwen2", qwen3 = mt == "qwen3", qwen = qwen2 || qwen3;
    ql_assert(llama || mistral || qwen, "%s: model_type \"%s\" is not supported (llama, mistral, qwen2, qwen3)%s", p, mt.c_str(),
              unsupported_model_hint(mt));
    std::string act = str(&j, "hidden_act");
    ql_assert(act.empty() || act == "silu", "%s: hidden_act \"%s\" is not supported (silu only)", p, act.c_str());
    bool attention_bias = flag("attention_bias", false);
    ql_assert(!(llama && flag("mlp_bias", false)), "%s: mlp_bias = true is not supported (no biases on gate/up/down)", p);
    Config c;
    c.qkv_bias = qwen2 || ((llama || qwen3) && attention_bias);
    c.o_bias = (llama || qwen3) && attention_bias;
    c.qk_norm = qwen3;
    c.dim = integer("hidden_size", 4096, true, 1, 1 << 17);
    c.hidden_dim = integer("intermediate_size", 11008, true, 1, 1 << 19);
    c.n_layers = integer("num_hidden_layers", 32, true, 1, 1024);
    c.n_heads = integer("num_attention_heads", 32, true, 1, 4096);
    // num_key_value_heads: null means nh; absent, each class's default (Llama nh, Mistral 8, Qwen 32)
    c.n_kv_heads = integer("num_key_value_heads",
                           (j.get("num_key_value_heads") || llama) ? c.n_heads
                           : mistral                               ? 8
                                                                   : 32,
                           false, 1, 4096);
    ql_assert(c.n_heads % c.n_kv_heads == 0, "%s: num_attention_heads (%d) is not a multiple of num_key_value_heads (%d)", p,
              c.n_heads, c.n_kv_heads);
    // head_dim: H/nh when absent or null, except Qwen3, whose class default is 128
    const Json* hdj = j.get("head_dim");
    bool hd_given = (hdj && hdj->type != Json::NUL) || qwen3;
    ql_assert(hd_given || c.dim % c.n_heads == 0, "%s: hidden_size %d not divisible by num_attention_heads %d and no head_dim", p,
              c.dim, c.n_heads);
    c.head_dim = integer("head_dim", qwen3 ? 128 : c.dim / c.n_heads, false, 2, 1024);
    ql_assert(c.head_dim % 2 == 0, "%s: head_dim %d must be even (RoPE rotates halves)", p, c.head_dim);
    c.vocab_size = integer("vocab_size", 32000, true, 1, 1 << 24);
    c.max_seq_len = integer("max_position_embeddings", qwen ? 32768 : mistral ? 131072 : 2048, false, 1, 1 << 24);
    c.norm_eps = f32(num("rms_norm_eps", 1e-6, false), "rms_norm_eps");
    ql_assert(c.norm_eps > 0 && c.norm_eps < 1, "%s: rms_norm_eps %g out of range", p, c.norm_eps);
    c.tied = flag("tie_word_embeddings", false);
    std::string dt = str(&j, "dtype");
    if (dt.empty()) dt = str(&j, "torch_dtype");
    c.dtype = dt.empty() ? DT_BF16 : dtype_from_torch_name(dt);
    ql_assert(c.dtype != DT_NONE, "%s: dtype \"%s\" is not supported (bfloat16, float16, float32)", p, dt.c_str());
    // Sliding window: the band of the causal mask (keys t-W < j <= t), which the trainers do not
    // implement: they refuse --seq > W, below which it changes nothing. Mistral bands every layer when
    // sliding_window is set (absent: 4096). Qwen2/Qwen3 band only with use_sliding_window, and only the
    // layers layer_types marks "sliding_attention" (without layer_types: from max_window_layers on).
    auto window = [&]() -> int {
        const Json* v = j.get("sliding_window");
        if (!v) return 4096;   // MistralConfig's and Qwen2/3Config's default
        return integer("sliding_window", 0, false, 0, INT32_MAX);
    };
    if (mistral) c.sliding_window = window();
    if (qwen && flag("use_sliding_window", false)) {
        bool any = false;
        const Json* lt = j.get("layer_types");
        if (lt && lt->type != Json::NUL) {
            ql_assert(lt->type == Json::ARR && lt->arr.size() == (size_t)c.n_layers,
                      "%s: \"layer_types\" must be a list of num_hidden_layers (%d) names", p, c.n_layers);
            for (const Json& t : lt->arr) {
                ql_assert(t.type == Json::STR && (t.str == "full_attention" || t.str == "sliding_attention"),
                          "%s: \"layer_types\" holds \"%s\" (full_attention or sliding_attention)", p,
                          t.type == Json::STR ? t.str.c_str() : "a non-string");
                any = any || t.str == "sliding_attention";
            }
        } else
            any = integer("max_window_layers", 28, false, 0, 1 << 24) < c.n_layers;
        if (any) c.sliding_window = window();
    }
    // RoPE: v5 rope_parameters, else rope_theta + rope_scaling ("type" is an alias of "rope_type")
    const Json* rp = j.get("rope_parameters");
    const Json* rs = (rp && rp->type == Json::OBJ) ? rp : j.get("rope_scaling");
    if (rs && rs->type != Json::NUL) ql_assert(rs->type == Json::OBJ, "%s: rope_scaling must be an object or null", p);
    if (rs && rs->type != Json::OBJ) rs = nullptr;
    const Json* th = (rp && rp->type == Json::OBJ && rp->get("rope_theta")) ? rp->get("rope_theta") : j.get("rope_theta");
    if (th && th->type != Json::NUL) {
        ql_assert(th->type == Json::NUM && th->num > 1, "%s: bad rope_theta", p);
        c.rope_theta = f32(th->num, "rope_theta");
    }
    std::string rt = str(rs, "rope_type");
    if (rt.empty()) rt = str(rs, "type");
    auto rnum = [&](const char* k, double def) -> double {
        const Json* v = rs ? rs->get(k) : nullptr;
        if (!v || v->type == Json::NUL) return def;
        ql_assert(v->type == Json::NUM, "%s: rope parameter \"%s\" must be a number", p, k);
        return v->num;
    };
    if (rt.empty() || rt == "default")
        c.rope_type = ROPE_DEFAULT;
    else if (rt == "linear") {
        c.rope_type = ROPE_LINEAR;
        c.rope_factor = f32(rnum("factor", 1.0), "factor");
    } else if (rt == "llama3") {
        c.rope_type = ROPE_LLAMA3;
        ql_assert(rs->get("factor") && rs->get("low_freq_factor") && rs->get("high_freq_factor") &&
                      rs->get("original_max_position_embeddings"),
                  "%s: llama3 rope scaling needs factor, low_freq_factor, high_freq_factor, original_max_position_embeddings", p);
        c.rope_factor = f32(rnum("factor", 8), "factor");
        c.rope_low_freq = f32(rnum("low_freq_factor", 1), "low_freq_factor");
        c.rope_high_freq = f32(rnum("high_freq_factor", 4), "high_freq_factor");
        double om = rnum("original_max_position_embeddings", 8192);   // range-checked before the cast to int
        ql_assert(om == floor(om) && om >= 1 && om <= (1 << 24),
                  "%s: original_max_position_embeddings = %g is not an integer in [1, %d]", p, om, 1 << 24);
        c.rope_orig_max = (int)om;
        ql_assert(c.rope_high_freq > c.rope_low_freq, "%s: inconsistent llama3 rope scaling", p);
    } else
        ql_fail("%s: rope type \"%s\" is not supported (default, linear, llama3)", p, rt.c_str());
    ql_assert(c.rope_factor > 0, "%s: rope factor must be positive", p);
    return c;
}
inline Config load_config(const std::string& path) {
    return config_from_json(json_load(path), path);
}

// ---------------------------------------------------------------------------------------------
// 7. safetensors (formats.md §1): `u64 N | N bytes JSON header | data`. Files are memory-mapped;
// the header is validated like the Rust reader: size limits, known dtypes, nbytes == numel*bits/8,
// tensors tile the data exactly (no holes, no overlap), nothing after the last tensor.
struct DTypeInfo {
    const char* name;
    int bits;
    int dt;
};
static const DTypeInfo ST_DTYPES[] = {
    {"BF16", 16, DT_BF16},   {"F16", 16, DT_F16},         {"F32", 32, DT_F32},         {"U8", 8, DT_U8},
    {"I32", 32, DT_I32},     {"I64", 64, DT_I64},         {"BOOL", 8, DT_NONE},        {"I8", 8, DT_NONE},
    {"I16", 16, DT_NONE},    {"U16", 16, DT_NONE},        {"U32", 32, DT_NONE},        {"U64", 64, DT_NONE},
    {"F64", 64, DT_NONE},    {"C64", 64, DT_NONE},        {"F8_E5M2", 8, DT_NONE},     {"F8_E4M3", 8, DT_NONE},
    {"F8_E8M0", 8, DT_NONE}, {"F8_E4M3FNUZ", 8, DT_NONE}, {"F8_E5M2FNUZ", 8, DT_NONE}, {"F4", 4, DT_NONE},
    {"F6_E2M3", 6, DT_NONE}, {"F6_E3M2", 6, DT_NONE}};
inline const char* dtype_name(int dt) {
    for (auto& d : ST_DTYPES)
        if (d.dt == dt) return d.name;
    return "?";
}
inline int dtype_bytes(int dt) {
    for (auto& d : ST_DTYPES)
        if (d.dt == dt) return d.bits / 8;
    return 0;
}

struct MappedFile {   // read-only mmap of a whole file
    std::string path;
    const uint8_t* data = nullptr;
    size_t size = 0;
    MappedFile(const std::string& p);
    ~MappedFile();
    MappedFile(const MappedFile&) = delete;
    MappedFile& operator=(const MappedFile&) = delete;
};
#include <sys/mman.h>   // defines: mmap
#include <fcntl.h>      // defines: open
#include <unistd.h>     // defines: close, fsync, getpid
#include <atomic>       // defines: std::atomic (unique temporary names; the next checkpoint piece to make)
inline MappedFile::MappedFile(const std::string& p) : path(p) {
    require_regular_file(p);   // before the open, which would block on a FIFO
    int fd = open(p.c_str(), O_RDONLY | O_NONBLOCK);
    ql_assert(fd >= 0, "cannot open %s", p.c_str());
    struct stat sb;   // fd closed before any error: in throw mode (ql_error_mode) a failure must not leak it
    bool regular = fstat(fd, &sb) == 0 && S_ISREG(sb.st_mode);
    size = regular ? (size_t)sb.st_size : 0;
    void* m = size > 0 ? mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0) : nullptr;
    close(fd);
    ql_assert(regular, "%s: not a regular file", p.c_str());
    ql_assert(m != MAP_FAILED, "cannot map %s", p.c_str());
    data = (const uint8_t*)m;
}
inline MappedFile::~MappedFile() {
    if (data) munmap((void*)data, size);
}
// Drops the pages of [p, p + n) from this process's memory once they have been read (a 70B
// checkpoint is larger than the host's RAM): they are clean, file-backed and read-only, so a later
// read just maps them again. Advice only: a failure changes nothing but the memory use.
inline void mapped_release(const void* p, size_t n) {
    size_t page = (size_t)sysconf(_SC_PAGESIZE), a = (size_t)p / page * page, e = (size_t)p + n;
    if (n) madvise((void*)a, e - a, MADV_DONTNEED);
}

struct STensor {
    std::string name, file;   // file: the path it lives in, for error messages
    int dtype = DT_NONE;
    std::string dtype_str;
    std::vector<int64_t> shape;
    size_t nbytes = 0;
    const uint8_t* data = nullptr;   // into the mapped file
    int64_t numel() const {
        int64_t n = 1;
        for (int64_t d : shape) n *= d;
        return n;
    }
    std::string shape_str() const {
        std::string s = "[";
        for (size_t i = 0; i < shape.size(); i++) s += (i ? ", " : "") + std::to_string(shape[i]);
        return s + "]";
    }
};

struct SafeTensors {
    std::vector<std::unique_ptr<MappedFile>> files;
    std::map<std::string, STensor> tensors;
    std::map<std::string, std::string> metadata;   // __metadata__ of the (first) file
    int n_parsed = 0;                              // files parsed so far (st_parse)
    const STensor* find(const std::string& name) const {
        auto it = tensors.find(name);
        return it == tensors.end() ? nullptr : &it->second;
    }
    // The tensor, which must exist with exactly this shape; dtype one of the float types unless given.
    const STensor& get(const std::string& name, std::vector<int64_t> shape, int want_dtype = -1) const {
        const STensor* t = find(name);
        ql_assert(t, "checkpoint is missing tensor \"%s\"%s", name.c_str(),
                  files.empty() ? "" : (" (looked in " + files[0]->path + (files.size() > 1 ? " and its shards)" : ")")).c_str());
        ql_assert(t->shape == shape, "%s: tensor \"%s\" has shape %s, the config implies [%s]", t->file.c_str(), name.c_str(),
                  t->shape_str().c_str(),
                  [&] {
                      std::string s;
                      for (size_t i = 0; i < shape.size(); i++) s += (i ? ", " : "") + std::to_string(shape[i]);
                      return s;
                  }()
                      .c_str());
        if (want_dtype >= 0)
            ql_assert(t->dtype == want_dtype, "%s: tensor \"%s\" has dtype %s, expected %s", t->file.c_str(), name.c_str(),
                      t->dtype_str.c_str(), dtype_name(want_dtype));
        else
            ql_assert(t->dtype == DT_BF16 || t->dtype == DT_F16 || t->dtype == DT_F32,
                      "%s: tensor \"%s\" has dtype %s; weights must be BF16, F16 or F32", t->file.c_str(), name.c_str(),
                      t->dtype_str.c_str());
        return *t;
    }
};

// Validate one file's header and add its tensors. err-free on success; on any violation, exit with a
// message naming the file and the tensor. `data` (size bytes, the whole file) must outlive st: the
// tensors point into it. `path` names the file in messages and in STensor::file.
inline void st_parse(SafeTensors& st, const uint8_t* data, size_t size, const std::string& path) {
    const bool first = st.n_parsed++ == 0;
    const char* p = path.c_str();
    ql_assert(size >= 8, "%s: not a safetensors file (%zu bytes, shorter than the 8-byte header length)", p, size);
    uint64_t hn = 0;
    for (int k = 7; k >= 0; k--) hn = (hn << 8) | data[k];
    ql_assert(hn <= 100000000ull, "%s: header length %llu exceeds the 100 MB limit (corrupt file?)", p, (unsigned long long)hn);
    ql_assert(8 + hn <= size, "%s: header length %llu runs past the end of the %zu-byte file (truncated?)", p,
              (unsigned long long)hn, size);
    ql_assert(hn >= 2 && data[8] == '{', "%s: header does not start with '{'", p);
    size_t hlen = (size_t)hn;
    while (hlen > 0 && data[8 + hlen - 1] == ' ') hlen--;   // trailing space padding
    Json h;
    std::string err;
    ql_assert(json_parse((const char*)data + 8, hlen, h, err), "%s: invalid header JSON: %s", p, err.c_str());
    ql_assert(h.type == Json::OBJ, "%s: header is not a JSON object", p);
    const uint64_t data_size = size - 8 - hn;
    struct Span {
        uint64_t b, e;
        std::string name;
    };
    std::vector<Span> spans;
    for (auto& kv : h.obj) {
        const std::string& name = kv.first;
        const Json& t = kv.second;
        if (name == "__metadata__") {
            ql_assert(t.type == Json::OBJ, "%s: __metadata__ must be an object", p);
            for (auto& m : t.obj) {
                ql_assert(m.second.type == Json::STR, "%s: __metadata__[\"%s\"] must be a string", p, m.first.c_str());
                if (first) st.metadata[m.first] = m.second.str;
            }
            continue;
        }
        const char* tn = name.c_str();
        ql_assert(t.type == Json::OBJ, "%s: tensor \"%s\": entry is not an object", p, tn);
        const Json *jd = t.get("dtype"), *js = t.get("shape"), *jo = t.get("data_offsets");
        ql_assert(jd && jd->type == Json::STR, "%s: tensor \"%s\": missing dtype", p, tn);
        ql_assert(js && js->type == Json::ARR, "%s: tensor \"%s\": missing shape", p, tn);
        ql_assert(jo && jo->type == Json::ARR && jo->arr.size() == 2 && jo->arr[0].is_uint && jo->arr[1].is_uint,
                  "%s: tensor \"%s\": data_offsets must be two non-negative integers", p, tn);
        STensor s;
        s.name = name;
        s.file = path;
        s.dtype_str = jd->str;
        int bits = 0;
        for (auto& d : ST_DTYPES)
            if (jd->str == d.name) {
                bits = d.bits;
                s.dtype = d.dt;
            }
        ql_assert(bits, "%s: tensor \"%s\": unknown dtype \"%s\"", p, tn, jd->str.c_str());
        uint64_t numel = 1;
        for (auto& d : js->arr) {
            ql_assert(d.is_uint && d.u < (1ull << 40), "%s: tensor \"%s\": shape entries must be non-negative integers", p, tn);
            s.shape.push_back((int64_t)d.u);
            ql_assert(d.u == 0 || numel <= (1ull << 50) / d.u, "%s: tensor \"%s\": shape too large", p, tn);
            numel *= d.u;
        }
        uint64_t b = jo->arr[0].u, e = jo->arr[1].u;
        ql_assert(b <= e, "%s: tensor \"%s\": data_offsets [%llu, %llu] are reversed", p, tn, (unsigned long long)b,
                  (unsigned long long)e);
        ql_assert(numel * bits % 8 == 0, "%s: tensor \"%s\": %llu elements of %s do not fill whole bytes", p, tn,
                  (unsigned long long)numel, jd->str.c_str());
        ql_assert(e - b == numel * bits / 8, "%s: tensor \"%s\": data_offsets span %llu bytes but shape %s of %s needs %llu", p, tn,
                  (unsigned long long)(e - b), s.shape_str().c_str(), jd->str.c_str(), (unsigned long long)(numel * bits / 8));
        ql_assert(e <= data_size, "%s: tensor \"%s\": data_offsets end %llu is past the data (%llu bytes; truncated file?)", p, tn,
                  (unsigned long long)e, (unsigned long long)data_size);
        ql_assert(!st.find(name), "%s: tensor \"%s\" appears in two files", p, tn);
        s.nbytes = (size_t)(e - b);
        s.data = data + 8 + hn + b;
        spans.push_back({b, e, name});
        st.tensors[name] = s;
    }
    std::sort(spans.begin(), spans.end(), [](const Span& x, const Span& y) { return x.b != y.b ? x.b < y.b : x.e < y.e; });
    uint64_t at = 0;
    for (auto& sp : spans) {
        ql_assert(sp.b == at, "%s: tensor \"%s\" starts at byte %llu of the data, expected %llu (%s)", p, sp.name.c_str(),
                  (unsigned long long)sp.b, (unsigned long long)at,
                  sp.b < at ? "overlaps the previous tensor" : "a hole before it");
        at = sp.e;
    }
    ql_assert(at == data_size, "%s: %llu bytes after the last tensor (expected none)", p, (unsigned long long)(data_size - at));
}
inline void st_add_file(SafeTensors& st, const std::string& path) {
    st.files.emplace_back(new MappedFile(path));
    st_parse(st, st.files.back()->data, st.files.back()->size, path);
}
inline SafeTensors st_open(const std::string& path) {
    SafeTensors st;
    st_add_file(st, path);
    return st;
}

// A sharded checkpoint's model.safetensors.index.json: which file holds each tensor.
struct STIndex {
    std::vector<std::pair<std::string, std::string>> weight_map;   // (tensor, shard file name), in file order
    std::vector<std::string> shards;                               // distinct shard file names, first-seen order
};
inline STIndex st_parse_index(const uint8_t* data, size_t size, const std::string& index) {
    Json j;
    std::string err;
    ql_assert(json_parse((const char*)data, size, j, err), "%s: invalid JSON: %s", index.c_str(), err.c_str());
    const Json* wm = j.get("weight_map");
    ql_assert(wm && wm->type == Json::OBJ, "%s: missing \"weight_map\" object", index.c_str());
    STIndex ix;
    std::set<std::string> seen;
    for (auto& kv : wm->obj) {
        ql_assert(kv.second.type == Json::STR, "%s: weight_map[\"%s\"] must be a file name", index.c_str(), kv.first.c_str());
        const std::string& fn = kv.second.str;
        ql_assert(!fn.empty() && fn.find('/') == std::string::npos && fn.find('\0') == std::string::npos && fn != "." && fn != "..",
                  "%s: weight_map[\"%s\"] = \"%s\" is not a plain file name", index.c_str(), kv.first.c_str(), fn.c_str());
        if (seen.insert(fn).second) ix.shards.push_back(fn);
        ix.weight_map.emplace_back(kv.first, fn);
    }
    return ix;
}
// Every tensor the index lists must be in the shard it names (st holds the shards, read from dir).
inline void st_check_index(const SafeTensors& st, const STIndex& ix, const std::string& dir, const std::string& index) {
    for (auto& kv : ix.weight_map) {
        const STensor* t = st.find(kv.first);
        ql_assert(t, "%s: index lists tensor \"%s\" in %s, but that file does not contain it", index.c_str(), kv.first.c_str(),
                  kv.second.c_str());
        ql_assert(t->file == dir + "/" + kv.second, "%s: tensor \"%s\" is listed in %s but found in %s", index.c_str(),
                  kv.first.c_str(), kv.second.c_str(), t->file.c_str());
    }
}
// A Hugging Face model directory: model.safetensors, or model.safetensors.index.json + shards.
inline SafeTensors st_open_model(const std::string& dir) {
    std::string single = dir + "/model.safetensors", index = dir + "/model.safetensors.index.json";
    if (!file_exists(index)) {
        ql_assert(file_exists(single),
                  "%s: no model.safetensors or model.safetensors.index.json (is this a Hugging Face checkpoint directory?)",
                  dir.c_str());
        return st_open(single);
    }
    std::vector<uint8_t> text = read_file(index);
    STIndex ix = st_parse_index(text.data(), text.size(), index);
    SafeTensors st;
    for (auto& fn : ix.shards) st_add_file(st, dir + "/" + fn);
    st_check_index(st, ix, dir, index);
    return st;
}

// Tensor -> fp32 (BF16, F16, F32 exactly), and integer tensors -> int32 (range-checked).
inline void st_to_f32(float* out, const STensor& t) {
    int64_t n = t.numel();
    for (int64_t i = 0; i < n; i++) {
        const uint8_t* q = t.data + i * dtype_bytes(t.dtype);
        if (t.dtype == DT_F32) {
            float v;
            memcpy(&v, q, 4);
            out[i] = v;
        } else if (t.dtype == DT_BF16)
            out[i] = bf16_to_f32((uint16_t)(q[0] | q[1] << 8));
        else if (t.dtype == DT_F16)
            out[i] = f16_to_f32((uint16_t)(q[0] | q[1] << 8));
        else
            ql_fail("%s: tensor \"%s\" has dtype %s, expected BF16, F16 or F32", t.file.c_str(), t.name.c_str(),
                    t.dtype_str.c_str());
    }
}
inline std::vector<float> st_f32(const STensor& t) {
    std::vector<float> v((size_t)t.numel());
    st_to_f32(v.data(), t);
    return v;
}
inline std::vector<int32_t> st_i32(const STensor& t) {
    std::vector<int32_t> v((size_t)t.numel());
    for (size_t i = 0; i < v.size(); i++) {
        if (t.dtype == DT_I32)
            memcpy(&v[i], t.data + 4 * i, 4);
        else if (t.dtype == DT_I64) {
            int64_t x;
            memcpy(&x, t.data + 8 * i, 8);
            ql_assert(x >= INT32_MIN && x <= INT32_MAX, "%s: tensor \"%s\": value out of int32 range", t.file.c_str(),
                      t.name.c_str());
            v[i] = (int32_t)x;
        } else
            ql_fail("%s: tensor \"%s\" has dtype %s, expected I32 or I64", t.file.c_str(), t.name.c_str(), t.dtype_str.c_str());
    }
    return v;
}

// Writer: header padded with spaces to a multiple of 8, __metadata__ {"format": "pt"} always, tensors
// packed back to back in name order. Atomic: written to PATH.tmp.PID.N (a name no other writer, in
// this process or another, uses), fsynced, renamed over PATH, so a crash or a full disk leaves the
// previous file intact.
struct STOut {
    std::string name;
    int dtype;
    std::vector<int64_t> shape;
    const void* data;
};
inline bool write_all(FILE* f, const void* p, size_t n) {
    long long& budget = ql_error_mode().fail_writes_after;
    if (budget >= 0) {
        size_t k = n < (size_t)budget ? n : (size_t)budget;
        budget -= (long long)k;
        if (k < n) {
            if (k) fwrite(p, 1, k, f);
            return false;
        }
    }
    return n == 0 || fwrite(p, 1, n, f) == n;
}
// the sibling being written (and the DIR it is for), deleted if the process exits before the switch
// (formats.h §10b: out_write_set)
struct OutPending {
    std::string stage, dir;
};
inline OutPending& out_pending() {
    static OutPending p;
    return p;
}
inline std::string unique_suffix() {   // ".PID.N": N counts this process's calls
    static std::atomic<unsigned long> n{0};
    return "." + std::to_string((long)getpid()) + "." + std::to_string(n++);
}
inline void atomic_write(const std::string& path, const std::vector<std::pair<const void*, size_t>>& parts) {
    std::string tmp = path + ".tmp" + unique_suffix();
    FILE* f = fopen(tmp.c_str(), "wb");
    ql_assert(f, "cannot create %s (directory missing or not writable?)", tmp.c_str());
    bool ok = true;
    for (auto& pt : parts) ok = ok && write_all(f, pt.first, pt.second);
    ok = ok && fflush(f) == 0 && fsync(fileno(f)) == 0;
    ok = (fclose(f) == 0) && ok;
    if (!ok) {
        remove(tmp.c_str());
        const OutPending& set = out_pending();   // a file of a set being written: the previous set is what stays
        if (!set.stage.empty() && path.compare(0, set.stage.size() + 1, set.stage + "/") == 0)
            ql_fail("writing %s failed (disk full?); %s keeps its previous files, unchanged", path.c_str(), set.dir.c_str());
        ql_fail("writing %s failed (disk full?); the previous %s is unchanged", tmp.c_str(), path.c_str());
    }
    ql_assert(rename(tmp.c_str(), path.c_str()) == 0, "cannot rename %s to %s", tmp.c_str(), path.c_str());
}
inline void st_write(const std::string& path, std::vector<STOut> ts, std::map<std::string, std::string> meta = {}) {
    std::sort(ts.begin(), ts.end(), [](const STOut& a, const STOut& b) { return a.name < b.name; });
    meta["format"] = "pt";
    std::string h = "{\"__metadata__\":{";
    bool first = true;
    for (auto& m : meta) {
        h += (first ? "" : ",") + json_quote(m.first) + ":" + json_quote(m.second);
        first = false;
    }
    h += "}";
    uint64_t off = 0;
    std::vector<size_t> sizes;
    for (auto& t : ts) {
        size_t n = (size_t)dtype_bytes(t.dtype);
        for (int64_t d : t.shape) n *= (size_t)d;
        sizes.push_back(n);
        h += "," + json_quote(t.name) + ":{\"dtype\":\"" + dtype_name(t.dtype) + "\",\"shape\":[";
        for (size_t i = 0; i < t.shape.size(); i++) h += (i ? "," : "") + std::to_string(t.shape[i]);
        h += "],\"data_offsets\":[" + std::to_string(off) + "," + std::to_string(off + n) + "]}";
        off += n;
    }
    h += "}";
    while (h.size() % 8) h += ' ';
    uint8_t len[8];
    for (int k = 0; k < 8; k++) len[k] = (uint8_t)((uint64_t)h.size() >> (8 * k));
    std::vector<std::pair<const void*, size_t>> parts = {{len, 8}, {h.data(), h.size()}};
    for (size_t i = 0; i < ts.size(); i++) parts.push_back({ts[i].data, sizes[i]});
    atomic_write(path, parts);
}

// ---------------------------------------------------------------------------------------------
// 9. the checkpoint as the model sees it: every weight of for_each_weight (qlora.h §7), found and
// shape-checked up front, so a bad file fails before anything is allocated, naming the file and the
// tensor. Tied: lm_head is usually absent; some fine-tunes carry both, and embed_tokens wins (formats.md §2).

using CheckpointView = WeightTable<const STensor*, const STensor*>;   // every weight as stored
inline CheckpointView checkpoint_view(const Config& c, const SafeTensors& st) {
    CheckpointView v;
    auto find = [&](const Weight& w, const STensor*& t) {
        t = &st.get(w.name, w.shape);
    };
    v.fill(c, find, find);
    return v;
}

// =============================================================================================
// Ecosystem files (sections 10-13): Python-exact number text, PEFT adapters in and out,
// bitsandbytes 4-bit checkpoints in and out, Hugging Face checkpoints out.
#include <charconv>   // defines: std::to_chars (shortest round-trip digits)
// GCC 12 with -fsanitize flags std::regex's std::function members as maybe-uninitialized, a false
// positive reported at lines of these headers: silenced for them only
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <functional>   // defines: std::function (checkpoint pieces made on demand)
#include <regex>        // defines: std::regex (PEFT's string target_modules is a regex)
#pragma GCC diagnostic pop
#include <dirent.h>     // defines: opendir (copying tokenizer files)
#include <limits.h>     // defines: PATH_MAX
#include <errno.h>      // defines: errno, EEXIST
#include <sys/file.h>   // defines: flock (one writer per output directory)
#include <thread>       // defines: std::thread (checkpoint pieces quantized/merged in parallel)

// ---------------------------------------------------------------------------------------------
// 10. text as Python writes it: float repr, and config.json edited in place
//
// bitsandbytes' quant_state blob is json.dumps of a dict whose nested_offset is a Python float, so
// writing it byte for byte means writing repr(float): the shortest digits that round-trip (the
// closest such string to the value), laid out in fixed notation when the decimal exponent e (value
// = d.ddd * 10^e) satisfies -4 <= e < 16, else as d.ddde-05 / d.ddde+16 (two exponent digits at
// least); an integral value in fixed notation keeps ".0". std::to_chars gives the same digits.

template <typename T>
inline std::string py_repr_digits(T v) {
    if (v != v) return "nan";
    if (v == (T)INFINITY || v == -(T)INFINITY) return v > 0 ? "inf" : "-inf";
    if (v == 0) return signbit(v) ? "-0.0" : "0.0";
    char buf[64];
    auto r = std::to_chars(buf, buf + sizeof buf, v, std::chars_format::scientific);   // [-]d[.ddd]e(+|-)XX
    std::string s(buf, r.ptr), sign;
    if (s[0] == '-') {
        sign = "-";
        s.erase(0, 1);
    }
    size_t e = s.find('e');
    int exp10 = atoi(s.c_str() + e + 1);
    std::string digits;
    for (size_t i = 0; i < e; i++)
        if (s[i] != '.') digits += s[i];
    int point = exp10 + 1, nd = (int)digits.size();   // digits before the decimal point
    if (exp10 < -4 || exp10 >= 16) {
        char eb[16];
        snprintf(eb, sizeof eb, "e%c%02d", exp10 < 0 ? '-' : '+', abs(exp10));
        return sign + digits.substr(0, 1) + (nd > 1 ? "." + digits.substr(1) : "") + eb;
    }
    if (point <= 0) return sign + "0." + std::string((size_t)-point, '0') + digits;
    if (point >= nd) return sign + digits + std::string((size_t)(point - nd), '0') + ".0";
    return sign + digits.substr(0, (size_t)point) + "." + digits.substr((size_t)point);
}
// repr(float(x)) of a double, e.g. 0.061586856842041016, 1e-05, 123456.0
inline std::string py_float_repr(double v) {
    return py_repr_digits(v);
}
// the shortest text that reads back as this fp32 value (0.05f -> "0.05"), in repr's layout:
// what a Python config holding the same number as a float literal writes
inline std::string py_float_repr_f32(float v) {
    return py_repr_digits(v);
}
// json.dumps of a Python float: repr, except NaN and the infinities
inline std::string py_json_float(double v) {
    if (v != v) return "NaN";
    if (std::isinf(v)) return v > 0 ? "Infinity" : "-Infinity";
    return py_float_repr(v);
}

// A top-level member of a JSON object, by byte spans in its text, so that config.json can be
// edited without reformatting it: every other value keeps its spelling (-1 stays an integer, 1e-05
// stays as written), which a parse-and-reprint through Json would not guarantee.
struct JsonMember {
    std::string key;
    size_t begin, key_end, value_begin, value_end;
};
inline std::vector<JsonMember> json_members(const std::string& text, const std::string& what) {
    Json whole;
    std::string err;
    ql_assert(json_parse(text.data(), text.size(), whole, err), "%s: invalid JSON: %s", what.c_str(), err.c_str());
    ql_assert(whole.type == Json::OBJ, "%s: expected a JSON object", what.c_str());
    JsonParser p{text.data(), text.size(), 0, {}};
    std::vector<JsonMember> ms;
    p.ws();
    p.i++;   // '{'
    while (true) {
        p.ws();
        if (text[p.i] == '}') break;
        JsonMember m;
        m.begin = p.i;
        p.string(m.key);
        m.key_end = p.i;
        p.ws();
        p.i++;   // ':'
        p.ws();
        m.value_begin = p.i;
        Json v;
        p.value(v, 1);
        m.value_end = p.i;
        ms.push_back(m);
        p.ws();
        if (text[p.i] == ',') p.i++;
    }
    return ms;
}
// The whitespace that precedes the first member ("\n  " for json.dumps(indent=2)), "" if compact.
inline std::string json_member_indent(const std::string& text, const std::vector<JsonMember>& ms) {
    if (ms.empty()) return text.find('\n') == std::string::npos ? "" : "\n  ";
    size_t b = ms[0].begin;
    while (b > 0 && strchr(" \t\r\n", text[b - 1])) b--;
    return text.substr(b, ms[0].begin - b);
}
// Set top-level `key` to the JSON text `value`: replaced in place if present, else inserted where
// json.dumps(sort_keys=True) would put it when the keys are sorted (at the end otherwise), with
// the file's own separators.
inline std::string json_text_set(std::string text, const std::string& key, const std::string& value, const std::string& what) {
    std::vector<JsonMember> ms = json_members(text, what);
    for (auto& m : ms)
        if (m.key == key) return text.replace(m.value_begin, m.value_end - m.value_begin, value);
    std::string lead = json_member_indent(text, ms);
    if (ms.empty()) {
        size_t b = text.find('{');
        return text.replace(b, text.find('}', b) - b + 1,
                            "{" + lead + json_quote(key) + ": " + value + (lead.empty() ? "}" : "\n}"));
    }
    std::string member = json_quote(key) + text.substr(ms[0].key_end, ms[0].value_begin - ms[0].key_end) + value;
    bool sorted = true;
    for (size_t i = 1; i < ms.size(); i++) sorted = sorted && ms[i - 1].key < ms[i].key;
    if (sorted)
        for (auto& m : ms)
            if (m.key > key) return text.insert(m.begin, member + "," + lead);
    return text.insert(ms.back().value_end, "," + lead + member);
}
inline std::string json_text_remove(std::string text, const std::string& key, const std::string& what) {
    std::vector<JsonMember> ms = json_members(text, what);
    for (size_t j = 0; j < ms.size(); j++) {
        if (ms[j].key != key) continue;
        if (j + 1 < ms.size()) return text.erase(ms[j].begin, ms[j + 1].begin - ms[j].begin);
        if (j > 0) return text.erase(ms[j - 1].value_end, ms[j].value_end - ms[j - 1].value_end);
        return text.erase(ms[j].begin, ms[j].value_end - ms[j].begin);
    }
    return text;
}
// {"k": v, ...} from (key, JSON text) pairs, sorted by key; multi-line as json.dumps(indent=2) would
// write it at depth 1 when `lead` is a newline + indent (the file's own), else on one line.
inline std::string json_object_text(std::vector<std::pair<std::string, std::string>> kv, const std::string& lead) {
    std::sort(kv.begin(), kv.end());
    std::string inner = lead.empty() ? "" : lead + lead.substr(1), s = "{";
    for (size_t i = 0; i < kv.size(); i++)
        s += (i ? "," : "") + (lead.empty() ? std::string(i ? " " : "") : inner) + json_quote(kv[i].first) + ": " + kv[i].second;
    return s + (lead.empty() ? "}" : lead + "}");
}
inline std::string text_of_file(const std::string& path) {
    std::vector<uint8_t> b = read_file(path);
    return std::string(b.begin(), b.end());
}
inline void write_text_file(const std::string& path, const std::string& s) {
    atomic_write(path, {{s.data(), s.size()}});
}

// mkdir -p
inline void make_dirs(const std::string& path) {
    for (size_t i = 1; i <= path.size(); i++) {
        if (i < path.size() && path[i] != '/') continue;
        std::string p = path.substr(0, i);
        ql_assert(mkdir(p.c_str(), 0755) == 0 || errno == EEXIST, "cannot create directory %s", p.c_str());
    }
    struct stat sb;
    ql_assert(stat(path.c_str(), &sb) == 0 && S_ISDIR(sb.st_mode), "%s exists and is not a directory", path.c_str());
}
inline std::string real_path(const std::string& p) {
    char b[PATH_MAX];
    return realpath(p.c_str(), b) ? std::string(b) : p;
}
inline std::string base_name(const std::string& p) {
    size_t k = p.rfind('/');
    return k == std::string::npos ? p : p.substr(k + 1);
}
inline std::string strip_slashes(std::string p) {
    while (p.size() > 1 && p.back() == '/') p.pop_back();
    return p;
}
inline std::string parent_dir(const std::string& p) {
    size_t k = p.rfind('/');
    return k == std::string::npos ? "." : k == 0 ? "/" : p.substr(0, k);
}
inline bool is_dir(const std::string& p) {
    struct stat sb;
    return stat(p.c_str(), &sb) == 0 && S_ISDIR(sb.st_mode);
}

// ---------------------------------------------------------------------------------------------
// 10b. output directories (--out of the trainers, quantize and merge): one writer at a time, and
// every save switched in whole.
//
// Lock (out_lock): a run that writes DIR holds an flock on PARENT/.NAME.lock from its start to its
// end. The lock file lives beside DIR, not in it, because DIR is replaced at every save (below): a
// lock inside would leave with the old set. It holds the owner's pid, which a second writer's error
// names. The kernel drops the lock when the owner ends, however it ends; the file stays (deleting it
// would let a third run lock a new file while the second still holds the old one).
//
// Switch (out_write_set): a save's files are written into a fresh hidden sibling,
// PARENT/.NAME.new.PID.N, then switched in by one rename: renameat2(RENAME_EXCHANGE) when DIR exists
// (the old set is then at the sibling's name), rename() when it does not. A kill at any moment leaves
// DIR holding the whole old set or the whole new one, never a mix (rank-4 weights beside "r": 16).
// Then the old set goes: what qlora writes is deleted, anything else it held (notes, a log) moves into
// the new DIR. A kill before that is done leaves the sibling behind; the next out_lock of DIR
// finishes the job. A DIR that cannot be renamed (a mount point, e.g. a container's volume) gets its
// files replaced one at a time instead, each whole, with a note.

// the names of the files qlora writes into an output directory (and atomic_write's temporaries)
inline bool qlora_output_name(const std::string& n) {
    static const char* const NAMES[] = {"adapter_model.safetensors", "adapter_config.json",
                                        "state.safetensors",         "config.json",
                                        "model.safetensors",         "model.safetensors.index.json"};
    for (const char* x : NAMES)
        if (n == x) return true;
    auto digits = [](const std::string& s, size_t b, size_t e) {
        return e > b && s.find_first_not_of("0123456789", b) >= e;
    };
    if (n.size() == 32 && n.compare(0, 6, "model-") == 0 && n.compare(11, 4, "-of-") == 0 &&
        n.compare(20, 12, ".safetensors") == 0 && digits(n, 6, 11) && digits(n, 15, 20))
        return true;               // model-00001-of-00002.safetensors
    size_t t = n.rfind(".tmp.");   // NAME.tmp.PID.N
    size_t dot = t == std::string::npos ? t : n.find('.', t + 5);
    return dot != std::string::npos && digits(n, t + 5, dot) && digits(n, dot + 1, n.size());
}
// PARENT/.NAME.new.PID.N or PARENT/.NAME.old.PID.N: a sibling a save of DIR left behind
inline bool out_sibling_of(const std::string& entry, const std::string& name, const char* kind) {
    std::string pre = "." + name + "." + kind + ".";
    if (entry.compare(0, pre.size(), pre) != 0) return false;
    size_t dot = entry.find('.', pre.size());
    auto digits = [&](size_t b, size_t e) {
        return e > b && entry.find_first_not_of("0123456789", b) >= e;
    };
    return dot != std::string::npos && digits(pre.size(), dot) && digits(dot + 1, entry.size());
}
inline std::vector<std::string> dir_entries(const std::string& dir) {
    std::vector<std::string> names;
    DIR* d = opendir(dir.c_str());
    if (!d) return names;
    while (dirent* e = readdir(d))
        if (strcmp(e->d_name, ".") && strcmp(e->d_name, "..")) names.push_back(e->d_name);
    closedir(d);
    std::sort(names.begin(), names.end());
    return names;
}
inline void fsync_dir(const std::string& dir) {
    int fd = open(dir.c_str(), O_RDONLY | O_DIRECTORY);
    if (fd >= 0) {
        fsync(fd);
        close(fd);
    }
}

// DIR as an absolute path with symbolic links resolved, whether or not DIR exists yet (its parent must).
inline std::string out_canonical(const std::string& dir) {
    std::string d = strip_slashes(dir);
    char b[PATH_MAX];
    if (realpath(d.c_str(), b)) return b;
    std::string name = base_name(d);
    ql_assert(name != "." && name != "..", "--out %s: name a directory of its own", dir.c_str());
    ql_assert(realpath(parent_dir(d).c_str(), b), "cannot resolve %s (the directory above --out %s)", parent_dir(d).c_str(),
              dir.c_str());
    return std::string(b) + (strcmp(b, "/") ? "/" : "") + name;
}

// The old set at `old` (after a switch, or left by a killed save): the files qlora writes, and those
// the new DIR has too, are deleted; anything else moves into DIR. `old` goes when it is empty.
inline void out_retire(const std::string& old, const std::string& dir) {
    bool have_dir = is_dir(dir);
    for (const std::string& n : dir_entries(old)) {
        std::string from = old + "/" + n, to = dir + "/" + n;
        struct stat sb;
        if (lstat(from.c_str(), &sb) != 0) continue;
        bool superseded = have_dir && file_exists(to);
        if (!S_ISDIR(sb.st_mode) && (qlora_output_name(n) || superseded))
            unlink(from.c_str());
        else if (have_dir && !superseded)
            rename(from.c_str(), to.c_str());
    }
    if (rmdir(old.c_str()) != 0)
        fprintf(stderr, "qlora: note: kept %s: it holds files that qlora did not write and could not move into %s\n", old.c_str(),
                dir.c_str());
}
// What killed saves of DIR (canonical) left beside it: an old set whose DIR went missing between the
// two renames of the fallback below is put back; every other sibling is retired into DIR.
inline void out_recover(const std::string& dir) {
    std::string parent = parent_dir(dir), name = base_name(dir);
    for (const std::string& e : dir_entries(parent))
        if (out_sibling_of(e, name, "old") && !file_exists(dir)) rename((parent + "/" + e).c_str(), dir.c_str());
    for (const std::string& e : dir_entries(parent))
        if (out_sibling_of(e, name, "new") || out_sibling_of(e, name, "old")) out_retire(parent + "/" + e, dir);
    for (const std::string& e : dir_entries(dir))   // a set staged inside DIR (a mount point), never moved in
        if (out_sibling_of(e, name, "new")) out_retire(dir + "/" + e, dir);
}

inline std::map<std::string, int>& out_locks() {
    static std::map<std::string, int> m;
    return m;
}   // canonical DIR -> lock fd
// Takes DIR's lock for the rest of the process (once: later calls return at once), after checking
// that DIR can be an output directory: not a file, not the working directory or above it. Returns
// DIR's canonical path. A second writer of DIR gets an error naming the first's pid.
inline std::string out_lock(const std::string& dir) {
    std::string d = strip_slashes(dir);
    ql_assert(!d.empty(), "--out: the directory name is empty");
    struct stat sb;
    ql_assert(stat(d.c_str(), &sb) != 0 || S_ISDIR(sb.st_mode),
              "--out %s exists and is not a directory (qlora writes a directory of files there)", dir.c_str());
    make_dirs(parent_dir(d));
    std::string abs = out_canonical(d);
    if (out_locks().count(abs)) return abs;
    char cwd[PATH_MAX];
    ql_assert(abs != "/" && (!getcwd(cwd, sizeof cwd) || (std::string(cwd) + "/").compare(0, abs.size() + 1, abs + "/") != 0),
              "--out %s is the working directory or holds it; qlora replaces --out as a whole at every save: give it a directory "
              "of its own",
              dir.c_str());
    std::string lock = parent_dir(abs) + "/." + base_name(abs) + ".lock";
    int fd = open(lock.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    ql_assert(fd >= 0, "cannot create the lock file %s (is %s writable?)", lock.c_str(), parent_dir(abs).c_str());
    if (flock(fd, LOCK_EX | LOCK_NB) != 0) {
        char b[32] = {0};
        long pid = pread(fd, b, sizeof b - 1, 0) > 0 ? atol(b) : 0;
        close(fd);
        ql_fail(
            "%s is being written by another qlora run%s, which holds the lock %s: wait for it to finish, or choose another --out",
            dir.c_str(), pid > 0 ? (" (pid " + std::to_string(pid) + ")").c_str() : "", lock.c_str());
    }
    std::string me = std::to_string((long)getpid()) + "\n";
    ql_assert(ftruncate(fd, 0) == 0 && pwrite(fd, me.data(), me.size(), 0) == (ssize_t)me.size(), "cannot write the lock file %s",
              lock.c_str());
    out_locks()[abs] = fd;
    out_recover(abs);
    return abs;
}

inline void out_discard_pending() {
    std::string& stage = out_pending().stage;
    if (stage.empty()) return;
    for (const std::string& n : dir_entries(stage)) unlink((stage + "/" + n).c_str());
    rmdir(stage.c_str());
    stage.clear();
}

// Writes a set of files into DIR as one: write(stage) puts them into the fresh sibling `stage`,
// which then replaces DIR (see above). Takes DIR's lock if this process does not hold it yet.
// DIR is the root of a mount (a container's volume, a bind mount): rename() cannot move it, nor move
// anything into it from another mount
inline bool out_is_mount_point(const std::string& dir, const std::string& parent) {
    struct stat sd, sp;
    if (stat(dir.c_str(), &sd) != 0) return false;
    if (stat(parent.c_str(), &sp) == 0 && sd.st_dev != sp.st_dev) return true;
#ifdef STATX_ATTR_MOUNT_ROOT
    struct statx sx;
    if (statx(AT_FDCWD, dir.c_str(), 0, STATX_BASIC_STATS, &sx) == 0 && (sx.stx_attributes_mask & STATX_ATTR_MOUNT_ROOT))
        return (sx.stx_attributes & STATX_ATTR_MOUNT_ROOT) != 0;
#endif
    return false;
}
inline void out_write_set(const std::string& dir, const std::function<void(const std::string& stage)>& write) {
    std::string abs = out_lock(dir), parent = parent_dir(abs), name = base_name(abs);
    // DIR a mount point (a container's volume) cannot be renamed: the set is staged inside it and its
    // files are moved in one by one (each file whole, the set not), with a note
    bool mount = out_is_mount_point(abs, parent);
    std::string stage = (mount ? abs : parent) + "/." + name + ".new" + unique_suffix();
    ql_assert(mkdir(stage.c_str(), 0755) == 0, "cannot create %s (is %s writable?)", stage.c_str(), (mount ? abs : parent).c_str());
    out_pending();   // constructed before the handler is registered, so destroyed after it has run
    static bool at_exit = atexit(out_discard_pending) == 0;   // ql_fail exits: no half-written sibling left behind
    (void)at_exit;
    out_pending() = {stage, dir};
    try {
        write(stage);
    } catch (...) {
        out_discard_pending();
        throw;
    }   // ql_error_mode().throw_instead
    fsync_dir(stage);
    auto file_by_file = [&] {
        static bool noted = false;
        if (!noted)
            fprintf(stderr, "qlora: note: %s is a mount point: its files are replaced one at a time, not as one set\n",
                    dir.c_str());
        noted = true;
        for (const std::string& n : dir_entries(stage))
            ql_assert(rename((stage + "/" + n).c_str(), (abs + "/" + n).c_str()) == 0, "cannot move %s/%s into %s", stage.c_str(),
                      n.c_str(), abs.c_str());
        rmdir(stage.c_str());
        fsync_dir(abs);
    };
    std::string old = stage;   // after the switch: where the old set is
    if (mount)
        file_by_file();
    else if (!file_exists(abs))
        ql_assert(rename(stage.c_str(), abs.c_str()) == 0, "cannot rename %s to %s", stage.c_str(), abs.c_str());
    else if (renameat2(AT_FDCWD, stage.c_str(), AT_FDCWD, abs.c_str(), RENAME_EXCHANGE) != 0) {
        if (errno == EBUSY || errno == EXDEV) {   // a mount point out_is_mount_point missed: the new set stays where it is
            out_pending() = {};
            ql_fail("cannot switch %s in for %s (%s: a mount point?); the new files are complete in %s", stage.c_str(), abs.c_str(),
                    strerror(errno), stage.c_str());
        } else {
            ql_assert(errno == EINVAL || errno == ENOSYS || errno == EOPNOTSUPP, "cannot switch %s in for %s: %s", stage.c_str(),
                      abs.c_str(), strerror(errno));
            // a file system without RENAME_EXCHANGE: two renames; between them DIR is missing (out_recover puts the old set back)
            old = parent + "/." + name + ".old" + unique_suffix();
            ql_assert(rename(abs.c_str(), old.c_str()) == 0, "cannot rename %s to %s", abs.c_str(), old.c_str());
            ql_assert(rename(stage.c_str(), abs.c_str()) == 0, "cannot rename %s to %s", stage.c_str(), abs.c_str());
        }
    }
    out_pending() = {};
    fsync_dir(parent);
    if (old != stage || file_exists(old)) out_retire(old, abs);
}

// ---------------------------------------------------------------------------------------------
// 11. PEFT LoRA adapters (formats.md §4.3, §4.4): adapter_model.safetensors with F32 A (r, in) and
// B (out, r) under base_model.model.<module>.lora_{A,B}.weight, and adapter_config.json written as
// PEFT writes it (json.dumps(indent=2, sort_keys=True)) with the minimal field set of §4.3.

inline std::string peft_module_name(int l, int p) {   // base_model.model.model.layers.{l}.self_attn.q_proj
    return "base_model.model.model.layers." + std::to_string(l) + "." + PROJ_MODULE[p] + "." + PROJ_NAME[p];
}
// The first LoRA tensor (lora_slot layout) holding a NaN or an infinity, as
// "model.layers.0.self_attn.q_proj.lora_A", and how many such values all of them hold; "" if none.
inline std::string lora_nonfinite(const Config& c, const LoraConfig& lc, const float* x, size_t* count = nullptr) {
    std::string first;
    size_t bad = 0;
    for (int l = 0; l < c.n_layers; l++)
        for (int p = 0; p < N_PROJ; p++) {
            if (!lc.has(p)) continue;
            LoraSlot s = lora_slot(c, lc, l, p);
            size_t na = (size_t)lc.rank * proj_in(c, p), nb = (size_t)proj_out(c, p) * lc.rank;
            for (int isB = 0; isB < 2; isB++) {
                size_t k = 0, at = isB ? s.b : s.a, n = isB ? nb : na;
                for (size_t i = 0; i < n; i++) k += !std::isfinite(x[at + i]);
                if (k && first.empty())
                    first = hf_layer_prefix(l) + PROJ_MODULE[p] + "." + PROJ_NAME[p] + (isB ? ".lora_B" : ".lora_A");
                bad += k;
            }
        }
    if (count) *count = bad;
    return first;
}

// Writes the adapter's two files into dir as it is (the trainers wrap it in out_write_set). An
// adapter holding a NaN or an infinity is refused: it would poison every output of the model.
inline void peft_adapter_write(const std::string& dir, const Config& c, const LoraConfig& lc, const float* lora,
                               const std::string& base_model_name) {
    size_t bad = 0;
    std::string where = lora_nonfinite(c, lc, lora, &bad);
    ql_assert(
        where.empty(),
        "not writing the adapter to %s: %s holds non-finite values (%zu NaN/Inf in all); the previous adapter there is unchanged",
        dir.c_str(), where.c_str(), bad);
    make_dirs(dir);
    std::vector<STOut> ts;
    std::string tm;
    for (int p = 0; p < N_PROJ; p++)
        if (lc.has(p)) tm += std::string(tm.empty() ? "" : ",") + "\n    " + json_quote(PROJ_NAME[p]);
    for (int l = 0; l < c.n_layers; l++)
        for (int p = 0; p < N_PROJ; p++) {
            if (!lc.has(p)) continue;
            LoraSlot s = lora_slot(c, lc, l, p);
            ts.push_back({peft_module_name(l, p) + ".lora_A.weight", DT_F32, {lc.rank, proj_in(c, p)}, lora + s.a});
            ts.push_back({peft_module_name(l, p) + ".lora_B.weight", DT_F32, {proj_out(c, p), lc.rank}, lora + s.b});
        }
    st_write(dir + "/adapter_model.safetensors", ts);
    // lora_alpha is an int in PEFT's dataclass: integral values are written as integers
    std::string alpha =
        lc.alpha == floorf(lc.alpha) && fabsf(lc.alpha) < 1e9f ? std::to_string((long long)lc.alpha) : py_float_repr_f32(lc.alpha);
    std::string j =
        "{\n  \"alpha_pattern\": {},\n  \"base_model_name_or_path\": " + json_quote(base_model_name) +
        ",\n  \"bias\": \"none\",\n"
        "  \"fan_in_fan_out\": false,\n  \"inference_mode\": true,\n  \"init_lora_weights\": true,\n  \"lora_alpha\": " +
        alpha +
        ",\n"
        "  \"lora_dropout\": " +
        py_float_repr_f32(lc.dropout) +
        ",\n  \"modules_to_save\": null,\n  \"peft_type\": \"LORA\",\n"
        "  \"r\": " +
        std::to_string(lc.rank) + ",\n  \"rank_pattern\": {},\n  \"revision\": null,\n  \"target_modules\": [" + tm +
        "\n  ],\n"
        "  \"task_type\": \"CAUSAL_LM\",\n  \"use_dora\": false,\n  \"use_rslora\": " +
        (lc.rslora ? "true" : "false") + "\n}\n";
    write_text_file(dir + "/adapter_config.json", j);
}

// Does PEFT's target rule select `module` (relative to the CausalLM, e.g. model.layers.0.mlp.up_proj)?
// A string is a regex that must match the whole name; a list entry matches the name or a suffix
// after a dot (tuners_utils.check_target_module_exists).
// std::regex backtracks, so a hostile pattern can take exponential time (`(.*)*(.*)*y`) or hit
// undefined behaviour in libstdc++ (a back-reference like \18446744073709551616). PEFT's patterns
// are short alternations such as `.*\.(q_proj|v_proj)`: accept that shape only, where the
// backtracking is bounded by (name length)^(quantifiers) = 40^4 steps per module name.
inline bool regex_is_tame(const std::string& re) {
    if (re.size() > 256) return false;
    int quantifiers = 0;
    for (size_t i = 0; i < re.size(); i++) {
        char c = re[i];
        if (c == '\\') {
            if (i + 1 < re.size() && re[i + 1] >= '0' && re[i + 1] <= '9') return false;
            i++;
            continue;
        }
        if (c == '*' || c == '+' || c == '?' || c == '{') {
            quantifiers++;
            if (i > 0 && re[i - 1] == ')') return false;   // a quantified group
        }
    }
    return quantifiers <= 4;
}
struct PeftTargetRule {
    bool is_regex = false;
    std::regex re;
    std::vector<std::string> names;
};
inline bool peft_rule_matches(const PeftTargetRule& r, const std::string& module) {
    if (r.is_regex) return std::regex_match(module, r.re);
    for (auto& n : r.names)
        if (module == n || (module.size() > n.size() && module.compare(module.size() - n.size(), n.size(), n) == 0 &&
                            module[module.size() - n.size() - 1] == '.'))
            return true;
    return false;
}

// Reads a PEFT LoRA adapter for this model. Everything that would make PEFT compute something other
// than y = W·x + s·B·A·x on the seven decoder linears (the same projections in every layer) is
// refused with the field or tensor named. lora_out: the lora_slot layout, fp32.
inline void peft_adapter_read(const std::string& dir, const Config& c, LoraConfig& lc_out, std::vector<float>& lora_out) {
    std::string cp = dir + "/adapter_config.json", wp = dir + "/adapter_model.safetensors";
    const char* cpc = cp.c_str();
    ql_assert(file_exists(cp), "%s: no adapter_config.json (is this a PEFT adapter directory?)", dir.c_str());
    if (!file_exists(wp))
        ql_fail("%s: no adapter_model.safetensors%s", dir.c_str(),
                file_exists(dir + "/adapter_model.bin")
                    ? " (only adapter_model.bin, a pickle, which qlora does not read: load it with PEFT and save_pretrained it, "
                      "safe_serialization=True writes safetensors)"
                    : "");
    Json j = json_load(cp);
    ql_assert(j.type == Json::OBJ, "%s: expected a JSON object", cpc);
    auto unset = [](const Json* v) {
        return !v || v->type == Json::NUL || (v->type == Json::BOOL && !v->b) || (v->type == Json::OBJ && v->obj.empty()) ||
               (v->type == Json::ARR && v->arr.empty());
    };
    const Json* pt = j.get("peft_type");
    ql_assert(pt && pt->type == Json::STR, "%s: missing \"peft_type\"", cpc);
    ql_assert(pt->str == "LORA", "%s: peft_type \"%s\": qlora reads LoRA adapters only", cpc, pt->str.c_str());
    // fields that change what the adapter computes; anything else (init options, inference_mode,
    // revision, newer bookkeeping fields) does not matter here
    static const struct {
        const char* field;
        const char* why;
    } REFUSE[] = {
        {"use_dora", "DoRA (weight-decomposed LoRA) is not implemented"},
        {"modules_to_save", "fully trained extra modules (modules_to_save) are not supported"},
        {"lora_bias", "LoRA biases (lora_bias) are not supported"},
        {"fan_in_fan_out", "fan_in_fan_out (Conv1D-style weights) does not apply to Llama"},
        {"rank_pattern", "per-module ranks (rank_pattern) are not supported: one r for every module"},
        {"alpha_pattern", "per-module alphas (alpha_pattern) are not supported: one lora_alpha for every module"},
        {"layers_to_transform", "LoRA on a subset of layers (layers_to_transform) is not supported"},
        {"layer_replication", "layer_replication is not supported"},
        {"trainable_token_indices", "trainable tokens are not supported"},
        {"target_parameters", "LoRA on parameters (target_parameters) is not supported"},
        {"use_qalora", "QALoRA is not supported"},
        {"alora_invocation_tokens", "activated LoRA (alora_invocation_tokens) is not supported"},
        {"use_bdlora", "BD-LoRA is not supported"},
        {"arrow_config", "Arrow routing is not supported"},
        {"monteclora_config", "MonteCLoRA is not supported"},
        {"velora_config", "VeLoRA is not supported"},
        {"kasa_config", "KaSA is not supported"},
    };
    for (auto& r : REFUSE) ql_assert(unset(j.get(r.field)), "%s: \"%s\" is set: %s", cpc, r.field, r.why);
    const Json* bias = j.get("bias");
    ql_assert(!bias || bias->type == Json::NUL || (bias->type == Json::STR && bias->str == "none"),
              "%s: \"bias\" must be \"none\": trained biases are not supported", cpc);
    auto number = [&](const char* k, double def, double lo, double hi, bool integer) {
        const Json* v = j.get(k);
        if (!v || v->type == Json::NUL) return def;
        ql_assert(v->type == Json::NUM && v->num >= lo && v->num <= hi && (!integer || v->num == floor(v->num)),
                  "%s: \"%s\" must be %s in [%g, %g]", cpc, k, integer ? "an integer" : "a number", lo, hi);
        return v->num;
    };
    LoraConfig lc;
    lc.rank = (int)number("r", 8, 1, 4096, true);   // PEFT's defaults where a field is absent
    lc.alpha = (float)number("lora_alpha", 8, 0, 1e6, false);
    lc.dropout = (float)number("lora_dropout", 0, 0, 0.99, false);
    const Json* rs = j.get("use_rslora");
    ql_assert(!rs || rs->type == Json::NUL || rs->type == Json::BOOL, "%s: \"use_rslora\" must be true or false", cpc);
    lc.rslora = rs && rs->type == Json::BOOL && rs->b;
    auto rule = [&](const char* k, PeftTargetRule& r) {
        const Json* v = j.get(k);
        if (!v || v->type == Json::NUL) return false;
        if (v->type == Json::STR) {
            if (!strcmp(k, "target_modules") && v->str == "all-linear") {
                r.names.assign(PROJ_NAME, PROJ_NAME + N_PROJ);
                return true;
            }
            ql_assert(regex_is_tame(v->str),
                      "%s: \"%s\": the regular expression \"%.80s\" is too complex for qlora (it accepts up to 256 "
                      "characters, 4 quantifiers, no quantified groups, no back-references); list the module names instead",
                      cpc, k, v->str.c_str());
            try {
                r.re = std::regex(v->str);
            } catch (const std::regex_error&) {
                ql_fail("%s: \"%s\": \"%s\" is not a regular expression qlora can read", cpc, k, v->str.c_str());
            }
            r.is_regex = true;
            return true;
        }
        ql_assert(v->type == Json::ARR, "%s: \"%s\" must be a list of module names or a string", cpc, k);
        for (auto& e : v->arr) {
            ql_assert(e.type == Json::STR, "%s: \"%s\" entries must be strings", cpc, k);
            r.names.push_back(e.str);
        }
        return true;
    };
    PeftTargetRule target, exclude;
    if (!rule("target_modules", target)) target.names = {"q_proj", "v_proj"};   // PEFT's default for llama/mistral
    bool has_exclude = rule("exclude_modules", exclude);
    // which of the model's modules are selected; all of them must be decoder linears, and a projection
    // is either adapted in every layer or in none (one flat layout for all layers)
    std::vector<std::string> others = {"lm_head", "model.embed_tokens", "model.norm", "model", "model.layers"};
    for (int l = 0; l < c.n_layers; l++)
        for (const char* m : {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm", ""})
            others.push_back("model.layers." + std::to_string(l) + (*m ? "." : "") + m);
    for (auto& m : others)
        ql_assert(!peft_rule_matches(target, m) || (has_exclude && peft_rule_matches(exclude, m)),
                  "%s: target_modules selects \"%s\": qlora puts LoRA on the decoder linears only (q/k/v/o/gate/up/down_proj)", cpc,
                  m.c_str());
    lc.targets = 0;
    for (int p = 0; p < N_PROJ; p++) {
        int in_layers = 0;
        for (int l = 0; l < c.n_layers; l++) {
            std::string m = "model.layers." + std::to_string(l) + "." + PROJ_MODULE[p] + "." + PROJ_NAME[p];
            in_layers += peft_rule_matches(target, m) && !(has_exclude && peft_rule_matches(exclude, m));
        }
        ql_assert(in_layers == 0 || in_layers == c.n_layers,
                  "%s: target_modules selects %s in %d of %d layers; qlora puts LoRA "
                  "on the same projections in every layer",
                  cpc, PROJ_NAME[p], in_layers, c.n_layers);
        if (in_layers) lc.targets |= 1u << p;
    }
    ql_assert(lc.targets, "%s: target_modules selects none of this model's decoder linears", cpc);
    if (!target.is_regex)
        for (auto& n : target.names) {
            bool any = false;
            PeftTargetRule one;
            one.names = {n};
            for (int l = 0; l < c.n_layers && !any; l++)
                for (int p = 0; p < N_PROJ && !any; p++)
                    any = peft_rule_matches(one, "model.layers." + std::to_string(l) + "." + PROJ_MODULE[p] + "." + PROJ_NAME[p]);
            if (!any)
                fprintf(stderr,
                        "qlora: note: %s: target_modules entry \"%s\" matches no module of this model (PEFT skips it too)\n", cpc,
                        n.c_str());
        }

    // tensors: base_model.model.model.layers.{l}.{self_attn|mlp}.{proj}.lora_{A|B}[.{adapter name}].weight
    SafeTensors st = st_open(wp);
    const char* wpc = wp.c_str();
    lora_out.assign(lora_num_params(c, lc), 0.0f);
    std::vector<uint8_t> seen((size_t)c.n_layers * N_PROJ * 2, 0);
    std::string adapter_name = "?";
    for (auto& kv : st.tensors) {
        const std::string& name = kv.first;
        const STensor& t = kv.second;
        std::vector<std::string> tok;
        size_t a = 0, b;
        while ((b = name.find('.', a)) != std::string::npos) {
            tok.push_back(name.substr(a, b - a));
            a = b + 1;
        }
        tok.push_back(name.substr(a));
        int p = -1, l = -1, isB = -1;
        bool shaped = (tok.size() == 9 || tok.size() == 10) && tok[0] == "base_model" && tok[1] == "model" && tok[2] == "model" &&
                      tok[3] == "layers" && !tok[4].empty() && tok[4].size() < 7 &&
                      tok[4].find_first_not_of("0123456789") == std::string::npos && (tok[7] == "lora_A" || tok[7] == "lora_B") &&
                      tok.back() == "weight";
        if (shaped) {
            for (int q = 0; q < N_PROJ; q++)
                if (tok[5] == PROJ_MODULE[q] && tok[6] == PROJ_NAME[q]) p = q;
            l = atoi(tok[4].c_str());
            isB = tok[7] == "lora_B";
        }
        if (p < 0) {
            const char* hint = name.find("lora_magnitude_vector") != std::string::npos
                                   ? " (a DoRA magnitude: DoRA is not supported)"
                               : name.find("lora_embedding") != std::string::npos ? " (LoRA on an embedding is not supported)"
                               : name.find("lm_head") != std::string::npos || name.find("embed_tokens") != std::string::npos
                                   ? " (modules_to_save is not supported)"
                               : name.rfind("base_model.model.", 0) != 0 ? " (PEFT keys start with base_model.model.)"
                                                                         : "";
            ql_fail(
                "%s: tensor \"%s\" is not the LoRA A or B of a decoder linear "
                "(base_model.model.model.layers.N.{self_attn,mlp}.*_proj.lora_{A,B}.weight)%s",
                wpc, name.c_str(), hint);
        }
        ql_assert(l < c.n_layers,
                  "%s: tensor \"%s\" is for layer %d, but the model has %d layers (an adapter for another base model?)", wpc,
                  name.c_str(), l, c.n_layers);
        ql_assert(lc.has(p), "%s: tensor \"%s\" is for %s, which target_modules in adapter_config.json does not select", wpc,
                  name.c_str(), PROJ_NAME[p]);
        std::vector<int64_t> want =
            isB ? std::vector<int64_t>{proj_out(c, p), lc.rank} : std::vector<int64_t>{lc.rank, proj_in(c, p)};
        ql_assert(t.shape == want,
                  "%s: tensor \"%s\" has shape %s, expected [%lld, %lld] (r = %d from adapter_config.json; %s of the base model)",
                  wpc, name.c_str(), t.shape_str().c_str(), (long long)want[0], (long long)want[1], lc.rank,
                  isB ? "out_features" : "in_features");
        ql_assert(t.dtype == DT_F32 || t.dtype == DT_BF16 || t.dtype == DT_F16,
                  "%s: tensor \"%s\" has dtype %s; LoRA weights must be F32, BF16 or F16", wpc, name.c_str(), t.dtype_str.c_str());
        uint8_t& s = seen[((size_t)l * N_PROJ + p) * 2 + isB];
        ql_assert(!s, "%s: tensor \"%s\" appears twice (with and without an adapter name?)", wpc, name.c_str());
        s = 1;
        std::string an = tok.size() == 10 ? tok[8] : "";
        if (adapter_name == "?") adapter_name = an;
        ql_assert(an == adapter_name, "%s: tensor \"%s\" names adapter \"%s\", others \"%s\": one adapter per file", wpc,
                  name.c_str(), an.c_str(), adapter_name.c_str());
        LoraSlot sl = lora_slot(c, lc, l, p);
        float* x = lora_out.data() + (isB ? sl.b : sl.a);
        st_to_f32(x, t);
        size_t bad = 0;
        for (int64_t i = 0; i < t.numel(); i++) bad += !std::isfinite(x[i]);
        ql_assert(!bad,
                  "%s: tensor \"%s\" holds %zu NaN/Inf values: this adapter is broken (a diverged run?); qlora does not "
                  "train from, sample with or merge it",
                  wpc, name.c_str(), bad);
    }
    for (int l = 0; l < c.n_layers; l++)
        for (int p = 0; p < N_PROJ; p++)
            for (int isB = 0; isB < 2 && lc.has(p); isB++)
                ql_assert(seen[((size_t)l * N_PROJ + p) * 2 + isB],
                          "%s: missing tensor \"%s.lora_%c.weight\" (target_modules selects %s in every layer)", wpc,
                          peft_module_name(l, p).c_str(), isB ? 'B' : 'A', PROJ_NAME[p]);
    lc_out = lc;
}

// ---------------------------------------------------------------------------------------------
// 11b. the resume state, state.safetensors beside the adapter (both trainers): the fp32 master LoRA
// weights and both AdamW moments as F32 tensors "lora", "adam_m", "adam_v" (n each, lora_slot layout),
// bit for bit; in __metadata__ the step, the loader position (epoch, cursor, offset) and the run's
// signature (options.h: run_signature), which a resume must match.

struct ResumeState {
    int step = 0;
    uint64_t epoch = 0, cursor = 0, offset = 0;   // dataloader.h's LoaderState
    std::vector<float> lora, adam_m, adam_v;      // (n) each
};
inline void state_write(const std::string& dir, const ResumeState& s, const std::string& signature) {
    int64_t n = (int64_t)s.lora.size();
    ql_assert(s.adam_m.size() == s.lora.size() && s.adam_v.size() == s.lora.size(), "internal: resume state of mismatched sizes");
    st_write(
        dir + "/state.safetensors",
        {{"lora", DT_F32, {n}, s.lora.data()}, {"adam_m", DT_F32, {n}, s.adam_m.data()}, {"adam_v", DT_F32, {n}, s.adam_v.data()}},
        {{"step", std::to_string(s.step)},
         {"signature", signature},
         {"epoch", std::to_string(s.epoch)},
         {"cursor", std::to_string(s.cursor)},
         {"offset", std::to_string(s.offset)}});
}
inline ResumeState state_read(const std::string& dir, const std::string& signature, size_t n) {
    std::string path = dir + "/state.safetensors";
    ql_assert(file_exists(path), "--resume %s: no state.safetensors there (an --out directory of an earlier run holds one)",
              dir.c_str());
    SafeTensors st = st_open(path);
    auto meta = [&](const char* k) {
        auto it = st.metadata.find(k);
        ql_assert(it != st.metadata.end(), "%s: missing \"%s\" (not a qlora resume state?)", path.c_str(), k);
        return it->second;
    };
    auto integer = [&](const char* k, uint64_t hi) {
        std::string v = meta(k);
        char* end;
        unsigned long long x = strtoull(v.c_str(), &end, 10);
        ql_assert(!v.empty() && *end == 0 && v[0] != '-' && x <= hi, "%s: \"%s\" = \"%s\" is not an integer in [0, %llu]",
                  path.c_str(), k, v.c_str(), (unsigned long long)hi);
        return (uint64_t)x;
    };
    ql_assert(meta("signature") == signature,
              "%s was saved by a different run:\n  saved:    %s\n  this run: %s\nresume with the same options", path.c_str(),
              meta("signature").c_str(), signature.c_str());
    ResumeState s;
    s.step = (int)integer("step", 1000000000);
    s.epoch = integer("epoch", UINT64_MAX);
    s.cursor = integer("cursor", UINT64_MAX);
    s.offset = integer("offset", UINT64_MAX);
    s.lora = st_f32(st.get("lora", {(int64_t)n}, DT_F32));
    s.adam_m = st_f32(st.get("adam_m", {(int64_t)n}, DT_F32));
    s.adam_v = st_f32(st.get("adam_v", {(int64_t)n}, DT_F32));
    return s;
}

// ---------------------------------------------------------------------------------------------
// 12. bitsandbytes 4-bit checkpoints in (nf4.md §4): what transformers' save_pretrained writes for a
// model loaded with BitsAndBytesConfig(load_in_4bit=True). Per decoder linear `W = <name>.weight`:
//   W                                   U8  ((n+1)/2, 1)  packed codes, even element in the high nibble
//   W.absmax                            U8 (nb) 8-bit codes when nested, else F32 (nb)
//   W.quant_map                         F32 (16)          the NF4 or FP4 table
//   W.nested_absmax                     F32 (ceil(nb/256)) nested only
//   W.nested_quant_map                  F32 (256)         the dynamic 8-bit map, nested only
//   W.quant_state.bitsandbytes__{nf4|fp4}  U8 (len)       json.dumps of {quant_type, blocksize, dtype,
//                                                          shape, [nested_blocksize, nested_dtype, nested_offset]}
// Embeddings, norms and lm_head stay unquantized in the model dtype.

// Is config.json's model stored pre-quantized by bitsandbytes in 4 bits? quantization_config absent
// or null: false. Any other quantization (GPTQ, AWQ, 8-bit, ...) is refused by name.
inline bool config_is_bnb4(const std::string& config_path, int* quant_type = nullptr, bool* nested = nullptr) {
    Json j = json_load(config_path);
    const char* p = config_path.c_str();
    const Json* q = j.get("quantization_config");
    if (!q || q->type == Json::NUL) return false;
    ql_assert(q->type == Json::OBJ, "%s: quantization_config must be an object", p);
    auto str = [&](const char* k, const char* def) -> std::string {
        const Json* v = q->get(k);
        if (!v || v->type == Json::NUL) return def;
        ql_assert(v->type == Json::STR, "%s: quantization_config.%s must be a string", p, k);
        return v->str;
    };
    auto flag = [&](const char* k) {
        const Json* v = q->get(k);
        return v && v->type == Json::BOOL && v->b;
    };
    std::string method = str("quant_method", q->get("load_in_4bit") || q->get("load_in_8bit") ? "bitsandbytes" : "");
    ql_assert(method == "bitsandbytes",
              "%s: quantization_config.quant_method \"%s\" is not supported: qlora reads bitsandbytes 4-bit "
              "checkpoints, or unquantized bf16/fp16/fp32 ones",
              p, method.c_str());
    ql_assert(!flag("load_in_8bit") && !flag("_load_in_8bit"),
              "%s: a bitsandbytes 8-bit checkpoint (load_in_8bit); qlora reads 4-bit ones "
              "(or start from the unquantized model)",
              p);
    ql_assert(flag("load_in_4bit") || flag("_load_in_4bit"),
              "%s: quantization_config has neither load_in_4bit nor load_in_8bit set", p);
    std::string qt = str("bnb_4bit_quant_type", "fp4");   // BitsAndBytesConfig's defaults
    ql_assert(qt == "nf4" || qt == "fp4", "%s: quantization_config.bnb_4bit_quant_type \"%s\" (nf4 or fp4)", p, qt.c_str());
    std::string storage = str("bnb_4bit_quant_storage", "uint8");
    ql_assert(storage == "uint8", "%s: quantization_config.bnb_4bit_quant_storage \"%s\" is not supported (uint8 only)", p,
              storage.c_str());
    if (quant_type) *quant_type = qt == "nf4" ? QT_NF4 : QT_FP4;
    if (nested) *nested = flag("bnb_4bit_use_double_quant");
    return true;
}

// One pre-quantized decoder linear, validated; the pointers go into the mapped files, nothing copied.
struct BnbLinear {
    const STensor* weight = nullptr;                        // U8 ((n+1)/2, 1); when dense, the float (out, in) weight
    const STensor* absmax = nullptr;                        // U8 (nb) nested, else F32 (nb)
    const STensor* quant_map = nullptr;                     // F32 (16)
    const STensor* nested_absmax = nullptr;                 // F32 (ceil(nb/256)), nested only
    const STensor* nested_quant_map = nullptr;              // F32 (256), nested only
    const STensor* quant_state = nullptr;                   // U8 (len) JSON
    int qt = QT_NF4, bs = NF4_BLOCKSIZE, dtype = DT_BF16;   // dtype: quant_state's "dtype", what bitsandbytes dequantizes to
    bool nested = true;
    float offset = 0.0f;   // nested_offset
    int64_t out = 0, in = 0;
    bool dense = false;   // stored unquantized (e.g. in llm_int8_skip_modules); bnb_linear_load quantizes it
};

// The quant_map a checkpoint stores: get_4bit_type(qt) in code order. For FP4 Python lists code 8 as
// the integer -0, i.e. +0.0, where the CUDA decode gives -0.0 (nf4.md §1.2).
inline float bnb_quant_map_value(int qt, int code) {
    return qt == QT_FP4 && code == 8 ? 0.0f : code4_value(qt, code);
}

inline BnbLinear bnb_linear_view(const SafeTensors& st, const std::string& wn, int64_t out, int64_t in) {
    BnbLinear b;
    b.out = out;
    b.in = in;
    const int64_t n = out * in;
    const STensor* w = st.find(wn);
    ql_assert(
        w, "checkpoint is missing tensor \"%s\"%s", wn.c_str(),
        st.files.empty() ? "" : (" (looked in " + st.files[0]->path + (st.files.size() > 1 ? " and its shards)" : ")")).c_str());
    const char* f = w->file.c_str();
    const char* wc = wn.c_str();
    std::string pre = wn + ".";
    std::vector<const STensor*> sub;
    for (auto it = st.tensors.lower_bound(pre); it != st.tensors.end() && it->first.compare(0, pre.size(), pre) == 0; ++it)
        sub.push_back(&it->second);
    b.weight = w;
    if (sub.empty() && (w->dtype == DT_BF16 || w->dtype == DT_F16 || w->dtype == DT_F32)) {   // kept unquantized
        ql_assert(w->shape == (std::vector<int64_t>{out, in}), "%s: tensor \"%s\" has shape %s, the config implies [%lld, %lld]", f,
                  wc, w->shape_str().c_str(), (long long)out, (long long)in);
        b.dense = true;
        b.dtype = w->dtype;
        return b;
    }
    ql_assert(
        w->dtype == DT_U8,
        "%s: tensor \"%s\" is %s; a bitsandbytes 4-bit weight is U8 (bnb_4bit_quant_storage other than uint8 is not supported)", f,
        wc, w->dtype_str.c_str());
    ql_assert(w->shape == (std::vector<int64_t>{(n + 1) / 2, 1}),
              "%s: tensor \"%s\" has shape %s; 4-bit codes of a [%lld, %lld] weight are U8 [%lld, 1]", f, wc,
              w->shape_str().c_str(), (long long)out, (long long)in, (long long)((n + 1) / 2));
    const std::string qs_pre = pre + "quant_state.bitsandbytes__";
    for (const STensor* t : sub) {
        std::string k = t->name.substr(pre.size());
        if (k == "absmax")
            b.absmax = t;
        else if (k == "quant_map")
            b.quant_map = t;
        else if (k == "nested_absmax")
            b.nested_absmax = t;
        else if (k == "nested_quant_map")
            b.nested_quant_map = t;
        else if (t->name.compare(0, qs_pre.size(), qs_pre) == 0) {
            std::string qt = t->name.substr(qs_pre.size());
            ql_assert(qt == "nf4" || qt == "fp4", "%s: tensor \"%s\": unknown 4-bit type \"%s\" (nf4, fp4)", t->file.c_str(),
                      t->name.c_str(), qt.c_str());
            ql_assert(!b.quant_state, "%s: \"%s\" has two quant_state tensors (%s and %s)", f, wc, b.quant_state->name.c_str(),
                      t->name.c_str());
            b.quant_state = t;
            b.qt = qt == "nf4" ? QT_NF4 : QT_FP4;
        } else
            ql_fail("%s: unexpected tensor \"%s\" beside the 4-bit weight \"%s\"", t->file.c_str(), t->name.c_str(), wc);
    }
    ql_assert(b.quant_state, "%s: 4-bit weight \"%s\" has no \"%squant_state.bitsandbytes__nf4\" (or __fp4) tensor", f, wc,
              pre.c_str());
    const STensor& qs = *b.quant_state;
    const char* qn = qs.name.c_str();
    const char* qf = qs.file.c_str();
    ql_assert(qs.dtype == DT_U8 && qs.shape.size() == 1, "%s: tensor \"%s\" must be a 1-D U8 tensor (JSON bytes)", qf, qn);
    Json j;
    std::string err;
    ql_assert(json_parse((const char*)qs.data, qs.nbytes, j, err) && j.type == Json::OBJ,
              "%s: tensor \"%s\" is not a JSON object: %s", qf, qn, err.c_str());
    static const char* const KEYS[] = {"quant_type",       "blocksize",    "dtype",        "shape",
                                       "nested_blocksize", "nested_dtype", "nested_offset"};
    for (auto& kv : j.obj) {
        bool known = false;
        for (const char* k : KEYS) known = known || kv.first == k;
        ql_assert(known, "%s: tensor \"%s\": unknown quant_state key \"%s\"", qf, qn, kv.first.c_str());
    }
    const Json *jt = j.get("quant_type"), *jb = j.get("blocksize"), *jd = j.get("dtype"), *js = j.get("shape");
    ql_assert(jt && jt->type == Json::STR && jt->str == quant_type_name(b.qt),
              "%s: tensor \"%s\": quant_type must be \"%s\" (the key's suffix)", qf, qn, quant_type_name(b.qt));
    ql_assert(jb && jb->is_uint && valid_blocksize_4bit((int)std::min<uint64_t>(jb->u, 1 << 20)),
              "%s: tensor \"%s\": blocksize must be 32, 64, ..., 4096", qf, qn);
    b.bs = (int)jb->u;
    ql_assert(jd && jd->type == Json::STR && dtype_from_torch_name(jd->str) != DT_NONE,
              "%s: tensor \"%s\": dtype must be \"bfloat16\", \"float16\" or \"float32\"", qf, qn);
    b.dtype = dtype_from_torch_name(jd->str);
    ql_assert(js && js->type == Json::ARR && js->arr.size() == 2 && js->arr[0].is_uint && js->arr[1].is_uint &&
                  (int64_t)js->arr[0].u == out && (int64_t)js->arr[1].u == in,
              "%s: tensor \"%s\": shape must be [%lld, %lld] (out_features, in_features from the config)", qf, qn, (long long)out,
              (long long)in);
    const Json *nbs = j.get("nested_blocksize"), *ndt = j.get("nested_dtype"), *nof = j.get("nested_offset");
    b.nested = nbs || ndt || nof;
    ql_assert(!b.nested || (nbs && ndt && nof), "%s: tensor \"%s\": nested_blocksize, nested_dtype and nested_offset come together",
              qf, qn);
    ql_assert(b.nested == (b.nested_absmax || b.nested_quant_map),
              "%s: \"%s\": quant_state %s nested_* keys but the checkpoint %s nested_absmax/nested_quant_map tensors", f, wc,
              b.nested ? "has" : "lacks", b.nested ? "lacks" : "has");
    const int64_t nblk = (n + b.bs - 1) / b.bs;
    ql_assert(b.absmax, "%s: 4-bit weight \"%s\" has no \"%sabsmax\"", f, wc, pre.c_str());
    ql_assert(b.quant_map, "%s: 4-bit weight \"%s\" has no \"%squant_map\"", f, wc, pre.c_str());
    ql_assert(b.absmax->dtype == (b.nested ? DT_U8 : DT_F32) && b.absmax->shape == std::vector<int64_t>{nblk},
              "%s: tensor \"%s\" is %s %s; expected %s [%lld] (%lld blocks of %d)", b.absmax->file.c_str(), b.absmax->name.c_str(),
              b.absmax->dtype_str.c_str(), b.absmax->shape_str().c_str(), b.nested ? "U8" : "F32", (long long)nblk, (long long)nblk,
              b.bs);
    ql_assert(b.quant_map->dtype == DT_F32 && b.quant_map->shape == std::vector<int64_t>{16}, "%s: tensor \"%s\" must be F32 [16]",
              b.quant_map->file.c_str(), b.quant_map->name.c_str());
    for (int i = 0; i < 16; i++) {
        float v;
        memcpy(&v, b.quant_map->data + 4 * i, 4);
        bool ok = f32_bits(v) == f32_bits(bnb_quant_map_value(b.qt, i)) || (b.qt == QT_FP4 && i == 8 && v == 0.0f);
        ql_assert(ok, "%s: tensor \"%s\": entry %d is %.9g, bitsandbytes' %s table has %.9g (a custom code table is not supported)",
                  b.quant_map->file.c_str(), b.quant_map->name.c_str(), i, v, quant_type_name(b.qt), bnb_quant_map_value(b.qt, i));
    }
    if (b.nested) {
        ql_assert(nbs->is_uint && nbs->u == (uint64_t)DQ_BLOCK, "%s: tensor \"%s\": nested_blocksize must be 256", qf, qn);
        ql_assert(ndt->type == Json::STR && ndt->str == "float32", "%s: tensor \"%s\": nested_dtype must be \"float32\"", qf, qn);
        ql_assert(nof->type == Json::NUM && std::isfinite(nof->num), "%s: tensor \"%s\": nested_offset must be a finite number", qf,
                  qn);
        ql_assert(fabs(nof->num) <= 3.4028234663852886e38, "%s: tensor \"%s\": nested_offset %g is outside the fp32 range", qf, qn,
                  nof->num);
        b.offset = (float)nof->num;
        const int64_t n2 = (nblk + DQ_BLOCK - 1) / DQ_BLOCK;
        ql_assert(b.nested_absmax && b.nested_absmax->dtype == DT_F32 && b.nested_absmax->shape == std::vector<int64_t>{n2},
                  "%s: \"%snested_absmax\" must be F32 [%lld]", f, pre.c_str(), (long long)n2);
        ql_assert(
            b.nested_quant_map && b.nested_quant_map->dtype == DT_F32 && b.nested_quant_map->shape == std::vector<int64_t>{256},
            "%s: \"%snested_quant_map\" must be F32 [256]", f, pre.c_str());
        for (int i = 0; i < 256; i++) {
            uint32_t u;
            memcpy(&u, b.nested_quant_map->data + 4 * i, 4);
            ql_assert(u == DYN8_BITS[i],
                      "%s: tensor \"%s\": entry %d differs from bitsandbytes' create_dynamic_map() (a custom map is not supported)",
                      b.nested_quant_map->file.c_str(), b.nested_quant_map->name.c_str(), i);
        }
    }
    return b;
}

// The weight as a Quant4: the checkpoint's bytes, not requantized; absmax rebuilt as bitsandbytes
// does (nf4.md §3.3). A dense (unquantized) linear is quantized here with the view's qt/bs/nested.
inline void bnb_linear_load(const BnbLinear& b, Quant4& q) {
    const int64_t n = b.out * b.in;
    if (b.dense) {
        std::vector<float> x = st_f32(*b.weight);
        q = quantize_weight(x.data(), n, b.qt, b.bs, b.nested);
        return;
    }
    q = Quant4();
    q.qt = b.qt;
    q.bs = b.bs;
    q.nested = b.nested;
    q.n = n;
    q.packed.assign(b.weight->data, b.weight->data + b.weight->nbytes);
    const int64_t nb = q.n_blocks();
    q.absmax.resize((size_t)nb);
    if (!b.nested) {
        memcpy(q.absmax.data(), b.absmax->data, (size_t)nb * 4);
        return;
    }
    q.absmax_q.assign(b.absmax->data, b.absmax->data + nb);
    q.absmax2 = st_f32(*b.nested_absmax);
    q.offset = b.offset;
    dequantize_absmax(q.absmax.data(), q.absmax_q.data(), q.absmax2.data(), q.offset, nb);
}
// One linear in one call: validate everything about `weight_name` and return its bytes.
// dtype_out (optional): quant_state's dtype, the dtype bitsandbytes dequantizes to.
inline void bnb_read_linear(const SafeTensors& st, const std::string& weight_name, int64_t out, int64_t in, Quant4& q,
                            int* dtype_out = nullptr) {
    BnbLinear b = bnb_linear_view(st, weight_name, out, in);
    bnb_linear_load(b, q);
    if (dtype_out) *dtype_out = b.dtype;
}

// checkpoint_view for a pre-quantized checkpoint: every tensor the model needs, validated up front.
// All quantized linears must share one (quant type, blocksize, nested) (the trainer has one format);
// dense ones (skipped modules) take those settings when bnb_linear_load quantizes them.
struct BnbCheckpointView {
    WeightTable<const STensor*, BnbLinear> w;   // dense tensors as stored, linears as bnb views
    int qt = QT_NF4, bs = NF4_BLOCKSIZE;
    bool nested = true;
    int n_dense = 0;   // linears stored unquantized
};
inline BnbCheckpointView bnb_checkpoint_validate(const Config& c, const SafeTensors& st) {
    BnbCheckpointView v;
    const STensor* lm = st.find("lm_head.weight");
    ql_assert(
        c.tied || !lm || lm->dtype != DT_U8 || !st.find("lm_head.weight.absmax"),
        "%s: lm_head is 4-bit quantized in this checkpoint; qlora needs it unquantized (transformers leaves it so by default)",
        lm ? lm->file.c_str() : "");
    v.w.fill(
        c, [&](const Weight& w, const STensor*& t) { t = &st.get(w.name, w.shape); },
        [&](const Weight& w, BnbLinear& b) { b = bnb_linear_view(st, w.name, w.shape[0], w.shape[1]); });
    const BnbLinear* first = nullptr;
    for (auto& row : v.w.linear)
        for (auto& b : row) {
            if (b.dense) {
                v.n_dense++;
                continue;
            }
            if (!first) {
                first = &b;
                v.qt = b.qt;
                v.bs = b.bs;
                v.nested = b.nested;
                continue;
            }
            ql_assert(b.qt == v.qt && b.bs == v.bs && b.nested == v.nested,
                      "%s: \"%s\" is %s blocksize %d%s but \"%s\" is %s blocksize %d%s: "
                      "qlora needs one 4-bit format for every linear",
                      b.weight->file.c_str(), b.weight->name.c_str(), quant_type_name(b.qt), b.bs, b.nested ? " nested" : "",
                      first->weight->name.c_str(), quant_type_name(v.qt), v.bs, v.nested ? " nested" : "");
        }
    ql_assert(first, "%s: the config says bitsandbytes 4-bit, but no decoder linear is stored quantized",
              st.files.empty() ? "" : st.files[0]->path.c_str());
    for (auto& row : v.w.linear)
        for (auto& b : row)
            if (b.dense) {
                b.qt = v.qt;
                b.bs = v.bs;
                b.nested = v.nested;
            }
    return v;
}
// The same weight in another 4-bit format (e.g. the trainer's NF4, blocksize 64, nested): dequantized
// to dtype (what bitsandbytes would compute with) and quantized again. Lossy unless the formats match.
inline Quant4 quant4_convert(const Quant4& q, int dtype, int qt, int bs, bool nested) {
    if (q.qt == qt && q.bs == bs && q.nested == nested) return q;
    std::vector<float> x((size_t)q.n);
    dequantize_weight(x.data(), q);
    if (dtype == DT_BF16)
        for (float& v : x) v = bf16_round(v);
    if (dtype == DT_F16)
        for (float& v : x) v = f16_to_f32(f32_to_f16(v));
    return quantize_weight(x.data(), q.n, qt, bs, nested);
}

// ---------------------------------------------------------------------------------------------
// 13. Hugging Face checkpoints out: safetensors files with the tensors in the order safetensors'
// own writer uses (descending dtype size, then name: every tensor stays aligned to its element
// size), sharded with model.safetensors.index.json when there are several files, config.json and
// the tokenizer files beside them. Tensors are made one shard at a time (the pieces of a shard on
// all cores), so a merge of an 8B model holds at most one shard in memory.

struct OutTensor {
    std::string name;
    int dtype = DT_NONE;
    std::vector<int64_t> shape;
    std::vector<uint8_t> own;            // the bytes, or
    const uint8_t* borrowed = nullptr;   // bytes in a mapped input file (tensors copied unchanged)
    size_t nbytes() const {
        size_t n = (size_t)dtype_bytes(dtype);
        for (int64_t d : shape) n *= (size_t)d;
        return n;
    }
    const uint8_t* bytes() const { return borrowed ? borrowed : own.data(); }
};
inline OutTensor out_tensor(const std::string& name, int dtype, std::vector<int64_t> shape, const void* data) {
    OutTensor t;
    t.name = name;
    t.dtype = dtype;
    t.shape = std::move(shape);
    t.own.assign((const uint8_t*)data, (const uint8_t*)data + t.nbytes());
    return t;
}
inline OutTensor out_borrow(const STensor& s) {
    OutTensor t;
    t.name = s.name;
    t.dtype = s.dtype;
    t.shape = s.shape;
    t.borrowed = s.data;
    return t;
}
inline OutTensor out_bf16(const std::string& name, std::vector<int64_t> shape, const float* x) {
    OutTensor t;
    t.name = name;
    t.dtype = DT_BF16;
    t.shape = std::move(shape);
    t.own.resize(t.nbytes());
    for (size_t i = 0; i < t.own.size() / 2; i++) {
        uint16_t h = f32_to_bf16(x[i]);
        memcpy(&t.own[2 * i], &h, 2);
    }
    return t;
}

inline void st_write_hf(const std::string& path, std::vector<OutTensor>& ts) {
    std::sort(ts.begin(), ts.end(), [](const OutTensor& a, const OutTensor& b) {
        int x = dtype_bytes(a.dtype), y = dtype_bytes(b.dtype);
        return x != y ? x > y : a.name < b.name;
    });
    std::string h = "{\"__metadata__\":{\"format\":\"pt\"}";
    uint64_t off = 0;
    for (auto& t : ts) {
        ql_assert(t.dtype != DT_NONE && (t.borrowed || t.own.size() == t.nbytes()),
                  "internal: tensor %s has %zu bytes for shape %s", t.name.c_str(), t.own.size(),
                  t.shape.size() ? std::to_string(t.shape[0]).c_str() : "[]");
        h += "," + json_quote(t.name) + ":{\"dtype\":\"" + dtype_name(t.dtype) + "\",\"shape\":[";
        for (size_t i = 0; i < t.shape.size(); i++) h += (i ? "," : "") + std::to_string(t.shape[i]);
        h += "],\"data_offsets\":[" + std::to_string(off) + "," + std::to_string(off + t.nbytes()) + "]}";
        off += t.nbytes();
    }
    h += "}";
    while (h.size() % 8) h += ' ';
    uint8_t len[8];
    for (int k = 0; k < 8; k++) len[k] = (uint8_t)((uint64_t)h.size() >> (8 * k));
    std::vector<std::pair<const void*, size_t>> parts = {{len, 8}, {h.data(), h.size()}};
    for (auto& t : ts) parts.push_back({t.bytes(), t.nbytes()});
    atomic_write(path, parts);
}

// A group of output tensors made together (a quantized linear makes up to six) in one shard file.
struct CkptPiece {
    std::string shard;                                   // file name inside the output directory
    std::function<void(std::vector<OutTensor>&)> make;   // appends its tensors
    size_t est_bytes = 0;                                // for ckpt_assign_shards
};
inline std::string shard_name(int i, int n) {
    char b[64];
    snprintf(b, sizeof b, "model-%05d-of-%05d.safetensors", i, n);
    return b;
}
// huggingface_hub's split_state_dict_into_shards: pieces in order, a new shard when the next piece
// would take the current one past max_bytes; one shard is plain model.safetensors.
inline void ckpt_assign_shards(std::vector<CkptPiece>& pieces, uint64_t max_bytes) {
    std::vector<int> id(pieces.size());
    int cur = 0;
    uint64_t size = 0;
    for (size_t i = 0; i < pieces.size(); i++) {
        if (size > 0 && size + pieces[i].est_bytes > max_bytes) {
            cur++;
            size = 0;
        }
        id[i] = cur;
        size += pieces[i].est_bytes;
    }
    for (size_t i = 0; i < pieces.size(); i++) pieces[i].shard = cur == 0 ? "model.safetensors" : shard_name(id[i] + 1, cur + 1);
}
// Writes the shards in order of first appearance, then the index (json.dumps(indent=2,
// sort_keys=True) as transformers writes it) when there is more than one file or the one file is not
// model.safetensors. Removes what would shadow the new files: a stale index, or a stale single file
// (transformers prefers model.safetensors to an index).
// shown: the directory named in the progress lines (dst is a staging sibling of it: out_write_set).
inline void ckpt_write(const std::string& dst, const std::vector<CkptPiece>& pieces, const std::string& shown = "") {
    std::vector<std::string> shards;
    for (auto& p : pieces)
        if (std::find(shards.begin(), shards.end(), p.shard) == shards.end()) shards.push_back(p.shard);
    std::map<std::string, std::string> weight_map;
    uint64_t total = 0;
    for (auto& sh : shards) {
        std::vector<const CkptPiece*> mine;
        for (auto& p : pieces)
            if (p.shard == sh) mine.push_back(&p);
        std::vector<std::vector<OutTensor>> made(mine.size());
        std::atomic<size_t> next{0};
        auto worker = [&] {
            for (size_t i; (i = next++) < mine.size();) mine[i]->make(made[i]);
        };
        unsigned nt = std::max(1u, std::min((unsigned)mine.size(), std::thread::hardware_concurrency()));
        std::vector<std::thread> pool;
        for (unsigned k = 1; k < nt; k++) pool.emplace_back(worker);
        worker();
        for (auto& th : pool) th.join();
        std::vector<OutTensor> ts;
        for (auto& m : made)
            for (auto& t : m) ts.push_back(std::move(t));
        for (auto& t : ts) {
            ql_assert(!weight_map.count(t.name), "internal: tensor %s made twice", t.name.c_str());
            weight_map[t.name] = sh;
            total += t.nbytes();
        }
        st_write_hf(dst + "/" + sh, ts);
        printf("wrote %s/%s (%zu tensors)\n", (shown.empty() ? dst : shown).c_str(), sh.c_str(), ts.size());
        fflush(stdout);
    }
    std::string index = dst + "/model.safetensors.index.json";
    if (shards.size() == 1 && shards[0] == "model.safetensors") {
        remove(index.c_str());
        return;
    }
    remove((dst + "/model.safetensors").c_str());
    std::string s = "{\n  \"metadata\": {\n    \"total_size\": " + std::to_string(total) + "\n  },\n  \"weight_map\": {";
    bool first = true;
    for (auto& kv : weight_map) {
        s += std::string(first ? "" : ",") + "\n    " + json_quote(kv.first) + ": " + json_quote(kv.second);
        first = false;
    }
    write_text_file(index, s + "\n  }\n}\n");
}

// Tokenizer, generation config, chat template, README...: every plain file of src except weights,
// weight indexes and config.json (which the caller writes). vocab.bin is copied when it is qlora's
// vocabulary table (dev/data/prepare.py; generate.h), so that samples of the output decode to text.
inline void copy_side_files(const std::string& src, const std::string& dst) {
    DIR* d = opendir(src.c_str());
    ql_assert(d, "cannot list %s", src.c_str());
    std::vector<std::string> names;
    while (dirent* e = readdir(d)) names.push_back(e->d_name);
    closedir(d);
    static const char* const SKIP[] = {".safetensors", ".index.json", ".bin",     ".pt",   ".pth", ".ckpt",
                                       ".gguf",        ".h5",         ".msgpack", ".onnx", ".tmp"};
    for (auto& n : names) {
        bool skip = n.empty() || n[0] == '.' || n == "config.json" || qlora_output_name(n);
        for (const char* s : SKIP) skip = skip || (n.size() >= strlen(s) && n.compare(n.size() - strlen(s), strlen(s), s) == 0);
        struct stat sb;
        if (stat((src + "/" + n).c_str(), &sb) != 0 || !S_ISREG(sb.st_mode)) continue;
        std::vector<uint8_t> b;
        if (n == "vocab.bin") {
            b = read_file(src + "/" + n);
            skip = b.size() < 8 || memcmp(b.data(), "QLVOCAB\0", 8) != 0;
        }
        if (skip) continue;
        if (b.empty()) b = read_file(src + "/" + n);
        atomic_write(dst + "/" + n, {{b.data(), b.size()}});
    }
}
// Before anything is read: --out is not the input checkpoint, and this process holds its lock.
inline void ckpt_prepare_out(const std::string& src, const std::string& dst) {
    struct stat a, b;
    ql_assert(stat(src.c_str(), &a) != 0 || stat(dst.c_str(), &b) != 0 || a.st_dev != b.st_dev || a.st_ino != b.st_ino,
              "the output directory %s is the input checkpoint; choose another --out", dst.c_str());
    out_lock(dst);
}
// embed_tokens, then layer by layer, then the rest, lm_head last: the order of a state dict, which
// decides what lands in which shard
inline bool hf_tensor_order(const std::string& a, const std::string& b) {
    auto group = [](const std::string& s) {
        return s.rfind("model.embed_tokens.", 0) == 0 ? 0
               : s.rfind("model.layers.", 0) == 0     ? 1
               : s.rfind("lm_head.", 0) == 0          ? 3
                                                      : 2;
    };
    int ga = group(a), gb = group(b);
    if (ga != gb) return ga < gb;
    if (ga == 1) {
        long la = atol(a.c_str() + 13), lb = atol(b.c_str() + 13);
        if (la != lb) return la < lb;
    }
    return a < b;
}

inline const char* torch_dtype_name(int dt) {
    return dt == DT_BF16 ? "bfloat16" : dt == DT_F16 ? "float16" : "float32";
}
// The quant_state blob, byte for byte as json.dumps writes QuantState.as_dict(packed=True) (nf4.md §4.2):
// {"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [128, 256], "nested_blocksize": 256,
//  "nested_dtype": "float32", "nested_offset": 0.061586856842041016}
inline std::string bnb_quant_state_json(const Quant4& q, int dtype, int64_t out, int64_t in) {
    std::string s = std::string("{\"quant_type\": \"") + quant_type_name(q.qt) + "\", \"blocksize\": " + std::to_string(q.bs) +
                    ", \"dtype\": \"" + torch_dtype_name(dtype) + "\", \"shape\": [" + std::to_string(out) + ", " +
                    std::to_string(in) + "]";
    if (q.nested)
        s += ", \"nested_blocksize\": 256, \"nested_dtype\": \"float32\", \"nested_offset\": " + py_json_float((double)q.offset);
    return s + "}";
}
// The tensors Linear4bit._save_to_state_dict writes for one weight (nf4.md §4.1); dtype: the dtype
// the weight had before quantization (bitsandbytes dequantizes back to it).
inline void bnb_linear_tensors(std::vector<OutTensor>& ts, const std::string& wn, const Quant4& q, int dtype, int64_t out,
                               int64_t in) {
    ql_assert(q.n == out * in, "internal: %s quantized with %lld elements, shape [%lld, %lld]", wn.c_str(), (long long)q.n,
              (long long)out, (long long)in);
    int64_t nb = q.n_blocks();
    float qmap[16];
    for (int i = 0; i < 16; i++) qmap[i] = bnb_quant_map_value(q.qt, i);
    std::string js = bnb_quant_state_json(q, dtype, out, in);
    ts.push_back(out_tensor(wn, DT_U8, {(q.n + 1) / 2, 1}, q.packed.data()));
    if (q.nested)
        ts.push_back(out_tensor(wn + ".absmax", DT_U8, {nb}, q.absmax_q.data()));
    else
        ts.push_back(out_tensor(wn + ".absmax", DT_F32, {nb}, q.absmax.data()));
    ts.push_back(out_tensor(wn + ".quant_map", DT_F32, {16}, qmap));
    if (q.nested) {
        ts.push_back(out_tensor(wn + ".nested_absmax", DT_F32, {(int64_t)q.absmax2.size()}, q.absmax2.data()));
        ts.push_back(out_tensor(wn + ".nested_quant_map", DT_F32, {256}, DYN8_BITS));
    }
    ts.push_back(out_tensor(wn + ".quant_state.bitsandbytes__" + quant_type_name(q.qt), DT_U8, {(int64_t)js.size()}, js.data()));
}
// config.json's quantization_config as BitsAndBytesConfig.to_dict() writes it (nf4.md §4.3), compute
// dtype bf16 (the QLoRA recipe). lead: the file's member indent (json_member_indent).
inline std::string bnb_quantization_config_text(int qt, bool nested, const std::string& lead) {
    return json_object_text({{"_load_in_4bit", "true"},
                             {"_load_in_8bit", "false"},
                             {"bnb_4bit_compute_dtype", "\"bfloat16\""},
                             {"bnb_4bit_quant_storage", "\"uint8\""},
                             {"bnb_4bit_quant_type", std::string("\"") + quant_type_name(qt) + "\""},
                             {"bnb_4bit_use_double_quant", nested ? "true" : "false"},
                             {"llm_int8_enable_fp32_cpu_offload", "false"},
                             {"llm_int8_has_fp16_weight", "false"},
                             {"llm_int8_skip_modules", "null"},
                             {"llm_int8_threshold", "6.0"},
                             {"load_in_4bit", "true"},
                             {"load_in_8bit", "false"},
                             {"quant_method", "\"bitsandbytes\""}},
                            lead);
}
inline std::string config_with_bnb4(std::string cfg, const std::string& what, int qt, bool nested) {
    return json_text_set(cfg, "quantization_config",
                         bnb_quantization_config_text(qt, nested, json_member_indent(cfg, json_members(cfg, what))), what);
}
