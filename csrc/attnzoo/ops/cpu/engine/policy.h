#pragma once
// What a policy is: the one place that lists every hook the passes call.
//
// The passes (passes.h) walk (batch, head, block) work items and call the
// policy for everything that differs between attention kinds. A policy is a
// struct over the compute type T; DensePolicy is the full one, and the others
// (BlockSparsePolicy, ShawPolicy) derive from it and redefine some hooks.
//
// Geometry: which tiles are visited.
//   block_q()                     query rows of a forward / probabilities item
//   block_k()                     key columns of a backward item
//   max_key_tile()                the widest key tile for_each_key_tile hands out
//   max_query_tile()              the tallest query tile for_each_query_tile hands out
//   for_each_key_tile(b, h, q0, mq, fn)    calls fn(k0, nk) for the key tiles a
//                                 query block [q0, q0+mq) sees; keys outside
//                                 them are never touched and cost nothing
//   for_each_query_tile(b, h, k0, nk, fn)  the same seen from a key block
// Scores: what is added to q k^T.
//   modify_scores(b, h, q0, mq, k0, nk, s, ld) const
//                                 adds to a tile of scaled scores s (mq x nk,
//                                 row stride ld) and writes -inf where a key
//                                 is not visible; every pass calls it
// Forward (and probabilities): for kinds that add to the output or keep
// per-tile state; no-ops by default.
//   begin_query_tile(b, h, q0, mq, q_tile)  before the key tiles of a query block
//   on_rescale(r, alpha)          row r's running output was scaled by alpha
//   on_probs(r, p_row, i, k0, nk) row r's (dropped) probabilities for a key tile
//   end_query_tile(out, ld, mq)   after the key tiles, before normalisation
// Backward: no-ops by default.
//   begin_pair(b, h, q0, mq, k0, nk, q_tile, dout_tile)  per (query tile, key block)
//   modify_dp(q0, mq, k0, nk, dp, ld)  adds to dp = dout v^T before the softmax gradient
//   accumulate_value_grad(b, h, q0, mq, k0, nk, p_used, ld, dout_tile)
//                                 gradients of what on_probs / end_query_tile added
//   wants_score_grad()            whether accumulate_score_grad is called at all
//   accumulate_score_grad(b, h, q0, mq, k0, nk, ds, ld, q_tile, dq_tile)
//                                 routes the score gradient ds to what
//                                 modify_scores added (bias, tables, dq terms)
//
// Each policy lists the hooks it defines in kOverrides, and the passes check
// the list against the struct at compile time: a misspelt hook (which C++
// name hiding would otherwise let fall back to the base's behaviour without a
// word) or an unlisted one is a compile error naming the hook. This is a
// static check over plain structs rather than virtual functions with
// `override`, which would cost an indirect call per tile and row, or C++20
// concepts, which can require a hook but not tell a defined one from an
// inherited one.
#include <cstdint>
#include <type_traits>

namespace attnzoo::cpu {
inline namespace CPU_CAPABILITY {

// clang-format off
#define ATTNZOO_POLICY_HOOKS(X) \
  X(block_q) \
  X(block_k) \
  X(max_key_tile) \
  X(max_query_tile) \
  X(for_each_key_tile) \
  X(for_each_query_tile) \
  X(modify_scores) \
  X(begin_query_tile) \
  X(on_rescale) \
  X(on_probs) \
  X(end_query_tile) \
  X(begin_pair) \
  X(modify_dp) \
  X(accumulate_value_grad) \
  X(wants_score_grad) \
  X(accumulate_score_grad)
// clang-format on

enum class Hook : uint32_t {
#define ATTNZOO_HOOK_ENUM(name) name,
  ATTNZOO_POLICY_HOOKS(ATTNZOO_HOOK_ENUM)
#undef ATTNZOO_HOOK_ENUM
};

// kOverrides = hooks(Hook::modify_scores, Hook::begin_pair, ...)
template <class... H>
constexpr uint32_t hooks(H... h) {
  return (0u | ... | (1u << static_cast<uint32_t>(h)));
}

// The do-nothing hooks every policy starts from.
template <typename T>
struct PolicyHooks {
  void begin_query_tile(int64_t, int64_t, int64_t, int64_t, const T*) {}
  void on_rescale(int64_t, T) {}
  void on_probs(int64_t, const T*, int64_t, int64_t, int64_t) {}
  void end_query_tile(T*, int64_t, int64_t) {}
  void begin_pair(int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, const T*, const T*) {}
  void modify_dp(int64_t, int64_t, int64_t, int64_t, T*, int64_t) {}
  void accumulate_value_grad(int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, const T*, int64_t,
                             const T*) {}
};

namespace policy_check {
// The class a member function pointer belongs to: the policy itself for a
// hook it defines, a base for one it inherits.
template <class M>
struct member_class;
template <class R, class C, class... A>
struct member_class<R (C::*)(A...)> {
  using type = C;
};
template <class R, class C, class... A>
struct member_class<R (C::*)(A...) const> {
  using type = C;
};
// Stands in for the tile visitor when naming the template hooks.
struct TileVisitor {
  void operator()(int64_t, int64_t) const {}
};
}  // namespace policy_check

// Compile-time: every hook is defined by P exactly when P::kOverrides lists it.
template <class P>
constexpr bool check_policy_hooks() {
#define ATTNZOO_CHECK_HOOK(name, member)                                                          \
  static_assert(std::is_same_v<typename policy_check::member_class<decltype(member)>::type, P> == \
                    ((P::kOverrides & hooks(Hook::name)) != 0),                                   \
                "policy hook " #name                                                              \
                ": a policy defines a hook exactly when its kOverrides lists it (a "              \
                "misspelt or unlisted hook would silently fall back to the base's)");
  ATTNZOO_CHECK_HOOK(block_q, &P::block_q)
  ATTNZOO_CHECK_HOOK(block_k, &P::block_k)
  ATTNZOO_CHECK_HOOK(max_key_tile, &P::max_key_tile)
  ATTNZOO_CHECK_HOOK(max_query_tile, &P::max_query_tile)
  ATTNZOO_CHECK_HOOK(for_each_key_tile, &P::template for_each_key_tile<policy_check::TileVisitor>)
  ATTNZOO_CHECK_HOOK(for_each_query_tile, &P::template for_each_query_tile<policy_check::TileVisitor>)
  ATTNZOO_CHECK_HOOK(modify_scores, &P::modify_scores)
  ATTNZOO_CHECK_HOOK(begin_query_tile, &P::begin_query_tile)
  ATTNZOO_CHECK_HOOK(on_rescale, &P::on_rescale)
  ATTNZOO_CHECK_HOOK(on_probs, &P::on_probs)
  ATTNZOO_CHECK_HOOK(end_query_tile, &P::end_query_tile)
  ATTNZOO_CHECK_HOOK(begin_pair, &P::begin_pair)
  ATTNZOO_CHECK_HOOK(modify_dp, &P::modify_dp)
  ATTNZOO_CHECK_HOOK(accumulate_value_grad, &P::accumulate_value_grad)
  ATTNZOO_CHECK_HOOK(wants_score_grad, &P::wants_score_grad)
  ATTNZOO_CHECK_HOOK(accumulate_score_grad, &P::accumulate_score_grad)
#undef ATTNZOO_CHECK_HOOK
  return true;
}

}  // namespace CPU_CAPABILITY
}  // namespace attnzoo::cpu
