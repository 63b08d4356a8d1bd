// dataloader.h: token files and the packing loader, shared by the CPU reference and the GPU trainer.
//
// A token file (written by dev/data/prepare.py; token_file_write below for tests) is one flat,
// memory-mapped, little-endian layout, validated in full at open:
//   [0, 64)    header: magic "QLTOKENS", u32 version 1, u32 header bytes (64), u64 n_tokens,
//              u64 n_docs, u32 vocab (every token id < vocab), u32 flags (bit 0: loss mask present),
//              24 reserved zero bytes
//   tokens     u32 [n_tokens]
//   mask       u8  [n_tokens] if flags & 1: 1 = this token is a training target (answers), 0 = context
//   (zero padding to a multiple of 8)
//   docs       u64 [n_docs + 1] document start offsets: docs[0] = 0, non-decreasing, docs[n_docs] = n_tokens
//
// Packing: each row of T tokens is filled with documents back to back, in an order shuffled per
// epoch from the seed. A document that does not fit the rest of a row is split: the remainder
// starts the next row as a new segment. Inside a row, attention never crosses a segment boundary
// (doc_start) and positions restart at 0 in each segment (pos), so packed rows cost no padding and
// compute what the segments would compute alone. The target of a token is the next token of its
// document (even across a split), if that token is a training target; else -1.
// The loader's position (epoch, cursor, offset) is three integers: it is part of the resume state.
// Data parallel (dist.h): every rank runs the same loader over the whole file and packs the world's
// batch, world·B rows, keeping rows rank·B .. rank·B + B-1 (the others it steps past document by
// document, copying nothing). So the position is the same on every rank, one resume state serves
// them all, and W ranks of B rows train on exactly the rows one GPU would see with W·B.
//
// Evaluation reads a file differently: eval_batches packs whole documents and never splits one
// across rows (a split answer would lose its prompt), and examples_of cuts each document into the
// prompt and the answer that greedy decoding is scored on.
#pragma once
#include "formats.h" // defines: MappedFile, ql_fail, rng_u32, atomic_write

static const char TOKEN_MAGIC[8] = {'Q', 'L', 'T', 'O', 'K', 'E', 'N', 'S'};
static const uint32_t TOKEN_VERSION = 1, TOKEN_HEADER = 64;

struct TokenFile {
    std::unique_ptr<MappedFile> file;
    uint64_t n_tokens = 0, n_docs = 0; uint32_t vocab = 0;
    const uint8_t* tok = nullptr;    // (n_tokens) u32 little-endian, possibly unaligned
    const uint8_t* mask = nullptr;   // (n_tokens) or nullptr: every token is a target
    const uint8_t* docs = nullptr;   // (n_docs + 1) u64
    uint32_t token(uint64_t i) const { uint32_t v; memcpy(&v, tok + 4 * i, 4); return v; }
    uint64_t doc(uint64_t d) const { uint64_t v; memcpy(&v, docs + 8 * d, 8); return v; }
    bool target(uint64_t i) const { return !mask || mask[i]; }
};

inline uint64_t rd_u64(const uint8_t* p) { uint64_t v; memcpy(&v, p, 8); return v; }
inline uint32_t rd_u32(const uint8_t* p) { uint32_t v; memcpy(&v, p, 4); return v; }

// Validates everything: sizes (overflow-checked), exact file length, document offsets, token ids.
inline void token_file_parse(TokenFile& f, const uint8_t* d, size_t size, const std::string& name, int model_vocab) {
    const char* p = name.c_str();
    ql_assert(size >= TOKEN_HEADER && !memcmp(d, TOKEN_MAGIC, 8), "%s: not a qlora token file (no QLTOKENS header); make one with dev/data/prepare.py", p);
    ql_assert(rd_u32(d + 8) == TOKEN_VERSION, "%s: token file version %u, this qlora reads version %u (re-run dev/data/prepare.py)", p, rd_u32(d + 8), TOKEN_VERSION);
    ql_assert(rd_u32(d + 12) == TOKEN_HEADER, "%s: header size %u, expected %u", p, rd_u32(d + 12), TOKEN_HEADER);
    f.n_tokens = rd_u64(d + 16); f.n_docs = rd_u64(d + 24); f.vocab = rd_u32(d + 32);
    uint32_t flags = rd_u32(d + 36);
    ql_assert((flags & ~1u) == 0, "%s: unknown flags 0x%x", p, flags);
    ql_assert(f.n_tokens < (1ull << 40) && f.n_docs <= f.n_tokens, "%s: implausible sizes (%llu tokens, %llu documents)", p,
              (unsigned long long)f.n_tokens, (unsigned long long)f.n_docs);
    uint64_t need = TOKEN_HEADER + 4 * f.n_tokens + ((flags & 1) ? f.n_tokens : 0);
    need = (need + 7) & ~7ull;
    uint64_t docs_at = need;
    need += 8 * (f.n_docs + 1);
    ql_assert(need == size, "%s: %zu bytes, but the header implies %llu (truncated or corrupt?)", p, size, (unsigned long long)need);
    ql_assert(model_vocab <= 0 || f.vocab <= (uint32_t)model_vocab, "%s: made for a vocabulary of %u tokens, the model has %d", p, f.vocab, model_vocab);
    f.tok = d + TOKEN_HEADER;
    f.mask = (flags & 1) ? d + TOKEN_HEADER + 4 * f.n_tokens : nullptr;
    f.docs = d + docs_at;
    ql_assert(f.doc(0) == 0 && f.doc(f.n_docs) == f.n_tokens, "%s: document offsets must start at 0 and end at n_tokens", p);
    for (uint64_t i = 0; i < f.n_docs; i++)
        ql_assert(f.doc(i) <= f.doc(i + 1), "%s: document %llu ends before it starts", p, (unsigned long long)i);
    for (uint64_t i = 0; i < f.n_tokens; i++)
        if (f.token(i) >= f.vocab) ql_fail("%s: token %llu is %u, not below the file's vocabulary size %u", p, (unsigned long long)i, f.token(i), f.vocab);
}
inline void token_file_open(TokenFile& f, const std::string& path, int model_vocab) {
    f.file.reset(new MappedFile(path));
    token_file_parse(f, f.file->data, f.file->size, path, model_vocab);
}

// The targets a file gives the loss: every token after the first of its document whose mask is 1.
inline uint64_t token_file_targets(const TokenFile& f) {
    uint64_t n = 0;
    for (uint64_t d = 0; d < f.n_docs; d++)
        for (uint64_t i = f.doc(d) + 1; i < f.doc(d + 1); i++) n += f.target(i);
    return n;
}
// A file with no targets would train at loss 0 (--train) or report a validation loss of 0 (--val), and
// say nothing: refused, with the file named. what: "--train" or "--val".
inline void token_file_require_targets(const TokenFile& f, const std::string& path, const char* what) {
    ql_assert(token_file_targets(f) > 0, "%s %s: no token is a training target (%s), so its loss is 0 and %s; "
              "re-make it with dev/data/prepare.py (--train-on-prompt puts the loss on every token)", what, path.c_str(),
              f.mask ? "its loss mask is 0 everywhere after each document's first token" : "every document is a single token",
              strcmp(what, "--train") == 0 ? "training would change nothing" : "the validation loss would mean nothing");
}

// Writer (tests, and the reference for dev/data/prepare.py). docs: start offsets, without the final n.
inline void token_file_write(const std::string& path, const std::vector<uint32_t>& tokens, const std::vector<uint8_t>* mask,
                             const std::vector<uint64_t>& doc_starts, uint32_t vocab) {
    uint8_t h[TOKEN_HEADER] = {0};
    uint64_t n = tokens.size(), nd = doc_starts.size();
    uint32_t flags = mask ? 1 : 0;
    memcpy(h, TOKEN_MAGIC, 8); memcpy(h + 8, &TOKEN_VERSION, 4); memcpy(h + 12, &TOKEN_HEADER, 4);
    memcpy(h + 16, &n, 8); memcpy(h + 24, &nd, 8); memcpy(h + 32, &vocab, 4); memcpy(h + 36, &flags, 4);
    std::vector<uint64_t> docs(doc_starts); docs.push_back(n);
    size_t body = TOKEN_HEADER + 4 * n + (mask ? n : 0);
    std::vector<uint8_t> pad(((body + 7) & ~(size_t)7) - body, 0);
    atomic_write(path, {{h, sizeof h}, {tokens.data(), 4 * n}, {mask ? mask->data() : nullptr, mask ? n : 0},
                        {pad.data(), pad.size()}, {docs.data(), 8 * docs.size()}});
}

// One micro-batch, rows r = b*T + t.
struct Batch {
    int B = 0, T = 0;
    std::vector<int> ids, targets, pos, doc_start;   // (B*T) each; doc_start row-relative
    long count_targets() const { long c = 0; for (int x : targets) c += x >= 0; return c; }
};

struct LoaderState { uint64_t epoch = 0, cursor = 0, offset = 0; };  // resumable position

struct Loader {
    const TokenFile* f = nullptr;
    uint64_t seed = 0; bool shuffle = true;
    int rank = 0, world = 1;       // data parallel: this rank's rows of the world's batch
    LoaderState st;
    std::vector<uint64_t> order;   // (n_docs) this epoch's document order
    void init(const TokenFile* file, uint64_t s, bool shuf, LoaderState at = LoaderState()) {
        f = file; seed = s; shuffle = shuf; st = at;
        ql_assert(f->n_tokens > 0 && f->n_docs > 0, "token file has no tokens");
        make_order();
        ql_assert(st.cursor < f->n_docs && st.offset <= f->doc(order[st.cursor] + 1) - f->doc(order[st.cursor]), "resume position is outside the data");
    }
    void make_order() {   // Fisher-Yates from the counter RNG: the same (seed, epoch) gives the same order
        order.resize(f->n_docs);
        for (uint64_t i = 0; i < f->n_docs; i++) order[i] = i;
        if (shuffle)
            for (uint64_t i = f->n_docs - 1; i > 0; i--) std::swap(order[i], order[rng_u32(seed, 5000 + st.epoch, i) % (i + 1)]);
    }
    void advance_doc() { st.offset = 0; if (++st.cursor == f->n_docs) { st.cursor = 0; st.epoch++; make_order(); } }
    void next(Batch& b, int B, int T) {
        b.B = B; b.T = T;
        b.ids.assign((size_t)B * T, 0); b.targets.assign((size_t)B * T, -1); b.pos.assign((size_t)B * T, 0); b.doc_start.assign((size_t)B * T, 0);
        for (int g = 0; g < world * B; g++) {   // g: a row of the world's batch; r: ours, if 0 <= r < B
            int r = g - rank * B, t = 0;
            while (t < T) {
                uint64_t d = order[st.cursor], beg = f->doc(d), len = f->doc(d + 1) - beg;
                if (st.offset >= len) { advance_doc(); continue; }   // empty (or finished) document
                uint64_t k = std::min<uint64_t>(len - st.offset, (uint64_t)(T - t));
                for (uint64_t i = 0; r >= 0 && r < B && i < k; i++) {
                    size_t at = (size_t)r * T + t + i;
                    uint64_t src = beg + st.offset + i;
                    b.ids[at] = (int)f->token(src);
                    b.pos[at] = (int)i;
                    b.doc_start[at] = t;
                    if (st.offset + i + 1 < len && f->target(src + 1)) b.targets[at] = (int)f->token(src + 1);
                }
                t += (int)k; st.offset += k;
                if (st.offset == len) advance_doc();
            }
        }
    }
};

// Validation batches: whole documents packed into rows of T, never split across rows (the
// training loader splits them), so each document's loss is its loss alone, whatever B and T; the
// rest of a row is padding without targets. A document longer than T goes on in the next row as a
// new segment. Every target of the file is counted once. max_batches > 0: only the first ones.
inline std::vector<Batch> eval_batches(const TokenFile& f, int B, int T, int max_batches = 0) {
    std::vector<Batch> out;
    Batch* b = nullptr; int r = B - 1, t = T;   // row, next free column: the first document opens a batch
    for (uint64_t d = 0; d < f.n_docs; d++)
        for (uint64_t s = f.doc(d), e = f.doc(d + 1); s < e;) {
            int len = (int)std::min<uint64_t>(e - s, (uint64_t)T);
            if (t + len > T) { t = 0; r++; }
            if (r == B) {
                if (max_batches > 0 && (int)out.size() == max_batches) return out;
                out.emplace_back(); b = &out.back(); b->B = B; b->T = T; r = 0;
                b->ids.assign((size_t)B * T, 0); b->targets.assign((size_t)B * T, -1);
                b->pos.assign((size_t)B * T, 0); b->doc_start.resize((size_t)B * T);
                for (int i = 0; i < B * T; i++) b->doc_start[i] = i % T;   // padding: each token its own segment
            }
            for (int i = 0; i < len; i++) {
                size_t at = (size_t)r * T + t + i;
                b->ids[at] = (int)f.token(s + i); b->pos[at] = i; b->doc_start[at] = t;
                if (s + i + 1 < e && f.target(s + i + 1)) b->targets[at] = (int)f.token(s + i + 1);
            }
            t += len; s += len;
        }
    return out;
}

// An instruction example of a token file: the document up to its first trained token (the prompt,
// chat template included), then the trained tokens that follow it (the answer, end of turn included).
// A file without a loss mask has no prompts: no examples.
struct Example { std::vector<int> prompt, answer; };
inline std::vector<Example> examples_of(const TokenFile& f) {
    std::vector<Example> ex;
    if (!f.mask) return ex;
    for (uint64_t d = 0; d < f.n_docs; d++) {
        uint64_t b = f.doc(d), e = f.doc(d + 1), a = b + 1;
        while (a < e && !f.target(a)) a++;
        if (a >= e) continue;
        Example x;
        for (uint64_t i = b; i < a; i++) x.prompt.push_back((int)f.token(i));
        for (uint64_t i = a; i < e && f.target(i); i++) x.answer.push_back((int)f.token(i));
        ex.push_back(x);
    }
    return ex;
}
