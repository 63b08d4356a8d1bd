// test_dist.cpp: the host side of data parallelism (dist.h), on the CPU:
//   - the launcher's environment: rank, world size and local rank from mpirun (Open MPI, MPICH),
//     torchrun and srun, which wins when several are set, and clear errors for bad values;
//   - --dist-init strings, good and bad, and the choice made without one;
//   - the rendezvous, file and TCP, between 2-4 forked processes: every rank gets rank 0's 128-byte
//     id, whoever starts first; a file left by a crashed run is never taken for the current one;
//   - a peer that never comes: every rank that did come exits 1 within the timeout, naming what is
//     missing (not a hang); a world-size mismatch, a taken port, a missing directory;
//   - each rank's slice of the data (dataloader.h): rank r of W with B rows gets exactly rows
//     r·B .. r·B + B-1 of what one loader with W·B rows packs, across epochs, and the same position.
#include "../dist.h"        // defines: dist_env, dist_init_parse, dist_init_resolve, rendezvous_file, rendezvous_tcp
#include "../dataloader.h"  // defines: Loader, Batch, token_file_write
#include "test.h"      // defines: check, expect_error, test_summary
#include <map>         // defines: std::map (a fake environment)

static const std::string TMP_DIR = "build/tmp_dist";

static EnvLookup env_of(std::map<std::string, std::string> m) {
    auto p = std::make_shared<std::map<std::string, std::string>>(std::move(m));
    return [p](const char* k) -> const char* { auto it = p->find(k); return it == p->end() ? nullptr : it->second.c_str(); };
}
static std::string env_text(const DistEnv& e) {
    return "rank " + std::to_string(e.rank) + " of " + std::to_string(e.world) + ", local " + std::to_string(e.local_rank) + " (" + e.from + ")";
}

// One forked process per rank: after delay_ms[rank], f(rank, id); the child's id comes back through a
// pipe, its stderr through another. A child that does not finish within 20 s is killed (a hang fails).
struct RankRun { bool exited0 = false; int status = 0; std::string err; DistId id{}; double seconds = 0; };
static std::vector<RankRun> run_ranks(int n, std::function<void(int, DistId&)> f, std::vector<int> delay_ms = {}) {
    std::vector<RankRun> out(n);
    std::vector<pid_t> pid(n);
    std::vector<int> idfd(n), errfd(n);
    auto t0 = std::chrono::steady_clock::now();
    fflush(stdout);
    for (int r = 0; r < n; r++) {
        int a[2], b[2];
        ql_assert(pipe(a) == 0 && pipe(b) == 0, "pipe");
        pid[r] = fork();
        ql_assert(pid[r] >= 0, "fork");
        if (pid[r] == 0) {
            dup2(b[1], 2);
            close(a[0]); close(b[0]);
            alarm(20);
            if (r < (int)delay_ms.size()) usleep(delay_ms[r] * 1000);
            DistId id{};
            if (r == 0) for (size_t i = 0; i < id.size(); i++) id[i] = (uint8_t)(i * 7 + 3);   // rank 0's id; the others start with zeros
            f(r, id);
            ssize_t k = write(a[1], id.data(), id.size());
            _exit(k == (ssize_t)id.size() ? 0 : 3);
        }
        close(a[1]); close(b[1]);
        idfd[r] = a[0]; errfd[r] = b[0];
    }
    for (int r = 0; r < n; r++) {
        char buf[512];
        ssize_t k;
        while ((k = read(errfd[r], buf, sizeof buf)) > 0) out[r].err.append(buf, (size_t)k);
        size_t got = 0;
        while (got < out[r].id.size() && (k = read(idfd[r], out[r].id.data() + got, out[r].id.size() - got)) > 0) got += (size_t)k;
        close(idfd[r]); close(errfd[r]);
        waitpid(pid[r], &out[r].status, 0);
        out[r].exited0 = WIFEXITED(out[r].status) && WEXITSTATUS(out[r].status) == 0 && got == out[r].id.size();
        out[r].seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        if (!out[r].err.empty() && out[r].err.back() == '\n') out[r].err.pop_back();
    }
    return out;
}
static bool all_have_rank0_id(const std::vector<RankRun>& runs) {
    for (const RankRun& x : runs) if (!x.exited0 || x.id != runs[0].id || x.id[1] != 10) return false;
    return true;
}
static std::string first_error(const std::vector<RankRun>& runs) {
    for (size_t r = 0; r < runs.size(); r++) if (!runs[r].exited0) return "rank " + std::to_string(r) + ": " + (runs[r].err.empty() ? "(no message)" : runs[r].err);
    return "";
}
static bool exit1_saying(const RankRun& x, const std::string& want) {
    return WIFEXITED(x.status) && WEXITSTATUS(x.status) == 1 && x.err.find(want) != std::string::npos;
}
static int free_port() {
    int s = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a = {};
    a.sin_family = AF_INET; a.sin_addr.s_addr = htonl(INADDR_LOOPBACK); a.sin_port = 0;
    socklen_t len = sizeof a;
    ql_assert(s >= 0 && bind(s, (sockaddr*)&a, sizeof a) == 0 && getsockname(s, (sockaddr*)&a, &len) == 0, "free port");
    close(s);
    return ntohs(a.sin_port);
}
static bool file_exists_now(const std::string& p) { struct stat sb; return stat(p.c_str(), &sb) == 0; }

int main() {
    ql_assert(system(("rm -rf " + TMP_DIR + " && mkdir -p " + TMP_DIR).c_str()) == 0, "mkdir %s", TMP_DIR.c_str());

    printf("the launcher's environment\n");
    struct EnvCase { const char* name; std::map<std::string, std::string> env; int rank, world, local; };
    std::vector<EnvCase> cases = {
        {"no launcher: one process", {}, 0, 1, -1},
        {"mpirun (Open MPI)", {{"OMPI_COMM_WORLD_RANK", "3"}, {"OMPI_COMM_WORLD_SIZE", "8"}, {"OMPI_COMM_WORLD_LOCAL_RANK", "3"}}, 3, 8, 3},
        {"mpirun (MPICH / Intel MPI)", {{"PMI_RANK", "9"}, {"PMI_SIZE", "16"}, {"MPI_LOCALRANKID", "1"}}, 9, 16, 1},
        {"torchrun", {{"RANK", "5"}, {"WORLD_SIZE", "16"}, {"LOCAL_RANK", "1"}, {"MASTER_ADDR", "n0"}, {"MASTER_PORT", "29500"}}, 5, 16, 1},
        {"srun", {{"SLURM_PROCID", "6"}, {"SLURM_STEP_NUM_TASKS", "8"}, {"SLURM_NTASKS", "8"}, {"SLURM_LOCALID", "2"}}, 6, 8, 2},
        {"a Slurm batch script, no srun: one process", {{"SLURM_PROCID", "0"}, {"SLURM_NTASKS", "8"}, {"SLURM_LOCALID", "0"}}, 0, 1, -1},
        {"mpirun inside a Slurm job: mpirun's",
         {{"OMPI_COMM_WORLD_RANK", "7"}, {"OMPI_COMM_WORLD_SIZE", "16"}, {"OMPI_COMM_WORLD_LOCAL_RANK", "7"},
          {"SLURM_PROCID", "0"}, {"SLURM_STEP_NUM_TASKS", "2"}, {"SLURM_LOCALID", "0"}}, 7, 16, 7},
        {"torchrun started by srun: torchrun's",
         {{"RANK", "12"}, {"WORLD_SIZE", "16"}, {"LOCAL_RANK", "4"}, {"SLURM_PROCID", "1"}, {"SLURM_STEP_NUM_TASKS", "2"}, {"SLURM_LOCALID", "0"}}, 12, 16, 4},
        {"srun --mpi=pmi2: PMI rank, Slurm local rank", {{"PMI_RANK", "3"}, {"PMI_SIZE", "4"}, {"SLURM_PROCID", "3"}, {"SLURM_STEP_NUM_TASKS", "4"}, {"SLURM_LOCALID", "1"}}, 3, 4, 1},
        {"no local rank anywhere: -1 (rank % GPUs)", {{"RANK", "2"}, {"WORLD_SIZE", "4"}}, 2, 4, -1},
    };
    for (const EnvCase& c : cases) {
        DistEnv e = dist_env(env_of(c.env));
        check(e.rank == c.rank && e.world == c.world && e.local_rank == c.local, "%-46s -> %s", c.name, env_text(e).c_str());
    }
    auto bad_env = [](const char* name, std::map<std::string, std::string> env, std::vector<std::string> want) {
        expect_error(name, [env] { dist_env(env_of(env)); }, want);
    };
    bad_env("rank >= world size", {{"RANK", "4"}, {"WORLD_SIZE", "4"}}, {"RANK=4", "[0, 4)"});
    bad_env("rank not a number", {{"RANK", "x"}, {"WORLD_SIZE", "4"}}, {"RANK=x"});
    bad_env("world size 0", {{"RANK", "0"}, {"WORLD_SIZE", "0"}}, {"WORLD_SIZE=0"});
    bad_env("rank without world size", {{"OMPI_COMM_WORLD_RANK", "1"}}, {"OMPI_COMM_WORLD_RANK is set but OMPI_COMM_WORLD_SIZE is not"});
    bad_env("negative local rank", {{"RANK", "0"}, {"WORLD_SIZE", "2"}, {"LOCAL_RANK", "-1"}}, {"LOCAL_RANK=-1"});
    bad_env("world size 1e3", {{"RANK", "0"}, {"WORLD_SIZE", "1e3"}}, {"WORLD_SIZE=1e3"});

    printf("--dist-init\n");
    struct InitCase { const char* s; DistInitKind kind; const char *path, *host; int port; };
    for (const InitCase& c : std::vector<InitCase>{{"", DIST_AUTO, "", "", 0},
                                                   {"file:/shared/run1/rdzv", DIST_FILE, "/shared/run1/rdzv", "", 0},
                                                   {"file:rel:with:colons", DIST_FILE, "rel:with:colons", "", 0},
                                                   {"tcp:node17:29500", DIST_TCP, "", "node17", 29500},
                                                   {"tcp:10.0.0.1:1", DIST_TCP, "", "10.0.0.1", 1},
                                                   {"tcp:[::1]:65535", DIST_TCP, "", "::1", 65535},
                                                   {"mpi", DIST_MPI, "", "", 0}}) {
        DistInit d = dist_init_parse(c.s);
        check(d.kind == c.kind && d.path == c.path && d.host == c.host && d.port == c.port, "--dist-init \"%s\" -> %s", c.s, d.text().c_str());
    }
    for (const char* s : {"file:", "tcp:node17", "tcp:node17:0", "tcp:node17:65536", "tcp::29500", "tcp:node17:29x", "tcp:[]:5", "udp:node17:5", "file",
                          "MPI", "tcp:node17:-1"})
        expect_error((std::string("--dist-init ") + s).c_str(), [s] { dist_init_parse(s); }, {"--dist-init", "file:PATH"});
    {
        DistEnv torch = dist_env(env_of({{"RANK", "1"}, {"WORLD_SIZE", "2"}}));
        DistInit d = dist_init_resolve(DistInit(), torch, false, env_of({{"MASTER_ADDR", "n0"}, {"MASTER_PORT", "29500"}}));
        check(d.kind == DIST_TCP && d.host == "n0" && d.port == 29501, "no --dist-init under torchrun: MASTER_ADDR, MASTER_PORT + 1 -> %s", d.text().c_str());
        DistEnv ompi = dist_env(env_of({{"OMPI_COMM_WORLD_RANK", "1"}, {"OMPI_COMM_WORLD_SIZE", "2"}}));
        d = dist_init_resolve(DistInit(), ompi, true, env_of({}));
        check(d.kind == DIST_MPI, "no --dist-init under mpirun, built with MPI: mpi");
        d = dist_init_resolve(dist_init_parse("file:/x"), ompi, true, env_of({}));
        check(d.kind == DIST_FILE && d.path == "/x", "an explicit --dist-init is kept: %s", d.text().c_str());
        expect_error("no --dist-init, no MPI, no torchrun", [ompi] { dist_init_resolve(DistInit(), ompi, false, env_of({})); },
                     {"rank 1 of 2", "OMPI_COMM_WORLD_RANK", "--dist-init file:PATH", "built without MPI"});
        DistEnv srun = dist_env(env_of({{"SLURM_PROCID", "0"}, {"SLURM_STEP_NUM_TASKS", "4"}}));
        expect_error("no --dist-init under srun", [srun] { dist_init_resolve(DistInit(), srun, true, env_of({})); }, {"SLURM_PROCID", "tcp:HOST:PORT"});
    }

    printf("file rendezvous (forked processes)\n");
    int n_case = 0;
    auto file_case = [&](const char* name, int world, std::vector<int> delays, std::function<void(const std::string&)> before = nullptr) {
        std::string path = TMP_DIR + "/rdzv" + std::to_string(n_case++);
        if (before) before(path);
        std::vector<RankRun> runs = run_ranks(world, [&](int r, DistId& id) { rendezvous_file(id, path, r, world, 10.0); }, delays);
        bool clean = !file_exists_now(path);
        for (int r = 1; r < world; r++) clean = clean && !file_exists_now(dist_ack_path(path, r));
        check(all_have_rank0_id(runs) && clean, "file, %d ranks, %s: every rank has rank 0's id; the files are gone %s", world, name,
              first_error(runs).c_str());
    };
    file_case("rank 0 first", 2, {0, 100});
    file_case("rank 0 last", 3, {300, 0, 50});
    file_case("all at once", 4, {});
    auto stale = [](uint32_t world, uint64_t nonce) {
        return [world, nonce](const std::string& path) {
            DistFileRecord rec = {};
            memcpy(rec.magic, DIST_FILE_MAGIC, 8);
            rec.world = world; rec.id_bytes = DIST_ID_BYTES; rec.nonce = nonce;
            memset(rec.id, 0xee, DIST_ID_BYTES);
            atomic_write(path, {{&rec, sizeof rec}});
        };
    };
    file_case("a crashed run's file read first, rank 0 late", 3, {400, 0, 0}, stale(3, 12345));
    file_case("a crashed run's file for another world size", 2, {300, 0}, stale(5, 777));

    printf("tcp rendezvous (forked processes)\n");
    auto tcp_case = [&](const char* name, const char* host, int world, std::vector<int> delays) {
        int port = free_port();
        std::vector<RankRun> runs = run_ranks(world, [&](int r, DistId& id) { rendezvous_tcp(id, host, port, r, world, 10.0); }, delays);
        check(all_have_rank0_id(runs), "tcp:%s, %d ranks, %s: every rank has rank 0's id %s", host, world, name, first_error(runs).c_str());
    };
    tcp_case("rank 0 first", "127.0.0.1", 2, {0, 100});
    tcp_case("rank 0 last (the others retry)", "localhost", 3, {300, 0, 0});
    tcp_case("all at once", "127.0.0.1", 4, {});

    printf("a peer that never comes, and other failures\n");
    {
        std::string path = TMP_DIR + "/rdzv_missing";
        std::vector<RankRun> runs = run_ranks(2, [&](int r, DistId& id) { rendezvous_file(id, path, r, 3, 0.5); });
        check(exit1_saying(runs[0], "rank 2 did not arrive") && runs[0].seconds < 5,
              "file, world 3, rank 2 never comes: rank 0 exits 1 after the timeout (%.1f s)", runs[0].seconds);
        printf("         %s\n", runs[0].err.c_str());
        check((exit1_saying(runs[1], "rank 0 gave up") || exit1_saying(runs[1], "rank 0 is still waiting")) && runs[1].seconds < 5,
              "... and rank 1 exits 1 (%.1f s), whichever of the two sees the timeout first", runs[1].seconds);
        printf("         %s\n", runs[1].err.c_str());
        runs = run_ranks(2, [&](int r, DistId& id) { rendezvous_file(id, path, r, 3, r == 0 ? 0.5 : 5.0); });
        check(exit1_saying(runs[1], "rank 0 gave up") && runs[1].seconds < 3, "... rank 1 (timeout 5 s) exits 1 as soon as rank 0 gives up (%.1f s)",
              runs[1].seconds);
        printf("         %s\n", runs[1].err.c_str());
        runs = run_ranks(1, [&](int, DistId& id) { rendezvous_file(id, path + "_none", 1, 2, 0.5); });
        check(exit1_saying(runs[0], "rank 0 has not written it"), "file, rank 0 never comes: rank 1 exits 1 (%.1f s)", runs[0].seconds);
        printf("         %s\n", runs[0].err.c_str());
        runs = run_ranks(1, [&](int, DistId& id) { rendezvous_file(id, TMP_DIR + "/no/such/dir/rdzv", 0, 2, 0.5); });
        check(exit1_saying(runs[0], "cannot create"), "file, a directory that does not exist: exit 1");
        printf("         %s\n", runs[0].err.c_str());
    }
    {
        int port = free_port();
        std::vector<RankRun> runs = run_ranks(2, [&](int r, DistId& id) { rendezvous_tcp(id, "127.0.0.1", port, r, 3, r == 0 ? 0.5 : 5.0); });
        check(exit1_saying(runs[0], "rank 2 did not connect") && runs[0].seconds < 5, "tcp, world 3, rank 2 never comes: rank 0 exits 1 (%.1f s)",
              runs[0].seconds);
        printf("         %s\n", runs[0].err.c_str());
        check(exit1_saying(runs[1], "rank 0 failed") && runs[1].seconds < 3,
              "... and rank 1 (timeout 5 s) exits 1 as soon as rank 0 gives up (%.1f s)", runs[1].seconds);
        printf("         %s\n", runs[1].err.c_str());
        runs = run_ranks(1, [&](int, DistId& id) { rendezvous_tcp(id, "127.0.0.1", port, 1, 2, 0.5); });
        check(exit1_saying(runs[0], "cannot reach rank 0 at tcp:127.0.0.1"), "tcp, rank 0 never comes: rank 1 exits 1 (%.1f s)", runs[0].seconds);
        printf("         %s\n", runs[0].err.c_str());
        runs = run_ranks(2, [&](int r, DistId& id) { rendezvous_tcp(id, "127.0.0.1", port, r, r == 0 ? 2 : 3, 5.0); });
        check(exit1_saying(runs[0], "says the world has 3 ranks") && exit1_saying(runs[1], "rank 0 failed"),
              "tcp, world sizes 2 and 3: both exit 1, rank 0 naming the mismatch");
        printf("         %s\n", runs[0].err.c_str());
        int s = socket(AF_INET, SOCK_STREAM, 0), one = 1;
        setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        sockaddr_in a = {};
        a.sin_family = AF_INET; a.sin_addr.s_addr = htonl(INADDR_ANY); a.sin_port = htons((uint16_t)port);
        ql_assert(bind(s, (sockaddr*)&a, sizeof a) == 0 && listen(s, 4) == 0, "listen");
        runs = run_ranks(1, [&](int, DistId& id) { rendezvous_tcp(id, "127.0.0.1", port, 0, 2, 0.5); });
        check(exit1_saying(runs[0], "cannot listen on port"), "tcp, the port is taken: rank 0 exits 1 at once (%.1f s)", runs[0].seconds);
        printf("         %s\n", runs[0].err.c_str());
        close(s);
    }
    {   // one rank, as the world-size-1 GPU test runs it: nothing to wait for
        std::vector<RankRun> runs = run_ranks(1, [&](int, DistId& id) { rendezvous_file(id, TMP_DIR + "/rdzv_one", 0, 1, 1.0); });
        DistId want;
        for (size_t i = 0; i < want.size(); i++) want[i] = (uint8_t)(i * 7 + 3);
        check(runs[0].exited0 && runs[0].id == want && !file_exists_now(TMP_DIR + "/rdzv_one"), "file, world 1: returns at once, no file left");
        int port = free_port();
        runs = run_ranks(1, [&](int, DistId& id) { rendezvous_tcp(id, "127.0.0.1", port, 0, 1, 1.0); });
        check(runs[0].exited0 && runs[0].id == want, "tcp, world 1: returns at once");
    }

    printf("each rank's slice of the data\n");
    {   // 30 documents of 0..40 tokens (about 5 rows of 64 per epoch: the batches below cross several epochs)
        std::vector<uint32_t> tok; std::vector<uint8_t> mask; std::vector<uint64_t> starts;
        for (int d = 0; d < 30; d++) {
            starts.push_back(tok.size());
            for (int i = 0, n = (int)(rng_u32(3, 1, d) % 41); i < n; i++) { tok.push_back(rng_u32(3, 2, tok.size()) % 100); mask.push_back(rng_u32(3, 3, tok.size()) % 3 != 0); }
        }
        token_file_write(TMP_DIR + "/slice.tok", tok, &mask, starts, 100);
        TokenFile f; token_file_open(f, TMP_DIR + "/slice.tok", 100);
        for (int W : {2, 3}) {
            const int B = 2, T = 64, steps = 12;
            Loader one; one.init(&f, 9, true);
            std::vector<Loader> ranks(W);
            for (int r = 0; r < W; r++) { ranks[r].rank = r; ranks[r].world = W; ranks[r].init(&f, 9, true); }
            bool same = true, same_pos = true;
            for (int s = 0; s < steps; s++) {
                Batch all; one.next(all, W * B, T);
                for (int r = 0; r < W; r++) {
                    Batch mine; ranks[r].next(mine, B, T);
                    auto rows = [&](const std::vector<int>& v) { return std::vector<int>(v.begin() + (size_t)r * B * T, v.begin() + (size_t)(r + 1) * B * T); };
                    same = same && mine.B == B && mine.ids == rows(all.ids) && mine.targets == rows(all.targets) && mine.pos == rows(all.pos) &&
                           mine.doc_start == rows(all.doc_start);
                    same_pos = same_pos && ranks[r].st.epoch == one.st.epoch && ranks[r].st.cursor == one.st.cursor && ranks[r].st.offset == one.st.offset;
                }
            }
            check(same && same_pos, "%d ranks x %d rows == one loader x %d rows, row for row, %d batches (to epoch %llu); the same position on every rank", W, B,
                  W * B, steps, (unsigned long long)one.st.epoch);
        }
    }
    return test_summary();
}
