# qlora: `make` builds what this machine can build, `make test` runs every test it can run.
# Every setting can be overridden:  make CXX=clang++ NVCC=/usr/local/cuda/bin/nvcc GPU_ARCH=90
# Builds run in parallel, one job per core (JOBS=1, or -j N on the command line, to choose).
JOBS      ?= $(shell nproc 2>/dev/null || echo 1)
ifeq ($(filter -j%,$(MAKEFLAGS)),)
MAKEFLAGS += -j$(JOBS)
endif
CXX       ?= g++
CXXFLAGS  ?= -std=c++17 -O2 -Wall -Wextra
SANFLAGS  ?= -std=c++17 -O1 -g -Wall -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined
NVCC      ?= $(shell command -v nvcc 2>/dev/null)
GPU_ARCH  ?= $(shell nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n1 | tr -d .)
ARCH      := $(if $(GPU_ARCH),$(GPU_ARCH),90)
# Hopper gets the sm_90a target (wgmma, setmaxnreg); other GPUs their plain arch
GENCODE   ?= $(if $(filter 90,$(ARCH)),-gencode arch=compute_90a$(,)code=sm_90a,-gencode arch=compute_$(ARCH)$(,)code=sm_$(ARCH))
NVCCFLAGS ?= -std=c++17 -O3 -lineinfo $(GENCODE) -Xcompiler -Wall
NVLIBS    ?= -lcublasLt -lcublas
, := ,
# Data parallelism (dist.h): NCCL beside the CUDA Toolkit, in /usr or under NCCL_HOME (NCCL=0: build
# without, one GPU); MPI, if mpicxx is found, passes the NCCL id under mpirun (MPI=0: without; then
# --dist-init file:PATH or tcp:HOST:PORT). Only -I/-L/-l of mpicxx's flags reach nvcc.
CUDA_HOME ?= $(patsubst %/bin/nvcc,%,$(NVCC))
NCCL_HOME ?=
NCCL      ?= $(if $(and $(NVCC),$(wildcard $(NCCL_HOME)/include/nccl.h $(CUDA_HOME)/include/nccl.h /usr/include/nccl.h)),1,0)
MPICXX    ?= $(shell command -v mpicxx 2>/dev/null)
MPI       ?= $(if $(and $(filter 1,$(NCCL)),$(MPICXX)),1,0)
MPI_SHOW  := $(if $(filter 1,$(MPI)),$(shell $(MPICXX) --showme 2>/dev/null || $(MPICXX) -show 2>/dev/null))
DIST_FLAGS ?= $(if $(filter 1,$(NCCL)),$(if $(NCCL_HOME),-I$(NCCL_HOME)/include),-DQLORA_NO_NCCL) \
              $(if $(filter 1,$(MPI)),-DQLORA_MPI $(filter -I%,$(MPI_SHOW)))
DIST_LIBS  ?= $(if $(filter 1,$(NCCL)),$(if $(NCCL_HOME),-L$(NCCL_HOME)/lib) -lnccl) $(if $(filter 1,$(MPI)),$(filter -L% -l%,$(MPI_SHOW)))

CPU_TESTS := $(patsubst test/%.cpp,build/%,$(wildcard test/test_*.cpp))
SAN_TESTS := build/test_formats_san build/test_nf4_san build/test_reference_san build/test_dataloader_san build/test_fuzz_regress_san build/test_ecosystem_san build/test_train_cpu_san
GPU_TESTS := $(if $(NVCC),$(patsubst test/%.cu,build/%,$(wildcard test/test_*.cu)))
GPU_BINS  := $(if $(NVCC),$(if $(wildcard qlora.cu),qlora))
HEADERS   := qlora.h formats.h options.h tools.h reference.h dataloader.h generate.h $(wildcard kernels/*.cuh) test/test.h
HEADERS   += dist.h
SAN_TESTS += build/test_dist_san

all: detect $(CPU_TESTS) $(SAN_TESTS) $(GPU_TESTS) $(GPU_BINS) qlora_cpu

detect:
	@echo "qlora build: g++ ✓ ($(CXX)) | nvcc $(if $(NVCC),✓ ($(NVCC)),✗ (GPU trainer and GPU tests not built)) | \
GPU $(if $(GPU_ARCH),✓ sm_$(GPU_ARCH),✗ none found$(if $(NVCC), (building for sm_$(ARCH); set GPU_ARCH=..))) | parallel jobs $(or $(patsubst -j%,%,$(filter -j%,$(MAKEFLAGS))),unlimited) (JOBS=N to change)"
	@echo "multi-GPU: NCCL $(if $(filter 1,$(NCCL)),✓ (data parallel under mpirun/srun/torchrun),✗ (one GPU; NCCL_HOME=DIR if it is elsewhere)) | \
MPI $(if $(filter 1,$(MPI)),✓ (the NCCL id by MPI_Bcast),✗ (--dist-init file:PATH or tcp:HOST:PORT))"

build/%: test/%.cpp $(HEADERS) | build
	$(CXX) $(CXXFLAGS) -o $@ $<
build/%_san: test/%.cpp $(HEADERS) | build
	$(CXX) $(SANFLAGS) -o $@ $<
build/%: test/%.cu $(HEADERS) | build
	$(NVCC) $(NVCCFLAGS) $(DIST_FLAGS) -o $@ $< $(NVLIBS) $(DIST_LIBS)
build/test_qlora: qlora.cu   # it includes the trainer whole
qlora: qlora.cu $(HEADERS)
	$(NVCC) $(NVCCFLAGS) $(DIST_FLAGS) -o $@ $< $(NVLIBS) $(DIST_LIBS)
build:
	@mkdir -p build

# make train: fine-tune the shipped base model (data/base) on the shipped task (data/task), both
# made by dev/data/ (its README). With a GPU ./qlora runs it; without, ./qlora_cpu, the CPU reference
# trainer (the same training in fp32 loops). Both print the validation loss, the task accuracy
# (greedy decoding of every validation prompt, exact match) and sample generations, before and after.
TRAIN_ARGS ?= --model data/base --train data/task/reverse.train.tok --val data/task/reverse.val.tok \
              --batch 16 --seq 64 --steps 2400 --warmup 20 --lr 3e-3 --rank 16 --alpha 32 --out build/adapter
PY_TESTS   := test/test_prepare.py
# -O3: reference.h's inner loops vectorize (no reassociation: the same sums, bit for bit; ~6x faster)
qlora_cpu: qlora_cpu.cpp $(HEADERS)
	$(CXX) $(CXXFLAGS) -O3 -pthread -o $@ $<
build/test_train_cpu build/test_train_cpu_san: qlora_cpu.cpp
# the trainer it runs and nothing else: no test, sanitizer or GPU-test build to wait for
train: detect qlora_cpu $(if $(GPU_ARCH),$(GPU_BINS))
	@if [ -n "$(GPU_ARCH)" ] && [ -x ./qlora ]; then \
	  echo "make train: GPU sm_$(GPU_ARCH): ./qlora (bf16 on the GPU; generation with a KV cache)"; \
	  ./qlora $(TRAIN_ARGS) --eval-every 100 --log-every 50; \
	else echo "make train: no GPU: the CPU reference trainer ./qlora_cpu (the same training in fp32 loops, slower)"; \
	  ./qlora_cpu $(TRAIN_ARGS) --log-every 50; fi

# CPU tests (also under AddressSanitizer + UndefinedBehaviorSanitizer), then GPU tests (they skip
# themselves without a GPU). test/run.sh prints one "N passed, N failed" line for all of them.
test: all
	@NVCC="$(NVCC)" bash test/run.sh $(CPU_TESTS) $(SAN_TESTS) $(GPU_TESTS) $(if $(NVCC),test/test_resilience.sh test/test_dist_gpu.sh test/test_playgrounds.sh) $(PY_TESTS)

# Coverage-guided fuzzing of every reader (test/fuzz/targets.h): clang++ with libFuzzer, ASan and
# UBSan, FUZZ_SECONDS per target; the corpus grows in build/fuzz/<target>/ from the committed seeds,
# a crasher lands in build/fuzz/<target>-crash-*. Not part of `make test`: test_fuzz_regress replays
# the seeds and every fixed crasher (test/fuzz/regress/<target>/) there.
FUZZ_CXX     ?= clang++
FUZZ_FLAGS   ?= -std=c++17 -O1 -g -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer
FUZZ_SECONDS ?= 60
FUZZ_TARGETS ?= $(patsubst test/fuzz/fuzz_%.cpp,%,$(wildcard test/fuzz/fuzz_*.cpp))
build/test_fuzz_regress build/test_fuzz_regress_san: test/fuzz/targets.h
build/fuzz_%: test/fuzz/fuzz_%.cpp test/fuzz/targets.h $(HEADERS) | build
	$(FUZZ_CXX) $(FUZZ_FLAGS) -o $@ $<
fuzz: $(patsubst %,build/fuzz_%,$(FUZZ_TARGETS))
	@bad=; for t in $(FUZZ_TARGETS); do mkdir -p build/fuzz/$$t; \
	  echo "=== fuzz_$$t: $(FUZZ_SECONDS) s, seeds test/fuzz/corpus/$$t, corpus build/fuzz/$$t, log build/fuzz/$$t.log"; \
	  build/fuzz_$$t -max_total_time=$(FUZZ_SECONDS) -timeout=10 -rss_limit_mb=2048 -dict=test/fuzz/fuzz.dict \
	    -artifact_prefix=build/fuzz/$$t- -print_final_stats=1 build/fuzz/$$t test/fuzz/corpus/$$t \
	    $$(ls -d test/fuzz/regress/$$t 2>/dev/null) >build/fuzz/$$t.log 2>&1; rc=$$?; \
	  grep -E '^(Done [0-9]+ runs|stat::new_units_added|stat::peak_rss_mb)' build/fuzz/$$t.log; \
	  [ $$rc -eq 0 ] || { grep -E -A3 '^(==[0-9]+==ERROR|.*runtime error|fuzz: invariant)' build/fuzz/$$t.log | head -n 12; \
	                      echo "!!! fuzz_$$t found a bug: the input is build/fuzz/$$t-*"; bad="$$bad $$t"; }; done; \
	[ -z "$$bad" ] || { echo "!!! bugs found by:$$bad"; exit 1; }

# One statement per line (.clang-format) in the central files and the headers beside them
FORMAT_FILES ?= qlora.cu qlora.h formats.h options.h tools.h
format:
	clang-format -i $(FORMAT_FILES)

clean:
	rm -rf build qlora qlora_cpu

.PHONY: all detect test clean fuzz train format
.SECONDARY:
