# qlora: `make` builds what this machine can build, `make test` runs every test it can run.
# Every setting can be overridden:  make CXX=clang++ NVCC=/usr/local/cuda/bin/nvcc GPU_ARCH=90
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

CPU_TESTS := $(patsubst test/%.cpp,build/%,$(wildcard test/test_*.cpp))
SAN_TESTS := build/test_formats_san build/test_nf4_san build/test_reference_san build/test_dataloader_san
GPU_TESTS := $(if $(NVCC),$(patsubst test/%.cu,build/%,$(wildcard test/test_*.cu)))
GPU_BINS  := $(if $(NVCC),$(if $(wildcard qlora.cu),qlora))
HEADERS   := qlora.h reference.h dataloader.h $(wildcard kernels/*.cuh) test/test.h

all: detect $(CPU_TESTS) $(SAN_TESTS) $(GPU_TESTS) $(GPU_BINS)

detect:
	@echo "qlora build: g++ ✓ ($(CXX)) | nvcc $(if $(NVCC),✓ ($(NVCC)),✗ (GPU trainer and GPU tests not built)) | \
GPU $(if $(GPU_ARCH),✓ sm_$(GPU_ARCH),✗ none found$(if $(NVCC), (building for sm_$(ARCH); set GPU_ARCH=..)))"

build/%: test/%.cpp $(HEADERS) | build
	$(CXX) $(CXXFLAGS) -o $@ $<
build/%_san: test/%.cpp $(HEADERS) | build
	$(CXX) $(SANFLAGS) -o $@ $<
build/%: test/%.cu $(HEADERS) | build
	$(NVCC) $(NVCCFLAGS) -o $@ $< $(NVLIBS)
qlora: qlora.cu $(HEADERS)
	$(NVCC) $(NVCCFLAGS) -o $@ $< $(NVLIBS)
build:
	@mkdir -p build

# CPU tests (also under AddressSanitizer + UndefinedBehaviorSanitizer), then GPU tests (they skip
# themselves without a GPU). test/run.sh prints one "N passed, N failed" line for all of them.
test: all
	@bash test/run.sh $(CPU_TESTS) $(SAN_TESTS) $(GPU_TESTS)

clean:
	rm -rf build qlora

.PHONY: all detect test clean
.SECONDARY:
