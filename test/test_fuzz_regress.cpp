// test_fuzz_regress.cpp: replays every seed (test/fuzz/corpus/<target>/) and every input that once
// broke a reader (test/fuzz/regress/<target>/, found by `make fuzz`) through the same fuzz_<target>()
// the fuzzers run (test/fuzz/targets.h). Each must return cleanly (a rejected input is a QlError,
// caught) within REPLAY_BUDGET_S: a crash or sanitizer report ends this binary, another exception or
// a slow input is a FAIL. Each input runs twice: quiet, as the fuzzers run, and once more with its
// error message formatted (stderr to /dev/null), so the message arguments are exercised too.
// Arguments "TARGET:DIR" replay more inputs (a grown corpus in build/fuzz/), one line per directory.
#include "fuzz/targets.h"   // defines: fuzz_json, fuzz_config, fuzz_safetensors, fuzz_index, fuzz_tokens, fuzz_bnb, fuzz_peft, fuzz_vocab
#include "test.h"           // defines: check, test_summary
#include <dirent.h>         // defines: opendir
#include <fcntl.h>          // defines: open
#include <chrono>           // defines: steady_clock

static const double REPLAY_BUDGET_S = 5.0;   // per input, both runs, under ASan+UBSan; the fuzzers allow 10
struct Target { const char* name; int (*fn)(const uint8_t*, size_t); };
static const Target TARGETS[] = {{"json", fuzz_json}, {"config", fuzz_config}, {"safetensors", fuzz_safetensors},
                                 {"index", fuzz_index}, {"tokens", fuzz_tokens}, {"bnb", fuzz_bnb}, {"peft", fuzz_peft}, {"vocab", fuzz_vocab}};

static std::vector<std::string> files_in(const std::string& dir) {
    std::vector<std::string> out;
    DIR* d = opendir(dir.c_str());
    if (!d) return out;
    while (dirent* e = readdir(d)) if (e->d_name[0] != '.') out.push_back(dir + "/" + e->d_name);
    closedir(d);
    std::sort(out.begin(), out.end());
    return out;
}

// One input through one target, quiet then with messages. Returns "" if clean, else what went wrong.
static std::string replay(const Target& t, const std::string& path, double& secs) {
    std::vector<uint8_t> file = read_file(path);
    std::vector<uint8_t> buf(std::max<size_t>(file.size(), 1));   // exactly sized (ASan sees overreads), never null
    if (!file.empty()) memcpy(buf.data(), file.data(), file.size());
    auto t0 = std::chrono::steady_clock::now();
    std::string what;
    for (int messages = 0; messages < 2 && what.empty(); messages++) {
        g_fuzz_messages = messages;
        int saved = -1;
        if (messages) { fflush(stderr); saved = dup(2); int nul = open("/dev/null", O_WRONLY); dup2(nul, 2); close(nul); }
        try { t.fn(buf.data(), file.size()); }
        catch (const QlError&) {}   // clean too, though the targets catch their own
        catch (const std::exception& e) { what = std::string("threw ") + e.what(); }
        catch (...) { what = "threw a non-QlError exception"; }
        if (messages) { fflush(stderr); dup2(saved, 2); close(saved); }
    }
    g_fuzz_messages = false;
    secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (what.empty() && secs > REPLAY_BUDGET_S) what = "too slow";
    return what;
}

static const Target& target_named(const std::string& n) {
    for (auto& t : TARGETS) if (n == t.name) return t;
    ql_fail("unknown fuzz target \"%s\" (json, config, safetensors, index, tokens, bnb, peft, vocab)", n.c_str());
}

// Hostile inputs too large to commit, made here: each must be rejected or accepted in time, not in
// time quadratic in its size (REPLAY_BUDGET_S, like the files).
static void generated(const char* name, const Target& t, const std::string& bytes) {
    std::string path = "build/fuzz_regress_generated";
    FILE* f = fopen(path.c_str(), "wb");
    ql_assert(f && fwrite(bytes.data(), 1, bytes.size(), f) == bytes.size() && fclose(f) == 0, "cannot write %s", path.c_str());
    double s = 0; std::string w = replay(t, path, s);
    remove(path.c_str());
    check(w.empty(), "fuzz_%-12s %-58s %s (%.1f ms, %zu bytes)", t.name, name, w.empty() ? "clean" : w.c_str(), 1e3 * s, bytes.size());
}
static void generated_inputs() {
    const int N = 50000;
    std::string h = "{", wm;   // N one-byte U8 tensors; an index naming N distinct shards
    for (int i = 0; i < N; i++) {
        std::string k = "t" + std::to_string(i);
        h += (i ? ",\"" : "\"") + k + "\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[" + std::to_string(i) + "," + std::to_string(i + 1) + "]}";
        wm += (i ? ",\"" : "\"") + k + "\":\"shard-" + std::to_string(i) + ".safetensors\"";
    }
    h += "}";
    std::string st(8, '\0');
    for (int k = 0; k < 8; k++) st[k] = (char)(h.size() >> (8 * k));
    st += h + std::string(N, '\1');
    generated("(generated) 50k tensors in one header", target_named("safetensors"), st);
    generated("(generated) index with 50k distinct shards", target_named("index"), "{\"weight_map\":{" + wm + "}}");
}

// Throw mode is for one process trying many hostile inputs: a rejected file must not leak its fd.
static int open_fds() { return (int)files_in("/proc/self/fd").size(); }
static void no_fd_leak() {
    fuzz_mode();
    int before = open_fds(), thrown = 0;
    for (int i = 0; i < 100; i++) {
        try { st_open("test/fuzz"); } catch (const QlError&) { thrown++; }             // a directory: not a regular file
        try { st_open("test/fuzz/fuzz.dict"); } catch (const QlError&) { thrown++; }   // not a safetensors file
        try { read_file("test/fuzz"); } catch (const QlError&) { thrown++; }           // opens, then cannot be read
    }
    int after = open_fds();
    check(thrown == 300 && after == before, "throw mode: 300 rejected files leave the fds as they were (%d open before, %d after)", before, after);
}

int main(int argc, char** argv) {
    if (argc > 1) {   // TARGET:DIR ... : one summary line per directory
        for (int a = 1; a < argc; a++) {
            std::string arg = argv[a]; size_t c = arg.find(':');
            ql_assert(c != std::string::npos, "usage: %s [TARGET:DIR ...]", argv[0]);
            const Target& t = target_named(arg.substr(0, c));
            std::vector<std::string> fs = files_in(arg.substr(c + 1));
            int bad = 0; double slowest = 0;
            for (auto& f : fs) {
                double s = 0; std::string w = replay(t, f, s);
                slowest = std::max(slowest, s);
                if (!w.empty()) { bad++; printf("         %s: %s (%.2f s)\n", f.c_str(), w.c_str(), s); }
            }
            check(bad == 0 && !fs.empty(), "fuzz_%-12s %-40s %zu inputs, %d bad, slowest %.3f s", t.name, arg.substr(c + 1).c_str(), fs.size(), bad, slowest);
        }
        return test_summary();
    }
    for (auto& t : TARGETS) {
        std::vector<std::string> seeds = files_in(std::string("test/fuzz/corpus/") + t.name);
        check(!seeds.empty(), "fuzz_%-12s has seeds in test/fuzz/corpus/%s (%zu)", t.name, t.name, seeds.size());
        std::vector<std::string> all = seeds, reg = files_in(std::string("test/fuzz/regress/") + t.name);
        all.insert(all.end(), reg.begin(), reg.end());
        for (auto& f : all) {
            double s = 0; std::string w = replay(t, f, s);
            check(w.empty(), "fuzz_%-12s %-58s %s (%.1f ms)", t.name, f.c_str() + strlen("test/fuzz/"), w.empty() ? "clean" : w.c_str(), 1e3 * s);
        }
    }
    generated_inputs();
    no_fd_leak();
    return test_summary();
}
