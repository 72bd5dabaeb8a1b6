// The schemas of every attnzoo op: the one TORCH_LIBRARY. Kernels register
// beside their implementations: CPU in cpu/, autograd in autograd/, meta and
// composite ones in the op's own file (docs/design.md, "Layout of the ops").
#include <torch/library.h>

#include <string>

#include "attnzoo/ops/op_support.h"

TORCH_LIBRARY(attnzoo, m) {
  // The options of attention (attention.h, ATTNZOO_ATTENTION_OPTIONS), as schema text.
  const std::string options = attnzoo::ops::detail::attention_options_schema();
  auto def = [&](const std::string& schema) { m.def(schema.c_str()); };

  def("attention(Tensor q, Tensor k, Tensor v, *, " + options + ") -> (Tensor out, Tensor lse)");
  def("attention_weights(Tensor q, Tensor k, Tensor v, *, " + options + ") -> Tensor");
  // Below autograd: the forward with its dropout seed, and the backward that
  // recomputes the probabilities tile by tile. output_mask says which option
  // gradients to compute: bias, t5_table, shaw_k, shaw_v.
  def("_attention_forward(Tensor q, Tensor k, Tensor v, *, " + options +
      ", Tensor? seed=None) -> (Tensor out, Tensor lse)");
  def("_attention_backward(Tensor grad_out, Tensor? grad_lse, Tensor q, Tensor k, Tensor v, Tensor out, "
      "Tensor lse, *, " +
      options +
      ", Tensor? seed=None, bool[4] output_mask) -> (Tensor grad_q, Tensor grad_k, "
      "Tensor grad_v, Tensor grad_bias, Tensor grad_t5_table, Tensor grad_shaw_k, Tensor grad_shaw_v)");

  m.def("alibi_slopes(int num_heads) -> Tensor");
  m.def(
      "t5_relative_bucket(Tensor relative_position, bool bidirectional=True, "
      "int num_buckets=32, int max_distance=128) -> Tensor");
  m.def(
      "rotary(Tensor x, Tensor? positions=None, int offset=0, float base=10000.0, "
      "int? rotary_dim=None, bool interleaved=False) -> Tensor");
  m.def(
      "linformer_attention(Tensor q, Tensor k, Tensor v, Tensor E, Tensor? F=None, *, "
      "Tensor? key_mask=None, float dropout_p=0.0, float? scale=None, bool causal=False) -> Tensor");
  m.def(
      "block_sparse_attention(Tensor q, Tensor k, Tensor v, Tensor layout, int block_size, *, "
      "bool causal=False, Tensor? mask=None, float dropout_p=0.0, float? scale=None) -> Tensor");
  m.def(
      "shaw_attention(Tensor q, Tensor k, Tensor v, Tensor rel_k, Tensor? rel_v, int max_distance, "
      "*, Tensor? mask=None, bool causal=False, float dropout_p=0.0, float? scale=None) -> Tensor");
  m.def(
      "lsh_attention(Tensor qk, Tensor v, Tensor rotations, int bucket_size, *, bool causal=False, "
      "Tensor? key_mask=None, float dropout_p=0.0) -> (Tensor out, Tensor buckets)");
  m.def(
      "_lsh_forward(Tensor qk, Tensor v, Tensor rotations, int bucket_size, *, bool causal=False, "
      "Tensor? key_mask=None, float dropout_p=0.0, Tensor? seed=None) "
      "-> (Tensor out, Tensor lse, Tensor buckets)");
  m.def(
      "_lsh_backward(Tensor grad_out, Tensor qk, Tensor v, Tensor rotations, Tensor out, Tensor lse, "
      "int bucket_size, *, bool causal=False, Tensor? key_mask=None, float dropout_p=0.0, "
      "Tensor? seed=None) -> (Tensor grad_qk, Tensor grad_v)");
  m.def(
      "longformer_attention(Tensor q, Tensor k, Tensor v, int window, Tensor global_tokens, *, "
      "Tensor? key_mask=None, float dropout_p=0.0, float? scale=None) -> Tensor");
  m.def("layout_local(int num_q_blocks, int num_k_blocks, int window, bool causal=False) -> Tensor");
  m.def(
      "layout_bigbird(int num_q_blocks, int num_k_blocks, int window=1, int num_global=1, "
      "int num_random=2, int num_heads=1, int seed=0, bool causal=False) -> Tensor");
  m.def("layout_fixed(int num_blocks, int stride, int num_summary=1, bool causal=True) -> Tensor");
  m.def("layout_strided(int num_blocks, int stride, bool causal=True) -> Tensor");
  m.def("layout_longformer(int num_blocks, int window, int[] global_blocks, bool causal=False) -> Tensor");
  m.def(
      "linear_attention(Tensor q, Tensor k, Tensor v, *, str feature_map=\"elu+1\", "
      "bool causal=False, Tensor? key_mask=None) -> Tensor");
  m.def("_causal_linear(Tensor q, Tensor k, Tensor v, int feature_map=0) -> Tensor");
  m.def(
      "_causal_linear_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, int feature_map=0) "
      "-> (Tensor grad_q, Tensor grad_k, Tensor grad_v)");
}
