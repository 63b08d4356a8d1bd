// test/test.h: the test harness every test binary shares.
// A check either compares bits exactly or against a named error budget; each prints one line with
// the max abs/rel difference and the share of the budget used. A binary ends with
// test_summary(), which prints "N passed, N failed" and returns the exit code; a GPU test on a
// machine without a GPU calls test_skip() instead. test/run.sh sums the lines of all binaries.
#pragma once
#include <stdio.h>   // defines: printf
#include <math.h>    // defines: fabs
#include <stdint.h>  // defines: uint8_t
#include <string.h>  // defines: memcmp
#include <string>    // defines: std::string
#include <vector>    // defines: std::vector
#include <functional> // defines: std::function
#include <unistd.h>  // defines: fork, pipe
#include <sys/wait.h> // defines: waitpid

static int g_pass = 0, g_fail = 0;

// One named pass/fail line.
inline bool check(bool ok, const char* fmt, ...) __attribute__((format(printf, 2, 3)));
#include <stdarg.h>  // defines: va_list
inline bool check(bool ok, const char* fmt, ...) {
    va_list ap; va_start(ap, fmt);
    printf("%s ", ok ? "  ok  " : "  FAIL");
    vprintf(fmt, ap); printf("\n");
    va_end(ap);
    (ok ? g_pass : g_fail)++;
    return ok;
}

// |got - ref| <= atol + rtol*|ref| for every element; NaN in either never passes unless both are
// NaN at the same place. Prints max abs diff, max rel diff and the largest share of the budget used.
template <typename A, typename B>
inline bool check_close(const char* name, const A* got, const B* ref, size_t n, double atol, double rtol) {
    double max_abs = 0, max_rel = 0, worst = 0; size_t bad = 0, first_bad = (size_t)-1;
    for (size_t i = 0; i < n; i++) {
        double g = (double)got[i], r = (double)ref[i];
        if (isnan(g) || isnan(r)) { if (!(isnan(g) && isnan(r))) { bad++; if (first_bad == (size_t)-1) first_bad = i; } continue; }
        double d = fabs(g - r), budget = atol + rtol * fabs(r);
        if (d > max_abs) max_abs = d;
        if (fabs(r) > 0 && d / fabs(r) > max_rel) max_rel = d / fabs(r);
        double use = budget > 0 ? d / budget : (d > 0 ? INFINITY : 0);
        if (use > worst) worst = use;
        if (d > budget) { bad++; if (first_bad == (size_t)-1) first_bad = i; }
    }
    bool ok = bad == 0;
    if (ok) check(true, "%-44s n=%-8zu max_abs=%.3e max_rel=%.3e budget_used=%5.1f%%", name, n, max_abs, max_rel, 100 * worst);
    else check(false, "%-44s n=%-8zu max_abs=%.3e max_rel=%.3e budget_used=%5.1f%% bad=%zu first at %zu (got %.6g ref %.6g)",
               name, n, max_abs, max_rel, 100 * worst, bad, first_bad, (double)got[first_bad], (double)ref[first_bad]);
    return ok;
}

// Byte-exact comparison; on failure reports the first differing byte.
inline bool check_bytes(const char* name, const void* got, const void* ref, size_t nbytes) {
    const uint8_t *g = (const uint8_t*)got, *r = (const uint8_t*)ref;
    size_t diff = 0, first = (size_t)-1;
    for (size_t i = 0; i < nbytes; i++) if (g[i] != r[i]) { diff++; if (first == (size_t)-1) first = i; }
    if (diff == 0) return check(true, "%-44s %zu bytes identical", name, nbytes);
    return check(false, "%-44s %zu of %zu bytes differ, first at byte %zu (got %02x ref %02x)", name, diff, nbytes, first, g[first], r[first]);
}

// For hostile inputs: run f in a child; it must exit(1) with stderr containing every string of `want`.
inline void expect_error(const char* name, std::function<void()> f, std::vector<std::string> want) {
    int fd[2];
    if (pipe(fd) != 0) { check(false, "%s: pipe failed", name); return; }
    fflush(stdout);
    pid_t pid = fork();
    if (pid < 0) { check(false, "%s: fork failed", name); return; }
    if (pid == 0) { dup2(fd[1], 2); close(fd[0]); f(); exit(0); }
    close(fd[1]);
    std::string err; char buf[512]; ssize_t k;
    while ((k = read(fd[0], buf, sizeof buf)) > 0) err.append(buf, (size_t)k);
    close(fd[0]);
    int status = 0; waitpid(pid, &status, 0);
    bool clean = WIFEXITED(status) && WEXITSTATUS(status) == 1;
    std::string missing;
    for (auto& w : want) if (err.find(w) == std::string::npos) missing += " [" + w + "]";
    if (!err.empty() && err.back() == '\n') err.pop_back();
    check(clean && missing.empty(), "%-28s -> %s%s%s", name,
          WIFSIGNALED(status) ? "CRASHED (signal)" : clean ? "exit 1" : "did not fail",
          missing.empty() ? "" : ", message lacks", missing.c_str());
    printf("         %s\n", err.substr(0, 220).c_str());
}

inline int test_summary() {
    printf("%d passed, %d failed\n", g_pass, g_fail);
    return g_fail ? 1 : 0;
}
// For GPU tests on a machine without a GPU: say so, count nothing, exit 0.
inline int test_skip(const char* binary, const char* why) {
    printf("SKIPPED %s: %s\n", binary, why);
    printf("0 passed, 0 failed\n");
    return 0;
}
