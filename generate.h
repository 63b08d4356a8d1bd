// generate.h: the host side of generation, shared by the CPU trainer (qlora_cpu.cpp) and the GPU
// one (qlora.cu): ids <-> text through the vocabulary table that dev/data/prepare.py exports, the
// choice of the next token from a row of logits (greedy, or temperature + top-p from the counter
// RNG), and the report lines of `make train` (accuracy, samples). The models run elsewhere: here are
// only the decisions around them, so both trainers decide the same way.
#pragma once
#include "qlora.h"        // defines: ql_assert, read_file, rng_uniform
#include "dataloader.h"   // defines: Example, rd_u32
#include <unordered_map>  // defines: std::unordered_map (text -> token id, for encoding)
#include <ctype.h>        // defines: isspace (prompts of token ids)

// ---------------------------------------------------------------------------------------------
// the vocabulary table (dev/data/prepare.py's docstring has the format): id -> bytes

static const char VOCAB_MAGIC[8] = {'Q', 'L', 'V', 'O', 'C', 'A', 'B', 0};
static const uint32_t VOCAB_VERSION = 1, VOCAB_HEADER = 32, VOCAB_NONE = 0xffffffffu;

struct Vocab {
    std::vector<std::string> str;     // (n) the bytes each token decodes to
    std::vector<uint8_t> special;     // (n) 1: a control token (<|end|>), left out of decoded text
    uint32_t bos = VOCAB_NONE, eos = VOCAB_NONE;
    std::string decode(const std::vector<int>& ids, bool show_special = false) const {
        std::string s;
        for (int id : ids) {
            if (id < 0 || (size_t)id >= str.size()) { s += "<?" + std::to_string(id) + ">"; continue; }
            if (!special[id] || show_special) s += str[id];
        }
        return s;
    }
    // Text -> ids by greedy longest match over every token's bytes, special tokens included (so
    // "<|user|>" in the text is the control token). Exact for a character-level vocabulary such as
    // data/base's; for a BPE vocabulary it may choose other merges than the tokenizer would (the
    // prompts of a --val file are exact). Equal strings: the lower id.
    std::vector<int> encode(const std::string& text) const {
        std::unordered_map<std::string, int> id_of;
        size_t longest = 0;
        for (size_t i = str.size(); i-- > 0;) if (!str[i].empty()) { id_of[str[i]] = (int)i; longest = std::max(longest, str[i].size()); }
        std::vector<int> ids;
        for (size_t at = 0; at < text.size();) {
            size_t n = std::min(longest, text.size() - at);
            for (; n > 0; n--) { auto it = id_of.find(text.substr(at, n)); if (it != id_of.end()) { ids.push_back(it->second); break; } }
            ql_assert(n > 0, "prompt: byte 0x%02x at offset %zu (\"%s\") is in no token of the vocabulary", (unsigned char)text[at], at,
                      text.substr(at, 12).c_str());
            at += n;
        }
        return ids;
    }
};

inline void vocab_parse(Vocab& v, const uint8_t* d, size_t size, const std::string& name) {
    const char* p = name.c_str();
    ql_assert(size >= VOCAB_HEADER && !memcmp(d, VOCAB_MAGIC, 8), "%s: not a qlora vocabulary table (no QLVOCAB header); "
              "make one with dev/data/prepare.py", p);
    ql_assert(rd_u32(d + 8) == VOCAB_VERSION, "%s: vocabulary table version %u, this qlora reads version %u (re-run dev/data/prepare.py)",
              p, rd_u32(d + 8), VOCAB_VERSION);
    ql_assert(rd_u32(d + 12) == VOCAB_HEADER, "%s: header size %u, expected %u", p, rd_u32(d + 12), VOCAB_HEADER);
    uint64_t n = rd_u32(d + 16);
    v.bos = rd_u32(d + 20); v.eos = rd_u32(d + 24);
    ql_assert(rd_u32(d + 28) == 0, "%s: reserved header field is not 0", p);
    ql_assert(n > 0 && n < (1u << 26), "%s: implausible vocabulary size %llu", p, (unsigned long long)n);
    ql_assert((v.bos == VOCAB_NONE || v.bos < n) && (v.eos == VOCAB_NONE || v.eos < n), "%s: bos %u or eos %u is not a token id (< %llu)",
              p, v.bos, v.eos, (unsigned long long)n);
    uint64_t strings_at = VOCAB_HEADER + 4 * (n + 1) + n;
    ql_assert(size >= strings_at, "%s: %zu bytes, too short for %llu tokens (truncated?)", p, size, (unsigned long long)n);
    const uint8_t *off = d + VOCAB_HEADER, *flags = off + 4 * (n + 1);
    ql_assert(rd_u32(off) == 0 && strings_at + rd_u32(off + 4 * n) == size, "%s: %zu bytes, but the offsets imply %llu (truncated or corrupt?)",
              p, size, (unsigned long long)(strings_at + rd_u32(off + 4 * n)));
    v.str.resize(n); v.special.resize(n);
    for (uint64_t i = 0; i < n; i++) {
        uint32_t b = rd_u32(off + 4 * i), e = rd_u32(off + 4 * (i + 1));
        ql_assert(b <= e, "%s: token %llu ends before it starts", p, (unsigned long long)i);
        ql_assert(strings_at + e <= size, "%s: token %llu ends at string byte %u, past the %llu string bytes", p, (unsigned long long)i, e,
                  (unsigned long long)(size - strings_at));
        ql_assert(flags[i] <= 1, "%s: token %llu has unknown flags 0x%x", p, (unsigned long long)i, flags[i]);
        v.str[i].assign((const char*)d + strings_at + b, e - b);
        v.special[i] = flags[i];
    }
}
inline void vocab_load(Vocab& v, const std::string& path) {
    std::vector<uint8_t> b = read_file(path);
    vocab_parse(v, b.data(), b.size(), path);
}

// Prompt text -> ids: through the vocabulary table (bos first, if the table has one), or, without
// a table, the text is the ids themselves ("1 5 9").
inline std::vector<int> prompt_ids(const std::string& text, const Vocab* vocab) {
    std::vector<int> ids;
    if (vocab) {
        ids = vocab->encode(text);
        if (vocab->bos != VOCAB_NONE && (ids.empty() || ids[0] != (int)vocab->bos)) ids.insert(ids.begin(), (int)vocab->bos);
        return ids;
    }
    const char* p = text.c_str(); char* end;
    for (long v; (v = strtol(p, &end, 10)), end != p; p = end) ids.push_back((int)v);
    ql_assert(*p == 0 || isspace((unsigned char)*p), "--prompt \"%s\": without a vocabulary table (--vocab FILE) a prompt is token ids, e.g. \"1 5 9\"", text.c_str());
    return ids;
}

// ---------------------------------------------------------------------------------------------
// the next token

// Greedy: the largest logit, ties to the lower id (std::max_element's choice).
inline int greedy_token(const float* logits, int V) { return (int)(std::max_element(logits, logits + V) - logits); }

// temperature 0: greedy. Else a draw from softmax(logits / temperature) restricted to the nucleus:
// the most likely tokens, in order (ties to the lower id), until their probability reaches top_p
// (transformers' TopPLogitsWarper keeps the token that crosses it too). u in [0, 1): the caller's
// uniform draw, rng_uniform(seed, stream of the sequence, step), so a sequence's tokens do not
// depend on which others share its batch.
inline int choose_token(const float* logits, int V, float temperature, float top_p, float u) {
    if (temperature <= 0.0f) return greedy_token(logits, V);
    float m = logits[greedy_token(logits, V)];
    std::vector<std::pair<double, int>> p(V);
    double total = 0;
    for (int i = 0; i < V; i++) { p[i] = {exp((double)(logits[i] - m) / temperature), i}; total += p[i].first; }
    std::sort(p.begin(), p.end(), [](const std::pair<double, int>& a, const std::pair<double, int>& b) {
        return a.first != b.first ? a.first > b.first : a.second < b.second; });
    double kept = 0; size_t n = 0;
    while (n < p.size() && (n == 0 || kept < top_p * total)) kept += p[n++].first;
    double x = u * kept;
    for (size_t i = 0; i < n; i++) { x -= p[i].first; if (x < 0) return p[i].second; }
    return p[n - 1].second;   // rounding left x >= 0: the last kept token
}

// ---------------------------------------------------------------------------------------------
// scoring and reporting (the lines `make train` prints, the same on the CPU and the GPU)

// Exact match: the first |answer| generated tokens are the answer, end of turn included (so
// stopping in time counts too).
inline bool exact_match(const std::vector<int>& got, const std::vector<int>& answer) {
    return got.size() >= answer.size() && std::equal(answer.begin(), answer.end(), got.begin());
}

inline std::string sample_text(const Vocab* vocab, const std::vector<int>& ids) {
    if (vocab) return "\"" + vocab->decode(ids) + "\"";
    std::string s = "ids"; for (int id : ids) s += " " + std::to_string(id); return s;
}
// one generation: `  "prompt" -> "got"  (expected "answer") right`; no answer: without the verdict
inline void print_sample(const Vocab* vocab, const std::vector<int>& prompt, const std::vector<int>& got, const std::vector<int>* answer) {
    printf("  %s -> %s", sample_text(vocab, prompt).c_str(), sample_text(vocab, got).c_str());
    if (answer) printf("  (expected %s) %s", sample_text(vocab, *answer).c_str(), got == *answer ? "right" : "wrong");
    printf("\n");
}
// The step lines' estimate of the time left: "ETA 1h02m", "ETA 3m05s", "ETA 12s".
inline std::string eta_text(double seconds) {
    long s = seconds > 0 && seconds < 1e9 ? (long)(seconds + 0.5) : 0;
    char b[48];
    if (s >= 3600) snprintf(b, sizeof b, "ETA %ldh%02ldm", s / 3600, s / 60 % 60);
    else if (s >= 60) snprintf(b, sizeof b, "ETA %ldm%02lds", s / 60, s % 60);
    else snprintf(b, sizeof b, "ETA %lds", s);
    return b;
}

// `before: val loss 7.4339 | accuracy 0/200 = 0.0% (greedy, exact match) (2.0 s)`
inline void print_report(const char* when, float val_loss, int right, int total, double seconds) {
    if (!total) printf("%s: val loss %.4f | accuracy: the validation file has no prompts (no loss mask) (%.1f s)\n", when, val_loss, seconds);
    else printf("%s: val loss %.4f | accuracy %d/%d = %.1f%% (greedy, exact match) (%.1f s)\n", when, val_loss, right, total,
                100.0 * right / total, seconds);
}
