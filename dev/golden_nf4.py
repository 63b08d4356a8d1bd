"""Golden NF4/FP4 vectors made by bitsandbytes on a GPU (nf4.md §8.1), for test/test_nf4.cpp.

    python dev/golden_nf4.py --out test/golden_nf4.safetensors

Inputs are built on the CPU with a seeded generator; every case runs
bitsandbytes.functional.quantize_4bit on the GPU and stores what bitsandbytes produced:
  {input}.{dtype}.x                          the input, in its dtype
  {case}.packed  U8   {case}.absmax F32 (plain) or U8 (nested codes)
  {case}.absmax2 F32, {case}.offset F32[1], {case}.absmax_dq F32 (nested: the reconstructed absmax)
  {case}.deq     the dequantized tensor (input dtype), for bs 64 and 256 only (size)
with case = {input}.{dtype}.{nf4|fp4}.bs{bs}.dq{0|1}. __metadata__ records versions.
"""
import argparse, json, struct
import torch
from safetensors.torch import save_file
import bitsandbytes as bnb
import bitsandbytes.functional as F

def f32(bits):
    return struct.unpack("<f", struct.pack("<I", bits))[0]

NF4_T = [0xbf591cd9, 0xbf1c5270, 0xbeeb8480, 0xbeadea76, 0xbe703cec, 0xbe0d38bc, 0xbd3a7871, 0x3d22faff,
         0x3df64863, 0x3e5067e0, 0x3e9582d4, 0x3ec753f9, 0x3f006d03, 0x3f248daf, 0x3f5c89d9]
FP4_U = [0x3b2aaab9, 0x3db00000, 0x3e555555, 0x3e955555, 0x3ed55556, 0x3f155550, 0x3f555555]

def probes():
    """Blocks of 32 that start with 1.0 (absmax = 1 exactly), then thresholds, their +-1 ulp
    neighbours, fp32 midpoints of the NF4 table, the tables themselves, and negatives."""
    nf4 = F.get_4bit_type("nf4", device="cpu").float()
    fp4 = F.get_4bit_type("fp4", device="cpu").float()
    vals = []
    for b in NF4_T + FP4_U:
        for d in (-1, 0, 1):
            v = f32(b + d)
            vals += [v, -v]
    mids = ((nf4[1:] + nf4[:-1]) * 0.5).tolist()
    vals += mids + [-m for m in mids] + nf4.tolist() + fp4.tolist() + (-fp4).tolist()
    vals = [v for v in vals if abs(v) <= 1.0]
    out = []
    for i in range(0, len(vals), 31):
        blk = [1.0] + vals[i:i + 31]
        out += blk + [0.5] * (32 - len(blk))
    return torch.tensor(out, dtype=torch.float32)

def specials(g):
    r = lambda n: torch.randn(n, generator=g) * 0.02
    rows = [torch.zeros(64), -torch.zeros(64)]
    x = r(64); x[5] = float("nan"); rows.append(x)
    x = r(64); x[9] = float("inf"); rows.append(x)
    x = r(64); x[0] = float("-inf"); rows.append(x)
    rows.append(torch.full((64,), float("nan")))
    rows.append(torch.randn(64, generator=g) * 1e-39)             # fp32 subnormals
    rows.append(torch.randn(64, generator=g) * 1e37)              # huge
    rows.append(torch.randn(64, generator=g) * 1e-30)             # tiny but normal
    x = r(64); x[::7] = 0.0; x[1::7] = -0.0; rows.append(x)       # signed zeros among values
    return torch.cat(rows)

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="test/golden_nf4.safetensors")
    a = ap.parse_args()
    g = torch.Generator().manual_seed(1234)
    base = {
        "randn": torch.randn(4099, generator=g) * 0.02,            # odd, partial last block
        "probe": probes(),
        "special": specials(g),
        "wide": torch.randn(2048, generator=g) * torch.pow(10.0, torch.rand(2048, generator=g) * 60 - 30),
        "big": torch.randn(64 * 600 + 17, generator=g) * 0.02,     # > 256 blocks: several nested blocks
    }
    dtypes = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}
    out, ncases = {}, 0
    for name, x32 in base.items():
        for dn, dt in dtypes.items():
            if name == "wide" and dn == "f16":
                continue                                           # overflows fp16: nothing to learn
            if name == "big" and dn != "bf16":
                continue
            x = x32.to(dt).contiguous()
            out[f"{name}.{dn}.x"] = x
            for qt in ("nf4", "fp4"):
                for bs in ((64,) if name == "big" else (32, 64, 128, 256, 512, 1024, 2048, 4096)):
                    for dq in (0, 1):
                        c = f"{name}.{dn}.{qt}.bs{bs}.dq{dq}"
                        q, st = F.quantize_4bit(x.cuda(), blocksize=bs, quant_type=qt, compress_statistics=bool(dq))
                        out[c + ".packed"] = q.cpu().reshape(-1).contiguous()
                        out[c + ".absmax"] = st.absmax.cpu().contiguous()
                        if dq:
                            out[c + ".absmax2"] = st.state2.absmax.cpu().float().contiguous()
                            out[c + ".offset"] = st.offset.reshape(1).cpu().float().contiguous()
                            out[c + ".absmax_dq"] = (F.dequantize_blockwise(st.absmax, st.state2) + st.offset).cpu().float().contiguous()
                        if bs in (64, 256):
                            out[c + ".deq"] = F.dequantize_4bit(q, st).cpu().reshape(-1).contiguous()
                        ncases += 1
    out["table.nf4"] = F.get_4bit_type("nf4", device="cpu").float().contiguous()
    out["table.fp4"] = F.get_4bit_type("fp4", device="cpu").float().contiguous()
    out["table.dyn8"] = F.create_dynamic_map().float().contiguous()
    meta = {"bitsandbytes": bnb.__version__, "torch": torch.__version__, "gpu": torch.cuda.get_device_name(),
            "cases": str(ncases), "made_by": "dev/golden_nf4.py"}
    save_file(out, a.out, metadata=meta)
    print(json.dumps(meta))

if __name__ == "__main__":
    main()
