"""Independent plain-PyTorch reference for the decoder LLMs redflag runs.

Nothing here imports `transformers`: every piece re-implements, from reading the
Hugging Face modeling code, the behaviour of the corresponding transformers function
(cited in the comments as `file.py: Name`). It needs only torch (>= 1.13) and the
Python standard library.

Contents
  * safetensors I/O: `write_safetensors` (hand-written, same byte layout as the
    official writer) and `read_safetensors` / `read_safetensors_header` (reader used
    for self-checking), `load_model_dir` (config.json + single file or sharded index).
  * `DecoderLM`: Llama / Mistral / Qwen2 / Qwen3 (`model_type` llama, mistral, qwen2, qwen3), with
    RoPE types default, linear, dynamic, llama3, GQA, explicit head_dim, attention /
    mlp biases, Qwen2 q/k/v biases, Mistral/Qwen2 sliding window, tied embeddings and
    an optional KV cache that mirrors the stateful transformers rotary module.
  * `GPT2LM`: GPT-2 (learned positions, LayerNorm, Conv1D [in, out] weights, fused
    c_attn, gelu_new), accepts keys with or without the `transformer.` prefix and
    ignores the legacy `h.N.attn.bias` / `h.N.attn.masked_bias` buffers.
  * `build_model(tensors, config, dtype)` and `reference_logits(tensors, config, ids)`.

Precision modes
  * dtype=torch.float64 (what the fixtures use): weights are upcast from their stored
    dtype and *everything* is computed in float64, including inv_freq / cos / sin, the
    RMSNorm statistics and the softmax. This is the exact math transformers performs,
    without transformers' float32 rounding; expected values are then rounded to f32.
  * dtype=torch.float32 / bfloat16 / float16: follows transformers' dtype handling
    exactly (RMSNorm statistics in float32, inv_freq and cos/sin in float32 then cast
    to the activation dtype, softmax in float32 then cast back, masks with
    finfo(dtype).min-equivalent -inf fill).
"""

from __future__ import annotations

import json
import math
import os
import struct
from typing import Dict, List, Optional, Tuple

import torch

# ----------------------------------------------------------------------------------
# safetensors
# ----------------------------------------------------------------------------------

# dtype name <-> torch dtype, item size. (safetensors spec: F64, F32, F16, BF16, I64,
# I32, I16, I8, U8, BOOL, ...). We write F32, F16, BF16, I64, I32 and read those + F64.
_ST_DTYPES = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1),
}
_TORCH_TO_ST = {v[0]: k for k, v in _ST_DTYPES.items()}


def _tensor_bytes(t: torch.Tensor) -> bytes:
    """Raw little-endian bytes of a tensor in row-major order."""
    t = t.detach().contiguous().cpu()
    if t.dtype in (torch.bfloat16, torch.float16):
        # view as int16 so numpy (which lacks bfloat16) can dump the raw bits
        return t.view(torch.int16).numpy().astype("<i2", copy=False).tobytes()
    if t.dtype == torch.bool:
        return t.to(torch.uint8).numpy().tobytes()
    arr = t.numpy()
    return arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()


def write_safetensors(path: str, tensors: Dict[str, torch.Tensor], metadata: Optional[Dict[str, str]] = None) -> None:
    """Write `tensors` to `path` in the safetensors format.

    Layout (as the official writer produces): 8-byte little-endian u64 header length N,
    then N bytes of JSON `{"__metadata__": {...}, name: {"dtype", "shape",
    "data_offsets": [begin, end]}, ...}` padded with spaces to a multiple of 8, then
    the raw tensor bytes. Tensors are laid out in sorted-name order, contiguously,
    offsets relative to the start of the data section. Metadata values must be str.
    """
    names = sorted(tensors)
    header: Dict[str, object] = {}
    if metadata:
        for k, v in metadata.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise TypeError("safetensors metadata must map str -> str")
        header["__metadata__"] = dict(metadata)
    blobs: List[bytes] = []
    offset = 0
    for name in names:
        t = tensors[name]
        if t.dtype not in _TORCH_TO_ST:
            raise TypeError(f"unsupported dtype {t.dtype} for {name}")
        b = _tensor_bytes(t)
        assert len(b) == t.numel() * _ST_DTYPES[_TORCH_TO_ST[t.dtype]][1]
        header[name] = {
            "dtype": _TORCH_TO_ST[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + len(b)],
        }
        blobs.append(b)
        offset += len(b)
    hjson = json.dumps(header, separators=(",", ":"), ensure_ascii=True).encode("utf-8")
    hjson += b" " * ((8 - len(hjson) % 8) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(hjson)))
        f.write(hjson)
        for b in blobs:
            f.write(b)
    os.replace(tmp, path)


def read_safetensors_header(path: str) -> Tuple[dict, int]:
    """Return (header dict incl. __metadata__, byte offset of the data section)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n).decode("utf-8"))
    return header, 8 + n


def read_safetensors(path: str) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """Read every tensor of a safetensors file (validating the layout).

    Returns (tensors, metadata). Raises ValueError on overlapping / non-contiguous /
    out-of-range offsets or size mismatches.
    """
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n].decode("utf-8"))
    base = 8 + n
    meta = header.pop("__metadata__", {}) or {}
    out: Dict[str, torch.Tensor] = {}
    spans = []
    for name, info in header.items():
        dt, size = _ST_DTYPES[info["dtype"]]
        shape = [int(s) for s in info["shape"]]
        b, e = info["data_offsets"]
        numel = 1
        for s in shape:
            numel *= s
        if e - b != numel * size or base + e > len(data) or b < 0:
            raise ValueError(f"{path}: bad data_offsets for {name}")
        spans.append((b, e))
        raw = bytearray(data[base + b : base + e])  # own the memory (frombuffer needs writable)
        if numel == 0:
            out[name] = torch.empty(shape, dtype=dt)
            continue
        if dt == torch.bfloat16:
            t = torch.frombuffer(raw, dtype=torch.int16).view(torch.bfloat16)
        elif dt == torch.bool:
            t = torch.frombuffer(raw, dtype=torch.uint8).to(torch.bool)
        else:
            t = torch.frombuffer(raw, dtype=dt)
        out[name] = t.reshape(shape).clone()
    spans.sort()
    pos = 0
    for b, e in spans:
        if b != pos:
            raise ValueError(f"{path}: data section is not contiguous at {b} (expected {pos})")
        pos = e
    if base + pos != len(data):
        raise ValueError(f"{path}: trailing bytes after the data section")
    return out, meta


def load_model_dir(model_dir: str) -> Tuple[Dict[str, torch.Tensor], dict]:
    """Load config.json and the weights (model.safetensors or a sharded index)."""
    with open(os.path.join(model_dir, "config.json")) as f:
        config = json.load(f)
    single = os.path.join(model_dir, "model.safetensors")
    index = os.path.join(model_dir, "model.safetensors.index.json")
    tensors: Dict[str, torch.Tensor] = {}
    if os.path.exists(single):
        tensors, _ = read_safetensors(single)
    elif os.path.exists(index):
        with open(index) as f:
            idx = json.load(f)
        for shard in sorted(set(idx["weight_map"].values())):
            part, _ = read_safetensors(os.path.join(model_dir, shard))
            for k, v in part.items():
                if idx["weight_map"].get(k) != shard:
                    raise ValueError(f"{k} found in {shard} but index says {idx['weight_map'].get(k)}")
                tensors[k] = v
        missing = set(idx["weight_map"]) - set(tensors)
        if missing:
            raise ValueError(f"tensors listed in the index but absent: {sorted(missing)}")
    else:
        raise FileNotFoundError(f"no weights in {model_dir}")
    return tensors, config


# ----------------------------------------------------------------------------------
# shared pieces
# ----------------------------------------------------------------------------------


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype transformers uses for 'upcast' statistics (norms, softmax, RoPE angles).

    transformers hard-codes float32; in our float64 mode we keep float64 so the
    reference is the exact math rather than a float32 rounding of it.
    """
    return torch.float64 if dtype == torch.float64 else torch.float32


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """modeling_llama.py: LlamaRMSNorm.forward (same in Mistral/Qwen2).

    hidden.to(float32); variance = mean(hidden^2, -1); hidden * rsqrt(variance + eps);
    return weight * hidden.to(input_dtype)."""
    input_dtype = x.dtype
    h = x.to(_stat_dtype(input_dtype))
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + eps)
    return weight * h.to(input_dtype)


def silu(x: torch.Tensor) -> torch.Tensor:
    """activations.py: ACT2FN["silu"] = nn.SiLU -> x * sigmoid(x).
    (float16 on CPU: torch 1.13 lacks the kernel; computed in float32, rounded once, which
    is what the upcasting GPU kernels do.)"""
    if x.dtype == torch.float16:
        return silu(x.float()).to(torch.float16)
    return x * torch.sigmoid(x)


def gelu_new(x: torch.Tensor) -> torch.Tensor:
    """activations.py: NewGELUActivation (ACT2FN["gelu_new"]), the tanh approximation:
    0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))."""
    if x.dtype == torch.float16:
        return gelu_new(x.float()).to(torch.float16)
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def gelu_exact(x: torch.Tensor) -> torch.Tensor:
    """activations.py: GELUActivation (ACT2FN["gelu"]), erf form."""
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


ACTIVATIONS = {
    "silu": silu,
    "swish": silu,
    "gelu_new": gelu_new,
    "gelu_pytorch_tanh": gelu_new,  # same formula (PytorchGELUTanh)
    "gelu": gelu_exact,
    "relu": torch.relu,
}


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """modeling_llama.py: rotate_half -> cat(-x2, x1) of the two halves of the last dim."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """modeling_llama.py: apply_rotary_pos_emb -> x * cos + rotate_half(x) * sin.
    x: [heads, T, head_dim]; cos/sin: [T, head_dim] (broadcast over heads)."""
    return x * cos + rotate_half(x) * sin


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """modeling_llama.py: repeat_kv -> [n_kv, T, d] to [n_kv * n_rep, T, d] where query head
    h uses kv head h // n_rep (expand on a new axis after the kv-head axis, then reshape)."""
    if n_rep == 1:
        return x
    n_kv, t, d = x.shape
    return x[:, None, :, :].expand(n_kv, n_rep, t, d).reshape(n_kv * n_rep, t, d)


def causal_allowed(q_pos: torch.Tensor, k_pos: torch.Tensor, sliding_window: Optional[int]) -> torch.Tensor:
    """Boolean [Tq, Tk] of which keys each query may attend to.

    masking_utils.py: causal_mask_function -> kv_idx <= q_idx, and
    sliding_window_overlay(sliding_window) -> kv_idx > q_idx - sliding_window, i.e. a
    query at position i sees keys j with 0 <= i - j < sliding_window (the window counts
    the query's own token). The older modeling_attn_mask_utils.py
    AttentionMaskConverter._make_causal_mask masked `tril(ones, diagonal=-sliding_window)`,
    which is the same set."""
    qi = q_pos[:, None]
    kj = k_pos[None, :]
    ok = kj <= qi
    if sliding_window is not None:
        ok = ok & (kj > qi - sliding_window)
    return ok


# ----------------------------------------------------------------------------------
# RoPE (modeling_rope_utils.py)
# ----------------------------------------------------------------------------------


def rope_type_of(config: dict) -> str:
    """modeling_llama.py: LlamaRotaryEmbedding.__init__ -> rope_scaling.get("rope_type",
    rope_scaling.get("type")) (BC: "rope_type" was originally "type"), "default" if None."""
    rs = config.get("rope_scaling")
    if not rs:
        return "default"
    return rs.get("rope_type", rs.get("type", "default"))


def llm_head_dim(config: dict) -> int:
    """modeling_llama.py: LlamaAttention.__init__ -> getattr(config, "head_dim", None) or
    hidden_size // num_attention_heads (config.json may carry an explicit head_dim).
    configuration_qwen3.py: Qwen3Config.head_dim defaults to 128."""
    if config.get("model_type") == "qwen3":
        return int(config.get("head_dim", 128))
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def rope_inv_freq(config: dict, seq_len: Optional[int], fdtype: torch.dtype) -> torch.Tensor:
    """inv_freq for the config's rope type, in `fdtype` (float32 as transformers, or float64).

    modeling_rope_utils.py: ROPE_INIT_FUNCTIONS[rope_type](config, device, seq_len):
      default  _compute_default_rope_parameters: 1 / base^(arange(0, dim, 2) / dim),
               dim = int(head_dim * partial_rotary_factor)
      linear   _compute_linear_scaling_rope_parameters: default / factor
      dynamic  _compute_dynamic_ntk_parameters: seq_len = max(seq_len, max_position_embeddings);
               base' = base * ((factor * seq_len / max_pos) - (factor - 1)) ** (dim / (dim - 2))
      llama3   _compute_llama3_parameters: wavelen = 2*pi/inv_freq; wavelen > old_ctx/low_ff ->
               inv/factor; wavelen < old_ctx/high_ff -> unchanged; otherwise smoothed
               (1 - s) * inv / factor + s * inv, s = (old_ctx / wavelen - low_ff) / (high_ff - low_ff).
    Other types (yarn, longrope, ...) are not supported here.
    """
    rope_type = rope_type_of(config)
    rs = config.get("rope_scaling") or {}
    base = float(config.get("rope_theta", 10000.0))
    dim = int(llm_head_dim(config) * config.get("partial_rotary_factor", 1.0))
    exps = torch.arange(0, dim, 2, dtype=torch.int64).to(fdtype) / dim

    if rope_type == "default":
        return 1.0 / (base ** exps)
    if rope_type == "linear":
        return (1.0 / (base ** exps)) / float(rs["factor"])
    if rope_type == "dynamic":
        max_pos = int(config["max_position_embeddings"])
        factor = float(rs["factor"])
        sl = max_pos if seq_len is None else max(int(seq_len), max_pos)
        new_base = base * ((factor * sl / max_pos) - (factor - 1)) ** (dim / (dim - 2))
        return 1.0 / (torch.tensor(new_base, dtype=fdtype) ** exps)
    if rope_type == "llama3":
        inv = 1.0 / (base ** exps)
        factor = float(rs["factor"])
        low_ff = float(rs["low_freq_factor"])
        high_ff = float(rs["high_freq_factor"])
        old_ctx = float(rs["original_max_position_embeddings"])
        low_wl = old_ctx / low_ff
        high_wl = old_ctx / high_ff
        wavelen = 2 * math.pi / inv
        inv_l = torch.where(wavelen > low_wl, inv / factor, inv)
        smooth = (old_ctx / wavelen - low_ff) / (high_ff - low_ff)
        smoothed = (1 - smooth) * inv_l / factor + smooth * inv_l
        is_medium = ~(wavelen < high_wl) & ~(wavelen > low_wl)
        return torch.where(is_medium, smoothed, inv_l)
    raise NotImplementedError(f"rope type {rope_type!r} is not implemented by the reference")


class RotaryState:
    """Mirror of modeling_llama.py: LlamaRotaryEmbedding (+ modeling_rope_utils.py:
    dynamic_rope_update / _dynamic_frequency_update), *including its state*.

    For "dynamic", every forward computes seq_len = max(position_ids) + 1 and
      * if seq_len > max_seq_len_cached: inv_freq = init_fn(config, seq_len=seq_len),
        max_seq_len_cached = seq_len   ("growth")
      * if seq_len < original_max_seq_len (= max_position_embeddings) and
        max_seq_len_cached > original_max_seq_len: inv_freq = original,
        max_seq_len_cached = original   ("reset")
    max_seq_len_cached starts at max_position_embeddings. So a full-sequence forward of
    T > max_position_embeddings rotates *all* positions with the frequencies for T, while
    cached decoding recomputes per step and keys already in the cache keep the rotation
    they were given when they were written.
    """

    def __init__(self, config: dict, fdtype: torch.dtype):
        self.config = config
        self.fdtype = fdtype
        self.rope_type = rope_type_of(config)
        self.original_max_seq_len = int(config.get("max_position_embeddings", 2048))
        self.max_seq_len_cached = self.original_max_seq_len
        self.original_inv_freq = rope_inv_freq(config, None, fdtype)
        self.inv_freq = self.original_inv_freq
        self.attention_scaling = 1.0  # default/linear/dynamic/llama3 all return 1.0

    def reset(self) -> None:
        self.max_seq_len_cached = self.original_max_seq_len
        self.inv_freq = self.original_inv_freq

    def __call__(self, position_ids: torch.Tensor, out_dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
        if "dynamic" in self.rope_type:
            seq_len = int(position_ids.max().item()) + 1
            if seq_len > self.max_seq_len_cached:  # growth
                self.inv_freq = rope_inv_freq(self.config, seq_len, self.fdtype)
                self.max_seq_len_cached = seq_len
            if seq_len < self.original_max_seq_len and self.max_seq_len_cached > self.original_max_seq_len:  # reset
                self.inv_freq = self.original_inv_freq
                self.max_seq_len_cached = self.original_max_seq_len
        # LlamaRotaryEmbedding.forward: freqs = inv_freq (outer) position_ids in float32
        # (autocast disabled), emb = cat(freqs, freqs), cos/sin * attention_scaling, cast
        # to the activation dtype.
        freqs = position_ids.to(self.fdtype)[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(out_dtype), sin.to(out_dtype)


# ----------------------------------------------------------------------------------
# Llama / Mistral / Qwen2
# ----------------------------------------------------------------------------------


def _mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b. torch 1.13 has no float16 matmul on CPU: there we multiply in float32 and
    round the product to float16 (fp16 GEMM with fp32 accumulation)."""
    if a.dtype == torch.float16:
        return (a.float() @ b.float()).to(torch.float16)
    return a @ b


def _linear(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor]) -> torch.Tensor:
    """nn.Linear: x @ W^T + b with W stored [out, in]."""
    y = _mm(x, w.t())
    if b is not None:
        y = y + b
    return y


class DecoderLM:
    """LlamaForCausalLM / MistralForCausalLM / Qwen2ForCausalLM forward (batch 1, no padding).

    modeling_llama.py: LlamaModel.forward / LlamaDecoderLayer.forward:
      h = embed_tokens(ids)
      per layer: h = h + o_proj(attn(input_layernorm(h)))
                 h = h + down_proj(act(gate_proj(x)) * up_proj(x)), x = post_attention_layernorm(h)
      logits = lm_head(norm(h)), lm_head.weight = embed_tokens.weight when tie_word_embeddings.
    Attention (LlamaAttention.forward + eager_attention_forward): q/k/v projections viewed as
    [T, heads, head_dim] -> [heads, T, head_dim], RoPE on q and k, cache update, repeat_kv,
    scores = q @ k^T * head_dim**-0.5, additive causal (and sliding-window) mask,
    softmax(dim=-1, dtype=float32).to(q.dtype), @ v, -> [T, heads*head_dim], o_proj.
    Biases: Llama q/k/v/o by `attention_bias` and gate/up/down by `mlp_bias`; Qwen2 q/k/v
    always biased, o_proj never (modeling_qwen2.py: Qwen2Attention); Qwen3 q/k/v/o by
    `attention_bias`; Mistral none.
    Qwen3 (modeling_qwen3.py: Qwen3Attention.forward): q and k viewed as [T, heads, head_dim]
    go through q_norm / k_norm (Qwen3RMSNorm over head_dim, the same math as LlamaRMSNorm)
    before the transpose and RoPE.
    """

    def __init__(self, tensors: Dict[str, torch.Tensor], config: dict, dtype: torch.dtype = torch.float64):
        mt = config.get("model_type", "llama")
        if mt not in ("llama", "mistral", "qwen2", "qwen3"):
            raise ValueError(f"DecoderLM does not handle model_type {mt!r}")
        self.config = config
        self.model_type = mt
        self.dtype = dtype
        self.n_layers = int(config["num_hidden_layers"])
        self.n_heads = int(config["num_attention_heads"])
        self.n_kv = int(config.get("num_key_value_heads") or self.n_heads)
        self.head_dim = llm_head_dim(config)
        self.eps = float(config.get("rms_norm_eps", 1e-6))
        self.act = ACTIVATIONS[config.get("hidden_act", "silu")]
        self.scaling = self.head_dim ** -0.5
        if mt == "llama":
            qkv_bias = o_bias = bool(config.get("attention_bias", False))
            mlp_bias = bool(config.get("mlp_bias", False))
        elif mt == "qwen2":
            qkv_bias, o_bias, mlp_bias = True, False, False
        elif mt == "qwen3":
            qkv_bias = o_bias = bool(config.get("attention_bias", False))
            mlp_bias = False
        else:
            qkv_bias = o_bias = mlp_bias = False
        self.qk_norm = mt == "qwen3"

        def w(name: str) -> torch.Tensor:
            return tensors[name].to(dtype)

        self.embed = w("model.embed_tokens.weight")
        self.norm = w("model.norm.weight")
        if config.get("tie_word_embeddings", False):
            # PreTrainedModel.tie_weights: lm_head.weight *is* embed_tokens.weight when
            # tie_word_embeddings is true (a stored lm_head.weight would be overwritten).
            # LlamaConfig / MistralConfig / Qwen2Config default it to False.
            self.lm_head = self.embed
        else:
            if "lm_head.weight" not in tensors:
                raise KeyError("lm_head.weight missing but tie_word_embeddings is false")
            self.lm_head = w("lm_head.weight")
        self.layers = []
        for i in range(self.n_layers):
            p = f"model.layers.{i}."
            L = {
                "in_norm": w(p + "input_layernorm.weight"),
                "post_norm": w(p + "post_attention_layernorm.weight"),
            }
            for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
                L[n] = w(p + f"self_attn.{n}.weight")
                has_b = o_bias if n == "o_proj" else qkv_bias
                L[n + ".b"] = w(p + f"self_attn.{n}.bias") if has_b else None
            for n in ("gate_proj", "up_proj", "down_proj"):
                L[n] = w(p + f"mlp.{n}.weight")
                L[n + ".b"] = w(p + f"mlp.{n}.bias") if mlp_bias else None
            if self.qk_norm:
                L["q_norm"] = w(p + "self_attn.q_norm.weight")
                L["k_norm"] = w(p + "self_attn.k_norm.weight")
            # sliding window per layer
            sw = None
            if mt == "mistral":
                # modeling_mistral.py: MistralModel uses create_sliding_window_causal_mask
                # whenever config.sliding_window is not None.
                sw = config.get("sliding_window")
            elif mt in ("qwen2", "qwen3"):
                # configuration_qwen2.py / _qwen3.py: sliding_window only if use_sliding_window, and only
                # for layers i >= max_window_layers (layer_types "sliding_attention").
                if config.get("use_sliding_window", False) and config.get("sliding_window") is not None:
                    if i >= int(config.get("max_window_layers", 0)):
                        sw = config["sliding_window"]
            L["sliding_window"] = int(sw) if sw is not None else None
            self.layers.append(L)
        self.rotary = RotaryState(config, _stat_dtype(dtype))
        self.reset()

    def reset(self) -> None:
        """Drop the KV cache and the rotary state (a fresh model, as after from_pretrained)."""
        self.k_cache: List[Optional[torch.Tensor]] = [None] * self.n_layers
        self.v_cache: List[Optional[torch.Tensor]] = [None] * self.n_layers
        self.past = 0
        self.rotary.reset()

    def forward(self, ids: torch.Tensor, use_cache: bool = False) -> torch.Tensor:
        """Logits [T, vocab] (in self.dtype) for the 1-D `ids`, positions past..past+T-1.

        use_cache=False: a fresh, cache-less full-sequence forward (state is reset first).
        use_cache=True: append to the KV cache (DynamicCache semantics) and keep the
        rotary state across calls, as model(ids, past_key_values=...) does."""
        if not use_cache:
            self.reset()
        ids = ids.reshape(-1).to(torch.int64)
        T = ids.shape[0]
        pos = torch.arange(self.past, self.past + T, dtype=torch.int64)
        dt = self.dtype
        h = self.embed[ids]  # nn.Embedding
        cos, sin = self.rotary(pos, dt)
        S = self.past + T
        k_pos = torch.arange(0, S, dtype=torch.int64)
        n_rep = self.n_heads // self.n_kv
        for li, L in enumerate(self.layers):
            x = rms_norm(h, L["in_norm"], self.eps)
            q = _linear(x, L["q_proj"], L["q_proj.b"]).view(T, self.n_heads, self.head_dim)
            k = _linear(x, L["k_proj"], L["k_proj.b"]).view(T, self.n_kv, self.head_dim)
            if self.qk_norm:
                q = rms_norm(q, L["q_norm"], self.eps)
                k = rms_norm(k, L["k_norm"], self.eps)
            q = q.transpose(0, 1)
            k = k.transpose(0, 1)
            v = _linear(x, L["v_proj"], L["v_proj.b"]).view(T, self.n_kv, self.head_dim).transpose(0, 1)
            q = apply_rotary(q, cos, sin)
            k = apply_rotary(k, cos, sin)
            if use_cache:
                if self.k_cache[li] is not None:
                    k = torch.cat((self.k_cache[li], k), dim=1)
                    v = torch.cat((self.v_cache[li], v), dim=1)
                self.k_cache[li], self.v_cache[li] = k, v
            kr = repeat_kv(k, n_rep)
            vr = repeat_kv(v, n_rep)
            scores = _mm(q, kr.transpose(1, 2)) * self.scaling
            allowed = causal_allowed(pos, k_pos, L["sliding_window"])
            scores = scores.masked_fill(~allowed[None], float("-inf"))
            probs = torch.softmax(scores, dim=-1, dtype=_stat_dtype(dt)).to(dt)
            a = _mm(probs, vr).transpose(0, 1).reshape(T, self.n_heads * self.head_dim)
            h = h + _linear(a, L["o_proj"], L["o_proj.b"])
            x = rms_norm(h, L["post_norm"], self.eps)
            m = self.act(_linear(x, L["gate_proj"], L["gate_proj.b"])) * _linear(x, L["up_proj"], L["up_proj.b"])
            h = h + _linear(m, L["down_proj"], L["down_proj.b"])
        if use_cache:
            self.past += T
        h = rms_norm(h, self.norm, self.eps)
        return _mm(h, self.lm_head.t())


# ----------------------------------------------------------------------------------
# GPT-2
# ----------------------------------------------------------------------------------


def normalize_gpt2_keys(tensors: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """GPT2LMHeadModel state-dict keys without the `transformer.` prefix.

    The original openai-community/gpt2 checkpoint stores GPT2Model keys (`wte.weight`,
    `h.0.attn.c_attn.weight`, ...) and the legacy causal-mask buffers `h.N.attn.bias`
    ([1, 1, n_positions, n_positions]) and sometimes `h.N.attn.masked_bias`;
    modeling_gpt2.py registers those buffers with persistent=False and
    the GPT-2 model classes list them in _keys_to_ignore_on_load_unexpected, so loading drops them.
    `lm_head.weight` is tied to wte (GPT2LMHeadModel._tied_weights_keys)."""
    out = {}
    for k, v in tensors.items():
        kk = k[len("transformer."):] if k.startswith("transformer.") else k
        if kk.endswith(".attn.bias") or kk.endswith(".attn.masked_bias"):
            continue
        out[kk] = v
    return out


class GPT2LM:
    """modeling_gpt2.py: GPT2LMHeadModel forward (batch 1, eager attention).

      h = wte(ids) + wpe(positions)
      per block (GPT2Block): h = h + attn(ln_1(h)); h = h + mlp(ln_2(h))
      GPT2Attention: q, k, v = c_attn(x).split(n_embd, dim=-1) (Conv1D: x @ W + b, W [in, out]),
        heads split by view(T, n_head, head_dim); scores = q @ k^T, divided by
        sqrt(head_dim) if scale_attn_weights, by (layer_idx + 1) if
        scale_attn_by_inverse_layer_idx; causal mask with finfo.min; softmax; @ v; c_proj.
      GPT2MLP: c_proj(act(c_fc(x))), act = ACT2FN[activation_function] (gelu_new).
      logits = ln_f(h) @ wte^T (tied lm_head, no bias).
    """

    def __init__(self, tensors: Dict[str, torch.Tensor], config: dict, dtype: torch.dtype = torch.float64):
        t = normalize_gpt2_keys(tensors)
        self.config = config
        self.dtype = dtype
        self.n_layer = int(config["n_layer"])
        self.n_head = int(config["n_head"])
        self.n_embd = int(config["n_embd"])
        self.head_dim = self.n_embd // self.n_head
        self.eps = float(config.get("layer_norm_epsilon", 1e-5))
        self.act = ACTIVATIONS[config.get("activation_function", "gelu_new")]
        self.scale_attn_weights = bool(config.get("scale_attn_weights", True))
        self.scale_by_layer = bool(config.get("scale_attn_by_inverse_layer_idx", False))

        def w(name):
            return t[name].to(dtype)

        self.wte = w("wte.weight")
        self.wpe = w("wpe.weight")
        self.ln_f = (w("ln_f.weight"), w("ln_f.bias"))
        self.lm_head = w("lm_head.weight") if "lm_head.weight" in t else self.wte
        self.blocks = []
        for i in range(self.n_layer):
            p = f"h.{i}."
            self.blocks.append({n: w(p + n) for n in (
                "ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias",
                "attn.c_proj.weight", "attn.c_proj.bias", "ln_2.weight", "ln_2.bias",
                "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias")})
        self.reset()

    def reset(self) -> None:
        self.k_cache = [None] * self.n_layer
        self.v_cache = [None] * self.n_layer
        self.past = 0

    def _ln(self, x, wb):
        # nn.LayerNorm(eps=layer_norm_epsilon): biased variance over the last dim
        return torch.nn.functional.layer_norm(x, (x.shape[-1],), wb[0], wb[1], self.eps)

    def forward(self, ids: torch.Tensor, use_cache: bool = False) -> torch.Tensor:
        if not use_cache:
            self.reset()
        ids = ids.reshape(-1).to(torch.int64)
        T = ids.shape[0]
        pos = torch.arange(self.past, self.past + T, dtype=torch.int64)
        k_pos = torch.arange(0, self.past + T, dtype=torch.int64)
        h = self.wte[ids] + self.wpe[pos]
        allowed = causal_allowed(pos, k_pos, None)
        for li, B in enumerate(self.blocks):
            x = self._ln(h, (B["ln_1.weight"], B["ln_1.bias"]))
            qkv = _mm(x, B["attn.c_attn.weight"]) + B["attn.c_attn.bias"]  # Conv1D: W is [in, out]
            q, k, v = qkv.split(self.n_embd, dim=-1)
            q = q.view(T, self.n_head, self.head_dim).transpose(0, 1)
            k = k.view(T, self.n_head, self.head_dim).transpose(0, 1)
            v = v.view(T, self.n_head, self.head_dim).transpose(0, 1)
            if use_cache:
                if self.k_cache[li] is not None:
                    k = torch.cat((self.k_cache[li], k), dim=1)
                    v = torch.cat((self.v_cache[li], v), dim=1)
                self.k_cache[li], self.v_cache[li] = k, v
            s = _mm(q, k.transpose(1, 2))
            if self.scale_attn_weights:
                s = s / (v.shape[-1] ** 0.5)
            if self.scale_by_layer:
                s = s / float(li + 1)
            s = s.masked_fill(~allowed[None], float("-inf"))
            # GPT2Attention._attn: softmax in the weights' dtype, then .type(value.dtype)
            p = torch.softmax(s, dim=-1).to(v.dtype)
            a = _mm(p, v).transpose(0, 1).reshape(T, self.n_embd)
            h = h + (_mm(a, B["attn.c_proj.weight"]) + B["attn.c_proj.bias"])
            x = self._ln(h, (B["ln_2.weight"], B["ln_2.bias"]))
            m = self.act(_mm(x, B["mlp.c_fc.weight"]) + B["mlp.c_fc.bias"])
            h = h + (_mm(m, B["mlp.c_proj.weight"]) + B["mlp.c_proj.bias"])
        if use_cache:
            self.past += T
        h = self._ln(h, self.ln_f)
        return _mm(h, self.lm_head.t())


# ----------------------------------------------------------------------------------
# entry points
# ----------------------------------------------------------------------------------


def build_model(tensors: Dict[str, torch.Tensor], config: dict, dtype: torch.dtype = torch.float64):
    mt = config.get("model_type")
    if mt == "gpt2":
        return GPT2LM(tensors, config, dtype)
    return DecoderLM(tensors, config, dtype)


@torch.no_grad()
def reference_logits(tensors: Dict[str, torch.Tensor], config: dict, ids, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Logits [T, vocab] of a fresh, cache-less forward over `ids` (positions 0..T-1)."""
    ids = torch.as_tensor(ids, dtype=torch.int64)
    return build_model(tensors, config, dtype).forward(ids)


@torch.no_grad()
def cached_logits(tensors: Dict[str, torch.Tensor], config: dict, ids, prefill: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Logits [T, vocab] as produced by generation with a KV cache: one forward over
    ids[:prefill] (rows 0..prefill-1), then one forward per further token (one row each),
    each call reusing the cache and the (stateful) rotary module."""
    ids = torch.as_tensor(ids, dtype=torch.int64)
    m = build_model(tensors, config, dtype)
    m.reset()
    rows = [m.forward(ids[:prefill], use_cache=True)]
    for t in range(prefill, ids.shape[0]):
        rows.append(m.forward(ids[t : t + 1], use_cache=True))
    return torch.cat(rows, dim=0)


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    a = a.to(torch.float64)
    b = b.to(torch.float64)
    return float((a - b).norm() / b.norm().clamp_min(1e-300))
