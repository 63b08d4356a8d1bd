// dist.h: data parallelism over NCCL, one process per GPU, started by mpirun, srun or torchrun.
// Every rank holds the whole NF4 model and its own copy of the LoRA adapter; each step every rank
// trains on its own rows of the batch, the LoRA gradients are summed over the ranks (fp32: LoRA is
// small), and every rank clips and steps AdamW on the same sums, so the adapters stay bit-identical
// without ever being sent.
//   1. the launcher's environment: rank, world size, local rank
//   2. --dist-init: how rank 0's NCCL id reaches the others (file:PATH, tcp:HOST:PORT, mpi)
//   3. the rendezvous that carries it (host code; test/test_dist.cpp runs it between forked processes)
//   4. Dist, the communicator (nvcc only): init, all-reduce, every wait under a deadline, abort
// Built without NCCL (the Makefile says NCCL ✗ and defines QLORA_NO_NCCL), section 4 is a world of
// one: the same API, and an error naming the fix if a launcher asks for more.
#pragma once
#include "formats.h"      // defines: ql_fail, ql_assert, atomic_write, mix64
#include <array>          // defines: std::array (the id)
#include <chrono>         // defines: steady_clock (deadlines)
#include <functional>     // defines: std::function (environment lookup)
#include <random>         // defines: std::random_device (the file rendezvous' nonce)
#include <errno.h>        // defines: errno, EINTR, EINPROGRESS
#include <stdarg.h>       // defines: va_list (Dist::fail)
#include <fcntl.h>        // defines: open, fcntl, O_NONBLOCK
#include <unistd.h>       // defines: read, close, usleep, _exit
#include <poll.h>         // defines: poll
#include <netdb.h>        // defines: getaddrinfo
#include <netinet/in.h>   // defines: sockaddr_in6, in6addr_any
#include <sys/socket.h>   // defines: socket, bind, listen, accept, connect, send, recv

// ---------------------------------------------------------------------------------------------
// 1. the launcher's environment

struct DistEnv {
    int rank = 0, world = 1;
    int local_rank = -1;   // the GPU index on this node; -1: the launcher did not say (then rank % GPUs)
    std::string from;      // the variables that said so, for messages ("": no launcher, one process)
};
typedef std::function<const char*(const char*)> EnvLookup;
inline const char* env_get(const char* k) { return getenv(k); }

// The first launcher whose variables are set wins: mpirun inside a Slurm allocation sets both its
// own and Slurm's, and its own describe the processes. Slurm's world size is the step's task count,
// which srun sets: a batch script that runs qlora itself has SLURM_PROCID and SLURM_NTASKS (of the
// whole allocation) but is one process.
struct LauncherVars {
    const char *rank, *world, *local;
    bool rank_alone_ok;   // the rank without the world size: not started by this launcher
};
static const LauncherVars LAUNCHERS[] = {
    {"OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", false},   // Open MPI's mpirun
    {"PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", false},                                       // MPICH, Intel MPI
    {"RANK", "WORLD_SIZE", "LOCAL_RANK", false},                                              // torchrun
    {"SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID", true},                          // srun (not a batch script)
};

inline bool parse_int_in(const char* s, long lo, long hi, int* out) {
    char* end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (!*s || *end || errno || v < lo || v > hi) return false;
    *out = (int)v;
    return true;
}

inline DistEnv dist_env(const EnvLookup& get = env_get) {
    DistEnv e;
    for (const LauncherVars& l : LAUNCHERS) {
        const char *r = get(l.rank), *w = get(l.world);
        if (!w && (!r || l.rank_alone_ok)) continue;
        ql_assert(r && w, "%s is set but %s is not: start qlora with mpirun, srun or torchrun, or unset %s", r ? l.rank : l.world,
                  r ? l.world : l.rank, r ? l.rank : l.world);
        ql_assert(parse_int_in(w, 1, 1 << 20, &e.world), "%s=%s: expected a world size of 1 or more", l.world, w);
        ql_assert(parse_int_in(r, 0, e.world - 1, &e.rank), "%s=%s: expected a rank in [0, %d) (%s=%d)", l.rank, r, e.world, l.world, e.world);
        e.from = std::string(l.rank) + "/" + l.world;
        const char* local_name = l.local;   // the launcher's own, else any launcher's (srun --mpi=pmi2 sets PMI_RANK, not MPI_LOCALRANKID)
        for (const LauncherVars& o : LAUNCHERS)
            if (!get(local_name) && get(o.local)) local_name = o.local;
        if (const char* lr = get(local_name))
            ql_assert(parse_int_in(lr, 0, 1 << 20, &e.local_rank), "%s=%s: expected a local rank of 0 or more", local_name, lr);
        return e;
    }
    return e;
}

// ---------------------------------------------------------------------------------------------
// 2. --dist-init

enum DistInitKind { DIST_AUTO, DIST_FILE, DIST_TCP, DIST_MPI };
struct DistInit {
    DistInitKind kind = DIST_AUTO;
    std::string path;       // DIST_FILE: a path every rank sees (a shared filesystem across nodes)
    std::string host;       // DIST_TCP: where rank 0 runs; it listens on port, on every interface
    int port = 0;
    std::string text() const {
        return kind == DIST_FILE ? "file:" + path : kind == DIST_TCP ? "tcp:" + host + ":" + std::to_string(port) : kind == DIST_MPI ? "mpi" : "auto";
    }
};
static const char* DIST_INIT_HELP = "--dist-init file:PATH (a path every rank sees) or tcp:HOST:PORT (HOST: where rank 0 runs) or mpi";

inline DistInit dist_init_parse(const std::string& s) {
    DistInit d;
    if (s.empty()) return d;
    if (s == "mpi") {
        d.kind = DIST_MPI;
        return d;
    }
    if (s.rfind("file:", 0) == 0) {
        d.kind = DIST_FILE;
        d.path = s.substr(5);
        ql_assert(!d.path.empty(), "--dist-init %s: no path; %s", s.c_str(), DIST_INIT_HELP);
        return d;
    }
    if (s.rfind("tcp:", 0) == 0) {
        d.kind = DIST_TCP;
        std::string hp = s.substr(4);
        size_t colon = hp.rfind(':');
        ql_assert(colon != std::string::npos, "--dist-init %s: no port; %s", s.c_str(), DIST_INIT_HELP);
        d.host = hp.substr(0, colon);
        if (d.host.size() >= 2 && d.host.front() == '[' && d.host.back() == ']') d.host = d.host.substr(1, d.host.size() - 2);   // [::1]
        ql_assert(!d.host.empty(), "--dist-init %s: no host; %s", s.c_str(), DIST_INIT_HELP);
        ql_assert(parse_int_in(hp.c_str() + colon + 1, 1, 65535, &d.port), "--dist-init %s: the port must be a number in [1, 65535]; %s", s.c_str(),
                  DIST_INIT_HELP);
        return d;
    }
    ql_fail("--dist-init %s: not understood; %s", s.c_str(), DIST_INIT_HELP);
}

// No --dist-init: MPI where qlora was built with it and an MPI launcher started it; under torchrun,
// TCP on MASTER_ADDR at MASTER_PORT + 1 (torchrun's own store holds MASTER_PORT); else the user must say.
inline DistInit dist_init_resolve(DistInit d, const DistEnv& e, bool have_mpi, const EnvLookup& get = env_get) {
    if (d.kind != DIST_AUTO) return d;
    bool mpi_launch = e.from.rfind("OMPI_", 0) == 0 || e.from.rfind("PMI_", 0) == 0;
    if (have_mpi && mpi_launch) {
        d.kind = DIST_MPI;
        return d;
    }
    const char *addr = get("MASTER_ADDR"), *port = get("MASTER_PORT");
    int p;
    if (addr && *addr && port && parse_int_in(port, 1, 65534, &p)) {
        d.kind = DIST_TCP;
        d.host = addr;
        d.port = p + 1;
        return d;
    }
    ql_fail("rank %d of %d (%s): no way to pass the NCCL id between the ranks: give %s%s", e.rank, e.world, e.from.c_str(),
            DIST_INIT_HELP, have_mpi ? "" : " (this qlora was built without MPI)");
}

// ---------------------------------------------------------------------------------------------
// 3. the rendezvous: rank 0's 128-byte NCCL id to every rank. It is also a barrier (every rank has
// arrived when it returns), and it fails, naming who is missing, after timeout_s.

static const size_t DIST_ID_BYTES = 128;   // sizeof(ncclUniqueId), static_assert'ed in section 4
typedef std::array<uint8_t, DIST_ID_BYTES> DistId;

struct Deadline {
    std::chrono::steady_clock::time_point end;
    explicit Deadline(double s)
        : end(std::chrono::steady_clock::now() + std::chrono::duration_cast<std::chrono::steady_clock::duration>(std::chrono::duration<double>(s))) {}
    double left() const { return std::chrono::duration<double>(end - std::chrono::steady_clock::now()).count(); }
    bool passed() const { return left() <= 0; }
    int left_ms() const { double l = left(); return l <= 0 ? 0 : l > 1e6 ? 1000000000 : (int)(l * 1000) + 1; }
};
// polling a shared filesystem: 1 ms, doubling to 100 ms (hundreds of ranks must not flood an NFS server)
struct Backoff {
    int us = 1000;
    void nap() { usleep(us); us = std::min(us * 2, 100000); }
};
inline std::string dist_rank_list(const std::vector<int>& ranks) {
    std::string s;
    for (size_t i = 0; i < ranks.size() && i < 12; i++) s += (i ? ", " : "") + std::to_string(ranks[i]);
    return ranks.size() > 12 ? s + ", ... (" + std::to_string(ranks.size()) + " in all)" : s;
}

// 3a. file:PATH. Rank 0 writes PATH (magic, world size, a fresh nonce, the id) by rename, so a reader
// sees all of it or nothing; every other rank reads it and answers with PATH.ack.RANK holding the
// nonce; when every answer carries its nonce, rank 0 deletes PATH and the answers, which tells the
// others that all have arrived (if it gives up instead, it rewrites PATH with world size 0, which
// tells them to give up too). A PATH left by a run that crashed may be read first: rank 0 replaces
// it with a new nonce, and a rank that sees a new nonce answers again, so no rank leaves with a
// stale id.
static const char DIST_FILE_MAGIC[8] = {'Q', 'L', 'R', 'D', 'Z', 'V', '0', '1'}, DIST_ACK_MAGIC[8] = {'Q', 'L', 'R', 'D', 'Z', 'A', 'C', 'K'};
struct DistFileRecord {   // PATH: 152 bytes
    char magic[8];
    uint32_t world, id_bytes;   // world 0: rank 0 gave up
    uint64_t nonce;
    uint8_t id[DIST_ID_BYTES];
};
struct DistAckRecord {    // PATH.ack.RANK: 24 bytes
    char magic[8];
    uint64_t nonce;
    uint32_t rank, zero;
};
// 1: read sizeof(T) bytes into *x; 0: no such file; -1: a file of another size
template <class T>
inline int dist_read_record(const std::string& path, T* x) {
    int fd = open(path.c_str(), O_RDONLY);
    if (fd < 0) return errno == ENOENT ? 0 : -1;
    uint8_t buf[sizeof(T) + 1];
    ssize_t n = 0, k;
    while ((k = read(fd, buf + n, sizeof buf - n)) > 0) n += k;
    close(fd);
    if (n != (ssize_t)sizeof(T)) return -1;
    memcpy(x, buf, sizeof(T));
    return 1;
}
inline std::string dist_ack_path(const std::string& path, int r) { return path + ".ack." + std::to_string(r); }

inline void rendezvous_file(DistId& id, const std::string& path, int rank, int world, double timeout_s) {
    Deadline dl(timeout_s);
    Backoff wait;
    if (rank == 0) {
        DistFileRecord rec = {};
        memcpy(rec.magic, DIST_FILE_MAGIC, 8);
        rec.world = (uint32_t)world;
        rec.id_bytes = DIST_ID_BYTES;
        rec.nonce = ((uint64_t)std::random_device()() << 32 ^ std::random_device()()) ^ mix64((uint64_t)getpid());
        memcpy(rec.id, id.data(), DIST_ID_BYTES);
        atomic_write(path, {{&rec, sizeof rec}});
        std::vector<int> missing;
        for (int r = 1; r < world; r++) missing.push_back(r);
        while (!missing.empty()) {
            std::vector<int> still;
            for (int r : missing) {
                DistAckRecord ack;
                if (!(dist_read_record(dist_ack_path(path, r), &ack) == 1 && !memcmp(ack.magic, DIST_ACK_MAGIC, 8) && ack.nonce == rec.nonce)) still.push_back(r);
            }
            missing.swap(still);
            if (missing.empty()) break;
            if (dl.passed()) {
                rec.world = 0;
                atomic_write(path, {{&rec, sizeof rec}});
                for (int r = 1; r < world; r++) remove(dist_ack_path(path, r).c_str());
                ql_fail("rank 0 of %d: rank%s %s did not arrive at file:%s within %g s (not started? died? is %s on a filesystem every node "
                        "sees?); --dist-timeout S waits longer",
                        world, missing.size() > 1 ? "s" : "", dist_rank_list(missing).c_str(), path.c_str(), timeout_s, path.c_str());
            }
            wait.nap();
        }
        remove(path.c_str());
        for (int r = 1; r < world; r++) remove(dist_ack_path(path, r).c_str());
        return;
    }
    uint64_t answered = 0;   // the nonce this rank has answered (0: none yet)
    std::string problem = "rank 0 has not written it";
    for (;;) {
        DistFileRecord rec;
        int got = dist_read_record(path, &rec);
        if (got == 0 && answered) return;   // rank 0 deleted it: every rank has its id
        bool ours = got == 1 && !memcmp(rec.magic, DIST_FILE_MAGIC, 8) && rec.id_bytes == DIST_ID_BYTES;
        if (ours && rec.world == 0) {
            ql_assert(rec.nonce != answered, "rank %d of %d: rank 0 gave up waiting for the other ranks at file:%s (see its message)", rank, world,
                      path.c_str());
            problem = "it was left by a run that failed";
        } else if (ours && rec.nonce != answered) {
            if ((int)rec.world == world) {
                memcpy(id.data(), rec.id, DIST_ID_BYTES);
                DistAckRecord ack = {};
                memcpy(ack.magic, DIST_ACK_MAGIC, 8);
                ack.nonce = rec.nonce;
                ack.rank = (uint32_t)rank;
                atomic_write(dist_ack_path(path, rank), {{&ack, sizeof ack}});
                answered = rec.nonce;
                problem = "answered; rank 0 is still waiting for other ranks";
            } else
                problem = "it is for a world of " + std::to_string(rec.world) + " ranks, this rank's is " + std::to_string(world) +
                          " (left by another run? delete it)";
        } else if (got != 0 && !answered)
            problem = "it is not a qlora rendezvous file";
        if (dl.passed())
            ql_fail("rank %d of %d: no NCCL id from rank 0 through file:%s within %g s: %s; --dist-timeout S waits longer", rank, world,
                    path.c_str(), timeout_s, problem.c_str());
        wait.nap();
    }
}

// 3b. tcp:HOST:PORT. Rank 0 listens on PORT; every other rank connects (again and again until rank
// 0 is up) and says hello (its rank and world size); when all world - 1 have, rank 0 sends each the
// id and closes. A rank that gives up closes its socket, which the others see at once.
static const char DIST_HELLO_MAGIC[4] = {'Q', 'L', 'D', 'H'}, DIST_ID_MAGIC[4] = {'Q', 'L', 'D', 'I'};
struct DistHello { char magic[4]; uint32_t rank, world, zero; };
struct DistIdMessage { char magic[4]; uint32_t zero; uint8_t id[DIST_ID_BYTES]; };

inline bool dist_recv_all(int fd, void* p, size_t n, const Deadline& dl, std::string* why) {
    uint8_t* b = (uint8_t*)p;
    while (n) {
        pollfd pf = {fd, POLLIN, 0};
        int ms = dl.left_ms();
        if (ms <= 0) { *why = "no answer"; return false; }
        if (poll(&pf, 1, ms) <= 0) continue;   // EINTR or time: the deadline decides
        ssize_t k = recv(fd, b, n, 0);
        if (k == 0) { *why = "the connection was closed"; return false; }
        if (k < 0) {
            if (errno == EINTR || errno == EAGAIN) continue;
            *why = strerror(errno);
            return false;
        }
        b += k; n -= (size_t)k;
    }
    return true;
}
inline bool dist_send_all(int fd, const void* p, size_t n) {
    const uint8_t* b = (const uint8_t*)p;
    while (n) {
        ssize_t k = send(fd, b, n, MSG_NOSIGNAL);   // a closed peer: an error, not SIGPIPE
        if (k < 0 && errno == EINTR) continue;
        if (k <= 0) return false;
        b += k; n -= (size_t)k;
    }
    return true;
}
// IPv6 with IPv4 mapped in where the machine has IPv6, else IPv4; every interface
inline int dist_listen(int port, std::string* why) {
    for (int family : {AF_INET6, AF_INET}) {
        int s = socket(family, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (s < 0) { *why = strerror(errno); continue; }
        int one = 1, zero = 0;
        setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        sockaddr_storage a = {};
        socklen_t len;
        if (family == AF_INET6) {
            setsockopt(s, IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof zero);
            sockaddr_in6* a6 = (sockaddr_in6*)&a;
            a6->sin6_family = AF_INET6; a6->sin6_addr = in6addr_any; a6->sin6_port = htons((uint16_t)port);
            len = sizeof *a6;
        } else {
            sockaddr_in* a4 = (sockaddr_in*)&a;
            a4->sin_family = AF_INET; a4->sin_addr.s_addr = htonl(INADDR_ANY); a4->sin_port = htons((uint16_t)port);
            len = sizeof *a4;
        }
        if (bind(s, (sockaddr*)&a, len) == 0 && listen(s, SOMAXCONN) == 0) return s;
        int err = errno;
        *why = strerror(err);
        close(s);
        if (err == EADDRINUSE) return -1;   // taken: IPv4 would be too
    }
    return -1;
}
// one try at every address of host (each under 2 s at most); the connected socket, or -1 and *why
inline int dist_connect(const std::string& host, int port, const Deadline& dl, std::string* why) {
    addrinfo hints = {}, *res = nullptr;
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    int g = getaddrinfo(host.c_str(), std::to_string(port).c_str(), &hints, &res);
    if (g) { *why = "cannot resolve " + host + ": " + gai_strerror(g); return -1; }
    int fd = -1;
    for (addrinfo* ai = res; ai && fd < 0; ai = ai->ai_next) {
        int s = socket(ai->ai_family, ai->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, ai->ai_protocol);
        if (s < 0) { *why = strerror(errno); continue; }
        int err = connect(s, ai->ai_addr, ai->ai_addrlen) == 0 ? 0 : errno;
        if (err == EINPROGRESS) {   // no answer within 2 s: try again (a host that drops SYNs must not outlast the deadline)
            pollfd pf = {s, POLLOUT, 0};
            socklen_t len = sizeof err;
            err = poll(&pf, 1, std::min(dl.left_ms(), 2000)) == 1 && getsockopt(s, SOL_SOCKET, SO_ERROR, &err, &len) == 0 ? err : ETIMEDOUT;
        }
        if (err == 0 && fcntl(s, F_SETFL, fcntl(s, F_GETFL) & ~O_NONBLOCK) == 0) fd = s;
        else { *why = strerror(err); close(s); }
    }
    freeaddrinfo(res);
    return fd;
}

inline void rendezvous_tcp(DistId& id, const std::string& host, int port, int rank, int world, double timeout_s) {
    Deadline dl(timeout_s);
    std::string why;
    if (rank == 0) {
        int ls = dist_listen(port, &why);
        ql_assert(ls >= 0, "rank 0 of %d: cannot listen on port %d: %s; pick another port: --dist-init tcp:HOST:PORT", world, port, why.c_str());
        std::vector<int> conn(world, -1);
        auto fail = [&](const std::string& msg) {   // closing every socket tells the ranks that did arrive
            for (int c : conn) if (c >= 0) close(c);
            close(ls);
            ql_fail("rank 0 of %d (tcp:%s:%d): %s", world, host.c_str(), port, msg.c_str());
        };
        for (int arrived = 1; arrived < world;) {
            if (dl.passed()) {
                std::vector<int> missing;
                for (int r = 1; r < world; r++) if (conn[r] < 0) missing.push_back(r);
                char t[32];
                snprintf(t, sizeof t, "%g", timeout_s);
                fail(std::string("rank") + (missing.size() > 1 ? "s " : " ") + dist_rank_list(missing) + " did not connect within " + t +
                     " s (not started? died? is " + host + " this machine, reachable from theirs?); --dist-timeout S waits longer");
            }
            pollfd pf = {ls, POLLIN, 0};
            if (poll(&pf, 1, std::min(dl.left_ms(), 100)) <= 0) continue;
            int c = accept4(ls, nullptr, nullptr, SOCK_CLOEXEC);
            if (c < 0) continue;
            DistHello h;
            Deadline hd(std::min(dl.left(), 10.0));
            if (!dist_recv_all(c, &h, sizeof h, hd, &why) || memcmp(h.magic, DIST_HELLO_MAGIC, 4)) { close(c); continue; }   // not one of ours
            if ((int)h.world != world)
                fail("rank " + std::to_string(h.rank) + " says the world has " + std::to_string(h.world) + " ranks, rank 0's launcher says " +
                     std::to_string(world) + " (two runs on one port?)");
            if (h.rank < 1 || (int)h.rank >= world) { close(c); fail("a process says it is rank " + std::to_string(h.rank) + " of " + std::to_string(world)); }
            if (conn[h.rank] >= 0) { close(c); fail("two processes say they are rank " + std::to_string(h.rank)); }
            conn[h.rank] = c;
            arrived++;
        }
        DistIdMessage m = {};
        memcpy(m.magic, DIST_ID_MAGIC, 4);
        memcpy(m.id, id.data(), DIST_ID_BYTES);
        for (int r = 1; r < world; r++) {
            if (!dist_send_all(conn[r], &m, sizeof m)) fail("rank " + std::to_string(r) + " left before it got the id");
            close(conn[r]);
            conn[r] = -1;
        }
        close(ls);
        return;
    }
    int fd = -1;
    for (Backoff wait; (fd = dist_connect(host, port, dl, &why)) < 0; wait.nap())
        ql_assert(!dl.passed(), "rank %d of %d: cannot reach rank 0 at tcp:%s:%d within %g s (last: %s): is rank 0 running on %s? "
                  "--dist-timeout S waits longer", rank, world, host.c_str(), port, timeout_s, why.c_str(), host.c_str());
    DistHello h = {};
    memcpy(h.magic, DIST_HELLO_MAGIC, 4);
    h.rank = (uint32_t)rank;
    h.world = (uint32_t)world;
    DistIdMessage m;
    bool ok = dist_send_all(fd, &h, sizeof h) && dist_recv_all(fd, &m, sizeof m, dl, &why);
    close(fd);
    if (!ok && why == "no answer")
        ql_fail("rank %d of %d: no NCCL id from rank 0 at tcp:%s:%d within %g s: rank 0 is still waiting for other ranks; --dist-timeout S "
                "waits longer", rank, world, host.c_str(), port, timeout_s);
    ql_assert(ok, "rank %d of %d: rank 0 at tcp:%s:%d ended the connection before sending the NCCL id (%s): rank 0 failed, see its message",
              rank, world, host.c_str(), port, why.c_str());
    ql_assert(!memcmp(m.magic, DIST_ID_MAGIC, 4), "rank %d of %d: tcp:%s:%d answered, but not as qlora's rank 0", rank, world, host.c_str(), port);
    memcpy(id.data(), m.id, DIST_ID_BYTES);
}

// 3c. mpi: MPI_Bcast from rank 0, with MPI only for that (finalized at once; NCCL does the rest)
#ifdef QLORA_MPI
#include <mpi.h>   // defines: MPI_Init, MPI_Bcast, MPI_Finalize
static const bool DIST_HAVE_MPI = true;
inline void rendezvous_mpi(DistId& id, int rank, int world) {
    int r = -1, w = -1;
    ql_assert(MPI_Init(nullptr, nullptr) == MPI_SUCCESS, "rank %d of %d: MPI_Init failed", rank, world);
    MPI_Comm_rank(MPI_COMM_WORLD, &r);
    MPI_Comm_size(MPI_COMM_WORLD, &w);
    ql_assert(r == rank && w == world, "MPI says rank %d of %d, the launcher's environment rank %d of %d", r, w, rank, world);
    ql_assert(MPI_Bcast(id.data(), (int)DIST_ID_BYTES, MPI_BYTE, 0, MPI_COMM_WORLD) == MPI_SUCCESS, "rank %d of %d: MPI_Bcast failed", rank, world);
    MPI_Finalize();
}
#else
static const bool DIST_HAVE_MPI = false;
inline void rendezvous_mpi(DistId&, int rank, int world) {
    ql_fail("rank %d of %d: --dist-init mpi, but this qlora was built without MPI (make says MPI ✗): give --dist-init file:PATH or tcp:HOST:PORT",
            rank, world);
}
#endif

inline void dist_rendezvous(DistId& id, const DistInit& how, int rank, int world, double timeout_s) {
    if (how.kind == DIST_FILE) rendezvous_file(id, how.path, rank, world, timeout_s);
    else if (how.kind == DIST_TCP) rendezvous_tcp(id, how.host, how.port, rank, world, timeout_s);
    else if (how.kind == DIST_MPI) rendezvous_mpi(id, rank, world);
    else ql_fail("dist_rendezvous: unresolved --dist-init (dist_init_resolve first)");
}

// ---------------------------------------------------------------------------------------------
// 4. Dist: the communicator (nvcc only)
#ifdef __CUDACC__
#include "kernels/common.cuh"   // defines: cudaCheck

// Every NCCL call there is, in one place; built without NCCL, a world of one that never reaches them.
// The communicator is non-blocking (ncclConfig_t.blocking = 0): no call waits for the other ranks,
// so every wait is ours, with a deadline (dist_nccl_state polls ncclCommGetAsyncError).
enum DistState { DIST_DONE, DIST_BUSY, DIST_FAILED };
enum DistType { DIST_F32, DIST_F64, DIST_U64 };
enum DistOp { DIST_SUM, DIST_MAX };
#ifndef QLORA_NO_NCCL
#include <nccl.h>   // defines: ncclCommInitRankConfig, ncclAllReduce, ncclCommGetAsyncError, ncclCommAbort
static_assert(sizeof(ncclUniqueId) == DIST_ID_BYTES, "ncclUniqueId changed size: DIST_ID_BYTES must follow it");
static const bool DIST_HAVE_NCCL = true;
inline std::string dist_nccl_version() {
    int v = 0;
    ncclGetVersion(&v);
    return std::to_string(v / 10000) + "." + std::to_string(v / 100 % 100) + "." + std::to_string(v % 100);
}
inline DistState dist_nccl_result(void* comm, ncclResult_t r, std::string* why) {
    if (r == ncclInProgress && comm) ncclCommGetAsyncError((ncclComm_t)comm, &r);   // where the operation stands now
    if (r == ncclSuccess) return DIST_DONE;
    if (r == ncclInProgress) return DIST_BUSY;
    const char* last = comm ? ncclGetLastError((ncclComm_t)comm) : nullptr;
    *why = std::string(ncclGetErrorString(r)) + (last && *last ? std::string(": ") + last : "");
    return DIST_FAILED;
}
inline void dist_nccl_id(DistId& id) {
    ncclUniqueId u;
    std::string why;
    ql_assert(dist_nccl_result(nullptr, ncclGetUniqueId(&u), &why) == DIST_DONE, "ncclGetUniqueId: %s", why.c_str());
    memcpy(id.data(), &u, DIST_ID_BYTES);
}
inline DistState dist_nccl_init(void** comm, const DistId& id, int rank, int world, std::string* why) {
    ncclConfig_t cfg = NCCL_CONFIG_INITIALIZER;
    cfg.blocking = 0;
    ncclUniqueId u;
    memcpy(&u, id.data(), DIST_ID_BYTES);
    ncclResult_t r = ncclCommInitRankConfig((ncclComm_t*)comm, world, u, rank, &cfg);
    return dist_nccl_result(*comm, r, why);
}
inline DistState dist_nccl_state(void* comm, std::string* why) { return dist_nccl_result(comm, ncclInProgress, why); }
inline DistState dist_nccl_all_reduce(void* comm, void* x, size_t n, DistType t, DistOp op, cudaStream_t s, std::string* why) {
    ncclDataType_t nt = t == DIST_F32 ? ncclFloat32 : t == DIST_F64 ? ncclFloat64 : ncclUint64;
    return dist_nccl_result(comm, ncclAllReduce(x, x, n, nt, op == DIST_SUM ? ncclSum : ncclMax, (ncclComm_t)comm, s), why);
}
inline DistState dist_nccl_finalize(void* comm, std::string* why) { return dist_nccl_result(comm, ncclCommFinalize((ncclComm_t)comm), why); }
inline void dist_nccl_destroy(void* comm) { ncclCommDestroy((ncclComm_t)comm); }
inline void dist_nccl_abort(void* comm) { ncclCommAbort((ncclComm_t)comm); }
#else   // built without NCCL: a world of one
static const bool DIST_HAVE_NCCL = false;
inline std::string dist_nccl_version() { return "none"; }
inline void dist_nccl_id(DistId&) {}
inline DistState dist_nccl_init(void**, const DistId&, int, int, std::string* why) { *why = "built without NCCL"; return DIST_FAILED; }
inline DistState dist_nccl_state(void*, std::string*) { return DIST_DONE; }
inline DistState dist_nccl_all_reduce(void*, void*, size_t, DistType, DistOp, cudaStream_t, std::string*) { return DIST_DONE; }
inline DistState dist_nccl_finalize(void*, std::string*) { return DIST_DONE; }
inline void dist_nccl_destroy(void*) {}
inline void dist_nccl_abort(void*) {}
#endif

// One process's place in the data-parallel run. Off (the default, and whenever the launcher's world
// is one and no --dist-init is given), every call is the single-GPU behaviour: all_reduce does
// nothing, sum returns its argument, sync is cudaStreamSynchronize. On, the calls are collective:
// every rank makes the same ones in the same order.
struct Dist {
    int rank = 0, world = 1;
    bool on = false;            // NCCL in use: world > 1, or --dist-init given (world 1 through this path: the tests)
    double timeout_s = 600;     // the longest any rank waits for the others (--dist-timeout)
    void* comm = nullptr;       // ncclComm_t
    double* dev = nullptr;      // (4) device staging for host values (NCCL reduces device memory)
    double* host = nullptr;     // (4) pinned: a pageable copy would block the host without a deadline

    // Rank, world and GPU from the launcher's environment; the rendezvous; the communicator. Selects
    // the GPU (local rank), so it comes before any other CUDA call. Ranks > 0 send stdout to
    // /dev/null: rank 0 reports for all (stderr stays: each rank's errors and warnings).
    void init(const std::string& dist_init, double timeout) {
        DistEnv e = dist_env();
        DistInit how = dist_init_parse(dist_init);
        rank = e.rank;
        world = e.world;
        timeout_s = timeout;
        on = world > 1 || how.kind != DIST_AUTO;
        if (!on) return;
        ql_assert(DIST_HAVE_NCCL, "rank %d of %d%s%s: this qlora was built without NCCL (make says NCCL ✗): install NCCL and rebuild, "
                  "or run one process", rank, world, e.from.empty() ? "" : " from ", e.from.c_str());
        how = dist_init_resolve(how, e, DIST_HAVE_MPI);
        int ndev = 0;
        ql_assert(cudaGetDeviceCount(&ndev) == cudaSuccess && ndev > 0, "rank %d of %d: no CUDA device found", rank, world);
        int gpu = ndev == 1 ? 0 : e.local_rank >= 0 ? e.local_rank : rank % ndev;   // one GPU visible: the launcher chose it
        ql_assert(gpu < ndev, "rank %d of %d: local rank %d, but this node shows %d GPUs", rank, world, gpu, ndev);
        cudaCheck(cudaSetDevice(gpu));
        setenv("NCCL_NVLS_ENABLE", "0", 0);   // unless the user says otherwise: NVLink SHARP's buffers cost GiBs, for a LoRA-sized all-reduce
        DistId id{};
        if (rank == 0) dist_nccl_id(id);
        dist_rendezvous(id, how, rank, world, timeout_s);
        std::string why;
        DistState st = dist_nccl_init(&comm, id, rank, world, &why);
        if (st == DIST_FAILED) fail("NCCL communicator: %s", why.c_str());
        if (st == DIST_BUSY) wait_nccl("NCCL communicator setup");
        cudaCheck(cudaMalloc(&dev, 4 * sizeof(double)));
        cudaCheck(cudaMallocHost(&host, 4 * sizeof(double)));
        sum(0.0, 0, "the first all-reduce");   // connects the ranks now (NCCL does it lazily), before the memory plan reads what is free
        if (rank > 0) ql_assert(freopen("/dev/null", "w", stdout), "rank %d: cannot send stdout to /dev/null", rank);
        printf("data parallel: %d rank%s (%s), one per GPU | rendezvous %s | NCCL %s | LoRA gradients: one fp32 all-reduce per step\n", world,
               world > 1 ? "s" : "", e.from.empty() ? "no launcher" : e.from.c_str(), how.text().c_str(), dist_nccl_version().c_str());
    }

    // x (n) fp32 on the GPU: the sum over ranks, in place, enqueued on s (sync waits for it)
    void all_reduce(float* x, size_t n, cudaStream_t s, const char* what) {
        if (!on) return;
        enqueue(dist_nccl_all_reduce(comm, x, n, DIST_F32, DIST_SUM, s, &why_), what);
    }
    // a host value summed over the ranks (exact for counts below 2^53); waits
    double sum(double x, cudaStream_t s, const char* what) {
        if (!on) return x;
        host[0] = x;
        cudaCheck(cudaMemcpyAsync(dev, host, sizeof(double), cudaMemcpyHostToDevice, s));
        enqueue(dist_nccl_all_reduce(comm, dev, 1, DIST_F64, DIST_SUM, s, &why_), what);
        cudaCheck(cudaMemcpyAsync(host, dev, sizeof(double), cudaMemcpyDeviceToHost, s));
        sync(s, what);
        return host[0];
    }
    bool any(bool x, cudaStream_t s, const char* what) { return sum(x ? 1.0 : 0.0, s, what) > 0; }
    // whether `bytes` of device memory at x are the same on every rank (an FNV-1a hash of each; its
    // max and the max of its complement agree only if every rank's hash is the same); waits
    bool identical(const void* x, size_t bytes, cudaStream_t s, const char* what) {
        if (!on) return true;
        sync(s, what);
        std::vector<uint8_t> b(bytes);
        cudaCheck(cudaMemcpyAsync(b.data(), x, bytes, cudaMemcpyDeviceToHost, s));
        cudaCheck(cudaStreamSynchronize(s));
        uint64_t h = 1469598103934665603ull;
        for (uint8_t c : b) h = (h ^ c) * 1099511628211ull;
        uint64_t* hv = (uint64_t*)host;
        hv[0] = h;
        hv[1] = ~h;
        cudaCheck(cudaMemcpyAsync(dev, host, 2 * sizeof(uint64_t), cudaMemcpyHostToDevice, s));
        enqueue(dist_nccl_all_reduce(comm, dev, 2, DIST_U64, DIST_MAX, s, &why_), what);
        cudaCheck(cudaMemcpyAsync(host, dev, 2 * sizeof(uint64_t), cudaMemcpyDeviceToHost, s));
        sync(s, what);
        return hv[0] == h && hv[1] == ~h;
    }
    // cudaStreamSynchronize(s), but a rank that died or hangs ends this one too: after timeout_s,
    // or at once when NCCL reports an error, the communicator is aborted and the process exits 1
    void sync(cudaStream_t s, const char* what) {
        if (!on) { cudaCheck(cudaStreamSynchronize(s)); return; }
        Deadline dl(timeout_s);
        for (int i = 0;; i++) {
            cudaError_t e = cudaStreamQuery(s);
            if (e == cudaSuccess) return;
            if (e != cudaErrorNotReady) cudaCheck(e);
            if (dist_nccl_state(comm, &why_) == DIST_FAILED) fail("%s: NCCL: %s (another rank failed? see its message)", what, why_.c_str());
            if (dl.passed())
                fail("%s: no progress for %g s: another rank died or hangs (its message says why; --dist-timeout S waits longer)", what, timeout_s);
            if (i > 1000) usleep(50);   // a step's collective usually ends within microseconds: spin a little first
        }
    }
    // at the end of a run: flushes and frees the communicator
    void finish() {
        if (!on || !comm) return;
        DistState st = dist_nccl_finalize(comm, &why_);
        if (st == DIST_BUSY) wait_nccl("closing the communicator");
        else if (st == DIST_FAILED) fail("closing the communicator: %s", why_.c_str());
        dist_nccl_destroy(comm);
        comm = nullptr;
    }
    // an error of the run as a whole: abort the communicator (the others see it), say who, exit 1
    [[noreturn]] __attribute__((format(printf, 2, 3))) void fail(const char* fmt, ...) {
        char msg[1024];
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(msg, sizeof msg, fmt, ap);
        va_end(ap);
        fprintf(stderr, "qlora: error: rank %d of %d: %s\n", rank, world, msg);
        fflush(nullptr);
        if (comm) dist_nccl_abort(comm);
        _exit(1);   // not exit(): static destructors could wait on the hung collective
    }

  private:
    std::string why_;
    void enqueue(DistState st, const char* what) {
        if (st == DIST_FAILED) fail("%s: NCCL: %s", what, why_.c_str());
        if (st == DIST_BUSY) wait_nccl(what);   // non-blocking comm: the call is queued once the state is success
    }
    void wait_nccl(const char* what) {
        Deadline dl(timeout_s);
        for (;;) {
            DistState st = dist_nccl_state(comm, &why_);
            if (st == DIST_DONE) return;
            if (st == DIST_FAILED) fail("%s: NCCL: %s", what, why_.c_str());
            if (dl.passed()) fail("%s: no progress for %g s: another rank died or hangs; --dist-timeout S waits longer", what, timeout_s);
            usleep(100);
        }
    }
};
#endif   // __CUDACC__
