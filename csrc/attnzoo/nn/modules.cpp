// The attention layer and the transformer block. The attention kind is a
// per-layer choice (AttentionConfig); each kind maps onto one attnzoo op.
#include "attnzoo/nn/modules.h"

#include <ATen/Parallel.h>
#include <ATen/functorch/DynamicLayer.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/jit/frontend/tracer.h>
#include <torch/nn/functional/activation.h>
#include <torch/nn/functional/dropout.h>
#include <torch/nn/init.h>

#include <cmath>

#include "attnzoo/ops/attention_variants.h"
#include "attnzoo/ops/cpu/cpu_support.h"
#include "attnzoo/ops/layouts.h"
#include "attnzoo/ops/op_support.h"
#include "attnzoo/ops/score_rules.h"

namespace attnzoo::nn {
namespace {

// The index of a dtype in the engine's per-type row tables (dropout_rows,
// gelu_tanh_rows: float, double, bfloat16, float16), or -1 for a dtype the
// rows do not take.
int rows_index(at::ScalarType type) {
  switch (type) {
    case at::kFloat:
      return 0;
    case at::kDouble:
      return 1;
    case at::kBFloat16:
      return 2;
    case at::kHalf:
      return 3;
    default:
      return -1;
  }
}

// x * keep(i) / (1 - p), element i of the contiguous x kept iff
// rules::dropout_keeps(seed, threshold, i): the engine build for this CPU
// runs the rows (cpu/engine_api.h, DropoutRowsFn).
at::Tensor apply_dropout_pattern(const at::Tensor& x, double p, uint64_t seed) {
  const at::Tensor in = x.contiguous();
  at::Tensor out = at::empty_like(in);
  const uint64_t threshold = rules::dropout_threshold(p);
  const double scale = rules::dropout_keep_scale(p);
  const int which = rows_index(in.scalar_type());
  TORCH_CHECK(which >= 0, "Dropout: x must be float32, float64, bfloat16 or float16, got ", in.scalar_type());
  const cpu::DropoutRowsFn rows = cpu::selected_engine().dropout_rows[which];
  const auto* src = static_cast<const char*>(in.const_data_ptr());
  auto* dst = static_cast<char*>(out.data_ptr());
  const int64_t size = in.element_size();
  at::parallel_for(0, in.numel(), 1 << 15, [&](int64_t begin, int64_t end) {
    rows(src + begin * size, dst + begin * size, end - begin, uint64_t(begin), seed, threshold, scale);
  });
  return out;
}

struct DropoutFunction : public torch::autograd::Function<DropoutFunction> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, double p,
                            int64_t seed) {
    ctx->saved_data["p"] = p;
    ctx->saved_data["seed"] = seed;
    return apply_dropout_pattern(x, p, uint64_t(seed));
  }
  static torch::autograd::tensor_list backward(torch::autograd::AutogradContext* ctx,
                                               torch::autograd::tensor_list grads) {
    const double p = ctx->saved_data["p"].toDouble();
    const auto seed = uint64_t(ctx->saved_data["seed"].toInt());
    // With create_graph the gradient must be differentiable itself: the
    // pattern as a tensor, times grad_out.
    if (at::GradMode::is_enabled())
      return {grads[0] * apply_dropout_pattern(at::ones_like(grads[0]), p, seed), at::Tensor(), at::Tensor()};
    return {apply_dropout_pattern(grads[0], p, seed), at::Tensor(), at::Tensor()};
  }
};

// GELU with the tanh approximation (GPT-2's gelu_new) on the CPU, forward
// (dy undefined) or backward, on an x that engine_runs took: the engine
// build for this CPU runs the rows (cpu/engine_api.h, GeluRowsFn).
at::Tensor gelu_tanh_pass(const at::Tensor& x, const at::Tensor& dy) {
  const at::Tensor in = x.contiguous();
  const at::Tensor grad = dy.defined() ? dy.to(in.scalar_type()).contiguous() : at::Tensor();
  at::Tensor out = at::empty_like(in);
  const cpu::GeluRowsFn rows = cpu::selected_engine().gelu_tanh_rows[rows_index(in.scalar_type())];
  const auto* src = static_cast<const char*>(in.const_data_ptr());
  const auto* g = grad.defined() ? static_cast<const char*>(grad.const_data_ptr()) : nullptr;
  auto* dst = static_cast<char*>(out.data_ptr());
  const int64_t size = in.element_size();
  at::parallel_for(0, in.numel(), 1 << 14, [&](int64_t begin, int64_t end) {
    rows(g != nullptr, src + begin * size, g ? g + begin * size : nullptr, dst + begin * size, end - begin);
  });
  return out;
}

struct GeluTanhFunction : public torch::autograd::Function<GeluTanhFunction> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x) {
    ctx->save_for_backward({x});
    return gelu_tanh_pass(x, at::Tensor());
  }
  static torch::autograd::tensor_list backward(torch::autograd::AutogradContext* ctx,
                                               torch::autograd::tensor_list grads) {
    const at::Tensor x = ctx->get_saved_variables()[0];
    // With create_graph the gradient must be differentiable itself: ATen's.
    if (at::GradMode::is_enabled()) return {at::gelu_backward(grads[0], x, "tanh")};
    return {gelu_tanh_pass(x, grads[0])};
  }
};

// Whether the engine's rows may stand in for ATen's op on x: a plain CPU
// tensor in eager mode. A tracer, torch.func's transforms, a Python dispatch
// mode or tensor subclass (FakeTensor) would not see raw-pointer rows, or
// have no data for them: ATen's op runs there.
bool engine_runs(const at::Tensor& x) {
  if (!x.device().is_cpu() || rows_index(x.scalar_type()) < 0) return false;
  if (torch::jit::tracer::isTracing() || at::functorch::maybeCurrentDynamicLayer().has_value()) return false;
  return !c10::impl::dispatch_mode_enabled() && !x.key_set().has(c10::DispatchKey::Python);
}

// Kinds that read every key (optionally masked or banded) and therefore give
// the same answer whether the keys come from a cache or not.
bool is_dense_family(AttentionKind kind) {
  switch (kind) {
    case AttentionKind::dense:
    case AttentionKind::alibi:
    case AttentionKind::rotary:
    case AttentionKind::t5:
    case AttentionKind::local:
      return true;
    default:
      return false;
  }
}

// torch::nn::Module keeps its parameter list protected; a member pointer taken
// through a derived class is the standard way to reach it from outside.
struct ParameterList : torch::nn::Module {
  static torch::OrderedDict<std::string, at::Tensor>& of(torch::nn::Module& m) {
    return m.*(&ParameterList::parameters_);
  }
};

// The member a torch::nn built-in's forward() reads for parameter `name`.
at::Tensor* builtin_member(torch::nn::Module& m, const std::string& name) {
  auto pick = [&](auto* impl) -> at::Tensor* {
    if (!impl) return nullptr;
    if (name == "weight") return &impl->weight;
    if (name == "bias") return &impl->bias;
    return nullptr;
  };
  if (auto* p = pick(m.as<torch::nn::LinearImpl>())) return p;
  if (auto* p = pick(m.as<torch::nn::LayerNormImpl>())) return p;
  if (auto* p = pick(m.as<torch::nn::Conv1dImpl>())) return p;
  if (auto* p = pick(m.as<torch::nn::Conv2dImpl>())) return p;
  if (auto* embedding = m.as<torch::nn::EmbeddingImpl>(); embedding && name == "weight")
    return &embedding->weight;
  return nullptr;
}

}  // namespace

at::Tensor* ParameterOwner::parameter_member(const std::string& name) {
  auto it = members_.find(name);
  return it == members_.end() ? nullptr : it->second;
}

at::Tensor& ParameterOwner::bind_parameter(torch::nn::Module& self, const std::string& name, at::Tensor value,
                                           at::Tensor& member) {
  member = self.register_parameter(name, std::move(value));
  members_[name] = &member;
  return member;
}

void replace_parameter(torch::nn::Module& module, const std::string& name, const at::Tensor& value) {
  at::Tensor* entry = ParameterList::of(module).find(name);
  TORCH_CHECK_VALUE(entry, "replace_parameter: ", module.name(), " has no parameter '", name, "'");
  TORCH_CHECK_VALUE(
      value.defined() == entry->defined(), "replace_parameter: parameter '", name, "' of ", module.name(),
      value.defined() ? " is absent (None) and must stay so" : " cannot be removed: its forward() reads it");
  if (!value.defined()) return;
  TORCH_CHECK_VALUE(value.sizes() == entry->sizes(), "replace_parameter: parameter '", name, "' of ",
                    module.name(), " has shape ", entry->sizes(), "; the replacement has shape ",
                    value.sizes());
  at::Tensor* member = nullptr;
  if (auto* owner = dynamic_cast<ParameterOwner*>(&module)) member = owner->parameter_member(name);
  if (!member) member = builtin_member(module, name);
  TORCH_CHECK(member, "replace_parameter: cannot find the member of ", module.name(), " that holds '", name,
              "' (a module's own parameters must be registered with bind_parameter)");
  *member = value;
  *entry = value;
}

void LayerCache::select_rows(const at::Tensor& rows) {
  if (!k.defined()) return;
  const auto index = rows.to(k.device(), at::kLong);
  k = k.index_select(0, index);
  v = v.index_select(0, index);
}

at::Tensor sinusoidal_positions(int64_t n, int64_t channels, int64_t offset, at::TensorOptions options) {
  auto pos = at::arange(offset, offset + n, options.dtype(at::kDouble)).unsqueeze(1);
  auto i = at::arange(0, (channels + 1) / 2, options.dtype(at::kDouble));
  auto angle = pos * at::exp(i * (-std::log(10000.0) * 2.0 / double(channels)));
  auto table = at::stack({angle.sin(), angle.cos()}, 2).reshape({n, -1}).narrow(1, 0, channels);
  return table.to(options.dtype());
}

at::Tensor activation(Activation kind, const at::Tensor& x) {
  switch (kind) {
    case Activation::gelu:
      return at::gelu(x);
    case Activation::gelu_tanh:
      // ATen's CPU tanh GELU costs about 3x its exact one (its vectorised
      // tanh); the engine's rows compute it with one exp.
      return engine_runs(x) ? GeluTanhFunction::apply(x) : at::gelu(x, "tanh");
    case Activation::relu:
      return at::relu(x);
  }
  TORCH_CHECK(false, "activation: unknown kind ", static_cast<int>(kind));
}

torch::nn::LayerNorm layer_norm(const ModelConfig& config) {
  return torch::nn::LayerNorm(torch::nn::LayerNormOptions({config.hidden_size}).eps(config.layer_norm_eps));
}

// ---------------------------------------------------------------------------
MultiHeadAttentionImpl::MultiHeadAttentionImpl(const ModelConfig& config, const AttentionConfig& attention,
                                               bool cross)
    : attention_(attention),
      hidden_(config.hidden_size),
      heads_(config.num_heads),
      kv_heads_(config.kv_heads()),
      head_dim_(config.head_dim()),
      max_positions_(config.max_position_embeddings),
      dropout_p_(config.attention_dropout),
      cross_(cross),
      rotate_(!cross && (attention.kind == AttentionKind::rotary ||
                         config.position_embedding == PositionEmbedding::rotary)) {
  TORCH_CHECK(!cross || attention.kind == AttentionKind::dense || attention.kind == AttentionKind::linear,
              "attention: cross-attention takes kind \"dense\" or \"linear\", got \"", attention.kind, "\"");
  const bool bias = config.qkv_bias;
  const int64_t q_out = heads_ * head_dim_, kv_out = kv_heads_ * head_dim_;
  const bool shared_qk = attention_.kind == AttentionKind::lsh;
  if (config.fused_qkv && !cross) {
    qkv_proj = register_module(
        "qkv_proj",
        torch::nn::Linear(
            torch::nn::LinearOptions(hidden_, q_out + (shared_qk ? 0 : kv_out) + kv_out).bias(bias)));
  } else {
    q_proj =
        register_module("q_proj", torch::nn::Linear(torch::nn::LinearOptions(hidden_, q_out).bias(bias)));
    if (!shared_qk)
      k_proj =
          register_module("k_proj", torch::nn::Linear(torch::nn::LinearOptions(hidden_, kv_out).bias(bias)));
    v_proj =
        register_module("v_proj", torch::nn::Linear(torch::nn::LinearOptions(hidden_, kv_out).bias(bias)));
  }
  out_proj = register_module("out_proj", torch::nn::Linear(q_out, hidden_));
  const auto& a = attention_;
  if (a.kind == AttentionKind::t5) {
    bind_parameter(*this, "t5_bias", at::randn({a.num_buckets, heads_}) * 0.02, t5_bias);
  } else if (a.kind == AttentionKind::shaw) {
    bind_parameter(*this, "shaw_rel_k", at::randn({2 * a.max_distance + 1, head_dim_}) * 0.02, shaw_rel_k);
    bind_parameter(*this, "shaw_rel_v", at::randn({2 * a.max_distance + 1, head_dim_}) * 0.02, shaw_rel_v);
  } else if (a.kind == AttentionKind::linformer) {
    const double std = 1.0 / std::sqrt(double(a.projected_length));
    bind_parameter(*this, "linformer_e", at::randn({a.projected_length, max_positions_}) * std, linformer_e);
    if (!a.share_kv_projection)
      bind_parameter(*this, "linformer_f", at::randn({a.projected_length, max_positions_}) * std,
                     linformer_f);
  }
}

bool MultiHeadAttentionImpl::supports_kv_cache() const {
  return is_dense_family(attention_.kind) || attention_.kind == AttentionKind::shaw ||
         attention_.kind == AttentionKind::block_sparse;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> MultiHeadAttentionImpl::project(
    const at::Tensor& x, const AttentionInputs& inputs) {
  TORCH_CHECK(x.dim() == 3 && x.size(2) == hidden_, "attention: input must have shape (B, N, ", hidden_,
              "), got ", x.sizes());
  TORCH_CHECK(!cross_ || inputs.context != nullptr, "attention: a cross-attention layer needs a context");
  const at::Tensor& source = cross_ ? *inputs.context : x;
  TORCH_CHECK(!cross_ || (source.dim() == 3 && source.size(0) == x.size(0) && source.size(2) == hidden_),
              "attention: context must have shape (B, Nk, ", hidden_, "), got ", source.sizes());
  const int64_t B = x.size(0), N = x.size(1), Nk = source.size(1);
  at::Tensor q, k, v;
  if (qkv_proj) {
    const int64_t q_out = heads_ * head_dim_, kv_out = kv_heads_ * head_dim_;
    // One split rather than three narrows: its backward concatenates the
    // three gradients, where each narrow's would zero-fill a full-width
    // buffer and the three be summed.
    const bool shared_qk = attention_.kind == AttentionKind::lsh;
    auto parts = shared_qk ? qkv_proj(x).split_with_sizes({q_out, kv_out}, 2)
                           : qkv_proj(x).split_with_sizes({q_out, kv_out, kv_out}, 2);
    q = parts[0];
    k = shared_qk ? q : parts[1];
    v = parts.back();
  } else {
    q = q_proj(x);
    k = k_proj ? k_proj(source) : q;
    v = v_proj(source);
  }
  q = q.view({B, N, heads_, head_dim_}).transpose(1, 2);
  k = k.view({B, Nk, k.size(2) / head_dim_, head_dim_}).transpose(1, 2);
  v = v.view({B, Nk, kv_heads_, head_dim_}).transpose(1, 2);
  return {q, k, v};
}

at::Tensor MultiHeadAttentionImpl::block_layout(int64_t nq, int64_t nk, bool causal,
                                                const at::Device& device) {
  // The layout is built once for the longest sequence and sliced, so that a
  // prefix sees the same blocks at every length (BigBird's random blocks
  // would otherwise change with the length, and cached decoding with them).
  const auto& a = attention_;
  const int64_t nkb = (nk + a.block_size - 1) / a.block_size;
  const int64_t nb = std::max(nkb, (max_positions_ + a.block_size - 1) / a.block_size);
  std::lock_guard<std::mutex> lock(layout_mutex_);  // one module may serve several threads
  if (!layout_.defined() || layout_.size(1) < nb || layout_causal_ != causal) {
    switch (a.layout) {
      case BlockLayout::local:
        layout_ = layouts::local(nb, nb, a.layout_window, causal);
        break;
      case BlockLayout::bigbird:
        layout_ =
            layouts::bigbird(nb, nb, a.layout_window, a.num_global, a.num_random, heads_, a.seed, causal);
        break;
      case BlockLayout::fixed:
        layout_ = layouts::fixed(nb, a.stride, a.num_summary, causal);
        break;
      case BlockLayout::strided:
        layout_ = layouts::strided(nb, a.stride, causal);
        break;
    }
    layout_causal_ = causal;
  }
  if (layout_.device() != device) layout_ = layout_.to(device);  // kept where the inputs live
  // Query blocks stand bottom-right: one new token after a cache is the last block's row.
  TORCH_CHECK(nq == nk || nq == 1, "attention: block_sparse with a cache takes one new token at a time, got ",
              nq);
  const int64_t nqb = nq == nk ? nkb : 1;
  return layout_.narrow(1, nkb - nqb, nqb).narrow(2, 0, nkb);
}

at::Tensor MultiHeadAttentionImpl::attend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                          const AttentionInputs& inputs) {
  const auto& a = attention_;
  const double p = is_training() ? dropout_p_ : 0.0;
  const bool causal = inputs.causal;
  const int64_t B = q.size(0), Nq = q.size(2), Nk = k.size(2);
  if (is_dense_family(a.kind)) return ops::attention(q, k, v, dense_options(q, k, inputs).dropout_p(p));
  std::optional<at::Tensor> mask4;
  if (inputs.key_padding_mask) mask4 = inputs.key_padding_mask->view({B, 1, 1, Nk});
  // The remaining kinds take keys with as many heads as the queries.
  const int64_t groups = heads_ / kv_heads_;
  const bool native_gqa = a.kind == AttentionKind::linear;
  const at::Tensor kr = groups > 1 && !native_gqa ? k.repeat_interleave(groups, 1) : k;
  const at::Tensor vr = groups > 1 && !native_gqa ? v.repeat_interleave(groups, 1) : v;
  switch (a.kind) {
    case AttentionKind::shaw:
      return ops::shaw_attention(q, kr, vr, shaw_rel_k, shaw_rel_v, a.max_distance, mask4, causal, p);
    case AttentionKind::block_sparse:
      return ops::block_sparse_attention(q, kr, vr, block_layout(Nq, Nk, causal, q.device()), a.block_size,
                                         causal, mask4, p);
    case AttentionKind::linformer:
      TORCH_CHECK(Nk <= max_positions_,
                  "attention: linformer projects at most max_position_embeddings = ", max_positions_,
                  " keys, got ", Nk);
      if (causal) return causal_linformer(q, kr, vr, inputs.key_padding_mask, p);
      return ops::linformer_attention(
          q, kr, vr, linformer_e,
          linformer_f.defined() ? std::optional<at::Tensor>(linformer_f) : std::nullopt,
          inputs.key_padding_mask, p);
    case AttentionKind::lsh: {
      // Reformer draws fresh random rotations at every call; the number of
      // buckets follows the length (two per bucket_size tokens, at least 2).
      int64_t buckets = std::max<int64_t>(2, (Nk + a.bucket_size - 1) / a.bucket_size);
      buckets += buckets % 2;
      // Drawn by the CPU generator on every device, so that torch.manual_seed
      // gives the same rotations (and outputs) on the CPU and on a GPU.
      auto rotations =
          at::randn({head_dim_, a.n_hashes, buckets / 2}, q.options().device(at::kCPU)).to(q.device());
      return std::get<0>(
          ops::lsh_attention(q, vr, rotations, a.bucket_size, causal, inputs.key_padding_mask, p));
    }
    case AttentionKind::linear:
      return ops::linear_attention(q, kr, vr, attnzoo::name(a.feature_map), causal, inputs.key_padding_mask);
    case AttentionKind::longformer: {
      // The global tokens that exist at this length.
      std::vector<int64_t> global;
      for (int64_t t : a.global_tokens)
        if (t < Nk && std::find(global.begin(), global.end(), t) == global.end()) global.push_back(t);
      return ops::longformer_attention(q, kr, vr, a.window, at::tensor(global, at::kLong),
                                       inputs.key_padding_mask, p);
    }
    case AttentionKind::dense:
    case AttentionKind::alibi:
    case AttentionKind::rotary:
    case AttentionKind::t5:
    case AttentionKind::local:
      break;  // handled above
  }
  TORCH_CHECK(false, "attention: kind ", a.kind, " reached no op");
}

at::Tensor MultiHeadAttentionImpl::causal_linformer(const at::Tensor& q, const at::Tensor& k,
                                                    const at::Tensor& v,
                                                    const std::optional<at::Tensor>& key_padding_mask,
                                                    double p) {
  // Linformer's projection mixes every position, so a causal model cannot
  // use it as is. Here each query attends exactly to the earlier tokens of
  // its own chunk and to the Linformer projection (E, F) of all the chunks
  // before it; the two attentions merge exactly through their log-sum-exps.
  // Cost O(N (chunk + projected_length) D): linear in N.
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), Dv = v.size(3);
  const int64_t c = attention_.chunk_size, nb = (N + c - 1) / c, Np = nb * c,
                Kp = attention_.projected_length;
  auto pad = [&](const at::Tensor& t) { return Np == N ? t : at::constant_pad_nd(t, {0, 0, 0, Np - N}); };
  auto chunks = [&](const at::Tensor& t) {  // (B, H, Np, d) -> (B * nb, H, c, d)
    return pad(t).view({B, H, nb, c, t.size(3)}).transpose(1, 2).reshape({B * nb, H, c, t.size(3)});
  };
  auto keep = key_padding_mask ? at::constant_pad_nd(key_padding_mask->to(at::kBool), {0, Np - N}, 0)
                               : at::ones({B, Np}, q.options().dtype(at::kBool));
  // Within the chunk: exact causal attention (padding keys sit after every real query).
  auto [out_local, lse_local] = ops::attention_with_lse(
      chunks(q), chunks(k), chunks(v),
      ops::AttentionOptions().causal(true).dropout_p(p).mask(keep.view({B * nb, 1, 1, c})));
  // Earlier chunks: per-chunk projections E[:, chunk] k_chunk, summed over the chunks before.
  auto project = [&](const at::Tensor& P, const at::Tensor& x) {
    auto Pc =
        at::constant_pad_nd(P.narrow(1, 0, N), {0, Np - N}).view({Kp, nb, c}).transpose(0, 1);  // (nb, Kp, c)
    auto xs = (pad(x) * keep.view({B, 1, Np, 1}).to(x.scalar_type())).view({B, H, nb, c, x.size(3)});
    auto per_chunk = at::matmul(Pc.to(x.scalar_type()), xs);  // (B, H, nb, Kp, d)
    auto before = per_chunk.cumsum(2) - per_chunk;
    return before.transpose(1, 2).reshape({B * nb, H, Kp, x.size(3)});
  };
  auto has_past = (at::arange(nb, q.options().dtype(at::kLong)) > 0).repeat({B}).view({B * nb, 1, 1, 1});
  auto [out_past, lse_past] = ops::attention_with_lse(
      chunks(q), project(linformer_e, k), project(linformer_f.defined() ? linformer_f : linformer_e, v),
      ops::AttentionOptions().dropout_p(p).mask(has_past.expand({B * nb, 1, 1, Kp})));
  auto lse = at::logaddexp(lse_local, lse_past);
  auto weight = [&](const at::Tensor& part) {
    return (part - lse).exp().nan_to_num(0.0).unsqueeze(-1).to(q.scalar_type());
  };
  auto out = out_local * weight(lse_local) + out_past * weight(lse_past);  // (B * nb, H, c, Dv)
  return out.view({B, nb, H, c, Dv}).transpose(1, 2).reshape({B, H, Np, Dv}).narrow(2, 0, N);
}

at::Tensor MultiHeadAttentionImpl::forward(const at::Tensor& x, const AttentionInputs& inputs) {
  at::Tensor q, k, v;
  LayerCache* context_cache = cross_ ? inputs.cache : nullptr;
  if (context_cache &&
      context_cache->context_k.defined()) {  // the context's keys and values, projected before
    TORCH_CHECK(x.dim() == 3 && x.size(2) == hidden_, "attention: input must have shape (B, N, ", hidden_,
                "), got ", x.sizes());
    TORCH_CHECK(context_cache->context_k.size(0) == x.size(0), "attention: input has batch ", x.size(0),
                " but the cached context has batch ", context_cache->context_k.size(0));
    q = q_proj(x).view({x.size(0), x.size(1), heads_, head_dim_}).transpose(1, 2);
    k = context_cache->context_k;
    v = context_cache->context_v;
  } else {
    std::tie(q, k, v) = project(x, inputs);
    if (context_cache) {
      context_cache->context_k = k;
      context_cache->context_v = v;
    }
  }
  const int64_t past = inputs.cache && !cross_ ? inputs.cache->length() : 0;
  if (rotate_) std::tie(q, k) = rotate(q, k, past);
  if (inputs.cache && !cross_) {
    TORCH_CHECK(past == 0 || supports_kv_cache(), "attention: kind \"", attention_.kind,
                "\" cannot continue from a KV cache");
    if (past > 0) {
      k = at::cat({inputs.cache->k, k}, 2);
      v = at::cat({inputs.cache->v, v}, 2);
    }
    inputs.cache->k = k;
    inputs.cache->v = v;
  }
  if (inputs.attention_maps) {
    // From the very queries and keys attend() uses: rotated, after the cache.
    at::NoGradGuard no_grad;
    inputs.attention_maps->push_back(
        forms_probabilities() ? ops::attention_weights(q, k, v, dense_options(q, k, inputs)) : at::Tensor());
  }
  auto out = attend(q, k, v, inputs);
  return out_proj(out.transpose(1, 2).reshape({x.size(0), x.size(1), heads_ * head_dim_}));
}

bool MultiHeadAttentionImpl::forms_probabilities() const { return is_dense_family(attention_.kind); }

std::pair<at::Tensor, at::Tensor> MultiHeadAttentionImpl::rotate(const at::Tensor& q, const at::Tensor& k,
                                                                 int64_t past) const {
  const auto& a = attention_;
  const std::optional<int64_t> dim = a.rotary_dim > 0 ? std::optional<int64_t>(a.rotary_dim) : std::nullopt;
  return {ops::rotary(q, std::nullopt, past, a.rotary_base, dim),
          ops::rotary(k, std::nullopt, past, a.rotary_base, dim)};
}

ops::AttentionOptions MultiHeadAttentionImpl::dense_options(const at::Tensor& q, const at::Tensor& k,
                                                            const AttentionInputs& inputs) const {
  const auto& a = attention_;
  const bool causal = inputs.causal;
  auto options = ops::AttentionOptions().causal(causal);
  if (inputs.key_padding_mask) options.mask(inputs.key_padding_mask->view({q.size(0), 1, 1, k.size(2)}));
  if (a.kind == AttentionKind::alibi) options.alibi_slopes(ops::alibi_slopes(heads_).to(q.scalar_type()));
  if (a.kind == AttentionKind::t5)
    options.t5_table(t5_bias).t5_bidirectional(!causal).t5_max_distance(a.max_distance);
  if (a.kind == AttentionKind::local)
    options.window(ops::AttentionOptions::Window{a.window, causal ? 0 : a.window});
  return options;
}

// ---------------------------------------------------------------------------
FeedForwardImpl::FeedForwardImpl(const ModelConfig& config) : activation_(config.activation) {
  fc_in = register_module("fc_in", torch::nn::Linear(config.hidden_size, config.ffn_size()));
  fc_out = register_module("fc_out", torch::nn::Linear(config.ffn_size(), config.hidden_size));
}

at::Tensor FeedForwardImpl::forward(const at::Tensor& x) { return fc_out(activation(activation_, fc_in(x))); }

// ---------------------------------------------------------------------------
ConvModuleImpl::ConvModuleImpl(const ModelConfig& config) {
  const int64_t C = config.hidden_size, k = config.conv_kernel_size;
  pointwise_in = register_module("pointwise_in", torch::nn::Conv1d(torch::nn::Conv1dOptions(C, 2 * C, 1)));
  depthwise = register_module("depthwise",
                              torch::nn::Conv1d(torch::nn::Conv1dOptions(C, C, k).padding(k / 2).groups(C)));
  depthwise_norm = register_module("depthwise_norm", layer_norm(config));
  pointwise_out = register_module("pointwise_out", torch::nn::Conv1d(torch::nn::Conv1dOptions(C, C, 1)));
  dropout = register_module("dropout", Dropout(config.dropout));
}

at::Tensor ConvModuleImpl::forward(const at::Tensor& x, const std::optional<at::Tensor>& key_padding_mask) {
  auto h = at::glu(pointwise_in(x.transpose(1, 2)), 1);  // (B, C, N)
  if (key_padding_mask) h = h.masked_fill(key_padding_mask->logical_not().unsqueeze(1), 0.0);
  h = depthwise_norm(depthwise(h).transpose(1, 2));  // (B, N, C)
  h = pointwise_out(at::silu(h).transpose(1, 2)).transpose(1, 2);
  return dropout(h);
}

at::Tensor DropoutImpl::forward(const at::Tensor& x) {
  if (!is_training() || p_ <= 0) return x;
  if (!x.device().is_cpu()) return torch::dropout(x, p_, true);
  return DropoutFunction::apply(x, p_, ops::detail::fresh_seed().item<int64_t>());
}

// ---------------------------------------------------------------------------
TransformerBlockImpl::TransformerBlockImpl(const ModelConfig& config, const AttentionConfig& attention,
                                           const std::optional<AttentionConfig>& cross_attention, bool conv)
    : pre_norm_(config.norm == Norm::pre) {
  attn = register_module("attn", MultiHeadAttention(config, attention));
  attn_norm = register_module("attn_norm", layer_norm(config));
  if (cross_attention) {
    cross_attn = register_module("cross_attn", MultiHeadAttention(config, *cross_attention, /*cross=*/true));
    cross_attn_norm = register_module("cross_attn_norm", layer_norm(config));
  }
  if (conv) {
    conv_module = register_module("conv_module", ConvModule(config));
    conv_norm = register_module("conv_norm", layer_norm(config));
  }
  mlp = register_module("mlp", FeedForward(config));
  mlp_norm = register_module("mlp_norm", layer_norm(config));
  dropout = register_module("dropout", Dropout(config.dropout));
}

template <typename F>
at::Tensor TransformerBlockImpl::residual(const at::Tensor& x, torch::nn::LayerNorm& norm, F&& f) {
  return pre_norm_ ? x + f(norm(x)) : norm(x + f(x));
}

at::Tensor TransformerBlockImpl::forward(const at::Tensor& x, const AttentionInputs& inputs) {
  AttentionInputs self_inputs = inputs;
  self_inputs.context = nullptr;
  self_inputs.cross_attention_maps = nullptr;
  auto h = residual(x, attn_norm, [&](const at::Tensor& y) { return dropout(attn(y, self_inputs)); });
  if (cross_attn) {
    const bool cached = inputs.cache && inputs.cache->context_k.defined();
    TORCH_CHECK(inputs.context != nullptr || cached,
                "transformer block: this block has cross-attention and needs a context");
    AttentionInputs cross_inputs;
    cross_inputs.context = inputs.context;
    cross_inputs.key_padding_mask = inputs.context_padding_mask;
    cross_inputs.cache = inputs.cache;  // the context's keys and values live in the layer's cache
    cross_inputs.attention_maps = inputs.cross_attention_maps;
    h = residual(h, cross_attn_norm,
                 [&](const at::Tensor& y) { return dropout(cross_attn(y, cross_inputs)); });
  }
  if (conv_module)
    h = residual(h, conv_norm, [&](const at::Tensor& y) { return conv_module(y, inputs.key_padding_mask); });
  return residual(h, mlp_norm, [&](const at::Tensor& y) { return dropout(mlp(y)); });
}

}  // namespace attnzoo::nn
