// tools.h: the checkpoint tools, on the CPU (g++ or nvcc): `quantize` writes the bitsandbytes 4-bit
// checkpoint transformers would save, `merge` writes base + adapter. Both binaries run them:
// `./qlora quantize|merge` and `./qlora_cpu quantize|merge` (tool_main below).
#pragma once
#include "formats.h"   // defines: SafeTensors, checkpoint_view, bnb_*, CkptPiece, ckpt_write, peft_adapter_read
#include "options.h"   // defines: Options

// the decoder linears of the model by Hugging Face name (qlora.h §7)
inline std::map<std::string, Weight> linears_by_name(const Config& c) {
    std::map<std::string, Weight> m;
    for_each_weight(c, [&](const Weight& w) {
        if (w.linear()) m[w.name] = w;
    });
    return m;
}

// `qlora quantize`: a bf16/fp16/fp32 checkpoint -> the bitsandbytes 4-bit checkpoint transformers
// saves after loading it with BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=qt,
// bnb_4bit_use_double_quant=nested): decoder linears quantized from their stored dtype (which the
// quant_state records), everything else copied byte for byte, the tied lm_head dropped, the source's
// sharding kept. The one difference from bitsandbytes: the double-quant offset is the correctly
// rounded mean, where torch.mean may be 1-2 ulp off (test_nf4.cpp).
inline void bnb_write_checkpoint(const std::string& src, const std::string& dst, int qt = QT_NF4, int bs = NF4_BLOCKSIZE,
                                 bool nested = true) {
    ql_assert(valid_blocksize_4bit(bs), "blocksize %d: bitsandbytes 4-bit takes 32, 64, 128, ..., 4096", bs);
    std::string cfg_path = src + "/config.json";
    ckpt_prepare_out(src, dst);
    ql_assert(!config_is_bnb4(cfg_path), "%s is already a bitsandbytes 4-bit checkpoint", src.c_str());
    Config c = load_config(cfg_path);
    SafeTensors st = st_open_model(src);
    checkpoint_view(c, st);   // every tensor the model needs, shape-checked
    std::map<std::string, Weight> linear = linears_by_name(c);
    std::vector<CkptPiece> pieces;
    for (auto& kv : st.tensors) {
        const STensor* t = &kv.second;
        if (c.tied && kv.first == "lm_head.weight") continue;   // transformers does not save the tied copy
        CkptPiece pc;
        pc.shard = base_name(t->file);
        auto it = linear.find(kv.first);
        if (it == linear.end())
            pc.make = [t](std::vector<OutTensor>& ts) {
                ts.push_back(out_borrow(*t));
            };
        else {
            int64_t out = it->second.shape[0], in = it->second.shape[1];
            pc.make = [t, out, in, qt, bs, nested](std::vector<OutTensor>& ts) {
                std::vector<float> x = st_f32(*t);
                bnb_linear_tensors(ts, t->name, quantize_weight(x.data(), out * in, qt, bs, nested), t->dtype, out, in);
            };
        }
        pieces.push_back(pc);
    }
    out_write_set(dst, [&](const std::string& out) {   // the whole checkpoint, or the previous one if this fails
        ckpt_write(out, pieces, dst);
        write_text_file(out + "/config.json", config_with_bnb4(text_of_file(cfg_path), cfg_path, qt, nested));
        copy_side_files(src, out);
    });
}

// ---------------------------------------------------------------------------------------------
// 14. merging an adapter into its base: W' = W + (B·A)·s (formats.md §5.2), written as a bf16
// checkpoint, or re-quantized to bitsandbytes 4-bit.
//
// W is what the trainer computed with: for a pre-quantized checkpoint its 4-bit weights
// dequantized to quant_state's dtype; otherwise the stored weight (bf16, fp16 or fp32, quantized from
// that dtype as the trainer does) as NF4 blocksize 64 with double quant, dequantized to bf16 (the
// trainer's compute copy). onto_original: W is the stored
// weight itself (the adapter was trained against its NF4 version; formats.md §6 item 1).
// W' = bf16(W + fl32(s·(B·A))): one rounding of the fp32 sum (PEFT's float merge rounds ΔW to the
// weight dtype first, then the sum). Re-quantized output = quantizing the bf16 output, i.e. what
// loading the merged bf16 checkpoint with BitsAndBytesConfig gives.

inline std::vector<float> trainer_base_weight(const STensor& t, const BnbLinear* b, int64_t n, bool onto_original) {
    std::vector<float> w((size_t)n);
    if (b) {
        Quant4 q;
        bnb_linear_load(*b, q);
        dequantize_weight(w.data(), q);
        int dt = b->dense ? DT_BF16 : b->dtype;
        for (float& v : w) v = dt == DT_BF16 ? bf16_round(v) : dt == DT_F16 ? f16_to_f32(f32_to_f16(v)) : v;
        return w;
    }
    st_to_f32(w.data(), t);
    if (onto_original) return w;
    dequantize_weight(w.data(), quantize_weight(w.data(), n));
    for (float& v : w) v = bf16_round(v);
    return w;
}
// w (out, in) += (B·A)·s for projection p of layer l; the product in fp32, row by row
inline void lora_merge_into(float* w, const Config& c, const LoraConfig& lc, const float* lora, int l, int p) {
    if (!lc.has(p)) return;
    LoraSlot sl = lora_slot(c, lc, l, p);
    const int in = proj_in(c, p), out = proj_out(c, p), r = lc.rank;
    const float s = lc.scale(), *A = lora + sl.a, *B = lora + sl.b;   // A (r, in), B (out, r)
    std::vector<float> row((size_t)in);
    for (int o = 0; o < out; o++) {
        std::fill(row.begin(), row.end(), 0.0f);
        for (int k = 0; k < r; k++) {
            float bk = B[(size_t)o * r + k];
            const float* a = A + (size_t)k * in;
            for (int i = 0; i < in; i++) row[i] += bk * a[i];
        }
        for (int i = 0; i < in; i++) w[(size_t)o * in + i] += row[i] * s;
    }
}

inline void merge_write_checkpoint(const std::string& src, const Config& c, const LoraConfig& lc, const float* lora,
                                   const std::string& dst, bool requant, bool onto_original = false,
                                   uint64_t max_shard_bytes = 5000000000ull) {
    std::string cfg_path = src + "/config.json";
    ckpt_prepare_out(src, dst);
    int qt = QT_NF4, bs = NF4_BLOCKSIZE;
    bool nested = true;
    bool pre = config_is_bnb4(cfg_path);
    ql_assert(!(pre && onto_original), "%s is stored in 4 bits: there is no original base to merge onto", src.c_str());
    SafeTensors st = st_open_model(src);
    BnbCheckpointView bv;
    if (pre) {
        bv = bnb_checkpoint_validate(c, st);
        qt = bv.qt;
        bs = bv.bs;
        nested = bv.nested;
    } else
        checkpoint_view(c, st);
    std::map<std::string, Weight> linear = linears_by_name(c);
    std::vector<std::string> names;
    for (auto& kv : st.tensors) {
        const std::string& name = kv.first;
        size_t k = name.find(".weight.");
        if ((c.tied && name == "lm_head.weight") || (k != std::string::npos && linear.count(name.substr(0, k + 7))))
            continue;   // bnb sub-tensors
        names.push_back(name);
    }
    std::sort(names.begin(), names.end(), hf_tensor_order);
    std::vector<CkptPiece> pieces;
    for (auto& name : names) {
        const STensor* t = st.find(name);
        CkptPiece pc;
        auto it = linear.find(name);
        if (it == linear.end()) {
            bool fl = t->dtype == DT_BF16 || t->dtype == DT_F16 || t->dtype == DT_F32;
            pc.est_bytes = fl ? (size_t)t->numel() * 2 : t->nbytes;
            pc.make = [t, fl](std::vector<OutTensor>& ts) {
                if (!fl) {
                    ts.push_back(out_borrow(*t));
                    return;
                }
                std::vector<float> x = st_f32(*t);
                ts.push_back(out_bf16(t->name, t->shape, x.data()));
            };
        } else {
            int l = it->second.layer, p = it->second.proj;
            int64_t out = it->second.shape[0], in = it->second.shape[1], n = out * in;
            const BnbLinear* b = pre ? &bv.w.linear[l][p] : nullptr;
            pc.est_bytes = requant ? (size_t)(n / 2 + n / bs * (nested ? 1 : 4) + 1500) : (size_t)n * 2;
            pc.make = [=, &c, &lc](std::vector<OutTensor>& ts) {
                std::vector<float> w = trainer_base_weight(*t, b, n, onto_original);
                lora_merge_into(w.data(), c, lc, lora, l, p);
                for (float& v : w) v = bf16_round(v);
                if (requant)
                    bnb_linear_tensors(ts, name, quantize_weight(w.data(), n, qt, bs, nested), DT_BF16, out, in);
                else
                    ts.push_back(out_bf16(name, {out, in}, w.data()));
            };
        }
        pieces.push_back(pc);
    }
    ckpt_assign_shards(pieces, max_shard_bytes);
    // config.json: dtype bfloat16; quantization_config only when re-quantized
    std::string cfg = text_of_file(cfg_path);
    std::vector<std::string> keys;
    for (auto& m : json_members(cfg, cfg_path)) keys.push_back(m.key);
    bool has_dtype = false;
    for (const char* k : {"dtype", "torch_dtype"})
        if (std::find(keys.begin(), keys.end(), k) != keys.end()) {
            cfg = json_text_set(cfg, k, "\"bfloat16\"", cfg_path);
            has_dtype = true;
        }
    if (!has_dtype) cfg = json_text_set(cfg, "torch_dtype", "\"bfloat16\"", cfg_path);
    cfg = requant ? config_with_bnb4(cfg, cfg_path, qt, nested) : json_text_remove(cfg, "quantization_config", cfg_path);
    out_write_set(dst, [&](const std::string& out) {   // the whole checkpoint, or the previous one if this fails
        ckpt_write(out, pieces, dst);
        write_text_file(out + "/config.json", cfg);
        copy_side_files(src, out);
    });
}

// `qlora quantize` / `qlora merge` (either binary): checkpoint files only, on the CPU
inline int tool_main(unsigned mode, const Options& o, const std::string& argv0) {
    ql_assert(o.model.rfind("random:", 0) != 0 && !o.out.empty(), "%s needs --model DIR and --out DIR (see %s --help)",
              mode_name(mode), mode_name(mode));
    ckpt_prepare_out(o.model, o.out);   // before any work: --out is not the model, not a file, and no other run writes it
    std::string here = argv0.find('/') == std::string::npos ? "." : argv0.substr(0, argv0.rfind('/'));
    if (!rcp_table_load("data/rcp_delta.bin"))
        rcp_table_load(here + "/data/rcp_delta.bin");   // rcp.approx: bit-exact FP4, fp32 input
    if (mode == QUANTIZE) {
        bnb_write_checkpoint(o.model, o.out, o.quant_type, o.blocksize, o.double_quant);
        printf("%s: bitsandbytes 4-bit checkpoint (%s, blocksize %d%s) of %s\n", o.out.c_str(), quant_type_name(o.quant_type),
               o.blocksize, o.double_quant ? ", double quant" : "", o.model.c_str());
        return 0;
    }
    ql_assert(!o.adapter.empty(), "merge needs --adapter DIR (a PEFT LoRA adapter)");
    Config c = load_config(o.model + "/config.json");
    LoraConfig lc;
    std::vector<float> lora;
    peft_adapter_read(o.adapter, c, lc, lora);
    merge_write_checkpoint(o.model, c, lc, lora.data(), o.out, o.requant, o.onto_original);
    printf("%s: %s + %s (r %d, scale %g)%s\n", o.out.c_str(), o.model.c_str(), o.adapter.c_str(), lc.rank, lc.scale(),
           o.requant ? ", re-quantized to bitsandbytes 4-bit" : ", bf16");
    return 0;
}

// argv[1] names a tool mode: run it (exit status), else -1
inline int tool_dispatch(int argc, char** argv, unsigned binary, const char* prog) {
    if (argc < 2) return -1;
    unsigned mode = !strcmp(argv[1], "quantize") ? (unsigned)QUANTIZE : !strcmp(argv[1], "merge") ? (unsigned)MERGE : 0u;
    if (!mode) return -1;
    return tool_main(mode, parse_options(argc - 1, argv + 1, mode, binary, prog), argv[0]);
}
