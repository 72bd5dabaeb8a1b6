// The schemas of every attnzoo op: the one TORCH_LIBRARY. Kernels register
// beside their implementations (attention.cpp, composite_ops.cpp, autograd/).
#include <torch/library.h>

#define ATTNZOO_SCORE_ARGS                                                                 \
  "Tensor? mask=None, Tensor? bias=None, bool causal=False, int[]? window=None, "          \
  "Tensor? alibi_slopes=None, float dropout_p=0.0, float? scale=None"
// layout / block_size make the op block-sparse (block_sparse_attention);
// shaw_k / shaw_v / shaw_max_distance add Shaw relative positions
// (shaw_attention).
#define ATTNZOO_T5_ARGS                                                                 \
  "Tensor? t5_table=None, bool t5_bidirectional=True, int t5_max_distance=128, "        \
  "Tensor? layout=None, int block_size=0, Tensor? shaw_k=None, Tensor? shaw_v=None, "   \
  "int shaw_max_distance=0"
#define ATTNZOO_INTERNAL_SCORE_ARGS                                                         \
  "Tensor? mask=None, Tensor? bias=None, Tensor? rel_bias=None, bool causal=False, "         \
  "int[]? window=None, Tensor? alibi_slopes=None, float dropout_p=0.0, float? scale=None, " \
  "Tensor? seed=None, Tensor? layout=None, int block_size=0, Tensor? shaw_k=None, "           \
  "Tensor? shaw_v=None, int shaw_max_distance=0"

TORCH_LIBRARY(attnzoo, m) {
  m.def("attention(Tensor q, Tensor k, Tensor v, *, " ATTNZOO_SCORE_ARGS ", " ATTNZOO_T5_ARGS
        ") -> (Tensor out, Tensor lse)");
  m.def("attention_weights(Tensor q, Tensor k, Tensor v, *, " ATTNZOO_SCORE_ARGS
        ", " ATTNZOO_T5_ARGS ") -> Tensor");
  m.def("_attention_forward(Tensor q, Tensor k, Tensor v, *, " ATTNZOO_INTERNAL_SCORE_ARGS
        ") -> (Tensor out, Tensor lse)");
  m.def("_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, "
        "Tensor lse, *, " ATTNZOO_INTERNAL_SCORE_ARGS
        ", bool bias_requires_grad=False, bool rel_bias_requires_grad=False, "
        "bool shaw_k_requires_grad=False, bool shaw_v_requires_grad=False, Tensor? grad_lse=None) "
        "-> (Tensor grad_q, "
        "Tensor grad_k, Tensor grad_v, Tensor grad_bias, Tensor grad_rel_bias, Tensor grad_shaw_k, "
        "Tensor grad_shaw_v)");
  m.def("alibi_slopes(int num_heads) -> Tensor");
  m.def("t5_relative_bucket(Tensor relative_position, bool bidirectional=True, "
        "int num_buckets=32, int max_distance=128) -> Tensor");
  m.def("rotary(Tensor x, Tensor? positions=None, int offset=0, float base=10000.0, "
        "int? rotary_dim=None, bool interleaved=False) -> Tensor");
  m.def("linformer_attention(Tensor q, Tensor k, Tensor v, Tensor E, Tensor? F=None, *, "
        "Tensor? key_mask=None, float dropout_p=0.0, float? scale=None, bool causal=False) -> Tensor");
  m.def("block_sparse_attention(Tensor q, Tensor k, Tensor v, Tensor layout, int block_size, *, "
        "bool causal=False, Tensor? mask=None, float dropout_p=0.0, float? scale=None) -> Tensor");
  m.def("shaw_attention(Tensor q, Tensor k, Tensor v, Tensor rel_k, Tensor? rel_v, int max_distance, "
        "*, Tensor? mask=None, bool causal=False, float dropout_p=0.0, float? scale=None) -> Tensor");
  m.def("lsh_attention(Tensor qk, Tensor v, Tensor rotations, int bucket_size, *, bool causal=False, "
        "Tensor? key_mask=None, float dropout_p=0.0) -> (Tensor out, Tensor buckets)");
  m.def("_lsh_forward(Tensor qk, Tensor v, Tensor rotations, int bucket_size, *, bool causal=False, "
        "Tensor? key_mask=None, float dropout_p=0.0, Tensor? seed=None) "
        "-> (Tensor out, Tensor lse, Tensor buckets)");
  m.def("_lsh_backward(Tensor grad_out, Tensor qk, Tensor v, Tensor rotations, Tensor out, Tensor lse, "
        "int bucket_size, *, bool causal=False, Tensor? key_mask=None, float dropout_p=0.0, "
        "Tensor? seed=None) -> (Tensor grad_qk, Tensor grad_v)");
  m.def("longformer_attention(Tensor q, Tensor k, Tensor v, int window, Tensor global_tokens, *, "
        "Tensor? key_mask=None, float dropout_p=0.0, float? scale=None) -> Tensor");
  m.def("layout_local(int num_q_blocks, int num_k_blocks, int window, bool causal=False) -> Tensor");
  m.def("layout_bigbird(int num_q_blocks, int num_k_blocks, int window=1, int num_global=1, "
        "int num_random=2, int num_heads=1, int seed=0, bool causal=False) -> Tensor");
  m.def("layout_fixed(int num_blocks, int stride, int num_summary=1, bool causal=True) -> Tensor");
  m.def("layout_strided(int num_blocks, int stride, bool causal=True) -> Tensor");
  m.def("layout_longformer(int num_blocks, int window, int[] global_blocks, bool causal=False) -> Tensor");
  m.def("linear_attention(Tensor q, Tensor k, Tensor v, *, str feature_map=\"elu+1\", "
        "bool causal=False, Tensor? key_mask=None) -> Tensor");
}

